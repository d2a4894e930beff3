//! The GPU collective: NCCL all-reduce on the device memory of tch tensors, through `cudarc`.
//!
//! libnccl and the CUDA driver are loaded when first used, never at link time, so this module is
//! always compiled and costs nothing on a machine that does not use it. A missing library is an
//! [`CollectiveError::Unavailable`], not a crash (cudarc would panic; we check first, and catch
//! panics from its loader as a last resort).
//!
//! # Setup
//! Rank 0 calls [`unique_id`] and the 128 bytes travel to every rank (through the coordinator);
//! each rank then calls [`Nccl::new`] with its rank, the world size, the id and its CUDA device.
//!
//! # Streams and synchronisation
//! tch exposes no stream API, so all tch work runs on PyTorch's default stream of the device,
//! which is CUDA's legacy default stream (handle `0`). The all-reduce is enqueued on that same
//! stream: it starts after the kernels that produced the gradients, and later tch kernels start
//! after it, with no extra events. The call then waits on the host until the all-reduce has
//! completed, polling an event and NCCL's asynchronous error state; that wait is what lets a dead
//! or hung peer become an error instead of a hang (the communicator is then aborted). The cost is
//! that the host does not run ahead of the GPU across an all-reduce.
//!
//! # Timeouts
//! The communicator is created non-blocking (`ncclConfig_t::blocking = 0`), so neither its
//! initialisation (which waits for every rank) nor an enqueue (which may connect to peers) can
//! block forever. The timeout bounds initialisation and each all-reduce *including the GPU work
//! queued before it*; choose it well above a training step's compute time (minutes, as NCCL users
//! commonly do).

use std::ffi::{c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use cudarc::nccl::sys;
use tch::{Device, Tensor};

use super::{check_tensor, Collective, CollectiveError};

/// Size of an NCCL unique id.
pub const UNIQUE_ID_BYTES: usize = 128;

/// Creates the id that names a new communicator; call it on rank 0 only and share the bytes.
pub fn unique_id() -> Result<[u8; UNIQUE_ID_BYTES], CollectiveError> {
    ensure_library("nccl", || {
        // SAFETY: only attempts to load the library.
        unsafe { sys::is_culib_present() }
    })?;
    guarded("creating an NCCL unique id", || {
        let id =
            cudarc::nccl::result::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e.0))?;
        Ok(id.internal.map(|c| c as u8))
    })
}

/// One rank of an NCCL communicator on one CUDA device.
#[derive(Debug)]
pub struct Nccl {
    rank: usize,
    world_size: usize,
    device: usize,
    timeout: Duration,
    /// Null once aborted.
    comm: sys::ncclComm_t,
    /// Keeps the device's primary context (the one PyTorch uses) retained and bindable.
    ctx: Arc<CudaContext>,
    /// The legacy default stream: PyTorch's default stream.
    stream: Arc<CudaStream>,
    done: CudaEvent,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls are not concurrent;
// every call here takes `&mut self`, and the CUDA context is bound to the calling thread first.
unsafe impl Send for Nccl {}

impl Nccl {
    /// Joins the communicator named by `id` as `rank` of `world_size`, on CUDA device `device`.
    /// Waits until every rank has joined, for at most `timeout`.
    pub fn new(
        rank: usize,
        world_size: usize,
        id: &[u8; UNIQUE_ID_BYTES],
        device: usize,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        if world_size == 0 || rank >= world_size || timeout.is_zero() {
            return Err(CollectiveError::Rendezvous(format!(
                "rank {rank} of world size {world_size} with timeout {timeout:?}"
            )));
        }
        let (n, r) = (c_int::try_from(world_size), c_int::try_from(rank));
        let (Ok(n), Ok(r)) = (n, r) else {
            return Err(CollectiveError::Rendezvous(format!(
                "world size {world_size} too large"
            )));
        };
        ensure_library("cuda", || {
            // SAFETY: only attempts to load the library.
            unsafe { cudarc::driver::sys::is_culib_present() }
        })?;
        ensure_library("nccl", || {
            // SAFETY: as above.
            unsafe { sys::is_culib_present() }
        })?;
        guarded("initialising NCCL", || {
            let unavailable = |e: cudarc::driver::DriverError| {
                CollectiveError::Unavailable(format!("CUDA device {device}: {e:?}"))
            };
            // Retains the device's primary context and makes it current on this thread, which is
            // how NCCL learns the device.
            let ctx = CudaContext::new(device).map_err(unavailable)?;
            let done = ctx.new_event(None).map_err(unavailable)?;
            let stream = ctx.default_stream();
            let mut config = non_blocking_config();
            let id = sys::ncclUniqueId {
                internal: id.map(|b| b as std::ffi::c_char),
            };
            let mut comm: sys::ncclComm_t = std::ptr::null_mut();
            let deadline = Instant::now() + timeout;
            // SAFETY: `comm` and `config` are valid for writes and reads during the call.
            let res = unsafe { sys::ncclCommInitRankConfig(&mut comm, n, id, r, &mut config) };
            let mut this = Self {
                rank,
                world_size,
                device,
                timeout,
                comm,
                ctx,
                stream,
                done,
            };
            if !matches!(
                res,
                sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
            ) {
                this.abort();
                return Err(nccl_error("ncclCommInitRankConfig", res));
            }
            if let Err(e) = this.wait_ready("initialising the communicator", deadline) {
                this.abort();
                return Err(e);
            }
            tracing::debug!(rank, world_size, device, "nccl communicator ready");
            Ok(this)
        })
    }

