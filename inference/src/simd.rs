//! The few vector kernels the CPU serving path needs: blocked dot products
//! and `y += a·x`, with AVX-512 and AVX2 versions chosen at run time.
//!
//! The portable build targets baseline x86-64 (SSE2), and the compiler does
//! not vectorise float reductions on its own (it may not reorder sums), so
//! these are written with intrinsics. Each output is summed in a fixed order
//! that does not depend on how many rows are computed together, which keeps
//! results independent of batching.

/// Which implementation this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Avx512,
    Avx2,
    Scalar,
}

fn level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        // `is_x86_feature_detected!` caches its answer; this is a load and a test.
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512vl") {
            return Level::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Level::Avx2;
        }
    }
    Level::Scalar
}

/// Dot products of `R` rows of `x` with `C` rows of `w`, all `k` long:
/// `out[r][c] = x_r · w_c`, where row `r` of `x` starts at `x[r * x_stride]`
/// and row `c` of `w` at `w[c * w_stride]`. A tile of 4×4 loads 8 vectors
/// per 16 multiply-adds, which is what lets few-row matmuls approach peak.
///
/// `prefetch` is how far (in floats) ahead of each weight load to prefetch;
/// callers streaming a matrix pass the next tile's offset.
#[inline]
pub fn dot_tile<const R: usize, const C: usize>(
    x: &[f32],
    x_stride: usize,
    w: &[f32],
    w_stride: usize,
    k: usize,
    prefetch: usize,
) -> [[f32; C]; R] {
    let fits = |len: usize, rows: usize, stride: usize| rows == 0 || len >= (rows - 1) * stride + k;
    assert!(fits(x.len(), R, x_stride) && fits(w.len(), C, w_stride), "dot_tile: slices too short");
    match level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F and VL, and the bounds were checked above.
        Level::Avx512 => unsafe {
            x86::dot_tile_avx512::<R, C>(x.as_ptr(), x_stride, w.as_ptr(), w_stride, k, prefetch)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and FMA and the bounds were checked above.
        Level::Avx2 => unsafe { x86::dot_tile_avx2::<R, C>(x.as_ptr(), x_stride, w.as_ptr(), w_stride, k) },
        _ => dot_tile_scalar::<R, C>(x, x_stride, w, w_stride, k),
    }
}

/// `out[j] = x · w_j` for consecutive rows `w_j = w[j * k..(j + 1) * k]`,
/// summed exactly as [`dot_tile`] sums each entry (so a row's result does
/// not depend on which of the two computed it). One call for all rows keeps
/// the per-row cost to the arithmetic: a single-row decode step dots ~200k
/// weight rows.
pub fn dot_rows(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    assert!(x.len() >= k && w.len() >= out.len() * k, "dot_rows: slices too short");
    match level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F and VL and the bounds were checked above.
        Level::Avx512 => unsafe { x86::dot_rows_avx512(x.as_ptr(), w.as_ptr(), k, out) },
        _ => {
            for (j, o) in out.iter_mut().enumerate() {
                *o = dot_tile::<1, 1>(x, 0, &w[j * k..], 0, k, k)[0][0];
            }
        }
    }
}

/// `a · b` over the shorter length.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let k = a.len().min(b.len());
    dot_tile::<1, 1>(a, 0, b, 0, k, 0)[0][0]
}

/// `y += a · x` over the shorter length.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    let k = y.len().min(x.len());
    match level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F and VL; both slices hold at least `k` values.
        Level::Avx512 => unsafe { x86::axpy_avx512(y.as_mut_ptr(), a, x.as_ptr(), k) },
        _ => {
            for (yi, xi) in y[..k].iter_mut().zip(&x[..k]) {
                *yi += a * xi;
            }
        }
    }
}

/// `out[j] = scale · (q · row_j)` where row `j` of `rows` starts at
/// `rows[j * stride]` and is `q.len()` long: attention scores of one query
/// head against cached keys, in one call rather than one per position.
pub fn scaled_dots(q: &[f32], rows: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    let (d, count) = (q.len(), out.len());
    assert!(count == 0 || rows.len() >= (count - 1) * stride + d, "scaled_dots: rows too short");
    match level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F and VL and the bounds were checked above.
        Level::Avx512 => unsafe { x86::scaled_dots_avx512(q.as_ptr(), d, rows.as_ptr(), stride, scale, out) },
        _ => {
            for (j, o) in out.iter_mut().enumerate() {
                *o = dot(q, &rows[j * stride..j * stride + d]) * scale;
            }
        }
    }
}

/// `out = Σ_j weights[j] · row_j` where row `j` of `rows` starts at
/// `rows[j * stride]` and is `out.len()` long: one head's attention output
/// over cached values.
pub fn weighted_sum(weights: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
    let (d, count) = (out.len(), weights.len());
    assert!(count == 0 || rows.len() >= (count - 1) * stride + d, "weighted_sum: rows too short");
    out.fill(0.0);
    match level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F and VL and the bounds were checked above.
        Level::Avx512 => unsafe { x86::weighted_sum_avx512(weights, rows.as_ptr(), stride, out.as_mut_ptr(), d) },
        _ => {
            for (j, &wj) in weights.iter().enumerate() {
                axpy(out, wj, &rows[j * stride..j * stride + d]);
            }
        }
    }
}

