//! Parameters: the list of every weight of a model (native name, shape, initialiser and official
//! Flax name), seeded initialisation, strict loading, safetensors I/O and the official name mapping.
//!
//! [`param_specs`] is the single source of truth: initialisation, loading, the official mapping
//! and the parameter count are all derived from it. Native names are chosen for readability
//! (`encoder.blocks.0.attn.qkv.weight`, dense weights stored `(out, in)` as candle's `Linear`);
//! official names are the Flax paths (`encoder.Block_0.Attention_0.Dense_0.kernel`, kernels
//! stored `(in, out)`).

use crate::config::M3aeConfig;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal, Uniform};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Which model: the multimodal M3AE or the image-only MAE (in configurations `"m3ae"` /
/// `"mae"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// Image + text (`MaskedMultimodalAutoencoder`).
    #[default]
    M3ae,
    /// Image only (`MaskedAutoencoder`).
    Mae,
}

/// How a weight is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// Normal with mean 0 and this standard deviation.
    Normal(f64),
    /// Xavier (Glorot) uniform with these fans: `U(-a, a)`, `a = sqrt(6 / (fan_in + fan_out))`.
    XavierUniform {
        /// Input width of the dense layer.
        fan_in: usize,
        /// Output width of the dense layer.
        fan_out: usize,
    },
    /// Flax's default dense-kernel initialiser `lecun_normal`: a normal truncated to two
    /// standard deviations, rescaled so that the variance is `1 / fan_in`.
    LecunNormal {
        /// Input width of the dense layer.
        fan_in: usize,
    },
}

/// One weight of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    /// Native name (`encoder.blocks.0.attn.qkv.weight`).
    pub name: String,
    /// Native shape (dense weights `(out, in)`).
    pub shape: Vec<usize>,
    /// Initialiser.
    pub init: Init,
    /// Official Flax name (`encoder.Block_0.Attention_0.Dense_0.kernel`).
    pub official: String,
    /// True when the official tensor is the transpose of the native one (dense kernels).
    pub transposed: bool,
}

impl ParamSpec {
    /// Number of scalars.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The shape of the official tensor.
    pub fn official_shape(&self) -> Vec<usize> {
        if self.transposed {
            vec![self.shape[1], self.shape[0]]
        } else {
            self.shape.clone()
        }
    }
}

struct Specs(Vec<ParamSpec>);

impl Specs {
    fn push(&mut self, name: &str, shape: &[usize], init: Init, official: &str) {
        self.0.push(ParamSpec {
            name: name.into(),
            shape: shape.to_vec(),
            init,
            official: official.into(),
            transposed: false,
        });
    }

    /// Dense layer `inp -> out`: native `{name}.weight (out, in)` / `{name}.bias`,
    /// official `{official}.kernel (in, out)` / `{official}.bias`.
    fn dense(&mut self, name: &str, official: &str, inp: usize, out: usize) {
        self.0.push(ParamSpec {
            name: format!("{name}.weight"),
            shape: vec![out, inp],
            init: Init::XavierUniform {
                fan_in: inp,
                fan_out: out,
            },
            official: format!("{official}.kernel"),
            transposed: true,
        });
        self.push(
            &format!("{name}.bias"),
            &[out],
            Init::Zeros,
            &format!("{official}.bias"),
        );
    }

    fn norm(&mut self, name: &str, official: &str, dim: usize) {
        self.push(
            &format!("{name}.weight"),
            &[dim],
            Init::Ones,
            &format!("{official}.scale"),
        );
        self.push(
            &format!("{name}.bias"),
            &[dim],
            Init::Zeros,
            &format!("{official}.bias"),
        );
    }

    fn transformer(&mut self, name: &str, depth: usize, dim: usize, mlp: usize) {
        for i in 0..depth {
            let n = format!("{name}.blocks.{i}");
            let o = format!("{name}.Block_{i}");
            self.norm(&format!("{n}.norm1"), &format!("{o}.LayerNorm_0"), dim);
            self.dense(
                &format!("{n}.attn.qkv"),
                &format!("{o}.Attention_0.Dense_0"),
                dim,
                3 * dim,
            );
            self.dense(
                &format!("{n}.attn.proj"),
                &format!("{o}.Attention_0.Dense_1"),
                dim,
                dim,
            );
            self.norm(&format!("{n}.norm2"), &format!("{o}.LayerNorm_1"), dim);
            self.dense(
                &format!("{n}.mlp.fc1"),
                &format!("{o}.TransformerMLP_0.fc1"),
                dim,
                mlp,
            );
            self.dense(
                &format!("{n}.mlp.fc2"),
                &format!("{o}.TransformerMLP_0.fc2"),
                mlp,
                dim,
            );
        }
        self.norm(&format!("{name}.norm"), &format!("{name}.LayerNorm_0"), dim);
    }

