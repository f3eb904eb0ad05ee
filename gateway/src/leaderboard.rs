//! The leaderboard of checkpoints: a Bradley-Terry fit over every arena vote,
//! with bootstrap intervals, and the vote gate that reads it (promote a
//! candidate voters prefer to the serving checkpoint, refuse one they don't).

use std::collections::BTreeMap;

use feedback::arena::{ArenaVote, Verdict};
use serde::Serialize;

use crate::arena::{Arena, ArenaConfig};
use crate::bradley_terry::{self, Bootstrap, DEFAULT_PRIOR, Outcome};

#[derive(Debug, thiserror::Error)]
pub enum LeaderboardError {
    #[error(transparent)]
    Link(#[from] feedback::LinkError),
    #[error("fitting the leaderboard failed: {0}")]
    Fit(String),
}

/// The leaderboard over every vote so far, with `serving` as the reference
/// (the fit and its bootstrap run on a blocking thread).
pub async fn current(arena: &Arena, serving: &str, config: &ArenaConfig) -> Result<Leaderboard, LeaderboardError> {
    let votes = arena.votes().await?;
    let (serving, rounds, confidence) = (serving.to_string(), config.bootstrap_rounds, config.confidence);
    tokio::task::spawn_blocking(move || build(&votes, &serving, rounds, confidence))
        .await
        .map_err(|e| LeaderboardError::Fit(e.to_string()))
}

/// One checkpoint's row.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Standing {
    pub rank: usize,
    pub checkpoint: String,
    /// Elo-like: 1000 at the mean, +400 for 10:1 odds.
    pub rating: f64,
    pub rating_low: f64,
    pub rating_high: f64,
    pub votes: usize,
    pub wins: usize,
    pub losses: usize,
    pub ties: usize,
    /// Ties where the voter rejected both answers (counted in `ties`).
    pub both_bad: usize,
    /// The modelled chance of beating the serving checkpoint, with its interval
    /// (absent for the serving checkpoint itself, or when it has no votes).
    pub versus_serving: Option<Versus>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Versus {
    pub win_probability: f64,
    pub low: f64,
    pub high: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Leaderboard {
    pub object: &'static str,
    pub votes: usize,
    pub confidence: f64,
    pub bootstrap_rounds: usize,
    pub serving: String,
    /// Best first.
    pub data: Vec<Standing>,
}

/// Fits the leaderboard to `votes`. The bootstrap's seed is the number of
/// votes, so the same votes always give the same table.
pub fn build(votes: &[ArenaVote], serving: &str, rounds: usize, confidence: f64) -> Leaderboard {
    // A checkpoint against itself says nothing about either side.
    let votes: Vec<&ArenaVote> = votes.iter().filter(|v| v.checkpoint_a != v.checkpoint_b).collect();
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for vote in &votes {
        for checkpoint in [vote.checkpoint_a.as_str(), vote.checkpoint_b.as_str()] {
            let next = index.len();
            index.entry(checkpoint).or_insert(next);
        }
    }
    let names: Vec<&str> = {
        let mut names = vec![""; index.len()];
        for (name, i) in &index {
            names[*i] = name;
        }
        names
    };
    let outcomes: Vec<Outcome> = votes
        .iter()
        .map(|v| Outcome {
            first: index[v.checkpoint_a.as_str()],
            second: index[v.checkpoint_b.as_str()],
            score: match v.verdict {
                Verdict::A => 1.0,
                Verdict::B => 0.0,
                Verdict::Tie | Verdict::BothBad => 0.5,
            },
        })
        .collect();
    let strengths = bradley_terry::fit(names.len(), &outcomes, DEFAULT_PRIOR);
    let boot = Bootstrap::run(names.len(), &outcomes, DEFAULT_PRIOR, rounds, votes.len() as u64);
    let serving_index = index.get(serving).copied();
    let mut data: Vec<Standing> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let (low, high) = boot.strength_interval(i, confidence);
            let versus_serving = serving_index.filter(|s| *s != i).map(|s| {
                let (low, high) = boot.win_probability_interval(i, s, confidence);
                Versus { win_probability: bradley_terry::win_probability(strengths[i], strengths[s]), low, high }
            });
            let mut standing = Standing {
                rank: 0,
                checkpoint: name.to_string(),
                rating: bradley_terry::rating(strengths[i]),
                rating_low: bradley_terry::rating(low),
                rating_high: bradley_terry::rating(high),
                votes: 0,
                wins: 0,
                losses: 0,
                ties: 0,
                both_bad: 0,
                versus_serving,
            };
            for vote in &votes {
                let side = if vote.checkpoint_a == *name {
                    Verdict::A
                } else if vote.checkpoint_b == *name {
                    Verdict::B
                } else {
                    continue;
                };
                standing.votes += 1;
                match vote.verdict {
                    Verdict::Tie => standing.ties += 1,
                    Verdict::BothBad => {
                        standing.ties += 1;
                        standing.both_bad += 1;
                    }
                    won if won == side => standing.wins += 1,
                    _ => standing.losses += 1,
                }
            }
            standing
        })
        .collect();
    data.sort_by(|a, b| b.rating.total_cmp(&a.rating).then_with(|| a.checkpoint.cmp(&b.checkpoint)));
    for (rank, standing) in data.iter_mut().enumerate() {
        standing.rank = rank + 1;
    }
    Leaderboard {
        object: "leaderboard",
        votes: outcomes.len(),
        confidence,
        bootstrap_rounds: rounds,
        serving: serving.to_string(),
        data,
    }
}

