//! The Redis keys every process agrees on: stream names and key prefixes.
//!
//! One place, so a renamed stream cannot leave the gateway writing where the
//! trainer no longer reads.

/// Consented playground prompts with their samples.
pub const PROMPTS: &str = "instructd:prompts";
/// Ratings, rankings, comparisons and demonstrations.
pub const FEEDBACK: &str = "instructd:feedback";
/// Checkpoint announcements from the trainer.
pub const CHECKPOINTS: &str = "instructd:checkpoints";
/// Policy refusals and key status changes.
pub const AUDIT: &str = "instructd:audit";
