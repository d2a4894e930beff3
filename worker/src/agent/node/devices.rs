//! `--devices`: which devices a node agent starts a worker for, and what `all` means on this
//! node.
//!
//! A list is `all` (every CUDA device the node has), or comma-separated `cpu`, `cuda` or
//! `cuda:N` entries of one kind: a world trains on one kind of device, and two ranks on one GPU
//! is a configuration NCCL refuses, so a CUDA device may be listed once while `cpu` may repeat.
//! CUDA devices are counted through the driver (`cuInit`, `cuDeviceGetCount`), which applies
//! `CUDA_VISIBLE_DEVICES` as every child will; the agent never creates a CUDA context, and a
//! list of CPU entries never touches CUDA at all.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{Error, Result};

/// The most workers one agent starts.
pub const MAX_DEVICES: usize = 256;

/// One device a child worker trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeDevice {
    Cpu,
    /// A CUDA device, by its index among those visible to the agent.
    Cuda(usize),
}

impl NodeDevice {
    /// The child's `--device`.
    pub fn arg(self) -> String {
        match self {
            NodeDevice::Cpu => "cpu".into(),
            NodeDevice::Cuda(i) => format!("cuda:{i}"),
        }
    }
}

/// A `--devices` value, parsed but not yet checked against the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceList {
    /// Every CUDA device of the node.
    All,
    Listed(Vec<NodeDevice>),
}

impl std::str::FromStr for DeviceList {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        if s == "all" {
            return Ok(DeviceList::All);
        }
        let usage = "give `all`, or devices separated by commas: cpu,cpu or cuda:0,cuda:1";
        let mut devices = Vec::new();
        for entry in s.split(',').map(str::trim) {
            let device = match entry {
                "" => return Err(format!("{s:?} has an empty entry; {usage}")),
                "cpu" => NodeDevice::Cpu,
                "cuda" => NodeDevice::Cuda(0),
                _ => match entry.strip_prefix("cuda:").map(str::parse::<usize>) {
                    Some(Ok(i)) => NodeDevice::Cuda(i),
                    _ => return Err(format!("{entry:?} is not a device; {usage}")),
                },
            };
            if device != NodeDevice::Cpu && devices.contains(&device) {
                return Err(format!(
                    "{} is listed twice in {s:?}; one worker per GPU (NCCL refuses two ranks on \
                     one device)",
                    device.arg()
                ));
            }
            devices.push(device);
        }
        if devices.len() > MAX_DEVICES {
            return Err(format!(
                "{} devices listed; an agent starts at most {MAX_DEVICES} workers",
                devices.len()
            ));
        }
        let kinds = devices.iter().filter(|d| **d == NodeDevice::Cpu).count();
        if kinds != 0 && kinds != devices.len() {
            return Err(format!(
                "{s:?} mixes cpu and cuda devices; the workers of a job all train on one kind \
                 (list only cpu, or only cuda devices)"
            ));
        }
        Ok(DeviceList::Listed(devices))
    }
}

impl DeviceList {
    /// The devices to start a worker for, checked against the CUDA devices this node has
    /// (`cuda_count` is asked only when a CUDA device is wanted).
    pub fn resolve(
        &self,
        cuda_count: impl FnOnce() -> std::result::Result<usize, String>,
    ) -> Result<Vec<NodeDevice>> {
        match self {
            DeviceList::All => match cuda_count() {
                Ok(n) if n > 0 => Ok((0..n.min(MAX_DEVICES)).map(NodeDevice::Cuda).collect()),
                Ok(_) => Err(no_cuda("the driver reports none")),
                Err(why) => Err(no_cuda(&why)),
            },
            DeviceList::Listed(devices) => {
                let Some(highest) = devices
                    .iter()
                    .filter_map(|d| match d {
                        NodeDevice::Cuda(i) => Some(*i),
                        NodeDevice::Cpu => None,
                    })
                    .max()
                else {
                    return Ok(devices.clone());
                };
                let visible = cuda_count().map_err(|why| no_cuda(&why))?;
                if highest >= visible {
                    return Err(Error::Device(format!(
                        "--devices asks for cuda:{highest}, but {visible} CUDA device(s) are \
                         visible to this node (indices count from 0 among the devices \
                         CUDA_VISIBLE_DEVICES leaves; `--devices all` takes every one)"
                    )));
                }
                Ok(devices.clone())
            }
        }
    }
}

