//! `x @ Wᵀ` with BF16 weights (half the bytes of F32): activations are
//! rounded to BF16 once per product, then dotted in F32 on the best kernel
//! the CPU has ([`kernel`]):
//!
//! * AVX-512 BF16: `vdpbf16ps` adds two BF16 products into each F32 lane,
//!   twice the multiply-adds per instruction of F32 FMA.
//! * Widening, where AVX-512 BF16 is missing: each weight chunk is widened
//!   to F32 with two integer ops (a BF16 is the high half of an F32) and fed
//!   to `vfmadd`; the activations are widened once per product. 32-value
//!   chunks on AVX-512F (Skylake-X to Ice Lake, and VMs that hide AVX-512
//!   BF16: measured on one, 256-bit chunks ran prefill at 0.71x llama.cpp's
//!   BF16), 16-value ones on AVX2 + FMA (Haswell / Zen 1 to Zen 3).
//! * A portable loop, the reference arithmetic (and orders of magnitude
//!   slower).
//!
//! BF16 × BF16 products are exact in F32, so the kernels differ only in the
//! order of the additions and agree to rounding noise; each sums every entry
//! in one order whatever the batch. Tiling and threading are
//! [`crate::cpu_linear::run_tiled`]'s.

use rayon::prelude::*;

use super::Kernel;
use crate::cpu_linear::{Tiles, row_in_tiles, run_tiled, store};

/// BF16 values per 512-bit vector.
const LANES: usize = 32;

/// Round to nearest even, as `half::bf16::from_f32` (the weights) and
/// `vcvtne2ps2bf16` do; NaN stays a (quiet) NaN.
pub fn to_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

pub fn from_bits(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// Whether this CPU runs the AVX-512 BF16 (`vdpbf16ps`) kernel.
pub fn has_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The kernel [`matmul`] runs on this CPU.
pub fn kernel() -> Kernel {
    Kernel::best(has_simd())
}

/// `out[i][j] = Σ_c bf16(x[i][c]) · w[j][c]` for `x` `[m, k]` F32 and `w`
/// `[n, k]` BF16 bits, returned row-major `[m, n]`.
pub fn matmul(x: &[f32], m: usize, w: &[u16], n: usize, k: usize) -> Vec<f32> {
    matmul_on(x, m, w, n, k, kernel())
}

/// [`matmul`] on a given kernel (tests and benchmarks run each one). A
/// kernel this CPU lacks falls back to the best one below it it has.
pub(crate) fn matmul_on(x: &[f32], m: usize, w: &[u16], n: usize, k: usize, kernel: Kernel) -> Vec<f32> {
    assert!(x.len() == m * k && w.len() == n * k, "bf16 matmul: slices do not match [{m}, {k}] x [{n}, {k}]");
    let kernel = kernel.supported(has_simd());
    let step = widening_step();
    matmul_with(x, m, w, n, k, kernel, step)
}

/// [`matmul_on`] with the widening kernel's step chosen (tests run both).
fn matmul_with(x: &[f32], m: usize, w: &[u16], n: usize, k: usize, kernel: Kernel, step: usize) -> Vec<f32> {
    let (mut xb, mut xf) = (Vec::new(), Vec::new());
    if kernel == Kernel::Avx2 {
        // The widening tile reads the activations as F32 (their BF16 values),
        // de-interleaved as it widens the weights: converted here once
        // rather than in every tile.
        xf = vec![0f32; m * k];
        let convert = |(o, i): (&mut [f32], &[f32])| widen_row(i, o, step);
        if m * k >= 1 << 16 {
            xf.par_chunks_mut(k.max(1)).zip(x.par_chunks(k.max(1))).for_each(convert);
        } else {
            xf.chunks_mut(k.max(1)).zip(x.chunks(k.max(1))).for_each(convert);
        }
    } else {
        xb = vec![0u16; m * k];
        let convert = |(o, i): (&mut u16, &f32)| *o = to_bits(*i);
        if m * k >= 1 << 16 {
            xb.par_iter_mut().zip(x.par_iter()).for_each(convert);
        } else {
            xb.iter_mut().zip(x).for_each(convert);
        }
    }
    run_tiled(m, n, &Bf16Tiles { x: &xb, xf: &xf, w, k, kernel, step })
}

/// Values per widening step: one load of BF16 weights, widened into an F32
/// vector of its even-indexed values and one of its odd-indexed ones;
/// 256-bit loads on AVX2, 512-bit ones on AVX-512F.
const AVX2_STEP: usize = 16;
const AVX512F_STEP: usize = 32;

/// The widening kernel's step on this CPU.
fn widening_step() -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return AVX512F_STEP;
    }
    AVX2_STEP
}

