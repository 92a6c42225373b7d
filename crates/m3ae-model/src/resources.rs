//! Memory and thread budgets: an estimate of the memory a training step or a feature
//! extraction needs, from the configuration alone, checked against the memory this machine has
//! available before anything large is allocated, and a cap on thread counts.
//!
//! The estimate is deliberately rough (it counts the weights, gradients and AdamW moments, the
//! activations a transformer keeps for its backward, the attention probabilities and the text
//! logits) but of the right order: its purpose is to turn "abort with an allocator backtrace"
//! into one line that names the setting, the estimate and the available memory.

use crate::config::M3aeConfig;
use crate::params::{param_count, Variant};
use crate::{Error, Result};

const GIB: f64 = (1u64 << 30) as f64;

/// Bytes of the activations one sample keeps through a transformer of `depth` blocks over
/// `tokens` tokens of width `width` with MLP width `mlp` and `heads` heads (f32): inputs and
/// outputs of the two LayerNorms, q/k/v, attention and projection outputs, residuals, the MLP
/// hidden state before and after GELU, and one layer of attention scores in flight. `drops`:
/// the outputs dropout keeps besides its inputs (in training: after the attention projection
/// and both MLP layers when `drop > 0`, after both branches when `drop_path > 0`; attention
/// dropout keeps nothing more in the fused kernel).
fn transformer_bytes(
    tokens: f64,
    width: f64,
    mlp: f64,
    heads: f64,
    depth: f64,
    drops: Drops,
) -> f64 {
    let mut per_block = tokens * width * 10.0 + tokens * mlp * 2.0 + heads * tokens * tokens;
    if drops.drop {
        per_block += tokens * (mlp + 2.0 * width);
    }
    if drops.drop_path {
        per_block += tokens * 2.0 * width;
    }
    depth * 4.0 * per_block
}

/// Which dropout sites keep extra activations in a pass.
#[derive(Clone, Copy)]
struct Drops {
    drop: bool,
    drop_path: bool,
}

/// Per-sample activation bytes of a forward (and, for training, backward) pass of `cfg`.
fn sample_bytes(c: &M3aeConfig, variant: Variant, masked: bool) -> f64 {
    let li = c.num_patches() as f64;
    let t = match variant {
        Variant::M3ae => c.text_length as f64,
        Variant::Mae => 0.0,
    };
    let (ki, kt) = if masked {
        (
            c.image_keep(c.num_patches()) as f64,
            if t > 0.0 {
                c.text_keep(c.text_length) as f64
            } else {
                0.0
            },
        )
    } else {
        (li, t)
    };
    let (d, dd) = (c.emb_dim as f64, c.dec_emb_dim as f64);
    // dropout runs in training passes only
    let drops = Drops {
        drop: masked && c.drop > 0.0,
        drop_path: masked && c.drop_path > 0.0,
    };
    let enc = transformer_bytes(
        1.0 + ki + kt,
        d,
        c.mlp_dim(c.emb_dim) as f64,
        c.num_heads as f64,
        c.depth as f64,
        drops,
    );
    // patches in and out, embeddings
    let mut bytes = enc + 4.0 * li * (c.patch_dim() as f64 * 3.0 + d * 2.0);
    if masked {
        let ld = 1.0 + li + t;
        bytes += transformer_bytes(
            ld,
            dd,
            c.mlp_dim(c.dec_emb_dim) as f64,
            c.dec_num_heads as f64,
            c.dec_depth as f64,
            drops,
        );
        // text logits, their softmax and gradient
        bytes += 4.0 * 3.0 * t * c.text_vocab_size as f64;
    }
    bytes
}

/// Estimated peak bytes of one training step of `cfg` at `batch` samples: weights, gradients
/// and AdamW moments (4 copies of every parameter, plus one for updates in flight) and the
/// activations of the masked forward and its backward.
///
/// ```
/// use m3ae_model::{resources::training_step_bytes, M3aeConfig, Variant};
/// let tiny = M3aeConfig::preset("tiny").unwrap();
/// let small = training_step_bytes(&tiny, Variant::M3ae, 8);
/// assert!(small > 1e6 && small < 1e10);
/// assert!(training_step_bytes(&tiny, Variant::M3ae, 1 << 40) > 1e15);
/// // dropout keeps more activations
/// let drop = M3aeConfig { drop: 0.1, drop_path: 0.1, ..tiny.clone() };
/// assert!(training_step_bytes(&drop, Variant::M3ae, 8) > small);
/// ```
pub fn training_step_bytes(cfg: &M3aeConfig, variant: Variant, batch: usize) -> f64 {
    let c = cfg.resolved();
    let params = param_count(&c, variant) as f64;
    params * 4.0 * 5.0 + batch as f64 * sample_bytes(&c, variant, true)
}

