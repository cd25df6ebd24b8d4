use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// A linear layer `y = x · Wᵀ (+ b)` with the PyTorch weight layout `[out, in]`.
///
/// Input `[..., in]`, output `[..., out]`. This is the single type every Step3 projection goes
/// through, so alternative weight formats (block-FP8) can be added here without touching the
/// layers that use it.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    /// Loads `weight` `[out, in]` (and `bias` `[out]` when `bias` is true) from `vb`.
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Ok(Self::from_weights(weight, bias))
    }

    /// Wraps existing tensors: `weight` `[out, in]`, optional `bias` `[out]`.
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { inner: candle_nn::Linear::new(weight, bias) }
    }

    /// The weight, `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.inner.forward(xs)
    }
}
