//! The HTTP gateway: OpenAI-compatible completions and chat, API keys,
//! rate limits shared across replicas through Redis, use-case policy, and the
//! admin and operations routes. Handlers are thin: requests are validated
//! once at the edge into the engine's typed request, and every refusal is an
//! OpenAI-style error body.

pub mod admission;
pub mod arena;
pub mod auth;
pub mod bradley_terry;
pub mod checkpoint_fetch;
pub mod config;
pub mod connections;
pub mod error;
pub mod generation;
pub mod json;
pub mod judgments;
pub mod keys;
pub mod leaderboard;
pub mod metrics;
pub mod observe;
pub mod openai;
pub mod playground;
pub mod policy;
pub mod rate_limit;
pub mod responses_store;
pub mod reward_model;
pub mod reward_order;
pub mod reward_ranking;
pub mod rollout;
pub mod routes;
pub mod scoring;
pub mod server;
pub mod state;
pub mod training_curves;
pub mod upstream;
pub mod vote_gate;

pub use config::GatewayConfig;
pub use server::{route_list, router, serve};
pub use state::{AppState, SharedState};
