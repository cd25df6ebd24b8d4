//! The continuous-batching scheduler: which tokens of which sequences run in the next step. Pure
//! bookkeeping (token ids, counts, block tables), no tensors: it decides, the engine executes.
//!
//! Every step gets one token budget (`max_batched_tokens`), spent in this order:
//! 1. every running sequence that is decoding (one token each), oldest first;
//! 2. running sequences still in their prompt, a chunk each (at most `prefill_chunk` tokens);
//! 3. waiting sequences, first come first served, while the budget, `max_num_seqs` and free
//!    blocks allow (their prefix-cache hits need no compute).
//!
//! Long prompts are cut into chunks, so decodes never wait behind them. When a running sequence
//! needs a block and none is free, the newest running sequence not yet in the step is preempted:
//! its blocks are freed and it goes back to the front of the queue, to be recomputed later (its
//! full blocks usually survive in the prefix cache).

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;

use crate::blocks::{BlockKey, BlockPool};

/// A sequence's id (the request's).
pub type SeqId = u64;

/// The limits the scheduler works within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_batched_tokens: usize,
    pub prefill_chunk: usize,
    pub block_size: usize,
    /// Most prompt tokens in a step that also runs decodes (`None`: the whole token budget), to
    /// bound the inter-token latency of running sequences while new prompts come in.
    pub max_prefill_while_decoding: Option<usize>,
}

/// A sequence as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct SeqState {
    pub id: SeqId,
    /// Prompt, then generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose K/V are in the cache.
    pub computed: usize,
    /// Block table.
    pub blocks: Vec<u32>,
    /// Chain hashes of the first full blocks (registered in, or found in, the prefix cache).
    hashes: Vec<u64>,
    /// Token ranges filled by non-text content, with a digest of it (images), for prefix keys.
    pub extras: Vec<(Range<usize>, u64)>,
    /// Prompt tokens found in the prefix cache when first admitted.
    pub cached_prompt_tokens: usize,
    /// Whether it has been admitted once (the prefix-cache statistics count the first only).
    admitted: bool,
    pub preemptions: u32,
}

impl SeqState {
    pub fn new(id: SeqId, prompt: Vec<u32>, extras: Vec<(Range<usize>, u64)>) -> Self {
        Self {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            extras,
            cached_prompt_tokens: 0,
            admitted: false,
            preemptions: 0,
        }
    }

    /// The prefix-cache key of full block `i`, chained on the block before it.
    fn key(&self, i: usize, block_size: usize) -> BlockKey {
        let range = i * block_size..(i + 1) * block_size;
        let mut extra = Vec::new();
        for (span, digest) in &self.extras {
            if span.start < range.end && range.start < span.end {
                extra.push(*digest);
                extra.push((range.start.max(span.start) - span.start) as u64);
            }
        }
        let parent = if i == 0 { 0 } else { self.hashes[i - 1] };
        BlockKey::new(parent, &self.tokens[range], extra)
    }
}

/// Tokens of one sequence that run in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    pub id: SeqId,
    /// First token (position) of the piece: everything before it is cached.
    pub start: usize,
    pub len: usize,
    /// The piece ends at the sequence's last token, so a new token is sampled after it.
    pub sample: bool,
}

/// What the next step runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub items: Vec<Scheduled>,
    /// Sequences preempted while planning (they are waiting again).
    pub preempted: Vec<SeqId>,
}

impl Plan {
    pub fn num_tokens(&self) -> usize {
        self.items.iter().map(|s| s.len).sum()
    }
}

