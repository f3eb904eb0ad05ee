//! `GET /v1/labeling/next`: leases a labeler the next logged prompt with its
//! samples that they have not judged yet (204 when there is none), with the
//! personal data the PII screen finds replaced by placeholders unless
//! `[gateway.playground] redact_for_labelers = false`; prompts the screen
//! flagged are never served.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::keys::Scope;
use crate::state::SharedState;

/// Leases skipped per call because their prompt vanished (consent withdrawn).
const MAX_SKIPS: usize = 20;

pub async fn next(State(state): State<SharedState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require(Scope::Labeler)?;
    let unavailable = |e: feedback::LinkError| ApiError::unavailable(format!("The labeling queue is unreachable: {e}"));
    for _ in 0..MAX_SKIPS {
        let Some(lease) = state.labeling.claim(&caller.key().user).await.map_err(unavailable)? else {
            return Ok(StatusCode::NO_CONTENT.into_response());
        };
        // A prompt the PII screen flagged is never labeled (queued before the rule, it leaves the queue now).
        let record = state.prompts.get(&lease.prompt_id).await.map_err(unavailable)?.filter(|r| !r.has_pii);
        let Some(mut task) = record.and_then(|r| r.task) else {
            state.labeling.remove(std::slice::from_ref(&lease.prompt_id)).await.map_err(unavailable)?;
            continue;
        };
        if state.config.playground.redact_for_labelers {
            redact(&state.pii, &mut task);
        }
        return Ok(Json(json!({
            "object": "labeling.task",
            "task_id": lease.prompt_id,
            "prompt_id": lease.prompt_id,
            "prompt": task["prompt"],
            "messages": task["messages"],
            "use_case": task["use_case"],
            "samples": task["samples"],
            "lease_expires_at_ms": lease.expires_at_ms,
        }))
        .into_response());
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Replaces the personal data the screen finds in a task's prompt, message contents and sample texts by
/// placeholders: labelers read other users' prompts, and a sample can repeat what its prompt held.
fn redact(pii: &feedback::pii::PiiScreen, task: &mut Value) {
    let clean = |text: Option<&mut Value>| {
        if let Some(text) = text
            && let Some(plain) = text.as_str()
        {
            let findings = pii.screen(plain);
            if !findings.is_empty() {
                *text = Value::String(pii.redact(plain, &findings));
            }
        }
    };
    clean(task.get_mut("prompt"));
    for (list, field) in [("messages", "content"), ("samples", "text")] {
        for item in task.get_mut(list).and_then(Value::as_array_mut).into_iter().flatten() {
            clean(item.get_mut(field));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_is_served_without_the_personal_data_the_screen_finds() {
        let mut task = json!({
            "prompt": "Write to jane.doe@example.com about it.",
            "messages": [{"role": "user", "content": "Write to jane.doe@example.com about it."}],
            "use_case": "generation",
            "samples": [{"generation_id": "g0", "text": "Sure, mailing jane.doe@example.com now."},
                        {"generation_id": "g1", "text": "A plain answer."}],
        });
        redact(&feedback::pii::PiiScreen::new(), &mut task);
        assert!(!task.to_string().contains("jane.doe@example.com"), "{task}");
        assert_eq!(task["samples"][1]["text"], "A plain answer.");
        assert_eq!(task["samples"][0]["generation_id"], "g0");
    }
}
