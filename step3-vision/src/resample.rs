//! The two resamplers the reference preprocessing uses, reimplemented to match them bit for bit:
//!
//! * Pillow's `Image.resize(..., BILINEAR)` on 8-bit RGB (`libImaging/Resample.c`): separable,
//!   horizontal pass first into an 8-bit intermediate, then vertical; triangle filter widened by
//!   the downscale factor; coefficients normalised, then turned into fixed point with 22
//!   fraction bits; `ss = 2^21 + Σ p·k`, clipped to `[0, 255]` after `>> 22`.
//!   Pillow 13 runs the vertical pass first when the height shrinks by more than twice as much as
//!   the width (`(in_h − out_h) > 0 && (in_h − out_h) > 2·(in_w − out_w)`); earlier versions always
//!   go horizontal first ([`PillowPassOrder`]).
//! * PyTorch's antialiased interpolation (`F.interpolate(..., antialias=True, align_corners=False)`,
//!   what torchvision's `Resize` uses on float tensors; ATen `UpSampleKernel.cpp`), bilinear and
//!   bicubic (Keys kernel with a = −0.5): separable, width first then height, passes skipped when
//!   a size is unchanged, everything in f32 with the weight geometry computed exactly as ATen does
//!   (a mix of f32 and f64 arithmetic, emulated here step by step). The official (AVX2/AVX512)
//!   builds contract some multiply-adds into FMAs; the cubic kernel and the tap sums below do the
//!   same, so the results are bit-identical to those builds.

use candle_core::{Device, Result, Tensor};
use image::RgbImage;
use rayon::prelude::*;

/// The kernels of PyTorch's antialiased path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AaFilter {
    Bilinear,
    Bicubic,
}

impl AaFilter {
    /// Taps of the kernel at scale 1 (ATen's `interp_size`).
    fn interp_size(self) -> usize {
        match self {
            Self::Bilinear => 2,
            Self::Bicubic => 4,
        }
    }

