//! Every collective of the thread backend against a naive version, for world sizes 1–4 (3
//! included), f32 and bf16, gathers on every dimension, sub-groups of a layout, and aborts.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use step3_dist::{thread, Communicator, Layout, RankComms};

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| (self.below(2001) as f32 - 1000.0) / 137.0).collect()
    }
}

/// Runs `f(rank, comm)` on one thread per rank and returns the results in rank order.
fn run<T: Send>(
    comms: Vec<impl Communicator + 'static>,
    f: impl Fn(usize, &dyn Communicator) -> Result<T> + Sync,
) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .iter()
            .enumerate()
            .map(|(r, c)| {
                let f = &f;
                s.spawn(move || f(r, c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank panicked").expect("rank failed")).collect()
    })
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

#[test]
fn all_reduce_matches_the_naive_sum_for_every_world_size() -> Result<()> {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    for world in 1..=4 {
        for trial in 0..6 {
            let dims: Vec<usize> = (0..1 + trial % 3).map(|_| 1 + rng.below(5)).collect();
            let n: usize = dims.iter().product();
            let dtype = if trial % 2 == 0 { DType::F32 } else { DType::BF16 };
            let inputs: Vec<Tensor> = (0..world)
                .map(|_| Tensor::from_vec(rng.values(n), dims.as_slice(), &Device::Cpu)?.to_dtype(dtype))
                .collect::<Result<_>>()?;
            // Naive: f64 sum of the (already rounded) inputs, element by element.
            let host: Vec<Vec<f32>> = inputs
                .iter()
                .map(|t| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
                .collect::<Result<_>>()?;
            let want: Vec<f64> = (0..n).map(|i| host.iter().map(|h| h[i] as f64).sum()).collect();
            let outs = run(thread::group(world), |r, c| c.all_reduce_sum(&inputs[r]));
            for (r, out) in outs.iter().enumerate() {
                assert_eq!(out.dims(), dims.as_slice());
                assert_eq!(out.dtype(), dtype);
                let got = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let tol = if dtype == DType::F32 { 1e-6 } else { 8e-3 };
                for (g, w) in got.iter().zip(&want) {
                    assert!((*g as f64 - w).abs() <= tol * w.abs().max(1.0), "world {world} rank {r}: {g} vs {w}");
                }
                // Every rank holds the same bits.
                assert_eq!(bits(out), bits(&outs[0]), "world {world}: rank {r} differs from rank 0");
            }
        }
    }
    Ok(())
}

#[test]
fn all_gather_concatenates_in_rank_order_on_every_dimension() -> Result<()> {
    let mut rng = Rng(12345);
    for world in 1..=4 {
        for dim in 0..3 {
            // The gathered dimension may differ between ranks.
            let inputs: Vec<Tensor> = (0..world)
                .map(|r| {
                    let mut dims = vec![2, 3, 4];
                    dims[dim] = 1 + (r + rng.below(3)) % 4;
                    Tensor::from_vec(rng.values(dims.iter().product()), dims, &Device::Cpu)
                })
                .collect::<Result<_>>()?;
            let want = Tensor::cat(&inputs, dim)?;
            let outs = run(thread::group(world), |r, c| c.all_gather(&inputs[r], dim));
            for out in &outs {
                assert_eq!(out.dims(), want.dims());
                assert_eq!(bits(out), bits(&want), "world {world} dim {dim}");
            }
        }
    }
    Ok(())
}

#[test]
fn broadcast_hands_the_roots_tensor_to_every_rank() -> Result<()> {
    let mut rng = Rng(777);
    for world in 1..=4 {
        for root in 0..world {
            let inputs: Vec<Tensor> =
                (0..world).map(|_| Tensor::from_vec(rng.values(6), (2, 3), &Device::Cpu)).collect::<Result<_>>()?;
            let outs = run(thread::group(world), |r, c| c.broadcast(&inputs[r], root));
            for out in &outs {
                assert_eq!(bits(out), bits(&inputs[root]), "world {world} root {root}");
            }
        }
    }
    Ok(())
}

#[test]
fn many_collectives_in_a_row_stay_in_step() -> Result<()> {
    // Slots are reused from one collective to the next: a rank racing ahead must not overwrite
    // what a slower rank still reads.
    for world in 2..=4 {
        let outs = run(thread::group(world), |r, c| {
            let mut acc = Vec::new();
            for i in 0..200 {
                let t = Tensor::new(&[(r * 1000 + i) as f32], &Device::Cpu)?;
                let s = c.all_reduce_sum(&t)?.to_vec1::<f32>()?[0];
                let g = c.all_gather(&t, 0)?.to_vec1::<f32>()?;
                c.barrier()?;
                acc.push((s, g));
            }
            Ok(acc)
        });
        for out in &outs {
            for (i, (s, g)) in out.iter().enumerate() {
                let want: Vec<f32> = (0..world).map(|r| (r * 1000 + i) as f32).collect();
                assert_eq!(*s, want.iter().sum::<f32>());
                assert_eq!(g, &want);
            }
        }
    }
    Ok(())
}

#[test]
fn layout_groups_reduce_over_the_right_ranks() -> Result<()> {
    for (tp, ep) in [(1, 1), (2, 1), (1, 2), (2, 2), (3, 1), (1, 4), (2, 3)] {
        let layout = Layout::new(tp, ep, None).unwrap();
        let comms = RankComms::threads(&layout);
        assert_eq!(comms.len(), tp * ep);
        let outs = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter()
                .enumerate()
                .map(|(r, c)| {
                    s.spawn(move || -> Result<(f32, f32, f32, usize, usize)> {
                        let t = Tensor::new(&[(1u32 << r) as f32], &Device::Cpu)?;
                        let w = c.world.all_reduce_sum(&t)?.to_vec1::<f32>()?[0];
                        let tpv = c.tp.all_reduce_sum(&t)?.to_vec1::<f32>()?[0];
                        let epv = c.ep.all_reduce_sum(&t)?.to_vec1::<f32>()?[0];
                        Ok((w, tpv, epv, c.tp.rank(), c.ep.rank()))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect::<Vec<_>>()
        });
        for (r, (w, tpv, epv, tr, er)) in outs.into_iter().enumerate() {
            let (e, t) = layout.coords(r);
            let mask = |ranks: Vec<usize>| ranks.iter().map(|&q| (1u32 << q) as f32).sum::<f32>();
            assert_eq!(w, mask((0..tp * ep).collect()));
            assert_eq!(tpv, mask((0..tp).map(|i| e * tp + i).collect()), "tp group of rank {r}");
            assert_eq!(epv, mask((0..ep).map(|i| i * tp + t).collect()), "ep group of rank {r}");
            assert_eq!((tr, er), (t, e));
        }
    }
    Ok(())
}

#[test]
fn an_aborting_rank_releases_the_others_and_the_group_recovers() -> Result<()> {
    let comms: Vec<Arc<dyn Communicator>> = thread::group(3).into_iter().map(|c| Arc::new(c) as _).collect();
    let results = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .enumerate()
            .map(|(r, c)| {
                s.spawn(move || {
                    if r == 1 {
                        c.abort();
                        return Err(candle_core::Error::Msg("rank 1 failed".into()));
                    }
                    c.all_reduce_sum(&Tensor::new(&[1f32], &Device::Cpu)?).map(|_| ())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    assert!(results.iter().all(|r| r.is_err()), "{results:?}");
    assert!(comms[0].recover());
    let outs = run(thread::group(1), |_, c| c.barrier());
    assert_eq!(outs.len(), 1);
    let sums = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .map(|c| s.spawn(move || c.all_reduce_sum(&Tensor::new(&[2f32], &Device::Cpu)?)?.to_vec1::<f32>()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap().unwrap()[0]).collect::<Vec<_>>()
    });
    assert_eq!(sums, vec![6.0, 6.0, 6.0]);
    Ok(())
}
