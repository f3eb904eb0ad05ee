//! `x @ Wᵀ` with Q4_0 weights (llama.cpp's Q4_0: 32 weights per block, one
//! F16 scale `d`, 4-bit values `q` in 0..=15 standing for `(q - 8) · d`),
//! dotted with activations quantized to int8 per 32-block as [`super::q8_0`]
//! does, on AVX-512 VNNI's `vpdpbusd`.
//!
//! **Quantization** follows llama.cpp's reference (`quantize_row_q4_0_ref`):
//! `d = max / -8` for the block's value of largest magnitude `max`, so that
//! value is exactly `-8 · d`, and `q = min(15, ⌊v / d + 8.5⌋)`. 4.5 bits per
//! weight, as in llama.cpp.
//!
//! **Signedness.** `vpdpbusd` multiplies an unsigned byte by a signed one:
//! here the weight nibble (0..=15) is the unsigned operand and the
//! activation quant (-127..=127) the signed one, so `Σ q·x` comes out and
//! `Σ (q - 8)·x = Σ q·x - 8 Σ x`; the activation side's `-8 Σ x` per block
//! (computed once per input row, not per weight row) is added to each block's dot.
//!
//! **Layout.** A packed row is `[k/2 nibble bytes][k/32 F16 scales]`
//! ([`row_bytes`]). The int8 view of the weights follows
//! [`super::lanes`]' group layout with at most 4 lanes per block (so a group
//! has an even number of steps), and steps `2p` and `2p + 1` of a group share
//! `step_bytes` nibble bytes: byte `j` holds step `2p`'s byte `j` in its low
//! nibble and step `2p + 1`'s in its high one. One load, a mask and a shift
//! give two `vpdpbusd` operands already in the activations' layout.
//!
//! **Without VNNI** the [`avx2`] kernel does the same with `vpmaddubsw`
//! (nibbles unsigned, activations signed) and `vpmaddwd`.
//!
//! The portable path ([`super::lanes::column`]) does the kernel's integer
//! and F32 arithmetic lane by lane, so both agree to rounding; tiling and
//! threading are [`crate::cpu_linear::run_tiled`]'s.

use half::f16;
use rayon::prelude::*;

use super::Kernel;
use super::lanes::{self, BLOCK, GROUP, Group, Layout, Plan, Quantized, SIDE_BY_SIDE, quantize_rows, tile_columns};
use crate::cpu_linear::{Tiles, WIDE_TILE, run_tiled};
use crate::error::{Error, Result};

/// Lanes a block may spread over: 4, so every group has an even number of
/// steps for the nibble pairs (a 2-block group uses 8 of the 16 lanes).
const MAX_LANES: usize = 4;

/// Bytes of one packed row of `k` weights (`k` a multiple of [`BLOCK`]).
pub fn row_bytes(k: usize) -> usize {
    k / 2 + 2 * (k / BLOCK)
}

/// Whether this CPU runs the `vpdpbusd` kernel (the F16 scales convert with
/// AVX-512F's `vcvtph2ps`).
pub fn has_simd() -> bool {
    super::q8_0::has_simd()
}

/// The kernel products run on here: VNNI, else AVX2 ([`avx2`]), else the portable loop.
pub fn kernel() -> Kernel {
    Kernel::best(has_simd())
}

/// The nibble byte and shift (0 or 4) holding byte `p` of a row's int8 view.
fn nibble(p: usize, nb: usize) -> (usize, u32) {
    let g = Group::of(p / (GROUP * BLOCK) * GROUP, nb, MAX_LANES);
    let (rel, bytes) = (p - g.start(), g.step_bytes());
    let step = rel / bytes;
    (g.start() / 2 + bytes * (step / 2) + rel % bytes, 4 * (step % 2) as u32)
}

