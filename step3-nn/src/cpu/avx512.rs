//! The AVX512-BF16 kernels: bf16 and block-FP8 weights against activations that are bf16 values
//! themselves (every activation of a bf16 compute dtype is), by `vdpbf16ps`.
//!
//! `vdpbf16ps` multiplies sixteen pairs of bf16 values exactly (a bf16 product fits in f32) and
//! adds both products of each pair into an f32 lane, rounding as f32 arithmetic does; it reads
//! the weight as stored, so nothing is widened, and it does twice the multiply-adds of an f32 FMA
//! per instruction. The activations are handed over as bf16 bits ([`to_bf16`]), laid out once per
//! product. Up to eight activation rows take the weight a row at a time (one sequential
//! stream); more take tiles of 4 weight rows × up to 4 activation rows (16 accumulators of 16
//! lanes); either way the next weight bytes are requested in order ([`super::Ahead`]). The K tail is read with masked loads (zeros beyond `K`), so there is no scalar tail. Each
//! output's sequence of instructions depends only on `K`, never on `M` or on the tiling: a row's
//! results are the same alone or in a batch.
//!
//! Block-FP8 weights ([`rows_fp8`]): every e4m3 value is a bf16 value (3 mantissa bits, exponents
//! from 2^-9 to 2^8), converted to bf16 exactly ([`e4m3_to_bf16`], by integer operations and a
//! table for the subnormals): in registers, four rows at a time, for up to three activation rows;
//! for more, each 4-row tile once, into a scratch that every group of activation rows then reads; each scale block's sum gets its own accumulators and enters the
//! totals with one multiply-add by the block's scale, as on the other paths.
//!
//! The instruction reads bf16 subnormals as zero and flushes subnormal results (magnitudes below
//! 1.2e-38): [`bf16_exact`] sends activations holding subnormals to the AVX2 path, and a
//! subnormal bf16 weight (which no trained checkpoint stores) counts as zero here.

use std::arch::x86_64::*;

use super::{scale_row, store, Ahead, Out};

/// Whether every value of `x` is a bf16 value that is zero, normal, infinite or NaN (f32 bits
/// whose low 16 are zero, not subnormal): then [`to_bf16`] is exact and the bf16 products are
/// the f32 products.
pub(super) fn bf16_exact(x: &[f32]) -> bool {
    x.iter().all(|v| {
        let b = v.to_bits();
        b & 0xFFFF == 0 && (b & 0x7F80_0000 != 0 || b & 0x007F_0000 == 0)
    })
}

/// The high halves of `x`'s bits: `x` in bf16, exactly when [`bf16_exact`] holds.
pub(super) fn to_bf16(x: &[f32]) -> Vec<u16> {
    x.iter().map(|v| (v.to_bits() >> 16) as u16).collect()
}

/// Output columns (weight rows) `r0..r1` of every row of `out`: `out[j, r] = Σ_c x[j, c] · w[r, c]`.
///
/// With fewer than [`TILE_ROWS_FROM`] activation rows the weight is read one row at a time, a
/// single sequential stream (on one core, 19 GB/s against 12 in tiles of four); with more, in
/// tiles of four rows, each tile once from memory and then from cache for the further activation
/// rows.
/// Either way the next tile's bytes are requested in order while this one computes ([`Ahead`]).
///
/// # Safety
/// AVX512F, AVX512BW and AVX512-BF16 must be available; `x` is `[m, k]` (bf16 bits), `w` points
/// at a `[n, k]` bf16 weight with `r1 <= n`, `out` is `[m, n]` and no other call writes its
/// columns `r0..r1`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn rows(x: &[u16], m: usize, k: usize, w: *const u16, r0: usize, r1: usize, out: Out) {
    let r = if m >= TILE_ROWS_FROM { tiles::<4>(x, m, k, w, r0, r1, out) } else { r0 };
    tiles::<1>(x, m, k, w, r, r1, out);
}

