//! The classifier's rule file: TOML in, validated and compiled patterns out.
//!
//! ```toml
//! [[use_case]]                      # order = precedence when scores tie
//! name = "summarization"            # a UseCase wire name
//! patterns = ['\bsummar(y|ize)\b', { pattern = '\btl;?dr\b', weight = 3 }]
//!
//! [[domain]]
//! name = "medical_diagnosis"        # a Domain wire name
//! patterns = ['\bdiagnos(e|is)\b[^.?!]{0,40}\bmy\b']
//! ```
//!
//! A bare string is a pattern of weight 1. Every pattern is compiled
//! case-insensitive and multi-line (`^`/`$` match at line breaks), so a rule
//! file never has to repeat `(?im)`, and `\b`/`\B` are ASCII word
//! boundaries: a Unicode `\b` makes the regex crate's fast lazy DFA give up
//! on any non-ASCII prompt, and every prompt is scanned on the request path.
//! (So a pattern word starting or ending in a non-ASCII letter takes no `\b`
//! at that end.)
//! Mistakes are refused at load time with the rule and pattern named: a
//! gateway must not start with a policy that silently matches nothing.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use regex::{Regex, RegexBuilder};
use serde::Deserialize;

use super::use_case::{Domain, UseCase};

/// Compiled-program budget per pattern; generous because Unicode-aware,
/// case-insensitive `\w` and `\b` are large, and a rule file is trusted input.
pub(crate) const REGEX_SIZE_LIMIT: usize = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("reading use-case rules from {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("use-case rules are not valid TOML: {0}")]
    Toml(String),
    #[error("use-case rules, {rule}: {message}")]
    Rule { rule: String, message: String },
    #[error("use-case rules, {rule}, pattern {index} `{pattern}`: {message}")]
    Pattern { rule: String, index: usize, pattern: String, message: String },
}

/// One compiled pattern.
#[derive(Debug, Clone)]
pub(crate) struct Pattern {
    /// As compiled (see [`expand`]); the classifier's `RegexSet`s use it too.
    pub expanded: String,
    pub regex: Regex,
    pub weight: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct UseCaseRule {
    pub use_case: UseCase,
    pub patterns: Vec<Pattern>,
}

#[derive(Debug, Clone)]
pub(crate) struct DomainRule {
    pub domain: Domain,
    pub patterns: Vec<Pattern>,
}

/// A whole rule file, in file order.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    pub use_cases: Vec<UseCaseRule>,
    pub domains: Vec<DomainRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    // Kept as raw values so each rule is checked on its own and an error can
    // name the rule rather than a line number alone.
    #[serde(default)]
    use_case: Vec<toml::Value>,
    #[serde(default)]
    domain: Vec<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: String,
    patterns: Vec<PatternSpec>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PatternSpec {
    Plain(String),
    Weighted(WeightedSpec),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightedSpec {
    pattern: String,
    weight: u32,
}

impl Rules {
    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| PolicyError::Io { path: path.to_path_buf(), source })?;
        Self::from_toml_str(&text)
    }

    pub fn from_toml_str(text: &str) -> Result<Self, PolicyError> {
        let file: FileSpec = toml::from_str(text).map_err(|e| PolicyError::Toml(e.to_string()))?;
        let mut seen_use_cases = HashSet::new();
        let mut use_cases = Vec::with_capacity(file.use_case.len());
        for (i, value) in file.use_case.into_iter().enumerate() {
            let (label, spec) = parse_rule("use_case", i, value)?;
            let use_case = UseCase::parse(&spec.name).ok_or_else(|| PolicyError::Rule {
                rule: label.clone(),
                message: format!("unknown use case; expected one of: {}", names(UseCase::ALL.map(UseCase::as_str))),
            })?;
            if !seen_use_cases.insert(use_case) {
                return Err(PolicyError::Rule { rule: label, message: format!("a second rule for {use_case}") });
            }
            use_cases.push(UseCaseRule { use_case, patterns: compile(&label, spec.patterns)? });
        }
        let mut seen_domains = HashSet::new();
        let mut domains = Vec::with_capacity(file.domain.len());
        for (i, value) in file.domain.into_iter().enumerate() {
            let (label, spec) = parse_rule("domain", i, value)?;
            let domain = Domain::parse(&spec.name).ok_or_else(|| PolicyError::Rule {
                rule: label.clone(),
                message: format!("unknown domain; expected one of: {}", names(Domain::ALL.map(Domain::as_str))),
            })?;
            if !seen_domains.insert(domain) {
                return Err(PolicyError::Rule { rule: label, message: format!("a second rule for {domain}") });
            }
            domains.push(DomainRule { domain, patterns: compile(&label, spec.patterns)? });
        }
        Ok(Rules { use_cases, domains })
    }
}

