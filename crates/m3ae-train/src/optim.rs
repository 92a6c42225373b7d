//! AdamW exactly as the official optax chain (`adamw(b1, b2, eps, weight_decay, mask)`), with its
//! state (step, first and second moments) readable and restorable bit for bit, plus global-norm
//! gradient clipping (`clip_by_global_norm`).
//!
//! Update of a parameter `p` with gradient `g` at step `t` (1-based):
//! `m = b1 m + (1-b1) g`, `v = b2 v + (1-b2) g^2`, `u = m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps)`,
//! plus `wd * p` when `p` is decayed, then `p -= lr * u` — one pass over each tensor.
//!
//! Fine-tuning gives each weight its own [`ParamGroup`]: a learning-rate scale (layer-wise decay),
//! whether it is decayed, and the clipping group whose global norm clips it (the official
//! fine-tuning chains `clip_by_global_norm` and `adamw` per layer group). Pre-training has one
//! group, scale 1 and the official decay mask ([`AdamW::new`]).
//!
//! Two implementations of the same arithmetic ([`UpdatePath`]): weights on the CPU are updated
//! on host slices by rayon (the moments are host vectors), weights anywhere else with candle
//! tensor ops on their device (the moments are device tensors of the weights' shapes, and no
//! weight, gradient or moment crosses to the host). Likewise [`global_norm`] is a host sum on the
//! CPU and one device reduction with a single scalar read elsewhere. Both paths evaluate the
//! same f32 operations in the same order, and the state reads and writes the same
//! `optimizer.safetensors` from either; the tensor path can be forced on the CPU
//! ([`AdamW::set_path`]), which is how it is tested without a GPU.

use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use m3ae_model::{ParamSpec, ParamStore, Variant};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// AdamW hyper-parameters (official pre-training values by default).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub b1: f64,
    /// Second-moment decay (0.95 in pre-training, 0.999 in fine-tuning).
    pub b2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay of decayed parameters.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            b1: 0.9,
            b2: 0.95,
            eps: 1e-8,
            weight_decay: 0.05,
        }
    }
}

/// Whether the official code decays a weight: it is decayed unless any component of its
/// official (Flax) path is in the no-decay list, which differs between M3AE and MAE.
///
/// ```
/// use m3ae_train::optim::is_decayed;
/// use m3ae_model::Variant;
/// assert!(is_decayed("encoder.Block_0.LayerNorm_0.scale", Variant::M3ae));
/// assert!(!is_decayed("encoder.Block_0.Attention_0.Dense_0.bias", Variant::M3ae));
/// assert!(!is_decayed("text_embedding.embedding", Variant::M3ae));
/// assert!(!is_decayed("decoder_image_type_embedding", Variant::M3ae));
/// assert!(is_decayed("decoder_image_type_embedding", Variant::Mae));
/// ```
pub fn is_decayed(official_name: &str, variant: Variant) -> bool {
    let list = m3ae_model::params::no_decay_list(variant);
    !official_name.split('.').any(|c| list.contains(&c))
}

/// How [`AdamW::step`] and the gradient norms are computed (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdatePath {
    /// Host slices and rayon: the path of weights on the CPU.
    Host,
    /// candle tensor ops on the weights' device: the path of weights anywhere else.
    Tensor,
}

impl UpdatePath {
    /// The path of weights on `device`: [`UpdatePath::Host`] on the CPU, else
    /// [`UpdatePath::Tensor`].
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            UpdatePath::Host
        } else {
            UpdatePath::Tensor
        }
    }

    /// The path of a set of gradients: host when every one is on the CPU.
    pub fn for_grads(grads: &NamedGrads) -> Self {
        if grads.values().all(|g| g.device().is_cpu()) {
            UpdatePath::Host
        } else {
            UpdatePath::Tensor
        }
    }
}

/// Weights updated per rayon task by [`AdamW::step`].
const UPDATE_CHUNK: usize = 1 << 14;

/// The AdamW update of `p` in place, with its moments (rayon over fixed chunks; element-wise, so
/// the result does not depend on how rayon splits them).
fn adamw_chunks(
    p: &mut [f32],
    g: &[f32],
    ms: &mut [f32],
    vs: &mut [f32],
    c: &Coefficients,
    decay: f32,
    lr: f32,
) {
    let (b1, b2, inv_bc1, inv_bc2, eps) = (c.b1, c.b2, c.inv_bc1, c.inv_bc2, c.eps);
    p.par_chunks_mut(UPDATE_CHUNK)
        .zip(ms.par_chunks_mut(UPDATE_CHUNK))
        .zip(vs.par_chunks_mut(UPDATE_CHUNK))
        .enumerate()
        .for_each(|(k, ((p, ms), vs))| {
            let lo = k * UPDATE_CHUNK;
            let g = &g[lo..lo + p.len()];
            for i in 0..p.len() {
                let gi = g[i];
                let m = b1 * ms[i] + (1.0 - b1) * gi;
                let v = b2 * vs[i] + (1.0 - b2) * gi * gi;
                ms[i] = m;
                vs[i] = v;
                let u = (m * inv_bc1) / ((v * inv_bc2).sqrt() + eps) + decay * p[i];
                p[i] -= lr * u;
            }
        });
}

