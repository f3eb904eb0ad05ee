//! Screening of prompts for personal data and secrets before they can enter a
//! training set, as the InstructGPT paper filtered PII from its prompts.
//!
//! Detection is deliberately precise rather than eager: prompts are full of
//! numbers, versions, code and dates, and every false positive costs training
//! data or mangles what is kept. Each pattern is therefore a narrow regex plus
//! a validation in code (Luhn for cards, checksums and reserved ranges for
//! national ids, octet ranges for IPs, …) and a check that the match is not
//! glued to a longer token (`1.2.3.4.5`, `x4111…`).
//!
//! Scope decisions worth knowing:
//! - National ids are US SSNs, UK National Insurance numbers and the French
//!   social security number (NIR / "numéro INSEE", validated by its mod-97 key).
//! - NI numbers follow HMRC's prefix rules, so the documentation placeholder
//!   `QQ 12 34 56 C` (never issued) is not reported.
//! - IPv4 loopback, `0.0.0.0` and broadcast are not personal and are not
//!   reported; private ranges are (they describe someone's network). Dotted
//!   quads right after a version word (`version 1.2.3.4`, `v1.2.3.4`,
//!   `section 1.2.3.4`) are taken as versions, not addresses.
//! - Card numbers must have a major-network prefix and length (3–6, or
//!   2221–2720 with 16 digits) so that years, timestamps, ISBNs and NIRs that
//!   happen to pass Luhn are not cards.
//! - Generic `password=…` style assignments report only the value, so a
//!   redacted prompt keeps its shape (`password=[SECRET]`). Unquoted values
//!   that read as code (`password: &str`, `api_key=api_key`) are skipped.
//!
//! Only the `regex` crate is used, whose matching is linear in the input; the
//! patterns stick to ASCII classes and ASCII word boundaries (`(?-u)`), which
//! keeps its lazy DFA small, and avoid large counted repeats. A 100 KB prompt
//! takes about a millisecond of prose, a few for text dense with numbers.

use regex::{Captures, Regex};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiKind {
    Email,
    Phone,
    PaymentCard,
    NationalId,
    IpAddress,
    StreetAddress,
    Secret,
}

