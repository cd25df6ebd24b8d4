//! The AVX2 + FMA kernels (F16C for f16 weights).
//!
//! Two paths with the same arithmetic. For one or two activation rows (decode): tiles of 4
//! weight rows × 2 activation rows (8 accumulators of 8 lanes), the weight widened to f32 in
//! registers (bf16: a 16-bit shift; f16: `vcvtph2ps`; e4m3: the byte moved into an f16's fields,
//! widened by `vcvtph2ps` and multiplied by its block scale · 2^8) and never written back. For
//! more rows (batched decode) the [`packed`] path widens each 4-row tile once, a few hundred
//! columns at a time, into a scratch in L1 and runs every activation row over it. Either way
//! each output accumulates the same products in the same order, and K tails (K not a multiple of
//! 8) are finished in scalar code.

use std::arch::x86_64::*;

use super::{e4m3_table, Out, Round, WeightSlice};

/// # Safety
/// AVX2 and FMA must be available (and F16C for f16 weights and FP8 weights); `x` is `[m, k]`, the weight
/// `[n, k]` with `r1 <= n`, `out` is `[m, n]` and no other call writes its columns `r0..r1`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn rows(x: &[f32], m: usize, k: usize, w: WeightSlice, r0: usize, r1: usize, out: Out) {
    if m >= packed_rows(&w) {
        return packed(x, m, k, w, r0, r1, out);
    }
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
/// subnormal f32 operands take in a multiply; the two NaN codes (magnitude 0x7F) get the bits of
/// [`F16_NAN`] set, which makes them the f16 NaN `±0x7F80`. Then one multiply by `scale_2p8 = scale · 2^8` (one rounding:
/// `f32(e4m3 · scale)`, what a dequantisation computes), optionally rounded to bf16/f16 (`RND`,
/// see [`super::Round`]).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_fp8<const RND: u8>(p: *const u8, scale_2p8: __m256) -> __m256 {
    let h = _mm_slli_epi16(_mm_cvtepi8_epi16(_mm_loadl_epi64(p.cast())), 7);
    let h = _mm_and_si128(h, _mm_set1_epi16(0xBFFFu16 as i16));
    let nan = _mm_cmpeq_epi16(_mm_and_si128(h, _mm_set1_epi16(0x7FFF)), _mm_set1_epi16(0x3F80));
    let h = _mm_or_si128(h, _mm_and_si128(nan, _mm_set1_epi16(F16_NAN)));
    scaled::<RND>(_mm256_cvtph_ps(h), scale_2p8)
}

/// [`load_fp8`] for sixteen bytes: the byte-to-f16 steps on one 256-bit register.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_fp8x16<const RND: u8>(p: *const u8, scale_2p8: __m256) -> (__m256, __m256) {
    let h = _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(p.cast())), 7);
    let h = _mm256_and_si256(h, _mm256_set1_epi16(0xBFFFu16 as i16));
    let nan = _mm256_cmpeq_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x7FFF)), _mm256_set1_epi16(0x3F80));
    let h = _mm256_or_si256(h, _mm256_and_si256(nan, _mm256_set1_epi16(F16_NAN)));
    let lo = scaled::<RND>(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), scale_2p8);
    let hi = scaled::<RND>(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), scale_2p8);
    (lo, hi)
}

/// Set in an e4m3 NaN code's f16 pattern: the f16 NaN `0x7F80` (or `0xFF80`), which widens to the
/// f32 NaN `0x7FF0_0000`, which a multiply by a finite scale keeps and which the bf16 rounding of
/// [`scaled`] leaves a NaN (its bit 16 is clear, so the rounding increment cannot carry out of it).
const F16_NAN: i16 = 0x7E00;

