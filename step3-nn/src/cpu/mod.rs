//! CPU kernels for skinny products `y[M, N] = x[M, K] · W[N, K]ᵀ` with few rows `M` (decode and
//! batched decode), the case where the weight is read once and the product is bound by memory
//! bandwidth, not arithmetic.
//!
//! The weight is read in place (the tensor's own storage: f32, bf16, f16 or block-FP8 e4m3 values
//! with their per-block f32 scales), never converted or copied as a whole; activations are f32 and
//! every product is accumulated in f32. Block-FP8 values are widened in registers, sixteen at a
//! time, to their exact e4m3 values, and each block's scale is applied once per block:
//! `y = Σ_b scale_b · (Σ_{c ∈ b} e4m3(w_c) · x_c)`. That is the product with the weight dequantised
//! to f32 up to f32 rounding (in a bf16 or f16 compute dtype it is closer to the exact product
//! than a reference that rounds each dequantised weight to bf16 first), and it costs one multiply-add
//! per weight, as bf16 does, so FP8 decode streams at memory speed. Weights that hold an e4m3 NaN
//! code (never the case in a real checkpoint; [`fp8_nan_free`]) take the scalar loop, which keeps
//! the NaN. The output rows are split in contiguous chunks over
//! rayon's global pool (the pool candle's GEMM runs on, so the two never compete for the cores).
//!
//! Two smaller entry points serve kernels of other crates that run their own parallel tasks (the
//! MFA decode attention of `step3-mfa`): [`matmul_t_into`] (the same product on the calling thread,
//! into a strided output) and [`weighted_rows_acc`] (a weighted sum of f32 rows, probabilities
//! times V).
//!
//! The instruction set is chosen once at run time ([`Isa::detected`]): AVX2+FMA+F16C on x86-64
//! (and where AVX512-BF16 is present, `vdpbf16ps` for bf16 weights against activations that are
//! bf16 values, as a bf16 compute dtype's are: the products are the same exact products, without
//! widening the weight), NEON on aarch64, else a portable scalar loop.
//! `STEP3_CPU_KERNEL=scalar` forces the scalar loop, `STEP3_CPU_KERNEL=avx2` the AVX2 kernels on an
//! AVX-512 machine, and
//! `STEP3_CPU_KERNEL=off` turns the kernels off ([`crate::Weight`] then takes candle's GEMM for
//! every product, as before these kernels existed: for comparisons); tests call
//! [`matmul_t_with`] with each [`Isa::available`] path.

use std::sync::OnceLock;

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

/// A weight matrix `[N, K]`, row-major, borrowed from its tensor's storage.
#[derive(Debug, Clone, Copy)]
pub enum WeightSlice<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
    F16(&'a [half::f16]),
    /// `float8_e4m3fn` bytes `[N, K]` and f32 scales `[ceil(N/b0), ceil(K/b1)]` for
    /// `block = [b0, b1]`: `W[r, c] = e4m3(values[r, c]) · scales[r/b0, c/b1]`, each scale applied
    /// once to its block's partial sum. `nan_free` says that no byte is an e4m3 NaN code
    /// (`0x7F`, `0xFF`; [`fp8_nan_free`] finds out): only then do the vector paths run, since they
    /// read those codes as finite values.
    Fp8 {
        values: &'a [u8],
        scales: &'a [f32],
        block: [usize; 2],
        nan_free: bool,
    },
}

/// Whether no byte of `values` is one of the two `float8_e4m3fn` NaN codes (`0x7F`, `0xFF`): one
/// pass over the bytes, on rayon's pool.
pub fn fp8_nan_free(values: &[u8]) -> bool {
    values.par_chunks(1 << 16).all(|c| !c.iter().fold(false, |any, b| any | (b & 0x7F == 0x7F)))
}

impl WeightSlice<'_> {
    fn elements(&self) -> usize {
        match self {
            Self::F32(w) => w.len(),
            Self::Bf16(w) => w.len(),
            Self::F16(w) => w.len(),
            Self::Fp8 { values, .. } => values.len(),
        }
    }

    /// Panics unless `x` is `[m, k]` and this weight `[n, k]` (with scales that match its blocks).
    fn check(&self, x: &[f32], m: usize, k: usize, n: usize) {
        assert_eq!(x.len(), m * k, "x is not [{m}, {k}]");
        assert_eq!(self.elements(), n * k, "weight is not [{n}, {k}]");
        if let WeightSlice::Fp8 { scales, block, .. } = self {
            assert!(block[0] > 0 && block[1] > 0, "empty FP8 block");
            assert_eq!(scales.len(), n.div_ceil(block[0]) * k.div_ceil(block[1]), "FP8 scales do not match");
        }
    }

    /// Element `(r, c)` of this `[N, k]` weight in f32, dequantised (for the scalar K tails: each
    /// of their FP8 products is `x · f32(e4m3 · scale)`).
    fn value(&self, k: usize, r: usize, c: usize) -> f32 {
        match self {
            Self::F32(w) => w[r * k + c],
            Self::Bf16(w) => w[r * k + c].to_f32(),
            Self::F16(w) => w[r * k + c].to_f32(),
            Self::Fp8 { values, scales, block, .. } => {
                let s = scales[(r / block[0]) * k.div_ceil(block[1]) + c / block[1]];
                e4m3_table()[values[r * k + c] as usize] * s
            }
        }
    }

    fn bytes_per_element(&self) -> usize {
        match self {
            Self::F32(_) => 4,
            Self::Bf16(_) | Self::F16(_) => 2,
            Self::Fp8 { .. } => 1,
        }
    }
}

/// An instruction-set path of the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust, any machine.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX2 + FMA + F16C with AVX512F, BW, VL and AVX512-BF16: bf16 and block-FP8 weights
    /// (scale blocks a multiple of 32 wide) against activations that are bf16 values (a bf16
    /// compute dtype's) by `vdpbf16ps`; every other product as [`Isa::Avx2`].
    Avx512Bf16,
    /// aarch64 NEON (Advanced SIMD).
    Neon,
}

