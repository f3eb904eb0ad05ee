//! `x @ Wᵀ` with BF16 weights (half the bytes of F32): activations are
//! rounded to BF16 once per product, then dotted in F32 on the best kernel
//! the CPU has ([`kernel`]).
//!
//! **Layout.** Weights are packed at load into [`super::panel`]'s panels of
//! 16 interleaved rows, in 4-byte words of two BF16 values (elements `2t`
//! and `2t + 1` of a row, the first in the low half; an odd `k` ends in a
//! half-empty word): word `t` of a panel's row `r` at `4 p · t + 4 r`. One
//! 64-byte load holds a word of each of 16 rows and an input row's word is
//! broadcast, so each F32 lane accumulates one weight row's dot and 16
//! results are stored as a vector, with no horizontal sums (the 5 × 5
//! register tiles before spent about a third of their instructions on the
//! 25 sums per tile with SmolLM2's 576-wide rows). Where a task has two
//! whole panels left, `vdpbf16ps` passes take both: each broadcast word
//! then feeds two products, and 24 accumulators keep the unit busy (prefill
//! 128 on a Zen 4: 1029/1056/959 -> 1415/1376 tok/s). The carrier is a `U8`
//! tensor `[n, row_bytes(k)]`, which candle's own ops refuse.
//!
//! **Kernels.**
//! * AVX-512 BF16: `vdpbf16ps` adds a word's two products into each lane.
//! * Widening, where AVX-512 BF16 is missing: each word vector becomes the
//!   F32 vectors of its odd- and even-indexed values (a mask and a shift: a
//!   BF16 is the high half of an F32), each fed to `vfmadd` with the
//!   activation broadcast; 16 rows a vector on AVX-512F (Skylake-X to Ice
//!   Lake, and VMs that hide AVX-512 BF16), 8 on AVX2 + FMA (Haswell / Zen 1
//!   to Zen 3).
//! * A portable loop, the reference arithmetic.
//!
//! BF16 × BF16 products are exact in F32, and every kernel adds a word's
//! odd product, then its even one, into the entry's sum in word order (as
//! `vdpbf16ps` does, one rounding each): the widening kernels and the
//! portable loop agree bit for bit, `vdpbf16ps` up to its flushing of
//! subnormals; and an entry's sum does not depend on its batch.

use rayon::prelude::*;

use super::Kernel;
use super::panel::{PANEL, PanelKernel, Panels};
use crate::cpu_linear::run_tiled;

/// Input rows per pass over a pair of panels: 2 × 12 accumulators, two
/// weight vectors and a broadcast fill 27 of the 32 registers.
const PAIR_ROWS: usize = 12;

/// Round to nearest even, as `half::bf16::from_f32` and `vcvtne2ps2bf16`
/// do; NaN stays a (quiet) NaN.
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

/// Two-value words per row of `k`.
fn words(k: usize) -> usize {
    k.div_ceil(2)
}

/// Bytes of one packed row of `k` weights: whole 4-byte words.
pub fn row_bytes(k: usize) -> usize {
    4 * words(k)
}

/// Where element `e` of a panel of `p` rows' row `r` sits (its 2 bytes).
fn place(p: usize, r: usize, e: usize) -> usize {
    4 * p * (e / 2) + 4 * r + 2 * (e % 2)
}

/// Packs `values` `[n, k]` (row-major F32), each rounded to BF16
/// ([`to_bits`]), into panels of `n` rows of [`row_bytes`].
pub fn pack(values: &[f32], n: usize, k: usize) -> Vec<u8> {
    assert_eq!(values.len(), n * k, "bf16 pack: {} values for [{n}, {k}]", values.len());
    let bytes = row_bytes(k);
    let mut out = vec![0u8; n * bytes];
    if k == 0 {
        return out;
    }
    out.par_chunks_mut(PANEL * bytes).zip(values.par_chunks(PANEL * k)).for_each(|(panel, values)| {
        let p = values.len() / k;
        for (r, row) in values.chunks_exact(k).enumerate() {
            for (e, &v) in row.iter().enumerate() {
                let at = place(p, r, e);
                panel[at..at + 2].copy_from_slice(&to_bits(v).to_le_bytes());
            }
        }
    });
    out
}

