use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use step3_nn::Weight;

use crate::{MoeConfig, Routing};

/// The routed experts of one MoE layer, kept stacked as stored in the checkpoint:
/// `gate_proj [E, I, H]`, `up_proj [E, I, H]`, `down_proj [E, H, I]`. Expert `e` is the
/// zero-copy slice `[e]` of each tensor (for block-FP8 weights, of the values and the scales;
/// only the experts a step uses are dequantised).
///
/// A rank of an expert-parallel model holds a contiguous range of the experts (`first_expert..
/// first_expert + num_experts` of `total_experts`) and, under tensor parallelism, a slice of each
/// expert's intermediate columns; its output is then a partial sum the model all-reduces. Tokens
/// routed to experts it does not hold contribute nothing here. The weights may live on another
/// device than the activations (routed experts in host memory): only the rows routed to the held
/// experts cross to that device and back.
#[derive(Debug, Clone)]
pub struct StackedExperts {
    gate_proj: Weight,
    up_proj: Weight,
    down_proj: Weight,
    /// Experts held here.
    num_experts: usize,
    /// Global index of the first one.
    first_expert: usize,
    /// Experts of the whole layer (what the router chooses from).
    total_experts: usize,
    /// Where the weights live.
    device: Device,
}

/// The tokens of a batch routed to each expert held (by local index), both lists in token order.
pub(crate) struct Groups {
    /// The tokens routed to the expert.
    pub tokens: Vec<Vec<u32>>,
    /// Their routing slots (`token · k + j`).
    pub slots: Vec<Vec<u32>>,
}

/// Which part of a layer's routed experts a rank holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertSlice {
    /// Global index of the first expert held.
    pub first_expert: usize,
    /// Experts held (a contiguous range).
    pub num_experts: usize,
    /// Intermediate columns of each expert held (`moe_intermediate_size / tp`).
    pub intermediate_size: usize,
}

impl StackedExperts {
    /// Loads `{gate,up,down}_proj.weight` from `vb` (`model.layers.{i}.moe`).
    pub fn new(cfg: &MoeConfig, vb: VarBuilder) -> Result<Self> {
        let all =
            ExpertSlice { first_expert: 0, num_experts: cfg.num_experts, intermediate_size: cfg.moe_intermediate_size };
        Self::new_slice(cfg, all, vb)
    }

    /// Loads the slice `part` of the experts: `vb` must hand out exactly that slice of each
    /// stacked tensor (`[n, i, H]`, `[n, H, i]`), as a sharded checkpoint reader does.
    pub fn new_slice(cfg: &MoeConfig, part: ExpertSlice, vb: VarBuilder) -> Result<Self> {
        let (e, h, i) = (part.num_experts, cfg.hidden_size, part.intermediate_size);
        if e == 0 || part.first_expert + e > cfg.num_experts {
            candle_core::bail!(
                "experts {}..{} are not a slice of the layer's {} experts",
                part.first_expert,
                part.first_expert + e,
                cfg.num_experts
            )
        }
        let f = cfg.weight_format;
        Ok(Self {
            gate_proj: Weight::load(&vb.pp("gate_proj"), "weight", &[e, i, h], f)?,
            up_proj: Weight::load(&vb.pp("up_proj"), "weight", &[e, i, h], f)?,
            down_proj: Weight::load(&vb.pp("down_proj"), "weight", &[e, h, i], f)?,
            num_experts: e,
            first_expert: part.first_expert,
            total_experts: cfg.num_experts,
            device: vb.device().clone(),
        })
    }

    /// The device the expert weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Global index of the first expert held.
    pub fn first_expert(&self) -> usize {
        self.first_expert
    }

    /// Whether every expert of the layer is held here.
    pub fn holds_all(&self) -> bool {
        self.num_experts == self.total_experts
    }

    /// Bytes of all expert weights held in memory.
    pub fn storage_bytes(&self) -> usize {
        self.gate_proj.storage_bytes() + self.up_proj.storage_bytes() + self.down_proj.storage_bytes()
    }

