//! `x @ Wᵀ` with Q8_0 weights: int8 with one F32 scale per block of 32
//! (llama.cpp's Q8_0, with an F32 rather than F16 scale), dotted with
//! activations quantized the same way per 32-block, on AVX-512 VNNI's
//! `vpdpbusd` (four u8 × i8 products added into each i32 lane).
//!
//! **Panels.** Weight rows are interleaved 16 at a time ([`PANEL`]; a
//! matrix whose row count is not a multiple of 16 ends in a panel of the
//! rest, `p` rows). One 64-byte load then holds a 4-byte word of each of 16
//! rows, and an input row's word, broadcast, is dotted with all 16 at once:
//! each i32 lane accumulates one weight row's dot, so no lanes are summed
//! across at the end, a block's scale is one multiply-add per 16 weight rows,
//! and the 16 results are stored as one vector (llama.cpp's repacked
//! `q8_0_4x8`-style layouts do the same). The layout before (a row's blocks
//! spread over the lanes, [`super::lanes`], which Q4_0 keeps) spent more
//! instructions on horizontal sums and per-row epilogues than on
//! `vpdpbusd` with SmolLM2's 576-wide rows (perf: ~40% of peak).
//!
//! **Layout.** A panel of `p` rows takes `p ·` [`row_bytes`] bytes where its
//! rows would (so the carrier tensor keeps its `[n, row_bytes(k)]` shape),
//! block after block, `36 p` bytes each: the block's eight words, word `t`
//! of the panel's row `r` at `4 p · t + 4 r`, then the rows' F32 scales.
//! A view of whole panels (rows `16 a .. 16 b`) is itself a packed matrix;
//! other row ranges are not.
//!
//! **Signedness.** `vpdpbusd` multiplies an unsigned byte by a signed one.
//! Weights are stored offset by 128 (`u = w + 128`, in 1..=255) and the
//! activations signed, so `Σ u·x = Σ w·x + 128 Σ x`: each dot starts from
//! `-128 Σ x`, the activation block's sum (known from quantizing it), which
//! cancels the offset exactly. The offset costs no bytes in the weights (a
//! correction per weight block, the layout before, was 4 bytes in 40 read
//! per block: batch-1 decode reads every weight byte once per token), and
//! the activation, the signed operand, is broadcast from memory within the
//! instruction.
//!
//! **Without VNNI** (AVX2 only: Zen 1-3, Intel before Ice Lake) the
//! [`avx2`] kernel takes a panel as two halves of 8 rows and computes the
//! same integers with `vpmaddubsw` on the weights' magnitudes and the
//! activations with the weights' signs, so no correction is added.
//!
//! **Arithmetic.** Every kernel computes each block's exact integer dot,
//! converts it, and adds it times `w scale · x scale` into the output in
//! block order: the portable loop ([`panel_portable`]), AVX2 and VNNI give
//! bit-identical results, whatever the batch. Threading is
//! [`crate::cpu_linear::run_tiled`]'s (tasks of whole panels).

use rayon::prelude::*;

use crate::cpu_linear::{Tiles, row_block, run_tiled};
use crate::error::{Error, Result};

use super::Kernel;
pub use super::lanes::BLOCK;
use super::lanes::{Layout, Quantized, quantize_row, quantize_rows};

/// Weight rows interleaved in one panel: one per i32 lane of a 512-bit vector.
pub const PANEL: usize = 16;
/// 4-byte words per block.
const WORDS: usize = BLOCK / 4;

/// Bytes of one packed row of `k` weights (`k` a multiple of [`BLOCK`]).
pub fn row_bytes(k: usize) -> usize {
    k + 4 * (k / BLOCK)
}

/// Bytes of one block of a panel of `p` rows: quants and scales.
fn block_bytes(p: usize) -> usize {
    (BLOCK + 4) * p
}

/// Weight bytes are `w + 128`: an XOR of the sign bit.
const WEIGHT_FLIP: u8 = 0x80;

/// Whether this CPU runs the `vpdpbusd` kernel.
pub fn has_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The kernel products run on here: VNNI, else AVX2 ([`avx2`]), else the portable loop.
pub fn kernel() -> Kernel {
    Kernel::best(has_simd())
}

