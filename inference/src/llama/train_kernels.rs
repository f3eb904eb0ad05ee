//! The arithmetic of the training forward and backward passes on plain slices, in parallel on the current rayon
//! pool: RMS norm, RoPE, SwiGLU and causal attention with grouped K/V heads. [`super::train_ops`] wraps each as
//! a candle op with its backward pass; [`super::train_layer`] strings them into one decoder layer.
//!
//! Layouts: rows of `h` floats for norms; `[B, T, heads, D]` for RoPE and attention queries, `[B, T, KV, D]` for
//! keys and values; RoPE tables `[T, D/2]` in the rotate-half convention.

use rayon::prelude::*;

use crate::simd;

/// Rows of at least this many floats are handed to the thread pool one at a time; smaller ones in groups.
const MIN_PARALLEL_FLOATS: usize = 16 * 1024;

fn rows_per_task(width: usize) -> usize {
    (MIN_PARALLEL_FLOATS / width.max(1)).max(1)
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    1.0 / (simd::dot(row, row) / row.len() as f32 + eps).sqrt()
}

/// `y = x · w / sqrt(mean(x²) + eps)` per row of `w.len()` floats.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let h = w.len();
    let mut y = vec![0f32; x.len()];
    let per = rows_per_task(h);
    y.par_chunks_mut(h * per).zip(x.par_chunks(h * per)).for_each(|(ys, xs)| {
        for (yr, xr) in ys.chunks_mut(h).zip(xs.chunks(h)) {
            let r = inv_rms(xr, eps);
            for ((yi, &xi), &wi) in yr.iter_mut().zip(xr).zip(w) {
                *yi = xi * r * wi;
            }
        }
    });
    y
}

/// Backward of [`rms_norm`]: with `n = x·r` (`r` = 1/rms) and `g = dy·w`, `dx = r·(g − n·mean(g·n))` (added
/// into `dx`, which may hold another branch's gradient) and `dw = Σ_rows dy·n` (returned).
pub fn rms_norm_backward(x: &[f32], w: &[f32], dy: &[f32], eps: f32, dx: &mut [f32]) -> Vec<f32> {
    let h = w.len();
    let per = rows_per_task(h);
    dx.par_chunks_mut(h * per)
        .zip(x.par_chunks(h * per))
        .zip(dy.par_chunks(h * per))
        .map(|((dxs, xs), dys)| {
            let mut dw = vec![0f32; h];
            let mut g = vec![0f32; h];
            for ((dxr, xr), dyr) in dxs.chunks_mut(h).zip(xs.chunks(h)).zip(dys.chunks(h)) {
                let r = inv_rms(xr, eps);
                let mut gn = 0f32;
                for i in 0..h {
                    g[i] = dyr[i] * w[i];
                    gn += g[i] * xr[i];
                    dw[i] += dyr[i] * xr[i] * r;
                }
                let c = gn * r * r / h as f32;
                for i in 0..h {
                    dxr[i] += r * (g[i] - xr[i] * c);
                }
            }
            dw
        })
        .reduce(
            || vec![0f32; h],
            |mut a, b| {
                simd::axpy(&mut a, 1.0, &b);
                a
            },
        )
}

/// Rotates `x` `[B, T, heads, D]` in place by each position's angles (`cos`/`sin` `[T, D/2]`), or by their
/// negatives when `inverse` (the backward pass of a rotation).
pub fn rope_in_place(x: &mut [f32], cos: &[f32], sin: &[f32], t: usize, heads: usize, d: usize, inverse: bool) {
    let half = d / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    x.par_chunks_mut(heads * d).enumerate().for_each(|(bt, row)| {
        let pos = bt % t;
        let (c, s) = (&cos[pos * half..(pos + 1) * half], &sin[pos * half..(pos + 1) * half]);
        for head in row.chunks_mut(d) {
            let (x1, x2) = head.split_at_mut(half);
            for i in 0..half {
                let si = sign * s[i];
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * c[i] - b * si;
                x2[i] = b * c[i] + a * si;
            }
        }
    });
}

/// `silu(gate) · up`.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut y = gate.to_vec();
    y.par_chunks_mut(MIN_PARALLEL_FLOATS)
        .zip(up.par_chunks(MIN_PARALLEL_FLOATS))
        .for_each(|(ys, us)| simd::silu_mul(ys, us));
    y
}

/// Backward of [`swiglu`]: with `s = σ(g)`, `d gate = dy·u·s·(1 + g·(1 − s))`, `d up = dy·g·s`.
pub fn swiglu_backward(gate: &[f32], up: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0f32; gate.len()];
    let mut du = vec![0f32; gate.len()];
    let n = MIN_PARALLEL_FLOATS;
    dg.par_chunks_mut(n)
        .zip(du.par_chunks_mut(n))
        .zip(gate.par_chunks(n).zip(up.par_chunks(n)).zip(dy.par_chunks(n)))
        .for_each(|((dgs, dus), ((gs, us), dys))| {
            for i in 0..gs.len() {
                let s = 1.0 / (1.0 + (-gs[i]).exp());
                dgs[i] = dys[i] * us[i] * s * (1.0 + gs[i] * (1.0 - s));
                dus[i] = dys[i] * gs[i] * s;
            }
        });
    (dg, du)
}

