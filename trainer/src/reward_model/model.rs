//! [`RewardModel`]: a transformer trunk and a scalar head, with its forward ([`RewardModel::rewards`], also from
//! cached frozen-layer activations, and per position as PPO's value function), scoring, and its directory format.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Linear, VarMap};
use inference::tokenizer::ChatMessage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::policy_model::{
    CostOptions, PolicyModel, TrainError, TrainResult, encode_conversation, io_err, write_file_atomic,
    write_safetensors_atomic,
};
use crate::snapshot::SftExample;

/// The scalar head's weights.
pub const HEAD_FILE: &str = "reward_head.safetensors";
/// What makes a model directory a reward model.
pub const META_FILE: &str = "rm.json";
pub(super) const META_KIND: &str = "instructd-reward-model";
pub(super) const HEAD_WEIGHT: &str = "score.weight";
pub(super) const HEAD_BIAS: &str = "score.bias";

/// `rm.json`: how to read the directory as a reward model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RmMeta {
    pub kind: String,
    pub format_version: u32,
    pub head_file: String,
    pub hidden_size: usize,
    /// The scored sequence ends with the tokenizer's first EOS id.
    pub append_eos: bool,
    /// Longer sequences keep their last `max_seq_len` tokens.
    pub max_seq_len: usize,
    /// Subtracted from the head's bias so demonstrations score 0 on average (already applied to the bias).
    pub bias_offset: f32,
    /// Demonstrations the offset was measured on.
    pub demonstrations: usize,
    /// The policy (SFT) directory the trunk started from.
    pub source_policy: PathBuf,
}

/// A transformer trunk and a scalar head.
pub struct RewardModel {
    trunk: PolicyModel,
    head_vars: VarMap,
    head: Linear,
    meta: RmMeta,
}

impl RewardModel {
    /// A fresh reward model from a policy (SFT) directory: its trunk, and a new head ~ N(0, 1/(hidden + 1)),
    /// bias 0, seeded.
    pub fn from_policy(
        policy_dir: impl AsRef<Path>,
        device: &Device,
        seed: u64,
        max_seq_len: usize,
    ) -> TrainResult<Self> {
        let trunk = PolicyModel::load(policy_dir.as_ref(), device)?;
        let hidden = trunk.config().hidden_size;
        let mut rng = StdRng::seed_from_u64(seed);
        let std = 1.0 / ((hidden + 1) as f64).sqrt();
        let weight: Vec<f32> = (0..hidden)
            .map(|_| {
                let (u1, u2) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
                (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect();
        let weight = Tensor::from_vec(weight, (1, hidden), device)?;
        let bias = Tensor::zeros(1, DType::F32, device)?;
        let meta = RmMeta {
            kind: META_KIND.into(),
            format_version: 1,
            head_file: HEAD_FILE.into(),
            hidden_size: hidden,
            append_eos: true,
            max_seq_len: max_seq_len.min(trunk.llama().max_positions()),
            bias_offset: 0.0,
            demonstrations: 0,
            source_policy: trunk.source_dir().to_path_buf(),
        };
        Self::assemble(trunk, weight, bias, meta)
    }

    /// Loads a reward-model directory written by [`RewardModel::save`], on the default device.
    pub fn load(dir: impl AsRef<Path>) -> TrainResult<Self> {
        Self::load_on(dir, &inference::load::default_device())
    }

    pub fn load_on(dir: impl AsRef<Path>, device: &Device) -> TrainResult<Self> {
        let dir = dir.as_ref();
        let meta_path = dir.join(META_FILE);
        let text = std::fs::read_to_string(&meta_path).map_err(io_err(&meta_path))?;
        let checkpoint = |message: String| TrainError::Checkpoint { path: meta_path.clone(), message };
        let meta: RmMeta = serde_json::from_str(&text).map_err(|e| checkpoint(format!("invalid rm.json: {e}")))?;
        if meta.kind != META_KIND || meta.format_version != 1 {
            return Err(checkpoint(format!(
                "not a reward model (kind {:?}, version {})",
                meta.kind, meta.format_version
            )));
        }
        let trunk = PolicyModel::load(dir, device)?;
        let head_path = dir.join(&meta.head_file);
        let mut head = candle_core::safetensors::load(&head_path, device).map_err(|e| TrainError::Checkpoint {
            path: head_path.clone(),
            message: format!("cannot read the reward head: {e}"),
        })?;
        let hidden = trunk.config().hidden_size;
        let (weight, bias) = match (head.remove(HEAD_WEIGHT), head.remove(HEAD_BIAS)) {
            (Some(w), Some(b)) if w.dims() == [1, hidden] && b.dims() == [1] => (w, b),
            _ => {
                return Err(TrainError::Checkpoint {
                    path: head_path,
                    message: format!("expected {HEAD_WEIGHT} [1, {hidden}] and {HEAD_BIAS} [1]"),
                });
            }
        };
        Self::assemble(trunk, weight.to_dtype(DType::F32)?, bias.to_dtype(DType::F32)?, meta)
    }

    fn assemble(trunk: PolicyModel, weight: Tensor, bias: Tensor, meta: RmMeta) -> TrainResult<Self> {
        let head_vars = VarMap::new();
        let (weight, bias) = (Var::from_tensor(&weight)?, Var::from_tensor(&bias)?);
        {
            let mut data = head_vars.data().lock().unwrap_or_else(|e| e.into_inner());
            data.insert(HEAD_WEIGHT.into(), weight.clone());
            data.insert(HEAD_BIAS.into(), bias.clone());
        }
        let head = Linear::new(weight.as_tensor().clone(), Some(bias.as_tensor().clone()));
        Ok(Self { trunk, head_vars, head, meta })
    }

    /// Writes the reward model as a directory (see the module docs).
    pub fn save(&self, out_dir: impl AsRef<Path>) -> TrainResult<()> {
        let out_dir = out_dir.as_ref();
        self.trunk.save(out_dir)?;
        let head: HashMap<String, Tensor> = {
            let data = self.head_vars.data().lock().unwrap_or_else(|e| e.into_inner());
            data.iter()
                .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().to_device(&Device::Cpu)?)))
                .collect::<TrainResult<_>>()?
        };
        write_safetensors_atomic(&head, &out_dir.join(HEAD_FILE))?;
        let meta = serde_json::to_vec_pretty(&self.meta).map_err(|e| TrainError::Data(e.to_string()))?;
        write_file_atomic(&out_dir.join(META_FILE), &meta)
    }

