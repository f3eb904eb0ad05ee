//! One file per route group; `server.rs` mounts them.

pub mod admin_keys;
pub mod chat;
pub mod completions;
pub mod health;
pub mod models;