/// [`adamw_chunks`] on a weight's CPU storage, the gradient being the source.
struct HostUpdate<'a> {
    moments: std::cell::RefCell<(&'a mut Vec<f32>, &'a mut Vec<f32>)>,
    c: Coefficients,
    decay: f32,
    lr: f32,
}

impl candle_core::InplaceOp2 for HostUpdate<'_> {
    fn name(&self) -> &'static str {
        "adamw-host-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut candle_core::CpuStorage,
        dst_l: &candle_core::Layout,
        g: &candle_core::CpuStorage,
        g_l: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage::F32;
        let (F32(p), F32(g)) = (dst, g) else {
            candle_core::bail!("adamw: weight and gradient must be f32");
        };
        let (Some((p0, p1)), Some((g0, g1))) =
            (dst_l.contiguous_offsets(), g_l.contiguous_offsets())
        else {
            candle_core::bail!("adamw: weight and gradient must be contiguous");
        };
        let mut moments = self.moments.borrow_mut();
        let (ms, vs) = &mut *moments;
        if p1 - p0 != g1 - g0 || ms.len() != p1 - p0 || vs.len() != p1 - p0 {
            candle_core::bail!("adamw: weight, gradient and moments differ in size");
        }
        adamw_chunks(
            &mut p[p0..p1],
            &g[g0..g1],
            ms,
            vs,
            &self.c,
            self.decay,
            self.lr,
        );
        Ok(())
    }
}

/// How the optimiser treats one weight.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ParamGroup {
    /// Multiplies the scheduled learning rate (layer-wise lr decay; 1 in pre-training).
    pub lr_scale: f64,
    /// Whether decoupled weight decay applies.
    pub decayed: bool,
    /// Weights with the same clipping group are clipped by their joint global norm
    /// ([`clip_group_norms`]).
    pub clip_group: usize,
}

/// The moments of one weight, where its update runs.
#[derive(Debug, Clone)]
enum Moments {
    /// Flat host vectors ([`UpdatePath::Host`]).
    Host { m: Vec<f32>, v: Vec<f32> },
    /// Tensors of the weight's shape on its device ([`UpdatePath::Tensor`]).
    Device { m: Tensor, v: Tensor },
}

#[derive(Debug, Clone)]
struct Slot {
    decayed: bool,
    lr_scale: f64,
    numel: usize,
    moments: Moments,
}

impl Slot {
    /// The moments as host vectors (copied from the device when they are there).
    fn host(&mut self) -> Result<(&mut Vec<f32>, &mut Vec<f32>)> {
        if let Moments::Device { m, v } = &self.moments {
            let (m, v) = (
                m.flatten_all()?.to_vec1::<f32>()?,
                v.flatten_all()?.to_vec1::<f32>()?,
            );
            self.moments = Moments::Host { m, v };
        }
        match &mut self.moments {
            Moments::Host { m, v } => Ok((m, v)),
            Moments::Device { .. } => unreachable!("converted above"),
        }
    }

    /// The moments as tensors shaped and placed like `like` (uploaded from the host once).
    fn device(&mut self, like: &Tensor) -> Result<(Tensor, Tensor)> {
        let (m, v) = match &self.moments {
            Moments::Host { m, v } => (
                Tensor::from_slice(m, like.shape(), like.device())?,
                Tensor::from_slice(v, like.shape(), like.device())?,
            ),
            Moments::Device { m, v } => (m.to_device(like.device())?, v.to_device(like.device())?),
        };
        Ok((m, v))
    }

    /// A moment as a flat tensor on `device` (for saving).
    fn flat(&self, which: usize, device: &Device) -> Result<Tensor> {
        Ok(match &self.moments {
            Moments::Host { m, v } => {
                let x = if which == 0 { m } else { v };
                Tensor::from_slice(x, x.len(), device)?
            }
            Moments::Device { m, v } => {
                let x = if which == 0 { m } else { v };
                x.flatten_all()?.to_device(device)?
            }
        })
    }
}

