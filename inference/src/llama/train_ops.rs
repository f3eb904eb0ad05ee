//! Fused CPU kernels for the training forward, each with a hand-written backward pass.
//!
//! candle's differentiable compositions of RMS norm, RoPE, causal attention and SwiGLU allocate a full-size
//! temporary per primitive op, run those ops on one core, and (for attention) materialise the repeated K/V heads
//! and the masked `[B, H, T, T]` scores in both passes. On the CPU that made the backward pass of a SmolLM2 step
//! more than twice PyTorch's. These ops do the same arithmetic in one pass over plain slices, in parallel over
//! rows or heads, and give candle's autograd the exact gradient (the tests compare both against the
//! composition they replace).
//!
//! They take F32 tensors on the CPU; [`fused`] says when they apply, and the model falls back to the
//! compositions elsewhere (CUDA, BF16 training).
//!
//! Layouts follow the projections' output so nothing is transposed: queries `[B, T, H, D]`, keys and values
//! `[B, T, KV, D]`, RoPE tables `[T, D/2]` (rotate-half convention).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, bail};
use rayon::prelude::*;

use super::train_kernels as kernels;
pub use super::train_kernels::AttentionShape;
use super::weight_grads::WeightGrads;
use crate::gemm::{MatRef, sgemm};
use crate::simd;

/// Whether the fused kernels can run on `x` (F32 on the CPU).
pub fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// A contiguous F32 view of a CPU storage.
fn slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: expects a contiguous input"),
    }
}

fn u32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [u32]> {
    let data = storage.as_slice::<u32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: expects contiguous token ids"),
    }
}

/// Runs `f` on a contiguous F32 host copy-free view of `t` (made contiguous first when it is not).
fn with_host<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { bail!("{op}: expects a CPU tensor") };
    f(slice(cpu, layout, op)?)
}

fn tensor(data: Vec<f32>, shape: &Shape, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(data, shape.clone(), like.device())
}

// ---------------------------------------------------------------------------------------------------------------
// Linear: y = x·Wᵀ on rows.

struct Linear {
    sink: Option<WeightGrads>,
}

/// `x·Wᵀ` for `x` `[rows, in]` and `w` `[out, in]`, differentiable wrt both: the forward and both backward
/// products run through [`sgemm`] on the operands as they lie (no transposed copies), and a gradient nobody
/// needs (a frozen weight, a detached input) is not computed. With a `sink`, the weight's gradient is added
/// there instead of being handed to candle.
pub fn linear(x: &Tensor, w: &Tensor, sink: Option<&WeightGrads>) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear { sink: sink.cloned() })
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "train-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let ([rows, inner], [out, w_inner]) = (l1.dims(), l2.dims()) else {
            bail!("{}: expects x [rows, in] and w [out, in], got {:?} and {:?}", self.name(), l1.dims(), l2.dims());
        };
        if inner != w_inner {
            bail!("{}: x has {inner} columns, w {w_inner}", self.name());
        }
        let mut y = vec![0f32; rows * out];
        sgemm(MatRef::row_major(x, *rows, *inner), MatRef::row_major(w, *out, *inner).t(), &mut y, false);
        Ok((CpuStorage::F32(y), Shape::from((*rows, *out))))
    }

    /// `dx = dy·W`, `dW = dyᵀ·x`.
    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ((rows, inner), out) = (x.dims2()?, w.dim(0)?);
        with_host(dy, self.name(), |dys| {
            let dys = MatRef::row_major(dys, rows, out);
            let dx = match x.track_op() {
                true => with_host(w, self.name(), |ws| {
                    let mut dx = vec![0f32; rows * inner];
                    sgemm(dys, MatRef::row_major(ws, out, inner), &mut dx, false);
                    Ok(Some(tensor(dx, x.shape(), x)?))
                })?,
                false => None,
            };
            if !w.track_op() {
                return Ok((dx, None));
            }
            let dw = with_host(x, self.name(), |xs| {
                let xs = MatRef::row_major(xs, rows, inner);
                match (&self.sink, w.is_variable()) {
                    (Some(sink), true) => {
                        sink.contribute(w, out * inner, |buf, fresh| sgemm(dys.t(), xs, buf, !fresh));
                        Ok(None)
                    }
                    _ => {
                        let mut dw = vec![0f32; out * inner];
                        sgemm(dys.t(), xs, &mut dw, false);
                        Ok(Some(tensor(dw, w.shape(), w)?))
                    }
                }
            })?;
            Ok((dx, dw))
        })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Embedding: rows of a table by id.