    fn head(&mut self, name: &str, official: &str, depth: usize, dim: usize, out: usize) {
        if depth > 0 {
            self.norm(
                &format!("{name}.norm_in"),
                &format!("{official}.LayerNorm_0"),
                dim,
            );
            for j in 0..depth {
                self.dense(
                    &format!("{name}.layers.{j}.fc"),
                    &format!("{official}.Dense_{j}"),
                    dim,
                    dim,
                );
                self.norm(
                    &format!("{name}.layers.{j}.norm"),
                    &format!("{official}.LayerNorm_{}", j + 1),
                    dim,
                );
            }
        }
        self.dense(
            &format!("{name}.out"),
            &format!("{official}.Dense_{depth}"),
            dim,
            out,
        );
    }
}

/// Every weight of the model `variant` built from `cfg` (the config is resolved first), in a
/// fixed order (the order of initialisation).
pub fn param_specs(cfg: &M3aeConfig, variant: Variant) -> Vec<ParamSpec> {
    let c = cfg.resolved();
    let (d, dd) = (c.emb_dim, c.dec_emb_dim);
    let text = variant == Variant::M3ae;
    let mut s = Specs(Vec::new());
    let tok = Init::Normal(0.02);
    s.push("cls_token", &[1, 1, d], tok, "cls_token");
    s.dense("image_embedding", "image_embedding", c.patch_dim(), d);
    if text {
        s.push(
            "text_embedding.weight",
            &[c.text_vocab_size, d],
            Init::Normal(1.0),
            "text_embedding.embedding",
        );
    }
    if c.use_type_embedding {
        s.push(
            "encoder.image_type_embedding",
            &[1, 1, d],
            tok,
            "encoder_image_type_embedding",
        );
        if text {
            s.push(
                "encoder.text_type_embedding",
                &[1, 1, d],
                tok,
                "encoder_text_type_embedding",
            );
        }
        s.push(
            "decoder.image_type_embedding",
            &[1, 1, dd],
            tok,
            "decoder_image_type_embedding",
        );
        if text {
            s.push(
                "decoder.text_type_embedding",
                &[1, 1, dd],
                tok,
                "decoder_text_type_embedding",
            );
        }
    }
    s.push(
        "decoder.image_mask_embedding",
        &[1, 1, dd],
        tok,
        "image_mask_embedding",
    );
    if text {
        s.push(
            "decoder.text_mask_embedding",
            &[1, 1, dd],
            tok,
            "text_mask_embedding",
        );
    }
    s.transformer("encoder", c.depth, d, c.mlp_dim(d));
    s.dense(
        "decoder.input_projection",
        "decoder_input_projection",
        d,
        dd,
    );
    s.transformer("decoder", c.dec_depth, dd, c.mlp_dim(dd));
    s.head(
        "decoder.image_head",
        "decoder_image_output",
        c.output_head_depth,
        dd,
        c.image_output_dim(),
    );
    if text {
        s.head(
            "decoder.text_head",
            "decoder_text_output",
            c.output_head_depth,
            dd,
            c.text_vocab_size,
        );
    }
    s.0
}

/// Total number of scalars in the model.
///
/// ```
/// use m3ae_model::{param_count, M3aeConfig, Variant};
/// let base = M3aeConfig::preset("base").unwrap();
/// assert_eq!((param_count(&base, Variant::M3ae) as f64 / 1e6 * 10.0).round(), 1508.0);
/// ```
pub fn param_count(cfg: &M3aeConfig, variant: Variant) -> usize {
    param_specs(cfg, variant).iter().map(|s| s.numel()).sum()
}