/// The per-step constants of the update, in f32 as both paths use them.
#[derive(Clone, Copy)]
struct Coefficients {
    b1: f32,
    b2: f32,
    inv_bc1: f32,
    inv_bc2: f32,
    eps: f32,
    wd: f32,
}

/// AdamW over the weights of one model.
#[derive(Debug, Clone)]
pub struct AdamW {
    cfg: AdamWConfig,
    step: u64,
    slots: BTreeMap<String, Slot>,
    path: Option<UpdatePath>,
}

impl AdamW {
    /// Zero state for every weight of `specs` (native names), with the official decay mask.
    pub fn new(cfg: AdamWConfig, specs: &[ParamSpec], variant: Variant) -> Self {
        let groups = specs
            .iter()
            .map(|s| {
                let g = ParamGroup {
                    lr_scale: 1.0,
                    decayed: is_decayed(&s.official, variant),
                    clip_group: 0,
                };
                (s.name.clone(), g)
            })
            .collect();
        Self::with_groups(cfg, specs, &groups)
    }

    /// Zero state for every weight of `specs`, each treated as its entry of `groups` says
    /// (a weight without one: scale 1, not decayed).
    pub fn with_groups(
        cfg: AdamWConfig,
        specs: &[ParamSpec],
        groups: &BTreeMap<String, ParamGroup>,
    ) -> Self {
        let slots = specs
            .iter()
            .map(|s| {
                let n = s.numel();
                let g = groups.get(&s.name);
                (
                    s.name.clone(),
                    Slot {
                        decayed: g.is_some_and(|g| g.decayed),
                        lr_scale: g.map_or(1.0, |g| g.lr_scale),
                        numel: n,
                        moments: Moments::Host {
                            m: vec![0.0; n],
                            v: vec![0.0; n],
                        },
                    },
                )
            })
            .collect();
        Self {
            cfg,
            step: 0,
            slots,
            path: None,
        }
    }

    /// Chooses the update path: `None` (the default) picks it from the weights' device
    /// ([`UpdatePath::for_device`]); `Some` forces one, e.g. the tensor path on the CPU to test
    /// it against the host path. Switching moves the moments at the next step.
    pub fn set_path(&mut self, path: Option<UpdatePath>) {
        self.path = path;
    }

    /// The path a step over weights on `device` takes.
    pub fn path_for(&self, device: &Device) -> UpdatePath {
        self.path.unwrap_or_else(|| UpdatePath::for_device(device))
    }

    /// Optimiser steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Names of the decayed weights.
    pub fn decayed(&self) -> impl Iterator<Item = &str> {
        self.slots
            .iter()
            .filter(|(_, s)| s.decayed)
            .map(|(k, _)| k.as_str())
    }

    /// Applies one update with learning rate `lr` (times each weight's [`ParamGroup::lr_scale`])
    /// to every weight of `params` from `grads` (gradients by native weight name; a weight
    /// without gradient is an error: it would silently never train).
    pub fn step(&mut self, params: &ParamStore, grads: &NamedGrads, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.cfg.b1.powi(t);
        let bc2 = 1.0 - self.cfg.b2.powi(t);
        let c = Coefficients {
            b1: self.cfg.b1 as f32,
            b2: self.cfg.b2 as f32,
            inv_bc1: (1.0 / bc1) as f32,
            inv_bc2: (1.0 / bc2) as f32,
            eps: self.cfg.eps as f32,
            wd: self.cfg.weight_decay as f32,
        };
        let path = self.path_for(params.device());
        for (name, var) in params.vars() {
            let slot = self.slots.get_mut(name).ok_or_else(|| {
                Error::State(format!("optimizer has no state for weight `{name}`"))
            })?;
            let g = grads
                .get(name)
                .ok_or_else(|| Error::State(format!("no gradient for weight `{name}`")))?;
            let decay = if slot.decayed { c.wd } else { 0.0 };
            let lr = (lr * slot.lr_scale) as f32;
            match path {
                UpdatePath::Host => Self::update_host(slot, var, g, &c, decay, lr)?,
                UpdatePath::Tensor => Self::update_tensor(slot, var, g, &c, decay, lr)?,
            }
        }
        Ok(())
    }

    /// One weight on host slices (rayon over fixed chunks), written into the weight's own
    /// storage: a new weight tensor would cost an allocation and a copy of every weight per step.
    fn update_host(
        slot: &mut Slot,
        var: &candle_core::Var,
        g: &Tensor,
        c: &Coefficients,
        decay: f32,
        lr: f32,
    ) -> Result<()> {
        let (ms, vs) = slot.host()?;
        // A strided or non-f32 gradient is converted once; a parameter is always a contiguous
        // f32 tensor (the op checks both).
        let g = g.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let op = HostUpdate {
            moments: std::cell::RefCell::new((ms, vs)),
            c: *c,
            decay,
            lr,
        };
        var.as_tensor().inplace_op2(&g, &op)?;
        Ok(())
    }