/// Packs `values` `[n, k]` (row-major F32) into panels of [`PANEL`] rows.
pub fn pack(values: &[f32], n: usize, k: usize) -> Result<Vec<u8>> {
    if !k.is_multiple_of(BLOCK) {
        return Err(Error::ServeDtype {
            dtype: "q8_0",
            message: format!("a weight's rows are {k} long; Q8_0 needs a multiple of {BLOCK}"),
        });
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(Error::ServeDtype { dtype: "q8_0", message: "a weight holds a NaN or infinite value".into() });
    }
    let (nb, bytes) = (k / BLOCK, row_bytes(k));
    let mut out = vec![0u8; n * bytes];
    if k == 0 {
        return Ok(out);
    }
    out.par_chunks_mut(PANEL * bytes).zip(values.par_chunks(PANEL * k)).for_each(|(panel, values)| {
        let p = values.len() / k;
        let (mut quants, mut scales, mut sums) = (vec![0u8; k], vec![0f32; nb], vec![0i32; nb]);
        for (r, row) in values.chunks_exact(k).enumerate() {
            quantize_row(row, &mut quants, &mut scales, &mut sums, 0, Layout::Blocks);
            for b in 0..nb {
                let block = &mut panel[b * block_bytes(p)..(b + 1) * block_bytes(p)];
                for t in 0..WORDS {
                    let at = 4 * p * t + 4 * r;
                    for (dst, q) in block[at..at + 4].iter_mut().zip(&quants[b * BLOCK + 4 * t..]) {
                        *dst = q ^ WEIGHT_FLIP;
                    }
                }
                let scale = BLOCK * p + 4 * r;
                block[scale..scale + 4].copy_from_slice(&scales[b].to_le_bytes());
            }
        }
    });
    Ok(out)
}

/// Weight row `r` of a panel of `p`: its quant `e` of block `b` and its
/// block scale (the layout in one place, for the portable loop and [`unpack`]).
struct PanelRow<'a> {
    panel: &'a [u8],
    p: usize,
    r: usize,
}

impl PanelRow<'_> {
    fn word(&self, at: usize) -> [u8; 4] {
        [self.panel[at], self.panel[at + 1], self.panel[at + 2], self.panel[at + 3]]
    }

    /// The stored byte, `w + 128`.
    fn stored(&self, b: usize, e: usize) -> u8 {
        self.panel[b * block_bytes(self.p) + 4 * self.p * (e / 4) + 4 * self.r + e % 4]
    }

    fn quant(&self, b: usize, e: usize) -> i8 {
        (self.stored(b, e) ^ WEIGHT_FLIP) as i8
    }

    fn scale(&self, b: usize) -> f32 {
        f32::from_le_bytes(self.word(b * block_bytes(self.p) + BLOCK * self.p + 4 * self.r))
    }
}

/// The F32 values a packed matrix stands for (tests and quality checks).
pub fn unpack(packed: &[u8], n: usize, k: usize) -> Vec<f32> {
    let (nb, bytes) = (k / BLOCK, row_bytes(k));
    let mut out = Vec::with_capacity(n * k);
    if k == 0 {
        return out;
    }
    for panel in packed[..n * bytes].chunks(PANEL * bytes) {
        let p = panel.len() / bytes;
        for r in 0..p {
            let row = PanelRow { panel, p, r };
            for b in 0..nb {
                out.extend((0..BLOCK).map(|e| f32::from(row.quant(b, e)) * row.scale(b)));
            }
        }
    }
    out
}

/// `out[i][j] = Σ_c x[i][c] · w[j][c]` for `x` `[m, k]` F32 and `w` packed
/// by [`pack`] (`n` rows), returned row-major `[m, n]`; activations are
/// quantized per 32-block first.
pub fn matmul(x: &[f32], m: usize, w: &[u8], n: usize, k: usize) -> Vec<f32> {
    matmul_on(x, m, w, n, k, kernel())
}

/// [`matmul`] on `kernel` (tests run each the CPU has); one the CPU lacks runs the portable loop.
pub(crate) fn matmul_on(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, kernel: Kernel) -> Vec<f32> {
    assert!(
        k.is_multiple_of(BLOCK) && x.len() == m * k && w.len() == n * row_bytes(k),
        "q8_0 matmul: slices do not match [{m}, {k}] x packed [{n}, {k}]"
    );
    if k == 0 {
        return vec![0f32; m * n];
    }
    let kernel = kernel.supported(has_simd());
    let activations = quantize_rows(x, m, k, 0, Layout::Blocks);
    run_tiled(m, n, &Q8Tiles { a: &activations, w, n, k, kernel })
}