/// The official no-decay list of `variant` (`no_decay_list()` of the Flax model): a weight is
/// decayed in pre-training unless a component of its official path is in it. The lists differ:
/// MAE's leaves `decoder_image_type_embedding` decayed.
///
/// ```
/// use m3ae_model::{params::no_decay_list, Variant};
/// assert!(no_decay_list(Variant::M3ae).contains(&"decoder_image_type_embedding"));
/// assert!(!no_decay_list(Variant::Mae).contains(&"decoder_image_type_embedding"));
/// assert!(no_decay_list(Variant::Mae).contains(&"bias"));
/// ```
pub fn no_decay_list(variant: Variant) -> &'static [&'static str] {
    const M3AE: [&str; 10] = [
        "cls_token",
        "encoder_image_type_embedding",
        "encoder_text_type_embedding",
        "decoder_image_type_embedding",
        "decoder_text_type_embedding",
        "image_mask_embedding",
        "text_mask_embedding",
        "text_embedding",
        "bias",
        "embedding",
    ];
    const MAE: [&str; 4] = [
        "cls_token",
        "encoder_image_type_embedding",
        "image_mask_embedding",
        "bias",
    ];
    match variant {
        Variant::M3ae => &M3AE,
        Variant::Mae => &MAE,
    }
}

/// Official name -> native name, for a model's specs.
pub fn official_to_native(specs: &[ParamSpec], official: &str) -> Option<String> {
    specs
        .iter()
        .find(|s| s.official == official)
        .map(|s| s.name.clone())
}

/// Native name -> official name, for a model's specs.
pub fn native_to_official(specs: &[ParamSpec], native: &str) -> Option<String> {
    specs
        .iter()
        .find(|s| s.name == native)
        .map(|s| s.official.clone())
}

/// What to do with tensors of a file that the model does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unexpected {
    /// An unexpected tensor is an error that names it.
    Error,
    /// Unexpected tensors are ignored (e.g. an M3AE checkpoint loaded into an MAE backbone, as
    /// the official linear probe does).
    Ignore,
}

/// The trainable weights of one model, by native name, in a deterministic (sorted) order.
#[derive(Debug, Clone)]
pub struct ParamStore {
    vars: BTreeMap<String, Var>,
    device: Device,
}

