//! Where tensors live and in what precision the model computes: the one parser of the
//! `--device` flag and of the `device = "..."` setting ([`DeviceSpec`], [`parse_device`]), the
//! compute precision of training ([`Precision`]), and host copies ([`to_host`]).
//!
//! Values: `cpu`, `cuda` (the first GPU, `cuda:0`) and `cuda:N`. A CUDA device needs a binary
//! built with the `cuda` feature; without it the error says so and names the value. Opening the
//! same CUDA ordinal twice in one process gives the same [`Device`] (candle treats two opened
//! handles of one GPU as different devices, and would copy between them).
//!
//! ```
//! use m3ae_model::device::{parse_device, DeviceSpec, Precision};
//! assert!(parse_device("cpu")?.is_cpu());
//! assert_eq!("cuda".parse::<DeviceSpec>()?, DeviceSpec::Cuda(0));
//! assert_eq!("cuda:1".parse::<DeviceSpec>()?.to_string(), "cuda:1");
//! let e = "gpu".parse::<DeviceSpec>().unwrap_err().to_string();
//! assert!(e.contains("\"gpu\"") && e.contains("cuda:N"), "{e}");
//! # #[cfg(not(feature = "cuda"))] {
//! let e = parse_device("cuda:0").unwrap_err().to_string();
//! assert!(e.contains("cuda:0") && e.contains("without the `cuda` feature"), "{e}");
//! # }
//! // bf16 runs on the CPU too, with a one-line notice saying how this CPU computes it
//! let cpu = candle_core::Device::Cpu;
//! assert!(Precision::Bf16.check(&cpu, "train.precision").is_ok());
//! let note = Precision::Bf16.notice(&cpu, "train.precision").unwrap();
//! assert!(note.contains("train.precision = \"bf16\"") && note.contains("sum in f32"));
//! assert!(Precision::F32.notice(&cpu, "train.precision").is_none());
//! # Ok::<(), m3ae_model::Error>(())
//! ```

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A device as the user names it: `cpu`, `cuda` or `cuda:N` (see the [module docs](self)).
/// Serialised as that string, so a configuration file holds `device = "cuda:1"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    /// The host CPU.
    #[default]
    Cpu,
    /// The CUDA GPU of this ordinal.
    Cuda(usize),
}

impl DeviceSpec {
    /// Whether this is the CPU.
    pub fn is_cpu(&self) -> bool {
        matches!(self, DeviceSpec::Cpu)
    }

