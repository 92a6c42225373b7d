//! `m3ae embed | probe | ood | reconstruct`: the evaluation subcommands' arguments (clap), the
//! lines they print and the calls into [`m3ae_eval`] that do the work (the [`Pipeline`] for the
//! model, its features and reconstructions; [`m3ae_eval::report`] for the probe, kNN and OOD
//! numbers; [`m3ae_eval::panels`] for the PNG files).
//!
//! Every flag is checked before the model loads; results go to stdout, progress, notes and the
//! per-data-set bad-sample summary to stderr.

use m3ae_data::{JsonLabel, LabelKind, Normalization};
use m3ae_eval::panels::{write_attention_png, write_reconstruction_png};
use m3ae_eval::{
    check_float, check_probe_config, class_count, escape_control, evaluate_head, format_ood_table,
    json_label, knn_accuracy, load_probe_head, ood_report, probe_report, read_image,
    save_probe_head, DataOptions, DataSpec, Error, FeatureSet, KnnConfig, ModelSource, Pipeline,
    PipelineOptions, ProbeConfig, Result,
};
use m3ae_model::Pooling;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

/// Which model to evaluate.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A checkpoint directory `step-*`, a run directory (newest `checkpoints/step-*`), a
    /// `model.safetensors`, a converted folder, an official `model.pkl`, or (feature `hub`) a
    /// Hugging Face repository id `org/name` (from the local cache; see `--offline`).
    #[arg(
        long,
        value_name = "PATH|REPO",
        required_unless_present = "random_init"
    )]
    pub checkpoint: Option<PathBuf>,
    /// Evaluate a randomly initialised `--preset` instead (the baseline).
    #[arg(long, conflicts_with = "checkpoint")]
    pub random_init: bool,
    /// Preset of `--random-init`: a name, or a config file (a model config, or a pre-training
    /// config such as a run's `config.toml`, whose `[model]` table is used).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Initialisation seed of `--random-init`.
    #[arg(long, default_value_t = 0)]
    pub init_seed: u64,
    /// `--random-init` of the image-only MAE instead of M3AE.
    #[arg(long)]
    pub mae: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub device: super::DeviceArg,
}

impl ModelArgs {
    /// The model source these flags name.
    pub fn source(&self) -> ModelSource {
        match &self.checkpoint {
            Some(p) => ModelSource::Checkpoint(p.clone()),
            None => ModelSource::RandomInit {
                preset: self.preset.clone(),
                seed: self.init_seed,
                mae: self.mae,
            },
        }
    }
}

/// Label of the captioned scenes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LabelArg {
    /// Shape of the main object.
    Shape,
    /// Colour of the main object.
    Colour,
    /// Shape and colour.
    Both,
}

/// Pixel normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NormArg {
    /// CC12M mean / std (the pretraining default).
    Cc12m,
    /// ImageNet mean / std.
    Imagenet,
    /// Pixels in [0, 1].
    None,
}

/// Pooling of the encoder output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PoolArg {
    /// The cls token (official default).
    Cls,
    /// Mean of the patch tokens.
    Mean,
}

/// How data is read.
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// Label of `scenes` data.
    #[arg(long, value_enum, default_value = "shape")]
    pub label: LabelArg,
    /// Use at most N images of each data set (evenly strided).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Use at most N training images (overrides `--limit` for the training set).
    #[arg(long, value_name = "N")]
    pub train_limit: Option<usize>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Pixel normalisation.
    #[arg(long, value_enum, default_value = "cc12m")]
    pub normalization: NormArg,
    /// Feature pooling.
    #[arg(long, value_enum, default_value = "cls")]
    pub pool: PoolArg,
    /// Progress line on stderr every N batches (0: none).
    #[arg(long, default_value_t = 20)]
    pub progress_every: usize,
    /// Label WebDataset (`wds:`) samples by this field of their `.json` member (e.g.
    /// `category`); the classes are the sorted values found over all the command's sets.
    #[arg(long, value_name = "FIELD")]
    pub label_field: Option<String>,
    /// With `--label-field`: keep the first N `/`-separated parts of the value (1:
    /// `animals/birds` -> `animals`).
    #[arg(long, value_name = "N", requires = "label_field")]
    pub label_depth: Option<usize>,
    /// Largest tolerated fraction of bad samples (undecodable, truncated or missing image) in
    /// [0, 1]: they are skipped and counted (summary on stderr); above it the command stops.
    #[arg(long, value_name = "F", default_value_t = 0.1)]
    pub max_bad_fraction: f64,
}

