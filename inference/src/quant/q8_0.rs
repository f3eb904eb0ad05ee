//! `x @ Wᵀ` with Q8_0 weights: int8 with one F32 scale per block of 32
//! (llama.cpp's Q8_0, with an F32 rather than F16 scale), dotted with
//! activations quantized the same way per 32-block, on AVX-512 VNNI's
//! `vpdpbusd` (four u8 × i8 products added into each i32 lane).
//!
//! **Signedness.** `vpdpbusd` multiplies an unsigned byte by a signed one.
//! Activations are stored offset by 128 (`u = q + 128`, in 1..=255), so
//! `Σ u·w = Σ q·w + 128 Σ w`; each weight block keeps `-128 Σ w` (an i32),
//! which is added to the block's integer dot and cancels the offset exactly.
//!
//! **Layout.** A packed row is `[k quant bytes][k/32 F32 scales][k/32 i32
//! offsets]`, little-endian ([`row_bytes`]), the quant bytes in
//! [`super::lanes`]' group layout (up to 8 lanes per block, so a 576-wide
//! row's 2-block tail fills one vector): `vpdpbusd` steps over a group leave
//! each lane holding its part of a block's integer dot, which is converted,
//! scaled by its block's `x scale · w scale` and added into the lane's F32
//! sum: one conversion per group, not per block, and no shuffles per input
//! row (see [`super::lanes`] for the rounding this trades). Activations are
//! laid out the same way.
//!
//! **Without VNNI** (AVX2 only: Zen 1-3, Intel before Ice Lake) the
//! [`avx2`] kernel computes the same integers with `vpmaddubsw` on the
//! weights' magnitudes and sign-adjusted activations (stored without the
//! offset there), so no correction is added.
//!
//! The portable path ([`super::lanes::column`]) computes the same integers
//! and the same F32 operations in the same order up to the final 16-lane sum,
//! so both agree to rounding. Tiling and threading
//! are [`crate::cpu_linear::run_tiled`]'s.

use rayon::prelude::*;

use crate::cpu_linear::{Tiles, WIDE_TILE, run_tiled};
use crate::error::{Error, Result};

use super::Kernel;
pub use super::lanes::BLOCK;
use super::lanes::{
    self, Plan, Quantized, SIDE_BY_SIDE, position as lane_position, quantize_row, quantize_rows, tile_columns,
};

/// Lanes a block may spread over: all eight of its words (a 2-block group
/// fills a vector in one step).
const MAX_LANES: usize = 8;

/// Bytes of one packed row of `k` weights (`k` a multiple of [`BLOCK`]).
pub fn row_bytes(k: usize) -> usize {
    k + 8 * (k / BLOCK)
}

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

/// Where byte `e` of block `b` goes in a row of `nb` blocks.
fn position(b: usize, e: usize, nb: usize) -> usize {
    lane_position(b, e, nb, MAX_LANES)
}

/// Packs `values` `[n, k]` (row-major F32) into `n` rows of [`row_bytes`].
pub fn pack(values: &[f32], n: usize, k: usize) -> Result<Vec<u8>> {
    pack_with(values, n, k, MAX_LANES)
}

/// [`pack`] with at most `lanes` lanes per block (tests compare layouts).
fn pack_with(values: &[f32], n: usize, k: usize, lanes: usize) -> Result<Vec<u8>> {
    if !k.is_multiple_of(BLOCK) {
        return Err(Error::ServeDtype {
            dtype: "q8_0",
            message: format!("a weight's rows are {k} long; Q8_0 needs a multiple of {BLOCK}"),
        });
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(Error::ServeDtype { dtype: "q8_0", message: "a weight holds a NaN or infinite value".into() });
    }
    let nb = k / BLOCK;
    let bytes = row_bytes(k);
    let mut out = vec![0u8; n * bytes];
    out.par_chunks_mut(bytes.max(1)).zip(values.par_chunks(k.max(1))).for_each(|(row, values)| {
        let (quants, tail) = row.split_at_mut(k);
        let (mut scales, mut sums) = (vec![0f32; nb], vec![0i32; nb]);
        quantize_row(values, quants, &mut scales, &mut sums, 0, lanes);
        let (scale_bytes, offset_bytes) = tail.split_at_mut(4 * nb);
        for (dst, s) in scale_bytes.chunks_exact_mut(4).zip(&scales) {
            dst.copy_from_slice(&s.to_le_bytes());
        }
        for (dst, sum) in offset_bytes.chunks_exact_mut(4).zip(sums) {
            dst.copy_from_slice(&(-128 * sum).to_le_bytes());
        }
    });
    Ok(out)
}

