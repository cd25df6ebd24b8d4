use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Storage, Tensor, WithDType};
use candle_nn::VarBuilder;
use float8::F8E4M3;
use rayon::prelude::*;

use std::sync::{Arc, OnceLock};

use crate::cpu::{self, e4m3_table, WeightSlice};

/// How the checkpoint stores the weights of layers that may be quantised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Plain floating-point tensors.
    #[default]
    Dense,
    /// Block-FP8 (DeepSeek-V3 / Step3-fp8 convention): `float8_e4m3fn` values and one f32 scale
    /// per `block[0] × block[1]` block, in a `<name>_scale_inv` tensor (`<name>_scale` accepted).
    /// A weight without a scale tensor beside it is read as a plain tensor.
    BlockFp8 {
        /// Rows × columns of one scale block (`weight_block_size`, usually `[128, 128]`).
        block: [usize; 2],
        /// Dequantise once at load (fast, compute-dtype-sized memory) instead of per use.
        dequantize_at_load: bool,
    },
}

/// A weight matrix (or a stack of them, `[E, out, in]`), dense or block-FP8.
#[derive(Debug, Clone)]
pub enum Weight {
    /// A tensor in the compute dtype.
    Dense(Tensor),
    /// FP8 values kept compact; dequantised on every use.
    BlockFp8(BlockFp8),
}

impl Weight {
    /// Loads `name` (expected shape `dims`) from `vb`. With a block-FP8 `format` and a scale
    /// tensor next to it, the weight is read as FP8 and kept compact (or dequantised now if the
    /// format asks); otherwise as a dense tensor in `vb.dtype()`.
    pub fn load(vb: &VarBuilder, name: &str, dims: &[usize], format: WeightFormat) -> Result<Self> {
        let WeightFormat::BlockFp8 { block, dequantize_at_load } = format else {
            return Ok(Self::Dense(vb.get(dims, name)?));
        };
        let scale_name =
            [format!("{name}_scale_inv"), format!("{name}_scale")].into_iter().find(|n| vb.contains_tensor(n));
        let Some(scale_name) = scale_name else {
            return Ok(Self::Dense(vb.get(dims, name)?));
        };
        let values = vb.get_unchecked_dtype(name, DType::F8E4M3)?;
        if values.dims() != dims {
            candle_core::bail!("{}: expected shape {dims:?}, found {:?}", vb.prefix(), values.dims())
        }
        let scale_dims = BlockFp8::scale_dims(dims, block)?;
        let scale_inv = vb.get_unchecked_dtype(&scale_name, DType::F32)?;
        if scale_inv.dims() != scale_dims.as_slice() {
            candle_core::bail!(
                "{}.{scale_name}: expected shape {scale_dims:?} for {block:?} blocks of {dims:?}, found {:?}",
                vb.prefix(),
                scale_inv.dims()
            )
        }
        let nan_free = NanFree::new(values.dims());
        let fp8 = BlockFp8 { values, scale_inv, block, dtype: vb.dtype(), nan_free };
        Ok(if dequantize_at_load { Self::Dense(fp8.dequantize()?) } else { Self::BlockFp8(fp8) })
    }

    pub fn dims(&self) -> &[usize] {
        match self {
            Self::Dense(t) => t.dims(),
            Self::BlockFp8(q) => q.values.dims(),
        }
    }

    /// Slice `i` along the first dimension (expert `i` of a stacked weight), without copying.
    pub fn get(&self, i: usize) -> Result<Self> {
        Ok(match self {
            Self::Dense(t) => Self::Dense(t.get(i)?),
            Self::BlockFp8(q) => {
                let values = q.values.get(i)?;
                let nan_free = q.nan_free.slice(i, values.dims());
                Self::BlockFp8(BlockFp8 { values, scale_inv: q.scale_inv.get(i)?, nan_free, ..*q })
            }
        })
    }

    /// `xs · Wᵀ` for `xs: [..., in]` and a 2-D weight `[out, in]` → `[..., out]`.
    ///
    /// On the CPU, block-FP8 and half-precision weights are widened to f32 a few rows at a time
    /// (tiles of about 4 MiB) and multiplied tile by tile, so no weight-sized buffer is allocated.
    pub fn matmul_t(&self, xs: &Tensor) -> Result<Tensor> {
        self.matmul_t_acc(xs)?.to_dtype(xs.dtype())
    }

