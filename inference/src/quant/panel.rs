//! The integer formats' layout and kernels ([`super::q8_0`], [`super::q4_0`]):
//! weight rows interleaved 16 at a time ("panels"), dotted with activations
//! quantized to int8 per 32-block ([`super::int8`]) by AVX-512 VNNI's
//! `vpdpbusd` (four u8 × i8 products added into each i32 lane), AVX2's
//! `vpmaddubsw` + `vpmaddwd`, or the portable loop.
//!
//! **Why panels.** One 64-byte load holds a 4-byte word of each of 16 weight
//! rows; an input row's word, broadcast, is dotted with all 16 at once, so
//! each i32 lane accumulates one weight row's dot: no lanes are summed
//! across at the end, a block's scale is one multiply-add per 16 rows, and
//! the 16 results are stored as one vector (llama.cpp's repacked Q4_0/Q8_0
//! layouts interleave rows the same way). The layout before spread one
//! row's blocks over the lanes; with SmolLM2's 576-wide rows (18 blocks) it
//! spent more instructions on horizontal sums, short tail groups and
//! per-row epilogues than on `vpdpbusd` (perf: ~40% of its peak).
//!
//! **Layout.** A matrix's rows form panels of [`PANEL`] from row 0 (the last
//! holds the rest, `p` rows). A panel of `p` rows takes `p · row_bytes` bytes
//! where its rows would (so the carrier tensor keeps its `[n, row_bytes]`
//! shape), block after block: the rows' quant bytes (`QUANT_BYTES · p`, word
//! `t` of row `r` at `4 p · t + 4 r`), then their scales (`SCALE_BYTES · p`).
//! A view of whole panels (rows `16 a .. 16 b`) is itself a packed matrix;
//! other row ranges are not ([`super::view_rows`]).
//!
//! **Signedness.** `vpdpbusd` multiplies an unsigned byte by a signed one.
//! Weights are stored unsigned, `w + OFFSET` (Q8_0: +128; Q4_0's nibbles are
//! llama.cpp's `q = w + 8`), and the activations signed, so `Σ u·x = Σ w·x +
//! OFFSET · Σ x`: each block's dot starts from `-OFFSET · Σ x`, the sum the
//! activation block's quantization already gives, which cancels the offset
//! exactly at no cost in weight bytes (batch-1 decode reads every weight
//! byte once per token).
//!
//! **Arithmetic.** Every kernel computes each block's exact integer dot,
//! converts it, and adds it times `w scale · x scale` into the output in
//! block order: portable, AVX2 and VNNI results are bit-identical, and a
//! row's result does not depend on its batch. Threading is
//! [`crate::cpu_linear::run_tiled`]'s, in tasks of whole panels
//! ([`Panels`], which BF16's panels of 2-value words run on too, see
//! [`super::bf16`]).

use std::marker::PhantomData;

use rayon::prelude::*;

use super::Kernel;
use super::int8::{BLOCK, Quantized, quantize_rows};
use crate::cpu_linear::{Tiles, row_block, run_tiled};
use crate::error::{Error, Result};

/// Weight rows interleaved in one panel: one per i32 lane of a 512-bit vector.
pub const PANEL: usize = 16;
/// 4-byte words of activations per block.
const WORDS: usize = BLOCK / 4;

/// What an integer format stores per block of a panel row.
pub(crate) trait Format: Sync {
    /// For error messages.
    const NAME: &'static str;
    /// Bits per stored weight: 8 (a byte each) or 4 (two per byte: element
    /// `e < 16` of a block in the low nibble of the byte whose high nibble
    /// holds element `e + 16`, as llama.cpp's Q4_0).
    const BITS: u32;
    /// Bytes of one row's scale (F32: 4, F16: 2).
    const SCALE_BYTES: usize;
    /// Each stored weight is `w + OFFSET`.
    const OFFSET: i32;

    /// Writes a row's block scale `d` (its `SCALE_BYTES` bytes).
    fn write_scale(bytes: &mut [u8], d: f32);
    /// Reads a row's block scale.
    fn read_scale(bytes: &[u8]) -> f32;

    /// Bytes of one row's quants per block.
    fn quant_bytes() -> usize {
        BLOCK * Self::BITS as usize / 8
    }

    /// Bytes of one block of a panel of `p` rows.
    fn block_bytes(p: usize) -> usize {
        (Self::quant_bytes() + Self::SCALE_BYTES) * p
    }

