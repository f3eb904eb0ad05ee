//! The typed contract of the training streams: every entry the gateway writes
//! to `instructd:prompts` or `instructd:feedback` and the trainer reads back is
//! one [`Record`] variant, one Rust type per record kind. Both sides go through
//! [`Record::to_entry`] and [`Record::from_fields`], the only code that knows
//! the entry's field names, so a renamed field or a new kind fails to compile
//! on the side that forgot it instead of being counted as "unparseable".
//!
//! An entry is `kind` (the record kind), `event` (the record as JSON) and a few
//! plain copies (`user`, `prompt_id`, `labeler`) that make `XRANGE` readable by
//! eye; the reader trusts only `kind` and `event`. Entries already in a stream
//! before this module have the same layout and read back unchanged.

use std::collections::HashMap;

use crate::event_log::Entry;
use crate::events::{FeedbackEvent, PromptEvent, SCHEMA_VERSION, WithdrawalEvent};
use crate::streams;

/// Field names of a stream entry (only this module uses them).
const KIND: &str = "kind";
const EVENT: &str = "event";
const USER: &str = "user";
const PROMPT_ID: &str = "prompt_id";
const LABELER: &str = "labeler";

const PROMPT_KIND: &str = "prompt";
const WITHDRAWAL_KIND: &str = "withdrawal";

