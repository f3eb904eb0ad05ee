//! What the gateway and the trainer share about human data: the Redis link,
//! stream names, and (with the feedback issue) event types, consent, PII
//! screening and dataset splits. It knows nothing of HTTP.

pub mod redis_link;
pub mod redis_server;
pub mod streams;

pub use redis_link::{LinkError, RedisLink};
