//! The vision tower (an Eva-CLIP-style ViT with post-branch LayerNorm) and the projector that
//! downsamples its grid 4× per side and maps it into the language model's width.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
// `Conv2d::config()` and `bias()` are used by the CPU half-precision path.
use step3_nn::{Linear, WeightFormat};

use crate::resample::resize_bicubic_aa;
use crate::VisionConfig;

/// Intermediate results of one forward pass, for tests and diagnostics.
#[derive(Debug, Clone)]
pub struct VisionOutputs {
    /// ViT output including the 3 padding copies and the CLS token: `[B, 4 + g², D]`.
    pub encoder_out_full: Tensor,
    /// After `vit_downsampler`: `[B, O, h1, h1]`.
    pub down1: Tensor,
    /// After `vit_downsampler2`: `[B, 2·O, h2, h2]`.
    pub down2: Tensor,
    /// Image features in the language model's width: `[B, h2², H]`.
    pub projected: Tensor,
}

/// A convolution that, on the CPU, runs half-precision inputs in f32 and rounds the result back
/// (candle's CPU conv2d has no bf16 kernel; a bf16 convolution accumulates in f32 anyway).
#[derive(Debug, Clone)]
struct Conv(Conv2d);

impl Conv {
    fn new(in_c: usize, out_c: usize, k: usize, cfg: Conv2dConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self(candle_nn::conv2d(in_c, out_c, k, cfg, vb)?))
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !x.device().is_cpu() || x.dtype() == DType::F32 {
            return self.0.forward(x);
        }
        let w = self.0.weight().to_dtype(DType::F32)?;
        let b = self.0.bias().map(|b| b.to_dtype(DType::F32)).transpose()?;
        let conv = Conv2d::new(w, b, *self.0.config());
        conv.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())
    }
}

/// Patch embedding, class token, position table (plus its resized copy for crops) and the three
/// duplicated CLS "padding" tokens.
#[derive(Debug, Clone)]
struct Embeddings {
    patch_embedding: Conv,
    class_embedding: Tensor,
    /// `[1 + G², D]` for the global view.
    position_embedding: Tensor,
    /// `[1 + g², D]` for crops, resized once at load (antialiased bicubic), if a crop size is set.
    crop_position_embedding: Option<(usize, Tensor)>,
    patch_size: usize,
}

impl Embeddings {
    fn new(cfg: &VisionConfig, crop_size: Option<usize>, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let conv = Conv2dConfig { stride: cfg.patch_size, ..Default::default() };
        let patch_embedding = Conv::new(cfg.num_channels, d, cfg.patch_size, conv, vb.pp("patch_embedding"))?;
        // The checkpoint holds `[1, D]`; accept `[D]` too.
        let class_embedding = match vb.get((1, d), "class_embedding") {
            Ok(t) => t,
            Err(_) => vb.get(d, "class_embedding")?.reshape((1, d))?,
        };
        let g = cfg.grid(cfg.image_size);
        let position_embedding = vb.pp("position_embedding").get((1 + g * g, d), "weight")?;
        let crop_position_embedding = match crop_size {
            Some(c) if cfg.grid(c) != g => {
                Some((cfg.grid(c), Self::resize_table(&position_embedding, g, cfg.grid(c))?))
            }
            _ => None,
        };
        Ok(Self {
            patch_embedding,
            class_embedding,
            position_embedding,
            crop_position_embedding,
            patch_size: cfg.patch_size,
        })
    }

    /// Resizes the `G × G` part of a `[1 + G², D]` table to `g × g` with antialiased bicubic
    /// interpolation in f32 (row 0, the class position, is kept), as the reference does.
    fn resize_table(table: &Tensor, from: usize, to: usize) -> Result<Tensor> {
        let d = table.dim(1)?;
        let dtype = table.dtype();
        let table = table.to_dtype(DType::F32)?;
        let grid = table.narrow(0, 1, from * from)?.t()?.reshape((d, from, from))?.contiguous()?;
        let resized = resize_bicubic_aa(&grid, to, to)?; // [d, to, to]
        let resized = resized.reshape((d, to * to))?.t()?;
        Tensor::cat(&[&table.narrow(0, 0, 1)?, &resized], 0)?.to_dtype(dtype)
    }

    /// The position table for a grid of `g × g` patches.
    fn positions(&self, g: usize) -> Result<Tensor> {
        let full = self.position_embedding.dim(0)?;
        if g * g + 1 == full {
            return Ok(self.position_embedding.clone());
        }
        match &self.crop_position_embedding {
            Some((cg, t)) if *cg == g => Ok(t.clone()),
            _ => candle_core::bail!(
                "no position table for a {g}x{g} patch grid: the model was built for {}x{} and crops of {}",
                ((full - 1) as f64).sqrt() as usize,
                ((full - 1) as f64).sqrt() as usize,
                self.crop_position_embedding.as_ref().map_or("none".to_string(), |(g, _)| format!("{g}x{g}"))
            ),
        }
    }