/// Packs `values` `[n, k]` (row-major F32) into `n` rows of [`row_bytes`].
pub fn pack(values: &[f32], n: usize, k: usize) -> Result<Vec<u8>> {
    if !k.is_multiple_of(BLOCK) {
        return Err(Error::ServeDtype {
            dtype: "q4_0",
            message: format!("a weight's rows are {k} long; Q4_0 needs a multiple of {BLOCK}"),
        });
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(Error::ServeDtype { dtype: "q4_0", message: "a weight holds a NaN or infinite value".into() });
    }
    let nb = k / BLOCK;
    let bytes = row_bytes(k);
    // Where each of a row's k values goes (the same for every row): worked
    // out per value of every row, this was most of a Q4_0 model's load time.
    let places: Vec<(usize, u32)> =
        (0..k).map(|c| nibble(lanes::position(c / BLOCK, c % BLOCK, nb, MAX_LANES), nb)).collect();
    let mut out = vec![0u8; n * bytes];
    out.par_chunks_mut(bytes.max(1)).zip(values.par_chunks(k.max(1))).for_each(|(row, values)| {
        let (quants, scales) = row.split_at_mut(k / 2);
        let blocks = values.chunks_exact(BLOCK).zip(scales.chunks_exact_mut(2)).zip(places.chunks_exact(BLOCK));
        for ((block, scale), places) in blocks {
            let max = block.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let d = max / -8.0;
            let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
            scale.copy_from_slice(&f16::from_f32(d).to_le_bytes());
            for (&v, &(at, shift)) in block.iter().zip(places) {
                // `as u8` truncates as llama.cpp's `(int8_t)` cast does; the operand is at least 0.5.
                let q = ((v * inv + 8.5) as u8).min(15);
                quants[at] |= q << shift;
            }
        }
    });
    Ok(out)
}

/// Block `b`'s scale in a packed row for `k`.
fn scale(row: &[u8], k: usize, b: usize) -> f32 {
    let at = k / 2 + 2 * b;
    f16::from_le_bytes([row[at], row[at + 1]]).to_f32()
}

/// The F32 values a packed matrix stands for (tests and quality checks).
pub fn unpack(packed: &[u8], n: usize, k: usize) -> Vec<f32> {
    let nb = k / BLOCK;
    let mut out = Vec::with_capacity(n * k);
    for row in packed.chunks_exact(row_bytes(k)).take(n) {
        for b in 0..nb {
            let d = scale(row, k, b);
            out.extend((0..BLOCK).map(|e| {
                let (at, shift) = nibble(lanes::position(b, e, nb, MAX_LANES), nb);
                (f32::from((row[at] >> shift) & 15) - 8.0) * d
            }));
        }
    }
    out
}

/// `out[i][j] = Σ_c x[i][c] · w[j][c]` for `x` `[m, k]` F32 and `w` packed
/// by [`pack`] (`n` rows), returned row-major `[m, n]`; activations are
/// quantized to int8 per 32-block first.
pub fn matmul(x: &[f32], m: usize, w: &[u8], n: usize, k: usize) -> Vec<f32> {
    matmul_on(x, m, w, n, k, kernel())
}

/// [`matmul`] on `kernel` (tests run each the CPU has); one the CPU lacks runs the portable loop.
pub(crate) fn matmul_on(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, kernel: Kernel) -> Vec<f32> {
    assert!(
        k.is_multiple_of(BLOCK) && x.len() == m * k && w.len() == n * row_bytes(k),
        "q4_0 matmul: slices do not match [{m}, {k}] x packed [{n}, {k}]"
    );
    if k == 0 {
        return vec![0f32; m * n];
    }
    let mut activations = quantize_rows(x, m, k, 0, Layout::Lanes(MAX_LANES));
    activations.sums.iter_mut().for_each(|s| *s *= -8);
    let kernel = kernel.supported(has_simd());
    let plans = lanes::plans(k / BLOCK, MAX_LANES);
    run_tiled(m, n, &Q4Tiles { a: &activations, w, k, plans: &plans, kernel })
}

/// The product's operands; `a.sums` holds each block's seed, `-8 Σ x`.
struct Q4Tiles<'a> {
    a: &'a Quantized,
    w: &'a [u8],
    k: usize,
    /// The row's groups, for the AVX-512 kernel.
    plans: &'a [Plan],
    /// One the CPU has ([`matmul_on`] checked).
    kernel: Kernel,
}

