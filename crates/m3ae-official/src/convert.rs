//! Conversion of official checkpoints to our native files, and export of ours under the
//! official Flax names.
//!
//! * [`convert_official`] writes `model.safetensors` (native names, config in the metadata under
//!   `m3ae_config`), `config.json`, optionally `optimizer.safetensors` (our AdamW state) and, for
//!   a probe, `probe.safetensors`.
//! * [`convert_official_resumable`] writes a checkpoint folder `checkpoints/step-NNNNNNNN/` that
//!   `m3ae pretrain --resume` continues at the official step with its AdamW moments.
//! * [`export_official`] writes our weights under official names.

use crate::checkpoint::{CheckpointKind, OfficialCheckpoint};
use crate::native::load_native;
use crate::{Error, Result};
use candle_core::Device;
use m3ae_model::params::write_safetensors;
use m3ae_model::{param_specs, M3aeConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

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
