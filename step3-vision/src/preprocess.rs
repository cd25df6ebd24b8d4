//! The official Step3 image preprocessing (the `ImagePatcher` / `Step3VisionProcessor` shipped with
//! vLLM and SGLang), reimplemented exactly: square padding of thin images, the 3024-px cap, the
//! window rule, the crop canvas (the 20 % rule), row-major tiling with black fill, newline flags,
//! then to-tensor / CLIP normalisation / antialiased bilinear resize of the global view and of
//! every crop, and the token layout that goes with it.

use std::io::Cursor;
use std::path::Path;

use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageReader, Limits, RgbImage};

use crate::resample::{pil_resize_bilinear_with, resize_aa, AaFilter, PillowPassOrder};
use crate::VisionError;

/// CLIP normalisation mean (RGB).
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
/// CLIP normalisation standard deviation (RGB), the reference's literals (rounded to f32 as there).
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// The threshold of the window rule at exactly `window_limit` pixels: the original Step3 processor
/// (vLLM 0.10, SGLang) crops only images whose long side is `> 728` (`LessOrEqual` = no crops at
/// `long <= 728`); current vLLM uses `long < 728`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WindowRule {
    #[default]
    LessOrEqual,
    Less,
}

impl std::str::FromStr for WindowRule {
    type Err = String;

    /// `<=` (or `le`) and `<` (or `lt`).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "<=" | "le" => Ok(Self::LessOrEqual),
            "<" | "lt" => Ok(Self::Less),
            other => Err(format!("must be \"<=\" or \"<\", found \"{other}\"")),
        }
    }
}

/// Preprocessing settings. The defaults are Step3's; the tiny test checkpoints change only the
/// final sizes (`image_size`, `crop_size`).
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    /// Side the global view is resized to (728).
    pub image_size: usize,
    /// Side each crop is resized to (504).
    pub crop_size: usize,
    /// Images with a longer side are scaled down to it first (3024).
    pub max_image_size: usize,
    /// Long sides up to this many pixels get no crops unless the image is elongated (728).
    pub window_limit: usize,
    /// Crop window for larger images (504).
    pub crop_window: usize,
    pub window_rule: WindowRule,
    /// Cut local crops at all (false: global view only, 171 tokens per image for Step3).
    pub enable_patch: bool,
    /// Largest decoded image accepted, in pixels (decompression-bomb guard).
    pub max_pixels: u64,
    pub pillow_order: PillowPassOrder,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        Self {
            image_size: 728,
            crop_size: 504,
            max_image_size: 3024,
            window_limit: 728,
            crop_window: 504,
            window_rule: WindowRule::LessOrEqual,
            enable_patch: true,
            max_pixels: 128 * 1024 * 1024,
            pillow_order: PillowPassOrder::Pillow13,
        }
    }
}

/// Where an image's pixels went.
#[derive(Debug, Clone, PartialEq)]
pub struct Geometry {
    /// Width × height as decoded.
    pub original_size: (u32, u32),
    /// Padded to a black square (thin images).
    pub square_padded: bool,
    /// Size of the global view before its final resize (after padding and the cap).
    pub resized_size: (u32, u32),
    /// Crop window (0 = no crops).
    pub window_size: u32,
    /// The canvas the crops are cut from, when there are crops.
    pub crop_canvas_size: Option<(u32, u32)>,
    /// Crop boxes `(x, y, w, h)` in row-major order.
    pub boxes: Vec<(u32, u32, u32, u32)>,
    /// Crop grid columns and rows.
    pub grid: (usize, usize),
}

/// A preprocessed image: the model inputs and what produced them.
#[derive(Debug, Clone)]
pub struct PreprocessedImage {
    /// The global view, `[1, 3, image_size, image_size]`, f32.
    pub pixel_values: Tensor,
    /// The crops, `[n, 3, crop_size, crop_size]`, f32, in row-major tiling order (None if n = 0).
    pub patch_pixel_values: Option<Tensor>,
    /// Per crop: does a `<patch_newline>` follow it (last crop of a row, except the last row)?
    pub newline_mask: Vec<bool>,
    pub geometry: Geometry,
    /// The global view as 8-bit RGB before its final resize.
    pub global_u8: RgbImage,
    /// The crop canvas as 8-bit RGB, when there are crops.
    pub canvas_u8: Option<RgbImage>,
}

impl PreprocessedImage {
    pub fn num_crops(&self) -> usize {
        self.newline_mask.len()
    }
}

