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
//! The dot products are [`crate::simd`]'s (AVX-512 or AVX2 at run time) for
//! F32 weights, [`crate::quant`]'s for BF16, Q8_0 and Q4_0 ones; all share the
//! tiling and threading here ([`run_tiled`]).

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::quant::{self, ServeDtype};
use crate::simd;

/// Input rows and weight rows per register tile: 5 × 5 accumulators plus
/// 5 weight vectors and 1 input vector fill 31 of AVX-512's 32 registers,
/// and 10 loads feed 25 multiply-adds (a 4 × 4 tile managed 16 per 8;
/// measured 99 against 94 GFLOP/s per core, cache-resident).
const TILE: usize = 5;
/// Contiguous blocks of work per compute thread. One block each would give
/// every core a single sequential stream, but then a core that the OS lends
/// to another thread for a moment (the HTTP runtime waking to send a token)
/// stalls the whole product; with a few blocks each the other core takes up
/// the slack. Measured in the engine: 1 block → 27 ms per token at batch 1,
/// 4 → 21 ms; 16 → no better than 4.
const TASKS_PER_THREAD: usize = 4;
/// Blocks of input rows per compute thread when rows are split (prefill).
/// Each block reads all the weights, so fewer is less traffic, but one
/// block per thread stalls on any interruption; 1, 2 and 4 measured within
/// this machine's noise of each other on a 128-token prefill.
const ROW_TASKS_PER_THREAD: usize = 2;
/// From this many input rows on, tasks split the input rows instead (each
/// reads all weights, from cache: the multiply, not memory, is the bound).
const ROW_SPLIT_MIN_ROWS: usize = 32;

/// `x` `[m, k]` times `w` `[n, k]` transposed, plus `bias` `[n]`, when `x` is
/// contiguous F32 on the CPU and `w` F32 or packed ([`crate::quant`]) in CPU
/// memory; `None` when this kernel does not apply.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    if !matches!(x.device(), Device::Cpu) || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let (m, k) = x.dims2()?;
    if w.dtype() == DType::F32 && w.dims2()?.1 != k {
        return Ok(None);
    }
    let out = with_host_f32(x, |x| linear_rows(x, m, w, bias))??;
    match out {
        Some(out) => Ok(Some(Tensor::from_vec(out, (m, w.dim(0)?), &Device::Cpu)?)),
        None => Ok(None),
    }
}

/// As [`linear`], for `m` input rows held in a slice; `None` when the
/// weights are neither contiguous F32 nor a packed format on the CPU.
pub fn linear_rows(x: &[f32], m: usize, w: &Tensor, bias: Option<&Tensor>) -> Result<Option<Vec<f32>>> {
    let (n, cols) = w.dims2()?;
    // A packed weight's second dimension is its carrier's, not `k`: take `k` from the input.
    let k = if w.dtype() == DType::F32 || m == 0 { cols } else { x.len() / m };
    if x.len() != m * k {
        return Err(candle_core::Error::Msg(format!("linear: {} inputs for {m} rows of {k}", x.len())).into());
    }
    let out = match (w.dtype(), quant::packed_dtype(w, k)) {
        (DType::F32, _) => with_host_f32(w, |w| matmul_transposed(x, m, w, n, k)).ok(),
        (_, Some(ServeDtype::Bf16)) => with_host_u8(w, |w| quant::bf16::matmul(x, m, w, n, k)).ok(),
        (_, Some(ServeDtype::Q8_0)) => with_host_u8(w, |w| quant::q8_0::matmul(x, m, w, n, k)).ok(),
        (_, Some(ServeDtype::Q4_0)) => with_host_u8(w, |w| quant::q4_0::matmul(x, m, w, n, k)).ok(),
        _ => None,
    };
    let Some(mut out) = out else {
        return Ok(None);
    };
    if let Some(bias) = bias {
        let b = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        for row in out.chunks_exact_mut(n) {
            for (o, b) in row.iter_mut().zip(&b) {
                *o += b;
            }
        }
    }
    Ok(Some(out))
}

/// Runs `f` on a tensor's values when it is contiguous F32 in CPU memory
/// (no copy); an error otherwise.
pub fn with_host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        return Err(candle_core::Error::Msg("expected a contiguous tensor in CPU memory".into()).into());
    };
    Ok(f(&cpu.as_slice::<f32>()?[start..end]))
}

