//! The paged KV cache: every layer's K and V live in a pool of fixed-size blocks of token slots,
//! and each sequence owns a block table (its blocks in order). Sequences of any lengths share a
//! step without padding their tokens: the step's tokens are flattened (`[N, hidden]`), their K/V
//! are written to their slots, and attention reads each sequence's context back through its block
//! table.
//!
//! Slot of position `p` of a sequence: `block_table[p / block_size] · block_size + p % block_size`.

use candle_core::{DType, Device, Result, Tensor};

use crate::RotaryEmbedding;

/// One layer's K/V block pool: `num_blocks × block_size` token slots, each holding one K and one V
/// vector of `head_dim` (K after RoPE), shared by every query head.
#[derive(Debug, Clone)]
pub struct PagedKvCache {
    /// `[num_blocks · block_size, head_dim]`.
    k: Tensor,
    v: Tensor,
    block_size: usize,
    num_blocks: usize,
}

impl PagedKvCache {
    /// A zeroed pool on `device`.
    pub fn new(num_blocks: usize, block_size: usize, head_dim: usize, dtype: DType, device: &Device) -> Result<Self> {
        if num_blocks == 0 || block_size == 0 {
            candle_core::bail!("a paged KV cache needs at least one block of at least one slot")
        }
        let slots = num_blocks * block_size;
        Ok(Self {
            k: Tensor::zeros((slots, head_dim), dtype, device)?,
            v: Tensor::zeros((slots, head_dim), dtype, device)?,
            block_size,
            num_blocks,
        })
    }

    /// Bytes one block takes in one layer (K and V).
    pub fn block_bytes(block_size: usize, head_dim: usize, dtype: DType) -> usize {
        2 * block_size * head_dim * dtype.size_in_bytes()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Bytes of K and V storage.
    pub fn allocated_bytes(&self) -> usize {
        [&self.k, &self.v].iter().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
    }

    /// Stores `k`, `v` (`[N, head_dim]`) at the step's slots.
    pub fn write(&self, step: &PagedStep, k: &Tensor, v: &Tensor) -> Result<()> {
        self.k.scatter_set(&step.write_index, &k.contiguous()?, 0)?;
        self.v.scatter_set(&step.write_index, &v.contiguous()?, 0)
    }

    /// The K and V rows at `slots` (`[M]`, u32), `[M, head_dim]` each.
    pub fn gather(&self, slots: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.k.index_select(slots, 0)?, self.v.index_select(slots, 0)?))
    }

    /// The whole pools, `[num_blocks · block_size, head_dim]` each.
    pub fn pools(&self) -> (&Tensor, &Tensor) {
        (&self.k, &self.v)
    }
}

/// One sequence's part in a paged step: its block table, how many of its tokens are already cached
/// (`context_len`), and how many new tokens this step brings (`new_tokens`, at least 1).
#[derive(Debug, Clone, Copy)]
pub struct PagedSequence<'a> {
    pub block_table: &'a [u32],
    pub context_len: usize,
    pub new_tokens: usize,
}

/// Sequences attended together: consecutive rows of the step, `batch` sequences of `q_len` new
/// tokens each, over `s` gathered slots each.
#[derive(Debug, Clone)]
pub struct AttentionGroup {
    /// First token row of the group in the step.
    pub row: usize,
    pub batch: usize,
    pub q_len: usize,
    /// Slots gathered per sequence (the longest context of the group).
    pub s: usize,
    /// `[batch · s]` u32 slot ids (short sequences padded with a slot of their own).
    pub gather: Tensor,
    /// Additive f32 mask `[batch, q_len, 1, s]` (causal, and padding hidden), or `None` when every
    /// new token sees every gathered slot.
    pub mask: Option<Tensor>,
    /// The slots of `gather`, on the host.
    pub slots: Vec<u32>,
    /// Each sequence's context length (cached and new tokens): its first `lens[b]` slots.
    pub lens: Vec<usize>,
}

impl AttentionGroup {
    /// Sequence `b`'s context slots, in order (without the padding).
    pub fn context(&self, b: usize) -> &[u32] {
        &self.slots[b * self.s..b * self.s + self.lens[b]]
    }
}

/// Positions, RoPE angles, slot mapping, gather indices and masks of one paged step, computed once
/// on the host and shared by every layer.
///
/// Rows are the new tokens of the sequences in the order given. Consecutive single-token
/// sequences (decodes) are attended in one batch; each sequence with several new tokens (a prompt
/// chunk) is attended on its own, causally.
#[derive(Debug, Clone)]
pub struct PagedStep {
    /// Total new tokens (rows) of the step.
    pub num_tokens: usize,
    /// `[1, N]` u32 absolute positions.
    pub positions: Tensor,
    /// `[1, N, head_dim/2]` in the activation dtype.
    pub cos: Tensor,
    pub sin: Tensor,
    /// `[N, head_dim]` u32: each row filled with its token's slot (the scatter index).
    write_index: Tensor,
    pub groups: Vec<AttentionGroup>,
}

