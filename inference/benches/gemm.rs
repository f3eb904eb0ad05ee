//! `cargo bench -p inference --bench gemm`: the training matmul ([`inference::gemm::sgemm`]) on the shapes of
//! one SmolLM2 SFT step (4 x 128 tokens, 388 of them carrying loss), each in the three layouts a projection
//! needs: forward `x·Wᵀ` (NT), input gradient `dY·W` (NN), weight gradient `dYᵀ·x` (TN). Beside it, the `gemm`
//! crate (candle's matmul) on the same operands.

use std::time::Instant;

use inference::gemm::{MatRef, portable, sgemm};

fn main() {
    println!("| product | m x n x k | ms | GFLOP/s | gemm crate GFLOP/s |");
    println!("|---|---|---:|---:|---:|");
    let rows = 512;
    for &(out, inp) in &[(576usize, 576usize), (192, 576), (1536, 576), (576, 1536), (49152, 576)] {
        let rows = if out == 49152 { 388 } else { rows };
        let x = vec![0.5f32; rows * inp];
        let w = vec![0.25f32; out * inp];
        let dy = vec![0.125f32; rows * out];
        let cases = [
            ("NT x·Wᵀ", MatRef::row_major(&x, rows, inp), MatRef::row_major(&w, out, inp).t()),
            ("NN dY·W", MatRef::row_major(&dy, rows, out), MatRef::row_major(&w, out, inp)),
            ("TN dYᵀ·x", MatRef::row_major(&dy, rows, out).t(), MatRef::row_major(&x, rows, inp)),
        ];
        for (label, a, b) in cases {
            let flops = 2.0 * (a.rows * a.cols * b.cols) as f64;
            let mut c = vec![0f32; a.rows * b.cols];
            let ours = best_of(|| {
                let t = Instant::now();
                sgemm(a, b, &mut c, false);
                t.elapsed().as_secs_f64()
            });
            let theirs = best_of(|| {
                let t = Instant::now();
                portable(a, b, &mut c, false);
                t.elapsed().as_secs_f64()
            });
            println!(
                "| {label} | {}x{}x{} | {:.2} | {:.0} | {:.0} |",
                a.rows,
                b.cols,
                a.cols,
                ours * 1e3,
                flops / ours / 1e9,
                flops / theirs / 1e9
            );
        }
    }
}

fn best_of(mut f: impl FnMut() -> f64) -> f64 {
    f();
    let mut times: Vec<f64> = (0..7).map(|_| f()).collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}