/// One activation row as the widening tile reads it: each value rounded to
/// BF16 and widened back, each full `step`-value chunk stored as its
/// even-indexed values then its odd-indexed ones; the tail as it is.
fn widen_row(x: &[f32], out: &mut [f32], step: usize) {
    let full = x.len() / step * step;
    for (xs, os) in x[..full].chunks_exact(step).zip(out[..full].chunks_exact_mut(step)) {
        for l in 0..step / 2 {
            os[l] = from_bits(to_bits(xs[2 * l]));
            os[l + step / 2] = from_bits(to_bits(xs[2 * l + 1]));
        }
    }
    for (o, &v) in out[full..].iter_mut().zip(&x[full..]) {
        *o = from_bits(to_bits(v));
    }
}

struct Bf16Tiles<'a> {
    /// Activations as BF16 bits, for the AVX-512 and portable kernels.
    x: &'a [u16],
    /// Activations as [`widen_row`] lays them out, for the widening kernel.
    xf: &'a [f32],
    w: &'a [u16],
    k: usize,
    /// The widening kernel's step ([`AVX2_STEP`] or [`AVX512F_STEP`]).
    step: usize,
    /// One that this CPU runs ([`Kernel::supported`]).
    kernel: Kernel,
}

impl Tiles for Bf16Tiles<'_> {
    fn tile<const R: usize, const C: usize>(&self, i: usize, j: usize, out: &mut [&mut [f32]], at: (usize, usize)) {
        let k = self.k;
        let w = &self.w[j * k..(j + C) * k];
        let tile = match self.kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => {
                let x = &self.x[i * k..(i + R) * k];
                // SAFETY: `Kernel::supported` chose Avx512 only where `has_simd` holds; `x` holds R rows and `w` C rows of `k` values.
                unsafe { x86::tile::<R, C>(x.as_ptr(), w.as_ptr(), k) }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                let x = &self.xf[i * k..(i + R) * k];
                if self.step == AVX512F_STEP {
                    // SAFETY: `widening_step` chose this step only where AVX-512F is present; `x` holds R rows and
                    // `w` C rows of `k` values.
                    unsafe { x86::tile_avx512f::<R, C>(x.as_ptr(), w.as_ptr(), k) }
                } else {
                    // SAFETY: `Kernel::supported` chose Avx2 only where AVX2 and FMA are present; `x` holds R rows and `w` C rows of `k` values.
                    unsafe { x86::tile_avx2::<R, C>(x.as_ptr(), w.as_ptr(), k) }
                }
            }
            _ => tile_portable::<R, C>(&self.x[i * k..(i + R) * k], w, k),
        };
        store(out, at, &tile);
    }

    /// One input row (batch-1 decode, memory-bound): on AVX-512 the weight
    /// rows one after another, a single sequential stream the hardware
    /// prefetchers follow, instead of five rows side by side (five short
    /// streams); each entry summed as in [`Tiles::tile`]. Measured: the
    /// five-row tile streamed SmolLM2's BF16 weights at ~18 GB/s where F32's
    /// row-at-a-time kernel reached ~26 on the same machine.
    fn row(&self, i: usize, j: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.kernel == Kernel::Avx512 {
            let k = self.k;
            let (x, w) = (&self.x[i * k..(i + 1) * k], &self.w[j * k..(j + out.len()) * k]);
            for (c, o) in out.iter_mut().enumerate() {
                // SAFETY: `Kernel::supported` chose Avx512 only where `has_simd` holds; `x` holds one row and
                // `w` `out.len()` rows of `k` values, so row `c` is inside it.
                *o = unsafe { x86::tile::<1, 1>(x.as_ptr(), w.as_ptr().add(c * k), k) }[0][0];
            }
            return;
        }
        row_in_tiles(self, i, j, out);
    }
}

