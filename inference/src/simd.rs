//! The few vector kernels the CPU serving path needs: blocked dot products
//! and `y += a·x`, with AVX-512 and AVX2 versions chosen at run time.
//!
//! The portable build targets baseline x86-64 (SSE2), and the compiler does
//! not vectorise float reductions on its own (it may not reorder sums), so
//! these are written with intrinsics. Each output is summed in a fixed order
//! that does not depend on how many rows are computed together, which keeps
//! results independent of batching.

/// Which implementation this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Avx512,
    Avx2,
    Scalar,
}

fn level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        // `is_x86_feature_detected!` caches its answer; this is a load and a test.
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Level::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Level::Avx2;
        }
    }
    Level::Scalar
}

/// Dot products of `R` rows of `x` with `C` rows of `w`, all `k` long:
/// `out[r][c] = x_r · w_c`, where row `r` of `x` starts at `x[r * x_stride]`
/// and row `c` of `w` at `w[c * w_stride]`. A tile of 4×4 loads 8 vectors
/// per 16 multiply-adds, which is what lets few-row matmuls approach peak.
///
/// `prefetch` is how far (in floats) ahead of each weight load to prefetch;
/// callers streaming a matrix pass the next tile's offset.
#[inline]
pub fn dot_tile<const R: usize, const C: usize>(
    x: &[f32],
    x_stride: usize,
    w: &[f32],
    w_stride: usize,
    k: usize,
    prefetch: usize,
) -> [[f32; C]; R] {
    let fits = |len: usize, rows: usize, stride: usize| rows == 0 || len >= (rows - 1) * stride + k;
    assert!(fits(x.len(), R, x_stride) && fits(w.len(), C, w_stride), "dot_tile: slices too short");
    match level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F and the bounds were checked above.
        Level::Avx512 => unsafe {
            x86::dot_tile_avx512::<R, C>(x.as_ptr(), x_stride, w.as_ptr(), w_stride, k, prefetch)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and FMA and the bounds were checked above.
        Level::Avx2 => unsafe { x86::dot_tile_avx2::<R, C>(x.as_ptr(), x_stride, w.as_ptr(), w_stride, k) },
        _ => dot_tile_scalar::<R, C>(x, x_stride, w, w_stride, k),
    }
}

/// `a · b` over the shorter length.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let k = a.len().min(b.len());
    dot_tile::<1, 1>(a, 0, b, 0, k, 0)[0][0]
}

/// `y += a · x` over the shorter length.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    let k = y.len().min(x.len());
    match level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F; both slices hold at least `k` values.
        Level::Avx512 => unsafe { x86::axpy_avx512(y.as_mut_ptr(), a, x.as_ptr(), k) },
        _ => {
            for (yi, xi) in y[..k].iter_mut().zip(&x[..k]) {
                *yi += a * xi;
            }
        }
    }
}