impl Tiles for Q4Tiles<'_> {
    const COLUMNS: usize = WIDE_TILE;

    fn tile<const R: usize, const C: usize>(&self, i: usize, j: usize, out: &mut [&mut [f32]], at: (usize, usize)) {
        let (k, nb, bytes) = (self.k, self.k / BLOCK, row_bytes(self.k));
        let xq = &self.a.quants[i * k..(i + R) * k];
        let xs = &self.a.scales[i * nb..(i + R) * nb];
        let seeds = &self.a.sums[i * nb..(i + R) * nb];
        let (xq_p, xs_p, seeds_p) = (xq.as_ptr(), xs.as_ptr(), seeds.as_ptr());
        let rows = |c: usize, count: usize| &self.w[(j + c) * bytes..(j + c + count) * bytes];
        #[cfg(target_arch = "x86_64")]
        let ahead = lanes::prefetch_distance(R, C, bytes);
        tile_columns::<R, C>(
            self.kernel == Kernel::Avx512,
            // SAFETY: only called with `kernel` AVX-512 (VNNI, checked in `matmul_on`); `xq` holds R rows of k
            // bytes, `xs` and `seeds` R rows of nb values, and `rows` SIDE_BY_SIDE packed rows of `bytes`.
            #[cfg(target_arch = "x86_64")]
            |c| unsafe {
                x86::columns::<R, SIDE_BY_SIDE>(
                    xq_p,
                    xs_p,
                    seeds_p,
                    rows(c, SIDE_BY_SIDE).as_ptr(),
                    k,
                    self.plans,
                    ahead,
                )
            },
            #[cfg(not(target_arch = "x86_64"))]
            |_| unreachable!("no AVX-512 kernel off x86-64"),
            |c| {
                let row = rows(c, 1);
                // SAFETY (both kernels): the CPU has `kernel` (checked in `matmul_on`); `xq` holds R rows of k
                // bytes, `xs` and `seeds` R rows of nb values, and `row` one packed row of `bytes`.
                match self.kernel {
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx512 => unsafe {
                        x86::columns::<R, 1>(xq_p, xs_p, seeds_p, row.as_ptr(), k, self.plans, ahead)[0]
                    },
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2 => unsafe { avx2::column::<R>(xq_p, xs_p, seeds_p, row.as_ptr(), k) },
                    _ => column_portable::<R>(xq, xs, seeds, row, k),
                }
            },
            out,
            at,
        )
    }
}

