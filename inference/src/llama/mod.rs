//! The Llama-family decoder, one set of weights with two forward passes.
//!
//! * [`Llama::hidden_states`] / [`Llama::forward_train`] run a padded batch
//!   `[B, T]` through differentiable ops only. Several fast candle ops
//!   (`rms_norm`, `rope*`, `softmax_last_dim`) have no backward pass and detach
//!   silently, which would leave most parameters untrained; a test checks that
//!   every parameter receives a gradient.
//! * [`Llama::forward_batch`] is the serving path: a ragged batch of sequences,
//!   each bringing its own new tokens (a whole prompt during prefill, one token
//!   while decoding) and its own KV cache. All new tokens go through the
//!   projections and MLP as one `[N, hidden]` matrix, so the weights are read
//!   once per step however many sequences run; only attention is per sequence.
//!
//! Covers Llama 2/3, SmolLM2, TinyLlama, Mistral (full attention) and Qwen2
//! (bias on Q/K/V).

use candle_core::{D, DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
pub use crate::kv_cache::SequenceCache;
use crate::kv_cache::{AttentionDims, attend_batch, causal_mask};

mod host;
pub mod lora;
#[cfg(test)]
mod lora_tests;
mod serve_weights;
mod step;
pub mod train_kernels;
pub mod train_layer;
pub mod train_ops;
pub mod weight_grads;

pub use lora::{Adapter, LoraSpec, NamedAdapter, Projection};
pub use step::StepState;
pub use weight_grads::WeightGrads;

use train_ops::{AttentionShape, fused};

/// Attention softmax runs in F32 whatever the weights' dtype.
const ATTENTION_DTYPE: DType = DType::F32;

/// Cloning is cheap and shares the weights (tensors are reference-counted).
#[derive(Clone)]
pub struct Llama {
    config: LlamaConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RopeTables,
    device: Device,
    dtype: DType,
    /// The embedding and the layers below this index are frozen: plain tensors (no gradient is computed for
    /// them) and the training forward builds no graph through them.
    frozen_layers: usize,
    /// Where the fused training ops put weight gradients ([`WeightGrads`]); `None` hands them to candle.
    weight_grads: Option<WeightGrads>,
    /// The whole-layer training nodes keep only their input and recompute their activations in the backward.
    gradient_checkpointing: bool,
}

/// The new tokens one sequence brings to a serving step, with its cache.
pub struct BatchChunk<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SequenceCache,
    /// Return logits for every new token (prompt logprobs for `echo`), not just the last.
    pub all_logits: bool,
}