    /// The CUDA device this communicator runs on.
    pub fn device(&self) -> Device {
        Device::Cuda(self.device)
    }

    /// Polls NCCL's asynchronous state until the last call is no longer in progress.
    fn wait_ready(&self, what: &str, deadline: Instant) -> Result<(), CollectiveError> {
        let mut polls = 0u32;
        loop {
            match self.async_state()? {
                sys::ncclResult_t::ncclSuccess => return Ok(()),
                sys::ncclResult_t::ncclInProgress => {}
                err => return Err(nccl_error(what, err)),
            }
            self.check_deadline(what, deadline)?;
            backoff(&mut polls);
        }
    }

    fn async_state(&self) -> Result<sys::ncclResult_t, CollectiveError> {
        if self.comm.is_null() {
            return Err(CollectiveError::Broken);
        }
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: `comm` is a live communicator (not aborted) and `state` is valid for writes.
        let res = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
        if res != sys::ncclResult_t::ncclSuccess {
            return Err(nccl_error("ncclCommGetAsyncError", res));
        }
        Ok(state)
    }

    fn check_deadline(&self, what: &str, deadline: Instant) -> Result<(), CollectiveError> {
        if Instant::now() >= deadline {
            tracing::warn!(rank = self.rank, what, timeout = ?self.timeout, "nccl timed out");
            return Err(CollectiveError::Timeout {
                peer: None,
                timeout: self.timeout,
            });
        }
        Ok(())
    }

    /// Sums `count` f32 at device address `ptr` in place and waits for the result.
    fn reduce(&mut self, ptr: *mut c_void, count: usize) -> Result<(), CollectiveError> {
        let deadline = Instant::now() + self.timeout;
        let driver = |e: cudarc::driver::DriverError| CollectiveError::Nccl(format!("CUDA: {e:?}"));
        self.ctx.bind_to_thread().map_err(driver)?;
        // SAFETY: `ptr` addresses `count` f32 on this communicator's device (checked by the
        // caller) and stays alive until we return, which is after the kernel has completed.
        let res = unsafe {
            sys::ncclAllReduce(
                ptr,
                ptr,
                count,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        };
        if !matches!(
            res,
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
        ) {
            return Err(nccl_error("ncclAllReduce", res));
        }
        self.wait_ready("enqueueing the all-reduce", deadline)?;
        self.done.record(&self.stream).map_err(driver)?;
        let mut polls = 0u32;
        while !self.done.try_is_complete().map_err(driver)? {
            match self.async_state()? {
                sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => {}
                err => return Err(nccl_error("all-reduce", err)),
            }
            self.check_deadline("waiting for the all-reduce", deadline)?;
            backoff(&mut polls);
        }
        Ok(())
    }

    /// Aborts the communicator (pending operations are cancelled); it cannot be used again.
    fn abort(&mut self) {
        if self.comm.is_null() {
            return;
        }
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `comm` is live, and is nulled so it is never used again.
        let res = unsafe { sys::ncclCommAbort(self.comm) };
        if res != sys::ncclResult_t::ncclSuccess {
            tracing::warn!(rank = self.rank, ?res, "ncclCommAbort failed");
        }
        self.comm = std::ptr::null_mut();
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    /// Stages the host buffer through device memory.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if self.comm.is_null() {
            return Err(CollectiveError::Broken);
        }
        crate::device::load_cuda().map_err(|e| CollectiveError::Unavailable(e.to_string()))?;
        let mut t = Tensor::f_from_slice(buf)?.f_to_device(self.device())?;
        self.all_reduce_tensor(&mut t)?;
        t.f_copy_data(buf, buf.len())?;
        Ok(())
    }

