//! `POST /v1/rewards` request body (instructd's own): a prompt or a chat
//! conversation, and up to [`MAX_COMPLETIONS`] completions to score as its
//! reply, checked once here.

use inference::tokenizer::ChatMessage;
use serde::Deserialize;

use crate::error::ApiError;
use crate::openai::chat::{Message, to_chat_messages};
use crate::openai::common::check_prompt_bytes;

/// Most completions one request may score (a labeler's K is at most 9; best-of-n on a client a little more).
pub const MAX_COMPLETIONS: usize = 16;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardsRequest {
    /// The reward checkpoint's id, to be sure which model scores (404 when it is not the serving one).
    pub model: Option<String>,
    /// The prompt, as one user message through the chat template (as the trainer scores it).
    #[serde(default, deserialize_with = "not_null")]
    pub prompt: Option<String>,
    /// Or a whole conversation, as for chat completions.
    #[serde(default, deserialize_with = "not_null")]
    pub messages: Option<Vec<Message>>,
    pub completions: Vec<String>,
}

/// An optional field that, when sent, must hold a value: `prompt` and
/// `messages` are exactly one of two, and `"messages": null` beside a
/// prompt would otherwise pass as "not sent" where the spec says it is both.
fn not_null<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Option<T>, D::Error> {
    T::deserialize(deserializer).map(Some)
}

/// A checked request.
#[derive(Debug)]
pub struct Scoring {
    pub model: Option<String>,
    pub conversation: Vec<ChatMessage>,
    pub completions: Vec<String>,
    /// Bytes of text the scoring reads (the conversation once per completion): the rate limit's estimate.
    pub estimate: u64,
}

impl RewardsRequest {
    pub fn check(self, max_prompt_bytes: usize) -> Result<Scoring, ApiError> {
        let conversation = match (self.prompt, self.messages) {
            (Some(prompt), None) => vec![ChatMessage::new("user", prompt)],
            (None, Some(messages)) => to_chat_messages(messages)?,
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid_request(Some("messages"), "Send 'prompt' or 'messages', not both."));
            }
            (None, None) => {
                return Err(ApiError::invalid_request(Some("prompt"), "'prompt' or 'messages' is required."));
            }
        };
        let count = self.completions.len();
        if !(1..=MAX_COMPLETIONS).contains(&count) {
            return Err(ApiError::invalid_request(
                Some("completions"),
                format!("'completions' must hold 1 to {MAX_COMPLETIONS} completions, got {count}."),
            ));
        }
        let conversation_bytes: usize = conversation.iter().map(|m| m.content.len()).sum();
        let completion_bytes: usize = self.completions.iter().map(String::len).sum();
        check_prompt_bytes(conversation_bytes.saturating_add(completion_bytes), max_prompt_bytes, "completions")?;
        let estimate = conversation_bytes.saturating_mul(count).saturating_add(completion_bytes) as u64;
        Ok(Scoring { model: self.model, conversation, completions: self.completions, estimate })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(body: serde_json::Value) -> Result<Scoring, ApiError> {
        serde_json::from_value::<RewardsRequest>(body).unwrap().check(1000)
    }

    #[test]
    fn a_null_prompt_or_messages_is_refused_not_ignored() {
        let parse = |body: serde_json::Value| serde_json::from_value::<RewardsRequest>(body);
        assert!(parse(json!({"prompt": "p", "messages": null, "completions": ["a"]})).is_err());
        assert!(parse(json!({"prompt": null, "completions": ["a"]})).is_err());
        assert!(parse(json!({"prompt": "p", "completions": ["a"]})).is_ok());
    }

    #[test]
    fn a_prompt_or_messages_and_one_to_k_completions() {
        let scoring = check(json!({"prompt": "hi", "completions": ["a", "bb"]})).unwrap();
        assert_eq!(scoring.conversation, vec![ChatMessage::new("user", "hi")]);
        assert_eq!(scoring.estimate, 2 * 2 + 3);
        let scoring =
            check(json!({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "completions": ["a"]}))
                .unwrap();
        assert_eq!(scoring.conversation.len(), 2);
        let param = |body| check(body).unwrap_err().param;
        assert_eq!(param(json!({"completions": ["a"]})).as_deref(), Some("prompt"));
        assert_eq!(param(json!({"prompt": "p", "messages": [], "completions": ["a"]})).as_deref(), Some("messages"));
        assert_eq!(param(json!({"prompt": "p", "completions": []})).as_deref(), Some("completions"));
        let many = vec!["x"; MAX_COMPLETIONS + 1];
        assert_eq!(param(json!({"prompt": "p", "completions": many})).as_deref(), Some("completions"));
        assert_eq!(param(json!({"prompt": "p", "completions": ["x".repeat(1000)]})).as_deref(), Some("completions"));
        assert_eq!(
            param(json!({"messages": [{"role": "tool", "content": "x"}], "completions": ["a"]})).as_deref(),
            Some("messages[0].role")
        );
    }
}
