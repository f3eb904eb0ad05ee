//! Feedback submissions checked before they are written: text and ids within
//! the configured sizes, then against the logged prompts: ids exist and belong
//! together, a ranking covers exactly the prompt's samples, scores are in
//! range, and a playground user judges only their own prompts. The result is
//! the event the trainer reads.

use std::collections::HashSet;

use feedback::LinkError;
use feedback::events::{FeedbackEvent, FeedbackPayload, SCHEMA_VERSION, new_id, now_ms};
use feedback::logged_prompts::PromptRecord;
use sha2::{Digest, Sha256};

use crate::config::FeedbackConfig;
use crate::error::ApiError;
use crate::keys::{ApiKey, Scope};
use crate::state::AppState;

/// Rankings cover K = 4..9 samples, as in the paper.
pub const MIN_RANKED: usize = 4;
pub const MAX_RANKED: usize = 9;

/// The event id: derived from the idempotency key when one is given, so a
/// retried submission is recognised as the same event.
pub fn event_id(key: &ApiKey, idempotency_key: Option<&str>) -> String {
    match idempotency_key {
        Some(k) => {
            let digest = Sha256::digest(format!("{}\u{0}{k}", key.id).as_bytes());
            format!("fb_{}", &hex::encode(digest)[..32])
        }
        None => new_id("fb"),
    }
}

pub async fn check(
    state: &AppState,
    key: &ApiKey,
    payload: FeedbackPayload,
    event_id: String,
) -> Result<FeedbackEvent, ApiError> {
    let prompt_id = match &payload {
        FeedbackPayload::Rating { generation_id, score, .. } => {
            if !(1..=7).contains(score) {
                return Err(ApiError::invalid_request(Some("score"), format!("score must be 1..7, got {score}")));
            }
            let record = state
                .prompts
                .prompt_of(generation_id)
                .await
                .map_err(unavailable)?
                .ok_or_else(|| unknown("generation_id", generation_id))?;
            owner_check(key, &record)?;
            Some(record.prompt_id)
        }
        FeedbackPayload::Ranking { prompt_id, ranking } => {
            let record = load(state, key, prompt_id).await?;
            let mut seen = HashSet::new();
            for (i, group) in ranking.iter().enumerate() {
                if group.is_empty() {
                    return Err(ApiError::invalid_request(Some(&format!("ranking[{i}]")), "A rank group is empty."));
                }
                for id in group {
                    belongs("ranking", id, &record)?;
                    if !seen.insert(id.as_str()) {
                        return Err(ApiError::invalid_request(
                            Some("ranking"),
                            format!("Generation '{id}' appears more than once in the ranking."),
                        ));
                    }
                }
            }
            if seen.len() != record.generation_ids.len() {
                return Err(ApiError::invalid_request(
                    Some("ranking"),
                    format!(
                        "A ranking must order all {} samples of the prompt; it names {}.",
                        record.generation_ids.len(),
                        seen.len()
                    ),
                ));
            }
            if !(MIN_RANKED..=MAX_RANKED).contains(&seen.len()) {
                return Err(ApiError::invalid_request(
                    Some("ranking"),
                    format!("Rankings cover {MIN_RANKED} to {MAX_RANKED} samples; this prompt has {}.", seen.len()),
                ));
            }
            Some(record.prompt_id)
        }
        FeedbackPayload::Comparison { prompt_id, better, worse } => {
            let record = load(state, key, prompt_id).await?;
            belongs("better", better, &record)?;
            belongs("worse", worse, &record)?;
            if better == worse {
                return Err(ApiError::invalid_request(Some("worse"), "'better' and 'worse' must differ."));
            }
            Some(record.prompt_id)
        }
        FeedbackPayload::Demonstration { prompt_id, prompt, response } => {
            if response.trim().is_empty() {
                return Err(ApiError::invalid_request(Some("response"), "A demonstration needs a non-empty response."));
            }
            match (prompt_id, prompt) {
                (Some(prompt_id), None) => Some(load(state, key, prompt_id).await?.prompt_id),
                (None, Some(prompt)) if !prompt.trim().is_empty() => {
                    if !key.has_scope(Scope::Labeler) {
                        return Err(ApiError::forbidden(
                            "insufficient_scope",
                            "Only labelers may write their own prompts; playground users demonstrate on logged ones.",
                        ));
                    }
                    None
                }
                _ => {
                    return Err(ApiError::invalid_request(
                        Some("prompt_id"),
                        "A demonstration names exactly one of 'prompt_id' (a logged prompt) or 'prompt' (written by \
                         the labeler, non-empty).",
                    ));
                }
            }
        }
    };
    Ok(FeedbackEvent {
        schema_version: SCHEMA_VERSION,
        event_id,
        prompt_id,
        labeler_id: key.user.clone(),
        labeler_group: key.labeler_group,
        organization: key.organization.clone(),
        key_id: key.id.clone(),
        payload,
        created_at_ms: now_ms(),
    })
}