impl DataArgs {
    /// Options for an evaluation set (`train`: the training set, which `--train-limit` caps).
    pub fn options(&self, train: bool) -> Result<DataOptions> {
        if self.batch_size == 0 {
            return Err(Error::arg("--batch-size", 0, "must be positive"));
        }
        let limit = if train {
            self.train_limit.or(self.limit)
        } else {
            self.limit
        };
        if limit == Some(0) {
            let flag = if train && self.train_limit.is_some() {
                "--train-limit"
            } else {
                "--limit"
            };
            return Err(Error::arg(flag, 0, "must be positive"));
        }
        check_float(
            "--max-bad-fraction",
            self.max_bad_fraction,
            0.0..=1.0,
            "in [0, 1]",
        )?;
        Ok(DataOptions {
            label: match self.label {
                LabelArg::Shape => LabelKind::Shape,
                LabelArg::Colour => LabelKind::Colour,
                LabelArg::Both => LabelKind::Both,
            },
            limit,
            batch_size: self.batch_size,
            normalization: norm_of(self.normalization),
            pooling: match self.pool {
                PoolArg::Cls => Pooling::Cls,
                PoolArg::Mean => Pooling::Mean,
            },
            progress_every: self.progress_every,
            json_label: None,
            max_bad_fraction: self.max_bad_fraction,
            scenes: Default::default(),
        })
    }

    /// The `--label-field` rule over the command's data sets (see [`json_label`]).
    pub fn json_label(&self, specs: &[&DataSpec]) -> Result<Option<JsonLabel>> {
        self.label_field
            .as_deref()
            .map(|f| json_label(f, self.label_depth, specs))
            .transpose()
    }

    /// [`DataArgs::options`] with the `--label-field` rule set.
    pub fn labelled(&self, train: bool, json_label: &Option<JsonLabel>) -> Result<DataOptions> {
        Ok(DataOptions {
            json_label: json_label.clone(),
            ..self.options(train)?
        })
    }
}

fn norm_of(n: NormArg) -> Normalization {
    match n {
        NormArg::Cc12m => Normalization::Cc12m,
        NormArg::Imagenet => Normalization::Imagenet,
        NormArg::None => Normalization::None,
    }
}

/// Probe training flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeArgs {
    /// Probe epochs over the cached features (official: 90).
    #[arg(long, default_value_t = 90)]
    pub epochs: usize,
    /// Probe batch size (the learning rate is scaled by batch / 256).
    #[arg(long, default_value_t = 256)]
    pub probe_batch: usize,
    /// Peak learning rate before scaling (official README: 0.1).
    #[arg(long, default_value_t = 0.1)]
    pub lr: f64,
    /// Warmup epochs.
    #[arg(long, default_value_t = 3)]
    pub warmup_epochs: usize,
    /// LARS weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Seed of the head initialisation and shuffling.
    #[arg(long, default_value_t = 1)]
    pub probe_seed: u64,
}

impl ProbeArgs {
    /// The probe configuration.
    /// Every flag is checked ([`check_probe_config`]): an error names the first bad one.
    pub fn config(&self) -> Result<ProbeConfig> {
        let cfg = ProbeConfig {
            epochs: self.epochs,
            batch_size: self.probe_batch,
            lr_peak: self.lr,
            warmup_epochs: self.warmup_epochs.min(self.epochs.saturating_sub(1)),
            weight_decay: self.weight_decay,
            seed: self.probe_seed,
            ..Default::default()
        };
        check_probe_config(&cfg)?;
        Ok(cfg)
    }
}

/// `m3ae embed`.
#[derive(Debug, Clone, clap::Args)]
pub struct EmbedCommand {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub model: ModelArgs,
    /// The data set (`u8:<file>`, `scenes[:split[:N]]`, `folder:<dir>`, `wds:<shards>`).
    #[arg(long)]
    pub data: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub opts: DataArgs,
    /// Output safetensors (`features` `[N, D]`, `labels` `[N]`, keys in the metadata).
    #[arg(long)]
    pub out: PathBuf,
}

