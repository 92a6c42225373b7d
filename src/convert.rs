//! Official checkpoints in pure Rust: reading the official M3AE / MAE / linear-probe `model.pkl`
//! (cloudpickled Flax train states) without Python, converting them to our native files, and
//! exporting our weights back under the official Flax names.
//!
//! * [`OfficialCheckpoint::read`] runs the safe pickle reader ([`m3ae_model::pickle`]) and walks
//!   the train state: `state.params` (and `backbone_params` / `batch_stats` of a probe), the optax
//!   state (AdamW moments and counts, LARS momentum; NamedTuples recognised by class name), the
//!   step counters and the flag set (`variant`). Tensors keep their exact bytes ([`RawTensor`]).
//! * [`OfficialCheckpoint::flat_tensors`] lays them out as the fixture's `*_expected.safetensors`
//!   (official names, `opt.mu.*`, `opt.nu.*`, `state.step`, ...).
//! * [`OfficialCheckpoint::config`] rebuilds the [`M3aeConfig`] from the flags and tensor shapes.
//! * [`convert_official`] writes `model.safetensors` (native names, config in the metadata under
//!   `m3ae_config`), `config.json`, optionally `optimizer.safetensors` (our AdamW state) and, for a
//!   probe, `probe.safetensors`; [`convert_official_resumable`] writes a checkpoint folder
//!   `checkpoints/step-NNNNNNNN/` that `m3ae pretrain --resume` continues at the official step
//!   with its AdamW moments; [`export_official`] writes our weights under official names.
//! * [`load_m3ae`] / [`load_mae`] accept a converted directory, a `model.safetensors` or a
//!   `model.pkl`.