impl Llama {
    /// Builds the model from a var builder (safetensors for serving, a
    /// `VarMap` for training). Missing tensors and shape mismatches are
    /// reported with the tensor's name.
    pub fn new(config: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let embed_tokens = candle_nn::embedding(config.vocab_size, config.hidden_size, vb.pp("model.embed_tokens"))?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::new(config, vb.pp(format!("model.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(config.hidden_size, config.rms_norm_eps, vb.pp("model.norm"))?;
        let lm_head = if config.tie_word_embeddings && !vb.contains_tensor("lm_head.weight") {
            Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            candle_nn::linear_no_bias(config.hidden_size, config.vocab_size, vb.pp("lm_head"))?
        };
        let rope = RopeTables::new(config, dtype, &device)?;
        Ok(Self {
            config: config.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            device,
            dtype,
            frozen_layers: 0,
            weight_grads: None,
            gradient_checkpointing: false,
        })
    }

    /// Freezes the token embedding and the lowest `n` layers (clamped to the model's depth) for training: their
    /// weights become detached views of the same storage (so a variable's in-place update is still seen) and the
    /// training forward runs them without a graph. With tied embeddings the output projection is the embedding,
    /// so it freezes too. `n = 0` changes nothing.
    pub fn with_frozen_layers(mut self, n: usize) -> Self {
        let n = n.min(self.layers.len());
        if n == 0 {
            return self;
        }
        let tied = self.lm_head.weight().id() == self.embed_tokens.embeddings().id();
        let embeddings = self.embed_tokens.embeddings().detach();
        self.embed_tokens = Embedding::new(embeddings.clone(), self.config.hidden_size);
        if tied {
            self.lm_head = Linear::new(embeddings, None);
        }
        for layer in &mut self.layers[..n] {
            *layer = layer.detached();
        }
        self.frozen_layers = self.frozen_layers.max(n);
        self
    }

    /// Collects the weight gradients of the fused CPU training ops in `grads` instead of candle's `GradStore`
    /// (see [`WeightGrads`]): whoever runs `backward` must then move them over with [`WeightGrads::drain_into`].
    pub fn with_weight_grads(mut self, grads: WeightGrads) -> Self {
        self.weight_grads = Some(grads);
        self
    }

    /// Freezes every base weight (detached views, as [`Llama::with_frozen_layers`] does) and gives the `targets`
    /// projections of each layer above the frozen ones a LoRA adapter ([`lora`]); returns the adapters, whose
    /// variables are then the model's only trainable parameters. Freeze layers first: a layer frozen later
    /// drops its adapters.
    pub fn with_lora(mut self, spec: &LoraSpec) -> Result<(Self, Vec<NamedAdapter>)> {
        lora::validate(spec)?;
        let frozen = self.frozen_layers;
        let depth = self.layers.len();
        self = self.with_frozen_layers(depth);
        self.frozen_layers = frozen;
        self.lm_head = detached(&self.lm_head);
        self.norm = self.norm.detached();
        let mut adapters = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate().skip(frozen) {
            for &target in &spec.targets {
                let weight = layer.projection(target).weight();
                let shape = weight.dims2()?;
                let seed =
                    spec.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i * Projection::ALL.len() + target.index()) as u64;
                let (a, b) = Adapter::create(shape, spec, seed, &self.device, self.dtype)?;
                let named = NamedAdapter {
                    weight: format!("model.layers.{i}.{}", target.weight_name()),
                    a,
                    b,
                    scale: spec.scale(),
                };
                layer.set_adapter(target, named.adapter());
                adapters.push(named);
            }
        }
        Ok((self, adapters))
    }

    /// Gradient checkpointing: each whole-layer training node ([`train_layer`]) keeps only its input through the
    /// forward and recomputes its activations in the backward (about one more forward pass, much less memory
    /// for long sequences). A trainable layer that cannot run as one node (residual dropout, not F32 on the
    /// CPU, no [`WeightGrads`]) is then refused rather than silently kept whole.
    pub fn with_gradient_checkpointing(mut self, on: bool) -> Self {
        self.gradient_checkpointing = on;
        self
    }

    /// Layers frozen by [`Llama::with_frozen_layers`].
    pub fn frozen_layers(&self) -> usize {
        self.frozen_layers
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Longest sequence (prompt plus completion) the model can hold.
    pub fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }

    /// An empty cache with room for `capacity` positions before it regrows.
    pub fn new_cache(&self, capacity: usize) -> SequenceCache {
        self.new_cache_as(capacity, crate::kv_pool::KvDtype::F32)
    }

    /// [`Llama::new_cache`] storing keys and values as `dtype` on the CPU
    /// (a device cache stays candle's, in the model's dtype).
    pub fn new_cache_as(&self, capacity: usize, dtype: crate::kv_pool::KvDtype) -> SequenceCache {
        let capacity = capacity.clamp(1, self.max_positions());
        let kv_width = self.config.num_kv_heads() * self.config.head_dim();
        SequenceCache::new(self.layers.len(), capacity, kv_width, dtype, &self.device)
    }

    /// The shape of this model's KV blocks of `tokens` positions stored as `dtype`.
    pub fn kv_block_shape(&self, tokens: usize, dtype: crate::kv_pool::KvDtype) -> crate::kv_pool::BlockShape {
        let kv_width = self.config.num_kv_heads() * self.config.head_dim();
        crate::kv_pool::BlockShape { layers: self.layers.len(), tokens: tokens.max(1), kv_width, dtype }
    }

    /// Whether any weight is a trainable variable, which training may update in
    /// place while an engine serves the model (the trainer samples from its
    /// policy that way): keys and values computed now would then not match the
    /// weights of a later step, so no prefix cache may keep them.
    pub fn weights_may_change(&self) -> bool {
        let layer_vars = self.layers.iter().any(|l| {
            let (a, m) = (&l.attn, &l.mlp);
            [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
                .iter()
                .any(|p| p.weight().is_variable() || p.bias().is_some_and(Tensor::is_variable))
                || l.input_layernorm.weight.is_variable()
                || l.post_attention_layernorm.weight.is_variable()
                || l.adapters().any(|a| a.a.is_variable() || a.b.is_variable())
        });
        layer_vars
            || self.embed_tokens.embeddings().is_variable()
            || self.lm_head.weight().is_variable()
            || self.norm.weight.is_variable()
    }

    /// Whether serving caches live in host memory, in blocks (on the CPU);
    /// on other devices they are candle caches outside the block pool.
    pub fn kv_in_blocks(&self) -> bool {
        matches!(self.device, Device::Cpu)
    }

    /// Final-norm hidden states `[B, T, hidden]` of a right-padded batch of
    /// token ids `[B, T]`, through differentiable ops only. `residual_dropout`
    /// is applied to each residual branch (0 disables it; SFT uses 0.2).
    pub fn hidden_states(&self, input_ids: &Tensor, residual_dropout: f32) -> Result<Tensor> {
        let x = self.embed_and_run(input_ids, self.frozen_layers)?;
        self.hidden_states_above_frozen(&x, residual_dropout)
    }

    /// The residual stream `[B, T, hidden]` after the embedding and the frozen layers (no graph: nothing below
    /// it trains). It depends only on the weights those layers froze, so a trainer may compute it once per
    /// sequence and feed it to [`Llama::hidden_states_above_frozen`] on every epoch. Right padding does not
    /// change a sequence's rows (attention is causal). `None` when no layer is frozen.
    pub fn frozen_prefix(&self, input_ids: &Tensor) -> Result<Option<Tensor>> {
        if self.frozen_layers == 0 {
            return Ok(None);
        }
        Ok(Some(self.embed_and_run(input_ids, self.frozen_layers)?.detach()))
    }

    /// Final-norm hidden states from the residual stream after the frozen layers (`[B, T, hidden]`, as
    /// [`Llama::frozen_prefix`] returns it; with no frozen layer, the embedding's output), through the trainable
    /// layers.
    pub fn hidden_states_above_frozen(&self, prefix: &Tensor, residual_dropout: f32) -> Result<Tensor> {
        let (_, t, _) = prefix.dims3()?;
        let (mask, cos, sin) = self.positions(t)?;
        let sink = self.weight_grads.as_ref();
        let mut x = prefix.clone();
        for layer in &self.layers[self.frozen_layers..] {
            x = layer.forward_train(&x, &cos, &sin, &mask, residual_dropout, sink, self.gradient_checkpointing)?;
        }
        self.norm.forward_differentiable(&x)
    }

    /// The embedding of `input_ids` run through the lowest `layers` layers (without dropout: only frozen layers
    /// come here, or none).
    fn embed_and_run(&self, input_ids: &Tensor, layers: usize) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let (mask, cos, sin) = self.positions(t)?;
        let sink = self.weight_grads.as_ref();
        let table = self.embed_tokens.embeddings();
        let mut x = if fused(table) && input_ids.device().is_cpu() {
            let ids = input_ids.flatten_all()?.to_dtype(DType::U32)?;
            train_ops::embedding(table, &ids, sink)?.reshape((b, t, self.config.hidden_size))?
        } else {
            self.embed_tokens.forward(input_ids)?
        };
        for layer in &self.layers[..layers] {
            x = layer.forward_train(&x, &cos, &sin, &mask, 0.0, sink, false)?;
        }
        Ok(x)
    }

    /// The causal mask and RoPE tables of a `t`-position training forward.
    fn positions(&self, t: usize) -> Result<(Tensor, Tensor, Tensor)> {
        if t > self.max_positions() {
            return Err(Error::invalid(
                "input_ids",
                format!("sequence of {t} tokens exceeds the model's {} positions", self.max_positions()),
            ));
        }
        let mask = causal_mask(t, 0, &self.device)?;
        Ok((mask, self.rope.cos.narrow(0, 0, t)?, self.rope.sin.narrow(0, 0, t)?))
    }

    /// Projects hidden states onto the vocabulary.
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        linear_rows(&self.lm_head, hidden, self.weight_grads.as_ref())
    }

    /// Logits `[B, T, vocab]` at every position, differentiable.
    pub fn forward_train(&self, input_ids: &Tensor, residual_dropout: f32) -> Result<Tensor> {
        self.lm_head(&self.hidden_states(input_ids, residual_dropout)?)
    }

    /// One serving step over a ragged batch. Appends every chunk's keys and
    /// values to its cache and returns, per chunk, F32 logits `[rows, vocab]`
    /// where `rows` is 1 (the last new token) or every new token when
    /// `all_logits` is set.
    pub fn forward_batch(&self, chunks: &mut [BatchChunk<'_>]) -> Result<Vec<Tensor>> {
        self.forward_step(chunks, None)
    }

    /// [`Llama::forward_batch`], except that the rows of `all_logits` chunks
    /// go to `visit` a block of rows at a time and each chunk returns only its
    /// last row. `echo` with logprobs on a long prompt then holds
    /// [`STREAMED_ROWS`] rows of vocabulary logits, not `[prompt, vocab]`
    /// (1.6 GB for an 8k-token SmolLM2 prompt).
    pub fn forward_batch_streaming(&self, chunks: &mut [BatchChunk<'_>], visit: RowVisitor<'_>) -> Result<Vec<Tensor>> {
        self.forward_step(chunks, Some(visit))
    }

    fn forward_step(&self, chunks: &mut [BatchChunk<'_>], visit: Option<RowVisitor<'_>>) -> Result<Vec<Tensor>> {
        match self.begin_step(chunks)? {
            Some(state) => self.finish_step(state, chunks, visit),
            None => Ok(Vec::new()),
        }
    }
}

/// After a serving step's layers: counts every chunk's new tokens as cached
/// and returns, per chunk, the batch rows `(start, count)` whose logits it
/// asked for (its last token, or all of them with `all_logits`).
fn advance_caches(chunks: &mut [BatchChunk<'_>]) -> Vec<(usize, usize)> {
    let mut offset = 0;
    let mut rows = Vec::with_capacity(chunks.len());
    for chunk in chunks.iter_mut() {
        let len = chunk.tokens.len();
        chunk.cache.len += len;
        let take = if chunk.all_logits { len } else { 1 };
        rows.push((offset + len - take, take));
        offset += len;
    }
    rows
}

/// Receives `(chunk index, logits row)` for every new token of each
/// `all_logits` chunk, in order, in [`Llama::forward_batch_streaming`].
pub type RowVisitor<'v> = &'v mut dyn FnMut(usize, &[f32]) -> Result<()>;

/// Rows per vocabulary projection when logits are streamed: `[64, 49152]`
/// F32 is 12.6 MB, and 64 rows keep the matmul efficient.
pub const STREAMED_ROWS: usize = 64;

/// Streams the rows of every `all_logits` chunk to `visit`, projecting
/// [`STREAMED_ROWS`] batch rows at a time with `project(start, count)`
/// (`count * vocab` logits), and narrows the chunk's `rows` entry to its last
/// row, which the step still returns for sampling.
fn stream_rows(
    chunks: &[BatchChunk<'_>],
    rows: &mut [(usize, usize)],
    vocab: usize,
    visit: RowVisitor<'_>,
    mut project: impl FnMut(usize, usize) -> Result<Vec<f32>>,
) -> Result<()> {
    for (index, (chunk, row)) in chunks.iter().zip(rows.iter_mut()).enumerate() {
        if !chunk.all_logits {
            continue;
        }
        let (start, take) = *row;
        for block in (start..start + take).step_by(STREAMED_ROWS) {
            let count = STREAMED_ROWS.min(start + take - block);
            let logits = project(block, count)?;
            for logits_row in logits.chunks_exact(vocab) {
                visit(index, logits_row)?;
            }
        }
        *row = (start + take - 1, 1);
    }
    Ok(())
}

/// The picked rows' logits `[Σ count, vocab]`, one tensor per chunk.
fn split_logits(logits: &Tensor, rows: &[(usize, usize)]) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(rows.len());
    let mut at = 0;
    for &(_, take) in rows {
        out.push(logits.narrow(0, at, take)?);
        at += take;
    }
    Ok(out)
}

#[derive(Clone)]
struct DecoderLayer {
    attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            attn: Attention::new(cfg, vb.pp("self_attn"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            input_layernorm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: RmsNorm::new(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
        })
    }

    /// The projection `p` (its base weight).
    fn projection(&self, p: Projection) -> &Linear {
        let (a, m) = (&self.attn, &self.mlp);
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj][p.index()]
    }

    /// Gives projection `p` an adapter; the stacked serving matrices go (the adapters apply per projection).
    fn set_adapter(&mut self, p: Projection, adapter: Adapter) {
        self.attn.qkv = None;
        self.mlp.gate_up = None;
        match p.index() {
            i @ 0..4 => self.attn.lora[i] = Some(adapter),
            i => self.mlp.lora[i - 4] = Some(adapter),
        }
    }

    /// The layer's adapters, by [`Projection::index`].
    fn lora(&self) -> [Option<Adapter>; 7] {
        let ([q, k, v, o], [gate, up, down]) = (self.attn.lora.clone(), self.mlp.lora.clone());
        [q, k, v, o, gate, up, down]
    }

    fn adapters(&self) -> impl Iterator<Item = &Adapter> {
        self.attn.lora.iter().chain(&self.mlp.lora).flatten()
    }

    /// The weights for [`train_layer::decoder_layer`], when it applies: F32 on the CPU, no projection biases,
    /// and either every projection trainable (full fine-tune) or none and some adapters (LoRA).
    fn fused_weights(&self, x: &Tensor) -> Option<train_layer::LayerWeights> {
        let (a, m) = (&self.attn, &self.mlp);
        let projections = [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj];
        let plain = fused(x) && projections.iter().all(|l| l.bias().is_none() && fused(l.weight()));
        let full = projections.iter().all(|l| l.weight().is_variable());
        let lora = projections.iter().all(|l| !l.weight().is_variable())
            && self.adapters().next().is_some()
            && self.adapters().all(|a| fused(&a.a) && fused(&a.b));
        (plain && (full || lora)).then(|| train_layer::LayerWeights {
            input_norm: self.input_layernorm.weight.clone(),
            post_attention_norm: self.post_attention_layernorm.weight.clone(),
            q: a.q_proj.weight().clone(),
            k: a.k_proj.weight().clone(),
            v: a.v_proj.weight().clone(),
            o: a.o_proj.weight().clone(),
            gate: m.gate_proj.weight().clone(),
            up: m.up_proj.weight().clone(),
            down: m.down_proj.weight().clone(),
            lora: self.lora(),
            eps: self.input_layernorm.eps as f32,
        })
    }

    /// The same layer on detached views of its weights, without adapters (frozen: no gradient reaches them).
    fn detached(&self) -> Self {
        Self {
            attn: Attention {
                q_proj: detached(&self.attn.q_proj),
                k_proj: detached(&self.attn.k_proj),
                v_proj: detached(&self.attn.v_proj),
                o_proj: detached(&self.attn.o_proj),
                lora: Default::default(),
                ..self.attn.clone()
            },
            mlp: Mlp {
                gate_proj: detached(&self.mlp.gate_proj),
                up_proj: detached(&self.mlp.up_proj),
                down_proj: detached(&self.mlp.down_proj),
                gate_up: self.mlp.gate_up.clone(),
                lora: Default::default(),
            },
            input_layernorm: self.input_layernorm.detached(),
            post_attention_layernorm: self.post_attention_layernorm.detached(),
        }
    }

    /// `checkpoint`: run as a whole-layer node that recomputes its activations in the backward, or fail.
    #[allow(clippy::too_many_arguments)]
    fn forward_train(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        dropout: f32,
        sink: Option<&WeightGrads>,
        checkpoint: bool,
    ) -> Result<Tensor> {
        if let Some(grads) = sink
            && dropout == 0.0
            && let Some(weights) = self.fused_weights(x)
        {
            let a = &self.attn;
            let shape = AttentionShape { num_heads: a.num_heads, num_kv_heads: a.num_kv_heads, head_dim: a.head_dim };
            return Ok(train_layer::decoder_layer(x, &weights, cos, sin, shape, grads, checkpoint)?);
        }
        if checkpoint {
            return Err(Error::invalid(
                "gradient_checkpointing",
                "gradient checkpointing needs the whole-layer training path (F32 on the CPU, no residual dropout)",
            ));
        }
        let h = self.attn.forward_train(&self.input_layernorm.forward_differentiable(x)?, cos, sin, mask, sink)?;
        let x = (x + residual_dropout(&h, dropout)?)?;
        let h = self.mlp.forward(&self.post_attention_layernorm.forward_differentiable(&x)?, sink)?;
        Ok((&x + residual_dropout(&h, dropout)?)?)
    }

    fn forward_batch(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        caches: &mut [(&mut SequenceCache, usize)],
        layer: usize,
    ) -> Result<Tensor> {
        let h = self.attn.forward_batch(&self.input_layernorm.forward_fast(x)?, cos, sin, caches, layer)?;
        let x = (x + h)?;
        let h = self.mlp.forward_serving(&self.post_attention_layernorm.forward_fast(&x)?)?;
        Ok((x + h)?)
    }
}

fn detached(linear: &Linear) -> Linear {
    Linear::new(linear.weight().detach(), linear.bias().map(Tensor::detach))
}

/// The serving path's projection: the CPU few-row kernel where it applies,
/// candle's matmul elsewhere. `x` is `[N, in]`.
fn serve(linear: &Linear, x: &Tensor) -> Result<Tensor> {
    match crate::cpu_linear::linear(x, linear.weight(), linear.bias())? {
        Some(y) => Ok(y),
        None => Ok(linear.forward(x)?),
    }
}

/// Several projections of the same input stacked into one weight matrix,
/// so serving streams them in one pass (one parallel matmul instead of
/// three for Q/K/V, two for gate/up). The separate `Linear`s become views
/// into the stacked matrix, so the weights are held once.
#[derive(Clone)]
struct Fused {
    linear: Linear,
    widths: Vec<usize>,
}

impl Fused {
    /// Stacks `parts`, or leaves them alone when any weight is a trainable
    /// variable (gradients must reach the variables themselves).
    fn new<const P: usize>(parts: [Linear; P]) -> Result<(Option<Self>, [Linear; P])> {
        if parts.iter().any(|l| l.weight().is_variable() || l.bias().is_some_and(|b| b.is_variable())) {
            return Ok((None, parts));
        }
        let weights: Vec<&Tensor> = parts.iter().map(|l| l.weight()).collect();
        let weight = Tensor::cat(&weights, 0)?;
        let bias = match parts.iter().map(|l| l.bias()).collect::<Option<Vec<_>>>() {
            Some(biases) => Some(Tensor::cat(&biases, 0)?),
            None => None,
        };
        let widths: Vec<usize> = parts.iter().map(|l| l.weight().dim(0)).collect::<candle_core::Result<_>>()?;
        let mut views = Vec::with_capacity(P);
        let mut start = 0;
        for &width in &widths {
            let b = bias.as_ref().map(|b| b.narrow(0, start, width)).transpose()?;
            views.push(Linear::new(weight.narrow(0, start, width)?, b));
            start += width;
        }
        let views: [Linear; P] = views.try_into().map_err(|_| Error::EngineFailure("fused projection count".into()))?;
        Ok((Some(Self { linear: Linear::new(weight, bias), widths }), views))
    }

    /// Each projection of `x` `[N, in]`, contiguous.
    fn forward<const P: usize>(&self, x: &Tensor) -> Result<[Tensor; P]> {
        let y = serve(&self.linear, x)?;
        let mut out = Vec::with_capacity(P);
        let mut start = 0;
        for &width in &self.widths {
            out.push(y.narrow(1, start, width)?.contiguous()?);
            start += width;
        }
        out.try_into().map_err(|_| Error::EngineFailure("fused projection count".into()))
    }
}

/// `linear` applied to `x` `[..., in]` as one `[rows, in]` matrix, differentiable: [`train_ops::linear`] for F32
/// on the CPU. candle's `Linear` broadcasts the weight over a batch dimension instead, which makes its backward
/// pass compute one weight gradient per batch row and sum them.
pub fn linear_rows(linear: &Linear, x: &Tensor, sink: Option<&WeightGrads>) -> Result<Tensor> {
    let dims = x.dims();
    let inner = dims.last().copied().unwrap_or(0);
    let rows = x.elem_count() / inner.max(1);
    let flat = x.reshape((rows, inner))?;
    let y = if fused(x) && fused(linear.weight()) {
        train_ops::linear(&flat, linear.weight(), sink)?
    } else {
        flat.matmul(&linear.weight().t()?)?
    };
    let y = match linear.bias() {
        Some(bias) => y.broadcast_add(bias)?,
        None => y,
    };
    let mut out_dims = dims[..dims.len().saturating_sub(1)].to_vec();
    out_dims.push(y.dim(1)?);
    Ok(y.reshape(out_dims)?)
}

/// `y` (a projection of `x`) plus its LoRA adapter's update, differentiable.
fn with_adapter(y: Tensor, adapter: Option<&Adapter>, x: &Tensor, sink: Option<&WeightGrads>) -> Result<Tensor> {
    match adapter {
        Some(adapter) => Ok((y + adapter.delta_train(x, sink)?)?),
        None => Ok(y),
    }
}

/// [`with_adapter`] on the serving path (`x` `[N, in]`).
fn serve_adapter(y: Tensor, adapter: Option<&Adapter>, x: &Tensor) -> Result<Tensor> {
    match adapter {
        Some(adapter) => Ok((y + adapter.delta_serving(x)?)?),
        None => Ok(y),
    }
}

fn residual_dropout(x: &Tensor, p: f32) -> Result<Tensor> {
    if p > 0.0 { Ok(candle_nn::ops::dropout(x, p)?) } else { Ok(x.clone()) }
}

#[derive(Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Q, K and V as one matrix for serving (absent when training).
    qkv: Option<Fused>,
    /// LoRA adapters of q, k, v, o.
    lora: [Option<Adapter>; 4],
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (h, kv, d) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let proj = |out: usize, name: &str| -> Result<Linear> {
            Ok(if cfg.has_qkv_bias() {
                candle_nn::linear(cfg.hidden_size, out, vb.pp(name))?
            } else {
                candle_nn::linear_no_bias(cfg.hidden_size, out, vb.pp(name))?
            })
        };
        let (q_proj, k_proj, v_proj) = (proj(h * d, "q_proj")?, proj(kv * d, "k_proj")?, proj(kv * d, "v_proj")?);
        let (qkv, [q_proj, k_proj, v_proj]) = Fused::new([q_proj, k_proj, v_proj])?;
        Ok(Self {
            q_proj,
            k_proj,
            v_proj,
            qkv,
            lora: Default::default(),
            o_proj: candle_nn::linear_no_bias(h * d, cfg.hidden_size, vb.pp("o_proj"))?,
            num_heads: h,
            num_kv_heads: kv,
            head_dim: d,
        })
    }

    fn groups(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    fn forward_train(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        sink: Option<&WeightGrads>,
    ) -> Result<Tensor> {
        if fused(x) {
            return self.forward_train_fused(x, cos, sin, sink);
        }
        let (b, t, _) = x.dims3()?;
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |i: usize, proj: &Linear, n: usize| -> Result<Tensor> {
            let y = with_adapter(proj.forward(x)?, self.lora[i].as_ref(), x, sink)?;
            Ok(y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?)
        };
        let q = candle_nn::rotary_emb::rope_slow(&heads(0, &self.q_proj, h)?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_slow(&heads(1, &self.k_proj, kv)?, cos, sin)?;
        let v = heads(2, &self.v_proj, kv)?;
        let (k, v) = (self.repeat_kv(&k)?, self.repeat_kv(&v)?);
        let dtype = q.dtype();
        let scores = (q.to_dtype(ATTENTION_DTYPE)?.matmul(&k.to_dtype(ATTENTION_DTYPE)?.t()?)?
            * (1.0 / (d as f64).sqrt()))?
        .broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(dtype)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h * d))?;
        with_adapter(self.o_proj.forward(&out)?, self.lora[3].as_ref(), &out, sink)
    }

    /// [`Attention::forward_train`] through the fused CPU kernels: projections on `[B·T, hidden]` rows, RoPE and
    /// attention on the projections' own `[B, T, heads, D]` layout (no transposes, no repeated K/V heads).
    fn forward_train_fused(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        sink: Option<&WeightGrads>,
    ) -> Result<Tensor> {
        let (b, t, hidden) = x.dims3()?;
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let rows = x.reshape((b * t, hidden))?;
        let project =
            |i: usize, proj: &Linear| with_adapter(linear_rows(proj, &rows, sink)?, self.lora[i].as_ref(), &rows, sink);
        let q = train_ops::rope(&project(0, &self.q_proj)?.reshape((b, t, h, d))?, cos, sin)?;
        let k = train_ops::rope(&project(1, &self.k_proj)?.reshape((b, t, kv, d))?, cos, sin)?;
        let v = project(2, &self.v_proj)?.reshape((b, t, kv, d))?;
        let shape = AttentionShape { num_heads: h, num_kv_heads: kv, head_dim: d };
        let out = train_ops::causal_attention(&q, &k, &v, shape)?.reshape((b * t, h * d))?;
        let y = with_adapter(linear_rows(&self.o_proj, &out, sink)?, self.lora[3].as_ref(), &out, sink)?;
        Ok(y.reshape((b, t, hidden))?)
    }

    /// `[B, kv, T, D]` to `[B, heads, T, D]`: head `i` reads kv head `i / groups`.
    fn repeat_kv(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.groups();
        if g == 1 {
            return Ok(x.clone());
        }
        let (b, kv, t, d) = x.dims4()?;
        Ok(x.unsqueeze(2)?.broadcast_as((b, kv, g, t, d))?.reshape((b, kv * g, t, d))?)
    }

    fn forward_batch(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        caches: &mut [(&mut SequenceCache, usize)],
        layer: usize,
    ) -> Result<Tensor> {
        let n = x.dim(0)?;
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let [q, k, v] = match &self.qkv {
            Some(qkv) => qkv.forward(x)?,
            None => [serve(&self.q_proj, x)?, serve(&self.k_proj, x)?, serve(&self.v_proj, x)?],
        };
        let [q, k, v] = [(0, q), (1, k), (2, v)].map(|(i, y)| serve_adapter(y, self.lora[i].as_ref(), x));
        let (q, k, v) = (q?, k?, v?);
        let q = q.reshape((1, n, h, d))?;
        let k = k.reshape((1, n, kv, d))?;
        let v = v.reshape((n, kv, d))?;
        let q = candle_nn::rotary_emb::rope_thd(&q, cos, sin)?.squeeze(0)?;
        let k = candle_nn::rotary_emb::rope_thd(&k, cos, sin)?.squeeze(0)?;
        let dims = AttentionDims { num_heads: h, num_kv_heads: kv, head_dim: d };
        let out = attend_batch(&q, &k, &v, caches, layer, dims)?;
        serve_adapter(serve(&self.o_proj, &out)?, self.lora[3].as_ref(), &out)
    }
}

#[derive(Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    /// Gate and up as one matrix for serving (absent when training).
    gate_up: Option<Fused>,
    /// LoRA adapters of gate, up, down.
    lora: [Option<Adapter>; 3],
}

impl Mlp {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (hidden, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let gate_proj = candle_nn::linear_no_bias(hidden, inter, vb.pp("gate_proj"))?;
        let up_proj = candle_nn::linear_no_bias(hidden, inter, vb.pp("up_proj"))?;
        let (gate_up, [gate_proj, up_proj]) = Fused::new([gate_proj, up_proj])?;
        Ok(Self {
            gate_proj,
            up_proj,
            down_proj: candle_nn::linear_no_bias(inter, hidden, vb.pp("down_proj"))?,
            gate_up,
            lora: Default::default(),
        })
    }