impl ParamStore {
    /// Initialises every weight of `specs` from `seed` (ChaCha8 stream, drawn in spec order).
    pub fn init(specs: &[ParamSpec], seed: u64, device: &Device) -> Result<Self> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut vars = BTreeMap::new();
        for s in specs {
            let n = s.numel();
            let values: Vec<f32> = match s.init {
                Init::Zeros => vec![0.0; n],
                Init::Ones => vec![1.0; n],
                Init::Normal(std) => {
                    let dist = Normal::new(0.0, std).map_err(|e| Error::Shape(e.to_string()))?;
                    (0..n).map(|_| dist.sample(&mut rng) as f32).collect()
                }
                Init::XavierUniform { fan_in, fan_out } => {
                    let a = (6.0 / (fan_in + fan_out) as f64).sqrt();
                    let dist = Uniform::new(-a, a).map_err(|e| Error::Shape(e.to_string()))?;
                    (0..n).map(|_| dist.sample(&mut rng) as f32).collect()
                }
                Init::LecunNormal { fan_in } => {
                    // jax's `truncated_normal(-2, 2)` has standard deviation 0.8796...;
                    // flax divides it out so the kernel's variance is exactly 1 / fan_in.
                    let std = (1.0 / fan_in.max(1) as f64).sqrt() / 0.879_625_661_034_239_8;
                    (0..n)
                        .map(|_| loop {
                            let z: f64 = rng.sample(rand_distr::StandardNormal);
                            if z.abs() < 2.0 {
                                break (z * std) as f32;
                            }
                        })
                        .collect()
                }
            };
            let t = Tensor::from_vec(values, s.shape.as_slice(), device)?;
            vars.insert(s.name.clone(), Var::from_tensor(&t)?);
        }
        Ok(Self {
            vars,
            device: device.clone(),
        })
    }

    /// Builds a store from native-named tensors, checking that each spec is present with its
    /// shape (converted to f32 on `device`). `source` names the origin in error messages.
    pub fn from_tensors(
        specs: &[ParamSpec],
        mut tensors: HashMap<String, Tensor>,
        unexpected: Unexpected,
        source: &str,
        device: &Device,
    ) -> Result<Self> {
        let mut vars = BTreeMap::new();
        for s in specs {
            let t = tensors
                .remove(&s.name)
                .ok_or_else(|| Error::MissingWeight {
                    name: s.name.clone(),
                    origin: source.into(),
                })?;
            if t.dims() != s.shape.as_slice() {
                return Err(Error::WeightShape {
                    name: s.name.clone(),
                    expected: s.shape.clone(),
                    got: t.dims().to_vec(),
                    origin: source.into(),
                });
            }
            let t = t.to_dtype(DType::F32)?.to_device(device)?;
            vars.insert(s.name.clone(), Var::from_tensor(&t)?);
        }
        if unexpected == Unexpected::Error {
            if let Some(name) = tensors.keys().min() {
                return Err(Error::UnexpectedWeight {
                    name: name.clone(),
                    origin: source.into(),
                });
            }
        }
        Ok(Self {
            vars,
            device: device.clone(),
        })
    }

    /// Builds a store from official (Flax-named, kernels `(in, out)`) tensors.
    pub fn from_official(
        specs: &[ParamSpec],
        mut tensors: HashMap<String, Tensor>,
        unexpected: Unexpected,
        source: &str,
        device: &Device,
    ) -> Result<Self> {
        let mut native = HashMap::new();
        for s in specs {
            let t = tensors
                .remove(&s.official)
                .ok_or_else(|| Error::MissingWeight {
                    name: s.official.clone(),
                    origin: source.into(),
                })?;
            if t.dims() != s.official_shape().as_slice() {
                return Err(Error::WeightShape {
                    name: s.official.clone(),
                    expected: s.official_shape(),
                    got: t.dims().to_vec(),
                    origin: source.into(),
                });
            }
            let t = if s.transposed {
                t.t()?.contiguous()?
            } else {
                t
            };
            native.insert(s.name.clone(), t);
        }
        if unexpected == Unexpected::Error {
            if let Some(name) = tensors.keys().min() {
                return Err(Error::UnexpectedWeight {
                    name: name.clone(),
                    origin: source.into(),
                });
            }
        }
        Self::from_tensors(specs, native, Unexpected::Error, source, device)
    }

    /// The weights under their official names and layouts.
    pub fn to_official(&self, specs: &[ParamSpec]) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for s in specs {
            let t = self.get(&s.name)?;
            let t = if s.transposed {
                t.t()?.contiguous()?
            } else {
                t
            };
            out.insert(s.official.clone(), t);
        }
        Ok(out)
    }

    /// The tensor of weight `name` (shares storage with the trainable variable).
    pub fn get(&self, name: &str) -> Result<Tensor> {
        self.var(name).map(|v| v.as_tensor().clone())
    }

    /// The trainable variable of weight `name`.
    pub fn var(&self, name: &str) -> Result<&Var> {
        self.vars.get(name).ok_or_else(|| Error::MissingWeight {
            name: name.into(),
            origin: "parameter store".into(),
        })
    }

    /// All `(name, variable)` pairs in name order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of weights.
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// True when the store holds no weight.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// Total number of scalars.
    pub fn num_scalars(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Native-named tensors (a snapshot sharing storage with the variables).
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Writes the weights to a safetensors file atomically (temporary file in the same folder,
    /// fsync, rename), with `metadata` (e.g. the config JSON) in the header.
    pub fn save(&self, path: &Path, metadata: HashMap<String, String>) -> Result<()> {
        write_safetensors(path, &self.tensors(), metadata)
    }
}

/// Writes tensors to a safetensors file atomically with header metadata.
pub fn write_safetensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let io = |e: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        error: e,
    };
    let mut sorted: Vec<(&String, Tensor)> = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        sorted.push((k, t.contiguous()?));
    }
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let bytes =
        safetensors::tensor::serialize(sorted.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata))
            .map_err(|e| Error::Safetensors {
                path: path.to_path_buf(),
                msg: e.to_string(),
            })?;
    crate::fsio::atomic_write(path, &bytes).map_err(io)
}