/// Refuses (400, naming the field) text or ids over the configured sizes,
/// before anything is looked up.
pub fn check_sizes(payload: &FeedbackPayload, caps: &FeedbackConfig) -> Result<(), ApiError> {
    let cap = |param: &str, value: &str, max: usize, what: &str| {
        if value.len() > max {
            Err(ApiError::invalid_request(
                Some(param),
                format!("'{param}' is {} bytes; {what} may have at most {max} bytes.", value.len()),
            )
            .with_code("string_above_max_length"))
        } else {
            Ok(())
        }
    };
    let id = |param: &str, value: &str| cap(param, value, caps.max_id_bytes, "an id");
    match payload {
        FeedbackPayload::Rating { generation_id, comment, .. } => {
            id("generation_id", generation_id)?;
            if let Some(comment) = comment {
                cap("comment", comment, caps.max_comment_bytes, "a rating comment")?;
            }
        }
        FeedbackPayload::Ranking { prompt_id, ranking } => {
            id("prompt_id", prompt_id)?;
            // The schema's bounds (at most 9 groups of at most 9 ids) cap the
            // work before the prompt is looked up; that the ranking names each
            // of the prompt's 4 to 9 samples once is checked against the prompt
            // (a well-formed ranking of an unknown prompt is 404, not 400).
            if ranking.len() > MAX_RANKED || ranking.iter().any(|group| group.len() > MAX_RANKED) {
                return Err(ApiError::invalid_request(
                    Some("ranking"),
                    format!("A ranking has at most {MAX_RANKED} groups of at most {MAX_RANKED} samples."),
                ));
            }
            for generation_id in ranking.iter().flatten() {
                id("ranking", generation_id)?;
            }
        }
        FeedbackPayload::Comparison { prompt_id, better, worse } => {
            id("prompt_id", prompt_id)?;
            id("better", better)?;
            id("worse", worse)?;
        }
        FeedbackPayload::Demonstration { prompt_id, prompt, response } => {
            if let Some(prompt_id) = prompt_id {
                id("prompt_id", prompt_id)?;
            }
            if let Some(prompt) = prompt {
                cap("prompt", prompt, caps.max_text_bytes, "a prompt")?;
            }
            cap("response", response, caps.max_text_bytes, "a demonstration")?;
        }
    }
    Ok(())
}

async fn load(state: &AppState, key: &ApiKey, prompt_id: &str) -> Result<PromptRecord, ApiError> {
    let record =
        state.prompts.get(prompt_id).await.map_err(unavailable)?.ok_or_else(|| unknown("prompt_id", prompt_id))?;
    owner_check(key, &record)?;
    Ok(record)
}

/// Labelers judge any logged prompt; playground users only their own.
fn owner_check(key: &ApiKey, record: &PromptRecord) -> Result<(), ApiError> {
    if key.has_scope(Scope::Labeler) || record.user == key.user {
        Ok(())
    } else {
        Err(ApiError::forbidden("not_your_prompt", "Playground users can only give feedback on their own prompts."))
    }
}

fn belongs(param: &str, generation_id: &str, record: &PromptRecord) -> Result<(), ApiError> {
    if record.generation_ids.iter().any(|g| g == generation_id) {
        Ok(())
    } else {
        Err(ApiError::invalid_request(
            Some(param),
            format!("Generation '{generation_id}' does not belong to prompt '{}'.", record.prompt_id),
        ))
    }
}

fn unknown(param: &str, id: &str) -> ApiError {
    ApiError::not_found(format!("No logged prompt or generation with id '{id}'.")).with_param(param)
}

fn unavailable(e: LinkError) -> ApiError {
    ApiError::unavailable(format!(
        "Feedback cannot be checked right now (the prompt log is unreachable: {e}). Retry shortly."
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> FeedbackConfig {
        FeedbackConfig { max_body_bytes: 1 << 20, max_comment_bytes: 10, max_text_bytes: 20, max_id_bytes: 8 }
    }

    fn param(payload: FeedbackPayload) -> Option<String> {
        check_sizes(&payload, &caps()).err().and_then(|e| {
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
            e.param
        })
    }

    #[test]
    fn oversized_fields_are_named() {
        let rating = |comment: &str| FeedbackPayload::Rating {
            generation_id: "g-1".into(),
            score: 5,
            flags: Default::default(),
            comment: Some(comment.into()),
        };
        assert_eq!(param(rating("fine")), None);
        assert_eq!(param(rating(&"x".repeat(11))).as_deref(), Some("comment"));
        let demo = |prompt: Option<&str>, response: &str| FeedbackPayload::Demonstration {
            prompt_id: None,
            prompt: prompt.map(str::to_string),
            response: response.into(),
        };
        assert_eq!(param(demo(Some("p"), "r")), None);
        assert_eq!(param(demo(None, &"r".repeat(21))).as_deref(), Some("response"));
        assert_eq!(param(demo(Some(&"p".repeat(21)), "r")).as_deref(), Some("prompt"));
        let comparison =
            FeedbackPayload::Comparison { prompt_id: "p".into(), better: "a".repeat(9), worse: "b".into() };
        assert_eq!(param(comparison).as_deref(), Some("better"));
        let ranking = FeedbackPayload::Ranking { prompt_id: "p".into(), ranking: vec![vec!["g".into()]; 10] };
        assert_eq!(param(ranking).as_deref(), Some("ranking"));
        let ranking = FeedbackPayload::Ranking { prompt_id: "p".into(), ranking: vec![vec!["g".into(); 10]] };
        assert_eq!(param(ranking).as_deref(), Some("ranking"));
        // Ten ids in schema-valid groups wait for the prompt (404 or the coverage check), not a size refusal.
        let ranking = FeedbackPayload::Ranking { prompt_id: "p".into(), ranking: vec![vec!["g".into(); 5]; 2] };
        assert_eq!(param(ranking), None);
    }
}
