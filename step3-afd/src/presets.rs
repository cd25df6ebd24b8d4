//! Built-in models (the ones the Step3 paper compares) and accelerators (the paper's Table 4 plus
//! current NVIDIA parts). Every number names its public source; see `docs/cost-model.md`.
//!
//! Modelling conventions (the paper's, reconstructed so that every published number reproduces):
//! 8-bit KV everywhere except the full-attention layers of hybrid models (BF16); DeepSeek MLA
//! caches its 512+64 latent and does both products at d = 576 (absorbed decode); linear FLOPs
//! count the unabsorbed projection weights; FFN FLOPs count dense layers, routed top-k and shared
//! experts, not routers.

use crate::model::{swiglu, AttnGroup, AttnKind, ModelSpec};
use crate::Accelerator;

fn softmax(
    layers: usize,
    heads: usize,
    dot_dim: usize,
    kv_elems: usize,
    kv_bytes: usize,
    window: Option<usize>,
    label: &str,
) -> AttnGroup {
    AttnGroup {
        layers,
        kind: AttnKind::Softmax { heads, dot_dim, kv_elems, kv_bytes_per_elem: kv_bytes, window },
        label: label.into(),
    }
}

/// q, k, v, o of (grouped-query) attention without biases.
fn gqa_proj(h: usize, q_heads: usize, kv_heads: usize, head_dim: usize) -> u64 {
    (h * q_heads * head_dim + 2 * h * kv_heads * head_dim + q_heads * head_dim * h) as u64
}

/// DeepSeek MLA projections (q_a, q_b, kv_a with the rope key, kv_b, o), not absorbed.
fn mla_proj(h: usize, heads: usize, q_lora: usize, kv_lora: usize, nope: usize, rope: usize, v: usize) -> u64 {
    (h * q_lora + q_lora * heads * (nope + rope) + h * (kv_lora + rope) + kv_lora * heads * (nope + v) + heads * v * h)
        as u64
}

#[allow(clippy::too_many_arguments)]
fn spec(
    key: &str,
    name: &str,
    layers: usize,
    hidden: usize,
    vocab: usize,
    tied: bool,
    attention: Vec<AttnGroup>,
    attn_proj: u64,
    ffn_active: u64,
    ffn_total: u64,
    experts: Option<(usize, usize, usize)>,
    source: &str,
) -> ModelSpec {
    ModelSpec {
        key: key.into(),
        name: name.into(),
        layers,
        hidden,
        vocab,
        tied_embeddings: tied,
        attention,
        attn_proj_params: attn_proj,
        ffn_active_params: ffn_active,
        ffn_total_params: ffn_total,
        experts,
        source: source.into(),
    }
}

/// Step-3 (stepfun-ai/step3 `config.json`): 61 layers, hidden 7168, MFA (q 7168→2048→64×256, one
/// K and one V head of 256), dense SwiGLU 18432 in layers 0–3 and 60, MoE 48×5120 top-3 + one
/// shared 5120 in layers 4–59, vocabulary 128815, untied head.
pub fn step3() -> ModelSpec {
    let (h, l) = (7168, 61);
    let proj = (h * 2048 + 2 * h * 256 + 2048 * 64 * 256 + 64 * 256 * h) as u64;
    let dense = 5 * swiglu(h, 18432);
    spec(
        "step3",
        "Step-3",
        l,
        h,
        128815,
        false,
        vec![softmax(l, 64, 256, 512, 1, None, "MFA: 64 query heads x 256, one K and one V head")],
        l as u64 * proj,
        dense + 56 * 4 * swiglu(h, 5120),
        dense + 56 * 49 * swiglu(h, 5120),
        Some((48, 3, 1)),
        "huggingface.co/stepfun-ai/step3 config.json (text_config); configs/step3/config.json",
    )
}

