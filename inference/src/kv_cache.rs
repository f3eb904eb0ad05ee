//! Per-sequence key/value caches and the attention that reads them.
//!
//! On the CPU the cache is plain `Vec<f32>` per layer, laid out
//! `[position][kv_head][head_dim]` so appending a token is one
//! `extend_from_slice`, and decode attention is a direct loop over it. Going
//! through candle ops instead costs ~20 small tensor ops per sequence per
//! layer; at 16 sequences and 30 layers that op overhead, not arithmetic,
//! dominated a decode step. On other devices the cache is candle's
//! [`KvCache`] and attention stays on the device.

use candle_core::{DType, Device, Tensor};
use candle_nn::kv_cache::KvCache;

use rayon::prelude::*;

use crate::error::Result;
use crate::simd;

/// Prompts up to this many new tokens are attended position by position;
/// longer ones against keys transposed once per layer, rows in parallel (see
/// [`attend_host_long`]). The split point was tuned for an earlier
/// candle-matmul long path and has not been re-measured since.
const HOST_LOOP_MAX_NEW_TOKENS: usize = 32;

/// Positions reserved up front per host cache; beyond this the cache grows
/// as tokens arrive, so a request asking for a huge `max_tokens` (or many
/// samples of one) does not reserve memory it may never use.
const MAX_UPFRONT_POSITIONS: usize = 1024;

/// Positions to reserve for a cache meant to hold `capacity`.
fn upfront(capacity: usize) -> usize {
    capacity.min(MAX_UPFRONT_POSITIONS)
}

/// Shapes of one attention layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionDims {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionDims {
    fn groups(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    fn q_width(&self) -> usize {
        self.num_heads * self.head_dim
    }
}

/// Keys and values of one sequence, all layers.
pub struct SequenceCache {
    pub(crate) layers: Vec<LayerCache>,
    pub(crate) len: usize,
}

pub(crate) enum LayerCache {
    Host { k: Vec<f32>, v: Vec<f32> },
    Device(KvCache),
}

impl SequenceCache {
    pub(crate) fn new(layers: usize, capacity: usize, kv_width: usize, device: &Device) -> Self {
        let reserve = upfront(capacity) * kv_width;
        let layers = (0..layers)
            .map(|_| match device {
                Device::Cpu => LayerCache::Host { k: Vec::with_capacity(reserve), v: Vec::with_capacity(reserve) },
                _ => LayerCache::Device(KvCache::new(1, upfront(capacity).max(1))),
            })
            .collect();
        Self { layers, len: 0 }
    }

    /// Number of positions already cached (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A deep copy with room for `capacity` positions. The `n` samples of one
    /// prompt fork the prompt's cache after a single prefill; a shallow clone
    /// of a device cache would share storage that each sample overwrites.
    pub fn fork(&self, capacity: usize) -> Result<Self> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            layers.push(match layer {
                LayerCache::Host { k, v } => {
                    let reserve = |src: &Vec<f32>| {
                        let per_pos = src.len().checked_div(self.len).unwrap_or(0);
                        let mut copy = Vec::with_capacity(upfront(capacity).max(self.len) * per_pos);
                        copy.extend_from_slice(src);
                        copy
                    };
                    LayerCache::Host { k: reserve(k), v: reserve(v) }
                }
                LayerCache::Device(cache) => {
                    let mut copy = KvCache::new(1, upfront(capacity).max(self.len).max(1));
                    if let (Some(k), Some(v)) = (cache.k()?, cache.v()?) {
                        // `append` copies into the new cache's own buffer; it needs contiguous input.
                        copy.append(&k.contiguous()?, &v.contiguous()?)?;
                    }
                    LayerCache::Device(copy)
                }
            });
        }
        Ok(Self { layers, len: self.len })
    }
}

/// Attention of one layer over a ragged batch. `q` is `[N, heads, D]`, `k`
/// and `v` `[N, kv_heads, D]` (after RoPE), where chunk `c` owns
/// `lens[c]` consecutive rows. Appends each chunk's keys and values to its
/// cache and returns `[N, heads * D]`.
pub(crate) fn attend_batch(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    caches: &mut [(&mut SequenceCache, usize)],
    layer: usize,
    dims: AttentionDims,
) -> Result<Tensor> {
    let n = q.dim(0)?;
    let dtype = q.dtype();
    if !matches!(q.device(), Device::Cpu) {
        return attend_on_device(q, k, v, caches, layer, dims);
    }
    let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
    let mut out = vec![0f32; n * dims.q_width()];
    attend_rows(&flat(q)?, &flat(k)?, &flat(v)?, caches, layer, dims, &mut out)?;
    Ok(Tensor::from_vec(out, (n, dims.q_width()), &Device::Cpu)?.to_dtype(dtype)?)
}