    /// Freezes the trunk's embedding and lowest `n` layers ([`PolicyModel::with_frozen_layers`]).
    pub fn with_frozen_layers(mut self, n: usize) -> TrainResult<Self> {
        self.trunk = self.trunk.with_frozen_layers(n)?;
        Ok(self)
    }

    /// The trunk's frozen layers, LoRA adapters and gradient checkpointing ([`PolicyModel::with_cost_options`]);
    /// the head always trains.
    pub fn with_cost_options(mut self, options: &CostOptions) -> TrainResult<Self> {
        self.trunk = self.trunk.with_cost_options(options)?;
        Ok(self)
    }

    pub fn trunk(&self) -> &PolicyModel {
        &self.trunk
    }

    pub fn head(&self) -> &Linear {
        &self.head
    }

    pub fn meta(&self) -> &RmMeta {
        &self.meta
    }

    /// Trunk variables (sorted by name), then the head's weight and bias.
    pub fn vars(&self) -> Vec<Var> {
        let mut vars = self.trunk.vars();
        let data = self.head_vars.data().lock().unwrap_or_else(|e| e.into_inner());
        vars.extend([HEAD_WEIGHT, HEAD_BIAS].iter().filter_map(|n| data.get(*n).cloned()));
        vars
    }

    /// The token ids the RM scores for a (prompt, response) pair, and whether they were cut to `max_seq_len`.
    pub fn encode(&self, prompt: &str, response: &str) -> TrainResult<(Vec<u32>, bool)> {
        self.encode_conversation(&[ChatMessage::new("user", prompt)], response)
    }

    /// [`RewardModel::encode`] of a response to a whole conversation (the gateway's `POST /v1/rewards` with
    /// `messages`).
    pub fn encode_conversation(&self, messages: &[ChatMessage], response: &str) -> TrainResult<(Vec<u32>, bool)> {
        let mut ids = encode_conversation(self.trunk.tokenizer(), messages, response, self.meta.append_eos)?.ids;
        let max = self.meta.max_seq_len;
        let cut = ids.len() > max;
        if cut {
            ids.drain(..ids.len() - max);
        }
        Ok((ids, cut))
    }