    /// Bytes of one packed row of `k` weights.
    fn row_bytes(k: usize) -> usize {
        (Self::quant_bytes() + Self::SCALE_BYTES) * (k / BLOCK)
    }

    /// Where row `r`'s element `e` of a block sits in a panel of `p` rows'
    /// block: the byte and the shift of its bits.
    fn place(p: usize, r: usize, e: usize) -> (usize, u32) {
        let per_byte = 8 / Self::BITS as usize;
        let (e, part) = (e % (BLOCK / per_byte), e / (BLOCK / per_byte));
        (4 * p * (e / 4) + 4 * r + e % 4, Self::BITS * part as u32)
    }
}

/// Packs `values` `[n, k]` (row-major F32) into panels: `quantize(row,
/// stored, scales)` gives a row's stored values (`w + OFFSET`, in order) and
/// its block scales.
pub(crate) fn pack<F: Format>(
    values: &[f32],
    n: usize,
    k: usize,
    quantize: impl Fn(&[f32], &mut [u8], &mut [f32]) + Sync,
) -> Result<Vec<u8>> {
    if !k.is_multiple_of(BLOCK) {
        return Err(Error::ServeDtype {
            dtype: F::NAME,
            message: format!("a weight's rows are {k} long; {} needs a multiple of {BLOCK}", F::NAME),
        });
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(Error::ServeDtype { dtype: F::NAME, message: "a weight holds a NaN or infinite value".into() });
    }
    let (nb, bytes) = (k / BLOCK, F::row_bytes(k));
    let mut out = vec![0u8; n * bytes];
    if k == 0 {
        return Ok(out);
    }
    out.par_chunks_mut(PANEL * bytes).zip(values.par_chunks(PANEL * k)).for_each(|(panel, values)| {
        let p = values.len() / k;
        let (mut stored, mut scales) = (vec![0u8; k], vec![0f32; nb]);
        for (r, row) in values.chunks_exact(k).enumerate() {
            quantize(row, &mut stored, &mut scales);
            for b in 0..nb {
                let block = &mut panel[b * F::block_bytes(p)..(b + 1) * F::block_bytes(p)];
                for e in 0..BLOCK {
                    let (at, shift) = F::place(p, r, e);
                    block[at] |= stored[b * BLOCK + e] << shift;
                }
                let scale = F::quant_bytes() * p + F::SCALE_BYTES * r;
                F::write_scale(&mut block[scale..scale + F::SCALE_BYTES], scales[b]);
            }
        }
    });
    Ok(out)
}

/// Weight row `r` of a panel of `p` (the layout read back, for the portable
/// loop and [`unpack`]).
struct PanelRow<'a, F> {
    panel: &'a [u8],
    p: usize,
    r: usize,
    format: PhantomData<F>,
}

impl<F: Format> PanelRow<'_, F> {
    /// Element `e` of block `b` as stored (`w + OFFSET`).
    fn stored(&self, b: usize, e: usize) -> u8 {
        let (at, shift) = F::place(self.p, self.r, e);
        let mask = ((1u32 << F::BITS) - 1) as u8;
        (self.panel[b * F::block_bytes(self.p) + at] >> shift) & mask
    }

    fn scale(&self, b: usize) -> f32 {
        let at = b * F::block_bytes(self.p) + F::quant_bytes() * self.p + F::SCALE_BYTES * self.r;
        F::read_scale(&self.panel[at..at + F::SCALE_BYTES])
    }
}

/// The F32 values a packed matrix stands for (tests and quality checks).
pub(crate) fn unpack<F: Format>(packed: &[u8], n: usize, k: usize) -> Vec<f32> {
    let (nb, bytes) = (k / BLOCK, F::row_bytes(k));
    let mut out = Vec::with_capacity(n * k);
    if k == 0 {
        return out;
    }
    for panel in packed[..n * bytes].chunks(PANEL * bytes) {
        let p = panel.len() / bytes;
        for r in 0..p {
            let row = PanelRow::<F> { panel, p, r, format: PhantomData };
            for b in 0..nb {
                out.extend((0..BLOCK).map(|e| (i32::from(row.stored(b, e)) - F::OFFSET) as f32 * row.scale(b)));
            }
        }
    }
    out
}

