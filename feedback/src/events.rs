//! The events of the loop's human data, as written to the Redis streams and
//! read back by the trainer. Every event carries [`SCHEMA_VERSION`]; a stream
//! entry has one field, `event`, holding the event as JSON, plus a few plain
//! fields (`kind`, `user`, ids) so that `XRANGE` is readable by eye.

use serde::{Deserialize, Serialize};

use crate::pii::PiiFinding;
use crate::split::Split;

pub const SCHEMA_VERSION: u32 = 1;

/// The paper's metadata flags on a rated output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RatingFlags {
    pub fails_to_follow_instruction: bool,
    pub inappropriate_for_customer_assistant: bool,
    pub hallucination: bool,
    pub satisfies_constraint: bool,
    pub sexual_content: bool,
    pub violent_content: bool,
    pub denigrates_protected_class: bool,
    pub harmful_advice: bool,
    pub expresses_opinion: bool,
    pub expresses_moral_judgment: bool,
}

/// One of the K samples of a logged prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub generation_id: String,
    pub text: String,
    pub finish_reason: String,
    pub completion_tokens: usize,
    pub mean_logprob: f32,
}

/// A consented playground prompt with its samples (stream `instructd:prompts`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptEvent {
    pub schema_version: u32,
    pub prompt_id: String,
    /// The prompt as the user wrote it (for a conversation, the messages'
    /// contents joined by newlines; `messages` has them whole); redacted
    /// when the deployment redacts personal data.
    pub prompt: String,
    /// Chat messages when the prompt was a conversation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<serde_json::Value>,
    pub samples: Vec<Sample>,
    /// Sampling parameters as requested.
    pub params: serde_json::Value,
    pub model: String,
    /// The serving checkpoint that produced the samples.
    pub checkpoint: String,
    pub user: String,
    pub organization: String,
    pub key_id: String,
    pub use_case: String,
    pub consent_version: String,
    pub pii: Vec<PiiFinding>,
    pub redacted: bool,
    /// By user id, computed with the shared function so the trainer agrees.
    pub split: Split,
    pub dedupe_key: String,
    pub created_at_ms: u64,
}

/// What a labeler or playground user submits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum FeedbackPayload {
    /// Likert 1..7 of one output, with the metadata flags.
    Rating {
        generation_id: String,
        score: u8,
        #[serde(default)]
        flags: RatingFlags,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        comment: Option<String>,
    },
    /// All K outputs of a prompt, best first; an inner group holds ties.
    Ranking {
        prompt_id: String,
        ranking: Vec<Vec<String>>,
    },
    Comparison {
        prompt_id: String,
        better: String,
        worse: String,
    },
    /// The ideal response to a logged prompt, or to a labeler-written prompt.
    Demonstration {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prompt_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prompt: Option<String>,
        response: String,
    },
}

impl FeedbackPayload {
    pub fn kind(&self) -> &'static str {
        match self {
            FeedbackPayload::Rating { .. } => "rating",
            FeedbackPayload::Ranking { .. } => "ranking",
            FeedbackPayload::Comparison { .. } => "comparison",
            FeedbackPayload::Demonstration { .. } => "demonstration",
        }
    }
}

/// Whether a labeler's judgments train the models or only evaluate them
/// (the paper's held-out labelers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelerGroup {
    #[default]
    Training,
    HeldOut,
}

/// A feedback submission (stream `instructd:feedback`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackEvent {
    pub schema_version: u32,
    pub event_id: String,
    /// The prompt the feedback is about (resolved from the generation id for ratings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_id: Option<String>,
    pub labeler_id: String,
    pub labeler_group: LabelerGroup,
    pub organization: String,
    pub key_id: String,
    pub payload: FeedbackPayload,
    pub created_at_ms: u64,
}

/// A user withdrew consent: the trainer drops their data from later snapshots
/// (written to `instructd:prompts` so it is ordered with the prompts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WithdrawalEvent {
    pub schema_version: u32,
    pub user: String,
    pub removed_from_stream: u64,
    pub created_at_ms: u64,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A random id with a readable prefix, e.g. `prm_3f2a…`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{:024x}", rand::random::<u128>() >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feedback_payload_json_shapes() {
        let ranking: FeedbackPayload = serde_json::from_value(serde_json::json!({
            "type": "ranking", "prompt_id": "p", "ranking": [["a"], ["b", "c"], ["d"]]
        }))
        .unwrap();
        assert_eq!(ranking.kind(), "ranking");
        let rating: FeedbackPayload = serde_json::from_value(serde_json::json!({
            "type": "rating", "generation_id": "g", "score": 6, "flags": {"hallucination": true}
        }))
        .unwrap();
        match rating {
            FeedbackPayload::Rating { flags, .. } => assert!(flags.hallucination && !flags.sexual_content),
            other => panic!("{other:?}"),
        }
        assert!(serde_json::from_value::<FeedbackPayload>(serde_json::json!({"type": "vibes"})).is_err());
        assert!(
            serde_json::from_value::<FeedbackPayload>(serde_json::json!({
                "type": "rating", "generation_id": "g", "score": 6, "flags": {"made_up": true}
            }))
            .is_err()
        );
    }
}
