//! The NEON kernels (aarch64): the AVX2 path's one-row tiles, eight columns at a time as two
//! 4-lane halves.
//!
//! Tiles of 4 weight rows × 2 activation rows (16 accumulators of 4 lanes; aarch64 has 32 vector
//! registers), every weight widened to f32 in registers and never written back: bf16 by a 16-bit
//! shift; f16 and e4m3 by moving the magnitude's bits into an f32 and multiplying by a power of
//! two (exact, subnormals included; f16 infinities and NaNs set apart), since the f16 vector types
//! are not stable Rust. FP8 sums each scale block in its own accumulators, which then enter the
//! totals with one multiply-add by the block's scale, as on AVX2. Each output accumulates the same
//! products in the same order whatever `M`, and K tails (K not a multiple of 8) are finished in
//! scalar code. There is no packed path: batched rows run the same tiles.

use std::arch::aarch64::*;

use super::{Out, WeightSlice};

/// # Safety
/// NEON must be available; `x` is `[m, k]`, the weight `[n, k]` with `r1 <= n`, `out` is `[m, n]`
/// and no other call writes its columns `r0..r1`.
#[target_feature(enable = "neon")]
pub(super) unsafe fn rows(x: &[f32], m: usize, k: usize, w: WeightSlice, r0: usize, r1: usize, out: Out) {
    match w {
        WeightSlice::F32(v) => tiles::<F32>(x, m, k, w, v.as_ptr(), r0, r1, out),
        WeightSlice::Bf16(v) => tiles::<Bf16>(x, m, k, w, v.as_ptr().cast(), r0, r1, out),
        WeightSlice::F16(v) => tiles::<F16>(x, m, k, w, v.as_ptr().cast(), r0, r1, out),
        WeightSlice::Fp8 { values, .. } => tiles::<E4m3>(x, m, k, w, values.as_ptr(), r0, r1, out),
    }
}

/// Eight weights of one storage type as two f32 halves.
trait Widen {
    type T: Copy;
    /// # Safety
    /// `p` points to eight readable values.
    unsafe fn load8(p: *const Self::T) -> (float32x4_t, float32x4_t);
}

struct F32;
struct Bf16;
struct F16;
/// e4m3 values, unscaled (the block's scale multiplies the block's sum).
struct E4m3;

impl Widen for F32 {
    type T = f32;
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> (float32x4_t, float32x4_t) {
        (vld1q_f32(p), vld1q_f32(p.add(4)))
    }
}

impl Widen for Bf16 {
    type T = u16;
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> (float32x4_t, float32x4_t) {
        let v = vld1q_u16(p);
        (vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(v))), vreinterpretq_f32_u32(vshll_high_n_u16::<16>(v)))
    }
}

/// Four f16 bit patterns (in the low 16 bits of each lane) as f32, exactly: the magnitude's 15
/// bits moved up by 13 are an f32 `2^-112` times the value (a subnormal f32 for a subnormal f16),
/// so one multiply by `2^112` gives it; infinities and NaNs (exponent 31) are rebuilt apart; the
/// sign goes back last.
#[inline(always)]
unsafe fn f16x4(u: uint32x4_t) -> float32x4_t {
    let mag = vandq_u32(u, vdupq_n_u32(0x7FFF));
    let f = vmulq_f32(vreinterpretq_f32_u32(vshlq_n_u32::<13>(mag)), vdupq_n_f32(f32::from_bits(0x7780_0000)));
    let special = vorrq_u32(vdupq_n_u32(0x7F80_0000), vshlq_n_u32::<13>(vandq_u32(mag, vdupq_n_u32(0x3FF))));
    let f = vbslq_u32(vcgeq_u32(mag, vdupq_n_u32(0x7C00)), special, vreinterpretq_u32_f32(f));
    vreinterpretq_f32_u32(vorrq_u32(f, vshlq_n_u32::<16>(vandq_u32(u, vdupq_n_u32(0x8000)))))
}

impl Widen for F16 {
    type T = u16;
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> (float32x4_t, float32x4_t) {
        let v = vld1q_u16(p);
        (f16x4(vmovl_u16(vget_low_u16(v))), f16x4(vmovl_high_u16(v)))
    }
}

/// Four e4m3 bytes (in the low 8 bits of each lane) as f32, exactly, by the same route as
/// [`f16x4`]: the 7 magnitude bits moved up by 20 are `2^-120` times the value, then the sign.
/// The NaN codes would read as ±480: weights holding them never get here (see
/// [`super::Isa::vectorizes`]).
#[inline(always)]
unsafe fn e4m3x4(u: uint32x4_t) -> float32x4_t {
    let mag = vshlq_n_u32::<20>(vandq_u32(u, vdupq_n_u32(0x7F)));
    let f = vmulq_f32(vreinterpretq_f32_u32(mag), vdupq_n_f32(f32::from_bits(0x7B80_0000)));
    vreinterpretq_f32_u32(vorrq_u32(vreinterpretq_u32_f32(f), vshlq_n_u32::<24>(vandq_u32(u, vdupq_n_u32(0x80)))))
}

