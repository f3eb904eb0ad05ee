//! `x @ Wᵀ` with BF16 weights: activations are rounded to BF16 once per
//! product and each dot product runs on AVX-512 BF16's `vdpbf16ps` (two BF16
//! products added into each F32 lane), twice the multiply-adds per
//! instruction of F32 FMA and half the weight bytes.
//!
//! Where the CPU lacks AVX-512 BF16 a portable loop computes the same lanes
//! in the same order (BF16 × BF16 products are exact in F32), so both paths
//! agree to rounding noise. Tiling and threading are
//! [`crate::cpu_linear::run_tiled`]'s.

use rayon::prelude::*;

use crate::cpu_linear::{Tiles, run_tiled};

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

/// Whether this CPU runs the `vdpbf16ps` kernel.
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

/// `out[i][j] = Σ_c bf16(x[i][c]) · w[j][c]` for `x` `[m, k]` F32 and `w`
/// `[n, k]` BF16 bits, returned row-major `[m, n]`.
pub fn matmul(x: &[f32], m: usize, w: &[u16], n: usize, k: usize) -> Vec<f32> {
    matmul_on(x, m, w, n, k, has_simd())
}

/// [`matmul`] on the SIMD kernel or the portable one (tests run both).
pub(crate) fn matmul_on(x: &[f32], m: usize, w: &[u16], n: usize, k: usize, simd: bool) -> Vec<f32> {
    assert!(x.len() == m * k && w.len() == n * k, "bf16 matmul: slices do not match [{m}, {k}] x [{n}, {k}]");
    let mut xb = vec![0u16; m * k];
    let convert = |(o, i): (&mut u16, &f32)| *o = to_bits(*i);
    if m * k >= 1 << 16 {
        xb.par_iter_mut().zip(x.par_iter()).for_each(convert);
    } else {
        xb.iter_mut().zip(x).for_each(convert);
    }
    run_tiled(m, n, &Bf16Tiles { x: &xb, w, k, simd: simd && has_simd() })
}

struct Bf16Tiles<'a> {
    x: &'a [u16],
    w: &'a [u16],
    k: usize,
    simd: bool,
}

impl Tiles for Bf16Tiles<'_> {
    fn tile<const R: usize, const C: usize>(&self, i: usize, j: usize) -> [[f32; C]; R] {
        let k = self.k;
        let (x, w) = (&self.x[i * k..(i + R) * k], &self.w[j * k..(j + C) * k]);
        #[cfg(target_arch = "x86_64")]
        if self.simd {
            // SAFETY: `simd` is only set where `has_simd` holds; `x` holds R rows and `w` C rows of `k` values.
            return unsafe { x86::tile::<R, C>(x.as_ptr(), w.as_ptr(), k) };
        }
        tile_portable::<R, C>(x, w, k)
    }
}

/// The SIMD kernel's arithmetic: lane `l` of each 32-value chunk takes
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
/// paths use the hardware reduction, so the two agree to rounding).
pub(crate) fn reduce(l: [f32; 16]) -> f32 {
    let h: [f32; 8] = std::array::from_fn(|i| l[i] + l[i + 8]);
    let q: [f32; 4] = std::array::from_fn(|i| h[i] + h[i + 4]);
    (q[0] + q[2]) + (q[1] + q[3])
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // Index loops over const bounds unroll into registers.
mod x86 {
    use std::arch::x86_64::*;

    use super::LANES;

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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::test_data::data;

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
    fn both_paths_match_the_rounded_product_for_odd_shapes() {
        for &(m, n, k) in &[(1, 1, 1), (1, 130, 67), (3, 65, 32), (5, 200, 33), (16, 129, 576), (40, 7, 100)] {
            let x = data(m * k, 0.3);
            let w: Vec<u16> = data(n * k, 1.1).into_iter().map(to_bits).collect();
            let want = reference(&x, m, &w, n, k);
            let portable = matmul_on(&x, m, &w, n, k, false);
            let diff = portable.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-4, "portable {m}x{n}x{k}: max difference {diff}");
            if has_simd() {
                let simd = matmul_on(&x, m, &w, n, k, true);
                let diff = simd.iter().zip(&portable).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff < 1e-5, "simd vs portable {m}x{n}x{k}: max difference {diff}");
            }
        }
    }

    #[test]
    fn within_bf16_rounding_of_the_f32_product() {
        let (m, n, k) = (4, 33, 576);
        let (x, wf) = (data(m * k, 0.5), data(n * k, 2.0));
        let w: Vec<u16> = wf.iter().map(|&v| to_bits(v)).collect();
        let exact = crate::cpu_linear::matmul_transposed(&x, m, &wf, n, k);
        let got = matmul(&x, m, &w, n, k);
        // Each term |x·w| < 1 carries an error below 2^-8 (two roundings of
        // 2^-9), of either sign: the sum's error grows like √k, not k.
        let bound = (k as f32).sqrt() * 2f32.powi(-8);
        let diff = got.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff > 0.0 && diff < bound, "max difference {diff} (bound {bound})");
    }

    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let (n, k) = (97, 300);
        let w: Vec<u16> = data(n * k, 2.0).into_iter().map(to_bits).collect();
        let x = data(40 * k, 0.5);
        for m in [16, 40] {
            let batched = matmul(&x[..m * k], m, &w, n, k);
            for i in 0..m {
                let alone = matmul(&x[i * k..(i + 1) * k], 1, &w, n, k);
                assert_eq!(alone, batched[i * n..(i + 1) * n], "row {i} of {m}");
            }
        }
    }
}
