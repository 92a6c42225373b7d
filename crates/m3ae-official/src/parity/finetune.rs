//! The checks of a fine-tuning fixture (`official_finetune`: `vit_params`, `vit_io`,
//! `vit_grads` safetensors, `layer_decay.json`, `mixup.json`, `config.json`): the classifier
//! loaded from the official `ViTClassifier` params (the base model's decoder tensors are not
//! loaded), its representation, pooled features, logits, log-probabilities, losses and
//! accuracy for every pooling of `config.json`'s `global_pool`, the gradients of the
//! smoothed loss (the decoder's must be exactly zero in the fixture and have no counterpart
//! here), the official layer-decay table and the intended weight-decay mask of every param,
//! and the Mixup / CutMix arithmetic of `mixup.json` with its draws injected.

use super::compare::{compare, Check, Tolerance};
use super::fixture::{overlay, FixtureFile};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
use m3ae_data::mixup::{cutmix_box, mix_with, MixChoice, MixupConfig};
use m3ae_kernels::KernelPath;
use m3ae_model::layer_decay::{finetune_weight_decay, layer_id, lr_scale, LayerDecayRule};
use m3ae_model::{
    patchify, smooth_labels, soft_cross_entropy, top1_accuracy, Classifier, ClassifierConfig,
    M3aeConfig, Pooling, Unexpected,
};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// The files that make a folder a fine-tuning fixture.
const FILES: [&str; 4] = [
    "vit_params.safetensors",
    "vit_io.safetensors",
    "vit_grads.safetensors",
    "layer_decay.json",
];

/// Whether `dir` holds a fine-tuning fixture (recognised by its files).
pub fn is_finetune_fixture(dir: &Path) -> bool {
    FILES.iter().all(|f| dir.join(f).is_file())
}

/// The settings of a fine-tuning fixture, all from its `config.json`.
#[derive(Debug, Clone)]
pub struct FinetuneConfig {
    /// The base model (`model` and `resolved_model_config` over the defaults, with
    /// `patch_size` and `image_size`).
    pub model: M3aeConfig,
    /// Classes of the head.
    pub num_classes: usize,
    /// The poolings checked (`global_pool`: false = cls, true = mean).
    pub poolings: Vec<Pooling>,
    /// Layer-wise learning-rate decay.
    pub layer_decay: f64,
    /// Label smoothing of the differentiated loss (`loss_smoothing_for_grads`).
    pub smoothing: f64,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        error: e,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        origin: path.display().to_string(),
        msg: e.to_string(),
    })
}

fn field<'a>(j: &'a Value, key: &str, origin: &str) -> Result<&'a Value> {
    j.get(key)
        .ok_or_else(|| Error::Fixture(format!("{origin}: no field `{key}`")))
}

fn number(j: &Value, key: &str, origin: &str) -> Result<f64> {
    field(j, key, origin)?
        .as_f64()
        .ok_or_else(|| Error::Fixture(format!("{origin}: `{key}` is not a number")))
}

fn count(j: &Value, key: &str, origin: &str) -> Result<usize> {
    field(j, key, origin)?
        .as_u64()
        .map(|v| v as usize)
        .ok_or_else(|| Error::Fixture(format!("{origin}: `{key}` is not a count")))
}

impl FinetuneConfig {
    /// Reads `config.json` of a fine-tuning fixture folder.
    pub fn read(dir: &Path) -> Result<Self> {
        let j = read_json(&dir.join("config.json"))?;
        let o = "config.json";
        let base = M3aeConfig {
            model_type: None,
            ..M3aeConfig::default()
        };
        let extra = [
            ("patch_size", field(&j, "patch_size", o)?.clone()),
            ("image_size", field(&j, "image_size", o)?.clone()),
        ];
        let model = overlay(&base, field(&j, "model", o)?, &extra)?;
        let model = match j.get("resolved_model_config") {
            Some(r) => overlay(&model, r, &extra)?,
            None => model,
        };
        let poolings = match j.get("global_pool") {
            None => vec![Pooling::Cls],
            Some(Value::Bool(b)) => vec![if *b { Pooling::Mean } else { Pooling::Cls }],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v.as_bool() {
                    Some(true) => Ok(Pooling::Mean),
                    Some(false) => Ok(Pooling::Cls),
                    None => Err(Error::Fixture(format!(
                        "{o}: global_pool {v} is not a bool"
                    ))),
                })
                .collect::<Result<_>>()?,
            Some(v) => {
                return Err(Error::Fixture(format!(
                    "{o}: global_pool {v} is not a bool or a list"
                )))
            }
        };
        Ok(Self {
            model,
            num_classes: count(&j, "num_classes", o)?,
            poolings,
            layer_decay: number(&j, "layer_decay", o)?,
            smoothing: number(&j, "loss_smoothing_for_grads", o)?,
        })
    }
}

