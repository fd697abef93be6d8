//! `--device`: where the model runs.
//!
//! The CPU runs on flipsketch's own kernels; CUDA and Metal run the same models on candle's
//! ops (proven against diffusers on the CPU by the f64 "device-generic" tests) and need a binary
//! built with `--features cuda` or `--features metal`, which the CI machine cannot build or run.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// A `--device` value: `auto`, `cpu`, `cuda[:N]` or `metal[:N]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceArg {
    /// The first CUDA GPU, else the first Metal GPU, else the CPU (GPUs only when compiled in).
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
    Metal(usize),
}

impl FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, ordinal) = match s.split_once(':') {
            Some((k, n)) => {
                let n = n.parse::<usize>().map_err(|_| {
                    format!("`{s}`: the GPU number after `:` must be 0, 1, ..., got `{n}`")
                })?;
                (k, Some(n))
            }
            None => (s, None),
        };
        match (kind.to_ascii_lowercase().as_str(), ordinal) {
            ("auto", None) => Ok(Self::Auto),
            ("cpu", None) => Ok(Self::Cpu),
            ("cuda", n) => Ok(Self::Cuda(n.unwrap_or(0))),
            ("metal", n) => Ok(Self::Metal(n.unwrap_or(0))),
            ("auto" | "cpu", Some(_)) => Err(format!("`{s}`: only cuda and metal take a number")),
            _ => Err(format!(
                "`{s}`: expected auto, cpu, cuda, cuda:N, metal or metal:N"
            )),
        }
    }
}

impl fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

const CUDA_BUILT: bool = cfg!(feature = "cuda");
const METAL_BUILT: bool = cfg!(feature = "metal");

impl DeviceArg {
    /// Opens the device. An explicit GPU that is not compiled in, or not there, is an error
    /// saying which; `auto` falls back to the CPU (and says so when a compiled-in GPU failed).
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => {
                if !CUDA_BUILT {
                    bail!(
                        "--device {self}: this flipsketch was built without CUDA; build it with \
                         `cargo build --release -p flipsketch-cli --features cuda` (needs the CUDA \
                         toolkit), or use --device cpu"
                    )
                }
                Device::new_cuda(n).with_context(|| format!("--device {self}: cannot open the GPU"))
            }
            Self::Metal(n) => {
                if !METAL_BUILT {
                    bail!(
                        "--device {self}: this flipsketch was built without Metal; build it with \
                         `cargo build --release -p flipsketch-cli --features metal` (macOS), or \
                         use --device cpu"
                    )
                }
                Device::new_metal(n)
                    .with_context(|| format!("--device {self}: cannot open the GPU"))
            }
            Self::Auto => {
                let built = [(Self::Cuda(0), CUDA_BUILT), (Self::Metal(0), METAL_BUILT)];
                for (gpu, _) in built.into_iter().filter(|&(_, b)| b) {
                    match gpu.open() {
                        Ok(d) => return Ok(d),
                        Err(e) => eprintln!("{e:#}; using the CPU"),
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        for (s, want) in [
            ("auto", DeviceArg::Auto),
            ("cpu", DeviceArg::Cpu),
            ("CPU", DeviceArg::Cpu),
            ("cuda", DeviceArg::Cuda(0)),
            ("cuda:1", DeviceArg::Cuda(1)),
            ("metal", DeviceArg::Metal(0)),
            ("metal:0", DeviceArg::Metal(0)),
        ] {
            assert_eq!(s.parse::<DeviceArg>(), Ok(want), "{s}");
            assert_eq!(want.to_string().parse::<DeviceArg>(), Ok(want));
        }
        for bad in ["gpu", "cuda:x", "cuda:-1", "cpu:0", "auto:1", ""] {
            let e = bad.parse::<DeviceArg>().unwrap_err();
            assert!(e.contains(&format!("`{bad}`")), "{bad}: {e}");
        }
    }

    #[test]
    fn auto_and_cpu_open_the_cpu_here() {
        assert!(DeviceArg::Cpu.open().unwrap().is_cpu());
        if !CUDA_BUILT && !METAL_BUILT {
            assert!(DeviceArg::Auto.open().unwrap().is_cpu());
        }
    }

    #[test]
    fn a_gpu_that_is_not_built_in_is_a_clear_error() {
        if !CUDA_BUILT {
            let e = format!("{:#}", DeviceArg::Cuda(0).open().unwrap_err());
            assert!(
                e.contains("built without CUDA") && e.contains("--features cuda"),
                "{e}"
            );
        }
        if !METAL_BUILT {
            let e = format!("{:#}", DeviceArg::Metal(0).open().unwrap_err());
            assert!(
                e.contains("built without Metal") && e.contains("--features metal"),
                "{e}"
            );
        }
    }
}
