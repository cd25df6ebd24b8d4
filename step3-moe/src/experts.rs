use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use step3_nn::Weight;

use crate::{MoeConfig, Routing};

/// The routed experts of one MoE layer, kept stacked as stored in the checkpoint:
/// `gate_proj [E, I, H]`, `up_proj [E, I, H]`, `down_proj [E, H, I]`. Expert `e` is the
/// zero-copy slice `[e]` of each tensor (for block-FP8 weights, of the values and the scales;
/// only the experts a step uses are dequantised).
#[derive(Debug, Clone)]
pub struct StackedExperts {
    gate_proj: Weight,
    up_proj: Weight,
    down_proj: Weight,
    num_experts: usize,
}

impl StackedExperts {
    /// Loads `{gate,up,down}_proj.weight` from `vb` (`model.layers.{i}.moe`).
    pub fn new(cfg: &MoeConfig, vb: VarBuilder) -> Result<Self> {
        let (e, h, i) = (cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size);
        let f = cfg.weight_format;
        Ok(Self {
            gate_proj: Weight::load(&vb.pp("gate_proj"), "weight", &[e, i, h], f)?,
            up_proj: Weight::load(&vb.pp("up_proj"), "weight", &[e, i, h], f)?,
            down_proj: Weight::load(&vb.pp("down_proj"), "weight", &[e, h, i], f)?,
            num_experts: e,
        })
    }

    /// Bytes of all expert weights held in memory.
    pub fn storage_bytes(&self) -> usize {
        self.gate_proj.storage_bytes() + self.up_proj.storage_bytes() + self.down_proj.storage_bytes()
    }

    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Expert `e` alone on `xs: [N, H]`, before any routing weight: `down_e(silu(gate_e x) ⊙
    /// up_e x)`, `[N, H]`.
    pub fn expert_forward(&self, e: usize, xs: &Tensor) -> Result<Tensor> {
        if e >= self.num_experts {
            candle_core::bail!("expert {e} of {}", self.num_experts)
        }
        let gate = self.gate_proj.get(e)?.matmul_t(xs)?;
        let up = self.up_proj.get(e)?.matmul_t(xs)?;
        self.down_proj.get(e)?.matmul_t(&(step3_nn::silu(&gate)? * up)?)
    }

    /// `xs: [N, H]` → `Σ_j weights[n, j] · Expert_{ids[n, j]}(xs[n])`, `[N, H]`.
    ///
    /// On CUDA with dense bf16/f16 experts this is [`Self::forward_fused`] (no host round-trip);
    /// otherwise [`Self::forward_grouped`].
    pub fn forward(&self, xs: &Tensor, routing: &Routing) -> Result<Tensor> {
        let dense_half = matches!((&self.gate_proj, xs.dtype()), (Weight::Dense(_), DType::BF16 | DType::F16));
        if xs.device().is_cuda() && dense_half {
            self.forward_fused(xs, routing)
        } else {
            self.forward_grouped(xs, routing)
        }
    }

    /// The device-side path: the routing ids are sorted on the device and candle's `moe_gemm`
    /// kernels run every expert's rows straight from the stacked weights, the down projection
    /// scaling by the routing weights; the `k` outputs of a token are then summed.
    pub fn forward_fused(&self, xs: &Tensor, routing: &Routing) -> Result<Tensor> {
        let (n, h) = xs.dims2()?;
        let k = routing.ids.dim(1)?;
        let (Weight::Dense(gate_w), Weight::Dense(up_w), Weight::Dense(down_w)) =
            (&self.gate_proj, &self.up_proj, &self.down_proj)
        else {
            candle_core::bail!("the fused MoE path needs dense expert weights")
        };
        let (expert_ids, sorted_token_ids) = routing.ids.flatten_all()?.sort_last_dim(true)?;
        let prefill = n > 1;
        let gate = candle_nn::moe::moe_gemm(xs, gate_w, &None, &sorted_token_ids, &expert_ids, k, prefill)?;
        let up = candle_nn::moe::moe_gemm(xs, up_w, &None, &sorted_token_ids, &expert_ids, k, prefill)?;
        let i = gate.dim(candle_core::D::Minus1)?;
        let hidden = (step3_nn::silu(&gate)? * up)?.reshape(((), i))?;
        let weights = Some(routing.weights.to_dtype(DType::F32)?.contiguous()?);
        let ys = candle_nn::moe::moe_gemm(&hidden, down_w, &weights, &sorted_token_ids, &expert_ids, k, prefill)?;
        ys.reshape((n, k, h))?.sum(1)
    }

    /// The grouped path.
    ///
    /// Tokens are grouped per expert (the routing ids are read on the host to build the
    /// groups), each active expert runs its three matmuls once on its group, the weighted outputs
    /// are concatenated in expert order and scattered back with a single `index_add` (so each
    /// token accumulates its experts in ascending expert order, as the reference does).
    pub fn forward_grouped(&self, xs: &Tensor, routing: &Routing) -> Result<Tensor> {
        let (n, h) = xs.dims2()?;
        let k = routing.ids.dim(1)?;
        let ids = routing.ids.flatten_all()?.to_vec1::<u32>()?;
        let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); self.num_experts];
        let mut slots: Vec<Vec<u32>> = vec![Vec::new(); self.num_experts];
        for (slot, &e) in ids.iter().enumerate() {
            let e = e as usize;
            if e >= self.num_experts {
                candle_core::bail!("router chose expert {e} of {}", self.num_experts)
            }
            tokens[e].push((slot / k) as u32);
            slots[e].push(slot as u32);
        }
        let weights = routing.weights.flatten_all()?.to_dtype(xs.dtype())?;
        let dev = xs.device();
        let mut outputs = Vec::new();
        let mut rows = Vec::with_capacity(n * k);
        for e in 0..self.num_experts {
            if tokens[e].is_empty() {
                continue;
            }
            let idx = Tensor::new(tokens[e].as_slice(), dev)?;
            let y = self.expert_forward(e, &xs.index_select(&idx, 0)?)?;
            let w = weights.index_select(&Tensor::new(slots[e].as_slice(), dev)?, 0)?;
            outputs.push(y.broadcast_mul(&w.unsqueeze(1)?)?);
            rows.extend_from_slice(&tokens[e]);
        }
        let out = Tensor::zeros((n, h), xs.dtype(), dev)?;
        if outputs.is_empty() {
            return Ok(out);
        }
        let rows = Tensor::new(rows.as_slice(), dev)?;
        out.index_add(&rows, &Tensor::cat(&outputs, 0)?, 0)
    }
}