fn dot_tile_scalar<const R: usize, const C: usize>(
    x: &[f32],
    x_stride: usize,
    w: &[f32],
    w_stride: usize,
    k: usize,
) -> [[f32; C]; R] {
    const LANES: usize = 8;
    let mut out = [[0f32; C]; R];
    for (r, out_r) in out.iter_mut().enumerate() {
        let row = &x[r * x_stride..r * x_stride + k];
        for (c, o) in out_r.iter_mut().enumerate() {
            let wr = &w[c * w_stride..c * w_stride + k];
            let mut acc = [0f32; LANES];
            let full = k / LANES * LANES;
            for (xc, wc) in row[..full].chunks_exact(LANES).zip(wr[..full].chunks_exact(LANES)) {
                for l in 0..LANES {
                    acc[l] += xc[l] * wc[l];
                }
            }
            let tail: f32 = row[full..].iter().zip(&wr[full..]).map(|(a, b)| a * b).sum();
            *o = acc.iter().sum::<f32>() + tail;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // Index loops over const bounds unroll into registers; iterators here were not inlined.
mod x86 {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512F must be available; `x` must hold `(R - 1) * x_stride + k`
    /// values and `w` `(C - 1) * w_stride + k`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_tile_avx512<const R: usize, const C: usize>(
        x: *const f32,
        x_stride: usize,
        w: *const f32,
        w_stride: usize,
        k: usize,
        prefetch: usize,
    ) -> [[f32; C]; R] {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut wv = [_mm512_setzero_ps(); C];
        let mut c = 0;
        while c + 16 <= k {
            // SAFETY (whole block): offsets below the guaranteed lengths;
            // prefetches may point past the end, which never faults.
            unsafe {
                for j in 0..C {
                    // Weights stream from memory once per step (see `prefetch`).
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(j * w_stride + c + prefetch) as *const i8);
                    wv[j] = _mm512_loadu_ps(w.add(j * w_stride + c));
                }
                for r in 0..R {
                    let xv = _mm512_loadu_ps(x.add(r * x_stride + c));
                    for j in 0..C {
                        acc[r][j] = _mm512_fmadd_ps(xv, wv[j], acc[r][j]);
                    }
                }
            }
            c += 16;
        }
        if c < k {
            // A masked tail keeps the same accumulation order as a full vector.
            let mask: __mmask16 = (1u16 << (k - c)) - 1;
            // SAFETY: masked loads touch only the valid tail.
            unsafe {
                for j in 0..C {
                    wv[j] = _mm512_maskz_loadu_ps(mask, w.add(j * w_stride + c));
                }
                for r in 0..R {
                    let xv = _mm512_maskz_loadu_ps(mask, x.add(r * x_stride + c));
                    for j in 0..C {
                        acc[r][j] = _mm512_fmadd_ps(xv, wv[j], acc[r][j]);
                    }
                }
            }
        }
        let mut out = [[0f32; C]; R];
        for r in 0..R {
            for j in 0..C {
                out[r][j] = _mm512_reduce_add_ps(acc[r][j]);
            }
        }
        out
    }

    /// # Safety
    /// AVX2 and FMA must be available; bounds as for [`dot_tile_avx512`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_tile_avx2<const R: usize, const C: usize>(
        x: *const f32,
        x_stride: usize,
        w: *const f32,
        w_stride: usize,
        k: usize,
    ) -> [[f32; C]; R] {
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut wv = [_mm256_setzero_ps(); C];
        let mut c = 0;
        while c + 8 <= k {
            // SAFETY: offsets below the guaranteed lengths.
            unsafe {
                for j in 0..C {
                    wv[j] = _mm256_loadu_ps(w.add(j * w_stride + c));
                }
                for r in 0..R {
                    let xv = _mm256_loadu_ps(x.add(r * x_stride + c));
                    for j in 0..C {
                        acc[r][j] = _mm256_fmadd_ps(xv, wv[j], acc[r][j]);
                    }
                }
            }
            c += 8;
        }
        let mut out = [[0f32; C]; R];
        for r in 0..R {
            for j in 0..C {
                let mut lanes = [0f32; 8];
                // SAFETY: `lanes` holds 8 floats.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][j]) };
                let mut sum =
                    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
                for i in c..k {
                    // SAFETY: `i < k`.
                    sum += unsafe { *x.add(r * x_stride + i) * *w.add(j * w_stride + i) };
                }
                out[r][j] = sum;
            }
        }
        out
    }

    /// # Safety
    /// AVX-512F must be available; `y` and `x` must hold `k` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn axpy_avx512(y: *mut f32, a: f32, x: *const f32, k: usize) {
        let av = _mm512_set1_ps(a);
        let mut c = 0;
        while c + 16 <= k {
            // SAFETY: offsets below `k`.
            unsafe {
                let yv = _mm512_loadu_ps(y.add(c));
                _mm512_storeu_ps(y.add(c), _mm512_fmadd_ps(av, _mm512_loadu_ps(x.add(c)), yv));
            }
            c += 16;
        }
        if c < k {
            let mask: __mmask16 = (1u16 << (k - c)) - 1;
            // SAFETY: masked accesses touch only the valid tail.
            unsafe {
                let yv = _mm512_maskz_loadu_ps(mask, y.add(c));
                let xv = _mm512_maskz_loadu_ps(mask, x.add(c));
                _mm512_mask_storeu_ps(y.add(c), mask, _mm512_fmadd_ps(av, xv, yv));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: f32) -> Vec<f32> {
        (0..len).map(|i| ((i as f32 * 0.731 + seed).sin() * 1.7).fract()).collect()
    }

    #[test]
    fn every_level_matches_a_naive_sum() {
        for k in [1, 7, 8, 15, 16, 17, 64, 100, 576] {
            let x = data(3 * k, 0.2);
            let w = data(k, 0.9);
            let naive: Vec<f32> =
                (0..3).map(|r| (0..k).map(|c| x[r * k + c] as f64 * w[c] as f64).sum::<f64>() as f32).collect();
            let got = dot_tile::<3, 1>(&x, k, &w, 0, k, 0);
            let scalar = dot_tile_scalar::<3, 1>(&x, k, &w, 0, k);
            for r in 0..3 {
                assert!((got[r][0] - naive[r]).abs() < 1e-3, "k={k} row {r}: {} vs {}", got[r][0], naive[r]);
                assert!((scalar[r][0] - naive[r]).abs() < 1e-3, "scalar k={k} row {r}");
            }
            let mut y = data(k, 0.4);
            let expect: Vec<f32> = y.iter().zip(&w).map(|(y, w)| y + 0.5 * w).collect();
            axpy(&mut y, 0.5, &w);
            assert!(y.iter().zip(&expect).all(|(a, b)| (a - b).abs() < 1e-5), "axpy k={k}");
        }
    }

    #[test]
    fn an_entry_sums_the_same_alone_or_in_a_tile() {
        let k = 300;
        let x = data(4 * k, 0.1);
        let w = data(4 * k, 0.7);
        let tile = dot_tile::<4, 4>(&x, k, &w, k, k, 0);
        for r in 0..4 {
            for c in 0..4 {
                assert_eq!(dot_tile::<1, 1>(&x[r * k..], k, &w[c * k..], k, k, 0)[0][0], tile[r][c]);
            }
        }
    }
}
