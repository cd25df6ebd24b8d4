//! Decode attention on the CPU in one pass over each context.
//!
//! For one new token per sequence, `softmax(q·kᵀ·scale)·v` is computed straight from the K/V
//! pools (paged or contiguous), a chunk of context tokens at a time: the chunk's K rows are
//! widened to f32 once and every query head of the sequence is scored against them (the skinny
//! product kernels of `step3_nn::cpu`), then, after the softmax, the chunk's V rows are widened
//! once and summed into every head with its probabilities. Nothing of the context is gathered,
//! copied per head or cast as a whole, and each sequence's result depends on its own context only.
//!
//! The arithmetic is the reference's (see [`crate::attention`]'s `attend`): q and k each
//! multiplied by `sqrt(scale)` in f32, scores, softmax (max, exponentials, their sum, one
//! division) and the product with v in f32, rounded to the activation dtype once.

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use step3_nn::cpu::{self, WeightSlice};

/// Context tokens widened at a time.
const CHUNK: usize = 64;

/// A K or V pool's rows `[slots, d]`, borrowed from its CPU storage.
#[derive(Clone, Copy)]
enum Rows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
    F16(&'a [half::f16]),
}

impl Rows<'_> {
    fn slots(&self, d: usize) -> usize {
        match self {
            Rows::F32(r) => r.len() / d,
            Rows::Bf16(r) => r.len() / d,
            Rows::F16(r) => r.len() / d,
        }
    }

    /// Row `slot` in f32 into `dst` (`d` values), each value times `mul` unless it is 1.
    fn widen(&self, slot: usize, dst: &mut [f32], mul: f32) {
        let d = dst.len();
        match self {
            Rows::F32(r) => dst.copy_from_slice(&r[slot * d..][..d]),
            Rows::Bf16(r) => r[slot * d..][..d].convert_to_f32_slice(dst),
            Rows::F16(r) => r[slot * d..][..d].convert_to_f32_slice(dst),
        }
        if mul != 1.0 {
            dst.iter_mut().for_each(|v| *v *= mul);
        }
    }
}

/// `softmax(q·kᵀ·scale)·v` for one new token per sequence, on the CPU, straight from the pools.
///
/// `q: [B, n, d]`; `k_pool`, `v_pool`: `[slots, d]` (contiguous, f32/bf16/f16); `contexts[b]`:
/// the slots of sequence `b`'s context in order (its new token's included). Returns `[B, n, d]` in
/// `q`'s dtype, or `None` when this path does not apply (not on the CPU, the CPU kernels turned off
/// with `STEP3_CPU_KERNEL=off`, a storage it cannot read in place): the caller then takes the
/// general path.
pub(crate) fn decode_attention(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    contexts: &[&[u32]],
    scale: f64,
) -> Result<Option<Tensor>> {
    if !q.device().is_cpu() || !cpu::enabled() {
        return Ok(None);
    }
    let (b, n, d) = q.dims3()?;
    if b == 0 || n == 0 {
        return Ok(Some(q.clone()));
    }
    if contexts.len() != b || d == 0 || k_pool.dim(1)? != d || v_pool.dim(1)? != d {
        candle_core::bail!(
            "decode attention: q {:?}, pools {:?}, {} contexts",
            q.shape(),
            k_pool.shape(),
            contexts.len()
        )
    }
    let (k_storage, k_layout) = k_pool.storage_and_layout();
    let (v_storage, v_layout) = v_pool.storage_and_layout();
    let (Some(k), Some(v)) = (rows(&k_storage, k_layout), rows(&v_storage, v_layout)) else {
        return Ok(None);
    };
    let slots = k.slots(d).min(v.slots(d));
    if let Some(bad) = contexts.iter().flat_map(|c| c.iter()).find(|&&s| s as usize >= slots) {
        candle_core::bail!("decode attention: slot {bad} beyond the pool's {slots}")
    }
    let root = scale.sqrt() as f32;
    // With a power-of-two root (head_dim 256, Step3's: 1/4) every scaling is exact, so q times
    // `scale` against K as stored gives the same scores bit for bit, and K is read in place.
    let exact = scale.sqrt().log2().fract() == 0.0;
    let (q_mul, k_mul) = if exact { (scale as f32, None) } else { (root, Some(root)) };
    let dtype = q.dtype();
    // q · sqrt(scale) in f32, as the reference multiplies it (or · scale, see above).
    let q: Vec<f32> = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let q: Vec<f32> = q.iter().map(|v| v * q_mul).collect();

    // Tasks of (sequence, group of heads): enough of them to give every thread work when the
    // batch is small, and no more (each group widens its sequence's context once).
    let groups = rayon::current_num_threads().div_ceil(b).clamp(1, n);
    let per_group = n.div_ceil(groups);
    let mut out = vec![0f32; b * n * d];
    out.par_chunks_mut(n * d).zip(q.par_chunks(n * d)).zip(contexts.par_iter()).for_each(|((out, q), ctx)| {
        out.par_chunks_mut(per_group * d).zip(q.par_chunks(per_group * d)).for_each(|(out, q)| {
            attend_one(q, out.len() / d, d, k, v, ctx, k_mul, out);
        });
    });
    Tensor::from_vec(out, (b, n, d), &Device::Cpu)?.to_dtype(dtype).map(Some)
}