/// `m3ae probe`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeCommand {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub model: ModelArgs,
    /// Training data (`u8:<file>`, `scenes[:split[:N]]`, `folder:<dir>`, `wds:<shards>`;
    /// required unless `--evaluate`).
    #[arg(long, required_unless_present = "evaluate")]
    pub train_data: Option<String>,
    /// Test data.
    #[arg(long)]
    pub test_data: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub opts: DataArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub probe: ProbeArgs,
    /// Cache extracted features here.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Evaluate this probe head (`probe.safetensors`) instead of training one.
    #[arg(long)]
    pub evaluate: Option<PathBuf>,
    /// Write the trained head (`probe.safetensors` layout).
    #[arg(long)]
    pub save_probe: Option<PathBuf>,
    /// Neighbours of the kNN classifier.
    #[arg(long, default_value_t = 20)]
    pub knn_k: usize,
    /// Vote temperature of the kNN classifier.
    #[arg(long, default_value_t = 0.07)]
    pub knn_t: f64,
}

/// `m3ae ood`.
#[derive(Debug, Clone, clap::Args)]
pub struct OodCommand {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub model: ModelArgs,
    /// In-distribution training data (probe, class means, kNN bank).
    #[arg(long)]
    pub train_data: String,
    /// In-distribution test data.
    #[arg(long)]
    pub in_data: String,
    /// Out-of-distribution test data.
    #[arg(long)]
    pub out_data: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub opts: DataArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub probe: ProbeArgs,
    /// Cache extracted features here.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// k of the kNN-distance score.
    #[arg(long, default_value_t = 20)]
    pub knn_k: usize,
}

/// `m3ae reconstruct`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReconstructCommand {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub model: ModelArgs,
    /// The image (JPEG, PNG, WebP).
    #[arg(long)]
    pub image: PathBuf,
    /// The caption (M3AE only).
    #[arg(long)]
    pub caption: Option<String>,
    /// Tokenizer file, folder or (feature `hub`) Hugging Face repository id (default:
    /// `tokenizer.json` of the run directory or next to the checkpoint).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Output PNG: original | masked input | prediction | prediction with visible patches.
    #[arg(long)]
    pub out: PathBuf,
    /// Attention overlay PNG (default: `<out>` with `-attention` before the extension).
    #[arg(long)]
    pub attention_out: Option<PathBuf>,
    /// Seed of the masks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Pixel normalisation.
    #[arg(long, value_enum, default_value = "cc12m")]
    pub normalization: NormArg,
}

/// The evaluation subcommands (flattened into the `m3ae` CLI).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum EvalCommand {
    /// Write pooled image features, labels and keys of a data set to safetensors.
    Embed(Box<EmbedCommand>),
    /// Linear probe (official recipe) and kNN accuracy of a model's features.
    Probe(Box<ProbeCommand>),
    /// OOD detection: MSP, Mahalanobis and kNN scores with AUROC / AUPR / FPR@95.
    Ood(Box<OodCommand>),
    /// Reconstruction PNG, predicted masked words and the cls attention overlay.
    Reconstruct(Box<ReconstructCommand>),
}

fn print_model(pipe: &Pipeline) {
    let cfg = pipe.config();
    let kind = if pipe.model().is_m3ae() {
        "M3AE"
    } else {
        "MAE"
    };
    let what = match (pipe.source(), pipe.resolved()) {
        (_, Some(r)) => r.display().to_string(),
        (ModelSource::Checkpoint(p), None) => p.display().to_string(),
        (ModelSource::RandomInit { preset, seed, .. }, None) => {
            format!("random init, preset {preset}, seed {seed}")
        }
    };
    println!(
        "model: {kind} ({what}): dim {}, depth {}, image {} px, patch {}",
        cfg.emb_dim, cfg.depth, cfg.image_size, cfg.patch_size
    );
}

/// The model of `--checkpoint` / `--random-init`, with `opts` (tokenizer, normalisation, seed).
fn load(model: &ModelArgs, opts: &PipelineOptions) -> Result<Pipeline> {
    let opts = PipelineOptions {
        device: model.device.device,
        ..opts.clone()
    };
    let pipe = Pipeline::load(&model.source(), &opts)?;
    print_model(&pipe);
    Ok(pipe)
}

fn pct(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}

