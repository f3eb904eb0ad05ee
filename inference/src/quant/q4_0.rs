//! `x @ Wᵀ` with Q4_0 weights (llama.cpp's Q4_0: 32 weights per block, one
//! F16 scale `d`, 4-bit values `q` in 0..=15 standing for `(q - 8) · d`),
//! dotted with activations quantized to int8 per 32-block ([`super::int8`]).
//!
//! **Quantization** follows llama.cpp's reference (`quantize_row_q4_0_ref`):
//! `d = max / -8` for the block's value of largest magnitude `max`, so that
//! value is exactly `-8 · d`, and `q = min(15, ⌊v / d + 8.5⌋)`. 4.5 bits per
//! weight, as in llama.cpp.
//!
//! **Layout** is [`super::panel`]'s: panels of 16 interleaved rows, 18 bytes
//! per row and block (16 bytes of nibbles, element `e` in the low nibble of
//! the byte whose high nibble holds `e + 16`, as llama.cpp's `block_q4_0`;
//! then the F16 scale). The nibbles are the unsigned operand as stored
//! (`q = w + 8`), so a block's dot starts from `-8 Σ x`. One 64-byte load,
//! a mask and a shift give two `vpdpbusd` operands. The kernels (VNNI,
//! AVX2, portable) are the panel module's.

use half::f16;

use super::Kernel;
use super::int8::BLOCK;
use super::panel::{self, Format};
use crate::error::Result;

/// Q4_0 in [`super::panel`]'s layout.
pub(crate) struct Q4_0;

impl Format for Q4_0 {
    const NAME: &'static str = "q4_0";
    const BITS: u32 = 4;
    const SCALE_BYTES: usize = 2;
    const OFFSET: i32 = 8;

    fn write_scale(bytes: &mut [u8], d: f32) {
        bytes.copy_from_slice(&f16::from_f32(d).to_le_bytes());
    }

    fn read_scale(bytes: &[u8]) -> f32 {
        f16::from_le_bytes([bytes[0], bytes[1]]).to_f32()
    }
}

/// Bytes of one packed row of `k` weights (`k` a multiple of [`BLOCK`]).
pub fn row_bytes(k: usize) -> usize {
    Q4_0::row_bytes(k)
}

/// Whether this CPU runs the `vpdpbusd` kernel (the F16 scales convert with
/// AVX-512F's `vcvtph2ps`).
pub fn has_simd() -> bool {
    super::q8_0::has_simd()
}

/// The kernel products run on here: VNNI, else AVX2, else the portable loop.
pub fn kernel() -> Kernel {
    Kernel::best(has_simd())
}

/// Packs `values` `[n, k]` (row-major F32) into panels.
pub fn pack(values: &[f32], n: usize, k: usize) -> Result<Vec<u8>> {
    panel::pack::<Q4_0>(values, n, k, |row, stored, scales| {
        for ((block, q), scale) in row.chunks_exact(BLOCK).zip(stored.chunks_exact_mut(BLOCK)).zip(scales) {
            let max = block.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let d = max / -8.0;
            let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
            *scale = d;
            for (q, &v) in q.iter_mut().zip(block) {
                // `as u8` truncates as llama.cpp's `(int8_t)` cast does; the operand is at least 0.5.
                *q = ((v * inv + 8.5) as u8).min(15);
            }
        }
    })
}

/// The F32 values a packed matrix stands for (tests and quality checks).
pub fn unpack(packed: &[u8], n: usize, k: usize) -> Vec<f32> {
    panel::unpack::<Q4_0>(packed, n, k)
}

/// `out[i][j] = Σ_c x[i][c] · w[j][c]` for `x` `[m, k]` F32 and `w` packed
/// by [`pack`] (`n` rows), returned row-major `[m, n]`; activations are
/// quantized to int8 per 32-block first.
pub fn matmul(x: &[f32], m: usize, w: &[u8], n: usize, k: usize) -> Vec<f32> {
    matmul_on(x, m, w, n, k, kernel())
}

/// [`matmul`] on `kernel` (tests run each the CPU has); one the CPU lacks runs the portable loop.
pub(crate) fn matmul_on(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, kernel: Kernel) -> Vec<f32> {
    panel::matmul::<Q4_0>(x, m, w, n, k, kernel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::int8::quantize_rows;
    use crate::quant::test_data::{BLOCK_SHAPES, assert_rows_do_not_depend_on_the_batch, data};

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

    /// The portable loop against the F64 product of the quantized operands,
    /// for whole and partial panels; every kernel the CPU has bit-identical
    /// to it.
    #[test]
    fn kernels_match_the_quantized_product_bit_for_bit() {
        for &(m, n, k) in BLOCK_SHAPES {
            let x = data(m * k, 0.3);
            let w = pack(&data(n * k, 1.1), n, k).unwrap();
            let wq = unpack(&w, n, k);
            let a = quantize_rows(&x, m, k);
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