    /// One weight with tensor ops on its device: the host formula op for op (every scalar is
    /// the same f32 constant; `t * s` and `t + s` are candle's affine maps in the tensor's
    /// dtype), so on the CPU both paths agree to the last bit or nearly so.
    fn update_tensor(
        slot: &mut Slot,
        var: &candle_core::Var,
        g: &Tensor,
        c: &Coefficients,
        decay: f32,
        lr: f32,
    ) -> Result<()> {
        let p = var.as_tensor().detach();
        let g = g
            .detach()
            .to_dtype(candle_core::DType::F32)?
            .to_device(p.device())?;
        let (m, v) = slot.device(&p)?;
        let f = |x: f32| x as f64;
        let m = ((m * f(c.b1))? + (&g * f(1.0 - c.b1))?)?;
        let v = ((v * f(c.b2))? + ((&g * f(1.0 - c.b2))? * &g)?)?;
        let denom = ((&v * f(c.inv_bc2))?.sqrt()? + f(c.eps))?;
        let mut u = ((&m * f(c.inv_bc1))? / denom)?;
        if decay != 0.0 {
            u = (u + (&p * f(decay))?)?;
        }
        let new = (&p - (u * f(lr))?)?;
        var.set(&new)?;
        slot.moments = Moments::Device { m, v };
        Ok(())
    }

