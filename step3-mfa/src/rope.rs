use candle_core::{DType, Device, Result, Tensor};

/// NeoX-style ("rotate half") rotary position embedding over the full head dimension.
///
/// Element `i` is paired with element `i + d/2`; the inverse frequencies are
/// `theta^(-2i/d)` for `i = 0..d/2`, computed in f32. cos/sin are produced on the fly for the
/// positions of each step (no table sized by the maximum context), in f32 and then cast to the
/// activation dtype, as the reference does.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// `[d/2]`, f32.
    inv_freq: Tensor,
    head_dim: usize,
}

impl RotaryEmbedding {
    pub fn new(theta: f64, head_dim: usize, device: &Device) -> Result<Self> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            candle_core::bail!("rotary embedding needs an even head_dim, got {head_dim}")
        }
        let theta = theta as f32;
        let inv_freq: Vec<f32> =
            (0..head_dim).step_by(2).map(|i| 1.0 / theta.powf(i as f32 / head_dim as f32)).collect();
        let inv_freq = Tensor::from_vec(inv_freq, head_dim / 2, device)?;
        Ok(Self { inv_freq, head_dim })
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// cos and sin for `positions` (`[B, T]`, u32), each `[B, T, d/2]` in `dtype`.
    pub fn cos_sin(&self, positions: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let pos = positions.to_dtype(DType::F32)?.reshape((b, t, 1))?;
        let freqs = pos.broadcast_mul(&self.inv_freq.reshape((1, 1, self.head_dim / 2))?)?;
        Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
    }

    /// Applies the rotation to `xs: [B, T, H, d]` with cos/sin from [`Self::cos_sin`].
    pub fn apply(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        candle_nn::rotary_emb::rope_thd(&xs.contiguous()?, cos, sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotate_half_pairs_i_with_i_plus_half() -> Result<()> {
        let dev = Device::Cpu;
        let d = 8;
        let rope = RotaryEmbedding::new(10_000.0, d, &dev)?;
        let x: Vec<f32> = (0..2 * d).map(|i| (i as f32 * 0.7).sin()).collect();
        let xs = Tensor::from_vec(x.clone(), (1, 2, 1, d), &dev)?;
        let positions = Tensor::new(&[[3u32, 11]], &dev)?;
        let (cos, sin) = rope.cos_sin(&positions, DType::F32)?;
        let got = rope.apply(&xs, &cos, &sin)?.flatten_all()?.to_vec1::<f32>()?;
        for (t, pos) in [3f64, 11.].iter().enumerate() {
            let row = &x[t * d..(t + 1) * d];
            for i in 0..d / 2 {
                let inv = 1.0 / 10_000f64.powf((2 * i) as f64 / d as f64);
                let (s, c) = (pos * inv).sin_cos();
                let (a, b) = (row[i] as f64, row[i + d / 2] as f64);
                let want_lo = a * c - b * s;
                let want_hi = b * c + a * s;
                assert!((got[t * d + i] as f64 - want_lo).abs() < 1e-5);
                assert!((got[t * d + i + d / 2] as f64 - want_hi).abs() < 1e-5);
            }
        }
        Ok(())
    }

    #[test]
    fn odd_head_dim_is_rejected() {
        assert!(RotaryEmbedding::new(10_000.0, 7, &Device::Cpu).is_err());
    }
}
