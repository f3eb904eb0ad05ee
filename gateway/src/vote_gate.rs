//! The vote gate: with `[gateway.arena] gate = true`, every replica re-reads
//! the arena's votes on a timer and, for each verified candidate waiting for
//! promotion (the canary included), promotes it once voters prefer it to the
//! serving checkpoint or refuses it once they prefer the serving one (see
//! [`leaderboard::decide`]). Replicas read the same votes, so they reach the
//! same decision without talking to each other.

use std::time::Duration;

use crate::leaderboard::{self, GateDecision};
use crate::state::SharedState;

/// Runs until the process ends.
pub async fn run(state: SharedState) {
    let config = state.config.arena.clone();
    let mut tick = tokio::time::interval(Duration::from_secs(config.gate_interval_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let candidates = state.rollout.waiting_candidates(&state.engine);
        if candidates.is_empty() {
            continue;
        }
        let serving = state.engine.current().info().checkpoint.clone();
        let board = match leaderboard::current(&state.arena, &serving, &config).await {
            Ok(board) => board,
            Err(e) => {
                tracing::warn!(error = %e, "vote gate: the leaderboard could not be read; deciding nothing");
                continue;
            }
        };
        for candidate in candidates {
            match leaderboard::decide(&board, &candidate, config.gate_min_votes) {
                GateDecision::Wait => {}
                GateDecision::Promote(versus) => {
                    tracing::info!(checkpoint = %candidate, p = versus.win_probability, low = versus.low, "voters prefer the candidate: promoting");
                    if let Err(e) = state.rollout.promote(&state.engine, &candidate) {
                        tracing::error!(checkpoint = %candidate, error = %e, "vote gate promotion failed");
                    }
                    // One promotion per round: the next round measures against the new serving checkpoint.
                    break;
                }
                GateDecision::Refuse(versus) => {
                    let reason = format!(
                        "voters preferred the serving checkpoint {serving}: P(candidate wins) = {:.2}, {:.0}% interval [{:.2}, {:.2}]",
                        versus.win_probability,
                        config.confidence * 100.0,
                        versus.low,
                        versus.high
                    );
                    tracing::info!(checkpoint = %candidate, %reason, "vote gate refuses the candidate");
                    state.rollout.refuse(&state.engine, &candidate, &reason);
                }
            }
        }
    }
}