/// `out[i][j] = Σ_c x[i][c] · w[j][c]` for `x` `[m, k]` F32 and `w` packed
/// by [`pack`] (`n` rows), returned row-major `[m, n]`, on `kernel` (one the
/// CPU has, else the portable loop); activations are quantized per 32-block first.
pub(crate) fn matmul<F: Format>(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, kernel: Kernel) -> Vec<f32> {
    assert!(
        k.is_multiple_of(BLOCK) && x.len() == m * k && w.len() == n * F::row_bytes(k),
        "{} matmul: slices do not match [{m}, {k}] x packed [{n}, {k}]",
        F::NAME
    );
    if k == 0 {
        return vec![0f32; m * n];
    }
    let kernel = kernel.supported(super::q8_0::has_simd());
    let activations = quantize_rows(x, m, k);
    run_tiled(m, n, &Panels(IntPanels::<F> { a: &activations, w, n, k, kernel, format: PhantomData }))
}

/// A product whose weights are laid out in panels of [`PANEL`] rows: the
/// panel kernel, which [`Panels`] runs as [`run_tiled`]'s tiles.
pub(crate) trait PanelKernel: Sync {
    /// Weight rows of the product.
    fn weight_rows(&self) -> usize;

    /// Input rows `i..i + R` against the panel whose first row is `start`
    /// (a multiple of [`PANEL`]; `p` rows, 16 but in the last panel),
    /// written to `out[r][b..b + p]`: `out` holds `R` rows, each at least
    /// `b + p` long ([`Panels`] checks); `R` at most 12.
    fn panel<const R: usize>(&self, i: usize, start: usize, p: usize, out: &mut [&mut [f32]], b: usize);

    /// Input rows the next pass over a panel takes when `left` remain: the
    /// F32 tiles' blocks of up to 5 (the integer kernels measured no faster
    /// with 8).
    fn input_rows(left: usize) -> usize {
        row_block(left)
    }

    /// Whether passes with several input rows take two whole panels at
    /// once ([`PanelKernel::pair`]; BF16 does, see [`super::bf16`]).
    const PAIRS: bool = false;

    /// Input rows `i..i + R` against the two whole panels from `start`
    /// (32 rows), written to `out[r][b..b + 32]`: each broadcast input word
    /// feeds two multiply-adds. By default two single passes.
    fn pair<const R: usize>(&self, i: usize, start: usize, out: &mut [&mut [f32]], b: usize) {
        self.panel::<R>(i, start, PANEL, out, b);
        self.panel::<R>(i, start + PANEL, PANEL, out, b + PANEL);
    }

    /// As [`PanelKernel::input_rows`], for passes over a pair of panels.
    fn pair_rows(left: usize) -> usize {
        Self::input_rows(left)
    }
}

/// [`run_tiled`]'s tiles for a [`PanelKernel`]: tasks of whole panels,
/// each panel re-run for every block of input rows while it is in L1.
pub(crate) struct Panels<K>(pub K);

impl<K: PanelKernel> Panels<K> {
    /// Input rows `i..i + R` against weight rows `j..j + cols`, written to
    /// `out[a + r][b + c]`: whole panels straight into the output, a panel
    /// the range covers only in part (not on [`run_tiled`]'s path, whose
    /// tasks are whole panels) computed aside and the part copied.
    fn panels<const R: usize>(&self, i: usize, j: usize, cols: usize, out: &mut [&mut [f32]], (a, b): (usize, usize)) {
        let n = self.0.weight_rows();
        let out = &mut out[a..a + R];
        let mut start = j / PANEL * PANEL;
        while start < j + cols {
            let p = PANEL.min(n - start);
            if start >= j && start + p <= j + cols {
                let at = b + start - j;
                // The kernels write `p` values from `at` in each row (unchecked stores on the SIMD paths).
                assert!(out.iter().all(|row| row.len() >= at + p), "an output row too short for its panel");
                self.0.panel::<R>(i, start, p, out, at);
            } else {
                let mut scratch = [[0f32; PANEL]; R];
                let mut rows: Vec<&mut [f32]> = scratch.iter_mut().map(|r| &mut r[..]).collect();
                self.0.panel::<R>(i, start, p, &mut rows, 0);
                let (from, to) = (start.max(j), (start + p).min(j + cols));
                for (out_row, row) in out.iter_mut().zip(&scratch) {
                    out_row[b + from - j..b + to - j].copy_from_slice(&row[from - start..to - start]);
                }
            }
            start += PANEL;
        }
    }