/// Activation rows from which [`rows`] reads a bf16 weight in tiles of four rows: below, a row at
/// a time (one stream; the row stays in L1 for every pass of four activation rows). Measured with
/// `step3 bench products --weights bf16 --rows 4,8,16` on Zen 4: with tiles from 4 rows, a 16-row
/// step's products took 25–34 ms in six runs, with tiles from 9 rows 21–27 ms (the routed
/// experts' 4-row products 9–10 against 11–13 ms); 4- and 8-row steps were the same either way
/// within the noise; the 16-row products themselves need the tiles (32–38 ms a row at a time).
const TILE_ROWS_FROM: usize = 9;

/// [`rows`] in tiles of `R` weight rows from `r0` while a whole tile fits before `r1`; returns
/// the first row not done.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn tiles<const R: usize>(x: &[u16], m: usize, k: usize, w: *const u16, r0: usize, r1: usize, out: Out) -> usize {
    let tile_bytes = R * k * 2;
    // The next tile's cache lines, spread evenly over this tile's steps (every pass).
    let steps = m.div_ceil(4) * k.div_ceil(32);
    let per = Ahead::per_step(tile_bytes, steps);
    let mut r = r0;
    while r + R <= r1 {
        let wp = w.add(r * k);
        let mut ahead = Ahead::next_tile(wp.cast(), tile_bytes, r + 2 * R <= r1, per);
        let mut j = 0;
        while j < m {
            let xp = x.as_ptr().add(j * k);
            let xr = (m - j).min(4);
            match xr {
                4 => store(&tile::<R, 4>(xp, k, wp, &mut ahead), out, r, j),
                3 => store(&tile::<R, 3>(xp, k, wp, &mut ahead), out, r, j),
                2 => store(&tile::<R, 2>(xp, k, wp, &mut ahead), out, r, j),
                _ => store(&tile::<R, 1>(xp, k, wp, &mut ahead), out, r, j),
            }
            j += xr;
        }
        r += R;
    }
    r
}

/// [`rows`] for a block-FP8 weight: `values [n, k]` (e4m3 bytes, no NaN code) with f32 `scales`
/// per `block` (`block[1]` a multiple of 32).
///
/// # Safety
/// As [`rows`] (AVX512VL as well), with `values` `[n, k]` and `scales`
/// `[ceil(n / block[0]), ceil(k / block[1])]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn rows_fp8(
    x: &[u16],
    m: usize,
    k: usize,
    values: &[u8],
    scales: &[f32],
    block: [usize; 2],
    r0: usize,
    r1: usize,
    out: Out,
) {
    let srow = |r: usize| scale_row(scales, block, k, r).as_ptr();
    let bw = block[1];
    if m <= 3 {
        // One pass: the values are converted in registers as the products need them, four
        // weight rows at a time (four accumulator chains: one row alone waits on its chain),
        // the next tile requested in order alongside.
        let per = Ahead::per_step(4 * k, k.div_ceil(32));
        let mut r = r0;
        while r < r1 {
            let w = values.as_ptr().add(r * k);
            if r1 - r >= 4 {
                let mut ahead = Ahead::next_tile(w, 4 * k, r + 8 <= r1, per);
                let s4 = std::array::from_fn(|i| srow(r + i));
                fp8_tiles::<4, true>(x, m, k, w, s4, bw, &mut ahead, out, r);
                r += 4;
            } else {
                fp8_tiles::<1, true>(x, m, k, w, [srow(r)], bw, &mut Ahead::none(), out, r);
                r += 1;
            }
        }
        return;
    }
    // More passes: each tile of four rows converted once, into a scratch that every group of
    // activation rows reads; the conversion reads row by row and requests the next tile's rows.
    let mut scratch = vec![0u16; 4 * k];
    let mut r = r0;
    while r < r1 {
        let four = r1 - r >= 4;
        let rows = if four { 4 } else { 1 };
        let next = four && r + 8 <= r1;
        for i in 0..rows {
            let src = values.as_ptr().add((r + i) * k);
            let dst = scratch.as_mut_ptr().add(i * k);
            let mut c = 0;
            while c < k {
                if next && c % 64 == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(src.wrapping_add(4 * k + c).cast());
                }
                let mask = if k - c >= 32 { !0 } else { (1u32 << (k - c)) - 1 };
                _mm512_mask_storeu_epi16(dst.add(c).cast(), mask, e4m3_to_bf16(src.add(c), mask));
                c += 32;
            }
        }
        let w = scratch.as_ptr().cast::<u8>();
        if four {
            let s4 = std::array::from_fn(|i| srow(r + i));
            fp8_tiles::<4, false>(x, m, k, w, s4, bw, &mut Ahead::none(), out, r);
        } else {
            fp8_tiles::<1, false>(x, m, k, w, [srow(r)], bw, &mut Ahead::none(), out, r);
        }
        r += rows;
    }
}