/// The SIMD kernel's arithmetic, lane by lane.
fn column_portable<const R: usize>(xq: &[u8], xs: &[f32], seeds: &[i32], row: &[u8], k: usize) -> [f32; R] {
    let nb = k / BLOCK;
    std::array::from_fn(|r| {
        let (xq, xs, seeds) = (&xq[r * k..(r + 1) * k], &xs[r * nb..(r + 1) * nb], &seeds[r * nb..(r + 1) * nb]);
        lanes::column(
            nb,
            MAX_LANES,
            |p| {
                let (at, shift) = nibble(p, nb);
                i32::from((row[at] >> shift) & 15) * i32::from(xq[p] as i8)
            },
            |b| seeds[b],
            |b| xs[b] * scale(row, k, b),
        )
    })
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // Index loops over const bounds unroll into registers.
mod x86 {
    use std::arch::x86_64::*;

    use super::super::lanes::Plan;
    use super::super::lanes::x86::{add_scaled, column_sums, prefetch, seed_lanes, spread_ps};
    use super::BLOCK;

    /// The dots of `R` quantized input rows (with their blocks' seeds) with
    /// `C` consecutive packed weight rows (`out[c][r]`), every entry summed
    /// as with one weight row (see [`super::super::q8_0`]'s `columns`).
    ///
    /// # Safety
    /// AVX-512F, BW, VL and VNNI must be available; `xq` must hold `R · k`
    /// bytes, `xs` and `seeds` `R · k/32` values and `rows` `C` packed rows
    /// for `k`, laid out as `plans` (the row's groups) say.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn columns<const R: usize, const C: usize>(
        xq: *const u8,
        xs: *const f32,
        seeds: *const i32,
        rows: *const u8,
        k: usize,
        plans: &[Plan],
        ahead: usize,
    ) -> [[f32; R]; C] {
        let (nb, bytes) = (k / BLOCK, super::row_bytes(k));
        let nibbles = _mm512_set1_epi8(15);
        prefetch(rows.wrapping_add(ahead), C * bytes);
        let mut acc = [[_mm512_setzero_ps(); R]; C];
        for p in plans {
            // Lanes past a group's blocks load as zero (scale 0), so they add nothing.
            let (g, blocks, used) = (p.group, p.blocks, p.used);
            // SAFETY (whole block): masked loads read only the group's nibbles, scales and seeds, all inside
            // the rows (caller); unaligned loads throughout.
            unsafe {
                let mut w_scales = [_mm512_setzero_ps(); C];
                for c in 0..C {
                    let scales = rows.add(c * bytes + k / 2) as *const i16;
                    let half = _mm256_maskz_loadu_epi16(blocks, scales.add(g.first));
                    w_scales[c] = spread_ps(p, _mm512_cvtph_ps(half));
                }
                // Each input row's dots start from its blocks' corrections (in each block's first lane).
                let mut dots = [[_mm512_setzero_si512(); R]; C];
                for r in 0..R {
                    let seed = seed_lanes(p, _mm512_maskz_loadu_epi32(blocks, seeds.add(r * nb + g.first)));
                    for c in 0..C {
                        dots[c][r] = seed;
                    }
                }
                // Each nibble chunk holds two steps: one load, a mask and a shift per weight row.
                let step_bytes = g.step_bytes();
                for pair in 0..g.steps() / 2 {
                    let at = g.start() + step_bytes * 2 * pair;
                    let (mut lo, mut hi) = ([_mm512_setzero_si512(); C], [_mm512_setzero_si512(); C]);
                    for c in 0..C {
                        let chunk = rows.add(c * bytes + g.start() / 2 + step_bytes * pair);
                        let packed = _mm512_maskz_loadu_epi32(used, chunk as *const i32);
                        lo[c] = _mm512_and_si512(packed, nibbles);
                        hi[c] = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), nibbles);
                    }
                    for r in 0..R {
                        let x0 = _mm512_maskz_loadu_epi32(used, xq.add(r * k + at) as *const i32);
                        let x1 = _mm512_maskz_loadu_epi32(used, xq.add(r * k + at + step_bytes) as *const i32);
                        for c in 0..C {
                            dots[c][r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dots[c][r], lo[c], x0), hi[c], x1);
                        }
                    }
                }
                add_scaled(p, xs, nb, &w_scales, &dots, &mut acc);
            }
        }
        column_sums(&acc)
    }
}