/// As [`with_host_f32`] for a U8 tensor (a packed BF16, Q8_0 or Q4_0 matrix).
fn with_host_u8<R>(t: &Tensor, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        return Err(candle_core::Error::Msg("expected a contiguous tensor in CPU memory".into()).into());
    };
    Ok(f(&cpu.as_slice::<u8>()?[start..end]))
}

/// `out[i][j] = Σ_k x[i][k] · w[j][k]`, returned row-major `[m, n]`.
pub fn matmul_transposed(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    run_tiled(m, n, &F32Tiles { x, w, k })
}

/// One weight format's dot-product tiles, for [`run_tiled`]: the F32 kernel
/// here, and the packed BF16 and 8-bit ones of [`crate::quant`]. Input row
/// `i` and weight row `j` are indices into whatever the implementation
/// holds (activations already converted to the format's input type).
pub(crate) trait Tiles: Sync {
    /// Weight rows per tile ([`run_tiled`] asks for `R × COLUMNS` tiles, and
    /// `R × 1` at a block's end, and cuts the weight rows into tasks of
    /// multiples of it): [`TILE`] for the F32 register tiles; the packed
    /// formats' panels of interleaved rows ([`crate::quant::view_rows`]).
    const COLUMNS: usize = TILE;

    /// Writes the dot of input row `i + r` with weight row `j + c` to
    /// `out[a + r][b + c]` (`at = (a, b)`), for `r < R`, `c < C`. Into the
    /// output, not returned: the integer kernels give a tile column by
    /// column, and a tile assembled on the stack by scalar stores and then
    /// copied as vectors stalled on store forwarding (perf: ~8% of a
    /// 16-sequence Q8_0 decode in the copy).
    fn tile<const R: usize, const C: usize>(&self, i: usize, j: usize, out: &mut [&mut [f32]], at: (usize, usize));

    /// Input row `i` against weight rows `j..j + out.len()`: the single-row
    /// (memory-bound) case. Must sum each entry as [`Tiles::tile`] does, so
    /// a row's result does not depend on the batch it came in.
    fn row(&self, i: usize, j: usize, out: &mut [f32]) {
        row_in_tiles(self, i, j, out);
    }

    /// Input rows `i0..i0 + out.len()` against weight rows `j0..j0 + cols`
    /// (one task of [`run_tiled`]; `j0` a multiple of [`Tiles::COLUMNS`]),
    /// `out[i]` receiving row `i0 + i`'s products. By register tiles of
    /// `R × COLUMNS` ([`Tiles::tile`]); a format whose weight rows are
    /// interleaved in panels of `COLUMNS` runs whole panels instead.
    fn block(&self, i0: usize, j0: usize, cols: usize, out: &mut [&mut [f32]])
    where
        Self: Sized,
    {
        kernel(self, i0, j0, cols, out);
    }
}

/// [`Tiles::row`] by `1 × TILE` tiles (the default; a format may stream differently).
pub(crate) fn row_in_tiles<T: Tiles + ?Sized>(tiles: &T, i: usize, j: usize, out: &mut [f32]) {
    let cols = out.len();
    let mut rows = [out];
    let mut c = 0;
    while c + TILE <= cols {
        tiles.tile::<1, TILE>(i, j + c, &mut rows, (0, c));
        c += TILE;
    }
    while c < cols {
        tiles.tile::<1, 1>(i, j + c, &mut rows, (0, c));
        c += 1;
    }
}

struct F32Tiles<'a> {
    x: &'a [f32],
    w: &'a [f32],
    k: usize,
}

impl Tiles for F32Tiles<'_> {
    fn tile<const R: usize, const C: usize>(&self, i: usize, j: usize, out: &mut [&mut [f32]], at: (usize, usize)) {
        let k = self.k;
        // Prefetch the next weight tile while this one is multiplied (rows
        // are contiguous, so that is `C` rows ahead), keeping memory busy
        // also while the tile is re-run for more input rows.
        store(out, at, &simd::dot_tile::<R, C>(&self.x[i * k..], k, &self.w[j * k..], k, k, C * k));
    }

    fn row(&self, i: usize, j: usize, out: &mut [f32]) {
        // One weight row at a time, all rows in one call: the product is
        // bound by memory, and one sequential stream per core reads fastest.
        let k = self.k;
        simd::dot_rows(&self.x[i * k..(i + 1) * k], &self.w[j * k..], k, out);
    }
}

