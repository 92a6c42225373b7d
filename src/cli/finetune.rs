//! `m3ae finetune` and `m3ae predict`: flags over a [`FinetuneConfig`] (TOML), the data specs,
//! the signal handler and the progress bar around [`m3ae_eval::finetune`], and the lines they
//! print.

use crate::cli::eval::{LabelArg, ModelArgs, PoolArg};
use crate::progress::JobProgress;
use anyhow::{Context, Result};
use m3ae_data::{DataOptions, DataSpec, LabelKind};
use m3ae_eval::finetune::{load_classifier, predict, Finetune, FinetuneConfig};
use m3ae_eval::{check_float, escape_control, json_label, Error};
use m3ae_model::{LayerDecayRule, Pooling};
use std::io::Write;
use std::path::PathBuf;

/// How labelled data is read (the probe's data flags that fine-tuning uses).
#[derive(Debug, Clone, clap::Args)]
pub struct LabelArgs {
    /// Label of `scenes` data.
    #[arg(long, value_enum, default_value = "shape")]
    pub label: LabelArg,
    /// Use at most N images of each data set (evenly strided).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Use at most N training images (overrides `--limit` for the training set).
    #[arg(long, value_name = "N")]
    pub train_limit: Option<usize>,
    /// Label WebDataset (`wds:`) samples by this field of their `.json` member.
    #[arg(long, value_name = "FIELD")]
    pub label_field: Option<String>,
    /// With `--label-field`: keep the first N `/`-separated parts of the value.
    #[arg(long, value_name = "N", requires = "label_field")]
    pub label_depth: Option<usize>,
    /// Largest tolerated fraction of bad samples in [0, 1] (skipped and counted).
    #[arg(long, value_name = "F", default_value_t = 0.1)]
    pub max_bad_fraction: f64,
    /// Images per evaluation forward pass.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub eval_batch_size: usize,
}

impl LabelArgs {
    fn options(&self, specs: &[&DataSpec], train: bool) -> Result<DataOptions, Error> {
        check_float(
            "--max-bad-fraction",
            self.max_bad_fraction,
            0.0..=1.0,
            "in [0, 1]",
        )?;
        if self.eval_batch_size == 0 {
            return Err(Error::arg("--eval-batch-size", 0, "must be positive"));
        }
        let limit = if train {
            self.train_limit.or(self.limit)
        } else {
            self.limit
        };
        if limit == Some(0) {
            return Err(Error::arg(
                if train && self.train_limit.is_some() {
                    "--train-limit"
                } else {
                    "--limit"
                },
                0,
                "must be positive",
            ));
        }
        let json_label = self
            .label_field
            .as_deref()
            .map(|f| json_label(f, self.label_depth, specs))
            .transpose()?;
        Ok(DataOptions {
            label: match self.label {
                LabelArg::Shape => LabelKind::Shape,
                LabelArg::Colour => LabelKind::Colour,
                LabelArg::Both => LabelKind::Both,
            },
            limit,
            batch_size: self.eval_batch_size,
            json_label,
            max_bad_fraction: self.max_bad_fraction,
            ..Default::default()
        })
    }
}

/// Layer-decay assignment flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DecayRuleArg {
    /// The official `finetune_main` rule (its quirks included).
    Official,
    /// The MAE reference codebase's rule.
    Mae,
}

/// Arguments of `m3ae finetune`.
#[derive(clap::Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Training data (a data spec, as `m3ae probe` takes: `arrays:<file>`, `folder:<dir>`,
    /// `wds:<shards>`, `scenes:train`, ...).
    #[arg(long, value_name = "SPEC")]
    train_data: String,
    /// Validation data (evaluated every epoch; the best classifier is kept).
    #[arg(long, value_name = "SPEC")]
    val_data: String,
    /// The run folder (checkpoints, metrics, the best and final classifiers, report.json).
    #[arg(long, default_value = "runs/finetune")]
    out: PathBuf,
    /// A TOML fine-tuning configuration (see docs/finetune.md); flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Epochs.
    #[arg(long)]
    epochs: Option<u64>,
    /// Images per step.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Warmup epochs.
    #[arg(long)]
    warmup_epochs: Option<u64>,
    /// Layer-wise learning-rate decay (1: off).
    #[arg(long)]
    layer_decay: Option<f64>,
    /// Which layer each weight belongs to.
    #[arg(long, value_enum)]
    layer_decay_assignment: Option<DecayRuleArg>,
    /// AdamW weight decay.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Mixup alpha (0: off).
    #[arg(long)]
    mixup: Option<f64>,
    /// CutMix alpha (0: off).
    #[arg(long)]
    cutmix: Option<f64>,
    /// Label smoothing.
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// Drop-path rate.
    #[arg(long)]
    drop_path: Option<f64>,
    /// Classifier input: the cls token or the mean of the patch tokens.
    #[arg(long, value_enum)]
    pool: Option<PoolArg>,
    /// Augmentation after the crop: a timm RandAugment policy (official
    /// `rand-m9-mstd0.5-inc1`, the default) or `none`.
    #[arg(long, value_name = "POLICY")]
    auto_augment: Option<String>,
    /// Seed (head init, data order, augmentation, mixup, dropout).
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    data: LabelArgs,
    /// Continue the newest checkpoint of the run folder.
    #[arg(long)]
    resume: bool,
    /// Plain log lines instead of a progress bar (automatic when stderr is not a terminal).
    #[arg(long)]
    plain: bool,
    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

