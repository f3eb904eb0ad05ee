//! The KV block pool: keys and values live in fixed-size blocks under one
//! memory budget, and full blocks of a prompt are kept in a prefix index so
//! that a later request with the same leading tokens reuses them instead of
//! recomputing them.
//!
//! A block holds [`BlockShape::tokens`] positions of every layer's keys and
//! values. Blocks are reference-counted (`Arc`): the sequences using a block
//! and the prefix index each hold a reference, and a full block is never
//! written again, so sharing needs no locks. The pool counts live blocks (a
//! block's `Drop` gives its slot back); the budget is that count.
//!
//! The prefix index maps a chained hash — of the block's tokens and the hash
//! of every block before it — to the block. Hashes are keyed with a random
//! key per index (so nobody can craft a colliding prompt offline) and every
//! hit is also checked against the stored tokens and parent hash. A block
//! only the index holds is idle: evicted least recently used first, deepest
//! blocks of a chain before their parents. An index belongs to one engine,
//! and an engine to one set of weights, so a checkpoint swap can never serve
//! one model's keys to another.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Positions per block unless configured otherwise.
pub const DEFAULT_BLOCK_TOKENS: usize = 16;

/// How cached keys and values are stored (`[engine] kv_dtype`). Attention
/// always computes in F32; F16 halves the bytes each decode step reads from
/// memory (with 16 sequences of ~160 positions, SmolLM2's cache reads are
/// 40% of its BF16 weights' per step) and doubles what a pool holds, at one
/// F16 rounding of each key and value (llama.cpp's default cache type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    #[default]
    F32,
    F16,
}

impl KvDtype {
    /// As written in the config.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }

    fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [KvDtype::F32, KvDtype::F16]
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| format!("unknown KV dtype {s:?} (f32 or f16)"))
    }
}

/// Shape of one block: `[layer][k | v][position][kv_width]` values of `dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockShape {
    pub layers: usize,
    pub tokens: usize,
    pub kv_width: usize,
    pub dtype: KvDtype,
}

impl BlockShape {
    fn values(&self) -> usize {
        self.layers * 2 * self.tokens * self.kv_width
    }

    /// Bytes one block takes.
    pub fn bytes(&self) -> usize {
        self.values() * self.dtype.bytes()
    }

    /// Blocks that hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.tokens)
    }

    /// Where layer `layer`'s keys (`value = false`) or values start in a block.
    fn plane(&self, layer: usize, value: bool) -> usize {
        (layer * 2 + value as usize) * self.tokens * self.kv_width
    }
}

/// One block of keys and values. Dropping it returns its slot to the pool
/// (or to whatever counter it was allocated against).
pub struct KvBlock {
    data: BlockData,
    shape: BlockShape,
    live: Arc<AtomicUsize>,
}

#[derive(Clone)]
enum BlockData {
    F32(Box<[f32]>),
    /// IEEE half bits.
    F16(Box<[u16]>),
}

/// One layer's keys or values in a block, `[tokens][kv_width]`, as stored.
#[derive(Clone, Copy)]
pub(crate) enum Plane<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
}

impl<'a> Plane<'a> {
    /// The first `len` values as F32: borrowed when stored so, else widened into `scratch`.
    pub(crate) fn to_f32(self, len: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        match self {
            Plane::F32(values) => &values[..len],
            Plane::F16(bits) => {
                scratch.resize(len, 0.0);
                crate::simd::f16_to_f32(&bits[..len], scratch);
                scratch
            }
        }
    }
}