/// Key prefix of a pooling in `vit_io` and of its gradients in `vit_grads`.
fn prefixes(pooling: Pooling) -> (&'static str, &'static str) {
    match pooling {
        Pooling::Cls => ("cls", "grad."),
        Pooling::Mean => ("gp", "grad_gp."),
    }
}

/// A check that failed or passed without a tensor comparison.
fn fact(name: String, ok: bool, tolerance: &str, note: String) -> Check {
    Check {
        name,
        max_abs_err: if ok { 0.0 } else { f64::NAN },
        tolerance: tolerance.into(),
        ok,
        note,
    }
}

/// Whether an official param key (`params.base_model.…`) belongs to the base model's decoder
/// side (what the classifier never uses).
fn is_decoder_side(key: &str) -> bool {
    let name = key.strip_prefix("params.").unwrap_or(key);
    match name.strip_prefix("base_model.") {
        Some(rest) => rest.starts_with("decoder") || rest.starts_with("image_mask_embedding"),
        None => false,
    }
}

/// Runs every check of a fine-tuning fixture folder on `kernels`.
pub fn run(dir: &Path, kernels: KernelPath) -> Result<Vec<Check>> {
    let dev = Device::Cpu;
    let mut fc = FinetuneConfig::read(dir)?;
    fc.model.kernels = kernels;
    let mut out = Vec::new();
    let env = super::fixture::Env::cpu();
    let params = FixtureFile::open(dir, "vit_params", &env)?.tensors;
    let mut io = FixtureFile::open(dir, "vit_io", &env)?;
    let mut grads = FixtureFile::open(dir, "vit_grads", &env)?;

    let image = io.get("input.image")?;
    let patches = io.get("input.image_patches")?;
    out.push(compare(
        "vit_io:input.image_patches (vs patchify(input.image))",
        &patchify(&image, fc.model.patch_size)?,
        &patches,
        Tolerance::Exact,
    ));
    let labels: Vec<u32> = io
        .get("input.labels")?
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?
        .into_iter()
        .map(|l| {
            u32::try_from(l).map_err(|_| Error::Fixture(format!("vit_io: label {l} is negative")))
        })
        .collect::<Result<_>>()?;
    let soft_labels = io.get("input.soft_labels")?;

    let mut left_out: Option<Vec<String>> = None;
    for (i, &pooling) in fc.poolings.iter().enumerate() {
        let cfg = ClassifierConfig {
            num_classes: fc.num_classes,
            pooling,
        };
        let clf = Classifier::from_official(
            &fc.model,
            cfg,
            params.clone(),
            Unexpected::Ignore,
            "vit_params.safetensors",
            &dev,
        )?;
        let specs = clf.specs();
        let ours: BTreeSet<String> = specs
            .iter()
            .map(|s| format!("params.{}", s.official))
            .collect();
        let mut rest: Vec<String> = params
            .keys()
            .filter(|k| !ours.contains(*k))
            .cloned()
            .collect();
        rest.sort();
        if i == 0 {
            let foreign: Vec<&String> = rest.iter().filter(|k| !is_decoder_side(k)).collect();
            out.push(fact(
                "vit_params: tensors the classifier does not load".into(),
                foreign.is_empty(),
                "decoder only",
                if foreign.is_empty() {
                    format!("{} decoder-side tensors", rest.len())
                } else {
                    format!("not decoder-side: {foreign:?}")
                },
            ));
            io.check(
                &mut out,
                "repr.output",
                &clf.forward_representation(&patches)?,
                Tolerance::FORWARD,
            );
        }
        let (p, gp) = prefixes(pooling);
        let (z, logits) = clf.forward_with_features(&patches)?;
        io.check(&mut out, &format!("{p}.features"), &z, Tolerance::FORWARD);
        io.check(
            &mut out,
            &format!("{p}.logits"),
            &logits,
            Tolerance::FORWARD,
        );
        let log_probs = log_softmax(&logits)?;
        io.check(
            &mut out,
            &format!("{p}.log_probs"),
            &log_probs,
            Tolerance::FORWARD,
        );
        let hard =
            soft_cross_entropy(&logits, &smooth_labels(&labels, fc.num_classes, 0.0, &dev)?)?;
        io.check(
            &mut out,
            &format!("{p}.loss.smoothing_0"),
            &hard,
            Tolerance::LOSS,
        );
        let smoothed = soft_cross_entropy(
            &logits,
            &smooth_labels(&labels, fc.num_classes, fc.smoothing, &dev)?,
        )?;
        io.check(
            &mut out,
            &format!("{p}.loss.smoothing_{}", fc.smoothing),
            &smoothed,
            Tolerance::LOSS,
        );
        io.check(
            &mut out,
            &format!("{p}.loss.soft"),
            &soft_cross_entropy(&logits, &soft_labels)?,
            Tolerance::LOSS,
        );
        let acc = top1_accuracy(&logits, &labels)? as f32;
        io.check(
            &mut out,
            &format!("{p}.accuracy"),
            &Tensor::new(&[acc], &dev)?,
            Tolerance::Exact,
        );

        // Gradients of the smoothed loss: every classifier weight, then the fixture's other
        // tensors, which must be exactly zero there (the classifier has no such weight).
        let g = smoothed.backward()?;
        for s in &specs {
            let key = format!("{gp}params.{}", s.official);
            match g.get(clf.params().var(&s.name)?.as_tensor()) {
                Some(t) => {
                    let t = if s.transposed {
                        t.t()?.contiguous()?
                    } else {
                        t.clone()
                    };
                    grads.check(&mut out, &key, &t, Tolerance::GRAD);
                }
                None => {
                    let _ = grads.get(&key);
                    out.push(fact(
                        format!("vit_grads:{key}"),
                        false,
                        &Tolerance::GRAD.describe(),
                        format!("no gradient reached `{}`", s.name),
                    ));
                }
            }
        }
        for key in &rest {
            let gkey = format!("{gp}{key}");
            let expected = grads.get(&gkey)?;
            let mut c = compare(
                &format!("vit_grads:{gkey}"),
                &expected.zeros_like()?,
                &expected,
                Tolerance::Exact,
            );
            c.note = if c.ok {
                "zero in the fixture; not a classifier weight".into()
            } else {
                "not zero in the fixture, but the classifier has no such weight".into()
            };
            out.push(c);
        }
        left_out = Some(rest);
    }
    io.finish(&mut out);
    grads.finish(&mut out);

    layer_decay(
        &mut out,
        dir,
        &fc,
        &params,
        left_out.as_deref().unwrap_or(&[]),
    )?;
    if dir.join("mixup.json").is_file() {
        mixup(&mut out, dir)?;
    }
    Ok(out)
}

