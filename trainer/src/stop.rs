//! Stopping a refresh from outside: `instructd train` requests a stop on SIGTERM or Ctrl-C, and every stage
//! checks between steps (an optimiser step, a PPO minibatch, a batch of cached activations, a gate phase), so the
//! process ends within one step rather than after the stage (Kubernetes allows 30 s by default). A stopped
//! stage publishes nothing: its output directory is a temporary one the store never renames, and the refresh
//! state is saved only after a stage completes, so a restart runs the stage again from the same snapshot.
//!
//! Process-wide on purpose: a signal stops the whole process, and threading a token through every stage's
//! signature would say nothing more.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::policy_model::{TrainError, TrainResult};

static STOP: AtomicBool = AtomicBool::new(false);

/// Asks every running stage to stop at its next step boundary.
pub fn request() {
    STOP.store(true, Ordering::SeqCst);
}

pub fn requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// `Err(TrainError::Stopped)` once a stop was requested.
pub fn check() -> TrainResult<()> {
    if requested() { Err(TrainError::Stopped) } else { Ok(()) }
}