impl KvBlock {
    /// A zeroed block counted in `live`.
    pub(crate) fn new(shape: BlockShape, live: &Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::Relaxed);
        let data = match shape.dtype {
            KvDtype::F32 => BlockData::F32(vec![0f32; shape.values()].into_boxed_slice()),
            KvDtype::F16 => BlockData::F16(vec![0u16; shape.values()].into_boxed_slice()),
        };
        Self { data, shape, live: live.clone() }
    }

    /// A copy of `self`, counted in `live`.
    pub(crate) fn copy(&self, live: &Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::Relaxed);
        Self { data: self.data.clone(), shape: self.shape, live: live.clone() }
    }

    /// Keys (`value = false`) or values of one layer: `[tokens][kv_width]`.
    pub(crate) fn plane(&self, layer: usize, value: bool) -> Plane<'_> {
        let range = self.plane_range(layer, value);
        match &self.data {
            BlockData::F32(data) => Plane::F32(&data[range]),
            BlockData::F16(data) => Plane::F16(&data[range]),
        }
    }

    /// Stores `values` (whole rows) from row `row` of a layer's keys or values.
    pub(crate) fn write(&mut self, layer: usize, value: bool, row: usize, values: &[f32]) {
        let range = self.plane_range(layer, value);
        let at = range.start + row * self.shape.kv_width;
        match &mut self.data {
            BlockData::F32(data) => data[at..at + values.len()].copy_from_slice(values),
            BlockData::F16(data) => crate::simd::f32_to_f16(values, &mut data[at..at + values.len()]),
        }
    }

    fn plane_range(&self, layer: usize, value: bool) -> std::ops::Range<usize> {
        let start = self.shape.plane(layer, value);
        start..start + self.shape.tokens * self.shape.kv_width
    }
}

impl Drop for KvBlock {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A chained block hash: identifies a block by its tokens and everything before them.
pub type BlockHash = u64;

/// Counts of a pool, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolUsage {
    pub total: usize,
    /// Blocks allocated (held by sequences, the index, or both).
    pub live: usize,
    /// Blocks in the prefix index (idle or also in use).
    pub cached: usize,
    /// Cached blocks no sequence uses: evictable.
    pub idle: usize,
}

/// The blocks of one engine: a budget of `total` blocks and the prefix index.
pub struct BlockPool {
    shape: BlockShape,
    total: usize,
    live: Arc<AtomicUsize>,
    index: Option<PrefixIndex>,
}

impl BlockPool {
    /// A pool of `total` blocks of `shape`; `prefix_cache` keeps full prompt
    /// blocks for reuse.
    pub fn new(shape: BlockShape, total: usize, prefix_cache: bool) -> Self {
        Self { shape, total, live: Arc::new(AtomicUsize::new(0)), index: prefix_cache.then(PrefixIndex::new) }
    }

    /// Blocks of `bytes` in all for `shape`, at least one.
    pub fn blocks_in(bytes: usize, shape: BlockShape) -> usize {
        (bytes / shape.bytes().max(1)).max(1)
    }

    pub fn shape(&self) -> BlockShape {
        self.shape
    }

    pub fn total(&self) -> usize {
        self.total
    }

    fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Whether `blocks` blocks can be handed out now, evicting idle cached
    /// ones as needed. Counts idle blocks only as far as it must: in the
    /// steady state the cache fills the pool and this runs every step.
    pub fn has_room(&self, blocks: usize) -> bool {
        let free = self.total.saturating_sub(self.live());
        free >= blocks || self.index.as_ref().is_some_and(|i| i.idle_at_least(blocks - free))
    }

    /// A new block, evicting the least recently used idle cached block when
    /// the budget is spent; `None` when every block is in use.
    pub fn allocate(&mut self) -> Option<KvBlock> {
        if !self.make_room(1) {
            return None;
        }
        Some(KvBlock::new(self.shape, &self.live))
    }

    /// A copy of `block` under the budget (copy-on-write of a shared partial block).
    pub fn copy(&mut self, block: &KvBlock) -> Option<KvBlock> {
        if !self.make_room(1) {
            return None;
        }
        Some(block.copy(&self.live))
    }

    /// Evicts idle cached blocks until `blocks` are free; false when it cannot.
    fn make_room(&mut self, blocks: usize) -> bool {
        while self.total.saturating_sub(self.live()) < blocks {
            let evicted = self.index.as_mut().is_some_and(PrefixIndex::evict_one);
            if !evicted {
                return false;
            }
        }
        true
    }