    /// [`Self::matmul_t`] before the result is rounded to `xs`'s dtype: the f32 accumulator on
    /// the CPU paths (so a bias can be added before the single rounding, as PyTorch's `addmm`
    /// does), the already-rounded product elsewhere.
    pub fn matmul_t_acc(&self, xs: &Tensor) -> Result<Tensor> {
        let w_dims = self.dims();
        if w_dims.len() != 2 {
            candle_core::bail!("matmul_t needs a 2-D weight, got {w_dims:?}")
        }
        let (out_dim, in_dim) = (w_dims[0], w_dims[1]);
        let mut out_shape = xs.dims().to_vec();
        let last = out_shape.len() - 1;
        out_shape[last] = out_dim;
        let x2 = xs.reshape(((), in_dim))?;
        if let Some(y) = self.skinny_matmul_t(&x2)? {
            return y.reshape(out_shape);
        }
        let y = match self {
            Self::Dense(w) if w.device().is_cpu() && matches!(w.dtype(), DType::BF16 | DType::F16) => {
                half_matmul_t_tiled(&x2, w)?
            }
            Self::Dense(w) => x2.matmul(&w.t()?)?,
            Self::BlockFp8(q) if q.values.device().is_cpu() => q.matmul_t_tiled(&x2)?,
            Self::BlockFp8(q) => x2.matmul(&q.dequantize()?.t()?)?,
        };
        y.reshape(out_shape)
    }

    /// `x2 [M, K] · Wᵀ` in f32 with the CPU skinny kernels ([`crate::cpu`]) when `M` is at most
    /// [`cpu::MAX_ROWS`] and the weight is a contiguous CPU tensor; `None` otherwise (the caller
    /// takes candle's GEMM).
    fn skinny_matmul_t(&self, x2: &Tensor) -> Result<Option<Tensor>> {
        let (m, k) = x2.dims2()?;
        if m == 0 || m > cpu::MAX_ROWS || !x2.device().is_cpu() || !cpu::enabled() {
            return Ok(None);
        }
        let n = self.dims()[0];
        let held = hold(self);
        let Some(w) = held.slice() else {
            return Ok(None);
        };
        let x: Vec<f32> = x2.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(Some(Tensor::from_vec(cpu::matmul_t(&x, m, k, w, n), (m, n), x2.device())?))
    }

    /// Several products `xᵢ · Wᵢᵀ` on the CPU kernels in one parallel region
    /// ([`cpu::matmul_t_many`]), for `(Wᵢ, xᵢ, mᵢ)` with `xᵢ` the f32 activations `[mᵢ, in]` of the
    /// 2-D weight `Wᵢ [out, in]`: the f32 products `[mᵢ, out]`, each [`Self::matmul_t_acc`]'s
    /// values. `None` when one of them cannot take the kernels (a weight that is not a
    /// contiguous CPU tensor, more than [`cpu::MAX_ROWS`] rows, `STEP3_CPU_KERNEL=off`): the
    /// caller then multiplies one by one.
    pub fn matmul_t_many(items: &[(&Weight, &[f32], usize)]) -> Result<Option<Vec<Vec<f32>>>> {
        if !cpu::enabled() {
            return Ok(None);
        }
        for (w, x, m) in items {
            let dims = w.dims();
            if dims.len() != 2 || x.len() != m * dims[1] {
                candle_core::bail!("matmul_t_many: activations of {} values for {m} rows of a {dims:?} weight", x.len())
            }
            if *m > cpu::MAX_ROWS {
                return Ok(None);
            }
        }
        let held: Vec<_> = items.iter().map(|(w, ..)| hold(w)).collect();
        let mut products = Vec::with_capacity(items.len());
        for ((w, x, m), h) in items.iter().zip(&held) {
            let Some(slice) = h.slice() else {
                return Ok(None);
            };
            let (n, k) = (w.dims()[0], w.dims()[1]);
            products.push(cpu::Product { x, m: *m, k, w: slice, n });
        }
        Ok(Some(cpu::matmul_t_many(&products)))
    }