/// `STEP3_CPU_KERNEL`, read once: `Some(None)` off, `Some(Some(isa))` a forced path (`scalar`, or
/// `avx2` on a machine that also has AVX512-BF16).
fn setting() -> Option<Option<Isa>> {
    static SETTING: OnceLock<Option<Option<Isa>>> = OnceLock::new();
    *SETTING.get_or_init(|| match std::env::var("STEP3_CPU_KERNEL").map(|v| v.to_ascii_lowercase()).as_deref() {
        Ok("off") => Some(None),
        Ok("scalar") => Some(Some(Isa::Scalar)),
        Ok("avx2") if Isa::available().contains(&Isa::Avx2) => Some(Some(Isa::Avx2)),
        _ => None,
    })
}

/// Whether [`crate::Weight`] uses these kernels (not `STEP3_CPU_KERNEL=off`).
pub fn enabled() -> bool {
    setting() != Some(None)
}

/// What the CPU products run on, for benchmark headers: `avx2+fma+f16c`, `scalar`, `off (candle GEMM)`.
pub fn describe() -> String {
    match (enabled(), Isa::detected()) {
        (false, _) => "off (candle GEMM)".into(),
        (true, Isa::Scalar) => "scalar".into(),
        (true, Isa::Avx2) => "avx2+fma+f16c".into(),
        (true, Isa::Avx512Bf16) => "avx512-bf16 (bf16 and FP8 weights), avx2+fma+f16c".into(),
        (true, Isa::Neon) => "neon".into(),
    }
}

impl Isa {
    /// The best path this machine has, detected once; `STEP3_CPU_KERNEL=scalar` forces
    /// [`Isa::Scalar`] and `STEP3_CPU_KERNEL=avx2` [`Isa::Avx2`] (for comparisons).
    pub fn detected() -> Self {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| match setting() {
            Some(Some(isa)) => isa,
            _ => Self::available().into_iter().last().unwrap_or(Isa::Scalar),
        })
    }

    /// Every path this machine can run, scalar first.
    pub fn available() -> Vec<Self> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            v.push(Isa::Avx2);
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512bf16")
            {
                v.push(Isa::Avx512Bf16);
            }
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("neon") {
            v.push(Isa::Neon);
        }
        v
    }

    /// Whether this path has a vector kernel for `w` (else the scalar loop runs).
    fn vectorizes(self, w: &WeightSlice) -> bool {
        match self {
            Isa::Scalar => false,
            #[cfg(target_arch = "x86_64")]
            // Eight values share a scale, `scale · 2^8` is finite, and no value is a NaN code.
            Isa::Avx2 | Isa::Avx512Bf16 => match w {
                WeightSlice::Fp8 { block, scales, nan_free, .. } => {
                    *nan_free && block[1] % 8 == 0 && scales.iter().all(|s| s.abs() < 1e30)
                }
                _ => true,
            },
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512Bf16 => false,
            // Eight values share a scale, and no value is a NaN code.
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => match w {
                WeightSlice::Fp8 { block, nan_free, .. } => *nan_free && block[1] % 8 == 0,
                _ => true,
            },
            #[cfg(not(target_arch = "aarch64"))]
            Isa::Neon => false,
        }
    }
}

/// Rows `M` up to which [`crate::Weight::matmul_t`] uses these kernels on the CPU (above it,
/// candle's GEMM).
pub const MAX_ROWS: usize = 16;

/// Work (weight bytes) below which one thread does the whole product: splitting costs more.
const SERIAL_BYTES: usize = 256 << 10;

/// `y[M, N] = x[M, K] · W[N, K]ᵀ` in f32 on the [`Isa::detected`] path.
pub fn matmul_t(x: &[f32], m: usize, k: usize, w: WeightSlice, n: usize) -> Vec<f32> {
    matmul_t_with(Isa::detected(), x, m, k, w, n)
}

/// [`matmul_t`] on a chosen path.
///
/// # Panics
/// If the slices' lengths do not match `m`, `k`, `n` (callers check shapes first), or `isa` is
/// a path this machine does not have.
pub fn matmul_t_with(isa: Isa, x: &[f32], m: usize, k: usize, w: WeightSlice, n: usize) -> Vec<f32> {
    products_with(isa, &[Product { x, m, k, w, n }]).pop().unwrap_or_default()
}

/// One product `y[M, N] = x[M, K] · W[N, K]ᵀ` of [`matmul_t_many`].
#[derive(Debug, Clone, Copy)]
pub struct Product<'a> {
    pub x: &'a [f32],
    pub m: usize,
    pub k: usize,
    pub w: WeightSlice<'a>,
    pub n: usize,
}

/// Several independent products (a MoE layer's experts, each on its own tokens) in one parallel
/// region on the [`Isa::detected`] path: their output rows are cut into chunks of about a
/// quarter of a thread's share of the total work (whole products when they are smaller, or hold
/// at most 256 KiB of weight), so one hand-off to the pool covers them all and each thread
/// streams long contiguous runs of weight. Each result is [`matmul_t`]'s, bit for bit.
///
/// # Panics
/// As [`matmul_t`], for any product.
pub fn matmul_t_many(products: &[Product]) -> Vec<Vec<f32>> {
    products_with(Isa::detected(), products)
}

