//! The AVX2 + FMA kernels (F16C for f16 and FP8 weights).
//!
//! Two paths with the same arithmetic. For one or two activation rows (decode): tiles of 4
//! weight rows × 2 activation rows (8 accumulators of 8 lanes), the weight widened to f32 in
//! registers (bf16: a 16-bit shift; f16: `vcvtph2ps`; e4m3: the byte moved into an f16's fields
//! and widened by `vcvtph2ps`) and never written back, the next tile's bytes requested in
//! address order alongside ([`super::Ahead`]). For more
//! rows (batched decode) the [`packed`] path widens each 4-row tile once, a few hundred columns at
//! a time, into a scratch in L1 and runs every activation row over it. Either way each output
//! accumulates the same products in the same order (FP8: each scale block's sum in its own
//! accumulators, then `total = fma(block_sum, scale, total)`), and K tails (K not a multiple of
//! 8) are finished in scalar code.

use std::arch::x86_64::*;

use super::{e4m3_table, scale_row, store, Ahead, Out, WeightSlice};

/// # Safety
/// AVX2 and FMA must be available (and F16C for f16 weights and FP8 weights); `x` is `[m, k]`, the weight
/// `[n, k]` with `r1 <= n`, `out` is `[m, n]` and no other call writes its columns `r0..r1`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn rows(
    x: &[f32],
    m: usize,
    k: usize,
    w: WeightSlice,
    r0: usize,
    r1: usize,
    out: Out,
    laid: Option<&Layout>,
) {
    if m >= packed_rows(&w) {
        let own;
        let xs = match laid {
            Some(l) => l.as_slice(),
            None => {
                own = Layout::new(x, m, k, &w);
                own.as_ref().map_or(x, Layout::as_slice)
            }
        };
        return packed(x, xs, m, k, w, r0, r1, out);
    }
    match w {
        WeightSlice::F32(w) => dense_f32(x, m, k, w.as_ptr(), r0, r1, out),
        WeightSlice::Bf16(w) => dense_bf16(x, m, k, w.as_ptr().cast(), r0, r1, out),
        WeightSlice::F16(w) => dense_f16(x, m, k, w.as_ptr().cast(), r0, r1, out),
        WeightSlice::Fp8 { values, scales, block, .. } => fp8(x, m, k, values, scales, block, r0, r1, out),
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

/// Eight e4m3 bytes as f32 values `e4m3 · 2^-8`, exactly: each byte becomes an f16 bit pattern
/// (sign to bit 15, the 4 exponent and 3 mantissa bits to bits 10-13 and 7-9) whose value is
/// `e4m3 · 2^-8`, subnormals included, which `vcvtph2ps` widens without the slow path that
/// subnormal f32 operands take in a multiply. The block's `scale · 2^8` multiplies the block's
/// sum. The NaN codes (magnitude 0x7F) would read as ±480 · 2^-8: weights holding them never get
/// here (see [`super::Isa::vectorizes`]).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_e4m3(p: *const u8) -> __m256 {
    let h = _mm_slli_epi16(_mm_cvtepi8_epi16(_mm_loadl_epi64(p.cast())), 7);
    _mm256_cvtph_ps(_mm_and_si128(h, _mm_set1_epi16(0xBFFFu16 as i16)))
}

/// [`load_e4m3`] for sixteen bytes: the byte-to-f16 steps on one 256-bit register.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_e4m3x16(p: *const u8) -> (__m256, __m256) {
    let h = _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(p.cast())), 7);
    let h = _mm256_and_si256(h, _mm256_set1_epi16(0xBFFFu16 as i16));
    (_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)))
}

fn f32_to_f32(v: f32) -> f32 {
    v
}

fn bf16_to_f32(v: u16) -> f32 {
    f32::from_bits((v as u32) << 16)
}

fn f16_to_f32(v: u16) -> f32 {
    half::f16::from_bits(v).to_f32()
}