    /// The weight as a tensor in the compute dtype (dequantised for FP8).
    pub fn to_dense(&self) -> Result<Tensor> {
        match self {
            Self::Dense(t) => Ok(t.clone()),
            Self::BlockFp8(q) => q.dequantize(),
        }
    }

    pub fn is_fp8(&self) -> bool {
        matches!(self, Self::BlockFp8(_))
    }

    /// Bytes held in memory (FP8 values and scales, or the dense tensor).
    pub fn storage_bytes(&self) -> usize {
        match self {
            Self::Dense(t) => tensor_bytes(t),
            Self::BlockFp8(q) => tensor_bytes(&q.values) + tensor_bytes(&q.scale_inv),
        }
    }
}

/// A weight's storage held for reading, to be lent to the CPU kernels as a [`WeightSlice`].
/// (`G` is candle's storage read guard.)
struct Held<'a, G: std::ops::Deref<Target = Storage>> {
    values: (G, &'a Layout),
    /// An FP8 weight's scales, and the weight.
    fp8: Option<((G, &'a Layout), &'a BlockFp8)>,
}

/// Holds `w`'s storage (and an FP8 weight's scales) for reading.
fn hold(w: &Weight) -> Held<'_, impl std::ops::Deref<Target = Storage> + '_> {
    match w {
        Weight::Dense(t) => Held { values: t.storage_and_layout(), fp8: None },
        Weight::BlockFp8(q) => {
            Held { values: q.values.storage_and_layout(), fp8: Some((q.scale_inv.storage_and_layout(), q)) }
        }
    }
}

impl<G: std::ops::Deref<Target = Storage>> Held<'_, G> {
    /// The weight as the kernels read it: `None` unless it is a contiguous CPU tensor of a dtype
    /// they take (with contiguous f32 scales for FP8).
    fn slice(&self) -> Option<WeightSlice<'_>> {
        let (Storage::Cpu(st), Some((a, b))) = (&*self.values.0, self.values.1.contiguous_offsets()) else {
            return None;
        };
        Some(match (st, &self.fp8) {
            (CpuStorage::F32(w), None) => WeightSlice::F32(&w[a..b]),
            (CpuStorage::BF16(w), None) => WeightSlice::Bf16(&w[a..b]),
            (CpuStorage::F16(w), None) => WeightSlice::F16(&w[a..b]),
            (CpuStorage::F8E4M3(v), Some(((s_storage, s_layout), q))) => {
                let (Storage::Cpu(CpuStorage::F32(s)), Some((sa, sb))) = (&**s_storage, s_layout.contiguous_offsets())
                else {
                    return None;
                };
                let v = &v[a..b];
                // SAFETY: `F8E4M3` is `#[repr(transparent)]` over its `u8` bits.
                let values = unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len()) };
                let nan_free = q.nan_free.get(values);
                WeightSlice::Fp8 { values, scales: &s[sa..sb], block: q.block, nan_free }
            }
            _ => return None,
        })
    }
}

/// Bytes of weight converted to f32 per tile on the CPU: small enough to stay below the
/// allocator's mmap threshold and in cache, large enough that per-op overhead vanishes.
const TILE_BYTES: usize = 4 << 20;

/// Rows of a `[rows, cols]` weight per tile, a multiple of `align`.
fn tile_rows(cols: usize, align: usize) -> usize {
    ((TILE_BYTES / (cols * 4).max(1)).max(1) / align).max(1) * align
}

/// `xs [N, in] · Wᵀ` for a bf16/f16 weight on the CPU: each tile of rows is widened to f32
/// (exactly) and multiplied in f32, the f32 result left for the caller to round: the arithmetic of
/// a half-precision GEMM with f32 accumulation, without the weight-sized f32 copy that candle's CPU half GEMM
/// makes on every call.
fn half_matmul_t_tiled(xs: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    tiled_matmul_t(xs, rows, tile_rows(cols, 1), |start, n| w.narrow(0, start, n)?.to_dtype(DType::F32))
}

