//! `x @ Wᵀ` with Q8_0 weights: int8 with one F32 scale per block of 32
//! (llama.cpp's Q8_0, with an F32 rather than F16 scale), dotted with
//! activations quantized the same way per 32-block, on AVX-512 VNNI's
//! `vpdpbusd` (four u8 × i8 products added into each i32 lane).
//!
//! **Signedness.** `vpdpbusd` multiplies an unsigned byte by a signed one.
//! Activations are stored offset by 128 (`u = q + 128`, in 1..=255), so
//! `Σ u·w = Σ q·w + 128 Σ w`; each weight block keeps `-128 Σ w` (an i32),
//! which seeds the accumulator and cancels the offset exactly.
//!
//! **Layout.** One i32 lane per block: a weight row's blocks are taken 16 at a
//! time (a "group", the last may be shorter), and within a group byte `e` of
//! block `b` sits at `4·nb·(e / 4) + 4·b + e % 4` (`nb` blocks in the group).
//! Eight `vpdpbusd` over a group leave each lane holding its block's whole
//! integer dot, which is then scaled (`x scale · w scale`) and added into
//! that lane's F32 sum: one conversion per 16 blocks, not per block.
//! Activations are laid out the same way. A packed row is
//! `[k quant bytes][k/32 F32 scales][k/32 i32 offsets]`, little-endian
//! ([`row_bytes`]).
//!
//! The portable path computes the same integers and the same F32 operations
//! in the same order up to the final 16-lane sum, so both agree to rounding. Tiling and threading
//! are [`crate::cpu_linear::run_tiled`]'s.

use rayon::prelude::*;

use super::bf16::reduce;
use crate::cpu_linear::{Tiles, run_tiled};
use crate::error::{Error, Result};

/// Values per quantization block (one scale each).
pub const BLOCK: usize = 32;
/// Blocks per group: one per i32 lane of a 512-bit vector.
const GROUP: usize = 16;

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

/// Where byte `e` of block `b` goes in a row of `nb` blocks (see the module docs).
fn position(b: usize, e: usize, nb: usize) -> usize {
    let group = b / GROUP;
    let in_group = (nb - group * GROUP).min(GROUP);
    group * GROUP * BLOCK + 4 * in_group * (e / 4) + 4 * (b % GROUP) + e % 4
}

/// Quantizes one row of `k` values into `quants` (laid out per
/// [`position`], each byte `q + offset`) and `scales` (one per block);
/// returns each block's quant sum.
fn quantize_row(values: &[f32], quants: &mut [u8], scales: &mut [f32], offset: u8) -> Vec<i32> {
    let nb = values.len() / BLOCK;
    let mut sums = Vec::with_capacity(nb);
    for (b, (block, scale)) in values.chunks_exact(BLOCK).zip(scales.iter_mut()).enumerate() {
        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        *scale = d;
        let mut sum = 0i32;
        for (e, &v) in block.iter().enumerate() {
            let q = (v * inv).round().clamp(-127.0, 127.0) as i8;
            sum += i32::from(q);
            quants[position(b, e, nb)] = (q as u8).wrapping_add(offset);
        }
        sums.push(sum);
    }
    sums
}