/// `out[i][j] = Σ_c bf16(x[i][c]) · w[j][c]` for `x` `[m, k]` F32 and `w`
/// packed by [`pack`] (`n` rows), returned row-major `[m, n]`.
pub fn matmul(x: &[f32], m: usize, w: &[u8], n: usize, k: usize) -> Vec<f32> {
    matmul_on(x, m, w, n, k, kernel())
}

/// [`matmul`] on a given kernel (tests and benchmarks run each one). A
/// kernel this CPU lacks falls back to the best one below it it has.
pub(crate) fn matmul_on(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, kernel: Kernel) -> Vec<f32> {
    matmul_with(x, m, w, n, k, kernel.supported(has_simd()), widening_is_avx512f())
}

/// Whether the widening kernel runs on 512-bit vectors here.
fn widening_is_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`matmul_on`] with the kernel checked and the widening kernel's width
/// chosen (tests run both where the CPU has AVX-512F).
fn matmul_with(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, kernel: Kernel, wide: bool) -> Vec<f32> {
    assert!(
        x.len() == m * k && w.len() == n * row_bytes(k),
        "bf16 matmul: slices do not match [{m}, {k}] x packed [{n}, {k}]"
    );
    if k == 0 {
        return vec![0f32; m * n];
    }
    // Activations as whole words (an odd row padded with a zero): BF16 bits
    // for `vdpbf16ps` and the portable loop, their F32 values for widening.
    let (xb, xf) = if kernel == Kernel::Avx2 {
        (Vec::new(), words_of(x, m, k, |v| from_bits(to_bits(v))))
    } else {
        (words_of(x, m, k, to_bits), Vec::new())
    };
    run_tiled(m, n, &Panels(Bf16Panels { xb: &xb, xf: &xf, w, n, k, kernel, wide }))
}

/// `m` rows of `k` activations converted by `convert`, each row padded with
/// zeros to whole words (`2 · words(k)` values), in parallel when large.
fn words_of<T: Copy + Default + Send>(x: &[f32], m: usize, k: usize, convert: impl Fn(f32) -> T + Sync) -> Vec<T> {
    let kw = 2 * words(k);
    let mut out = vec![T::default(); m * kw];
    let row = |(o, i): (&mut [T], &[f32])| o.iter_mut().zip(i).for_each(|(o, &v)| *o = convert(v));
    if m * k >= 1 << 16 {
        out.par_chunks_mut(kw).zip(x.par_chunks(k)).for_each(row);
    } else {
        out.chunks_mut(kw).zip(x.chunks(k)).for_each(row);
    }
    out
}

struct Bf16Panels<'a> {
    /// Activations as BF16 bits `[m, 2 · words(k)]`, for `vdpbf16ps` and the portable loop.
    xb: &'a [u16],
    /// Activations as F32 values of BF16 `[m, 2 · words(k)]`, for the widening kernels.
    xf: &'a [f32],
    w: &'a [u8],
    n: usize,
    k: usize,
    /// One that this CPU runs ([`Kernel::supported`]).
    kernel: Kernel,
    /// Widening on AVX-512F rather than AVX2.
    wide: bool,
}

impl PanelKernel for Bf16Panels<'_> {
    fn weight_rows(&self) -> usize {
        self.n
    }

    /// Up to 8, in two equal blocks rather than a full and a short one: each
    /// input row's sum is one chain of dependent multiply-adds as long as the
    /// row, so a pass needs several rows to keep the unit busy (with the
    /// integer kernels' blocks of 5, 16 rows ran as 5 + 5 + 4 + 2).
    fn input_rows(left: usize) -> usize {
        match left {
            0..=8 => left,
            9..16 => left.div_ceil(2),
            _ => 8,
        }
    }

    const PAIRS: bool = true;

    /// As few passes as fit [`PAIR_ROWS`], all of (nearly) equal size: a
    /// prefill task's 35 rows run as 12 + 12 + 11, not 12 + 12 + 8 + 3.
    fn pair_rows(left: usize) -> usize {
        left.div_ceil(left.div_ceil(PAIR_ROWS).max(1))
    }

    fn pair<const R: usize>(&self, i: usize, start: usize, out: &mut [&mut [f32]], b: usize) {
        self.panels::<2, R>(i, start, PANEL, out, b);
    }

    fn panel<const R: usize>(&self, i: usize, start: usize, p: usize, out: &mut [&mut [f32]], b: usize) {
        self.panels::<1, R>(i, start, p, out, b);
    }
}