/// The AVX-512 kernel's arithmetic: lane `l` of each 32-value chunk takes
/// values `2l + 1` then `2l` (as `vdpbf16ps` does), and the 16 lanes are
/// summed by [`reduce`].
fn tile_portable<const R: usize, const C: usize>(x: &[u16], w: &[u16], k: usize) -> [[f32; C]; R] {
    let mut out = [[0f32; C]; R];
    for (r, out_r) in out.iter_mut().enumerate() {
        let xr = &x[r * k..(r + 1) * k];
        for (c, o) in out_r.iter_mut().enumerate() {
            let wc = &w[c * k..(c + 1) * k];
            let mut lanes = [0f32; 16];
            for (xs, ws) in xr.chunks(LANES).zip(wc.chunks(LANES)) {
                for (l, lane) in lanes.iter_mut().enumerate() {
                    for e in [2 * l + 1, 2 * l] {
                        if e < xs.len() {
                            *lane = from_bits(xs[e]).mul_add(from_bits(ws[e]), *lane);
                        }
                    }
                }
            }
            *o = reduce(lanes);
        }
    }
    out
}

/// The portable path's sum of its 16 lanes (a fixed tree order; the SIMD
/// kernels sum theirs in their own orders, so all agree to rounding).
pub(crate) fn reduce(l: [f32; 16]) -> f32 {
    let h: [f32; 8] = std::array::from_fn(|i| l[i] + l[i + 8]);
    let q: [f32; 4] = std::array::from_fn(|i| h[i] + h[i + 4]);
    (q[0] + q[2]) + (q[1] + q[3])
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // Index loops over const bounds unroll into registers.
mod x86 {
    use std::arch::x86_64::*;

    use super::{AVX2_STEP, AVX512F_STEP, LANES};

    /// # Safety
    /// AVX-512F, BW, VL and BF16 must be available; `x` must hold `R · k`
    /// values and `w` `C · k`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn tile<const R: usize, const C: usize>(x: *const u16, w: *const u16, k: usize) -> [[f32; C]; R] {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut wv = [_mm512_setzero_si512(); C];
        let mut p = 0;
        while p < k {
            // A masked tail keeps the lanes' order; masked-off values load as zero.
            let mask: __mmask32 = if k - p >= LANES { u32::MAX } else { (1u32 << (k - p)) - 1 };
            // SAFETY (whole block): masked loads touch only `p..k` of each row; prefetches never fault.
            unsafe {
                for c in 0..C {
                    // Weights stream from memory once per step: fetch the next tile's rows meanwhile.
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((c + C) * k + p) as *const i8);
                    wv[c] = _mm512_maskz_loadu_epi16(mask, w.add(c * k + p) as *const i16);
                }
                for r in 0..R {
                    let xv: __m512bh =
                        std::mem::transmute(_mm512_maskz_loadu_epi16(mask, x.add(r * k + p) as *const i16));
                    for c in 0..C {
                        let wc: __m512bh = std::mem::transmute(wv[c]);
                        acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wc);
                    }
                }
            }
            p += LANES;
        }
        let mut out = [[0f32; C]; R];
        for r in 0..R {
            for c in 0..C {
                // The hardware reduction: copying the accumulators out to sum them
                // in `reduce`'s order made LLVM keep them in memory (measured 2-3x slower).
                out[r][c] = _mm512_reduce_add_ps(acc[r][c]);
            }
        }
        out
    }

    /// The widening kernel on AVX-512F: per 32-value step each weight row's
    /// 64 bytes widened into its even- and odd-indexed values (a shift and a
    /// mask), the even halves of all `C` rows first, then the odd ones, so a
    /// 5 × 5 tile's 25 accumulators, 5 widened vectors and an input vector
    /// fit the 32 registers. Every entry's order: its accumulator's lanes
    /// step by step (even values, then odd), `_mm512_reduce_add_ps`, then
    /// the tail in order, whatever `R` and `C` are.
    ///
    /// # Safety
    /// AVX-512F must be available; `x` must hold `R · k` values laid out by
    /// [`super::widen_row`] with [`AVX512F_STEP`] and `w` `C · k`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_avx512f<const R: usize, const C: usize>(
        x: *const f32,
        w: *const u16,
        k: usize,
    ) -> [[f32; C]; R] {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        let full = k / AVX512F_STEP * AVX512F_STEP;
        let mut p = 0;
        while p < full {
            // SAFETY (whole block): `p + 32 <= k`, so each load reads within its row; prefetches never fault.
            unsafe {
                let mut wide = [_mm512_setzero_ps(); C];
                for c in 0..C {
                    // Weights stream from memory once per step: fetch the next tile's rows meanwhile.
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((c + C) * k + p) as *const i8);
                    let v = _mm512_loadu_si512(w.add(c * k + p) as *const __m512i);
                    wide[c] = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                }
                for r in 0..R {
                    let xe = _mm512_loadu_ps(x.add(r * k + p));
                    for c in 0..C {
                        acc[r][c] = _mm512_fmadd_ps(xe, wide[c], acc[r][c]);
                    }
                }
                for c in 0..C {
                    let v = _mm512_loadu_si512(w.add(c * k + p) as *const __m512i);
                    wide[c] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
                }
                for r in 0..R {
                    let xo = _mm512_loadu_ps(x.add(r * k + p + AVX512F_STEP / 2));
                    for c in 0..C {
                        acc[r][c] = _mm512_fmadd_ps(xo, wide[c], acc[r][c]);
                    }
                }
            }
            p += AVX512F_STEP;
        }
        let mut out = [[0f32; C]; R];
        for r in 0..R {
            for c in 0..C {
                // SAFETY: rows `r` of `x` and `c` of `w` hold `k` values (caller).
                out[r][c] = unsafe { add_tail(_mm512_reduce_add_ps(acc[r][c]), x.add(r * k), w.add(c * k), full, k) };
            }
        }
        out
    }

    /// `sum` plus the products of values `full..k` of an activation row and
    /// a weight row, in order: the widening kernels' tail past their last
    /// full step.
    ///
    /// # Safety
    /// `x` and `w` must hold `k` values.
    #[inline]
    unsafe fn add_tail(mut sum: f32, x: *const f32, w: *const u16, full: usize, k: usize) -> f32 {
        for e in full..k {
            // SAFETY: `e < k`.
            sum = unsafe { (*x.add(e)).mul_add(super::from_bits(*w.add(e)), sum) };
        }
        sum
    }

    /// # Safety
    /// AVX2 and FMA must be available; `x` must hold `R · k` values laid out
    /// by [`super::widen_row`] and `w` `C · k`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_avx2<const R: usize, const C: usize>(x: *const f32, w: *const u16, k: usize) -> [[f32; C]; R] {
        let mut out = [[0f32; C]; R];
        // AVX2 has 16 registers: a 5 × 5 tile's 25 accumulators would live
        // in memory. Two input rows at a time (10 accumulators, 2 widened
        // weight vectors) stay in registers; the weight tile (5 rows of
        // `k` BF16) is re-read from L1 for each pair.
        let mut r = 0;
        while r + 2 <= R {
            // SAFETY: rows `r` and `r + 1` are within `x`'s R rows.
            let rows = unsafe { rows_avx2::<2, C>(x.add(r * k), w, k, r == 0) };
            out[r..r + 2].copy_from_slice(&rows);
            r += 2;
        }
        if r < R {
            // SAFETY: row `r` is within `x`'s R rows.
            out[r] = unsafe { rows_avx2::<1, C>(x.add(r * k), w, k, r == 0) }[0];
        }
        out
    }

    /// [`tile_avx2`] for `G` input rows; `prefetch` fetches the next weight
    /// tile (the first group of a tile asks, later ones find it in cache).
    /// Every entry is summed in one order whatever `G` and `C` are: its
    /// accumulator's lanes step by step (even values, then odd), [`hsum`],
    /// then the tail in order.
    ///
    /// # Safety
    /// As [`tile_avx2`], for `G` rows of `x`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_avx2<const G: usize, const C: usize>(
        x: *const f32,
        w: *const u16,
        k: usize,
        prefetch: bool,
    ) -> [[f32; C]; G] {
        let mut acc = [[_mm256_setzero_ps(); C]; G];
        let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        let full = k / AVX2_STEP * AVX2_STEP;
        let mut p = 0;
        while p < full {
            // SAFETY (whole block): `p + 16 <= k`, so each load reads within
            // its row; prefetches never fault.
            unsafe {
                for c in 0..C {
                    if prefetch && p % 32 == 0 {
                        // Weights stream from memory once per step: fetch the next tile's rows meanwhile (one 64-byte line per 32 values).
                        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((c + C) * k + p) as *const i8);
                    }
                    let v = _mm256_loadu_si256(w.add(c * k + p) as *const __m256i);
                    // Lane `l` holds values 2l (low half) and 2l + 1 (high
                    // half); a BF16 is the high half of its F32.
                    let even = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
                    let odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
                    for r in 0..G {
                        let xe = _mm256_loadu_ps(x.add(r * k + p));
                        let xo = _mm256_loadu_ps(x.add(r * k + p + AVX2_STEP / 2));
                        acc[r][c] = _mm256_fmadd_ps(xe, even, acc[r][c]);
                        acc[r][c] = _mm256_fmadd_ps(xo, odd, acc[r][c]);
                    }
                }
            }
            p += AVX2_STEP;
        }
        let mut out = [[0f32; C]; G];
        for r in 0..G {
            for c in 0..C {
                // SAFETY: rows `r` of `x` and `c` of `w` hold `k` values (caller).
                out[r][c] = unsafe { add_tail(hsum(acc[r][c]), x.add(r * k), w.add(c * k), full, k) };
            }
        }
        out
    }

    /// The 8 lanes' sum in a fixed order, without leaving registers.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::test_data::data;

    /// Every kernel this CPU runs, the widening one at each step it has, with its step.
    fn runs() -> Vec<(Kernel, usize)> {
        let mut runs = Vec::new();
        for kernel in Kernel::available(has_simd()) {
            runs.push((kernel, AVX2_STEP));
            if kernel == Kernel::Avx2 && widening_step() == AVX512F_STEP {
                runs.push((kernel, AVX512F_STEP));
            }
        }
        runs
    }

    /// The exact product of the BF16-rounded operands, in F64.
    fn reference(x: &[f32], m: usize, w: &[u16], n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|c| f64::from(from_bits(to_bits(x[i * k + c]))) * f64::from(from_bits(w[j * k + c])))
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn rounds_to_nearest_even() {
        assert_eq!(to_bits(1.0), 0x3F80);
        // 1 + 2^-8 is halfway between two BF16 values: ties go to the even one (1.0).
        assert_eq!(to_bits(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(to_bits(1.0 + 3.0 / 256.0), 0x3F82);
        assert_eq!(to_bits(-2.5), 0xC020);
        assert!(from_bits(to_bits(f32::NAN)).is_nan());
        assert_eq!(from_bits(to_bits(f32::INFINITY)), f32::INFINITY);
    }

    #[test]
    fn every_kernel_matches_the_rounded_product_for_odd_shapes() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 130, 67),
            (3, 65, 32),
            (5, 200, 33),
            (16, 129, 576),
            (40, 7, 100),
            (2, 11, 15),
            (7, 13, 48),
        ] {
            let x = data(m * k, 0.3);
            let w: Vec<u16> = data(n * k, 1.1).into_iter().map(to_bits).collect();
            let want = reference(&x, m, &w, n, k);
            let portable = matmul_on(&x, m, &w, n, k, Kernel::Portable);
            let diff = portable.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-4, "portable {m}x{n}x{k}: max difference {diff}");
            for (kernel, step) in runs() {
                let got = matmul_with(&x, m, &w, n, k, kernel, step);
                let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff < 1e-4, "{kernel:?} (step {step}) {m}x{n}x{k}: max difference {diff}");
                // AVX-512 sums the portable loop's lanes (only the final
                // reduction differs); AVX2's 8 lanes are an order of their own,
                // held to the reference's bound above.
                if kernel == Kernel::Avx512 {
                    let diff = got.iter().zip(&portable).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    assert!(diff < 1e-5, "{kernel:?} vs portable {m}x{n}x{k}: max difference {diff}");
                }
            }
        }
    }

    #[test]
    fn within_bf16_rounding_of_the_f32_product() {
        let (m, n, k) = (4, 33, 576);
        let (x, wf) = (data(m * k, 0.5), data(n * k, 2.0));
        let w: Vec<u16> = wf.iter().map(|&v| to_bits(v)).collect();
        let exact = crate::cpu_linear::matmul_transposed(&x, m, &wf, n, k);
        // Each term |x·w| < 1 carries an error below 2^-8 (two roundings of
        // 2^-9), of either sign: the sum's error grows like √k, not k.
        let bound = (k as f32).sqrt() * 2f32.powi(-8);
        for (kernel, step) in runs() {
            let got = matmul_with(&x, m, &w, n, k, kernel, step);
            let diff = got.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff > 0.0 && diff < bound, "{kernel:?} (step {step}): max difference {diff} (bound {bound})");
        }
    }

    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let (n, k) = (97, 300);
        let w: Vec<u16> = data(n * k, 2.0).into_iter().map(to_bits).collect();
        let x = data(40 * k, 0.5);
        for (kernel, step) in runs() {
            for m in [16, 40] {
                let batched = matmul_with(&x[..m * k], m, &w, n, k, kernel, step);
                for i in 0..m {
                    let alone = matmul_with(&x[i * k..(i + 1) * k], 1, &w, n, k, kernel, step);
                    assert_eq!(alone, batched[i * n..(i + 1) * n], "{kernel:?} (step {step}): row {i} of {m}");
                }
            }
        }
    }
}
