//! Episodes: responses sampled through the serving engine (the same batching
//! code that answers API clients), and the padded tensors that score them
//! under any model.
//!
//! PPO's rollouts and the evaluation gate both sample here. A rollout engine
//! can share the trainable policy's weight storage ([`engine_sharing`]), so
//! each PPO iteration samples from the weights as they are after the last
//! optimiser step without copying 500 MB; sampling and training take turns,
//! never overlap.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use inference::engine::{Engine, EngineConfig, FinishReason, GenerateRequest, ModelInfo};
use inference::llama::Llama;
use inference::load::LoadedModel;
use inference::sampling::SamplingParams;
use inference::tokenizer::Tokenizer;

use crate::losses::token_logprobs;
use crate::policy_model::{PolicyModel, TrainError, TrainResult, encode_prompt};

/// How responses are sampled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleSettings {
    pub max_new_tokens: usize,
    /// 1 samples the policy as it is (PPO); 0 is greedy.
    pub temperature: f32,
    /// Request `i` is seeded with `seed + i`, so a run is reproducible.
    pub seed: u64,
    /// Prompts whose rendering is longer are skipped.
    pub max_prompt_tokens: usize,
}

/// One prompt and the response sampled for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Episode {
    /// Index of the prompt in the list given to [`sample`].
    pub prompt_index: usize,
    /// The chat-rendered prompt.
    pub prompt_ids: Vec<u32>,
    /// Generated tokens, then the first end-of-sequence id when the model stopped by itself (the choice to stop
    /// is an action the policy is trained on, as it is in SFT).
    pub response_ids: Vec<u32>,
    /// The response text as the API would return it.
    pub text: String,
    pub stopped: bool,
}

impl Episode {
    pub fn len(&self) -> usize {
        self.prompt_ids.len() + self.response_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A serving engine whose model reads the policy's own variables: no copy, and it samples whatever the weights
/// are when it runs. Trainable variables keep the serving path on unfused projections (see `inference::llama`).
pub fn engine_sharing(policy: &PolicyModel, name: &str, capacity: usize) -> TrainResult<Engine> {
    let vb = VarBuilder::from_varmap(policy.varmap(), DType::F32, policy.device());
    let llama = Llama::new(policy.config(), vb)?;
    start_engine(llama, policy.tokenizer().clone(), name, capacity)
}

/// A serving engine on a loaded model (a candidate or the serving checkpoint, for evaluation), sharing its
/// weights, so the same model can then score what the engine sampled.
pub fn engine_for(loaded: &LoadedModel, name: &str, capacity: usize) -> TrainResult<Engine> {
    start_engine(loaded.model.clone(), loaded.tokenizer.clone(), name, capacity)
}

fn start_engine(llama: Llama, tokenizer: Tokenizer, name: &str, capacity: usize) -> TrainResult<Engine> {
    let info = ModelInfo {
        name: name.to_string(),
        checkpoint: name.to_string(),
        vocab_size: llama.config().vocab_size,
        max_positions: llama.max_positions(),
    };
    let config = EngineConfig { queue_capacity: capacity.max(1), ..EngineConfig::default() };
    Ok(Engine::start(llama, tokenizer, info, config)?)
}

/// Samples one response per prompt through `engine`, all requests queued at once so the engine batches them.
/// Returns the episodes in prompt order, without the prompts that were skipped for length.
pub fn sample(engine: &Engine, prompts: &[String], settings: SampleSettings) -> TrainResult<Vec<Episode>> {
    let tokenizer: Arc<Tokenizer> = engine.tokenizer().clone();
    let max_positions = engine.info().max_positions;
    let eos = tokenizer.eos_token_ids().first().copied();
    let mut pending = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.iter().enumerate() {
        let ids = encode_prompt(&tokenizer, prompt)?;
        if ids.is_empty() || ids.len() > settings.max_prompt_tokens || ids.len() + 1 >= max_positions {
            tracing::debug!(prompt = i, tokens = ids.len(), "prompt skipped: too long to sample from");
            continue;
        }
        let mut request = GenerateRequest::new(ids.clone(), settings.max_new_tokens.min(max_positions - ids.len()));
        request.sampling = SamplingParams {
            temperature: settings.temperature,
            seed: Some(settings.seed.wrapping_add(i as u64)),
            top_logprobs: Some(0),
            ..SamplingParams::default()
        };
        let generation = engine.submit(request, false)?;
        pending.push((i, ids, generation));
    }
    // The engine answers over async channels; wait for them on a thread of our own so this works whether or not
    // the caller runs inside a tokio runtime.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime =
                    tokio::runtime::Builder::new_current_thread().build().map_err(|e| sampling_error(e.to_string()))?;
                runtime.block_on(async {
                    let mut episodes = Vec::with_capacity(pending.len());
                    for (prompt_index, prompt_ids, generation) in pending {
                        let completion = generation.collect().await?;
                        let Some(choice) = completion.choices.into_iter().next() else { continue };
                        let stopped = choice.finish_reason == Some(FinishReason::Stop);
                        let mut response_ids: Vec<u32> = choice.tokens.iter().map(|t| t.token).collect();
                        if let (true, Some(eos)) = (stopped, eos) {
                            response_ids.push(eos);
                        }
                        episodes.push(Episode { prompt_index, prompt_ids, response_ids, text: choice.text, stopped });
                    }
                    Ok(episodes)
                })
            })
            .join()
            .map_err(|_| sampling_error("the sampling thread panicked".into()))?
    })
}