/// [`attend_batch`] on host caches, over slices: `q` `[N, heads * D]`, `k`
/// and `v` `[N, kv_heads * D]`, writing `out` `[N, heads * D]`. Sequences
/// are attended in parallel: each owns its cache and its rows.
pub(crate) fn attend_rows(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    caches: &mut [(&mut SequenceCache, usize)],
    layer: usize,
    dims: AttentionDims,
    out: &mut [f32],
) -> Result<()> {
    let (qw, kw) = (dims.q_width(), dims.kv_width());
    let mut work = Vec::with_capacity(caches.len());
    let (mut q_rest, mut out_rest, mut start) = (q, out, 0);
    for (cache, len) in caches.iter_mut() {
        let (q_rows, q_tail) = q_rest.split_at(*len * qw);
        let (out_rows, out_tail) = std::mem::take(&mut out_rest).split_at_mut(*len * qw);
        let new_k = &k[start * kw..(start + *len) * kw];
        let new_v = &v[start * kw..(start + *len) * kw];
        work.push((&mut **cache, q_rows, out_rows, new_k, new_v));
        (q_rest, out_rest, start) = (q_tail, out_tail, start + *len);
    }
    if work.len() == 1 {
        // One sequence: no parallel task to hand out.
        let (cache, q_rows, out_rows, new_k, new_v) = work.pop().expect("one item");
        return attend_one(cache, layer, q_rows, new_k, new_v, dims, out_rows);
    }
    work.into_par_iter().try_for_each(|(cache, q_rows, out_rows, new_k, new_v)| {
        attend_one(cache, layer, q_rows, new_k, new_v, dims, out_rows)
    })
}

/// Appends one sequence's new keys and values to its cache and attends its
/// new query rows over the whole cache.
fn attend_one(
    cache: &mut SequenceCache,
    layer: usize,
    q_rows: &[f32],
    new_k: &[f32],
    new_v: &[f32],
    dims: AttentionDims,
    out_rows: &mut [f32],
) -> Result<()> {
    let len = q_rows.len() / dims.q_width();
    let offset = cache.len;
    let LayerCache::Host { k: kc, v: vc } = &mut cache.layers[layer] else {
        return Err(candle_core::Error::Msg("a device cache in a CPU batch".into()).into());
    };
    kc.extend_from_slice(new_k);
    vc.extend_from_slice(new_v);
    if len <= HOST_LOOP_MAX_NEW_TOKENS {
        attend_host(q_rows, kc, vc, offset, len, dims, out_rows);
    } else {
        attend_host_long(q_rows, kc, vc, offset, len, dims, out_rows);
    }
    Ok(())
}

/// Attention of many new rows (a long prompt): the keys of each kv head are
/// transposed once, so a query's scores are a sum of `head_dim` scaled key
/// columns (vector multiply-adds, no per-position reductions); the query
/// rows are attended in parallel. Same inputs and result as [`attend_host`].
fn attend_host_long(q: &[f32], k: &[f32], v: &[f32], offset: usize, len: usize, dims: AttentionDims, out: &mut [f32]) {
    let d = dims.head_dim;
    let (qw, kw, g) = (dims.q_width(), dims.kv_width(), dims.groups());
    let total = offset + len;
    let scale = 1.0 / (d as f32).sqrt();
    // keys_t[kvh][c][p]: component `c` of kv head `kvh`'s key at position `p`.
    let mut keys_t = vec![0f32; dims.num_kv_heads * d * total];
    for (p, row) in k.chunks_exact(kw).enumerate() {
        for (hc, &x) in row.iter().enumerate() {
            keys_t[hc * total + p] = x;
        }
    }
    out.par_chunks_mut(qw).enumerate().for_each(|(i, out_row)| {
        let visible = offset + i + 1;
        let mut scores = vec![0f32; visible];
        let q_row: Vec<f32> = q[i * qw..(i + 1) * qw].iter().map(|x| x * scale).collect();
        for h in 0..dims.num_heads {
            let kvh = h / g;
            simd::transposed_scores(&q_row[h * d..(h + 1) * d], &keys_t[kvh * d * total..], total, &mut scores);
            simd::softmax_in_place(&mut scores);
            simd::weighted_sum(&scores, &v[kvh * d..], kw, &mut out_row[h * d..(h + 1) * d]);
        }
    });
}