    /// ATen's `aa_filter` (the bilinear one in f64 then rounded, the bicubic one in f32).
    fn eval(self, x: f32) -> f32 {
        match self {
            Self::Bilinear => {
                let x = (x as f64).abs();
                if x < 1.0 {
                    (1.0 - x) as f32
                } else {
                    0.0
                }
            }
            // a = −0.5: ((a+2)x − (a+3))x² + 1 and ((ax − 5a)x + 8a)x − 4a, with the
            // contractions the compiled kernel performs.
            Self::Bicubic => {
                let x = x.abs();
                if x < 1.0 {
                    (1.5f32.mul_add(x, -2.5) * x).mul_add(x, 1.0)
                } else if x < 2.0 {
                    (-0.5f32).mul_add(x, 2.5).mul_add(x, -4.0).mul_add(x, 2.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// Taps of one output position: first input index and normalised weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Taps {
    pub start: usize,
    pub weights: Vec<f32>,
}

/// ATen's `_compute_indices_weights_aa` for one axis (`align_corners = false`, `antialias = true`).
pub fn aa_taps(input: usize, output: usize, filter: AaFilter) -> Vec<Taps> {
    let scale = input as f32 / output as f32;
    let half = filter.interp_size() as f32 * 0.5;
    let support = if scale >= 1.0 { half * scale } else { half };
    let invscale: f32 = if scale >= 1.0 { (1.0 / scale as f64) as f32 } else { 1.0 };
    let max_taps = (support.ceil() as usize) * 2 + 1;
    (0..output)
        .map(|i| {
            let center = (scale as f64 * (i as f64 + 0.5)) as f32;
            let xmin = (((center - support) as f64 + 0.5) as i64).max(0);
            let xmax = (((center + support) as f64 + 0.5) as i64).min(input as i64);
            let n = (xmax - xmin).clamp(0, max_taps as i64) as usize;
            let mut weights: Vec<f32> = (0..n)
                .map(|j| {
                    let t = ((j as i64 + xmin) as f32 - center) as f64 + 0.5;
                    filter.eval((t * invscale as f64) as f32)
                })
                .collect();
            let total: f32 = weights.iter().fold(0.0, |acc, w| acc + w);
            if total != 0.0 {
                weights.iter_mut().for_each(|w| *w /= total);
            }
            Taps { start: xmin as usize, weights }
        })
        .collect()
}

/// `Σ_j src[start + j] · w[j]` in the order the compiled ATen kernel sums: the first product, then
/// groups of four vectorised products added one by one, then the remaining taps as FMAs.
fn accumulate(t: &Taps, at: &dyn Fn(usize) -> f32) -> f32 {
    let n = t.weights.len();
    let mut acc = at(t.start) * t.weights[0];
    let vectorised = 4 * ((n - 1) / 4);
    for j in 1..=vectorised {
        acc += at(t.start + j) * t.weights[j];
    }
    for j in vectorised + 1..n {
        acc = at(t.start + j).mul_add(t.weights[j], acc);
    }
    acc
}

/// One separable pass over `[planes, rows, cols]` data along the columns (`horizontal`) or rows.
fn aa_pass(src: &[f32], (planes, rows, cols): (usize, usize, usize), taps: &[Taps], horizontal: bool) -> Vec<f32> {
    let (orows, ocols) = if horizontal { (rows, taps.len()) } else { (taps.len(), cols) };
    let mut out = vec![0f32; planes * orows * ocols];
    out.par_chunks_mut(ocols).enumerate().for_each(|(row, dst)| {
        let (p, r) = (row / orows, row % orows);
        let plane = &src[p * rows * cols..(p + 1) * rows * cols];
        for (c, d) in dst.iter_mut().enumerate() {
            let (t, at): (&Taps, &dyn Fn(usize) -> f32) =
                if horizontal { (&taps[c], &|k| plane[r * cols + k]) } else { (&taps[r], &|k| plane[k * cols + c]) };
            *d = accumulate(t, at);
        }
    });
    out
}

/// Antialiased resize of f32 planes `[C, H, W]` (row-major in `data`) to `[C, oh, ow]`.
pub fn resize_aa(
    data: &[f32],
    (c, h, w): (usize, usize, usize),
    (oh, ow): (usize, usize),
    filter: AaFilter,
) -> Vec<f32> {
    let horizontal = (ow != w).then(|| aa_pass(data, (c, h, w), &aa_taps(w, ow, filter), true));
    if oh == h {
        return horizontal.unwrap_or_else(|| data.to_vec());
    }
    let (src, cols) = match &horizontal {
        Some(t) => (t.as_slice(), ow),
        None => (data, w),
    };
    aa_pass(src, (c, h, cols), &aa_taps(h, oh, filter), false)
}

fn resize_tensor(x: &Tensor, oh: usize, ow: usize, filter: AaFilter) -> Result<Tensor> {
    let (c, h, w) = x.dims3()?;
    let data = x.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Tensor::from_vec(resize_aa(&data, (c, h, w), (oh, ow), filter), (c, oh, ow), &Device::Cpu)?.to_device(x.device())
}

/// PyTorch's antialiased bicubic resize of `x: [C, H, W]` to `[C, oh, ow]`, in f32.
pub fn resize_bicubic_aa(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    resize_tensor(x, oh, ow, AaFilter::Bicubic)
}

/// PyTorch's antialiased bilinear resize of `x: [C, H, W]` to `[C, oh, ow]`, in f32.
pub fn resize_bilinear_aa(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    resize_tensor(x, oh, ow, AaFilter::Bilinear)
}

/// Fraction bits of Pillow's 8-bit fixed-point coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `precompute_coeffs` (bilinear, box = the whole image) followed by
/// `normalize_coeffs_8bpc`: per output position, the first input index and the fixed-point taps.
fn pil_coeffs(input: usize, output: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = input as f32 as f64 / output as f64;
    let filterscale = scale.max(1.0);
    let support = 1.0 * filterscale;
    (0..output)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(input as i64) - xmin;
            let mut k: Vec<f64> = (0..xmax.max(0))
                .map(|x| {
                    let v = ((x + xmin) as f64 - center + 0.5) * ss;
                    let v = v.abs();
                    if v < 1.0 {
                        1.0 - v
                    } else {
                        0.0
                    }
                })
                .collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|v| *v /= ww);
            }
            let fixed = k
                .iter()
                .map(|&v| {
                    let s = v * (1u32 << PRECISION_BITS) as f64;
                    if v < 0.0 {
                        (-0.5 + s) as i32
                    } else {
                        (0.5 + s) as i32
                    }
                })
                .collect();
            (xmin as usize, fixed)
        })
        .collect()
}

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Which of Pillow's two pass orders to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PillowPassOrder {
    /// Pillow ≥ 13 (what the reference goldens were made with): vertical first when the height
    /// shrinks by more than twice as much as the width.
    #[default]
    Pillow13,
    /// Pillow ≤ 12: always horizontal first.
    Pillow12,
}

/// Pillow's `Image.resize((ow, oh), Image.BILINEAR)` of an 8-bit RGB image (Pillow 13 order).
pub fn pil_resize_bilinear(img: &RgbImage, ow: u32, oh: u32) -> RgbImage {
    pil_resize_bilinear_with(img, ow, oh, PillowPassOrder::Pillow13)
}

