//! Checkpoints: a directory `step-NNNNNNNN/` with `model.safetensors` (native weight names, the
//! model config in the metadata), `optimizer.safetensors` (AdamW moments and step) and
//! `trainer.json` (full configuration, step, epoch, data position, RNG state).
//!
//! A checkpoint is written into a temporary sibling directory, every file fsynced, then the
//! directory is renamed into place: a crash at any point leaves the previous checkpoints intact
//! and never a half-written `step-*` directory.

use crate::{Error, Result};
use candle_core::{Device, Tensor};
use m3ae_model::params::{read_safetensors, write_safetensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Everything read back from a checkpoint directory.
#[derive(Debug)]
pub struct Checkpoint {
    /// The directory.
    pub dir: PathBuf,
    /// Model weights by native name.
    pub model: HashMap<String, Tensor>,
    /// Metadata of `model.safetensors` (`m3ae_config` holds the model config JSON).
    pub model_meta: HashMap<String, String>,
    /// Optimizer tensors.
    pub optimizer: HashMap<String, Tensor>,
    /// Optimizer metadata.
    pub optimizer_meta: HashMap<String, String>,
    /// The trainer state (`trainer.json`).
    pub trainer: serde_json::Value,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::Io {
        path: path.to_path_buf(),
        error: e,
    }
}

/// Name of the checkpoint directory of `step`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Writes a checkpoint under `root/step-NNNNNNNN` atomically and returns its path.
pub fn save(
    root: &Path,
    step: u64,
    model: (&HashMap<String, Tensor>, HashMap<String, String>),
    optimizer: (&HashMap<String, Tensor>, HashMap<String, String>),
    trainer: &serde_json::Value,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(io(root))?;
    let final_dir = root.join(step_dir_name(step));
    let tmp = root.join(format!(
        ".{}.tmp-{}",
        step_dir_name(step),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let written = (|| -> Result<()> {
        write_safetensors(&tmp.join("model.safetensors"), model.0, model.1)?;
        write_safetensors(&tmp.join("optimizer.safetensors"), optimizer.0, optimizer.1)?;
        let tj = tmp.join("trainer.json");
        let text = serde_json::to_string_pretty(trainer)?;
        m3ae_model::fsio::atomic_write(&tj, text.as_bytes()).map_err(io(&tj))?;
        m3ae_model::fsio::sync_parent(&tj);
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))
    })();
    if let Err(e) = written {
        // a full disk must not stay full because of the half-written copy
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if let Ok(d) = std::fs::File::open(root) {
        let _ = d.sync_all();
    }
    Ok(final_dir)
}

/// Checkpoint directories under `root`, oldest first (temporary directories are ignored).
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    list_holding(root, "trainer.json")
}

/// The `step-*` directories directly under `root` that hold `file`, oldest first.
fn list_holding(root: &Path, file: &str) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(root)(e)),
    };
    for e in rd {
        let e = e.map_err(io(root))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if e.path().join(file).is_file() {
                out.push((n, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The newest checkpoint under `root`, if any.
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    Ok(list(root)?.pop().map(|(_, p)| p))
}

/// The checkpoint folder that `dir` stands for, as every command resolves it: `dir` itself when
/// it holds `file`, else the newest `dir/checkpoints/step-*` holding it (a run folder), else the
/// newest `dir/step-*` holding it (a checkpoints folder). `file` is `trainer.json` for a
/// checkpoint to resume, `model.safetensors` for weights.
///
/// ```
/// let run = std::env::temp_dir().join(format!("m3ae-resolve-doc-{}", std::process::id()));
/// for step in ["step-00000010", "step-00000020"] {
///     let d = run.join("checkpoints").join(step);
///     std::fs::create_dir_all(&d).unwrap();
///     std::fs::write(d.join("trainer.json"), "{}").unwrap();
/// }
/// let newest = run.join("checkpoints/step-00000020");
/// let resolve = |d: &std::path::Path| m3ae_train::checkpoint::resolve(d, "trainer.json").unwrap();
/// assert_eq!(resolve(&run), Some(newest.clone()));
/// assert_eq!(resolve(&run.join("checkpoints")), Some(newest.clone()));
/// assert_eq!(resolve(&newest), Some(newest.clone()));
/// assert_eq!(m3ae_train::checkpoint::resolve(&run, "model.safetensors").unwrap(), None);
/// std::fs::remove_dir_all(&run).unwrap();
/// ```
pub fn resolve(dir: &Path, file: &str) -> Result<Option<PathBuf>> {
    if dir.join(file).is_file() {
        return Ok(Some(dir.to_path_buf()));
    }
    if let Some((_, p)) = list_holding(&dir.join("checkpoints"), file)?.pop() {
        return Ok(Some(p));
    }
    Ok(list_holding(dir, file)?.pop().map(|(_, p)| p))
}

/// Deletes all but the newest `keep` checkpoints (and stale temporary directories).
pub fn prune(root: &Path, keep: usize) -> Result<()> {
    let all = list(root)?;
    let n = all.len();
    for (_, p) in all.into_iter().take(n.saturating_sub(keep.max(1))) {
        std::fs::remove_dir_all(&p).map_err(io(&p))?;
    }
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let mine = format!(".tmp-{}", std::process::id());
            if name.starts_with(".step-") && name.contains(".tmp-") && !name.ends_with(&mine) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(())
}

/// Reads a checkpoint directory onto `device`: the files are read to the host, then every
/// tensor is copied to `device` (nothing is copied when it is the CPU). Every error names the
/// file.
pub fn load(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let host = Device::Cpu;
    let to = |(t, meta): (HashMap<String, Tensor>, HashMap<String, String>)| -> Result<_> {
        let t = t
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(device)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Ok((t, meta))
    };
    let (model, model_meta) = to(read_safetensors(&dir.join("model.safetensors"), &host)?)?;
    let (optimizer, optimizer_meta) =
        to(read_safetensors(&dir.join("optimizer.safetensors"), &host)?)?;
    let tj = dir.join("trainer.json");
    let text = std::fs::read_to_string(&tj).map_err(io(&tj))?;
    let trainer = serde_json::from_str(&text).map_err(|e| Error::Parse {
        path: tj.clone(),
        msg: e.to_string(),
    })?;
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        model,
        model_meta,
        optimizer,
        optimizer_meta,
        trainer,
    })
}