/// The `R` weight rows at `r` (`w`, row stride `k`: their e4m3 bytes when `E4M3`, else their bf16
/// conversions) against every activation row, three at a time, into `out`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn fp8_tiles<const R: usize, const E4M3: bool>(
    x: &[u16],
    m: usize,
    k: usize,
    w: *const u8,
    scale_rows: [*const f32; R],
    bw: usize,
    ahead: &mut Ahead,
    out: Out,
    r: usize,
) {
    let mut j = 0;
    while j < m {
        let xp = x.as_ptr().add(j * k);
        let xr = (m - j).min(3);
        match xr {
            3 => store(&fp8_tile::<R, 3, E4M3>(xp, k, w, scale_rows, bw, ahead), out, r, j),
            2 => store(&fp8_tile::<R, 2, E4M3>(xp, k, w, scale_rows, bw, ahead), out, r, j),
            _ => store(&fp8_tile::<R, 1, E4M3>(xp, k, w, scale_rows, bw, ahead), out, r, j),
        }
        j += xr;
    }
}

/// Thirty-two e4m3 bytes at `p` (those outside `mask` read as zero) as the bf16 bits of the same
/// values: a normal code's exponent and mantissa fields shifted into place and rebiased (+120),
/// a subnormal's (`m · 2^-9`, `m < 8`) from a table, the sign moved to bit 15.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn e4m3_to_bf16(p: *const u8, mask: __mmask32) -> __m512i {
    const SUBNORMAL: [u16; 32] = {
        let mut t = [0u16; 32];
        let v = [0, 0x3B00, 0x3B80, 0x3BC0, 0x3C00, 0x3C20, 0x3C40, 0x3C60];
        let mut i = 0;
        while i < 8 {
            t[i] = v[i];
            i += 1;
        }
        t
    };
    let b = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(mask, p.cast()));
    let mag = _mm512_and_si512(b, _mm512_set1_epi16(0x7F));
    let normal = _mm512_add_epi16(_mm512_slli_epi16::<4>(mag), _mm512_set1_epi16(0x3C00));
    let sub = _mm512_permutexvar_epi16(mag, _mm512_loadu_si512(SUBNORMAL.as_ptr().cast()));
    let bits = _mm512_mask_blend_epi16(_mm512_cmplt_epu16_mask(mag, _mm512_set1_epi16(8)), normal, sub);
    _mm512_or_si512(bits, _mm512_slli_epi16::<8>(_mm512_and_si512(b, _mm512_set1_epi16(0x80))))
}