fn sampling_error(message: String) -> TrainError {
    TrainError::Data(message)
}

/// `(prompt, response text)` of each episode, for the reward model.
pub fn prompt_response_pairs<'a>(prompts: &'a [String], episodes: &'a [Episode]) -> Vec<(&'a str, &'a str)> {
    episodes.iter().map(|e| (prompts[e.prompt_index].as_str(), e.text.as_str())).collect()
}

/// Episodes as right-padded next-token tensors: `input` `[B, L-1]` (the sequence without its last token),
/// `targets` `[B, L-1]` (shifted left by one) and `mask` `[B, L-1]`, 1.0 where the target is a response token.
/// Position `t` of any `[B, L-1]` tensor scores (or values the state before) the token `targets[b, t]`.
pub struct EpisodeBatch {
    pub input: Tensor,
    pub targets: Tensor,
    pub mask: Tensor,
    /// Response tokens per row.
    pub response_tokens: Vec<usize>,
}

impl EpisodeBatch {
    pub fn new(episodes: &[&Episode], device: &Device) -> TrainResult<Self> {
        let width = episodes.iter().map(|e| e.len()).max().unwrap_or(0);
        if width < 2 || episodes.iter().any(|e| e.response_ids.is_empty() || e.prompt_ids.is_empty()) {
            return Err(TrainError::Data("an episode needs a prompt and at least one response token".into()));
        }
        let t = width - 1;
        let (mut input, mut targets, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        let mut response_tokens = Vec::with_capacity(episodes.len());
        for e in episodes {
            let ids: Vec<u32> = e.prompt_ids.iter().chain(&e.response_ids).copied().collect();
            let n = ids.len();
            input.extend_from_slice(&ids[..n - 1]);
            input.extend(std::iter::repeat_n(0u32, t - (n - 1)));
            targets.extend_from_slice(&ids[1..]);
            targets.extend(std::iter::repeat_n(0u32, t - (n - 1)));
            let first = e.prompt_ids.len() - 1;
            mask.extend((0..t).map(|j| if j >= first && j < n - 1 { 1f32 } else { 0.0 }));
            response_tokens.push(e.response_ids.len());
        }
        let b = episodes.len();
        Ok(Self {
            input: Tensor::from_vec(input, (b, t), device)?,
            targets: Tensor::from_vec(targets, (b, t), device)?,
            mask: Tensor::from_vec(mask, (b, t), device)?,
            response_tokens,
        })
    }

    /// Log-probabilities `[B, L-1]` of the targets under `model` (differentiable; 0 weight outside the mask is the
    /// caller's business), without dropout.
    pub fn logprobs(&self, model: &Llama) -> TrainResult<Tensor> {
        Ok(token_logprobs(&model.forward_train(&self.input, 0.0)?, &self.targets)?)
    }

    /// Per-row sums of `values` `[B, L-1]` over the response positions.
    pub fn response_sums(&self, values: &Tensor) -> TrainResult<Vec<f32>> {
        Ok((values.detach() * &self.mask)?.sum(1)?.to_vec1::<f32>()?)
    }
}

/// Sequence log-probabilities of each episode's response under `model` (no gradient), `batch` episodes per
/// forward.
pub fn response_logprobs(model: &Llama, episodes: &[Episode], batch: usize) -> TrainResult<Vec<f32>> {
    let mut out = Vec::with_capacity(episodes.len());
    for chunk in episodes.chunks(batch.max(1)) {
        let refs: Vec<&Episode> = chunk.iter().collect();
        let collated = EpisodeBatch::new(&refs, model.device())?;
        out.extend(collated.response_sums(&collated.logprobs(model)?.detach())?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy_model::test_util::tiny_model;

    fn settings(temperature: f32) -> SampleSettings {
        SampleSettings { max_new_tokens: 8, temperature, seed: 7, max_prompt_tokens: 256 }
    }

    #[test]
    fn rollouts_from_a_shared_engine_follow_the_weights_and_score_consistently() {
        let tmp = tempfile::tempdir().unwrap();
        tiny_model(tmp.path(), 5, true);
        let policy = PolicyModel::load(tmp.path(), &Device::Cpu).unwrap();
        let engine = engine_sharing(&policy, "rollout", 8).unwrap();
        let prompts: Vec<String> = vec!["Name a colour.".into(), "Say hi.".into(), "Count to three.".into()];
        let episodes = sample(&engine, &prompts, settings(1.0)).unwrap();
        assert_eq!(episodes.len(), 3);
        for e in &episodes {
            assert!(!e.response_ids.is_empty() && e.response_ids.len() <= 9, "{e:?}");
            assert_eq!(e.prompt_ids, encode_prompt(policy.tokenizer(), &prompts[e.prompt_index]).unwrap());
        }
        // Same seeds, same weights: the same episodes.
        assert_eq!(sample(&engine, &prompts, settings(1.0)).unwrap(), episodes);

        // The training path scores the sampled tokens like the engine does: compare greedy samples' logprobs
        // with a hand-rolled per-token recomputation.
        let greedy = sample(&engine, &prompts, settings(0.0)).unwrap();
        let batched = response_logprobs(policy.llama(), &greedy, 2).unwrap();
        for (e, lp) in greedy.iter().zip(&batched) {
            let one = response_logprobs(policy.llama(), std::slice::from_ref(e), 1).unwrap()[0];
            assert!((one - lp).abs() < 1e-3, "padding changes nothing: {one} vs {lp}");
            assert!(*lp < 0.0);
        }

        // Move the weights: the same engine now samples from the new ones.
        for var in policy.vars() {
            var.set(&(var.as_tensor() * 3.0).unwrap()).unwrap();
        }
        assert_ne!(sample(&engine, &prompts, settings(0.0)).unwrap(), greedy);
    }

    #[test]
    fn batch_masks_exactly_the_response_targets() {
        let e1 = Episode {
            prompt_index: 0,
            prompt_ids: vec![1, 2, 3],
            response_ids: vec![4, 5],
            text: String::new(),
            stopped: true,
        };
        let e2 = Episode {
            prompt_index: 1,
            prompt_ids: vec![1],
            response_ids: vec![9],
            text: String::new(),
            stopped: false,
        };
        let b = EpisodeBatch::new(&[&e1, &e2], &Device::Cpu).unwrap();
        assert_eq!(b.targets.to_vec2::<u32>().unwrap(), vec![vec![2, 3, 4, 5], vec![9, 0, 0, 0]]);
        assert_eq!(b.mask.to_vec2::<f32>().unwrap(), vec![vec![0., 0., 1., 1.], vec![1., 0., 0., 0.]]);
        assert_eq!(b.response_tokens, vec![2, 1]);
        let empty = Episode { response_ids: vec![], ..e2 };
        assert!(EpisodeBatch::new(&[&empty], &Device::Cpu).is_err());
    }
}
