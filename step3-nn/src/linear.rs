use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::{Weight, WeightFormat};

/// A linear layer `y = x · Wᵀ (+ b)` with the PyTorch weight layout `[out, in]`.
///
/// Input `[..., in]`, output `[..., out]`. This is the single type every Step3 projection goes
/// through: the weight may be dense or block-FP8 (dequantised on each use, see [`Weight`]), and
/// the layers using it never need to know.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` `[out, in]` (and `bias` `[out]` when `bias` is true) from `vb`, stored as
    /// `format` says.
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, format: WeightFormat, vb: VarBuilder) -> Result<Self> {
        let weight = Weight::load(&vb, "weight", &[out_dim, in_dim], format)?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Ok(Self::from_weight(weight, bias))
    }

    /// Wraps an existing weight `[out, in]` and optional bias `[out]`.
    pub fn from_weight(weight: Weight, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    /// Bytes of weight and bias held in memory.
    pub fn storage_bytes(&self) -> usize {
        self.weight.storage_bytes() + self.bias.as_ref().map(crate::tensor_bytes).unwrap_or(0)
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let y = self.weight.matmul_t(xs)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