/// Deserializes one `[[section]]` entry; the returned label names it in errors.
fn parse_rule(section: &str, index: usize, value: toml::Value) -> Result<(String, RuleSpec), PolicyError> {
    let name = value.get("name").and_then(toml::Value::as_str).map(str::to_owned);
    let label = match &name {
        Some(name) => format!("[[{section}]] #{} \"{name}\"", index + 1),
        None => format!("[[{section}]] #{}", index + 1),
    };
    let spec: RuleSpec = value.try_into().map_err(|e: toml::de::Error| PolicyError::Rule {
        rule: label.clone(),
        message: format!("{} (a rule is `name` plus `patterns`: strings or {{ pattern, weight }} tables)", e.message()),
    })?;
    Ok((label, spec))
}

fn compile(label: &str, specs: Vec<PatternSpec>) -> Result<Vec<Pattern>, PolicyError> {
    if specs.is_empty() {
        return Err(PolicyError::Rule { rule: label.to_string(), message: "has no patterns".into() });
    }
    let mut patterns = Vec::with_capacity(specs.len());
    for (i, spec) in specs.into_iter().enumerate() {
        let (source, weight) = match spec {
            PatternSpec::Plain(source) => (source, 1),
            PatternSpec::Weighted(WeightedSpec { pattern, weight }) => (pattern, weight),
        };
        let fail = |message: String| PolicyError::Pattern {
            rule: label.to_string(),
            index: i + 1,
            pattern: source.clone(),
            message,
        };
        if weight == 0 {
            return Err(fail("weight must be at least 1".into()));
        }
        if source.trim().is_empty() {
            return Err(fail("empty pattern (it would match every prompt)".into()));
        }
        let expanded = expand(&source);
        let regex = build(&expanded).map_err(|e| {
            // Report the error against what the author wrote, where it is one.
            fail(build(&source).err().unwrap_or(e).to_string())
        })?;
        // A pattern matching the empty string matches every prompt: a typo
        // such as a trailing `|` would otherwise tag all traffic.
        if regex.is_match("") {
            return Err(fail("matches the empty string, so it would match every prompt".into()));
        }
        patterns.push(Pattern { expanded, regex, weight });
    }
    Ok(patterns)
}

/// The one place pattern flags are decided; the classifier's `RegexSet`s use the same.
pub(crate) fn build(source: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(source).case_insensitive(true).multi_line(true).size_limit(REGEX_SIZE_LIMIT).build()
}