/// `log_softmax` over the last axis (max-subtracted).
fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let m = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Checks `layer_decay.json`: every param's layer id and learning-rate factor under the
/// official rule and the intended weight-decay mask against the recorded official values.
/// The classifier's weights come from its own table; the fixture's other (decoder-side)
/// params, which the classifier does not have, from the rule applied to their names.
fn layer_decay(
    out: &mut Vec<Check>,
    dir: &Path,
    fc: &FinetuneConfig,
    params: &HashMap<String, Tensor>,
    left_out: &[String],
) -> Result<()> {
    let o = "layer_decay.json";
    let j = read_json(&dir.join(o))?;
    let depth = fc.model.depth;
    let decay = fc.layer_decay;
    let num_layer = count(&j, "num_layer", o)?;
    out.push(fact(
        format!("{o}:num_layer"),
        num_layer == depth + 1,
        "exact",
        format!("fixture {num_layer}, ours depth + 1 = {}", depth + 1),
    ));
    let by_id = field(&j, "lr_scale_by_layer_id", o)?
        .as_object()
        .ok_or_else(|| Error::Fixture(format!("{o}: lr_scale_by_layer_id is not a map")))?;
    let mut max_err = 0f64;
    let mut ok = by_id.len() == depth + 2;
    for (k, v) in by_id {
        let id: usize = k
            .parse()
            .map_err(|_| Error::Fixture(format!("{o}: layer id `{k}`")))?;
        let want = v
            .as_f64()
            .ok_or_else(|| Error::Fixture(format!("{o}: lr scale of layer {k}")))?;
        let err = (lr_scale(id, depth, decay) - want).abs();
        max_err = max_err.max(err);
        ok &= err <= 1e-12 * want.abs();
    }
    out.push(Check {
        name: format!("{o}:lr_scale_by_layer_id"),
        max_abs_err: max_err,
        tolerance: "1e-12|b|".into(),
        ok,
        note: String::new(),
    });

    let cfg = ClassifierConfig {
        num_classes: fc.num_classes,
        pooling: Pooling::Cls,
    };
    let clf = Classifier::from_official(
        &fc.model,
        cfg,
        params.clone(),
        Unexpected::Ignore,
        "vit_params.safetensors",
        &Device::Cpu,
    )?;
    let specs = clf.specs();
    let table = clf.layer_decay(decay, LayerDecayRule::Official);
    let recorded = field(&j, "params", o)?
        .as_object()
        .ok_or_else(|| Error::Fixture(format!("{o}: params is not a map")))?;
    let mut seen = BTreeSet::new();
    for (key, rec) in recorded {
        let origin = format!("{o}: {key}");
        let want_id = count(rec, "layer_id", &origin)?;
        let want_scale = number(rec, "lr_scale", &origin)?;
        let want_wd = field(rec, "weight_decay", &origin)?
            .as_bool()
            .ok_or_else(|| Error::Fixture(format!("{origin}: weight_decay is not a bool")))?;
        let want_shape: Vec<usize> = serde_json::from_value(field(rec, "shape", &origin)?.clone())
            .map_err(|e| Error::Json {
                origin: format!("{origin}: shape"),
                msg: e.to_string(),
            })?;
        let name = key.strip_prefix("params.").unwrap_or(key);
        let (id, scale, wd, shape_ok, whose) = match specs.iter().position(|s| s.official == name) {
            Some(i) => {
                seen.insert(name.to_string());
                let r = &table[i];
                (
                    r.layer_id,
                    r.lr_scale,
                    r.weight_decay,
                    specs[i].official_shape() == want_shape,
                    "",
                )
            }
            None => {
                let id = layer_id(key, depth, LayerDecayRule::Official);
                let whose = if left_out.contains(key) {
                    "; not a classifier weight: rule applied to the name"
                } else {
                    "; not in vit_params"
                };
                (
                    id,
                    lr_scale(id, depth, decay),
                    finetune_weight_decay(key, want_shape.len()),
                    left_out.contains(key),
                    whose,
                )
            }
        };
        let err = (scale - want_scale).abs();
        let ok = id == want_id && wd == want_wd && shape_ok && err <= 1e-12 * want_scale.abs();
        out.push(Check {
            name: format!("layer_decay:{key}"),
            max_abs_err: err,
            tolerance: "id, wd exact; 1e-12|b|".into(),
            ok,
            note: if ok {
                format!("id {id}, scale {scale}, wd {wd}{whose}")
            } else {
                format!(
                    "ours id {id} scale {scale} wd {wd} (shape ok: {shape_ok}), official id \
                     {want_id} scale {want_scale} wd {want_wd}{whose}"
                )
            },
        });
    }
    for s in &specs {
        if !seen.contains(&s.official) {
            out.push(fact(
                format!("layer_decay:params.{}", s.official),
                false,
                "-",
                "a classifier weight the fixture's table does not have".into(),
            ));
        }
    }
    Ok(())
}