fn no_cuda(why: &str) -> Error {
    Error::Device(format!(
        "no CUDA device visible ({why}); use --devices cpu,cpu (one CPU worker per entry)"
    ))
}

/// How many CUDA devices the driver shows this process, or why it cannot tell.
pub fn cuda_device_count() -> std::result::Result<usize, String> {
    use cudarc::driver::{result, sys};
    // cudarc panics when the library is missing: ask first, and catch a panic as a last resort.
    // SAFETY: only attempts to load the library.
    let present = catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
    if !present {
        return Err("the CUDA driver library libcuda.so is not installed".into());
    }
    catch_unwind(AssertUnwindSafe(|| match result::init() {
        Ok(()) => result::device::get_count()
            .map(|n| n.max(0) as usize)
            .map_err(|e| format!("cuDeviceGetCount: {e:?}")),
        Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_NO_DEVICE => Ok(0),
        Err(e) => Err(format!("cuInit: {e:?}")),
    }))
    .unwrap_or_else(|_| Err("the CUDA driver library could not be used".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> std::result::Result<DeviceList, String> {
        s.parse()
    }

    #[test]
    fn lists_parse_and_bad_ones_say_what_to_write() {
        use NodeDevice::*;
        assert_eq!(parse("all").unwrap(), DeviceList::All);
        assert_eq!(
            parse("cpu, cpu,cpu").unwrap(),
            DeviceList::Listed(vec![Cpu, Cpu, Cpu])
        );
        assert_eq!(
            parse("cuda:1,cuda:0").unwrap(),
            DeviceList::Listed(vec![Cuda(1), Cuda(0)])
        );
        assert_eq!(parse("cuda").unwrap(), DeviceList::Listed(vec![Cuda(0)]));
        for (bad, says) in [
            ("", "empty entry"),
            ("cpu,,cpu", "empty entry"),
            ("gpu", "\"gpu\" is not a device"),
            ("cuda:x", "\"cuda:x\" is not a device"),
            ("cuda:0,cuda:0", "cuda:0 is listed twice"),
            ("cuda,cuda:0", "cuda:0 is listed twice"),
            ("cpu,cuda:0", "mixes cpu and cuda"),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
        let many = vec!["cpu"; MAX_DEVICES + 1].join(",");
        assert!(parse(&many).unwrap_err().contains("at most 256"));
    }

    #[test]
    fn all_and_cuda_indices_are_checked_against_the_node() {
        let none = || Ok(0);
        let two = || Ok(2);
        let err = DeviceList::All.resolve(none).unwrap_err().to_string();
        assert!(
            err.contains("no CUDA device visible") && err.contains("use --devices cpu,cpu"),
            "{err}"
        );
        let err = DeviceList::All
            .resolve(|| Err("libcuda.so is not installed".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("libcuda.so is not installed"), "{err}");
        assert_eq!(
            DeviceList::All.resolve(two).unwrap(),
            vec![NodeDevice::Cuda(0), NodeDevice::Cuda(1)]
        );
        let err = parse("cuda:0,cuda:2")
            .unwrap()
            .resolve(two)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("asks for cuda:2, but 2 CUDA device(s)"),
            "{err}"
        );
        // CPU entries never ask the driver.
        let cpus = parse("cpu,cpu")
            .unwrap()
            .resolve(|| panic!("asked for CUDA"))
            .unwrap();
        assert_eq!(cpus, vec![NodeDevice::Cpu; 2]);
    }

    /// On a machine without a GPU `all` is the error that says what to pass, never a hang or a
    /// crash; on one with GPUs, one worker per device.
    #[test]
    fn all_answers_on_any_machine() {
        match DeviceList::All.resolve(cuda_device_count) {
            Ok(devices) => {
                println!("{} CUDA device(s) visible", devices.len());
                assert!(!devices.is_empty());
            }
            Err(e) => {
                println!("{e}");
                assert!(e.to_string().contains("no CUDA device visible"), "{e}");
            }
        }
    }
}