/// Rewrites `\b` and `\B` to their ASCII forms `(?-u:\b)`, `(?-u:\B)`.
/// Escapes are read pairwise, so `\\b` (a backslash, then `b`) is left
/// alone, as are the `\b{start}` family of assertions.
pub(crate) fn expand(source: &str) -> String {
    let mut out = String::with_capacity(source.len() + 32);
    let mut chars = source.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(b @ ('b' | 'B')) if chars.peek() != Some(&'{') => {
                out.push_str("(?-u:\\");
                out.push(b);
                out.push(')');
            }
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

fn names<const N: usize>(all: [&str; N]) -> String {
    all.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        match Rules::from_toml_str(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn plain_and_weighted_patterns() {
        let rules = Rules::from_toml_str(
            r#"
            [[use_case]]
            name = "summarization"
            patterns = ['\bsummar', { pattern = 'tl;?dr', weight = 3 }]
            [[domain]]
            name = "law_enforcement"
            patterns = ['recidivism']
            "#,
        )
        .unwrap();
        assert_eq!(rules.use_cases[0].use_case, UseCase::Summarization);
        let weights: Vec<u32> = rules.use_cases[0].patterns.iter().map(|p| p.weight).collect();
        assert_eq!(weights, [1, 3]);
        assert!(rules.use_cases[0].patterns[0].regex.is_match("SUMMARIZE this"), "case-insensitive");
        assert_eq!(rules.domains[0].domain, Domain::LawEnforcement);
    }

    #[test]
    fn word_boundaries_become_ascii() {
        assert_eq!(expand(r"\bsumm\Bar\b"), r"(?-u:\b)summ(?-u:\B)ar(?-u:\b)");
        assert_eq!(expand(r"a\\b \d\b{start}x\\"), r"a\\b \d\b{start}x\\");
        let regex = build(&expand(r"\brésumés\b")).unwrap();
        assert!(regex.is_match("three RÉSUMÉS.") && !regex.is_match("résumésx"));
        // The price: an ASCII boundary cannot sit next to a non-ASCII letter.
        assert!(!build(&expand(r"café\b")).unwrap().is_match("café noir"));
    }

    #[test]
    fn bad_regex_names_rule_and_pattern() {
        let message = error("[[use_case]]\nname = \"rewrite\"\npatterns = ['ok', '(unclosed']");
        assert!(message.contains("[[use_case]] #1 \"rewrite\""), "{message}");
        assert!(message.contains("pattern 2 `(unclosed`"), "{message}");
        let message = error("[[domain]]\nname = \"medical_diagnosis\"\npatterns = ['a|']");
        assert!(message.contains("\"medical_diagnosis\"") && message.contains("empty string"), "{message}");
    }

    #[test]
    fn bad_rules_are_named() {
        let message = error(
            "[[use_case]]\nname = \"chat\"\npatterns = ['hi']\n[[use_case]]\nname = \"summarisation\"\npatterns = ['x']",
        );
        assert!(message.contains("#2 \"summarisation\"") && message.contains("unknown use case"), "{message}");
        let message = error("[[domain]]\nname = \"astrology\"\npatterns = ['x']");
        assert!(message.contains("\"astrology\"") && message.contains("unknown domain"), "{message}");
        let message = error("[[use_case]]\nname = \"chat\"\npattern = ['hi']");
        assert!(message.contains("[[use_case]] #1 \"chat\""), "{message}");
        let message = error("[[use_case]]\nname = \"chat\"\npatterns = []");
        assert!(message.contains("\"chat\": has no patterns"), "{message}");
        let message = error("[[use_case]]\nname = \"chat\"\npatterns = [{ pattern = 'hi', weight = 0 }]");
        assert!(message.contains("\"chat\", pattern 1 `hi`: weight"), "{message}");
        let message =
            error("[[use_case]]\nname = \"chat\"\npatterns = ['a']\n[[use_case]]\nname = \"Chat\"\npatterns = ['b']");
        assert!(message.contains("#2 \"Chat\": a second rule for chat"), "{message}");
        let message = error("[[use_case]]\npatterns = ['a']");
        assert!(message.contains("[[use_case]] #1:") && message.contains("name"), "{message}");
    }

    #[test]
    fn bad_toml_is_reported() {
        let message = error("[[use_case]\nname = 'x'");
        assert!(message.starts_with("use-case rules are not valid TOML"), "{message}");
        let message = error("[[usecase]]\nname = 'x'\npatterns = ['a']");
        assert!(message.contains("usecase"), "{message}");
    }

    #[test]
    fn missing_file_names_path() {
        let message = Rules::from_file(Path::new("/nonexistent/use_cases.toml")).unwrap_err().to_string();
        assert!(message.contains("/nonexistent/use_cases.toml"), "{message}");
    }
}