struct Q8Tiles<'a> {
    a: &'a Quantized,
    w: &'a [u8],
    n: usize,
    k: usize,
    /// One the CPU has ([`matmul_on`] checked).
    kernel: Kernel,
}

impl Q8Tiles<'_> {
    /// Input rows `i..i + R` against weight rows `j..j + cols`, written to
    /// `out[a + r][b + c]`: whole panels straight into the output, a panel
    /// the range covers only in part (not on [`run_tiled`]'s path, whose
    /// tasks are whole panels) computed aside and the part copied.
    fn panels<const R: usize>(&self, i: usize, j: usize, cols: usize, out: &mut [&mut [f32]], (a, b): (usize, usize)) {
        let mut start = j / PANEL * PANEL;
        while start < j + cols {
            let p = PANEL.min(self.n - start);
            if start >= j && start + p <= j + cols {
                self.panel::<R>(i, start, out, (a, b + start - j));
            } else {
                let mut scratch = [[0f32; PANEL]; R];
                let mut rows: Vec<&mut [f32]> = scratch.iter_mut().map(|r| &mut r[..]).collect();
                self.panel::<R>(i, start, &mut rows, (0, 0));
                let (from, to) = (start.max(j), (start + p).min(j + cols));
                for (out_row, row) in out[a..a + R].iter_mut().zip(&scratch) {
                    out_row[b + from - j..b + to - j].copy_from_slice(&row[from - start..to - start]);
                }
            }
            start += PANEL;
        }
    }

    /// Input rows `i..i + R` against the panel whose first row is `start`
    /// (a multiple of [`PANEL`]), written to `out[a + r][b..b + p]`.
    fn panel<const R: usize>(&self, i: usize, start: usize, out: &mut [&mut [f32]], (a, b): (usize, usize)) {
        let (k, nb, bytes) = (self.k, self.k / BLOCK, row_bytes(self.k));
        let p = PANEL.min(self.n - start);
        let panel = &self.w[start * bytes..(start + p) * bytes];
        let xq = &self.a.quants[i * k..(i + R) * k];
        let xs = &self.a.scales[i * nb..(i + R) * nb];
        let sums = &self.a.sums[i * nb..(i + R) * nb];
        let out = &mut out[a..a + R];
        for row in out.iter_mut() {
            assert!(row.len() >= b + p, "q8_0: an output row too short for its panel");
        }
        match self.kernel {
            // SAFETY (both kernels): the CPU has `kernel` (checked in `matmul_on`); `xq` holds R rows of k bytes,
            // `xs` and `sums` R rows of nb, `panel` a panel of p packed rows, and each output row p values from
            // `b` (asserted above).
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe {
                x86::panel::<R>(xq.as_ptr(), xs.as_ptr(), sums.as_ptr(), k, panel.as_ptr(), p, out, b)
            },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::panel::<R>(xq.as_ptr(), xs.as_ptr(), k, panel.as_ptr(), p, out, b) },
            _ => panel_portable::<R>(xq, xs, sums, k, panel, p, out, b),
        }
    }
}

impl Tiles for Q8Tiles<'_> {
    const COLUMNS: usize = PANEL;

    fn tile<const R: usize, const C: usize>(&self, i: usize, j: usize, out: &mut [&mut [f32]], at: (usize, usize)) {
        self.panels::<R>(i, j, C, out, at);
    }

    fn row(&self, i: usize, j: usize, out: &mut [f32]) {
        let cols = out.len();
        self.panels::<1>(i, j, cols, &mut [out], (0, 0));
    }

    fn block(&self, i0: usize, j0: usize, cols: usize, out: &mut [&mut [f32]]) {
        // Panel by panel, each re-run for every block of input rows while it is in L1.
        let mut j = 0;
        while j < cols {
            let width = PANEL.min(cols - j);
            let mut i = 0;
            while i < out.len() {
                let rows = row_block(out.len() - i);
                let (xi, wj, at) = (i0 + i, j0 + j, (i, j));
                match rows {
                    5 => self.panels::<5>(xi, wj, width, out, at),
                    4 => self.panels::<4>(xi, wj, width, out, at),
                    3 => self.panels::<3>(xi, wj, width, out, at),
                    2 => self.panels::<2>(xi, wj, width, out, at),
                    _ => self.panels::<1>(xi, wj, width, out, at),
                }
                i += rows;
            }
            j += width;
        }
    }
}

