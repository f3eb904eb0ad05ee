//! The serving forward for F32 weights in CPU memory, on plain slices.
//!
//! It computes what the candle path of [`Llama::forward_batch`] computes,
//! but keeps the hidden states in one `Vec<f32>` and works on the weights in
//! place, instead of building a tensor for every norm, RoPE, split, SiLU and
//! residual add. At 16 decoding sequences those ~15 small ops per layer,
//! with their allocations and conversions, cost about a fifth of a step.
//!
//! The projections are [`crate::cpu_linear`]'s; attention is
//! [`crate::kv_cache`]'s. Each row's arithmetic does not depend on the other
//! rows in the batch, so results stay independent of batching. LoRA adapters
//! ([`super::lora`]) add their update to their projection's output.

use candle_core::{DType, Device, Tensor};
use candle_nn::Linear;
use rayon::prelude::*;

use super::{Adapter, Attention, BatchChunk, Llama, Mlp, RmsNorm, RowVisitor, split_logits, stream_rows};
use crate::cpu_linear::{linear_rows, with_host_f32};
use crate::error::{Error, Result};
use crate::kv_cache::{AttentionDims, SequenceCache, attend_rows};
use crate::simd;

/// Element-wise work smaller than this stays on the calling thread.
const PARALLEL_MIN_VALUES: usize = 1 << 16;

/// Each batch row's RoPE cos and sin values (`[n, head_dim / 2]` each).
pub(super) type Rope = (Vec<f32>, Vec<f32>);

impl Llama {
    /// Whether the host path (this module) can run this model.
    pub(super) fn runs_on_host(&self) -> bool {
        matches!(self.device, Device::Cpu) && self.dtype == DType::F32
    }

    /// The embedding rows of `ids` `[n, hidden]` and the RoPE cos / sin rows
    /// of their `positions`, gathered once for all layers.
    pub(super) fn host_embed(&self, ids: &[u32], positions: &[usize]) -> Result<(Vec<f32>, Rope)> {
        let hidden = self.config.hidden_size;
        let x = with_host_f32(self.embed_tokens.embeddings(), |table| {
            let mut x = Vec::with_capacity(ids.len() * hidden);
            for &id in ids {
                let row = id as usize * hidden;
                x.extend_from_slice(&table[row..row + hidden]);
            }
            x
        })?;
        let half = self.config.head_dim() / 2;
        let gather = |table: &Tensor| {
            with_host_f32(table, |t| positions.iter().flat_map(|&p| t[p * half..(p + 1) * half].to_vec()).collect())
        };
        Ok((x, (gather(&self.rope.cos)?, gather(&self.rope.sin)?)))
    }

    /// Decoder layer `i` over the `n` rows of the residual stream `x`, in place.
    pub(super) fn host_layer(
        &self,
        i: usize,
        x: &mut [f32],
        n: usize,
        rope: &Rope,
        caches: &mut [(&mut SequenceCache, usize)],
    ) -> Result<()> {
        let hidden = self.config.hidden_size;
        let layer = &self.layers[i];
        let h = layer.input_layernorm.host(x, hidden)?;
        let attn = layer.attn.host(&h, n, rope, caches, i)?;
        add_into(x, &attn);
        let h = layer.post_attention_layernorm.host(x, hidden)?;
        let mlp = layer.mlp.host(&h, n)?;
        add_into(x, &mlp);
        Ok(())
    }

    /// Per chunk, the logits of the batch `rows` it asked for, from the
    /// residual stream `x` after the last layer (`visit` gets the rows of
    /// `all_logits` chunks, see [`stream_rows`]).
    pub(super) fn host_logits(
        &self,
        x: &[f32],
        chunks: &[BatchChunk<'_>],
        rows: &mut [(usize, usize)],
        visit: Option<RowVisitor<'_>>,
    ) -> Result<Vec<Tensor>> {
        let hidden = self.config.hidden_size;
        let vocab = self.lm_head.weight().dim(0)?;
        if let Some(visit) = visit {
            stream_rows(chunks, rows, vocab, visit, |start, count| {
                project(&self.norm.host(&x[start * hidden..(start + count) * hidden], hidden)?, count, &self.lm_head)
            })?;
        }
        let mut picked = Vec::new();
        for &(start, take) in rows.iter() {
            picked.extend_from_slice(&x[start * hidden..(start + take) * hidden]);
        }
        let count = picked.len() / hidden;
        let logits = project(&self.norm.host(&picked, hidden)?, count, &self.lm_head)?;
        split_logits(&Tensor::from_vec(logits, (count, vocab), &Device::Cpu)?, rows)
    }
}

impl Attention {
    /// Self-attention of `n` rows `x` `[n, hidden]`, whose RoPE rows are
    /// `cos` / `sin` `[n, head_dim / 2]`, appending keys and values to the
    /// caches; returns the output projection `[n, hidden]`.
    fn host(
        &self,
        x: &[f32],
        n: usize,
        (cos, sin): &Rope,
        caches: &mut [(&mut SequenceCache, usize)],
        layer: usize,
    ) -> Result<Vec<f32>> {
        let dims =
            AttentionDims { num_heads: self.num_heads, num_kv_heads: self.num_kv_heads, head_dim: self.head_dim };
        let (qw, kw, d) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.head_dim);
        let (mut q, mut k, mut v) = match &self.qkv {
            Some(fused) => {
                // Rows of [q | k | v]; split them into three row-major blocks.
                let qkv = project(x, n, &fused.linear)?;
                let width = qw + 2 * kw;
                let (mut q, mut k, mut v) =
                    (Vec::with_capacity(n * qw), Vec::with_capacity(n * kw), Vec::with_capacity(n * kw));
                for row in qkv.chunks_exact(width) {
                    q.extend_from_slice(&row[..qw]);
                    k.extend_from_slice(&row[qw..qw + kw]);
                    v.extend_from_slice(&row[qw + kw..]);
                }
                (q, k, v)
            }
            None => (project(x, n, &self.q_proj)?, project(x, n, &self.k_proj)?, project(x, n, &self.v_proj)?),
        };
        let [lq, lk, lv, lo] = self.lora.each_ref().map(Option::as_ref);
        add_adapter(&mut q, x, n, lq)?;
        add_adapter(&mut k, x, n, lk)?;
        add_adapter(&mut v, x, n, lv)?;
        for row in 0..n {
            let (cos, sin) = (&cos[row * d / 2..(row + 1) * d / 2], &sin[row * d / 2..(row + 1) * d / 2]);
            for head in q[row * qw..(row + 1) * qw].chunks_exact_mut(d) {
                rotate(head, cos, sin);
            }
            for head in k[row * kw..(row + 1) * kw].chunks_exact_mut(d) {
                rotate(head, cos, sin);
            }
        }
        let mut out = vec![0f32; n * qw];
        attend_rows(&q, &k, &v, caches, layer, dims, &mut out)?;
        let mut y = project(&out, n, &self.o_proj)?;
        add_adapter(&mut y, &out, n, lo)?;
        Ok(y)
    }
}