/// Reads only the header metadata of a safetensors file (not its tensors).
pub fn read_safetensors_metadata(path: &Path) -> Result<HashMap<String, String>> {
    use std::io::Read;
    let io = |e: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        error: e,
    };
    let st_err = |msg: String| Error::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| st_err("shorter than a safetensors header".into()))?;
    let n = u64::from_le_bytes(len);
    if n > file_len.saturating_sub(8) || n > 100 << 20 {
        return Err(st_err(format!("header length {n} does not fit the file")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io)?;
    let v: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| st_err(format!("header: {e}")))?;
    Ok(v.get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

/// Reads every tensor of a safetensors file, plus its header metadata.
pub fn read_safetensors(
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        error: e,
    })?;
    let st_err = |msg: String| Error::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| st_err(e.to_string()))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let tensors =
        candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| st_err(e.to_string()))?;
    Ok((tensors, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_names_round_trip_for_every_weight() {
        for variant in [Variant::M3ae, Variant::Mae] {
            let mut cfg = M3aeConfig::preset("tiny").unwrap();
            cfg.output_head_depth = 2;
            let specs = param_specs(&cfg, variant);
            let mut natives = std::collections::HashSet::new();
            let mut officials = std::collections::HashSet::new();
            for s in &specs {
                assert!(natives.insert(s.name.clone()), "duplicate {}", s.name);
                assert!(
                    officials.insert(s.official.clone()),
                    "duplicate {}",
                    s.official
                );
                let o = native_to_official(&specs, &s.name).unwrap();
                assert_eq!(official_to_native(&specs, &o).unwrap(), s.name);
            }
        }
        let specs = param_specs(&M3aeConfig::preset("tiny").unwrap(), Variant::M3ae);
        assert_eq!(
            native_to_official(&specs, "encoder.blocks.1.attn.qkv.weight").as_deref(),
            Some("encoder.Block_1.Attention_0.Dense_0.kernel")
        );
        assert_eq!(
            official_to_native(&specs, "decoder_text_output.Dense_0.bias").as_deref(),
            Some("decoder.text_head.out.bias")
        );
        assert_eq!(
            native_to_official(&specs, "decoder.blocks.0.norm2.weight").as_deref(),
            Some("decoder.Block_0.LayerNorm_1.scale")
        );
    }

    #[test]
    fn tensors_round_trip_through_official_layout_and_files() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let cfg = M3aeConfig::preset("tiny")?;
        let specs = param_specs(&cfg, Variant::M3ae);
        let store = ParamStore::init(&specs, 3, &dev)?;
        let official = store.to_official(&specs)?;
        assert_eq!(
            official["encoder.Block_0.Attention_0.Dense_0.kernel"].dims(),
            &[128, 384]
        );
        let back = ParamStore::from_official(&specs, official, Unexpected::Error, "test", &dev)?;
        for (name, v) in store.vars() {
            let diff = (v.as_tensor() - back.get(name)?)?
                .abs()?
                .sum_all()?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{name}");
        }
        let dir = std::env::temp_dir().join(format!("m3ae-params-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("w.safetensors");
        store.save(&path, HashMap::from([("k".to_string(), "v".to_string())]))?;
        let (t, meta) = read_safetensors(&path, &dev)?;
        assert_eq!(meta["k"], "v");
        let again = ParamStore::from_tensors(&specs, t, Unexpected::Error, "file", &dev)?;
        assert_eq!(again.num_scalars(), param_count(&cfg, Variant::M3ae));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn missing_unexpected_and_misshaped_weights_are_named() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let cfg = M3aeConfig::preset("tiny")?;
        let specs = param_specs(&cfg, Variant::Mae);
        let store = ParamStore::init(&specs, 1, &dev)?;
        let mut t = store.tensors();
        t.remove("encoder.norm.bias");
        let e = ParamStore::from_tensors(&specs, t, Unexpected::Error, "a.safetensors", &dev)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("encoder.norm.bias") && e.contains("a.safetensors"),
            "{e}"
        );
        let mut t = store.tensors();
        t.insert("extra.weight".into(), Tensor::zeros(2, DType::F32, &dev)?);
        let e = ParamStore::from_tensors(&specs, t.clone(), Unexpected::Error, "f", &dev)
            .unwrap_err()
            .to_string();
        assert!(e.contains("extra.weight"), "{e}");
        ParamStore::from_tensors(&specs, t, Unexpected::Ignore, "f", &dev)?;
        let mut t = store.tensors();
        t.insert(
            "cls_token".into(),
            Tensor::zeros((1, 1, 3), DType::F32, &dev)?,
        );
        let e = ParamStore::from_tensors(&specs, t, Unexpected::Error, "f", &dev)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cls_token") && e.contains("[1, 1, 3]"), "{e}");
        let mut o = store.to_official(&specs)?;
        o.insert(
            "image_embedding.kernel".into(),
            Tensor::zeros((64, 192), DType::F32, &dev)?,
        );
        let e = ParamStore::from_official(&specs, o, Unexpected::Error, "f", &dev)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("image_embedding.kernel") && e.contains("[192, 128]"),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn init_is_seeded() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let specs = param_specs(&M3aeConfig::preset("tiny")?, Variant::Mae);
        let a = ParamStore::init(&specs, 7, &dev)?
            .get("cls_token")?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let b = ParamStore::init(&specs, 7, &dev)?
            .get("cls_token")?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let c = ParamStore::init(&specs, 8, &dev)?
            .get("cls_token")?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(a, b);
        assert_ne!(a, c);
        Ok(())
    }
}
