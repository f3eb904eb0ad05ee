//! Where a row's 32-value blocks sit in the 16 i32 lanes of the VNNI kernels
//! ([`super::q8_0`], [`super::q4_0`]), the per-block int8 quantization both
//! use, and the portable arithmetic both kernels follow lane by lane.
//!
//! **Groups.** A row's blocks are taken 16 at a time (a group; the last may
//! be shorter). In a group of `s` blocks each block owns `L` adjacent lanes,
//! `L` the largest of 1, 2, 4, 8 (up to a format's cap) with `s · L ≤ 16`, and
//! its eight 4-byte words are spread over them: in step `t` (of `8 / L`) lane
//! `L · b + j` holds word `L · t + j` of block `b`. Each step is one
//! contiguous `4 · s · L`-byte load. A full group has one lane per block and
//! eight steps; SmolLM2's 576-wide rows (18 blocks) end in a 2-block group
//! that fills all 16 lanes in one step, where one lane per block would run
//! eight steps at 2 of 16 lanes.
//!
//! **Arithmetic.** Each lane's integer dot is exact. After a group's steps
//! each lane's dot (a block's first lane seeded with the block's correction
//! term) is converted and multiplied by its block's `x scale · w scale`
//! (copied to each of the block's lanes, [`x86::spread_ps`]) and added into
//! that lane's F32 sum; the 16 sums are added at the end. A spread block's
//! lanes therefore meet in F32, not as integers: a few roundings more than
//! one lane per block, and no shuffles per input row (adding the lanes as
//! integers first and compressing them to one lane per block cost more than
//! the `vpdpbusd` the spreading saves on SmolLM2's 2-block tails). [`column`]
//! below does the same operations in the same order up to the final 16-lane
//! sum. The AVX2 kernels add a block's lanes as integers first (their
//! 256-bit halves make that cheap), which rounds differently by a few ulps.

use rayon::prelude::*;

use super::bf16::reduce;

/// Values per quantization block (one scale each).
pub const BLOCK: usize = 32;
/// Blocks per group: one per i32 lane of a 512-bit vector when the group is full.
pub const GROUP: usize = 16;
/// 4-byte words per block (what one `vpdpbusd` lane consumes per step).
const WORDS: usize = BLOCK / 4;

/// One group of a row's blocks and how its blocks share the lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    /// Index of the group's first block in the row.
    pub first: usize,
    /// Blocks in the group (16 except perhaps the last).
    pub blocks: usize,
    /// Lanes per block.
    pub lanes: usize,
}

impl Group {
    /// The group of `nb` blocks' row that block `b` is in, lanes capped at `max_lanes`.
    #[inline]
    pub fn of(b: usize, nb: usize, max_lanes: usize) -> Group {
        let first = b / GROUP * GROUP;
        let blocks = (nb - first).min(GROUP);
        let mut lanes = 1;
        while lanes * 2 <= max_lanes && blocks * lanes * 2 <= GROUP {
            lanes *= 2;
        }
        Group { first, blocks, lanes }
    }

    /// Offset of the group's first byte in the row's quant bytes.
    #[inline]
    pub fn start(&self) -> usize {
        self.first * BLOCK
    }

    /// Loads per block word set: `8 / lanes`.
    #[inline]
    pub fn steps(&self) -> usize {
        WORDS / self.lanes
    }

    /// Bytes one step loads.
    #[inline]
    pub fn step_bytes(&self) -> usize {
        4 * self.used_lanes()
    }

    /// Lanes holding data (the rest load as zero).
    #[inline]
    pub fn used_lanes(&self) -> usize {
        self.blocks * self.lanes
    }
}

/// The groups of a row of `nb` blocks, lanes per block capped at `max_lanes` (1, 2, 4 or 8).
#[inline]
pub fn groups(nb: usize, max_lanes: usize) -> impl Iterator<Item = Group> {
    (0..nb.div_ceil(GROUP)).map(move |g| Group::of(g * GROUP, nb, max_lanes))
}