/// The pool's rows when its storage is a contiguous f32/bf16/f16 CPU buffer.
fn rows<'a>(storage: &'a Storage, layout: &candle_core::Layout) -> Option<Rows<'a>> {
    let (a, b) = layout.contiguous_offsets()?;
    match storage {
        Storage::Cpu(CpuStorage::F32(r)) => Some(Rows::F32(&r[a..b])),
        Storage::Cpu(CpuStorage::BF16(r)) => Some(Rows::Bf16(&r[a..b])),
        Storage::Cpu(CpuStorage::F16(r)) => Some(Rows::F16(&r[a..b])),
        _ => None,
    }
}

/// `n` heads of one sequence: `q [n, d]` (already scaled) against the context `ctx`, into
/// `out [n, d]`. K rows are widened and multiplied by `k_mul` when one is given, else read in
/// place; the context is taken in runs of consecutive slots (a paged block, or all of a
/// contiguous cache), at most [`CHUNK`] at a time. Neither changes a value: each score is one
/// dot product, and `out` accumulates the runs in context order.
#[allow(clippy::too_many_arguments)]
fn attend_one(q: &[f32], n: usize, d: usize, k: Rows, v: Rows, ctx: &[u32], k_mul: Option<f32>, out: &mut [f32]) {
    let s = ctx.len();
    if s == 0 {
        return;
    }
    let runs = runs(ctx);
    let mut buf = vec![0f32; CHUNK.min(s) * d];
    // Scores `[n, s]`: all heads against each run's K rows.
    let mut scores = vec![0f32; n * s];
    // The query rows are laid out for the kernels once, at the first run.
    let mut queries: Option<cpu::Activations> = None;
    for &(t0, len) in &runs {
        let first = ctx[t0] as usize;
        let rows = match (k_mul, k) {
            (None, Rows::F32(r)) => WeightSlice::F32(&r[first * d..(first + len) * d]),
            (None, Rows::Bf16(r)) => WeightSlice::Bf16(&r[first * d..(first + len) * d]),
            (None, Rows::F16(r)) => WeightSlice::F16(&r[first * d..(first + len) * d]),
            (Some(mul), k) => {
                for i in 0..len {
                    k.widen(first + i, &mut buf[i * d..(i + 1) * d], mul);
                }
                WeightSlice::F32(&buf[..len * d])
            }
        };
        let queries = queries.get_or_insert_with(|| cpu::Activations::new(q, n, d, rows));
        queries.matmul_t_into(rows, len, &mut scores[t0..], s);
    }
    // Softmax per head, as candle's `softmax_last_dim`: the maximum, the exponentials and their
    // running sum, one division each.
    for row in scores.chunks_exact_mut(s) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        row.iter_mut().for_each(|x| *x /= sum);
    }
    // `out = probabilities · v`, run by run in context order (f32 V in place, else widened).
    for &(t0, len) in &runs {
        let first = ctx[t0] as usize;
        let rows: &[f32] = match v {
            Rows::F32(r) => &r[first * d..(first + len) * d],
            v => {
                for i in 0..len {
                    v.widen(first + i, &mut buf[i * d..(i + 1) * d], 1.0);
                }
                &buf[..len * d]
            }
        };
        cpu::weighted_rows_acc(&scores[t0..], n, s, rows, len, d, out);
    }
}