/// Decodes an image file (PNG, JPEG, WebP, GIF, BMP) to 8-bit RGB, refusing empty, corrupt or
/// oversized ones.
pub fn load_image(path: &Path, max_pixels: u64) -> Result<RgbImage, VisionError> {
    let bytes = std::fs::read(path).map_err(|error| VisionError::Io { path: path.to_path_buf(), error })?;
    decode_image(&bytes, max_pixels).map_err(|e| e.with_path(path))
}

/// Decodes image bytes to 8-bit RGB as the reference's loader does: RGBA is composited over white
/// (vLLM), 16-bit channels keep their high byte, grey is replicated. The decoded size is checked
/// against `max_pixels` before any pixel buffer is allocated.
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, VisionError> {
    if bytes.is_empty() {
        return Err(VisionError::Decode { path: None, reason: "the file is empty (0 bytes)".into() });
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| VisionError::Decode { path: None, reason: e.to_string() })?;
    if reader.format().is_none() {
        return Err(VisionError::Decode {
            path: None,
            reason: "not a recognised image format (PNG, JPEG, WebP, GIF, BMP)".into(),
        });
    }
    // The JPEG decoder fills a cut-off scan with made-up pixels; the reference's (Pillow) says
    // "image file is truncated". The end-of-image marker must follow the last scan.
    if reader.format() == Some(image::ImageFormat::Jpeg) && jpeg_is_truncated(bytes) {
        return Err(VisionError::Decode {
            path: None,
            reason: "the JPEG data is truncated (no end-of-image marker after its last scan)".into(),
        });
    }
    let (w, h) = reader.into_dimensions().map_err(|e| VisionError::Decode { path: None, reason: e.to_string() })?;
    if w as u64 * h as u64 > max_pixels {
        return Err(VisionError::TooLarge { path: None, width: w, height: h, max_pixels });
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| VisionError::Decode { path: None, reason: e.to_string() })?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    limits.max_alloc = Some(max_pixels.saturating_mul(16));
    reader.limits(limits);
    let img = reader.decode().map_err(|e| VisionError::Decode { path: None, reason: e.to_string() })?;
    if img.width() == 0 || img.height() == 0 {
        return Err(VisionError::Decode { path: None, reason: "the image has no pixels".into() });
    }
    Ok(to_rgb(img))
}

/// Whether a JPEG stream lacks the end-of-image marker (`FF D9`) after the start of its last scan
/// (`FF DA`). Inside a scan `FF` is always followed by `00` or a restart marker, so the marker
/// cannot occur by chance there.
fn jpeg_is_truncated(bytes: &[u8]) -> bool {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    match last_scan {
        Some(i) => !bytes[i..].windows(2).any(|w| w == [0xFF, 0xD9]),
        None => true,
    }
}

/// `DIV255` of Pillow's blending: `(t + (t >> 8)) >> 8` with `t = x + 128`.
fn div255(x: u32) -> u8 {
    let t = x + 128;
    (((t >> 8) + t) >> 8) as u8
}

fn to_rgb(img: DynamicImage) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(i) => i,
        DynamicImage::ImageRgba8(i) => {
            // vLLM: paste over a white background with the alpha channel as mask.
            RgbImage::from_fn(i.width(), i.height(), |x, y| {
                let [r, g, b, a] = i.get_pixel(x, y).0;
                let a = a as u32;
                let blend = |c: u8| div255(255 * (255 - a) + c as u32 * a);
                image::Rgb([blend(r), blend(g), blend(b)])
            })
        }
        DynamicImage::ImageRgb16(i) => {
            RgbImage::from_fn(i.width(), i.height(), |x, y| image::Rgb(i.get_pixel(x, y).0.map(|v| (v >> 8) as u8)))
        }
        DynamicImage::ImageRgba16(i) => {
            let rgba8 = image::RgbaImage::from_fn(i.width(), i.height(), |x, y| {
                image::Rgba(i.get_pixel(x, y).0.map(|v| (v >> 8) as u8))
            });
            to_rgb(DynamicImage::ImageRgba8(rgba8))
        }
        other => other.to_rgb8(),
    }
}

/// The window rule: 0 (no crops), the short side, or the crop window.
pub fn window_size(long: usize, short: usize, cfg: &PreprocessConfig) -> usize {
    let small = match cfg.window_rule {
        WindowRule::LessOrEqual => long <= cfg.window_limit,
        WindowRule::Less => long < cfg.window_limit,
    };
    let aspect = long as f64 / short as f64;
    if small {
        if aspect > 1.5 {
            short
        } else {
            0
        }
    } else if aspect > 4.0 {
        short.min(cfg.crop_window)
    } else {
        cfg.crop_window
    }
}