/// The F32 values a packed matrix stands for (tests and quality checks).
pub fn unpack(packed: &[u8], n: usize, k: usize) -> Vec<f32> {
    let (nb, bytes) = (k / BLOCK, row_bytes(k));
    let mut out = Vec::with_capacity(n * k);
    for row in packed.chunks_exact(bytes).take(n) {
        for b in 0..nb {
            let at = k + 4 * b;
            let d = f32::from_le_bytes([row[at], row[at + 1], row[at + 2], row[at + 3]]);
            out.extend((0..BLOCK).map(|e| f32::from(row[position(b, e, nb)] as i8) * d));
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
    matmul_with(x, m, w, n, k, kernel, MAX_LANES)
}

/// [`matmul_on`] for weights packed with at most `lanes` lanes per block.
fn matmul_with(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, kernel: Kernel, lanes: usize) -> Vec<f32> {
    assert!(
        k.is_multiple_of(BLOCK) && x.len() == m * k && w.len() == n * row_bytes(k),
        "q8_0 matmul: slices do not match [{m}, {k}] x packed [{n}, {k}]"
    );
    if k == 0 {
        return vec![0f32; m * n];
    }
    let kernel = kernel.supported(has_simd());
    // AVX2 multiplies signed activations by the weights' magnitudes (no offset to cancel).
    let offset = if kernel == Kernel::Avx2 { 0 } else { 128 };
    let activations = quantize_rows(x, m, k, offset, lanes);
    let plans = lanes::plans(k / BLOCK, lanes);
    run_tiled(m, n, &Q8Tiles { a: &activations, w, k, lanes, plans: &plans, kernel })
}

struct Q8Tiles<'a> {
    a: &'a Quantized,
    w: &'a [u8],
    k: usize,
    /// Lanes per block at most (the layout `w` and the activations are in).
    lanes: usize,
    /// The row's groups, for the AVX-512 kernel.
    plans: &'a [Plan],
    /// One the CPU has ([`matmul_with`] checked).
    kernel: Kernel,
}

impl Tiles for Q8Tiles<'_> {
    const COLUMNS: usize = WIDE_TILE;

    fn tile<const R: usize, const C: usize>(&self, i: usize, j: usize, out: &mut [&mut [f32]], at: (usize, usize)) {
        let (k, nb, bytes) = (self.k, self.k / BLOCK, row_bytes(self.k));
        let xq = &self.a.quants[i * k..(i + R) * k];
        let xs = &self.a.scales[i * nb..(i + R) * nb];
        let rows = |c: usize, count: usize| &self.w[(j + c) * bytes..(j + c + count) * bytes];
        #[cfg(target_arch = "x86_64")]
        let ahead = lanes::prefetch_distance(R, C, bytes);
        tile_columns::<R, C>(
            self.kernel == Kernel::Avx512,
            // SAFETY: only called with `kernel` AVX-512 (VNNI, checked in `matmul_with`); `xq` holds R rows of
            // k bytes, `xs` R rows of nb scales, and `rows` SIDE_BY_SIDE packed rows of `bytes`.
            #[cfg(target_arch = "x86_64")]
            |c| unsafe {
                x86::columns::<R, SIDE_BY_SIDE>(
                    xq.as_ptr(),
                    xs.as_ptr(),
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
                // SAFETY (both kernels): the CPU has `kernel` (checked in `matmul_with`); `xq` holds R rows of k
                // bytes, `xs` R rows of nb scales, and `row` one packed row of `bytes`.
                match self.kernel {
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx512 => unsafe {
                        x86::columns::<R, 1>(xq.as_ptr(), xs.as_ptr(), row.as_ptr(), k, self.plans, ahead)[0]
                    },
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2 => unsafe { avx2::column::<R>(xq.as_ptr(), xs.as_ptr(), row.as_ptr(), k, self.lanes) },
                    _ => column_portable::<R>(xq, xs, row, k, self.lanes),
                }
            },
            out,
            at,
        )
    }
}

/// The SIMD kernel's arithmetic, lane by lane.
fn column_portable<const R: usize>(xq: &[u8], xs: &[f32], row: &[u8], k: usize, max_lanes: usize) -> [f32; R] {
    let nb = k / BLOCK;
    let word = |at: usize| [row[at], row[at + 1], row[at + 2], row[at + 3]];
    std::array::from_fn(|r| {
        let (xq, xs) = (&xq[r * k..(r + 1) * k], &xs[r * nb..(r + 1) * nb]);
        lanes::column(
            nb,
            max_lanes,
            |p| i32::from(xq[p]) * i32::from(row[p] as i8),
            |b| i32::from_le_bytes(word(k + 4 * nb + 4 * b)),
            |b| xs[b] * f32::from_le_bytes(word(k + 4 * b)),
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

    /// The dots of `R` quantized input rows with `C` consecutive packed
    /// weight rows (`out[c][r]`), every entry summed as with one weight row.
    ///
    /// With two or more weight rows each input row's vector, loaded once per
    /// step, feeds `C` products, and its scales are spread once per group:
    /// with one weight row the input rows' loads outnumber the products.
    ///
    /// # Safety
    /// AVX-512F, BW, VL and VNNI must be available; `xq` must hold `R · k`
    /// bytes, `xs` `R · k/32` scales and `rows` `C` packed rows for `k`, all
    /// laid out as `plans` (the row's groups) say.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn columns<const R: usize, const C: usize>(
        xq: *const u8,
        xs: *const f32,
        rows: *const u8,
        k: usize,
        plans: &[Plan],
        ahead: usize,
    ) -> [[f32; R]; C] {
        let (nb, bytes) = (k / BLOCK, super::row_bytes(k));
        prefetch(rows.wrapping_add(ahead), C * bytes);
        let mut acc = [[_mm512_setzero_ps(); R]; C];
        for p in plans {
            // Lanes past a group's blocks load as zero (scale 0), so they add nothing.
            let (g, blocks, used) = (p.group, p.blocks, p.used);
            // SAFETY (whole block): masked loads read only the group's steps, scales and offsets, all inside the
            // rows (caller); the scale and offset arrays may be unaligned (loadu).
            unsafe {
                let mut w_scales = [_mm512_setzero_ps(); C];
                let mut dots = [[_mm512_setzero_si512(); R]; C];
                for c in 0..C {
                    let row = rows.add(c * bytes);
                    let (scales, offsets) = (row.add(k) as *const f32, row.add(k + 4 * nb) as *const i32);
                    w_scales[c] = spread_ps(p, _mm512_maskz_loadu_ps(blocks, scales.add(g.first)));
                    // Every input row's dots start from the blocks' corrections (in each block's first lane).
                    dots[c] = [seed_lanes(p, _mm512_maskz_loadu_epi32(blocks, offsets.add(g.first))); R];
                }
                let step_bytes = g.step_bytes();
                for t in 0..g.steps() {
                    let at = g.start() + step_bytes * t;
                    let mut wv = [_mm512_setzero_si512(); C];
                    for c in 0..C {
                        wv[c] = _mm512_maskz_loadu_epi32(used, rows.add(c * bytes + at) as *const i32);
                    }
                    for r in 0..R {
                        let xv = _mm512_maskz_loadu_epi32(used, xq.add(r * k + at) as *const i32);
                        for c in 0..C {
                            dots[c][r] = _mm512_dpbusd_epi32(dots[c][r], xv, wv[c]);
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
/// of the layout as two 256-bit halves, `vpmaddubsw` + `vpmaddwd` for the
/// integer dots. `vpmaddubsw` multiplies unsigned by signed bytes into
/// saturating i16 pairs, so it takes the weights' magnitudes and the signed
/// activations with the weights' signs (llama.cpp's trick): `|w|·(±x)` pairs
/// stay within ±2·127·127, no saturation, and the dots are the VNNI kernel's
/// exact integers without its offset. A spread block's lanes are added as
/// integers before its one F32 step (the VNNI kernel adds them in F32), and
/// the final sum of the lanes is ordered differently.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // Index loops over const bounds unroll into registers.
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::lanes::avx2::{HALF, load, load_ps, per_block, sum, used_in};
    use super::super::lanes::{Group, groups};
    use super::BLOCK;

    /// The dots of `R` quantized input rows (signed, no offset) with one packed weight row.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `xq` must hold `R · k` bytes, `xs`
    /// `R · k/32` scales and `row` one packed row for `k`, both laid out with
    /// at most `max_lanes` lanes per block.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn column<const R: usize>(
        xq: *const u8,
        xs: *const f32,
        row: *const u8,
        k: usize,
        max_lanes: usize,
    ) -> [f32; R] {
        let nb = k / BLOCK;
        let w_scales = row.wrapping_add(k) as *const f32;
        let mut acc = [_mm256_setzero_ps(); R];
        for g in groups(nb, max_lanes) {
            // SAFETY (whole block): loads stay inside the group's steps and the rows' scales (caller).
            unsafe {
                if g.lanes == 1 {
                    // A block per lane: the halves are independent, one at a time (fewer live registers).
                    for half in 0..2 {
                        let blocks = used_in(g.blocks, half);
                        if blocks == 0 {
                            break;
                        }
                        let dots = steps::<R, 8>(g, half, xq, row, k);
                        let first = g.first + HALF * half;
                        let w_scale = load_ps(w_scales.add(first), blocks);
                        for r in 0..R {
                            let scale = _mm256_mul_ps(load_ps(xs.add(r * nb + first), blocks), w_scale);
                            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r]), scale, acc[r]);
                        }
                    }
                } else {
                    // A short group: a block's lanes may sit in both halves; at most 8 blocks.
                    let (lo, hi) = match g.steps() {
                        4 => (steps::<R, 4>(g, 0, xq, row, k), steps::<R, 4>(g, 1, xq, row, k)),
                        2 => (steps::<R, 2>(g, 0, xq, row, k), steps::<R, 2>(g, 1, xq, row, k)),
                        _ => (steps::<R, 1>(g, 0, xq, row, k), steps::<R, 1>(g, 1, xq, row, k)),
                    };
                    let w_scale = load_ps(w_scales.add(g.first), g.blocks);
                    for r in 0..R {
                        let dot = per_block(g, lo[r], hi[r]);
                        let scale = _mm256_mul_ps(load_ps(xs.add(r * nb + g.first), g.blocks), w_scale);
                        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[r]);
                    }
                }
            }
        }
        std::array::from_fn(|r| sum(acc[r]))
    }

    /// Half `half` of group `g`'s `T` steps for `R` input rows, from zero
    /// (zero where the group has no lanes in that half).
    ///
    /// # Safety
    /// As [`column`]; `T` must be `g.steps()`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn steps<const R: usize, const T: usize>(
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
        let ones = _mm256_set1_epi16(1);
        for t in 0..T {
            let at = g.start() + g.step_bytes() * t + 4 * HALF * half;
            // SAFETY: step `t`'s `used` words of this half lie inside the weight row and each input row (caller).
            unsafe {
                let w = load(row.add(at), used);
                let magnitude = _mm256_sign_epi8(w, w);
                for r in 0..R {
                    let x = _mm256_sign_epi8(load(xq.add(r * k + at), used), w);
                    let pairs = _mm256_maddubs_epi16(magnitude, x);
                    dots[r] = _mm256_add_epi32(dots[r], _mm256_madd_epi16(pairs, ones));
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

    #[test]
    fn packing_round_trips_within_half_a_step() {
        let (n, k) = (7, 96);
        let mut w = data(n * k, 0.2);
        w[5] = 0.0;
        w[..32].iter_mut().for_each(|v| *v = 0.0); // an all-zero block: scale 0
        let packed = pack(&w, n, k).unwrap();
        assert_eq!(packed.len(), n * row_bytes(k));
        let back = unpack(&packed, n, k);
        for (b, (block, got)) in w.chunks(BLOCK).zip(back.chunks(BLOCK)).enumerate() {
            let step = block.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
            for (v, g) in block.iter().zip(got) {
                assert!((v - g).abs() <= step * 0.5 + 1e-7, "block {b}: {v} came back as {g}");
            }
        }
        assert!(pack(&w[..n * 40], n, 40).is_err(), "rows not a multiple of 32");
        let mut bad = w.clone();
        bad[3] = f32::NAN;
        assert!(pack(&bad, n, k).is_err());
    }

    /// Both paths against the F64 product of the quantized operands, for
    /// widths whose last group has 1, 2 (SmolLM2's 576), 3, 5, 7, 9 and 16
    /// blocks (1, 2, 4 and 8 lanes per block), one group or several.
    #[test]
    fn both_paths_match_the_quantized_product() {
        for &(m, n, k) in BLOCK_SHAPES {
            let x = data(m * k, 0.3);
            let w = pack(&data(n * k, 1.1), n, k).unwrap();
            let wq = unpack(&w, n, k);
            let a = quantize_rows(&x, m, k, 128, MAX_LANES);
            let nb = k / BLOCK;
            let xq: Vec<f32> = (0..m * k)
                .map(|idx| {
                    let (i, c) = (idx / k, idx % k);
                    let q = f32::from(a.quants[i * k + position(c / BLOCK, c % BLOCK, nb)]) - 128.0;
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

    /// Spreading a short group's blocks over several lanes changes which
    /// instructions run, not the result beyond rounding: against one lane
    /// per block (the layout before), bit-identical on AVX2 (which adds a
    /// block's lanes as integers), a few ulps apart where the lanes meet in
    /// F32 (the portable loop and VNNI).
    #[test]
    fn spread_groups_match_one_lane_per_block() {
        for &(m, n, k) in &[(1, 9, 32), (3, 9, 64), (5, 31, 576), (2, 7, 1536), (2, 5, 8192), (4, 11, 96), (3, 9, 608)]
        {
            let (x, w) = (data(m * k, 0.7), data(n * k, 1.9));
            let (spread, one) = (pack(&w, n, k).unwrap(), pack_with(&w, n, k, 1).unwrap());
            for kernel in Kernel::available(has_simd()) {
                let got = matmul_with(&x, m, &spread, n, k, kernel, MAX_LANES);
                let want = matmul_with(&x, m, &one, n, k, kernel, 1);
                if kernel == Kernel::Avx2 {
                    assert!(
                        got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{m}x{n}x{k} ({kernel:?}): {got:?} vs {want:?}"
                    );
                }
                let tolerance = 1e-6 * want.iter().fold(1f32, |a, v| a.max(v.abs()));
                let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff <= tolerance, "{m}x{n}x{k} ({kernel:?}): differ by {diff}");
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
}