    /// Experts held here (all of the layer's unless the model is expert-parallel).
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Expert `e` (global index, held here) alone on `xs: [N, H]` (moved to the experts' device
    /// and back if needed),
    /// before any routing weight: `down_e(silu(gate_e x) ⊙ up_e x)`, `[N, H]`.
    pub fn expert_forward(&self, e: usize, xs: &Tensor) -> Result<Tensor> {
        let local = match e.checked_sub(self.first_expert) {
            Some(l) if l < self.num_experts => l,
            _ => candle_core::bail!(
                "expert {e} of {} is not held here (experts {}..{})",
                self.total_experts,
                self.first_expert,
                self.first_expert + self.num_experts
            ),
        };
        let x = xs.to_device(&self.device)?;
        let gate = self.gate_proj.get(local)?.matmul_t(&x)?;
        let up = self.up_proj.get(local)?.matmul_t(&x)?;
        self.down_proj.get(local)?.matmul_t(&(step3_nn::silu(&gate)? * up)?)?.to_device(xs.device())
    }

    /// `xs: [N, H]` → `Σ_j weights[n, j] · Expert_{ids[n, j]}(xs[n])`, `[N, H]`, the sum over the
    /// experts held here, on `xs`'s device.
    ///
    /// With the weights on another device, the rows routed to a held expert are copied there,
    /// computed, and copied back. On CUDA with every expert held, dense and bf16/f16, this is
    /// [`Self::forward_fused`] (no host round-trip); on the CPU, [`Self::forward_cpu`] where it
    /// applies; otherwise [`Self::forward_grouped`].
    pub fn forward(&self, xs: &Tensor, routing: &Routing) -> Result<Tensor> {
        if !self.device.same_device(xs.device()) {
            return self.forward_elsewhere(xs, routing);
        }
        let dense_half = matches!((&self.gate_proj, xs.dtype()), (Weight::Dense(_), DType::BF16 | DType::F16));
        if xs.device().is_cuda() && dense_half && self.holds_all() {
            self.forward_fused(xs, routing)
        } else {
            self.grouped(xs, routing)
        }
    }

    /// [`Self::forward_cpu`] where it applies, else [`Self::forward_grouped`].
    fn grouped(&self, xs: &Tensor, routing: &Routing) -> Result<Tensor> {
        match self.forward_cpu(xs, routing)? {
            Some(y) => Ok(y),
            None => self.forward_grouped(xs, routing),
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

    /// [`Self::forward`] with the weights on another device than `xs`: only the rows routed to
    /// a held expert cross, with their routing.
    pub(crate) fn forward_elsewhere(&self, xs: &Tensor, routing: &Routing) -> Result<Tensor> {
        let (n, h) = xs.dims2()?;
        let ids = routing.ids.to_vec2::<u32>()?;
        let held = self.first_expert as u32..(self.first_expert + self.num_experts) as u32;
        let rows: Vec<u32> = (0..n as u32).filter(|&r| ids[r as usize].iter().any(|e| held.contains(e))).collect();
        let out = Tensor::zeros((n, h), xs.dtype(), xs.device())?;
        if rows.is_empty() {
            return Ok(out);
        }
        let idx = Tensor::new(rows.as_slice(), xs.device())?;
        let sub = |t: &Tensor| -> Result<Tensor> { t.index_select(&idx, 0)?.to_device(&self.device) };
        let part = Routing { ids: sub(&routing.ids)?, weights: sub(&routing.weights)? };
        let y = self.grouped(&sub(xs)?, &part)?.to_device(xs.device())?;
        out.index_add(&idx, &y, 0)
    }

    /// The grouped path.
    ///
    /// Tokens are grouped per expert (the routing ids are read on the host to build the
    /// groups), each active expert runs its three matmuls once on its group, the weighted outputs
    /// are concatenated in expert order and scattered back with a single `index_add` (so each
    /// token accumulates its experts in ascending expert order, as the reference does). Experts
    /// not held here are skipped.
    pub fn forward_grouped(&self, xs: &Tensor, routing: &Routing) -> Result<Tensor> {
        let (n, h) = xs.dims2()?;
        let Groups { tokens, slots } = self.groups(routing)?;
        let weights = routing.weights.flatten_all()?.to_dtype(xs.dtype())?;
        let dev = xs.device();
        let mut outputs = Vec::new();
        let mut rows = Vec::with_capacity(n * routing.ids.dim(1)?);
        for e in 0..self.num_experts {
            if tokens[e].is_empty() {
                continue;
            }
            let idx = Tensor::new(tokens[e].as_slice(), dev)?;
            let y = self.expert_forward(self.first_expert + e, &xs.index_select(&idx, 0)?)?;
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

    /// The tokens routed to each expert held here, and their routing slots; experts not held
    /// here are skipped.
    pub(crate) fn groups(&self, routing: &Routing) -> Result<Groups> {
        let k = routing.ids.dim(1)?;
        let ids = routing.ids.flatten_all()?.to_vec1::<u32>()?;
        let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); self.num_experts];
        let mut slots: Vec<Vec<u32>> = vec![Vec::new(); self.num_experts];
        for (slot, &e) in ids.iter().enumerate() {
            let e = e as usize;
            if e >= self.total_experts {
                candle_core::bail!("router chose expert {e} of {}", self.total_experts)
            }
            let Some(local) = e.checked_sub(self.first_expert).filter(|&l| l < self.num_experts) else {
                continue;
            };
            tokens[local].push((slot / k) as u32);
            slots[local].push(slot as u32);
        }
        Ok(Groups { tokens, slots })
    }

    /// [`Self::forward_grouped`] on the CPU's skinny kernels in two parallel regions: the gate and
    /// up products of every active expert in one, the down products in the other
    /// ([`Weight::matmul_t_many`]), instead of three hand-offs to the thread pool per expert and
    /// the tensor ops around them. Between them the values are rounded to the compute dtype
    /// exactly where the grouped path's tensor ops round them (each product, SiLU, the gating
    /// product, the routing-weight product and each accumulation, in ascending expert order per
    /// token), so the output is the grouped path's, bit for bit.
    ///
    /// `None` (the caller takes the grouped path) unless activations and weights are on the CPU
    /// in f32, bf16 or f16, every expert has at most [`step3_nn::cpu::MAX_ROWS`] tokens (decode
    /// and batched decode; prefill stays on the GEMM) and the kernels are on.
    pub fn forward_cpu(&self, xs: &Tensor, routing: &Routing) -> Result<Option<Tensor>> {
        let round: fn(f32) -> f32 = match xs.dtype() {
            DType::F32 => |v| v,
            DType::BF16 => |v| half::bf16::from_f32(v).to_f32(),
            DType::F16 => |v| half::f16::from_f32(v).to_f32(),
            _ => return Ok(None),
        };
        if !xs.device().is_cpu() || !self.device.is_cpu() || !step3_nn::cpu::enabled() {
            return Ok(None);
        }
        let (n, h) = xs.dims2()?;
        let Groups { tokens, slots } = self.groups(routing)?;
        if tokens.iter().any(|t| t.len() > step3_nn::cpu::MAX_ROWS) {
            return Ok(None);
        }
        let weights: Vec<f32> = routing.weights.flatten_all()?.to_dtype(xs.dtype())?.to_dtype(DType::F32)?.to_vec1()?;
        let x: Vec<f32> = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let active: Vec<usize> = (0..self.num_experts).filter(|&e| !tokens[e].is_empty()).collect();
        let gather =
            |e: usize| -> Vec<f32> { tokens[e].iter().flat_map(|&t| &x[t as usize * h..][..h]).copied().collect() };
        let inputs: Vec<Vec<f32>> = active.iter().map(|&e| gather(e)).collect();
        let expert = |w: &Weight| -> Result<Vec<Weight>> { active.iter().map(|&e| w.get(e)).collect() };
        let (gate, up, down) = (expert(&self.gate_proj)?, expert(&self.up_proj)?, expert(&self.down_proj)?);
        let mut items = Vec::with_capacity(2 * active.len());
        for (i, &e) in active.iter().enumerate() {
            items.push((&gate[i], inputs[i].as_slice(), tokens[e].len()));
            items.push((&up[i], inputs[i].as_slice(), tokens[e].len()));
        }
        let Some(gate_up) = Weight::matmul_t_many(&items)? else {
            return Ok(None);
        };
        let hidden: Vec<Vec<f32>> = gate_up
            .par_chunks(2)
            .map(|p| {
                p[0].iter().zip(&p[1]).map(|(g, u)| round(round(step3_nn::silu_f32(round(*g))) * round(*u))).collect()
            })
            .collect();
        let items: Vec<_> =
            active.iter().enumerate().map(|(i, &e)| (&down[i], hidden[i].as_slice(), tokens[e].len())).collect();
        let Some(ys) = Weight::matmul_t_many(&items)? else {
            return Ok(None);
        };
        // Each token's outputs, in ascending expert order: (expert's output, its row, slot).
        let mut parts: Vec<Vec<(usize, usize, usize)>> = vec![Vec::new(); n];
        for (i, &e) in active.iter().enumerate() {
            for (row, (&t, &slot)) in tokens[e].iter().zip(&slots[e]).enumerate() {
                parts[t as usize].push((i, row, slot as usize));
            }
        }
        let mut out = vec![0f32; n * h];
        out.par_chunks_mut(h).zip(&parts).for_each(|(dst, parts)| {
            for &(i, row, slot) in parts {
                let w = weights[slot];
                for (o, v) in dst.iter_mut().zip(&ys[i][row * h..][..h]) {
                    *o = round(*o + round(round(*v) * w));
                }
            }
        });
        Tensor::from_vec(out, (n, h), xs.device())?.to_dtype(xs.dtype()).map(Some)
    }
}
