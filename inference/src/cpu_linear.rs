//! `x @ Wᵀ` on the CPU for the serving path, tuned for few rows.
//!
//! candle's CPU matmul (the `gemm` crate) re-packs the whole weight matrix on
//! every call. With a decode batch of 1 to 16 rows that packing costs about
//! as much as the multiply itself, and the weights cross memory twice. Here
//! each weight row (contiguous, since `W` is `[out, in]` row-major) is read
//! once and dotted with a small block of input rows held in L1, so the weights
//! stream from memory exactly once per step however many sequences run.
//!
//! Every output element is one dot product summed in the same order whatever
//! the number of rows, so results do not depend on how requests were batched.
//!
//! The dot products are [`crate::simd`]'s (AVX-512 or AVX2 at run time).

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::simd;

/// Input rows and weight rows per register tile.
const TILE: usize = 4;
/// Weight rows per parallel task: large enough to amortise scheduling,
/// small enough to split the smallest projection over two cores.
const WEIGHT_ROWS_PER_TASK: usize = 64;
/// From this many input rows on, tasks split the input rows instead (each
/// reads all weights, from cache: the multiply, not memory, is the bound).
const ROW_SPLIT_MIN_ROWS: usize = 32;
const INPUT_ROWS_PER_TASK: usize = 16;

/// `x` `[m, k]` times `w` `[n, k]` transposed, plus `bias` `[n]`, when both are
/// contiguous F32 on the CPU; `None` when this kernel does not apply.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    if !matches!(x.device(), Device::Cpu) || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return Ok(None);
    }
    let (m, k) = x.dims2()?;
    let (n, wk) = w.dims2()?;
    if k != wk {
        return Ok(None);
    }
    let (x_storage, x_layout) = x.storage_and_layout();
    let (w_storage, w_layout) = w.storage_and_layout();
    let (Storage::Cpu(xs), Storage::Cpu(ws)) = (&*x_storage, &*w_storage) else {
        return Ok(None);
    };
    let (Some((x0, x1)), Some((w0, w1))) = (x_layout.contiguous_offsets(), w_layout.contiguous_offsets()) else {
        return Ok(None);
    };
    let x_data = &xs.as_slice::<f32>()?[x0..x1];
    let w_data = &ws.as_slice::<f32>()?[w0..w1];
    let mut out = matmul_transposed(x_data, m, w_data, n, k);
    drop((x_storage, w_storage));
    if let Some(bias) = bias {
        let b = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        for row in out.chunks_exact_mut(n) {
            for (o, b) in row.iter_mut().zip(&b) {
                *o += b;
            }
        }
    }
    Ok(Some(Tensor::from_vec(out, (m, n), &Device::Cpu)?))
}

/// `out[i][j] = Σ_k x[i][k] · w[j][k]`, returned row-major `[m, n]`.
pub fn matmul_transposed(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    if m >= ROW_SPLIT_MIN_ROWS {
        // Many rows (prefill): each task takes a block of input rows and all
        // the weights, writing its own rows of the output in place.
        let mut out = vec![0f32; m * n];
        out.par_chunks_mut(INPUT_ROWS_PER_TASK * n).enumerate().for_each(|(task, out_block)| {
            let i0 = task * INPUT_ROWS_PER_TASK;
            let rows = out_block.len() / n;
            let layout = OutLayout { row_stride: n, col_stride: 1 };
            kernel(&x[i0 * k..(i0 + rows) * k], rows, w, n, k, out_block, layout);
        });
        return out;
    }
    // Few rows (decode): each task owns a block of weight rows, so the
    // weights are read once, and writes the matching block of the transposed
    // output; tasks never share output memory.
    let mut out_t = vec![0f32; n * m];
    out_t.par_chunks_mut(WEIGHT_ROWS_PER_TASK * m).enumerate().for_each(|(task, out_block)| {
        let j0 = task * WEIGHT_ROWS_PER_TASK;
        let rows = out_block.len() / m;
        let layout = OutLayout { row_stride: 1, col_stride: m };
        kernel(x, m, &w[j0 * k..(j0 + rows) * k], rows, k, out_block, layout);
    });
    if m == 1 {
        return out_t;
    }
    // Write the result row by row: sequential stores, reads `m` floats apart.
    let mut out = Vec::with_capacity(m * n);
    for i in 0..m {
        out.extend((0..n).map(|j| out_t[j * m + i]));
    }
    out
}