/// The VNNI kernel's arithmetic, entry by entry: each block's exact integer
/// dot (the stored bytes' dot from `-128 Σ x`), converted, times
/// `w scale · x scale`, added in block order.
#[allow(clippy::too_many_arguments)] // The kernels' parameters, as slices.
fn panel_portable<const R: usize>(
    xq: &[u8],
    xs: &[f32],
    sums: &[i32],
    k: usize,
    panel: &[u8],
    p: usize,
    out: &mut [&mut [f32]],
    b0: usize,
) {
    let nb = k / BLOCK;
    for (r, out_row) in out.iter_mut().enumerate().take(R) {
        let (xq, xs, sums) = (&xq[r * k..(r + 1) * k], &xs[r * nb..(r + 1) * nb], &sums[r * nb..(r + 1) * nb]);
        for (c, value) in out_row[b0..b0 + p].iter_mut().enumerate() {
            let row = PanelRow { panel, p, r: c };
            let mut acc = 0f32;
            for b in 0..nb {
                let mut dot = -128 * sums[b];
                for e in 0..BLOCK {
                    dot += i32::from(xq[b * BLOCK + e] as i8) * i32::from(row.stored(b, e));
                }
                acc = (dot as f32).mul_add(row.scale(b) * xs[b], acc);
            }
            *value = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // Index loops over const bounds unroll into registers.
mod x86 {
    use std::arch::x86_64::*;

    use super::super::lanes::x86::prefetch;
    use super::{BLOCK, PANEL, WORDS, block_bytes};

    /// Blocks ahead of the one being multiplied that a panel's first pass
    /// prefetches (the panels of a task are contiguous, so past a panel's
    /// end this reaches into the next one).
    const PREFETCH_BLOCKS: usize = 8;

    /// `R` quantized input rows (signed) against a panel of `p` weight
    /// rows, written to `out[r][b0..b0 + p]`.
    ///
    /// # Safety
    /// AVX-512F, BW, VL and VNNI must be available; `xq` must hold `R · k`
    /// bytes, `xs` and `sums` `R · k/32` values, `panel` a packed panel of
    /// `p ≤ 16` rows for `k`, and `out` `R` rows of at least `b0 + p` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[allow(clippy::too_many_arguments)] // Raw parts of the operands.
    pub unsafe fn panel<const R: usize>(
        xq: *const u8,
        xs: *const f32,
        sums: *const i32,
        k: usize,
        panel: *const u8,
        p: usize,
        out: &mut [&mut [f32]],
        b0: usize,
    ) {
        let (nb, step) = (k / BLOCK, 4 * p);
        let rows: u16 = if p >= PANEL { u16::MAX } else { (1u16 << p) - 1 };
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            // SAFETY (whole block): masked loads of the panel's `p` lanes stay inside block `b` of the panel,
            // broadcasts inside the input rows' block `b` (caller); the prefetch never faults.
            unsafe {
                let block = panel.add(b * block_bytes(p));
                prefetch(block.wrapping_add(PREFETCH_BLOCKS * block_bytes(p)), block_bytes(p));
                let mut dots = [_mm512_setzero_si512(); R];
                for r in 0..R {
                    dots[r] = _mm512_set1_epi32(-128 * *sums.add(r * nb + b));
                }
                for t in 0..WORDS {
                    let w = _mm512_maskz_loadu_epi32(rows, block.add(step * t) as *const i32);
                    for r in 0..R {
                        let x = _mm512_set1_epi32((xq.add(r * k + b * BLOCK + 4 * t) as *const i32).read_unaligned());
                        dots[r] = _mm512_dpbusd_epi32(dots[r], w, x);
                    }
                }
                let w_scales = _mm512_maskz_loadu_ps(rows, block.add(BLOCK * p) as *const f32);
                for r in 0..R {
                    let scale = _mm512_mul_ps(w_scales, _mm512_set1_ps(*xs.add(r * nb + b)));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[r]), scale, acc[r]);
                }
            }
        }
        for r in 0..R {
            // SAFETY: row `r` holds `p` values from `b0` (caller); the masked store writes only those.
            unsafe { _mm512_mask_storeu_ps(out[r].as_mut_ptr().add(b0), rows, acc[r]) };
        }
    }
}

