//! Collective communication between the ranks that run one sharded Step3 model.
//!
//! This crate owns the [`Communicator`] trait (rank, world size, all-reduce (sum), all-gather on
//! any dimension, broadcast, barrier), its backends, and the [`Layout`] of ranks in tensor-parallel
//! (TP) and expert-parallel (EP) groups with the communicators of each rank ([`RankComms`]).
//! It owns nothing about Step3: which tensor is split how is the model crate's business.
//!
//! Backends:
//! - [`thread`]: ranks are threads of one process sharing memory; every collective combines the
//!   ranks' tensors in rank order, so every rank gets bit-identical results for any world size.
//!   It is the test backend, and can split a CPU model across groups of cores.
//! - `nccl` (feature `nccl`): one process, one worker thread per local GPU, communicators created
//!   together for the local devices (the single-node deployment; a multi-node version only differs
//!   in how the NCCL id reaches the other processes).

mod layout;
pub mod thread;

#[cfg(feature = "nccl")]
pub mod nccl;

use candle_core::{Result, Tensor};

pub use layout::{Layout, LayoutError, RankComms};

/// One rank's handle on a group of ranks.
///
/// Every collective must be called by every rank of the group, in the same order, with tensors of
/// the same shape and dtype (the dimension being gathered may differ for [`Self::all_gather`] only
/// on backends that say so; the thread backend allows it). Results land on the caller's device.
pub trait Communicator: Send + Sync + std::fmt::Debug {
    /// This rank's index in the group, `0..world_size`.
    fn rank(&self) -> usize;

    /// Ranks in the group.
    fn world_size(&self) -> usize;

    /// The element-wise sum of every rank's `t`, returned to every rank.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;

    /// Every rank's `t` concatenated along `dim` in rank order, returned to every rank.
    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor>;

    /// Rank `root`'s `t`, returned to every rank (the other ranks' `t` give shape and dtype only).
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;

    /// Returns once every rank of the group has called it.
    fn barrier(&self) -> Result<()>;

    /// Tells the other ranks that this one failed, so their pending and later collectives fail
    /// instead of waiting forever. Backends that cannot recover ignore it.
    fn abort(&self) {}

    /// Makes the group usable again after [`Self::abort`], once no rank is inside a collective.
    /// Returns false where the backend cannot (the group must then be rebuilt).
    fn recover(&self) -> bool {
        false
    }
}

/// The group of one rank: no communication at all.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn all_gather(&self, t: &Tensor, _dim: usize) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root != 0 {
            candle_core::bail!("broadcast from rank {root} in a group of one rank")
        }
        Ok(t.clone())
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }

    fn recover(&self) -> bool {
        true
    }
}