/// `R` weight rows from `w` (row stride `k`: e4m3 bytes converted here when `E4M3`, else their
/// bf16 conversions from the scratch) against `X` activation rows from `x`: per scale block of
/// width `bw` (a multiple of 32), the block's sums in their own accumulators, then
/// `total = fma(block_sum, scale, total)`. The arithmetic is the same either way. `ahead` is
/// stepped once per step.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn fp8_tile<const R: usize, const X: usize, const E4M3: bool>(
    x: *const u16,
    k: usize,
    w: *const u8,
    scale_rows: [*const f32; R],
    bw: usize,
    ahead: &mut Ahead,
) -> [[f32; X]; R] {
    let mut tot = [[_mm512_setzero_ps(); X]; R];
    let mut c = 0;
    let mut b = 0;
    while c < k {
        let end = (c + bw).min(k);
        let mut acc = [[_mm512_setzero_ps(); X]; R];
        while c < end {
            let mask = if end - c >= 32 { !0 } else { (1u32 << (end - c)) - 1 };
            ahead.step();
            if E4M3 {
                let mut xv = [_mm512_setzero_si512(); X];
                for (j, v) in xv.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_epi16(mask, x.add(j * k + c).cast());
                }
                for (i, a) in acc.iter_mut().enumerate() {
                    let wv = as_bh(e4m3_to_bf16(w.add(i * k + c), mask));
                    for (a, xv) in a.iter_mut().zip(&xv) {
                        *a = _mm512_dpbf16_ps(*a, as_bh(*xv), wv);
                    }
                }
            } else {
                step(&mut acc, x, k, w.cast(), c, mask);
            }
            c += 32;
        }
        for i in 0..R {
            let s = _mm512_set1_ps(*scale_rows[i].add(b));
            for j in 0..X {
                tot[i][j] = _mm512_fmadd_ps(acc[i][j], s, tot[i][j]);
            }
        }
        b += 1;
    }
    reduce(&tot)
}

/// `R` weight rows from `w` against `X` activation rows from `x` (both row stride `k`), 32
/// columns per step, the last step masked, `ahead` stepped once per step.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn tile<const R: usize, const X: usize>(
    x: *const u16,
    k: usize,
    w: *const u16,
    ahead: &mut Ahead,
) -> [[f32; X]; R] {
    let mut acc = [[_mm512_setzero_ps(); X]; R];
    let kv = k & !31;
    let mut c = 0;
    while c < kv {
        ahead.step();
        step(&mut acc, x, k, w, c, !0);
        c += 32;
    }
    if c < k {
        ahead.step();
        step(&mut acc, x, k, w, c, (1u32 << (k - c)) - 1);
    }
    reduce(&acc)
}

/// Each accumulator's sixteen lanes summed: a tile's outputs.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn reduce<const R: usize, const X: usize>(acc: &[[__m512; X]; R]) -> [[f32; X]; R] {
    let mut out = [[0f32; X]; R];
    for (o, a) in out.iter_mut().zip(acc) {
        for (o, a) in o.iter_mut().zip(a) {
            *o = _mm512_reduce_add_ps(*a);
        }
    }
    out
}

/// One step of [`tile`]: columns `c..c + 32` of each row, those outside `mask` read as zeros.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn step<const R: usize, const X: usize>(
    acc: &mut [[__m512; X]; R],
    x: *const u16,
    k: usize,
    w: *const u16,
    c: usize,
    mask: __mmask32,
) {
    let mut xv = [_mm512_setzero_si512(); X];
    for (j, v) in xv.iter_mut().enumerate() {
        *v = _mm512_maskz_loadu_epi16(mask, x.add(j * k + c).cast());
    }
    for (i, a) in acc.iter_mut().enumerate() {
        let wv = as_bh(_mm512_maskz_loadu_epi16(mask, w.add(i * k + c).cast()));
        for (a, xv) in a.iter_mut().zip(&xv) {
            *a = _mm512_dpbf16_ps(*a, as_bh(*xv), wv);
        }
    }
}

/// The same 512 bits read as 32 bf16 values.
#[inline(always)]
fn as_bh(v: __m512i) -> __m512bh {
    // SAFETY: both are 512 bits of plain data.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}
