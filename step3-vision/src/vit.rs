//! The vision tower (an Eva-CLIP-style ViT with post-branch LayerNorm) and the projector that
//! downsamples its grid 4× per side and maps it into the language model's width.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, VarBuilder};
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
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.out_proj.forward(&out)
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

fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
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
            layer_norm1: candle_nn::layer_norm(d, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            fc1: Linear::new(d, i, true, dense, fc1)?,
            fc2: Linear::new(i, d, true, dense, vb.pp("mlp").pp("fc2"))?,
            layer_norm2: candle_nn::layer_norm(d, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
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
