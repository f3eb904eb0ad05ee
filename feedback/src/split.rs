//! The two functions the gateway and the trainer must agree on bit for bit:
//! which dataset split a user (or organisation) belongs to, and the key that
//! prompts are de-duplicated on.
//!
//! Splitting by user rather than by prompt keeps one person's prompts out of
//! both train and evaluation sets (the InstructGPT paper split by user id for
//! the same reason); de-duplicating on a long normalised prefix follows the
//! paper too. Both are pure functions of their input over SHA-256, so they give
//! the same answer on every machine, in every process and across releases.
//! Changing either silently reshuffles the datasets: the tests pin the output.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Prompts sharing their first this many normalised characters count as duplicates.
pub const DEDUPE_PREFIX_CHARS: usize = 200;

/// Prepended to the id before hashing so that the split is independent of any
/// other use of SHA-256 over the same ids (e.g. a sampling decision keyed the same way).
/// Part of the on-disk contract: changing it reassigns every user.
const SPLIT_SALT: &[u8] = b"instructd/split/v1\0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Validation,
    Test,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }
}

/// Fractions of ids sent to validation and test; the rest is train.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SplitConfig {
    pub validation: f64,
    pub test: f64,
}

impl Default for SplitConfig {
    fn default() -> Self {
        Self { validation: 0.1, test: 0.1 }
    }
}

impl SplitConfig {
    /// Both fractions finite and in [0, 1], together at most 1.
    pub fn validate(&self) -> Result<(), String> {
        for (name, value) in [("validation", self.validation), ("test", self.test)] {
            if !value.is_finite() || !(0.0..=1.0).contains(&value) {
                return Err(format!("split fraction `{name}` must be between 0 and 1, got {value}"));
            }
        }
        // A small tolerance so that e.g. 0.7 + 0.3 is not rejected over a rounding error.
        if self.validation + self.test > 1.0 + 1e-9 {
            return Err(format!(
                "split fractions validation ({}) + test ({}) must not exceed 1",
                self.validation, self.test
            ));
        }
        Ok(())
    }
}

/// The split of everything logged under `id`: the same id always lands in the
/// same split for a given config. `u` = first 8 bytes of SHA-256(salt ‖ id) as
/// a big-endian u64, scaled to [0, 1); [0, validation) is validation,
/// [validation, validation + test) is test, the rest train. An invalid config
/// (see [`SplitConfig::validate`]) is not rejected here: NaN fractions select
/// nothing, so such ids fall to train.
pub fn split_for(id: &str, config: &SplitConfig) -> Split {
    let u = unit_hash(id);
    if u < config.validation {
        Split::Validation
    } else if u < config.validation + config.test {
        Split::Test
    } else {
        Split::Train
    }
}

fn unit_hash(id: &str) -> f64 {
    salted_unit_hash(SPLIT_SALT, id)
}

/// SHA-256 of `salt` then `id` as a number in [0, 1): the same on every
/// replica and platform, independent across salts. Only the top 53 bits are
/// kept so the conversion to f64 is exact.
pub fn salted_unit_hash(salt: &[u8], id: &str) -> f64 {
    let digest = Sha256::new().chain_update(salt).chain_update(id.as_bytes()).finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let bits = u64::from_be_bytes(first) >> 11;
    bits as f64 / (1u64 << 53) as f64
}

