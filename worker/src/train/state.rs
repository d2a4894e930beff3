//! The trainer's state as a whole: its digest (so the coordinator can tell which ranks hold
//! the committed state) and taking another rank's state over the collective (`SyncState`).

use stagecoach_core::plan::fnv;
use tch::{Kind, Tensor};

use super::reduce::{all_reduce, flatten, for_each_bucket};
use super::Trainer;
use crate::collective::Collective;
use crate::error::{Error, Result};

impl Trainer {
    /// A digest of the state: the optimizer's step count and, per parameter in name order, the
    /// sum of its values in f64. Equal on ranks holding bit-identical parameters on the same
    /// kind of device (data-parallel ranks do: they apply the same update), different after
    /// any step, so a rank that missed steps or trained another lineage stands out.
    pub fn state_digest(&self) -> Result<u64> {
        let mut h = fnv::bytes(fnv::OFFSET, &self.optimizer.step_count().to_le_bytes());
        let sums = tch::no_grad(|| -> Result<Vec<f64>> {
            let sums: Vec<Tensor> = self
                .optimizer
                .params()
                .iter()
                .map(|p| p.param.f_sum(Kind::Double))
                .collect::<std::result::Result<_, _>>()?;
            if sums.is_empty() {
                return Ok(vec![]);
            }
            let all = Tensor::f_stack(&sums, 0)?.f_to_device(tch::Device::Cpu)?;
            Ok(Vec::<f64>::try_from(&all)?)
        })?;
        for s in sums {
            h = fnv::bytes(h, &s.to_bits().to_le_bytes());
        }
        Ok(h)
    }

    /// Every rank calls this together: afterwards each holds the parameters, AdamW moments and
    /// step count of rank `source` (a sum over ranks where only the source contributes).
    pub fn take_state(&mut self, comm: &mut dyn Collective, source: usize) -> Result<()> {
        if source >= comm.world_size() {
            return Err(Error::Collective(format!(
                "asked to take the state of rank {source} in a world of {}",
                comm.world_size()
            )));
        }
        let mine = comm.rank() == source;
        let mut steps = Tensor::from_slice(&[if mine {
            self.optimizer.step_count() as f64
        } else {
            0.0
        }])
        .to_kind(Kind::Float);
        comm.all_reduce_tensor(&mut steps)
            .map_err(|e| Error::Collective(e.to_string()))?;
        let steps = steps.double_value(&[0]);
        if !(steps.is_finite() && steps >= 0.0 && steps.fract() == 0.0) {
            return Err(Error::Collective(format!(
                "the source rank's step count arrived as {steps}"
            )));
        }
        let tensors: Vec<Tensor> = self
            .optimizer
            .params()
            .iter()
            .flat_map(|p| {
                [
                    p.param.shallow_clone(),
                    p.exp_avg.shallow_clone(),
                    p.exp_avg_sq.shallow_clone(),
                ]
            })
            .collect();
        tch::no_grad(|| {
            for_each_bucket(&tensors, |group| {
                let flat = flatten(group, |t| {
                    if mine {
                        t.detach().to_kind(Kind::Float)
                    } else {
                        t.zeros_like().to_kind(Kind::Float)
                    }
                });
                all_reduce(comm, flat, group)
            })
        })?;
        self.optimizer.set_step_count(steps as u64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::collective::tcp::{TcpConfig, TcpRing};
    use crate::collective::Solo;
    use crate::train::{fixtures, Guard, Shape, Trainer};
    use std::net::TcpListener;
    use tch::Tensor;

    fn step(t: &mut Trainer, i: u64) {
        let o = (i * 16) % 112;
        let samples = [(0, o), (0, o + 8), (1, (i * 4) % 16), (1, (i * 4) % 16 + 1)];
        t.step(
            &samples,
            Shape::new(16, 2).unwrap(),
            4,
            1e-2,
            Guard::default(),
            &mut Solo,
        )
        .unwrap();
    }

    fn state(t: &Trainer) -> Vec<Tensor> {
        t.optimizer()
            .params()
            .iter()
            .flat_map(|p| [p.param.copy(), p.exp_avg.copy(), p.exp_avg_sq.copy()])
            .collect()
    }

    fn same(a: &[Tensor], b: &[Tensor]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.equal(y))
    }

    #[test]
    fn the_digest_follows_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let spec = fixtures::job(dir.path());
        let (mut a, mut b) = (
            Trainer::new(&spec, tch::Device::Cpu).unwrap(),
            Trainer::new(&spec, tch::Device::Cpu).unwrap(),
        );
        assert_eq!(a.state_digest().unwrap(), b.state_digest().unwrap());
        step(&mut a, 0);
        assert_ne!(a.state_digest().unwrap(), b.state_digest().unwrap());
        step(&mut b, 0);
        assert_eq!(a.state_digest().unwrap(), b.state_digest().unwrap());
        // Back to the start: the digest of a fresh trainer.
        step(&mut a, 1);
        a.reinitialize().unwrap();
        let fresh = Trainer::new(&spec, tch::Device::Cpu).unwrap();
        assert!(same(&state(&a), &state(&fresh)));
        assert_eq!(a.state_digest().unwrap(), fresh.state_digest().unwrap());
    }

    /// Rank 1 trained three steps, rank 0 one: after the sync both hold rank 1's parameters,
    /// moments and step count.
    #[test]
    fn a_rank_takes_the_state_of_another() {
        let dir = tempfile::tempdir().unwrap();
        let spec = fixtures::job(dir.path());
        let ls: Vec<TcpListener> = (0..2)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<_> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
        let ranks: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (spec, addrs) = (spec.clone(), addrs.clone());
                std::thread::spawn(move || {
                    let cfg = TcpConfig::new(1, std::time::Duration::from_secs(30));
                    let mut ring =
                        TcpRing::connect(rank, 2, l, addrs[(rank + 1) % 2], cfg).unwrap();
                    let mut t = Trainer::new(&spec, tch::Device::Cpu).unwrap();
                    for i in 0..(1 + 2 * rank as u64) {
                        step(&mut t, i);
                    }
                    t.take_state(&mut ring, 1).unwrap();
                    (
                        state(&t),
                        t.optimizer().step_count(),
                        t.state_digest().unwrap(),
                    )
                })
            })
            .collect();
        let out: Vec<_> = ranks.into_iter().map(|r| r.join().unwrap()).collect();
        assert!(same(&out[0].0, &out[1].0));
        assert_eq!((out[0].1, out[1].1), (3, 3));
        assert_eq!(out[0].2, out[1].2);
        let mut t = Trainer::new(&spec, tch::Device::Cpu).unwrap();
        assert!(
            t.take_state(&mut Solo, 1).is_err(),
            "no rank 1 in a world of 1"
        );
    }
}