/// The kernel for CPUs with AVX2 but not AVX-512 VNNI: each 16-lane step
/// of the layout as two 256-bit halves, `vpmaddubsw` (unsigned nibbles 0..15
/// by signed activations; pairs within ±2·15·127, no saturation) and
/// `vpmaddwd` into i32 lanes: the VNNI kernel's integers; a spread block's
/// lanes are added as integers before its one F32 step (the VNNI kernel adds
/// them in F32), and the final sum of the lanes is ordered differently.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // Index loops over const bounds unroll into registers.
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::lanes::avx2::{HALF, load, load_ps, per_block, sum, used_in};
    use super::super::lanes::{Group, groups};
    use super::{BLOCK, MAX_LANES};

    /// The dots of `R` quantized input rows (with their blocks' seeds) with one packed weight row.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `xq` must hold `R · k` bytes,
    /// `xs` and `seeds` `R · k/32` values and `row` one packed row for `k`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn column<const R: usize>(
        xq: *const u8,
        xs: *const f32,
        seeds: *const i32,
        row: *const u8,
        k: usize,
    ) -> [f32; R] {
        let nb = k / BLOCK;
        let w_scales = row.wrapping_add(k / 2) as *const u16;
        let mut acc = [_mm256_setzero_ps(); R];
        for g in groups(nb, MAX_LANES) {
            // SAFETY (whole block): loads stay inside the group's nibbles, scales and seeds (caller).
            unsafe {
                if g.lanes == 1 {
                    // A block per lane: the halves are independent, one at a time.
                    for half in 0..2 {
                        let blocks = used_in(g.blocks, half);
                        if blocks == 0 {
                            break;
                        }
                        let dots = pairs::<R, 4>(g, half, xq, row, k);
                        let first = g.first + HALF * half;
                        let w_scale = scales(w_scales.add(first), blocks);
                        for r in 0..R {
                            let dot = _mm256_add_epi32(dots[r], load(seeds.add(r * nb + first) as *const u8, blocks));
                            let scale = _mm256_mul_ps(load_ps(xs.add(r * nb + first), blocks), w_scale);
                            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[r]);
                        }
                    }
                } else {
                    // A short group: at most 8 blocks, whose lanes may sit in both halves.
                    let (lo, hi) = match g.steps() {
                        4 => (pairs::<R, 2>(g, 0, xq, row, k), pairs::<R, 2>(g, 1, xq, row, k)),
                        _ => (pairs::<R, 1>(g, 0, xq, row, k), pairs::<R, 1>(g, 1, xq, row, k)),
                    };
                    let w_scale = scales(w_scales.add(g.first), g.blocks);
                    for r in 0..R {
                        let seed = load(seeds.add(r * nb + g.first) as *const u8, g.blocks);
                        let dot = _mm256_add_epi32(per_block(g, lo[r], hi[r]), seed);
                        let scale = _mm256_mul_ps(load_ps(xs.add(r * nb + g.first), g.blocks), w_scale);
                        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[r]);
                    }
                }
            }
        }
        std::array::from_fn(|r| sum(acc[r]))
    }

    /// `n` (at most 8) F16 scales from `p` as F32, the other lanes zero.
    ///
    /// # Safety
    /// F16C must be available and `p` valid for `n` values.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn scales(p: *const u16, n: usize) -> __m256 {
        // SAFETY: `n` values are readable at `p`; the short copy reads only those.
        unsafe {
            if n >= HALF {
                _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
            } else {
                let mut buf = [0u16; HALF];
                std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n);
                _mm256_cvtph_ps(_mm_loadu_si128(buf.as_ptr() as *const __m128i))
            }
        }
    }

    /// Half `half` of group `g`'s `P` nibble loads, two steps each, for `R`
    /// input rows, from zero (zero where the group has no lanes in that half).
    ///
    /// # Safety
    /// As [`column`]; `P` must be `g.steps() / 2`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pairs<const R: usize, const P: usize>(
        g: Group,
        half: usize,
        xq: *const u8,
        row: *const u8,
        k: usize,
    ) -> [__m256i; R] {
        let used = used_in(g.used_lanes(), half);
        let mut dots = [_mm256_setzero_si256(); R];
        if used == 0 {
            return dots;
        }
        let (bytes, offset) = (g.step_bytes(), 4 * HALF * half);
        let (nibbles, ones) = (_mm256_set1_epi8(15), _mm256_set1_epi16(1));
        for p in 0..P {
            let at = g.start() + bytes * 2 * p + offset;
            // SAFETY: nibble chunk `p` and steps `2p`, `2p + 1` of this half lie inside the weight row and each
            // input row (caller).
            unsafe {
                let packed = load(row.add(g.start() / 2 + bytes * p + offset), used);
                let lo = _mm256_and_si256(packed, nibbles);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), nibbles);
                for r in 0..R {
                    let x0 = load(xq.add(r * k + at), used);
                    let x1 = load(xq.add(r * k + at + bytes), used);
                    // Each step's pairs are within ±3810, so the two steps' sum fits an i16.
                    let both = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1));
                    dots[r] = _mm256_add_epi32(dots[r], _mm256_madd_epi16(both, ones));
                }
            }
        }
        dots
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::test_data::{
        BLOCK_SHAPES, assert_kernels_match_portable, assert_rows_do_not_depend_on_the_batch, data,
    };

    /// llama.cpp's rounding: the largest-magnitude value comes back exactly
    /// (`-8 d`, up to the F16 scale), the others within half a step, except
    /// those beyond `7.5 d` on the other side, which clamp to `7 d` (the range
    /// is -8..=7).
    #[test]
    fn packing_follows_llama_cpp_rounding() {
        let (n, k) = (5, 96);
        let mut w = data(n * k, 0.2);
        w[..32].iter_mut().for_each(|v| *v = 0.0); // an all-zero block: scale 0
        w[40] = -3.0; // a negative extreme: d > 0
        let packed = pack(&w, n, k).unwrap();
        assert_eq!(packed.len(), n * row_bytes(k));
        assert_eq!(row_bytes(576), 576 / 32 * 18, "18 bytes per block, as llama.cpp's block_q4_0");
        let back = unpack(&packed, n, k);
        for (b, (block, got)) in w.chunks(BLOCK).zip(back.chunks(BLOCK)).enumerate() {
            let max = block.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let d = f16::from_f32(max / -8.0).to_f32();
            for (v, g) in block.iter().zip(got) {
                let slack = (max.abs() * 1e-3).max(1e-7); // the F16 scale's rounding
                let step = if d != 0.0 && v / d > 7.5 { d.abs() } else { d.abs() * 0.5 };
                assert!((v - g).abs() <= step + slack, "block {b}: {v} came back as {g}");
                if d != 0.0 && v / d > 7.5 {
                    assert_eq!(*g, 7.0 * d, "block {b}: {v} clamps to 7 d");
                }
                if *v == max {
                    assert_eq!(*g, -8.0 * d, "block {b}: the extreme is exactly -8 d");
                }
            }
        }
        assert_eq!(back[40], -3.0, "-3 = -8 · 0.375, exact in F16");
        assert!(pack(&w[..n * 40], n, 40).is_err(), "rows not a multiple of 32");
        let mut bad = w.clone();
        bad[3] = f32::INFINITY;
        assert!(pack(&bad, n, k).is_err());
    }

    /// Both paths against the F64 product of the quantized operands, for
    /// widths whose last group has 1, 2 (SmolLM2's 576), 3, 5, 7, 9 and 16
    /// blocks, one group or several.
    #[test]
    fn both_paths_match_the_quantized_product() {
        for &(m, n, k) in BLOCK_SHAPES {
            let x = data(m * k, 0.3);
            let w = pack(&data(n * k, 1.1), n, k).unwrap();
            let wq = unpack(&w, n, k);
            let a = quantize_rows(&x, m, k, 0, Layout::Lanes(MAX_LANES));
            let nb = k / BLOCK;
            let xq: Vec<f32> = (0..m * k)
                .map(|idx| {
                    let (i, c) = (idx / k, idx % k);
                    let q = f32::from(a.quants[i * k + lanes::position(c / BLOCK, c % BLOCK, nb, MAX_LANES)] as i8);
                    q * a.scales[i * nb + c / BLOCK]
                })
                .collect();
            let portable = matmul_on(&x, m, &w, n, k, Kernel::Portable);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|c| f64::from(xq[i * k + c]) * f64::from(wq[j * k + c])).sum();
                    let got = portable[i * n + j];
                    assert!((f64::from(got) - want).abs() < 1e-4, "{m}x{n}x{k} ({i}, {j}): {got} vs {want}");
                }
            }
            assert_kernels_match_portable((m, n, k), &portable, |kernel| matmul_on(&x, m, &w, n, k, kernel));
        }
    }

    #[test]
    fn within_quantization_error_of_the_f32_product() {
        let (m, n, k) = (4, 33, 576);
        let (x, wf) = (data(m * k, 0.5), data(n * k, 2.0));
        let exact = crate::cpu_linear::matmul_transposed(&x, m, &wf, n, k);
        let got = matmul(&x, m, &pack(&wf, n, k).unwrap(), n, k);
        // Weights are off by at most a step (amax / 8 ≤ 1/8, on the clamped side of -8..=7), activations by
        // half of amax / 127.
        let bound = (k as f32).sqrt() * (1.0 / 8.0 + 1.0 / 254.0);
        let diff = got.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff > 0.0 && diff < bound, "max difference {diff} (bound {bound})");
    }

    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let (n, k) = (97, 576);
        let w = pack(&data(n * k, 2.0), n, k).unwrap();
        assert_rows_do_not_depend_on_the_batch(n, k, |x, m, kernel| matmul_on(x, m, &w, n, k, kernel));
    }
}
