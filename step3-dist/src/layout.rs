use std::sync::Arc;

use crate::{Communicator, SingleRank};

/// A layout that cannot run, found before anything is loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    #[error("--{flag} must be at least 1")]
    Zero { flag: &'static str },
    #[error("{ranks} ranks (tp {tp} × ep {ep}) need {ranks} devices, but --devices lists {devices}")]
    TooFewDevices { ranks: usize, tp: usize, ep: usize, devices: usize },
    #[error("device {device} is listed twice in --devices: one rank per device")]
    DuplicateDevice { device: usize },
    #[error("{what} = {size} is not divisible by {flag} {parts}")]
    NotDivisible { what: String, size: usize, flag: &'static str, parts: usize },
    #[error("{tensor}: splitting {what} {size} into {parts} parts gives {piece}, which cuts its {block}×{block} FP8 blocks (the piece must be a multiple of {block}); use fewer parts or a bf16 checkpoint")]
    CutsFp8Blocks { tensor: String, what: String, size: usize, parts: usize, piece: usize, block: usize },
}

/// How the ranks of one model are arranged: `tp × ep` ranks, rank `r` at EP index `r / tp` and
/// TP index `r % tp`, on device `devices[r]`.
///
/// The ranks of one EP index form a TP group (they split attention heads and the columns of every
/// MLP between them); the ranks of one TP index form an EP group (they hold different routed
/// experts). The whole world sums the routed experts' partial outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub tp: usize,
    pub ep: usize,
    /// The device index of each rank (CUDA ordinals; ignored on the CPU).
    pub devices: Vec<usize>,
}

impl Default for Layout {
    fn default() -> Self {
        Self::single()
    }
}

impl Layout {
    /// One rank on device 0.
    pub fn single() -> Self {
        Self { tp: 1, ep: 1, devices: vec![0] }
    }

    /// `tp × ep` ranks on `devices` (the first `tp·ep` devices from 0 when `None`), checked.
    pub fn new(tp: usize, ep: usize, devices: Option<Vec<usize>>) -> Result<Self, LayoutError> {
        if tp == 0 {
            return Err(LayoutError::Zero { flag: "tp" });
        }
        if ep == 0 {
            return Err(LayoutError::Zero { flag: "ep" });
        }
        let ranks = tp * ep;
        let devices = devices.unwrap_or_else(|| (0..ranks).collect());
        if devices.len() < ranks {
            return Err(LayoutError::TooFewDevices { ranks, tp, ep, devices: devices.len() });
        }
        let devices = devices[..ranks].to_vec();
        for (i, d) in devices.iter().enumerate() {
            if devices[..i].contains(d) {
                return Err(LayoutError::DuplicateDevice { device: *d });
            }
        }
        Ok(Self { tp, ep, devices })
    }

    /// Ranks in all: `tp · ep`.
    pub fn world(&self) -> usize {
        self.tp * self.ep
    }

    pub fn is_single(&self) -> bool {
        self.world() == 1
    }

    /// `(ep index, tp index)` of `rank`.
    pub fn coords(&self, rank: usize) -> (usize, usize) {
        (rank / self.tp, rank % self.tp)
    }

    /// Checks that `parts` divides `size` (`what` names the quantity, `flag` the option).
    pub fn check_divides(what: &str, size: usize, flag: &'static str, parts: usize) -> Result<(), LayoutError> {
        if parts == 0 || !size.is_multiple_of(parts) {
            return Err(LayoutError::NotDivisible { what: what.to_string(), size, flag, parts });
        }
        Ok(())
    }
}

/// The communicators one rank uses: the whole world, its TP group and its EP group.
#[derive(Debug, Clone)]
pub struct RankComms {
    /// This rank in the world (`ep index · tp + tp index`).
    pub world: Arc<dyn Communicator>,
    /// This rank's TP group (same EP index); its rank there is the TP index.
    pub tp: Arc<dyn Communicator>,
    /// This rank's EP group (same TP index); its rank there is the EP index.
    pub ep: Arc<dyn Communicator>,
}

impl RankComms {
    /// The communicators of a model on one rank.
    pub fn single() -> Self {
        Self { world: Arc::new(SingleRank), tp: Arc::new(SingleRank), ep: Arc::new(SingleRank) }
    }

    /// The thread backend's communicators for every rank of `layout`, rank `r` at index `r`.
    pub fn threads(layout: &Layout) -> Vec<Self> {
        if layout.is_single() {
            return vec![Self::single()];
        }
        let world = crate::thread::group(layout.world());
        let tp_groups: Vec<_> = (0..layout.ep).map(|_| crate::thread::group(layout.tp)).collect();
        let ep_groups: Vec<_> = (0..layout.tp).map(|_| crate::thread::group(layout.ep)).collect();
        world
            .into_iter()
            .enumerate()
            .map(|(r, w)| {
                let (e, t) = layout.coords(r);
                Self {
                    world: Arc::new(w),
                    tp: Arc::new(tp_groups[e][t].clone()),
                    ep: Arc::new(ep_groups[t][e].clone()),
                }
            })
            .collect()
    }

    /// Aborts every group this rank belongs to (see [`Communicator::abort`]).
    pub fn abort(&self) {
        self.world.abort();
        self.tp.abort();
        self.ep.abort();
    }

    /// Recovers every group after an abort; false if a backend cannot.
    pub fn recover(&self) -> bool {
        self.world.recover() & self.tp.recover() & self.ep.recover()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_checked() {
        assert_eq!(Layout::new(0, 1, None), Err(LayoutError::Zero { flag: "tp" }));
        assert_eq!(Layout::new(1, 0, None), Err(LayoutError::Zero { flag: "ep" }));
        let err = Layout::new(4, 2, Some(vec![0, 1, 2])).unwrap_err();
        assert_eq!(err, LayoutError::TooFewDevices { ranks: 8, tp: 4, ep: 2, devices: 3 });
        assert!(err.to_string().contains("need 8 devices"), "{err}");
        assert_eq!(Layout::new(2, 1, Some(vec![3, 3])), Err(LayoutError::DuplicateDevice { device: 3 }));
        let l = Layout::new(2, 3, None).unwrap();
        assert_eq!(l.devices, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!((l.coords(0), l.coords(1), l.coords(5)), ((0, 0), (0, 1), (2, 1)));
        assert!(Layout::check_divides("num_attention_heads", 64, "tp", 3).is_err());
        assert!(Layout::check_divides("num_attention_heads", 64, "tp", 8).is_ok());
    }
}