/// Packs `values` `[n, k]` (row-major F32) into `n` rows of [`row_bytes`].
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
    let nb = k / BLOCK;
    let bytes = row_bytes(k);
    let mut out = vec![0u8; n * bytes];
    out.par_chunks_mut(bytes.max(1)).zip(values.par_chunks(k.max(1))).for_each(|(row, values)| {
        let (quants, tail) = row.split_at_mut(k);
        let mut scales = vec![0f32; nb];
        let sums = quantize_row(values, quants, &mut scales, 0);
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

/// Activations quantized for one product: offset quants `[m, k]` and scales `[m, k/32]`.
struct Activations {
    quants: Vec<u8>,
    scales: Vec<f32>,
}

fn quantize_activations(x: &[f32], m: usize, k: usize) -> Activations {
    let nb = k / BLOCK;
    let mut a = Activations { quants: vec![0u8; m * k], scales: vec![0f32; m * nb] };
    let run = |((values, quants), scales): ((&[f32], &mut [u8]), &mut [f32])| {
        quantize_row(values, quants, scales, 128);
    };
    if m * k >= 1 << 16 {
        x.par_chunks(k).zip(a.quants.par_chunks_mut(k)).zip(a.scales.par_chunks_mut(nb)).for_each(run);
    } else {
        x.chunks(k).zip(a.quants.chunks_mut(k)).zip(a.scales.chunks_mut(nb)).for_each(run);
    }
    a
}

/// `out[i][j] = Σ_c x[i][c] · w[j][c]` for `x` `[m, k]` F32 and `w` packed
/// by [`pack`] (`n` rows), returned row-major `[m, n]`; activations are
/// quantized per 32-block first.
pub fn matmul(x: &[f32], m: usize, w: &[u8], n: usize, k: usize) -> Vec<f32> {
    matmul_on(x, m, w, n, k, has_simd())
}

/// [`matmul`] on the SIMD kernel or the portable one (tests run both).
pub(crate) fn matmul_on(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, simd: bool) -> Vec<f32> {
    assert!(
        k.is_multiple_of(BLOCK) && x.len() == m * k && w.len() == n * row_bytes(k),
        "q8_0 matmul: slices do not match [{m}, {k}] x packed [{n}, {k}]"
    );
    if k == 0 {
        return vec![0f32; m * n];
    }
    let activations = quantize_activations(x, m, k);
    run_tiled(m, n, &Q8Tiles { a: &activations, w, k, simd: simd && has_simd() })
}

struct Q8Tiles<'a> {
    a: &'a Activations,
    w: &'a [u8],
    k: usize,
    simd: bool,
}

impl Tiles for Q8Tiles<'_> {
    fn tile<const R: usize, const C: usize>(&self, i: usize, j: usize) -> [[f32; C]; R] {
        let (k, nb, bytes) = (self.k, self.k / BLOCK, row_bytes(self.k));
        let xq = &self.a.quants[i * k..(i + R) * k];
        let xs = &self.a.scales[i * nb..(i + R) * nb];
        // One weight row against the R input rows at a time: each i32
        // accumulator lives through a whole group, so an R × C register tile
        // would need 2·R·C registers; the input rows come again from L1.
        let columns: [[f32; R]; C] = std::array::from_fn(|c| {
            let row = &self.w[(j + c) * bytes..(j + c + 1) * bytes];
            #[cfg(target_arch = "x86_64")]
            if self.simd {
                // SAFETY: `simd` is only set where `has_simd` holds; `xq` holds R rows of k bytes, `xs` R rows of
                // nb scales, and `row` one packed row of `bytes`.
                return unsafe { x86::column::<R>(xq.as_ptr(), xs.as_ptr(), row.as_ptr(), k) };
            }
            column_portable::<R>(xq, xs, row, k)
        });
        std::array::from_fn(|r| std::array::from_fn(|c| columns[c][r]))
    }
}