    /// The training MLP (differentiable); `[B·T, hidden]` rows and the fused SwiGLU on the CPU.
    fn forward(&self, x: &Tensor, sink: Option<&WeightGrads>) -> Result<Tensor> {
        let [gate_lora, up_lora, down_lora] = self.lora.each_ref().map(Option::as_ref);
        if fused(x) {
            let gate = with_adapter(linear_rows(&self.gate_proj, x, sink)?, gate_lora, x, sink)?;
            let up = with_adapter(linear_rows(&self.up_proj, x, sink)?, up_lora, x, sink)?;
            let activation = train_ops::swiglu(&gate, &up)?;
            return with_adapter(linear_rows(&self.down_proj, &activation, sink)?, down_lora, &activation, sink);
        }
        let gate = candle_nn::ops::silu(&with_adapter(self.gate_proj.forward(x)?, gate_lora, x, sink)?)?;
        let activation = (gate * with_adapter(self.up_proj.forward(x)?, up_lora, x, sink)?)?;
        with_adapter(self.down_proj.forward(&activation)?, down_lora, &activation, sink)
    }

    fn forward_serving(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up] = match &self.gate_up {
            Some(gate_up) => gate_up.forward(x)?,
            None => [serve(&self.gate_proj, x)?, serve(&self.up_proj, x)?],
        };
        let gate = serve_adapter(gate, self.lora[0].as_ref(), x)?;
        let up = serve_adapter(up, self.lora[1].as_ref(), x)?;
        let activation = (candle_nn::ops::silu(&gate)? * up)?;
        serve_adapter(serve(&self.down_proj, &activation)?, self.lora[2].as_ref(), &activation)
    }
}

