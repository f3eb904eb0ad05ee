//! The reward model this gateway scores with (`POST /v1/rewards`): the newest
//! reward-model checkpoint the trainer published, read with the trainer's own
//! [`RewardModel`] (one definition of the format and of how a conversation is
//! tokenized for it). [`crate::rollout`] loads it at start-up and whenever a
//! new one is announced, and swaps it in here; a request scoring during a swap
//! finishes on the model it started with.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use inference::tokenizer::ChatMessage;
use trainer::reward_model::RewardModel;

/// Sequences per forward pass when scoring.
const SCORE_BATCH: usize = 8;

/// A loaded reward model and the checkpoint it came from.
pub struct ServingRewardModel {
    pub id: String,
    /// The manifest's creation time: an older checkpoint never replaces a newer one.
    pub created_at_ms: u64,
    model: RewardModel,
}

/// The scores of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    pub rewards: Vec<f32>,
    /// Per completion: whether its sequence was cut to the model's `max_seq_len` (its first tokens dropped).
    pub truncated: Vec<bool>,
    /// Tokens scored, all completions together.
    pub tokens: usize,
}

impl ServingRewardModel {
    /// Loads the reward-model directory `dir` (blocking; verified by the caller).
    pub fn load(id: &str, created_at_ms: u64, dir: &std::path::Path) -> Result<Self, String> {
        let model = RewardModel::load_on(dir, &inference::load::default_device()).map_err(|e| e.to_string())?;
        Ok(Self { id: id.to_string(), created_at_ms, model })
    }

    /// Rewards of each completion as the reply to `conversation` (blocking: run it off the async threads).
    pub fn score(&self, conversation: &[ChatMessage], completions: &[String]) -> Result<Scores, String> {
        let mut sequences = Vec::with_capacity(completions.len());
        let mut truncated = Vec::with_capacity(completions.len());
        for completion in completions {
            let (ids, cut) = self.model.encode_conversation(conversation, completion).map_err(|e| e.to_string())?;
            sequences.push(ids);
            truncated.push(cut);
        }
        let tokens = sequences.iter().map(Vec::len).sum();
        let rewards = self.model.score_tokens(&sequences, SCORE_BATCH).map_err(|e| e.to_string())?;
        Ok(Scores { rewards, truncated, tokens })
    }
}

/// 503 `reward_model_unavailable`: what a request that needs the reward model
/// gets before the trainer has published one.
pub fn unavailable() -> crate::error::ApiError {
    crate::error::ApiError::unavailable(
        "No reward model is loaded on this gateway yet: the trainer publishes one after its first reward-model \
         refresh, and the gateway loads it when it is announced (GET /admin/checkpoints lists them).",
    )
    .with_code("reward_model_unavailable")
}

/// The slot the serving reward model lives in (empty until one is loaded).
pub struct RewardModels {
    current: ArcSwapOption<ServingRewardModel>,
    /// One scoring at a time: forwards share the CPU (or GPU) with the serving engine, and a queue of them must not
    /// starve it.
    scoring: tokio::sync::Semaphore,
}

impl Default for RewardModels {
    fn default() -> Self {
        Self { current: ArcSwapOption::empty(), scoring: tokio::sync::Semaphore::new(1) }
    }
}

impl RewardModels {
    /// Scores on a blocking thread, one request at a time.
    pub async fn score(
        &self,
        model: Arc<ServingRewardModel>,
        conversation: Vec<ChatMessage>,
        completions: Vec<String>,
    ) -> Result<Scores, String> {
        let _permit = self.scoring.acquire().await.map_err(|e| e.to_string())?;
        tokio::task::spawn_blocking(move || model.score(&conversation, &completions))
            .await
            .map_err(|e| format!("scoring panicked: {e}"))?
    }

    pub fn current(&self) -> Option<Arc<ServingRewardModel>> {
        self.current.load_full()
    }

    /// Serves `model` unless a newer checkpoint is already served; whether it was swapped in.
    pub fn offer(&self, model: ServingRewardModel) -> bool {
        let model = Arc::new(model);
        let previous = self.current.rcu(|current| match current {
            Some(serving) if serving.created_at_ms > model.created_at_ms => Some(serving.clone()),
            _ => Some(model.clone()),
        });
        let swapped = previous.as_ref().is_none_or(|p| p.created_at_ms <= model.created_at_ms);
        if swapped {
            metrics::counter!("instructd_reward_model_swaps_total").increment(1);
        }
        swapped
    }
}
