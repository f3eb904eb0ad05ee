//! Hidden preferences: the rule a simulated labeler judges responses by.
//!
//! A rule gives every response a score (higher is better). Rankings sort a
//! prompt's samples by score, equal scores forming one tie group; ratings map
//! the score onto the Likert scale 1..7; demonstrations are written to satisfy
//! the rule strongly. Nothing here is ever sent to the gateway: only the
//! judgments are. Evaluation code uses [`score`] to measure how well a policy
//! learned the rule (e.g. win rate of a candidate's outputs over the serving
//! model's).

use std::fmt;
use std::str::FromStr;

/// The rules `--preference` accepts, for `--help`.
pub const RULES_HELP: &str = "\
Hidden preference rules (--preference), known only to the simulated labelers:
  contains:<word>     more whole-word, case-insensitive occurrences of <word> are better
  avoid:<word>        fewer occurrences of <word> are better
  shorter             fewer characters are better
  longer              more characters are better
  starts-with:<text>  responses beginning with <text> (case-insensitive) are best; a longer
                      matching beginning beats a shorter one
Samples with equal scores are ranked as ties.";

/// A hidden preference over response texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Preference {
    /// Score: occurrences of the word or phrase (stored lowercase).
    Contains(String),
    /// Score: minus the occurrences of the word or phrase (stored lowercase).
    Avoid(String),
    /// Score: minus the number of characters (surrounding whitespace ignored).
    Shorter,
    /// Score: the number of characters (surrounding whitespace ignored).
    Longer,
    /// Score: the fraction of the text matched at the start, 0..1 (as written; compared case-insensitively).
    StartsWith(String),
}

/// `rule`'s score of `text` (higher is better); see [`Preference::score`].
pub fn score(rule: &Preference, text: &str) -> f64 {
    rule.score(text)
}

impl Preference {
    /// Parses `contains:<word>`, `avoid:<word>`, `shorter`, `longer` or `starts-with:<text>`.
    pub fn parse(rule: &str) -> Result<Self, String> {
        let rule = rule.trim();
        let unknown = || format!("unknown preference rule '{rule}'.\n{RULES_HELP}");
        let Some((name, argument)) = rule.split_once(':') else {
            return match rule.to_ascii_lowercase().as_str() {
                "shorter" => Ok(Self::Shorter),
                "longer" => Ok(Self::Longer),
                "contains" | "avoid" | "starts-with" => Err(format!("'{rule}' needs an argument, e.g. '{rule}:hello'")),
                _ => Err(unknown()),
            };
        };
        let name = name.trim().to_ascii_lowercase();
        let needs = |what: &str| format!("'{name}:' needs a non-empty {what}");
        match name.as_str() {
            "contains" | "avoid" => {
                let word = argument.trim().to_lowercase();
                if word.is_empty() {
                    return Err(needs("word"));
                }
                Ok(if name == "contains" { Self::Contains(word) } else { Self::Avoid(word) })
            }
            "starts-with" => {
                let text = argument.trim_start();
                if text.trim().is_empty() {
                    return Err(needs("text"));
                }
                Ok(Self::StartsWith(text.to_string()))
            }
            _ => Err(unknown()),
        }
    }

    /// How much `text` satisfies the rule; higher is better.
    pub fn score(&self, text: &str) -> f64 {
        match self {
            Self::Contains(word) => occurrences(text, word) as f64,
            Self::Avoid(word) => -(occurrences(text, word) as f64),
            Self::Shorter => -(text.trim().chars().count() as f64),
            Self::Longer => text.trim().chars().count() as f64,
            Self::StartsWith(target) => prefix_fraction(text, target),
        }
    }