    pub fn usage(&self) -> PoolUsage {
        let (cached, idle) = self.index.as_ref().map_or((0, 0), |i| (i.len(), i.idle()));
        PoolUsage { total: self.total, live: self.live(), cached, idle }
    }

    /// Whether the prefix index is on.
    pub fn caches_prefixes(&self) -> bool {
        self.index.is_some()
    }

    /// The cached blocks that start `tokens`, at most `max_blocks` of them,
    /// longest match first; each is marked used now.
    pub fn lookup(&mut self, tokens: &[u32], max_blocks: usize) -> Vec<Arc<KvBlock>> {
        let block = self.shape.tokens;
        match self.index.as_mut() {
            Some(index) => index.lookup(tokens.chunks_exact(block).take(max_blocks)),
            None => Vec::new(),
        }
    }

    /// Offers the full blocks of a sequence whose positions hold `tokens`
    /// (`blocks[i]` holds `tokens[i * block ..]`) to the prefix index.
    pub fn register(&mut self, tokens: &[u32], blocks: &[Arc<KvBlock>]) {
        let block = self.shape.tokens;
        if let Some(index) = self.index.as_mut() {
            index.insert_chain(tokens.chunks_exact(block).zip(blocks));
        }
    }

    /// Forgets every cached block (the engine is retiring: its cache will
    /// never be read again). Blocks still in use stay with their sequences.
    pub fn clear_cache(&mut self) {
        if let Some(index) = self.index.as_mut() {
            index.clear();
        }
    }
}

struct Entry {
    block: Arc<KvBlock>,
    parent: BlockHash,
    tokens: Box<[u32]>,
    /// Key in [`PrefixIndex::lru`].
    tick: u64,
}

/// Chained-hash index of full blocks with LRU eviction of idle ones.
struct PrefixIndex {
    hasher: RandomState,
    entries: HashMap<BlockHash, Entry>,
    /// Recency order: tick → hash.
    lru: BTreeMap<u64, BlockHash>,
    tick: u64,
}

/// Parent hash of a sequence's first block.
const ROOT: BlockHash = 0;

impl PrefixIndex {
    fn new() -> Self {
        Self { hasher: RandomState::new(), entries: HashMap::new(), lru: BTreeMap::new(), tick: 0 }
    }

    fn chain(&self, parent: BlockHash, tokens: &[u32]) -> BlockHash {
        self.hasher.hash_one((parent, tokens))
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Cached blocks no sequence holds.
    fn idle(&self) -> usize {
        self.entries.values().filter(|e| Arc::strong_count(&e.block) == 1).count()
    }

    /// Whether at least `n` cached blocks are idle, looking from the least
    /// recently used end (where idle blocks gather) and stopping at `n`.
    fn idle_at_least(&self, n: usize) -> bool {
        let idle = self.lru.values().filter(|h| self.entries.get(h).is_some_and(|e| Arc::strong_count(&e.block) == 1));
        idle.take(n).count() >= n
    }

    /// Marks `hashes` used now; the last gets the oldest tick of them so that
    /// eviction takes a chain's tail before its head (a head without its tail
    /// is still useful; the reverse is not).
    fn touch(&mut self, hashes: &[BlockHash]) {
        for hash in hashes.iter().rev() {
            self.tick += 1;
            if let Some(entry) = self.entries.get_mut(hash) {
                self.lru.remove(&entry.tick);
                entry.tick = self.tick;
                self.lru.insert(self.tick, *hash);
            }
        }
    }

    fn lookup<'t>(&mut self, blocks: impl Iterator<Item = &'t [u32]>) -> Vec<Arc<KvBlock>> {
        let mut parent = ROOT;
        let mut hit = Vec::new();
        let mut hashes = Vec::new();
        for tokens in blocks {
            let hash = self.chain(parent, tokens);
            match self.entries.get(&hash) {
                Some(entry) if entry.parent == parent && *entry.tokens == *tokens => hit.push(entry.block.clone()),
                _ => break,
            }
            hashes.push(hash);
            parent = hash;
        }
        self.touch(&hashes);
        hit
    }