/// Why a paged step cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PagedError {
    #[error("a paged step needs at least one sequence with at least one new token")]
    Empty,
    #[error("sequence {row} needs {needed} token slots but its block table holds {blocks} blocks of {block_size}")]
    TableTooShort { row: usize, needed: usize, blocks: usize, block_size: usize },
    #[error("sequence {row} names block {block}, but the pool has {num_blocks} blocks")]
    BadBlock { row: usize, block: u32, num_blocks: usize },
    #[error("sequence {row} would reach position {needed}, beyond the model's context of {limit}")]
    PositionLimit { row: usize, needed: usize, limit: usize },
}

impl PagedStep {
    /// The same step with every tensor on `device` (for a rank of a sharded model on another
    /// device); a clone when already there.
    pub fn to_device(&self, device: &candle_core::Device) -> candle_core::Result<Self> {
        if self.cos.device().same_device(device) {
            return Ok(self.clone());
        }
        let groups = self
            .groups
            .iter()
            .map(|g| {
                Ok(AttentionGroup {
                    gather: g.gather.to_device(device)?,
                    mask: g.mask.as_ref().map(|m| m.to_device(device)).transpose()?,
                    ..g.clone()
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            num_tokens: self.num_tokens,
            positions: self.positions.to_device(device)?,
            cos: self.cos.to_device(device)?,
            sin: self.sin.to_device(device)?,
            write_index: self.write_index.to_device(device)?,
            groups,
        })
    }

    /// Builds the step for `seqs` over a pool of `num_blocks` blocks of `block_size` slots.
    /// `max_positions` is the model's context (`max_position_embedding`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        seqs: &[PagedSequence<'_>],
        block_size: usize,
        num_blocks: usize,
        max_positions: usize,
        rope: &RotaryEmbedding,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let err = candle_core::Error::wrap;
        if seqs.is_empty() || seqs.iter().any(|s| s.new_tokens == 0) {
            return Err(err(PagedError::Empty));
        }
        for (row, s) in seqs.iter().enumerate() {
            let needed = s.context_len + s.new_tokens;
            if needed > max_positions {
                return Err(err(PagedError::PositionLimit { row, needed, limit: max_positions }));
            }
            if needed > s.block_table.len() * block_size {
                let blocks = s.block_table.len();
                return Err(err(PagedError::TableTooShort { row, needed, blocks, block_size }));
            }
            if let Some(&block) = s.block_table.iter().find(|&&b| b as usize >= num_blocks) {
                return Err(err(PagedError::BadBlock { row, block, num_blocks }));
            }
        }
        let slot =
            |s: &PagedSequence, p: usize| s.block_table[p / block_size] * block_size as u32 + (p % block_size) as u32;
        let head_dim = rope.head_dim();
        let n: usize = seqs.iter().map(|s| s.new_tokens).sum();
        let mut positions = Vec::with_capacity(n);
        let mut write = Vec::with_capacity(n * head_dim);
        for s in seqs {
            for p in s.context_len..s.context_len + s.new_tokens {
                positions.push(p as u32);
                write.extend(std::iter::repeat_n(slot(s, p), head_dim));
            }
        }
        let positions = Tensor::from_vec(positions, (1, n), device)?;
        let (cos, sin) = rope.cos_sin(&positions, dtype)?;
        let write_index = Tensor::from_vec(write, (n, head_dim), device)?;

        let mut groups = Vec::new();
        let (mut i, mut row) = (0, 0);
        while i < seqs.len() {
            // A run of single-token sequences, or one multi-token sequence.
            let end = if seqs[i].new_tokens == 1 {
                seqs[i..].iter().position(|s| s.new_tokens != 1).map_or(seqs.len(), |k| i + k)
            } else {
                i + 1
            };
            let members = &seqs[i..end];
            let q_len = members[0].new_tokens;
            let lens: Vec<usize> = members.iter().map(|s| s.context_len + s.new_tokens).collect();
            let s_max = lens.iter().copied().max().unwrap_or(0);
            let gather: Vec<u32> = members
                .iter()
                .zip(&lens)
                .flat_map(|(s, &len)| (0..s_max).map(move |p| slot(s, if p < len { p } else { 0 })))
                .collect();
            let needs_mask = q_len > 1 || lens.iter().any(|&l| l != s_max);
            let mask = if needs_mask {
                let mut m = vec![0f32; members.len() * q_len * s_max];
                for (b, (s, &len)) in members.iter().zip(&lens).enumerate() {
                    for j in 0..q_len {
                        let query = s.context_len + j;
                        let row_mask = &mut m[(b * q_len + j) * s_max..(b * q_len + j + 1) * s_max];
                        for (p, v) in row_mask.iter_mut().enumerate() {
                            if p > query || p >= len {
                                *v = f32::NEG_INFINITY;
                            }
                        }
                    }
                }
                Some(Tensor::from_vec(m, (members.len(), q_len, 1, s_max), device)?)
            } else {
                None
            };
            groups.push(AttentionGroup {
                row,
                batch: members.len(),
                q_len,
                s: s_max,
                gather: Tensor::from_vec(gather.clone(), members.len() * s_max, device)?,
                mask,
                slots: gather,
                lens,
            });
            row += members.len() * q_len;
            i = end;
        }
        Ok(Self { num_tokens: n, positions, cos, sin, write_index, groups })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_batch_together_and_prefills_alone() -> Result<()> {
        let dev = Device::Cpu;
        let rope = RotaryEmbedding::new(10_000.0, 4, &dev)?;
        let (t0, t1, t2) = ([3u32], [0u32, 2], [1u32]);
        let seqs = [
            PagedSequence { block_table: &t0, context_len: 2, new_tokens: 1 },
            PagedSequence { block_table: &t1, context_len: 4, new_tokens: 1 },
            PagedSequence { block_table: &t2, context_len: 1, new_tokens: 3 },
        ];
        let step = PagedStep::new(&seqs, 4, 4, 64, &rope, DType::F32, &dev)?;
        assert_eq!(step.num_tokens, 5);
        assert_eq!(step.positions.to_vec2::<u32>()?, vec![vec![2, 4, 1, 2, 3]]);
        assert_eq!(step.groups.len(), 2);
        let (d, p) = (&step.groups[0], &step.groups[1]);
        assert_eq!((d.row, d.batch, d.q_len, d.s), (0, 2, 1, 5));
        // Sequence 0 (3 slots in block 3, padded with its slot 12), sequence 1 (blocks 0 then 2).
        assert_eq!(d.gather.to_vec1::<u32>()?, vec![12, 13, 14, 12, 12, 0, 1, 2, 3, 8]);
        let mask = d.mask.as_ref().unwrap().flatten_all()?.to_vec1::<f32>()?;
        let visible: Vec<bool> = mask.iter().map(|m| *m == 0.0).collect();
        assert_eq!(visible, [true, true, true, false, false, true, true, true, true, true]);
        assert_eq!((p.row, p.batch, p.q_len, p.s), (2, 1, 3, 4));
        let mask = p.mask.as_ref().unwrap().flatten_all()?.to_vec1::<f32>()?;
        let causal: Vec<bool> = mask.iter().map(|m| *m == 0.0).collect();
        assert_eq!(causal, [true, true, false, false, true, true, true, false, true, true, true, true]);
        Ok(())
    }

    #[test]
    fn bad_tables_are_typed_errors() {
        let dev = Device::Cpu;
        let rope = RotaryEmbedding::new(10_000.0, 4, &dev).unwrap();
        let short = [0u32];
        let seq = [PagedSequence { block_table: &short, context_len: 4, new_tokens: 1 }];
        let e = PagedStep::new(&seq, 4, 2, 64, &rope, DType::F32, &dev).unwrap_err().to_string();
        assert!(e.contains("needs 5 token slots"), "{e}");
        let bad = [7u32];
        let seq = [PagedSequence { block_table: &bad, context_len: 0, new_tokens: 1 }];
        let e = PagedStep::new(&seq, 4, 2, 64, &rope, DType::F32, &dev).unwrap_err().to_string();
        assert!(e.contains("names block 7"), "{e}");
        let seq = [PagedSequence { block_table: &short, context_len: 3, new_tokens: 2 }];
        let e = PagedStep::new(&seq, 8, 2, 4, &rope, DType::F32, &dev).unwrap_err().to_string();
        assert!(e.contains("beyond the model's context of 4"), "{e}");
        assert!(PagedStep::new(&[], 4, 2, 64, &rope, DType::F32, &dev).is_err());
    }

    #[test]
    fn writes_land_in_their_slots() -> Result<()> {
        let dev = Device::Cpu;
        let rope = RotaryEmbedding::new(10_000.0, 2, &dev)?;
        let cache = PagedKvCache::new(3, 2, 2, DType::F32, &dev)?;
        let table = [2u32, 0];
        let seq = [PagedSequence { block_table: &table, context_len: 1, new_tokens: 2 }];
        let step = PagedStep::new(&seq, 2, 3, 64, &rope, DType::F32, &dev)?;
        let k = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev)?;
        cache.write(&step, &k, &(&k * 10.)?)?;
        // Positions 1 and 2 → slot 5 (block 2, offset 1) and slot 0 (block 0, offset 0).
        let (kp, vp) = cache.pools();
        let kp = kp.to_vec2::<f32>()?;
        assert_eq!((kp[5].clone(), kp[0].clone()), (vec![1., 2.], vec![3., 4.]));
        assert_eq!(vp.to_vec2::<f32>()?[0], vec![30., 40.]);
        Ok(())
    }
}