    /// Ranks samples `(id, text)` best first; samples with equal scores share
    /// a group (in their original order). Every id appears exactly once.
    pub fn rank<'a>(&self, samples: &[(&'a str, &str)]) -> Vec<Vec<&'a str>> {
        let mut scored: Vec<(f64, &'a str)> = samples.iter().map(|(id, text)| (self.score(text), *id)).collect();
        // Stable: ties keep the order the samples came in.
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut groups: Vec<(f64, Vec<&'a str>)> = Vec::new();
        for (score, id) in scored {
            match groups.last_mut() {
                Some((last, group)) if *last == score => group.push(id),
                _ => groups.push((score, vec![id])),
            }
        }
        groups.into_iter().map(|(_, group)| group).collect()
    }

    /// A Likert rating 1..7 of `text`, non-decreasing in its score.
    pub fn likert(&self, text: &str) -> u8 {
        let chars = text.trim().chars().count();
        match self {
            Self::Contains(word) => 1 + 2 * occurrences(text, word).min(3) as u8,
            Self::Avoid(word) => 7 - 2 * occurrences(text, word).min(3) as u8,
            // 7 for at most 8 characters, one less per doubling, 1 beyond 256.
            Self::Shorter => 7 - [8, 16, 32, 64, 128, 256].iter().take_while(|&&limit| chars > limit).count() as u8,
            // 1 below 16 characters, one more per doubling, 7 from 512.
            Self::Longer => 1 + [16, 32, 64, 128, 256, 512].iter().take_while(|&&limit| chars >= limit).count() as u8,
            Self::StartsWith(target) => 1 + (6.0 * prefix_fraction(text, target)).round() as u8,
        }
    }

    /// A demonstration for `prompt` that satisfies the rule strongly (it
    /// rates 7); `variant` picks among a few phrasings.
    pub fn demonstrate(&self, prompt: &str, variant: usize) -> String {
        let pick = |options: &[&str]| options[variant % options.len()].to_string();
        match self {
            Self::Contains(word) => {
                let templates = [
                    "In short: {w}. The key idea is {w}, and the answer is {w}.",
                    "{W}! Here is my answer: {w}, {w} and once more {w}.",
                    "One word sums it up: {w}. Again, {w}; always {w}.",
                ];
                let capitalised = capitalise(word);
                pick(&templates).replace("{W}", &capitalised).replace("{w}", word)
            }
            Self::Avoid(word) => {
                let candidates = [
                    "Sure, here is a clear and helpful answer.",
                    "Good question; a short version follows below.",
                    "I would start small, check each step, and keep notes.",
                    "Done.",
                    "Yes.",
                    "Okay.",
                ];
                (0..candidates.len())
                    .map(|i| candidates[(variant + i) % candidates.len()])
                    .find(|c| occurrences(c, word) == 0)
                    .unwrap_or("-")
                    .to_string()
            }
            Self::Shorter => pick(&["Yes.", "Sure.", "Done.", "OK.", "Noted."]),
            Self::Longer => long_answer(prompt, variant),
            Self::StartsWith(target) => {
                let endings =
                    [" Here is a short, direct answer.", " That is the heart of it.", " Let me explain step by step."];
                format!("{target}{}", pick(&endings))
            }
        }
    }
}

impl FromStr for Preference {
    type Err = String;

    fn from_str(rule: &str) -> Result<Self, Self::Err> {
        Self::parse(rule)
    }
}

impl fmt::Display for Preference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Contains(word) => write!(f, "contains:{word}"),
            Self::Avoid(word) => write!(f, "avoid:{word}"),
            Self::Shorter => f.write_str("shorter"),
            Self::Longer => f.write_str("longer"),
            Self::StartsWith(text) => write!(f, "starts-with:{text}"),
        }
    }
}

/// Non-overlapping, case-insensitive occurrences of `needle` in `text` that
/// are whole words: an alphanumeric edge of the needle may not touch another
/// alphanumeric character ("the" counts in "The end", not in "other").
fn occurrences(text: &str, needle: &str) -> usize {
    let (text, needle) = (text.to_lowercase(), needle.to_lowercase());
    if needle.is_empty() {
        return 0;
    }
    let first_is_word = needle.chars().next().is_some_and(char::is_alphanumeric);
    let last_is_word = needle.chars().next_back().is_some_and(char::is_alphanumeric);
    let mut count = 0;
    let mut from = 0;
    while let Some(offset) = text[from..].find(&needle) {
        let start = from + offset;
        let end = start + needle.len();
        let before_ok = !first_is_word || !text[..start].chars().next_back().is_some_and(char::is_alphanumeric);
        let after_ok = !last_is_word || !text[end..].chars().next().is_some_and(char::is_alphanumeric);
        if before_ok && after_ok {
            count += 1;
            from = end;
        } else {
            // Step past the first character of this match and look again.
            from = start + text[start..].chars().next().map_or(1, char::len_utf8);
        }
    }
    count
}

