//! Reading a fixture folder: its `config.json` mapped onto model configs ([`FixtureConfig`]),
//! its safetensors files with a record of which tensors were checked (`FixtureFile`), and the
//! checks every part of the harness shares (scalars, maskings, gradients).

use super::compare::{compare, Check, Tolerance};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use m3ae_model::{M3aeConfig, Masking, Noise};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// Where a harness run computes and how much looser than the CPU tolerances it compares.
#[derive(Debug, Clone)]
pub(crate) struct Env {
    /// The device of the models, inputs and fixture tensors.
    pub(crate) dev: Device,
    /// Factor on every non-exact tolerance ([`Tolerance::scaled`]).
    pub(crate) scale: f64,
}

impl Env {
    /// The CPU with the CPU tolerances.
    pub(crate) fn cpu() -> Self {
        Self {
            dev: Device::Cpu,
            scale: 1.0,
        }
    }

    /// `tol` under this run's factor.
    pub(crate) fn tol(&self, tol: Tolerance) -> Tolerance {
        tol.scaled(self.scale)
    }
}

/// Tensors of one fixture file, with a record of which keys were consumed.
pub(crate) struct FixtureFile {
    file: String,
    pub(crate) tensors: HashMap<String, Tensor>,
    used: BTreeSet<String>,
    scale: f64,
}

impl FixtureFile {
    /// Reads `<dir>/<name>.safetensors` onto `env.dev`.
    pub(crate) fn open(dir: &Path, name: &str, env: &Env) -> Result<Self> {
        let path = dir.join(format!("{name}.safetensors"));
        let tensors = candle_core::safetensors::load(&path, &env.dev)
            .map_err(|e| Error::Fixture(format!("reading {}: {e}", path.display())))?;
        Ok(Self {
            file: name.into(),
            tensors,
            used: BTreeSet::new(),
            scale: env.scale,
        })
    }

    /// The tensor `key`, recorded as consumed.
    pub(crate) fn get(&mut self, key: &str) -> Result<Tensor> {
        self.used.insert(key.into());
        self.tensors.get(key).cloned().ok_or_else(|| {
            Error::Fixture(format!("{}.safetensors has no tensor `{key}`", self.file))
        })
    }

    /// Compares `ours` with the tensor `key` (a missing tensor is a failed check), under `tol`
    /// scaled by the run's factor.
    pub(crate) fn check(&mut self, out: &mut Vec<Check>, key: &str, ours: &Tensor, tol: Tolerance) {
        let tol = tol.scaled(self.scale);
        let name = format!("{}:{key}", self.file);
        match self.get(key) {
            Ok(expected) => out.push(compare(&name, ours, &expected, tol)),
            Err(e) => out.push(Check {
                name,
                max_abs_err: f64::NAN,
                tolerance: tol.describe(),
                ok: false,
                note: e.to_string(),
            }),
        }
    }

    /// Reports every tensor of the file no check consumed.
    pub(crate) fn finish(self, out: &mut Vec<Check>) {
        let mut keys: Vec<&String> = self.tensors.keys().collect();
        keys.sort();
        for k in keys {
            if !self.used.contains(k) {
                out.push(Check {
                    name: format!("{}:{k}", self.file),
                    max_abs_err: f64::NAN,
                    tolerance: "-".into(),
                    ok: false,
                    note: "not checked by this harness".into(),
                });
            }
        }
    }
}

/// The fixture's `config.json`, mapped onto [`M3aeConfig`]s. Every setting the harness uses
/// comes from it; nothing is forced.
#[derive(Debug, Clone)]
pub struct FixtureConfig {
    /// M3AE model config (with loss weights and flags).
    pub m3ae: M3aeConfig,
    /// MAE model config.
    pub mae: M3aeConfig,
    /// Backbone of the linear probe (`linear_main`: an image-only `MaskedAutoencoder` with the
    /// M3AE encoder config, `use_type_embedding` included): the `model` section, overlaid by
    /// an optional `linear_probe.model` section.
    pub probe: M3aeConfig,
    /// Classes of the probe head (`num_classes`; `None` when config.json has none).
    pub num_classes: Option<usize>,
    /// Trailing padding tokens of each sample.
    pub n_pad: Vec<usize>,
    /// Batch size.
    pub batch: usize,
}

/// `base` with the fields of the JSON object `model` and the non-null `extra` values set.
pub(crate) fn overlay(
    base: &M3aeConfig,
    model: &serde_json::Value,
    extra: &[(&str, serde_json::Value)],
) -> Result<M3aeConfig> {
    let mut v = serde_json::to_value(base).map_err(|e| Error::Json {
        origin: "config".into(),
        msg: e.to_string(),
    })?;
    let obj = v.as_object_mut().expect("config serialises to an object");
    if let Some(m) = model.as_object() {
        for (k, x) in m {
            obj.insert(k.clone(), x.clone());
        }
    }
    for (k, x) in extra {
        if !x.is_null() {
            obj.insert((*k).into(), x.clone());
        }
    }
    serde_json::from_value(v).map_err(|e| {
        Error::Fixture(format!(
            "config.json has a model field M3aeConfig does not know: {e}"
        ))
    })
}

