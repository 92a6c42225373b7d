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

/// Weights updated per rayon task by [`AdamW::step`].
const UPDATE_CHUNK: usize = 1 << 14;

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

#[derive(Debug, Clone)]
struct Slot {
    decayed: bool,
    lr_scale: f64,
    m: Vec<f32>,
    v: Vec<f32>,
}

/// AdamW over the weights of one model.
#[derive(Debug, Clone)]
pub struct AdamW {
    cfg: AdamWConfig,
    step: u64,
    slots: BTreeMap<String, Slot>,
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
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                    },
                )
            })
            .collect();
        Self {
            cfg,
            step: 0,
            slots,
        }
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
        let (b1, b2) = (self.cfg.b1 as f32, self.cfg.b2 as f32);
        let bc1 = 1.0 - self.cfg.b1.powi(t);
        let bc2 = 1.0 - self.cfg.b2.powi(t);
        let (eps, wd) = (self.cfg.eps as f32, self.cfg.weight_decay as f32);
        let (inv_bc1, inv_bc2) = ((1.0 / bc1) as f32, (1.0 / bc2) as f32);
        for (name, var) in params.vars() {
            let slot = self.slots.get_mut(name).ok_or_else(|| {
                Error::State(format!("optimizer has no state for weight `{name}`"))
            })?;
            let g = grads
                .get(name)
                .ok_or_else(|| Error::State(format!("no gradient for weight `{name}`")))?;
            let decay = if slot.decayed { wd } else { 0.0 };
            let lr = (lr * slot.lr_scale) as f32;
            let new = m3ae_kernels::with_f32_slice(var.as_tensor(), |p| {
                m3ae_kernels::with_f32_slice(g, |g| {
                    let mut out = vec![0f32; p.len()];
                    // Element-wise, so the result does not depend on how rayon splits the chunks.
                    out.par_chunks_mut(UPDATE_CHUNK)
                        .zip(slot.m.par_chunks_mut(UPDATE_CHUNK))
                        .zip(slot.v.par_chunks_mut(UPDATE_CHUNK))
                        .enumerate()
                        .for_each(|(c, ((out, ms), vs))| {
                            let lo = c * UPDATE_CHUNK;
                            let (p, g) = (&p[lo..lo + out.len()], &g[lo..lo + out.len()]);
                            for i in 0..out.len() {
                                let gi = g[i];
                                let m = b1 * ms[i] + (1.0 - b1) * gi;
                                let v = b2 * vs[i] + (1.0 - b2) * gi * gi;
                                ms[i] = m;
                                vs[i] = v;
                                let u = (m * inv_bc1) / ((v * inv_bc2).sqrt() + eps) + decay * p[i];
                                out[i] = p[i] - lr * u;
                            }
                        });
                    out
                })
            })??;
            var.set(&Tensor::from_vec(new, var.shape(), var.device())?)?;
        }
        Ok(())
    }

    /// The state as tensors (`m.{name}`, `v.{name}`) and metadata (`step`, hyper-parameters).
    pub fn state(
        &self,
        device: &Device,
    ) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
        let mut t = HashMap::new();
        for (name, s) in &self.slots {
            t.insert(
                format!("m.{name}"),
                Tensor::from_slice(&s.m, s.m.len(), device)?,
            );
            t.insert(
                format!("v.{name}"),
                Tensor::from_slice(&s.v, s.v.len(), device)?,
            );
        }
        let meta = HashMap::from([
            ("step".to_string(), self.step.to_string()),
            ("adamw".to_string(), serde_json::to_string(&self.cfg)?),
        ]);
        Ok((t, meta))
    }

    /// Restores a state written by [`AdamW::state`]; every slot must be present with its size.
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
        for (name, s) in self.slots.iter_mut() {
            for (key, dst) in [
                (format!("m.{name}"), &mut s.m),
                (format!("v.{name}"), &mut s.v),
            ] {
                let t = tensors.get(&key).ok_or_else(|| {
                    Error::State(format!("{source}: missing optimizer tensor `{key}`"))
                })?;
                let v = t.flatten_all()?.to_vec1::<f32>()?;
                if v.len() != dst.len() {
                    return Err(Error::State(format!(
                        "{source}: optimizer tensor `{key}` has {} values, expected {}",
                        v.len(),
                        dst.len()
                    )));
                }
                *dst = v;
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

/// Global L2 norm of a set of gradients (NaN or infinite when any element is).
pub fn global_norm(grads: &NamedGrads) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.values() {
        sq += m3ae_kernels::with_f32_slice(g, |g| {
            g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()
        })?;
    }
    Ok(sq.sqrt())
}

/// `clip_by_global_norm` per clipping group: each group whose joint norm exceeds `max_norm` is
/// scaled by `max_norm / norm` (weights missing from `groups` form group 0). Returns the global
/// norm of all gradients before clipping. With one group this is [`clip_global_norm`].
pub fn clip_group_norms(
    grads: &mut NamedGrads,
    groups: &BTreeMap<String, ParamGroup>,
    max_norm: f64,
) -> Result<f64> {
    let group_of = |name: &str| groups.get(name).map_or(0, |g| g.clip_group);
    let first = grads.keys().next().map_or(0, |n| group_of(n));
    if grads.keys().all(|n| group_of(n) == first) {
        return clip_global_norm(grads, max_norm);
    }
    let mut by_group: BTreeMap<usize, NamedGrads> = BTreeMap::new();
    for (name, g) in std::mem::take(grads) {
        by_group.entry(group_of(&name)).or_default().insert(name, g);
    }
    let mut sq = 0f64;
    for mut part in by_group.into_values() {
        let n = clip_global_norm(&mut part, max_norm)?;
        sq += n * n;
        grads.extend(part);
    }
    Ok(sq.sqrt())
}

/// `clip_by_global_norm`: when the global norm exceeds `max_norm`, scales every gradient by
/// `max_norm / norm`. Returns the norm before clipping.
pub fn clip_global_norm(grads: &mut NamedGrads, max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
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
}