/// [`matmul_t_many`] on a chosen path (and [`matmul_t_with`], one product): contiguous chunks of
/// output rows, multiples of 4 (the tiles' height), a few per thread so that a slow thread is
/// evened out; a product of at most [`SERIAL_BYTES`] of weight, or every product on one thread,
/// is one chunk.
fn products_with(isa: Isa, products: &[Product]) -> Vec<Vec<f32>> {
    assert!(isa == Isa::Scalar || Isa::available().contains(&isa), "{isa:?} is not available here");
    let mut ys: Vec<Vec<f32>> = products
        .iter()
        .map(|p| {
            p.w.check(p.x, p.m, p.k, p.n);
            vec![0f32; p.m * p.n]
        })
        .collect();
    let laid: Vec<Laid> = products.iter().map(|p| Laid::new(isa, p.x, p.m, p.k, &p.w)).collect();
    let outs: Vec<Out> = ys.iter_mut().zip(products).map(|(y, p)| Out { ptr: y.as_mut_ptr(), ld: p.n }).collect();
    let total: usize = products.iter().map(|p| p.n * p.k * p.w.bytes_per_element()).sum();
    let threads = rayon::current_num_threads();
    let share = if threads <= 1 { usize::MAX } else { total / (threads * 4) };
    let mut tasks = Vec::new();
    for (i, p) in products.iter().enumerate() {
        if p.m == 0 || p.n == 0 {
            continue;
        }
        let row_bytes = (p.k * p.w.bytes_per_element()).max(1);
        let chunk = if p.n * row_bytes <= SERIAL_BYTES {
            p.n
        } else {
            share.div_ceil(row_bytes).next_multiple_of(4).clamp(4, p.n.next_multiple_of(4))
        };
        tasks.extend((0..p.n).step_by(chunk).map(|r0| (i, r0, (r0 + chunk).min(p.n))));
    }
    let run = |&(i, r0, r1): &(usize, usize, usize)| {
        let p = &products[i];
        rows(isa, p.x, p.m, p.k, p.w, r0, r1, outs[i], &laid[i]);
    };
    if tasks.len() == 1 {
        run(&tasks[0]);
    } else {
        tasks.par_iter().for_each(run);
    }
    ys
}

/// `y [M, N]` as the kernels write it (row `j` at `j · ld`): each call owns the columns `r0..r1`
/// (its weight rows) of every row of `y`, so the threads write disjoint elements in place.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    ld: usize,
}

// SAFETY: `Out` is only handed to calls with disjoint column ranges (`products_with`), and `y`
// outlives them.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// # Safety
    /// `j < M`, `r < N`, and `r` in the calling chunk's rows.
    #[inline(always)]
    unsafe fn set(self, j: usize, r: usize, v: f32) {
        *self.ptr.add(j * self.ld + r) = v;
    }
}

/// Writes a finished `R × X` tile of a vector path (weight rows `row + i`, activation rows
/// `j0 + j`) into `out`.
///
/// # Safety
/// The rows are in the caller's chunk and `j0 + X <= m`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store<const R: usize, const X: usize>(t: &[[f32; X]; R], out: Out, row: usize, j0: usize) {
    for (i, ti) in t.iter().enumerate() {
        for (j, v) in ti.iter().enumerate() {
            out.set(j0 + j, row + i, *v);
        }
    }
}

/// A cursor that requests weight bytes ahead of their use, in address order, `per` cache lines
/// a step: the kernels point it at the next tile while they compute this one. Four weight rows
/// read side by side are four streams, which the hardware prefetcher of the Zen 4 machines here
/// follows at about half the speed of one (one core: 11.6 against 21 GB/s); requested in order,
/// the next tile is in cache when its turn comes.
#[cfg(target_arch = "x86_64")]
struct Ahead {
    p: *const u8,
    end: *const u8,
    per: usize,
}

#[cfg(target_arch = "x86_64")]
impl Ahead {
    /// The `bytes` that follow the tile of `bytes` at `tile`, `per` lines a [`Ahead::step`], when
    /// `another` tile of the caller's rows lies there; nothing otherwise. Nothing is read: a
    /// prefetch is only a hint.
    fn next_tile(tile: *const u8, bytes: usize, another: bool, per: usize) -> Self {
        let p = tile.wrapping_add(bytes);
        Self { p, end: p.wrapping_add(if another { bytes } else { 0 }), per }
    }

    /// A cursor that requests nothing (for tiles whose bytes are already in cache).
    fn none() -> Self {
        Self { p: std::ptr::null(), end: std::ptr::null(), per: 0 }
    }

    /// Lines a step for `bytes` over `steps` steps.
    fn per_step(bytes: usize, steps: usize) -> usize {
        bytes.div_ceil(64).div_ceil(steps.max(1))
    }

    #[inline(always)]
    fn step(&mut self) {
        for _ in 0..self.per {
            if self.p >= self.end {
                return;
            }
            // SAFETY: a prefetch is a hint; it never faults, whatever the address.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(self.p.cast()) };
            self.p = self.p.wrapping_add(64);
        }
    }
}

/// [`matmul_t`] on the calling thread, into rows `ld` apart of `y`: `y[j·ld + r] = x[j]·W[r]` for
/// `j < m`, `r < n`; the rest of `y` is left as it is. For callers that run many small products
/// inside their own parallel tasks (attention over a context, a chunk of tokens at a time). Each
/// element is the one [`matmul_t`] computes, bit for bit. [`Activations`] does the same for
/// several weights against the same rows.
///
/// # Panics
/// If `x`, `w` or `y` are too short for `m`, `k`, `n`, `ld`, or `ld < n`.
pub fn matmul_t_into(x: &[f32], m: usize, k: usize, w: WeightSlice, n: usize, y: &mut [f32], ld: usize) {
    Activations::new(x, m, k, w).matmul_t_into(w, n, y, ld)
}

/// Activation rows `x [m, k]` laid out once for several [`matmul_t_into`] products against
/// weights of one dtype (the MFA decode attention's query heads against each run of a K cache):
/// the same values, bit for bit, without laying the rows out again for every product (on the
/// AVX512-BF16 path that is a conversion of every row to bf16).
pub struct Activations<'a> {
    x: &'a [f32],
    m: usize,
    k: usize,
    isa: Isa,
    laid: Laid,
    /// The dense weight dtype `laid` was made for; block-FP8 layouts are never reused.
    kind: Option<u8>,
}