/// The key prompts are de-duplicated on: the prompt lowercased, whitespace
/// runs collapsed to one space, trimmed, cut to its first `prefix_chars`
/// characters (Unicode scalar values), then SHA-256 as lowercase hex.
///
/// Lowercasing is per character (`char::to_lowercase`, no context-dependent
/// final-sigma rule) so that the key of a prompt depends only on its prefix,
/// which also lets this stop reading a long prompt after the prefix.
pub fn dedupe_key(prompt: &str, prefix_chars: usize) -> String {
    let mut hasher = Sha256::new();
    let mut taken = 0usize;
    // A space is only written when a non-space follows, which both collapses
    // runs and trims the ends.
    let mut pending_space = false;
    let mut buf = [0u8; 4];
    'outer: for c in prompt.chars() {
        if c.is_whitespace() {
            pending_space = taken > 0;
            continue;
        }
        for lower in c.to_lowercase() {
            if pending_space {
                if taken == prefix_chars {
                    break 'outer;
                }
                hasher.update(b" ");
                taken += 1;
                pending_space = false;
            }
            if taken == prefix_chars {
                break 'outer;
            }
            hasher.update(lower.encode_utf8(&mut buf).as_bytes());
            taken += 1;
        }
    }
    to_hex(&hasher.finalize())
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The straightforward definition `dedupe_key` must agree with.
    fn reference_key(prompt: &str, prefix_chars: usize) -> String {
        let lowered: String = prompt.chars().flat_map(char::to_lowercase).collect();
        let collapsed = lowered.split_whitespace().collect::<Vec<_>>().join(" ");
        let cut: String = collapsed.chars().take(prefix_chars).collect();
        to_hex(&Sha256::digest(cut.as_bytes()))
    }

    #[test]
    fn split_is_pinned() {
        // Hard-coded on purpose (cross-checked with Python's hashlib): if the
        // hashing, the salt or the thresholds change, users move between
        // splits and this must fail.
        let config = SplitConfig::default();
        let expected = [
            ("user-1", Split::Train),
            ("user-2", Split::Test),
            ("user-3", Split::Train),
            ("user-18", Split::Test),
            ("user-19", Split::Validation),
            ("user-38", Split::Validation),
            ("org_acme", Split::Train),
            ("", Split::Train),
        ];
        for (id, split) in expected {
            assert_eq!(split_for(id, &config), split, "id {id:?}");
        }
    }

    #[test]
    fn unit_hash_is_pinned() {
        let pinned = [
            ("user-1", 0.9735444848050465),
            ("user-2", 0.1812466251692002),
            ("user-19", 0.033328041832740074),
            ("", 0.251481160119988),
            ("ünïcode-id", 0.8010757037309681),
        ];
        for (id, u) in pinned {
            assert_eq!(unit_hash(id), u, "id {id:?}");
        }
    }

    #[test]
    fn split_is_stable_across_calls() {
        let config = SplitConfig { validation: 0.3, test: 0.3 };
        for i in 0..1000 {
            let id = format!("u{i}");
            assert_eq!(split_for(&id, &config), split_for(&id, &config));
        }
    }

    #[test]
    fn proportions_follow_config() {
        for config in [
            SplitConfig::default(),
            SplitConfig { validation: 0.05, test: 0.2 },
            SplitConfig { validation: 0.0, test: 0.5 },
        ] {
            let n = 100_000;
            let (mut validation, mut test) = (0usize, 0usize);
            for i in 0..n {
                match split_for(&format!("user-{i}"), &config) {
                    Split::Validation => validation += 1,
                    Split::Test => test += 1,
                    Split::Train => {}
                }
            }
            let share = |count: usize| count as f64 / n as f64;
            assert!((share(validation) - config.validation).abs() < 0.01, "{config:?}: validation {validation}");
            assert!((share(test) - config.test).abs() < 0.01, "{config:?}: test {test}");
        }
    }

    #[test]
    fn extreme_configs() {
        let all_train = SplitConfig { validation: 0.0, test: 0.0 };
        let all_test = SplitConfig { validation: 0.0, test: 1.0 };
        for i in 0..1000 {
            let id = format!("x{i}");
            assert_eq!(split_for(&id, &all_train), Split::Train);
            assert_eq!(split_for(&id, &all_test), Split::Test);
        }
    }

    #[test]
    fn config_validation() {
        assert!(SplitConfig::default().validate().is_ok());
        assert!(SplitConfig { validation: 0.7, test: 0.3 }.validate().is_ok());
        assert!(SplitConfig { validation: 0.0, test: 0.0 }.validate().is_ok());
        assert!(SplitConfig { validation: -0.1, test: 0.1 }.validate().is_err());
        assert!(SplitConfig { validation: 0.1, test: 1.5 }.validate().is_err());
        assert!(SplitConfig { validation: 0.6, test: 0.5 }.validate().is_err());
        assert!(SplitConfig { validation: f64::NAN, test: 0.1 }.validate().is_err());
        assert!(SplitConfig { validation: 0.1, test: f64::INFINITY }.validate().is_err());
    }

    #[test]
    fn config_deserialises_with_defaults_and_rejects_unknown_fields() {
        let c: SplitConfig = serde_json::from_str(r#"{"test": 0.2}"#).expect("valid config");
        assert_eq!((c.validation, c.test), (0.1, 0.2));
        let c: SplitConfig = serde_json::from_str("{}").expect("empty config");
        assert_eq!((c.validation, c.test), (0.1, 0.1));
        assert!(serde_json::from_str::<SplitConfig>(r#"{"train": 0.8}"#).is_err());
    }

    #[test]
    fn split_names() {
        for split in [Split::Train, Split::Validation, Split::Test] {
            let json = serde_json::to_string(&split).expect("serialise");
            assert_eq!(json, format!("\"{}\"", split.as_str()));
        }
    }

    #[test]
    fn dedupe_key_is_pinned() {
        assert_eq!(
            dedupe_key("", DEDUPE_PREFIX_CHARS),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" // SHA-256 of ""
        );
        // SHA-256 of "hello world".
        assert_eq!(
            dedupe_key("  Hello \n World ", DEDUPE_PREFIX_CHARS),
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
    }

    #[test]
    fn dedupe_ignores_what_follows_the_prefix() {
        let prefix = "Write a story about a dragon. ".repeat(10);
        assert!(prefix.chars().count() > DEDUPE_PREFIX_CHARS);
        let a = format!("{prefix}It should be funny.");
        let b = format!("{prefix}It should be sad, and long.");
        assert_eq!(dedupe_key(&a, DEDUPE_PREFIX_CHARS), dedupe_key(&b, DEDUPE_PREFIX_CHARS));
    }

    #[test]
    fn dedupe_ignores_case_and_whitespace() {
        let a = "Explain the moon landing to a 6 year old.";
        let b = "  EXPLAIN the\tmoon\n\nlanding   to a 6 YEAR old.\n";
        assert_eq!(dedupe_key(a, DEDUPE_PREFIX_CHARS), dedupe_key(b, DEDUPE_PREFIX_CHARS));
        // Whitespace after the cut must not matter either.
        let c = format!("{}   ", "a".repeat(DEDUPE_PREFIX_CHARS));
        let d = format!("{} b", "a".repeat(DEDUPE_PREFIX_CHARS));
        assert_eq!(dedupe_key(&c, DEDUPE_PREFIX_CHARS), dedupe_key(&d, DEDUPE_PREFIX_CHARS));
    }

    #[test]
    fn dedupe_separates_different_prefixes() {
        let a = "Explain the moon landing to a 6 year old.";
        let b = "Explain the moon landing to a 7 year old.";
        assert_ne!(dedupe_key(a, DEDUPE_PREFIX_CHARS), dedupe_key(b, DEDUPE_PREFIX_CHARS));
        // Whitespace between words is kept as one space, not dropped.
        assert_ne!(dedupe_key("ab c", DEDUPE_PREFIX_CHARS), dedupe_key("abc", DEDUPE_PREFIX_CHARS));
        // A difference just inside the prefix counts.
        let base = "x".repeat(DEDUPE_PREFIX_CHARS - 1);
        assert_ne!(
            dedupe_key(&format!("{base}a"), DEDUPE_PREFIX_CHARS),
            dedupe_key(&format!("{base}b"), DEDUPE_PREFIX_CHARS)
        );
    }

    #[test]
    fn dedupe_empty_and_blank_prompts() {
        let empty = dedupe_key("", DEDUPE_PREFIX_CHARS);
        assert_eq!(empty.len(), 64);
        assert_eq!(dedupe_key(" \n\t ", DEDUPE_PREFIX_CHARS), empty);
        assert_eq!(dedupe_key("anything", 0), empty);
    }

    #[test]
    fn dedupe_matches_reference_definition() {
        let samples = [
            "",
            " ",
            "Hello",
            "  Hello   World  ",
            "ÄÖÜ straße İstanbul ΣΟΦΟΣ",
            "tabs\tand\nnewlines\r\n\u{a0}nbsp\u{2003}em",
            "日本語のプロンプト と 空白",
        ];
        for prompt in samples {
            for prefix in [0, 1, 2, 5, 7, 12, DEDUPE_PREFIX_CHARS] {
                assert_eq!(dedupe_key(prompt, prefix), reference_key(prompt, prefix), "{prompt:?} / {prefix}");
            }
        }
        // The cut counts characters, not bytes.
        assert_eq!(dedupe_key("ééé", 2), dedupe_key("ÉÉx", 2));
    }
}