/// A group with what the AVX-512 kernels derive from it, worked out once
/// per product (it depends only on the row width): worked out for every
/// weight row, the masks and the lane map were scalar work beside the
/// single-row path's few `vpdpbusd` per row (perf: the bookkeeping, and
/// the first-lane mask's loop, between the rows' loads).
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub group: Group,
    /// Lanes `0..blocks`: one per block (scales, offsets, seeds).
    pub blocks: u16,
    /// Lanes the group's steps load.
    pub used: u16,
    /// Each block's first lane.
    pub first_lanes: u16,
    /// Each lane's block (`lane / lanes`), for spreading per-block values.
    pub block_of_lane: [i32; GROUP],
}

/// The [`Plan`]s of a row of `nb` blocks, in [`groups`]' order.
pub fn plans(nb: usize, max_lanes: usize) -> Vec<Plan> {
    let low = |n: usize| if n >= GROUP { u16::MAX } else { (1u16 << n) - 1 };
    groups(nb, max_lanes)
        .map(|g| Plan {
            group: g,
            blocks: low(g.blocks),
            used: low(g.used_lanes()),
            first_lanes: (0..g.used_lanes()).step_by(g.lanes).fold(0u16, |m, l| m | (1 << l)),
            block_of_lane: std::array::from_fn(|lane| (lane / g.lanes) as i32),
        })
        .collect()
}

/// Where byte `e` of block `b` goes among a row's quant bytes (see the module docs).
pub fn position(b: usize, e: usize, nb: usize, max_lanes: usize) -> usize {
    let g = Group::of(b, nb, max_lanes);
    let word = e / 4;
    g.start() + g.step_bytes() * (word / g.lanes) + 4 * (g.lanes * (b - g.first) + word % g.lanes) + e % 4
}

/// How [`quantize_row`] orders a row's quant bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Spread over the 16 lanes group by group ([`position`]), at most
    /// this many lanes per block: the layout of kernels that load a row's
    /// bytes as vectors (Q4_0's weights and activations).
    Lanes(usize),
    /// Block after block, each block's bytes in order: for kernels that
    /// broadcast an activation's 4-byte words against vectors of
    /// interleaved weight rows (Q8_0's panels).
    Blocks,
}

#[cfg(test)]
impl Layout {
    /// Where byte `e` of block `b` of a row of `nb` blocks goes.
    pub fn position(self, b: usize, e: usize, nb: usize) -> usize {
        match self {
            Layout::Lanes(max_lanes) => position(b, e, nb, max_lanes),
            Layout::Blocks => b * BLOCK + e,
        }
    }
}

/// Quantizes one row to int8 per 32-block (symmetric, `amax / 127` steps):
/// quants into `quants` laid out per `layout` (each byte `q + offset`,
/// `offset` 0 or 128),
/// scales into `scales`; returns each block's quant sum.
///
/// Every product quantizes its activations with this (a decode step calls
/// it a few hundred times), so it runs compiled for AVX2 where the CPU has
/// it: the block's arithmetic vectorizes and `round` becomes an instruction
/// instead of a libm call (measured ~85 instructions per value before, most
/// of a 576-wide batch-1 product's work besides the dots). Same results
/// either way: the operations are the same IEEE ones.
pub fn quantize_row(
    values: &[f32],
    quants: &mut [u8],
    scales: &mut [f32],
    sums: &mut [i32],
    offset: u8,
    layout: Layout,
) {
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
        return unsafe { x86::quantize_row(values, quants, scales, sums, offset, layout) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { quantize_row_avx2(values, quants, scales, sums, offset, layout) };
    }
    quantize_row_body(values, quants, scales, sums, offset, layout)
}

/// [`quantize_row_body`] compiled for AVX2 (SSE4.1's `roundps` included).
///
/// # Safety
/// AVX2 must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(
    values: &[f32],
    quants: &mut [u8],
    scales: &mut [f32],
    sums: &mut [i32],
    offset: u8,
    layout: Layout,
) {
    quantize_row_body(values, quants, scales, sums, offset, layout)
}

/// [`quantize_row`]'s work, block by block: each block's 32 values
/// quantized, then its eight 4-byte words put in their places.
#[inline(always)]
fn quantize_row_body(
    values: &[f32],
    quants: &mut [u8],
    scales: &mut [f32],
    sums: &mut [i32],
    offset: u8,
    layout: Layout,
) {
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
        let mut q = [0u8; BLOCK];
        let mut sum = 0i32;
        for e in 0..BLOCK {
            let v = (block[e] * inv).round().clamp(-127.0, 127.0) as i8;
            q[e] = v as u8;
            sum += i32::from(v);
        }
        sums[b] = sum;
        place(&q, layout, b, nb, quants, offset);
    }
}

