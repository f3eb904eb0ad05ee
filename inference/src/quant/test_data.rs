//! Inputs the formats' kernel tests share: deterministic values in (-1, 1), and the (m, n, k) shapes whose
//! last 16-block group holds 1, 2 (SmolLM2's 576), 3, 5, 7, 9 and 16 blocks, one group or several.

use super::Kernel;

/// `len` values in (-1, 1), a different sequence for each `seed`.
pub fn data(len: usize, seed: f32) -> Vec<f32> {
    (0..len).map(|i| ((i as f32 * 0.731 + seed).sin() * 1.7).fract()).collect()
}

/// (rows of activations, rows of weights, width) for the block formats' product tests.
pub const BLOCK_SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 32),
    (3, 65, 64),
    (1, 130, 576),
    (16, 129, 576),
    (5, 200, 1536),
    (2, 9, 8192),
    (40, 7, 544),
    (4, 11, 96),
    (6, 13, 160),
    (3, 17, 224),
    (7, 5, 288),
    (2, 19, 608),
    (5, 23, 1056),
];

/// On each kernel the CPU has, every input row's result alone equals its
/// row of a 16- and a 40-row product (`product(x, m, kernel)` over `n`
/// weight rows of `k`): what a request gets does not depend on its batch.
pub fn assert_rows_do_not_depend_on_the_batch(n: usize, k: usize, product: impl Fn(&[f32], usize, Kernel) -> Vec<f32>) {
    let x = data(40 * k, 0.5);
    for kernel in Kernel::available(super::q8_0::has_simd()) {
        for m in [16, 40] {
            let batched = product(&x[..m * k], m, kernel);
            for i in 0..m {
                let alone = product(&x[i * k..(i + 1) * k], 1, kernel);
                assert_eq!(alone, batched[i * n..(i + 1) * n], "{kernel:?}: row {i} of {m}");
            }
        }
    }
}