/// `ctx` as runs `(start, len)` of consecutive slots, at most [`CHUNK`] long.
fn runs(ctx: &[u32]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut t0 = 0;
    while t0 < ctx.len() {
        let mut len = 1;
        while t0 + len < ctx.len() && len < CHUNK && ctx[t0 + len] == ctx[t0 + len - 1].wrapping_add(1) {
            len += 1;
        }
        runs.push((t0, len));
        t0 += len;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-2, 2).
    fn vals(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0) as f32
            })
            .collect()
    }

    /// The general path (`attend` over gathered K/V) for each sequence alone.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, contexts: &[&[u32]], scale: f64) -> Result<Tensor> {
        let n = q.dim(1)?;
        let mut outs = Vec::new();
        for (b, ctx) in contexts.iter().enumerate() {
            let idx = Tensor::new(*ctx, &Device::Cpu)?;
            let (kb, vb) = (k.index_select(&idx, 0)?.unsqueeze(0)?, v.index_select(&idx, 0)?.unsqueeze(0)?);
            outs.push(crate::attention::attend(&q.narrow(0, b, 1)?, &kb, &vb, scale, None, (1, n))?);
        }
        Tensor::cat(&outs, 0)
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> Result<f32> {
        let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
        let diff = (&a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        Ok(diff / b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    /// Against the general path, f32 and bf16, over head dims with and without a power-of-two
    /// root of the scale, contexts shorter and longer than a chunk, sequences sharing slots.
    #[test]
    fn matches_the_general_path() -> Result<()> {
        let shapes = [(1usize, 1usize, 24usize), (3, 8, 64), (2, 5, 256), (4, 3, 32), (3, 4, 256)];
        for (seed, (b, n, d)) in shapes.into_iter().enumerate() {
            let slots = 300;
            let scale = 1.0 / (d as f64).sqrt();
            let q = Tensor::from_vec(vals(b * n * d, seed as u64), (b, n, d), &Device::Cpu)?;
            let k = Tensor::from_vec(vals(slots * d, 10 + seed as u64), (slots, d), &Device::Cpu)?;
            let v = Tensor::from_vec(vals(slots * d, 20 + seed as u64), (slots, d), &Device::Cpu)?;
            let lens = [1usize, 64, 65, 130, 63, 200];
            // Even sequences: blocks of 16 consecutive slots in scattered places (a paged cache:
            // runs); odd ones: every slot somewhere else.
            let ctx: Vec<Vec<u32>> = (0..b)
                .map(|i| {
                    let len = lens[(i + seed) % lens.len()];
                    let slot = |p: usize| match i % 2 {
                        0 => ((p / 16) * 7 + i) % (slots / 16) * 16 + p % 16,
                        _ => (p * 7 + i * 13) % slots,
                    };
                    (0..len).map(|p| slot(p) as u32).collect()
                })
                .collect();
            let ctx: Vec<&[u32]> = ctx.iter().map(|c| c.as_slice()).collect();
            for dtype in [DType::F32, DType::BF16] {
                let (q, k, v) = (q.to_dtype(dtype)?, k.to_dtype(dtype)?, v.to_dtype(dtype)?);
                let got = decode_attention(&q, &k, &v, &ctx, scale)?.expect("the CPU path applies");
                assert_eq!(got.dims3()?, (b, n, d));
                assert_eq!(got.dtype(), dtype);
                let want = reference(&q, &k, &v, &ctx, scale)?;
                let rel = max_rel(&got, &want)?;
                // f32: summation order only; bf16: the same f32 values rounded once, so at most a
                // rounding boundary apart (2^-8 relative).
                let tol = if dtype == DType::F32 { 1e-5 } else { 8e-3 };
                assert!(rel <= tol, "{dtype:?} b={b} n={n} d={d}: {rel:e}");
                // Each sequence alone gives its batched result bit for bit.
                for (i, c) in ctx.iter().enumerate() {
                    let one = decode_attention(&q.narrow(0, i, 1)?, &k, &v, &[*c], scale)?.expect("CPU");
                    let same = one.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?
                        == got.narrow(0, i, 1)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                    assert!(same, "{dtype:?} sequence {i} alone differs");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_slot_beyond_the_pool_is_an_error() -> Result<()> {
        let q = Tensor::zeros((1, 2, 8), DType::F32, &Device::Cpu)?;
        let k = Tensor::zeros((4, 8), DType::F32, &Device::Cpu)?;
        let err = decode_attention(&q, &k, &k, &[&[0, 4]], 0.125).unwrap_err();
        assert!(err.to_string().contains("slot 4"), "{err}");
        Ok(())
    }
}