/// `xs [N, in] · Wᵀ` in f32 for a weight of `rows` rows that `widen(start, n)` produces as f32,
/// `tile` rows at a time; the result stays in f32 (the caller rounds it).
fn tiled_matmul_t(
    xs: &Tensor,
    rows: usize,
    tile: usize,
    widen: impl Fn(usize, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let xs32 = xs.to_dtype(DType::F32)?;
    let mut outs = Vec::with_capacity(rows.div_ceil(tile));
    for start in (0..rows).step_by(tile) {
        outs.push(xs32.matmul(&widen(start, tile.min(rows - start))?.t()?)?);
    }
    Tensor::cat(&outs, 1)
}

/// Bytes of a tensor's elements.
pub fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// Block-FP8 weight: `values` `[..., R, C]` in `float8_e4m3fn`, `scale_inv`
/// `[..., ceil(R/b0), ceil(C/b1)]` in f32; `W[r, c] = f32(values[r, c]) · scale_inv[r/b0, c/b1]`
/// (edge blocks may be partial). Dequantised to `dtype` on use, except by the CPU's skinny
/// products ([`crate::cpu`]), which read the bytes in place and apply each block's scale once.
#[derive(Debug, Clone)]
pub struct BlockFp8 {
    values: Tensor,
    scale_inv: Tensor,
    block: [usize; 2],
    dtype: DType,
    nan_free: NanFree,
}

/// Per 2-D matrix of a (stacked) FP8 weight, whether its bytes hold no e4m3 NaN code (what the
/// CPU kernels' vector paths need, [`cpu::fp8_nan_free`]): found by one scan on the matrix's first
/// skinny product and remembered, also across the per-expert slices [`Weight::get`] makes.
#[derive(Debug, Clone)]
struct NanFree {
    flags: Arc<[OnceLock<bool>]>,
    /// The first of `flags` that this weight's matrices use.
    first: usize,
}

impl NanFree {
    /// One flag per matrix of a weight of shape `dims` (at least 2-D).
    fn new(dims: &[usize]) -> Self {
        let matrices = Self::matrices(dims);
        Self { flags: (0..matrices).map(|_| OnceLock::new()).collect(), first: 0 }
    }

    fn matrices(dims: &[usize]) -> usize {
        dims[..dims.len().saturating_sub(2)].iter().product()
    }

    /// The flags of slice `i` along the first dimension, whose shape is `dims`.
    fn slice(&self, i: usize, dims: &[usize]) -> Self {
        Self { flags: self.flags.clone(), first: self.first + i * Self::matrices(dims) }
    }

    /// The flag of a 2-D weight whose bytes are `values`, scanning them the first time.
    fn get(&self, values: &[u8]) -> bool {
        match self.flags.get(self.first) {
            Some(flag) => *flag.get_or_init(|| cpu::fp8_nan_free(values)),
            None => cpu::fp8_nan_free(values),
        }
    }
}

impl BlockFp8 {
    /// Wraps FP8 values and their block scales, dequantising to `dtype`.
    pub fn new(values: Tensor, scale_inv: Tensor, block: [usize; 2], dtype: DType) -> Result<Self> {
        if values.dtype() != DType::F8E4M3 {
            candle_core::bail!("block-FP8 values must be F8E4M3, got {:?}", values.dtype())
        }
        let want = Self::scale_dims(values.dims(), block)?;
        if scale_inv.dims() != want.as_slice() {
            candle_core::bail!("block-FP8 scales: expected {want:?}, got {:?}", scale_inv.dims())
        }
        let nan_free = NanFree::new(values.dims());
        Ok(Self { values, scale_inv: scale_inv.to_dtype(DType::F32)?, block, dtype, nan_free })
    }

    /// The scale shape for a weight of shape `dims` and `block`.
    pub fn scale_dims(dims: &[usize], block: [usize; 2]) -> Result<Vec<usize>> {
        let n = dims.len();
        if n < 2 || block[0] == 0 || block[1] == 0 {
            candle_core::bail!("block-FP8 needs a matrix and a non-empty block, got {dims:?} / {block:?}")
        }
        let mut s = dims.to_vec();
        s[n - 2] = dims[n - 2].div_ceil(block[0]);
        s[n - 1] = dims[n - 1].div_ceil(block[1]);
        Ok(s)
    }

    /// The dequantised weight in the target dtype.
    pub fn dequantize(&self) -> Result<Tensor> {
        match self.values.device() {
            Device::Cpu => self.values.apply_op2_no_bwd(
                &self.scale_inv,
                &Dequant { block: self.block, dtype: self.dtype, round_through: self.dtype },
            ),
            _ => self.dequantize_with_ops(),
        }
    }

    /// `xs [N, in] · Wᵀ` for a 2-D weight, dequantising `TILE_BYTES` of rows at a time.
    ///
    /// For a bf16/f16 compute dtype the tiles are produced as f32 values that are exactly the
    /// bf16/f16-rounded weights, and multiplied in f32 with f32 accumulation; the f32 result is
    /// left for the caller to round. That is the arithmetic of a bf16 GEMM with f32 accumulation, but it skips the
    /// weight-sized f32 conversion candle's CPU half-precision GEMM performs on every call.
    fn matmul_t_tiled(&self, xs: &Tensor) -> Result<Tensor> {
        let (rows, cols) = self.values.dims2()?;
        let b0 = self.block[0];
        let op = Dequant { block: self.block, dtype: DType::F32, round_through: self.dtype };
        tiled_matmul_t(xs, rows, tile_rows(cols, b0), |start, n| {
            let values = self.values.narrow(0, start, n)?;
            values.apply_op2_no_bwd(&self.scale_inv.narrow(0, start / b0, n.div_ceil(b0))?, &op)
        })
    }

    /// Device-agnostic dequantisation with broadcasts (used off the CPU).
    fn dequantize_with_ops(&self) -> Result<Tensor> {
        let dims = self.values.dims().to_vec();
        let n = dims.len();
        let [b0, b1] = self.block;
        let lead: Vec<usize> = dims[..n - 2].to_vec();
        let (rb, cb) = (dims[n - 2].div_ceil(b0), dims[n - 1].div_ceil(b1));
        let mut spread = lead.clone();
        spread.extend([rb, 1, cb, 1]);
        let mut full = lead.clone();
        full.extend([rb, b0, cb, b1]);
        let mut padded = lead;
        padded.extend([rb * b0, cb * b1]);
        let scale = self.scale_inv.reshape(spread)?.broadcast_as(full)?.contiguous()?.reshape(padded)?;
        let scale = scale.narrow(n - 2, 0, dims[n - 2])?.narrow(n - 1, 0, dims[n - 1])?;
        (self.values.to_dtype(DType::F32)? * scale)?.to_dtype(self.dtype)
    }
}

/// CPU block dequantisation: one table lookup and one multiply per element, rows in parallel.
struct Dequant {
    block: [usize; 2],
    /// Output dtype.
    dtype: DType,
    /// Values are rounded to this dtype (then widened to `dtype` if that is wider).
    round_through: DType,
}

impl candle_core::CustomOp2 for Dequant {
    fn name(&self) -> &'static str {
        "block-fp8-dequant"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F8E4M3(values), CpuStorage::F32(scales)) = (s1, s2) else {
            candle_core::bail!(
                "block-fp8 dequant expects F8E4M3 values and F32 scales, got {:?} / {:?}",
                s1.dtype(),
                s2.dtype()
            )
        };
        let (Some((v0, v1)), Some((s0, s1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("block-fp8 dequant expects contiguous inputs")
        };
        let (values, scales) = (&values[v0..v1], &scales[s0..s1]);
        let dims = l1.dims();
        let (rows, cols) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let cb = cols.div_ceil(self.block[1]);
        let rb = rows.div_ceil(self.block[0]);
        let table = e4m3_table();
        /// Within one scale block every element is one of 256 values, `round(e4m3(v) · s)`: a
        /// 256-entry table per column block of a row block turns the inner loop into one lookup
        /// per element. Row blocks run one after another, the rows of a block in parallel.
        fn run<T: WithDType, F: Fn(f32) -> T + Sync>(
            values: &[F8E4M3],
            scales: &[f32],
            (rows, cols, rb, cb, block): (usize, usize, usize, usize, [usize; 2]),
            table: &[f32; 256],
            convert: F,
        ) -> Vec<T> {
            let mut out = vec![T::zero(); values.len()];
            let per_matrix = rows * cols;
            for (m, (dst_m, src_m)) in out.chunks_mut(per_matrix).zip(values.chunks(per_matrix)).enumerate() {
                for (rbi, (dst, src)) in
                    dst_m.chunks_mut(block[0] * cols).zip(src_m.chunks(block[0] * cols)).enumerate()
                {
                    let srow = &scales[(m * rb + rbi) * cb..][..cb];
                    let tables: Vec<[T; 256]> =
                        srow.iter().map(|&s| std::array::from_fn(|i| convert(table[i] * s))).collect();
                    dst.par_chunks_mut(cols).zip(src.par_chunks(cols)).for_each(|(drow, vrow)| {
                        for ((d, v), t) in drow.chunks_mut(block[1]).zip(vrow.chunks(block[1])).zip(&tables) {
                            for (d, v) in d.iter_mut().zip(v) {
                                *d = t[v.to_bits() as usize];
                            }
                        }
                    });
                }
            }
            out
        }
        let geom = (rows, cols, rb, cb, self.block);
        let storage = match (self.dtype, self.round_through) {
            (DType::F32, DType::BF16) => {
                CpuStorage::F32(run(values, scales, geom, table, |x| half::bf16::from_f32(x).to_f32()))
            }
            (DType::F32, DType::F16) => {
                CpuStorage::F32(run(values, scales, geom, table, |x| half::f16::from_f32(x).to_f32()))
            }
            (out, through) if out != through => {
                candle_core::bail!("block-fp8 dequant: cannot round through {through:?} into {out:?}")
            }
            (DType::F32, _) => CpuStorage::F32(run(values, scales, geom, table, |x| x)),
            (DType::BF16, _) => CpuStorage::BF16(run(values, scales, geom, table, half::bf16::from_f32)),
            (DType::F16, _) => CpuStorage::F16(run(values, scales, geom, table, half::f16::from_f32)),
            (other, _) => candle_core::bail!("block-fp8 dequant to {other:?} is not supported"),
        };
        Ok((storage, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_table_has_the_format_landmarks() {
        let t = e4m3_table();
        assert_eq!(t[0x00], 0.0);
        assert_eq!(t[0x38], 1.0); // exponent 7 (bias), mantissa 0
        assert_eq!(t[0x7E], 448.0); // largest finite
        assert_eq!(t[0xFE], -448.0);
        assert_eq!(t[0x01], 2f32.powi(-9)); // smallest subnormal
        assert!(t[0x7F].is_nan() && t[0xFF].is_nan());
    }

    /// Dequantises with partial edge blocks, on the CPU kernel and the broadcast path, against
    /// the formula written out by hand.
    #[test]
    fn partial_blocks_and_both_paths_agree_with_the_formula() -> Result<()> {
        let dev = Device::Cpu;
        let (e, r, c, block) = (2, 5, 7, [2, 3]);
        let bits: Vec<u8> = (0..e * r * c).map(|i| ((i * 37 + 11) % 250) as u8).collect();
        let values = Tensor::from_vec(bits.iter().map(|&b| F8E4M3::from_bits(b)).collect::<Vec<_>>(), (e, r, c), &dev)?;
        let sdims = BlockFp8::scale_dims(&[e, r, c], block)?;
        assert_eq!(sdims, vec![2, 3, 3]);
        let scales: Vec<f32> = (0..sdims.iter().product()).map(|i| 0.5 + i as f32 * 0.25).collect();
        let scale_inv = Tensor::from_vec(scales.clone(), sdims.as_slice(), &dev)?;
        let q = BlockFp8::new(values, scale_inv, block, DType::F32)?;
        let cpu = q.dequantize()?.flatten_all()?.to_vec1::<f32>()?;
        let ops = q.dequantize_with_ops()?.flatten_all()?.to_vec1::<f32>()?;
        for m in 0..e {
            for i in 0..r {
                for j in 0..c {
                    let idx = (m * r + i) * c + j;
                    let s = scales[(m * 3 + i / 2) * 3 + j / 3];
                    let want = F8E4M3::from_bits(bits[idx]).to_f32() * s;
                    assert_eq!(cpu[idx].to_bits(), want.to_bits(), "cpu ({m},{i},{j})");
                    assert_eq!(ops[idx].to_bits(), want.to_bits(), "ops ({m},{i},{j})");
                }
            }
        }
        // Slicing one expert dequantises that slice only.
        let one = Weight::BlockFp8(q).get(1)?;
        let dense = one.to_dense()?;
        assert_eq!(dense.flatten_all()?.to_vec1::<f32>()?, cpu[r * c..].to_vec());
        // The product (the CPU kernel: this 3-column block takes its scalar loop) equals candle's
        // product with the dequantised weight to f32 rounding: the weights reach 448 · 5, so the
        // two summation orders differ by a few ulps of values in the thousands.
        let x = Tensor::randn(0f32, 1.0, (3, c), &dev)?;
        let tiled = one.matmul_t(&x)?;
        let full = x.matmul(&dense.t()?)?;
        let bound = f32::EPSILON * full.abs()?.max_all()?.to_scalar::<f32>()? * c as f32;
        let diff = (tiled - full)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff <= bound, "{diff} > {bound}");
        Ok(())
    }

    #[test]
    fn tiles_cover_every_row_of_a_large_weight() -> Result<()> {
        // 300 rows × 9000 columns of f32 is ≈ 10.8 MB: three tiles, the last one partial.
        let dev = Device::Cpu;
        let (r, c, block) = (300, 9000, [128, 128]);
        let bits: Vec<F8E4M3> = (0..r * c).map(|i| F8E4M3::from_bits(((i * 7 + 3) % 120) as u8)).collect();
        let sdims = BlockFp8::scale_dims(&[r, c], block)?;
        let svals: Vec<f32> = (0..sdims.iter().product::<usize>()).map(|i| 0.5 + (i % 7) as f32 * 0.125).collect();
        let scales = Tensor::from_vec(svals, sdims.as_slice(), &dev)?;
        let q = Weight::BlockFp8(BlockFp8::new(Tensor::from_vec(bits, (r, c), &dev)?, scales, block, DType::F32)?);
        let xs: Vec<f32> = (0..10 * c).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let x = Tensor::from_vec(xs.clone(), (2, 5, c), &dev)?;
        let tiled = q.matmul_t(&x)?;
        assert_eq!(tiled.dims(), &[2, 5, r]);
        let tiled = tiled.flatten_all()?.to_vec1::<f32>()?;
        // Against the exact product (f64), within the f32 summation bound n·ε·Σ|x·w|.
        let w = q.to_dense()?.flatten_all()?.to_vec1::<f32>()?;
        for (row, xr) in xs.chunks(c).enumerate() {
            for o in 0..r {
                let terms = xr.iter().zip(&w[o * c..(o + 1) * c]).map(|(a, b)| *a as f64 * *b as f64);
                let (exact, abs) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                let got = tiled[row * r + o] as f64;
                assert!((got - exact).abs() <= c as f64 * 6e-8 * abs, "row {row} out {o}: {got} vs {exact}");
            }
        }
        Ok(())
    }

    /// In bf16 the tiled f32 product (more rows than the skinny kernels take) uses exactly the
    /// bf16-rounded weights: it agrees with a bf16 matmul on the dequantised bf16 weight to bf16
    /// output rounding.
    #[test]
    fn bf16_tiles_use_the_bf16_rounded_weights() -> Result<()> {
        let dev = Device::Cpu;
        let (r, c, block) = (256, 384, [128, 128]);
        let bits: Vec<F8E4M3> = (0..r * c).map(|i| F8E4M3::from_bits(((i * 11 + 5) % 118) as u8)).collect();
        let scales = Tensor::rand(0.001f32, 0.01, (2, 3), &dev)?;
        let q = BlockFp8::new(Tensor::from_vec(bits, (r, c), &dev)?, scales, block, DType::BF16)?;
        let w_bf16 = q.dequantize()?;
        assert_eq!(w_bf16.dtype(), DType::BF16);
        let x = Tensor::randn(0f32, 1.0, (cpu::MAX_ROWS + 4, c), &dev)?.to_dtype(DType::BF16)?;
        let tiled = Weight::BlockFp8(q).matmul_t(&x)?;
        assert_eq!(tiled.dtype(), DType::BF16);
        let exact = x.to_dtype(DType::F32)?.matmul(&w_bf16.to_dtype(DType::F32)?.t()?)?;
        let diff = (tiled.to_dtype(DType::F32)? - &exact)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = exact.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff <= scale / 128.0, "{diff} vs {scale}");
        Ok(())
    }
}
