use candle_core::{DType, Result, Tensor};

/// SiLU, `x · σ(x)`, rounded the way PyTorch rounds it.
///
/// For f32/f64 this is candle's kernel. For bf16/f16 the activation is widened to f32, computed
/// there and rounded back once, as PyTorch's CPU and CUDA kernels do; candle's own half-precision
/// kernel instead rounds `exp(−x)`, `1 + exp(−x)` and the quotient to the narrow type one after
/// another, which drifts from the reference by a unit in the last place on a large share of the
/// values.
///
/// Shape: any; output like the input.
pub fn silu(xs: &Tensor) -> Result<Tensor> {
    match xs.dtype() {
        DType::BF16 | DType::F16 => xs.to_dtype(DType::F32)?.silu()?.to_dtype(xs.dtype()),
        _ => xs.silu(),
    }
}

/// SiLU of one f32 value, `v / (1 + e^-v)`: what candle's f32 kernel, and so [`silu`] (before
/// its rounding to a half-precision dtype), computes for each element. For callers that fuse
/// SiLU into loops of their own (the routed experts on the CPU).
pub fn silu_f32(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn silu_f32_is_candles_kernel_bit_for_bit() -> Result<()> {
        let xs: Vec<f32> = (0..4000).map(|i| (i as f32 - 2000.0) * 0.0173).chain([0.0, -0.0, 88.7, -104.0]).collect();
        let got = silu(&Tensor::new(xs.as_slice(), &Device::Cpu)?)?.to_vec1::<f32>()?;
        for (g, v) in got.iter().zip(&xs) {
            assert_eq!(g.to_bits(), silu_f32(*v).to_bits(), "silu({v})");
        }
        Ok(())
    }

    #[test]
    fn half_precision_silu_is_rounded_once() -> Result<()> {
        let xs: Vec<f32> = (0..4000).map(|i| (i as f32 - 2000.0) * 0.0037).collect();
        let x = Tensor::new(xs.as_slice(), &Device::Cpu)?.to_dtype(DType::BF16)?;
        let got = silu(&x)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let wide = x.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        for (g, v) in got.iter().zip(wide) {
            let want = half::bf16::from_f32(v / (1.0 + (-v).exp())).to_f32();
            assert_eq!(*g, want, "silu({v})");
        }
        Ok(())
    }
}