    fn all_reduce_tensor(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        if self.comm.is_null() {
            return Err(CollectiveError::Broken);
        }
        check_tensor(t)?;
        if t.device() != self.device() {
            return Err(CollectiveError::Invalid(format!(
                "tensor on {:?}, communicator on cuda:{}",
                t.device(),
                self.device
            )));
        }
        let count = t.numel();
        if count == 0 {
            return Ok(());
        }
        let result = self.reduce(t.data_ptr(), count);
        if let Err(e) = &result {
            tracing::warn!(rank = self.rank, error = %e, "nccl all-reduce failed; communicator aborted");
            self.abort();
        }
        result
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // Every operation has completed by the time a call returns, so aborting only frees.
        self.abort();
    }
}

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`. Every other field is "undefined" (NCCL's
/// default); NCCL reads at most its own `sizeof(ncclConfig_t)` bytes, so a newer struct is fine.
fn non_blocking_config() -> sys::ncclConfig_t {
    const UNDEF: c_int = c_int::MIN;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: 23000, // NCCL_VERSION(2, 30, 0): the layout cudarc's `nccl` feature binds.
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// Spins briefly, then sleeps: all-reduces of gradients take milliseconds.
fn backoff(polls: &mut u32) {
    *polls += 1;
    if *polls < 1000 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn ensure_library(
    name: &str,
    present: impl FnOnce() -> bool + std::panic::UnwindSafe,
) -> Result<(), CollectiveError> {
    match catch_unwind(present) {
        Ok(true) => Ok(()),
        _ => Err(CollectiveError::Unavailable(format!(
            "cannot load lib{name} (put the folder holding it on LD_LIBRARY_PATH, or use the tcp \
             backend)"
        ))),
    }
}

/// Runs cudarc code that may panic (a symbol missing from an older library) as an error.
fn guarded<T>(
    what: &str,
    f: impl FnOnce() -> Result<T, CollectiveError>,
) -> Result<T, CollectiveError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("panic");
        Err(CollectiveError::Unavailable(format!("{what}: {msg}")))
    })
}

fn nccl_error(what: &str, res: sys::ncclResult_t) -> CollectiveError {
    // SAFETY: both return pointers to static or library-owned NUL-terminated strings (or null).
    let text = |p: *const std::ffi::c_char| {
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    let code = text(unsafe { sys::ncclGetErrorString(res) }).unwrap_or_default();
    let last = text(unsafe { sys::ncclGetLastError(std::ptr::null_mut()) })
        .filter(|s| !s.is_empty())
        .map(|s| format!(": {s}"))
        .unwrap_or_default();
    CollectiveError::Nccl(format!("{what}: {code} ({res:?}){last}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without libnccl or a GPU (CI), every entry point is a clean error; with them
    /// (the GPU machine), a unique id can be made and a bad device index is still an error.
    #[test]
    fn missing_nccl_or_gpu_is_an_error_not_a_crash() {
        match unique_id() {
            Ok(id) => assert!(id.iter().any(|&b| b != 0)),
            Err(e) => {
                eprintln!("unique_id: {e}");
                let expected = matches!(
                    e,
                    CollectiveError::Unavailable(_) | CollectiveError::Nccl(_)
                );
                assert!(expected, "{e}");
            }
        }
        let err = Nccl::new(0, 1, &[0; UNIQUE_ID_BYTES], 4096, Duration::from_secs(5)).unwrap_err();
        eprintln!("Nccl::new on device 4096: {err}");
        assert!(matches!(err, CollectiveError::Unavailable(_)), "{err}");
        let err = Nccl::new(2, 2, &[0; UNIQUE_ID_BYTES], 0, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, CollectiveError::Rendezvous(_)), "{err}");
    }

    #[test]
    fn config_says_non_blocking_and_nothing_else() {
        let c = non_blocking_config();
        assert_eq!((c.magic, c.blocking), (0xcafe_beef, 0));
        assert_eq!(c.size, std::mem::size_of::<sys::ncclConfig_t>());
    }
}
