//! The continuous trainer: reads the human data the gateway logged (Redis
//! Streams, consumer group `trainer`), keeps it durably in an on-disk dataset
//! store, builds immutable dataset snapshots, and (in later increments) runs
//! SFT, reward-model and PPO-ptx refreshes, evaluates candidates and
//! publishes checkpoints the gateway hot-swaps in.

pub mod config;
pub mod ingest;
pub mod losses;
pub mod optim;
pub mod policy_model;
pub mod refresh;
pub mod reward_model;
pub mod sft;
pub mod snapshot;
pub mod store;

pub use config::TrainerConfig;