impl FinetuneArgs {
    fn config(&self) -> Result<FinetuneConfig> {
        let mut cfg = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
            }
            None => FinetuneConfig::default(),
        };
        if let Some(v) = self.epochs {
            cfg.epochs = v;
        }
        if let Some(v) = self.batch_size {
            cfg.batch_size = v;
        }
        if let Some(v) = self.lr {
            cfg.lr_peak = v;
        }
        if let Some(v) = self.warmup_epochs {
            cfg.warmup_epochs = v;
        }
        if let Some(v) = self.layer_decay {
            cfg.layer_decay = v;
        }
        if let Some(v) = self.layer_decay_assignment {
            cfg.layer_decay_assignment = match v {
                DecayRuleArg::Official => LayerDecayRule::Official,
                DecayRuleArg::Mae => LayerDecayRule::Mae,
            };
        }
        if let Some(v) = self.weight_decay {
            cfg.adamw.weight_decay = v;
        }
        if let Some(v) = self.mixup {
            cfg.mixup.mixup_alpha = v;
        }
        if let Some(v) = self.cutmix {
            cfg.mixup.cutmix_alpha = v;
        }
        if let Some(v) = self.label_smoothing {
            cfg.mixup.label_smoothing = v;
        }
        if let Some(v) = self.drop_path {
            cfg.drop_path = v;
        }
        if let Some(v) = self.pool {
            cfg.pooling = match v {
                PoolArg::Cls => Pooling::Cls,
                PoolArg::Mean => Pooling::Mean,
            };
        }
        if let Some(v) = &self.auto_augment {
            cfg.auto_augment = v
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--auto-augment: {e}"))?;
        }
        if let Some(v) = self.seed {
            cfg.seed = v;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Runs `m3ae finetune`.
pub fn run(a: FinetuneArgs) -> Result<()> {
    use std::io::IsTerminal;
    let cfg = a.config()?;
    if a.print_config {
        print!("{}", toml::to_string_pretty(&cfg)?);
        return Ok(());
    }
    let train: DataSpec = a.train_data.parse()?;
    let val: DataSpec = a.val_data.parse()?;
    let train_opts = a.data.options(&[&train, &val], true)?;
    let opts = a.data.options(&[&train, &val], false)?;
    let has_checkpoints = m3ae_train::checkpoint::latest(&a.out.join("checkpoints"))?.is_some();
    if has_checkpoints && !a.resume {
        anyhow::bail!(
            "--out {}: the folder already holds a fine-tuning run; pass --resume to continue it \
             or choose another --out",
            a.out.display()
        );
    }
    let base = a.model.source().load(&a.model.device.open()?)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping: writing a checkpoint (a second signal quits at once)");
    })
    .context("installing the signal handler")?;
    let plain = a.plain || !std::io::stderr().is_terminal();
    let report = Finetune::new(&base, cfg, train, val, &a.out)?
        .data_options(opts)
        .train_limit(train_opts.limit)
        .progress(Box::new(JobProgress::new(
            plain,
            &[("loss", "loss", 4), ("acc", "accuracy", 3)],
        )))
        .on_eval(|e| {
            eprintln!(
                "epoch {} (step {}): validation top-1 {:.2}% top-5 {:.2}% loss {:.4}",
                e.epoch,
                e.step,
                100.0 * e.top1,
                100.0 * e.top5,
                e.loss
            )
        })
        .interrupt(stop)
        .resume(a.resume)
        .run()?;
    if report.interrupted {
        println!(
            "interrupted at step {}; continue with --resume",
            report.steps
        );
    }
    println!(
        "fine-tuned the {:?} encoder of {}: best validation top-1 {:.2}% (epoch {}), {} steps \
         in {:.1}s; best classifier {}",
        base.variant(),
        a.model.source().describe(),
        100.0 * report.best_top1,
        report.best_epoch,
        report.steps,
        report.train_seconds,
        report.best_classifier.display()
    );
    print!("{}", report.best.format(None));
    Ok(())
}

/// Arguments of `m3ae predict`.
#[derive(clap::Args)]
pub struct PredictArgs {
    /// A fine-tuning run folder (its best classifier), a checkpoint folder of one, or a
    /// classifier `.safetensors`.
    #[arg(long, value_name = "PATH")]
    checkpoint: PathBuf,
    /// The images (a data spec).
    #[arg(long, value_name = "SPEC")]
    data: String,
    /// Write one JSON line per image (key, predicted class, label, logits) here.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    #[command(flatten)]
    labels: LabelArgs,
    #[command(flatten)]
    device: super::DeviceArg,
}

/// Runs `m3ae predict`.
pub fn run_predict(a: PredictArgs) -> Result<()> {
    let spec: DataSpec = a.data.parse()?;
    let mut opts = a.labels.options(&[&spec], false)?;
    let saved = load_classifier(&a.checkpoint, &a.device.open()?)?;
    if let Some(s) = &saved.settings {
        opts.normalization = s.normalization;
    }
    let (classifier, file) = (saved.classifier, saved.file);
    let p = predict(&classifier, &spec, &opts)?;
    eprintln!(
        "{} images through {} ({} classes)",
        p.keys.len(),
        file.display(),
        p.classes
    );
    if let Some(out) = &a.out {
        let best = p.argmax()?;
        let mut text = String::new();
        for (i, key) in p.keys.iter().enumerate() {
            let line = serde_json::json!({
                "key": key,
                "predicted": best[i],
                "label": p.labels[i],
                "logits": &p.logits[i * p.classes..(i + 1) * p.classes],
            });
            text.push_str(&line.to_string());
            text.push('\n');
        }
        m3ae_model::fsio::atomic_write(out, text.as_bytes())
            .with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {}", out.display());
    }
    if p.labels.iter().any(|l| l.is_some()) {
        print!("{}", p.report()?.format(None));
    }
    if p.stats.total_bad() > 0 {
        eprintln!("skipped: {}", escape_control(&p.stats.to_string()));
    }
    std::io::stdout().flush()?;
    Ok(())
}
