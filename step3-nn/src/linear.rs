use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::{Weight, WeightFormat};

/// A linear layer `y = x · Wᵀ (+ b)` with the PyTorch weight layout `[out, in]`.
///
/// Input `[..., in]`, output `[..., out]`. With a bias and a half-precision input, the bias is
/// added to the f32 product before the one rounding (on the CPU), as PyTorch does. This is the
/// single type every Step3 projection goes through: the weight may be dense or block-FP8
/// (dequantised on each use, see [`Weight`]), and the layers using it never need to know.
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
        match &self.bias {
            None => self.weight.matmul_t(xs),
            // PyTorch's `addmm` adds the bias to the f32 accumulator and rounds once; rounding the
            // product to bf16 first and adding the bias in bf16 rounds twice.
            Some(b) => {
                let acc = self.weight.matmul_t_acc(xs)?;
                acc.broadcast_add(&b.to_dtype(acc.dtype())?)?.to_dtype(xs.dtype())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    /// bf16 with a bias: `round(x·Wᵀ + b)` computed in f32, one rounding (PyTorch's addmm).
    #[test]
    fn half_precision_bias_is_added_before_the_rounding() -> Result<()> {
        let dev = Device::Cpu;
        let vals = |n: usize, s: usize| -> Vec<f32> {
            (0..n).map(|i| ((((i + s) * 2654435761) % 1000) as f32 / 1000.0 - 0.5) * 3.0).collect()
        };
        let w = Tensor::from_vec(vals(6 * 5, 1), (6, 5), &dev)?.to_dtype(DType::BF16)?;
        let b = Tensor::from_vec(vals(6, 2), 6, &dev)?.to_dtype(DType::BF16)?;
        let x = Tensor::from_vec(vals(4 * 5, 3), (4, 5), &dev)?.to_dtype(DType::BF16)?;
        let lin = Linear::from_weight(Weight::Dense(w.clone()), Some(b.clone()));
        let got = lin.forward(&x)?;
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let want = f(&x)?.matmul(&f(&w)?.t()?)?.broadcast_add(&f(&b)?)?.to_dtype(DType::BF16)?;
        let diff = (f(&got)? - f(&want)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }
}
