use candle_core::{DType, Device, Result, Tensor};

use crate::RotaryEmbedding;

/// Why a step cannot be added to a KV cache.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    #[error(
        "sequence {row} would reach {needed} tokens, more than the model's context of \
         {limit} (max_position_embedding)"
    )]
    PositionLimit { row: usize, needed: usize, limit: usize },
    #[error(
        "the KV cache holds {capacity} token slots and this step needs {needed}; create the \
         cache with a larger capacity (at most {limit}, the model's max_position_embedding)"
    )]
    CacheFull { needed: usize, capacity: usize, limit: usize },
    #[error("a KV cache capacity of {capacity} exceeds the model's context of {limit} (max_position_embedding)")]
    CapacityTooLarge { capacity: usize, limit: usize },
    #[error("the batch has {got} sequences but the cache was created for {expected}")]
    BatchMismatch { got: usize, expected: usize },
    #[error("sequence {row} has {len} new tokens, more than the {columns} columns of the step")]
    LengthExceedsStep { row: usize, len: usize, columns: usize },
}

/// The KV cache of one MFA layer: one K and one V vector of `head_dim` per token, shared by all
/// query heads, stored `[B, capacity, head_dim]` (K after RoPE).
///
/// The storage is allocated once, on the first append, for the full capacity: no reallocation or
/// copying while decoding. Appending beyond the capacity is an error (see [`SequenceTable`] for
/// the checks made before a step runs).
#[derive(Debug, Clone)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    pub fn new(capacity: usize) -> Self {
        Self { k: None, v: None, len: 0, capacity }
    }

    /// Number of token slots filled.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes currently allocated for K and V.
    pub fn allocated_bytes(&self) -> usize {
        [&self.k, &self.v].iter().flat_map(|t| t.as_ref()).map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
    }

    /// Appends `k`, `v` (`[B, T, head_dim]`) and returns views of everything cached so far,
    /// `[B, len, head_dim]` each.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t, d) = k.dims3()?;
        if v.dims3()? != (b, t, d) {
            candle_core::bail!("kv-cache: K {:?} and V {:?} differ in shape", k.shape(), v.shape())
        }
        if self.len + t > self.capacity {
            return Err(candle_core::Error::wrap(CacheError::CacheFull {
                needed: self.len + t,
                capacity: self.capacity,
                limit: self.capacity,
            }));
        }
        let alloc = |x: &Tensor| Tensor::zeros((b, self.capacity, d), x.dtype(), x.device());
        if self.k.is_none() {
            self.k = Some(alloc(k)?);
            self.v = Some(alloc(v)?);
        }
        let (kc, vc) = match (&self.k, &self.v) {
            (Some(kc), Some(vc)) => (kc, vc),
            _ => candle_core::bail!("kv-cache: storage missing"),
        };
        if kc.dims3()?.0 != b || kc.dims3()?.2 != d {
            candle_core::bail!("kv-cache: step shape {:?} does not match cache {:?}", k.shape(), kc.shape())
        }
        kc.slice_set(&k.contiguous()?, 1, self.len)?;
        vc.slice_set(&v.contiguous()?, 1, self.len)?;
        self.len += t;
        Ok((kc.narrow(1, 0, self.len)?, vc.narrow(1, 0, self.len)?))
    }

    /// One-token decode attention straight from this cache (see [`crate::decode`]): `q [B, n, d]`,
    /// each sequence's context its first `len` slots. `None` when that path does not apply.
    pub(crate) fn decode_attention(&self, q: &Tensor, scale: f64) -> Result<Option<Tensor>> {
        let (Some(k), Some(v)) = (&self.k, &self.v) else {
            return Ok(None);
        };
        let (b, cap, d) = k.dims3()?;
        if self.len == 0 || b * cap > u32::MAX as usize {
            return Ok(None);
        }
        let slots: Vec<u32> = (0..b).flat_map(|i| (0..self.len).map(move |p| (i * cap + p) as u32)).collect();
        let contexts: Vec<&[u32]> = slots.chunks(self.len).collect();
        let (k, v) = (k.reshape((b * cap, d))?, v.reshape((b * cap, d))?);
        crate::decode::decode_attention(q, &k, &v, &contexts, scale)
    }

    /// Forgets every token (keeps the allocation).
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Forgets the tokens after the first `len` (used to roll back a step that failed).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

