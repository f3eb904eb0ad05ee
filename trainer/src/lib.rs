//! The continuous trainer: reads the human data the gateway logged (Redis
//! Streams, consumer group `trainer`), keeps it durably in an on-disk dataset
//! store, builds immutable dataset snapshots, runs SFT, reward-model and
//! PPO-ptx refreshes, evaluates candidates and publishes checkpoints the
//! gateway hot-swaps in.

pub mod backend;
pub mod bench;
pub mod compute_pool;
pub mod config;
pub mod corpus;
pub mod episodes;
pub mod evaluation;
pub mod ingest;
pub mod journal;
pub mod kl_controller;
pub mod labeler_quality;
pub mod losses;
pub mod optim;
pub mod policy_model;
pub mod ppo;
pub mod refresh;
pub mod reward_model;
pub mod sft;
pub mod snapshot;
pub mod step;
pub mod step_timing;
pub mod stop;
pub mod store;
pub mod win_rate;

pub use config::TrainerConfig;