    /// One pass of `R` input rows over a panel or a pair of panels, for [`Tiles::block`].
    #[inline(always)]
    fn pass<const R: usize>(
        &self,
        (i, j, width, paired, (a, b)): (usize, usize, usize, bool, (usize, usize)),
        out: &mut [&mut [f32]],
    ) {
        if paired {
            let out = &mut out[a..a + R];
            assert!(out.iter().all(|row| row.len() >= b + 2 * PANEL), "an output row too short for its panels");
            self.0.pair::<R>(i, j, out, b);
        } else {
            self.panels::<R>(i, j, width, out, (a, b));
        }
    }
}

impl<K: PanelKernel> Tiles for Panels<K> {
    const COLUMNS: usize = PANEL;

    fn tile<const R: usize, const C: usize>(&self, i: usize, j: usize, out: &mut [&mut [f32]], at: (usize, usize)) {
        self.panels::<R>(i, j, C, out, at);
    }

    fn row(&self, i: usize, j: usize, out: &mut [f32]) {
        let cols = out.len();
        self.panels::<1>(i, j, cols, &mut [out], (0, 0));
    }

    fn block(&self, i0: usize, j0: usize, cols: usize, out: &mut [&mut [f32]]) {
        let mut j = 0;
        while j < cols {
            // A task's columns start on a panel and end on one or at the matrix's end, so 32 of them are two
            // whole panels. A single row (memory-bound) streams one panel at a time: Q8_0/Q4_0 pairs measured
            // batch-1 decode 178/185 -> 153/153 tok/s (Q4_0) and gained nothing elsewhere, so they have none.
            let paired = K::PAIRS && out.len() > 1 && cols - j >= 2 * PANEL;
            let width = if paired { 2 * PANEL } else { PANEL.min(cols - j) };
            let mut i = 0;
            while i < out.len() {
                let left = out.len() - i;
                let rows = if paired { K::pair_rows(left) } else { K::input_rows(left) };
                let pass = (i0 + i, j0 + j, width, paired, (i, j));
                match rows {
                    12.. => self.pass::<12>(pass, out),
                    11 => self.pass::<11>(pass, out),
                    10 => self.pass::<10>(pass, out),
                    9 => self.pass::<9>(pass, out),
                    8 => self.pass::<8>(pass, out),
                    7 => self.pass::<7>(pass, out),
                    6 => self.pass::<6>(pass, out),
                    5 => self.pass::<5>(pass, out),
                    4 => self.pass::<4>(pass, out),
                    3 => self.pass::<3>(pass, out),
                    2 => self.pass::<2>(pass, out),
                    _ => self.pass::<1>(pass, out),
                }
                i += rows;
            }
            j += width;
        }
    }
}

/// The integer formats' panel kernel: activations quantized per block.
struct IntPanels<'a, F> {
    a: &'a Quantized,
    w: &'a [u8],
    n: usize,
    k: usize,
    /// One the CPU has ([`matmul`] checked).
    kernel: Kernel,
    format: PhantomData<F>,
}

impl<F: Format> PanelKernel for IntPanels<'_, F> {
    fn weight_rows(&self) -> usize {
        self.n
    }

    fn panel<const R: usize>(&self, i: usize, start: usize, p: usize, out: &mut [&mut [f32]], b: usize) {
        let (k, nb, bytes) = (self.k, self.k / BLOCK, F::row_bytes(self.k));
        let panel = &self.w[start * bytes..(start + p) * bytes];
        let xq = &self.a.quants[i * k..(i + R) * k];
        let xs = &self.a.scales[i * nb..(i + R) * nb];
        let sums = &self.a.sums[i * nb..(i + R) * nb];
        let x = Activations { quants: xq.as_ptr(), scales: xs.as_ptr(), sums: sums.as_ptr(), k };
        match self.kernel {
            // SAFETY (both kernels): the CPU has `kernel` (checked in `matmul`); `x` points at R rows of k quants
            // and nb scales and sums, `panel` holds a panel of p packed rows, and each output row p values from
            // `b` (checked by `Panels`).
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { x86::panel::<F, R>(&x, panel.as_ptr(), p, out, b) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::panel::<F, R>(&x, panel.as_ptr(), p, out, b) },
            _ => panel_portable::<F, R>((xq, xs, sums), k, panel, p, out, b),
        }
    }
}

