use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Root-mean-square normalisation over the last dimension, Step3 flavour.
///
/// `y = (x / sqrt(mean(x²) + eps)) · g`. The normalisation runs in f32; for a lower-precision
/// activation dtype the normalised value is cast back to that dtype *before* the gain `g` is
/// applied (in the activation dtype), as StepFun's reference does. For f32 activations this is a
/// single fused kernel. No `+1` offset on the gain.
///
/// Shapes: input `[..., n]`, gain `[n]`, output like the input.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    /// All-ones gain in f32, used to run the fused kernel as a pure normaliser.
    unit: Tensor,
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
        let n = weight.dims1()?;
        let unit = Tensor::ones(n, DType::F32, weight.device())?;
        Ok(Self { weight, unit, eps })
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
        let xs = xs.contiguous()?;
        if xs.dtype() == DType::F32 && self.weight.dtype() == DType::F32 {
            return candle_nn::ops::rms_norm(&xs, &self.weight, self.eps as f32);
        }
        let normed = candle_nn::ops::rms_norm(&xs.to_dtype(DType::F32)?, &self.unit, self.eps as f32)?;
        normed.to_dtype(xs.dtype())?.broadcast_mul(&self.weight)
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

    #[test]
    fn bf16_applies_gain_after_the_cast() -> Result<()> {
        let dev = Device::Cpu;
        let x: Vec<f32> = (0..8).map(|i| (i as f32 * 0.91).cos() * 7.0 + 0.3).collect();
        let g: Vec<f32> = (0..8).map(|i| 1.0 + i as f32 * 0.013).collect();
        let gain = Tensor::new(g.as_slice(), &dev)?.to_dtype(DType::BF16)?;
        let norm = RmsNorm::from_weight(gain.clone(), 1e-5)?;
        let xb = Tensor::new(x.as_slice(), &dev)?.to_dtype(DType::BF16)?;
        let y = norm.forward(&xb)?;
        assert_eq!(y.dtype(), DType::BF16);
        // Expected: normalise in f32, round to bf16, multiply by the bf16 gain, round to bf16.
        let xf = xb.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let gf = gain.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let unit = reference(&xf, &[1.0; 8], 1e-5);
        let want: Vec<f32> = unit
            .iter()
            .zip(&gf)
            .map(|(u, g)| {
                let u = half::bf16::from_f32(*u).to_f32();
                half::bf16::from_f32(u * g).to_f32()
            })
            .collect();
        let got = y.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-2 * b.abs(), "{a} vs {b}");
        }
        Ok(())
    }
}