/// The direct loop: query row `i` (position `offset + i`) attends to cached
/// positions `0..=offset + i`. Head `h` reads kv head `h / groups`.
fn attend_host(q: &[f32], k: &[f32], v: &[f32], offset: usize, len: usize, dims: AttentionDims, out: &mut [f32]) {
    let d = dims.head_dim;
    let (qw, kw, g) = (dims.q_width(), dims.kv_width(), dims.groups());
    let scale = 1.0 / (d as f32).sqrt();
    let mut scores = vec![0f32; offset + len];
    for i in 0..len {
        let visible = offset + i + 1;
        for h in 0..dims.num_heads {
            let kvh = h / g;
            let qh = &q[i * qw + h * d..i * qw + (h + 1) * d];
            let scores = &mut scores[..visible];
            simd::scaled_dots(qh, &k[kvh * d..], kw, scale, scores);
            simd::softmax_in_place(scores);
            simd::weighted_sum(scores, &v[kvh * d..], kw, &mut out[i * qw + h * d..i * qw + (h + 1) * d]);
        }
    }
}

/// Matmul attention: `q` `[len, heads, D]`, `k_all` / `v_all`
/// `[kv_heads, total, D]`; returns `[len, heads * D]` in F32.
fn attend_matmul(q: &Tensor, k_all: &Tensor, v_all: &Tensor, offset: usize, dims: AttentionDims) -> Result<Tensor> {
    let len = q.dim(0)?;
    let (h, kv, d, g) = (dims.num_heads, dims.num_kv_heads, dims.head_dim, dims.groups());
    // Query rows grouped by the kv head they read: [kv, groups * len, D].
    let q = q.transpose(0, 1)?.contiguous()?.reshape((kv, g * len, d))?.to_dtype(DType::F32)?;
    let k_all = k_all.to_dtype(DType::F32)?.contiguous()?;
    let v_all = v_all.to_dtype(DType::F32)?.contiguous()?;
    let mut scores = (q.matmul(&k_all.t()?)? * (1.0 / (d as f64).sqrt()))?;
    if len > 1 {
        let mask = causal_mask(len, offset, q.device())?;
        let mask = mask.unsqueeze(0)?.repeat((g, 1))?.reshape((g * len, offset + len))?;
        scores = scores.broadcast_add(&mask)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = probs.matmul(&v_all)?; // [kv, g*len, D]
    Ok(out.reshape((h, len, d))?.transpose(0, 1)?.reshape((len, h * d))?)
}

fn attend_on_device(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    caches: &mut [(&mut SequenceCache, usize)],
    layer: usize,
    dims: AttentionDims,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let mut outputs = Vec::with_capacity(caches.len());
    let mut start = 0;
    for (cache, len) in caches.iter_mut() {
        let len = *len;
        let offset = cache.len;
        let LayerCache::Device(kv_cache) = &mut cache.layers[layer] else {
            return Err(candle_core::Error::Msg("a host cache in a device batch".into()).into());
        };
        let k_new = k.narrow(0, start, len)?.transpose(0, 1)?.contiguous()?;
        let v_new = v.narrow(0, start, len)?.transpose(0, 1)?.contiguous()?;
        let (k_all, v_all) = kv_cache.append(&k_new, &v_new)?;
        outputs.push(attend_matmul(&q.narrow(0, start, len)?, &k_all, &v_all, offset, dims)?.to_dtype(dtype)?);
        start += len;
    }
    Ok(Tensor::cat(&outputs, 0)?)
}

/// `[len, offset + len]` additive mask: query `i` (at position `offset + i`)
/// sees keys `0..=offset + i`.
pub(crate) fn causal_mask(len: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let total = offset + len;
    let mask: Vec<f32> =
        (0..len).flat_map(|i| (0..total).map(move |j| if j <= offset + i { 0.0 } else { f32::NEG_INFINITY })).collect();
    Ok(Tensor::from_vec(mask, (len, total), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct loop, the long-prompt path and the device (candle) path
    /// agree, for prefill and decode rows.
    #[test]
    fn host_loop_matches_matmul_attention() {
        let dims = AttentionDims { num_heads: 6, num_kv_heads: 2, head_dim: 8 };
        let (offset, len) = (5, 4);
        let total = offset + len;
        let q = Tensor::randn(0f32, 1.0, (len, 6, 8), &Device::Cpu).unwrap();
        let k = Tensor::randn(0f32, 1.0, (total, 2, 8), &Device::Cpu).unwrap();
        let v = Tensor::randn(0f32, 1.0, (total, 2, 8), &Device::Cpu).unwrap();
        let expected = attend_matmul(&q, &k.transpose(0, 1).unwrap(), &v.transpose(0, 1).unwrap(), offset, dims)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut out = vec![0f32; len * 48];
        attend_host(&flat(&q), &flat(&k), &flat(&v), offset, len, dims, &mut out);
        let diff = out.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-5, "direct loop: max difference {diff}");
        let mut out = vec![0f32; len * 48];
        attend_host_long(&flat(&q), &flat(&k), &flat(&v), offset, len, dims, &mut out);
        let diff = out.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-5, "long-prompt path: max difference {diff}");
    }
}