    /// `[B, C, S, S]` pixels → `[B, 4 + g², D]`.
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, _, s, _) = pixels.dims4()?;
        let g = s / self.patch_size;
        let patches = self.patch_embedding.forward(pixels)?; // [B, D, g, g]
        let d = patches.dim(1)?;
        let patches = patches.flatten_from(2)?.transpose(1, 2)?; // [B, g², D], row-major
        let cls = self.class_embedding.reshape((1, 1, d))?.broadcast_as((b, 1, d))?.to_dtype(patches.dtype())?;
        let x = Tensor::cat(&[&cls, &patches], 1)?;
        let x = x.broadcast_add(&self.positions(g)?.to_dtype(x.dtype())?.unsqueeze(0)?)?;
        // Three more copies of the position-embedded class token in front ("TP padding").
        let first = x.narrow(1, 0, 1)?;
        Tensor::cat(&[&first, &first, &first, &x], 1)
    }
}

#[derive(Debug, Clone)]
struct SelfAttention {
    qkv_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
}

impl SelfAttention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let (n, hd) = (self.num_heads, d / self.num_heads);
        let qkv = self.qkv_proj.forward(x)?.reshape((b, t, 3, n, hd))?.permute((2, 0, 3, 1, 4))?; // [3, B, n, T, hd]
        let (q, k, v) = (qkv.get(0)?.contiguous()?, qkv.get(1)?.contiguous()?, qkv.get(2)?.contiguous()?);
        let out = flash_attention(&q, &k, &v, 1.0 / (hd as f64).sqrt())?.transpose(1, 2)?.reshape((b, t, d))?;
        self.out_proj.forward(&out)
    }
}

/// Keys per block of PyTorch's CPU flash-attention kernel (`kvSplitSize`).
const FLASH_KV_BLOCK: usize = 512;

/// `softmax(q·kᵀ·scale)·v` as PyTorch's CPU flash-attention kernel computes it, which is what the
/// reference's `scaled_dot_product_attention` runs for the ViT (equal head counts, no mask):
/// scores in f32, then per block of 512 keys the running maximum, `exp(s − max)` summed in f32
/// but rounded to the activation dtype before it multiplies v (f32 accumulation), the previous
/// blocks rescaled by `exp(old max − new max)`, and the sum divided out at the end, rounded once.
/// For f32 activations nothing is rounded on the way.
///
/// Shapes: `q [B, n, T, d]`, `k`, `v` `[B, n, S, d]` → `[B, n, T, d]` in `q`'s dtype.
fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let dtype = q.dtype();
    let (q, k, v) = (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
    let s = k.dim(2)?;
    let mut state: Option<(Tensor, Tensor, Tensor)> = None; // (max, sum, acc)
    for start in (0..s).step_by(FLASH_KV_BLOCK) {
        let len = FLASH_KV_BLOCK.min(s - start);
        let (kb, vb) = (k.narrow(2, start, len)?, v.narrow(2, start, len)?);
        let scores = (q.matmul(&kb.t()?)? * scale)?;
        let block_max = scores.max_keepdim(D::Minus1)?;
        let max = match &state {
            Some((m, _, _)) => m.maximum(&block_max)?,
            None => block_max,
        };
        let e = scores.broadcast_sub(&max)?.exp()?;
        let e_sum = e.sum_keepdim(D::Minus1)?;
        let pv = e.to_dtype(dtype)?.to_dtype(DType::F32)?.matmul(&vb)?;
        state = Some(match state {
            None => (max, e_sum, pv),
            Some((m, sum, acc)) => {
                let corr = (m - &max)?.exp()?;
                let sum = (e_sum + corr.mul(&sum)?)?;
                (max, sum, (acc.broadcast_mul(&corr)? + pv)?)
            }
        });
    }
    let (_, sum, acc) = state.ok_or_else(|| candle_core::Error::Msg("attention over no keys".into()))?;
    acc.broadcast_mul(&sum.recip()?)?.to_dtype(dtype)
}

