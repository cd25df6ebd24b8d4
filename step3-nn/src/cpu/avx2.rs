//! The AVX2 + FMA kernels (F16C for f16 weights).
//!
//! Tiles of 4 weight rows × 2 activation rows (8 accumulators of 8 lanes); the weight row is
//! widened to f32 in registers (bf16: a 16-bit shift; f16: `vcvtph2ps`; e4m3: the byte moved into
//! an f16's fields, widened by `vcvtph2ps` and multiplied by its block scale · 2^8) and never
//! written back. K tails (K not a multiple of 8) are finished in scalar code.

use std::arch::x86_64::*;

use super::{e4m3_table, Round, WeightSlice};

/// # Safety
/// AVX2 and FMA must be available (and F16C for f16 weights and FP8 weights); `x` is `[m, k]`, the weight
/// `[n, k]` with `r1 <= n`, `out` is `[r1 - r0, m]`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn rows(x: &[f32], m: usize, k: usize, w: WeightSlice, r0: usize, r1: usize, out: &mut [f32]) {
    match w {
        WeightSlice::F32(w) => dense_f32(x, m, k, w.as_ptr(), r0, r1, out),
        WeightSlice::Bf16(w) => dense_bf16(x, m, k, w.as_ptr().cast(), r0, r1, out),
        WeightSlice::F16(w) => dense_f16(x, m, k, w.as_ptr().cast(), r0, r1, out),
        WeightSlice::Fp8 { values, scales, block, round } => match round {
            Round::None => fp8::<ROUND_NONE>(x, m, k, values, scales, block, round, r0, r1, out),
            Round::Bf16 => fp8::<ROUND_BF16>(x, m, k, values, scales, block, round, r0, r1, out),
            Round::F16 => fp8::<ROUND_F16>(x, m, k, values, scales, block, round, r0, r1, out),
        },
    }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn load_f32(p: *const f32) -> __m256 {
    _mm256_loadu_ps(p)
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn load_bf16(p: *const u16) -> __m256 {
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())), 16))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_f16(p: *const u16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
}

/// Eight e4m3 bytes times their block scale. Each byte becomes an f16 bit pattern (sign to bit
/// 15, the 4 exponent and 3 mantissa bits to bits 10-13 and 7-9) whose value is exactly
/// `e4m3 · 2^-8`, subnormals included, and which `vcvtph2ps` widens without the slow path that
/// subnormal f32 operands take in a multiply; the two NaN codes (magnitude 0x7F) become the f16
/// NaN `0xFFFF` first. Then one multiply by `scale_2p8 = scale · 2^8` (one rounding:
/// `f32(e4m3 · scale)`, what a dequantisation computes), optionally rounded to bf16/f16 (`RND`,
/// see [`super::Round`]).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_fp8<const RND: u8>(p: *const u8, scale_2p8: __m256) -> __m256 {
    let h = _mm_slli_epi16(_mm_cvtepi8_epi16(_mm_loadl_epi64(p.cast())), 7);
    let h = _mm_and_si128(h, _mm_set1_epi16(0xBFFFu16 as i16));
    let nan = _mm_cmpeq_epi16(_mm_and_si128(h, _mm_set1_epi16(0x7FFF)), _mm_set1_epi16(0x3F80));
    scaled::<RND>(_mm256_cvtph_ps(_mm_or_si128(h, nan)), scale_2p8)
}

/// [`load_fp8`] for sixteen bytes: the byte-to-f16 steps on one 256-bit register.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_fp8x16<const RND: u8>(p: *const u8, scale_2p8: __m256) -> (__m256, __m256) {
    let h = _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(p.cast())), 7);
    let h = _mm256_and_si256(h, _mm256_set1_epi16(0xBFFFu16 as i16));
    let nan = _mm256_cmpeq_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x7FFF)), _mm256_set1_epi16(0x3F80));
    let h = _mm256_or_si256(h, nan);
    let lo = scaled::<RND>(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), scale_2p8);
    let hi = scaled::<RND>(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), scale_2p8);
    (lo, hi)
}