/// Writes block `b`'s 32 quant bytes (two's complement) of a row of `nb`
/// blocks to their places in `layout`, each plus `offset` (0 or 128).
#[inline(always)]
fn place(q: &[u8; BLOCK], layout: Layout, b: usize, nb: usize, quants: &mut [u8], offset: u8) {
    // Adding 0 or 128 to every byte of a word is an XOR (no carries).
    debug_assert!(offset == 0 || offset == 128, "offset {offset}");
    let flip = u32::from(offset) * 0x0101_0101;
    // Word `word` of the block goes to `first_word + step · (word / lanes) + 4 · (word % lanes)`.
    let (first_word, step, lanes) = match layout {
        Layout::Lanes(max_lanes) => {
            let g = Group::of(b, nb, max_lanes);
            (g.start() + 4 * g.lanes * (b - g.first), g.step_bytes(), g.lanes)
        }
        Layout::Blocks => (b * BLOCK, 0, WORDS),
    };
    for word in 0..WORDS {
        let at = first_word + step * (word / lanes) + 4 * (word % lanes);
        let bytes = [q[4 * word], q[4 * word + 1], q[4 * word + 2], q[4 * word + 3]];
        let dst: &mut [u8; 4] = (&mut quants[at..at + 4]).try_into().expect("4 bytes");
        *dst = (u32::from_le_bytes(bytes) ^ flip).to_le_bytes();
    }
}

/// Rows of activations quantized per 32-block for one product ([`quantize_row`]).
pub struct Quantized {
    /// `[m, k]`, each byte `q + offset`, in the [`Layout`] asked for.
    pub quants: Vec<u8>,
    /// `[m, k/32]`.
    pub scales: Vec<f32>,
    /// `[m, k/32]`: each block's quant sum.
    pub sums: Vec<i32>,
}

/// One row's input and outputs in [`quantize_rows`].
type RowParts<'a> = (((&'a [f32], &'a mut [u8]), &'a mut [f32]), &'a mut [i32]);