impl<'a> Activations<'a> {
    /// The rows laid out for weights like `like` (its dtype is what matters, not its values).
    ///
    /// # Panics
    /// If `x` is not `[m, k]`.
    pub fn new(x: &'a [f32], m: usize, k: usize, like: WeightSlice) -> Self {
        assert_eq!(x.len(), m * k, "x is not [{m}, {k}]");
        let isa = Isa::detected();
        let laid = if m == 0 || k == 0 { Laid::None } else { Laid::new(isa, x, m, k, &like) };
        Self { x, m, k, isa, laid, kind: dense_kind(&like) }
    }

    /// `y[j·ld + r] = x[j]·W[r]` for `j < m`, `r < n`, on the calling thread, as
    /// [`matmul_t_into`] computes it.
    ///
    /// # Panics
    /// As [`matmul_t_into`].
    pub fn matmul_t_into(&self, w: WeightSlice, n: usize, y: &mut [f32], ld: usize) {
        let (x, m, k) = (self.x, self.m, self.k);
        w.check(x, m, k, n);
        assert!(ld >= n, "row stride {ld} is shorter than a row of {n}");
        if m == 0 || n == 0 {
            return;
        }
        assert!(y.len() >= (m - 1) * ld + n, "y holds {} values, not {m} rows {ld} apart", y.len());
        let fresh;
        let laid = if self.kind.is_some() && dense_kind(&w) == self.kind {
            &self.laid
        } else {
            fresh = Laid::new(self.isa, x, m, k, &w);
            &fresh
        };
        rows(self.isa, x, m, k, w, 0, n, Out { ptr: y.as_mut_ptr(), ld }, laid);
    }
}

/// A dense weight's dtype as a tag (`None` for block-FP8, whose layouts depend on more than it).
fn dense_kind(w: &WeightSlice) -> Option<u8> {
    match w {
        WeightSlice::F32(_) => Some(0),
        WeightSlice::Bf16(_) => Some(1),
        WeightSlice::F16(_) => Some(2),
        WeightSlice::Fp8 { .. } => None,
    }
}

/// `y[j, :] += Σ_r p[j·ld + r] · w[r, :]` for `j < m`, over the `n` rows of `w [n, k]`, in row
/// order (one fused multiply-add per row on the vector path): a weighted sum of rows, as
/// attention's probabilities times V. `y` is `[m, k]`.
///
/// # Panics
/// If the slices are too short for `m`, `ld`, `n`, `k`, or `ld < n`.
pub fn weighted_rows_acc(p: &[f32], m: usize, ld: usize, w: &[f32], n: usize, k: usize, y: &mut [f32]) {
    weighted_rows_acc_with(Isa::detected(), p, m, ld, w, n, k, y)
}

/// [`weighted_rows_acc`] on a chosen path.
#[allow(clippy::too_many_arguments)]
pub fn weighted_rows_acc_with(isa: Isa, p: &[f32], m: usize, ld: usize, w: &[f32], n: usize, k: usize, y: &mut [f32]) {
    assert!(ld >= n, "row stride {ld} is shorter than a row of {n}");
    assert_eq!(w.len(), n * k, "w is not [{n}, {k}]");
    assert_eq!(y.len(), m * k, "y is not [{m}, {k}]");
    assert!(isa == Isa::Scalar || Isa::available().contains(&isa), "{isa:?} is not available here");
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(p.len() >= (m - 1) * ld + n, "p holds {} values, not {m} rows {ld} apart", p.len());
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx2 | Isa::Avx512Bf16) {
        // SAFETY: AVX2 and FMA were detected (`Isa::available`); the lengths were checked above.
        unsafe { avx2::weighted_rows_acc(p.as_ptr(), m, ld, w.as_ptr(), n, k, y.as_mut_ptr()) };
        return;
    }
    for (j, yj) in y.chunks_exact_mut(k).enumerate() {
        for (r, wr) in w.chunks_exact(k).enumerate() {
            let pr = p[j * ld + r];
            for (a, b) in yj.iter_mut().zip(wr) {
                *a += pr * b;
            }
        }
    }
}

/// The activations laid out once per product for a path that reads them in another order or
/// form (the AVX2 packed path; bf16 for the AVX512-BF16 path), shared by the threads.
enum Laid {
    None,
    #[cfg(target_arch = "x86_64")]
    Avx2(avx2::Layout),
    /// The activations in bf16, exactly (see [`avx512::bf16_exact`]), against a bf16 weight or
    /// a block-FP8 one that [`avx512_fp8`] accepts.
    #[cfg(target_arch = "x86_64")]
    Bf16(Vec<u16>),
}

impl Laid {
    fn new(isa: Isa, x: &[f32], m: usize, k: usize, w: &WeightSlice) -> Self {
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512Bf16 && (matches!(w, WeightSlice::Bf16(_)) || avx512_fp8(w)) && avx512::bf16_exact(x) {
            return Self::Bf16(avx512::to_bf16(x));
        }
        #[cfg(target_arch = "x86_64")]
        if matches!(isa, Isa::Avx2 | Isa::Avx512Bf16) && isa.vectorizes(w) {
            if let Some(l) = avx2::Layout::new(x, m, k, w) {
                return Self::Avx2(l);
            }
        }
        let _ = (isa, x, m, k, w);
        Self::None
    }
}

/// Whether the AVX512-BF16 path takes this block-FP8 weight: no NaN code, finite scales, and
/// scale blocks a multiple of 32 values wide (each `vdpbf16ps` step within one block).
#[cfg(target_arch = "x86_64")]
fn avx512_fp8(w: &WeightSlice) -> bool {
    match w {
        WeightSlice::Fp8 { block, scales, nan_free, .. } => {
            *nan_free && block[1] % 32 == 0 && scales.iter().all(|s| s.is_finite())
        }
        _ => false,
    }
}

