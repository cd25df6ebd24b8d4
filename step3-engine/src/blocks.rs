//! The KV block allocator: a free list, reference counts, and the prefix cache (full blocks keyed
//! by a hash of every token up to their end, reused copy-free by later requests).

use std::collections::{BTreeSet, HashMap};

/// What a full block holds, for the prefix cache: the hash of the chain up to and including it,
/// and (to rule out hash collisions) its parent's hash, its tokens and their extra keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub hash: u64,
    pub parent: u64,
    pub tokens: Vec<u32>,
    /// Keys of non-text content in the block (image digests and offsets).
    pub extra: Vec<u64>,
}

impl BlockKey {
    /// The key of a block with `tokens` and `extra` after a chain ending in `parent`.
    pub fn new(parent: u64, tokens: &[u32], extra: Vec<u64>) -> Self {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (parent, tokens, &extra).hash(&mut h);
        Self { hash: h.finish(), parent, tokens: tokens.to_vec(), extra }
    }
}

/// The pool's blocks: which are free, who holds each one, and which hold cached prefixes.
#[derive(Debug)]
pub struct BlockPool {
    refs: Vec<u32>,
    keys: Vec<Option<BlockKey>>,
    /// Free blocks (reference count 0) by the tick they were freed: the oldest is reused first.
    free: BTreeSet<(u64, u32)>,
    freed_at: Vec<u64>,
    tick: u64,
    cached: HashMap<u64, u32>,
    caching: bool,
}

impl BlockPool {
    /// `num_blocks` free blocks; `caching` turns the prefix cache on.
    pub fn new(num_blocks: usize, caching: bool) -> Self {
        Self {
            refs: vec![0; num_blocks],
            keys: vec![None; num_blocks],
            free: (0..num_blocks as u32).map(|b| (b as u64, b)).collect(),
            freed_at: (0..num_blocks as u64).collect(),
            tick: num_blocks as u64,
            cached: HashMap::new(),
            caching,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks no sequence holds (cached prefixes among them stay reusable until taken).
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn caching(&self) -> bool {
        self.caching
    }

    /// Takes the least recently freed block (dropping its cached prefix, if any).
    pub fn allocate(&mut self) -> Option<u32> {
        let (_, block) = self.free.pop_first()?;
        if let Some(key) = self.keys[block as usize].take() {
            if self.cached.get(&key.hash) == Some(&block) {
                self.cached.remove(&key.hash);
            }
        }
        self.refs[block as usize] = 1;
        Some(block)
    }

    /// Gives back one reference to each block, the last ones first (so a sequence's tail is
    /// reused before its prefix, which other requests are likelier to share).
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            let r = &mut self.refs[b as usize];
            debug_assert!(*r > 0, "block {b} released more often than held");
            *r = r.saturating_sub(1);
            if *r == 0 {
                self.tick += 1;
                self.freed_at[b as usize] = self.tick;
                self.free.insert((self.tick, b));
            }
        }
    }

    /// A cached block holding exactly `key`, now referenced once more.
    pub fn lookup(&mut self, key: &BlockKey) -> Option<u32> {
        if !self.caching {
            return None;
        }
        let &block = self.cached.get(&key.hash)?;
        if self.keys[block as usize].as_ref() != Some(key) {
            return None;
        }
        if self.refs[block as usize] == 0 {
            self.free.remove(&(self.freed_at[block as usize], block));
        }
        self.refs[block as usize] += 1;
        Some(block)
    }

    /// Records that `block` (held, full) holds `key`, so later requests can reuse it.
    pub fn register(&mut self, block: u32, key: BlockKey) {
        if !self.caching || self.keys[block as usize].is_some() {
            return;
        }
        self.cached.entry(key.hash).or_insert(block);
        self.keys[block as usize] = Some(key);
    }

    /// Whether every block is free.
    pub fn all_free(&self) -> bool {
        self.free.len() == self.refs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_release_and_reuse_order() {
        let mut pool = BlockPool::new(3, true);
        let (a, b) = (pool.allocate().unwrap(), pool.allocate().unwrap());
        assert_eq!((a, b, pool.num_free()), (0, 1, 1));
        pool.release(&[a, b]);
        // The tail (b) was freed first, so it is reused before a; block 2 was free longest.
        assert_eq!(pool.allocate(), Some(2));
        assert_eq!(pool.allocate(), Some(b));
        assert_eq!(pool.allocate(), Some(a));
        assert_eq!(pool.allocate(), None);
        pool.release(&[0, 1, 2]);
        assert!(pool.all_free());
    }

    #[test]
    fn cached_blocks_are_shared_until_evicted() {
        let mut pool = BlockPool::new(2, true);
        let key = BlockKey::new(0, &[1, 2, 3, 4], vec![]);
        let a = pool.allocate().unwrap();
        pool.register(a, key.clone());
        // Held and cached: a second request shares it.
        assert_eq!(pool.lookup(&key), Some(a));
        pool.release(&[a]);
        pool.release(&[a]);
        assert!(pool.all_free());
        // Free but still cached: found again, and taken off the free list.
        assert_eq!(pool.lookup(&key), Some(a));
        assert_eq!(pool.num_free(), 1);
        pool.release(&[a]);
        // Evicted when its block is allocated for something else.
        let _ = pool.allocate();
        let _ = pool.allocate();
        assert_eq!(pool.lookup(&key), None);
        // Same hash, different content: never a hit.
        let mut pool = BlockPool::new(1, true);
        let b = pool.allocate().unwrap();
        pool.register(b, key.clone());
        let forged = BlockKey { tokens: vec![9, 9, 9, 9], ..key };
        assert_eq!(pool.lookup(&forged), None);
        // Without caching nothing is found.
        let mut off = BlockPool::new(1, false);
        let c = off.allocate().unwrap();
        off.register(c, BlockKey::new(0, &[1], vec![]));
        assert_eq!(off.lookup(&BlockKey::new(0, &[1], vec![])), None);
    }
}