use candle_core::{DType, Device, Tensor};
use m3ae_model::params::{read_safetensors, write_safetensors};
use m3ae_model::pickle::{self, Array, DtypeKind, Id, Pickle, Value};
use m3ae_model::{param_specs, M3ae, M3aeConfig, Mae, ModelType, ParamStore, Unexpected, Variant};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Errors of the converter; each names the file and, where it applies, the key or byte offset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    // The I/O error is shown in the message and deliberately not returned as `source()`:
    // printing the error with its chain (`{:#}`) would show it twice.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The pickle stream is corrupt, hostile or uses something the reader refuses.
    #[error("{origin}: {cause}")]
    Pickle {
        /// The file.
        origin: String,
        /// What the reader met, with its byte offset.
        cause: pickle::Error,
    },
    /// The pickle parsed but does not hold the expected train state.
    #[error("{origin}: `{key}`: {msg}")]
    Structure {
        /// The file.
        origin: String,
        /// The path inside the checkpoint (`state.params.encoder...`).
        key: String,
        /// What is wrong.
        msg: String,
    },
    /// Building or writing the model failed.
    #[error(transparent)]
    Model(#[from] m3ae_model::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The optimizer state does not fit.
    #[error(transparent)]
    Train(#[from] m3ae_train::Error),
    /// A checkpoint path or name that leads to no model weights.
    #[error("{name}: {msg}")]
    Checkpoint {
        /// The path or repository id as given.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// A Hugging Face Hub file could not be had (the message names the repository and file).
    #[error(transparent)]
    Data(#[from] m3ae_data::Error),
    /// JSON (de)serialisation failed.
    #[error("{origin}: {msg}")]
    Json {
        /// The file or field.
        origin: String,
        /// The message.
        msg: String,
    },
}

/// Result type of the converter.
pub type Result<T> = std::result::Result<T, Error>;

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

/// Deepest dict nesting the walk follows (the pickle itself is bounded by its reader limits).
const MAX_WALK_DEPTH: usize = 64;

struct Walker<'p, 'a> {
    p: &'p Pickle<'a>,
    origin: &'p str,
}

impl Walker<'_, '_> {
    fn err<T>(&self, key: &str, msg: impl Into<String>) -> Result<T> {
        Err(Error::Structure {
            origin: self.origin.to_string(),
            key: key.to_string(),
            msg: msg.into(),
        })
    }

    /// The attribute dict of a train-state object (its `BUILD` state), or a dict itself.
    fn fields(&self, id: Id, key: &str) -> Result<Id> {
        if self.p.dict_items(id).is_some() {
            return Ok(id);
        }
        if let Some(o) = self.p.object(id) {
            if let Some(s) = o.state {
                if self.p.dict_items(s).is_some() {
                    return Ok(s);
                }
                // (dict, slots) state of objects with __slots__.
                if let Some(t) = self.p.tuple_items(s) {
                    for &x in t {
                        if self.p.dict_items(x).is_some() {
                            return Ok(x);
                        }
                    }
                }
            }
        }
        self.err(
            key,
            format!("expected an object with fields, got {}", self.p.kind(id)),
        )
    }

    fn field(&self, dict: Id, name: &str, key: &str) -> Result<Id> {
        match self.p.dict_get(dict, name) {
            Some(v) => Ok(v),
            None => self.err(&format!("{key}.{name}"), "missing"),
        }
    }

    /// A dict with the single key `level` is replaced by its value.
    fn strip(&self, id: Id, level: &str) -> Id {
        match self.p.dict_items(id) {
            Some([(k, v)]) if self.p.as_str(*k) == Some(level) => *v,
            _ => id,
        }
    }

    fn raw(&self, a: &Array, key: &str) -> Result<RawTensor> {
        let dtype = match (&a.dtype.kind, a.dtype.itemsize) {
            (DtypeKind::Float, 2) => RawDtype::F16,
            (DtypeKind::Float, 4) => RawDtype::F32,
            (DtypeKind::Float, 8) => RawDtype::F64,
            (DtypeKind::Int, 1) => RawDtype::I8,
            (DtypeKind::Int, 2) => RawDtype::I16,
            (DtypeKind::Int, 4) => RawDtype::I32,
            (DtypeKind::Int, 8) => RawDtype::I64,
            (DtypeKind::UInt, 1) => RawDtype::U8,
            (DtypeKind::UInt, 2) => RawDtype::U16,
            (DtypeKind::UInt, 4) => RawDtype::U32,
            (DtypeKind::UInt, 8) => RawDtype::U64,
            (DtypeKind::Bool, 1) => RawDtype::Bool,
            _ => return self.err(key, format!("unsupported dtype {}", a.dtype.descr())),
        };
        let src = self.p.array_data(a);
        let size = a.dtype.itemsize;
        let mut data = src.to_vec();
        if a.dtype.big_endian && size > 1 {
            for el in data.chunks_exact_mut(size) {
                el.reverse();
            }
        }
        if a.fortran && a.shape.len() > 1 {
            data = fortran_to_c(&data, &a.shape, size);
        }
        Ok(RawTensor {
            dtype,
            shape: a.shape.clone(),
            data,
        })
    }

    fn tensor(&self, id: Id, key: &str) -> Result<RawTensor> {
        match self.p.get(id) {
            Value::Array(a) => self.raw(a, key),
            Value::Int(i) => Ok(match i32::try_from(*i) {
                Ok(v) => RawTensor {
                    dtype: RawDtype::I32,
                    shape: Vec::new(),
                    data: v.to_le_bytes().to_vec(),
                },
                Err(_) => RawTensor {
                    dtype: RawDtype::I64,
                    shape: Vec::new(),
                    data: i.to_le_bytes().to_vec(),
                },
            }),
            Value::Float(f) => Ok(RawTensor {
                dtype: RawDtype::F32,
                shape: Vec::new(),
                data: (*f as f32).to_le_bytes().to_vec(),
            }),
            _ => self.err(key, format!("expected an array, got {}", self.p.kind(id))),
        }
    }

    /// Flattens a nested dict of arrays to `prefix.a.b` names.
    fn flatten(
        &self,
        id: Id,
        prefix: &str,
        depth: usize,
        out: &mut BTreeMap<String, RawTensor>,
    ) -> Result<()> {
        if depth > MAX_WALK_DEPTH {
            return self.err(
                prefix,
                format!("nested deeper than {MAX_WALK_DEPTH} levels"),
            );
        }
        if let Some(items) = self.p.dict_items(id) {
            for &(k, v) in items {
                let Some(k) = self.p.as_str(k) else {
                    return self.err(prefix, format!("dict key is a {}", self.p.kind(k)));
                };
                let name = if prefix.is_empty() {
                    k.to_string()
                } else {
                    format!("{prefix}.{k}")
                };
                self.flatten(v, &name, depth + 1, out)?;
            }
            return Ok(());
        }
        let t = self.tensor(id, prefix)?;
        out.insert(prefix.to_string(), t);
        Ok(())
    }

    fn flat(&self, id: Id, key: &str) -> Result<BTreeMap<String, RawTensor>> {
        let mut out = BTreeMap::new();
        if self.p.dict_items(id).is_none() {
            return self.err(key, format!("expected a dict, got {}", self.p.kind(id)));
        }
        // Names are relative to `id`; messages use `key` as prefix.
        let mut rel = BTreeMap::new();
        self.flatten(id, "", 0, &mut rel).map_err(|e| match e {
            Error::Structure {
                origin,
                key: k,
                msg,
            } => Error::Structure {
                origin,
                key: format!("{key}.{k}"),
                msg,
            },
            e => e,
        })?;
        out.append(&mut rel);
        Ok(out)
    }

    fn positional(&self, id: Id) -> Vec<Id> {
        self.p
            .object(id)
            .and_then(|o| self.p.tuple_items(o.args))
            .map(|t| t.to_vec())
            .unwrap_or_default()
    }

    fn opt_walk(&self, id: Id, key: &str, depth: usize, opt: &mut OptState) -> Result<()> {
        if depth > MAX_WALK_DEPTH {
            return self.err(key, "optimizer state nested too deeply");
        }
        if let Some(items) = self.p.tuple_items(id) {
            for (i, &x) in items.iter().enumerate() {
                self.opt_walk(x, &format!("{key}[{i}]"), depth + 1, opt)?;
            }
            return Ok(());
        }
        let Some((_, name)) = self.p.class_of(id) else {
            return Ok(());
        };
        let short = name.rsplit('.').next().unwrap_or(name);
        let f = self.positional(id);
        let arg = |i: usize, field: &str| -> Result<Id> {
            match f.get(i) {
                Some(&x) => Ok(x),
                None => self.err(
                    &format!("{key}.{field}"),
                    format!("{short} has no field {i}"),
                ),
            }
        };
        let k = format!("{key}<{short}>");
        match short {
            "ScaleByAdamState" => {
                if opt.count.is_some() {
                    return self.err(&k, "more than one ScaleByAdamState");
                }
                opt.count = Some(self.tensor(arg(0, "count")?, &format!("{k}.count"))?);
                let mu = self.strip(arg(1, "mu")?, "params");
                opt.mu = self.flat(mu, &format!("{k}.mu"))?;
                let nu = self.strip(arg(2, "nu")?, "params");
                opt.nu = self.flat(nu, &format!("{k}.nu"))?;
            }
            "ScaleByScheduleState" => {
                opt.schedule_count = Some(self.tensor(arg(0, "count")?, &format!("{k}.count"))?);
            }
            "TraceState" => {
                let t = self.strip(arg(0, "trace")?, "params");
                opt.trace = self.flat(t, &format!("{k}.trace"))?;
            }
            _ if short.ends_with("State") => {
                for (i, &x) in f.iter().enumerate() {
                    self.opt_walk(x, &format!("{k}[{i}]"), depth + 1, opt)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn flag_value(&self, id: Id) -> serde_json::Value {
        use serde_json::Value as J;
        match self.p.get(id) {
            Value::None => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::Str(s) => J::String(s.clone()),
            other => J::String(format!("<{}>", other_kind(other))),
        }
    }
}

fn other_kind(v: &Value) -> &'static str {
    match v {
        Value::Tuple(_) => "tuple",
        Value::List(_) => "list",
        Value::Dict(_) | Value::FrozenDict(_) => "dict",
        Value::Array(_) => "ndarray",
        _ => "object",
    }
}

/// Reorders Fortran-order elements to C order.
fn fortran_to_c(data: &[u8], shape: &[usize], size: usize) -> Vec<u8> {
    let n: usize = shape.iter().product();
    let mut out = vec![0u8; data.len()];
    // Fortran strides (elements): first axis fastest.
    let mut fstride = vec![1usize; shape.len()];
    for k in 1..shape.len() {
        fstride[k] = fstride[k - 1] * shape[k - 1];
    }
    let mut idx = vec![0usize; shape.len()];
    for c in 0..n {
        let f: usize = idx.iter().zip(&fstride).map(|(i, s)| i * s).sum();
        out[c * size..(c + 1) * size].copy_from_slice(&data[f * size..(f + 1) * size]);
        for k in (0..shape.len()).rev() {
            idx[k] += 1;
            if idx[k] < shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    out
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

    /// Walks a parsed pickle.
    pub fn from_pickle(p: &Pickle<'_>, origin: &str) -> Result<Self> {
        let w = Walker { p, origin };
        let root = p.root();
        if p.dict_items(root).is_none() {
            return w.err("<root>", format!("expected a dict, got {}", p.kind(root)));
        }
        let int_field = |name: &str| -> Result<Option<i64>> {
            match p.dict_get(root, name) {
                None => Ok(None),
                Some(id) => match p.as_int(id) {
                    Some(i) => Ok(Some(i)),
                    None => match p.get(id) {
                        Value::Array(_) => Ok(w.tensor(id, name)?.to_i64()),
                        _ => w.err(name, format!("expected an int, got {}", p.kind(id))),
                    },
                },
            }
        };
        let checkpoint_step = int_field("step")?;
        let checkpoint_epoch = int_field("epoch")?;
        let mut flags = serde_json::Map::new();
        if let Some(v) = p.dict_get(root, "variant") {
            let Some(items) = p.dict_items(v) else {
                return w.err("variant", format!("expected a dict, got {}", p.kind(v)));
            };
            for &(k, x) in items {
                if let Some(k) = p.as_str(k) {
                    flags.insert(k.to_string(), w.flag_value(x));
                }
            }
        }
        let best_val_acc = match p.dict_get(root, "best_val_acc") {
            Some(id) => Some(w.tensor(id, "best_val_acc")?),
            None => None,
        };
        let state = w.field(root, "state", "<root>")?;
        let fields = w.fields(state, "state")?;
        let params_id = w.field(fields, "params", "state")?;
        let state_step = match p.dict_get(fields, "step") {
            Some(id) => Some(w.tensor(id, "state.step")?),
            None => None,
        };
        let (kind, params, backbone, batch_stats) = match p.dict_get(fields, "backbone_params") {
            Some(bb) => {
                let head = w.flat(w.strip(params_id, "params"), "state.params")?;
                let backbone = w.flat(w.strip(bb, "params"), "state.backbone_params")?;
                let bs = match p.dict_get(fields, "batch_stats") {
                    Some(b) => w.flat(w.strip(b, "batch_stats"), "state.batch_stats")?,
                    None => BTreeMap::new(),
                };
                (CheckpointKind::Linear, head, backbone, bs)
            }
            None => {
                let params = w.flat(w.strip(params_id, "params"), "state.params")?;
                let kind = if params.keys().any(|k| k.starts_with("text_embedding.")) {
                    CheckpointKind::M3ae
                } else {
                    CheckpointKind::Mae
                };
                (kind, params, BTreeMap::new(), BTreeMap::new())
            }
        };
        let opt = match p.dict_get(fields, "opt_state") {
            Some(id) if !matches!(p.get(id), Value::None) => {
                let mut o = OptState::default();
                w.opt_walk(id, "state.opt_state", 0, &mut o)?;
                Some(o)
            }
            _ => None,
        };
        Ok(Self {
            origin: origin.to_string(),
            kind,
            flags,
            checkpoint_step,
            checkpoint_epoch,
            state_step,
            params,
            backbone,
            batch_stats,
            opt,
            best_val_acc,
        })
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

    fn flag(&self, name: &str) -> Option<&serde_json::Value> {
        self.flags.get(name).filter(|v| !v.is_null())
    }

    fn flag_err(&self, name: &str, want: &str) -> Error {
        Error::Structure {
            origin: self.origin.clone(),
            key: format!("variant.{name}"),
            msg: format!("expected {want}, got {:?}", self.flags.get(name)),
        }
    }

    fn flag_usize(&self, name: &str) -> Result<Option<usize>> {
        match self.flag(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.flag_err(name, "a non-negative integer")),
        }
    }

    fn first_flag(&self, groups: &[String], field: &str) -> Result<Option<usize>> {
        for g in groups {
            if let Some(v) = self.flag_usize(&format!("{g}.{field}"))? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    fn flag_f64(&self, name: &str) -> Result<Option<f64>> {
        match self.flag(name) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.flag_err(name, "a number")),
        }
    }

    fn flag_bool(&self, name: &str) -> Result<Option<bool>> {
        match self.flag(name) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .or_else(|| v.as_i64().map(|i| i != 0))
                .map(Some)
                .ok_or_else(|| self.flag_err(name, "a bool")),
        }
    }

    /// Rebuilds the model config from the flag set (`m3ae.*` or `mae.*` model flags, `patch_size`,
    /// loss weights, data image size and tokenizer length) and the tensor shapes (vocabulary from
    /// the text embedding, image head width). The result is resolved and validated.
    pub fn config(&self) -> Result<M3aeConfig> {
        let prefix = match self.kind {
            CheckpointKind::M3ae => "m3ae",
            _ => "mae",
        };
        let mut c = M3aeConfig {
            model_type: None,
            ..M3aeConfig::default()
        };
        let f = |n: &str| format!("{prefix}.{n}");
        for (name, slot) in [
            ("emb_dim", &mut c.emb_dim),
            ("dec_emb_dim", &mut c.dec_emb_dim),
            ("depth", &mut c.depth),
            ("dec_depth", &mut c.dec_depth),
            ("num_heads", &mut c.num_heads),
            ("dec_num_heads", &mut c.dec_num_heads),
            ("output_head_depth", &mut c.output_head_depth),
        ] {
            if let Some(v) = self.flag_usize(&f(name))? {
                *slot = v;
            }
        }
        for (name, slot) in [
            ("mlp_ratio", &mut c.mlp_ratio),
            ("att_drop", &mut c.att_drop),
            ("drop", &mut c.drop),
            ("drop_path", &mut c.drop_path),
            ("image_mask_ratio", &mut c.image_mask_ratio),
            ("text_mask_ratio", &mut c.text_mask_ratio),
        ] {
            if let Some(v) = self.flag_f64(&f(name))? {
                *slot = v;
            }
        }
        if let Some(v) = self.flag_bool(&f("use_type_embedding"))? {
            c.use_type_embedding = v;
        }
        match self.flag(&f("model_type")) {
            None => {}
            Some(serde_json::Value::String(s)) if s.is_empty() => {}
            Some(serde_json::Value::String(s)) => {
                c.model_type = Some(ModelType::parse(s).map_err(|e| Error::Structure {
                    origin: self.origin.clone(),
                    key: format!("variant.{}", f("model_type")),
                    msg: e.to_string(),
                })?)
            }
            Some(_) => return Err(self.flag_err(&f("model_type"), "a string")),
        }
        if let Some(p) = self.flag_usize("patch_size")? {
            c.patch_size = p;
        }
        // m3ae_main: `data.*`; linear_main: `train_data.*`; mae_main: `{dataset}_data.*`.
        let mut groups = Vec::new();
        if let Some(serde_json::Value::String(d)) = self.flag("dataset") {
            groups.push(format!("{d}_data"));
        }
        groups.extend(["data", "train_data", "imagenet_data", "cc12m_data"].map(String::from));
        if let Some(s) = self.first_flag(&groups, "image_size")? {
            c.image_size = s;
        }
        if let Some(t) = self.first_flag(&groups, "tokenizer_max_length")? {
            c.text_length = t;
        }
        for (name, slot) in [
            ("image_loss_weight", &mut c.image_loss_weight),
            ("text_loss_weight", &mut c.text_loss_weight),
            (
                "unpaired_text_loss_weight",
                &mut c.unpaired_text_loss_weight,
            ),
        ] {
            if let Some(v) = self.flag_f64(name)? {
                *slot = v;
            }
        }
        for (name, slot) in [
            ("image_all_token_loss", &mut c.image_all_token_loss),
            ("text_all_token_loss", &mut c.text_all_token_loss),
        ] {
            if let Some(v) = self.flag_bool(name)? {
                *slot = v;
            }
        }
        if self.flag_bool("discretized_image")? == Some(true) {
            return Err(Error::Structure {
                origin: self.origin.clone(),
                key: "variant.discretized_image".into(),
                msg: "checkpoints trained on discretized (VQGAN token) images are not supported"
                    .into(),
            });
        }
        let mut c = c.resolved();
        let params = self.model_params();
        if let Some(t) = params.get("text_embedding.embedding") {
            if let Some(&v) = t.shape.first() {
                c.text_vocab_size = v;
            }
        }
        let head = format!("decoder_image_output.Dense_{}.kernel", c.output_head_depth);
        if let Some(&w) = params.get(&head).and_then(|t| t.shape.get(1)) {
            if w != c.patch_dim() {
                c.image_output_dim = Some(w);
            }
        }
        c.validate(self.variant() == Variant::M3ae)?;
        Ok(c)
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

    /// Our AdamW state (`m.{native}`, `v.{native}` as 1-D f32 in native layout; metadata `step`
    /// = `ScaleByAdamState.count` and `adamw` with the checkpoint's weight decay and the official
    /// b1 = 0.9, b2 = 0.95, eps = 1e-8).
    pub fn adamw_state(
        &self,
        config: &M3aeConfig,
        device: &Device,
    ) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
        let no_state = |msg: &str| Error::Structure {
            origin: self.origin.clone(),
            key: "state.opt_state".into(),
            msg: msg.into(),
        };
        let opt = self
            .opt
            .as_ref()
            .ok_or_else(|| no_state("the checkpoint has no optimizer state"))?;
        let count =
            opt.count.as_ref().and_then(|c| c.to_i64()).ok_or_else(|| {
                no_state("no AdamW state (ScaleByAdamState) with an integer count")
            })?;
        let step = u64::try_from(count).map_err(|_| no_state("negative AdamW count"))?;
        let specs = param_specs(config, self.variant());
        let mut out = HashMap::new();
        for s in &specs {
            for (prefix, m) in [("m", &opt.mu), ("v", &opt.nu)] {
                let t = m.get(&s.official).ok_or_else(|| Error::Structure {
                    origin: self.origin.clone(),
                    key: format!(
                        "opt.{}.{}",
                        if prefix == "m" { "mu" } else { "nu" },
                        s.official
                    ),
                    msg: "missing optimizer moment".into(),
                })?;
                if t.shape != s.official_shape() || t.dtype != RawDtype::F32 {
                    return Err(Error::Structure {
                        origin: self.origin.clone(),
                        key: s.official.clone(),
                        msg: format!(
                            "moment has shape {:?} / {:?}, expected {:?} / F32",
                            t.shape,
                            t.dtype,
                            s.official_shape()
                        ),
                    });
                }
                let x = t.to_tensor(device)?;
                let x = if s.transposed {
                    x.t()?.contiguous()?
                } else {
                    x
                };
                out.insert(format!("{prefix}.{}", s.name), x.flatten_all()?);
            }
        }
        let mut cfg = m3ae_train::optim::AdamWConfig::default();
        if let Some(wd) = self.flag_f64("weight_decay")? {
            cfg.weight_decay = wd;
        }
        let meta = HashMap::from([
            ("step".to_string(), step.to_string()),
            (
                "adamw".to_string(),
                serde_json::to_string(&cfg).map_err(|e| Error::Json {
                    origin: "adamw".into(),
                    msg: e.to_string(),
                })?,
            ),
        ]);
        Ok((out, meta))
    }

    /// The optimisation settings of the official run, from its flags: batch size (global),
    /// `lr_{init,peak,end}_value`, weight decay (AdamW b1 0.9, b2 0.95, eps 1e-8 as the official
    /// `adamw`), `clip_gradient`, `accumulate_grad_steps`, and the schedule length in optimiser
    /// steps: `total_steps` when given, else `epochs * int(data length / batch_size) /
    /// accumulate_grad_steps` when the flags record the data length (`{data}.length`), else the
    /// checkpoint's own step (the run is then complete: pass `--steps` to `m3ae pretrain`).
    /// Warmup is `lr_warmup_epochs` epochs; a non-zero warmup needs the epoch length (from the
    /// data length or `total_steps / epochs`) and is otherwise an error naming the flag.
    pub fn train_config(&self, total_steps: Option<u64>) -> Result<m3ae_train::TrainConfig> {
        let mut t = m3ae_train::TrainConfig::default();
        if let Some(b) = self.flag_usize("batch_size")? {
            t.batch_size = b;
        }
        for (flag, field) in [
            ("lr_init_value", &mut t.lr_init),
            ("lr_peak_value", &mut t.lr_peak),
            ("lr_end_value", &mut t.lr_end),
            ("clip_gradient", &mut t.clip_gradient),
            ("weight_decay", &mut t.adamw.weight_decay),
        ] {
            if let Some(v) = self.flag_f64(flag)? {
                *field = v;
            }
        }
        let accum = self
            .flag_usize("accumulate_grad_steps")?
            .unwrap_or(1)
            .max(1) as u64;
        t.accumulate_grad_steps = accum;
        let epochs = self.flag_usize("epochs")?.map(|e| e as u64);
        // The data config group: m3ae_main `data.*`, mae_main `{dataset}_data.*`.
        let group = match self.flag("dataset").and_then(|v| v.as_str()) {
            Some(d) => format!("{d}_data"),
            None => "data".to_string(),
        };
        let length = self.flag_usize(&format!("{group}.length"))?;
        // Loop steps (micro-batches) per epoch, as the official `int(len(dataset) / batch)`.
        let per_epoch = match (length, t.batch_size) {
            (Some(n), b) if b > 0 => Some((n / b) as u64),
            _ => match (total_steps, epochs) {
                (Some(s), Some(e)) if e > 0 => Some(s * accum / e),
                _ => None,
            },
        };
        let state_step = self
            .state_step
            .as_ref()
            .and_then(|s| s.to_i64())
            .unwrap_or(0)
            .max(0) as u64;
        t.steps = match (total_steps, per_epoch, epochs) {
            (Some(s), _, _) => s,
            (None, Some(pe), Some(e)) => pe * e / accum,
            _ => state_step,
        }
        .max(1);
        let warmup_epochs = self.flag_f64("lr_warmup_epochs")?.unwrap_or(0.0);
        if warmup_epochs > 0.0 {
            let pe = per_epoch.ok_or_else(|| Error::Structure {
                origin: self.origin.clone(),
                key: "variant.lr_warmup_epochs".into(),
                msg: "a warmup in epochs needs the epoch length, which the flags do not record: \
                      give the run's total steps (--total-steps)"
                    .into(),
            })?;
            t.warmup_steps = (warmup_epochs * pe as f64) as u64 / accum;
        }
        Ok(t)
    }

    /// The probe head (`weight [C, D]`, `bias [C]`, `running_mean [D]`, `running_var [D]`).
    pub fn probe_head(&self, device: &Device) -> Result<m3ae_eval::LinearProbeHead> {
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
        m3ae_eval::LinearProbeHead::new(w, b, mean, var).map_err(|e| Error::Structure {
            origin: self.origin.clone(),
            key: "probe".into(),
            msg: e.to_string(),
        })
    }
}

/// What [`convert_official`] wrote.
#[derive(Debug, Clone)]
pub struct Converted {
    /// Which script wrote the checkpoint.
    pub kind: CheckpointKind,
    /// The reconstructed config.
    pub config: M3aeConfig,
    /// Files written.
    pub files: Vec<PathBuf>,
    /// Number of model weights and scalars.
    pub weights: (usize, usize),
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    let io = |e| Error::Io {
        path: path.to_path_buf(),
        error: e,
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

fn json<T: serde::Serialize>(v: &T, origin: &str) -> Result<String> {
    serde_json::to_string_pretty(v).map_err(|e| Error::Json {
        origin: origin.into(),
        msg: e.to_string(),
    })
}

/// Converts an official `model.pkl` into `out_dir`: `model.safetensors` (native names; metadata
/// `m3ae_config`, `official_kind`, `official_variant`, `state_step`), `config.json`, with
/// `optimizer` also `optimizer.safetensors` (our AdamW format; M3AE/MAE only), and for a probe
/// `probe.safetensors` (`weight`, `bias`, `running_mean`, `running_var`).
pub fn convert_official(pkl: &Path, out_dir: &Path, optimizer: bool) -> Result<Converted> {
    let ckpt = OfficialCheckpoint::read(pkl)?;
    let dev = Device::Cpu;
    let config = ckpt.config()?;
    if optimizer && ckpt.kind == CheckpointKind::Linear {
        return Err(Error::Structure {
            origin: ckpt.origin.clone(),
            key: "state.opt_state".into(),
            msg:
                "a linear-probe checkpoint holds LARS state, not AdamW; convert without --optimizer"
                    .into(),
        });
    }
    let store = ckpt.param_store(&config, &dev)?;
    std::fs::create_dir_all(out_dir).map_err(|e| Error::Io {
        path: out_dir.to_path_buf(),
        error: e,
    })?;
    let cfg_json = serde_json::to_string(&config).map_err(|e| Error::Json {
        origin: "config".into(),
        msg: e.to_string(),
    })?;
    let mut meta = HashMap::from([
        ("m3ae_config".to_string(), cfg_json),
        ("official_kind".to_string(), ckpt.kind.name().to_string()),
        (
            "official_variant".to_string(),
            serde_json::Value::Object(ckpt.flags.clone()).to_string(),
        ),
    ]);
    if let Some(s) = ckpt.state_step.as_ref().and_then(|s| s.to_i64()) {
        meta.insert("state_step".into(), s.to_string());
    }
    let mut files = Vec::new();
    let model_path = out_dir.join("model.safetensors");
    store.save(&model_path, meta)?;
    files.push(model_path);
    let cfg_path = out_dir.join("config.json");
    write_text(&cfg_path, &json(&config, "config.json")?)?;
    files.push(cfg_path);
    if optimizer {
        let (t, m) = ckpt.adamw_state(&config, &dev)?;
        let p = out_dir.join("optimizer.safetensors");
        write_safetensors(&p, &t, m)?;
        files.push(p);
    }
    if ckpt.kind == CheckpointKind::Linear {
        let h = ckpt.probe_head(&dev)?;
        let t = HashMap::from([
            ("weight".to_string(), h.weight.clone()),
            ("bias".to_string(), h.bias.clone()),
            ("running_mean".to_string(), h.running_mean.clone()),
            ("running_var".to_string(), h.running_var.clone()),
        ]);
        let p = out_dir.join("probe.safetensors");
        write_safetensors(&p, &t, HashMap::new())?;
        files.push(p);
    }
    Ok(Converted {
        kind: ckpt.kind,
        weights: (store.len(), store.num_scalars()),
        config,
        files,
    })
}

/// Converts an official M3AE / MAE `model.pkl` into a resumable checkpoint
/// `out_dir/checkpoints/step-NNNNNNNN/` (NNNNNNNN = the official `state.step`, the number of
/// updates): `model.safetensors` (native names, metadata as [`convert_official`]),
/// `optimizer.safetensors` (the AdamW moments and count) and `trainer.json` (a
/// [`m3ae_train::TrainerState`]: the step, the model config, the optimisation settings of
/// [`OfficialCheckpoint::train_config`], the data position at the start of our stream with the
/// mask step of the official run, and the checkpoint's provenance under `extra.official`).
/// `m3ae pretrain --resume out_dir` continues it; evaluation commands accept `out_dir` as a run
/// directory. Returns what was written (the step folder's files).
pub fn convert_official_resumable(
    pkl: &Path,
    out_dir: &Path,
    total_steps: Option<u64>,
) -> Result<Converted> {
    let ckpt = OfficialCheckpoint::read(pkl)?;
    if ckpt.kind == CheckpointKind::Linear {
        return Err(Error::Structure {
            origin: ckpt.origin.clone(),
            key: "state".into(),
            msg: "a linear-probe checkpoint cannot be resumed as pre-training; convert it \
                  without --resumable"
                .into(),
        });
    }
    let dev = Device::Cpu;
    let config = ckpt.config()?;
    let store = ckpt.param_store(&config, &dev)?;
    let (opt_t, opt_meta) = ckpt.adamw_state(&config, &dev)?;
    let step: u64 = opt_meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .unwrap_or_default();
    if let Some(s) = ckpt.state_step.as_ref().and_then(|s| s.to_i64()) {
        if s != step as i64 {
            return Err(Error::Structure {
                origin: ckpt.origin.clone(),
                key: "state.step".into(),
                msg: format!("is {s} but the AdamW count is {step}"),
            });
        }
    }
    let train = ckpt.train_config(total_steps)?;
    let micro_step = step * train.accumulate_grad_steps;
    let position = m3ae_data::Position {
        step: micro_step,
        ..Default::default()
    };
    let to_json = |v: serde_json::Result<serde_json::Value>, what: &str| {
        v.map_err(|e| Error::Json {
            origin: what.into(),
            msg: e.to_string(),
        })
    };
    let state = m3ae_train::TrainerState {
        step,
        micro_step,
        skipped_steps: 0,
        train,
        model: config.clone(),
        data_position: to_json(serde_json::to_value(&position), "data position")?,
        extra: serde_json::json!({
            "official": {
                "source": ckpt.origin,
                "kind": ckpt.kind.name(),
                "checkpoint_step": ckpt.checkpoint_step,
                "checkpoint_epoch": ckpt.checkpoint_epoch,
                "variant": serde_json::Value::Object(ckpt.flags.clone()),
            }
        }),
    };
    let mut meta = HashMap::from([
        ("m3ae_config".to_string(), json(&config, "config")?),
        ("official_kind".to_string(), ckpt.kind.name().to_string()),
        (
            "official_variant".to_string(),
            serde_json::Value::Object(ckpt.flags.clone()).to_string(),
        ),
    ]);
    meta.insert("state_step".into(), step.to_string());
    let dir = m3ae_train::checkpoint::save(
        &out_dir.join("checkpoints"),
        step,
        (&store.tensors(), meta),
        (&opt_t, opt_meta),
        &to_json(serde_json::to_value(&state), "trainer.json")?,
    )?;
    Ok(Converted {
        kind: ckpt.kind,
        weights: (store.len(), store.num_scalars()),
        config,
        files: ["model.safetensors", "optimizer.safetensors", "trainer.json"]
            .iter()
            .map(|f| dir.join(f))
            .collect(),
    })
}

fn config_from_meta(meta: &HashMap<String, String>, path: &Path) -> Result<M3aeConfig> {
    let text = meta.get("m3ae_config").ok_or_else(|| Error::Json {
        origin: path.display().to_string(),
        msg: "no `m3ae_config` in the safetensors metadata".into(),
    })?;
    serde_json::from_str(text).map_err(|e| Error::Json {
        origin: format!("{}: m3ae_config", path.display()),
        msg: e.to_string(),
    })
}

/// Native weights of a model file or folder (or an official `model.pkl`), with its config and
/// variant; [`load_m3ae`] / [`load_mae`] build the model from them.
pub fn load_native(path: &Path, device: &Device) -> Result<(M3aeConfig, Variant, ParamStore)> {
    if path.is_file() && path.extension().is_some_and(|e| e == "pkl") {
        let ckpt = OfficialCheckpoint::read(path)?;
        let cfg = ckpt.config()?;
        let store = ckpt.param_store(&cfg, device)?;
        return Ok((cfg, ckpt.variant(), store));
    }
    let file = if path.is_dir() {
        path.join("model.safetensors")
    } else {
        path.to_path_buf()
    };
    let (tensors, meta) = read_safetensors(&file, device)?;
    let cfg = if path.is_dir() && path.join("config.json").is_file() {
        M3aeConfig::from_file(&path.join("config.json"))?
    } else {
        config_from_meta(&meta, &file)?
    };
    let variant = if tensors.contains_key("text_embedding.weight") {
        Variant::M3ae
    } else {
        Variant::Mae
    };
    let specs = param_specs(&cfg, variant);
    let store = ParamStore::from_tensors(
        &specs,
        tensors,
        Unexpected::Error,
        &file.display().to_string(),
        device,
    )?;
    Ok((cfg, variant, store))
}

/// Loads an M3AE from a converted folder, a native `model.safetensors` or an official
/// `model.pkl`.
pub fn load_m3ae(path: &Path, device: &Device) -> Result<M3ae> {
    let (cfg, variant, store) = load_native(path, device)?;
    if variant != Variant::M3ae {
        return Err(Error::Json {
            origin: path.display().to_string(),
            msg: "this is an image-only MAE checkpoint; use load_mae".into(),
        });
    }
    Ok(M3ae::new(&cfg, store)?)
}

/// Loads an MAE (or the MAE backbone of a probe) from a converted folder, a native
/// `model.safetensors` or an official `model.pkl`.
pub fn load_mae(path: &Path, device: &Device) -> Result<Mae> {
    let (cfg, variant, store) = load_native(path, device)?;
    if variant != Variant::Mae {
        return Err(Error::Json {
            origin: path.display().to_string(),
            msg: "this is a multimodal M3AE checkpoint; use load_m3ae".into(),
        });
    }
    Ok(Mae::new(&cfg, store)?)
}

/// Writes our `model.safetensors` (native names, `m3ae_config` metadata) under the official
/// Flax names and layouts (kernels `(in, out)`), with the config in the metadata.
pub fn export_official(input: &Path, output: &Path) -> Result<usize> {
    let dev = Device::Cpu;
    let (cfg, variant, store) = load_native(input, &dev)?;
    let official = store.to_official(&param_specs(&cfg, variant))?;
    let meta = HashMap::from([
        (
            "m3ae_config".to_string(),
            serde_json::to_string(&cfg).map_err(|e| Error::Json {
                origin: "config".into(),
                msg: e.to_string(),
            })?,
        ),
        ("format".to_string(), "flax-official-names".to_string()),
    ]);
    write_safetensors(output, &official, meta)?;
    Ok(official.len())
}

/// The `m3ae convert` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ConvertCommand {
    /// Convert an official `model.pkl` (M3AE, MAE or linear probe) to native safetensors.
    Official {
        /// The official checkpoint.
        pkl: PathBuf,
        /// Output folder (`model.safetensors`, `config.json`, ...).
        out_dir: PathBuf,
        /// Also write `optimizer.safetensors` (AdamW moments and step) to resume training.
        #[arg(long)]
        optimizer: bool,
        /// Write a resumable checkpoint `<out-dir>/checkpoints/step-NNNNNNNN/` (weights, AdamW
        /// state, `trainer.json`) instead, for `m3ae pretrain --resume <out-dir>` (M3AE / MAE).
        #[arg(long, conflicts_with = "optimizer")]
        resumable: bool,
        /// With `--resumable`: the run's total optimiser steps (the schedule length), when the
        /// flags saved in the checkpoint do not give it.
        #[arg(long, requires = "resumable")]
        total_steps: Option<u64>,
    },
    /// Export our `model.safetensors` (or a converted folder) under the official Flax names.
    Export {
        /// Our model file or folder.
        input: PathBuf,
        /// The safetensors file to write.
        output: PathBuf,
    },
}

/// Runs a `m3ae convert` subcommand, printing what it wrote.
pub fn run_cli(cmd: ConvertCommand) -> anyhow::Result<()> {
    match cmd {
        ConvertCommand::Official {
            pkl,
            out_dir,
            optimizer,
            resumable,
            total_steps,
        } => {
            let c = if resumable {
                convert_official_resumable(&pkl, &out_dir, total_steps)?
            } else {
                convert_official(&pkl, &out_dir, optimizer)?
            };
            println!(
                "converted {} checkpoint: {} weights, {} parameters",
                c.kind.name(),
                c.weights.0,
                c.weights.1
            );
            for f in &c.files {
                println!("wrote {}", f.display());
            }
            if resumable {
                println!(
                    "continue it with: m3ae pretrain --resume {} (plus your data config)",
                    out_dir.display()
                );
            }
        }
        ConvertCommand::Export { input, output } => {
            let n = export_official(&input, &output)?;
            println!("wrote {} ({n} tensors, official names)", output.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fortran_order_is_reordered() {
        // 2x3 array [[0,1,2],[3,4,5]] in Fortran order is 0,3,1,4,2,5.
        let f: Vec<u8> = [0u8, 3, 1, 4, 2, 5].to_vec();
        assert_eq!(fortran_to_c(&f, &[2, 3], 1), vec![0, 1, 2, 3, 4, 5]);
    }
}