/// `count` cached rows (keys or values of one kv head) of one head's width,
/// row `j` at `data[j * stride]`.
#[derive(Debug, Clone, Copy)]
pub struct HeadRows<'a> {
    pub data: &'a [f32],
    pub stride: usize,
    pub count: usize,
}

impl HeadRows<'_> {
    fn check(&self, width: usize, what: &str) {
        assert!(self.count == 0 || self.data.len() >= (self.count - 1) * self.stride + width, "{what}: rows too short");
    }
}

/// [`scaled_dots`] for the `heads` query heads that share a kv head (`q`:
/// their `heads · d` values, head after head), each key loaded once for all
/// of them: head `h`'s scores go to `out[h * out_stride..][..keys.count]`.
/// Every score is the value [`scaled_dots`] gives (the same tile sums).
pub fn scaled_dots_heads(q: &[f32], heads: usize, keys: HeadRows, scale: f32, out: &mut [f32], out_stride: usize) {
    let d = q.len() / heads.max(1);
    keys.check(d, "scaled_dots_heads");
    assert!(
        heads == 0 || keys.count == 0 || out.len() >= (heads - 1) * out_stride + keys.count,
        "scaled_dots_heads: output too short"
    );
    match level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F and VL; the bounds were checked above.
        Level::Avx512 => unsafe { x86::scaled_dots_heads_avx512(q.as_ptr(), heads, d, keys, scale, out, out_stride) },
        _ => {
            for h in 0..heads {
                let out_h = &mut out[h * out_stride..h * out_stride + keys.count];
                scaled_dots(&q[h * d..(h + 1) * d], keys.data, keys.stride, scale, out_h);
            }
        }
    }
}

/// [`weighted_sum`] for the `heads` query heads that share a kv head, each
/// value row loaded once for all of them: head `h`'s output
/// (`out[h * d..][..d]`, `d = out.len() / heads`) is the sum of its weights
/// (`weights[h * weights_stride..][..values.count]`) times the rows, added
/// in [`weighted_sum`]'s order (same values).
pub fn weighted_sum_heads(weights: &[f32], weights_stride: usize, heads: usize, values: HeadRows, out: &mut [f32]) {
    let d = out.len() / heads.max(1);
    values.check(d, "weighted_sum_heads");
    assert!(
        heads == 0 || values.count == 0 || weights.len() >= (heads - 1) * weights_stride + values.count,
        "weighted_sum_heads: weights too short"
    );
    match level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F and VL; the bounds were checked above.
        Level::Avx512 if d.is_multiple_of(16) => unsafe {
            x86::weighted_sum_heads_avx512(weights, weights_stride, heads, values, out, d)
        },
        _ => {
            for h in 0..heads {
                let w = &weights[h * weights_stride..h * weights_stride + values.count];
                weighted_sum(w, values.data, values.stride, &mut out[h * d..(h + 1) * d]);
            }
        }
    }
}

/// `gate[i] = silu(gate[i]) · up[i]` (SwiGLU), where `silu(g) = g / (1 + e^-g)`.
///
/// The AVX-512 version evaluates `e^x` with a degree-6 polynomial (Cephes'
/// `expf`, within 2 ulp); the scalar `exp` per element was a tenth of a
/// 16-sequence decode step.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let scalar = |g: &mut f32, u: f32| *g = *g / (1.0 + (-*g).exp()) * u;
    match level() {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => {
            let full = n / 16 * 16;
            // SAFETY: the CPU has AVX-512F and VL; both slices hold `full` values.
            unsafe { x86::silu_mul_avx512(gate.as_mut_ptr(), up.as_ptr(), full) };
            for (g, &u) in gate[full..n].iter_mut().zip(&up[full..n]) {
                scalar(g, u);
            }
        }
        _ => {
            for (g, &u) in gate[..n].iter_mut().zip(&up[..n]) {
                scalar(g, u);
            }
        }
    }
}

/// Largest finite F16: values past it are stored as it, not as infinity.
const F16_MAX: f32 = 65504.0;

/// `out[i] = f32(bits[i])`, IEEE half to single (exact).
pub fn f16_to_f32(bits: &[u16], out: &mut [f32]) {
    assert_eq!(bits.len(), out.len(), "f16_to_f32: lengths differ");
    let done = match level() {
        // SAFETY (both): the CPU has the features; the lengths match.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { x86::f16_to_f32_avx512(bits, out) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 if std::arch::is_x86_feature_detected!("f16c") => unsafe { x86::f16_to_f32_f16c(bits, out) },
        _ => 0,
    };
    for (o, &b) in out[done..].iter_mut().zip(&bits[done..]) {
        *o = half::f16::from_bits(b).to_f32();
    }
}