/// Head counts of [`attention`]; query head `h` reads K/V head `h / (num_heads / num_kv_heads)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// Softmax probabilities of query `pos` of `head` in batch row `batch` over keys `0..=pos`, into
    /// `p[..=pos]`.
    fn probs(&self, q: &[f32], k: &[f32], t: usize, (batch, head, pos): (usize, usize, usize), p: &mut [f32]) {
        let AttentionShape { num_heads: h, num_kv_heads: kv, head_dim: d } = *self;
        let q_row = &q[((batch * t + pos) * h + head) * d..][..d];
        let keys = &k[(batch * t * kv + head / (h / kv)) * d..];
        simd::scaled_dots(q_row, keys, kv * d, self.scale(), &mut p[..=pos]);
        simd::softmax_in_place(&mut p[..=pos]);
    }
}

/// `softmax(q·kᵀ/√D + causal mask)·v` per head, `t` positions per batch row: output `[B, T, H, D]`.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], t: usize, shape: AttentionShape) -> Vec<f32> {
    let AttentionShape { num_heads: h, num_kv_heads: kv, head_dim: d } = shape;
    let mut out = vec![0f32; q.len()];
    // One task per (batch row, position): its H heads' rows are adjacent in the output.
    out.par_chunks_mut(h * d).enumerate().for_each_init(
        || vec![0f32; t],
        |p, (bi, out_row)| {
            let (b, i) = (bi / t, bi % t);
            for head in 0..h {
                shape.probs(q, k, t, (b, head, i), p);
                let values = &v[(b * t * kv + head / (h / kv)) * d..];
                simd::weighted_sum(&p[..=i], values, kv * d, &mut out_row[head * d..(head + 1) * d]);
            }
        },
    );
    out
}

/// Backward of [`attention`], the probabilities recomputed: per query row `i`, `dP = dO·vᵀ`,
/// `dS = P ⊙ (dP − P·dP)`, `dq = scale·dS·k`, `dk += scale·dSᵀ·q`, `dv += Pᵀ·dO`. Work is split by (batch
/// row, K/V head), so the query heads sharing a K/V head add into it without contention.
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_out: &[f32],
    t: usize,
    shape: AttentionShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttentionShape { num_heads: h, num_kv_heads: kv, head_dim: d } = shape;
    let b = q.len() / (t * h * d).max(1);
    let groups = h / kv;
    let scale = shape.scale();
    // Per (b, kv head): dq for its query heads ([T, groups, D]), dk and dv ([T, D]).
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..b * kv)
        .into_par_iter()
        .map(|task| {
            let (bi, kvh) = (task / kv, task % kv);
            let mut dq = vec![0f32; t * groups * d];
            let mut dk = vec![0f32; t * d];
            let mut dv = vec![0f32; t * d];
            let (mut p, mut dp) = (vec![0f32; t], vec![0f32; t]);
            let keys = &k[(bi * t * kv + kvh) * d..];
            let values = &v[(bi * t * kv + kvh) * d..];
            for gi in 0..groups {
                let head = kvh * groups + gi;
                for i in 0..t {
                    shape.probs(q, k, t, (bi, head, i), &mut p);
                    let row = ((bi * t + i) * h + head) * d;
                    let (q_row, do_row) = (&q[row..row + d], &d_out[row..row + d]);
                    simd::scaled_dots(do_row, values, kv * d, 1.0, &mut dp[..=i]);
                    let pdp = simd::dot(&p[..=i], &dp[..=i]);
                    let dq_row = &mut dq[(i * groups + gi) * d..][..d];
                    for j in 0..=i {
                        let ds = p[j] * (dp[j] - pdp) * scale;
                        simd::axpy(dq_row, ds, &keys[j * kv * d..j * kv * d + d]);
                        simd::axpy(&mut dk[j * d..(j + 1) * d], ds, q_row);
                        simd::axpy(&mut dv[j * d..(j + 1) * d], p[j], do_row);
                    }
                }
            }
            (dq, dk, dv)
        })
        .collect();
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    for (task, (pq, pk, pv)) in parts.into_iter().enumerate() {
        let (bi, kvh) = (task / kv, task % kv);
        for i in 0..t {
            let kv_at = ((bi * t + i) * kv + kvh) * d;
            dk[kv_at..kv_at + d].copy_from_slice(&pk[i * d..(i + 1) * d]);
            dv[kv_at..kv_at + d].copy_from_slice(&pv[i * d..(i + 1) * d]);
            let q_at = ((bi * t + i) * h + kvh * groups) * d;
            dq[q_at..q_at + groups * d].copy_from_slice(&pq[i * groups * d..(i + 1) * groups * d]);
        }
    }
    (dq, dk, dv)
}
