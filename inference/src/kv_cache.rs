//! Per-sequence key/value caches and the attention that reads them.
//!
//! On the CPU a cache is a table of fixed-size blocks ([`crate::kv_pool`]),
//! each laid out `[layer][k | v][position][kv_head][head_dim]`, and decode
//! attention is a direct loop over the blocks. Going through candle ops
//! instead costs ~20 small tensor ops per sequence per layer; at 16
//! sequences and 30 layers that op overhead, not arithmetic, dominated a
//! decode step. Blocks let the engine bound KV memory, share a prompt's
//! blocks between its samples and reuse cached prefixes across requests. On
//! other devices the cache is candle's [`KvCache`] and attention stays on the
//! device.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use candle_core::{DType, Device, Tensor};
use candle_nn::kv_cache::KvCache;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kv_pool::{BlockShape, DEFAULT_BLOCK_TOKENS, KvBlock, KvDtype, Plane};
use crate::simd::{self, HeadRows};

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
    storage: Storage,
    pub(crate) len: usize,
}

enum Storage {
    /// On the CPU: a table of fixed-size blocks, positions `[i * block, (i + 1) * block)` in
    /// `blocks[i]`. Full blocks may be shared (forked samples, the prefix cache) and are never
    /// written again; the block being filled is this cache's alone.
    Host(HostBlocks),
    /// Elsewhere: one growing candle cache per layer.
    Device(Vec<KvCache>),
}

struct HostBlocks {
    shape: BlockShape,
    blocks: Vec<Arc<KvBlock>>,
    /// `Some`: the cache allocates its own blocks as it grows, counted here (tools and tests
    /// outside the engine). `None`: the engine's [`BlockPool`](crate::kv_pool::BlockPool)
    /// reserves them before each step ([`SequenceCache::push_block`]).
    own: Option<Arc<AtomicUsize>>,
}

impl SequenceCache {
    /// A cache that grows on its own (no pool), host blocks stored as
    /// `dtype`; `capacity` sizes a device cache's first buffer.
    pub(crate) fn new(layers: usize, capacity: usize, kv_width: usize, dtype: KvDtype, device: &Device) -> Self {
        let storage = match device {
            Device::Cpu => Storage::Host(HostBlocks {
                shape: BlockShape { layers, tokens: DEFAULT_BLOCK_TOKENS, kv_width, dtype },
                blocks: Vec::new(),
                own: Some(Arc::new(AtomicUsize::new(0))),
            }),
            _ => Storage::Device((0..layers).map(|_| KvCache::new(1, upfront(capacity).max(1))).collect()),
        };
        Self { storage, len: 0 }
    }

    /// A host cache whose blocks come from an engine's pool, starting with
    /// `prefix` (full blocks found in the prefix cache).
    pub(crate) fn pooled(shape: BlockShape, prefix: Vec<Arc<KvBlock>>) -> Self {
        let len = prefix.len() * shape.tokens;
        Self { storage: Storage::Host(HostBlocks { shape, blocks: prefix, own: None }), len }
    }

    /// Number of positions already cached (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The host cache's blocks, in position order (empty on a device).
    pub(crate) fn blocks(&self) -> &[Arc<KvBlock>] {
        match &self.storage {
            Storage::Host(host) => &host.blocks,
            Storage::Device(_) => &[],
        }
    }

    /// Blocks a pooled host cache still needs before `new_tokens` more positions fit.
    pub(crate) fn blocks_needed(&self, new_tokens: usize) -> usize {
        match &self.storage {
            Storage::Host(host) if host.own.is_none() => {
                host.shape.blocks_for(self.len + new_tokens).saturating_sub(host.blocks.len())
            }
            _ => 0,
        }
    }

    /// Appends a block from the pool (see [`SequenceCache::blocks_needed`]).
    pub(crate) fn push_block(&mut self, block: KvBlock) {
        if let Storage::Host(host) = &mut self.storage {
            host.blocks.push(Arc::new(block));
        }
    }