/// DeepSeek-V3: 61 layers, hidden 7168, MLA with 128 heads (q_lora 1536, kv_lora 512, nope 128,
/// rope 64, v 128), dense 18432 in layers 0–2, MoE 256×2048 top-8 + 1 shared in 3–60.
pub fn deepseek_v3() -> ModelSpec {
    let (h, l) = (7168, 61);
    let dense = 3 * swiglu(h, 18432);
    spec(
        "dsv3",
        "DSv3",
        l,
        h,
        129280,
        false,
        vec![softmax(l, 128, 576, 576, 1, None, "MLA: latent 512 + rope 64 cached, d = 576 for QK and PV")],
        l as u64 * mla_proj(h, 128, 1536, 512, 128, 64, 128),
        dense + 58 * 9 * swiglu(h, 2048),
        dense + 58 * 257 * swiglu(h, 2048),
        Some((256, 8, 1)),
        "github.com/deepseek-ai/DeepSeek-V3 inference/configs/config_671B.json; HF deepseek-ai/DeepSeek-V3 config.json",
    )
}

/// Kimi K2: the DeepSeek-V3 architecture with 64 attention heads, 384 experts and one dense layer.
pub fn kimi_k2() -> ModelSpec {
    let (h, l) = (7168, 61);
    let dense = swiglu(h, 18432);
    spec(
        "kimi_k2",
        "Kimi K2",
        l,
        h,
        163840,
        false,
        vec![softmax(l, 64, 576, 576, 1, None, "MLA with 64 heads: latent 512 + rope 64, d = 576")],
        l as u64 * mla_proj(h, 64, 1536, 512, 128, 64, 128),
        dense + 60 * 9 * swiglu(h, 2048),
        dense + 60 * 385 * swiglu(h, 2048),
        Some((384, 8, 1)),
        "HF moonshotai/Kimi-K2-Instruct config.json (first_k_dense_replace 1, 64 heads, 384 experts)",
    )
}

/// Qwen3-235B-A22B: 94 layers, hidden 4096, GQA 64 query / 4 KV heads × 128, every layer MoE
/// 128×1536 top-8, no shared expert.
pub fn qwen3_moe() -> ModelSpec {
    let (h, l) = (4096, 94);
    spec(
        "qwen3_moe",
        "Qwen3 MoE 235B",
        l,
        h,
        151936,
        false,
        vec![softmax(l, 64, 128, 2 * 4 * 128, 1, None, "GQA: 64 query heads, 4 KV heads x 128")],
        l as u64 * gqa_proj(h, 64, 4, 128),
        l as u64 * 8 * swiglu(h, 1536),
        l as u64 * 128 * swiglu(h, 1536),
        Some((128, 8, 0)),
        "HF Qwen/Qwen3-235B-A22B config.json",
    )
}

/// Qwen3-32B (dense): 64 layers, hidden 5120, GQA 64/8 × 128, SwiGLU 25600.
pub fn qwen3_32b() -> ModelSpec {
    let (h, l) = (5120, 64);
    spec(
        "qwen3_32b",
        "Qwen3 32B",
        l,
        h,
        151936,
        false,
        vec![softmax(l, 64, 128, 2 * 8 * 128, 1, None, "GQA: 64 query heads, 8 KV heads x 128")],
        l as u64 * gqa_proj(h, 64, 8, 128),
        l as u64 * swiglu(h, 25600),
        l as u64 * swiglu(h, 25600),
        None,
        "HF Qwen/Qwen3-32B config.json",
    )
}