/// [`pil_resize_bilinear`] with an explicit pass order.
pub fn pil_resize_bilinear_with(img: &RgbImage, ow: u32, oh: u32, order: PillowPassOrder) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (ow_, oh_) = (ow as usize, oh as usize);
    if (w, h) == (ow_, oh_) {
        return img.clone();
    }
    let (dh, dw) = (h as i64 - oh_ as i64, w as i64 - ow_ as i64);
    if order == PillowPassOrder::Pillow13 && dh > 0 && dh > 2 * dw && ow_ != w {
        // Vertical pass over the whole image, then horizontal.
        let tall = pil_resize_bilinear_with(img, w as u32, oh, order);
        return pil_resize_bilinear_with(&tall, ow, oh, order);
    }
    let vert = pil_coeffs(h, oh_);
    // Horizontal pass, over only the rows the vertical pass will read.
    let horizontal = (ow_ != w).then(|| {
        let first = vert.first().map_or(0, |(s, _)| *s);
        let last = vert.last().map_or(h, |(s, k)| s + k.len());
        let horiz = pil_coeffs(w, ow_);
        let src = img.as_raw();
        let mut tmp = vec![0u8; (last - first) * ow_ * 3];
        tmp.par_chunks_mut(ow_ * 3).enumerate().for_each(|(y, dst)| {
            let row = &src[(y + first) * w * 3..(y + first + 1) * w * 3];
            for (x, (start, k)) in horiz.iter().enumerate() {
                for ch in 0..3 {
                    let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                    for (i, kv) in k.iter().enumerate() {
                        ss += row[(start + i) * 3 + ch] as i32 * kv;
                    }
                    dst[x * 3 + ch] = clip8(ss);
                }
            }
        });
        (tmp, first)
    });
    let data = if oh_ == h {
        // Only the width changes (nothing changing returned above).
        horizontal.map_or_else(|| img.as_raw().clone(), |(tmp, _)| tmp)
    } else {
        let (src, cur_w, rows_offset) = match &horizontal {
            Some((tmp, first)) => (tmp.as_slice(), ow_, *first),
            None => (img.as_raw().as_slice(), w, 0),
        };
        let mut out = vec![0u8; oh_ * cur_w * 3];
        out.par_chunks_mut(cur_w * 3).enumerate().for_each(|(y, dst)| {
            let (start, k) = &vert[y];
            for x in 0..cur_w * 3 {
                let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                for (i, kv) in k.iter().enumerate() {
                    ss += src[(start - rows_offset + i) * cur_w * 3 + x] as i32 * kv;
                }
                dst[x] = clip8(ss);
            }
        });
        out
    };
    RgbImage::from_raw(ow, oh, data).unwrap_or_else(|| RgbImage::new(ow, oh))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_sum_to_one_and_stay_in_bounds() {
        for (i, o) in [(14, 10), (10, 14), (760, 56), (56, 56), (3, 1000), (1000, 3)] {
            for f in [AaFilter::Bilinear, AaFilter::Bicubic] {
                for t in aa_taps(i, o, f) {
                    let s: f32 = t.weights.iter().sum();
                    assert!((s - 1.0).abs() < 1e-5, "{i}->{o} {f:?}: {s}");
                    assert!(t.start + t.weights.len() <= i);
                }
            }
        }
    }

    #[test]
    fn identity_sizes_change_nothing() {
        let data: Vec<f32> = (0..3 * 5 * 7).map(|v| v as f32 * 0.37).collect();
        assert_eq!(resize_aa(&data, (3, 5, 7), (5, 7), AaFilter::Bilinear), data);
        let img = RgbImage::from_fn(9, 4, |x, y| image::Rgb([x as u8 * 20, y as u8 * 50, 7]));
        assert_eq!(pil_resize_bilinear(&img, 9, 4), img);
    }

    #[test]
    fn a_constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([200, 13, 99]));
        for (w, h) in [(10, 10), (80, 5), (37, 50), (3, 23)] {
            let out = pil_resize_bilinear(&img, w, h);
            assert!(out.pixels().all(|p| p.0 == [200, 13, 99]), "{w}x{h}");
        }
        let data = vec![0.25f32; 2 * 17 * 9];
        for (oh, ow) in [(5, 4), (40, 30)] {
            for f in [AaFilter::Bilinear, AaFilter::Bicubic] {
                let out = resize_aa(&data, (2, 17, 9), (oh, ow), f);
                assert!(out.iter().all(|v| (v - 0.25).abs() < 1e-6), "{f:?}");
            }
        }
    }
}