/// A nested JSON array of numbers as a tensor.
fn json_tensor(v: &Value, origin: &str) -> Result<Tensor> {
    let mut shape = Vec::new();
    let mut cur = v;
    while let Value::Array(a) = cur {
        shape.push(a.len());
        match a.first() {
            Some(x) => cur = x,
            None => break,
        }
    }
    let mut flat = Vec::new();
    fn walk(v: &Value, flat: &mut Vec<f32>) -> bool {
        match v {
            Value::Array(a) => a.iter().all(|x| walk(x, flat)),
            Value::Number(n) => n.as_f64().map(|x| flat.push(x as f32)).is_some(),
            Value::Bool(b) => {
                flat.push(f32::from(u8::from(*b)));
                true
            }
            _ => false,
        }
    }
    if !walk(v, &mut flat) || flat.len() != shape.iter().product::<usize>() {
        return Err(Error::Fixture(format!(
            "{origin}: not a rectangular array of numbers"
        )));
    }
    Ok(Tensor::from_vec(flat, shape, &Device::Cpu)?)
}

/// Checks `mixup.json`: the mixed labels and images of its Mixup, CutMix and default-flags
/// cases with their draws (lambda, box centre, switch draw) injected, the CutMix box, mask and
/// label weight.
fn mixup(out: &mut Vec<Check>, dir: &Path) -> Result<()> {
    let o = "mixup.json";
    let j = read_json(&dir.join(o))?;
    let images = json_tensor(field(&j, "images", o)?, o)?;
    let labels: Vec<u32> =
        serde_json::from_value(field(&j, "labels", o)?.clone()).map_err(|e| Error::Json {
            origin: format!("{o}: labels"),
            msg: e.to_string(),
        })?;
    let classes = count(&j, "num_classes", o)?;
    let smoothing = number(&j, "label_smoothing", o)?;
    let switch_prob = number(&j, "switch_prob", o)?;
    let (_, h, w, _) = images.dims4()?;
    for case in ["mixup", "cutmix", "default_flags"] {
        let Some(c) = j.get(case) else { continue };
        let origin = format!("{o}: {case}");
        let cfg = MixupConfig {
            mixup_alpha: number(c, "mixup_alpha", &origin)?,
            cutmix_alpha: number(c, "cutmix_alpha", &origin)?,
            switch_prob,
            label_smoothing: smoothing,
        };
        let u = c.get("switch_rand").and_then(Value::as_f64).unwrap_or(0.0);
        let cutmix = cfg.use_cutmix(u);
        if let Some(branch) = c.get("branch").and_then(Value::as_str) {
            let ours = if cutmix { "cutmix" } else { "mixup" };
            out.push(fact(
                format!("mixup:{case}.branch"),
                ours == branch,
                "exact",
                format!("switch draw {u}: ours {ours}, official {branch}"),
            ));
        }
        let choice = if cutmix {
            MixChoice::Cutmix {
                lambda: number(c, "cutmix_lambda_sampled", &origin)?,
                cy: count(c, "cy", &origin)?,
                cx: count(c, "cx", &origin)?,
            }
        } else {
            MixChoice::Mixup {
                lambda: number(c, "lambda", &origin)?,
            }
        };
        let mixed = mix_with(&images, &labels, classes, smoothing, choice)?;
        if let MixChoice::Cutmix { lambda, cy, cx } = choice {
            let b = cutmix_box(h, w, lambda, cy, cx);
            let want = field(c, "box", &origin)?;
            let want = [
                count(want, "y_min", &origin)?,
                count(want, "y_max", &origin)?,
                count(want, "x_min", &origin)?,
                count(want, "x_max", &origin)?,
            ];
            let ours = [b.y0, b.y1, b.x0, b.x1];
            out.push(fact(
                format!("mixup:{case}.box"),
                ours == want,
                "exact",
                format!("ours {ours:?}, official {want:?} (y0, y1, x0, x1)"),
            ));
            if let Some(m) = c.get("box_mask_1_is_pasted_from_reversed_batch") {
                let mut mask = vec![0f32; h * w];
                for y in b.y0..b.y1 {
                    for x in b.x0..b.x1 {
                        mask[y * w + x] = 1.0;
                    }
                }
                out.push(compare(
                    &format!("mixup:{case}.box_mask"),
                    &Tensor::from_vec(mask, (h, w), &Device::Cpu)?,
                    &json_tensor(m, &origin)?,
                    Tolerance::Exact,
                ));
            }
            let want_w = number(c, "label_weight", &origin)?;
            out.push(compare(
                &format!("mixup:{case}.label_weight"),
                &Tensor::new(&[mixed.weight], &Device::Cpu)?,
                &Tensor::new(&[want_w], &Device::Cpu)?,
                Tolerance::LOSS,
            ));
        }
        out.push(compare(
            &format!("mixup:{case}.mixed_labels"),
            &mixed.labels,
            &json_tensor(field(c, "mixed_labels", &origin)?, &origin)?,
            Tolerance::FORWARD,
        ));
        if let Some(m) = c.get("mixed_images") {
            out.push(compare(
                &format!("mixup:{case}.mixed_images"),
                &mixed.images,
                &json_tensor(m, &origin)?,
                Tolerance::FORWARD,
            ));
        }
    }
    Ok(())
}