/// `f · scale_2p8`, rounded as `RND` says.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn scaled<const RND: u8>(f: __m256, scale_2p8: __m256) -> __m256 {
    let mut f = _mm256_mul_ps(f, scale_2p8);
    if RND == ROUND_BF16 {
        // Round to nearest even on the upper 16 bits. The values are finite (the scale is, and
        // `Isa::vectorizes` keeps it below 1e30) or the NaN of `F16_NAN`, which stays a NaN.
        let b = _mm256_castps_si256(f);
        let lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
        let r = _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
        f = _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(0xFFFF_0000u32 as i32)));
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

/// Writes a finished `R × X` tile (weight rows `row + i`, activation rows `j0 + j`) into `out`.
///
/// # Safety
/// The rows are in the caller's chunk and `j0 + X <= m`.
#[inline(always)]
unsafe fn store<const R: usize, const X: usize>(t: &[[f32; X]; R], out: Out, row: usize, j0: usize) {
    for (i, ti) in t.iter().enumerate() {
        for (j, v) in ti.iter().enumerate() {
            out.set(j0 + j, row + i, *v);
        }
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
        unsafe fn $name(x: &[f32], m: usize, k: usize, w: *const $t, r0: usize, r1: usize, out: Out) {
            let mut r = r0;
            while r < r1 {
                let wp = w.add(r * k);
                let four = r1 - r >= 4;
                let mut j = 0;
                while j < m {
                    let xp = x.as_ptr().add(j * k);
                    let two = m - j >= 2;
                    let pf = j == 0 && r + 8 <= r1;
                    match (four, two) {
                        (true, true) => store(&$tile::<4, 2>(xp, k, wp, pf), out, r, j),
                        (true, false) => store(&$tile::<4, 1>(xp, k, wp, pf), out, r, j),
                        (false, true) => store(&$tile::<1, 2>(xp, k, wp, false), out, r, j),
                        (false, false) => store(&$tile::<1, 1>(xp, k, wp, false), out, r, j),
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
    out: Out,
) {
    let cb = k.div_ceil(block[1]);
    let srow = |r: usize| scales.as_ptr().add((r / block[0]) * cb);
    let bw = block[1];
    let mut r = r0;
    while r < r1 {
        let wp = values.as_ptr().add(r * k);
        let four = r1 - r >= 4;
        let mut j = 0;
        while j < m {
            let xp = x.as_ptr().add(j * k);
            let two = m - j >= 2;
            if four {
                let s = [srow(r), srow(r + 1), srow(r + 2), srow(r + 3)];
                match two {
                    true => store(&fp8_tile::<4, 2, RND>(xp, k, wp, s, bw, round), out, r, j),
                    false => store(&fp8_tile::<4, 1, RND>(xp, k, wp, s, bw, round), out, r, j),
                }
            } else {
                match two {
                    true => store(&fp8_tile::<1, 2, RND>(xp, k, wp, [srow(r)], bw, round), out, r, j),
                    false => store(&fp8_tile::<1, 1, RND>(xp, k, wp, [srow(r)], bw, round), out, r, j),
                }
            }
            j += if two { 2 } else { 1 };
        }
        r += if four { 4 } else { 1 };
    }
}

/// Activation rows from which [`rows`] takes the packed path (measured on Zen 3: below these,
/// widening in registers on every pass costs less than the scratch round trip).
fn packed_rows(w: &WeightSlice) -> usize {
    match w {
        WeightSlice::F32(_) | WeightSlice::Fp8 { .. } => 3,
        WeightSlice::Bf16(_) | WeightSlice::F16(_) => 8,
    }
}

/// Columns of a packed chunk: four rows of them in f32 (4 KiB) and the activation rows' slice
/// stay in L1 while every activation row passes over them.
const KC: usize = 256;

/// Weight rows of a packed tile.
const PR: usize = 4;

/// The packed path for several activation rows: each tile of [`PR`] weight rows is widened to
/// f32 [`KC`] columns at a time into a small scratch (bf16, f16 and FP8 once per tile instead of
/// once per pass; f32 is used in place), and every activation row then runs over that chunk from
/// L1, three rows at a time. The accumulators of all rows live in a buffer between chunks, so each
/// output's sequence of multiply-adds (and its horizontal sum and scalar K tail) is exactly the
/// one the one-row path does: results do not depend on `M` or on how the rows are tiled.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn packed(x: &[f32], m: usize, k: usize, w: WeightSlice, r0: usize, r1: usize, out: Out) {
    let kv = k & !7;
    let mut scratch = Scratch([0f32; PR * KC]);
    let scratch = &mut scratch.0;
    let mut acc = vec![_mm256_setzero_ps(); PR * m];
    // The activations chunk by chunk, each chunk's rows contiguous (`[len]` apart): rows `k`
    // apart alias in L1 when `k` is a multiple of 1024 (Step3's widths all are).
    // (Already so when K is one chunk: the rows are then `k = len` apart as given.)
    let mut xs_lines: Vec<Line>;
    let xs: &[f32] = if kv == k && k <= KC {
        x
    } else {
        xs_lines = vec![Line([0f32; 16]); (m * kv).div_ceil(16)];
        let xs = std::slice::from_raw_parts_mut(xs_lines.as_mut_ptr().cast::<f32>(), m * kv);
        let mut c0 = 0;
        while c0 < kv {
            let len = KC.min(kv - c0);
            for j in 0..m {
                xs[c0 * m + j * len..][..len].copy_from_slice(&x[j * k + c0..][..len]);
            }
            c0 += len;
        }
        xs
    };
    let mut r = r0;
    while r < r1 {
        let rows = (r1 - r).min(PR);
        acc.fill(_mm256_setzero_ps());
        let mut c0 = 0;
        while c0 < kv {
            let len = KC.min(kv - c0);
            // The chunk's weights as f32 (pointer, row stride), and where the same columns of the
            // next tile's rows are (prefetched during the first pass: the passes for further
            // activation rows then compute from cache while memory keeps streaming).
            let next = r + 2 * PR <= r1;
            let (wp, ws, pf) = match w {
                WeightSlice::F32(w) => {
                    let p = w.as_ptr().add(r * k + c0);
                    (p, k, Prefetch::new(next, p.wrapping_add(PR * k).cast(), k * 4, 4))
                }
                WeightSlice::Bf16(w) => {
                    let p = w.as_ptr().cast::<u16>().add(r * k + c0);
                    pack_bf16(p, k, rows, len, scratch);
                    (scratch.as_ptr(), KC, Prefetch::new(next, p.wrapping_add(PR * k).cast(), k * 2, 2))
                }
                WeightSlice::F16(w) => {
                    let p = w.as_ptr().cast::<u16>().add(r * k + c0);
                    pack_f16(p, k, rows, len, scratch);
                    (scratch.as_ptr(), KC, Prefetch::new(next, p.wrapping_add(PR * k).cast(), k * 2, 2))
                }
                WeightSlice::Fp8 { values, scales, block, round } => {
                    let cb = k.div_ceil(block[1]);
                    for i in 0..rows {
                        let srow = scales.as_ptr().add(((r + i) / block[0]) * cb);
                        let src = values.as_ptr().add((r + i) * k);
                        let dst = scratch.as_mut_ptr().add(i * KC);
                        match round {
                            Round::None => pack_fp8::<ROUND_NONE>(src, srow, block[1], c0, len, dst),
                            Round::Bf16 => pack_fp8::<ROUND_BF16>(src, srow, block[1], c0, len, dst),
                            Round::F16 => pack_fp8::<ROUND_F16>(src, srow, block[1], c0, len, dst),
                        }
                    }
                    let p = values.as_ptr().add((r + PR) * k + c0);
                    (scratch.as_ptr(), KC, Prefetch::new(next, p, k, 1))
                }
            };
            let mut j = 0;
            while j < m {
                let xp = xs.as_ptr().add(c0 * m + j * len);
                let a = acc.as_mut_ptr().add(j);
                let pf = if j == 0 { pf } else { Prefetch::NONE };
                // Three rows at a time, but four as two and two (a 4 × 1 tile is load-bound).
                let x_rows = if m - j == 4 { 2 } else { (m - j).min(3) };
                match (rows == PR, x_rows) {
                    (true, 1) => run_chunk::<PR, 1>(xp, len, wp, ws, len, a, m, pf),
                    (true, 2) => run_chunk::<PR, 2>(xp, len, wp, ws, len, a, m, pf),
                    (true, _) => run_chunk::<PR, 3>(xp, len, wp, ws, len, a, m, pf),
                    (false, 1) => run_rows::<1>(xp, len, wp, ws, len, a, m, rows),
                    (false, 2) => run_rows::<2>(xp, len, wp, ws, len, a, m, rows),
                    (false, _) => run_rows::<3>(xp, len, wp, ws, len, a, m, rows),
                }
                j += x_rows;
            }
            c0 += len;
        }
        // Horizontal sums, then the K tail in scalar code, in the one-row path's order.
        for i in 0..rows {
            let row = r + i;
            for j in 0..m {
                let mut s = hsum(acc[i * m + j]);
                for c in kv..k {
                    s += x[j * k + c] * w.value(k, row, c);
                }
                out.set(j, row, s);
            }
        }
        r += rows;
    }
}

/// The packed tile, aligned to a cache line so that no 32-byte load straddles two.
#[repr(C, align(64))]
struct Scratch([f32; PR * KC]);

/// One cache line of f32, the unit the re-laid activations are allocated in (aligned likewise).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// [`PR`] weight rows to prefetch alongside a pass: from `p`, `stride` bytes apart, `bytes`
/// bytes per column; none when `p` is null.
#[derive(Clone, Copy)]
struct Prefetch {
    p: *const u8,
    stride: usize,
    bytes: usize,
}

impl Prefetch {
    const NONE: Self = Self { p: std::ptr::null(), stride: 0, bytes: 0 };

    fn new(on: bool, p: *const u8, stride: usize, bytes: usize) -> Self {
        if on {
            Self { p, stride, bytes }
        } else {
            Self::NONE
        }
    }
}

/// `X` activation rows (stride `k`) against `R` f32 weight rows (stride `ws`) over `len` columns,
/// accumulating into `acc[i·m + j]`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn run_chunk<const R: usize, const X: usize>(
    x: *const f32,
    k: usize,
    w: *const f32,
    ws: usize,
    len: usize,
    acc: *mut __m256,
    m: usize,
    pf: Prefetch,
) {
    let mut a = [[_mm256_setzero_ps(); X]; R];
    for (i, ai) in a.iter_mut().enumerate() {
        for (j, v) in ai.iter_mut().enumerate() {
            *v = *acc.add(i * m + j);
        }
    }
    let mut c = 0;
    while c < len {
        if !pf.p.is_null() && (c * pf.bytes) % 64 == 0 {
            for i in 0..PR {
                _mm_prefetch::<_MM_HINT_T0>(pf.p.wrapping_add(i * pf.stride + c * pf.bytes).cast());
            }
        }
        let mut xv = [_mm256_setzero_ps(); X];
        for (j, v) in xv.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(x.add(j * k + c));
        }
        for (i, ai) in a.iter_mut().enumerate() {
            let wv = _mm256_loadu_ps(w.add(i * ws + c));
            for (v, xv) in ai.iter_mut().zip(&xv) {
                *v = _mm256_fmadd_ps(wv, *xv, *v);
            }
        }
        c += 8;
    }
    for (i, ai) in a.iter().enumerate() {
        for (j, v) in ai.iter().enumerate() {
            *acc.add(i * m + j) = *v;
        }
    }
}

/// [`run_chunk`] for a last tile of fewer than [`PR`] rows, one row at a time.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_rows<const X: usize>(
    x: *const f32,
    k: usize,
    w: *const f32,
    ws: usize,
    len: usize,
    acc: *mut __m256,
    m: usize,
    rows: usize,
) {
    for i in 0..rows {
        run_chunk::<1, X>(x, k, w.add(i * ws), ws, len, acc.add(i * m), m, Prefetch::NONE);
    }
}

macro_rules! pack_dense {
    ($name:ident, $feat:literal, $load:ident) => {
        /// `rows` weight rows (stride `k`) widened to f32 into `dst` (stride [`KC`]), `len` columns.
        #[target_feature(enable = $feat)]
        unsafe fn $name(w: *const u16, k: usize, rows: usize, len: usize, dst: &mut [f32; PR * KC]) {
            for i in 0..rows {
                let src = w.add(i * k);
                let d = dst.as_mut_ptr().add(i * KC);
                let mut c = 0;
                while c < len {
                    _mm256_storeu_ps(d.add(c), $load(src.add(c)));
                    c += 8;
                }
            }
        }
    };
}

pack_dense!(pack_bf16, "avx2,fma", load_bf16);
pack_dense!(pack_f16, "avx2,fma,f16c", load_f16);

/// Columns `c0..c0 + len` of one FP8 row dequantised into `dst` (see [`load_fp8`]); `c0` and
/// `len` are multiples of 8, as is the block width `bw`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_fp8<const RND: u8>(src: *const u8, srow: *const f32, bw: usize, c0: usize, len: usize, dst: *mut f32) {
    let end = c0 + len;
    let mut c = c0;
    while c < end {
        let b = c / bw;
        let block_end = ((b + 1) * bw).min(end);
        let sv = _mm256_set1_ps(*srow.add(b) * 256f32);
        while c + 16 <= block_end {
            let (lo, hi) = load_fp8x16::<RND>(src.add(c), sv);
            _mm256_storeu_ps(dst.add(c - c0), lo);
            _mm256_storeu_ps(dst.add(c - c0 + 8), hi);
            c += 16;
        }
        while c < block_end {
            _mm256_storeu_ps(dst.add(c - c0), load_fp8::<RND>(src.add(c), sv));
            c += 8;
        }
    }
}

