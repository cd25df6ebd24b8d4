//! `step3 preprocess`: run the official image preprocessing and show its outputs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use step3::vision::{self, ImageLayout, PreprocessConfig, WindowRule};

#[derive(Args)]
pub struct PreprocessArgs {
    /// The image (PNG, JPEG, WebP, GIF, BMP).
    #[arg(long)]
    image: PathBuf,
    /// Side of the global view (default 728, or the model's).
    #[arg(long)]
    image_size: Option<usize>,
    /// Side of each local crop (default 504, or the model's preprocessor_config.json).
    #[arg(long)]
    crop_size: Option<usize>,
    /// Take the sizes, the ViT patch size and the projector stride from a checkpoint directory.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// ViT patch size used to count tokens per view when no --model-dir is given.
    #[arg(long, default_value_t = 14)]
    patch_size: usize,
    /// Projector stride used to count tokens per view when no --model-dir is given.
    #[arg(long, default_value_t = 2)]
    projector_stride: usize,
    /// Window rule at exactly 728 px: `<=` (original Step3 processor) or `<` (current vLLM).
    #[arg(long, default_value = "<=")]
    window_rule: String,
    /// Global view only, no crops.
    #[arg(long)]
    no_crops: bool,
    /// Output safetensors: `pixel_values` [1, 3, S, S] and `patch_pixel_values` [n, 3, C, C] (f32).
    #[arg(long)]
    out: PathBuf,
}

/// Tokens one view of `size` pixels becomes (see `VisionConfig::tokens_per_view`), after checking
/// that the ViT can take the size at all. `source` names where the size came from (the flag, or
/// the checkpoint) so the error can point at it.
fn tokens(size: usize, patch: usize, stride: usize, source: &str) -> Result<usize> {
    if size == 0 || !size.is_multiple_of(patch) || size / patch < 2 {
        bail!(
            "{source} {size} is not usable: the side must be a positive multiple of the ViT patch size {patch}, \
             at least {} pixels (Step3 uses 728 for the global view and 504 for crops)",
            2 * patch
        );
    }
    Ok(vision::tokens_per_view(size, patch, stride))
}

pub fn run(a: PreprocessArgs) -> Result<ExitCode> {
    let (mut cfg, patch, stride) = match &a.model_dir {
        Some(dir) => {
            let ckpt = step3::Step3Checkpoint::open(dir).with_context(|| format!("opening {}", dir.display()))?;
            let v = ckpt.config().vision.as_ref().context("the checkpoint has no vision tower")?;
            (ckpt.preprocess_config(None)?, v.patch_size, v.projector_stride)
        }
        None => {
            if a.patch_size == 0 || a.projector_stride == 0 {
                bail!("--patch-size and --projector-stride must be positive (Step3: 14 and 2)");
            }
            (PreprocessConfig::default(), a.patch_size, a.projector_stride)
        }
    };
    if let Some(s) = a.image_size {
        cfg.image_size = s;
    }
    if let Some(s) = a.crop_size {
        cfg.crop_size = s;
    }
    cfg.window_rule = match a.window_rule.parse::<WindowRule>() {
        Ok(rule) => rule,
        Err(_) => bail!("--window-rule must be `<=` or `<`, not `{}`", a.window_rule),
    };
    cfg.enable_patch = !a.no_crops;
    let source = |flag: &str, given: bool, key: &str| match (given, &a.model_dir) {
        (true, _) => flag.to_string(),
        (false, Some(_)) => format!("the checkpoint's {key}"),
        (false, None) => format!("the default {key}"),
    };
    let layout_sizes = (
        tokens(cfg.crop_size, patch, stride, &source("--crop-size", a.crop_size.is_some(), "crop_size"))?,
        tokens(cfg.image_size, patch, stride, &source("--image-size", a.image_size.is_some(), "image_size"))?,
    );
    let img = vision::load_image(&a.image, cfg.max_pixels)?;
    let p = vision::preprocess(&img, &cfg).with_context(|| a.image.display().to_string())?;
    let mut tensors = vec![("pixel_values".to_string(), p.pixel_values.clone())];
    if let Some(t) = &p.patch_pixel_values {
        tensors.push(("patch_pixel_values".to_string(), t.clone()));
    }
    step3::checkpoint::save_tensors(&tensors.into_iter().collect(), &a.out)?;
    let layout = ImageLayout {
        newline_mask: p.newline_mask.clone(),
        crop_tokens: layout_sizes.0,
        global_tokens: layout_sizes.1,
    };
    let out = json!({
        "num_patches": p.num_crops(),
        "patch_newline_mask": p.newline_mask,
        "token_layout_segments": layout.segments(),
        "num_tokens": layout.num_tokens(),
        "geometry": {
            "original_size": p.geometry.original_size,
            "square_padded": p.geometry.square_padded,
            "resized_size": p.geometry.resized_size,
            "window_size": p.geometry.window_size,
            "crop_canvas_size": p.geometry.crop_canvas_size,
            "boxes_xywh": p.geometry.boxes,
            "grid_cols_rows": p.geometry.grid,
        },
    });
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}
