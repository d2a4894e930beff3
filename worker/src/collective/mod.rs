//! Collectives for data-parallel training: the gradient all-reduce that every rank calls once per
//! optimizer step.
//!
//! One trait, [`Collective`], with three backends:
//! - [`Solo`]: world size 1, nothing to do;
//! - [`tcp::TcpRing`]: a ring all-reduce over TCP on the CPU, for development, CI and CPU-only runs;
//! - [`nccl::Nccl`]: NCCL on CUDA device memory (libnccl and the CUDA driver are loaded at run time,
//!   so the crate builds and tests on machines without either).
//!
//! A collective is owned by the one OS thread that owns the device (it is `Send`, not `Sync`).
//! Failures are final: after any error the communicator is broken and every later call returns
//! [`CollectiveError::Broken`]; recovery is a new rendezvous with a new generation, decided by the
//! coordinator. No call waits forever: a dead or hung peer surfaces as an error within the
//! configured timeout.

pub mod nccl;
pub mod tcp;

use std::time::Duration;

use tch::{Device, Kind, Tensor};

/// What can go wrong in a collective. None of these is retryable on the same communicator.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// The ranks could not be wired together: bad arguments, a rejected handshake, a peer that
    /// never showed up.
    #[error("rendezvous: {0}")]
    Rendezvous(String),

    /// A connection to a peer failed (reset, closed, refused) during a collective.
    #[error("peer rank {peer}: {source}")]
    Peer {
        peer: usize,
        #[source]
        source: std::io::Error,
    },

    /// A peer (`None`: some peer, as NCCL cannot say which) made no progress within the timeout:
    /// hung, partitioned away, or never joined.
    #[error("{} made no progress within {timeout:?}", .peer.map_or("a peer".into(), |p| format!("peer rank {p}")))]
    Timeout {
        peer: Option<usize>,
        timeout: Duration,
    },

    /// The ranks disagree about the collective being run (buffer length, sequence number).
    #[error("ranks disagree: {0}")]
    Mismatch(String),

    /// The buffer or tensor cannot be reduced by this backend (dtype, layout, device).
    #[error("invalid input: {0}")]
    Invalid(String),

    /// The backend cannot run on this machine (no libnccl, no CUDA driver, no such GPU).
    #[error("backend unavailable: {0}")]
    Unavailable(String),

    /// NCCL or the CUDA driver reported an error.
    #[error("nccl: {0}")]
    Nccl(String),

    /// libtorch failed while staging a tensor.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    /// An earlier error left this communicator unusable; rebuild it (new generation).
    #[error("communicator is broken by an earlier error; a new rendezvous is needed")]
    Broken,
}

/// A group of ranks that reduce buffers together. Every rank must make the same sequence of
/// calls with buffers of the same length.
pub trait Collective: Send {
    /// This process's rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks.
    fn world_size(&self) -> usize;

    /// Sums `buf` element-wise across all ranks, in place; every rank ends with the same values.
    /// An unreachable or dead peer is an error within the configured timeout, never a hang.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;

    /// Same for a tch tensor (f32, contiguous). The default reduces a CPU tensor in its own memory
    /// and copies any other through a host buffer; NCCL works on device memory directly.
    fn all_reduce_tensor(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        check_tensor(t)?;
        let n = t.numel();
        if n == 0 {
            // Still an operation every rank takes part in; an empty tensor may have no data.
            return self.all_reduce_sum(&mut []);
        }
        if t.device() == Device::Cpu {
            // SAFETY: `check_tensor` guarantees a contiguous f32 tensor, so its data pointer is
            // valid for `numel` consecutive, aligned f32s. We hold the only `&mut` to the handle
            // and nothing else runs on this thread until the slice is dropped.
            let buf = unsafe { std::slice::from_raw_parts_mut(t.data_ptr().cast::<f32>(), n) };
            return self.all_reduce_sum(buf);
        }
        let mut host = vec![0f32; n];
        t.f_copy_data(&mut host, n)?;
        self.all_reduce_sum(&mut host)?;
        let reduced = Tensor::f_from_slice(&host)?.f_view_as(t)?;
        t.f_copy_(&reduced)?;
        Ok(())
    }
}

/// Checks that a tensor is something every backend can reduce: f32, contiguous, dense.
pub(crate) fn check_tensor(t: &Tensor) -> Result<(), CollectiveError> {
    if t.kind() != Kind::Float {
        return Err(CollectiveError::Invalid(format!(
            "all-reduce needs an f32 tensor, got {:?}",
            t.kind()
        )));
    }
    if !t.is_contiguous() || t.is_sparse() {
        return Err(CollectiveError::Invalid(
            "all-reduce needs a dense contiguous tensor".into(),
        ));
    }
    Ok(())
}

/// The world of one: every reduction is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn all_reduce_tensor(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        check_tensor(t)
    }
}

impl From<CollectiveError> for crate::Error {
    fn from(e: CollectiveError) -> Self {
        crate::Error::Collective(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Doubles every element: what a two-rank world with identical inputs would do.
    struct Double;

    impl Collective for Double {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
            buf.iter_mut().for_each(|x| *x *= 2.0);
            Ok(())
        }
    }

    #[test]
    fn default_tensor_path_reduces_in_place_and_checks_input() {
        let mut t = Tensor::from_slice(&[1f32, 2., 3., 4.]).view([2, 2]);
        Double.all_reduce_tensor(&mut t).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(t.view([-1])).unwrap(),
            [2., 4., 6., 8.]
        );

        let mut wrong_kind = Tensor::from_slice(&[1f64]);
        let err = Double.all_reduce_tensor(&mut wrong_kind).unwrap_err();
        assert!(matches!(err, CollectiveError::Invalid(_)), "{err}");
        let mut strided = Tensor::from_slice(&[1f32, 2., 3., 4.]).view([2, 2]).tr();
        let err = Solo.all_reduce_tensor(&mut strided).unwrap_err();
        assert!(matches!(err, CollectiveError::Invalid(_)), "{err}");

        let mut buf = [1f32, 2.];
        Solo.all_reduce_sum(&mut buf).unwrap();
        assert_eq!(buf, [1., 2.]);
    }
}