/// The bad-sample summary of each data set read: one line per set on stderr,
/// `<command>: <data> (<role>): <counts per reason>` (nothing for features read from a cache).
fn print_bad_summary(command: &str, sets: &[(&str, &FeatureSet)]) {
    for (role, f) in sets {
        if let Some(stats) = &f.stats {
            let role = if role.is_empty() {
                String::new()
            } else {
                format!(" ({role})")
            };
            eprintln!(
                "{command}: {}{role}: {}",
                escape_control(&f.data),
                escape_control(&stats.to_string())
            );
        }
    }
}

/// Runs an evaluation subcommand, printing its results on stdout (progress, notes and the
/// per-data-set bad-sample summary on stderr). Every flag is checked before the model loads.
pub fn run_cli(cmd: EvalCommand) -> anyhow::Result<()> {
    match cmd {
        EvalCommand::Embed(c) => embed(&c),
        EvalCommand::Probe(c) => probe(&c),
        EvalCommand::Ood(c) => ood(&c),
        EvalCommand::Reconstruct(c) => reconstruct(&c),
    }
}

fn embed(c: &EmbedCommand) -> anyhow::Result<()> {
    let spec: DataSpec = c.data.parse()?;
    c.opts.options(false)?;
    let opts = c.opts.labelled(false, &c.opts.json_label(&[&spec])?)?;
    let pipe = load(&c.model, &PipelineOptions::default())?;
    let t0 = Instant::now();
    let f = pipe.embed_dataset(&spec, &opts, None, "embed")?;
    f.save(
        &c.out,
        HashMap::from([
            ("data".to_string(), spec.to_string()),
            ("model".to_string(), pipe.identity()?),
            ("pooling".to_string(), format!("{:?}", opts.pooling)),
        ]),
    )?;
    let (n, d) = f.features.dims2()?;
    println!(
        "wrote {}: {n} x {d} features ({:.1}s)",
        c.out.display(),
        t0.elapsed().as_secs_f64()
    );
    print_bad_summary("embed", &[("", &f)]);
    Ok(())
}

fn probe(c: &ProbeCommand) -> anyhow::Result<()> {
    let test_spec: DataSpec = c.test_data.parse()?;
    let train_spec: Option<DataSpec> = c.train_data.as_deref().map(str::parse).transpose()?;
    let knn = KnnConfig {
        k: c.knn_k,
        temperature: c.knn_t,
    };
    knn.validate()?;
    let cfg = c.probe.config()?;
    c.opts.options(true)?;
    c.opts.options(false)?;
    let head_file = match &c.evaluate {
        Some(p) => Some(load_probe_head(p)?),
        None => None,
    };
    let jl = c.opts.json_label(
        &[&test_spec]
            .into_iter()
            .chain(&train_spec)
            .collect::<Vec<_>>(),
    )?;
    let pipe = load(&c.model, &PipelineOptions::default())?;
    let cache = c.cache_dir.as_deref();
    let t0 = Instant::now();
    let test = pipe.embed_dataset(&test_spec, &c.opts.labelled(false, &jl)?, cache, "test")?;
    let train = match &train_spec {
        Some(s) => Some(pipe.embed_dataset(s, &c.opts.labelled(true, &jl)?, cache, "train")?),
        None => None,
    };
    println!(
        "features: train {}, test {} ({:.1}s)",
        train.as_ref().map(|t| t.labels.len()).unwrap_or(0),
        test.labels.len(),
        t0.elapsed().as_secs_f64()
    );
    if let Some(head) = head_file {
        let classes = head.weight.dims2()?.0;
        let (t1, t5, k) = evaluate_head(&head, &test, classes)?;
        println!("probe (evaluated): top-1 {} top-{k} {}", pct(t1), pct(t5));
        if let Some(train) = &train {
            let classes = class_count(&[train, &test]);
            let a = knn_accuracy(train, &test, classes, knn)?;
            println!("knn (k={}, T={}): top-1 {}", knn.k, knn.temperature, pct(a));
        }
    } else if let Some(train) = &train {
        let (r, head) = probe_report(train, &test, &cfg, knn)?;
        println!(
            "probe: top-1 {} top-{} {} ({} epochs, {:.1}s, final loss {:.4})",
            pct(r.top1),
            r.top5_k,
            pct(r.top5),
            cfg.epochs,
            r.train_seconds,
            r.final_loss
        );
        if let Some(a) = r.knn_top1 {
            println!("knn (k={}, T={}): top-1 {}", knn.k, knn.temperature, pct(a));
        }
        if let Some(p) = &c.save_probe {
            save_probe_head(&head, p)?;
            println!("wrote {}", p.display());
        }
    }
    println!("total: {:.1}s", t0.elapsed().as_secs_f64());
    let mut sets: Vec<(&str, &FeatureSet)> = train.iter().map(|t| ("train", t)).collect();
    sets.push(("test", &test));
    print_bad_summary("probe", &sets);
    Ok(())
}

