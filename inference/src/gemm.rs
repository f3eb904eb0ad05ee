//! Single-precision matrix multiply for the training path: `C = A·B` (or `C += A·B`) where `A` and `B` may have
//! any row and column strides, so the forward `x·Wᵀ` and both backward products (`dY·W`, `dYᵀ·X`) run without
//! transposing or copying an operand first.
//!
//! On CPUs with AVX-512 it follows the packed design of Goto and BLIS: `B` is packed into 32-column panels a depth
//! block at a time (kept in L1 while a panel is used), `A` is read where it lies, and a 12 × 32 register tile (24
//! accumulators) does 24 multiply-adds per two vector loads and twelve broadcasts. Each product is one parallel
//! region on the current rayon pool: a region is a wake-up of the pool's threads, and a SmolLM2 step runs over a
//! thousand products, so per-block regions cost more than they split. candle's matmul (the `gemm` crate) only
//! runs AVX2 kernels on a stable compiler, half of this machine's multiply-add width. Elsewhere this falls back
//! to the `gemm` crate.

/// A read-only strided matrix: element `(r, c)` is `data[r * row_stride + c * col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// The transpose, without moving anything.
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    fn covers(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < self.data.len()
    }
}

/// `c = a·b`, or `c += a·b` when `accumulate`; `c` is row-major `a.rows × b.cols`.
///
/// # Panics
/// When the shapes disagree or a slice is too short for its shape and strides (a caller's bug, not data).
pub fn sgemm(a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], accumulate: bool) {
    assert_eq!(a.cols, b.rows, "sgemm: inner dimensions differ");
    assert!(a.covers() && b.covers() && c.len() >= a.rows * b.cols, "sgemm: a slice is too short for its shape");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        packed::sgemm(a, b, &mut c[..m * n], accumulate);
        return;
    }
    portable(a, b, &mut c[..m * n], accumulate);
}

