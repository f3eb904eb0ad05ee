//! The reward model's ordering of a prompt's samples, shown to a labeler in
//! the answer to their own ranking: after they submitted theirs, never
//! before (it would anchor them), with how many of their ordered pairs the
//! reward model orders the same way, for agreement statistics.

use std::collections::HashMap;

use inference::tokenizer::ChatMessage;
use serde_json::{Value, json};

use crate::reward_model::RewardModels;

/// What the serving reward model makes of one labeler's ranking.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardOrder {
    /// The reward checkpoint.
    pub model: String,
    /// Generation ids, highest reward first.
    pub order: Vec<String>,
    pub rewards: HashMap<String, f32>,
    /// Pairs the labeler ordered (ties dropped, as in training) and how many of them the reward model orders alike.
    pub pairs: usize,
    pub agreed: usize,
}

impl RewardOrder {
    /// Orders `samples` (generation id, text) by `rewards` and compares with `ranking` (groups, best first).
    pub fn new(model: &str, samples: &[(String, String)], rewards: &[f32], ranking: &[Vec<String>]) -> Self {
        let rewards: HashMap<String, f32> =
            samples.iter().map(|(id, _)| id.clone()).zip(rewards.iter().copied()).collect();
        let mut order: Vec<String> = samples.iter().map(|(id, _)| id.clone()).collect();
        order.sort_by(|a, b| rewards[b].total_cmp(&rewards[a]));
        let (mut pairs, mut agreed) = (0, 0);
        for (i, better_group) in ranking.iter().enumerate() {
            for worse_group in &ranking[i + 1..] {
                for better in better_group {
                    for worse in worse_group {
                        if let (Some(b), Some(w)) = (rewards.get(better), rewards.get(worse)) {
                            pairs += 1;
                            agreed += usize::from(b > w);
                        }
                    }
                }
            }
        }
        Self { model: model.to_string(), order, rewards, pairs, agreed }
    }

    pub fn to_json(&self) -> Value {
        json!({"model": self.model, "order": self.order, "rewards": self.rewards,
            "agreement": {"pairs": self.pairs, "agreed": self.agreed}})
    }
}

/// The conversation a labeling task's samples answer: its chat messages, else its prompt as one user message.
fn conversation(task: &Value) -> Option<Vec<ChatMessage>> {
    if let Some(messages) = task["messages"].as_array().filter(|m| !m.is_empty()) {
        return messages.iter().map(|m| Some(ChatMessage::new(m["role"].as_str()?, m["content"].as_str()?))).collect();
    }
    task["prompt"].as_str().map(|p| vec![ChatMessage::new("user", p)])
}

/// The reward model's view of `ranking` over the logged task `task`; `None` when no reward model is loaded, the
/// task has no samples, or scoring fails (the labeler's submission stands either way).
pub async fn for_ranking(models: &RewardModels, task: &Value, ranking: &[Vec<String>]) -> Option<RewardOrder> {
    let model = models.current()?;
    let conversation = conversation(task)?;
    let samples: Vec<(String, String)> = task["samples"]
        .as_array()?
        .iter()
        .filter_map(|s| Some((s["generation_id"].as_str()?.to_string(), s["text"].as_str()?.to_string())))
        .collect();
    if samples.is_empty() {
        return None;
    }
    let texts = samples.iter().map(|(_, text)| text.clone()).collect();
    let id = model.id.clone();
    match models.score(model, conversation, texts).await {
        Ok(scores) => Some(RewardOrder::new(&id, &samples, &scores.rewards, ranking)),
        Err(e) => {
            tracing::warn!(error = %e, "the reward model could not order a labeler's samples");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_by_reward_and_counts_agreeing_pairs_without_ties() {
        let samples: Vec<(String, String)> =
            ["a", "b", "c", "d"].iter().map(|id| (id.to_string(), String::new())).collect();
        let ranking = vec![vec!["b".to_string()], vec!["a".to_string(), "c".to_string()], vec!["d".to_string()]];
        let order = RewardOrder::new("rm-1", &samples, &[0.5, 0.9, 0.1, 0.3], &ranking);
        assert_eq!(order.order, ["b", "a", "d", "c"]);
        // Pairs: b>a, b>c, b>d, a>d, c>d (a~c tied, dropped); the model agrees on all but c>d.
        assert_eq!((order.pairs, order.agreed), (5, 4));
        assert_eq!(order.to_json()["agreement"], json!({"pairs": 5, "agreed": 4}));
    }

    #[test]
    fn the_conversation_is_the_messages_or_the_prompt() {
        let chat = json!({"messages": [{"role": "user", "content": "hi"}], "prompt": null});
        assert_eq!(conversation(&chat), Some(vec![ChatMessage::new("user", "hi")]));
        let plain = json!({"messages": null, "prompt": "Write a poem."});
        assert_eq!(conversation(&plain), Some(vec![ChatMessage::new("user", "Write a poem.")]));
    }
}
