use serde::Serialize;
use step3_config::TextConfig;

/// How one group of identical layers attends.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum AttnKind {
    /// Softmax attention over the cached context (MHA/GQA/MQA, Step3's MFA, DeepSeek's MLA).
    Softmax {
        /// Query heads, each doing a QKᵀ and a PV product.
        heads: usize,
        /// Dimension of both products (head_dim; 576 for MLA in its absorbed decode form).
        dot_dim: usize,
        /// Values cached per context token per layer (K+V of all K/V heads, or MLA's latent+rope).
        kv_elems: usize,
        /// Bytes per cached value: 1 for the paper's 8-bit KV, 2 for BF16.
        kv_bytes_per_elem: usize,
        /// Chunked/sliding layers see `min(c, window)` tokens.
        window: Option<usize>,
    },
    /// Linear ("lightning") attention: a fixed-size state per layer, independent of context.
    Linear {
        /// Bytes of state moved per decoded token per layer.
        state_bytes: f64,
        /// FLOPs per decoded token per layer.
        state_flops: f64,
    },
}

/// `layers` layers attending the same way.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttnGroup {
    pub layers: usize,
    pub kind: AttnKind,
    pub label: String,
}

impl AttnGroup {
    /// KV-cache (or state) bytes read per decoded token at context `c`.
    pub fn kv_bytes(&self, c: usize) -> f64 {
        let n = self.layers as f64;
        match &self.kind {
            AttnKind::Softmax { kv_elems, kv_bytes_per_elem, window, .. } => {
                n * window.map_or(c, |w| c.min(w)) as f64 * (*kv_elems * *kv_bytes_per_elem) as f64
            }
            AttnKind::Linear { state_bytes, .. } => n * state_bytes,
        }
    }

    /// Core attention FLOPs per decoded token at context `c` (QKᵀ and PV, 2 FLOPs per MAC).
    pub fn flops(&self, c: usize) -> f64 {
        let n = self.layers as f64;
        match &self.kind {
            AttnKind::Softmax { heads, dot_dim, window, .. } => {
                n * window.map_or(c, |w| c.min(w)) as f64 * (heads * 2 * 2 * dot_dim) as f64
            }
            AttnKind::Linear { state_flops, .. } => n * state_flops,
        }
    }
}

/// What the cost model needs to know about a decoder.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSpec {
    /// Short name used on the command line (`step3`, `dsv3`, ...).
    pub key: String,
    /// Display name.
    pub name: String,
    pub layers: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub tied_embeddings: bool,
    pub attention: Vec<AttnGroup>,
    /// Σ over layers of the attention projection weights (no norms, biases, router or embeddings).
    pub attn_proj_params: u64,
    /// Σ over layers of the FFN weights one token uses: dense layers, routed top-k experts and
    /// shared experts (routers excluded).
    pub ffn_active_params: u64,
    /// Σ over layers of every FFN weight (all experts).
    pub ffn_total_params: u64,
    /// Routed experts per MoE layer and how many a token uses, plus shared experts.
    pub experts: Option<(usize, usize, usize)>,
    /// Where the numbers come from.
    pub source: String,
}

/// Parameters of a SwiGLU MLP (gate, up, down).
pub fn swiglu(hidden: usize, inter: usize) -> u64 {
    3 * hidden as u64 * inter as u64
}

impl ModelSpec {
    /// KV-cache bytes per decoded token at context `c` (8-bit KV unless a group says otherwise).
    pub fn kv_bytes(&self, c: usize) -> f64 {
        self.attention.iter().map(|g| g.kv_bytes(c)).sum()
    }

    /// Core attention FLOPs per decoded token at context `c`.
    pub fn attn_flops(&self, c: usize) -> f64 {
        self.attention.iter().map(|g| g.flops(c)).sum()
    }

    /// FLOPs of the linear projections around attention per decoded token.
    pub fn linear_flops(&self) -> f64 {
        2.0 * self.attn_proj_params as f64
    }

    /// FFN FLOPs per decoded token.
    pub fn ffn_flops(&self) -> f64 {
        2.0 * self.ffn_active_params as f64
    }

    /// Attention FLOPs per KV byte (independent of context for full-attention models).
    pub fn arithmetic_intensity(&self, c: usize) -> f64 {
        self.attn_flops(c) / self.kv_bytes(c)
    }

    /// Parameters one token activates: attention projections, activated FFN, the LM head and the
    /// input embedding (counted once when tied).
    pub fn activated_params(&self) -> u64 {
        let table = self.vocab as u64 * self.hidden as u64;
        self.attn_proj_params + self.ffn_active_params + if self.tied_embeddings { table } else { 2 * table }
    }

    /// The spec of a Step3-style text config (`step3_text` or the `text_config` of `step3_vl`),
    /// with the KV cache stored at `kv_bytes_per_elem` bytes per value (1 = the paper's 8-bit).
    pub fn from_text_config(key: &str, name: &str, cfg: &TextConfig, kv_bytes_per_elem: usize) -> Self {
        let (h, q, d, n, g) =
            (cfg.hidden_size, cfg.share_q_dim, cfg.head_dim, cfg.num_attention_heads, cfg.num_attention_groups);
        let proj = (h * q + 2 * h * d * g + q * n * d + n * d * h) as u64;
        let moe_layers = (0..cfg.num_hidden_layers).filter(|&l| cfg.is_moe_layer(l)).count();
        let dense_layers = cfg.num_hidden_layers - moe_layers;
        let expert = swiglu(h, cfg.moe_intermediate_size);
        let shared = swiglu(h, cfg.share_expert_dim);
        let dense = dense_layers as u64 * swiglu(h, cfg.intermediate_size);
        Self {
            key: key.to_string(),
            name: name.to_string(),
            layers: cfg.num_hidden_layers,
            hidden: h,
            vocab: cfg.vocab_size,
            tied_embeddings: false,
            attention: vec![AttnGroup {
                layers: cfg.num_hidden_layers,
                kind: AttnKind::Softmax { heads: n, dot_dim: d, kv_elems: 2 * d * g, kv_bytes_per_elem, window: None },
                label: format!("MFA: {n} query heads x {d}, {g} K/V head(s), low-rank q {q}"),
            }],
            attn_proj_params: proj * cfg.num_hidden_layers as u64,
            ffn_active_params: dense + moe_layers as u64 * (cfg.moe_top_k as u64 * expert + shared),
            ffn_total_params: dense + moe_layers as u64 * (cfg.moe_num_experts as u64 * expert + shared),
            experts: (moe_layers > 0).then_some((cfg.moe_num_experts, cfg.moe_top_k, 1)),
            source: "config.json".into(),
        }
    }

    /// The same model with every softmax layer's KV cache at `bytes` per value.
    pub fn with_kv_bytes_per_elem(&self, bytes: usize) -> Self {
        let mut m = self.clone();
        for g in &mut m.attention {
            if let AttnKind::Softmax { kv_bytes_per_elem, .. } = &mut g.kind {
                *kv_bytes_per_elem = bytes;
            }
        }
        m
    }
}