impl Widen for E4m3 {
    type T = u8;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> (float32x4_t, float32x4_t) {
        let v = vmovl_u8(vld1_u8(p));
        (e4m3x4(vmovl_u16(vget_low_u16(v))), e4m3x4(vmovl_high_u16(v)))
    }
}

/// One tile: `R` weight rows from `w` (row stride `k`) against `X` activation rows from `x` (row
/// stride `k`), columns `0..kv` (a multiple of 8). With `scales` (FP8: each row's block scales and
/// the block width) every block's sums enter the totals times the block's scale; without, the
/// sums are the totals. The horizontal sums are left to the caller.
#[target_feature(enable = "neon")]
unsafe fn tile<W: Widen, const R: usize, const X: usize>(
    x: *const f32,
    k: usize,
    kv: usize,
    w: *const W::T,
    scales: Option<([*const f32; R], usize)>,
) -> [[float32x4_t; X]; R] {
    let zero = vdupq_n_f32(0.0);
    let mut tot = [[zero; X]; R];
    let bw = scales.map_or(kv.max(1), |(_, bw)| bw);
    let mut c = 0;
    let mut b = 0;
    while c < kv {
        let end = (c + bw).min(kv);
        let mut lo = [[zero; X]; R];
        let mut hi = [[zero; X]; R];
        while c < end {
            let mut x0 = [zero; X];
            let mut x1 = [zero; X];
            for j in 0..X {
                x0[j] = vld1q_f32(x.add(j * k + c));
                x1[j] = vld1q_f32(x.add(j * k + c + 4));
            }
            for i in 0..R {
                let (w0, w1) = W::load8(w.add(i * k + c));
                for j in 0..X {
                    lo[i][j] = vfmaq_f32(lo[i][j], w0, x0[j]);
                    hi[i][j] = vfmaq_f32(hi[i][j], w1, x1[j]);
                }
            }
            c += 8;
        }
        for i in 0..R {
            for j in 0..X {
                let sum = vaddq_f32(lo[i][j], hi[i][j]);
                tot[i][j] = match scales {
                    Some((rows, _)) => vfmaq_f32(tot[i][j], sum, vdupq_n_f32(*rows[i].add(b))),
                    None => sum,
                };
            }
        }
        b += 1;
    }
    tot
}

/// Output columns `r0..r1` of every activation row: 4 × 2 tiles, then the edges. `w` is `ws`'s
/// storage as `W` reads it.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "neon")]
unsafe fn tiles<W: Widen>(
    x: &[f32],
    m: usize,
    k: usize,
    ws: WeightSlice,
    w: *const W::T,
    r0: usize,
    r1: usize,
    out: Out,
) {
    let kv = k & !7;
    let (scales, block) = match ws {
        WeightSlice::Fp8 { scales, block, .. } => (Some(scales), block),
        _ => (None, [1, 1]),
    };
    // Row `r`'s block scales (FP8), null otherwise.
    let srow = |r: usize| scales.map_or(std::ptr::null(), |s| super::scale_row(s, block, k, r).as_ptr());
    let four = |r: usize| scales.map(|_| ([srow(r), srow(r + 1), srow(r + 2), srow(r + 3)], block[1]));
    let one = |r: usize| scales.map(|_| ([srow(r)], block[1]));
    let mut r = r0;
    while r < r1 {
        let rows4 = r1 - r >= 4;
        let mut j = 0;
        while j < m {
            let two = m - j >= 2;
            let (xp, wp) = (x.as_ptr().add(j * k), w.add(r * k));
            match (rows4, two) {
                (true, true) => finish(&tile::<W, 4, 2>(xp, k, kv, wp, four(r)), x, k, ws, r, j, out),
                (true, false) => finish(&tile::<W, 4, 1>(xp, k, kv, wp, four(r)), x, k, ws, r, j, out),
                (false, true) => finish(&tile::<W, 1, 2>(xp, k, kv, wp, one(r)), x, k, ws, r, j, out),
                (false, false) => finish(&tile::<W, 1, 1>(xp, k, kv, wp, one(r)), x, k, ws, r, j, out),
            }
            j += if two { 2 } else { 1 };
        }
        r += if rows4 { 4 } else { 1 };
    }
}

/// Writes a tile's outputs (weight rows `r + i`, activation rows `j + jj`): the horizontal sum of
/// each total, then the K tail in scalar code.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "neon")]
unsafe fn finish<const R: usize, const X: usize>(
    t: &[[float32x4_t; X]; R],
    x: &[f32],
    k: usize,
    ws: WeightSlice,
    r: usize,
    j: usize,
    out: Out,
) {
    for (i, ti) in t.iter().enumerate() {
        for (jj, v) in ti.iter().enumerate() {
            let mut s = vaddvq_f32(*v);
            for c in (k & !7)..k {
                s += x[(j + jj) * k + c] * ws.value(k, r + i, c);
            }
            out.set(j + jj, r + i, s);
        }
    }
}
