//! One file per route group; `server.rs` mounts them.

pub mod admin_checkpoints;
pub mod admin_keys;
pub mod admin_leaderboard;
pub mod admin_training;
pub mod arena;
pub mod chat;
pub mod completions;
pub mod feedback;
pub mod health;
pub mod labeling;
pub mod models;
pub mod playground;
pub mod playground_page;
pub mod responses;
pub mod rewards;