    /// Makes room for `new_tokens` more positions before a forward writes
    /// them: a self-allocating cache grows; a pooled one must already have
    /// been given its blocks.
    pub(crate) fn prepare(&mut self, new_tokens: usize) -> Result<()> {
        let Storage::Host(host) = &mut self.storage else { return Ok(()) };
        let needed = host.shape.blocks_for(self.len + new_tokens);
        while host.blocks.len() < needed {
            let Some(own) = &host.own else {
                return Err(Error::EngineFailure("a sequence's KV blocks were not reserved before its step".into()));
            };
            host.blocks.push(Arc::new(KvBlock::new(host.shape, own)));
        }
        Ok(())
    }

    /// A copy that shares every full block and copies the partial one, whose
    /// copy `copy` makes (`None`: no room). The `n` samples of one prompt
    /// fork the prompt's cache after a single prefill.
    pub(crate) fn fork_with(&self, mut copy: impl FnMut(&KvBlock) -> Option<KvBlock>) -> Result<Option<Self>> {
        let storage = match &self.storage {
            Storage::Host(host) => {
                let full = self.len / host.shape.tokens;
                let mut blocks: Vec<Arc<KvBlock>> = host.blocks[..full.min(host.blocks.len())].to_vec();
                if let Some(partial) = host.blocks.get(full).filter(|_| !self.len.is_multiple_of(host.shape.tokens)) {
                    let Some(block) = copy(partial) else { return Ok(None) };
                    blocks.push(Arc::new(block));
                }
                Storage::Host(HostBlocks { shape: host.shape, blocks, own: host.own.clone() })
            }
            Storage::Device(layers) => {
                let mut copies = Vec::with_capacity(layers.len());
                for cache in layers {
                    // A shallow clone would share storage that each sample overwrites.
                    let mut fresh = KvCache::new(1, upfront(self.len + 1).max(self.len).max(1));
                    if let (Some(k), Some(v)) = (cache.k()?, cache.v()?) {
                        // `append` copies into the new cache's own buffer; it needs contiguous input.
                        fresh.append(&k.contiguous()?, &v.contiguous()?)?;
                    }
                    copies.push(fresh);
                }
                Storage::Device(copies)
            }
        };
        Ok(Some(Self { storage, len: self.len }))
    }

    /// [`SequenceCache::fork_with`] for a cache that allocates its own blocks.
    pub fn fork(&self, _capacity: usize) -> Result<Self> {
        let own = match &self.storage {
            Storage::Host(host) => host.own.clone(),
            Storage::Device(_) => None,
        };
        let forked = match (&self.storage, own) {
            (Storage::Host(_), None) => None,
            (_, own) => self.fork_with(|block| own.as_ref().map(|own| block.copy(own)))?,
        };
        forked.ok_or_else(|| Error::EngineFailure("a pooled cache forks through its pool".into()))
    }
}

impl HostBlocks {
    /// Writes rows `new_k` / `new_v` (`[count][kv_width]`) of layer `layer`
    /// at positions `from..`; the blocks must exist and the written ones be
    /// this cache's alone.
    fn write(&mut self, layer: usize, from: usize, new_k: &[f32], new_v: &[f32]) -> Result<()> {
        let (bs, kw) = (self.shape.tokens, self.shape.kv_width);
        let count = new_k.len() / kw;
        let mut done = 0;
        while done < count {
            let position = from + done;
            let (index, row) = (position / bs, position % bs);
            let take = (bs - row).min(count - done);
            let block = self
                .blocks
                .get_mut(index)
                .and_then(Arc::get_mut)
                .ok_or_else(|| Error::EngineFailure("a KV block to write is missing or shared".into()))?;
            let rows = done * kw..(done + take) * kw;
            block.write(layer, false, row, &new_k[rows.clone()]);
            block.write(layer, true, row, &new_v[rows]);
            done += take;
        }
        Ok(())
    }

