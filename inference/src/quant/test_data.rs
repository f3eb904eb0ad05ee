//! Inputs the formats' kernel tests share: deterministic values in (-1, 1), and the (m, n, k) shapes whose
//! last 16-block group holds 1, 2 (SmolLM2's 576), 3, 5, 7, 9 and 16 blocks, one group or several.

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