/// Positions, RoPE angles and the attention mask of one forward step, computed once and shared by
/// every layer.
#[derive(Debug, Clone)]
pub struct AttentionStep {
    /// `[B, T]` u32: the absolute position of each new token in its own sequence.
    pub positions: Tensor,
    /// `[B, T, head_dim/2]` in the activation dtype.
    pub cos: Tensor,
    /// `[B, T, head_dim/2]` in the activation dtype.
    pub sin: Tensor,
    /// Additive f32 mask `[B or 1, T, 1, S]` over the `S` cached slots (0 or -inf), or `None` when
    /// every new token may see every cached slot (a single-token step of equal-length sequences).
    pub mask: Option<Tensor>,
}

#[derive(Debug, Clone)]
struct Row {
    /// Tokens of this sequence seen so far: the position of its next token.
    next_position: usize,
    /// Per cache slot: does it hold a real token of this sequence (not padding)?
    valid: Vec<bool>,
}

/// Bookkeeping shared by the KV caches of all layers: which cache slots hold real tokens of which
/// sequence, and where each sequence's next token sits.
///
/// Sequences of different lengths share a batch by right-padding each step to `T` columns: for a
/// step, `lens[i] <= T` tokens of sequence `i` are real, the rest are padding that no later token
/// attends to. Every layer's [`KvCache`] holds the same slots, so this table is kept once.
#[derive(Debug, Clone)]
pub struct SequenceTable {
    rows: Vec<Row>,
    slots: usize,
    capacity: usize,
    max_positions: usize,
    ragged: bool,
}

impl SequenceTable {
    /// A table for `batch` sequences and a cache of `capacity` token slots. `max_positions` is the
    /// model's context (`max_position_embedding`); the capacity may not exceed it.
    pub fn new(batch: usize, capacity: usize, max_positions: usize) -> std::result::Result<Self, CacheError> {
        if capacity > max_positions {
            return Err(CacheError::CapacityTooLarge { capacity, limit: max_positions });
        }
        let rows = vec![Row { next_position: 0, valid: Vec::new() }; batch];
        Ok(Self { rows, slots: 0, capacity, max_positions, ragged: false })
    }

    pub fn batch_size(&self) -> usize {
        self.rows.len()
    }