impl PiiKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PiiKind::Email => "email",
            PiiKind::Phone => "phone",
            PiiKind::PaymentCard => "payment_card",
            PiiKind::NationalId => "national_id",
            PiiKind::IpAddress => "ip_address",
            PiiKind::StreetAddress => "street_address",
            PiiKind::Secret => "secret",
        }
    }

    /// What [`PiiScreen::redact`] puts in place of a finding of this kind.
    pub fn placeholder(self) -> &'static str {
        match self {
            PiiKind::Email => "[EMAIL]",
            PiiKind::Phone => "[PHONE]",
            PiiKind::PaymentCard => "[CARD]",
            PiiKind::NationalId => "[NATIONAL_ID]",
            PiiKind::IpAddress => "[IP]",
            PiiKind::StreetAddress => "[ADDRESS]",
            PiiKind::Secret => "[SECRET]",
        }
    }

    /// Which kind labels a span where findings of several kinds overlap: the
    /// most sensitive, and among similar ones the most specific pattern.
    fn rank(self) -> u8 {
        match self {
            PiiKind::Secret => 7,
            PiiKind::Email => 6,
            PiiKind::PaymentCard => 5,
            PiiKind::NationalId => 4,
            PiiKind::IpAddress => 3,
            PiiKind::Phone => 2,
            PiiKind::StreetAddress => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PiiFinding {
    pub kind: PiiKind,
    /// Byte offset of the first byte of the finding in the screened text.
    pub start: usize,
    /// Byte offset one past the last byte.
    pub end: usize,
}

/// Email: ASCII local part and a dotted domain ending in an alphabetic TLD,
/// which rules out `pkg@1.2.3` while keeping sub-domains.
const EMAIL: &str = r"(?i-u)\b[a-z0-9_][a-z0-9._%+-]*@(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+([a-z]{2,24})\b";

/// International numbers: `+` and a country code, then groups (one may be in
/// parentheses, as in `+44 (0)20`). The digit count is checked in code.
const PHONE_INTL: &str = r"(?-u)\+[1-9][0-9]{0,2}(?:[ .-]?(?:\([0-9]{1,4}\)|[0-9]{1,5})){1,7}";

/// North American numbers: area code and exchange start with 2–9; one
/// separator style per number, so runs like `250 300 1000` do not qualify.
const PHONE_NANP: &str = r"(?-u)(?:\b1[ .-]?)?(?:\([2-9][0-9]{2}\) ?[2-9][0-9]{2}[-.][0-9]{4}|\b[2-9][0-9]{2}-[2-9][0-9]{2}-[0-9]{4}|\b[2-9][0-9]{2}\.[2-9][0-9]{2}\.[0-9]{4})\b";

/// European national numbers written with spaces: a trunk `0` (or the `00`
/// international prefix) and space-separated groups, e.g. `020 7946 0958`,
/// `01 23 45 67 89`, `030 12345678`.
const PHONE_EU: &str = r"(?-u)\b(00[1-9][0-9]{0,2}|0[1-9][0-9]{0,4})(?: [0-9]{2,8}){1,4}\b";

/// Runs of digit groups joined by single spaces or dashes; cards are looked for
/// inside each run in code (grouping, prefix, length, Luhn).
const DIGIT_RUN: &str = r"(?-u)[0-9]+(?:[ -][0-9]+)*";

const SSN: &str = r"(?-u)\b([0-9]{3})-([0-9]{2})-([0-9]{4})\b";

/// HMRC rules: first letter not D, F, I, Q, U, V; second not D, F, I, O, Q, U, V;
/// suffix A–D. Either unspaced or in the printed `AB 12 34 56 C` layout.
const NINO: &str = r"(?-u)\b([A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z])(?:[0-9]{6}[A-D]| [0-9]{2} [0-9]{2} [0-9]{2} [A-D]| [0-9]{6} [A-D])\b";

/// French NIR: sex, year, month (01–12 or the 20–99 "unknown" codes),
/// department (incl. Corsica 2A/2B), commune, order, then a two-digit key.
const NIR: &str =
    r"(?-u)\b[12] ?[0-9]{2} ?(?:0[1-9]|1[0-2]|[2-9][0-9]) ?(?:[0-9]{2}|2[AB]) ?[0-9]{3} ?[0-9]{3} ?[0-9]{2}\b";

const IPV4: &str = r"(?-u)\b[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\b";

/// Anything shaped like IPv6 (incl. `::` and an embedded IPv4 tail); the
/// standard library's parser decides.
const IPV6: &str = r"(?i-u)(?:[0-9a-f]{0,4}:){2,7}(?:[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}|[0-9a-f]{1,4})?";

/// House number, one to four capitalised (or ordinal) words, a street suffix,
/// then optionally a direction and a unit.
const ADDRESS: &str = concat!(
    r"(?-u)\b([0-9]{1,5})(?:-[0-9]{1,5})?[A-Za-z]?",
    r"((?:[ \t]+(?:[A-Z][A-Za-z'-]*\.?|[0-9]{1,3}(?:st|nd|rd|th))){1,4})",
    r"[ \t]+(Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl)\b\.?",
    r"(?:[ \t]+(?:NE|NW|SE|SW|N|S|E|W)\b\.?)?",
    r"(?:,?[ \t]+(?:(?:Apt|Apartment|Suite|Ste|Unit|Flat|Floor|Fl|Room|Rm)\.?[ \t]*#?|#[ \t]*)[0-9]{1,5}[A-Za-z]?\b)?",
);

/// Tokens recognisable by their prefix. `sk-` keys are further required (in
/// code) to mix letters and digits, so long kebab-case words do not qualify.
const TOKEN: &str = concat!(
    r"(?-u)\b(?:",
    r"sk-[A-Za-z0-9_-]{20,}",
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    r"|gh[pousr]_[A-Za-z0-9]{36,}",
    r"|github_pat_[A-Za-z0-9_]{22,}",
    r"|xox[baprs]-[A-Za-z0-9-]{10,}",
    r"|eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*",
    r")",
);

const BEARER: &str = r"(?i-u)\bbearer[ \t]+([A-Za-z0-9._~+/-]{20,}=*)";

const PRIVATE_KEY: &str = r"(?-u)-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----";

/// `keyword <sep> value`, the keyword being the last part of the name
/// (`DB_PASSWORD=`, `"api_key":`). Groups: 1 keyword, 2 separator, 3/4 quoted
/// value, 5 bare value.
const ASSIGNMENT: &str = concat!(
    r"(?i-u)(password|passwd|passphrase|secret|secret[_-]?key|client[_-]?secret|api[_ -]?key|apikey",
    r"|access[_-]?key|private[_-]?key|(?:access|auth|api|bearer|refresh|session|id)[_-]?token)",
    r#"(["']?[ \t]*(?:=>|:=|:|=)[ \t]*)"#,
    r#"(?:"([ !#-~]+)"|'([ -&(-~]+)'|([A-Za-z0-9!#$%&*+./=?@^_|~:-]+))"#,
);

/// Compiled patterns; build once and share (it is `Send + Sync`).
pub struct PiiScreen {
    email: Regex,
    phone_intl: Regex,
    phone_nanp: Regex,
    phone_eu: Regex,
    digit_run: Regex,
    ssn: Regex,
    nino: Regex,
    nir: Regex,
    ipv4: Regex,
    ipv6: Regex,
    address: Regex,
    token: Regex,
    bearer: Regex,
    private_key: Regex,
    assignment: Regex,
}

impl Default for PiiScreen {
    fn default() -> Self {
        Self::new()
    }
}

impl PiiScreen {
    pub fn new() -> Self {
        // The patterns are constants covered by the tests, so failing to
        // compile one is a bug in this file, not a runtime condition.
        let re = |pattern: &str| Regex::new(pattern).expect("built-in PII pattern compiles");
        Self {
            email: re(EMAIL),
            phone_intl: re(PHONE_INTL),
            phone_nanp: re(PHONE_NANP),
            phone_eu: re(PHONE_EU),
            digit_run: re(DIGIT_RUN),
            ssn: re(SSN),
            nino: re(NINO),
            nir: re(NIR),
            ipv4: re(IPV4),
            ipv6: re(IPV6),
            address: re(ADDRESS),
            token: re(TOKEN),
            bearer: re(BEARER),
            private_key: re(PRIVATE_KEY),
            assignment: re(ASSIGNMENT),
        }
    }

    /// Every finding, sorted by start. Overlapping findings are merged into
    /// one span covering all of them (so redaction never leaves a fragment
    /// behind), labelled with the most sensitive kind among them.
    pub fn screen(&self, text: &str) -> Vec<PiiFinding> {
        let mut found = Vec::new();
        self.secrets(text, &mut found);
        self.emails(text, &mut found);
        self.cards(text, &mut found);
        self.national_ids(text, &mut found);
        self.ips(text, &mut found);
        self.phones(text, &mut found);
        self.addresses(text, &mut found);
        merge(found)
    }

    /// The text with each finding replaced by its kind's placeholder. Findings
    /// need not be sorted; overlapping ones are merged as in [`Self::screen`],
    /// and any that do not fit the text (out of range, not on a character
    /// boundary) are ignored rather than trusted.
    pub fn redact(&self, text: &str, findings: &[PiiFinding]) -> String {
        let usable = findings
            .iter()
            .filter(|f| f.start < f.end && text.is_char_boundary(f.start) && text.is_char_boundary(f.end))
            .cloned()
            .collect();
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for finding in merge(usable) {
            out.push_str(&text[at..finding.start]);
            out.push_str(finding.kind.placeholder());
            at = finding.end;
        }
        out.push_str(&text[at..]);
        out
    }

    fn emails(&self, text: &str, out: &mut Vec<PiiFinding>) {
        for caps in self.email.captures_iter(text) {
            let (Some(all), Some(tld)) = (caps.get(0), caps.get(1)) else { continue };
            // `icon@2x.png` is an image name, and `git@host` the shared SSH
            // user of git hosting, not a person.
            let image = ["png", "jpg", "jpeg", "gif", "svg", "webp", "bmp", "ico", "tif", "tiff", "avif"]
                .iter()
                .any(|ext| tld.as_str().eq_ignore_ascii_case(ext));
            let local = all.as_str().split('@').next().unwrap_or("");
            if image || local.eq_ignore_ascii_case("git") {
                continue;
            }
            out.push(finding(PiiKind::Email, all.start(), all.end()));
        }
    }

    fn phones(&self, text: &str, out: &mut Vec<PiiFinding>) {
        for m in self.phone_intl.find_iter(text) {
            let digits = count_digits(m.as_str());
            let before = prev_char(text, m.start());
            let glued_before = before.is_some_and(|c| c.is_alphanumeric() || c == '+' || c == '_');
            // E.164 allows at most 15 digits; fewer than 8 is a short code or arithmetic.
            if (8..=15).contains(&digits) && !glued_before && !glued_after(text, m.end(), &['.', '-', '/', ':']) {
                out.push(finding(PiiKind::Phone, m.start(), m.end()));
            }
        }
        for m in self.phone_nanp.find_iter(text) {
            if !glued(text, m.start(), m.end(), &['.', '-', '/', ':']) {
                out.push(finding(PiiKind::Phone, m.start(), m.end()));
            }
        }
        for caps in self.phone_eu.captures_iter(text) {
            let (Some(m), Some(prefix)) = (caps.get(0), caps.get(1)) else { continue };
            let digits = count_digits(m.as_str());
            // A trunk `0` number has 9–11 digits in the countries this targets;
            // with `00` and a country code, up to 15 plus the prefix.
            let plausible = if prefix.as_str().starts_with("00") {
                (10..=17).contains(&digits)
            } else {
                (9..=11).contains(&digits)
            };
            // An all-zero subscriber part is padding (a hex dump's `08 00 00 00 00`), not a line.
            let subscriber = m.as_str().get(prefix.len()..).unwrap_or("");
            let padding = subscriber.bytes().all(|b| b == b'0' || b == b' ');
            // Spaces join groups here, so a digit group just beyond either end
            // means this is part of a longer table of numbers.
            if plausible && !padding && !glued(text, m.start(), m.end(), &['.', '-', '/', ':', ' ']) {
                out.push(finding(PiiKind::Phone, m.start(), m.end()));
            }
        }
    }

    fn cards(&self, text: &str, out: &mut Vec<PiiFinding>) {
        for m in self.digit_run.find_iter(text) {
            if glued(text, m.start(), m.end(), &['.', ',', '/', ':']) {
                continue;
            }
            // Most runs (years, counts, prices) are too short to hold a card.
            if count_digits(m.as_str()) < 13 {
                continue;
            }
            let groups = digit_groups(m.as_str(), m.start());
            let mut i = 0;
            while i < groups.len() {
                // The longest card starting at this group, if any.
                let best = (i..groups.len())
                    .take_while(|&j| groups[i..=j].iter().map(|g| g.digits.len()).sum::<usize>() <= 19)
                    .filter(|&j| is_card(&groups[i..=j]))
                    .last();
                match best {
                    Some(j) => {
                        out.push(finding(PiiKind::PaymentCard, groups[i].start, groups[j].end));
                        i = j + 1;
                    }
                    None => i += 1,
                }
            }
        }
    }

    fn national_ids(&self, text: &str, out: &mut Vec<PiiFinding>) {
        let joiners = ['.', '-', '/', ':'];
        for caps in self.ssn.captures_iter(text) {
            let Some(m) = caps.get(0) else { continue };
            let part = |i: usize| caps.get(i).map_or("", |g| g.as_str());
            let (area, group, serial) = (part(1), part(2), part(3));
            // Never issued: area 000, 666 or 900–999, group 00, serial 0000.
            let valid = area != "000" && area != "666" && !area.starts_with('9') && group != "00" && serial != "0000";
            if valid && !glued(text, m.start(), m.end(), &joiners) {
                out.push(finding(PiiKind::NationalId, m.start(), m.end()));
            }
        }
        for caps in self.nino.captures_iter(text) {
            let (Some(m), Some(prefix)) = (caps.get(0), caps.get(1)) else { continue };
            // Prefixes HMRC never allocates.
            let reserved = ["BG", "GB", "KN", "NK", "NT", "TN", "ZZ"].contains(&prefix.as_str());
            if !reserved && !glued(text, m.start(), m.end(), &joiners) {
                out.push(finding(PiiKind::NationalId, m.start(), m.end()));
            }
        }
        for m in self.nir.find_iter(text) {
            if nir_key_valid(m.as_str()) && !glued(text, m.start(), m.end(), &['.', '-', '/', ':', ' ']) {
                out.push(finding(PiiKind::NationalId, m.start(), m.end()));
            }
        }
    }

    fn ips(&self, text: &str, out: &mut Vec<PiiFinding>) {
        for m in self.ipv4.find_iter(text) {
            let Ok(addr) = m.as_str().parse::<std::net::Ipv4Addr>() else { continue };
            // The standard parser rejects octets over 255 and leading zeros.
            let not_personal = addr.is_loopback() || addr.is_unspecified() || addr.is_broadcast();
            if not_personal || glued(text, m.start(), m.end(), &['.']) || after_version_word(text, m.start()) {
                continue;
            }
            out.push(finding(PiiKind::IpAddress, m.start(), m.end()));
        }
        for m in self.ipv6.find_iter(text) {
            let (start, mut end) = (m.start(), m.end());
            let mut candidate = m.as_str();
            // A colon that ends a sentence ("at 2001:db8::1: it …") is not part of the address.
            if candidate.ends_with(':') && !candidate.ends_with("::") {
                candidate = &candidate[..candidate.len() - 1];
                end -= 1;
            }
            if candidate.parse::<std::net::Ipv6Addr>().is_err() || ipv6_groups(candidate) < 3 {
                continue;
            }
            let before = prev_char(text, start);
            // Checked after the stripped colon, if any: that colon was punctuation.
            let after = next_char(text, m.end());
            let glued_before = before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':' || c == '.');
            let glued_after = after.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
            if !glued_before && !glued_after {
                out.push(finding(PiiKind::IpAddress, start, end));
            }
        }
    }

    fn addresses(&self, text: &str, out: &mut Vec<PiiFinding>) {
        for caps in self.address.captures_iter(text) {
            let (Some(m), Some(number), Some(words), Some(suffix)) =
                (caps.get(0), caps.get(1), caps.get(2), caps.get(3))
            else {
                continue;
            };
            if glued(text, m.start(), m.end(), &['.', '-', '/', ':', ',']) {
                continue;
            }
            let words: Vec<&str> = words.as_str().split_ascii_whitespace().collect();
            if !plausible_address(text, m.start(), number.as_str(), &words, suffix.as_str()) {
                continue;
            }
            out.push(finding(PiiKind::StreetAddress, m.start(), m.end()));
        }
    }

    fn secrets(&self, text: &str, out: &mut Vec<PiiFinding>) {
        for m in self.token.find_iter(text) {
            let token = m.as_str();
            if let Some(body) = token.strip_prefix("sk-") {
                let mixed = body.bytes().any(|b| b.is_ascii_digit()) && body.bytes().any(|b| b.is_ascii_alphabetic());
                if !mixed {
                    continue;
                }
            }
            out.push(finding(PiiKind::Secret, m.start(), m.end()));
        }
        for caps in self.bearer.captures_iter(text) {
            let Some(value) = caps.get(1) else { continue };
            let v = value.as_str();
            // Real tokens mix letters and digits; `Bearer YOUR_TOKEN_GOES_HERE` is documentation.
            if v.bytes().any(|b| b.is_ascii_digit()) && v.bytes().any(|b| b.is_ascii_alphabetic()) {
                out.push(finding(PiiKind::Secret, value.start(), value.end()));
            }
        }
        self.private_keys(text, out);
        for caps in self.assignment.captures_iter(text) {
            if let Some((start, end)) = assigned_secret(text, &caps) {
                out.push(finding(PiiKind::Secret, start, end));
            }
        }
    }

    /// PEM private keys, from the BEGIN line to the matching END line, or to
    /// the end of the text when the paste was cut off. A BEGIN line not
    /// followed by key material is a mention (e.g. a parser's constant), not a key.
    fn private_keys(&self, text: &str, out: &mut Vec<PiiFinding>) {
        let mut from = 0;
        while let Some(caps) = self.private_key.captures_at(text, from) {
            let (Some(header), Some(label)) = (caps.get(0), caps.get(1)) else { break };
            let body = text[header.end()..].trim_start_matches([' ', '\t', '\r', '\n']);
            let base64_run = body.bytes().take_while(|b| b.is_ascii_alphanumeric() || b"+/=".contains(b)).count();
            if base64_run < 16 && !body.starts_with("Proc-Type:") {
                from = header.end();
                continue;
            }
            let end_marker = format!("-----END {}PRIVATE KEY-----", label.as_str());
            let end =
                text[header.end()..].find(&end_marker).map_or(text.len(), |i| header.end() + i + end_marker.len());
            out.push(finding(PiiKind::Secret, header.start(), end));
            from = end;
        }
    }
}

fn finding(kind: PiiKind, start: usize, end: usize) -> PiiFinding {
    PiiFinding { kind, start, end }
}

/// Sorts by start and merges overlapping spans; the merged span takes the
/// highest-ranked kind among its parts. Spans that merely touch stay apart.
fn merge(mut findings: Vec<PiiFinding>) -> Vec<PiiFinding> {
    findings.sort_by_key(|f| (f.start, f.end));
    let mut merged: Vec<PiiFinding> = Vec::with_capacity(findings.len());
    for f in findings {
        match merged.last_mut() {
            Some(last) if f.start < last.end => {
                last.end = last.end.max(f.end);
                if f.kind.rank() > last.kind.rank() {
                    last.kind = f.kind;
                }
            }
            _ => merged.push(f),
        }
    }
    merged
}

fn count_digits(s: &str) -> usize {
    s.bytes().filter(u8::is_ascii_digit).count()
}

fn prev_char(text: &str, at: usize) -> Option<char> {
    text.get(..at)?.chars().next_back()
}

fn next_char(text: &str, at: usize) -> Option<char> {
    text.get(at..)?.chars().next()
}

/// Whether `start..end` is only part of a longer token: a letter, digit or
/// underscore right next to it, or one of `joiners` with a digit beyond it
/// (`1.2.3.4.5`, `2024-123-45-6789`).
fn glued(text: &str, start: usize, end: usize, joiners: &[char]) -> bool {
    glued_before(text, start, joiners) || glued_after(text, end, joiners)
}

fn glued_before(text: &str, start: usize, joiners: &[char]) -> bool {
    let mut back = text.get(..start).unwrap_or("").chars().rev();
    match back.next() {
        Some(c) if c.is_alphanumeric() || c == '_' => true,
        Some(c) if joiners.contains(&c) => back.next().is_some_and(|d| d.is_ascii_digit()),
        _ => false,
    }
}

fn glued_after(text: &str, end: usize, joiners: &[char]) -> bool {
    let mut fwd = text.get(end..).unwrap_or("").chars();
    match fwd.next() {
        Some(c) if c.is_alphanumeric() || c == '_' => true,
        Some(c) if joiners.contains(&c) => fwd.next().is_some_and(|d| d.is_ascii_digit()),
        _ => false,
    }
}

/// One group of digits in a run, with the separator that preceded it.
struct DigitGroup<'a> {
    digits: &'a str,
    sep_before: Option<u8>,
    start: usize,
    end: usize,
}