    /// The state as tensors (`m.{name}`, `v.{name}`, flat) on `device` and metadata (`step`,
    /// hyper-parameters). Pass the CPU for the host copies a checkpoint is written from.
    pub fn state(
        &self,
        device: &Device,
    ) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
        let mut t = HashMap::new();
        for (name, s) in &self.slots {
            t.insert(format!("m.{name}"), s.flat(0, device)?);
            t.insert(format!("v.{name}"), s.flat(1, device)?);
        }
        let meta = HashMap::from([
            ("step".to_string(), self.step.to_string()),
            ("adamw".to_string(), serde_json::to_string(&self.cfg)?),
        ]);
        Ok((t, meta))
    }

    /// Restores a state written by [`AdamW::state`]; every slot must be present with its size.
    /// The moments are read to the host; the tensor path uploads them at its next step.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        meta: &HashMap<String, String>,
        source: &str,
    ) -> Result<()> {
        let step = meta
            .get("step")
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| Error::State(format!("{source}: no valid `step` in the metadata")))?;
        let mut loaded = BTreeMap::new();
        for (name, s) in &self.slots {
            let read = |key: String| -> Result<Vec<f32>> {
                let t = tensors.get(&key).ok_or_else(|| {
                    Error::State(format!("{source}: missing optimizer tensor `{key}`"))
                })?;
                let v = t.flatten_all()?.to_vec1::<f32>()?;
                if v.len() != s.numel {
                    return Err(Error::State(format!(
                        "{source}: optimizer tensor `{key}` has {} values, expected {}",
                        v.len(),
                        s.numel
                    )));
                }
                Ok(v)
            };
            let m = read(format!("m.{name}"))?;
            let v = read(format!("v.{name}"))?;
            loaded.insert(name.clone(), Moments::Host { m, v });
        }
        for (name, moments) in loaded {
            if let Some(s) = self.slots.get_mut(&name) {
                s.moments = moments;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Gradients by native weight name.
pub type NamedGrads = BTreeMap<String, Tensor>;

/// Picks the gradient of every weight of `params` out of a `GradStore` (weights without a
/// gradient are absent from the result).
pub fn named_grads(params: &ParamStore, grads: &GradStore) -> NamedGrads {
    params
        .vars()
        .filter_map(|(n, v)| grads.get(v.as_tensor()).map(|g| (n.to_string(), g.clone())))
        .collect()
}

/// Global L2 norm of a set of gradients (NaN or infinite when any element is), on the path of
/// their device ([`UpdatePath::for_grads`]).
pub fn global_norm(grads: &NamedGrads) -> Result<f64> {
    global_norm_on(grads, UpdatePath::for_grads(grads))
}

/// [`global_norm`] on a chosen path: a host sum of f64 squares tensor by tensor, or one device
/// reduction (f64 squares summed per tensor, then over the tensors) with a single scalar read.
///
/// ```
/// use m3ae_train::optim::{global_norm_on, NamedGrads, UpdatePath};
/// let dev = candle_core::Device::Cpu;
/// let mut g = NamedGrads::new();
/// g.insert("a".into(), candle_core::Tensor::new(&[3f32, 0.0], &dev)?);
/// g.insert("b".into(), candle_core::Tensor::new(&[[4f32]], &dev)?);
/// assert_eq!(global_norm_on(&g, UpdatePath::Host)?, 5.0);
/// assert_eq!(global_norm_on(&g, UpdatePath::Tensor)?, 5.0);
/// # Ok::<(), m3ae_train::Error>(())
/// ```
pub fn global_norm_on(grads: &NamedGrads, path: UpdatePath) -> Result<f64> {
    match path {
        UpdatePath::Host => {
            let mut sq = 0f64;
            for g in grads.values() {
                sq += m3ae_kernels::with_f32_slice(g, |g| {
                    g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()
                })?;
            }
            Ok(sq.sqrt())
        }
        UpdatePath::Tensor => {
            let Some(first) = grads.values().next() else {
                return Ok(0.0);
            };
            let dev = first.device().clone();
            let parts = grads
                .values()
                .map(|g| {
                    g.detach()
                        .to_device(&dev)?
                        .to_dtype(candle_core::DType::F64)?
                        .sqr()?
                        .sum_all()
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let sq = Tensor::stack(&parts, 0)?.sum_all()?.to_scalar::<f64>()?;
            Ok(sq.sqrt())
        }
    }
}

/// `clip_by_global_norm` per clipping group: each group whose joint norm exceeds `max_norm` is
/// scaled by `max_norm / norm` (weights missing from `groups` form group 0). Returns the global
/// norm of all gradients before clipping. With one group this is [`clip_global_norm`].
pub fn clip_group_norms(
    grads: &mut NamedGrads,
    groups: &BTreeMap<String, ParamGroup>,
    max_norm: f64,
) -> Result<f64> {
    let path = UpdatePath::for_grads(grads);
    clip_group_norms_on(grads, groups, max_norm, path)
}

/// [`clip_group_norms`] with the norms on a chosen path ([`global_norm_on`]).
pub fn clip_group_norms_on(
    grads: &mut NamedGrads,
    groups: &BTreeMap<String, ParamGroup>,
    max_norm: f64,
    path: UpdatePath,
) -> Result<f64> {
    let group_of = |name: &str| groups.get(name).map_or(0, |g| g.clip_group);
    let first = grads.keys().next().map_or(0, |n| group_of(n));
    if grads.keys().all(|n| group_of(n) == first) {
        return clip_global_norm_on(grads, max_norm, path);
    }
    let mut by_group: BTreeMap<usize, NamedGrads> = BTreeMap::new();
    for (name, g) in std::mem::take(grads) {
        by_group.entry(group_of(&name)).or_default().insert(name, g);
    }
    let mut sq = 0f64;
    for mut part in by_group.into_values() {
        let n = clip_global_norm_on(&mut part, max_norm, path)?;
        sq += n * n;
        grads.extend(part);
    }
    Ok(sq.sqrt())
}

/// `clip_by_global_norm`: when the global norm exceeds `max_norm`, scales every gradient by
/// `max_norm / norm`. Returns the norm before clipping.
pub fn clip_global_norm(grads: &mut NamedGrads, max_norm: f64) -> Result<f64> {
    let path = UpdatePath::for_grads(grads);
    clip_global_norm_on(grads, max_norm, path)
}

/// [`clip_global_norm`] with the norm on a chosen path ([`global_norm_on`]); the scaling is a
/// tensor op on the gradients' device either way.
pub fn clip_global_norm_on(grads: &mut NamedGrads, max_norm: f64, path: UpdatePath) -> Result<f64> {
    let norm = global_norm_on(grads, path)?;
    if norm > max_norm && norm.is_finite() {
        let scale = max_norm / norm;
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use m3ae_model::{param_specs, M3aeConfig};

    #[test]
    fn one_step_matches_the_formula() -> anyhow::Result<()> {
        // a single weight: check the first two steps by hand (optax semantics)
        let dev = Device::Cpu;
        let cfg = M3aeConfig::preset("tiny")?;
        let specs: Vec<ParamSpec> = param_specs(&cfg, Variant::Mae)
            .into_iter()
            .filter(|s| s.name == "encoder.norm.weight" || s.name == "encoder.norm.bias")
            .collect();
        let store = ParamStore::init(&specs, 0, &dev)?;
        let w = store.var("encoder.norm.weight")?.clone();
        let b = store.var("encoder.norm.bias")?.clone();
        let mut opt = AdamW::new(AdamWConfig::default(), &specs, Variant::Mae);
        let loss = ((w.as_tensor() * 3.0)?.sum_all()? + (b.as_tensor() * 2.0)?.sum_all()?)?;
        let grads = named_grads(&store, &loss.backward()?);
        opt.step(&store, &grads, 0.1)?;
        // step 1: m_hat = g, v_hat = g^2 -> u = g/(|g| + eps) = 1 (+ wd * p for the decayed scale)
        let w1 = w.as_tensor().to_vec1::<f32>()?[0];
        let b1 = b.as_tensor().to_vec1::<f32>()?[0];
        let expect_w = 1.0 - 0.1 * (3.0 / (3.0 + 1e-8) + 0.05 * 1.0);
        assert!((w1 as f64 - expect_w).abs() < 1e-6, "{w1} vs {expect_w}");
        assert!(
            (b1 as f64 + 0.1 * (2.0 / (2.0 + 1e-8))).abs() < 1e-6,
            "{b1}"
        );
        // state round trip
        let (t, meta) = opt.state(&dev)?;
        let mut fresh = AdamW::new(AdamWConfig::default(), &specs, Variant::Mae);
        fresh.load_state(&t, &meta, "test")?;
        assert_eq!(fresh.step_count(), 1);
        let mut t2 = t.clone();
        t2.remove("m.encoder.norm.bias");
        let e = fresh
            .load_state(&t2, &meta, "opt.safetensors")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m.encoder.norm.bias") && e.contains("opt.safetensors"),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn large_weights_update_every_element_by_the_formula() -> anyhow::Result<()> {
        // a weight spanning several parallel chunks (and a partial last one), two steps, compared
        // bit for bit with a sequential evaluation of the same f32 formula
        let dev = Device::Cpu;
        let mut spec = param_specs(&M3aeConfig::preset("tiny")?, Variant::Mae)
            .into_iter()
            .find(|s| s.name.ends_with("qkv.weight"))
            .expect("tiny has a qkv weight");
        spec.shape = vec![3, UPDATE_CHUNK - 5];
        let specs = vec![spec.clone()];
        let store = ParamStore::init(&specs, 3, &dev)?;
        let w = store.var(&spec.name)?.clone();
        let n = spec.numel();
        let coef: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 201) as f32 / 50.0 - 2.0)
            .collect();
        let coef = Tensor::from_vec(coef, w.shape(), &dev)?;
        let cfg = AdamWConfig::default();
        let mut opt = AdamW::new(cfg, &specs, Variant::Mae);
        let decay = if opt.decayed().count() == 1 {
            cfg.weight_decay as f32
        } else {
            0.0
        };
        let mut p = w.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        for t in 1..=2 {
            let loss = (w.as_tensor() * &coef)?.sqr()?.sum_all()?;
            let grads = named_grads(&store, &loss.backward()?);
            let g = grads[&spec.name].flatten_all()?.to_vec1::<f32>()?;
            opt.step(&store, &grads, 0.01)?;
            let (b1, b2) = (cfg.b1 as f32, cfg.b2 as f32);
            let inv_bc1 = (1.0 / (1.0 - cfg.b1.powi(t))) as f32;
            let inv_bc2 = (1.0 / (1.0 - cfg.b2.powi(t))) as f32;
            for i in 0..n {
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let u =
                    (m[i] * inv_bc1) / ((v[i] * inv_bc2).sqrt() + cfg.eps as f32) + decay * p[i];
                p[i] -= 0.01 * u;
            }
            let got = w.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            for i in 0..n {
                assert_eq!(got[i].to_bits(), p[i].to_bits(), "step {t}, element {i}");
            }
        }
        Ok(())
    }

    #[test]
    fn a_strided_gradient_updates_like_a_contiguous_one() -> anyhow::Result<()> {
        // the in-place update reads contiguous gradients only; a transposed view of the same
        // values is made contiguous first and must give the same bits
        let dev = Device::Cpu;
        let spec = param_specs(&M3aeConfig::preset("tiny")?, Variant::Mae)
            .into_iter()
            .find(|s| s.name.ends_with("qkv.weight"))
            .expect("tiny has a qkv weight");
        let specs = vec![spec.clone()];
        let (a, b) = (
            ParamStore::init(&specs, 5, &dev)?,
            ParamStore::init(&specs, 5, &dev)?,
        );
        let (mut oa, mut ob) = (
            AdamW::new(AdamWConfig::default(), &specs, Variant::Mae),
            AdamW::new(AdamWConfig::default(), &specs, Variant::Mae),
        );
        for step in 0..2 {
            let w = a.var(&spec.name)?.as_tensor();
            let g = (w.sin()? * (step as f64 + 1.5))?.contiguous()?;
            let strided = g.t()?.contiguous()?.t()?;
            assert!(!strided.is_contiguous());
            oa.step(&a, &BTreeMap::from([(spec.name.clone(), g)]), 0.01)?;
            ob.step(&b, &BTreeMap::from([(spec.name.clone(), strided)]), 0.01)?;
            let bits = |s: &ParamStore| -> anyhow::Result<Vec<u32>> {
                let v = s.var(&spec.name)?.as_tensor().flatten_all()?;
                Ok(v.to_vec1::<f32>()?.iter().map(|x| x.to_bits()).collect())
            };
            assert_eq!(bits(&a)?, bits(&b)?, "step {step}");
        }
        Ok(())
    }

    #[test]
    fn groups_scale_the_learning_rate_and_clip_apart() -> anyhow::Result<()> {
        // two weights: the bias at lr scale 0.25 moves a quarter as far as at scale 1 (step 1
        // of Adam moves every element by lr * scale); clipping groups are clipped apart
        let dev = Device::Cpu;
        let specs: Vec<ParamSpec> = param_specs(&M3aeConfig::preset("tiny")?, Variant::Mae)
            .into_iter()
            .filter(|s| s.name == "encoder.norm.weight" || s.name == "encoder.norm.bias")
            .collect();
        let group = |lr_scale, clip_group| ParamGroup {
            lr_scale,
            decayed: false,
            clip_group,
        };
        let groups = BTreeMap::from([
            ("encoder.norm.weight".to_string(), group(1.0, 0)),
            ("encoder.norm.bias".to_string(), group(0.25, 1)),
        ]);
        let store = ParamStore::init(&specs, 0, &dev)?;
        let (w, b) = (
            store.var("encoder.norm.weight")?.clone(),
            store.var("encoder.norm.bias")?.clone(),
        );
        let mut opt = AdamW::with_groups(AdamWConfig::default(), &specs, &groups);
        assert_eq!(opt.decayed().count(), 0);
        let loss = ((w.as_tensor() * 3.0)?.sum_all()? + (b.as_tensor() * 2.0)?.sum_all()?)?;
        let mut grads = named_grads(&store, &loss.backward()?);
        opt.step(&store, &grads, 0.1)?;
        let (w1, b1) = (
            w.as_tensor().to_vec1::<f32>()?[0],
            b.as_tensor().to_vec1::<f32>()?[0],
        );
        assert!((w1 as f64 - (1.0 - 0.1)).abs() < 1e-6, "{w1}");
        assert!((b1 as f64 + 0.025).abs() < 1e-6, "{b1}");
        // grads: 3 per element of the weight (128), 2 per element of the bias (128)
        let n = clip_group_norms(&mut grads, &groups, 1.0)?;
        let expect = (128.0f64 * (9.0 + 4.0)).sqrt();
        assert!((n - expect).abs() < 1e-3, "{n} vs {expect}");
        for name in ["encoder.norm.weight", "encoder.norm.bias"] {
            let one = BTreeMap::from([(name.to_string(), grads[name].clone())]);
            assert!((global_norm(&one)? - 1.0).abs() < 1e-5, "{name}");
        }
        Ok(())
    }

    #[test]
    fn clipping_scales_to_the_max_norm() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let specs: Vec<ParamSpec> = param_specs(&M3aeConfig::preset("tiny")?, Variant::Mae)
            .into_iter()
            .filter(|s| s.name == "encoder.norm.bias")
            .collect();
        let store = ParamStore::init(&specs, 0, &dev)?;
        let b = store.var("encoder.norm.bias")?;
        let g = (b.as_tensor() + 1.0)?.sqr()?.sum_all()?.backward()?; // grad = 2 per element
        let mut grads = named_grads(&store, &g);
        let n = clip_global_norm(&mut grads, 1.0)?;
        assert!((n - 2.0 * (128f64).sqrt()).abs() < 1e-4);
        assert!((global_norm(&grads)? - 1.0).abs() < 1e-5);
        Ok(())
    }

    /// Max relative difference `|a - b| / max(|a|, |b|, 1e-30)` over two tensors.
    fn max_rel(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
        let a = a.flatten_all()?.to_vec1::<f32>()?;
        let b = b.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(a.len(), b.len());
        Ok(a.iter()
            .zip(&b)
            .map(|(&x, &y)| {
                let (x, y) = (x as f64, y as f64);
                (x - y).abs() / x.abs().max(y.abs()).max(1e-30)
            })
            .fold(0.0, f64::max))
    }

    #[test]
    fn the_tensor_path_matches_the_host_path_with_groups_clipping_and_decay() -> anyhow::Result<()>
    {
        // the device path, run on the CPU: four steps of two optimisers over identical weights
        // and identical gradients (decayed and undecayed weights, two lr scales, two clipping
        // groups that both clip), then a state round trip between the paths
        let dev = Device::Cpu;
        let cfg = M3aeConfig::preset("tiny")?;
        let specs: Vec<ParamSpec> = param_specs(&cfg, Variant::Mae)
            .into_iter()
            .filter(|s| s.name.starts_with("encoder.blocks.0.") || s.name == "cls_token")
            .collect();
        let groups: BTreeMap<String, ParamGroup> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let g = ParamGroup {
                    lr_scale: if i % 2 == 0 { 1.0 } else { 0.5 },
                    decayed: s.shape.len() > 1,
                    clip_group: i % 2,
                };
                (s.name.clone(), g)
            })
            .collect();
        let adam = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let host_store = ParamStore::init(&specs, 7, &dev)?;
        let tensor_store = ParamStore::init(&specs, 7, &dev)?;
        let mut host = AdamW::with_groups(adam, &specs, &groups);
        let mut tensor = AdamW::with_groups(adam, &specs, &groups);
        tensor.set_path(Some(UpdatePath::Tensor));
        assert_eq!(host.path_for(&dev), UpdatePath::Host);
        assert_eq!(tensor.path_for(&dev), UpdatePath::Tensor);
        let grads_at = |step: u64| -> anyhow::Result<NamedGrads> {
            // gradients of a fixed shape per step: sin of the element index and step, large
            // enough that both clipping groups clip
            specs
                .iter()
                .map(|s| {
                    let n = s.numel();
                    let v: Vec<f32> = (0..n)
                        .map(|i| ((i as f32 * 0.37 + step as f32 * 1.3).sin()) * 3.0)
                        .collect();
                    Ok((s.name.clone(), Tensor::from_vec(v, s.shape.clone(), &dev)?))
                })
                .collect()
        };
        for step in 0..4 {
            let mut gh = grads_at(step)?;
            let mut gt = grads_at(step)?;
            let nh = clip_group_norms_on(&mut gh, &groups, 1.0, UpdatePath::Host)?;
            let nt = clip_group_norms_on(&mut gt, &groups, 1.0, UpdatePath::Tensor)?;
            assert!(nh > 2.0, "both groups clip: {nh}");
            assert!((nh - nt).abs() / nh < 1e-12, "norms {nh} vs {nt}");
            for (name, g) in &gh {
                assert!(max_rel(g, &gt[name])? < 1e-6, "clipped {name}");
            }
            host.step(&host_store, &gh, 0.05)?;
            tensor.step(&tensor_store, &gt, 0.05)?;
            for (name, var) in host_store.vars() {
                let other = tensor_store.var(name)?;
                let r = max_rel(var.as_tensor(), other.as_tensor())?;
                assert!(r < 1e-6, "step {step}, {name}: relative difference {r}");
            }
        }
        // the state reads the same from both paths and restores into either
        let (th, meta) = host.state(&dev)?;
        let (tt, meta_t) = tensor.state(&dev)?;
        assert_eq!(meta, meta_t);
        for (k, t) in &th {
            assert_eq!(t.dims(), tt[k].dims(), "{k}");
            assert!(max_rel(t, &tt[k])? < 1e-6, "{k}");
        }
        let mut from_tensor = AdamW::with_groups(adam, &specs, &groups);
        from_tensor.load_state(&tt, &meta_t, "tensor state")?;
        let mut onto_tensor = AdamW::with_groups(adam, &specs, &groups);
        onto_tensor.set_path(Some(UpdatePath::Tensor));
        onto_tensor.load_state(&th, &meta, "host state")?;
        assert_eq!(onto_tensor.step_count(), 4);
        let g = grads_at(4)?;
        let a = ParamStore::init(&specs, 9, &dev)?;
        let b = ParamStore::init(&specs, 9, &dev)?;
        from_tensor.step(&a, &g, 0.05)?;
        onto_tensor.step(&b, &g, 0.05)?;
        for (name, var) in a.vars() {
            assert!(
                max_rel(var.as_tensor(), b.var(name)?.as_tensor())? < 1e-6,
                "{name}"
            );
        }
        // a missing gradient is an error on the tensor path too
        let mut partial = g.clone();
        partial.remove("cls_token");
        let e = onto_tensor
            .step(&b, &partial, 0.05)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cls_token"), "{e}");
        Ok(())
    }
}
