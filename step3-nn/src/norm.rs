use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// Root-mean-square normalisation over the last dimension, Step3 flavour.
///
/// `y = (x · rsqrt(mean(x²) + eps)) · g`, written op for op as StepFun's reference writes it: the
/// input is widened to f32, `mean(x²)` is a sum divided by `n`, `rsqrt` is `1 / sqrt`, the
/// normalised value is rounded back to the activation dtype *before* the gain `g` is applied (in
/// the activation dtype). Dividing by `sqrt` instead of multiplying by its reciprocal (what a
/// fused `x / sqrt(...)` kernel does) flips the bf16 rounding of some outputs. No `+1` offset on
/// the gain.
///
/// Shapes: input `[..., n]`, gain `[n]`, output like the input.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Loads the gain `weight` of shape `[size]` from `vb`.
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(size, "weight")?;
        Self::from_weight(weight, eps)
    }

    /// Builds the norm from an existing gain tensor `[n]`.
    pub fn from_weight(weight: Tensor, eps: f64) -> Result<Self> {
        weight.dims1()?;
        Ok(Self { weight, eps })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Bytes of the gain.
    pub fn storage_bytes(&self) -> usize {
        crate::tensor_bytes(&self.weight)
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let x32 = xs.to_dtype(DType::F32)?;
        let n = Tensor::new(x32.dim(D::Minus1)? as f32, x32.device())?;
        let mean_sq = x32.sqr()?.sum_keepdim(D::Minus1)?.broadcast_div(&n)?;
        let rsqrt = (mean_sq + self.eps)?.sqrt()?.recip()?;
        x32.broadcast_mul(&rsqrt)?.to_dtype(xs.dtype())?.broadcast_mul(&self.weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The textbook formula, written out with elementary ops in f64.
    fn reference(x: &[f32], g: &[f32], eps: f64) -> Vec<f32> {
        let ms = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + eps).sqrt();
        x.iter().zip(g).map(|(v, g)| (*v as f64 * r * *g as f64) as f32).collect()
    }

    #[test]
    fn matches_formula_in_f32() -> Result<()> {
        let dev = Device::Cpu;
        let x: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let g: Vec<f32> = (0..6).map(|i| 0.5 + i as f32 * 0.1).collect();
        let norm = RmsNorm::from_weight(Tensor::new(g.as_slice(), &dev)?, 1e-5)?;
        let y = norm.forward(&Tensor::from_vec(x.clone(), (2, 6), &dev)?)?;
        let y = y.flatten_all()?.to_vec1::<f32>()?;
        let want: Vec<f32> = x.chunks(6).flat_map(|row| reference(row, &g, 1e-5)).collect();
        for (a, b) in y.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
        }
        Ok(())
    }

    /// The reference's arithmetic in f32: `x · (1 / sqrt(Σx² / n + eps))`, rounded to bf16, times
    /// the bf16 gain, rounded again. Bit for bit.
    #[test]
    fn bf16_rounds_like_the_reference() -> Result<()> {
        let dev = Device::Cpu;
        let n = 48;
        let x: Vec<f32> = (0..4 * n).map(|i| (i as f32 * 0.91).cos() * 7.0 + 0.3).collect();
        let g: Vec<f32> = (0..n).map(|i| 1.0 + i as f32 * 0.013).collect();
        let gain = Tensor::new(g.as_slice(), &dev)?.to_dtype(DType::BF16)?;
        let norm = RmsNorm::from_weight(gain.clone(), 1e-5)?;
        let xb = Tensor::from_vec(x, (4, n), &dev)?.to_dtype(DType::BF16)?;
        let y = norm.forward(&xb)?;
        assert_eq!(y.dtype(), DType::BF16);
        let gf = gain.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let got = y.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (row, got) in xb.to_dtype(DType::F32)?.to_vec2::<f32>()?.iter().zip(got) {
            let ms = row.iter().fold(0f32, |acc, v| acc + v * v) / n as f32;
            let r = 1.0 / (ms + 1e-5f32).sqrt();
            for ((v, g), got) in row.iter().zip(&gf).zip(got) {
                let u = half::bf16::from_f32(v * r).to_f32();
                assert_eq!(got, half::bf16::from_f32(u * g).to_f32());
            }
        }
        Ok(())
    }
}
