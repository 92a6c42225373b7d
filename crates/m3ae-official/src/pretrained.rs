//! Models by name: one entry point ([`FromPretrained::from_pretrained`], [`resolve`]) for
//! every place weights can come from.
//!
//! A name is, in this order:
//! 1. an existing file: a native `model.safetensors` (config in its `m3ae_config` metadata) or an
//!    official `model.pkl` (converted in memory, see [`crate::native`]);
//! 2. an existing folder: one holding `model.safetensors` (a checkpoint `step-*` or a converted
//!    folder, with or without `config.json`), a run directory (its newest
//!    `checkpoints/step-*`), a folder of `step-*` checkpoints (the newest), or a folder holding
//!    an official `model.pkl`;
//! 3. a Hugging Face repository id (`org/name`, crate feature `hub`): the repository's
//!    `model.safetensors` (+ `config.json`), else its `model.pkl`, from the local Hugging Face
//!    cache. The network is used only when neither file is cached and offline mode
//!    ([`HubOptions::offline`], `HF_HUB_OFFLINE=1`, `m3ae --offline`) is off; then the model file
//!    and, if the repository has them, `config.json` and `tokenizer.json` are downloaded into the
//!    cache. Without the feature a name that is not a local path is an error saying so.
//!
//! The sketch compiles but does not run (it needs the weights); `tests/hub.rs` and
//! `tests/examples.rs` load models this way and check them.
//!
//! ```no_run
//! use m3ae_official::pretrained::{FromPretrained, HubOptions};
//! use m3ae_model::M3ae;
//! let dev = candle_core::Device::Cpu;
//! let opts = HubOptions::offline();
//! let local = M3ae::from_pretrained("weights/m3ae_large", &opts, &dev)?;
//! let hub = M3ae::from_pretrained("my-org/m3ae-large", &opts, &dev)?; // feature `hub`
//! # Ok::<(), m3ae_official::Error>(())
//! ```

use crate::native;
use crate::{Error, Result};
use candle_core::Device;
pub use m3ae_data::hub::{is_repo_id, HubOptions};
use m3ae_model::{AnyModel, M3ae, M3aeConfig, Mae, ParamStore, Variant};
use std::path::{Path, PathBuf};

fn not_found(name: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        name: name.display().to_string(),
        msg: msg.into(),
    }
}

/// The model file or folder an existing local path stands for (rules 1 and 2 of the module
/// documentation).
pub fn resolve_local(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        return Err(not_found(path, "no such checkpoint file or directory"));
    }
    // an unreadable folder is reported below as holding no model
    if let Ok(Some(p)) = m3ae_train::checkpoint::resolve(path, "model.safetensors") {
        return Ok(p);
    }
    if path.join("model.pkl").is_file() {
        return Ok(path.join("model.pkl"));
    }
    Err(not_found(
        path,
        "holds neither model.safetensors, checkpoints/step-*/model.safetensors nor model.pkl",
    ))
}

/// The local model file or folder of the Hub repository `repo` (rule 3 of the module
/// documentation). Cached files are used without any network access.
pub fn resolve_hub(repo: &str, opts: &HubOptions) -> Result<PathBuf> {
    use m3ae_data::hub::{hub_file, is_cached};
    let snapshot_dir = |p: PathBuf| p.parent().map(Path::to_path_buf).unwrap_or(p);
    if is_cached(repo, "model.safetensors", opts) {
        return Ok(snapshot_dir(hub_file(repo, "model.safetensors", opts)?));
    }
    if is_cached(repo, "model.pkl", opts) {
        return Ok(hub_file(repo, "model.pkl", opts)?);
    }
    match hub_file(repo, "model.safetensors", opts) {
        Ok(p) => {
            // Optional companions: a repository without them is fine.
            for f in ["config.json", "tokenizer.json"] {
                let _ = hub_file(repo, f, opts);
            }
            Ok(snapshot_dir(p))
        }
        Err(first) => match hub_file(repo, "model.pkl", opts) {
            Ok(p) => Ok(p),
            Err(_) => Err(match first {
                m3ae_data::Error::Hub { repo, msg, .. } => m3ae_data::Error::Hub {
                    repo,
                    file: "model.safetensors (or model.pkl)".into(),
                    msg,
                },
                other => other,
            }
            .into()),
        },
    }
}

/// The model file or folder `name_or_path` stands for: a local path (file, checkpoint, run or
/// converted folder), else a Hugging Face repository id resolved through the local cache.
///
/// ```
/// use m3ae_official::pretrained::{resolve, HubOptions};
/// let e = resolve("no/such-model", &HubOptions::offline()).unwrap_err().to_string();
/// assert!(e.contains("no/such-model"));
/// ```
pub fn resolve(name_or_path: impl AsRef<Path>, opts: &HubOptions) -> Result<PathBuf> {
    let path = name_or_path.as_ref();
    if path.exists() {
        return resolve_local(path);
    }
    match path.to_str() {
        Some(id) if is_repo_id(id) => resolve_hub(id, opts).map_err(|e| {
            not_found(
                path,
                format!("no such local file or folder, and as a Hugging Face repository id: {e}"),
            )
        }),
        _ => Err(not_found(path, "no such checkpoint file or directory")),
    }
}

/// Config, variant (M3AE or MAE, as the weights say) and weights of a model by name (see
/// [`resolve`]).
pub fn load_pretrained(
    name_or_path: impl AsRef<Path>,
    opts: &HubOptions,
    device: &Device,
) -> Result<(M3aeConfig, Variant, ParamStore)> {
    native::load_native(&resolve(name_or_path, opts)?, device)
}

/// Models that can be loaded by name or path (see the module documentation).
pub trait FromPretrained: Sized {
    /// Loads the model `name_or_path` stands for: a local checkpoint, run, converted folder,
    /// `model.safetensors` or official `model.pkl`, or (feature `hub`) a Hugging Face repository
    /// id from the local cache, downloading only when it is not cached and `opts` allows it.
    fn from_pretrained(
        name_or_path: impl AsRef<Path>,
        opts: &HubOptions,
        device: &Device,
    ) -> Result<Self>;
}

impl FromPretrained for M3ae {
    fn from_pretrained(
        name_or_path: impl AsRef<Path>,
        opts: &HubOptions,
        device: &Device,
    ) -> Result<Self> {
        native::load_m3ae(&resolve(name_or_path, opts)?, device)
    }
}

impl FromPretrained for Mae {
    fn from_pretrained(
        name_or_path: impl AsRef<Path>,
        opts: &HubOptions,
        device: &Device,
    ) -> Result<Self> {
        native::load_mae(&resolve(name_or_path, opts)?, device)
    }
}

/// The model the weights hold: M3AE or MAE.
impl FromPretrained for AnyModel {
    fn from_pretrained(
        name_or_path: impl AsRef<Path>,
        opts: &HubOptions,
        device: &Device,
    ) -> Result<Self> {
        let (cfg, variant, store) = load_pretrained(name_or_path, opts, device)?;
        Ok(AnyModel::new(variant, &cfg, store)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_names_are_errors_that_name_them() {
        let opts = HubOptions::offline();
        let e = resolve("/definitely/not/here", &opts)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/definitely/not/here") && e.contains("no such"),
            "{e}"
        );
        let e = resolve("some-org/some-model", &opts)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("some-org/some-model") && e.contains("model.safetensors"),
            "{e}"
        );
        #[cfg(not(feature = "hub"))]
        assert!(e.contains("`hub` feature"), "{e}");
    }
}
