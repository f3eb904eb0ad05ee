//! What travels on `instructd:checkpoints`, one definition for writers and
//! readers: a checkpoint announcement (the trainer writes it, every gateway
//! reads it; `source` says where a gateway that does not share the trainer's
//! disk fetches the files from), and a fleet-wide rollback (one gateway
//! writes it, every gateway serves the checkpoint it names). Each entry has a
//! `kind`; a reader skips kinds it does not know.

use redis::streams::StreamId;

use crate::{LinkError, RedisLink, streams};

/// The `kind` field of a checkpoint announcement.
pub const KIND: &str = "checkpoint";
/// The `kind` field of a fleet-wide rollback.
pub const ROLLBACK_KIND: &str = "rollback";

/// An operator rolled the fleet back: every gateway serves `to` again and
/// never promotes `from` on its own afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackAnnouncement {
    /// The checkpoint to serve.
    pub to: String,
    /// The checkpoint rolled back from.
    pub from: String,
}

impl RollbackAnnouncement {
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        vec![("kind", ROLLBACK_KIND.to_string()), ("to", self.to.clone()), ("from", self.from.clone())]
    }

    /// Reads an entry of the stream; `None` when it is not a rollback.
    pub fn from_entry(entry: &StreamId) -> Option<Self> {
        let text = |name: &str| entry.get::<String>(name).filter(|v| !v.is_empty());
        if text("kind")? != ROLLBACK_KIND {
            return None;
        }
        Some(Self { to: text("to")?, from: text("from")? })
    }

    /// Appends the rollback to `instructd:checkpoints`; returns the entry id.
    pub async fn publish(&self, link: &RedisLink) -> Result<String, LinkError> {
        xadd(link, self.fields()).await
    }
}

async fn xadd(link: &RedisLink, fields: Vec<(&'static str, String)>) -> Result<String, LinkError> {
    link.run(|mut c| async move {
        redis::cmd("XADD").arg(streams::CHECKPOINTS).arg("*").arg(&fields[..]).query_async::<String>(&mut c).await
    })
    .await
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointAnnouncement {
    pub id: String,
    /// The manifest's stage in snake case (`sft`, `reward_model`, `ppo_ptx`); absent in hand-made announcements.
    pub stage: Option<String>,
    pub parent: Option<String>,
    /// Base URL that serves `<source>/checkpoints/<id>/<file>` (the trainer's HTTP endpoint); `None` when the
    /// checkpoint is only on shared storage.
    pub source: Option<String>,
}

impl CheckpointAnnouncement {
    /// Reward models are announced too, but never served.
    pub fn is_servable(&self) -> bool {
        self.stage.as_deref() != Some("reward_model")
    }

    /// The stream entry's fields.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let mut fields = vec![("kind", KIND.to_string()), ("id", self.id.clone())];
        let optional = [("stage", &self.stage), ("parent", &self.parent), ("source", &self.source)];
        fields.extend(optional.into_iter().filter_map(|(name, value)| value.clone().map(|v| (name, v))));
        fields
    }

    /// Reads an entry of the stream; `None` when it is not a checkpoint announcement (no `id`, or another kind).
    pub fn from_entry(entry: &StreamId) -> Option<Self> {
        let text = |name: &str| entry.get::<String>(name).filter(|v| !v.is_empty());
        if text("kind").is_some_and(|kind| kind != KIND) {
            return None;
        }
        Some(Self { id: text("id")?, stage: text("stage"), parent: text("parent"), source: text("source") })
    }

    /// Appends the announcement to `instructd:checkpoints`; returns the entry id.
    pub async fn publish(&self, link: &RedisLink) -> Result<String, LinkError> {
        xadd(link, self.fields()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&str, &str)]) -> StreamId {
        StreamId {
            id: "1-0".into(),
            map: fields.iter().map(|(k, v)| (k.to_string(), redis::Value::BulkString(v.as_bytes().to_vec()))).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_rollback_reads_back_and_is_not_a_checkpoint() {
        let rollback = RollbackAnnouncement { to: "sft-1".into(), from: "sft-2".into() };
        let fields = rollback.fields();
        let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(RollbackAnnouncement::from_entry(&entry(&pairs)), Some(rollback));
        assert_eq!(CheckpointAnnouncement::from_entry(&entry(&pairs)), None, "old readers skip it");
        assert_eq!(RollbackAnnouncement::from_entry(&entry(&[("kind", "checkpoint"), ("id", "x")])), None);
        assert_eq!(RollbackAnnouncement::from_entry(&entry(&[("kind", "rollback"), ("to", "x")])), None);
    }

    #[test]
    fn fields_read_back_and_hand_made_entries_parse() {
        let announced = CheckpointAnnouncement {
            id: "sft-1".into(),
            stage: Some("sft".into()),
            parent: None,
            source: Some("http://trainer:9465".into()),
        };
        let fields = announced.fields();
        let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(CheckpointAnnouncement::from_entry(&entry(&pairs)), Some(announced));
        let bare = CheckpointAnnouncement::from_entry(&entry(&[("kind", "checkpoint"), ("id", "x")])).unwrap();
        assert!(bare.is_servable() && bare.source.is_none() && bare.stage.is_none());
        let rm = entry(&[("id", "rm-1"), ("stage", "reward_model"), ("parent", "")]);
        let rm = CheckpointAnnouncement::from_entry(&rm).unwrap();
        assert!(!rm.is_servable() && rm.parent.is_none());
        assert_eq!(CheckpointAnnouncement::from_entry(&entry(&[("kind", "other"), ("id", "x")])), None);
        assert_eq!(CheckpointAnnouncement::from_entry(&entry(&[("kind", "checkpoint")])), None);
    }
}