/// `out[i] = f16(values[i])`, rounded to nearest even, clamped to the finite
/// range (NaN stays NaN); every path gives the same bits.
pub fn f32_to_f16(values: &[f32], out: &mut [u16]) {
    assert_eq!(values.len(), out.len(), "f32_to_f16: lengths differ");
    let done = match level() {
        // SAFETY: the CPU has AVX-512F; the lengths match.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { x86::f32_to_f16_avx512(values, out) },
        _ => 0,
    };
    for (o, &v) in out[done..].iter_mut().zip(&values[done..]) {
        *o = half::f16::from_f32(v.clamp(-F16_MAX, F16_MAX)).to_bits();
    }
}

/// `out[j] = Σ_c q[c] · keys_t[c * stride + j]`: scores of one query
/// against keys stored transposed (component-major), `out.len()` of them.
/// Used for long prompts, where transposing the keys once pays for itself.
pub fn transposed_scores(q: &[f32], keys_t: &[f32], stride: usize, out: &mut [f32]) {
    let (d, len) = (q.len(), out.len());
    assert!(d == 0 || len == 0 || keys_t.len() >= (d - 1) * stride + len, "transposed_scores: keys too short");
    match level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F and VL and the bounds were checked above.
        Level::Avx512 => unsafe { x86::transposed_scores_avx512(q, keys_t.as_ptr(), stride, out) },
        _ => {
            out.fill(0.0);
            for (c, &qc) in q.iter().enumerate() {
                axpy(out, qc, &keys_t[c * stride..c * stride + len]);
            }
        }
    }
}

/// `x = softmax(x)` in place (max-subtracted, so large scores do not
/// overflow). An empty slice is left alone.
pub fn softmax_in_place(x: &mut [f32]) {
    if x.is_empty() {
        return;
    }
    let (_, sum) = exp_shifted_in_place(x);
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// `x = exp(x − max(x))` in place; returns `(max, Σ exp(x − max))`, so `max + ln(sum)` is the log-sum-exp.
/// An empty slice gives `(−∞, 0)`.
pub fn exp_shifted_in_place(x: &mut [f32]) -> (f32, f32) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if x.is_empty() {
        return (max, 0.0);
    }
    let sum = match level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F and VL; the pointer covers `x.len()` values.
        Level::Avx512 => unsafe { x86::exp_shifted_avx512(x.as_mut_ptr(), x.len(), max) },
        _ => {
            let mut sum = 0.0;
            for v in x.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            sum
        }
    };
    (max, sum)
}

