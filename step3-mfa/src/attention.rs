use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use step3_nn::{Linear, RmsNorm, WeightFormat};

use crate::decode;
use crate::{AttentionStep, KvCache, PagedKvCache, PagedStep, RotaryEmbedding};

/// The sizes one MFA layer needs (a slice of the model's text config).
#[derive(Debug, Clone, PartialEq)]
pub struct MfaConfig {
    /// Model width (`hidden_size`, 7168 for Step3).
    pub hidden_size: usize,
    /// Low-rank query width (`share_q_dim`, 2048).
    pub share_q_dim: usize,
    /// Query heads (`num_attention_heads`, 64). K and V always have one head.
    pub num_heads: usize,
    /// Per-head width of q, k and v (`head_dim`, 256).
    pub head_dim: usize,
    /// Epsilon of `inter_norm` (`rms_norm_eps`).
    pub rms_norm_eps: f64,
    /// How the projection weights are stored (dense or block-FP8).
    pub weight_format: WeightFormat,
}

/// One MFA attention layer, weights named as in the checkpoint under
/// `model.layers.{i}.self_attn`: `q_proj [Q, H]`, `inter_norm [Q]`, `wq [heads·d, Q]`,
/// `k_proj [d, H]`, `v_proj [d, H]`, `o_proj [H, heads·d]`, no biases.
#[derive(Debug, Clone)]
pub struct MfaAttention {
    q_proj: Linear,
    inter_norm: RmsNorm,
    wq: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl MfaAttention {
    pub fn new(cfg: &MfaConfig, vb: VarBuilder) -> Result<Self> {
        let (h, q, d, n) = (cfg.hidden_size, cfg.share_q_dim, cfg.head_dim, cfg.num_heads);
        let f = cfg.weight_format;
        Ok(Self {
            q_proj: Linear::new(h, q, false, f, vb.pp("q_proj"))?,
            inter_norm: RmsNorm::new(q, cfg.rms_norm_eps, vb.pp("inter_norm"))?,
            wq: Linear::new(q, n * d, false, f, vb.pp("wq"))?,
            k_proj: Linear::new(h, d, false, f, vb.pp("k_proj"))?,
            v_proj: Linear::new(h, d, false, f, vb.pp("v_proj"))?,
            o_proj: Linear::new(n * d, h, false, f, vb.pp("o_proj"))?,
            num_heads: n,
            head_dim: d,
            scale: 1.0 / (d as f64).sqrt(),
        })
    }

    /// Bytes of all weights held in memory.
    pub fn storage_bytes(&self) -> usize {
        [&self.q_proj, &self.wq, &self.k_proj, &self.v_proj, &self.o_proj]
            .iter()
            .map(|l| l.storage_bytes())
            .sum::<usize>()
            + self.inter_norm.storage_bytes()
    }

    /// The three projections of the layer's input: the low-rank query (before `inter_norm`), K
    /// and V, in one parallel region on the CPU kernels ([`Linear::forward_many`]).
    fn qkv(&self, xs: &Tensor) -> Result<[Tensor; 3]> {
        let mut p = Linear::forward_many(&[&self.q_proj, &self.k_proj, &self.v_proj], xs)?.into_iter();
        match (p.next(), p.next(), p.next()) {
            (Some(q), Some(k), Some(v)) => Ok([q, k, v]),
            _ => candle_core::bail!("forward_many returned fewer than three projections"),
        }
    }

    /// `xs: [B, T, H]` (already normalised by the layer's input norm) → `[B, T, H]`.
    ///
    /// Appends this step's K/V to `cache`. All query heads of a sequence attend to the single K/V
    /// head in one matmul: q is viewed as `[B, T·heads, d]` against K `[B, S, d]`, with no copy
    /// of K or V per head. The attention itself runs in f32 whatever the activation dtype (see
    /// `attend`).
    pub fn forward(
        &self,
        xs: &Tensor,
        rope: &RotaryEmbedding,
        step: &AttentionStep,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        let (n, d) = (self.num_heads, self.head_dim);

        let [q, k, v] = self.qkv(xs)?;
        let q = self.wq.forward(&self.inter_norm.forward(&q)?)?;
        let q = rope.apply(&q.reshape((b, t, n, d))?, &step.cos, &step.sin)?;
        let k = k.reshape((b, t, 1, d))?;
        let k = rope.apply(&k, &step.cos, &step.sin)?.reshape((b, t, d))?;
        let (k, v) = cache.append(&k, &v)?;
        let q = q.reshape((b, t * n, d))?;
        if t == 1 && step.mask.is_none() {
            if let Some(out) = cache.decode_attention(&q, self.scale)? {
                return self.o_proj.forward(&out.reshape((b, t, n * d))?);
            }
        }

        // [B, T·n, d] × [B, d, S]: rows ordered (token, head).
        let out = attend(&q, &k, &v, self.scale, step.mask.as_ref(), (t, n))?;
        self.o_proj.forward(&out.reshape((b, t, n * d))?)
    }

    /// [`Self::forward`] over a paged cache: `xs: [N, H]` holds the new tokens of every sequence
    /// of `step`, flattened (no padding) → `[N, H]`.
    ///
    /// The step's K/V are written to their slots first; then each attention group reads its
    /// sequences' contexts back through their block tables.
    pub fn forward_paged(
        &self,
        xs: &Tensor,
        rope: &RotaryEmbedding,
        step: &PagedStep,
        cache: &PagedKvCache,
    ) -> Result<Tensor> {
        let rows = xs.dim(0)?;
        let (n, d) = (self.num_heads, self.head_dim);
        let [q, k, v] = self.qkv(xs)?;
        let q = self.wq.forward(&self.inter_norm.forward(&q)?)?;
        let q = rope.apply(&q.reshape((1, rows, n, d))?, &step.cos, &step.sin)?.reshape((rows, n, d))?;
        let k = k.reshape((1, rows, 1, d))?;
        let k = rope.apply(&k, &step.cos, &step.sin)?.reshape((rows, d))?;
        cache.write(step, &k, &v)?;
        let mut outs = Vec::with_capacity(step.groups.len());
        for g in &step.groups {
            let q = q.narrow(0, g.row, g.batch * g.q_len)?.reshape((g.batch, g.q_len * n, d))?;
            if g.q_len == 1 {
                let contexts: Vec<&[u32]> = (0..g.batch).map(|b| g.context(b)).collect();
                let (kp, vp) = cache.pools();
                if let Some(out) = decode::decode_attention(&q, kp, vp, &contexts, self.scale)? {
                    outs.push(out.reshape((g.batch, n * d))?);
                    continue;
                }
            }
            let (k, v) = cache.gather(&g.gather)?;
            let (k, v) = (k.reshape((g.batch, g.s, d))?, v.reshape((g.batch, g.s, d))?);
            let out = attend(&q, &k, &v, self.scale, g.mask.as_ref(), (g.q_len, n))?;
            outs.push(out.reshape((g.batch * g.q_len, n * d))?);
        }
        let out = if outs.len() == 1 { outs.remove(0) } else { Tensor::cat(&outs, 0)? };
        self.o_proj.forward(&out)
    }
}

/// `softmax(q·kᵀ·scale + mask) · v` computed in f32 and rounded to `q`'s dtype once, as the
/// reference computes it.
///
/// StepFun's remote code runs attention through PyTorch's `scaled_dot_product_attention` with one
/// K/V head for all query heads (`enable_gqa`), which PyTorch serves with its "math" kernel: that
/// kernel widens bf16/f16 q, k and v to f32, multiplies q and k each by `sqrt(scale)`, and keeps the
/// scores, the softmax and the product with v in f32. Rounding the scores or the probabilities to
/// bf16 instead (what a plain bf16 matmul does) moves bf16 logits by about 1e-2 relative.
///
/// Shapes: `q [B, T·n, d]` (rows ordered token, head), `k`, `v` `[B, S, d]`, `mask` additive f32
/// `[B or 1, T, 1, S]`; `(t, n)` splits the rows of `q`. Output `[B, T·n, d]` in `q`'s dtype.
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    (t, n): (usize, usize),
) -> Result<Tensor> {
    let (b, _, _) = q.dims3()?;
    let s = k.dim(1)?;
    let root = scale.sqrt();
    let (q32, k32) = (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?);
    let scores = if root.log2().fract() == 0.0 {
        // A power-of-two root (head_dim 256, Step3's: root 1/4) scales exactly, so scaling the
        // scores once is bit-identical and spares a pass over the whole K cache per step.
        (q32.matmul(&k32.t()?)? * scale)?
    } else {
        (q32 * root)?.matmul(&(k32 * root)?.t()?)?
    };
    let mut scores = scores.reshape((b, t, n, s))?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(mask)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((b, t * n, s))?;
    probs.matmul(&v.to_dtype(DType::F32)?)?.to_dtype(q.dtype())
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// bf16 attention is f32 attention on the same (widened) values, rounded once at the end: no
    /// score or probability is rounded to bf16 on the way.
    #[test]
    fn half_precision_attention_rounds_once() -> Result<()> {
        let dev = Device::Cpu;
        let (t, n, d, s) = (3, 4, 32, 5);
        let det = |len: usize, seed: usize| -> Vec<f32> {
            (0..len).map(|i| ((((i + seed) * 2654435761) % 1000) as f32 / 1000.0 - 0.5) * 6.0).collect()
        };
        let q = Tensor::from_vec(det(t * n * d, 1), (1, t * n, d), &dev)?.to_dtype(DType::BF16)?;
        let k = Tensor::from_vec(det(s * d, 2), (1, s, d), &dev)?.to_dtype(DType::BF16)?;
        let v = Tensor::from_vec(det(s * d, 3), (1, s, d), &dev)?.to_dtype(DType::BF16)?;
        let scale = 1.0 / (d as f64).sqrt();
        let got = attend(&q, &k, &v, scale, None, (t, n))?;
        assert_eq!(got.dtype(), DType::BF16);
        let wide = |x: &Tensor| x.to_dtype(DType::F32);
        let want = attend(&wide(&q)?, &wide(&k)?, &wide(&v)?, scale, None, (t, n))?.to_dtype(DType::BF16)?;
        let diff = (got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?.abs()?.flatten_all()?.max(0)?;
        assert_eq!(diff.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    /// With head_dim 256 the scores are scaled after the product; the reference scales q and k by
    /// `sqrt(scale) = 1/4` first. Powers of two scale exactly, so the two agree bit for bit.
    #[test]
    fn power_of_two_root_scales_the_scores_exactly() -> Result<()> {
        let dev = Device::Cpu;
        let d = 256;
        let det = |len: usize, seed: usize| -> Vec<f32> {
            (0..len).map(|i| ((((i + seed) * 2654435761) % 1000) as f32 / 1000.0 - 0.5) * 6.0).collect()
        };
        let q = Tensor::from_vec(det(2 * d, 1), (1, 2, d), &dev)?;
        let k = Tensor::from_vec(det(3 * d, 2), (1, 3, d), &dev)?;
        let a = (q.matmul(&k.t()?)? * 0.0625)?;
        let b = (q * 0.25)?.matmul(&(k * 0.25)?.t()?)?;
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }
}