    fn insert_chain<'t>(&mut self, blocks: impl Iterator<Item = (&'t [u32], &'t Arc<KvBlock>)>) {
        let mut parent = ROOT;
        let mut hashes = Vec::new();
        for (tokens, block) in blocks {
            let hash = self.chain(parent, tokens);
            match self.entries.get(&hash) {
                // Already cached (maybe computed by another request at the same time): keep that one.
                Some(entry) if entry.parent == parent && *entry.tokens == *tokens => {}
                // A hash collision with different tokens: leave the entry alone and stop, since
                // the chain below this block could not be found by lookup anyway.
                Some(_) => break,
                None => {
                    let entry = Entry { block: block.clone(), parent, tokens: tokens.into(), tick: 0 };
                    self.entries.insert(hash, entry);
                }
            }
            hashes.push(hash);
            parent = hash;
        }
        self.touch(&hashes);
    }

    /// Drops the least recently used idle block; false when none is idle.
    fn evict_one(&mut self) -> bool {
        let victim = self
            .lru
            .iter()
            .find(|(_, hash)| self.entries.get(hash).is_some_and(|e| Arc::strong_count(&e.block) == 1))
            .map(|(&tick, &hash)| (tick, hash));
        let Some((tick, hash)) = victim else { return false };
        self.lru.remove(&tick);
        self.entries.remove(&hash);
        true
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.lru.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: BlockShape = BlockShape { layers: 2, tokens: 4, kv_width: 3, dtype: KvDtype::F32 };

    /// A pool's block tagged with `tag` so tests can tell blocks apart.
    fn block(pool: &mut BlockPool, tag: f32) -> Arc<KvBlock> {
        let mut block = pool.allocate().expect("a free block");
        block.write(0, false, 0, &[tag; 3]);
        Arc::new(block)
    }

    fn tag(block: &KvBlock) -> f32 {
        block.plane(0, false).to_f32(1, &mut Vec::new())[0]
    }

    #[test]
    fn f16_blocks_take_half_the_bytes_and_round_their_values() {
        let shape = BlockShape { dtype: KvDtype::F16, ..SHAPE };
        assert_eq!(2 * shape.bytes(), SHAPE.bytes());
        let mut block = KvBlock::new(shape, &Arc::new(AtomicUsize::new(0)));
        block.write(1, true, 2, &[1.0, -0.1, 1e6]);
        let mut scratch = Vec::new();
        let row = &block.plane(1, true).to_f32(12, &mut scratch)[6..9];
        // 1e6 is past F16's range: stored as its largest finite value, not infinity.
        assert_eq!(row, [1.0, half::f16::from_f32(-0.1).to_f32(), 65504.0]);
        assert!(block.plane(0, true).to_f32(12, &mut scratch).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn the_budget_counts_live_blocks_and_drops_give_them_back() {
        let mut pool = BlockPool::new(SHAPE, 3, false);
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        let c = pool.allocate().unwrap();
        assert!(pool.allocate().is_none(), "a full pool hands out nothing");
        assert_eq!(pool.usage().live, 3);
        drop(b);
        assert!(pool.has_room(1) && !pool.has_room(2));
        let copy = pool.copy(&a).unwrap();
        assert!(pool.copy(&c).is_none());
        drop((a, c, copy));
        assert_eq!(pool.usage(), PoolUsage { total: 3, live: 0, cached: 0, idle: 0 });
    }

    #[test]
    fn chained_hashes_match_only_whole_equal_prefixes() {
        let mut pool = BlockPool::new(SHAPE, 8, true);
        let tokens: Vec<u32> = (0..12).collect();
        let blocks = vec![block(&mut pool, 1.0), block(&mut pool, 2.0), block(&mut pool, 3.0)];
        pool.register(&tokens, &blocks);
        let hit = pool.lookup(&tokens, 8);
        assert_eq!(hit.iter().map(|b| tag(b)).collect::<Vec<_>>(), [1.0, 2.0, 3.0]);
        assert!(Arc::ptr_eq(&hit[1], &blocks[1]), "a hit shares the block, it does not copy it");
        // The same second block after a different first block is a different block.
        let mut other = tokens.clone();
        other[0] = 99;
        assert!(pool.lookup(&other, 8).is_empty());
        // A change in block 2 keeps blocks 0 and 1.
        let mut tail = tokens.clone();
        tail[9] = 99;
        assert_eq!(pool.lookup(&tail, 8).len(), 2);
        // A partial block never matches; max_blocks caps the hit.
        assert_eq!(pool.lookup(&tokens[..7], 8).len(), 1);
        assert_eq!(pool.lookup(&tokens, 2).len(), 2);
    }

    #[test]
    fn idle_cached_blocks_are_evicted_lru_and_in_use_ones_never() {
        let mut pool = BlockPool::new(SHAPE, 4, true);
        let old: Vec<u32> = (0..8).collect();
        let new: Vec<u32> = (100..108).collect();
        let old_blocks = vec![block(&mut pool, 1.0), block(&mut pool, 2.0)];
        pool.register(&old, &old_blocks);
        let new_blocks = vec![block(&mut pool, 3.0), block(&mut pool, 4.0)];
        pool.register(&new, &new_blocks);
        drop(old_blocks);
        // `new` is still held by a sequence; the pool is full.
        assert_eq!(pool.usage(), PoolUsage { total: 4, live: 4, cached: 4, idle: 2 });
        assert!(pool.has_room(2) && !pool.has_room(3));
        // Eviction takes the old chain's tail first, then its head; then nothing is idle.
        let first = pool.allocate().unwrap();
        assert_eq!(pool.lookup(&old, 8).len(), 1, "the tail of the old chain went first");
        let second = pool.allocate().unwrap();
        assert!(pool.lookup(&old, 8).is_empty());
        assert!(pool.allocate().is_none(), "blocks in use are never evicted");
        assert_eq!(pool.lookup(&new, 8).len(), 2);
        drop((first, second));
        // Once the sequence lets go, its blocks become idle: a lookup refreshes them.
        drop(new_blocks);
        assert_eq!(pool.usage().idle, 2);
    }

    #[test]
    fn recently_used_chains_outlive_older_ones() {
        let mut pool = BlockPool::new(SHAPE, 2, true);
        let a: Vec<u32> = (0..4).collect();
        let b: Vec<u32> = (10..14).collect();
        let blocks = [block(&mut pool, 1.0), block(&mut pool, 2.0)];
        pool.register(&a, &blocks[..1]);
        pool.register(&b, &blocks[1..]);
        drop(blocks);
        assert_eq!(pool.lookup(&a, 1).len(), 1, "a is now the most recently used");
        let _fresh = pool.allocate().unwrap();
        assert_eq!(pool.lookup(&a, 1).len(), 1);
        assert!(pool.lookup(&b, 1).is_empty(), "b was the least recently used");
    }

    #[test]
    fn clearing_the_index_frees_idle_blocks_and_spares_used_ones() {
        let mut pool = BlockPool::new(SHAPE, 4, true);
        let tokens: Vec<u32> = (0..8).collect();
        let blocks = vec![block(&mut pool, 1.0), block(&mut pool, 2.0)];
        pool.register(&tokens, &blocks);
        let held = blocks[0].clone();
        drop(blocks);
        pool.clear_cache();
        assert!(pool.lookup(&tokens, 8).is_empty());
        assert_eq!(pool.usage(), PoolUsage { total: 4, live: 1, cached: 0, idle: 0 });
        assert_eq!(tag(&held), 1.0);
    }

    #[test]
    fn a_pool_without_prefix_cache_never_hits() {
        let mut pool = BlockPool::new(SHAPE, 4, false);
        let tokens: Vec<u32> = (0..8).collect();
        let blocks = vec![block(&mut pool, 1.0), block(&mut pool, 2.0)];
        pool.register(&tokens, &blocks);
        assert!(pool.lookup(&tokens, 8).is_empty());
        drop(blocks);
        assert_eq!(pool.usage().live, 0);
    }
}
