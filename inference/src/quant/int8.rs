//! Int8 quantization per 32-value block (symmetric, `amax / 127` steps,
//! one F32 scale): of every integer product's activations, and of Q8_0's
//! weights when they are packed ([`super::q8_0`], [`super::q4_0`]).

use rayon::prelude::*;

/// Values per quantization block (one scale each).
pub const BLOCK: usize = 32;

/// Quantizes one row to int8 per 32-block (symmetric, `amax / 127` steps):
/// quants into `quants` in order (two's complement bytes), scales into
/// `scales`, each block's quant sum into `sums`.
///
/// Every product quantizes its activations with this (a decode step calls
/// it a few hundred times), so it runs compiled for AVX2 where the CPU has
/// it: the block's arithmetic vectorizes and `round` becomes an instruction
/// instead of a libm call (measured ~85 instructions per value before, most
/// of a 576-wide batch-1 product's work besides the dots). Same results
/// either way: the operations are the same IEEE ones.
pub fn quantize_row(values: &[f32], quants: &mut [u8], scales: &mut [f32], sums: &mut [i32]) {
    assert!(
        values.len().is_multiple_of(BLOCK)
            && quants.len() == values.len()
            && scales.len() == values.len() / BLOCK
            && sums.len() == scales.len(),
        "quantize_row: {} values, {} quants, {} scales, {} sums",
        values.len(),
        quants.len(),
        scales.len(),
        sums.len()
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above); the slices' lengths agree (asserted).
        return unsafe { x86::quantize_row(values, quants, scales, sums) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { quantize_row_avx2(values, quants, scales, sums) };
    }
    quantize_row_body(values, quants, scales, sums)
}

/// [`quantize_row_body`] compiled for AVX2 (SSE4.1's `roundps` included).
///
/// # Safety
/// AVX2 must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(values: &[f32], quants: &mut [u8], scales: &mut [f32], sums: &mut [i32]) {
    quantize_row_body(values, quants, scales, sums)
}

/// [`quantize_row`]'s work, block by block.
#[inline(always)]
fn quantize_row_body(values: &[f32], quants: &mut [u8], scales: &mut [f32], sums: &mut [i32]) {
    let nb = values.len() / BLOCK;
    for b in 0..nb {
        let block: &[f32; BLOCK] = values[b * BLOCK..(b + 1) * BLOCK].try_into().expect("BLOCK values");
        // `>` rather than `f32::max` (whose NaN rule blocks vectorizing); weights and activations are finite.
        let mut amax = 0f32;
        for v in block {
            amax = if v.abs() > amax { v.abs() } else { amax };
        }
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        scales[b] = d;
        // Plain loops: closures would not inherit the caller's target features (and `round` would be a call).
        let q = &mut quants[b * BLOCK..(b + 1) * BLOCK];
        let mut sum = 0i32;
        for e in 0..BLOCK {
            let v = (block[e] * inv).round().clamp(-127.0, 127.0) as i8;
            q[e] = v as u8;
            sum += i32::from(v);
        }
        sums[b] = sum;
    }
}

/// Rows of activations quantized per 32-block for one product ([`quantize_row`]).
pub struct Quantized {
    /// `[m, k]`, two's complement bytes, in order.
    pub quants: Vec<u8>,
    /// `[m, k/32]`.
    pub scales: Vec<f32>,
    /// `[m, k/32]`: each block's quant sum.
    pub sums: Vec<i32>,
}

/// One row's input and outputs in [`quantize_rows`].
type RowParts<'a> = (((&'a [f32], &'a mut [u8]), &'a mut [f32]), &'a mut [i32]);