impl Bf16Panels<'_> {
    /// Input rows `i..i + R` against `P` consecutive panels of `p` rows from
    /// `start` (two only when whole), written to `out[r][b..b + P · p]`:
    /// `vdpbf16ps` runs them in one pass, the other kernels one at a time.
    fn panels<const P: usize, const R: usize>(
        &self,
        i: usize,
        start: usize,
        p: usize,
        out: &mut [&mut [f32]],
        b: usize,
    ) {
        let (kw, bytes) = (2 * words(self.k), row_bytes(self.k));
        let panels = &self.w[start * bytes..(start + P * p) * bytes];
        let rows = i * kw..(i + R) * kw;
        #[cfg(target_arch = "x86_64")]
        if self.kernel == Kernel::Avx512 {
            // SAFETY: the CPU has AVX-512 BF16 (`Kernel::supported`); the activations hold R rows of kw values
            // from row i, `panels` P panels of p packed rows, and each output row P · p values from `b`
            // (checked by `Panels`).
            return unsafe { x86::panels::<P, R>(self.xb[rows].as_ptr(), kw, panels.as_ptr(), p, out, b) };
        }
        for (q, panel) in panels.chunks_exact(p * bytes).enumerate() {
            let b = b + q * p;
            match self.kernel {
                // SAFETY (both): the CPU has the kernel (`Kernel::supported`, `widening_is_avx512f`); as above,
                // for one panel.
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2 if self.wide => unsafe {
                    x86::panel_avx512f::<R>(self.xf[rows.clone()].as_ptr(), kw, panel.as_ptr(), p, out, b)
                },
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2 => unsafe {
                    x86::panel_avx2::<R>(self.xf[rows.clone()].as_ptr(), kw, panel.as_ptr(), p, out, b)
                },
                _ => panel_portable::<R>(&self.xb[rows.clone()], kw, panel, p, out, b),
            }
        }
    }
}