/// One side of the crop canvas: kept if shorter than a window, else rounded to a whole number of
/// windows (up when the remainder exceeds 20 % of a window).
pub fn canvas_side(d: usize, window: usize) -> usize {
    let r = d as f64 / window as f64;
    if r < 1.0 {
        return d;
    }
    let dec = r - (d / window) as f64;
    let n = if dec > 0.2 { r as usize + 1 } else { r as usize };
    window * n
}

/// Crop start positions along one side (the last one clamped to the canvas).
fn starts(canvas: usize, window: usize) -> Vec<usize> {
    let n = if canvas <= window { 1 } else { ((canvas - window) as f64 / window as f64 + 1.0).ceil() as usize };
    let mut s: Vec<usize> = (0..n).map(|i| i * window).collect();
    if s.len() > 1 && s[s.len() - 1] + window > canvas {
        let last = s.len() - 1;
        s[last] = canvas - window;
    }
    s
}

/// PIL `crop`: the box may reach past the image; the outside is black.
fn crop(img: &RgbImage, x: u32, y: u32, w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |i, j| {
        let (sx, sy) = (x + i, y + j);
        if sx < img.width() && sy < img.height() {
            *img.get_pixel(sx, sy)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

/// ToTensor (÷ 255) → CLIP normalisation → antialiased bilinear resize to `size × size`, as f32
/// planes `[3, size, size]`.
pub fn to_pixels(img: &RgbImage, size: usize) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut planes = vec![0f32; 3 * w * h];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            planes[c * w * h + i] = (p.0[c] as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    resize_aa(&planes, (3, h, w), (size, size), AaFilter::Bilinear)
}

/// Runs the whole preprocessing on a decoded RGB image.
pub fn preprocess(img: &RgbImage, cfg: &PreprocessConfig) -> Result<PreprocessedImage, VisionError> {
    let (w, h) = (img.width(), img.height());
    if w == 0 || h == 0 {
        return Err(VisionError::Degenerate { width: w, height: h });
    }
    let original_size = (w, h);
    // 1. Thin images (down to one pixel wide or tall): pad to a black square, original at the
    // top-left. The square can be far larger than the image, so it is held to the pixel limit too.
    let aspect = w as f64 / h as f64;
    let square_padded = w.min(h) < 32 && !(0.25..=4.0).contains(&aspect);
    let padded;
    let img = if square_padded {
        let side = w.max(h);
        if side as u64 * side as u64 > cfg.max_pixels {
            return Err(VisionError::PaddedTooLarge { width: w, height: h, side, max_pixels: cfg.max_pixels });
        }
        let mut sq = RgbImage::new(side, side);
        image::imageops::replace(&mut sq, img, 0, 0);
        padded = sq;
        &padded
    } else {
        img
    };
    // 2. The size cap (the resize is always applied; a no-op at unchanged size).
    let (pw, ph) = (img.width() as usize, img.height() as usize);
    let (nw, nh) = if pw.max(ph) > cfg.max_image_size {
        let f = cfg.max_image_size as f64 / pw.max(ph) as f64;
        (((pw as f64 * f) as usize).max(1), ((ph as f64 * f) as usize).max(1))
    } else {
        (pw, ph)
    };
    let global = pil_resize_bilinear_with(img, nw as u32, nh as u32, cfg.pillow_order);
    // 3. Window and crops.
    let window = if cfg.enable_patch { window_size(nw.max(nh), nw.min(nh), cfg) } else { 0 };
    let mut geometry = Geometry {
        original_size,
        square_padded,
        resized_size: (nw as u32, nh as u32),
        window_size: window as u32,
        crop_canvas_size: None,
        boxes: Vec::new(),
        grid: (0, 0),
    };
    let global_pixels = to_pixels(&global, cfg.image_size);
    let pixel_values = Tensor::from_vec(global_pixels, (1, 3, cfg.image_size, cfg.image_size), &Device::Cpu)?;
    if window == 0 {
        return Ok(PreprocessedImage {
            pixel_values,
            patch_pixel_values: None,
            newline_mask: Vec::new(),
            geometry,
            global_u8: global,
            canvas_u8: None,
        });
    }
    let (cw, ch) = (canvas_side(nw, window), canvas_side(nh, window));
    // The reference compares the canvas with the size before the cap; when the cap applied the two
    // always differ, so this is the same as comparing with (nw, nh).
    let canvas = if (cw, ch) != (w as usize, h as usize) || square_padded {
        pil_resize_bilinear_with(&global, cw as u32, ch as u32, cfg.pillow_order)
    } else {
        global.clone()
    };
    let (xs, ys) = (starts(cw, window), starts(ch, window));
    let mut crops = Vec::with_capacity(xs.len() * ys.len());
    let mut newline_mask = Vec::with_capacity(xs.len() * ys.len());
    for (row, &y) in ys.iter().enumerate() {
        for (col, &x) in xs.iter().enumerate() {
            let piece = crop(&canvas, x as u32, y as u32, window as u32, window as u32);
            crops.extend(to_pixels(&piece, cfg.crop_size));
            geometry.boxes.push((x as u32, y as u32, window as u32, window as u32));
            newline_mask.push(col + 1 == xs.len() && row + 1 != ys.len());
        }
    }
    let n = newline_mask.len();
    geometry.crop_canvas_size = Some((cw as u32, ch as u32));
    geometry.grid = (xs.len(), ys.len());
    Ok(PreprocessedImage {
        pixel_values,
        patch_pixel_values: Some(Tensor::from_vec(crops, (n, 3, cfg.crop_size, cfg.crop_size), &Device::Cpu)?),
        newline_mask,
        geometry,
        global_u8: global,
        canvas_u8: Some(canvas),
    })
}

/// Token ids of the image markers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageTokenIds {
    pub im_start: u32,
    pub im_end: u32,
    pub im_patch: u32,
    pub patch_start: u32,
    pub patch_end: u32,
    pub patch_newline: u32,
}

/// The token layout of one image: per crop `<patch_start>`, `crop_tokens` × `<im_patch>`,
/// `<patch_end>` (+ `<patch_newline>` when flagged), then `<im_start>`, `global_tokens` ×
/// `<im_patch>`, `<im_end>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLayout {
    pub newline_mask: Vec<bool>,
    pub crop_tokens: usize,
    pub global_tokens: usize,
}

impl ImageLayout {
    /// Marker names and run lengths, e.g. `[("<patch_start>", 1), ("<im_patch>", 81), ...]`.
    pub fn segments(&self) -> Vec<(&'static str, usize)> {
        let mut out = Vec::new();
        for &nl in &self.newline_mask {
            out.extend([("<patch_start>", 1), ("<im_patch>", self.crop_tokens), ("<patch_end>", 1)]);
            if nl {
                out.push(("<patch_newline>", 1));
            }
        }
        out.extend([("<im_start>", 1), ("<im_patch>", self.global_tokens), ("<im_end>", 1)]);
        out
    }

    /// The layout as token ids.
    pub fn token_ids(&self, ids: &ImageTokenIds) -> Vec<u32> {
        self.segments()
            .into_iter()
            .flat_map(|(name, n)| {
                let id = match name {
                    "<patch_start>" => ids.patch_start,
                    "<patch_end>" => ids.patch_end,
                    "<patch_newline>" => ids.patch_newline,
                    "<im_start>" => ids.im_start,
                    "<im_end>" => ids.im_end,
                    _ => ids.im_patch,
                };
                std::iter::repeat_n(id, n)
            })
            .collect()
    }

    /// Image features this image contributes (one per `<im_patch>`).
    pub fn num_features(&self) -> usize {
        self.newline_mask.len() * self.crop_tokens + self.global_tokens
    }

    /// All tokens of the layout.
    pub fn num_tokens(&self) -> usize {
        self.segments().iter().map(|(_, n)| n).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(w: u32, h: u32) -> usize {
        let cfg = PreprocessConfig::default();
        let img = RgbImage::new(w, h);
        let p = preprocess(&img, &cfg).unwrap();
        ImageLayout { newline_mask: p.newline_mask, crop_tokens: 81, global_tokens: 169 }.num_tokens()
    }

    /// The worked examples of the specification (§5).
    #[test]
    fn token_counts_of_the_spec_examples() {
        assert_eq!(tokens(640, 480), 171);
        assert_eq!(tokens(1024, 768), 504);
        assert_eq!(tokens(1920, 1080), 836);
        assert_eq!(tokens(600, 300), 337);
        assert_eq!(tokens(728, 728), 171);
    }

    /// One pixel wide or tall: padded to a square when the aspect ratio is beyond 4, otherwise cut
    /// into 1-pixel windows (the reference's rules; the pixel values are checked against its
    /// goldens in `preprocess/thin.*`).
    #[test]
    fn thin_images_follow_the_reference_rules() {
        let cfg = PreprocessConfig::default();
        let run = |w, h| preprocess(&RgbImage::new(w, h), &cfg).unwrap();
        let one = run(1, 1);
        assert_eq!((one.num_crops(), one.geometry.square_padded), (0, false));
        assert_eq!(one.pixel_values.dims(), &[1, 3, 728, 728]);
        let column = run(1, 4);
        assert_eq!(column.newline_mask, [true, true, true, false]);
        assert_eq!(column.geometry.window_size, 1);
        let long = run(1, 4000);
        assert!(long.geometry.square_padded);
        assert_eq!(long.geometry.resized_size, (3024, 3024));
        assert_eq!(long.num_crops(), 36);
        assert_eq!(tokens(4000, 1), 36 * 83 + 171 + 5);
    }

    #[test]
    fn window_rule_switch_changes_only_the_boundary() {
        let le = PreprocessConfig::default();
        let lt = PreprocessConfig { window_rule: WindowRule::Less, ..Default::default() };
        assert_eq!(window_size(728, 728, &le), 0);
        assert_eq!(window_size(728, 728, &lt), 504);
        assert_eq!(window_size(727, 700, &lt), 0);
        assert_eq!(canvas_side(1024, 504), 1008);
        assert_eq!(canvas_side(1100, 504), 1008); // remainder 0.18 < 0.2: rounds down
        assert_eq!(canvas_side(1150, 504), 1512);
        assert_eq!(canvas_side(450, 504), 450);
    }

    #[test]
    fn degenerate_and_corrupt_images_are_errors() {
        let cfg = PreprocessConfig::default();
        assert!(matches!(preprocess(&RgbImage::new(0, 500), &cfg), Err(VisionError::Degenerate { .. })));
        // A one-pixel-wide image is padded to a square that must fit the pixel limit.
        let small = PreprocessConfig { max_pixels: 100 * 100, ..Default::default() };
        assert!(preprocess(&RgbImage::new(1, 100), &small).is_ok());
        let err = preprocess(&RgbImage::new(1, 101), &small).unwrap_err();
        assert!(matches!(err, VisionError::PaddedTooLarge { side: 101, .. }), "{err}");
        assert!(decode_image(&[], 1 << 20).unwrap_err().to_string().contains("empty"));
        assert!(decode_image(b"GIF89a garbage", 1 << 20).is_err());
        let mut png = Vec::new();
        DynamicImage::ImageRgb8(RgbImage::new(300, 200))
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert!(matches!(decode_image(&png, 1000), Err(VisionError::TooLarge { width: 300, height: 200, .. })));
        assert_eq!(decode_image(&png, 1 << 20).unwrap().dimensions(), (300, 200));
        let truncated = &png[..png.len() / 2];
        assert!(decode_image(truncated, 1 << 20).is_err());
        // A JPEG cut anywhere in (or right after) its scan data is refused, not filled in.
        let mut jpg = Vec::new();
        let noisy = RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 7 + y * 3) as u8, (x * y) as u8, (x ^ y) as u8]));
        DynamicImage::ImageRgb8(noisy).write_to(&mut Cursor::new(&mut jpg), image::ImageFormat::Jpeg).unwrap();
        assert_eq!(decode_image(&jpg, 1 << 20).unwrap().dimensions(), (64, 48));
        for cut in [2, 40, jpg.len() / 2] {
            let err = decode_image(&jpg[..jpg.len() - cut], 1 << 20).unwrap_err().to_string();
            assert!(err.contains("truncated") || err.contains("JPEG") || err.contains("end"), "cut {cut}: {err}");
        }
    }

    #[test]
    fn rgba_is_composited_over_white() {
        let mut rgba = image::RgbaImage::new(2, 1);
        rgba.put_pixel(0, 0, image::Rgba([0, 0, 0, 0]));
        rgba.put_pixel(1, 0, image::Rgba([100, 50, 0, 128]));
        let rgb = to_rgb(DynamicImage::ImageRgba8(rgba));
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        // DIV255(255·127 + c·128)
        assert_eq!(rgb.get_pixel(1, 0).0, [177, 152, 127]);
    }
}