/// The kernel for CPUs with AVX2 but not AVX-512 VNNI: a panel as two
/// halves of 8 rows (256-bit vectors), `vpmaddubsw` + `vpmaddwd` for the
/// integer dots. `vpmaddubsw` multiplies unsigned by signed bytes into
/// saturating i16 pairs, so it takes the weights' magnitudes and the signed
/// activations with the weights' signs (llama.cpp's trick): `|w|·(±x)` pairs
/// stay within ±2·127·127, no saturation, and the dots are the VNNI
/// kernel's exact integers, without its correction.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // Index loops over const bounds unroll into registers.
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::lanes::avx2::{HALF, load, load_ps, used_in};
    use super::{BLOCK, WEIGHT_FLIP, WORDS, block_bytes};

    /// `R` quantized input rows (signed) against a panel of `p`
    /// weight rows, written to `out[r][b0..b0 + p]`.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `xq` must hold `R · k` bytes, `xs`
    /// `R · k/32` scales, `panel` a packed panel of `p ≤ 16` rows for `k`,
    /// and `out` `R` rows of at least `b0 + p` values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn panel<const R: usize>(
        xq: *const u8,
        xs: *const f32,
        k: usize,
        panel: *const u8,
        p: usize,
        out: &mut [&mut [f32]],
        b0: usize,
    ) {
        let (nb, step) = (k / BLOCK, 4 * p);
        let (ones, flip) = (_mm256_set1_epi16(1), _mm256_set1_epi8(WEIGHT_FLIP as i8));
        for half in 0..2 {
            let lanes = used_in(p, half);
            if lanes == 0 {
                break;
            }
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                // SAFETY (whole block): the half's `lanes` words of each step and its scales lie inside block
                // `b` of the panel, the broadcast words inside the input rows' block `b` (caller).
                unsafe {
                    let block = panel.add(b * block_bytes(p) + 4 * HALF * half);
                    let mut dots = [_mm256_setzero_si256(); R];
                    for t in 0..WORDS {
                        let w = _mm256_xor_si256(load(block.add(step * t), lanes), flip);
                        let magnitude = _mm256_sign_epi8(w, w);
                        for r in 0..R {
                            let x =
                                _mm256_set1_epi32((xq.add(r * k + b * BLOCK + 4 * t) as *const i32).read_unaligned());
                            let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(x, w));
                            dots[r] = _mm256_add_epi32(dots[r], _mm256_madd_epi16(pairs, ones));
                        }
                    }
                    let w_scales = load_ps(block.add(BLOCK * p) as *const f32, lanes);
                    for r in 0..R {
                        let scale = _mm256_mul_ps(w_scales, _mm256_set1_ps(*xs.add(r * nb + b)));
                        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r]), scale, acc[r]);
                    }
                }
            }
            for r in 0..R {
                let mut values = [0f32; HALF];
                // SAFETY: an unaligned 32-byte store into the 8-value array.
                unsafe { _mm256_storeu_ps(values.as_mut_ptr(), acc[r]) };
                let at = b0 + HALF * half;
                out[r][at..at + lanes].copy_from_slice(&values[..lanes]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::test_data::{BLOCK_SHAPES, assert_rows_do_not_depend_on_the_batch, data};

    #[test]
    fn packing_round_trips_within_half_a_step() {
        for (n, k) in [(7, 96), (37, 96), (32, 64)] {
            let mut w = data(n * k, 0.2);
            w[5] = 0.0;
            w[..32].iter_mut().for_each(|v| *v = 0.0); // an all-zero block: scale 0
            let packed = pack(&w, n, k).unwrap();
            assert_eq!(packed.len(), n * row_bytes(k));
            let back = unpack(&packed, n, k);
            for (b, (block, got)) in w.chunks(BLOCK).zip(back.chunks(BLOCK)).enumerate() {
                let step = block.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                for (v, g) in block.iter().zip(got) {
                    assert!((v - g).abs() <= step * 0.5 + 1e-7, "{n}x{k}, block {b}: {v} came back as {g}");
                }
            }
        }
        let w = data(7 * 96, 0.2);
        assert!(pack(&w[..7 * 40], 7, 40).is_err(), "rows not a multiple of 32");
        let mut bad = w.clone();
        bad[3] = f32::NAN;
        assert!(pack(&bad, 7, 96).is_err());
    }

    /// The portable loop against the F64 product of the quantized operands,
    /// for whole and partial panels; every kernel the CPU has bit-identical
    /// to it (the same integers, the same F32 operations in the same order).
    #[test]
    fn kernels_match_the_quantized_product_bit_for_bit() {
        for &(m, n, k) in BLOCK_SHAPES {
            let x = data(m * k, 0.3);
            let w = pack(&data(n * k, 1.1), n, k).unwrap();
            let wq = unpack(&w, n, k);
            let a = quantize_rows(&x, m, k, 0, Layout::Blocks);
            let nb = k / BLOCK;
            let xq: Vec<f32> = (0..m * k)
                .map(|idx| f32::from(a.quants[idx] as i8) * a.scales[idx / k * nb + idx % k / BLOCK])
                .collect();
            let portable = matmul_on(&x, m, &w, n, k, Kernel::Portable);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|c| f64::from(xq[i * k + c]) * f64::from(wq[j * k + c])).sum();
                    let got = portable[i * n + j];
                    // One F32 rounding per block's multiply-add: `nb` ulps at most.
                    let tolerance = 1e-4 + f64::from(f32::EPSILON) * nb as f64 * want.abs();
                    assert!((f64::from(got) - want).abs() < tolerance, "{m}x{n}x{k} ({i}, {j}): {got} vs {want}");
                }
            }
            for kernel in Kernel::available(has_simd()) {
                let got = matmul_on(&x, m, &w, n, k, kernel);
                let same = got.iter().zip(&portable).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{m}x{n}x{k}: {kernel:?} differs from the portable loop");
            }
        }
    }

    #[test]
    fn within_quantization_error_of_the_f32_product() {
        let (m, n, k) = (4, 33, 576);
        let (x, wf) = (data(m * k, 0.5), data(n * k, 2.0));
        let exact = crate::cpu_linear::matmul_transposed(&x, m, &wf, n, k);
        let got = matmul(&x, m, &pack(&wf, n, k).unwrap(), n, k);
        // Each operand's error is at most half a step (amax / 254 ≤ 1/254) per value.
        let bound = (k as f32).sqrt() * 2.0 / 254.0;
        let diff = got.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff > 0.0 && diff < bound, "max difference {diff} (bound {bound})");
    }

    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let (n, k) = (97, 320);
        let w = pack(&data(n * k, 2.0), n, k).unwrap();
        assert_rows_do_not_depend_on_the_batch(n, k, |x, m, kernel| matmul_on(x, m, &w, n, k, kernel));
    }

    /// Rows `16 a .. 16 b` of a packed matrix are a packed matrix (how the
    /// stacked Q/K/V and gate/up projections are split into views).
    #[test]
    fn whole_panels_are_a_packed_matrix() {
        let (m, n, k) = (3, 53, 96);
        let x = data(m * k, 0.4);
        let w = pack(&data(n * k, 0.9), n, k).unwrap();
        let full = matmul(&x, m, &w, n, k);
        let (from, rows) = (16, 37);
        let view = matmul(&x, m, &w[from * row_bytes(k)..(from + rows) * row_bytes(k)], rows, k);
        for i in 0..m {
            assert_eq!(view[i * rows..(i + 1) * rows], full[i * n + from..i * n + from + rows], "row {i}");
        }
    }

    /// A tile that covers panels only in part (not on `run_tiled`'s path)
    /// gives the same entries as whole panels.
    #[test]
    fn tiles_across_panel_edges_match_whole_panels() {
        let (m, n, k) = (2, 45, 64);
        let x = data(m * k, 0.1);
        let w = pack(&data(n * k, 0.6), n, k).unwrap();
        let full = matmul_on(&x, m, &w, n, k, Kernel::Portable);
        let a = quantize_rows(&x, m, k, 0, Layout::Blocks);
        let tiles = Q8Tiles { a: &a, w: &w, n, k, kernel: Kernel::Portable };
        for (j, cols) in [(5, 20), (0, 3), (30, 15), (17, 1)] {
            let mut rows = vec![vec![0f32; cols + 2]; m];
            let mut out: Vec<&mut [f32]> = rows.iter_mut().map(|r| &mut r[..]).collect();
            tiles.panels::<2>(0, j, cols, &mut out, (0, 2));
            for i in 0..m {
                assert_eq!(rows[i][2..], full[i * n + j..i * n + j + cols], "({j}, {cols}) row {i}");
            }
        }
    }
}