/// Llama 4 Maverick (17B-128E): 48 layers, hidden 5120, GQA 40/8 × 128; every 4th layer global
/// NoPE attention (BF16 KV, full context), the others chunked local attention over 8192 tokens
/// (8-bit KV); every 2nd layer MoE (128×8192 top-1 + shared 8192), the others dense 16384.
pub fn llama4_maverick() -> ModelSpec {
    let (h, l) = (5120, 48);
    let moe = 24;
    spec(
        "llama4_maverick",
        "Llama 4 Maverick",
        l,
        h,
        202048,
        false,
        vec![
            softmax(12, 40, 128, 2 * 8 * 128, 2, None, "12 global NoPE layers, BF16 KV"),
            softmax(36, 40, 128, 2 * 8 * 128, 1, Some(8192), "36 chunked layers (8192 tokens), 8-bit KV"),
        ],
        l as u64 * gqa_proj(h, 40, 8, 128),
        (l - moe) as u64 * swiglu(h, 16384) + moe as u64 * 2 * swiglu(h, 8192),
        (l - moe) as u64 * swiglu(h, 16384) + moe as u64 * 129 * swiglu(h, 8192),
        Some((128, 1, 1)),
        "github.com/meta-llama/llama-models models/llama4 (args.py, model.py); TensorRT-LLM Llama 4 Maverick test config",
    )
}

/// MiniMax M1: 80 layers, hidden 6144; every 8th layer softmax GQA 64/8 × 128 (BF16 KV), the
/// other 70 lightning (linear) attention with a 64×128×128 state (8 bytes moved and 10 FLOPs per
/// state element per token, the coefficients the paper's numbers imply); MoE 32×9216 top-2.
pub fn minimax_m1() -> ModelSpec {
    let (h, l) = (6144, 80);
    let (heads, d) = (64usize, 128usize);
    let state = (heads * d * d) as f64;
    let soft_proj = gqa_proj(h, heads, 8, d);
    let light_proj = (h * 3 * heads * d + h * heads * d + heads * d * h) as u64;
    spec(
        "minimax_m1",
        "MiniMax M1",
        l,
        h,
        200064,
        false,
        vec![
            softmax(10, heads, d, 2 * 8 * d, 2, None, "10 softmax GQA layers 64q/8kv x128, BF16 KV"),
            AttnGroup {
                layers: 70,
                kind: AttnKind::Linear { state_bytes: 8.0 * state, state_flops: 10.0 * state },
                label: "70 lightning-attention layers, state 64 x 128 x 128".into(),
            },
        ],
        10 * soft_proj + 70 * light_proj,
        l as u64 * 2 * swiglu(h, 9216),
        l as u64 * 32 * swiglu(h, 9216),
        Some((32, 2, 0)),
        "HF MiniMaxAI/MiniMax-M1-40k config.json (attn_type_list); transformers docs model_doc/minimax.md",
    )
}

/// ERNIE 4.5 300B-A47B: 54 layers, hidden 8192, GQA 64/8 × 128, dense 28672 in layers 0–2, MoE
/// 64×3584 top-8 in layers 3–53, tied embeddings.
pub fn ernie45() -> ModelSpec {
    let (h, l) = (8192, 54);
    let dense = 3 * swiglu(h, 28672);
    spec(
        "ernie45",
        "ERNIE 4.5",
        l,
        h,
        103424,
        true,
        vec![softmax(l, 64, 128, 2 * 8 * 128, 1, None, "GQA: 64 query heads, 8 KV heads x 128")],
        l as u64 * gqa_proj(h, 64, 8, 128),
        dense + 51 * 8 * swiglu(h, 3584),
        dense + 51 * 64 * swiglu(h, 3584),
        Some((64, 8, 0)),
        "HF baidu/ERNIE-4.5-300B-A47B-PT config.json (moe_layer_start_index 3, moe_k 8)",
    )
}

/// Pangu Pro MoE (72B-A16B): 48 layers, hidden 5120, GQA 40/8 × 128, MoE 64×1344 in 8 groups
/// (top-8, one per group) + shared 5376.
pub fn pangu_pro() -> ModelSpec {
    let (h, l) = (5120, 48);
    spec(
        "pangu_pro",
        "Pangu Pro MoE",
        l,
        h,
        153376,
        false,
        vec![softmax(l, 40, 128, 2 * 8 * 128, 1, None, "GQA: 40 query heads, 8 KV heads x 128")],
        l as u64 * gqa_proj(h, 40, 8, 128),
        l as u64 * (8 * swiglu(h, 1344) + swiglu(h, 5376)),
        l as u64 * (64 * swiglu(h, 1344) + swiglu(h, 5376)),
        Some((64, 8, 4)),
        "gitcode.com/ascend-tribe/pangu-pro-moe configuration_pangu_moe.py; arXiv 2505.21411",
    )
}