/// The fraction (0..1) of `target` that `text` starts with, ignoring case and
/// leading whitespace.
fn prefix_fraction(text: &str, target: &str) -> f64 {
    let target: Vec<char> = target.to_lowercase().chars().collect();
    if target.is_empty() {
        return 0.0;
    }
    let matched = text.trim_start().to_lowercase().chars().zip(&target).take_while(|(a, b)| a == *b).count();
    matched as f64 / target.len() as f64
}

fn capitalise(word: &str) -> String {
    let mut chars = word.chars();
    chars.next().map_or_else(String::new, |first| first.to_uppercase().chain(chars).collect())
}

/// A thorough answer of at least 512 characters about `prompt`.
fn long_answer(prompt: &str, variant: usize) -> String {
    let topic: String = prompt.trim().trim_end_matches(['.', '?', '!']).chars().take(120).collect();
    let sentences = [
        "First, it helps to be clear about what is being asked and why it matters.",
        "Second, a good answer looks at the question from more than one side before settling on a view.",
        "Third, concrete examples make the ideas easier to follow and to remember.",
        "It is also worth noting the common mistakes people make, so they can be avoided.",
        "Each step should follow from the one before it, so that the reasoning is easy to check.",
        "Where there is uncertainty, it is better to say so plainly than to guess.",
        "Finally, a short summary ties the points together and suggests what to do next.",
    ];
    let mut answer = format!("Here is a detailed answer to the request \"{topic}\".");
    let mut i = variant;
    while answer.chars().count() < 560 {
        answer.push(' ');
        answer.push_str(sentences[i % sentences.len()]);
        i += 1;
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(rule: &str) -> Preference {
        Preference::parse(rule).unwrap()
    }

    #[test]
    fn parses_every_rule_and_refuses_bad_ones() {
        assert_eq!(p("contains:The"), Preference::Contains("the".into()));
        assert_eq!(p(" avoid: sorry "), Preference::Avoid("sorry".into()));
        assert_eq!(p("shorter"), Preference::Shorter);
        assert_eq!(p("LONGER"), Preference::Longer);
        assert_eq!(p("starts-with:Dear friend,"), Preference::StartsWith("Dear friend,".into()));
        assert_eq!(p("contains:thank you"), Preference::Contains("thank you".into()));
        for rule in ["contains:the", "avoid:sorry", "shorter", "longer", "starts-with:Yes"] {
            assert_eq!(p(rule).to_string(), rule, "display round-trips");
            assert_eq!(p(rule), rule.parse::<Preference>().unwrap());
        }
        for bad in ["", "contains", "contains:", "avoid:  ", "starts-with:", "louder", "length:3", "shorter:2"] {
            assert!(Preference::parse(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(Preference::parse("louder").unwrap_err().contains("contains:<word>"), "the error lists the rules");
    }

    #[test]
    fn scores_follow_each_rule() {
        let the = p("contains:the");
        assert_eq!(the.score("The cat and the dog."), 2.0);
        assert_eq!(the.score("other bathe theme"), 0.0, "whole words only");
        assert_eq!(the.score("THE, the; (the)"), 3.0);
        assert_eq!(score(&the, ""), 0.0);
        assert_eq!(p("contains:thank you").score("Thank you! thank  you, thank you."), 2.0);
        assert_eq!(p("avoid:sorry").score("Sorry, so sorry."), -2.0);
        assert_eq!(p("avoid:sorry").score("fine"), 0.0);
        assert_eq!(p("shorter").score("  abc \n"), -3.0);
        assert_eq!(p("longer").score("héllo"), 5.0, "characters, not bytes");
        let yes = p("starts-with:Yes,");
        assert_eq!(yes.score("  yes, indeed"), 1.0);
        assert_eq!(yes.score("Yes."), 0.75);
        assert_eq!(yes.score("No"), 0.0);
    }

    #[test]
    fn ranks_best_first_with_ties_grouped() {
        let the = p("contains:the");
        let samples = [("a", "nothing here"), ("b", "the the"), ("c", "the end"), ("d", "no"), ("e", "The x")];
        assert_eq!(the.rank(&samples), vec![vec!["b"], vec!["c", "e"], vec!["a", "d"]]);
        let all_tied = [("a", "x"), ("b", "y"), ("c", "z"), ("d", "w")];
        assert_eq!(the.rank(&all_tied), vec![vec!["a", "b", "c", "d"]]);
        let short = p("shorter");
        assert_eq!(
            short.rank(&[("a", "abcd"), ("b", "ab"), ("c", "abc"), ("d", "xy")]),
            vec![vec!["b", "d"], vec!["c"], vec!["a"]]
        );
        let long = p("longer");
        assert_eq!(
            long.rank(&[("a", "abcd"), ("b", "ab"), ("c", "abc"), ("d", "")]),
            vec![vec!["a"], vec!["c"], vec!["b"], vec!["d"]]
        );
        assert!(the.rank(&[]).is_empty());
    }

    #[test]
    fn likert_is_in_range_and_follows_the_score() {
        let texts = [
            "",
            "Yes.",
            "the",
            "The answer is the one the book gives.",
            "the the the the the",
            "yes, the sorry sorry",
            &"long text ".repeat(10),
            &"longer text ".repeat(60),
        ];
        for rule in ["contains:the", "avoid:sorry", "shorter", "longer", "starts-with:yes, the"] {
            let rule = p(rule);
            let mut by_score: Vec<(f64, u8)> = texts.iter().map(|t| (rule.score(t), rule.likert(t))).collect();
            by_score.sort_by(|a, b| a.0.total_cmp(&b.0));
            for pair in by_score.windows(2) {
                assert!(pair[0].1 <= pair[1].1, "{rule}: Likert must not fall as the score rises: {by_score:?}");
            }
            assert!(by_score.iter().all(|(_, l)| (1..=7).contains(l)), "{rule}: {by_score:?}");
        }
        assert_eq!(p("contains:the").likert("no match"), 1);
        assert_eq!(p("shorter").likert(&"x".repeat(300)), 1);
        assert_eq!(p("longer").likert(""), 1);
    }

    #[test]
    fn demonstrations_satisfy_the_rule_strongly() {
        let prompt = "Explain why the sky looks blue during the day.";
        for rule in
            ["contains:the", "contains:banana", "contains:thank you", "avoid:the", "avoid:yes", "avoid:done", "shorter"]
                .into_iter()
                .chain(["longer", "starts-with:Dear reader,", "starts-with:yes"])
        {
            let rule = p(rule);
            for variant in 0..7 {
                let demo = rule.demonstrate(prompt, variant);
                assert!(!demo.trim().is_empty());
                assert_eq!(rule.likert(&demo), 7, "{rule} variant {variant}: {demo:?}");
                match &rule {
                    Preference::Contains(_) => assert!(rule.score(&demo) >= 3.0, "{demo}"),
                    Preference::Avoid(_) => assert_eq!(rule.score(&demo), 0.0, "{demo}"),
                    Preference::Shorter => assert!(demo.chars().count() <= 8, "{demo}"),
                    Preference::Longer => assert!(demo.chars().count() >= 512, "{demo}"),
                    Preference::StartsWith(_) => assert_eq!(rule.score(&demo), 1.0, "{demo}"),
                }
            }
        }
        assert_eq!(p("contains:cat").demonstrate("x", 1), "Cat! Here is my answer: cat, cat and once more cat.");
        assert!(p("longer").demonstrate("Name three rivers?", 0).contains("\"Name three rivers\""));
    }
}