/// One entry of a training stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A consented playground prompt with its samples (`instructd:prompts`).
    Prompt(PromptEvent),
    /// A user withdrew consent (`instructd:prompts`, ordered with their prompts).
    Withdrawal(WithdrawalEvent),
    /// A rating, ranking, comparison or demonstration (`instructd:feedback`).
    Feedback(FeedbackEvent),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RecordError {
    #[error("the entry has no `{0}` field")]
    Missing(&'static str),
    #[error("unknown record kind `{kind}` on {stream}")]
    UnknownKind { stream: String, kind: String },
    #[error("the `event` of a `{kind}` record does not parse: {message}")]
    Malformed { kind: String, message: String },
    #[error("a `{kind}` record carries schema version {found}, this build reads {SCHEMA_VERSION}")]
    SchemaVersion { kind: String, found: u32 },
    #[error("the entry says kind `{field}` but its event is a `{event}`")]
    KindMismatch { field: String, event: &'static str },
}

impl Record {
    /// The stream this record belongs on.
    pub fn stream(&self) -> &'static str {
        match self {
            Record::Prompt(_) | Record::Withdrawal(_) => streams::PROMPTS,
            Record::Feedback(_) => streams::FEEDBACK,
        }
    }

    /// The record kind, as in the entry's `kind` field (a feedback record by its payload: `rating`, `ranking`...).
    pub fn kind(&self) -> &'static str {
        match self {
            Record::Prompt(_) => PROMPT_KIND,
            Record::Withdrawal(_) => WITHDRAWAL_KIND,
            Record::Feedback(event) => event.payload.kind(),
        }
    }

    /// The user whose data the record is, when it is one user's: the prompt's author, the withdrawing user, the
    /// labeler who judged.
    pub fn user(&self) -> &str {
        match self {
            Record::Prompt(p) => &p.user,
            Record::Withdrawal(w) => &w.user,
            Record::Feedback(f) => &f.labeler_id,
        }
    }

    /// The stream entry for the event log, deduplicated by `event_id`.
    pub fn to_entry(&self, event_id: &str) -> Result<Entry, serde_json::Error> {
        let (json, readable) = match self {
            Record::Prompt(p) => {
                (serde_json::to_string(p)?, vec![(PROMPT_ID, p.prompt_id.clone()), (USER, p.user.clone())])
            }
            Record::Withdrawal(w) => (serde_json::to_string(w)?, vec![(USER, w.user.clone())]),
            Record::Feedback(f) => {
                let mut readable: Vec<(&str, String)> = f.prompt_id.iter().map(|p| (PROMPT_ID, p.clone())).collect();
                readable.push((LABELER, f.labeler_id.clone()));
                (serde_json::to_string(f)?, readable)
            }
        };
        let mut fields = vec![(KIND.to_string(), self.kind().to_string())];
        fields.extend(readable.into_iter().map(|(name, value)| (name.to_string(), value)));
        fields.push((EVENT.to_string(), json));
        Ok(Entry { stream: self.stream().to_string(), event_id: event_id.to_string(), fields, consent: None })
    }

    /// Reads an entry of `stream` back (its fields as Redis returns them).
    pub fn from_fields(stream: &str, fields: &HashMap<String, String>) -> Result<Record, RecordError> {
        let kind = fields.get(KIND).ok_or(RecordError::Missing(KIND))?;
        let event = fields.get(EVENT).ok_or(RecordError::Missing(EVENT))?;
        let malformed = |e: serde_json::Error| RecordError::Malformed { kind: kind.clone(), message: e.to_string() };
        let record = match (stream, kind.as_str()) {
            (streams::PROMPTS, PROMPT_KIND) => Record::Prompt(serde_json::from_str(event).map_err(malformed)?),
            (streams::PROMPTS, WITHDRAWAL_KIND) => Record::Withdrawal(serde_json::from_str(event).map_err(malformed)?),
            (streams::FEEDBACK, _) => {
                let event: FeedbackEvent = serde_json::from_str(event).map_err(malformed)?;
                if event.payload.kind() != kind {
                    return Err(RecordError::KindMismatch { field: kind.clone(), event: event.payload.kind() });
                }
                Record::Feedback(event)
            }
            _ => return Err(RecordError::UnknownKind { stream: stream.to_string(), kind: kind.clone() }),
        };
        let found = match &record {
            Record::Prompt(p) => p.schema_version,
            Record::Withdrawal(w) => w.schema_version,
            Record::Feedback(f) => f.schema_version,
        };
        if found != SCHEMA_VERSION {
            return Err(RecordError::SchemaVersion { kind: kind.clone(), found });
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{FeedbackPayload, LabelerGroup, Sample};
    use crate::split::Split;

    fn prompt() -> PromptEvent {
        PromptEvent {
            schema_version: SCHEMA_VERSION,
            prompt_id: "prm_1".into(),
            prompt: "Write a haiku".into(),
            messages: None,
            samples: vec![Sample {
                generation_id: "prm_1-0".into(),
                text: "leaves".into(),
                finish_reason: "stop".into(),
                completion_tokens: 1,
                mean_logprob: -0.5,
            }],
            params: serde_json::json!({"k": 1}),
            model: "m".into(),
            checkpoint: "base".into(),
            user: "alice".into(),
            organization: "org".into(),
            key_id: "key_1".into(),
            use_case: "generation".into(),
            consent_version: "v1".into(),
            pii: vec![],
            redacted: false,
            split: Split::Train,
            dedupe_key: "write a haiku".into(),
            created_at_ms: 1,
        }
    }

    fn feedback() -> FeedbackEvent {
        FeedbackEvent {
            schema_version: SCHEMA_VERSION,
            event_id: "fb_1".into(),
            prompt_id: Some("prm_1".into()),
            labeler_id: "lab".into(),
            labeler_group: LabelerGroup::Training,
            organization: "org".into(),
            key_id: "key_2".into(),
            payload: FeedbackPayload::Comparison { prompt_id: "prm_1".into(), better: "a".into(), worse: "b".into() },
            created_at_ms: 2,
        }
    }

    fn as_read(entry: &Entry) -> HashMap<String, String> {
        entry.fields.iter().cloned().collect()
    }

    #[test]
    fn every_kind_reads_back_as_written() {
        let withdrawal = WithdrawalEvent {
            schema_version: SCHEMA_VERSION,
            user: "alice".into(),
            removed_from_stream: 2,
            created_at_ms: 3,
        };
        for record in [Record::Prompt(prompt()), Record::Withdrawal(withdrawal), Record::Feedback(feedback())] {
            let entry = record.to_entry("e1").unwrap();
            assert_eq!(entry.stream, record.stream());
            assert_eq!(Record::from_fields(&entry.stream, &as_read(&entry)), Ok(record));
        }
    }

    /// Entries written before the typed contract (the same layout, spelled out by hand) still read.
    #[test]
    fn entries_already_in_a_stream_read_back() {
        let old = HashMap::from([
            ("kind".to_string(), "withdrawal".to_string()),
            ("user".to_string(), "bob".to_string()),
            (
                "event".to_string(),
                r#"{"schema_version":1,"user":"bob","removed_from_stream":0,"created_at_ms":5}"#.to_string(),
            ),
        ]);
        assert!(matches!(Record::from_fields(streams::PROMPTS, &old), Ok(Record::Withdrawal(w)) if w.user == "bob"));
    }

    /// What the trainer used to count as "unparseable" or, worse, read as the wrong kind is now a typed refusal.
    #[test]
    fn unknown_kinds_mismatches_and_other_versions_are_refused() {
        let mut fields = as_read(&Record::Prompt(prompt()).to_entry("e").unwrap());
        assert!(matches!(Record::from_fields(streams::FEEDBACK, &fields), Err(RecordError::Malformed { .. })));
        fields.insert("kind".into(), "consent_withdrawn".into());
        assert!(matches!(Record::from_fields(streams::PROMPTS, &fields), Err(RecordError::UnknownKind { .. })));
        fields.remove("kind");
        assert_eq!(Record::from_fields(streams::PROMPTS, &fields), Err(RecordError::Missing("kind")));

        let mut fields = as_read(&Record::Feedback(feedback()).to_entry("e").unwrap());
        fields.insert("kind".into(), "rating".into());
        assert!(matches!(Record::from_fields(streams::FEEDBACK, &fields), Err(RecordError::KindMismatch { .. })));

        let mut newer = prompt();
        newer.schema_version = SCHEMA_VERSION + 1;
        let fields = as_read(&Record::Prompt(newer).to_entry("e").unwrap());
        assert!(matches!(Record::from_fields(streams::PROMPTS, &fields), Err(RecordError::SchemaVersion { .. })));
    }
}