/// Where `dot(x_i, w_j)` goes: `out[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
struct OutLayout {
    row_stride: usize,
    col_stride: usize,
}

/// Computes `dot(x_i, w_j)` for `m` input rows and `rows` weight rows, in
/// tiles of up to `TILE` input rows by `TILE` weight rows.
fn kernel(x: &[f32], m: usize, w: &[f32], rows: usize, k: usize, out: &mut [f32], layout: OutLayout) {
    let mut j = 0;
    while j < rows {
        let cols = if rows - j >= TILE { TILE } else { 1 };
        let wj = &w[j * k..];
        // Prefetch the next weight tile while this one is multiplied (rows
        // are contiguous, so that is `cols` rows ahead), keeping memory busy
        // also while the tile is re-run for more input rows.
        let prefetch = cols * k;
        let mut i = 0;
        while i < m {
            let block = (m - i).min(TILE);
            let xi = &x[i * k..];
            let at = (i, j);
            match (block, cols) {
                (4, 4) => store(out, layout, at, &simd::dot_tile::<4, 4>(xi, k, wj, k, k, prefetch)),
                (3, 4) => store(out, layout, at, &simd::dot_tile::<3, 4>(xi, k, wj, k, k, prefetch)),
                (2, 4) => store(out, layout, at, &simd::dot_tile::<2, 4>(xi, k, wj, k, k, prefetch)),
                (1, 4) => store(out, layout, at, &simd::dot_tile::<1, 4>(xi, k, wj, k, k, prefetch)),
                (4, _) => store(out, layout, at, &simd::dot_tile::<4, 1>(xi, k, wj, k, k, prefetch)),
                (3, _) => store(out, layout, at, &simd::dot_tile::<3, 1>(xi, k, wj, k, k, prefetch)),
                (2, _) => store(out, layout, at, &simd::dot_tile::<2, 1>(xi, k, wj, k, k, prefetch)),
                _ => store(out, layout, at, &simd::dot_tile::<1, 1>(xi, k, wj, k, k, prefetch)),
            }
            i += block;
        }
        j += cols;
    }
}

/// Writes a tile (input rows × weight rows) whose corner is `(i, j)`.
#[inline(always)]
fn store<const R: usize, const C: usize>(
    out: &mut [f32],
    layout: OutLayout,
    (i, j): (usize, usize),
    tile: &[[f32; C]; R],
) {
    for (r, row) in tile.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            out[(i + r) * layout.row_stride + (j + c) * layout.col_stride] = *v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|c| x[i * k + c] as f64 * w[j * k + c] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    fn data(len: usize, seed: f32) -> Vec<f32> {
        (0..len).map(|i| ((i as f32 * 0.731 + seed).sin() * 1.7).fract()).collect()
    }

    #[test]
    fn matches_naive_for_odd_shapes() {
        for &(m, n, k) in
            &[(1, 1, 1), (1, 130, 67), (3, 65, 16), (5, 200, 33), (16, 129, 576), (37, 7, 100), (70, 130, 67)]
        {
            let x = data(m * k, 0.3);
            let w = data(n * k, 1.1);
            let got = matmul_transposed(&x, m, &w, n, k);
            let want = naive(&x, m, &w, n, k);
            let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-3, "{m}x{n}x{k}: max difference {diff}");
        }
    }

    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let (n, k) = (97, 300);
        let w = data(n * k, 2.0);
        let x = data(16 * k, 0.5);
        let batched = matmul_transposed(&x, 16, &w, n, k);
        for i in 0..16 {
            let alone = matmul_transposed(&x[i * k..(i + 1) * k], 1, &w, n, k);
            assert_eq!(alone, batched[i * n..(i + 1) * n], "row {i}");
        }
    }

    #[test]
    fn tensor_entry_point_adds_bias_and_declines_other_dtypes() {
        let x = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [1.0, 1.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[10f32, 20.0, 30.0], &Device::Cpu).unwrap();
        let y = linear(&x, &w, Some(&b)).unwrap().unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![11.0, 22.0, 33.0], vec![13.0, 24.0, 37.0]]);
        let x16 = x.to_dtype(DType::BF16).unwrap();
        assert!(linear(&x16, &w, None).unwrap().is_none());
    }
}
