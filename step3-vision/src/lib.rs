//! Step3's eyes.
//!
//! This crate owns everything between an image file and the image features the language model
//! consumes: decoding with limits ([`load_image`], [`decode_image`]), the official preprocessing
//! (global view, local crops, newline flags, token layout; [`preprocess`], [`ImageLayout`]), the
//! exact resamplers it depends on ([`resample`]: Pillow's 8-bit bilinear and PyTorch's antialiased
//! bilinear/bicubic), the Eva-CLIP-style ViT with post-branch LayerNorm and its three duplicated
//! CLS tokens, and the projector (two strided convolutions, 16× fewer tokens, and a linear map to
//! the language model's width) ([`VisionModel`]). It does not own the language model, the
//! tokenizer or config files: the model crate hands it a [`VisionConfig`] (`step3-config`'s), a
//! [`PreprocessConfig`] and a [`candle_nn::VarBuilder`] at the checkpoint root.

mod preprocess;
pub mod resample;
mod vit;

use std::path::{Path, PathBuf};

pub use preprocess::{
    canvas_side, decode_image, load_image, preprocess, to_pixels, window_size, Geometry, ImageLayout, ImageTokenIds,
    PreprocessConfig, PreprocessedImage, WindowRule, CLIP_MEAN, CLIP_STD,
};
pub use resample::PillowPassOrder;
pub use step3_config::{tokens_per_view, VisionConfig};
pub use vit::{VisionModel, VisionOutputs};

/// Why an image cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VisionError {
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{}cannot decode the image: {reason}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    Decode { path: Option<PathBuf>, reason: String },
    #[error(
        "{}the image is {width}x{height} pixels, more than the limit of {max_pixels} pixels (a decompression bomb?)",
        path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default()
    )]
    TooLarge { path: Option<PathBuf>, width: u32, height: u32, max_pixels: u64 },
    #[error("the image is {width}x{height} pixels: it has no pixels")]
    Degenerate { width: u32, height: u32 },
    #[error(
        "the {width}x{height} image is padded to a {side}x{side} square before scaling (as the reference does for thin images), \
         more than the limit of {max_pixels} pixels"
    )]
    PaddedTooLarge { width: u32, height: u32, side: u32, max_pixels: u64 },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl VisionError {
    /// Names the file in a decoding error.
    pub fn with_path(self, p: &Path) -> Self {
        match self {
            Self::Decode { reason, .. } => Self::Decode { path: Some(p.to_path_buf()), reason },
            Self::TooLarge { width, height, max_pixels, .. } => {
                Self::TooLarge { path: Some(p.to_path_buf()), width, height, max_pixels }
            }
            other => other,
        }
    }
}
