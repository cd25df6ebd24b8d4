//! The NCCL backend (feature `nccl`): one process, one thread per local GPU, the communicators of
//! a group created together for its devices (`ncclCommInitAll`) on the streams candle runs on, so
//! collectives are ordered with the ranks' kernels.
//!
//! Sums are taken in f32 whatever the tensor's dtype (bf16/f16 partials are widened first and the
//! sum rounded once, like the thread backend). A multi-node version would differ only in how the
//! ranks get their communicators (`Comm::from_rank` with an id sent to the other processes).

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, ReduceOp};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout as TLayout, Result, Shape, Tensor};

use crate::{Communicator, Layout, RankComms};

/// `Comm` holds a raw NCCL handle; each rank's is used by that rank's thread only, behind a mutex.
struct Handle(Comm);

// SAFETY: an NCCL communicator may be used from any thread as long as calls are not concurrent,
// which the mutex around it guarantees.
unsafe impl Send for Handle {}

/// One rank of an NCCL group.
pub struct NcclComm {
    comm: Mutex<Handle>,
    rank: usize,
    world: usize,
    device: Device,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm").field("rank", &self.rank).field("world", &self.world).finish()
    }
}

fn nccl_err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("NCCL: {e:?}"))
}

fn cuda(device: &Device) -> Result<&CudaDevice> {
    match device {
        Device::Cuda(d) => Ok(d),
        other => candle_core::bail!("NCCL needs CUDA devices, got {other:?}"),
    }
}

/// The communicators of one group over `devices` (rank `i` on `devices[i]`).
pub fn group(devices: &[Device]) -> Result<Vec<NcclComm>> {
    let streams = devices.iter().map(|d| Ok(cuda(d)?.cuda_stream())).collect::<Result<Vec<_>>>()?;
    let world = streams.len();
    let comms = Comm::from_devices(streams).map_err(nccl_err)?;
    Ok(comms
        .into_iter()
        .zip(devices)
        .enumerate()
        .map(|(rank, (c, device))| NcclComm { comm: Mutex::new(Handle(c)), rank, world, device: device.clone() })
        .collect())
}

/// The NCCL communicators of every rank of `layout`, ranks on `devices` (one per rank, in order).
pub fn rank_comms(layout: &Layout, devices: &[Device]) -> Result<Vec<RankComms>> {
    let world = group(devices)?;
    let pick = |ranks: Vec<usize>| -> Result<Vec<NcclComm>> {
        group(&ranks.iter().map(|&r| devices[r].clone()).collect::<Vec<_>>())
    };
    let mut tp_groups: Vec<Vec<Option<NcclComm>>> = (0..layout.ep)
        .map(|e| Ok(pick((0..layout.tp).map(|t| e * layout.tp + t).collect())?.into_iter().map(Some).collect()))
        .collect::<Result<_>>()?;
    let mut ep_groups: Vec<Vec<Option<NcclComm>>> = (0..layout.tp)
        .map(|t| Ok(pick((0..layout.ep).map(|e| e * layout.tp + t).collect())?.into_iter().map(Some).collect()))
        .collect::<Result<_>>()?;
    world
        .into_iter()
        .enumerate()
        .map(|(r, w)| {
            let (e, t) = layout.coords(r);
            let tp = tp_groups[e][t].take().ok_or_else(|| candle_core::Error::Msg("tp group".into()))?;
            let ep = ep_groups[t][e].take().ok_or_else(|| candle_core::Error::Msg("ep group".into()))?;
            Ok(RankComms { world: Arc::new(w), tp: Arc::new(tp), ep: Arc::new(ep) })
        })
        .collect()
}

/// What a collective op does with its f32 input buffer.
enum Op {
    AllReduce,
    AllGather,
    Broadcast(usize),
}

struct Collective<'a> {
    comm: &'a NcclComm,
    op: Op,
}

impl CustomOp1 for Collective<'_> {
    fn name(&self) -> &'static str {
        "nccl-collective"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &TLayout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives need CUDA tensors")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &TLayout) -> Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else { candle_core::bail!("NCCL needs contiguous tensors") };
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        let dev = s.device();
        let n = end - start;
        let comm = self.comm.comm.lock().unwrap_or_else(|p| p.into_inner());
        let (out, shape) = match self.op {
            Op::AllReduce => {
                let mut dst = dev.alloc_zeros::<f32>(n)?;
                comm.0.all_reduce(&src, &mut dst, &ReduceOp::Sum).map_err(nccl_err)?;
                (dst, l.shape().clone())
            }
            Op::AllGather => {
                let mut dst = dev.alloc_zeros::<f32>(n * self.comm.world)?;
                comm.0.all_gather(&src, &mut dst).map_err(nccl_err)?;
                let mut dims = vec![self.comm.world];
                dims.extend_from_slice(l.dims());
                (dst, Shape::from(dims))
            }
            Op::Broadcast(root) => {
                let mut dst = dev.alloc_zeros::<f32>(n)?;
                comm.0.broadcast(Some(&src), &mut dst, root as i32).map_err(nccl_err)?;
                (dst, l.shape().clone())
            }
        };
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
    }
}

impl NcclComm {
    /// Runs `op` on `t` widened to f32 and rounds the result back to `t`'s dtype.
    fn run(&self, t: &Tensor, op: Op) -> Result<Tensor> {
        let dtype = t.dtype();
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            candle_core::bail!("NCCL collectives here take f32, bf16 or f16 tensors, got {dtype:?}")
        }
        let wide = t.to_dtype(DType::F32)?.contiguous()?;
        wide.apply_op1_no_bwd(&Collective { comm: self, op })?.to_dtype(dtype)
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.run(t, Op::AllReduce)
    }

    /// Every rank's `t` must have the same shape (NCCL's all-gather is rank-major over equal
    /// buffers); the gathered `[world, ...]` is then laid along `dim`.
    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let g = self.run(t, Op::AllGather)?; // [world, d0, …]
        let mut dims = t.dims().to_vec();
        dims[dim] *= self.world;
        g.unsqueeze(dim + 1)?.transpose(0, dim + 1)?.squeeze(0)?.contiguous()?.reshape(dims)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.world {
            candle_core::bail!("broadcast from rank {root} in a group of {} ranks", self.world)
        }
        self.run(t, Op::Broadcast(root))
    }

    fn barrier(&self) -> Result<()> {
        self.all_reduce_sum(&Tensor::zeros(1, DType::F32, &self.device)?)?;
        self.device.synchronize()
    }
}