/// `y[j, :] += Σ_r p[j·ld + r] · w[r, :]` (see [`super::weighted_rows_acc`]): per output element
/// one fused multiply-add per row, in row order, 32 columns at a time in registers.
///
/// # Safety
/// AVX2 and FMA must be available; `p` holds `m` rows `ld` apart of at least `n` values, `w` is
/// `[n, k]`, `y` is `[m, k]`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn weighted_rows_acc(
    p: *const f32,
    m: usize,
    ld: usize,
    w: *const f32,
    n: usize,
    k: usize,
    y: *mut f32,
) {
    let kv = k & !7;
    for j in 0..m {
        let pj = p.add(j * ld);
        let yj = y.add(j * k);
        let mut c = 0;
        while c + 32 <= kv {
            let mut a = [_mm256_setzero_ps(); 4];
            for (i, a) in a.iter_mut().enumerate() {
                *a = _mm256_loadu_ps(yj.add(c + 8 * i));
            }
            for r in 0..n {
                let pv = _mm256_set1_ps(*pj.add(r));
                let wr = w.add(r * k + c);
                for (i, a) in a.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(pv, _mm256_loadu_ps(wr.add(8 * i)), *a);
                }
            }
            for (i, a) in a.iter().enumerate() {
                _mm256_storeu_ps(yj.add(c + 8 * i), *a);
            }
            c += 32;
        }
        while c < kv {
            let mut a = _mm256_loadu_ps(yj.add(c));
            for r in 0..n {
                a = _mm256_fmadd_ps(_mm256_set1_ps(*pj.add(r)), _mm256_loadu_ps(w.add(r * k + c)), a);
            }
            _mm256_storeu_ps(yj.add(c), a);
            c += 8;
        }
        for c in kv..k {
            let mut a = *yj.add(c);
            for r in 0..n {
                a = (*pj.add(r)).mul_add(*w.add(r * k + c), a);
            }
            *yj.add(c) = a;
        }
    }
}
