//! The simulated users' prompts: a file of instruction prompts, one per line,
//! shuffled by the seed and cycled to the requested count. Repeats get a
//! different framing, so no two prompts of a run share their beginning (the
//! trainer would drop them as duplicates).

use std::path::Path;

use anyhow::Context;

use super::Rng;

/// Where `--prompts-file` points by default, relative to the working directory.
pub const DEFAULT_FILE: &str = "configs/simulation_prompts.txt";
/// The same file, built in: used when the default file is not there.
const BUILT_IN: &str = include_str!("../../configs/simulation_prompts.txt");

/// Framings put in front of a prompt the second, third... time it is used.
const FRAMINGS: &[&str] = &[
    "Please answer briefly: ",
    "In your own words: ",
    "For a beginner: ",
    "Quick question. ",
    "As simply as you can: ",
    "I'd like some help. ",
];

/// The non-empty, non-comment lines of a prompts file.
pub fn parse(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect()
}

/// Reads `path`, or the default file (falling back to the built-in copy).
pub fn load(path: Option<&Path>) -> anyhow::Result<Vec<String>> {
    let prompts = match path {
        Some(path) => {
            parse(&std::fs::read_to_string(path).with_context(|| format!("reading prompts from {}", path.display()))?)
        }
        None => match std::fs::read_to_string(DEFAULT_FILE) {
            Ok(text) => parse(&text),
            Err(_) => parse(BUILT_IN),
        },
    };
    anyhow::ensure!(!prompts.is_empty(), "the prompts file has no prompts (one per line; '#' starts a comment)");
    Ok(prompts)
}

/// `count` prompts: `pool` shuffled by `rng`, cycled as often as needed,
/// each repeat framed differently.
pub fn schedule(pool: &[String], count: usize, rng: &mut Rng) -> Vec<String> {
    let mut order: Vec<&String> = pool.iter().collect();
    rng.shuffle(&mut order);
    (0..count)
        .map(|i| {
            let prompt = order[i % order.len()];
            match i / order.len() {
                0 => prompt.clone(),
                round => {
                    let framing = FRAMINGS[(round - 1) % FRAMINGS.len()];
                    let cycle = (round - 1) / FRAMINGS.len();
                    if cycle == 0 {
                        format!("{framing}{prompt}")
                    } else {
                        format!("{framing}(take {}) {prompt}", cycle + 1)
                    }
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_file_has_varied_prompts() {
        let prompts = parse(BUILT_IN);
        assert!(prompts.len() >= 50, "{}", prompts.len());
        let unique: std::collections::HashSet<_> = prompts.iter().collect();
        assert_eq!(unique.len(), prompts.len(), "no duplicates");
        assert!(prompts.iter().all(|p| !p.starts_with('#')));
    }

    #[test]
    fn schedules_are_reproducible_and_never_repeat() {
        let pool = parse("# comment\n\nalpha\n  beta  \ngamma\n");
        assert_eq!(pool, ["alpha", "beta", "gamma"]);
        let a = schedule(&pool, 30, &mut Rng::new(1));
        assert_eq!(a, schedule(&pool, 30, &mut Rng::new(1)));
        assert_eq!(a.len(), 30);
        let unique: std::collections::HashSet<_> = a.iter().collect();
        assert_eq!(unique.len(), 30, "{a:?}");
        let mut first: Vec<_> = a[..3].to_vec();
        first.sort();
        assert_eq!(first, pool, "the first round is the pool itself");
        assert!(schedule(&pool, 0, &mut Rng::new(1)).is_empty());
    }
}
