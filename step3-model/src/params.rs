//! Parameter and KV-cache arithmetic derived from a config alone (no weights needed).

use serde::Serialize;

use crate::inventory::text_tensors;
use step3_config::TextConfig;

/// Language-model parameter counts, by component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ParamCounts {
    /// Every language-model parameter (embedding and `lm_head` included).
    pub total: u64,
    pub embedding: u64,
    pub lm_head: u64,
    /// q/k/v/wq/o projections and `inter_norm`, all layers.
    pub attention: u64,
    pub dense_ffn: u64,
    /// All routed experts of all MoE layers.
    pub routed_experts: u64,
    pub shared_experts: u64,
    pub routers: u64,
    /// Layer norms and the final norm.
    pub norms: u64,
    /// Parameters one token uses: everything but the input embedding table and the experts
    /// the router does not pick (`E - top_k` per MoE layer).
    pub active_per_token: u64,
}

/// Counts parameters from the tensors the config implies.
pub fn param_counts(cfg: &TextConfig) -> ParamCounts {
    let mut c = ParamCounts {
        total: 0,
        embedding: 0,
        lm_head: 0,
        attention: 0,
        dense_ffn: 0,
        routed_experts: 0,
        shared_experts: 0,
        routers: 0,
        norms: 0,
        active_per_token: 0,
    };
    for t in text_tensors(cfg) {
        let n = t.numel() as u64;
        c.total += n;
        let name = t.name.as_str();
        let slot = if name == "model.embed_tokens.weight" {
            &mut c.embedding
        } else if name == "lm_head.weight" {
            &mut c.lm_head
        } else if name.contains(".self_attn.") {
            &mut c.attention
        } else if name.contains(".mlp.") {
            &mut c.dense_ffn
        } else if name.contains(".moe.gate.") {
            &mut c.routers
        } else if name.contains(".moe.") {
            &mut c.routed_experts
        } else if name.contains(".share_expert.") {
            &mut c.shared_experts
        } else {
            &mut c.norms
        };
        *slot += n;
    }
    let inactive = c.routed_experts / cfg.moe_num_experts as u64 * (cfg.moe_num_experts - cfg.moe_top_k) as u64;
    c.active_per_token = c.total - c.embedding - inactive;
    c
}

/// KV-cache bytes per token over all layers: one K and one V vector of `head_dim` per K/V head
/// (`num_attention_groups`, 1 for Step3) per layer, at `bytes_per_value`.
pub fn kv_bytes_per_token(cfg: &TextConfig, bytes_per_value: usize) -> usize {
    cfg.num_hidden_layers * 2 * cfg.head_dim * cfg.num_attention_groups * bytes_per_value
}
