//! The AVX512-BF16 kernel: bf16 weights against activations that are bf16 values themselves
//! (every activation of a bf16 compute dtype is), by `vdpbf16ps`.
//!
//! `vdpbf16ps` multiplies sixteen pairs of bf16 values exactly (a bf16 product fits in f32) and
//! adds both products of each pair into an f32 lane, rounding as f32 arithmetic does; it reads
//! the weight as stored, so nothing is widened, and it does twice the multiply-adds of an f32 FMA
//! per instruction. The activations are handed over as bf16 bits ([`to_bf16`]), laid out once per
//! product. Tiles of 4 weight rows × up to 4 activation rows keep 16 accumulators of 16 lanes;
//! the K tail is read with masked loads (zeros beyond `K`), so there is no scalar tail. Each
//! output's sequence of instructions depends only on `K`, never on `M` or on the tiling: a row's
//! results are the same alone or in a batch.
//!
//! The instruction reads bf16 subnormals as zero and flushes subnormal results (magnitudes below
//! 1.2e-38): [`bf16_exact`] sends activations holding subnormals to the AVX2 path, and a
//! subnormal bf16 weight (which no trained checkpoint stores) counts as zero here.

use std::arch::x86_64::*;

use super::Out;

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
/// # Safety
/// AVX512F, AVX512BW and AVX512-BF16 must be available; `x` is `[m, k]` (bf16 bits), `w` points
/// at a `[n, k]` bf16 weight with `r1 <= n`, `out` is `[m, n]` and no other call writes its
/// columns `r0..r1`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn rows(x: &[u16], m: usize, k: usize, w: *const u16, r0: usize, r1: usize, out: Out) {
    let mut r = r0;
    while r < r1 {
        let four = r1 - r >= 4;
        let wp = w.add(r * k);
        let mut j = 0;
        while j < m {
            let xp = x.as_ptr().add(j * k);
            let xr = (m - j).min(4);
            // The first pass over these weight rows also requests the next tile's rows: the
            // passes for further activation rows then compute from cache while memory streams.
            let pf = j == 0 && r + 8 <= r1;
            match (four, xr) {
                (true, 4) => store(&tile::<4, 4>(xp, k, wp, pf), out, r, j),
                (true, 3) => store(&tile::<4, 3>(xp, k, wp, pf), out, r, j),
                (true, 2) => store(&tile::<4, 2>(xp, k, wp, pf), out, r, j),
                (true, _) => store(&tile::<4, 1>(xp, k, wp, pf), out, r, j),
                (false, 4) => store(&tile::<1, 4>(xp, k, wp, false), out, r, j),
                (false, 3) => store(&tile::<1, 3>(xp, k, wp, false), out, r, j),
                (false, 2) => store(&tile::<1, 2>(xp, k, wp, false), out, r, j),
                (false, _) => store(&tile::<1, 1>(xp, k, wp, false), out, r, j),
            }
            j += xr;
        }
        r += if four { 4 } else { 1 };
    }
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

/// `R` weight rows from `w` against `X` activation rows from `x` (both row stride `k`), 32
/// columns per step, the last step masked; with `prefetch`, the `R` rows after these are
/// requested alongside, a cache line per row and step.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn tile<const R: usize, const X: usize>(
    x: *const u16,
    k: usize,
    w: *const u16,
    prefetch: bool,
) -> [[f32; X]; R] {
    let mut acc = [[_mm512_setzero_ps(); X]; R];
    let kv = k & !31;
    let mut c = 0;
    while c < kv {
        if prefetch {
            for i in 0..R {
                _mm_prefetch::<_MM_HINT_T0>(w.add((R + i) * k + c).cast());
            }
        }
        step(&mut acc, x, k, w, c, !0);
        c += 32;
    }
    if c < k {
        step(&mut acc, x, k, w, c, (1u32 << (k - c)) - 1);
    }
    let mut out = [[0f32; X]; R];
    for (o, a) in out.iter_mut().zip(&acc) {
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
