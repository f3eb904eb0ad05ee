//! `best_of` ranked by the serving reward model (`"rank_by": "reward"` on
//! completions, off by default): every sample of a prompt is generated, the
//! reward model scores each as the reply to the prompt (as one user message,
//! the way `POST /v1/rewards` scores a `prompt`), and the `n` best are kept.
//! Without a loaded reward model the request is refused before it is
//! generated, never silently ranked by log-probability instead.

use std::sync::Arc;

use inference::engine::{Completion, Generation};
use inference::tokenizer::ChatMessage;

use crate::error::ApiError;
use crate::openai::common::{PreparedRequest, RankBy};
use crate::reward_model::{RewardModels, ServingRewardModel};

/// The reward model a request's `best_of` is ranked with.
pub struct RewardRanker<'a> {
    models: &'a RewardModels,
    model: Arc<ServingRewardModel>,
}

impl<'a> RewardRanker<'a> {
    /// `None` when `prepared` ranks by log-probability or has nothing to
    /// drop (`best_of` at most `n`); 503 `reward_model_unavailable` when it
    /// ranks by reward and no reward model is loaded.
    pub fn for_request(models: &'a RewardModels, prepared: &PreparedRequest) -> Result<Option<Self>, ApiError> {
        let drops_samples = prepared.requests.iter().any(|r| r.samples() > r.n);
        if prepared.rank_by != RankBy::Reward || !drops_samples {
            return Ok(None);
        }
        let model = models.current().ok_or_else(crate::reward_model::unavailable)?;
        Ok(Some(Self { models, model }))
    }

    /// Runs `generations` (one per prompt of `prepared`) to the end and keeps,
    /// per prompt, the `n` samples the reward model scores highest (best first).
    pub async fn collect(
        &self,
        generations: Vec<Generation>,
        prepared: &PreparedRequest,
    ) -> Result<Vec<Completion>, ApiError> {
        let collected = futures_util::future::join_all(generations.into_iter().map(|g| g.collect_samples())).await;
        let mut completions = Vec::with_capacity(collected.len());
        for (prompt, completion) in prepared.prompt_texts.iter().zip(collected) {
            let mut completion = completion.map_err(ApiError::from)?;
            let texts: Vec<String> = completion.choices.iter().map(|c| c.text.clone()).collect();
            let conversation = vec![ChatMessage::new("user", prompt.clone())];
            let scores =
                self.models.score(self.model.clone(), conversation, texts).await.map_err(|message| {
                    ApiError::internal(format!("The reward model failed to rank best_of: {message}"))
                })?;
            completion.keep_best(prepared.n, &scores.rewards);
            completions.push(completion);
        }
        Ok(completions)
    }
}