fn dot_tile_scalar<const R: usize, const C: usize>(
    x: &[f32],
    x_stride: usize,
    w: &[f32],
    w_stride: usize,
    k: usize,
) -> [[f32; C]; R] {
    const LANES: usize = 8;
    let mut out = [[0f32; C]; R];
    for (r, out_r) in out.iter_mut().enumerate() {
        let row = &x[r * x_stride..r * x_stride + k];
        for (c, o) in out_r.iter_mut().enumerate() {
            let wr = &w[c * w_stride..c * w_stride + k];
            let mut acc = [0f32; LANES];
            let full = k / LANES * LANES;
            for (xc, wc) in row[..full].chunks_exact(LANES).zip(wr[..full].chunks_exact(LANES)) {
                for l in 0..LANES {
                    acc[l] += xc[l] * wc[l];
                }
            }
            let tail: f32 = row[full..].iter().zip(&wr[full..]).map(|(a, b)| a * b).sum();
            *o = acc.iter().sum::<f32>() + tail;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // Index loops over const bounds unroll into registers; iterators here were not inlined.
mod x86 {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512F and VL must be available; `x` must hold `(R - 1) * x_stride + k`
    /// values and `w` `(C - 1) * w_stride + k`.
    ///
    /// VL matters beyond its instructions: without it the final 256- and
    /// 128-bit reduction steps cannot address registers 16-31, and LLVM then
    /// spills a 5 × 5 tile's accumulators to the stack (measured 39 against
    /// 99 GFLOP/s per core).
    #[target_feature(enable = "avx512f,avx512vl")]
    pub unsafe fn dot_tile_avx512<const R: usize, const C: usize>(
        x: *const f32,
        x_stride: usize,
        w: *const f32,
        w_stride: usize,
        k: usize,
        prefetch: usize,
    ) -> [[f32; C]; R] {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut wv = [_mm512_setzero_ps(); C];
        let mut c = 0;
        while c + 16 <= k {
            // SAFETY (whole block): offsets below the guaranteed lengths;
            // prefetches may point past the end, which never faults.
            unsafe {
                for j in 0..C {
                    // Weights stream from memory once per step (see `prefetch`).
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(j * w_stride + c + prefetch) as *const i8);
                    wv[j] = _mm512_loadu_ps(w.add(j * w_stride + c));
                }
                for r in 0..R {
                    let xv = _mm512_loadu_ps(x.add(r * x_stride + c));
                    for j in 0..C {
                        acc[r][j] = _mm512_fmadd_ps(xv, wv[j], acc[r][j]);
                    }
                }
            }
            c += 16;
        }
        if c < k {
            // A masked tail keeps the same accumulation order as a full vector.
            let mask: __mmask16 = (1u16 << (k - c)) - 1;
            // SAFETY: masked loads touch only the valid tail.
            unsafe {
                for j in 0..C {
                    wv[j] = _mm512_maskz_loadu_ps(mask, w.add(j * w_stride + c));
                }
                for r in 0..R {
                    let xv = _mm512_maskz_loadu_ps(mask, x.add(r * x_stride + c));
                    for j in 0..C {
                        acc[r][j] = _mm512_fmadd_ps(xv, wv[j], acc[r][j]);
                    }
                }
            }
        }
        let mut out = [[0f32; C]; R];
        for r in 0..R {
            for j in 0..C {
                out[r][j] = _mm512_reduce_add_ps(acc[r][j]);
            }
        }
        out
    }

    /// # Safety
    /// AVX-512F and VL must be available; `x` must hold `k` values and `w`
    /// `out.len() * k`.
    #[target_feature(enable = "avx512f,avx512vl")]
    pub unsafe fn dot_rows_avx512(x: *const f32, w: *const f32, k: usize, out: &mut [f32]) {
        for (j, o) in out.iter_mut().enumerate() {
            // SAFETY: row `j` lies within `w` (caller), prefetches never fault.
            *o = unsafe { dot_tile_avx512::<1, 1>(x, 0, w.add(j * k), 0, k, k) }[0][0];
        }
    }

    /// # Safety
    /// AVX2 and FMA must be available; bounds as for [`dot_tile_avx512`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_tile_avx2<const R: usize, const C: usize>(
        x: *const f32,
        x_stride: usize,
        w: *const f32,
        w_stride: usize,
        k: usize,
    ) -> [[f32; C]; R] {
        // AVX2 has 16 vector registers: a 5 x 5 tile's 25 accumulators would
        // live in memory, so the rows go two at a time (10 accumulators, 5
        // weight vectors, one input vector) and the weights come again from
        // L1. Each entry is summed exactly as before, whatever R is.
        let mut out = [[0f32; C]; R];
        let mut r = 0;
        while r < R {
            let x = x.wrapping_add(r * x_stride);
            if R - r >= 2 {
                // SAFETY: rows `r` and `r + 1` lie within the caller's `R` rows.
                let pair = unsafe { dot_block_avx2::<2, C>(x, x_stride, w, w_stride, k) };
                out[r] = pair[0];
                out[r + 1] = pair[1];
                r += 2;
            } else {
                // SAFETY: row `r` lies within the caller's `R` rows.
                out[r] = unsafe { dot_block_avx2::<1, C>(x, x_stride, w, w_stride, k) }[0];
                r += 1;
            }
        }
        out
    }

    /// [`dot_tile_avx2`] for a block of rows small enough to keep in registers.
    ///
    /// # Safety
    /// As [`dot_tile_avx2`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_block_avx2<const R: usize, const C: usize>(
        x: *const f32,
        x_stride: usize,
        w: *const f32,
        w_stride: usize,
        k: usize,
    ) -> [[f32; C]; R] {
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut wv = [_mm256_setzero_ps(); C];
        let mut c = 0;
        while c + 8 <= k {
            // SAFETY: offsets below the guaranteed lengths.
            unsafe {
                for j in 0..C {
                    wv[j] = _mm256_loadu_ps(w.add(j * w_stride + c));
                }
                for r in 0..R {
                    let xv = _mm256_loadu_ps(x.add(r * x_stride + c));
                    for j in 0..C {
                        acc[r][j] = _mm256_fmadd_ps(xv, wv[j], acc[r][j]);
                    }
                }
            }
            c += 8;
        }
        let mut out = [[0f32; C]; R];
        for r in 0..R {
            for j in 0..C {
                let mut lanes = [0f32; 8];
                // SAFETY: `lanes` holds 8 floats.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][j]) };
                let mut sum =
                    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
                for i in c..k {
                    // SAFETY: `i < k`.
                    sum += unsafe { *x.add(r * x_stride + i) * *w.add(j * w_stride + i) };
                }
                out[r][j] = sum;
            }
        }
        out
    }

    /// # Safety
    /// AVX-512F and VL must be available; `rows` must hold
    /// `(out.len() - 1) * stride + d` values and `q` `d`.
    #[target_feature(enable = "avx512f,avx512vl")]
    pub unsafe fn scaled_dots_avx512(
        q: *const f32,
        d: usize,
        rows: *const f32,
        stride: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        for (j, o) in out.iter_mut().enumerate() {
            // SAFETY: row `j` holds `d` values (caller), as does `q`.
            *o = unsafe { dot_tile_avx512::<1, 1>(q, 0, rows.wrapping_add(j * stride), 0, d, 0) }[0][0] * scale;
        }
    }

    /// # Safety
    /// AVX-512F and VL must be available; `rows` must hold
    /// `(weights.len() - 1) * stride + d` values and `out` `d`.
    #[target_feature(enable = "avx512f,avx512vl")]
    pub unsafe fn weighted_sum_avx512(weights: &[f32], rows: *const f32, stride: usize, out: *mut f32, d: usize) {
        for (j, &wj) in weights.iter().enumerate() {
            // SAFETY: row `j` holds `d` values (caller), as does `out`.
            unsafe { axpy_avx512(out, wj, rows.wrapping_add(j * stride), d) };
        }
    }

    /// Query heads [`scaled_dots_heads_avx512`] and [`weighted_sum_heads_avx512`] take at once (registers).
    const HEADS_AT_ONCE: usize = 4;

    /// # Safety
    /// AVX-512F and VL must be available; `q` must hold `heads · d` values,
    /// `keys` its rows of `d` and `out` `(heads - 1) · out_stride + keys.count`.
    #[target_feature(enable = "avx512f,avx512vl")]
    pub unsafe fn scaled_dots_heads_avx512(
        q: *const f32,
        heads: usize,
        d: usize,
        keys: super::HeadRows,
        scale: f32,
        out: &mut [f32],
        out_stride: usize,
    ) {
        let mut h = 0;
        while h < heads {
            let at = h * d;
            // SAFETY: heads `h..` of `q`, rows of `keys` (caller).
            unsafe {
                match heads - h {
                    1 => score_heads::<1>(q.add(at), d, keys, scale, &mut out[h * out_stride..], out_stride),
                    2 => score_heads::<2>(q.add(at), d, keys, scale, &mut out[h * out_stride..], out_stride),
                    3 => score_heads::<3>(q.add(at), d, keys, scale, &mut out[h * out_stride..], out_stride),
                    _ => score_heads::<4>(q.add(at), d, keys, scale, &mut out[h * out_stride..], out_stride),
                }
            }
            h += HEADS_AT_ONCE;
        }
    }

    /// `G` heads' scores, four keys per tile (the tile's entries sum as one alone).
    ///
    /// # Safety
    /// As [`scaled_dots_heads_avx512`], for `G` heads.
    #[target_feature(enable = "avx512f,avx512vl")]
    unsafe fn score_heads<const G: usize>(
        q: *const f32,
        d: usize,
        keys: super::HeadRows,
        scale: f32,
        out: &mut [f32],
        out_stride: usize,
    ) {
        const KEYS: usize = 4;
        let (rows, stride) = (keys.data.as_ptr(), keys.stride);
        let mut j = 0;
        while j + KEYS <= keys.count {
            // SAFETY: keys `j..j + 4` hold `d` values each (caller).
            let tile = unsafe { dot_tile_avx512::<G, KEYS>(q, d, rows.add(j * stride), stride, d, KEYS * stride) };
            for (g, dots) in tile.iter().enumerate() {
                for (c, dot) in dots.iter().enumerate() {
                    out[g * out_stride + j + c] = dot * scale;
                }
            }
            j += KEYS;
        }
        while j < keys.count {
            // SAFETY: key `j` holds `d` values (caller).
            let tile = unsafe { dot_tile_avx512::<G, 1>(q, d, rows.add(j * stride), stride, d, 0) };
            for (g, dots) in tile.iter().enumerate() {
                out[g * out_stride + j] = dots[0] * scale;
            }
            j += 1;
        }
    }

    /// # Safety
    /// AVX-512F and VL must be available; `d` a multiple of 16; `weights`,
    /// `values` and `out` (`heads · d`) as [`super::weighted_sum_heads`] checks.
    #[target_feature(enable = "avx512f,avx512vl")]
    pub unsafe fn weighted_sum_heads_avx512(
        weights: &[f32],
        weights_stride: usize,
        heads: usize,
        values: super::HeadRows,
        out: &mut [f32],
        d: usize,
    ) {
        let mut h = 0;
        while h < heads {
            let (w, o) = (&weights[h * weights_stride..], &mut out[h * d..]);
            // SAFETY: as the caller's, for heads `h..`.
            unsafe {
                match (heads - h, d % 64) {
                    (1, 0) => sum_heads::<1, 4>(w, weights_stride, values, o, d),
                    (2, 0) => sum_heads::<2, 4>(w, weights_stride, values, o, d),
                    (3, 0) => sum_heads::<3, 4>(w, weights_stride, values, o, d),
                    (_, 0) => sum_heads::<4, 4>(w, weights_stride, values, o, d),
                    (1, _) => sum_heads::<1, 1>(w, weights_stride, values, o, d),
                    (2, _) => sum_heads::<2, 1>(w, weights_stride, values, o, d),
                    (3, _) => sum_heads::<3, 1>(w, weights_stride, values, o, d),
                    _ => sum_heads::<4, 1>(w, weights_stride, values, o, d),
                }
            }
            h += HEADS_AT_ONCE;
        }
    }

    /// `G` heads' weighted sums, `V` vectors of each row per pass, in
    /// registers; each lane's multiply-adds in row order from zero, as
    /// [`axpy_avx512`] does them into a zeroed output.
    ///
    /// # Safety
    /// As [`weighted_sum_heads_avx512`], for `G` heads, `d` a multiple of `16 · V`.
    #[target_feature(enable = "avx512f,avx512vl")]
    unsafe fn sum_heads<const G: usize, const V: usize>(
        weights: &[f32],
        weights_stride: usize,
        values: super::HeadRows,
        out: &mut [f32],
        d: usize,
    ) {
        let (rows, stride) = (values.data.as_ptr(), values.stride);
        let mut c = 0;
        while c < d {
            let mut acc = [[_mm512_setzero_ps(); V]; G];
            for j in 0..values.count {
                let mut w = [_mm512_setzero_ps(); G];
                for g in 0..G {
                    w[g] = _mm512_set1_ps(weights[g * weights_stride + j]);
                }
                for v in 0..V {
                    // SAFETY: row `j` holds `d` values (caller) and `c + 16 v + 16 <= d`.
                    let x = unsafe { _mm512_loadu_ps(rows.add(j * stride + c + 16 * v)) };
                    for g in 0..G {
                        acc[g][v] = _mm512_fmadd_ps(w[g], x, acc[g][v]);
                    }
                }
            }
            for (g, acc) in acc.iter().enumerate() {
                for (v, &a) in acc.iter().enumerate() {
                    // SAFETY: `out` holds `G · d` values (caller).
                    unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(g * d + c + 16 * v), a) };
                }
            }
            c += 16 * V;
        }
    }

    /// `e^x` per lane: `x = n·ln2 + r`, `e^r` by Cephes' polynomial, then
    /// scaled by `2^n` (`vscalefps`, which also saturates to 0 and infinity).
    #[target_feature(enable = "avx512f,avx512vl")]
    fn exp_avx512(x: __m512) -> __m512 {
        let x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.72)), _mm512_set1_ps(-87.33));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let e = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
        _mm512_scalef_ps(e, n)
    }

    /// The whole vectors of 16 of [`super::f16_to_f32`], returning how many
    /// values it converted (plain loads, not AVX-512BW masked ones:
    /// `Level::Avx512` does not check for BW, and an intrinsic whose features
    /// the function lacks is not inlined but called).
    ///
    /// # Safety
    /// AVX-512F must be available; the slices as long as each other.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn f16_to_f32_avx512(bits: &[u16], out: &mut [f32]) -> usize {
        let whole = out.len() / 16 * 16;
        for i in (0..whole).step_by(16) {
            // SAFETY: 16 values from `i` in both slices.
            unsafe {
                let h = _mm256_loadu_si256(bits.as_ptr().add(i) as *const __m256i);
                _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
            }
        }
        whole
    }

    /// As [`f16_to_f32_avx512`], in vectors of 8.
    ///
    /// # Safety
    /// AVX2 and F16C must be available; the slices as long as each other.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn f16_to_f32_f16c(bits: &[u16], out: &mut [f32]) -> usize {
        let whole = out.len() / 8 * 8;
        for i in (0..whole).step_by(8) {
            // SAFETY: 8 values from `i` in both slices.
            unsafe {
                let h = _mm_loadu_si128(bits.as_ptr().add(i) as *const __m128i);
                _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
        }
        whole
    }

    /// The whole vectors of 16 of [`super::f32_to_f16`], returning how many
    /// values it converted.
    ///
    /// # Safety
    /// AVX-512F must be available; the slices as long as each other.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn f32_to_f16_avx512(values: &[f32], out: &mut [u16]) -> usize {
        let (lo, hi) = (_mm512_set1_ps(-super::F16_MAX), _mm512_set1_ps(super::F16_MAX));
        let whole = out.len() / 16 * 16;
        for i in (0..whole).step_by(16) {
            // SAFETY: 16 values from `i` in both slices.
            unsafe {
                let v = _mm512_loadu_ps(values.as_ptr().add(i));
                // `max`/`min` return their second operand when either is NaN: NaN passes through.
                let v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
                let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                _mm256_storeu_si256(out.as_mut_ptr().add(i) as *mut __m256i, h);
            }
        }
        whole
    }

    /// # Safety
    /// AVX-512F and VL must be available; `keys_t` must hold
    /// `(q.len() - 1) * stride + out.len()` values.
    #[target_feature(enable = "avx512f,avx512vl")]
    pub unsafe fn transposed_scores_avx512(q: &[f32], keys_t: *const f32, stride: usize, out: &mut [f32]) {
        let len = out.len();
        let mut j = 0;
        while j < len {
            // Four vectors (64 positions) per pass, masked at the end.
            let masks: [__mmask16; 4] = std::array::from_fn(|t| {
                let left = len.saturating_sub(j + 16 * t);
                if left >= 16 { 0xffff } else { (1u16 << left) - 1 }
            });
            let mut acc = [_mm512_setzero_ps(); 4];
            for (c, &qc) in q.iter().enumerate() {
                let b = _mm512_set1_ps(qc);
                let row = keys_t.wrapping_add(c * stride + j);
                for t in 0..4 {
                    // SAFETY: masked loads touch only positions below `len` in row `c`.
                    acc[t] = _mm512_fmadd_ps(
                        b,
                        unsafe { _mm512_maskz_loadu_ps(masks[t], row.wrapping_add(16 * t)) },
                        acc[t],
                    );
                }
            }
            for t in 0..4 {
                // SAFETY: masked stores touch only offsets below `len`.
                unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().wrapping_add(j + 16 * t), masks[t], acc[t]) };
            }
            j += 64;
        }
    }

    /// `x[i] = e^(x[i] - max)` over `n` values; returns their sum.
    ///
    /// # Safety
    /// AVX-512F and VL must be available; `x` must hold `n` values.
    #[target_feature(enable = "avx512f,avx512vl")]
    pub unsafe fn exp_shifted_avx512(x: *mut f32, n: usize, max: f32) -> f32 {
        let shift = _mm512_set1_ps(max);
        let mut sum = _mm512_setzero_ps();
        let mut c = 0;
        while c < n {
            let mask: __mmask16 = if n - c >= 16 { 0xffff } else { (1u16 << (n - c)) - 1 };
            // SAFETY: masked accesses touch only offsets below `n`.
            unsafe {
                let e = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, x.add(c)), shift));
                let e = _mm512_maskz_mov_ps(mask, e);
                _mm512_mask_storeu_ps(x.add(c), mask, e);
                sum = _mm512_add_ps(sum, e);
            }
            c += 16;
        }
        _mm512_reduce_add_ps(sum)
    }

    /// # Safety
    /// AVX-512F and VL must be available; `gate` and `up` must hold `n`
    /// values, `n` a multiple of 16.
    #[target_feature(enable = "avx512f,avx512vl")]
    pub unsafe fn silu_mul_avx512(gate: *mut f32, up: *const f32, n: usize) {
        let one = _mm512_set1_ps(1.0);
        let mut c = 0;
        while c + 16 <= n {
            // SAFETY: offsets below `n`.
            unsafe {
                let g = _mm512_loadu_ps(gate.add(c));
                let denominator = _mm512_add_ps(one, exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), g)));
                let silu = _mm512_div_ps(g, denominator);
                _mm512_storeu_ps(gate.add(c), _mm512_mul_ps(silu, _mm512_loadu_ps(up.add(c))));
            }
            c += 16;
        }
    }

    /// # Safety
    /// AVX-512F and VL must be available; `y` and `x` must hold `k` values.
    #[target_feature(enable = "avx512f,avx512vl")]
    pub unsafe fn axpy_avx512(y: *mut f32, a: f32, x: *const f32, k: usize) {
        let av = _mm512_set1_ps(a);
        let mut c = 0;
        while c + 16 <= k {
            // SAFETY: offsets below `k`.
            unsafe {
                let yv = _mm512_loadu_ps(y.add(c));
                _mm512_storeu_ps(y.add(c), _mm512_fmadd_ps(av, _mm512_loadu_ps(x.add(c)), yv));
            }
            c += 16;
        }
        if c < k {
            let mask: __mmask16 = (1u16 << (k - c)) - 1;
            // SAFETY: masked accesses touch only the valid tail.
            unsafe {
                let yv = _mm512_maskz_loadu_ps(mask, y.add(c));
                let xv = _mm512_maskz_loadu_ps(mask, x.add(c));
                _mm512_mask_storeu_ps(y.add(c), mask, _mm512_fmadd_ps(av, xv, yv));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: f32) -> Vec<f32> {
        (0..len).map(|i| ((i as f32 * 0.731 + seed).sin() * 1.7).fract()).collect()
    }

    #[test]
    fn every_level_matches_a_naive_sum() {
        for k in [1, 7, 8, 15, 16, 17, 64, 100, 576] {
            let x = data(3 * k, 0.2);
            let w = data(k, 0.9);
            let naive: Vec<f32> =
                (0..3).map(|r| (0..k).map(|c| x[r * k + c] as f64 * w[c] as f64).sum::<f64>() as f32).collect();
            let got = dot_tile::<3, 1>(&x, k, &w, 0, k, 0);
            let scalar = dot_tile_scalar::<3, 1>(&x, k, &w, 0, k);
            for r in 0..3 {
                assert!((got[r][0] - naive[r]).abs() < 1e-3, "k={k} row {r}: {} vs {}", got[r][0], naive[r]);
                assert!((scalar[r][0] - naive[r]).abs() < 1e-3, "scalar k={k} row {r}");
            }
            let mut y = data(k, 0.4);
            let expect: Vec<f32> = y.iter().zip(&w).map(|(y, w)| y + 0.5 * w).collect();
            axpy(&mut y, 0.5, &w);
            assert!(y.iter().zip(&expect).all(|(a, b)| (a - b).abs() < 1e-5), "axpy k={k}");
        }
    }

    #[test]
    fn silu_mul_matches_the_definition() {
        let gate: Vec<f32> = (0..203).map(|i| (i as f32 - 100.0) * 0.37).chain([-200.0, 200.0, 0.0]).collect();
        let up = data(gate.len(), 0.3);
        let mut got = gate.clone();
        silu_mul(&mut got, &up);
        for ((g, u), y) in gate.iter().zip(&up).zip(&got) {
            let want = (*g as f64 / (1.0 + (-*g as f64).exp()) * *u as f64) as f32;
            assert!((y - want).abs() <= 1e-6 * want.abs().max(1.0), "silu({g}) * {u}: {y} vs {want}");
        }
    }

    #[test]
    fn f16_conversions_round_trip_and_match_the_half_crate() {
        let mut values: Vec<f32> = (0..37).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        values.extend([1e6, -1e6, 65504.0, 6e-8, -0.0, f32::NAN, f32::INFINITY]);
        let mut bits = vec![0u16; values.len()];
        f32_to_f16(&values, &mut bits);
        for (&v, &b) in values.iter().zip(&bits) {
            let want = half::f16::from_f32(v.clamp(-65504.0, 65504.0));
            assert!(b == want.to_bits() || (v.is_nan() && half::f16::from_bits(b).is_nan()), "{v}: {b:#x}");
        }
        let mut back = vec![0f32; bits.len()];
        f16_to_f32(&bits, &mut back);
        for (&b, &f) in bits.iter().zip(&back) {
            let want = half::f16::from_bits(b).to_f32();
            assert!(f == want || (f.is_nan() && want.is_nan()), "{b:#x}: {f} vs {want}");
        }
        assert_eq!(back[37..41], [65504.0, -65504.0, 65504.0, half::f16::from_f32(6e-8).to_f32()]);
    }

    #[test]
    fn transposed_scores_match_dot_products() {
        for (d, len, stride) in [(8, 1, 1), (16, 70, 75), (40, 130, 130)] {
            let q = data(d, 0.2);
            let keys_t = data((d - 1) * stride + len, 0.8);
            let mut out = vec![0f32; len];
            transposed_scores(&q, &keys_t, stride, &mut out);
            for (j, got) in out.iter().enumerate() {
                let want: f32 = (0..d).map(|c| q[c] * keys_t[c * stride + j]).sum();
                assert!((got - want).abs() < 1e-4, "d {d} len {len} position {j}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        for len in [1, 5, 16, 37] {
            let mut x: Vec<f32> = (0..len).map(|i| (i as f32 * 1.3).sin() * 30.0).collect();
            let want: Vec<f64> = {
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let e: Vec<f64> = x.iter().map(|&v| (v as f64 - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                e.iter().map(|v| v / sum).collect()
            };
            softmax_in_place(&mut x);
            for (got, want) in x.iter().zip(&want) {
                assert!((*got as f64 - want).abs() < 1e-6, "len {len}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn attention_row_kernels_match_plain_loops() {
        let (d, stride, count) = (40, 56, 9);
        let q = data(d, 0.5);
        let rows = data((count - 1) * stride + d, 1.5);
        let mut scores = vec![0f32; count];
        scaled_dots(&q, &rows, stride, 0.25, &mut scores);
        let mut out = vec![0f32; d];
        weighted_sum(&scores, &rows, stride, &mut out);
        for j in 0..count {
            let want: f32 = (0..d).map(|c| q[c] * rows[j * stride + c]).sum::<f32>() * 0.25;
            assert!((scores[j] - want).abs() < 1e-4, "score {j}");
        }
        for c in 0..d {
            let want: f32 = (0..count).map(|j| scores[j] * rows[j * stride + c]).sum();
            assert!((out[c] - want).abs() < 1e-4, "output {c}");
        }
    }

    #[test]
    fn grouped_heads_match_one_head_at_a_time() {
        // Head dims with and without a full 64-lane pass, group sizes across the 4-head blocks, key counts
        // around the 4-key tiles.
        for (d, heads, count) in [(64, 3, 9), (64, 6, 4), (32, 5, 7), (16, 1, 3), (40, 2, 6), (64, 4, 1)] {
            let stride = 3 * d + 8;
            let q = data(heads * d, 0.5);
            let rows = data((count - 1) * stride + d, 1.5);
            let keys = HeadRows { data: &rows, stride, count };
            let out_stride = count + 5;
            let mut scores = vec![0f32; heads * out_stride];
            scaled_dots_heads(&q, heads, keys, 0.125, &mut scores, out_stride);
            let mut out = vec![0f32; heads * d];
            weighted_sum_heads(&scores, out_stride, heads, keys, &mut out);
            for h in 0..heads {
                let mut want = vec![0f32; count];
                scaled_dots(&q[h * d..(h + 1) * d], &rows, stride, 0.125, &mut want);
                let got = &scores[h * out_stride..h * out_stride + count];
                assert_eq!(got, &want[..], "scores of head {h} (d {d}, {heads} heads)");
                let mut want = vec![0f32; d];
                weighted_sum(got, &rows, stride, &mut want);
                assert_eq!(&out[h * d..(h + 1) * d], &want[..], "sum of head {h} (d {d}, {heads} heads)");
            }
        }
    }

    #[test]
    fn dot_rows_sums_as_the_tiles_do() {
        let k = 131;
        let x = data(k, 0.3);
        let w = data(7 * k, 0.6);
        let mut out = vec![0f32; 7];
        dot_rows(&x, &w, k, &mut out);
        for (j, got) in out.iter().enumerate() {
            assert_eq!(*got, dot_tile::<1, 1>(&x, 0, &w[j * k..], 0, k, 0)[0][0], "row {j}");
        }
    }

    #[test]
    fn an_entry_sums_the_same_alone_or_in_a_tile() {
        let k = 300;
        let x = data(4 * k, 0.1);
        let w = data(4 * k, 0.7);
        let tile = dot_tile::<4, 4>(&x, k, &w, k, k, 0);
        for r in 0..4 {
            for c in 0..4 {
                assert_eq!(dot_tile::<1, 1>(&x[r * k..], k, &w[c * k..], k, k, 0)[0][0], tile[r][c]);
            }
        }
    }
}