fn ood(c: &OodCommand) -> anyhow::Result<()> {
    let train_spec: DataSpec = c.train_data.parse()?;
    let in_spec: DataSpec = c.in_data.parse()?;
    let out_spec: DataSpec = c.out_data.parse()?;
    if c.knn_k == 0 {
        return Err(Error::arg("--knn-k", 0, "must be at least 1").into());
    }
    let cfg = c.probe.config()?;
    c.opts.options(true)?;
    c.opts.options(false)?;
    let jl = c.opts.json_label(&[&train_spec, &in_spec, &out_spec])?;
    let pipe = load(&c.model, &PipelineOptions::default())?;
    let cache = c.cache_dir.as_deref();
    let t0 = Instant::now();
    let eval_opts = c.opts.labelled(false, &jl)?;
    let train = pipe.embed_dataset(&train_spec, &c.opts.labelled(true, &jl)?, cache, "train")?;
    let inside = pipe.embed_dataset(&in_spec, &eval_opts, cache, "in")?;
    let outside = pipe.embed_dataset(&out_spec, &eval_opts, cache, "out")?;
    println!(
        "features: train {}, in {}, out {} ({:.1}s)",
        train.labels.len(),
        inside.labels.len(),
        outside.labels.len(),
        t0.elapsed().as_secs_f64()
    );
    let (rows, acc) = ood_report(&train, &inside, &outside, &cfg, c.knn_k)?;
    if let Some(a) = acc {
        println!("in-distribution probe top-1: {}", pct(a));
    }
    print!("{}", format_ood_table(&rows));
    println!("total: {:.1}s", t0.elapsed().as_secs_f64());
    print_bad_summary(
        "ood",
        &[("train", &train), ("in", &inside), ("out", &outside)],
    );
    Ok(())
}

fn reconstruct(c: &ReconstructCommand) -> anyhow::Result<()> {
    let img = read_image(&c.image)?;
    let pipe = load(
        &c.model,
        &PipelineOptions {
            tokenizer: c.tokenizer.clone(),
            normalization: norm_of(c.normalization),
            mask_seed: c.seed,
            ..Default::default()
        },
    )?;
    if c.caption.is_some() {
        if pipe.model().is_m3ae() {
            // found (or refused) before the model runs
            pipe.tokenizer()?;
        } else {
            eprintln!("note: an image-only MAE ignores the caption");
        }
    }
    let r = pipe.reconstruct(&img, c.caption.as_deref())?;
    let (w, h) = write_reconstruction_png(&r, &c.out)?;
    println!(
        "wrote {} ({w}x{h}: original | masked | prediction | prediction + visible)",
        c.out.display()
    );
    println!(
        "masked patches: {} of {}, masked-patch MSE {:.4}",
        r.image_mask.iter().filter(|&&m| m > 0.5).count(),
        r.image_mask.len(),
        r.masked_mse
    );
    if let Some(p) = &r.predicted_caption {
        for (j, orig, pred) in &r.words {
            println!("masked word {j}: {orig:?} -> predicted {pred:?}");
        }
        println!("predicted caption: {p}");
    }
    let att = c.attention_out.clone().unwrap_or_else(|| {
        let stem = c
            .out
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "recon".into());
        c.out.with_file_name(format!("{stem}-attention.png"))
    });
    let (w, h) = write_attention_png(&r, &att)?;
    println!(
        "wrote {} ({w}x{h}: cls attention over patches)",
        att.display()
    );
    if !r.word_attention.is_empty() {
        let words: Vec<String> = r
            .word_attention
            .iter()
            .map(|(w, a)| format!("{w}:{a:.3}"))
            .collect();
        println!("cls attention over words: {}", words.join(" "));
    }
    Ok(())
}
