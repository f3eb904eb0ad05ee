//! What the gateway and the trainer share about human data: the Redis link,
//! stream names, event types, consent, the log of prompts and the labeling
//! queue, arena votes between checkpoints, PII screening and dataset splits, the exactly-once event log
//! with its on-disk spill, and whether Redis itself keeps anything on disk.
//! It knows nothing of HTTP.

pub mod announcement;
pub mod arena;
pub mod consent;
pub mod event_log;
pub mod events;
pub mod labeling;
pub mod logged_prompts;
pub mod pii;
pub mod records;
pub mod redis_link;
pub mod redis_persistence;
pub mod redis_server;
pub mod retention;
pub mod spill;
pub mod split;
pub mod streams;

pub use redis_link::{LinkError, RedisLink};