macro_rules! dense_kernel {
    ($name:ident, $tile:ident, $t:ty, $feat:literal, $load:ident, $scalar:expr, $alone:ident) => {
        /// One tile: `R` weight rows from `w` (row stride `k`) against `X` activation rows from
        /// `x` (row stride `k`).
        #[target_feature(enable = $feat)]
        unsafe fn $tile<const R: usize, const X: usize>(
            x: *const f32,
            k: usize,
            w: *const $t,
            ahead: &mut Ahead,
        ) -> [[f32; X]; R] {
            let mut acc = [[_mm256_setzero_ps(); X]; R];
            let kv = k & !7;
            let mut c = 0;
            while c < kv {
                ahead.step();
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
            let row_bytes = k * std::mem::size_of::<$t>();
            // Tiles of four weight rows, or one (a single sequential stream) where the type reads
            // fast enough on one accumulator chain per activation row.
            let h = if $alone(m) { 1 } else { 4 };
            // The next tile's lines in order, spread over this tile's steps (every pass).
            let per = Ahead::per_step(h * row_bytes, m.div_ceil(2) * (k / 8));
            let mut r = r0;
            while r < r1 {
                let wp = w.add(r * k);
                let four = h == 4 && r1 - r >= 4;
                let mut ahead = Ahead::next_tile(wp.cast(), h * row_bytes, r + 2 * h <= r1, per);
                let mut j = 0;
                while j < m {
                    let xp = x.as_ptr().add(j * k);
                    let two = m - j >= 2;
                    match (four, two) {
                        (true, true) => store(&$tile::<4, 2>(xp, k, wp, &mut ahead), out, r, j),
                        (true, false) => store(&$tile::<4, 1>(xp, k, wp, &mut ahead), out, r, j),
                        (false, true) => store(&$tile::<1, 2>(xp, k, wp, &mut ahead), out, r, j),
                        (false, false) => store(&$tile::<1, 1>(xp, k, wp, &mut ahead), out, r, j),
                    }
                    j += if two { 2 } else { 1 };
                }
                r += if four { 4 } else { 1 };
            }
        }
    };
}

/// Whether f32 weights against `m` activation rows are read a row at a time: for one row
/// (measured on Zen 4: a decode step's products ~25 % faster; with two rows the small products
/// were slower).
fn f32_alone(m: usize) -> bool {
    m == 1
}

/// Half-precision weights always take four-row tiles: one row's widening and single chain of
/// multiply-adds would not keep up with memory.
fn half_alone(_m: usize) -> bool {
    false
}

dense_kernel!(dense_f32, tile_f32, f32, "avx2,fma", load_f32, f32_to_f32, f32_alone);
dense_kernel!(dense_bf16, tile_bf16, u16, "avx2,fma", load_bf16, bf16_to_f32, half_alone);
dense_kernel!(dense_f16, tile_f16, u16, "avx2,fma,f16c", load_f16, f16_to_f32, half_alone);

/// One block-FP8 tile: per scale block, the e4m3 values (see [`load_e4m3`]) times the activations
/// summed in the block's own accumulators, which then enter the totals with one multiply-add by
/// the block's `scale · 2^8`. `ahead` is stepped every sixteen columns, as the dense tiles step
/// theirs.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fp8_tile<const R: usize, const X: usize>(
    x: *const f32,
    k: usize,
    w: *const u8,
    scale_rows: [*const f32; R],
    bw: usize,
    ahead: &mut Ahead,
) -> [[f32; X]; R] {
    let mut tot = [[_mm256_setzero_ps(); X]; R];
    let kv = k & !7;
    let mut c = 0;
    let mut b = 0;
    while c < kv {
        let end = (c + bw).min(kv);
        let mut acc = [[_mm256_setzero_ps(); X]; R];
        // Sixteen at a time, accumulated in the same order as eight at a time.
        while c + 16 <= end {
            ahead.step();
            let mut x0 = [_mm256_setzero_ps(); X];
            let mut x1 = [_mm256_setzero_ps(); X];
            for j in 0..X {
                x0[j] = _mm256_loadu_ps(x.add(j * k + c));
                x1[j] = _mm256_loadu_ps(x.add(j * k + c + 8));
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let (w0, w1) = load_e4m3x16(w.add(i * k + c));
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
                let wv = load_e4m3(w.add(i * k + c));
                for (a, xv) in a.iter_mut().zip(&xv) {
                    *a = _mm256_fmadd_ps(wv, *xv, *a);
                }
            }
            c += 8;
        }
        for i in 0..R {
            let s = _mm256_set1_ps(*scale_rows[i].add(b) * 256f32);
            for j in 0..X {
                tot[i][j] = _mm256_fmadd_ps(acc[i][j], s, tot[i][j]);
            }
        }
        b += 1;
    }
    let table = e4m3_table();
    let mut out = [[0f32; X]; R];
    for i in 0..R {
        for j in 0..X {
            let mut s = hsum(tot[i][j]);
            for c in kv..k {
                s += *x.add(j * k + c) * (table[*w.add(i * k + c) as usize] * *scale_rows[i].add(c / bw));
            }
            out[i][j] = s;
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fp8(
    x: &[f32],
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
    // The next tile's lines in order, spread over this tile's steps of sixteen columns.
    let per = Ahead::per_step(4 * k, m.div_ceil(2) * (k / 16));
    let mut r = r0;
    while r < r1 {
        let wp = values.as_ptr().add(r * k);
        let four = r1 - r >= 4;
        let mut ahead = Ahead::next_tile(wp, 4 * k, r + 8 <= r1, per);
        let mut j = 0;
        while j < m {
            let xp = x.as_ptr().add(j * k);
            let two = m - j >= 2;
            if four {
                let s = std::array::from_fn(|i| srow(r + i));
                match two {
                    true => store(&fp8_tile::<4, 2>(xp, k, wp, s, bw, &mut ahead), out, r, j),
                    false => store(&fp8_tile::<4, 1>(xp, k, wp, s, bw, &mut ahead), out, r, j),
                }
            } else {
                match two {
                    true => store(&fp8_tile::<1, 2>(xp, k, wp, [srow(r)], bw, &mut ahead), out, r, j),
                    false => store(&fp8_tile::<1, 1>(xp, k, wp, [srow(r)], bw, &mut ahead), out, r, j),
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
        WeightSlice::F32(_) => 3,
        WeightSlice::Bf16(_) | WeightSlice::F16(_) | WeightSlice::Fp8 { .. } => 8,
    }
}

/// Columns of a packed chunk: four rows of them in f32 (4 KiB) and the activation rows' slice
/// stay in L1 while every activation row passes over them.
const KC: usize = 256;

/// Weight rows of a packed tile.
const PR: usize = 4;

/// The scale blocks' width of an FP8 weight (the packed chunks end at their boundaries).
fn block_width(w: &WeightSlice) -> Option<usize> {
    match w {
        WeightSlice::Fp8 { block, .. } => Some(block[1]),
        _ => None,
    }
}

/// Where the packed chunk that starts at `c0` ends: [`KC`] columns on (at most `kv`), or the end
/// of `c0`'s scale block.
fn chunk_end(c0: usize, kv: usize, bw: Option<usize>) -> usize {
    let end = (c0 + KC).min(kv);
    bw.map_or(end, |bw| end.min((c0 / bw + 1) * bw))
}

/// The activations as the packed path reads them: chunk by chunk, each chunk's rows contiguous
/// (`[len]` apart), since rows `k` apart alias in L1 when `k` is a multiple of 1024 (Step3's
/// widths all are). Laid out once per product and shared by every thread's rows.
pub(super) struct Layout(Vec<Line>, usize);

impl Layout {
    /// `None` when `m` rows against `w` do not take the packed path, or need no new layout (`K`
    /// is one chunk: the rows are then `len = k` apart as given).
    pub(super) fn new(x: &[f32], m: usize, k: usize, w: &WeightSlice) -> Option<Self> {
        let (kv, bw) = (k & !7, block_width(w));
        if m < packed_rows(w) || (kv == k && chunk_end(0, kv, bw) == k) {
            return None;
        }
        let mut lines = vec![Line([0f32; 16]); (m * kv).div_ceil(16)];
        // SAFETY: `lines` holds at least `m · kv` f32 values, and `Line` is plain f32s.
        let xs = unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast::<f32>(), m * kv) };
        let mut c0 = 0;
        while c0 < kv {
            let len = chunk_end(c0, kv, bw) - c0;
            for j in 0..m {
                xs[c0 * m + j * len..][..len].copy_from_slice(&x[j * k + c0..][..len]);
            }
            c0 += len;
        }
        Some(Self(lines, m * kv))
    }

    fn as_slice(&self) -> &[f32] {
        // SAFETY: as in `new`.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<f32>(), self.1) }
    }
}

/// The packed path for several activation rows: each tile of [`PR`] weight rows is widened to
/// f32 [`KC`] columns at a time into a small scratch (bf16, f16 and FP8 once per tile instead of
/// once per pass; f32 is used in place), and every activation row then runs over that chunk from
/// L1, three rows at a time. The accumulators of all rows live in a buffer between chunks, so each
/// output's sequence of multiply-adds (and its horizontal sum and scalar K tail) is exactly the
/// one the one-row path does: results do not depend on `M` or on how the rows are tiled. FP8
/// chunks end at scale-block boundaries, where the block's sums enter the totals (`tot`) with
/// the one-row path's multiply-add by the block's scale.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn packed(x: &[f32], xs: &[f32], m: usize, k: usize, w: WeightSlice, r0: usize, r1: usize, out: Out) {
    let kv = k & !7;
    let bw = block_width(&w);
    let chunk_end = |c0: usize| chunk_end(c0, kv, bw);
    let mut scratch = Scratch([0f32; PR * KC]);
    let scratch = &mut scratch.0;
    let mut acc = vec![_mm256_setzero_ps(); PR * m];
    let mut tot = vec![_mm256_setzero_ps(); if bw.is_some() { PR * m } else { 0 }];
    let mut r = r0;
    while r < r1 {
        let rows = (r1 - r).min(PR);
        acc.fill(_mm256_setzero_ps());
        tot.fill(_mm256_setzero_ps());
        let mut c0 = 0;
        while c0 < kv {
            let len = chunk_end(c0) - c0;
            // The chunk's weights as f32 (pointer, row stride: widened into the scratch, or an f32
            // weight in place), and where the same columns of the next tile's rows are
            // (prefetched during the first pass: the passes for further activation rows then
            // compute from cache while memory keeps streaming).
            let next = r + 2 * PR <= r1;
            // For FP8, the block scales (· 2^8) of the tile's rows when this chunk ends a block.
            let mut block_scales = [0f32; PR];
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
                WeightSlice::Fp8 { values, scales, block, .. } => {
                    for (i, s) in block_scales.iter_mut().enumerate().take(rows) {
                        *s = scale_row(scales, block, k, r + i)[c0 / block[1]] * 256f32;
                    }
                    pack_e4m3(values.as_ptr().add(r * k + c0), k, rows, len, scratch);
                    let p = values.as_ptr().add((r + PR) * k + c0);
                    (scratch.as_ptr(), KC, Prefetch::new(next, p, k, 1))
                }
            };
            let end = c0 + len;
            let flush = match bw {
                Some(bw) if end % bw == 0 || end == kv => Some(Flush { tot: tot.as_mut_ptr(), scales: block_scales }),
                _ => None,
            };
            let mut j = 0;
            while j < m {
                let xp = xs.as_ptr().add(c0 * m + j * len);
                let a = acc.as_mut_ptr().add(j);
                let pf = if j == 0 { pf } else { Prefetch::NONE };
                let fl = flush.map(|f| Flush { tot: f.tot.add(j), ..f });
                // Three rows at a time, but four as two and two (a 4 × 1 tile is load-bound).
                let x_rows = if m - j == 4 { 2 } else { (m - j).min(3) };
                match (rows == PR, x_rows) {
                    (true, 1) => run_chunk::<PR, 1>(xp, len, wp, ws, len, a, m, pf, fl),
                    (true, 2) => run_chunk::<PR, 2>(xp, len, wp, ws, len, a, m, pf, fl),
                    (true, _) => run_chunk::<PR, 3>(xp, len, wp, ws, len, a, m, pf, fl),
                    (false, 1) => run_rows::<1>(xp, len, wp, ws, len, a, m, rows, fl),
                    (false, 2) => run_rows::<2>(xp, len, wp, ws, len, a, m, rows, fl),
                    (false, _) => run_rows::<3>(xp, len, wp, ws, len, a, m, rows, fl),
                }
                j += x_rows;
            }
            c0 += len;
        }
        // Horizontal sums, then the K tail in scalar code, in the one-row path's order.
        let sums = if bw.is_some() { &tot } else { &acc };
        for i in 0..rows {
            let row = r + i;
            for j in 0..m {
                let mut s = hsum(sums[i * m + j]);
                for c in kv..k {
                    s += x[j * k + c] * w.value(k, row, c);
                }
                out.set(j, row, s);
            }
        }
        r += rows;
    }
}

/// The end of an FP8 scale block in a packed chunk: the block sums of weight row `i` (activation
/// row `j`, at `acc[i·m + j]`) enter `tot[i·m + j]` with one multiply-add by `scales[i]`
/// (`scale · 2^8`), and start again from zero.
#[derive(Clone, Copy)]
struct Flush {
    tot: *mut __m256,
    scales: [f32; PR],
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
    flush: Option<Flush>,
) {
    let mut a = [[_mm256_setzero_ps(); X]; R];
    for (i, ai) in a.iter_mut().enumerate() {
        for (j, v) in ai.iter_mut().enumerate() {
            *v = *acc.add(i * m + j);
        }
    }
    // The rows' pointers, taken once (so that the loop keeps them in registers).
    let wr: [*const f32; R] = std::array::from_fn(|i| w.add(i * ws));
    let xr: [*const f32; X] = std::array::from_fn(|j| x.add(j * k));
    // Eight columns: one multiply-add per accumulator, in column order.
    let step8 = |a: &mut [[__m256; X]; R], c: usize| {
        let mut xv = [_mm256_setzero_ps(); X];
        for (j, v) in xv.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(xr[j].add(c));
        }
        for (i, ai) in a.iter_mut().enumerate() {
            let wv = _mm256_loadu_ps(wr[i].add(c));
            for (v, xv) in ai.iter_mut().zip(&xv) {
                *v = _mm256_fmadd_ps(wv, *xv, *v);
            }
        }
    };
    let mut c = 0;
    if !pf.p.is_null() {
        // One cache line of each prefetched row per `line` columns, asked for at its start.
        let line = 64 / pf.bytes;
        let pr: [*const u8; PR] = std::array::from_fn(|i| pf.p.wrapping_add(i * pf.stride));
        while c + line <= len {
            for p in pr {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(c * pf.bytes).cast());
            }
            for cc in (c..c + line).step_by(8) {
                step8(&mut a, cc);
            }
            c += line;
        }
        if c < len {
            for p in pr {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(c * pf.bytes).cast());
            }
        }
    }
    while c < len {
        step8(&mut a, c);
        c += 8;
    }
    match flush {
        None => {
            for (i, ai) in a.iter().enumerate() {
                for (j, v) in ai.iter().enumerate() {
                    *acc.add(i * m + j) = *v;
                }
            }
        }
        Some(f) => {
            for (i, ai) in a.iter().enumerate() {
                let s = _mm256_set1_ps(f.scales[i]);
                for (j, v) in ai.iter().enumerate() {
                    let t = f.tot.add(i * m + j);
                    *t = _mm256_fmadd_ps(*v, s, *t);
                    *acc.add(i * m + j) = _mm256_setzero_ps();
                }
            }
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
    flush: Option<Flush>,
) {
    for i in 0..rows {
        // Row `i`'s totals and scale, as row 0 of a one-row tile.
        let fl = flush.map(|f| Flush { tot: f.tot.add(i * m), scales: [f.scales[i]; PR] });
        run_chunk::<1, X>(x, k, w.add(i * ws), ws, len, acc.add(i * m), m, Prefetch::NONE, fl);
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

/// `rows` FP8 weight rows (stride `k`) widened to `e4m3 · 2^-8` in f32 (see [`load_e4m3`]) into
/// `dst` (stride [`KC`]), `len` columns (a multiple of 8).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_e4m3(w: *const u8, k: usize, rows: usize, len: usize, dst: &mut [f32; PR * KC]) {
    for i in 0..rows {
        let src = w.add(i * k);
        let d = dst.as_mut_ptr().add(i * KC);
        let mut c = 0;
        while c + 16 <= len {
            let (lo, hi) = load_e4m3x16(src.add(c));
            _mm256_storeu_ps(d.add(c), lo);
            _mm256_storeu_ps(d.add(c + 8), hi);
            c += 16;
        }
        while c < len {
            _mm256_storeu_ps(d.add(c), load_e4m3(src.add(c)));
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