/// Waiting and running sequences and the block pool they share.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    pool: BlockPool,
    seqs: HashMap<SeqId, SeqState>,
    waiting: VecDeque<SeqId>,
    /// Oldest first.
    running: Vec<SeqId>,
    /// Preemptions since the start.
    preemptions: u64,
    /// Prompt tokens looked up in, and found in, the prefix cache since the start.
    prefix_queries: u64,
    prefix_hits: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, pool: BlockPool) -> Self {
        Self {
            cfg,
            pool,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
            prefix_queries: 0,
            prefix_hits: 0,
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.cfg.block_size)
    }

    pub fn get(&self, id: SeqId) -> Option<&SeqState> {
        self.seqs.get(&id)
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Prompt tokens looked up in the prefix cache and found there, since the start.
    pub fn prefix_cache_counts(&self) -> (u64, u64) {
        (self.prefix_queries, self.prefix_hits)
    }

    /// Queues a new sequence (last).
    pub fn add(&mut self, seq: SeqState) {
        self.waiting.push_back(seq.id);
        self.seqs.insert(seq.id, seq);
    }

    /// Forgets a sequence (finished, failed or cancelled) and frees its blocks.
    pub fn remove(&mut self, id: SeqId) -> Option<SeqState> {
        let seq = self.seqs.remove(&id)?;
        self.pool.release(&seq.blocks);
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
        Some(seq)
    }

    fn preempt(&mut self, id: SeqId) {
        let Some(seq) = self.seqs.get_mut(&id) else { return };
        self.pool.release(&seq.blocks);
        seq.blocks.clear();
        seq.hashes.clear();
        seq.computed = 0;
        seq.preemptions += 1;
        self.preemptions += 1;
        self.running.retain(|&r| r != id);
        self.waiting.push_front(id);
    }

    /// Frees blocks until `need` are free, preempting the newest running sequences that are not in
    /// `planned` and are not `keep`. False when that cannot free enough.
    fn make_room(&mut self, need: usize, keep: SeqId, planned: &HashSet<SeqId>, plan: &mut Plan) -> bool {
        while self.pool.num_free() < need {
            let victim = self.running.iter().rev().copied().find(|&r| r != keep && !planned.contains(&r));
            match victim {
                Some(v) => {
                    self.preempt(v);
                    plan.preempted.push(v);
                }
                None => return false,
            }
        }
        true
    }

    /// Gives `id` the blocks for `upto` tokens (the pool must have them free).
    fn grow(&mut self, id: SeqId, upto: usize) {
        let need = self.blocks_for(upto);
        let Some(seq) = self.seqs.get_mut(&id) else { return };
        while seq.blocks.len() < need {
            match self.pool.allocate() {
                Some(b) => seq.blocks.push(b),
                None => break,
            }
        }
    }

    fn missing_blocks(&self, id: SeqId, upto: usize) -> usize {
        let have = self.seqs.get(&id).map_or(0, |s| s.blocks.len());
        self.blocks_for(upto).saturating_sub(have)
    }

    /// Decides the next step.
    pub fn schedule(&mut self) -> Plan {
        let mut plan = Plan::default();
        let mut budget = self.cfg.max_batched_tokens;
        let mut planned = HashSet::new();

        // 1. Decodes, oldest first.
        let decoding: Vec<SeqId> = self
            .running
            .iter()
            .copied()
            .filter(|id| self.seqs.get(id).is_some_and(|s| s.tokens.len() - s.computed == 1))
            .collect();
        for id in decoding {
            if budget == 0 {
                break;
            }
            if !self.running.contains(&id) {
                continue; // preempted for an older sequence
            }
            let start = self.seqs[&id].computed;
            let need = self.missing_blocks(id, start + 1);
            if !self.make_room(need, id, &planned, &mut plan) {
                self.preempt(id);
                plan.preempted.push(id);
                continue;
            }
            self.grow(id, start + 1);
            plan.items.push(Scheduled { id, start, len: 1, sample: true });
            planned.insert(id);
            budget -= 1;
        }

        // While sequences decode, prompts get at most their own share of the step.
        if !plan.items.is_empty() {
            if let Some(cap) = self.cfg.max_prefill_while_decoding {
                budget = budget.min(cap);
            }
        }

        // 2. Prompts being prefilled, a chunk each.
        let prefilling: Vec<SeqId> = self
            .running
            .iter()
            .copied()
            .filter(|id| self.seqs.get(id).is_some_and(|s| s.tokens.len() - s.computed > 1))
            .collect();
        for id in prefilling {
            if budget == 0 {
                break;
            }
            if !self.running.contains(&id) {
                continue;
            }
            let s = &self.seqs[&id];
            let (start, remaining) = (s.computed, s.tokens.len() - s.computed);
            let len = remaining.min(budget).min(self.cfg.prefill_chunk);
            let need = self.missing_blocks(id, start + len);
            if !self.make_room(need, id, &planned, &mut plan) {
                continue; // waits for blocks
            }
            self.grow(id, start + len);
            plan.items.push(Scheduled { id, start, len, sample: len == remaining });
            planned.insert(id);
            budget -= len;
        }

        // 3. Admissions, first come first served (none in a step that had to preempt).
        while budget > 0 && plan.preempted.is_empty() && self.running.len() < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else { break };
            let hits = self.lookup_prefix(id);
            let s = &self.seqs[&id];
            let (start, remaining) = (s.computed, s.tokens.len() - s.computed);
            let len = remaining.min(budget).min(self.cfg.prefill_chunk);
            if self.pool.num_free() < self.missing_blocks(id, start + len) {
                self.forget_prefix(id, hits);
                break;
            }
            self.waiting.pop_front();
            if let Some(seq) = self.seqs.get_mut(&id).filter(|s| !s.admitted) {
                seq.admitted = true;
                seq.cached_prompt_tokens = start.min(seq.prompt_len);
                self.prefix_queries += seq.prompt_len as u64;
                self.prefix_hits += seq.cached_prompt_tokens as u64;
            }
            self.grow(id, start + len);
            self.running.push(id);
            plan.items.push(Scheduled { id, start, len, sample: len == remaining });
            planned.insert(id);
            budget -= len;
        }
        plan
    }

    /// Finds the longest cached prefix of a waiting sequence (never its last token: that one is
    /// computed to produce logits). Returns how many blocks were found.
    fn lookup_prefix(&mut self, id: SeqId) -> usize {
        let bs = self.cfg.block_size;
        let Some(seq) = self.seqs.get_mut(&id) else { return 0 };
        debug_assert!(seq.blocks.is_empty() && seq.computed == 0);
        seq.hashes.clear();
        let full = (seq.tokens.len() - 1) / bs;
        for i in 0..full {
            let key = seq.key(i, bs);
            match self.pool.lookup(&key) {
                Some(block) => {
                    seq.blocks.push(block);
                    seq.hashes.push(key.hash);
                }
                None => break,
            }
        }
        seq.computed = seq.blocks.len() * bs;
        seq.blocks.len()
    }

    /// Undoes [`Self::lookup_prefix`] for a sequence that could not be admitted.
    fn forget_prefix(&mut self, id: SeqId, hits: usize) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            debug_assert_eq!(seq.blocks.len(), hits);
            self.pool.release(&seq.blocks);
            seq.blocks.clear();
            seq.hashes.clear();
            seq.computed = 0;
        }
    }

    /// Records that `plan` ran: the scheduled tokens are cached, `sampled` tokens are appended,
    /// and newly full blocks enter the prefix cache.
    pub fn complete(&mut self, plan: &Plan, sampled: &[(SeqId, u32)]) {
        let bs = self.cfg.block_size;
        for item in &plan.items {
            let Some(seq) = self.seqs.get_mut(&item.id) else { continue };
            seq.computed = item.start + item.len;
            let full = seq.computed / bs;
            while seq.hashes.len() < full {
                let i = seq.hashes.len();
                let key = seq.key(i, bs);
                seq.hashes.push(key.hash);
                self.pool.register(seq.blocks[i], key);
            }
        }
        for &(id, token) in sampled {
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.tokens.push(token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(blocks: usize, max_seqs: usize, budget: usize, chunk: usize) -> Scheduler {
        let cfg = SchedulerConfig {
            max_num_seqs: max_seqs,
            max_batched_tokens: budget,
            prefill_chunk: chunk,
            block_size: 4,
            max_prefill_while_decoding: None,
        };
        Scheduler::new(cfg, BlockPool::new(blocks, true))
    }

    /// Runs a step, sampling token 7 for every sampled piece.
    fn step(s: &mut Scheduler) -> Plan {
        let plan = s.schedule();
        let sampled: Vec<(SeqId, u32)> = plan.items.iter().filter(|i| i.sample).map(|i| (i.id, 7)).collect();
        s.complete(&plan, &sampled);
        plan
    }

    #[test]
    fn prompts_are_chunked_and_decodes_come_first() {
        let mut s = sched(16, 8, 8, 6);
        s.add(SeqState::new(1, (0..10).collect(), vec![]));
        let p = step(&mut s);
        assert_eq!(p.items, vec![Scheduled { id: 1, start: 0, len: 6, sample: false }]);
        s.add(SeqState::new(2, (0..3).collect(), vec![]));
        let p = step(&mut s);
        // The rest of prompt 1 (4 tokens, sampled), then prompt 2 fits the remaining budget of 4.
        assert_eq!(
            p.items,
            vec![
                Scheduled { id: 1, start: 6, len: 4, sample: true },
                Scheduled { id: 2, start: 0, len: 3, sample: true }
            ]
        );
        s.add(SeqState::new(3, (100..120).collect(), vec![]));
        let p = step(&mut s);
        // Both decodes first, then a chunk of the new prompt within the budget.
        assert_eq!(
            p.items[..2],
            [Scheduled { id: 1, start: 10, len: 1, sample: true }, Scheduled { id: 2, start: 3, len: 1, sample: true }]
        );
        assert_eq!(p.items[2], Scheduled { id: 3, start: 0, len: 6, sample: false });
        assert_eq!(s.get(1).unwrap().tokens.len(), 12);
    }

    #[test]
    fn preemption_frees_the_newest_and_recomputes_it() {
        // 4 blocks of 4 slots.
        let mut s = sched(4, 8, 64, 64);
        s.add(SeqState::new(1, (0..7).collect(), vec![]));
        s.add(SeqState::new(2, (10..17).collect(), vec![]));
        step(&mut s); // both prefilled: 2 blocks each, a token each
        assert_eq!(s.pool().num_free(), 0);
        // Both decode at position 7 (still in their second block).
        step(&mut s);
        // Position 8 needs a third block for each: sequence 2 (newest) is preempted.
        let p = step(&mut s);
        assert_eq!(p.preempted, vec![2]);
        assert_eq!(p.items, vec![Scheduled { id: 1, start: 8, len: 1, sample: true }]);
        assert_eq!((s.num_running(), s.num_waiting()), (1, 1));
        let two = s.get(2).unwrap();
        assert_eq!((two.computed, two.blocks.len(), two.tokens.len()), (0, 0, 9));
        // Once 1 finishes, 2 comes back and recomputes its 9 tokens (the first block from the
        // prefix cache: its tail block was freed first and so reused first, for sequence 1).
        s.remove(1);
        let p = step(&mut s);
        let item = p.items[0];
        assert_eq!((item.id, item.start, item.len, item.sample), (2, 4, 5, true));
        s.remove(2);
        assert!(s.pool().all_free());
    }

    #[test]
    fn shared_prefixes_are_reused() {
        let mut s = sched(8, 8, 64, 64);
        let prompt: Vec<u32> = (0..10).collect();
        s.add(SeqState::new(1, prompt.clone(), vec![]));
        step(&mut s);
        s.add(SeqState::new(2, prompt.clone(), vec![]));
        let p = step(&mut s);
        // Blocks 0 and 1 (8 tokens) come from the cache; the last 2 prompt tokens are computed.
        assert!(p.items.contains(&Scheduled { id: 2, start: 8, len: 2, sample: true }));
        assert_eq!(s.get(2).unwrap().cached_prompt_tokens, 8);
        assert_eq!(s.get(1).unwrap().blocks[..2], s.get(2).unwrap().blocks[..2]);
        // An image at the same positions with other content is not the same prefix.
        let mut s2 = sched(8, 8, 64, 64);
        s2.add(SeqState::new(1, prompt.clone(), vec![(2..6, 11)]));
        step(&mut s2);
        s2.add(SeqState::new(2, prompt.clone(), vec![(2..6, 12)]));
        step(&mut s2);
        assert_eq!(s2.get(2).unwrap().cached_prompt_tokens, 0);
        s2.add(SeqState::new(3, prompt, vec![(2..6, 11)]));
        step(&mut s2);
        assert_eq!(s2.get(3).unwrap().cached_prompt_tokens, 8);
        for id in [1, 2, 3] {
            s2.remove(id);
        }
        assert!(s2.pool().all_free());
        assert_eq!(s2.prefix_cache_counts(), (30, 8));
    }

    #[test]
    fn prompts_get_a_bounded_share_while_others_decode() {
        let mut s = sched(32, 8, 64, 64);
        s.cfg.max_prefill_while_decoding = Some(5);
        s.add(SeqState::new(1, (0..10).collect(), vec![]));
        assert_eq!(step(&mut s).num_tokens(), 10); // nothing decodes yet: the whole prompt
        s.add(SeqState::new(2, (100..140).collect(), vec![]));
        let p = step(&mut s);
        assert_eq!(
            p.items,
            vec![
                Scheduled { id: 1, start: 10, len: 1, sample: true },
                Scheduled { id: 2, start: 0, len: 5, sample: false }
            ]
        );
    }

    #[test]
    fn admission_respects_max_num_seqs_and_free_blocks() {
        let mut s = sched(3, 1, 64, 64);
        s.add(SeqState::new(1, vec![1, 2], vec![]));
        s.add(SeqState::new(2, vec![3, 4], vec![]));
        let p = step(&mut s);
        assert_eq!(p.items.len(), 1);
        assert_eq!((s.num_running(), s.num_waiting()), (1, 1));
        // A prompt needing more blocks than are free waits (first come, first served).
        let mut s = sched(2, 8, 64, 64);
        s.add(SeqState::new(1, (0..6).collect(), vec![]));
        s.add(SeqState::new(2, (0..12).collect(), vec![]));
        s.add(SeqState::new(3, vec![1], vec![]));
        let p = step(&mut s);
        assert_eq!(p.items.iter().map(|i| i.id).collect::<Vec<_>>(), vec![1]);
        assert_eq!(s.num_waiting(), 2);
    }
}
