//! Comparison of this implementation against golden outputs of the official JAX code.
//!
//! A fixture folder holds `config.json`, `m3ae_params` / `m3ae_io` / `m3ae_grads`,
//! `mae_params` / `mae_io` / `mae_grads` and `linear_probe` safetensors files (the layout of
//! `tests/fixtures/official_tiny`, whose README describes every tensor). [`run`] loads the
//! official params through the name mapping, replays the fixture's noise, recomputes every tensor
//! and returns one [`Check`] per fixture tensor; a tensor of the files that no check consumed is
//! reported as a failure, so nothing is left unchecked silently.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use m3ae_kernels::KernelPath;
use m3ae_model::{
    param_specs, patchify, pool, posemb, M3ae, M3aeConfig, Mae, Masking, ModelInput, Noise,
    Pooling, Unexpected, Variant,
};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// How two tensors are compared.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Tolerance {
    /// Bit-for-bit (integer tensors and 0/1 masks).
    Exact,
    /// Elementwise `|a - b| <= atol + rtol |b|`.
    Elementwise {
        /// Absolute part.
        atol: f64,
        /// Relative part.
        rtol: f64,
    },
    /// Gradients: `|a - b| <= scale * max|b| + rtol |b|` per tensor.
    Gradient {
        /// Multiple of the tensor's largest magnitude.
        scale: f64,
        /// Relative part.
        rtol: f64,
    },
}

impl Tolerance {
    /// Forward tensors: `1e-5 + 1e-4 |b|`.
    pub const FORWARD: Tolerance = Tolerance::Elementwise {
        atol: 1e-5,
        rtol: 1e-4,
    };
    /// Losses and accuracies: relative `1e-5`.
    pub const LOSS: Tolerance = Tolerance::Elementwise {
        atol: 0.0,
        rtol: 1e-5,
    };
    /// Gradients: `1e-4 max|b| + 1e-3 |b|`.
    pub const GRAD: Tolerance = Tolerance::Gradient {
        scale: 1e-4,
        rtol: 1e-3,
    };
    /// BatchNorm outputs (batch of 3, ill-conditioned): `1e-4 + 1e-3 |b|`.
    pub const BATCHNORM: Tolerance = Tolerance::Elementwise {
        atol: 1e-4,
        rtol: 1e-3,
    };

    fn describe(&self) -> String {
        match self {
            Tolerance::Exact => "exact".into(),
            Tolerance::Elementwise { atol, rtol } => format!("{atol:.0e}+{rtol:.0e}|b|"),
            Tolerance::Gradient { scale, rtol } => format!("{scale:.0e}max|b|+{rtol:.0e}|b|"),
        }
    }
}

/// The result of comparing one tensor.
#[derive(Debug, Clone)]
pub struct Check {
    /// `file:key` of the fixture tensor.
    pub name: String,
    /// Largest absolute difference (NaN when the tensor could not be computed).
    pub max_abs_err: f64,
    /// The tolerance rule.
    pub tolerance: String,
    /// Whether every element is within tolerance.
    pub ok: bool,
    /// Why it failed, when it did (shape mismatch, missing tensor, ...).
    pub note: String,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<58} max_abs_err {:>10.3e}  tol {:<18} {}{}",
            self.name,
            self.max_abs_err,
            self.tolerance,
            if self.ok { "ok" } else { "FAIL" },
            if self.note.is_empty() {
                String::new()
            } else {
                format!("  ({})", self.note)
            }
        )
    }
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    let t = match t.dtype() {
        DType::U32 | DType::U8 | DType::I32 | DType::I64 | DType::I16 => {
            t.to_dtype(DType::I64)?.to_dtype(DType::F64)?
        }
        _ => t.to_dtype(DType::F64)?,
    };
    Ok(t.flatten_all()?.to_vec1::<f64>()?)
}

/// Compares `ours` with the reference `expected` under `tol`.
pub fn compare(name: &str, ours: &Tensor, expected: &Tensor, tol: Tolerance) -> Check {
    let mut check = Check {
        name: name.into(),
        max_abs_err: f64::NAN,
        tolerance: tol.describe(),
        ok: false,
        note: String::new(),
    };
    // Scalars are stored with shape [1].
    let same_shape =
        ours.dims() == expected.dims() || ours.elem_count() == 1 && expected.elem_count() == 1;
    if !same_shape {
        check.note = format!("shape {:?} vs expected {:?}", ours.dims(), expected.dims());
        return check;
    }
    let (a, b) = match (to_f64(ours), to_f64(expected)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            check.note = e.to_string();
            return check;
        }
    };
    let max_b = b.iter().fold(0f64, |m, x| m.max(x.abs()));
    let mut max_err = 0f64;
    let mut ok = true;
    for (x, y) in a.iter().zip(&b) {
        let err = (x - y).abs();
        if !(err.is_finite()) {
            ok = false;
        }
        max_err = max_err.max(err);
        let allowed = match tol {
            Tolerance::Exact => 0.0,
            Tolerance::Elementwise { atol, rtol } => atol + rtol * y.abs(),
            Tolerance::Gradient { scale, rtol } => scale * max_b + rtol * y.abs(),
        };
        if err > allowed {
            ok = false;
        }
    }
    check.max_abs_err = max_err;
    check.ok = ok;
    check
}