/// The SIMD kernel's arithmetic, lane by lane.
fn column_portable<const R: usize>(xq: &[u8], xs: &[f32], row: &[u8], k: usize) -> [f32; R] {
    let nb = k / BLOCK;
    let word = |bytes: &[u8], at: usize| [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]];
    let mut out = [0f32; R];
    for (r, o) in out.iter_mut().enumerate() {
        let (xq, xs) = (&xq[r * k..(r + 1) * k], &xs[r * nb..(r + 1) * nb]);
        let mut lanes = [0f32; GROUP];
        for group in 0..nb.div_ceil(GROUP) {
            let blocks = (nb - group * GROUP).min(GROUP);
            for (lane, acc) in lanes.iter_mut().enumerate().take(blocks) {
                let b = group * GROUP + lane;
                let mut dot = i32::from_le_bytes(word(row, k + 4 * nb + 4 * b));
                for e in 0..BLOCK {
                    let at = position(b, e, nb);
                    dot += i32::from(xq[at]) * i32::from(row[at] as i8);
                }
                let scale = xs[b] * f32::from_le_bytes(word(row, k + 4 * b));
                *acc = (dot as f32).mul_add(scale, *acc);
            }
        }
        *o = reduce(lanes);
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // Index loops over const bounds unroll into registers.
mod x86 {
    use std::arch::x86_64::*;

    use super::{BLOCK, GROUP};

    /// The dots of `R` quantized input rows with one packed weight row.
    ///
    /// # Safety
    /// AVX-512F, BW, VL and VNNI must be available; `xq` must hold `R · k`
    /// bytes, `xs` `R · k/32` scales and `row` one packed row for `k`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn column<const R: usize>(xq: *const u8, xs: *const f32, row: *const u8, k: usize) -> [f32; R] {
        let nb = k / BLOCK;
        let (w_scales, w_offsets) = (row.wrapping_add(k) as *const f32, row.wrapping_add(k + 4 * nb) as *const i32);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut group = 0;
        while group * GROUP < nb {
            let blocks = (nb - group * GROUP).min(GROUP);
            // Lanes past a short last group load as zero (scale 0), so they add nothing.
            let mask: __mmask16 = if blocks == GROUP { u16::MAX } else { (1u16 << blocks) - 1 };
            let base = group * GROUP * BLOCK;
            // SAFETY (whole block): masked loads read only the group's `4 · blocks`-byte words, its scales and
            // offsets, all inside the rows (caller); the scale and offset arrays may be unaligned (loadu).
            unsafe {
                let first = group * GROUP;
                let seed = _mm512_maskz_loadu_epi32(mask, w_offsets.add(first));
                let w_scale = _mm512_maskz_loadu_ps(mask, w_scales.add(first));
                let mut dots = [seed; R];
                for step in 0..BLOCK / 4 {
                    let at = base + 4 * blocks * step;
                    let wv = _mm512_maskz_loadu_epi32(mask, row.add(at) as *const i32);
                    for r in 0..R {
                        let xv = _mm512_maskz_loadu_epi32(mask, xq.add(r * k + at) as *const i32);
                        dots[r] = _mm512_dpbusd_epi32(dots[r], xv, wv);
                    }
                }
                for r in 0..R {
                    let scale = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, xs.add(r * nb + first)), w_scale);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[r]), scale, acc[r]);
                }
            }
            group += 1;
        }
        // The hardware reduction: copying the accumulators out to sum them in
        // `reduce`'s order made LLVM keep them in memory (measured 3x slower).
        std::array::from_fn(|r| _mm512_reduce_add_ps(acc[r]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: f32) -> Vec<f32> {
        (0..len).map(|i| ((i as f32 * 0.731 + seed).sin() * 1.7).fract()).collect()
    }

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
    /// widths with one full group, a short last group, and several groups.
    #[test]
    fn both_paths_match_the_quantized_product() {
        for &(m, n, k) in &[(1, 1, 32), (1, 130, 576), (3, 65, 64), (5, 200, 1536), (16, 129, 576), (40, 7, 544)] {
            let x = data(m * k, 0.3);
            let w = pack(&data(n * k, 1.1), n, k).unwrap();
            let wq = unpack(&w, n, k);
            let a = quantize_activations(&x, m, k);
            let nb = k / BLOCK;
            let xq: Vec<f32> = (0..m * k)
                .map(|idx| {
                    let (i, c) = (idx / k, idx % k);
                    let q = f32::from(a.quants[i * k + position(c / BLOCK, c % BLOCK, nb)]) - 128.0;
                    q * a.scales[i * nb + c / BLOCK]
                })
                .collect();
            let portable = matmul_on(&x, m, &w, n, k, false);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|c| f64::from(xq[i * k + c]) * f64::from(wq[j * k + c])).sum();
                    let got = portable[i * n + j];
                    assert!((f64::from(got) - want).abs() < 1e-4, "{m}x{n}x{k} ({i}, {j}): {got} vs {want}");
                }
            }
            if has_simd() {
                // Same integers and products; only the final 16-lane sum's order differs.
                let simd = matmul_on(&x, m, &w, n, k, true);
                let diff = simd.iter().zip(&portable).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff < 1e-5, "{m}x{n}x{k}: simd and portable differ by {diff}");
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