/// Output columns (weight rows) `r0..r1` of every row of `out`.
#[allow(clippy::too_many_arguments)]
fn rows(isa: Isa, x: &[f32], m: usize, k: usize, w: WeightSlice, r0: usize, r1: usize, out: Out, laid: &Laid) {
    // SAFETY (both arms): `Laid::Bf16` is only made on the AVX512-BF16 path (`Isa::available`),
    // from `x` (`[m, k]`) against this weight (bf16, or FP8 that `avx512_fp8` accepts), whose
    // length and scales `matmul_t_with` checked.
    #[cfg(target_arch = "x86_64")]
    match (laid, w) {
        (Laid::Bf16(xb), WeightSlice::Bf16(wb)) => {
            return unsafe { avx512::rows(xb, m, k, wb.as_ptr().cast(), r0, r1, out) };
        }
        (Laid::Bf16(xb), WeightSlice::Fp8 { values, scales, block, .. }) => {
            return unsafe { avx512::rows_fp8(xb, m, k, values, scales, block, r0, r1, out) };
        }
        _ => {}
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx2 | Isa::Avx512Bf16) && isa.vectorizes(&w) {
        let laid = match laid {
            Laid::Avx2(l) => Some(l),
            _ => None,
        };
        // SAFETY: AVX2, FMA and F16C were detected (`Isa::available`,
        // `Isa::vectorizes`); the slice lengths were checked by `matmul_t_with`.
        unsafe { avx2::rows(x, m, k, w, r0, r1, out, laid) };
        return;
    }
    let _ = laid;
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon && isa.vectorizes(&w) {
        // SAFETY: NEON was detected (`Isa::available`); the slice lengths were checked by
        // `matmul_t_with`.
        unsafe { neon::rows(x, m, k, w, r0, r1, out) };
        return;
    }
    let _ = isa;
    scalar_rows(x, m, k, w, r0, r1, out)
}

/// The 256 values of `float8_e4m3fn` as f32.
pub fn e4m3_table() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|i| float8::F8E4M3::from_bits(i as u8).to_f32()))
}

/// Row `r`'s block scales of a block-FP8 weight `[n, k]` with `scales`
/// `[ceil(n / block[0]), ceil(k / block[1])]`: one per scale block along `k`.
fn scale_row(scales: &[f32], block: [usize; 2], k: usize, r: usize) -> &[f32] {
    let cb = k.div_ceil(block[1]);
    &scales[(r / block[0]) * cb..][..cb]
}

