use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use step3_nn::{Linear, RmsNorm, WeightFormat};

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
        let out = self.attend(&q.reshape((b, t * n, d))?, &k, &v, step.mask.as_ref(), t)?;
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
        let q = self.wq.forward(&self.inter_norm.forward(&self.q_proj.forward(xs)?)?)?;
        let q = rope.apply(&q.reshape((1, rows, n, d))?, &step.cos, &step.sin)?.reshape((rows, n, d))?;
        let k = self.k_proj.forward(xs)?.reshape((1, rows, 1, d))?;
        let k = rope.apply(&k, &step.cos, &step.sin)?.reshape((rows, d))?;
        let v = self.v_proj.forward(xs)?;
        cache.write(step, &k, &v)?;
        let mut outs = Vec::with_capacity(step.groups.len());
        for g in &step.groups {
            let q = q.narrow(0, g.row, g.batch * g.q_len)?.reshape((g.batch, g.q_len * n, d))?;
            let (k, v) = cache.gather(&g.gather)?;
            let (k, v) = (k.reshape((g.batch, g.s, d))?, v.reshape((g.batch, g.s, d))?);
            let out = self.attend(&q, &k, &v, g.mask.as_ref(), g.q_len)?;
            outs.push(out.reshape((g.batch * g.q_len, n * d))?);
        }
        let out = if outs.len() == 1 { outs.remove(0) } else { Tensor::cat(&outs, 0)? };
        self.o_proj.forward(&out)
    }

    /// Softmax attention of `q: [B, T·n, d]` (rows ordered token, head) over one shared K/V head
    /// `k, v: [B, S, d]`, with an additive f32 mask `[B or 1, T, 1, S]`: scores and softmax in
    /// f32, the probabilities cast back to the activation dtype → `[B, T·n, d]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, t: usize) -> Result<Tensor> {
        let (b, tn, _) = q.dims3()?;
        let s = k.dim(1)?;
        // [B, T·n, d] × [B, d, S]: all heads of a sequence in one matmul.
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        let mut scores = scores.to_dtype(DType::F32)?.reshape((b, t, tn / t, s))?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(q.dtype())?;
        probs.reshape((b, tn, s))?.matmul(v)
    }
}