    /// `(first position, positions below `visible` in it, keys or values of
    /// layer `layer`)` of each block holding positions below `visible`.
    fn planes(&self, layer: usize, value: bool, visible: usize) -> impl Iterator<Item = (usize, usize, Plane<'_>)> {
        let bs = self.shape.tokens;
        self.blocks
            .iter()
            .take(visible.div_ceil(bs))
            .enumerate()
            .map(move |(b, block)| (b * bs, (visible - b * bs).min(bs), block.plane(layer, value)))
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
    let Storage::Host(host) = &mut cache.storage else {
        return Err(candle_core::Error::Msg("a device cache in a CPU batch".into()).into());
    };
    host.write(layer, offset, new_k, new_v)?;
    if len <= HOST_LOOP_MAX_NEW_TOKENS {
        attend_host(q_rows, host, layer, offset, len, dims, out_rows);
    } else {
        attend_host_long(q_rows, host, layer, offset, len, dims, out_rows);
    }
    Ok(())
}

/// Attention of many new rows (a long prompt): the keys of each kv head are
/// gathered from the blocks transposed, once, so a query's scores are a sum
/// of `head_dim` scaled key columns (vector multiply-adds, no per-position
/// reductions), and the values are gathered into one matrix; the query
/// rows are attended in parallel. Same inputs and result as [`attend_host`].
fn attend_host_long(
    q: &[f32],
    cache: &HostBlocks,
    layer: usize,
    offset: usize,
    len: usize,
    dims: AttentionDims,
    out: &mut [f32],
) {
    let d = dims.head_dim;
    let (qw, kw, g) = (dims.q_width(), dims.kv_width(), dims.groups());
    let total = offset + len;
    let scale = 1.0 / (d as f32).sqrt();
    // keys_t[kvh][c][p]: component `c` of kv head `kvh`'s key at position `p`.
    let mut keys_t = vec![0f32; dims.num_kv_heads * d * total];
    let mut scratch = Vec::new();
    for (start, count, plane) in cache.planes(layer, false, total) {
        for (p, row) in (start..).zip(plane.to_f32(count * kw, &mut scratch).chunks_exact(kw)) {
            for (hc, &x) in row.iter().enumerate() {
                keys_t[hc * total + p] = x;
            }
        }
    }
    let mut values = Vec::with_capacity(total * kw);
    for (_, count, plane) in cache.planes(layer, true, total) {
        values.extend_from_slice(plane.to_f32(count * kw, &mut scratch));
    }
    out.par_chunks_mut(qw).enumerate().for_each(|(i, out_row)| {
        let visible = offset + i + 1;
        // The `g` query heads of a kv head: their scores `[g][visible]`, then
        // their weighted sums together (each value row loaded once).
        let mut scores = vec![0f32; g * visible];
        let q_row: Vec<f32> = q[i * qw..(i + 1) * qw].iter().map(|x| x * scale).collect();
        for kvh in 0..dims.num_kv_heads {
            for (h, head_scores) in (kvh * g..).zip(scores.chunks_exact_mut(visible)) {
                simd::transposed_scores(&q_row[h * d..(h + 1) * d], &keys_t[kvh * d * total..], total, head_scores);
                simd::softmax_in_place(head_scores);
            }
            let values = HeadRows { data: &values[kvh * d..], stride: kw, count: visible };
            simd::weighted_sum_heads(&scores, visible, g, values, &mut out_row[kvh * g * d..(kvh + 1) * g * d]);
        }
    });
}

/// The direct loop over the block table: query row `i` (position
/// `offset + i`) attends to cached positions `0..=offset + i`, block by
/// block. Head `h` reads kv head `h / groups`.
fn attend_host(
    q: &[f32],
    cache: &HostBlocks,
    layer: usize,
    offset: usize,
    len: usize,
    dims: AttentionDims,
    out: &mut [f32],
) {
    let d = dims.head_dim;
    let (qw, kw, g, heads) = (dims.q_width(), dims.kv_width(), dims.groups(), dims.num_heads);
    let scale = 1.0 / (d as f32).sqrt();
    let total = offset + len;
    // Every head's scores `[heads][total]`; a kv head's `g` query heads are
    // scored together (each cached row loaded once for all of them). Blocks
    // are the outer loop so that a block stored as F16 is widened once.
    let mut scores = vec![0f32; heads * total];
    let mut part = vec![0f32; g * d];
    let mut scratch = Vec::new();
    for i in 0..len {
        let visible = offset + i + 1;
        let q_row = &q[i * qw..(i + 1) * qw];
        for (start, count, keys) in cache.planes(layer, false, visible) {
            let keys = keys.to_f32(count * kw, &mut scratch);
            for kvh in 0..dims.num_kv_heads {
                let rows = HeadRows { data: &keys[kvh * d..], stride: kw, count };
                let q_heads = &q_row[kvh * g * d..(kvh + 1) * g * d];
                simd::scaled_dots_heads(q_heads, g, rows, scale, &mut scores[kvh * g * total + start..], total);
            }
        }
        for head_scores in scores.chunks_exact_mut(total) {
            simd::softmax_in_place(&mut head_scores[..visible]);
        }
        let out_row = &mut out[i * qw..(i + 1) * qw];
        for (start, count, values) in cache.planes(layer, true, visible) {
            let values = values.to_f32(count * kw, &mut scratch);
            for kvh in 0..dims.num_kv_heads {
                let rows = HeadRows { data: &values[kvh * d..], stride: kw, count };
                let weights = &scores[kvh * g * total + start..];
                let out_heads = &mut out_row[kvh * g * d..(kvh + 1) * g * d];
                if start == 0 {
                    simd::weighted_sum_heads(weights, total, g, rows, out_heads);
                } else {
                    simd::weighted_sum_heads(weights, total, g, rows, &mut part);
                    out_heads.iter_mut().zip(&part).for_each(|(o, p)| *o += p);
                }
            }
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
        let Storage::Device(layers) = &mut cache.storage else {
            return Err(candle_core::Error::Msg("a host cache in a device batch".into()).into());
        };
        let kv_cache = &mut layers[layer];
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

    /// A self-allocating host cache of `layers` layers holding `k` / `v`
    /// (`[total][kv_width]`) in layer 0, in blocks of `block` positions.
    fn host_cache(k: &[f32], v: &[f32], dims: AttentionDims, block: usize) -> HostBlocks {
        let shape = BlockShape { layers: 1, tokens: block, kv_width: dims.kv_width(), dtype: KvDtype::F32 };
        let own = Arc::new(AtomicUsize::new(0));
        let total = k.len() / dims.kv_width();
        let blocks = (0..shape.blocks_for(total)).map(|_| Arc::new(KvBlock::new(shape, &own))).collect();
        let mut cache = HostBlocks { shape, blocks, own: Some(own) };
        cache.write(0, 0, k, v).unwrap();
        cache
    }

    /// The direct loop, the long-prompt path and the device (candle) path
    /// agree, for prefill and decode rows, whatever the block size.
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
        for block in [1, 3, 4, 16] {
            let cache = host_cache(&flat(&k), &flat(&v), dims, block);
            let mut out = vec![0f32; len * 48];
            attend_host(&flat(&q), &cache, 0, offset, len, dims, &mut out);
            let diff = out.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-5, "direct loop, blocks of {block}: max difference {diff}");
            let mut out = vec![0f32; len * 48];
            attend_host_long(&flat(&q), &cache, 0, offset, len, dims, &mut out);
            let diff = out.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-5, "long-prompt path, blocks of {block}: max difference {diff}");
        }
    }