/// `R` input rows of a product, quantized ([`super::int8`]), for the SIMD kernels.
struct Activations {
    quants: *const u8,
    scales: *const f32,
    sums: *const i32,
    k: usize,
}

/// The kernels' arithmetic, entry by entry: each block's exact integer dot
/// (the stored values' dot from `-OFFSET · Σ x`), converted, times
/// `w scale · x scale`, added in block order.
fn panel_portable<F: Format, const R: usize>(
    (xq, xs, sums): (&[u8], &[f32], &[i32]),
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
            let row = PanelRow::<F> { panel, p, r: c, format: PhantomData };
            let mut acc = 0f32;
            for b in 0..nb {
                let mut dot = -F::OFFSET * sums[b];
                for e in 0..BLOCK {
                    dot += i32::from(xq[b * BLOCK + e] as i8) * i32::from(row.stored(b, e));
                }
                acc = (dot as f32).mul_add(row.scale(b) * xs[b], acc);
            }
            *value = acc;
        }
    }
}

/// Masks and stores every panel kernel needs (the integer formats' and BF16's).
#[cfg(target_arch = "x86_64")]
pub(crate) mod masks {
    use std::arch::x86_64::*;

    use super::PANEL;

    /// Rows of a 256-bit half of a panel (AVX2 kernels).
    pub const HALF: usize = 8;

    /// The 512-bit load and store mask of a panel of `p` rows.
    #[inline]
    pub fn rows_mask(p: usize) -> u16 {
        if p >= PANEL { u16::MAX } else { (1u16 << p) - 1 }
    }

    /// The rows of half `half` of a panel of `p` (0 to 8) and their 256-bit
    /// load mask.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub fn half_rows(p: usize, half: usize) -> (usize, __m256i) {
        let lanes = p.saturating_sub(HALF * half).min(HALF);
        (lanes, _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)))
    }

    /// Writes the first `lanes` values of `v` to `out[at..]`.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub fn store_half(out: &mut [f32], at: usize, lanes: usize, v: __m256) {
        let mut values = [0f32; HALF];
        // SAFETY: an unaligned 32-byte store into the 8-value array.
        unsafe { _mm256_storeu_ps(values.as_mut_ptr(), v) };
        out[at..at + lanes].copy_from_slice(&values[..lanes]);
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // Index loops over const bounds unroll into registers.
mod x86 {
    use std::arch::x86_64::*;

    use super::masks::rows_mask;
    use super::{Activations, BLOCK, Format, WORDS};

    /// Blocks ahead of the one being multiplied that a panel prefetches (a
    /// task's panels are contiguous, so past a panel's end this reaches
    /// into the next one).
    const PREFETCH_BLOCKS: usize = 8;