fn digit_groups(run: &str, offset: usize) -> Vec<DigitGroup<'_>> {
    let mut groups = Vec::new();
    let mut sep_before = None;
    let mut group_start = 0;
    for (i, b) in run.bytes().enumerate() {
        if !b.is_ascii_digit() {
            groups.push(DigitGroup {
                digits: &run[group_start..i],
                sep_before,
                start: offset + group_start,
                end: offset + i,
            });
            sep_before = Some(b);
            group_start = i + 1;
        }
    }
    groups.push(DigitGroup {
        digits: &run[group_start..],
        sep_before,
        start: offset + group_start,
        end: offset + run.len(),
    });
    groups
}

/// A card is 13–19 digits, either ungrouped or in groups led by a group of 4,
/// middle groups of 4–6 and a last group of 3–6, with one separator style
/// (4-4-4-4, Amex 4-6-5, 4-4-4-4-3), with a major-network prefix, passing Luhn.
/// The last-group rule keeps a following small number ("… 1111 2 times") out.
fn is_card(groups: &[DigitGroup<'_>]) -> bool {
    let digits: String = groups.iter().map(|g| g.digits).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    if let [first, middle @ .., last] = groups {
        let sep = groups[1].sep_before;
        let shape_ok = first.digits.len() == 4
            && middle.iter().all(|g| (4..=6).contains(&g.digits.len()))
            && (3..=6).contains(&last.digits.len())
            && groups[1..].iter().all(|g| g.sep_before == sep);
        if !shape_ok {
            return false;
        }
    }
    network_prefix(&digits) && luhn_valid(&digits)
}

/// Major networks by first digit and length: Mastercard 2221–2720 (16),
/// Amex/Diners/JCB 3 (14–19), Visa 4 (13, 16, 19), Mastercard/Maestro 5 and
/// Discover/UnionPay/Maestro 6 (16–19). Leaving out 1, 7, 8, 9 and other 2xxx
/// keeps years, timestamps, ISBNs and French NIRs out.
fn network_prefix(digits: &str) -> bool {
    let len = digits.len();
    match digits.as_bytes().first() {
        Some(b'2') => {
            len == 16 && digits.get(..4).and_then(|p| p.parse::<u16>().ok()).is_some_and(|p| (2221..=2720).contains(&p))
        }
        Some(b'3') => (14..=19).contains(&len),
        Some(b'4') => matches!(len, 13 | 16 | 19),
        Some(b'5' | b'6') => (16..=19).contains(&len),
        _ => false,
    }
}

fn luhn_valid(digits: &str) -> bool {
    let mut sum = 0u32;
    for (i, b) in digits.bytes().rev().enumerate() {
        let mut v = u32::from(b.wrapping_sub(b'0'));
        if v > 9 {
            return false;
        }
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

/// The NIR key is 97 minus the first 13 digits mod 97, with Corsica's
/// departments 2A and 2B read as 19 and 18 and the number lowered by 1 or 2 million.
fn nir_key_valid(candidate: &str) -> bool {
    let compact: String = candidate.chars().filter(|c| !c.is_whitespace()).collect();
    let (Some(body), Some(key)) = (compact.get(..13), compact.get(13..)) else { return false };
    let (department, adjust) = match body.get(5..7) {
        Some("2A") => ("19", 1_000_000),
        Some("2B") => ("18", 2_000_000),
        other => (other.unwrap_or(""), 0),
    };
    let body = format!("{}{department}{}", body.get(..5).unwrap_or(""), body.get(7..).unwrap_or(""));
    let (Ok(number), Ok(key)) = (body.parse::<u64>(), key.parse::<u64>()) else { return false };
    let Some(number) = number.checked_sub(adjust) else { return false };
    97 - number % 97 == key
}

/// The run of letters `s` ends with (empty if it ends otherwise).
fn last_word(s: &str) -> &str {
    let start = s.char_indices().rev().take_while(|(_, c)| c.is_alphabetic()).last().map_or(s.len(), |(i, _)| i);
    &s[start..]
}

/// Explicit 16-bit groups in an IPv6 address (an embedded IPv4 counts as two),
/// so that `fe80::1` (two) is not reported but `2001:db8::1` (three) is.
fn ipv6_groups(addr: &str) -> usize {
    addr.split(':').filter(|g| !g.is_empty()).map(|g| if g.contains('.') { 2 } else { 1 }).sum()
}

/// Whether the word before `start` says that a dotted quad is a version or a
/// section number rather than an address (`version 1.2.3.4`, `§ 1.2.3.4`).
fn after_version_word(text: &str, start: usize) -> bool {
    const VERSION_WORDS: [&str; 17] = [
        "version",
        "ver",
        "v",
        "release",
        "build",
        "firmware",
        "rev",
        "revision",
        "section",
        "sec",
        "chapter",
        "figure",
        "fig",
        "table",
        "step",
        "clause",
        "paragraph",
    ];
    let before = text.get(..start).unwrap_or("").trim_end_matches([' ', '\t', ':', '#']);
    before.ends_with('§') || VERSION_WORDS.contains(&last_word(before).to_lowercase().as_str())
}

/// Rules out title-case prose that has the shape of an address.
fn plausible_address(text: &str, start: usize, number: &str, words: &[&str], suffix: &str) -> bool {
    const NOT_A_NAME: [&str; 11] = ["The", "A", "An", "Of", "In", "On", "At", "To", "And", "Or", "For"];
    const TIME_WORDS: [&str; 16] = [
        "in", "since", "by", "of", "from", "until", "till", "during", "before", "after", "around", "circa", "year",
        "early", "late", "mid",
    ];
    if words.first().is_some_and(|w| NOT_A_NAME.contains(w)) {
        return false;
    }
    // Well-known phrases ending in a street suffix that are not streets.
    let last = words.last().copied().unwrap_or("");
    let not_streets: &[&str] = match suffix {
        "Drive" => {
            &["Google", "Hard", "Flash", "Disk", "Thumb", "Test", "Network", "Shared", "Team", "USB", "External"]
        }
        "Court" => &["Supreme", "High", "District", "Federal", "Appeals", "Crown", "Food", "Tennis", "Basketball"],
        "Way" => {
            &["Milky", "Right", "Wrong", "Best", "Easy", "Hard", "Only", "Same", "Simple", "Fast", "Better", "Other"]
        }
        _ => &[],
    };
    if not_streets.contains(&last) {
        return false;
    }
    // "In 1969 Abbey Road was released": a year after a time preposition.
    let year = number.len() == 4 && number.parse::<u16>().is_ok_and(|n| (1000..=2099).contains(&n));
    let before = text.get(..start).unwrap_or("").trim_end();
    !(year && TIME_WORDS.contains(&last_word(before).to_lowercase().as_str()))
}

/// The byte span of the secret value in a `keyword <sep> value` match, if the
/// value looks like a real secret rather than a placeholder or code.
fn assigned_secret(text: &str, caps: &Captures<'_>) -> Option<(usize, usize)> {
    let keyword = caps.get(1)?;
    let separator = caps.get(2)?;
    if let Some(quoted) = caps.get(3).or_else(|| caps.get(4)) {
        let value = quoted.as_str().trim();
        if value.len() < 4 || placeholder(value) {
            return None;
        }
        return Some((quoted.start(), quoted.end()));
    }
    let bare = caps.get(5)?;
    // Sentence punctuation is not part of the value.
    let value = bare.as_str().trim_end_matches(['.', ':']);
    let (start, end) = (bare.start(), bare.start() + value.len());
    if value.len() < 4 || placeholder(value) {
        return None;
    }
    // `get_password()`, `env["KEY"]`, `Option<String>`: code, not a value.
    if matches!(next_char(text, end), Some('(' | '[' | '<' | '{')) {
        return None;
    }
    // `DB_PASSWORD=letmein` (an env file) and `?password=letmein` (a URL) hold
    // literal values; elsewhere a bare identifier is a variable or a type.
    let literal_context = separator.as_str() == "="
        && (keyword.as_str().bytes().all(|b| !b.is_ascii_lowercase())
            || matches!(prev_char(text, keyword.start()), Some('?' | '&')));
    if literal_context {
        return Some((start, end));
    }
    let code = value.trim_start_matches(['&', '*']);
    let is_identifier = |s: &str| {
        s.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    let path = code.split("::").flat_map(|p| p.split('.')).all(is_identifier);
    if path && (code.contains(['.', ':']) || !code.bytes().any(|b| b.is_ascii_digit()) || type_name(code)) {
        return None;
    }
    Some((start, end))
}

/// Values that stand in for a secret in documentation and templates.
fn placeholder(value: &str) -> bool {
    let lower = value.to_ascii_lowercase();
    const WORDS: [&str; 17] = [
        "password",
        "secret",
        "changeme",
        "example",
        "redacted",
        "hidden",
        "none",
        "null",
        "nil",
        "true",
        "false",
        "undefined",
        "test",
        "string",
        "optional",
        "required",
        "empty",
    ];
    value.starts_with(['<', '$', '{', '%', '['])
        || lower.starts_with("your")
        || lower.starts_with("xxx")
        || value.chars().all(|c| matches!(c, 'x' | 'X' | '*' | '.' | '-' | '_' | '#' | '•'))
        || WORDS.contains(&lower.as_str())
}

/// Type names with digits (`u64`, `Int32`), which follow `secret:` in signatures.
fn type_name(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("uint")
        .or_else(|| lower.strip_prefix("int"))
        .or_else(|| lower.strip_prefix("float"))
        .or_else(|| lower.strip_prefix('u'))
        .or_else(|| lower.strip_prefix('i'))
        .or_else(|| lower.strip_prefix('f'));
    rest.is_some_and(|r| matches!(r, "8" | "16" | "32" | "64" | "128" | "size"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    fn screen() -> &'static PiiScreen {
        static SCREEN: OnceLock<PiiScreen> = OnceLock::new();
        SCREEN.get_or_init(PiiScreen::new)
    }

    /// The findings as (kind, matched text) pairs, for readable assertions.
    fn found(text: &str) -> Vec<(PiiKind, &str)> {
        screen().screen(text).into_iter().map(|f| (f.kind, &text[f.start..f.end])).collect()
    }

    /// Each sentence must yield exactly one finding, of `kind`, covering `expected`.
    fn assert_positives(kind: PiiKind, cases: &[(&str, &str)]) {
        for &(text, expected) in cases {
            assert_eq!(found(text), vec![(kind, expected)], "in {text:?}");
        }
    }

    #[test]
    fn emails() {
        assert_positives(
            PiiKind::Email,
            &[
                ("Contact jane.doe@example.com for details.", "jane.doe@example.com"),
                ("Mail me: JOHN_SMITH+news@mail.example.co.uk!", "JOHN_SMITH+news@mail.example.co.uk"),
                ("<a.b-c@sub-domain.example.org>", "a.b-c@sub-domain.example.org"),
                ("write to user123@example.io, thanks", "user123@example.io"),
                ("first.last@company.com.au", "first.last@company.com.au"),
            ],
        );
    }

    #[test]
    fn phones() {
        assert_positives(
            PiiKind::Phone,
            &[
                ("Call +44 20 7946 0958 today.", "+44 20 7946 0958"),
                ("US office: +1-202-555-0143", "+1-202-555-0143"),
                ("ring (202) 555-0143 after six", "(202) 555-0143"),
                ("my number is 202-555-0143.", "202-555-0143"),
                ("or 202.555.0143", "202.555.0143"),
                ("Paris: +33 1 23 45 67 89", "+33 1 23 45 67 89"),
                ("London 020 7946 0958 ext", "020 7946 0958"),
                ("Berlin +49 30 12345678", "+49 30 12345678"),
                ("toll free 1-800-555-0199", "1-800-555-0199"),
                ("mobile 07700 900123", "07700 900123"),
                ("appelez le 01 23 45 67 89", "01 23 45 67 89"),
                ("+44 (0)20 7946 0958", "+44 (0)20 7946 0958"),
                ("+1 (202) 555-0143", "+1 (202) 555-0143"),
            ],
        );
    }

    #[test]
    fn payment_cards() {
        assert_positives(
            PiiKind::PaymentCard,
            &[
                ("card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111"),
                ("4111-1111-1111-1111", "4111-1111-1111-1111"),
                ("number:4111111111111111.", "4111111111111111"),
                ("MC 5500 0000 0000 0004", "5500 0000 0000 0004"),
                ("amex 3782 822463 10005 ok", "3782 822463 10005"),
                ("Discover 6011 1111 1111 1117", "6011 1111 1111 1117"),
                ("new MC range 2223 0000 4841 0010", "2223 0000 4841 0010"),
                ("paid with 4111 1111 1111 1111 2 times", "4111 1111 1111 1111"),
            ],
        );
    }

    #[test]
    fn luhn() {
        assert!(luhn_valid("4111111111111111"));
        assert!(!luhn_valid("4111111111111112"));
        assert!(luhn_valid("378282246310005"));
        assert!(!luhn_valid("41111111111111a1"));
        assert!(found("card 4111 1111 1111 1112 declined").is_empty());
        assert!(found("4111111111111112").is_empty());
        assert!(found("4111-1111-1111-1112").is_empty());
    }

    #[test]
    fn national_ids() {
        assert_positives(
            PiiKind::NationalId,
            &[
                ("SSN 123-45-6789 on file", "123-45-6789"),
                ("ssn:078-05-1120", "078-05-1120"),
                ("NI number AB123456C.", "AB123456C"),
                ("NINO: AB 12 34 56 C", "AB 12 34 56 C"),
                ("NIR 1 84 12 76 451 089 46", "1 84 12 76 451 089 46"),
                ("sécu 255081416802538", "255081416802538"),
                ("Corse 2 93 03 2A 123 456 71", "2 93 03 2A 123 456 71"),
            ],
        );
        // Numbers never issued.
        for text in [
            "000-12-3456",
            "666-12-3456",
            "912-34-5678",
            "123-00-4567",
            "123-45-0000",
            "QQ 12 34 56 C",
            "GB123456A",
            "DA123456A",
            "1 84 12 76 451 089 47",
        ] {
            assert!(found(text).is_empty(), "{text:?}");
        }
    }

    #[test]
    fn ip_addresses() {
        assert_positives(
            PiiKind::IpAddress,
            &[
                ("from 192.168.1.20 yesterday", "192.168.1.20"),
                ("dns 8.8.8.8.", "8.8.8.8"),
                ("connect to 203.0.113.195:443", "203.0.113.195"),
                ("host 2001:db8::8a2e:370:7334 is up", "2001:db8::8a2e:370:7334"),
                ("2001:0db8:85a3:0000:0000:8a2e:0370:7334", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
                ("link-local fe80::1ff:fe23:4567:890a%eth0", "fe80::1ff:fe23:4567:890a"),
                ("mapped ::ffff:192.0.2.128 here", "::ffff:192.0.2.128"),
                ("at [2001:db8::1]:8080: done", "2001:db8::1"),
                ("at 2001:db8::1: it answered", "2001:db8::1"),
            ],
        );
        for text in
            ["256.1.1.1", "1.2.3.4.5", "v1.2.3.4", "version 1.2.3.4", "127.0.0.1", "fe80::1", "::1", "01.02.03.04"]
        {
            assert!(found(text).is_empty(), "{text:?}");
        }
    }

    #[test]
    fn street_addresses() {
        assert_positives(
            PiiKind::StreetAddress,
            &[
                ("I live at 221B Baker Street, London.", "221B Baker Street"),
                ("1600 Pennsylvania Avenue NW, Washington", "1600 Pennsylvania Avenue NW"),
                ("meet at 350 5th Ave tomorrow", "350 5th Ave"),
                ("P. Sherman, 42 Wallaby Way, Sydney", "42 Wallaby Way"),
                ("ship to 77 Massachusetts Ave, Apt 4B please", "77 Massachusetts Ave, Apt 4B"),
                ("4059 Mt Lee Dr. is the sign", "4059 Mt Lee Dr."),
                ("office at 10 Downing St.", "10 Downing St."),
                ("1 W 42nd St Suite 300", "1 W 42nd St Suite 300"),
            ],
        );
    }

    #[test]
    fn secrets() {
        let github = format!("ghp_{}", "aB3".repeat(12));
        let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA1234567890abcdefgh\nabcdef==\n-----END RSA PRIVATE KEY-----";
        let cut_pem = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nMIIE";
        let with_github = format!("token {github} leaked");
        let with_jwt = format!("Cookie: {jwt}; path=/");
        let with_pem = format!("key:\n{pem}\nthanks");
        let cases: Vec<(&str, &str)> = vec![
            ("export OPENAI_API_KEY=sk-proj-abc123DEF456ghi789JKL0", "sk-proj-abc123DEF456ghi789JKL0"),
            ("use sk-instructd-0123456789abcdef0123 here", "sk-instructd-0123456789abcdef0123"),
            ("aws AKIAIOSFODNN7EXAMPLE id", "AKIAIOSFODNN7EXAMPLE"),
            (&with_github, &github),
            (
                "pat github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
                "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
            ),
            ("slack xoxb-1234567890-abcdefghij", "xoxb-1234567890-abcdefghij"),
            (&with_jwt, jwt),
            (&with_pem, pem),
            (cut_pem, cut_pem),
            ("Authorization: Bearer abc123def456ghi789jkl012", "abc123def456ghi789jkl012"),
            ("db password=hunter2 ok", "hunter2"),
            (r#"{"api_key": "a1b2c3d4e5"}"#, "a1b2c3d4e5"),
            ("DB_PASSWORD=letmein", "letmein"),
            ("https://x.example/login?user=bob&password=letmein", "letmein"),
            ("password: Tr0ub4dor&3.", "Tr0ub4dor&3"),
            ("client_secret = 'my secret phrase'", "my secret phrase"),
            (
                "aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            ),
        ];
        assert_positives(PiiKind::Secret, &cases);
    }

    #[test]
    fn ordinary_text_has_no_findings() {
        let negatives = [
            "The meeting is at 10:30 on 2024-01-15, room 4.",
            "Version 1.2.3.4 fixes the login bug.",
            "It costs $1,299.99 or €1.299,99 in Europe.",
            "The population grew from 7,800,000,000 to 8,000,000,000.",
            "ISBN 978-3-16-148410-0 and ISBN 9783161484100 name the same book.",
            "Call me at 5 if you can.",
            "We sold 1234567 units in 2023 and 2345678 in 2024.",
            "for (int i = 0; i < 100; i++) { sum += arr[i] * 2; }",
            "let mask = 0x7fff_ffff; // 2147483647",
            "The ratio was 3:2:1 and the final score 21-14.",
            "Listen on 127.0.0.1:8080 or bind 0.0.0.0:3000.",
            "Use std::collections::HashMap and Self::new() in impl blocks.",
            "In 1969 Abbey Road was released by the Beatles.",
            "Upload the 3 Google Drive files before Friday.",
            "The password reset page is linked below.",
            "fn login(password: &str, api_key: Option<String>, secret: u64) -> bool",
            "params = dict(max_tokens=256, temperature=0.7, top_p=0.9)",
            "client = Client(api_key=api_key, password=password)",
            "The task-management-tool-for-busy-teams is great.",
            "pi is 3.14159265358979323846 to twenty places",
            "Timestamps like 1700000000000 and 1699999999 are common.",
            "The tensor shape is (32, 128, 768) with 4096 tokens.",
            "See figure 4.2.1 and section 1.2.3.4 for details.",
            "Push to git@github.com:org/repo.git when ready.",
            "The image icon@2x.png looks sharp on retina screens.",
            "Run id 550e8400-e29b-41d4-a716-446655440000 finished.",
            "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "Set temperature=0.7 and top_k=40 for sampling.",
            "On 12/05/2024 at 14:30:00 UTC the job ran for 3600 seconds.",
            "Kubernetes v1.28.3 and Python 3.12.1 are installed.",
            "The hex dump reads 00 1f 8b 08 00 00 00 00.",
            "Times: 0800 1200 1600 2000 every day.",
            "See https://example.com/search?q=rust&page=2 for more.",
            "Chapter 3 The Long Way Home is my favourite.",
            "if password == confirm { save(password) }",
            "npm install lodash@4.17.21 react@18.2.0",
            "The 2019 2020 2021 2022 seasons were strong.",
            "MAC 00:1a:2b:3c:4d:5e is on the list.",
            "A 16 digit number like 1234 5678 9012 3456 is not a card.",
            "Use an API key: your key from the dashboard.",
            "Authorization: Bearer YOUR_TOKEN_GOES_HERE_PLEASE",
            "api_key = \"<your-api-key>\" and password: \"********\"",
            "if line.starts_with(\"-----BEGIN PRIVATE KEY-----\") { parse(line) }",
        ];
        for text in negatives {
            assert_eq!(found(text), vec![], "false positive in {text:?}");
        }
    }

    #[test]
    fn redaction() {
        let text = "Email jane@example.com or call +44 20 7946 0958; card 4111 1111 1111 1111, SSN 123-45-6789.";
        let findings = screen().screen(text);
        assert_eq!(screen().redact(text, &findings), "Email [EMAIL] or call [PHONE]; card [CARD], SSN [NATIONAL_ID].");
        let text = "from 10.1.2.3 at 221B Baker Street with password=hunter2";
        let findings = screen().screen(text);
        assert_eq!(screen().redact(text, &findings), "from [IP] at [ADDRESS] with password=[SECRET]");
        assert_eq!(screen().redact("nothing here", &[]), "nothing here");
    }

    #[test]
    fn redact_tolerates_bad_findings() {
        let text = "héllo world";
        let bogus = [
            finding(PiiKind::Email, 2, 3),   // inside `é`
            finding(PiiKind::Phone, 5, 500), // past the end
            finding(PiiKind::Secret, 7, 4),  // reversed
            finding(PiiKind::Secret, 7, 12), // `world`
            finding(PiiKind::Phone, 8, 10),  // inside the secret
        ];
        assert_eq!(screen().redact(text, &bogus), "héllo [SECRET]");
    }

    #[test]
    fn overlapping_findings_merge() {
        // The phone number is the local part of the address: one email finding.
        assert_eq!(found("write 202-555-0143@example.com now"), vec![(PiiKind::Email, "202-555-0143@example.com")]);
        assert_eq!(found("john1987@example.com"), vec![(PiiKind::Email, "john1987@example.com")]);
        // A card and a phone in one sentence stay separate findings.
        assert_eq!(
            found("Card 4111 1111 1111 1111, call +1 202 555 0143 if declined."),
            vec![(PiiKind::PaymentCard, "4111 1111 1111 1111"), (PiiKind::Phone, "+1 202 555 0143")]
        );
        // A secret value that is also an email: one span, labelled secret.
        assert_eq!(found("password=alice2@example.com"), vec![(PiiKind::Secret, "alice2@example.com")]);
        // Partial overlap: the union, under the higher-ranked kind.
        let merged = merge(vec![finding(PiiKind::StreetAddress, 5, 20), finding(PiiKind::Phone, 0, 10)]);
        assert_eq!(merged, vec![finding(PiiKind::Phone, 0, 20)]);
        // Touching spans stay apart.
        let apart = merge(vec![finding(PiiKind::Phone, 0, 5), finding(PiiKind::Email, 5, 9)]);
        assert_eq!(apart.len(), 2);
    }

    #[test]
    fn arbitrary_text_never_panics() {
        // Pieces that sit near every pattern, glued together at random, with
        // multi-byte characters next to the boundaries the checks look at.
        let pieces = [
            "é",
            "€",
            "日本",
            " ",
            "\n",
            ".",
            "-",
            ":",
            "::",
            "+",
            "@",
            "(",
            ")",
            "0",
            "1",
            "4111",
            "202",
            "555-0143",
            "2001",
            "db8",
            "ffff",
            "St",
            "Street",
            "Baker",
            "221B",
            "password",
            "=",
            "\"",
            "'",
            "sk-",
            "AKIA",
            "eyJ",
            "-----BEGIN PRIVATE KEY-----",
            "AB",
            "12",
            "2A",
            "192.168.",
            "version",
        ];
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..2000 {
            let mut text = String::new();
            for _ in 0..24 {
                // xorshift: deterministic and dependency-free.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                text.push_str(pieces[(state % pieces.len() as u64) as usize]);
            }
            let findings = screen().screen(&text);
            assert!(findings.windows(2).all(|w| w[0].end <= w[1].start), "{text:?}");
            assert!(findings.iter().all(|f| text.is_char_boundary(f.start) && text.is_char_boundary(f.end)));
            screen().redact(&text, &findings);
        }
    }

    #[test]
    fn findings_are_sorted_and_use_byte_offsets() {
        let text = "é 8.8.8.8 then jane@example.com then 202-555-0143";
        let findings = screen().screen(text);
        assert_eq!(
            findings.iter().map(|f| f.kind).collect::<Vec<_>>(),
            [PiiKind::IpAddress, PiiKind::Email, PiiKind::Phone]
        );
        assert!(findings.windows(2).all(|w| w[0].end <= w[1].start));
        assert_eq!(findings[0].start, 3); // `é` is two bytes
    }

    #[test]
    fn kinds_serialise_as_their_names() {
        for kind in [
            PiiKind::Email,
            PiiKind::Phone,
            PiiKind::PaymentCard,
            PiiKind::NationalId,
            PiiKind::IpAddress,
            PiiKind::StreetAddress,
            PiiKind::Secret,
        ] {
            assert_eq!(serde_json::to_string(&kind).expect("serialise"), format!("\"{}\"", kind.as_str()));
        }
    }

    #[test]
    fn screen_is_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<PiiScreen>();
    }

    /// A long prompt mixing prose, code and numbers, with a little PII in it.
    fn big_prompt(bytes: usize) -> String {
        let chunk = "The quick brown fox jumps over 13 lazy dogs in 2024; version 1.2.3 costs $4,000.50. \
                     fn main() { let x: u64 = 0xdead_beef; println!(\"{x}\"); } std::io::Result<()> \
                     Call Alice at +44 20 7946 0958 or alice@example.com; 10:30 2024-01-15 3.14159 \
                     Ref 4111 1111 1111 1112, room 221 Baker, ids 123 456 7890 and a:b:c::d ok.\n";
        chunk.repeat(bytes / chunk.len() + 1)
    }

    #[test]
    fn screening_200kb_is_fast_even_in_debug() {
        let prompt = big_prompt(200 * 1024);
        let screen = screen();
        screen.screen("warm up the lazy DFAs");
        let started = std::time::Instant::now();
        let findings = screen.screen(&prompt);
        let elapsed = started.elapsed();
        println!("screening {} bytes took {elapsed:?}", prompt.len());
        assert!(!findings.is_empty());
        assert!(elapsed < std::time::Duration::from_millis(300), "took {elapsed:?}");
    }

    /// `cargo test -p feedback --release -- --ignored --nocapture screening_100kb_timing`
    #[test]
    #[ignore = "timing report, run with --release"]
    fn screening_100kb_timing() {
        let prompt = big_prompt(100 * 1024);
        let screen = screen();
        screen.screen(&prompt);
        let runs = 50;
        let started = std::time::Instant::now();
        let mut n = 0;
        for _ in 0..runs {
            n += screen.screen(&prompt).len();
        }
        let per_run = started.elapsed() / runs;
        println!("screening {} bytes: {per_run:?} per run ({} findings)", prompt.len(), n / runs as usize);
    }
}
