//! Loading native weights: a converted folder, a checkpoint folder, a `model.safetensors` (its
//! config from `config.json` or the `m3ae_config` metadata) or an official `model.pkl`
//! (converted in memory).

use crate::checkpoint::OfficialCheckpoint;
use crate::{Error, Result};
use candle_core::Device;
use m3ae_model::params::read_safetensors;
use m3ae_model::{param_specs, M3ae, M3aeConfig, Mae, ParamStore, Unexpected, Variant};
use std::collections::HashMap;
use std::path::Path;

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