/// Quantizes `m` rows of `k` (a multiple of [`BLOCK`]), in parallel when the product is large.
pub fn quantize_rows(x: &[f32], m: usize, k: usize, offset: u8, layout: Layout) -> Quantized {
    let nb = k / BLOCK;
    let mut a = Quantized { quants: vec![0u8; m * k], scales: vec![0f32; m * nb], sums: vec![0i32; m * nb] };
    if k == 0 {
        return a;
    }
    let run = |(((values, quants), scales), sums): RowParts| {
        quantize_row(values, quants, scales, sums, offset, layout);
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

/// One row's dot, the VNNI kernels' arithmetic lane by lane: `product(p)`
/// is the integer product at quant byte `p`, `seed(b)` block `b`'s correction
/// and `scale(b)` its `x scale · w scale`; lane `j` of block `b` in a group
/// adds its integer dot (the seed in the block's first lane) times the
/// block's scale into F32 lane `lanes · (b - first) + j`.
pub fn column(
    nb: usize,
    max_lanes: usize,
    product: impl Fn(usize) -> i32,
    seed: impl Fn(usize) -> i32,
    scale: impl Fn(usize) -> f32,
) -> f32 {
    let mut sums = [0f32; GROUP];
    for g in groups(nb, max_lanes) {
        for local in 0..g.blocks {
            let b = g.first + local;
            for j in 0..g.lanes {
                let lane = local * g.lanes + j;
                let mut dot = if j == 0 { seed(b) } else { 0 };
                for t in 0..g.steps() {
                    let at = g.start() + g.step_bytes() * t + 4 * lane;
                    dot += (at..at + 4).map(&product).sum::<i32>();
                }
                sums[lane] = (dot as f32).mul_add(scale(b), sums[lane]);
            }
        }
    }
    reduce(sums)
}

/// Weight rows the AVX-512 integer kernels take side by side when a tile
/// has several input rows: each input vector loaded feeds this many
/// products. With one input row the rows go one by one (one sequential
/// stream, memory-bound).
pub const SIDE_BY_SIDE: usize = 2;

/// Weight rows ahead that the single-input-row products prefetch.
pub const PREFETCH_ROWS: usize = 4;

/// How far past the weight rows it reads (bytes) a kernel call with
/// `input_rows` input rows, in a tile of `tile_rows` weight rows of
/// `row_bytes`, prefetches as many bytes as it reads. With one input row a
/// product waits on memory: [`PREFETCH_ROWS`] rows ahead, the stream
/// (perf put most of its time on the first load of each weight row, its
/// scales at the row's end ahead of the quants). With several, the tile is
/// re-run for each block of input rows: the next tile's rows, fetched while
/// this one is re-run (perf over a 16-sequence decode put ~40% of the
/// kernel on the first loads of each weight row, from L3 or memory).
pub fn prefetch_distance(input_rows: usize, tile_rows: usize, row_bytes: usize) -> usize {
    if input_rows == 1 { PREFETCH_ROWS * row_bytes } else { tile_rows * row_bytes }
}

/// A tile's `R × C` dots, weight rows taken [`SIDE_BY_SIDE`] at a time by
/// `pair(c)` (`[dc][r]` for weight rows `c + dc`) where `side_by_side`, the
/// rest one at a time by `one(c)`, written column by column to
/// `out[a + r][b + c]` (`at = (a, b)`; see [`crate::cpu_linear::Tiles::tile`]).
/// Plain loops, not `array::from_fn` closures: those were calls per column
/// and per entry (measured ~10% of a 16-row product).
#[inline(always)]
pub fn tile_columns<const R: usize, const C: usize>(
    side_by_side: bool,
    mut pair: impl FnMut(usize) -> [[f32; R]; SIDE_BY_SIDE],
    mut one: impl FnMut(usize) -> [f32; R],
    out: &mut [&mut [f32]],
    (a, b): (usize, usize),
) {
    let out = &mut out[a..a + R];
    let mut put = |c: usize, column: [f32; R]| {
        for (out_row, value) in out.iter_mut().zip(column) {
            out_row[b + c] = value;
        }
    };
    let mut c = 0;
    if side_by_side && R > 1 {
        while c + SIDE_BY_SIDE <= C {
            for (dc, column) in pair(c).into_iter().enumerate() {
                put(c + dc, column);
            }
            c += SIDE_BY_SIDE;
        }
    }
    while c < C {
        put(c, one(c));
        c += 1;
    }
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use std::arch::x86_64::*;

    use super::{BLOCK, Layout, Plan, place};

    /// [`super::quantize_row`] on AVX-512: a block's 32 values as two
    /// vectors (the largest magnitude, the scaling, rounding half away from
    /// zero as `f32::round` does, and the quant sum without a scalar loop),
    /// the same IEEE operations, so the same bytes as the portable body.
    ///
    /// # Safety
    /// AVX-512F must be available; the slices' lengths must agree (the caller asserts).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn quantize_row(
        values: &[f32],
        quants: &mut [u8],
        scales: &mut [f32],
        sums: &mut [i32],
        offset: u8,
        layout: Layout,
    ) {
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
            let mut q = [0u8; BLOCK];
            // SAFETY: two 16-byte stores into the 32-byte array.
            unsafe {
                _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(q0));
                _mm_storeu_si128(q.as_mut_ptr().add(16) as *mut __m128i, _mm512_cvtepi32_epi8(q1));
            }
            place(&q, layout, b, nb, quants, offset);
        }
    }

    /// Prefetches the `bytes` from `from` on. Prefetches past the matrix's
    /// end never fault.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn prefetch(from: *const u8, bytes: usize) {
        let mut at = 0;
        while at < bytes {
            _mm_prefetch::<_MM_HINT_T0>(from.wrapping_add(at) as *const i8);
            at += 64;
        }
    }

    /// Plan `p`'s lane map.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn block_of_lane(p: &Plan) -> __m512i {
        // SAFETY: a 64-byte array, read unaligned.
        unsafe { _mm512_loadu_si512(p.block_of_lane.as_ptr() as *const __m512i) }
    }

    /// Per-block values held in lanes `0..blocks` (one lane per block)
    /// copied to each of their block's lanes: a block's scale for every lane
    /// that holds part of its dot. A full group is returned as it is.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn spread_ps(p: &Plan, v: __m512) -> __m512 {
        if p.group.lanes == 1 { v } else { _mm512_permutexvar_ps(block_of_lane(p), v) }
    }

    /// Adds plan `p`'s group's integer dots of `R` input rows with `C` weight rows
    /// (`dots[c][r]`) into the F32 accumulators `acc[c][r]`, each lane
    /// converted and scaled by its block's `x scale · w scale` (`xs`: the
    /// input rows' scales, `nb` per row; `w_scales`: spread per weight row).
    ///
    /// # Safety
    /// `xs` must hold `R` rows of `nb` scales covering the group's blocks.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn add_scaled<const R: usize, const C: usize>(
        p: &Plan,
        xs: *const f32,
        nb: usize,
        w_scales: &[__m512; C],
        dots: &[[__m512i; R]; C],
        acc: &mut [[__m512; R]; C],
    ) {
        for r in 0..R {
            // SAFETY: a masked load of the group's blocks of row `r` (caller).
            let x_scale = spread_ps(p, unsafe { _mm512_maskz_loadu_ps(p.blocks, xs.add(r * nb + p.group.first)) });
            for c in 0..C {
                let scale = _mm512_mul_ps(x_scale, w_scales[c]);
                acc[c][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[c][r]), scale, acc[c][r]);
            }
        }
    }

    /// [`row_sums`] of each weight row's accumulators (`out[c][r]`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn column_sums<const R: usize, const C: usize>(acc: &[[__m512; R]; C]) -> [[f32; R]; C] {
        // In registers: copying the accumulators out to sum them in `reduce`'s
        // order made LLVM keep them in memory (measured 3x slower).
        let mut out = [[0f32; R]; C];
        for c in 0..C {
            out[c] = row_sums(&acc[c]);
        }
        out
    }

    /// The 16-lane sums of `R` accumulators. Four at a time by a transposing
    /// tree (13 instructions for four, against 8 each for one at a time);
    /// the rest one at a time in the same order of additions, so a row's sum
    /// does not depend on how many rows share its tile (its batch). Each
    /// row's order: `S_j = (x[4j] + x[4j+2]) + (x[4j+1] + x[4j+3])` per
    /// 128-bit chunk `j`, then `(S_0 + S_2) + (S_1 + S_3)`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn row_sums<const R: usize>(acc: &[__m512; R]) -> [f32; R] {
        let mut out = [0f32; R];
        let mut r = 0;
        while r + 4 <= R {
            let (a, b, c, d) = (acc[r], acc[r + 1], acc[r + 2], acc[r + 3]);
            // Per chunk: [a0 + a2, b0 + b2, a1 + a3, b1 + b3], and the same for c, d.
            let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
            let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
            // Per chunk j: [S_j(a), S_j(b), S_j(c), S_j(d)].
            let s = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(ab, cd), _mm512_shuffle_ps::<0xEE>(ab, cd));
            let four = fold(s);
            // SAFETY: `out[r..r + 4]` is in bounds (loop condition); unaligned store.
            unsafe { _mm_storeu_ps(out.as_mut_ptr().add(r), four) };
            r += 4;
        }
        while r < R {
            let v = acc[r];
            // Lane 4j: x[4j] + x[4j+2], lane 4j+1: x[4j+1] + x[4j+3]; then lane 4j: S_j.
            let t = _mm512_add_ps(v, _mm512_permute_ps::<0b01_00_11_10>(v));
            let t = _mm512_add_ps(t, _mm512_permute_ps::<0b10_11_00_01>(t));
            out[r] = _mm_cvtss_f32(fold(t));
            r += 1;
        }
        out
    }

    /// Chunk-wise `(c_0 + c_2) + (c_1 + c_3)` of a vector's four 128-bit chunks.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn fold(v: __m512) -> __m128 {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let half = _mm256_add_ps(lo, hi);
        _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps::<1>(half))
    }

    /// Per-block integers held in lanes `0..blocks` moved to the first lane
    /// of each block, the other lanes zero: a block's seed enters its dot
    /// once. A full group is returned as it is.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn seed_lanes(p: &Plan, v: __m512i) -> __m512i {
        if p.group.lanes == 1 {
            return v;
        }
        _mm512_maskz_permutexvar_epi32(p.first_lanes, block_of_lane(p), v)
    }
}

