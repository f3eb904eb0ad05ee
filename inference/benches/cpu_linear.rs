//! `cargo bench -p inference --bench cpu_linear`: throughput of the serving
//! path's few-row matmul, on weights that sit in cache and on weights that
//! stream from memory as they do in a real decode step, and of the packed
//! BF16, Q8_0 and Q4_0 kernels ([`inference::quant`]) against F32 on the same
//! shapes. `cargo bench -p inference --bench cpu_linear -- formats` runs only
//! the formats table.

use std::time::Instant;

use inference::cpu_linear::matmul_transposed;
use inference::quant::{bf16, q4_0, q8_0};

fn main() {
    if !std::env::args().any(|a| a == "formats") {
        f32_cases();
    }
    formats();
}

/// The F32 kernel on cached and streamed weights.
fn f32_cases() {
    println!("| case | rows | ms | GFLOP/s | weight GB/s |");
    println!("|---|---:|---:|---:|---:|");
    // One projection-sized matrix, reused (cache resident), and the
    // SmolLM2 vocabulary projection (113 MB, from memory).
    for &(label, n, k) in
        &[("1536x576 cached", 1536usize, 576usize), ("576x1536 cached", 576, 1536), ("49152x576 lm_head", 49152, 576)]
    {
        let w = vec![0.25f32; n * k];
        for m in [1usize, 4, 16, 128] {
            let x = vec![0.5f32; m * k];
            std::hint::black_box(matmul_transposed(&x, m, &w, n, k));
            let seconds = best_of(|| {
                let iters = 10;
                let t = Instant::now();
                for _ in 0..iters {
                    std::hint::black_box(matmul_transposed(&x, m, &w, n, k));
                }
                t.elapsed().as_secs_f64() / iters as f64
            });
            report(label, m, seconds, n, k, 1);
        }
    }
    // 120 distinct 1536x576 matrices (424 MB): every weight comes from memory once.
    let (n, k) = (1536usize, 576usize);
    let ws: Vec<Vec<f32>> = (0..120).map(|i| vec![0.25f32 + i as f32; n * k]).collect();
    for m in [1usize, 4, 16, 64] {
        let x = vec![0.5f32; m * k];
        let seconds = best_of(|| {
            let t = Instant::now();
            for w in &ws {
                std::hint::black_box(matmul_transposed(&x, m, w, n, k));
            }
            t.elapsed().as_secs_f64()
        });
        report("120 x 1536x576 streamed", m, seconds, n, k, ws.len());
    }
}

/// F32, BF16, Q8_0 and Q4_0 on the same cached matrices, the formats timed in
/// turn; the last columns are each format's speed relative to F32.
fn formats() {
    println!();
    println!("| shape | rows | f32 ms | bf16 ms | q8_0 ms | q4_0 ms | bf16 / f32 | q8_0 / f32 | q4_0 / f32 |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &(n, k) in &[(1536usize, 576usize), (576, 1536), (8192, 576)] {
        let w: Vec<f32> = (0..n * k).map(|i| ((i % 97) as f32 - 48.0) / 64.0).collect();
        let wb = bf16::pack(&w, n, k);
        let wq = q8_0::pack(&w, n, k).expect("k is a multiple of 32");
        let w4 = q4_0::pack(&w, n, k).expect("k is a multiple of 32");
        for m in [1usize, 16, 128] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i % 31) as f32 - 15.0) / 16.0).collect();
            let time = |f: &dyn Fn() -> Vec<f32>| {
                std::hint::black_box(f());
                best_of(|| {
                    let t = Instant::now();
                    for _ in 0..10 {
                        std::hint::black_box(f());
                    }
                    t.elapsed().as_secs_f64() / 10.0
                })
            };
            let f = time(&|| matmul_transposed(&x, m, &w, n, k));
            let b = time(&|| bf16::matmul(&x, m, &wb, n, k));
            let q = time(&|| q8_0::matmul(&x, m, &wq, n, k));
            let q4 = time(&|| q4_0::matmul(&x, m, &w4, n, k));
            println!(
                "| {n}x{k} | {m} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2}x | {:.2}x | {:.2}x |",
                f * 1e3,
                b * 1e3,
                q * 1e3,
                q4 * 1e3,
                f / b,
                f / q,
                f / q4
            );
        }
    }
}

/// The fastest of several timings: this machine shares its memory bus and
/// cores with neighbours, and the minimum is the figure least disturbed by them.
fn best_of(mut time: impl FnMut() -> f64) -> f64 {
    (0..7).map(|_| time()).fold(f64::INFINITY, f64::min)
}

fn report(label: &str, m: usize, seconds: f64, n: usize, k: usize, matrices: usize) {
    let flops = 2.0 * (m * n * k * matrices) as f64;
    let bytes = (n * k * 4 * matrices) as f64;
    println!("| {label} | {m} | {:.3} | {:.1} | {:.1} |", seconds * 1e3, flops / seconds / 1e9, bytes / seconds / 1e9);
}
