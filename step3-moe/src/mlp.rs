use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use step3_nn::{Linear, WeightFormat};

/// SwiGLU feed-forward: `down(silu(gate(x)) ⊙ up(x))`, no biases.
///
/// Weights `gate_proj [I, H]`, `up_proj [I, H]`, `down_proj [H, I]`. Used for Step3's dense
/// layers (`mlp`, I = 18432) and the shared expert of MoE layers (`share_expert`, I = 5120).
#[derive(Debug, Clone)]
pub struct SwiGluMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl SwiGluMlp {
    pub fn new(hidden_size: usize, intermediate_size: usize, format: WeightFormat, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gate_proj: Linear::new(hidden_size, intermediate_size, false, format, vb.pp("gate_proj"))?,
            up_proj: Linear::new(hidden_size, intermediate_size, false, format, vb.pp("up_proj"))?,
            down_proj: Linear::new(intermediate_size, hidden_size, false, format, vb.pp("down_proj"))?,
        })
    }

    /// Bytes of all weights held in memory.
    pub fn storage_bytes(&self) -> usize {
        self.gate_proj.storage_bytes() + self.up_proj.storage_bytes() + self.down_proj.storage_bytes()
    }
}

impl Module for SwiGluMlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // Gate and up in one parallel region on the CPU kernels.
        let mut gu = Linear::forward_many(&[&self.gate_proj, &self.up_proj], xs)?.into_iter();
        let (Some(gate), Some(up)) = (gu.next(), gu.next()) else {
            candle_core::bail!("forward_many returned fewer than two projections")
        };
        self.down_proj.forward(&(step3_nn::silu(&gate)? * up)?)
    }
}