    /// `R` input rows against a panel of `p` weight rows, written to
    /// `out[r][b0..b0 + p]`.
    ///
    /// # Safety
    /// AVX-512F, BW, VL and VNNI must be available; `x` must point at `R`
    /// rows of `k` quants and `k/32` scales and sums, `panel` at a packed
    /// panel of `p ≤ 16` rows for `k`, and `out` hold `R` rows of at least
    /// `b0 + p` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn panel<F: Format, const R: usize>(
        x: &Activations,
        panel: *const u8,
        p: usize,
        out: &mut [&mut [f32]],
        b0: usize,
    ) {
        let (k, nb, block_bytes) = (x.k, x.k / BLOCK, F::block_bytes(p));
        let rows = rows_mask(p);
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            // SAFETY (whole block): masked loads of the panel's `p` lanes stay inside block `b` of the panel,
            // broadcasts inside the input rows' block `b` (caller); prefetches never fault.
            unsafe {
                let block = panel.add(b * block_bytes);
                let ahead = block.wrapping_add(PREFETCH_BLOCKS * block_bytes);
                let mut line = 0;
                while line < block_bytes {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8);
                    line += 64;
                }
                let mut dots = [_mm512_setzero_si512(); R];
                for r in 0..R {
                    dots[r] = _mm512_set1_epi32(-F::OFFSET * *x.sums.add(r * nb + b));
                }
                let words = weight_words::<F>(block, p, rows);
                for t in 0..WORDS {
                    for r in 0..R {
                        let xw = (x.quants.add(r * k + b * BLOCK + 4 * t) as *const i32).read_unaligned();
                        dots[r] = _mm512_dpbusd_epi32(dots[r], words[t], _mm512_set1_epi32(xw));
                    }
                }
                let w_scales = weight_scales::<F>(block.add(F::quant_bytes() * p), rows);
                for r in 0..R {
                    let scale = _mm512_mul_ps(w_scales, _mm512_set1_ps(*x.scales.add(r * nb + b)));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[r]), scale, acc[r]);
                }
            }
        }
        for r in 0..R {
            // SAFETY: row `r` holds `p` values from `b0` (caller); the masked store writes only those.
            unsafe { _mm512_mask_storeu_ps(out[r].as_mut_ptr().add(b0), rows, acc[r]) };
        }
    }

    /// A block's stored weights as 8 vectors, vector `t` holding each row's
    /// elements `4t..4t + 4` (the activations' word `t`); lanes past `rows` zero.
    ///
    /// # Safety
    /// As [`panel`]; `block` is a block of the panel.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn weight_words<F: Format>(block: *const u8, p: usize, rows: u16) -> [__m512i; WORDS] {
        let mut words = [_mm512_setzero_si512(); WORDS];
        // SAFETY: each load reads the panel's `p` lanes of one word inside the block (caller).
        unsafe {
            if F::BITS == 8 {
                for t in 0..WORDS {
                    words[t] = _mm512_maskz_loadu_epi32(rows, block.add(4 * p * t) as *const i32);
                }
            } else {
                // Each byte: element e in the low nibble, e + 16 in the high one.
                let nibble = _mm512_set1_epi8(15);
                for t in 0..WORDS / 2 {
                    let packed = _mm512_maskz_loadu_epi32(rows, block.add(4 * p * t) as *const i32);
                    words[t] = _mm512_and_si512(packed, nibble);
                    words[t + WORDS / 2] = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), nibble);
                }
            }
        }
        words
    }

    /// The panel rows' scales of a block (F32 or F16 per [`Format::SCALE_BYTES`]).
    ///
    /// # Safety
    /// As [`panel`]; `scales` is a block's scales.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn weight_scales<F: Format>(scales: *const u8, rows: u16) -> __m512 {
        // SAFETY: masked loads of the panel's `p` scales (caller).
        unsafe {
            if F::SCALE_BYTES == 4 {
                _mm512_maskz_loadu_ps(rows, scales as *const f32)
            } else {
                _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(rows, scales as *const i16))
            }
        }
    }
}

/// The kernel for CPUs with AVX2 but not AVX-512 VNNI: a panel as two
/// halves of 8 rows (256-bit vectors), `vpmaddubsw` + `vpmaddwd` for the
/// integer dots. `vpmaddubsw` multiplies unsigned by signed bytes into
/// saturating i16 pairs: 4-bit weights (0..=15) go in as stored, from the
/// same `-OFFSET · Σ x` as VNNI; 8-bit ones as llama.cpp does it, the
/// weights' magnitudes against the activations with the weights' signs
/// (`|w|·(±x)` pairs within ±2·127·127), from zero. Either way the same exact
/// integers as VNNI.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // Index loops over const bounds unroll into registers.
mod avx2 {
    use std::arch::x86_64::*;

    use super::masks::{HALF, half_rows, store_half};
    use super::{Activations, BLOCK, Format, WORDS};