/// `f · scale_2p8`, rounded as `RND` says.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn scaled<const RND: u8>(f: __m256, scale_2p8: __m256) -> __m256 {
    let mut f = _mm256_mul_ps(f, scale_2p8);
    if RND == ROUND_BF16 {
        // Round to nearest even on the upper 16 bits (finite values; NaN stays NaN).
        let b = _mm256_castps_si256(f);
        let lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
        let r = _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
        let r = _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(0xFFFF_0000u32 as i32)));
        f = _mm256_blendv_ps(r, f, _mm256_cmp_ps(f, f, _CMP_UNORD_Q));
    } else if RND == ROUND_F16 {
        f = _mm256_cvtph_ps(_mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
    }
    f
}

const ROUND_NONE: u8 = 0;
const ROUND_BF16: u8 = 1;
const ROUND_F16: u8 = 2;

fn f32_to_f32(v: f32) -> f32 {
    v
}

fn bf16_to_f32(v: u16) -> f32 {
    f32::from_bits((v as u32) << 16)
}

fn f16_to_f32(v: u16) -> f32 {
    half::f16::from_bits(v).to_f32()
}

/// Writes a finished `R × X` tile (weight rows `i`, activation rows `j`) into `out [rows, m]`.
#[inline(always)]
fn store<const R: usize, const X: usize>(t: &[[f32; X]; R], out: &mut [f32], m: usize, row: usize, j0: usize) {
    for (i, ti) in t.iter().enumerate() {
        out[(row + i) * m + j0..][..X].copy_from_slice(ti);
    }
}

macro_rules! dense_kernel {
    ($name:ident, $tile:ident, $t:ty, $feat:literal, $load:ident, $scalar:expr) => {
        /// One tile: `R` weight rows from `w` (row stride `k`) against `X` activation rows from
        /// `x` (row stride `k`).
        #[target_feature(enable = $feat)]
        unsafe fn $tile<const R: usize, const X: usize>(
            x: *const f32,
            k: usize,
            w: *const $t,
            prefetch: bool,
        ) -> [[f32; X]; R] {
            let mut acc = [[_mm256_setzero_ps(); X]; R];
            let kv = k & !7;
            let mut c = 0;
            while c < kv {
                // On the first pass over these weight rows, ask for the next tile's rows too, one
                // cache line at a time: later passes (more activation rows) then compute from
                // cache while memory keeps streaming, instead of memory waiting for them.
                if prefetch && (c * std::mem::size_of::<$t>()) % 64 == 0 {
                    for i in 0..R {
                        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((R + i) * k + c).cast());
                    }
                }
                let mut xv = [_mm256_setzero_ps(); X];
                for (j, v) in xv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(x.add(j * k + c));
                }
                for (i, a) in acc.iter_mut().enumerate() {
                    let wv = $load(w.add(i * k + c));
                    for (a, xv) in a.iter_mut().zip(&xv) {
                        *a = _mm256_fmadd_ps(wv, *xv, *a);
                    }
                }
                c += 8;
            }
            let mut out = [[0f32; X]; R];
            for i in 0..R {
                for j in 0..X {
                    let mut s = hsum(acc[i][j]);
                    for c in kv..k {
                        s += *x.add(j * k + c) * $scalar(*w.add(i * k + c));
                    }
                    out[i][j] = s;
                }
            }
            out
        }

        #[target_feature(enable = $feat)]
        unsafe fn $name(x: &[f32], m: usize, k: usize, w: *const $t, r0: usize, r1: usize, out: &mut [f32]) {
            let mut r = r0;
            while r < r1 {
                let wp = w.add(r * k);
                let row = r - r0;
                let four = r1 - r >= 4;
                let mut j = 0;
                while j < m {
                    let xp = x.as_ptr().add(j * k);
                    let two = m - j >= 2;
                    let pf = j == 0 && r + 8 <= r1;
                    match (four, two) {
                        (true, true) => store(&$tile::<4, 2>(xp, k, wp, pf), out, m, row, j),
                        (true, false) => store(&$tile::<4, 1>(xp, k, wp, pf), out, m, row, j),
                        (false, true) => store(&$tile::<1, 2>(xp, k, wp, false), out, m, row, j),
                        (false, false) => store(&$tile::<1, 1>(xp, k, wp, false), out, m, row, j),
                    }
                    j += if two { 2 } else { 1 };
                }
                r += if four { 4 } else { 1 };
            }
        }
    };
}