/// `[m, n]` row-major: every input row against every weight row, through
/// `tiles`, on the current rayon pool.
///
/// The work is cut into a few contiguous blocks per compute thread
/// ([`TASKS_PER_THREAD`]): with a single input row the multiply is bound by
/// memory bandwidth, and long sequential streams are what the hardware
/// prefetchers serve best.
pub(crate) fn run_tiled<T: Tiles>(m: usize, n: usize, tiles: &T) -> Vec<f32> {
    let threads = rayon::current_num_threads().max(1);
    let mut out = vec![0f32; m * n];
    if n == 0 {
        return out;
    }
    if m >= ROW_SPLIT_MIN_ROWS {
        // Many rows (prefill): each task takes a block of input rows and all
        // the weights, writing its own rows of the output.
        let per_task = m.div_ceil(threads * ROW_TASKS_PER_THREAD).next_multiple_of(TILE);
        out.par_chunks_mut(per_task * n).enumerate().for_each(|(task, out_block)| {
            let mut rows: Vec<&mut [f32]> = out_block.chunks_exact_mut(n).collect();
            tiles.block(task * per_task, 0, n, &mut rows);
        });
        return out;
    }
    // Few rows (decode): each task owns a block of weight rows, so the
    // weights are read once, and writes the matching columns of every
    // output row.
    let per_task = n.div_ceil(threads * TASKS_PER_THREAD).next_multiple_of(T::COLUMNS);
    let mut parts: Vec<Vec<&mut [f32]>> = (0..n.div_ceil(per_task)).map(|_| Vec::with_capacity(m)).collect();
    for row in out.chunks_exact_mut(n) {
        let mut rest = row;
        for part in parts.iter_mut() {
            let (columns, tail) = rest.split_at_mut(per_task.min(rest.len()));
            part.push(columns);
            rest = tail;
        }
    }
    parts.into_par_iter().enumerate().for_each(|(task, mut rows)| {
        let cols = rows.first().map_or(0, |r| r.len());
        tiles.block(0, task * per_task, cols, &mut rows);
    });
    out
}

/// Computes the dots of input rows `i0..i0 + out.len()` with weight rows
/// `j0..j0 + cols`, in tiles of up to `TILE` input rows by `T::COLUMNS`
/// weight rows. `out[i]` receives row `i0 + i`'s products with these weight rows.
fn kernel<T: Tiles>(tiles: &T, i0: usize, j0: usize, cols: usize, out: &mut [&mut [f32]]) {
    if out.len() == 1 {
        tiles.row(i0, j0, &mut out[0][..cols]);
        return;
    }
    let mut j = 0;
    while j < cols {
        let width = if cols - j >= T::COLUMNS { T::COLUMNS } else { 1 };
        match width {
            TILE => tile_column::<T, TILE>(tiles, i0, (j0, j), out),
            _ => tile_column::<T, 1>(tiles, i0, (j0, j), out),
        }
        j += width;
    }
}

/// Weight rows `j0 + j..j0 + j + C` against every input row, in blocks of
/// up to `TILE` rows (the tile's weight rows stay in L1 from block to block).
#[inline(always)]
fn tile_column<T: Tiles, const C: usize>(tiles: &T, i0: usize, (j0, j): (usize, usize), out: &mut [&mut [f32]]) {
    let m = out.len();
    let mut i = 0;
    while i < m {
        let block = row_block(m - i);
        let (xi, wj, at) = (i0 + i, j0 + j, (i, j));
        match block {
            5 => tiles.tile::<5, C>(xi, wj, out, at),
            4 => tiles.tile::<4, C>(xi, wj, out, at),
            3 => tiles.tile::<3, C>(xi, wj, out, at),
            2 => tiles.tile::<2, C>(xi, wj, out, at),
            _ => tiles.tile::<1, C>(xi, wj, out, at),
        }
        i += block;
    }
}

/// Input rows for the next tile when `left` remain: a full tile, except
/// that a lone last row (whose tile would do 5 loads per 5 multiply-adds)
/// is avoided by taking one row fewer now.
pub(crate) fn row_block(left: usize) -> usize {
    match left {
        0..=TILE => left,
        l if l == TILE + 1 => TILE - 1,
        _ => TILE,
    }
}

/// Writes a tile (input rows × weight rows) whose corner is `(i, j)`.
#[inline(always)]
pub(crate) fn store<const R: usize, const C: usize>(
    out: &mut [&mut [f32]],
    (i, j): (usize, usize),
    tile: &[[f32; C]; R],
) {
    for (out_row, tile_row) in out[i..i + R].iter_mut().zip(tile) {
        out_row[j..j + C].copy_from_slice(tile_row);
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
