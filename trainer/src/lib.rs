//! The continuous trainer (SFT, RM, PPO-ptx). Arrives with its own issue.