/// The kernels' arithmetic: per entry, word by word, the odd value's
/// product and then the even one's added with one rounding each.
fn panel_portable<const R: usize>(x: &[u16], kw: usize, panel: &[u8], p: usize, out: &mut [&mut [f32]], b0: usize) {
    let value = |at: usize| from_bits(u16::from_le_bytes([panel[at], panel[at + 1]]));
    for (r, out_row) in out.iter_mut().enumerate().take(R) {
        let x = &x[r * kw..(r + 1) * kw];
        for (c, o) in out_row[b0..b0 + p].iter_mut().enumerate() {
            let mut acc = 0f32;
            for t in 0..kw / 2 {
                acc = from_bits(x[2 * t + 1]).mul_add(value(place(p, c, 2 * t + 1)), acc);
                acc = from_bits(x[2 * t]).mul_add(value(place(p, c, 2 * t)), acc);
            }
            *o = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // Index loops over const bounds unroll into registers.
mod x86 {
    use std::arch::x86_64::*;

    use super::super::panel::masks::{HALF, half_rows, rows_mask, store_half};

    /// Words ahead of the one being multiplied that a panel prefetches (one
    /// 64-byte line per word of a full panel; a task's panels are contiguous).
    const PREFETCH_WORDS: usize = 16;

    /// `R` input rows (BF16 bits, `kw` per row) against `P` consecutive
    /// panels of `p` rows, written to `out[r][b0..b0 + P · p]`: with two
    /// panels each broadcast word feeds two products.
    ///
    /// # Safety
    /// AVX-512F, BW, VL and BF16 must be available; `x` must hold `R · kw`
    /// values, `panels` `P` packed panels of `p ≤ 16` rows of `kw / 2`
    /// words, and `out` `R` rows of at least `b0 + P · p` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn panels<const P: usize, const R: usize>(
        x: *const u16,
        kw: usize,
        panels: *const u8,
        p: usize,
        out: &mut [&mut [f32]],
        b0: usize,
    ) {
        let rows = rows_mask(p);
        // A panel of p rows takes p · 2 kw bytes. (A loop, not `array::from_fn`: closures do not inherit the
        // target features and stay calls.)
        let mut starts = [panels; P];
        for q in 0..P {
            starts[q] = panels.wrapping_add(q * 2 * p * kw);
        }
        let mut acc = [[_mm512_setzero_ps(); R]; P];
        for t in 0..kw / 2 {
            // SAFETY (whole block): the masked loads read word t of each panel's p rows, the broadcasts word t
            // of each input row (caller); prefetches never fault.
            unsafe {
                let mut w = [_mm512_setzero_si512(); P];
                for q in 0..P {
                    _mm_prefetch::<_MM_HINT_T0>(starts[q].wrapping_add(4 * p * (t + PREFETCH_WORDS)) as *const i8);
                    w[q] = _mm512_maskz_loadu_epi32(rows, starts[q].add(4 * p * t) as *const i32);
                }
                for r in 0..R {
                    let xw = (x.add(r * kw + 2 * t) as *const i32).read_unaligned();
                    let xb = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(xw));
                    for q in 0..P {
                        acc[q][r] = _mm512_dpbf16_ps(acc[q][r], xb, std::mem::transmute::<__m512i, __m512bh>(w[q]));
                    }
                }
            }
        }
        for r in 0..R {
            for q in 0..P {
                // SAFETY: row `r` holds `P · p` values from `b0` (caller); the masked store writes only panel q's.
                unsafe { _mm512_mask_storeu_ps(out[r].as_mut_ptr().add(b0 + q * p), rows, acc[q][r]) };
            }
        }
    }

    /// The widening kernel on AVX-512F: each word vector split into the F32
    /// vectors of its odd and even values, added odd first.
    ///
    /// # Safety
    /// AVX-512F must be available; `x` must hold `R · kw` F32 values,
    /// otherwise as [`panels`] for one panel.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn panel_avx512f<const R: usize>(
        x: *const f32,
        kw: usize,
        panel: *const u8,
        p: usize,
        out: &mut [&mut [f32]],
        b0: usize,
    ) {
        let rows = rows_mask(p);
        let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        let mut acc = [_mm512_setzero_ps(); R];
        for t in 0..kw / 2 {
            // SAFETY (whole block): as in `panels`.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(panel.wrapping_add(4 * p * (t + PREFETCH_WORDS)) as *const i8);
                let v = _mm512_maskz_loadu_epi32(rows, panel.add(4 * p * t) as *const i32);
                let (odd, even) =
                    (_mm512_castsi512_ps(_mm512_and_si512(v, high)), _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)));
                for r in 0..R {
                    acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(*x.add(r * kw + 2 * t + 1)), odd, acc[r]);
                    acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(*x.add(r * kw + 2 * t)), even, acc[r]);
                }
            }
        }
        for r in 0..R {
            // SAFETY: as in `panels`.
            unsafe { _mm512_mask_storeu_ps(out[r].as_mut_ptr().add(b0), rows, acc[r]) };
        }
    }

    /// The widening kernel on AVX2 + FMA: a panel as two halves of 8 rows.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; otherwise as [`panel_avx512f`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn panel_avx2<const R: usize>(
        x: *const f32,
        kw: usize,
        panel: *const u8,
        p: usize,
        out: &mut [&mut [f32]],
        b0: usize,
    ) {
        let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        for half in 0..2 {
            let (lanes, mask) = half_rows(p, half);
            if lanes == 0 {
                break;
            }
            let mut acc = [_mm256_setzero_ps(); R];
            for t in 0..kw / 2 {
                // SAFETY (whole block): the masked load reads word t of the half's rows (caller).
                unsafe {
                    let v = _mm256_maskload_epi32(panel.add(4 * p * t + 4 * HALF * half) as *const i32, mask);
                    let (odd, even) = (
                        _mm256_castsi256_ps(_mm256_and_si256(v, high)),
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)),
                    );
                    for r in 0..R {
                        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(*x.add(r * kw + 2 * t + 1)), odd, acc[r]);
                        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(*x.add(r * kw + 2 * t)), even, acc[r]);
                    }
                }
            }
            for r in 0..R {
                store_half(out[r], b0 + HALF * half, lanes, acc[r]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::test_data::data;

    /// The BF16 bits of weight `(j, e)` of a packed matrix of `n` rows of `k`.
    fn weight(w: &[u8], n: usize, k: usize, j: usize, e: usize) -> u16 {
        let start = j / PANEL * PANEL;
        let p = PANEL.min(n - start);
        let at = start * row_bytes(k) + place(p, j - start, e);
        u16::from_le_bytes([w[at], w[at + 1]])
    }

    /// Every kernel this CPU runs, the widening one at each width it has.
    fn runs() -> Vec<(Kernel, bool)> {
        let mut runs = Vec::new();
        for kernel in Kernel::available(has_simd()) {
            runs.push((kernel, false));
            if kernel == Kernel::Avx2 && widening_is_avx512f() {
                runs.push((kernel, true));
            }
        }
        runs
    }

    /// The exact product of the BF16-rounded operands, in F64.
    fn reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|c| f64::from(from_bits(to_bits(x[i * k + c]))) * f64::from(from_bits(to_bits(w[j * k + c]))))
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
    fn packing_keeps_every_rounded_weight() {
        for (n, k) in [(1, 1), (17, 33), (40, 64), (5, 7)] {
            let values = data(n * k, 0.7);
            let packed = pack(&values, n, k);
            assert_eq!(packed.len(), n * row_bytes(k));
            for j in 0..n {
                for e in 0..k {
                    assert_eq!(weight(&packed, n, k, j, e), to_bits(values[j * k + e]), "{n}x{k} ({j}, {e})");
                }
            }
        }
    }

    /// Odd widths (a half-empty last word), partial panels, one row or
    /// many: the portable loop within the reference's rounding, the widening
    /// kernels bit-identical to it, `vdpbf16ps` within a few ulps.
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
            (70, 100, 34),
        ] {
            let (x, wf) = (data(m * k, 0.3), data(n * k, 1.1));
            let w = pack(&wf, n, k);
            let want = reference(&x, m, &wf, n, k);
            // A sum in order rounds once per term: within k ulps of the sum of the terms' magnitudes.
            let abs = |v: &[f32]| v.iter().map(|v| v.abs()).collect::<Vec<f32>>();
            let magnitude = reference(&abs(&x), m, &abs(&wf), n, k);
            let portable = matmul_with(&x, m, &w, n, k, Kernel::Portable, false);
            for (e, ((got, want), magnitude)) in portable.iter().zip(&want).zip(&magnitude).enumerate() {
                let bound = 1e-6 + k as f32 * f32::EPSILON * magnitude;
                assert!((got - want).abs() <= bound, "portable {m}x{n}x{k} entry {e}: {got} vs {want}");
            }
            for (kernel, wide) in runs() {
                let got = matmul_with(&x, m, &w, n, k, kernel, wide);
                if kernel == Kernel::Avx512 {
                    let diff = got.iter().zip(&portable).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    assert!(diff < 1e-5, "{kernel:?} vs portable {m}x{n}x{k}: max difference {diff}");
                } else {
                    let same = got.iter().zip(&portable).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{kernel:?} (512-bit: {wide}) {m}x{n}x{k} differs from the portable loop");
                }
            }
        }
    }

    #[test]
    fn within_bf16_rounding_of_the_f32_product() {
        let (m, n, k) = (4, 33, 576);
        let (x, wf) = (data(m * k, 0.5), data(n * k, 2.0));
        let w = pack(&wf, n, k);
        let exact = crate::cpu_linear::matmul_transposed(&x, m, &wf, n, k);
        // Each term |x·w| < 1 carries an error below 2^-8 (two roundings of
        // 2^-9), of either sign: the sum's error grows like √k, not k.
        let bound = (k as f32).sqrt() * 2f32.powi(-8);
        for (kernel, wide) in runs() {
            let got = matmul_with(&x, m, &w, n, k, kernel, wide);
            let diff = got.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff > 0.0 && diff < bound, "{kernel:?} (512-bit: {wide}): max difference {diff} (bound {bound})");
        }
    }

    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let (n, k) = (97, 300);
        let w = pack(&data(n * k, 2.0), n, k);
        let x = data(40 * k, 0.5);
        for (kernel, wide) in runs() {
            for m in [16, 40] {
                let batched = matmul_with(&x[..m * k], m, &w, n, k, kernel, wide);
                for i in 0..m {
                    let alone = matmul_with(&x[i * k..(i + 1) * k], 1, &w, n, k, kernel, wide);
                    assert_eq!(alone, batched[i * n..(i + 1) * n], "{kernel:?} (512-bit: {wide}): row {i} of {m}");
                }
            }
        }
    }
}
