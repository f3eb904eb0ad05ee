//! `x @ Wᵀ` with Q8_0 weights: int8 with one F32 scale per block of 32
//! (llama.cpp's Q8_0, with an F32 rather than F16 scale), dotted with
//! activations quantized the same way per 32-block ([`super::int8`]).
//!
//! Weights are quantized as the activations are (symmetric, `amax / 127`
//! steps) and stored `w + 128`, one byte each, in [`super::panel`]'s
//! layout: panels of 16 interleaved rows, 36 bytes per row and block (32
//! quants, the F32 scale). The kernels (VNNI, AVX2, portable) are the
//! panel module's.

use super::Kernel;
pub use super::int8::BLOCK;
use super::int8::quantize_row;
use super::panel::{self, Format};
use crate::error::Result;

/// Q8_0 in [`super::panel`]'s layout.
pub(crate) struct Q8_0;

impl Format for Q8_0 {
    const NAME: &'static str = "q8_0";
    const BITS: u32 = 8;
    const SCALE_BYTES: usize = 4;
    const OFFSET: i32 = 128;

    fn write_scale(bytes: &mut [u8], d: f32) {
        bytes.copy_from_slice(&d.to_le_bytes());
    }

    fn read_scale(bytes: &[u8]) -> f32 {
        f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
    }
}

/// Bytes of one packed row of `k` weights (`k` a multiple of [`BLOCK`]).
pub fn row_bytes(k: usize) -> usize {
    Q8_0::row_bytes(k)
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

/// The kernel products run on here: VNNI, else AVX2, else the portable loop.
pub fn kernel() -> Kernel {
    Kernel::best(has_simd())
}

/// Packs `values` `[n, k]` (row-major F32) into panels.
pub fn pack(values: &[f32], n: usize, k: usize) -> Result<Vec<u8>> {
    panel::pack::<Q8_0>(values, n, k, |row, stored, scales| {
        let mut sums = vec![0i32; scales.len()];
        quantize_row(row, stored, scales, &mut sums);
        // Two's complement to `w + 128`: the sign bit flipped.
        stored.iter_mut().for_each(|q| *q ^= 0x80);
    })
}

/// The F32 values a packed matrix stands for (tests and quality checks).
pub fn unpack(packed: &[u8], n: usize, k: usize) -> Vec<f32> {
    panel::unpack::<Q8_0>(packed, n, k)
}

/// `out[i][j] = Σ_c x[i][c] · w[j][c]` for `x` `[m, k]` F32 and `w` packed
/// by [`pack`] (`n` rows), returned row-major `[m, n]`; activations are
/// quantized per 32-block first.
pub fn matmul(x: &[f32], m: usize, w: &[u8], n: usize, k: usize) -> Vec<f32> {
    matmul_on(x, m, w, n, k, kernel())
}

/// [`matmul`] on `kernel` (tests run each the CPU has); one the CPU lacks runs the portable loop.
pub(crate) fn matmul_on(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, kernel: Kernel) -> Vec<f32> {
    panel::matmul::<Q8_0>(x, m, w, n, k, kernel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::int8::quantize_rows;
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