    /// A fork shares full blocks and copies the partial one; a pooled cache
    /// refuses to grow by itself.
    #[test]
    fn forks_share_full_blocks_and_pooled_caches_wait_for_theirs() {
        let shape = BlockShape { layers: 1, tokens: 4, kv_width: 2, dtype: KvDtype::F32 };
        let own = Arc::new(AtomicUsize::new(0));
        let mut cache = SequenceCache::pooled(shape, Vec::new());
        assert!(cache.prepare(6).is_err(), "a pooled cache gets its blocks from the pool");
        assert_eq!(cache.blocks_needed(6), 2);
        cache.push_block(KvBlock::new(shape, &own));
        cache.push_block(KvBlock::new(shape, &own));
        cache.prepare(6).unwrap();
        cache.len = 6;
        let fork = cache.fork_with(|b| Some(b.copy(&own))).unwrap().unwrap();
        assert!(Arc::ptr_eq(&fork.blocks()[0], &cache.blocks()[0]), "the full block is shared");
        assert!(!Arc::ptr_eq(&fork.blocks()[1], &cache.blocks()[1]), "the partial block is copied");
        assert_eq!(own.load(std::sync::atomic::Ordering::Relaxed), 3);
        assert!(cache.fork_with(|_| None).unwrap().is_none(), "no room for the copy: no fork");
        drop((cache, fork));
        assert_eq!(own.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
}