/// LayerNorm over the last dimension as PyTorch's CPU kernel computes it: mean and variance in
/// f32, `y = (x·rstd + (−rstd·mean))·γ + β` in f32, rounded to the activation dtype once.
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, bias: vb.get(size, "bias")?, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x32 = x.to_dtype(DType::F32)?;
        let n = Tensor::new(x32.dim(D::Minus1)? as f32, x.device())?;
        let mean = x32.sum_keepdim(D::Minus1)?.broadcast_div(&n)?;
        let var = x32.broadcast_sub(&mean)?.sqr()?.sum_keepdim(D::Minus1)?.broadcast_div(&n)?;
        let rstd = (var + self.eps)?.sqrt()?.recip()?;
        let shift = (rstd.neg()? * &mean)?;
        let y = x32.broadcast_mul(&rstd)?.broadcast_add(&shift)?;
        let (w, b) = (self.weight.to_dtype(DType::F32)?, self.bias.to_dtype(DType::F32)?);
        y.broadcast_mul(&w)?.broadcast_add(&b)?.to_dtype(x.dtype())
    }
}

/// One encoder layer with post-branch LayerNorm: `h = h + LN1(attn(h))`, `h = h + LN2(mlp(h))`.
#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: SelfAttention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
}

/// `x · σ(1.702·x)` with PyTorch's roundings: `1.702·x` and `σ` each computed in f32 and rounded
/// to the activation dtype, then the product rounded.
fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let scaled = (x.to_dtype(DType::F32)? * 1.702)?.to_dtype(dtype)?;
    let gate = candle_nn::ops::sigmoid(&scaled.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
    x * gate
}

impl EncoderLayer {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let dense = WeightFormat::Dense;
        let attn = vb.pp("self_attn");
        let fc1 = vb.pp("mlp").pp("fc1");
        // The MLP width: the config's, else the rows of the checkpoint's fc1 weight.
        let i = match cfg.intermediate_size {
            Some(i) => i,
            None => fc1.get_unchecked("weight")?.dim(0)?,
        };
        Ok(Self {
            self_attn: SelfAttention {
                qkv_proj: Linear::new(d, 3 * d, true, dense, attn.pp("qkv_proj"))?,
                out_proj: Linear::new(d, d, true, dense, attn.pp("out_proj"))?,
                num_heads: cfg.num_attention_heads,
            },
            layer_norm1: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            fc1: Linear::new(d, i, true, dense, fc1)?,
            fc2: Linear::new(i, d, true, dense, vb.pp("mlp").pp("fc2"))?,
            layer_norm2: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.layer_norm1.forward(&self.self_attn.forward(x)?)?)?;
        let mlp = self.fc2.forward(&quick_gelu(&self.fc1.forward(&x)?)?)?;
        &x + self.layer_norm2.forward(&mlp)?
    }
}

/// The Step3 vision tower and projector. Weight names are the checkpoint's: `vision_model.*`,
/// `vit_downsampler`, `vit_downsampler2`, `vit_large_projector`.
#[derive(Debug, Clone)]
pub struct VisionModel {
    embeddings: Embeddings,
    layers: Vec<EncoderLayer>,
    downsampler: Conv,
    downsampler2: Conv,
    projector: Linear,
    config: VisionConfig,
    dtype: DType,
}