struct Embedding {
    sink: Option<WeightGrads>,
}

/// Rows `ids` (U32 `[n]`, every id `< rows`, the caller checks) of `table` `[rows, hidden]` -> `[n, hidden]`,
/// differentiable wrt the table: the backward pass adds each output row's gradient into its id's row, into the
/// `sink` when there is one (no dense zero table per step), else into a dense gradient for candle.
pub fn embedding(table: &Tensor, ids: &Tensor, sink: Option<&WeightGrads>) -> Result<Tensor> {
    table.contiguous()?.apply_op2(&ids.contiguous()?, Embedding { sink: sink.cloned() })
}

fn scatter_rows(grad: &mut [f32], ids: &[u32], dy: &[f32], hidden: usize) {
    for (row, &id) in dy.chunks_exact(hidden).zip(ids) {
        let at = id as usize * hidden;
        simd::axpy(&mut grad[at..at + hidden], 1.0, row);
    }
}

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "train-embedding"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (table, ids) = (slice(s1, l1, self.name())?, u32_slice(s2, l2, self.name())?);
        let [rows, hidden] = l1.dims() else { bail!("{}: expects a [rows, hidden] table", self.name()) };
        let (rows, hidden) = (*rows, *hidden);
        let mut out = Vec::with_capacity(ids.len() * hidden);
        for &id in ids {
            let id = id as usize;
            if id >= rows {
                bail!("{}: id {id} outside a table of {rows} rows", self.name());
            }
            out.extend_from_slice(&table[id * hidden..(id + 1) * hidden]);
        }
        Ok((CpuStorage::F32(out), Shape::from((ids.len(), hidden))))
    }

    fn bwd(&self, table: &Tensor, ids: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !table.track_op() {
            return Ok((None, None));
        }
        let (rows, hidden) = table.dims2()?;
        let ids = ids.to_vec1::<u32>()?;
        with_host(dy, self.name(), |dy| match (&self.sink, table.is_variable()) {
            (Some(sink), true) => {
                sink.contribute(table, rows * hidden, |buf, _| scatter_rows(buf, &ids, dy, hidden));
                Ok((None, None))
            }
            _ => {
                let mut grad = vec![0f32; rows * hidden];
                scatter_rows(&mut grad, &ids, dy, hidden);
                Ok((Some(tensor(grad, table.shape(), table)?), None))
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// RMS norm: y = x · w / sqrt(mean(x²) + ε), over the last dimension.

struct RmsNorm {
    eps: f32,
}

/// `x · w / sqrt(mean(x²) + eps)` over the last dimension, differentiable wrt `x` and `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "train-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        if l1.dims().last() != Some(&w.len()) {
            bail!("{}: weight of {} does not match the input's last dimension", self.name(), w.len());
        }
        Ok((CpuStorage::F32(kernels::rms_norm(x, w, self.eps)), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = with_host(x, self.name(), |x| {
            with_host(w, self.name(), |w| {
                with_host(dy, self.name(), |dy| {
                    let mut dx = vec![0f32; x.len()];
                    let dw = kernels::rms_norm_backward(x, w, dy, self.eps, &mut dx);
                    Ok((dx, dw))
                })
            })
        })?;
        Ok((Some(tensor(dx, x.shape(), x)?), Some(tensor(dw, w.shape(), w)?)))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// RoPE, rotate-half convention: (x1, x2) -> (x1·cos − x2·sin, x2·cos + x1·sin) per position.

struct Rope {
    /// Rotate by −θ (the backward pass of a rotation is its inverse).
    inverse: bool,
}

/// Rotary position embedding of `x` `[B, T, heads, D]` with `cos`/`sin` `[T, D/2]`, differentiable wrt `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { inverse: false })
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "train-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, cos, sin) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?, slice(s3, l3, self.name())?);
        let [_, t, heads, d] = l1.dims() else { bail!("{}: expects [B, T, heads, D]", self.name()) };
        let (t, heads, d) = (*t, *heads, *d);
        if d % 2 != 0 || cos.len() < t * d / 2 || sin.len() < t * d / 2 {
            bail!("{}: tables of {} values do not cover {t} positions of head size {d}", self.name(), cos.len());
        }
        let mut y = x.to_vec();
        kernels::rope_in_place(&mut y, cos, sin, t, heads, d, self.inverse);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = dy.contiguous()?.apply_op3_no_bwd(cos, sin, &Rope { inverse: !self.inverse })?;
        Ok((Some(dx), None, None))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// SwiGLU: silu(gate) · up.

struct SwiGlu;

/// `silu(gate) · up`, differentiable wrt both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "train-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        if l1.shape() != l2.shape() {
            bail!("{}: gate {:?} and up {:?} differ", self.name(), l1.shape(), l2.shape());
        }
        Ok((CpuStorage::F32(kernels::swiglu(g, u)), l1.shape().clone()))
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_host(gate, self.name(), |g| {
            with_host(up, self.name(), |u| with_host(dy, self.name(), |dy| Ok(kernels::swiglu_backward(g, u, dy))))
        })?;
        Ok((Some(tensor(dg, gate.shape(), gate)?), Some(tensor(du, up.shape(), up)?)))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Log-softmax at the target token: log p(token) per row.

struct TokenLogprobs;

/// `log_softmax(logits)[row, tokens[row]]` for `logits` `[rows, V]` and U32 `tokens` `[rows]` (every id `< V`,
/// the caller checks), differentiable wrt `logits`: `d logits = g · (onehot − softmax)`. One pass per row in each
/// direction, in parallel over rows; no `[rows, V]` temporary besides the gradient itself.
pub fn token_logprobs(logits: &Tensor, tokens: &Tensor) -> Result<Tensor> {
    logits.contiguous()?.apply_op2(&tokens.contiguous()?, TokenLogprobs)
}

impl CustomOp2 for TokenLogprobs {
    fn name(&self) -> &'static str {
        "train-token-logprobs"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (logits, tokens) = (slice(s1, l1, self.name())?, u32_slice(s2, l2, self.name())?);
        let [rows, vocab] = l1.dims() else { bail!("{}: expects logits [rows, vocab]", self.name()) };
        let (rows, vocab) = (*rows, *vocab);
        if tokens.len() != rows || tokens.iter().any(|&t| t as usize >= vocab) {
            bail!("{}: {} token ids for {rows} rows of {vocab}, or an id out of range", self.name(), tokens.len());
        }
        let mut out = vec![0f32; rows];
        out.par_iter_mut().enumerate().for_each_init(
            || vec![0f32; vocab],
            |scratch, (r, o)| {
                let row = &logits[r * vocab..(r + 1) * vocab];
                scratch.copy_from_slice(row);
                let (max, sum) = simd::exp_shifted_in_place(scratch);
                *o = row[tokens[r] as usize] - max - sum.ln();
            },
        );
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        tokens: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, vocab) = logits.dims2()?;
        let tokens = tokens.to_vec1::<u32>()?;
        let grad = with_host(logits, self.name(), |logits| {
            with_host(dy, self.name(), |dy| {
                let mut grad = logits.to_vec();
                grad.par_chunks_mut(vocab).enumerate().for_each(|(r, g)| {
                    let (_, sum) = simd::exp_shifted_in_place(g);
                    let scale = -dy[r] / sum;
                    g.iter_mut().for_each(|v| *v *= scale);
                    g[tokens[r] as usize] += dy[r];
                });
                Ok(grad)
            })
        })?;
        debug_assert_eq!(grad.len(), rows * vocab);
        Ok((Some(tensor(grad, logits.shape(), logits)?), None))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Causal self-attention with grouped K/V heads.

struct CausalAttention {
    shape: AttentionShape,
}

/// `softmax(q·kᵀ/√D + causal mask)·v` per head: `q` `[B, T, H, D]`, `k`, `v` `[B, T, KV, D]`, output
/// `[B, T, H, D]`; query head `h` reads K/V head `h / (H / KV)`. Differentiable wrt `q`, `k` and `v`; the
/// probabilities are recomputed in the backward pass rather than kept (`T²` per head per layer).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, shape: AttentionShape) -> Result<Tensor> {
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, CausalAttention { shape })
}

impl CausalAttention {
    /// `T`, after checking `q` and `k`/`v` against the shape.
    fn seq_len(&self, q: &[usize], kv: &[usize]) -> Result<usize> {
        let AttentionShape { num_heads: h, num_kv_heads: g_kv, head_dim: d } = self.shape;
        match (q, kv) {
            ([b, t, qh, qd], [kb, kt, kh, kd])
                if (*qh, *qd, *kh, *kd) == (h, d, g_kv, d) && (kb, kt) == (b, t) && g_kv > 0 && h % g_kv == 0 =>
            {
                Ok(*t)
            }
            _ => bail!("train-attention: q {q:?} / kv {kv:?} do not match {:?}", self.shape),
        }
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "train-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?, slice(s3, l3, self.name())?);
        let t = self.seq_len(l1.dims(), l2.dims())?;
        if l2.shape() != l3.shape() {
            bail!("{}: k {:?} and v {:?} differ", self.name(), l2.shape(), l3.shape());
        }
        Ok((CpuStorage::F32(kernels::attention(q, k, v, t, self.shape)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        d_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let t = self.seq_len(q.dims(), k.dims())?;
        let (dq, dk, dv) = with_host(q, self.name(), |qs| {
            with_host(k, self.name(), |ks| {
                with_host(v, self.name(), |vs| {
                    with_host(d_out, self.name(), |dos| Ok(kernels::attention_backward(qs, ks, vs, dos, t, self.shape)))
                })
            })
        })?;
        Ok((Some(tensor(dq, q.shape(), q)?), Some(tensor(dk, k.shape(), k)?), Some(tensor(dv, v.shape(), v)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Var {
        // A fixed pseudo-random fill (no global RNG state in tests).
        let n: usize = shape.iter().product();
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let data: Vec<f32> = (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect();
        Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Forward values and the gradients of `Σ out·probe` wrt every input agree between two implementations.
    fn assert_same(inputs: &[&Var], fused: impl Fn() -> Tensor, reference: impl Fn() -> Tensor, tol: f32, what: &str) {
        let (a, b) = (fused(), reference());
        assert!(max_diff(&a, &b) < tol, "{what} forward: {}", max_diff(&a, &b));
        let probe = randn(a.dims(), 99).as_tensor().clone();
        let ga = (a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, var) in inputs.iter().enumerate() {
            let (x, y) = (ga.get(var.as_tensor()).unwrap(), gb.get(var.as_tensor()).unwrap());
            assert!(max_diff(x, y) < tol, "{what} gradient of input {i}: {}", max_diff(x, y));
        }
    }

    #[test]
    fn linear_matches_candle_matmul() {
        let (x, w) = (randn(&[37, 29], 11), randn(&[45, 29], 12));
        assert_same(
            &[&x, &w],
            || linear(x.as_tensor(), w.as_tensor(), None).unwrap(),
            || x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap(),
            1e-4,
            "linear",
        );
    }

    #[test]
    fn token_logprobs_match_log_softmax() {
        let logits = randn(&[6, 50], 13);
        let scaled = || (logits.as_tensor() * 8.0).unwrap();
        let tokens = Tensor::new(&[3u32, 49, 0, 7, 7, 21], &Device::Cpu).unwrap();
        assert_same(
            &[&logits],
            || token_logprobs(&scaled(), &tokens).unwrap(),
            || {
                let lsm = candle_nn::ops::log_softmax(&scaled(), D::Minus1).unwrap();
                lsm.gather(&tokens.unsqueeze(1).unwrap(), 1).unwrap().squeeze(1).unwrap()
            },
            1e-4,
            "token logprobs",
        );
    }

    #[test]
    fn weight_gradients_reach_the_sink_and_add_up() {
        let (x, w) = (randn(&[7, 5], 21), randn(&[3, 5], 22));
        let ids = Tensor::new(&[2u32, 0, 2], &Device::Cpu).unwrap();
        let sink = WeightGrads::new();
        // w is used twice (a projection and an embedding, like tied embeddings): both contributions add up.
        let y = linear(x.as_tensor(), w.as_tensor(), Some(&sink)).unwrap().sum_all().unwrap();
        let e = embedding(w.as_tensor(), &ids, Some(&sink)).unwrap().sqr().unwrap().sum_all().unwrap();
        let mut store = (y + e).unwrap().backward().unwrap();
        assert!(store.get(w.as_tensor()).is_none(), "the weight's gradient bypasses candle");
        assert!(store.get(x.as_tensor()).is_some());
        sink.drain_into(&mut store, &[w.as_tensor()]).unwrap();
        let reference = {
            let y = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap().sum_all().unwrap();
            let e = w.as_tensor().index_select(&ids, 0).unwrap().sqr().unwrap().sum_all().unwrap();
            (y + e).unwrap().backward().unwrap()
        };
        let got = store.get(w.as_tensor()).unwrap();
        assert!(max_diff(got, reference.get(w.as_tensor()).unwrap()) < 1e-5);
        assert!(sink.take_all().is_empty(), "draining empties the sink");
    }

    #[test]
    fn rms_norm_matches_the_composition() {
        let (x, w) = (randn(&[3, 5, 40], 1), randn(&[40], 2));
        assert_same(
            &[&x, &w],
            || rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap(),
            || candle_nn::ops::rms_norm_slow(x.as_tensor(), w.as_tensor(), 1e-5).unwrap(),
            1e-4,
            "rms norm",
        );
    }

    #[test]
    fn rope_matches_the_composition() {
        let (b, t, heads, d) = (2, 7, 3, 8);
        let x = randn(&[b, t, heads, d], 3);
        let angles: Vec<f32> = (0..t * d / 2).map(|i| i as f32 * 0.37).collect();
        let angles = Tensor::from_vec(angles, (t, d / 2), &Device::Cpu).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        assert_same(
            &[&x],
            || rope(x.as_tensor(), &cos, &sin).unwrap(),
            || {
                let bhtd = x.as_tensor().transpose(1, 2).unwrap().contiguous().unwrap();
                candle_nn::rotary_emb::rope_slow(&bhtd, &cos, &sin).unwrap().transpose(1, 2).unwrap()
            },
            1e-5,
            "rope",
        );
    }

    #[test]
    fn swiglu_matches_the_composition() {
        let (g, u) = (randn(&[4, 33], 4), randn(&[4, 33], 5));
        assert_same(
            &[&g, &u],
            || swiglu(&(g.as_tensor() * 3.0).unwrap(), u.as_tensor()).unwrap(),
            || (candle_nn::ops::silu(&(g.as_tensor() * 3.0).unwrap()).unwrap() * u.as_tensor()).unwrap(),
            1e-5,
            "swiglu",
        );
    }

    #[test]
    fn attention_matches_the_masked_softmax_composition() {
        let (b, t, h, kv, d) = (2, 9, 6, 2, 8);
        let (q, k, v) = (randn(&[b, t, h, d], 6), randn(&[b, t, kv, d], 7), randn(&[b, t, kv, d], 8));
        let shape = AttentionShape { num_heads: h, num_kv_heads: kv, head_dim: d };
        let reference = || {
            let heads = |x: &Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap();
            let repeat = |x: Tensor| {
                x.unsqueeze(2).unwrap().broadcast_as((b, kv, h / kv, t, d)).unwrap().reshape((b, h, t, d)).unwrap()
            };
            let (qh, kh, vh) = (heads(q.as_tensor()), repeat(heads(k.as_tensor())), repeat(heads(v.as_tensor())));
            let mask: Vec<f32> = (0..t * t).map(|ij| if ij % t > ij / t { f32::NEG_INFINITY } else { 0.0 }).collect();
            let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
            let scores = (qh.matmul(&kh.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
            let probs = candle_nn::ops::softmax(&scores.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
            probs.matmul(&vh).unwrap().transpose(1, 2).unwrap()
        };
        assert_same(
            &[&q, &k, &v],
            || causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), shape).unwrap(),
            reference,
            1e-4,
            "attention",
        );
    }

    #[test]
    fn shape_mismatches_are_errors_not_panics() {
        let shape = AttentionShape { num_heads: 4, num_kv_heads: 2, head_dim: 8 };
        let q = randn(&[1, 3, 4, 8], 1);
        let k = randn(&[1, 3, 3, 8], 2);
        assert!(causal_attention(q.as_tensor(), k.as_tensor(), k.as_tensor(), shape).is_err());
        assert!(rms_norm(q.as_tensor(), randn(&[5], 3).as_tensor(), 1e-5).is_err());
    }
}