impl Mlp {
    /// `down(silu(gate(x)) * up(x))` of `n` rows.
    fn host(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        // Rows of the gate projection (the down projection's columns may be a packed carrier's).
        let inter = self.gate_proj.weight().dim(0)?;
        let act = match &self.gate_up {
            Some(fused) => {
                // Rows of [gate | up]: write silu(gate) * up over the gate half, then drop the up half.
                let mut gate_up = project(x, n, &fused.linear)?;
                for_each_row(&mut gate_up, 2 * inter, |row| {
                    let (gate, up) = row.split_at_mut(inter);
                    simd::silu_mul(gate, up);
                });
                let mut act = Vec::with_capacity(n * inter);
                for row in gate_up.chunks_exact(2 * inter) {
                    act.extend_from_slice(&row[..inter]);
                }
                act
            }
            None => {
                let (mut gate, mut up) = (project(x, n, &self.gate_proj)?, project(x, n, &self.up_proj)?);
                add_adapter(&mut gate, x, n, self.lora[0].as_ref())?;
                add_adapter(&mut up, x, n, self.lora[1].as_ref())?;
                simd::silu_mul(&mut gate, &up);
                gate
            }
        };
        let mut y = project(&act, n, &self.down_proj)?;
        add_adapter(&mut y, &act, n, self.lora[2].as_ref())?;
        Ok(y)
    }
}

impl RmsNorm {
    /// `x / rms(x) * weight` per row of `width` values (as candle's `rms_norm`).
    fn host(&self, x: &[f32], width: usize) -> Result<Vec<f32>> {
        let eps = self.eps as f32;
        with_host_f32(&self.weight, |weight| {
            let mut out = x.to_vec();
            for_each_row(&mut out, width, |row| {
                let mean_square = simd::dot(row, row) / width as f32;
                let inv_rms = 1.0 / (mean_square + eps).sqrt();
                for (v, w) in row.iter_mut().zip(weight) {
                    *v = *v * inv_rms * w;
                }
            });
            out
        })
    }
}

/// `x` `[n, in]` through a projection, on the CPU kernel.
fn project(x: &[f32], n: usize, linear: &Linear) -> Result<Vec<f32>> {
    linear_rows(x, n, linear.weight(), linear.bias())?
        .ok_or_else(|| Error::EngineFailure("a projection's weights are not contiguous F32 in memory".into()))
}

/// Adds `adapter`'s `(α/r)·(x·Aᵀ)·Bᵀ` to `y`, the projection of `x` `[n, in]` it adapts.
fn add_adapter(y: &mut [f32], x: &[f32], n: usize, adapter: Option<&Adapter>) -> Result<()> {
    let Some(adapter) = adapter else { return Ok(()) };
    let missing = || Error::EngineFailure("a LoRA adapter is not contiguous F32 in memory".into());
    let hidden = linear_rows(x, n, &adapter.a, None)?.ok_or_else(missing)?;
    let delta = linear_rows(&hidden, n, &adapter.b, None)?.ok_or_else(missing)?;
    simd::axpy(y, adapter.scale as f32, &delta);
    Ok(())
}

/// RoPE on one head (the rotate-half layout): pairs `(i, i + d/2)`.
fn rotate(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    let (a, b) = head.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x1 * sin[i] + x2 * cos[i];
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Runs `f` on every row of `width` values, in parallel when there is enough work.
fn for_each_row(values: &mut [f32], width: usize, f: impl Fn(&mut [f32]) + Sync + Send) {
    if values.len() < PARALLEL_MIN_VALUES {
        values.chunks_exact_mut(width).for_each(f);
    } else {
        values.par_chunks_exact_mut(width).for_each(f);
    }
}