    /// Rewards `[B]` of a batch of token sequences, differentiable wrt the trunk and head.
    pub fn rewards(&self, sequences: &[&[u32]], residual_dropout: f32) -> TrainResult<Tensor> {
        let device = self.trunk.device();
        let t = sequences.iter().map(|s| s.len()).max().unwrap_or(0);
        if t == 0 || sequences.iter().any(|s| s.is_empty()) {
            return Err(TrainError::Data("cannot score an empty sequence".into()));
        }
        let mut ids = Vec::with_capacity(sequences.len() * t);
        let mut last = Vec::with_capacity(sequences.len());
        for (b, s) in sequences.iter().enumerate() {
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(0u32, t - s.len()));
            last.push((b * t + s.len() - 1) as u32);
        }
        let input = Tensor::from_vec(ids, (sequences.len(), t), device)?;
        let hidden = self.trunk.llama().hidden_states(&input, residual_dropout)?;
        let (b, t, h) = hidden.dims3()?;
        let at_last = hidden.reshape((b * t, h))?.index_select(&Tensor::from_vec(last, b, device)?, 0)?;
        Ok(self.head.forward(&at_last)?.squeeze(1)?)
    }

    /// The output of the frozen layers for each sequence (see [`RmConfig::cache_frozen_activations`]): the rows
    /// `[len, hidden]` of every position, flattened, or only the last position's row when every layer is frozen
    /// (the head reads nothing else then). `None` when no layer is frozen. Runs `batch` sequences per forward,
    /// shortest first so little is padded.
    pub fn frozen_activations(&self, sequences: &[&[u32]], batch: usize) -> TrainResult<Option<Vec<Vec<f32>>>> {
        let llama = self.trunk.llama();
        if llama.frozen_layers() == 0 {
            return Ok(None);
        }
        let last_only = llama.frozen_layers() >= self.trunk.config().num_hidden_layers;
        let hidden = self.meta.hidden_size;
        let mut order: Vec<usize> = (0..sequences.len()).collect();
        order.sort_by_key(|&i| sequences[i].len());
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); sequences.len()];
        for chunk in order.chunks(batch.max(1)) {
            crate::stop::check()?;
            let t = chunk.iter().map(|&i| sequences[i].len()).max().unwrap_or(0);
            if t == 0 || chunk.iter().any(|&i| sequences[i].is_empty()) {
                return Err(TrainError::Data("cannot score an empty sequence".into()));
            }
            let mut ids = Vec::with_capacity(chunk.len() * t);
            for &i in chunk {
                ids.extend_from_slice(sequences[i]);
                ids.extend(std::iter::repeat_n(0u32, t - sequences[i].len()));
            }
            let input = Tensor::from_vec(ids, (chunk.len(), t), self.trunk.device())?;
            let prefix = crate::compute_pool::run(|| llama.frozen_prefix(&input))?
                .ok_or_else(|| TrainError::Data("no frozen layer".into()))?;
            let flat = prefix.flatten_all()?.to_vec1::<f32>()?;
            for (b, &i) in chunk.iter().enumerate() {
                let len = sequences[i].len();
                let rows = if last_only { len - 1..len } else { 0..len };
                out[i] = flat[(b * t + rows.start) * hidden..(b * t + rows.end) * hidden].to_vec();
            }
        }
        Ok(Some(out))
    }

    /// Rewards `[B]` from frozen-layer outputs as [`RewardModel::frozen_activations`] returns them,
    /// differentiable wrt the trainable layers and the head: the same values as [`RewardModel::rewards`] on the
    /// sequences they came from.
    pub fn rewards_from_activations(&self, activations: &[&[f32]], residual_dropout: f32) -> TrainResult<Tensor> {
        let hidden = self.meta.hidden_size;
        let lens: Vec<usize> = activations.iter().map(|a| a.len() / hidden).collect();
        let t = lens.iter().copied().max().unwrap_or(0);
        if t == 0 || lens.contains(&0) || activations.iter().any(|a| a.len() % hidden != 0) {
            return Err(TrainError::Data("cannot score an empty sequence".into()));
        }
        let mut rows = vec![0f32; activations.len() * t * hidden];
        let mut last = Vec::with_capacity(activations.len());
        for (b, a) in activations.iter().enumerate() {
            rows[b * t * hidden..b * t * hidden + a.len()].copy_from_slice(a);
            last.push((b * t + lens[b] - 1) as u32);
        }
        let device = self.trunk.device();
        let prefix = Tensor::from_vec(rows, (activations.len(), t, hidden), device)?;
        let states = self.trunk.llama().hidden_states_above_frozen(&prefix, residual_dropout)?;
        let at_last = states
            .reshape((activations.len() * t, hidden))?
            .index_select(&Tensor::from_vec(last, activations.len(), device)?, 0)?;
        Ok(self.head.forward(&at_last)?.squeeze(1)?)
    }

    /// Per-position values `[B, T]` of a right-padded batch of token ids `[B, T]`: the head applied to every
    /// position's hidden state, differentiable. PPO's value function is a reward model read this way (the paper
    /// initialises it from the RM).
    pub fn values(&self, input: &Tensor, residual_dropout: f32) -> TrainResult<Tensor> {
        let hidden = self.trunk.llama().hidden_states(input, residual_dropout)?;
        Ok(self.head.forward(&hidden)?.squeeze(2)?)
    }

    /// Rewards of (prompt, response) pairs, for the evaluation gate and PPO.
    pub fn score<P: AsRef<str>, R: AsRef<str>>(&self, pairs: &[(P, R)]) -> TrainResult<Vec<f32>> {
        let sequences =
            pairs.iter().map(|(p, r)| Ok(self.encode(p.as_ref(), r.as_ref())?.0)).collect::<TrainResult<Vec<_>>>()?;
        self.score_tokens(&sequences, 16)
    }

    /// Rewards of already-tokenised sequences (as [`RewardModel::encode`] makes them), `batch` per forward.
    pub fn score_tokens(&self, sequences: &[Vec<u32>], batch: usize) -> TrainResult<Vec<f32>> {
        let mut out = Vec::with_capacity(sequences.len());
        for chunk in sequences.chunks(batch.max(1)) {
            let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            out.extend(self.rewards(&refs, 0.0)?.detach().to_vec1::<f32>()?);
        }
        Ok(out)
    }

    /// Maps the head's output `r` to `scale · r + shift` (PPO's reward normalisation applied to its value head).
    pub fn rescale_head(&self, scale: f64, shift: f64) -> TrainResult<()> {
        let data = self.head_vars.data().lock().unwrap_or_else(|e| e.into_inner());
        let (Some(weight), Some(bias)) = (data.get(HEAD_WEIGHT), data.get(HEAD_BIAS)) else {
            return Err(TrainError::Data("reward head has no weight or bias".into()));
        };
        weight.set(&(weight.as_tensor().detach() * scale)?)?;
        bias.set(&((bias.as_tensor().detach() * scale)? + shift)?)?;
        Ok(())
    }

    /// Shifts the head's bias so the given demonstrations score 0 on average; returns the mean before the shift
    /// (`None` when there are none).
    pub fn center_on_demonstrations(
        &mut self,
        demonstrations: &[SftExample],
        batch: usize,
    ) -> TrainResult<Option<f32>> {
        if demonstrations.is_empty() {
            return Ok(None);
        }
        let pairs: Vec<(&str, &str)> =
            demonstrations.iter().map(|d| (d.prompt.as_str(), d.response.as_str())).collect();
        let sequences = pairs.iter().map(|(p, r)| Ok(self.encode(p, r)?.0)).collect::<TrainResult<Vec<_>>>()?;
        let scores = self.score_tokens(&sequences, batch)?;
        let mean = (scores.iter().map(|&s| f64::from(s)).sum::<f64>() / scores.len() as f64) as f32;
        let bias = self.head.bias().ok_or_else(|| TrainError::Data("reward head has no bias".into()))?;
        let var = self
            .head_vars
            .data()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(HEAD_BIAS)
            .cloned()
            .ok_or_else(|| TrainError::Data("reward head has no bias".into()))?;
        var.set(&(bias.detach() - f64::from(mean))?)?;
        self.meta.bias_offset += mean;
        self.meta.demonstrations = demonstrations.len();
        Ok(Some(mean))
    }
}