dense_kernel!(dense_f32, tile_f32, f32, "avx2,fma", load_f32, f32_to_f32);
dense_kernel!(dense_bf16, tile_bf16, u16, "avx2,fma", load_bf16, bf16_to_f32);
dense_kernel!(dense_f16, tile_f16, u16, "avx2,fma,f16c", load_f16, f16_to_f32);

/// One block-FP8 tile: the weights dequantised in registers (scale folded into the widening
/// multiply, see [`load_fp8`]) and accumulated exactly as the dense tiles accumulate, so a product
/// with FP8 weights equals, bit for bit, the product with the weights dequantised beforehand.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fp8_tile<const R: usize, const X: usize, const RND: u8>(
    x: *const f32,
    k: usize,
    w: *const u8,
    scale_rows: [*const f32; R],
    bw: usize,
    round: Round,
) -> [[f32; X]; R] {
    let table = e4m3_table();
    let two_8 = 256f32;
    let mut acc = [[_mm256_setzero_ps(); X]; R];
    let kv = k & !7;
    let mut c = 0;
    let mut b = 0;
    while c < kv {
        let end = (c + bw).min(kv);
        let mut sv = [_mm256_setzero_ps(); R];
        for (i, s) in sv.iter_mut().enumerate() {
            *s = _mm256_set1_ps(*scale_rows[i].add(b) * two_8);
        }
        // Sixteen at a time, accumulated in the same order as eight at a time.
        while c + 16 <= end {
            let mut x0 = [_mm256_setzero_ps(); X];
            let mut x1 = [_mm256_setzero_ps(); X];
            for j in 0..X {
                x0[j] = _mm256_loadu_ps(x.add(j * k + c));
                x1[j] = _mm256_loadu_ps(x.add(j * k + c + 8));
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let (w0, w1) = load_fp8x16::<RND>(w.add(i * k + c), sv[i]);
                for j in 0..X {
                    a[j] = _mm256_fmadd_ps(w0, x0[j], a[j]);
                    a[j] = _mm256_fmadd_ps(w1, x1[j], a[j]);
                }
            }
            c += 16;
        }
        while c < end {
            let mut xv = [_mm256_setzero_ps(); X];
            for (j, v) in xv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(x.add(j * k + c));
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let wv = load_fp8::<RND>(w.add(i * k + c), sv[i]);
                for (a, xv) in a.iter_mut().zip(&xv) {
                    *a = _mm256_fmadd_ps(wv, *xv, *a);
                }
            }
            c += 8;
        }
        b += 1;
    }
    let mut out = [[0f32; X]; R];
    for i in 0..R {
        for j in 0..X {
            let mut s = hsum(acc[i][j]);
            for c in kv..k {
                let wv = round.apply(table[*w.add(i * k + c) as usize] * *scale_rows[i].add(c / bw));
                s += *x.add(j * k + c) * wv;
            }
            out[i][j] = s;
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fp8<const RND: u8>(
    x: &[f32],
    m: usize,
    k: usize,
    values: &[u8],
    scales: &[f32],
    block: [usize; 2],
    round: Round,
    r0: usize,
    r1: usize,
    out: &mut [f32],
) {
    let cb = k.div_ceil(block[1]);
    let srow = |r: usize| scales.as_ptr().add((r / block[0]) * cb);
    let bw = block[1];
    let mut r = r0;
    while r < r1 {
        let wp = values.as_ptr().add(r * k);
        let row = r - r0;
        let four = r1 - r >= 4;
        let mut j = 0;
        while j < m {
            let xp = x.as_ptr().add(j * k);
            let two = m - j >= 2;
            if four {
                let s = [srow(r), srow(r + 1), srow(r + 2), srow(r + 3)];
                match two {
                    true => store(&fp8_tile::<4, 2, RND>(xp, k, wp, s, bw, round), out, m, row, j),
                    false => store(&fp8_tile::<4, 1, RND>(xp, k, wp, s, bw, round), out, m, row, j),
                }
            } else {
                match two {
                    true => store(&fp8_tile::<1, 2, RND>(xp, k, wp, [srow(r)], bw, round), out, m, row, j),
                    false => store(&fp8_tile::<1, 1, RND>(xp, k, wp, [srow(r)], bw, round), out, m, row, j),
                }
            }
            j += if two { 2 } else { 1 };
        }
        r += if four { 4 } else { 1 };
    }
}
