//! The shared-memory backend: the ranks are threads of one process.
//!
//! A collective deposits each rank's tensor in the group's slot for that rank, waits until every
//! rank has deposited, and then every rank combines all the slots itself, in rank order: the sum
//! of an all-reduce is `((t0 + t1) + t2) + …` accumulated in f32 (f64 for f64 tensors) and
//! rounded once, identical bit for bit on every rank whatever the world size. Tensors on
//! different devices are copied to the reader's device.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use candle_core::{DType, Result, Tensor};

use crate::Communicator;

#[derive(Debug)]
struct State {
    slots: Vec<Option<Tensor>>,
    arrived: usize,
    generation: u64,
    aborted: bool,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    state: Mutex<State>,
    turn: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A rank that panicked inside a collective leaves the data consistent (slots only).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks until every rank has arrived (or one aborted).
    fn wait(&self) -> Result<()> {
        let mut s = self.lock();
        if s.aborted {
            candle_core::bail!("a peer rank failed: the thread group was aborted")
        }
        s.arrived += 1;
        if s.arrived == self.world {
            s.arrived = 0;
            s.generation += 1;
            self.turn.notify_all();
            return Ok(());
        }
        let generation = s.generation;
        while s.generation == generation && !s.aborted {
            s = self.turn.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.aborted {
            candle_core::bail!("a peer rank failed: the thread group was aborted")
        }
        Ok(())
    }
}

/// One rank of a thread group (see the module docs). Create a whole group with [`group`].
#[derive(Debug, Clone)]
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
}

/// The communicators of a group of `world` threads, rank `i` at index `i`; hand one to each thread.
pub fn group(world: usize) -> Vec<ThreadComm> {
    let shared = Arc::new(Shared {
        world,
        state: Mutex::new(State { slots: vec![None; world], arrived: 0, generation: 0, aborted: false }),
        turn: Condvar::new(),
    });
    (0..world).map(|rank| ThreadComm { rank, shared: shared.clone() }).collect()
}

impl ThreadComm {
    /// Deposits `t` (if any), waits for every rank, hands every slot to `combine`, waits again so
    /// no rank overwrites a slot another is still reading, and clears this rank's slot.
    fn exchange<T>(&self, t: Option<&Tensor>, combine: impl FnOnce(&[Option<Tensor>]) -> Result<T>) -> Result<T> {
        self.shared.lock().slots[self.rank] = t.cloned();
        self.shared.wait()?;
        let slots = self.shared.lock().slots.clone();
        let out = combine(&slots);
        self.shared.wait()?;
        self.shared.lock().slots[self.rank] = None;
        out
    }

    fn slot<'a>(&self, slots: &'a [Option<Tensor>], r: usize) -> Result<&'a Tensor> {
        slots[r].as_ref().ok_or_else(|| candle_core::Error::Msg(format!("rank {r} deposited nothing")))
    }
}

/// The dtype sums are accumulated in.
fn accumulator(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        DType::F32 | DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let (dtype, dev) = (t.dtype(), t.device().clone());
        self.exchange(Some(t), |slots| {
            let mut acc: Option<Tensor> = None;
            for r in 0..slots.len() {
                let x = self.slot(slots, r)?;
                if x.shape() != t.shape() || x.dtype() != dtype {
                    candle_core::bail!(
                        "all_reduce_sum: rank {r} sent {:?} {:?}, rank {} sent {:?} {dtype:?}",
                        x.dims(),
                        x.dtype(),
                        self.rank,
                        t.dims()
                    )
                }
                let x = x.to_device(&dev)?.to_dtype(accumulator(dtype))?;
                acc = Some(match acc {
                    None => x,
                    Some(a) => (a + x)?,
                });
            }
            match acc {
                Some(a) => a.to_dtype(dtype),
                None => candle_core::bail!("all_reduce_sum over an empty group"),
            }
        })
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let dev = t.device().clone();
        self.exchange(Some(t), |slots| {
            let parts = (0..slots.len()).map(|r| self.slot(slots, r)?.to_device(&dev)).collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, dim)
        })
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.shared.world {
            candle_core::bail!("broadcast from rank {root} in a group of {} ranks", self.shared.world)
        }
        let mine = (self.rank == root).then_some(t);
        self.exchange(mine, |slots| self.slot(slots, root)?.to_device(t.device()))
    }

    fn barrier(&self) -> Result<()> {
        self.shared.wait()
    }

    fn abort(&self) {
        let mut s = self.shared.lock();
        s.aborted = true;
        self.shared.turn.notify_all();
    }

    fn recover(&self) -> bool {
        let mut s = self.shared.lock();
        s.aborted = false;
        s.arrived = 0;
        s.slots.iter_mut().for_each(|x| *x = None);
        true
    }
}
