use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use step3_nn::{Linear, RmsNorm, WeightFormat};

use crate::{AttentionStep, KvCache, RotaryEmbedding};

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

    /// `xs: [B, T, H]` (already normalised by the layer's input norm) → `[B, T, H]`.
    ///
    /// Appends this step's K/V to `cache`. All query heads of a sequence attend to the single K/V
    /// head in one matmul: q is viewed as `[B, T·heads, d]` against K `[B, S, d]`, with no copy
    /// of K or V per head.
    pub fn forward(
        &self,
        xs: &Tensor,
        rope: &RotaryEmbedding,
        step: &AttentionStep,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        let (n, d) = (self.num_heads, self.head_dim);

        let q = self.wq.forward(&self.inter_norm.forward(&self.q_proj.forward(xs)?)?)?;
        let q = rope.apply(&q.reshape((b, t, n, d))?, &step.cos, &step.sin)?;
        let k = self.k_proj.forward(xs)?.reshape((b, t, 1, d))?;
        let k = rope.apply(&k, &step.cos, &step.sin)?.reshape((b, t, d))?;
        let v = self.v_proj.forward(xs)?;
        let (k, v) = cache.append(&k, &v)?;
        let s = k.dim(1)?;

        // [B, T·n, d] × [B, d, S]: rows ordered (token, head).
        let q = q.reshape((b, t * n, d))?;
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        let mut scores = scores.to_dtype(DType::F32)?.reshape((b, t, n, s))?;
        if let Some(mask) = &step.mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(xs.dtype())?;
        let out = probs.reshape((b, t * n, s))?.matmul(&v)?;
        self.o_proj.forward(&out.reshape((b, t, n * d))?)
    }
}