    /// Cache slots used so far (the same for every sequence of the batch).
    pub fn slots(&self) -> usize {
        self.slots
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Real tokens of each sequence so far.
    pub fn lengths(&self) -> Vec<usize> {
        self.rows.iter().map(|r| r.next_position).collect()
    }

    /// Checks that a step of `t` columns with `lens[i]` real tokens per sequence fits.
    pub fn check(&self, lens: &[usize], t: usize) -> std::result::Result<(), CacheError> {
        if lens.len() != self.rows.len() {
            return Err(CacheError::BatchMismatch { got: lens.len(), expected: self.rows.len() });
        }
        for (row, (&len, state)) in lens.iter().zip(&self.rows).enumerate() {
            if len > t {
                return Err(CacheError::LengthExceedsStep { row, len, columns: t });
            }
            let needed = state.next_position + len;
            if needed > self.max_positions {
                return Err(CacheError::PositionLimit { row, needed, limit: self.max_positions });
            }
        }
        if self.slots + t > self.capacity {
            return Err(CacheError::CacheFull {
                needed: self.slots + t,
                capacity: self.capacity,
                limit: self.max_positions,
            });
        }
        Ok(())
    }

    /// Positions, RoPE angles and mask for a step of `t` columns with `lens[i]` real tokens in
    /// row `i`. Host-side bookkeeping only; the tensors are uploaded once per step.
    pub fn step(
        &self,
        lens: &[usize],
        t: usize,
        rope: &RotaryEmbedding,
        dtype: DType,
        device: &Device,
    ) -> Result<AttentionStep> {
        self.check(lens, t).map_err(candle_core::Error::wrap)?;
        let b = self.rows.len();
        let positions: Vec<u32> =
            self.rows.iter().flat_map(|r| (0..t).map(move |j| (r.next_position + j) as u32)).collect();
        let positions = Tensor::from_vec(positions, (b, t), device)?;
        let (cos, sin) = rope.cos_sin(&positions, dtype)?;
        let mask = self.mask(lens, t, device)?;
        Ok(AttentionStep { positions, cos, sin, mask })
    }

    fn mask(&self, lens: &[usize], t: usize, device: &Device) -> Result<Option<Tensor>> {
        let c0 = self.slots;
        let s = c0 + t;
        let uniform = !self.ragged && lens.iter().all(|&l| l == t);
        if uniform && t == 1 {
            return Ok(None);
        }
        let rows = if uniform { 1 } else { self.rows.len() };
        let mut mask = vec![0f32; rows * t * s];
        for (i, chunk) in mask.chunks_mut(t * s).enumerate() {
            for j in 0..t {
                let query = c0 + j;
                for (c, m) in chunk[j * s..(j + 1) * s].iter_mut().enumerate() {
                    let visible = if uniform {
                        c <= query
                    } else {
                        let valid = if c < c0 { self.rows[i].valid[c] } else { c - c0 < lens[i] };
                        // A padding query always sees itself, so no softmax row is empty.
                        c <= query && (valid || c == query)
                    };
                    if !visible {
                        *m = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Ok(Some(Tensor::from_vec(mask, (rows, t, 1, s), device)?))
    }

    /// Records that a step checked by [`Self::check`] ran.
    pub fn advance(&mut self, lens: &[usize], t: usize) {
        for (row, &len) in self.rows.iter_mut().zip(lens) {
            row.valid.extend((0..t).map(|j| j < len));
            row.next_position += len;
            if len != t {
                self.ragged = true;
            }
        }
        self.slots += t;
    }

    /// Forgets every sequence.
    pub fn reset(&mut self) {
        for row in &mut self.rows {
            row.next_position = 0;
            row.valid.clear();
        }
        self.slots = 0;
        self.ragged = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_values(step: &AttentionStep) -> Vec<Vec<bool>> {
        let m = step.mask.as_ref().unwrap();
        let (r, t, _, s) = m.dims4().unwrap();
        let v = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (0..r * t).map(|q| v[q * s..(q + 1) * s].iter().map(|x| *x == 0.0).collect()).collect()
    }

    #[test]
    fn uniform_prefill_is_causal_and_decode_needs_no_mask() -> Result<()> {
        let dev = Device::Cpu;
        let rope = RotaryEmbedding::new(10_000.0, 4, &dev)?;
        let mut table = SequenceTable::new(2, 8, 16).unwrap();
        let step = table.step(&[3, 3], 3, &rope, DType::F32, &dev)?;
        assert_eq!(mask_values(&step), vec![vec![true, false, false], vec![true, true, false], vec![true, true, true]]);
        table.advance(&[3, 3], 3);
        let step = table.step(&[1, 1], 1, &rope, DType::F32, &dev)?;
        assert!(step.mask.is_none());
        assert_eq!(step.positions.to_vec2::<u32>()?, vec![vec![3], vec![3]]);
        Ok(())
    }

    #[test]
    fn ragged_rows_hide_their_padding() -> Result<()> {
        let dev = Device::Cpu;
        let rope = RotaryEmbedding::new(10_000.0, 4, &dev)?;
        let mut table = SequenceTable::new(2, 8, 16).unwrap();
        table.advance(&[3, 1], 3);
        let step = table.step(&[1, 1], 1, &rope, DType::F32, &dev)?;
        assert_eq!(step.positions.to_vec2::<u32>()?, vec![vec![3], vec![1]]);
        let m = mask_values(&step);
        assert_eq!(m[0], vec![true, true, true, true]);
        assert_eq!(m[1], vec![true, false, false, true]);
        Ok(())
    }

    #[test]
    fn limits_are_typed_errors() {
        assert_eq!(
            SequenceTable::new(1, 32, 16).unwrap_err(),
            CacheError::CapacityTooLarge { capacity: 32, limit: 16 }
        );
        let mut table = SequenceTable::new(1, 8, 8).unwrap();
        assert!(matches!(table.check(&[9], 9), Err(CacheError::PositionLimit { needed: 9, .. })));
        table.advance(&[6], 6);
        assert!(matches!(table.check(&[3], 3), Err(CacheError::PositionLimit { .. })));
        assert!(matches!(table.check(&[1, 1], 1), Err(CacheError::BatchMismatch { .. })));
        let mut small = SequenceTable::new(1, 4, 8).unwrap();
        small.advance(&[4], 4);
        assert!(matches!(small.check(&[1], 1), Err(CacheError::CacheFull { needed: 5, capacity: 4, .. })));
    }

    #[test]
    fn kv_cache_refuses_to_overflow() -> Result<()> {
        let dev = Device::Cpu;
        let mut cache = KvCache::new(3);
        let kv = Tensor::ones((1, 2, 4), DType::F32, &dev)?;
        let (k, _) = cache.append(&kv, &kv)?;
        assert_eq!(k.dims(), &[1, 2, 4]);
        assert!(cache.append(&kv, &kv).is_err());
        assert_eq!(cache.allocated_bytes(), 2 * 3 * 4 * 4);
        Ok(())
    }
}