/// What the vote gate does with a candidate.
#[derive(Debug, Clone, PartialEq)]
pub enum GateDecision {
    /// Too few votes, or the interval still straddles 0.5.
    Wait,
    /// Voters prefer it to the serving checkpoint.
    Promote(Versus),
    /// Voters prefer the serving checkpoint.
    Refuse(Versus),
}

/// The vote gate for `candidate`: at least `min_votes` votes involving it, then
/// the interval of P(candidate beats serving) must lie wholly above 0.5 to
/// promote, or wholly below to refuse.
pub fn decide(board: &Leaderboard, candidate: &str, min_votes: usize) -> GateDecision {
    let Some(row) = board.data.iter().find(|s| s.checkpoint == candidate) else { return GateDecision::Wait };
    match row.versus_serving {
        Some(versus) if row.votes >= min_votes && versus.low > 0.5 => GateDecision::Promote(versus),
        Some(versus) if row.votes >= min_votes && versus.high < 0.5 => GateDecision::Refuse(versus),
        _ => GateDecision::Wait,
    }
}

#[cfg(test)]
mod tests {
    use feedback::arena::VOTE_SCHEMA_VERSION;

    use super::*;

    fn vote(a: &str, b: &str, verdict: Verdict) -> ArenaVote {
        ArenaVote {
            schema_version: VOTE_SCHEMA_VERSION,
            battle_id: "bat".into(),
            checkpoint_a: a.into(),
            checkpoint_b: b.into(),
            verdict,
            user: "u".into(),
            organization: "o".into(),
            key_id: "k".into(),
            created_at_ms: 0,
        }
    }

    /// `wins` votes for `winner` and `losses` against it, alternating which side it was shown on.
    fn record(winner: &str, loser: &str, wins: usize, losses: usize) -> Vec<ArenaVote> {
        let mut out = Vec::new();
        for i in 0..wins {
            out.push(if i % 2 == 0 { vote(winner, loser, Verdict::A) } else { vote(loser, winner, Verdict::B) });
        }
        for i in 0..losses {
            out.push(if i % 2 == 0 { vote(winner, loser, Verdict::B) } else { vote(loser, winner, Verdict::A) });
        }
        out
    }

    #[test]
    fn the_table_ranks_by_rating_and_counts_each_row() {
        let mut votes = record("new", "serving", 30, 10);
        votes.push(vote("serving", "new", Verdict::BothBad));
        votes.push(vote("old", "old", Verdict::A)); // a self-battle carries no information
        let board = build(&votes, "serving", 100, 0.95);
        assert_eq!(board.votes, 41);
        let names: Vec<&str> = board.data.iter().map(|s| s.checkpoint.as_str()).collect();
        assert_eq!(names[..2], ["new", "serving"]);
        let new = &board.data[0];
        assert_eq!((new.rank, new.votes, new.wins, new.losses, new.ties, new.both_bad), (1, 41, 30, 10, 1, 1));
        assert!(new.rating_low < new.rating && new.rating < new.rating_high);
        let versus = new.versus_serving.unwrap();
        assert!(versus.low > 0.5 && versus.win_probability > 0.7, "{versus:?}");
        assert!(board.data[1].versus_serving.is_none());
    }

    #[test]
    fn the_gate_waits_for_votes_then_follows_the_interval() {
        let close = build(&record("cand", "serving", 6, 4), "serving", 200, 0.95);
        assert_eq!(decide(&close, "cand", 5), GateDecision::Wait);
        let clear = build(&record("cand", "serving", 40, 10), "serving", 200, 0.95);
        assert_eq!(decide(&clear, "cand", 100), GateDecision::Wait);
        assert!(matches!(decide(&clear, "cand", 30), GateDecision::Promote(_)));
        let worse = build(&record("serving", "cand", 40, 10), "serving", 200, 0.95);
        assert!(matches!(decide(&worse, "cand", 30), GateDecision::Refuse(_)));
        assert_eq!(decide(&worse, "unknown", 0), GateDecision::Wait);
    }

    #[test]
    fn the_same_votes_give_the_same_table() {
        let votes = record("a", "b", 7, 5);
        assert_eq!(build(&votes, "b", 50, 0.9), build(&votes, "b", 50, 0.9));
    }
}