#[derive(Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, eps })
    }

    fn detached(&self) -> Self {
        Self { weight: self.weight.detach(), eps: self.eps }
    }

    /// candle's fused kernel: fast, but it has no backward pass.
    fn forward_fast(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)?)
    }

    /// Differentiable: the fused kernel with its own backward on the CPU, primitive ops elsewhere.
    fn forward_differentiable(&self, x: &Tensor) -> Result<Tensor> {
        if fused(x) {
            return Ok(train_ops::rms_norm(x, &self.weight, self.eps as f32)?);
        }
        Ok(candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps as f32)?)
    }
}

/// Precomputed `cos` / `sin` of every position, `[max_positions, head_dim / 2]`.
#[derive(Clone)]
struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl RopeTables {
    fn new(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        let dim = cfg.head_dim();
        let mut inv_freq: Vec<f64> =
            (0..dim / 2).map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / dim as f64)).collect();
        if let Some(s) = &cfg.rope_scaling {
            // Llama 3.1: keep high frequencies, divide low ones by `factor`,
            // interpolate smoothly in between.
            let low_wavelen = s.original_max_position_embeddings as f64 / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings as f64 / s.high_freq_factor;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= s.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (s.original_max_position_embeddings as f64 / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        let positions = cfg.max_position_embeddings;
        let mut cos = Vec::with_capacity(positions * dim / 2);
        let mut sin = Vec::with_capacity(positions * dim / 2);
        for p in 0..positions {
            for f in &inv_freq {
                let angle = p as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let shape = (positions, dim / 2);
        Ok(Self {
            cos: Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        })
    }
}

/// Logits of the last position of each row, a convenience for tests and tools.
pub fn last_position(logits: &Tensor) -> Result<Tensor> {
    let t = logits.dim(1)?;
    Ok(logits.i((.., t - 1))?)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use candle_nn::VarMap;

    pub(super) fn tiny_config() -> LlamaConfig {
        serde_json::from_str(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":32,"intermediate_size":64,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":50,
            "max_position_embeddings":64,"rms_norm_eps":1e-5,"tie_word_embeddings":false}"#,
        )
        .unwrap()
    }

    /// A randomly initialised model whose parameters are all trainable vars.
    pub(super) fn trainable(cfg: &LlamaConfig) -> (VarMap, Llama) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = Llama::new(cfg, vb).unwrap();
        // Norm weights start at 1 under VarMap's default init hints; perturb
        // everything so a parameter that is skipped changes the output.
        for var in varmap.all_vars() {
            let noise = var.randn_like(0.0, 0.05).unwrap();
            var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
        }
        (varmap, model)
    }

    #[test]
    fn every_parameter_receives_a_gradient() {
        let mut cfg = tiny_config();
        cfg.attention_bias = true;
        let (varmap, model) = trainable(&cfg);
        let ids = Tensor::new(&[[3u32, 7, 1, 9, 4, 2], [5, 5, 8, 1, 0, 6]], &Device::Cpu).unwrap();
        let logits = model.forward_train(&ids, 0.0).unwrap();
        let targets = Tensor::new(&[7u32, 1, 9, 4, 2, 5, 8, 1, 0, 6, 3, 3], &Device::Cpu).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits.reshape((12, 50)).unwrap(), &targets).unwrap();
        let grads = loss.backward().unwrap();
        let data = varmap.data().lock().unwrap();
        assert!(data.len() > 20, "expected every layer's parameters, got {}", data.len());
        for (name, var) in data.iter() {
            let grad = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} has no gradient"));
            let norm = grad.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0, "{name} has a zero gradient");
        }
    }

    /// With a [`WeightGrads`] the training forward runs each layer as one node ([`train_layer`]) and the weight
    /// gradients bypass candle; logits and every gradient must equal the op-by-op path's.
    #[test]
    fn whole_layer_training_path_matches_op_by_op() {
        let cfg = tiny_config();
        let (varmap, model) = trainable(&cfg);
        let grads = WeightGrads::new();
        let layered = model.clone().with_weight_grads(grads.clone());
        let ids = Tensor::new(&[[3u32, 7, 1, 9, 4, 2], [5, 5, 8, 1, 0, 6]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[7u32, 1, 9, 4, 2, 5, 8, 1, 0, 6, 3, 3], &Device::Cpu).unwrap();
        let loss = |m: &Llama| {
            let logits = m.forward_train(&ids, 0.0).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits.reshape((12, 50)).unwrap(), &targets).unwrap();
            (logits, loss)
        };
        let (want_logits, want_loss) = loss(&model);
        let want = want_loss.backward().unwrap();
        let (got_logits, got_loss) = loss(&layered);
        let mut got = got_loss.backward().unwrap();
        let data = varmap.data().lock().unwrap();
        let q = data["model.layers.0.self_attn.q_proj.weight"].as_tensor();
        assert!(got.get(q).is_none(), "the layer's weight gradients bypass candle");
        let weights: Vec<&Tensor> = data.values().map(|v| v.as_tensor()).collect();
        grads.drain_into(&mut got, &weights).unwrap();
        let diff = (want_logits - got_logits).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
        for (name, var) in data.iter() {
            let (a, b) = (want.get(var.as_tensor()).unwrap(), got.get(var.as_tensor()).unwrap());
            let scale = a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-3);
            let diff =
                (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-3 * scale.max(1.0), "{name}: gradient differs by {diff} (scale {scale})");
        }
    }

    /// Above frozen layers (whose output is not tracked) the whole-layer nodes must still be recorded and
    /// every trainable weight must get a gradient.
    #[test]
    fn layers_above_frozen_ones_get_gradients() {
        let mut cfg = tiny_config();
        cfg.num_hidden_layers = 3;
        let (varmap, model) = trainable(&cfg);
        let grads = WeightGrads::new();
        let model = model.with_frozen_layers(1).with_weight_grads(grads.clone());
        let ids = Tensor::new(&[[3u32, 7, 1, 9]], &Device::Cpu).unwrap();
        let mut store = model.hidden_states(&ids, 0.0).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let data = varmap.data().lock().unwrap();
        let weights: Vec<&Tensor> = data.values().map(|v| v.as_tensor()).collect();
        grads.drain_into(&mut store, &weights).unwrap();
        for (name, var) in data.iter() {
            let frozen = name.starts_with("model.layers.0.") || name.starts_with("model.embed_tokens");
            let grad = store.get(var.as_tensor());
            if frozen || name.starts_with("lm_head") {
                assert!(grad.is_none(), "{name} is frozen or unused but got a gradient");
            } else {
                let norm = grad.unwrap_or_else(|| panic!("{name} has no gradient")).sqr().unwrap().sum_all().unwrap();
                assert!(norm.to_scalar::<f32>().unwrap() > 0.0, "{name} has a zero gradient");
            }
        }
    }

    #[test]
    fn cached_batched_forward_matches_training_forward() {
        let cfg = tiny_config();
        let (_varmap, model) = trainable(&cfg);
        let seqs: [&[u32]; 3] = [&[1, 2, 3, 4, 5, 6, 7], &[9, 8, 7], &[4, 4, 4, 4, 10]];
        // Reference: each sequence alone through the differentiable path.
        let reference: Vec<Tensor> = seqs
            .iter()
            .map(|s| {
                let ids = Tensor::new(*s, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
                model.forward_train(&ids, 0.0).unwrap().squeeze(0).unwrap()
            })
            .collect();
        // Serving: prefill the first 2 tokens of each as one ragged batch,
        // then feed the rest one token per step, all sequences together.
        let mut caches: Vec<SequenceCache> = seqs.iter().map(|_| model.new_cache(4)).collect();
        let mut got: Vec<Vec<Tensor>> = vec![Vec::new(); 3];
        let mut pos = 0;
        while pos < 7 {
            let step = if pos == 0 { 2 } else { 1 };
            let mut chunks: Vec<BatchChunk> = Vec::new();
            let mut owners = Vec::new();
            for (i, (s, cache)) in seqs.iter().zip(caches.iter_mut()).enumerate() {
                if pos < s.len() {
                    let end = (pos + step).min(s.len());
                    chunks.push(BatchChunk { tokens: &s[pos..end], cache, all_logits: true });
                    owners.push(i);
                }
            }
            let out = model.forward_batch(&mut chunks).unwrap();
            for (i, logits) in owners.into_iter().zip(out) {
                got[i].push(logits);
            }
            pos += step;
        }
        for (i, r) in reference.iter().enumerate() {
            let g = Tensor::cat(&got[i], 0).unwrap();
            let diff = (g - r).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "sequence {i}: max logit difference {diff}");
        }
    }

    /// Prompts longer than the direct-loop limit take the matmul attention path.
    #[test]
    fn long_prefill_matches_training_forward() {
        let cfg = tiny_config();
        let (_varmap, model) = trainable(&cfg);
        let seq: Vec<u32> = (0..48).map(|i| (i * 7 % 50) as u32).collect();
        let ids = Tensor::new(seq.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let reference = model.forward_train(&ids, 0.0).unwrap().squeeze(0).unwrap();
        let mut cache = model.new_cache(48);
        let mut got =
            model.forward_batch(&mut [BatchChunk { tokens: &seq[..40], cache: &mut cache, all_logits: true }]).unwrap();
        got.extend(
            model.forward_batch(&mut [BatchChunk { tokens: &seq[40..], cache: &mut cache, all_logits: true }]).unwrap(),
        );
        let got = Tensor::cat(&got, 0).unwrap();
        let diff = (got - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "max logit difference {diff}");
    }

    /// Streaming all-token logits (echo's prompt logprobs) visits the same
    /// rows `forward_batch` returns, across several projection blocks and
    /// beside a decoding sequence, and returns only the last row.
    #[test]
    fn streamed_rows_match_returned_logits() {
        let mut cfg = tiny_config();
        cfg.max_position_embeddings = 2 * STREAMED_ROWS + 40;
        let (_varmap, model) = trainable(&cfg);
        let prompt: Vec<u32> = (0..2 * STREAMED_ROWS + 30).map(|i| (i * 11 % 50) as u32).collect();
        let mut cache = model.new_cache(prompt.len());
        let full = model
            .forward_batch(&mut [BatchChunk { tokens: &prompt, cache: &mut cache, all_logits: true }])
            .unwrap()
            .remove(0)
            .to_vec2::<f32>()
            .unwrap();
        let (mut streamed_cache, mut other) = (model.new_cache(prompt.len()), model.new_cache(8));
        let mut visited: Vec<(usize, Vec<f32>)> = Vec::new();
        let out = model
            .forward_batch_streaming(
                &mut [
                    BatchChunk { tokens: &[4, 2], cache: &mut other, all_logits: false },
                    BatchChunk { tokens: &prompt, cache: &mut streamed_cache, all_logits: true },
                ],
                &mut |chunk, row| {
                    visited.push((chunk, row.to_vec()));
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(visited.len(), prompt.len());
        assert!(visited.iter().all(|(chunk, _)| *chunk == 1));
        for (i, (_, row)) in visited.iter().enumerate() {
            let diff = row.iter().zip(&full[i]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-5, "row {i}: max difference {diff}");
        }
        assert_eq!(out[1].dims(), &[1, 50]);
        let last = out[1].to_vec2::<f32>().unwrap().remove(0);
        assert!(last.iter().zip(full.last().unwrap()).all(|(a, b)| (a - b).abs() < 1e-5));
        assert_eq!(streamed_cache.len, prompt.len());
    }

    /// Loaded (non-trainable) weights take the fused Q/K/V and gate/up
    /// path; it must agree with the separate projections.
    #[test]
    fn fused_serving_projections_match_separate_ones() {
        let mut cfg = tiny_config();
        cfg.attention_bias = true;
        let (varmap, trainable_model) = trainable(&cfg);
        let frozen: std::collections::HashMap<String, Tensor> =
            varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect();
        let frozen_model = Llama::new(&cfg, VarBuilder::from_tensors(frozen, DType::F32, &Device::Cpu)).unwrap();
        assert!(frozen_model.layers[0].attn.qkv.is_some() && frozen_model.layers[0].mlp.gate_up.is_some());
        assert!(trainable_model.layers[0].attn.qkv.is_none());
        let tokens = [3u32, 9, 4, 1, 7];
        let run = |model: &Llama| {
            let mut cache = model.new_cache(8);
            model
                .forward_batch(&mut [BatchChunk { tokens: &tokens, cache: &mut cache, all_logits: true }])
                .unwrap()
                .remove(0)
        };
        let diff = (run(&frozen_model) - run(&trainable_model)).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }

    #[test]
    fn forked_cache_is_independent() {
        let cfg = tiny_config();
        let (_varmap, model) = trainable(&cfg);
        let mut base = model.new_cache(8);
        model.forward_batch(&mut [BatchChunk { tokens: &[1, 2, 3], cache: &mut base, all_logits: false }]).unwrap();
        let mut a = base.fork(8).unwrap();
        let mut b = base.fork(8).unwrap();
        let la = model.forward_batch(&mut [BatchChunk { tokens: &[5], cache: &mut a, all_logits: false }]).unwrap();
        model.forward_batch(&mut [BatchChunk { tokens: &[9], cache: &mut b, all_logits: false }]).unwrap();
        let mut c = base.fork(8).unwrap();
        let lc = model.forward_batch(&mut [BatchChunk { tokens: &[5], cache: &mut c, all_logits: false }]).unwrap();
        let diff = (&la[0] - &lc[0]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "fork shared storage: {diff}");
        assert_eq!(a.len(), 4);
    }

    #[test]
    fn bad_tokens_and_overlong_sequences_are_errors() {
        let cfg = tiny_config();
        let (_varmap, model) = trainable(&cfg);
        let mut cache = model.new_cache(8);
        let err = model.forward_batch(&mut [BatchChunk { tokens: &[50], cache: &mut cache, all_logits: false }]);
        assert!(matches!(err, Err(Error::InvalidRequest { .. })));
        let long = vec![1u32; 65];
        let err = model.forward_batch(&mut [BatchChunk { tokens: &long, cache: &mut cache, all_logits: false }]);
        assert!(matches!(err, Err(Error::InvalidRequest { .. })));
        assert_eq!(cache.len(), 0, "a refused step must not advance the cache");
    }
}
