//! Blind side-by-side votes between two checkpoints (the playground's arena):
//! the record every gateway replica writes to [`STREAM`] and every replica
//! reads back to fit the leaderboard. One type, so the writer and the readers
//! cannot disagree about a field.
//!
//! A vote names the two checkpoints and which answer won; it holds no prompt
//! or answer text, so the arena needs no training-use consent and a vote can
//! be kept for as long as the checkpoints matter.

use serde::{Deserialize, Serialize};

/// Arena votes, oldest first.
pub const STREAM: &str = "instructd:arena";

/// Bumped when a field changes meaning; readers skip newer versions they do not know.
pub const VOTE_SCHEMA_VERSION: u32 = 1;

/// The voter's verdict on answers `a` and `b` (shown in a random order, identities hidden).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    A,
    B,
    Tie,
    /// Neither answer is acceptable: a tie for the ranking, kept apart for quality reports.
    BothBad,
}

/// One vote (stream [`STREAM`], field `event`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArenaVote {
    pub schema_version: u32,
    pub battle_id: String,
    /// The checkpoint that wrote answer `a`.
    pub checkpoint_a: String,
    /// The checkpoint that wrote answer `b`.
    pub checkpoint_b: String,
    pub verdict: Verdict,
    pub user: String,
    pub organization: String,
    pub key_id: String,
    pub created_at_ms: u64,
}

impl ArenaVote {
    /// The stream entry's plain fields (`kind`, `battle`) and the vote as JSON in `event`.
    pub fn fields(&self) -> Result<Vec<(String, String)>, serde_json::Error> {
        Ok(vec![
            ("kind".into(), "arena_vote".into()),
            ("battle".into(), self.battle_id.clone()),
            ("event".into(), serde_json::to_string(self)?),
        ])
    }

    /// Reads a vote from a stream entry's `event` field; `None` for another
    /// schema version (a newer writer), an error for a malformed entry.
    pub fn from_event(json: &str) -> Result<Option<Self>, serde_json::Error> {
        #[derive(Deserialize)]
        struct Version {
            schema_version: u32,
        }
        if serde_json::from_str::<Version>(json)?.schema_version != VOTE_SCHEMA_VERSION {
            return Ok(None);
        }
        serde_json::from_str(json).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vote(verdict: Verdict) -> ArenaVote {
        ArenaVote {
            schema_version: VOTE_SCHEMA_VERSION,
            battle_id: "bat_1".into(),
            checkpoint_a: "ckpt-1".into(),
            checkpoint_b: "ckpt-2".into(),
            verdict,
            user: "u".into(),
            organization: "o".into(),
            key_id: "k".into(),
            created_at_ms: 7,
        }
    }

    #[test]
    fn a_vote_round_trips_through_its_stream_fields() {
        let original = vote(Verdict::BothBad);
        let fields = original.fields().unwrap();
        let event = &fields.iter().find(|(k, _)| k == "event").unwrap().1;
        assert!(event.contains("\"verdict\":\"both_bad\""));
        assert_eq!(ArenaVote::from_event(event).unwrap(), Some(original));
    }

    #[test]
    fn newer_schema_versions_are_skipped_and_garbage_is_an_error() {
        let mut newer = serde_json::to_value(vote(Verdict::A)).unwrap();
        newer["schema_version"] = 2.into();
        newer["extra"] = "field".into();
        assert_eq!(ArenaVote::from_event(&newer.to_string()).unwrap(), None);
        assert!(ArenaVote::from_event("{\"schema_version\":1}").is_err());
        assert!(ArenaVote::from_event("not json").is_err());
    }
}