/// Tensors of one fixture file, with a record of which keys were consumed.
struct FixtureFile {
    file: String,
    tensors: HashMap<String, Tensor>,
    used: BTreeSet<String>,
}

impl FixtureFile {
    fn open(dir: &Path, name: &str) -> Result<Self> {
        let path = dir.join(format!("{name}.safetensors"));
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(Self {
            file: name.into(),
            tensors,
            used: BTreeSet::new(),
        })
    }

    fn get(&mut self, key: &str) -> Result<Tensor> {
        self.used.insert(key.into());
        self.tensors
            .get(key)
            .cloned()
            .ok_or_else(|| anyhow!("{}.safetensors has no tensor `{key}`", self.file))
    }

    fn check(&mut self, out: &mut Vec<Check>, key: &str, ours: &Tensor, tol: Tolerance) {
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
    fn finish(self, out: &mut Vec<Check>) {
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

fn overlay(
    base: &M3aeConfig,
    model: &serde_json::Value,
    extra: &[(&str, serde_json::Value)],
) -> Result<M3aeConfig> {
    let mut v = serde_json::to_value(base)?;
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
    serde_json::from_value(v).context("config.json has a model field M3aeConfig does not know")
}

impl FixtureConfig {
    /// Reads `config.json` of a fixture folder.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let j: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
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
            v => Some(
                v.as_u64()
                    .ok_or_else(|| anyhow!("config.json: num_classes {v} is not a count"))?
                    as usize,
            ),
        };
        let n_pad: Vec<usize> =
            serde_json::from_value(field("n_pad")).context("config.json: n_pad")?;
        let batch = j
            .get("batch")
            .and_then(|b| b.as_u64())
            .ok_or_else(|| anyhow!("config.json: batch"))? as usize;
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

fn noise(file: &mut FixtureFile, key: &str) -> Result<Noise> {
    Ok(Noise::from_tensor(&file.get(key)?)?)
}

fn scalar_check(
    out: &mut Vec<Check>,
    f: &mut FixtureFile,
    key: &str,
    t: Option<&Tensor>,
) -> Result<()> {
    let t = t.ok_or_else(|| anyhow!("{key}: not computed"))?;
    f.check(out, key, t, Tolerance::LOSS);
    Ok(())
}

fn check_masking(out: &mut Vec<Check>, f: &mut FixtureFile, prefix: &str, m: &Masking) {
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

/// Runs every comparison of a fixture folder on the default (fused) kernels.
pub fn run(dir: &Path) -> Result<Vec<Check>> {
    run_with(dir, KernelPath::default())
}

/// Runs every comparison of a fixture folder on the given kernel path.
pub fn run_with(dir: &Path, kernels: KernelPath) -> Result<Vec<Check>> {
    let dev = Device::Cpu;
    let mut fc = FixtureConfig::read(dir)?;
    fc.m3ae.kernels = kernels;
    fc.mae.kernels = kernels;
    fc.probe.kernels = kernels;
    let mut out = Vec::new();

    // ---------------------------------------------------------------- M3AE
    let params = FixtureFile::open(dir, "m3ae_params")?;
    let mut m3ae_params = params.tensors.clone();
    let model = M3ae::from_official(
        &fc.m3ae,
        params.tensors,
        Unexpected::Error,
        "m3ae_params.safetensors",
        &dev,
    )?;
    let cfg = model.config().clone();
    let mut io = FixtureFile::open(dir, "m3ae_io")?;
    let image = io.get("input.image")?;
    let patches = patchify(&image, cfg.patch_size)?;
    io.check(
        &mut out,
        "input.image_patches",
        &patches,
        Tolerance::FORWARD,
    );
    let text = io.get("input.text")?.to_dtype(DType::U32)?;
    let pad = io.get("input.text_padding_mask")?;
    // The padding pattern must be the one config.json describes.
    let (b, t) = pad.dims2()?;
    if b != fc.batch || fc.n_pad.len() != b {
        bail!(
            "config.json batch {} / n_pad {:?} do not match input.text_padding_mask {:?}",
            fc.batch,
            fc.n_pad,
            pad.dims()
        );
    }
    let mut want = vec![0f32; b * t];
    for (i, &n) in fc.n_pad.iter().enumerate() {
        for j in t.saturating_sub(n)..t {
            want[i * t + j] = 1.0;
        }
    }
    out.push(compare(
        "config.json:n_pad (vs m3ae_io:input.text_padding_mask)",
        &pad,
        &Tensor::from_vec(want, (b, t), &dev)?,
        Tolerance::Exact,
    ));
    let li = patches.dim(1)?;
    let im = Masking::new(&noise(&mut io, "noise.image")?, b, cfg.image_keep(li), &dev)?;
    let tm = Masking::new(&noise(&mut io, "noise.text")?, b, cfg.text_keep(t), &dev)?;
    check_masking(&mut out, &mut io, "mask.image", &im);
    check_masking(&mut out, &mut io, "mask.text", &tm);
    io.check(
        &mut out,
        "mask.text_padding_mask_kept",
        &tm.keep_mask(&pad)?,
        Tolerance::Exact,
    );
    let input = ModelInput {
        image_patches: Some(patches.clone()),
        text_ids: Some(text.clone()),
        text_padding: Some(pad.clone()),
    };
    let o = model.forward(&input, Some(&im), Some(&tm))?;
    let tr = &o.trace;
    io.check(&mut out, "enc.input", &tr.enc_input, Tolerance::FORWARD);
    io.check(
        &mut out,
        "enc.padding_mask",
        tr.enc_padding
            .as_ref()
            .ok_or_else(|| anyhow!("no encoder padding"))?,
        Tolerance::Exact,
    );
    io.check(&mut out, "enc.output", &tr.enc_output, Tolerance::FORWARD);
    io.check(&mut out, "dec.input", &tr.dec_input, Tolerance::FORWARD);
    io.check(
        &mut out,
        "dec.padding_mask",
        tr.dec_padding
            .as_ref()
            .ok_or_else(|| anyhow!("no decoder padding"))?,
        Tolerance::Exact,
    );
    io.check(&mut out, "dec.output", &tr.dec_output, Tolerance::FORWARD);
    io.check(
        &mut out,
        "out.image",
        o.image.as_ref().ok_or_else(|| anyhow!("no image output"))?,
        Tolerance::FORWARD,
    );
    io.check(
        &mut out,
        "out.text_logits",
        o.text_logits
            .as_ref()
            .ok_or_else(|| anyhow!("no text output"))?,
        Tolerance::FORWARD,
    );
    let losses = model.losses(&input, &o)?;
    scalar_check(&mut out, &mut io, "loss.image", losses.image_loss.as_ref())?;
    scalar_check(&mut out, &mut io, "loss.text", losses.text_loss.as_ref())?;
    scalar_check(&mut out, &mut io, "loss.total", Some(&losses.total))?;
    scalar_check(&mut out, &mut io, "acc.text", losses.text_accuracy.as_ref())?;
    io.check(
        &mut out,
        "loss.text_valid_mask",
        losses
            .text_valid
            .as_ref()
            .ok_or_else(|| anyhow!("no text valid mask"))?,
        Tolerance::Exact,
    );

    // Loss variants: the same outputs under the masked-only and all-token flags.
    for (img_all, txt_all) in [(false, false), (true, true)] {
        let mut vcfg = cfg.clone();
        vcfg.image_all_token_loss = img_all;
        vcfg.text_all_token_loss = txt_all;
        let vmodel = M3ae::new(&vcfg, model.params().clone())?;
        let l = vmodel.losses(&input, &o)?;
        let (ik, tk) = if img_all {
            (
                "loss.variant.image_all_token",
                "loss.variant.text_all_token",
            )
        } else {
            (
                "loss.variant.image_masked_only",
                "loss.variant.text_masked_only",
            )
        };
        scalar_check(&mut out, &mut io, ik, l.image_loss.as_ref())?;
        scalar_check(&mut out, &mut io, tk, l.text_loss.as_ref())?;
        if txt_all {
            scalar_check(
                &mut out,
                &mut io,
                "acc.variant.text_all_token",
                l.text_accuracy.as_ref(),
            )?;
            io.check(
                &mut out,
                "loss.variant.text_all_token_valid_mask",
                l.text_valid
                    .as_ref()
                    .ok_or_else(|| anyhow!("no valid mask"))?,
                Tolerance::Exact,
            );
        }
    }

    // Text-only (unpaired) path.
    let ttm = Masking::new(
        &noise(&mut io, "textonly.noise")?,
        b,
        cfg.text_keep(t),
        &dev,
    )?;
    let tinput = ModelInput {
        image_patches: None,
        text_ids: Some(text.clone()),
        text_padding: Some(pad.clone()),
    };
    let to = model.forward(&tinput, None, Some(&ttm))?;
    io.check(
        &mut out,
        "textonly.text_logits",
        to.text_logits
            .as_ref()
            .ok_or_else(|| anyhow!("no text output"))?,
        Tolerance::FORWARD,
    );
    io.check(
        &mut out,
        "textonly.text_mask",
        to.text_mask
            .as_ref()
            .ok_or_else(|| anyhow!("no text mask"))?,
        Tolerance::Exact,
    );
    let tl = model.losses(&tinput, &to)?;
    scalar_check(&mut out, &mut io, "textonly.loss", tl.text_loss.as_ref())?;
    scalar_check(&mut out, &mut io, "textonly.acc", tl.text_accuracy.as_ref())?;

    // Unmasked representation and position tables.
    let repr = model.forward_representation(&input)?;
    io.check(&mut out, "m3ae_repr.output", &repr, Tolerance::FORWARD);
    let (d, dd) = (cfg.emb_dim, cfg.dec_emb_dim);
    io.check(
        &mut out,
        "posemb.enc_image_2d",
        &posemb::sincos_2d(li, d, &dev)?.squeeze(0)?,
        Tolerance::FORWARD,
    );
    io.check(
        &mut out,
        "posemb.enc_text_1d",
        &posemb::sincos_1d(t, d, &dev)?.squeeze(0)?,
        Tolerance::FORWARD,
    );
    io.check(
        &mut out,
        "posemb.dec_image_2d",
        &posemb::sincos_2d(li, dd, &dev)?.squeeze(0)?,
        Tolerance::FORWARD,
    );
    io.check(
        &mut out,
        "posemb.dec_text_1d",
        &posemb::sincos_1d(t, dd, &dev)?.squeeze(0)?,
        Tolerance::FORWARD,
    );
    io.finish(&mut out);

    // Gradients of the total loss.
    let grads = losses.total.backward()?;
    check_grads(
        &mut out,
        dir,
        "m3ae_grads",
        &param_specs(&cfg, Variant::M3ae),
        model.params(),
        &grads,
    )?;

    // ---------------------------------------------------------------- linear probe backbone + head
    let mut lp = FixtureFile::open(dir, "linear_probe")?;
    let backbone = Mae::from_official(
        &fc.probe,
        std::mem::take(&mut m3ae_params),
        Unexpected::Ignore,
        "m3ae_params.safetensors",
        &dev,
    )?;
    let lp_patches = lp.get("linear.input_image_patches")?;
    out.push(compare(
        "linear_probe:linear.input_image_patches (vs patchify)",
        &patches,
        &lp_patches,
        Tolerance::FORWARD,
    ));
    let rep = backbone.forward_representation(&lp_patches)?;
    lp.check(&mut out, "linear.representation", &rep, Tolerance::FORWARD);
    let cls = pool(&rep, Pooling::Cls)?;
    let mean = pool(&rep, Pooling::Mean)?;
    lp.check(&mut out, "linear.feature_cls", &cls, Tolerance::FORWARD);
    lp.check(
        &mut out,
        "linear.feature_meanpool",
        &mean,
        Tolerance::FORWARD,
    );
    let head = m3ae_eval::LinearProbeHead::new(
        lp.get("linear.head.Dense_0.kernel")?.t()?.contiguous()?,
        lp.get("linear.head.Dense_0.bias")?,
        lp.get("linear.bn.init_mean")?,
        lp.get("linear.bn.init_var")?,
    )?;
    if let Some(n) = fc.num_classes {
        let c = head.weight.dim(0)?;
        if c != n {
            bail!("config.json num_classes {n} does not match the probe head's {c} classes");
        }
    }
    let mut train_head = head.clone();
    let (logits, bn_out) = train_head.forward_train(&cls)?;
    lp.check(
        &mut out,
        "linear.bn_out_train",
        &bn_out,
        Tolerance::BATCHNORM,
    );
    lp.check(
        &mut out,
        "linear.logits_train",
        &logits,
        Tolerance::BATCHNORM,
    );
    lp.check(
        &mut out,
        "linear.bn.new_mean",
        &train_head.running_mean,
        Tolerance::BATCHNORM,
    );
    lp.check(
        &mut out,
        "linear.bn.new_var",
        &train_head.running_var,
        Tolerance::BATCHNORM,
    );
    lp.check(
        &mut out,
        "linear.logits_eval",
        &head.forward_eval(&cls)?,
        Tolerance::BATCHNORM,
    );
    let (pool_logits, _) = head.clone().forward_train(&mean)?;
    lp.check(
        &mut out,
        "linear.logits_train_pool",
        &pool_logits,
        Tolerance::BATCHNORM,
    );
    lp.finish(&mut out);

    // ---------------------------------------------------------------- MAE
    let mp = FixtureFile::open(dir, "mae_params")?;
    let mae = Mae::from_official(
        &fc.mae,
        mp.tensors,
        Unexpected::Error,
        "mae_params.safetensors",
        &dev,
    )?;
    let mcfg = mae.config().clone();
    let mut mio = FixtureFile::open(dir, "mae_io")?;
    let mimage = mio.get("input.image")?;
    let mpatches = patchify(&mimage, mcfg.patch_size)?;
    mio.check(
        &mut out,
        "input.image_patches",
        &mpatches,
        Tolerance::FORWARD,
    );
    let (mb, mli) = (mpatches.dim(0)?, mpatches.dim(1)?);
    let mm = Masking::new(
        &noise(&mut mio, "noise.image")?,
        mb,
        mcfg.image_keep(mli),
        &dev,
    )?;
    check_masking(&mut out, &mut mio, "mask.image", &mm);
    let mo = mae.forward(&mpatches, &mm)?;
    mio.check(
        &mut out,
        "enc.input",
        &mo.trace.enc_input,
        Tolerance::FORWARD,
    );
    mio.check(
        &mut out,
        "enc.output",
        &mo.trace.enc_output,
        Tolerance::FORWARD,
    );
    mio.check(
        &mut out,
        "dec.input",
        &mo.trace.dec_input,
        Tolerance::FORWARD,
    );
    mio.check(
        &mut out,
        "dec.output",
        &mo.trace.dec_output,
        Tolerance::FORWARD,
    );
    mio.check(
        &mut out,
        "out.image",
        mo.image
            .as_ref()
            .ok_or_else(|| anyhow!("no image output"))?,
        Tolerance::FORWARD,
    );
    let ml = mae.losses(&mpatches, &mo)?;
    scalar_check(&mut out, &mut mio, "loss.image", ml.image_loss.as_ref())?;
    scalar_check(&mut out, &mut mio, "loss.total", Some(&ml.total))?;
    let mut all_cfg = mcfg.clone();
    all_cfg.image_all_token_loss = !mcfg.image_all_token_loss;
    let mall = Mae::new(&all_cfg, mae.params().clone())?.losses(&mpatches, &mo)?;
    let (masked_l, all_l) = if mcfg.image_all_token_loss {
        (&mall, &ml)
    } else {
        (&ml, &mall)
    };
    let _ = masked_l;
    scalar_check(
        &mut out,
        &mut mio,
        "loss.variant.image_all_token",
        all_l.image_loss.as_ref(),
    )?;
    mio.check(
        &mut out,
        "repr.output",
        &mae.forward_representation(&mpatches)?,
        Tolerance::FORWARD,
    );
    mio.check(
        &mut out,
        "posemb.enc_image_2d",
        &posemb::sincos_2d(mli, mcfg.emb_dim, &dev)?.squeeze(0)?,
        Tolerance::FORWARD,
    );
    mio.check(
        &mut out,
        "posemb.dec_image_2d",
        &posemb::sincos_2d(mli, mcfg.dec_emb_dim, &dev)?.squeeze(0)?,
        Tolerance::FORWARD,
    );
    mio.finish(&mut out);
    let mgrads = ml.total.backward()?;
    check_grads(
        &mut out,
        dir,
        "mae_grads",
        &param_specs(&mcfg, Variant::Mae),
        mae.params(),
        &mgrads,
    )?;
    Ok(out)
}

fn check_grads(
    out: &mut Vec<Check>,
    dir: &Path,
    file: &str,
    specs: &[m3ae_model::ParamSpec],
    params: &m3ae_model::ParamStore,
    grads: &candle_core::backprop::GradStore,
) -> Result<()> {
    let mut g = FixtureFile::open(dir, file)?;
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
                    tolerance: Tolerance::GRAD.describe(),
                    ok: false,
                    note: format!("no gradient reached `{}`", s.name),
                });
            }
        }
    }
    g.finish(out);
    Ok(())
}