/// The AVX2 kernels' side of the layout: a 16-lane step is two 256-bit
/// halves (lanes 0..8 and 8..16), loaded with masks where a group uses fewer.
#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use std::arch::x86_64::*;

    use super::Group;

    /// Lanes of a 256-bit half.
    pub const HALF: usize = 8;

    /// A load mask for lanes `0..n` of 8 (`n` at most 8).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn mask(n: usize) -> __m256i {
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
    }

    /// Lanes of half `half` that a group's `used` lanes fill (0..=8).
    #[inline]
    pub fn used_in(used: usize, half: usize) -> usize {
        used.saturating_sub(HALF * half).min(HALF)
    }

    /// `n` (at most 8) 4-byte words from `p`, the other lanes zero.
    ///
    /// # Safety
    /// AVX2 must be available and `p` valid for `4 · n` bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub unsafe fn load(p: *const u8, n: usize) -> __m256i {
        // SAFETY: the caller's `n` words are readable; masked-off lanes are not read.
        unsafe {
            if n >= HALF {
                _mm256_loadu_si256(p as *const __m256i)
            } else {
                _mm256_maskload_epi32(p as *const i32, mask(n))
            }
        }
    }

    /// `n` (at most 8) F32 values from `p`, the other lanes zero.
    ///
    /// # Safety
    /// AVX2 must be available and `p` valid for `n` values.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub unsafe fn load_ps(p: *const f32, n: usize) -> __m256 {
        // SAFETY: as `load`.
        unsafe { if n >= HALF { _mm256_loadu_ps(p) } else { _mm256_maskload_ps(p, mask(n)) } }
    }

    /// For a group with more than one lane per block (so at most 8 blocks):
    /// each block's partial dots in `lo` and `hi` added into one, the blocks
    /// moved to lanes `0..blocks` of the result, the rest zero: what one lane
    /// per block would hold. Integer additions, so exact in any order.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub fn per_block(g: Group, lo: __m256i, hi: __m256i) -> __m256i {
        match (g.lanes, g.blocks) {
            // SmolLM2's 576-wide rows in Q8_0: block 0 is `lo`, block 1 `hi`.
            (8, 2) => {
                let t = _mm256_hadd_epi32(lo, hi);
                let t = _mm256_hadd_epi32(t, t);
                let s = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256::<1>(t));
                _mm256_set_m128i(_mm_setzero_si128(), _mm_blend_epi32::<0b1100>(s, _mm_setzero_si128()))
            }
            // The same rows in Q4_0 (4 lanes per block): both blocks in `lo`.
            (4, 2) => {
                let t = _mm256_hadd_epi32(lo, lo);
                let t = _mm256_hadd_epi32(t, t);
                let s = _mm_unpacklo_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256::<1>(t));
                _mm256_set_m128i(_mm_setzero_si128(), _mm_blend_epi32::<0b1100>(s, _mm_setzero_si128()))
            }
            _ => {
                let mut lanes = [0i32; 2 * HALF];
                // SAFETY: `lanes` holds 16 i32s, two unaligned 32-byte stores.
                unsafe {
                    _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, lo);
                    _mm256_storeu_si256(lanes.as_mut_ptr().add(HALF) as *mut __m256i, hi);
                }
                let mut out = [0i32; HALF];
                for (b, o) in out.iter_mut().enumerate().take(g.blocks) {
                    *o = lanes[b * g.lanes..(b + 1) * g.lanes].iter().sum();
                }
                // SAFETY: `out` holds 8 i32s.
                unsafe { _mm256_loadu_si256(out.as_ptr() as *const __m256i) }
            }
        }
    }

    /// The sum of an accumulator's 8 lanes, in a fixed order.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub fn sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plan's masks and lane map are its group's, worked out once: a
    /// 576-wide row (18 blocks) is a full group of 16 blocks, one lane each,
    /// and 2 blocks over 8 lanes each (4 each where capped at 4).
    #[test]
    fn plans_follow_their_groups() {
        let full = plans(18, 8)[0];
        assert_eq!((full.blocks, full.used, full.first_lanes), (u16::MAX, u16::MAX, u16::MAX));
        assert_eq!(full.block_of_lane, std::array::from_fn(|lane| lane as i32));
        let tail = plans(18, 8)[1];
        assert_eq!((tail.group.first, tail.blocks, tail.used, tail.first_lanes), (16, 0b11, u16::MAX, 0x0101));
        assert_eq!(tail.block_of_lane, std::array::from_fn(|lane| (lane / 8) as i32));
        let capped = plans(18, 4)[1];
        assert_eq!((capped.blocks, capped.used, capped.first_lanes), (0b11, 0xff, 0x11));
        for nb in 1..=40 {
            for max_lanes in [1, 2, 4, 8] {
                let (plans, groups): (Vec<Plan>, Vec<Group>) = (plans(nb, max_lanes), groups(nb, max_lanes).collect());
                assert_eq!(plans.iter().map(|p| p.group).collect::<Vec<_>>(), groups);
                for p in &plans {
                    assert_eq!(p.first_lanes.count_ones() as usize, p.group.blocks, "{nb} blocks, {max_lanes} lanes");
                    assert_eq!(p.used.count_ones() as usize, p.group.used_lanes());
                }
            }
        }
    }

    type QuantizeRow = fn(&[f32], &mut [u8], &mut [f32], &mut [i32], u8, Layout);

    /// Every quantizer this CPU runs: the portable body, AVX2's and AVX-512's.
    fn quantizers() -> Vec<(&'static str, QuantizeRow)> {
        let mut all: Vec<(&'static str, QuantizeRow)> = vec![("portable", quantize_row_body)];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2.
                all.push(("avx2", |v, q, s, sums, o, l| unsafe { quantize_row_avx2(v, q, s, sums, o, l) }));
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F; the test's slices agree in length.
                all.push(("avx512", |v, q, s, sums, o, l| unsafe { x86::quantize_row(v, q, s, sums, o, l) }));
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
        let cases = [
            (18, Layout::Lanes(8), 128u8),
            (18, Layout::Lanes(4), 0),
            (48, Layout::Lanes(8), 0),
            (3, Layout::Lanes(1), 128),
            (21, Layout::Lanes(8), 128),
            (18, Layout::Blocks, 128),
            (5, Layout::Blocks, 0),
        ];
        for ((nb, layout, offset), (name, quantize)) in
            cases.into_iter().flat_map(|case| quantizers().into_iter().map(move |q| (case, q)))
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
            quantize(&values, &mut quants, &mut scales, &mut sums, offset, layout);
            for (b, block) in values.chunks_exact(BLOCK).enumerate() {
                let d = block.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                assert_eq!(scales[b].to_bits(), d.to_bits(), "{name}, nb {nb}: block {b}'s scale");
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                let q: Vec<i8> = block.iter().map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8).collect();
                assert_eq!(sums[b], q.iter().map(|&q| i32::from(q)).sum::<i32>(), "{name}");
                for (e, &q) in q.iter().enumerate() {
                    let got = quants[layout.position(b, e, nb)];
                    assert_eq!(got, (q as u8).wrapping_add(offset), "{name}, nb {nb} {layout:?}: ({b}, {e})");
                }
            }
        }
    }

    /// Every byte of a row has exactly one place, each step is contiguous,
    /// and groups of 2 blocks use all 16 lanes.
    #[test]
    fn positions_are_a_permutation_with_dense_steps() {
        for nb in 1..=40 {
            for max_lanes in [1, 4, 8] {
                let mut seen = vec![false; nb * BLOCK];
                for b in 0..nb {
                    for e in 0..BLOCK {
                        let p = position(b, e, nb, max_lanes);
                        assert!(!seen[p], "nb {nb} cap {max_lanes}: ({b}, {e}) collides at {p}");
                        seen[p] = true;
                    }
                }
                for g in groups(nb, max_lanes) {
                    assert_eq!(g.steps() * g.step_bytes(), g.blocks * BLOCK);
                    assert!(g.used_lanes() <= GROUP && g.lanes <= max_lanes);
                    if g.blocks == 2 && max_lanes == 8 {
                        assert_eq!(g.used_lanes(), GROUP, "nb {nb}: a 2-block group fills the vector");
                    }
                }
            }
        }
    }
}