/// Every model preset, in the paper's table order.
pub fn models() -> Vec<ModelSpec> {
    vec![
        deepseek_v3(),
        kimi_k2(),
        qwen3_moe(),
        qwen3_32b(),
        llama4_maverick(),
        minimax_m1(),
        ernie45(),
        pangu_pro(),
        step3(),
    ]
}

/// A model preset by key (case-insensitive; `-` and `_` interchangeable).
pub fn model(key: &str) -> Option<ModelSpec> {
    let norm = |s: &str| s.to_ascii_lowercase().replace('-', "_");
    models().into_iter().find(|m| norm(&m.key) == norm(key))
}

#[allow(clippy::too_many_arguments)]
fn accel(
    name: &str,
    price: f64,
    bf16: f64,
    fp8: Option<f64>,
    bw: f64,
    nic_gbps: f64,
    source: &str,
    assumed: bool,
) -> Accelerator {
    Accelerator {
        name: name.into(),
        usd_per_hour: price,
        bf16_flops: bf16,
        fp8_flops: fp8,
        mem_bw: bw,
        nics: 8,
        nic_gbps,
        source: source.into(),
        price_is_assumption: assumed,
    }
}

/// The paper's Table 4 accelerators (H800, H20, A800, 910B), then H100, H200, B200, L20 and L4
/// from NVIDIA datasheets (dense tensor peaks, no sparsity) with assumed rental prices.
pub fn accelerators() -> Vec<Accelerator> {
    vec![
        accel("H800", 2.0, 9.89e14, Some(1.98e15), 3.35e12, 400.0, "Step3 paper, Table 4", false),
        accel("H20", 0.8, 1.48e14, Some(2.96e14), 4.0e12, 400.0, "Step3 paper, Table 4", false),
        accel(
            "A800",
            0.75,
            3.12e14,
            None,
            2.0e12,
            200.0,
            "Step3 paper, Table 4 (no FP8: INT8 weights at the BF16 rate)",
            false,
        ),
        accel("910B", 0.67, 2.8e14, None, 1.6e12, 200.0, "Step3 paper, Table 4 (price estimated by the paper)", false),
        accel(
            "H100",
            2.5,
            9.894e14,
            Some(1.979e15),
            3.35e12,
            400.0,
            "NVIDIA H100 SXM datasheet (dense); price assumed",
            true,
        ),
        accel(
            "H200",
            3.5,
            9.894e14,
            Some(1.979e15),
            4.8e12,
            400.0,
            "NVIDIA H200 SXM datasheet (dense); price assumed",
            true,
        ),
        accel(
            "B200",
            5.5,
            2.25e15,
            Some(4.5e15),
            8.0e12,
            400.0,
            "NVIDIA HGX B200 datasheet (1000 W, dense); price assumed",
            true,
        ),
        accel(
            "L20",
            0.5,
            1.195e14,
            Some(2.39e14),
            8.64e11,
            200.0,
            "L20: 48 GB GDDR6 at 864 GB/s; tensor peaks inferred (no public datasheet), price assumed",
            true,
        ),
        accel("L4", 0.45, 1.21e14, Some(2.425e14), 3.0e11, 100.0, "NVIDIA L4 datasheet (dense); price assumed", true),
    ]
}

/// The four accelerators of the paper's tables.
pub fn paper_accelerators() -> Vec<Accelerator> {
    accelerators().into_iter().take(4).collect()
}

/// An accelerator preset by name (case-insensitive).
pub fn accelerator(name: &str) -> Option<Accelerator> {
    accelerators().into_iter().find(|a| a.name.eq_ignore_ascii_case(name))
}