    /// `R` input rows against a panel of `p` weight rows, written to
    /// `out[r][b0..b0 + p]`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available ([`super::Kernel::has_avx2`]);
    /// otherwise as the VNNI kernel's. (Without F16C enabled here, Q4_0's
    /// F16 scale conversion compiled to a function call per block.)
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn panel<F: Format, const R: usize>(
        x: &Activations,
        panel: *const u8,
        p: usize,
        out: &mut [&mut [f32]],
        b0: usize,
    ) {
        let (k, nb, block_bytes) = (x.k, x.k / BLOCK, F::block_bytes(p));
        let (ones, flip, nibble) = (_mm256_set1_epi16(1), _mm256_set1_epi8(-128), _mm256_set1_epi8(15));
        for half in 0..2 {
            let (lanes, mask) = half_rows(p, half);
            if lanes == 0 {
                break;
            }
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                // SAFETY (whole block): loads of the half's `lanes` words and scales stay inside block `b`
                // of the panel, the broadcast words inside the input rows' block `b` (caller).
                unsafe {
                    let block = panel.add(b * block_bytes);
                    let words = block.add(4 * HALF * half);
                    let xq = x.quants.add(b * BLOCK);
                    let mut dots = [_mm256_setzero_si256(); R];
                    if F::BITS == 8 {
                        for t in 0..WORDS {
                            let w =
                                _mm256_xor_si256(_mm256_maskload_epi32(words.add(4 * p * t) as *const i32, mask), flip);
                            let magnitude = _mm256_sign_epi8(w, w);
                            for r in 0..R {
                                let pairs =
                                    _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(broadcast(xq, r * k + 4 * t), w));
                                dots[r] = _mm256_add_epi32(dots[r], _mm256_madd_epi16(pairs, ones));
                            }
                        }
                    } else {
                        for r in 0..R {
                            dots[r] = _mm256_set1_epi32(-F::OFFSET * *x.sums.add(r * nb + b));
                        }
                        for t in 0..WORDS / 2 {
                            let packed = _mm256_maskload_epi32(words.add(4 * p * t) as *const i32, mask);
                            let lo = _mm256_and_si256(packed, nibble);
                            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), nibble);
                            for r in 0..R {
                                // Each pair is within ±2·15·127, so the two halves' sum fits an i16.
                                let pairs = _mm256_add_epi16(
                                    _mm256_maddubs_epi16(lo, broadcast(xq, r * k + 4 * t)),
                                    _mm256_maddubs_epi16(hi, broadcast(xq, r * k + 4 * (t + WORDS / 2))),
                                );
                                dots[r] = _mm256_add_epi32(dots[r], _mm256_madd_epi16(pairs, ones));
                            }
                        }
                    }
                    let scales = block.add(F::quant_bytes() * p + F::SCALE_BYTES * HALF * half);
                    let w_scales = if F::SCALE_BYTES == 4 {
                        _mm256_maskload_ps(scales as *const f32, mask)
                    } else if lanes == HALF {
                        _mm256_cvtph_ps(_mm_loadu_si128(scales as *const __m128i))
                    } else {
                        // A short last panel: only its `lanes` F16 scales are there (AVX2 has no 16-bit masked load).
                        let mut halfs = [0u16; HALF];
                        std::ptr::copy_nonoverlapping(scales as *const u16, halfs.as_mut_ptr(), lanes);
                        _mm256_cvtph_ps(_mm_loadu_si128(halfs.as_ptr() as *const __m128i))
                    };
                    for r in 0..R {
                        let scale = _mm256_mul_ps(w_scales, _mm256_set1_ps(*x.scales.add(r * nb + b)));
                        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r]), scale, acc[r]);
                    }
                }
            }
            for r in 0..R {
                store_half(out[r], b0 + HALF * half, lanes, acc[r]);
            }
        }
    }

    /// The 4 bytes at `quants + at`, in every lane.
    ///
    /// # Safety
    /// AVX2 must be available and the 4 bytes readable.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn broadcast(quants: *const u8, at: usize) -> __m256i {
        // SAFETY: the caller's 4 bytes, read unaligned.
        _mm256_set1_epi32(unsafe { (quants.add(at) as *const i32).read_unaligned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::q8_0::Q8_0;
    use crate::quant::test_data::data;

    /// Rows `16 a .. 16 b` of a packed matrix are a packed matrix (how the
    /// stacked Q/K/V and gate/up projections are split into views).
    #[test]
    fn whole_panels_are_a_packed_matrix() {
        let (m, n, k) = (3, 53, 96);
        let x = data(m * k, 0.4);
        let w = super::super::q8_0::pack(&data(n * k, 0.9), n, k).unwrap();
        let full = matmul::<Q8_0>(&x, m, &w, n, k, Kernel::Avx512);
        let (from, rows, bytes) = (16, 37, Q8_0::row_bytes(k));
        let view = matmul::<Q8_0>(&x, m, &w[from * bytes..(from + rows) * bytes], rows, k, Kernel::Avx512);
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
        let w = super::super::q8_0::pack(&data(n * k, 0.6), n, k).unwrap();
        let full = matmul::<Q8_0>(&x, m, &w, n, k, Kernel::Portable);
        let a = quantize_rows(&x, m, k);
        let tiles = Panels(IntPanels::<Q8_0> { a: &a, w: &w, n, k, kernel: Kernel::Portable, format: PhantomData });
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
