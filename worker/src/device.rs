//! Choosing the compute device. CUDA support lives in `libtorch_cuda.so`, which the linker drops
//! because nothing references it directly; it is loaded at run time before asking for a GPU.

use tch::Device;

use crate::error::{Error, Result};

/// Parses `cpu`, `cuda` or `cuda:N`, loading the CUDA library for the latter.
pub fn parse(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let index = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                Error::Config(format!("device {spec:?}: expected cpu, cuda or cuda:N"))
            })?,
        None => {
            return Err(Error::Config(format!(
                "device {spec:?}: expected cpu, cuda or cuda:N"
            )))
        }
    };
    load_cuda()?;
    let count = tch::Cuda::device_count() as usize;
    if index >= count {
        return Err(Error::Device(format!(
            "{spec} asked for, but {count} CUDA device(s) are visible"
        )));
    }
    Ok(Device::Cuda(index))
}

/// Loads `libtorch_cuda.so` once (kept loaded for the life of the process).
pub fn load_cuda() -> Result<()> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            // SAFETY: loading libtorch's own CUDA library, whose initialisers only register kernels.
            let lib = unsafe { libloading::Library::new("libtorch_cuda.so") }.map_err(|e| {
                format!("cannot load libtorch_cuda.so ({e}); put torch's lib/ folder on LD_LIBRARY_PATH or use --device cpu")
            })?;
            std::mem::forget(lib);
            if tch::Cuda::is_available() {
                Ok(())
            } else {
                Err("libtorch_cuda.so loaded but no CUDA device is available".into())
            }
        })
        .clone()
        .map_err(Error::Device)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bad_device_strings_are_explained() {
        assert_eq!(super::parse("cpu").unwrap(), tch::Device::Cpu);
        for bad in ["gpu", "cuda:x", "cuda0"] {
            let err = super::parse(bad).unwrap_err().to_string();
            assert!(err.contains("expected cpu, cuda or cuda:N"), "{err}");
        }
    }
}