impl VisionModel {
    /// Builds the tower from `vb` at the checkpoint root. `crop_size` (504 for Step3) is the side of
    /// the local crops; their position table is resized once here.
    pub fn new(cfg: &VisionConfig, crop_size: Option<usize>, vb: VarBuilder) -> Result<Self> {
        let v = vb.pp("vision_model");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(cfg, v.pp("transformer").pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let (d, o) = (cfg.hidden_size, cfg.output_hidden_size);
        let down1 = Conv2dConfig { stride: cfg.projector_stride, ..Default::default() };
        let down2 = Conv2dConfig { stride: 2, padding: 1, ..Default::default() };
        Ok(Self {
            embeddings: Embeddings::new(cfg, crop_size, v.pp("embeddings"))?,
            layers,
            downsampler: Conv::new(d, o, 2, down1, vb.pp("vit_downsampler"))?,
            downsampler2: Conv::new(o, 2 * o, 3, down2, vb.pp("vit_downsampler2"))?,
            projector: Linear::new(
                2 * o,
                cfg.text_hidden_size,
                cfg.projector_bias,
                WeightFormat::Dense,
                vb.pp("vit_large_projector"),
            )?,
            config: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// The crop position table (`[1, 1 + g², D]`), when a crop size was given.
    pub fn crop_position_embedding(&self) -> Option<Tensor> {
        self.embeddings.crop_position_embedding.as_ref().and_then(|(_, t)| t.unsqueeze(0).ok())
    }

    /// `pixels [B, C, S, S]` (S = the global size or the crop size) → image features `[B, N, H]`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.forward_all(pixels)?.projected)
    }

    /// [`Self::forward`] keeping every intermediate result.
    pub fn forward_all(&self, pixels: &Tensor) -> Result<VisionOutputs> {
        let (b, c, s, s2) = pixels.dims4()?;
        if c != self.config.num_channels || s != s2 || s % self.config.patch_size != 0 {
            candle_core::bail!(
                "vision input must be [B, {}, S, S] with S a multiple of {}, got {:?}",
                self.config.num_channels,
                self.config.patch_size,
                pixels.dims()
            )
        }
        let mut x = self.embeddings.forward(&pixels.to_dtype(self.dtype)?)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        let encoder_out_full = x.clone();
        let g = s / self.config.patch_size;
        let d = x.dim(D::Minus1)?;
        let grid = x.narrow(1, 4, g * g)?.transpose(1, 2)?.reshape((b, d, g, g))?.contiguous()?;
        let down1 = self.downsampler.forward(&grid)?;
        let down2 = self.downsampler2.forward(&down1)?;
        let (_, ch, h2, w2) = down2.dims4()?;
        let flat = down2.reshape((b, ch, h2 * w2))?.transpose(1, 2)?.contiguous()?;
        let projected = self.projector.forward(&flat)?;
        Ok(VisionOutputs { encoder_out_full, down1, down2, projected })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn det(dims: (usize, usize, usize, usize), seed: usize) -> Result<Tensor> {
        let n = dims.0 * dims.1 * dims.2 * dims.3;
        let v: Vec<f32> = (0..n).map(|i| ((((i + seed) * 2654435761) % 1000) as f32 / 1000.0 - 0.5) * 4.0).collect();
        Tensor::from_vec(v, dims, &Device::Cpu)
    }

    /// Over several key blocks the running-max rescaling gives plain softmax attention (f32).
    #[test]
    fn blocked_attention_is_softmax_attention() -> Result<()> {
        let (q, k, v) = (det((1, 2, 7, 8), 1)?, det((1, 2, 1100, 8), 2)?, det((1, 2, 1100, 8), 3)?);
        let got = flash_attention(&q, &k, &v, 0.35)?;
        let probs = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * 0.35)?)?;
        let want = probs.matmul(&v)?;
        let diff = (got - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    /// bf16: only the unnormalised exponentials and the output are rounded.
    #[test]
    fn half_precision_attention_rounds_the_exponentials() -> Result<()> {
        let bf = |t: Tensor| t.to_dtype(DType::BF16);
        let (q, k, v) = (bf(det((1, 1, 3, 8), 4)?)?, bf(det((1, 1, 5, 8), 5)?)?, bf(det((1, 1, 5, 8), 6)?)?);
        let got = flash_attention(&q, &k, &v, 0.5)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let f = |t: &Tensor| t.to_dtype(DType::F32)?.squeeze(0)?.squeeze(0)?.to_vec2::<f32>();
        let (q, k, v) = (f(&q)?, f(&k)?, f(&v)?);
        for (i, qi) in q.iter().enumerate() {
            let s: Vec<f32> = k.iter().map(|kj| qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * 0.5).collect();
            let m = s.iter().cloned().fold(f32::MIN, f32::max);
            let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
            let sum: f32 = e.iter().sum();
            for c in 0..8 {
                let acc: f32 = e.iter().zip(&v).map(|(e, vj)| half::bf16::from_f32(*e).to_f32() * vj[c]).sum();
                let want = half::bf16::from_f32(acc * (1.0 / sum)).to_f32();
                assert!((got[i * 8 + c] - want).abs() <= 1e-2 * want.abs().max(1e-2), "{i},{c}");
            }
        }
        Ok(())
    }

    #[test]
    fn layer_norm_and_quick_gelu_follow_the_formulas() -> Result<()> {
        let dev = Device::Cpu;
        let x = det((1, 1, 3, 16), 7)?.reshape((3, 16))?;
        let w = Tensor::new(&[1.1f32; 16], &dev)?;
        let b = Tensor::new(&[0.2f32; 16], &dev)?;
        let ln = LayerNorm { weight: w, bias: b, eps: 1e-6 };
        let got = ln.forward(&x)?.to_vec2::<f32>()?;
        for (row, out) in x.to_vec2::<f32>()?.iter().zip(got) {
            let mean = row.iter().sum::<f32>() / 16.0;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 16.0;
            for (v, o) in row.iter().zip(out) {
                assert!(((v - mean) / (var + 1e-6).sqrt() * 1.1 + 0.2 - o).abs() < 1e-5);
            }
        }
        let g = quick_gelu(&x)?.flatten_all()?.to_vec1::<f32>()?;
        for (v, o) in x.flatten_all()?.to_vec1::<f32>()?.iter().zip(g) {
            assert!((v / (1.0 + (-1.702 * v).exp()) - o).abs() < 1e-5);
        }
        Ok(())
    }
}
