//! Reading an official `model.pkl` (the cloudpickled Flax train state of `m3ae_main`,
//! `mae_main` or `linear_main`) into plain tensors, without Python.
//!
//! * [`OfficialCheckpoint::read`] runs the safe pickle reader ([`crate::pickle`]) and walks the
//!   train state: `state.params` (and `backbone_params` / `batch_stats` of a probe), the optax
//!   state (AdamW moments and counts, LARS momentum; NamedTuples recognised by class name), the
//!   step counters and the flag set (`variant`). Tensors keep their exact bytes ([`RawTensor`]).
//! * [`OfficialCheckpoint::flat_tensors`] lays them out as the fixture's `*_expected.safetensors`
//!   (official names, `opt.mu.*`, `opt.nu.*`, `state.step`, ...).
//! * [`OfficialCheckpoint::config`], [`OfficialCheckpoint::train_config`] and
//!   [`OfficialCheckpoint::adamw_state`] map the flags and tensors onto our model config,
//!   training settings and AdamW state; [`OfficialCheckpoint::param_store`] maps the params onto
//!   our native names.
//!
//! The walk over the pickle's value graph lives in `walker`, the mapping of the flag set in
//! `flags`.

mod flags;
mod walker;

use crate::pickle::Pickle;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use m3ae_model::{param_specs, M3aeConfig, ParamStore, Unexpected, Variant};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Element type of a [`RawTensor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawDtype {
    /// bool (1 byte).
    Bool,
    /// u8.
    U8,
    /// i8.
    I8,
    /// i16.
    I16,
    /// i32.
    I32,
    /// i64.
    I64,
    /// u16.
    U16,
    /// u32.
    U32,
    /// u64.
    U64,
    /// f16.
    F16,
    /// f32.
    F32,
    /// f64.
    F64,
}

impl RawDtype {
    /// The safetensors name (`F32`, `I32`, ...).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            RawDtype::Bool => "BOOL",
            RawDtype::U8 => "U8",
            RawDtype::I8 => "I8",
            RawDtype::I16 => "I16",
            RawDtype::I32 => "I32",
            RawDtype::I64 => "I64",
            RawDtype::U16 => "U16",
            RawDtype::U32 => "U32",
            RawDtype::U64 => "U64",
            RawDtype::F16 => "F16",
            RawDtype::F32 => "F32",
            RawDtype::F64 => "F64",
        }
    }

    fn candle(self) -> Option<DType> {
        Some(match self {
            RawDtype::Bool | RawDtype::U8 => DType::U8,
            RawDtype::I16 => DType::I16,
            RawDtype::I32 => DType::I32,
            RawDtype::I64 => DType::I64,
            RawDtype::U32 => DType::U32,
            RawDtype::F16 => DType::F16,
            RawDtype::F32 => DType::F32,
            RawDtype::F64 => DType::F64,
            RawDtype::I8 | RawDtype::U16 | RawDtype::U64 => return None,
        })
    }
}

/// A tensor as stored in the checkpoint: dtype, C-order shape and little-endian bytes (exact).
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// Element type.
    pub dtype: RawDtype,
    /// Shape (empty for scalars).
    pub shape: Vec<usize>,
    /// Little-endian C-order data.
    pub data: Vec<u8>,
}

impl RawTensor {
    /// A 1-element i32 tensor of shape `[1]`.
    pub fn i32_scalar(v: i32) -> Self {
        Self {
            dtype: RawDtype::I32,
            shape: vec![1],
            data: v.to_le_bytes().to_vec(),
        }
    }

    /// The same data with shape `[1]` when it is a scalar (the layout of the expected files).
    pub fn as_vector(mut self) -> Self {
        if self.shape.is_empty() {
            self.shape = vec![1];
        }
        self
    }

    /// The single value of a one-element integer tensor.
    pub fn to_i64(&self) -> Option<i64> {
        let d = &self.data;
        match (self.dtype, d.len()) {
            (RawDtype::I32, 4) => Some(i32::from_le_bytes([d[0], d[1], d[2], d[3]]).into()),
            (RawDtype::I64, 8) => {
                let mut b = [0u8; 8];
                b.copy_from_slice(d);
                Some(i64::from_le_bytes(b))
            }
            (RawDtype::U8 | RawDtype::Bool, 1) => Some(d[0].into()),
            _ => None,
        }
    }

    /// A candle tensor on `device` (i8/u16/u64 are not supported by candle).
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let dtype = self.dtype.candle().ok_or_else(|| Error::Json {
            origin: "tensor".into(),
            msg: format!(
                "dtype {} has no candle equivalent",
                self.dtype.safetensors_name()
            ),
        })?;
        Ok(Tensor::from_raw_buffer(
            &self.data,
            dtype,
            &self.shape,
            device,
        )?)
    }
}

/// Which official script wrote the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    /// `m3ae_main` (M3AETrainState, MaskedMultimodalAutoencoder).
    M3ae,
    /// `mae_main` (MaskedAutoencoder).
    Mae,
    /// `linear_main` (LinearCLSTrainState: head, BatchNorm statistics, MAE backbone).
    Linear,
}

impl CheckpointKind {
    /// `m3ae`, `mae` or `linear`.
    pub fn name(self) -> &'static str {
        match self {
            CheckpointKind::M3ae => "m3ae",
            CheckpointKind::Mae => "mae",
            CheckpointKind::Linear => "linear",
        }
    }
}

/// The optax state: AdamW moments and counts, LARS momentum, schedule count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OptState {
    /// `ScaleByAdamState.count`.
    pub count: Option<RawTensor>,
    /// `ScaleByAdamState.mu` by official name.
    pub mu: BTreeMap<String, RawTensor>,
    /// `ScaleByAdamState.nu` by official name.
    pub nu: BTreeMap<String, RawTensor>,
    /// `TraceState.trace` (LARS momentum) by official name.
    pub trace: BTreeMap<String, RawTensor>,
    /// `ScaleByScheduleState.count`.
    pub schedule_count: Option<RawTensor>,
}

/// Everything a converter needs from an official `model.pkl`.
#[derive(Debug, Clone)]
pub struct OfficialCheckpoint {
    /// Where it was read from (for messages).
    pub origin: String,
    /// Which script wrote it.
    pub kind: CheckpointKind,
    /// The flag set (`variant`), flattened to JSON scalars.
    pub flags: serde_json::Map<String, serde_json::Value>,
    /// Top-level `step` (the loop index at save time).
    pub checkpoint_step: Option<i64>,
    /// Top-level `epoch`.
    pub checkpoint_epoch: Option<i64>,
    /// `state.step` (number of updates).
    pub state_step: Option<RawTensor>,
    /// Model params by official name (M3AE/MAE), or the probe head (`Dense_0.*`).
    pub params: BTreeMap<String, RawTensor>,
    /// Probe only: the backbone params by official name.
    pub backbone: BTreeMap<String, RawTensor>,
    /// Probe only: BatchNorm statistics (`bn.mean`, `bn.var`).
    pub batch_stats: BTreeMap<String, RawTensor>,
    /// The optimizer state, when the checkpoint has one.
    pub opt: Option<OptState>,
    /// Probe only: `best_val_acc`.
    pub best_val_acc: Option<RawTensor>,
}

impl OfficialCheckpoint {
    /// Reads and walks an official `model.pkl`.
    pub fn read(path: &Path) -> Result<Self> {
        let data = std::fs::read(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            error: e,
        })?;
        Self::from_bytes(&data, &path.display().to_string())
    }

    /// Walks the pickle bytes `data`; `origin` names them in messages.
    pub fn from_bytes(data: &[u8], origin: &str) -> Result<Self> {
        let p = Pickle::parse(data).map_err(|e| Error::Pickle {
            origin: origin.to_string(),
            cause: e,
        })?;
        Self::from_pickle(&p, origin)
    }

    /// Every tensor in the layout of the fixture's `*_expected.safetensors`: params by official
    /// name (probe: `Dense_0.*`, `backbone.*`, `batch_stats.*`), `opt.mu.*`, `opt.nu.*`,
    /// `opt.trace.*`, `opt.count`, `opt.schedule_count`, `state.step`, `checkpoint.step`,
    /// `checkpoint.epoch`, `checkpoint.best_val_acc` (scalars as shape `[1]`).
    pub fn flat_tensors(&self) -> BTreeMap<String, RawTensor> {
        let mut out = self.params.clone();
        for (k, v) in &self.backbone {
            out.insert(format!("backbone.{k}"), v.clone());
        }
        for (k, v) in &self.batch_stats {
            out.insert(format!("batch_stats.{k}"), v.clone());
        }
        if let Some(o) = &self.opt {
            for (prefix, m) in [("mu", &o.mu), ("nu", &o.nu), ("trace", &o.trace)] {
                for (k, v) in m {
                    out.insert(format!("opt.{prefix}.{k}"), v.clone());
                }
            }
            if let Some(c) = &o.count {
                out.insert("opt.count".into(), c.clone().as_vector());
            }
            if let Some(c) = &o.schedule_count {
                out.insert("opt.schedule_count".into(), c.clone().as_vector());
            }
        }
        if let Some(s) = &self.state_step {
            out.insert("state.step".into(), s.clone().as_vector());
        }
        for (k, v) in [
            ("checkpoint.step", self.checkpoint_step),
            ("checkpoint.epoch", self.checkpoint_epoch),
        ] {
            if let Some(v) = v {
                let t = match i32::try_from(v) {
                    Ok(x) => RawTensor::i32_scalar(x),
                    Err(_) => RawTensor {
                        dtype: RawDtype::I64,
                        shape: vec![1],
                        data: v.to_le_bytes().to_vec(),
                    },
                };
                out.insert(k.into(), t);
            }
        }
        if let Some(a) = &self.best_val_acc {
            out.insert("checkpoint.best_val_acc".into(), a.clone().as_vector());
        }
        out
    }

    /// The model variant of the params (probe: the backbone is an MAE).
    pub fn variant(&self) -> Variant {
        match self.kind {
            CheckpointKind::M3ae => Variant::M3ae,
            CheckpointKind::Mae | CheckpointKind::Linear => Variant::Mae,
        }
    }

    /// The official-named model params (probe: the backbone).
    pub fn model_params(&self) -> &BTreeMap<String, RawTensor> {
        match self.kind {
            CheckpointKind::Linear => &self.backbone,
            _ => &self.params,
        }
    }

    /// The model params as candle tensors under official names.
    pub fn official_tensors(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        self.model_params()
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_tensor(device)?)))
            .collect()
    }

    /// The model params as a [`ParamStore`] (native names), checked against the specs of
    /// `config`: a missing, unexpected or misshaped weight is an error that names it.
    pub fn param_store(&self, config: &M3aeConfig, device: &Device) -> Result<ParamStore> {
        let specs = param_specs(config, self.variant());
        Ok(ParamStore::from_official(
            &specs,
            self.official_tensors(device)?,
            Unexpected::Error,
            &self.origin,
            device,
        )?)
    }

    /// The probe head (`weight [C, D]`, `bias [C]`, `running_mean [D]`, `running_var [D]`).
    pub fn probe_head(&self, device: &Device) -> Result<m3ae_model::LinearProbeHead> {
        let get = |m: &BTreeMap<String, RawTensor>, k: &str| -> Result<Tensor> {
            match m.get(k) {
                Some(t) => t.to_tensor(device),
                None => Err(Error::Structure {
                    origin: self.origin.clone(),
                    key: k.into(),
                    msg: "missing probe tensor".into(),
                }),
            }
        };
        let w = get(&self.params, "Dense_0.kernel")?.t()?.contiguous()?;
        let b = get(&self.params, "Dense_0.bias")?;
        let mean = get(&self.batch_stats, "bn.mean")?;
        let var = get(&self.batch_stats, "bn.var")?;
        m3ae_model::LinearProbeHead::new(w, b, mean, var).map_err(|e| Error::Structure {
            origin: self.origin.clone(),
            key: "probe".into(),
            msg: e.to_string(),
        })
    }
}