    /// Opens the device. A CUDA device fails with [`Error::Device`] naming the value when the
    /// binary was built without the `cuda` feature or when the GPU cannot be opened.
    pub fn open(&self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => open_cuda(*n).map_err(|msg| Error::Device {
                value: self.to_string(),
                msg,
            }),
        }
    }

    /// The spec of an opened device (`cpu` or `cuda:N`; other devices are an error).
    pub fn of(device: &Device) -> Result<Self> {
        match device.location() {
            candle_core::DeviceLocation::Cpu => Ok(DeviceSpec::Cpu),
            candle_core::DeviceLocation::Cuda { gpu_id } => Ok(DeviceSpec::Cuda(gpu_id)),
            other => Err(Error::Device {
                value: format!("{other:?}"),
                msg: "only cpu and cuda devices are supported".into(),
            }),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> std::result::Result<Device, String> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    // one handle per ordinal and process: candle gives every opened handle its own id, and two
    // handles of one GPU would not be `same_device`
    static OPENED: OnceLock<Mutex<HashMap<usize, Device>>> = OnceLock::new();
    let mut opened = OPENED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(d) = opened.get(&ordinal) {
        return Ok(d.clone());
    }
    let d = Device::new_cuda(ordinal).map_err(|e| format!("cannot open the GPU: {e}"))?;
    opened.insert(ordinal, d.clone());
    Ok(d)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> std::result::Result<Device, String> {
    Err("this binary was built without the `cuda` feature (rebuild with `--features cuda`)".into())
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |msg: &str| Error::Device {
            value: s.to_string(),
            msg: msg.to_string(),
        };
        match s.trim() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            t => match t.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map(DeviceSpec::Cuda)
                    .map_err(|_| bad("the GPU ordinal after `cuda:` must be a number")),
                None => Err(bad("expected cpu, cuda or cuda:N")),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

/// Parses a `--device` value (`cpu`, `cuda`, `cuda:N`) and opens the device; errors name the
/// value (see [`DeviceSpec::open`]).
pub fn parse_device(s: &str) -> Result<Device> {
    s.parse::<DeviceSpec>()?.open()
}

/// A host (CPU) copy of `t` (`t` itself when it is already on the CPU): what files, metrics and
/// images are written from.
pub fn to_host(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_device(&Device::Cpu)?)
}

/// The compute precision of training (`train.precision`). Master weights, optimiser state,
/// LayerNorm and softmax statistics and the losses stay f32 either way; checkpoints are f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32 (the default).
    #[default]
    F32,
    /// The dense layers' matmuls in bf16 (inputs and weights cast to bf16, the product cast
    /// back to f32; see [`crate::layers::Dense`]). On CUDA this is the fast path; on the CPU
    /// it runs on AMX or AVX512-BF16 where the CPU has them, else at about f32 speed
    /// ([`Precision::notice`]).
    Bf16,
}

impl Precision {
    /// The dtype the dense layers' matmuls run in.
    pub fn matmul_dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }

    /// Whether training on `device` supports this precision; the error names `setting` (e.g.
    /// `train.precision`). bf16 runs on CUDA devices and on the CPU (see
    /// [`Precision::notice`]), not on other devices.
    pub fn check(self, device: &Device, setting: &str) -> Result<()> {
        match (self, device.is_cuda() || device.is_cpu()) {
            (Precision::F32, _) | (Precision::Bf16, true) => Ok(()),
            (Precision::Bf16, false) => Err(Error::Precision(format!(
                "{setting} = \"bf16\" is not supported on this device (bf16 runs on CUDA \
                 devices and the CPU): use \"f32\""
            ))),
        }
    }

    /// The one-line notice a run at this precision on `device` should print, if any: bf16 on
    /// the CPU, saying what computes it. The dense layers' products (in the one-op transformer
    /// blocks and the fused dense layers) run with bf16 operands and f32 sums
    /// (`m3ae_kernels::fused::bf16`): on AMX tiles or `VDPBF16PS` where the CPU has AMX-BF16 or
    /// AVX512-BF16, otherwise with the operands rounded to bf16 and multiplied in f32, which
    /// gives bf16 numerics at about f32 speed (a way to check a bf16 recipe on any CPU).
    pub fn notice(self, device: &Device, setting: &str) -> Option<String> {
        use m3ae_kernels::fused::bf16;
        (self == Precision::Bf16 && device.is_cpu()).then(|| {
            let how = match bf16::backend() {
                bf16::Backend::Amx => "on the CPU's AMX tiles",
                bf16::Backend::Avx512Bf16 => "on the CPU's AVX512-BF16 instructions",
                _ => {
                    "emulated in f32 arithmetic (no AMX or AVX512-BF16 kernel runs here), at \
                     about f32 speed"
                }
            };
            format!(
                "{setting} = \"bf16\" on the CPU: the dense layers' products take bf16 \
                 operands and sum in f32, {how} (m3ae_kernels::fused::bf16)"
            )
        })
    }
}

impl FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(Error::Precision(format!(
                "precision {other:?}: expected f32 or bf16"
            ))),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_as_strings_and_bad_values_are_named() {
        for (s, d) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:0", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            assert_eq!(s.parse::<DeviceSpec>().unwrap(), d, "{s}");
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(serde_json::from_str::<DeviceSpec>(&json).unwrap(), d);
        }
        for bad in ["", "gpu", "cuda:", "cuda:x", "CPU", "cuda:-1"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        let e = serde_json::from_str::<DeviceSpec>("\"tpu\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tpu"), "{e}");
        assert_eq!(DeviceSpec::of(&Device::Cpu).unwrap(), DeviceSpec::Cpu);
        assert!(parse_device(" cpu ").unwrap().is_cpu());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_so() {
        for v in ["cuda", "cuda:2"] {
            let e = parse_device(v).unwrap_err().to_string();
            assert!(e.contains("without the `cuda` feature"), "{e}");
            assert!(e.contains("cuda:"), "{e}");
        }
    }

    #[test]
    fn precision_parses_serialises_and_is_checked_per_device() {
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert_eq!(Precision::default(), Precision::F32);
        assert_eq!(serde_json::to_string(&Precision::Bf16).unwrap(), "\"bf16\"");
        let e = "fp16".parse::<Precision>().unwrap_err().to_string();
        assert!(e.contains("fp16") && e.contains("bf16"), "{e}");
        for p in [Precision::F32, Precision::Bf16] {
            assert!(p.check(&Device::Cpu, "--precision").is_ok(), "{p}");
        }
        let n = Precision::Bf16.notice(&Device::Cpu, "--precision").unwrap();
        assert!(
            n.starts_with("--precision = \"bf16\"") && !n.contains('\n'),
            "{n}"
        );
        assert_eq!(Precision::Bf16.matmul_dtype(), DType::BF16);
    }

    #[test]
    fn host_copies_of_host_tensors_are_the_tensor() {
        let t = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let h = to_host(&t).unwrap();
        assert_eq!(h.to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
        assert!(h.device().is_cpu());
    }
}