impl FixtureConfig {
    /// Reads `config.json` of a fixture folder.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Io {
            path: path.clone(),
            error: e,
        })?;
        let j: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            origin: path.display().to_string(),
            msg: e.to_string(),
        })?;
        let field = |k: &str| j.get(k).cloned().unwrap_or(serde_json::Value::Null);
        let base = M3aeConfig {
            model_type: None,
            ..M3aeConfig::default()
        };
        let shared = [
            ("patch_size", field("patch_size")),
            ("image_size", field("image_size")),
            ("text_vocab_size", field("vocab")),
            ("text_length", field("text_length")),
        ];
        let mut m3ae_extra = shared.to_vec();
        for k in [
            "image_loss_weight",
            "text_loss_weight",
            "unpaired_text_loss_weight",
            "image_all_token_loss",
            "text_all_token_loss",
        ] {
            m3ae_extra.push((k, field(k)));
        }
        let m3ae = overlay(&base, &field("model"), &m3ae_extra)?;
        let mae_j = field("mae");
        let mut mae_extra = shared.to_vec();
        mae_extra.push((
            "image_all_token_loss",
            mae_j
                .get("image_all_token_loss")
                .cloned()
                .unwrap_or(serde_json::Value::Null),
        ));
        let mae_model = mae_j
            .get("model")
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        let mae = overlay(&base, &mae_model, &mae_extra)?;
        let probe_model = field("linear_probe")
            .get("model")
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        let probe = overlay(&m3ae, &probe_model, &[])?;
        let num_classes = match field("num_classes") {
            serde_json::Value::Null => None,
            v => Some(v.as_u64().ok_or_else(|| {
                Error::Fixture(format!("config.json: num_classes {v} is not a count"))
            })? as usize),
        };
        let n_pad: Vec<usize> =
            serde_json::from_value(field("n_pad")).map_err(|e| Error::Json {
                origin: "config.json: n_pad".into(),
                msg: e.to_string(),
            })?;
        let batch =
            j.get("batch")
                .and_then(|b| b.as_u64())
                .ok_or_else(|| Error::Fixture("config.json: batch".into()))? as usize;
        Ok(Self {
            m3ae,
            mae,
            probe,
            num_classes,
            n_pad,
            batch,
        })
    }
}

/// The noise tensor `key` (batch-shared or per sample).
pub(crate) fn noise(file: &mut FixtureFile, key: &str) -> Result<Noise> {
    Ok(Noise::from_tensor(&file.get(key)?)?)
}

/// Checks a loss or accuracy (an error when the model did not compute it).
pub(crate) fn scalar_check(
    out: &mut Vec<Check>,
    f: &mut FixtureFile,
    key: &str,
    t: Option<&Tensor>,
) -> Result<()> {
    let t = t.ok_or_else(|| Error::Fixture(format!("{key}: not computed")))?;
    f.check(out, key, t, Tolerance::LOSS);
    Ok(())
}

/// Checks the shuffle, restore, keep and mask tensors of a masking under `prefix`.
pub(crate) fn check_masking(out: &mut Vec<Check>, f: &mut FixtureFile, prefix: &str, m: &Masking) {
    // ids_shuffle / ids_restore / ids_keep are stored as (L,) (batch-shared); compare row 0 and
    // require every row to be identical.
    for (key, t) in [
        ("ids_shuffle", &m.ids_shuffle),
        ("ids_restore", &m.ids_restore),
        ("ids_keep", &m.ids_keep),
    ] {
        let row0 = t.get(0).expect("batch >= 1");
        let all_same = t
            .broadcast_sub(&row0.unsqueeze(0).expect("unsqueeze"))
            .and_then(|d| d.to_dtype(DType::F32))
            .and_then(|d| d.abs()?.sum_all()?.to_scalar::<f32>())
            .map(|s| s == 0.0)
            .unwrap_or(false);
        let k = format!("{prefix}_{key}");
        f.check(out, &k, &row0, Tolerance::Exact);
        if !all_same {
            if let Some(c) = out.last_mut() {
                c.ok = false;
                c.note = "rows differ for batch-shared noise".into();
            }
        }
    }
    f.check(out, &format!("{prefix}_mask"), &m.mask, Tolerance::Exact);
}

/// Checks the gradient of every parameter against `<file>.safetensors` (`grad.<official name>`,
/// official layouts).
pub(crate) fn check_grads(
    out: &mut Vec<Check>,
    env: &Env,
    dir: &Path,
    file: &str,
    specs: &[m3ae_model::ParamSpec],
    params: &m3ae_model::ParamStore,
    grads: &candle_core::backprop::GradStore,
) -> Result<()> {
    let mut g = FixtureFile::open(dir, file, env)?;
    for s in specs {
        let key = format!("grad.{}", s.official);
        let var = params.var(&s.name)?;
        match grads.get(var.as_tensor()) {
            Some(ours) => {
                let ours = if s.transposed {
                    ours.t()?.contiguous()?
                } else {
                    ours.clone()
                };
                g.check(out, &key, &ours, Tolerance::GRAD);
            }
            None => {
                let _ = g.get(&key);
                out.push(Check {
                    name: format!("{file}:{key}"),
                    max_abs_err: f64::NAN,
                    tolerance: env.tol(Tolerance::GRAD).describe(),
                    ok: false,
                    note: format!("no gradient reached `{}`", s.name),
                });
            }
        }
    }
    g.finish(out);
    Ok(())
}