/// Quantizes `m` rows of `k` (a multiple of [`BLOCK`]), in parallel when the product is large.
pub fn quantize_rows(x: &[f32], m: usize, k: usize) -> Quantized {
    let nb = k / BLOCK;
    let mut a = Quantized { quants: vec![0u8; m * k], scales: vec![0f32; m * nb], sums: vec![0i32; m * nb] };
    if k == 0 {
        return a;
    }
    let run = |(((values, quants), scales), sums): RowParts| {
        quantize_row(values, quants, scales, sums);
    };
    if m * k >= 1 << 16 {
        x.par_chunks(k)
            .zip(a.quants.par_chunks_mut(k))
            .zip(a.scales.par_chunks_mut(nb))
            .zip(a.sums.par_chunks_mut(nb))
            .for_each(run);
    } else {
        x.chunks(k).zip(a.quants.chunks_mut(k)).zip(a.scales.chunks_mut(nb)).zip(a.sums.chunks_mut(nb)).for_each(run);
    }
    a
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::BLOCK;

    /// [`super::quantize_row`] on AVX-512: a block's 32 values as two
    /// vectors (the largest magnitude, the scaling, rounding half away from
    /// zero as `f32::round` does, and the quant sum without a scalar loop),
    /// the same IEEE operations, so the same bytes as the portable body.
    ///
    /// # Safety
    /// AVX-512F must be available; the slices' lengths must agree (the caller asserts).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn quantize_row(values: &[f32], quants: &mut [u8], scales: &mut [f32], sums: &mut [i32]) {
        let nb = values.len() / BLOCK;
        let (half, one, limit) = (_mm512_set1_ps(0.5), _mm512_set1_ps(1.0), _mm512_set1_ps(127.0));
        let sign = _mm512_set1_epi32(i32::MIN);
        for b in 0..nb {
            // SAFETY: block `b`'s 32 values lie inside `values` (b < nb).
            let (v0, v1) = unsafe {
                let p = values.as_ptr().add(b * BLOCK);
                (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
            };
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            let d = amax / 127.0;
            let inv = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            scales[b] = d;
            let round = |x: __m512| {
                // Truncate, then step away from zero where the dropped fraction is at least a half
                // (`x - t` is exact); clamped to ±127 as the portable body does.
                let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(x);
                let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(_mm512_sub_ps(x, t)), half);
                let step = _mm512_castsi512_ps(_mm512_or_si512(
                    _mm512_and_si512(_mm512_castps_si512(x), sign),
                    _mm512_castps_si512(one),
                ));
                let q = _mm512_mask_add_ps(t, away, t, step);
                _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(q, _mm512_sub_ps(_mm512_setzero_ps(), limit)), limit))
            };
            let (q0, q1) = (round(_mm512_mul_ps(v0, inv)), round(_mm512_mul_ps(v1, inv)));
            sums[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            let q = &mut quants[b * BLOCK..(b + 1) * BLOCK];
            // SAFETY: two 16-byte stores into the block's 32 bytes.
            unsafe {
                _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(q0));
                _mm_storeu_si128(q.as_mut_ptr().add(16) as *mut __m128i, _mm512_cvtepi32_epi8(q1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type QuantizeRow = fn(&[f32], &mut [u8], &mut [f32], &mut [i32]);

    /// Every quantizer this CPU runs: the portable body, AVX2's and AVX-512's.
    fn quantizers() -> Vec<(&'static str, QuantizeRow)> {
        let mut all: Vec<(&'static str, QuantizeRow)> = vec![("portable", quantize_row_body)];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2.
                all.push(("avx2", |v, q, s, sums| unsafe { quantize_row_avx2(v, q, s, sums) }));
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F; the test's slices agree in length.
                all.push(("avx512", |v, q, s, sums| unsafe { x86::quantize_row(v, q, s, sums) }));
            }
        }
        all
    }

    /// Each block-by-block quantizer the CPU runs against the definition,
    /// value by value: same bytes, scales and sums, ties (`x.5` steps)
    /// rounded away from zero as `f32::round` does, the largest value below
    /// a half rounded down.
    #[test]
    fn quantize_row_matches_the_definition() {
        for (nb, (name, quantize)) in
            [18, 48, 3, 21].into_iter().flat_map(|nb| quantizers().into_iter().map(move |q| (nb, q)))
        {
            let k = nb * BLOCK;
            let mut values: Vec<f32> = (0..k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
            values[..BLOCK].iter_mut().for_each(|v| *v = 0.0); // scale 0
            values[BLOCK] = 127.0; // step 1.0: the block's other values land on exact ties
            for (e, v) in values[BLOCK + 1..2 * BLOCK].iter_mut().enumerate() {
                *v = e as f32 - 15.5;
            }
            values[2 * BLOCK] = 127.0; // step 1.0 again: the largest f32 below 0.5 must round to 0
            values[2 * BLOCK + 1] = 0.5f32.next_down();
            values[2 * BLOCK + 2] = -0.5f32.next_down();
            let (mut quants, mut scales, mut sums) = (vec![0u8; k], vec![0f32; nb], vec![0i32; nb]);
            quantize(&values, &mut quants, &mut scales, &mut sums);
            for (b, block) in values.chunks_exact(BLOCK).enumerate() {
                let d = block.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                assert_eq!(scales[b].to_bits(), d.to_bits(), "{name}, nb {nb}: block {b}'s scale");
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                let q: Vec<i8> = block.iter().map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8).collect();
                assert_eq!(sums[b], q.iter().map(|&q| i32::from(q)).sum::<i32>(), "{name}");
                for (e, &q) in q.iter().enumerate() {
                    assert_eq!(quants[b * BLOCK + e], q as u8, "{name}, nb {nb}: ({b}, {e})");
                }
            }
        }
    }
}
