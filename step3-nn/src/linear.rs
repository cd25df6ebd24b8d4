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

    /// Every layer of `layers` applied to the same `xs` (q, k and v of one input; gate and up):
    /// each result is that layer's [`Module::forward`], bit for bit. On the CPU kernels (few
    /// rows, [`Weight::matmul_t_many`]) the products run in one parallel region, one hand-off to
    /// the thread pool instead of one per layer, and `xs` is widened to f32 once.
    pub fn forward_many(layers: &[&Linear], xs: &Tensor) -> Result<Vec<Tensor>> {
        if let Some(ys) = Self::forward_many_cpu(layers, xs)? {
            return Ok(ys);
        }
        layers.iter().map(|l| l.forward(xs)).collect()
    }

    fn forward_many_cpu(layers: &[&Linear], xs: &Tensor) -> Result<Option<Vec<Tensor>>> {
        let Some(in_dim) = xs.dims().last().copied() else {
            return Ok(None);
        };
        let shaped = |l: &Linear| l.weight.dims().len() == 2 && l.weight.dims()[1] == in_dim;
        if layers.len() < 2 || in_dim == 0 || !xs.device().is_cpu() || !layers.iter().all(|l| shaped(l)) {
            return Ok(None);
        }
        let m = xs.elem_count() / in_dim;
        if m == 0 || m > crate::cpu::MAX_ROWS {
            return Ok(None);
        }
        let x: Vec<f32> = xs.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        let items: Vec<(&Weight, &[f32], usize)> = layers.iter().map(|l| (&l.weight, x.as_slice(), m)).collect();
        let Some(ys) = Weight::matmul_t_many(&items)? else {
            return Ok(None);
        };
        let lead = &xs.dims()[..xs.rank() - 1];
        let mut out = Vec::with_capacity(layers.len());
        for (l, y) in layers.iter().zip(ys) {
            let n = l.weight.dims()[0];
            let acc = Tensor::from_vec(y, (m, n), xs.device())?.reshape([lead, &[n]].concat())?;
            let acc = match &l.bias {
                None => acc,
                Some(b) => acc.broadcast_add(&b.to_dtype(acc.dtype())?)?,
            };
            out.push(acc.to_dtype(xs.dtype())?);
        }
        Ok(Some(out))
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

    /// `forward_many` gives each layer's own `forward`, bit for bit: f32 and bf16, with and
    /// without a bias, few rows (one parallel region) and more than the kernels take (one by one).
    #[test]
    fn forward_many_is_each_forward() -> Result<()> {
        let dev = Device::Cpu;
        let vals = |n: usize, s: usize| -> Vec<f32> {
            (0..n).map(|i| ((((i + s) * 2654435761) % 1000) as f32 / 1000.0 - 0.5) * 3.0).collect()
        };
        for dtype in [DType::F32, DType::BF16] {
            let (k, n) = (37, 21);
            let lin = |s: usize, n: usize, bias: bool| -> Result<Linear> {
                let w = Tensor::from_vec(vals(n * k, s), (n, k), &dev)?.to_dtype(dtype)?;
                let b = if bias { Some(Tensor::from_vec(vals(n, s + 1), n, &dev)?.to_dtype(dtype)?) } else { None };
                Ok(Linear::from_weight(Weight::Dense(w), b))
            };
            let layers = [lin(1, n, false)?, lin(2, 2 * n + 3, true)?, lin(3, 5, false)?];
            let refs: Vec<&Linear> = layers.iter().collect();
            for rows in [1, 5, crate::cpu::MAX_ROWS + 3] {
                let x = Tensor::from_vec(vals(rows * k, rows), (1, rows, k), &dev)?.to_dtype(dtype)?;
                let got = Linear::forward_many(&refs, &x)?;
                assert_eq!(got.len(), layers.len());
                for (l, g) in layers.iter().zip(&got) {
                    let want = l.forward(&x)?;
                    assert_eq!(g.dims(), want.dims());
                    assert_eq!(g.dtype(), dtype);
                    let (g, want) = (g.to_dtype(DType::F32)?.flatten_all()?, want.to_dtype(DType::F32)?.flatten_all()?);
                    assert_eq!(g.to_vec1::<f32>()?, want.to_vec1::<f32>()?, "{dtype:?}, {rows} rows");
                }
            }
        }
        Ok(())
    }
}