/// The portable loop: per output element a dot product in f32 (eight interleaved partial sums,
/// so it vectorises where the compiler can); for FP8 one such dot product of the e4m3 values per
/// scale block, times the block's scale.
fn scalar_rows(x: &[f32], m: usize, k: usize, w: WeightSlice, r0: usize, r1: usize, out: Out) {
    fn dot(x: &[f32], w: impl Iterator<Item = f32>) -> f32 {
        let mut acc = [0f32; 8];
        for (i, (a, b)) in x.iter().zip(w).enumerate() {
            acc[i % 8] += a * b;
        }
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
    }
    for r in r0..r1 {
        for j in 0..m {
            let xr = &x[j * k..(j + 1) * k];
            let v = match w {
                WeightSlice::F32(w) => dot(xr, w[r * k..(r + 1) * k].iter().copied()),
                WeightSlice::Bf16(w) => dot(xr, w[r * k..(r + 1) * k].iter().map(|v| v.to_f32())),
                WeightSlice::F16(w) => dot(xr, w[r * k..(r + 1) * k].iter().map(|v| v.to_f32())),
                WeightSlice::Fp8 { values, scales, block, .. } => {
                    let table = e4m3_table();
                    let wr = &values[r * k..(r + 1) * k];
                    let blocks = xr.chunks(block[1]).zip(wr.chunks(block[1])).zip(scale_row(scales, block, k, r));
                    blocks.fold(0f32, |y, ((x, w), s)| y + s * dot(x, w.iter().map(|b| table[*b as usize])))
                }
            };
            // SAFETY: `j < m`, `r` in this chunk's rows `r0..r1 <= n`.
            unsafe { out.set(j, r, v) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn vals(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
            })
            .collect()
    }

    /// The weight's values as f64.
    fn dense(w: WeightSlice, n: usize, k: usize) -> Vec<f64> {
        match w {
            WeightSlice::F32(w) => w.iter().map(|v| *v as f64).collect(),
            WeightSlice::Bf16(w) => w.iter().map(|v| v.to_f64()).collect(),
            WeightSlice::F16(w) => w.iter().map(|v| v.to_f64()).collect(),
            WeightSlice::Fp8 { values, scales, block, .. } => {
                let cb = k.div_ceil(block[1]);
                (0..n * k)
                    .map(|i| {
                        let (r, c) = (i / k, i % k);
                        let s = scales[(r / block[0]) * cb + c / block[1]];
                        e4m3_table()[values[i] as usize] as f64 * s as f64
                    })
                    .collect()
            }
        }
    }

    /// Every available path against the f64 product, within the f32 summation bound
    /// `2·K·ε·Σ|x·w|` (plus one rounding of the result).
    fn check(x: &[f32], m: usize, k: usize, w: WeightSlice, n: usize) {
        let wd = dense(w, n, k);
        for isa in Isa::available() {
            let y = matmul_t_with(isa, x, m, k, w, n);
            assert_eq!(y.len(), m * n);
            for j in 0..m {
                for r in 0..n {
                    let (exact, abs) = (0..k).fold((0f64, 0f64), |(s, a), c| {
                        let t = x[j * k + c] as f64 * wd[r * k + c];
                        (s + t, a + t.abs())
                    });
                    let got = y[j * n + r] as f64;
                    let bound = (2 * k + 2) as f64 * f32::EPSILON as f64 * abs + f32::MIN_POSITIVE as f64;
                    assert!(
                        (got - exact).abs() <= bound || (got.is_nan() && exact.is_nan()),
                        "{isa:?} {w:?} m={m} k={k} n={n} ({j},{r}): {got} vs {exact}",
                        w = std::mem::discriminant(&w)
                    );
                }
            }
        }
    }

    /// `v` rounded to bf16 values (a bf16 compute dtype's activations).
    fn bf16_values(v: &[f32]) -> Vec<f32> {
        v.iter().map(|v| half::bf16::from_f32(*v).to_f32()).collect()
    }

    /// With f32 activations and with activations that are bf16 values (the AVX512-BF16 path's
    /// case, where the machine has it), K tails of every width below 32 and 8.
    #[test]
    fn every_dtype_and_path_matches_f64_over_awkward_shapes() {
        let shapes = [
            (1, 1, 1),
            (1, 7, 5),
            (2, 9, 3),
            (3, 17, 13),
            (5, 33, 4),
            (8, 131, 21),
            (16, 250, 9),
            (17, 64, 7),
            (4, 63, 6),
            (6, 1030, 5),
        ];
        for (seed, &(m, k, n)) in shapes.iter().enumerate() {
            let x32 = vals(m * k, seed as u64);
            let wf = vals(n * k, 100 + seed as u64);
            let wb: Vec<_> = wf.iter().map(|v| half::bf16::from_f32(*v)).collect();
            let wh: Vec<_> = wf.iter().map(|v| half::f16::from_f32(*v)).collect();
            for x in [x32.clone(), bf16_values(&x32)] {
                check(&x, m, k, WeightSlice::F32(&wf), n);
                check(&x, m, k, WeightSlice::Bf16(&wb), n);
                check(&x, m, k, WeightSlice::F16(&wh), n);
            }
        }
    }

    /// Subnormal activations, which `vdpbf16ps` would read as zero, keep their products (they
    /// take the AVX2 path), and infinities and NaNs propagate on every path.
    #[test]
    fn subnormal_and_non_finite_activations_keep_their_products() {
        let sub = f32::from_bits(0x0001_0000);
        assert!(sub > 0.0 && sub < f32::MIN_POSITIVE);
        let k = 40;
        let w: Vec<_> = (0..2 * k).map(|i| half::bf16::from_f32(if i == 3 { 1e30 } else { 0.5 })).collect();
        let mut x = vec![0f32; k];
        x[3] = sub;
        for isa in Isa::available() {
            let y = matmul_t_with(isa, &x, 1, k, WeightSlice::Bf16(&w), 2);
            let want = (sub as f64 * w[3].to_f64()) as f32;
            assert!((y[0] - want).abs() <= want * 1e-6, "{isa:?}: {} vs {want}", y[0]);
            assert_eq!(y[1], sub * 0.5, "{isa:?}");
            for (bad, want_nan) in [(f32::INFINITY, false), (f32::NAN, true)] {
                let mut xb = vec![1f32; k];
                xb[7] = bad;
                let y = matmul_t_with(isa, &xb, 1, k, WeightSlice::Bf16(&w), 2);
                assert!(y.iter().all(|v| v.is_nan() == want_nan && (want_nan || v.is_infinite())), "{isa:?} {y:?}");
            }
        }
    }

    #[test]
    fn fp8_blocks_with_partial_edges_match_f64() {
        // (m, k, n, block): K and N not multiples of the block or of 8; one block not a multiple
        // of 8 (scalar loop on every path).
        let cases = [
            (1, 300, 257, [128, 128]),
            (3, 129, 130, [128, 128]),
            (16, 256, 64, [128, 128]),
            (17, 100, 9, [16, 32]),
            (2, 50, 11, [4, 24]),
            (4, 23, 6, [2, 3]),
        ];
        for (seed, &(m, k, n, block)) in cases.iter().enumerate() {
            let x = vals(m * k, seed as u64);
            // Finite codes only (NaN codes are checked separately).
            let values: Vec<u8> = vals(n * k, 50 + seed as u64)
                .iter()
                .map(|v| {
                    let b = ((v + 1.0) * 128.0) as u8;
                    if b & 0x7F == 0x7F {
                        b - 1
                    } else {
                        b
                    }
                })
                .collect();
            let sn = n.div_ceil(block[0]) * k.div_ceil(block[1]);
            let scales: Vec<f32> = vals(sn, 70 + seed as u64).iter().map(|v| (v.abs() + 0.1) / 448.0).collect();
            for x in [x.clone(), bf16_values(&x)] {
                check(&x, m, k, WeightSlice::Fp8 { values: &values, scales: &scales, block, nan_free: true }, n);
            }
        }
    }

    /// Each of the 256 codes alone in a row, times 1, under a power-of-two scale and under one
    /// whose products need rounding: every path decodes it as the dequantisation does,
    /// `f32(e4m3 · scale)`. The 254 finite codes run on the vector paths; a weight holding the NaN
    /// codes is found out ([`fp8_nan_free`]) and keeps them NaN on the scalar loop.
    #[test]
    fn all_256_fp8_codes_decode_exactly() {
        // Blocks 16 wide (the AVX2 path) and 32 wide (also the AVX512-BF16 one, whose
        // activations here, ones and zeros, are bf16 values).
        for bw in [16, 32] {
            all_codes_decode_exactly(bw);
        }
    }

    fn all_codes_decode_exactly(bw: usize) {
        let (k, n) = (bw, 256);
        let mut values = vec![0u8; n * k];
        for code in 0..256 {
            values[code * k + 5] = code as u8;
        }
        let finite: Vec<u8> = values.iter().map(|&b| if b & 0x7F == 0x7F { 0 } else { b }).collect();
        assert!(!fp8_nan_free(&values) && fp8_nan_free(&finite));
        // Three identical rows: the one-row and the packed paths.
        let mut x = vec![0f32; 3 * k];
        for j in 0..3 {
            x[j * k + 5] = 1.0;
        }
        for scale in [0.5f32, 0.013_671_877, -3.3e-3] {
            let scales = vec![scale; n.div_ceil(128) * k.div_ceil(bw)];
            for (values, nan_free) in [(&finite, true), (&values, false)] {
                for (isa, m) in Isa::available().into_iter().flat_map(|isa| [(isa, 1), (isa, 3)]) {
                    let w = WeightSlice::Fp8 { values, scales: &scales, block: [128, bw], nan_free };
                    let y = matmul_t_with(isa, &x[..m * k], m, k, w, n);
                    for (i, &got) in y.iter().enumerate() {
                        let code = values[(i % n) * k + 5];
                        let want = float8::F8E4M3::from_bits(code).to_f32() * scale;
                        assert!(
                            got == want || (got.is_nan() && want.is_nan()),
                            "{isa:?} scale {scale} code {code:#04x}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Each scale multiplies its block's sum once: on every path the FP8 product is the product
    /// with the dequantised weight to f32 rounding (against f64), with blocks narrower and wider
    /// than the packed path's chunk, and K tails. A scale of 1e30 or more (no real checkpoint has
    /// one: it is `amax / 448`) sends FP8 to the scalar loop. A NaN code in a row makes that row's
    /// outputs NaN and no others.
    #[test]
    fn fp8_applies_each_block_scale_once() {
        for (seed, (m, k, n, block, big)) in [
            (1, 300, 37, [8, 128], false),
            (5, 264, 12, [8, 128], false),
            (4, 1030, 9, [4, 512], false),
            (3, 200, 10, [2, 24], false),
            (2, 136, 9, [8, 128], true),
        ]
        .into_iter()
        .enumerate()
        {
            let x = vals(m * k, 7 + seed as u64);
            let mut values: Vec<u8> = vals(n * k, 9 + seed as u64).iter().map(|v| ((v + 1.0) * 63.0) as u8).collect();
            let sn = n.div_ceil(block[0]) * k.div_ceil(block[1]);
            let mut scales: Vec<f32> = vals(sn, 11).iter().map(|v| v.abs() * 0.01 + 1e-3).collect();
            if big {
                scales[0] = 1e31;
            }
            for x in [x.clone(), bf16_values(&x)] {
                check(&x, m, k, WeightSlice::Fp8 { values: &values, scales: &scales, block, nan_free: true }, n);
            }
            values[2 * k + k / 2] = 0xFF;
            let w = WeightSlice::Fp8 { values: &values, scales: &scales, block, nan_free: fp8_nan_free(&values) };
            for isa in Isa::available() {
                let y = matmul_t_with(isa, &x, m, k, w, n);
                for (i, v) in y.iter().enumerate() {
                    assert_eq!(v.is_nan(), i % n == 2, "{isa:?} m={m} k={k} n={n} output {i}: {v}");
                }
            }
        }
    }

    /// Batched products are the one-row products, bit for bit, on every path and dtype: a row's
    /// result does not depend on how many rows share the call (the engine's batched decode must
    /// give the tokens a lone request gets). Shapes cross the packed path's chunk width.
    #[test]
    fn each_row_of_a_batch_equals_that_row_alone() {
        for (seed, (k, n)) in [(1024usize, 13usize), (300, 9), (7, 5)].into_iter().enumerate() {
            let wf = vals(n * k, 40 + seed as u64);
            let wb: Vec<_> = wf.iter().map(|v| half::bf16::from_f32(*v)).collect();
            let wh: Vec<_> = wf.iter().map(|v| half::f16::from_f32(*v)).collect();
            let values: Vec<u8> = wf.iter().map(|v| ((v + 1.0) * 63.0) as u8).collect();
            // Scale blocks narrower and wider than the packed path's chunk.
            let (narrow, wide) = ([8, 128], [4, 512]);
            let scales = |b: [usize; 2]| -> Vec<f32> {
                vals(n.div_ceil(b[0]) * k.div_ceil(b[1]), 3).iter().map(|v| v.abs() * 0.01 + 1e-3).collect()
            };
            let (s_narrow, s_wide) = (scales(narrow), scales(wide));
            let fp8 = |block, scales| WeightSlice::Fp8 { values: &values, scales, block, nan_free: true };
            let weights = [
                WeightSlice::F32(&wf),
                WeightSlice::Bf16(&wb),
                WeightSlice::F16(&wh),
                fp8(narrow, &s_narrow),
                fp8(wide, &s_wide),
            ];
            for m in [2, 3, 4, 7, 8, 16, 17] {
                let x32 = vals(m * k, 60 + m as u64);
                for (w, x) in weights.into_iter().flat_map(|w| [(w, x32.clone()), (w, bf16_values(&x32))]) {
                    for isa in Isa::available() {
                        let all = matmul_t_with(isa, &x, m, k, w, n);
                        for j in 0..m {
                            let one = matmul_t_with(isa, &x[j * k..(j + 1) * k], 1, k, w, n);
                            let same =
                                one.iter().zip(&all[j * n..(j + 1) * n]).all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(same, "{isa:?} {:?} m={m} k={k} row {j}", std::mem::discriminant(&w));
                        }
                    }
                }
            }
        }
    }

    /// The strided, single-thread form gives `matmul_t`'s values bit for bit and leaves the rest of
    /// its output alone.
    #[test]
    fn matmul_t_into_writes_the_same_values_rows_apart() {
        for (m, k, n) in [(1, 24, 5), (3, 64, 16), (8, 256, 13), (17, 300, 4)] {
            let x = vals(m * k, 80 + m as u64);
            let wf = vals(n * k, 81);
            let wb: Vec<_> = wf.iter().map(|v| half::bf16::from_f32(*v)).collect();
            for (w, x) in [
                (WeightSlice::F32(&wf), x.clone()),
                (WeightSlice::Bf16(&wb), x.clone()),
                (WeightSlice::Bf16(&wb), bf16_values(&x)),
            ] {
                let want = matmul_t(&x, m, k, w, n);
                let ld = n + 3;
                let mut y = vec![7f32; m * ld];
                matmul_t_into(&x, m, k, w, n, &mut y, ld);
                for j in 0..m {
                    for r in 0..ld {
                        let got = y[j * ld + r];
                        let expect = if r < n { want[j * n + r] } else { 7.0 };
                        assert_eq!(got.to_bits(), expect.to_bits(), "m={m} k={k} n={n} ({j},{r})");
                    }
                }
            }
        }
    }

    /// Rows laid out once serve every later product, of the same dtype (the layout reused) or
    /// another (laid out afresh), with `matmul_t`'s values bit for bit.
    #[test]
    fn activations_laid_out_once_give_each_product() {
        for (m, k) in [(1, 24), (3, 64), (8, 256), (17, 300)] {
            let x = bf16_values(&vals(m * k, 60 + m as u64));
            let weights: Vec<Vec<f32>> = (0..3).map(|i| vals((5 + 4 * i) * k, 61 + i as u64)).collect();
            let wb: Vec<Vec<half::bf16>> =
                weights.iter().map(|w| w.iter().map(|v| half::bf16::from_f32(*v)).collect()).collect();
            let first = WeightSlice::Bf16(&wb[0]);
            let acts = Activations::new(&x, m, k, first);
            let products = [
                WeightSlice::Bf16(&wb[0]),
                WeightSlice::Bf16(&wb[1]),
                WeightSlice::F32(&weights[2]),
                WeightSlice::Bf16(&wb[2]),
            ];
            for w in products {
                let n = match w {
                    WeightSlice::Bf16(v) => v.len() / k,
                    WeightSlice::F32(v) => v.len() / k,
                    _ => unreachable!(),
                };
                let want = matmul_t(&x, m, k, w, n);
                let mut y = vec![0f32; m * n];
                acts.matmul_t_into(w, n, &mut y, n);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&y), bits(&want), "m={m} k={k} n={n}");
            }
        }
    }

    /// Weighted sums of rows against f64, on every path, over column counts with tails; each
    /// output row is the same whatever other rows share the call.
    #[test]
    fn weighted_rows_acc_matches_f64() {
        for (m, n, k) in [(1, 1, 1), (2, 5, 7), (3, 16, 24), (8, 64, 256), (5, 33, 300)] {
            let ld = n + 2;
            let p = vals(m * ld, 90 + k as u64);
            let w = vals(n * k, 91);
            let y0 = vals(m * k, 92);
            for isa in Isa::available() {
                let mut y = y0.clone();
                weighted_rows_acc_with(isa, &p, m, ld, &w, n, k, &mut y);
                for j in 0..m {
                    let mut one = y0[j * k..(j + 1) * k].to_vec();
                    weighted_rows_acc_with(isa, &p[j * ld..], 1, ld, &w, n, k, &mut one);
                    assert!(one.iter().zip(&y[j * k..]).all(|(a, b)| a.to_bits() == b.to_bits()), "{isa:?} row {j}");
                    for c in 0..k {
                        let (exact, abs) =
                            (0..n).fold((y0[j * k + c] as f64, (y0[j * k + c] as f64).abs()), |(s, a), r| {
                                let t = p[j * ld + r] as f64 * w[r * k + c] as f64;
                                (s + t, a + t.abs())
                            });
                        let bound = (2 * n + 2) as f64 * f32::EPSILON as f64 * abs + f32::MIN_POSITIVE as f64;
                        let got = y[j * k + c] as f64;
                        assert!((got - exact).abs() <= bound, "{isa:?} m={m} n={n} k={k} ({j},{c}): {got} vs {exact}");
                    }
                }
            }
        }
    }

    /// Many products in one region give each product's `matmul_t` values, bit for bit: small
    /// ones whole, large ones cut into chunks, empty ones empty.
    #[test]
    fn many_products_equal_each_alone() {
        let shapes = [(3, 1024, 512), (1, 300, 7), (16, 64, 9), (2, 2048, 1030), (0, 8, 4), (5, 33, 0)];
        let xs: Vec<Vec<f32>> =
            shapes.iter().enumerate().map(|(i, &(m, k, _))| bf16_values(&vals(m * k, i as u64))).collect();
        let wf: Vec<Vec<f32>> = shapes.iter().enumerate().map(|(i, &(_, k, n))| vals(n * k, 50 + i as u64)).collect();
        let wb: Vec<Vec<half::bf16>> =
            wf.iter().map(|w| w.iter().map(|v| half::bf16::from_f32(*v)).collect()).collect();
        for bf16 in [false, true] {
            let products: Vec<Product> = shapes
                .iter()
                .enumerate()
                .map(|(i, &(m, k, n))| {
                    let w = if bf16 { WeightSlice::Bf16(&wb[i]) } else { WeightSlice::F32(&wf[i]) };
                    Product { x: &xs[i], m, k, w, n }
                })
                .collect();
            let many = matmul_t_many(&products);
            for (p, y) in products.iter().zip(&many) {
                let one = matmul_t(p.x, p.m, p.k, p.w, p.n);
                assert_eq!(y.len(), one.len());
                assert!(y.iter().zip(&one).all(|(a, b)| a.to_bits() == b.to_bits()), "m={} k={} n={}", p.m, p.k, p.n);
            }
        }
    }

    /// Large enough to be split over threads, with a row count that leaves a short last chunk.
    #[test]
    fn threaded_chunks_cover_every_row() {
        let (m, k, n) = (3, 1000, 1001);
        let x = vals(m * k, 1);
        let wf = vals(n * k, 2);
        check(&x, m, k, WeightSlice::F32(&wf), n);
    }
}