/// `c (+)= a·b` through the `gemm` crate (candle's matmul): the path on CPUs without AVX-512, and the
/// benchmark's reference.
pub fn portable(a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], accumulate: bool) {
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the strides and lengths were checked by `sgemm`; `c` is `m × n` row-major.
    unsafe {
        gemm::gemm(
            a.rows,
            b.cols,
            a.cols,
            c.as_mut_ptr(),
            1,
            b.cols as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod packed {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::MatRef;

    /// Register tile: rows of A by columns of B (two 16-float vectors).
    const MR: usize = 12;
    const NR: usize = 32;
    /// Depth of one packed block, at most (a B panel of `KC × NR` floats is 40 KiB: L1).
    const KC: usize = 320;
    /// Rows of A swept per B block (`MC × KC` floats, 150 KiB: L2).
    const MC: usize = 120;
    /// B panels packed at once by a task (`KC × NCP × NR` floats, 1.25 MiB: L2).
    const NCP: usize = 32;

    /// A raw pointer the tasks share; each writes a disjoint set of `C` tiles.
    #[derive(Clone, Copy)]
    struct SharedMut(*mut f32);
    // SAFETY: tasks write disjoint tiles (see `sgemm`), and the buffer outlives the parallel loop.
    unsafe impl Send for SharedMut {}
    unsafe impl Sync for SharedMut {}

    impl SharedMut {
        // A method, so closures capture the wrapper (Sync) rather than its raw pointer field.
        fn at(&self, offset: usize) -> *mut f32 {
            self.0.wrapping_add(offset)
        }
    }

    pub(super) fn sgemm(a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], accumulate: bool) {
        let (m, n, k) = (a.rows, b.cols, a.cols);
        let threads = rayon::current_num_threads().max(1);
        let cptr = SharedMut(c.as_mut_ptr());
        let panels = n.div_ceil(NR);
        // One parallel region per product (each costs a wake-up of the pool), several tasks per thread so work
        // stealing evens them out. Tasks own groups of column panels and sweep every row, packing their own B
        // panels; when A is much taller than B is wide (a weight gradient over the vocabulary) they own groups
        // of rows instead, so A streams from memory once, and each packs all of (the small) B.
        let tasks = 4 * threads;
        let (row_groups, col_groups) = if m >= 4 * n { (tasks.min(m.div_ceil(MR)), 1) } else { (1, tasks.min(panels)) };
        let per_col_group = panels.div_ceil(col_groups);
        let per_row_group = m.div_ceil(row_groups).next_multiple_of(MR);
        // Depth blocks of equal size (576 = 2 × 288, not 256 + 256 + 64: a thin last block pays the C tile's
        // load and store for few multiply-adds).
        let depth = k.div_ceil(k.div_ceil(KC));
        (0..row_groups * col_groups).into_par_iter().for_each(|task| {
            let (rg, g) = (task / col_groups, task % col_groups);
            let (first, last) = (g * per_col_group, ((g + 1) * per_col_group).min(panels));
            let (row0, row1) = (rg * per_row_group, ((rg + 1) * per_row_group).min(m));
            BPACK.with(|buffer| {
                let mut bpack = buffer.borrow_mut();
                if bpack.len() < KC * NCP * NR {
                    bpack.resize(KC * NCP * NR, 0.0);
                }
                for jp in (first..last).step_by(NCP) {
                    let block = NCP.min(last - jp);
                    for pc in (0..k).step_by(depth) {
                        let kc = depth.min(k - pc);
                        let add = accumulate || pc > 0;
                        for (q, dst) in bpack[..block * kc * NR].chunks_exact_mut(kc * NR).enumerate() {
                            let col = (jp + q) * NR;
                            pack_b(b, pc, kc, col, (n - col).min(NR), dst);
                        }
                        for ic in (row0..row1).step_by(MC) {
                            for q in 0..block {
                                let col = (jp + q) * NR;
                                let cols = (n - col).min(NR);
                                let bp = bpack[q * kc * NR..].as_ptr();
                                for row in (ic..(ic + MC).min(row1)).step_by(MR) {
                                    let rows = (m - row).min(MR);
                                    // SAFETY: AVX-512F was detected by the caller; `bp` holds `kc` packed steps;
                                    // A's rows row..row + rows and depth pc..pc + kc are inside `a` (checked by
                                    // `sgemm`); the C tile (row.., col..) lies inside `c`, and its columns belong
                                    // to this task alone.
                                    unsafe { tile(a, row, rows, pc, kc, bp, cptr.at(row * n + col), n, cols, add) }
                                }
                            }
                        }
                    }
                }
            });
        });
    }

    thread_local! {
        /// Each thread's packed B panels, kept between products.
        static BPACK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// `kc × NR` floats: for each depth step, columns `col..col + cols` of B's row (zero past `cols`). Reads
    /// follow whichever stride of B is 1 (a transposed weight is read row by row, not gathered).
    fn pack_b(b: MatRef<'_>, pc: usize, kc: usize, col: usize, cols: usize, dst: &mut [f32]) {
        let dst = &mut dst[..kc * NR];
        if cols < NR {
            dst.fill(0.0);
        }
        if b.col_stride == 1 {
            for (kk, out) in dst.chunks_exact_mut(NR).enumerate() {
                let base = (pc + kk) * b.row_stride + col;
                out[..cols].copy_from_slice(&b.data[base..base + cols]);
            }
        } else {
            for j in 0..cols {
                let base = pc * b.row_stride + (col + j) * b.col_stride;
                for kk in 0..kc {
                    dst[kk * NR + j] = b.data[base + kk * b.row_stride];
                }
            }
        }
    }

    /// One `rows × cols` tile of C (at most MR × NR) at A's rows `row..` and depth `pc..pc + kc`, against a
    /// packed B panel. A full tile reads A in place; a partial one copies its rows into a zero-padded panel and
    /// goes through a local C buffer.
    ///
    /// # Safety
    /// AVX-512F must be available; `b` must hold `kc` packed steps; `c` must address `rows` rows of `cols` floats
    /// at row stride `ldc`; A must cover the rows and depths named.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile(
        a: MatRef<'_>,
        row: usize,
        rows: usize,
        pc: usize,
        kc: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        add: bool,
    ) {
        unsafe {
            let origin = a.data.as_ptr().add(row * a.row_stride + pc * a.col_stride);
            if rows == MR && cols == NR {
                kernel(kc, origin, a.row_stride, a.col_stride, b, c, ldc, add);
                return;
            }
            let mut panel = [0f32; MR * KC];
            for r in 0..rows {
                for kk in 0..kc {
                    panel[kk * MR + r] = *origin.add(r * a.row_stride + kk * a.col_stride);
                }
            }
            let mut local = [0f32; MR * NR];
            kernel(kc, panel.as_ptr(), 1, MR, b, local.as_mut_ptr(), NR, false);
            for r in 0..rows {
                let dst = c.add(r * ldc);
                for j in 0..cols {
                    let v = local[r * NR + j];
                    *dst.add(j) = if add { *dst.add(j) + v } else { v };
                }
            }
        }
    }

    /// The 12 × 32 register tile: `C (+)= Σ_k a[:, k] ⊗ b[k]`, A's element (i, k) at `a[i·ars + k·acs]`.
    ///
    /// # Safety
    /// As [`tile`], for a full tile.
    #[allow(clippy::needless_range_loop)] // Constant-bound index loops unroll into registers.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel(
        kc: usize,
        a: *const f32,
        ars: usize,
        acs: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        add: bool,
    ) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; MR];
            let rows: [*const f32; MR] = std::array::from_fn(|i| a.add(i * ars));
            for p in 0..kc {
                let b0 = _mm512_loadu_ps(b.add(p * NR));
                let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
                for i in 0..MR {
                    let ai = _mm512_set1_ps(*rows[i].add(p * acs));
                    acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
                    acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
                }
            }
            for i in 0..MR {
                let row = c.add(i * ldc);
                let (mut c0, mut c1) = (acc[i][0], acc[i][1]);
                if add {
                    c0 = _mm512_add_ps(c0, _mm512_loadu_ps(row));
                    c1 = _mm512_add_ps(c1, _mm512_loadu_ps(row.add(16)));
                }
                _mm512_storeu_ps(row, c0);
                _mm512_storeu_ps(row.add(16), c1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: MatRef<'_>, b: MatRef<'_>) -> Vec<f32> {
        let mut c = vec![0f32; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                let mut s = 0f64;
                for p in 0..a.cols {
                    s += f64::from(a.data[i * a.row_stride + p * a.col_stride])
                        * f64::from(b.data[p * b.row_stride + j * b.col_stride]);
                }
                c[i * b.cols + j] = s as f32;
            }
        }
        c
    }

    fn filled(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed)) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    fn check(m: usize, n: usize, k: usize) {
        let (a_data, b_data) = (filled(m * k, 1), filled(k * n, 2));
        let layouts = [
            (MatRef::row_major(&a_data, m, k), MatRef::row_major(&b_data, k, n)),
            (MatRef::row_major(&a_data, k, m).t(), MatRef::row_major(&b_data, n, k).t()),
        ];
        for (a, b) in layouts {
            let want = naive(a, b);
            let mut got = vec![0f32; m * n];
            sgemm(a, b, &mut got, false);
            let err = got.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
            assert!(err < 1e-3 * (k as f32).sqrt(), "{m}x{n}x{k}: max error {err}");
            sgemm(a, b, &mut got, true);
            let err = got.iter().zip(&want).map(|(x, y)| (x - 2.0 * y).abs()).fold(0.0, f32::max);
            assert!(err < 2e-3 * (k as f32).sqrt(), "{m}x{n}x{k} accumulate: max error {err}");
        }
    }

    #[test]
    fn matches_a_naive_product_on_edge_and_block_sizes() {
        for (m, n, k) in [(1, 1, 1), (12, 32, 7), (13, 33, 300), (121, 70, 257), (5, 4100, 20), (250, 64, 513)] {
            check(m, n, k);
        }
    }

    #[test]
    fn empty_depth_zeroes_or_keeps() {
        let mut c = vec![3f32; 4];
        sgemm(MatRef::row_major(&[], 2, 0), MatRef::row_major(&[], 0, 2), &mut c, true);
        assert_eq!(c, [3.0; 4]);
        sgemm(MatRef::row_major(&[], 2, 0), MatRef::row_major(&[], 0, 2), &mut c, false);
        assert_eq!(c, [0.0; 4]);
    }
}