/// Estimated peak bytes of extracting features (unmasked image-only forward, no gradients) for
/// `batch` images.
pub fn inference_bytes(cfg: &M3aeConfig, batch: usize) -> f64 {
    let c = cfg.resolved();
    let params = param_count(&c, Variant::Mae) as f64;
    // no backward: a forward keeps about a third of what training keeps alive
    params * 4.0 + batch as f64 * sample_bytes(&c, Variant::Mae, false) / 3.0
}

/// Bytes of memory available to this process: the kernel's `MemAvailable`, lowered to the
/// cgroup's limit when one is set. `None` where neither can be read (then nothing is refused).
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let avail = meminfo.lines().find_map(|l| {
        let kb = l.strip_prefix("MemAvailable:")?.trim().strip_suffix("kB")?;
        kb.trim().parse::<u64>().ok().map(|k| k * 1024)
    })?;
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let used = std::fs::read_to_string("/sys/fs/cgroup/memory.current")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Some(match cgroup {
        Some(max) => avail.min(max.saturating_sub(used)),
        None => avail,
    })
}

/// `Err(Error::OutOfMemory)` when `bytes` exceed the available memory (see
/// [`available_memory`]); `what` names the work and `hint` the settings that size it.
///
/// ```
/// use m3ae_model::resources::check_fits;
/// assert!(check_fits("a step", 1e3, "train.batch_size").is_ok());
/// let e = check_fits("a step", 1e30, "train.batch_size").unwrap_err().to_string();
/// assert!(e.contains("train.batch_size"), "{e}");
/// ```
pub fn check_fits(what: &str, bytes: f64, hint: &str) -> Result<()> {
    let Some(avail) = available_memory() else {
        return Ok(());
    };
    if bytes > avail as f64 {
        return Err(Error::OutOfMemory {
            what: what.to_string(),
            need_gib: bytes / GIB,
            available_gib: avail as f64 / GIB,
            hint: hint.to_string(),
        });
    }
    Ok(())
}

/// [`check_fits`] for one training step of `cfg` at `batch` samples ([`training_step_bytes`]);
/// `hint` names the settings that size it.
pub fn check_training_step(
    cfg: &M3aeConfig,
    variant: Variant,
    batch: usize,
    hint: &str,
) -> Result<()> {
    check_fits(
        &format!("a training step of {batch} samples"),
        training_step_bytes(cfg, variant, batch),
        hint,
    )
}

/// Largest thread count [`cap_threads`] lets through: 4 per core, at most 1,024.
pub fn max_threads() -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    (4 * cores).min(1024)
}

/// `requested` threads, lowered to [`max_threads`] with a warning naming `field` (0, meaning
/// "one per core", is left alone).
///
/// ```
/// use m3ae_model::resources::{cap_threads, max_threads};
/// assert_eq!(cap_threads("data.num_threads", 0), 0);
/// assert_eq!(cap_threads("data.num_threads", 1), 1);
/// assert_eq!(cap_threads("data.num_threads", 100_000), max_threads());
/// ```
pub fn cap_threads(field: &str, requested: usize) -> usize {
    let max = max_threads();
    if requested > max {
        eprintln!("warning: {field} = {requested} is more than 4 threads per core; using {max}");
        return max;
    }
    requested
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_grow_with_every_size_and_fit_the_presets() {
        let base = M3aeConfig::preset("base").unwrap();
        let b = training_step_bytes(&base, Variant::M3ae, 32);
        // base at batch 32 trains in a few GiB
        assert!(b > 1.0 * GIB && b < 20.0 * GIB, "{}", b / GIB);
        let mut long = base.clone();
        long.text_length = 1 << 20;
        assert!(training_step_bytes(&long, Variant::M3ae, 32) > 1e3 * GIB);
        let mut big = base.clone();
        big.image_size = 1 << 14;
        assert!(training_step_bytes(&big, Variant::Mae, 1) > 100.0 * GIB);
        assert!(inference_bytes(&base, 256) < b * 8.0);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn available_memory_is_read_on_linux() {
        assert!(available_memory().unwrap() > 1 << 20);
    }
}
