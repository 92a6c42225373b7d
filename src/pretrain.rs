//! `m3ae pretrain`: the pre-training job, from a TOML config to a run directory.
//!
//! A run directory `runs/<name>/` receives `config.toml` (the full resolved configuration),
//! `tokenizer.json`, `metrics.jsonl`, TensorBoard event files under `tb/`, reconstruction images
//! `recon/step-NNNNNNNN.png` (+ `.txt` with the captions, masked words and predicted words) and
//! checkpoints under `checkpoints/step-NNNNNNNN/`. The default configuration trains the `tiny`
//! preset on the built-in captioned scenes, then probes the learned image representation on the
//! scenes' shape labels next to a randomly initialised model.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use m3ae_data::{
    Batch, CaptionedScenes, LabelKind, Loader, LoaderConfig, MaskConfig, Position, SceneSplit,
    ScenesConfig, Source, Tokenizer, Transform,
};
use m3ae_model::{M3ae, M3aeConfig, Mae, ModelInput, Pooling, Represent};
use m3ae_train::tensorboard::TensorBoardSink;
use m3ae_train::{
    BatchSource, JsonlSink, MetricSink, Objective, StepReport, TrainBatch, TrainConfig, Trainer,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Which model to pre-train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ObjectiveKind {
    /// The multimodal M3AE (image + text).
    #[default]
    M3ae,
    /// The image-only MAE baseline (captions ignored).
    Mae,
}

/// Where the training data comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `scenes` (built in) or `webdataset` (tar shards given by `shards`).
    pub source: String,
    /// Shards for `webdataset`: a list, a glob or a brace range.
    pub shards: Option<String>,
    /// Held-out shards for `webdataset` (reconstruction images and masked-word accuracy);
    /// defaults to the training shards.
    pub eval_shards: Option<String>,
    /// Unpaired text (`.txt` lines or `.jsonl` with a `text` field), used when
    /// `model.unpaired_text_loss_weight > 0`.
    pub unpaired_text: Option<PathBuf>,
    /// The built-in captioned scenes (train split; the probe uses the test split).
    pub scenes: ScenesConfig,
    /// A `tokenizer.json`; without it a WordPiece vocabulary is trained on the scene captions.
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size of a trained WordPiece tokenizer.
    pub vocab_size: usize,
    /// Decode threads (0: one per core). Default 1: on small machines the model gets the
    /// other cores.
    pub num_threads: usize,
    /// Batch-shared (`shared`, official) or per-sample (`per_sample`) mask noise.
    pub noise: m3ae_data::NoiseKind,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            source: "scenes".into(),
            shards: None,
            eval_shards: None,
            unpaired_text: None,
            scenes: ScenesConfig::default(),
            tokenizer: None,
            vocab_size: 1000,
            num_threads: 1,
            noise: m3ae_data::NoiseKind::Shared,
        }
    }
}

/// The whole pre-training configuration (saved as `config.toml` in the run directory).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    /// Run name: the run directory is `<output_dir>/<name>`.
    pub name: String,
    /// Parent of run directories.
    pub output_dir: PathBuf,
    /// M3AE or MAE.
    pub objective: ObjectiveKind,
    /// Seed of initialisation, data order, augmentation and masks.
    pub seed: u64,
    /// The model.
    pub model: M3aeConfig,
    /// Optimisation.
    pub train: TrainConfig,
    /// Data.
    pub data: DataConfig,
    /// Log metrics every N optimiser steps.
    pub log_every: u64,
    /// Write a checkpoint every N steps (and at the end).
    pub save_every: u64,
    /// Checkpoints kept.
    pub keep_checkpoints: usize,
    /// Write a reconstruction image every N steps (0: only at the end).
    pub image_every: u64,
    /// Probe the final model (and a random-init one) on the scenes' labels.
    pub probe: bool,
    /// Training / test scenes for that probe.
    pub probe_samples: (usize, usize),
    /// Threads of the model's compute (0: cores minus the data threads, at least 1). Applied
    /// through `RAYON_NUM_THREADS` unless that is already set.
    pub compute_threads: usize,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        let mut model = M3aeConfig::preset("tiny").expect("tiny preset");
        model.image_size = 64;
        model.patch_size = 8;
        model.text_length = 32;
        model.text_loss_weight = 0.5;
        Self {
            name: "tiny-scenes".into(),
            output_dir: PathBuf::from("runs"),
            objective: ObjectiveKind::M3ae,
            seed: 42,
            model,
            train: TrainConfig {
                steps: 1200,
                batch_size: 64,
                lr_peak: 4e-3,
                warmup_steps: 100,
                ..TrainConfig::default()
            },
            data: DataConfig::default(),
            log_every: 25,
            save_every: 400,
            keep_checkpoints: 2,
            image_every: 400,
            probe: true,
            probe_samples: (2000, 1000),
            compute_threads: 0,
        }
    }
}

impl PretrainConfig {
    /// Reads a TOML file (unknown keys are errors naming the key).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let msg = e.message().replace('\n', " ");
            match line {
                Some(l) => anyhow::anyhow!("{}, line {l}: {msg}", path.display()),
                None => anyhow::anyhow!("{}: {msg}", path.display()),
            }
        })
    }

    /// The compute threads this configuration asks for on this machine.
    pub fn resolved_compute_threads(&self) -> usize {
        if self.compute_threads > 0 {
            return self.compute_threads;
        }
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let data = if self.data.num_threads == 0 {
            cores
        } else {
            self.data.num_threads
        };
        cores.saturating_sub(data).max(1)
    }

    /// Sets `RAYON_NUM_THREADS` to [`PretrainConfig::resolved_compute_threads`] unless it is
    /// already set. Call it before any thread pool exists (first thing in `main`).
    pub fn apply_compute_threads(&self) {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            std::env::set_var(
                "RAYON_NUM_THREADS",
                self.resolved_compute_threads().to_string(),
            );
        }
    }

    /// The run directory.
    pub fn run_dir(&self) -> PathBuf {
        self.output_dir.join(&self.name)
    }

    fn validate(&self) -> Result<()> {
        self.train.validate()?;
        self.model.validate(self.objective == ObjectiveKind::M3ae)?;
        if self.model.image_size != self.data.scenes.image_size && self.data.source == "scenes" {
            bail!(
                "model.image_size = {} but data.scenes.image_size = {}: they must agree",
                self.model.image_size,
                self.data.scenes.image_size
            );
        }
        if self.log_every == 0 || self.save_every == 0 {
            bail!("log_every and save_every must be > 0");
        }
        Ok(())
    }
}

/// How the run ended, with the figures the summary prints.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// The run directory.
    pub run_dir: PathBuf,
    /// Optimiser steps done.
    pub steps: u64,
    /// True when stopped early by Ctrl-C.
    pub interrupted: bool,
    /// Image loss of the first logged window and of the last one.
    pub image_loss: Option<(f64, f64)>,
    /// Text loss of the first logged window and of the last one.
    pub text_loss: Option<(f64, f64)>,
    /// Masked-word accuracy on held-out scenes.
    pub masked_word_accuracy: Option<f64>,
    /// Accuracy of always predicting the most frequent training word at the same positions.
    pub frequency_baseline: Option<f64>,
    /// Training samples per second (whole loop, data included).
    pub samples_per_s: f64,
    /// Wall time of the training loop in seconds.
    pub train_seconds: f64,
    /// Probe top-1 of the trained model and of a random-init model (scene labels).
    pub probe: Option<(f64, f64)>,
    /// Micro-batches skipped for non-finite values.
    pub skipped_steps: u64,
    /// The newest checkpoint.
    pub checkpoint: Option<PathBuf>,
}

impl std::fmt::Display for RunSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "== summary ({})", self.run_dir.display())?;
        writeln!(
            f,
            "steps: {}{}",
            self.steps,
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            }
        )?;
        if let Some((a, b)) = self.image_loss {
            writeln!(
                f,
                "image loss: {a:.4} -> {b:.4} ({:.0}% of the first)",
                100.0 * b / a
            )?;
        }
        if let Some((a, b)) = self.text_loss {
            writeln!(f, "text loss: {a:.4} -> {b:.4}")?;
        }
        if let (Some(a), Some(b)) = (self.masked_word_accuracy, self.frequency_baseline) {
            writeln!(
                f,
                "masked-word accuracy (held-out scenes): {:.1}% (most-frequent-word baseline {:.1}%)",
                100.0 * a,
                100.0 * b
            )?;
        }
        writeln!(
            f,
            "throughput: {:.1} samples/s over {:.0} s of training",
            self.samples_per_s, self.train_seconds
        )?;
        if let Some((t, r)) = self.probe {
            writeln!(
                f,
                "linear probe on scene shapes: {:.1}% (random-init model: {:.1}%)",
                100.0 * t,
                100.0 * r
            )?;
        }
        if self.skipped_steps > 0 {
            writeln!(f, "skipped non-finite steps: {}", self.skipped_steps)?;
        }
        if let Some(c) = &self.checkpoint {
            writeln!(f, "checkpoint: {}", c.display())?;
        }
        write!(
            f,
            "metrics: {0}/metrics.jsonl, TensorBoard: {0}/tb, images: {0}/recon",
            self.run_dir.display()
        )
    }
}

/// Options of a run that are not part of the configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the newest checkpoint of the run directory.
    pub resume: bool,
    /// Set to stop at the next step boundary (Ctrl-C); a checkpoint is written first.
    pub stop: Arc<AtomicBool>,
    /// Plain log lines instead of a progress bar.
    pub plain: bool,
}

/// Adapts the data loader to the trainer's [`BatchSource`].
struct LoaderSource {
    loader: Loader,
    iter: Option<m3ae_data::loader::BatchIter>,
    position: Position,
    text: bool,
}

fn to_train_batch(b: Batch, text: bool) -> TrainBatch {
    let mut input = b.input;
    let text_masking = if text { b.text_masking } else { None };
    if !text {
        input.text_ids = None;
        input.text_padding = None;
    }
    TrainBatch {
        input,
        image_masking: b.image_masking,
        text_masking,
        unpaired: b.unpaired.and_then(|u| {
            let m = u.masking?;
            Some((
                ModelInput {
                    image_patches: None,
                    text_ids: Some(u.ids),
                    text_padding: Some(u.padding),
                },
                m,
            ))
        }),
    }
}

impl BatchSource for LoaderSource {
    fn next_batch(&mut self) -> m3ae_train::Result<TrainBatch> {
        if self.iter.is_none() {
            self.iter = Some(self.loader.iter(self.position.clone()));
        }
        let it = self.iter.as_mut().expect("iterator set above");
        let b = it
            .next()
            .ok_or_else(|| m3ae_train::Error::State("the data stream ended".into()))?
            .map_err(|e| m3ae_train::Error::State(format!("data: {e}")))?;
        self.position = b.position.clone();
        Ok(to_train_batch(b, self.text))
    }

    fn position(&self) -> serde_json::Value {
        serde_json::to_value(&self.position).unwrap_or(serde_json::Value::Null)
    }

    fn restore(&mut self, position: &serde_json::Value) -> m3ae_train::Result<()> {
        self.position = serde_json::from_value(position.clone())?;
        self.iter = None;
        Ok(())
    }
}

/// Builds (or loads) the tokenizer of a run and saves it in the run directory.
fn tokenizer(cfg: &PretrainConfig, run_dir: &Path, scenes: &CaptionedScenes) -> Result<Tokenizer> {
    let saved = run_dir.join("tokenizer.json");
    let tok = if let Some(p) = &cfg.data.tokenizer {
        Tokenizer::from_file(p)?
    } else if saved.is_file() {
        Tokenizer::from_file(&saved)?
    } else {
        let corpus = scenes.corpus(5000);
        Tokenizer::train_wordpiece(corpus.iter().map(String::as_str), cfg.data.vocab_size)?
    };
    if !saved.is_file() {
        tok.save(&saved)?;
    }
    Ok(tok)
}

fn scenes(cfg: &PretrainConfig, split: SceneSplit, len: usize) -> Result<CaptionedScenes> {
    Ok(CaptionedScenes::new(ScenesConfig {
        split,
        len,
        label: LabelKind::Shape,
        ..cfg.data.scenes.clone()
    })?)
}

fn loader_config(cfg: &PretrainConfig, model: &M3aeConfig) -> LoaderConfig {
    let mut lc = LoaderConfig::pretrain(cfg.train.batch_size, model.image_size, model.patch_size);
    lc.seed = cfg.seed;
    lc.num_threads = cfg.data.num_threads;
    lc.text_len = Some(model.text_length);
    lc.masks = Some(MaskConfig {
        image_ratio: model.image_mask_ratio,
        text_ratio: model.text_mask_ratio,
        noise: cfg.data.noise,
    });
    lc
}

/// A fixed held-out batch with masks: for reconstruction images and masked-word accuracy.
fn eval_batch(
    cfg: &PretrainConfig,
    model: &M3aeConfig,
    tok: &Arc<Tokenizer>,
    n: usize,
) -> Result<Batch> {
    let test: Arc<dyn Source> = match cfg.data.source.as_str() {
        "webdataset" => Arc::new(m3ae_data::WebDataset::from_spec(
            cfg.data
                .eval_shards
                .as_deref()
                .or(cfg.data.shards.as_deref())
                .context("data.shards is required for data.source = \"webdataset\"")?,
        )?),
        _ => Arc::new(scenes(cfg, SceneSplit::Test, n)?),
    };
    let mut lc = loader_config(cfg, model);
    lc.batch_size = n;
    lc.shuffle_buffer = 0;
    lc.epochs = Some(1);
    // a held-out set smaller than `n` (the 99 Tux Paint test pairs) gives one shorter batch
    lc.drop_last = false;
    lc.seed = cfg.seed ^ 0x5eed;
    if let Some(im) = lc.image.as_mut() {
        im.transform = Transform::test();
    }
    let loader = Loader::new(test, Some(tok.clone()), lc)?;
    let b = loader
        .iter(Position::default())
        .next()
        .context("the held-out data gave no batch")??;
    Ok(b)
}

/// Masked-word accuracy of `model` on `batch` and the most-frequent-word baseline.
fn masked_word_accuracy(model: &M3ae, batch: &Batch, most_frequent: u32) -> Result<(f64, f64)> {
    let out = model.forward(
        &batch.input,
        batch.image_masking.as_ref(),
        batch.text_masking.as_ref(),
    )?;
    let logits = out.text_logits.context("no text output")?;
    let pred = logits.argmax(candle_core::D::Minus1)?.to_vec2::<u32>()?;
    let (ids, pad) = text_rows(batch)?;
    let mask = out.text_mask.context("no text mask")?.to_vec2::<f32>()?;
    let (mut n, mut hit, mut base) = (0usize, 0usize, 0usize);
    for i in 0..ids.len() {
        for t in 0..ids[i].len() {
            if mask[i][t] > 0.0 && pad[i][t] == 0.0 {
                n += 1;
                hit += (pred[i][t] == ids[i][t]) as usize;
                base += (ids[i][t] == most_frequent) as usize;
            }
        }
    }
    if n == 0 {
        bail!("the held-out batch has no masked words");
    }
    Ok((hit as f64 / n as f64, base as f64 / n as f64))
}

fn most_frequent_token(tok: &Tokenizer, scenes: &CaptionedScenes) -> Result<u32> {
    let mut counts = std::collections::HashMap::<u32, usize>::new();
    for c in scenes.corpus(2000) {
        for id in tok.ids(&c)? {
            *counts.entry(id).or_default() += 1;
        }
    }
    most_frequent(counts).context("empty corpus")
}

/// Token ids and padding flags of a batch's text, row by row.
type TextRows = (Vec<Vec<u32>>, Vec<Vec<f32>>);

/// Reads [`TextRows`] from a batch.
fn text_rows(b: &Batch) -> Result<TextRows> {
    let ids = b
        .input
        .text_ids
        .as_ref()
        .context("no text")?
        .to_vec2::<u32>()?;
    let pad = b
        .input
        .text_padding
        .as_ref()
        .context("no padding")?
        .to_vec2::<f32>()?;
    Ok((ids, pad))
}

/// The most frequent token of a count table (ties: the smaller id).
fn most_frequent(counts: std::collections::HashMap<u32, usize>) -> Option<u32> {
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map(|(id, _)| id)
}

/// The most frequent non-padding token of a batch (frequency baseline for non-scene data).
fn most_frequent_in_batch(b: &Batch) -> Result<u32> {
    let (ids, pad) = text_rows(b)?;
    let mut counts = std::collections::HashMap::<u32, usize>::new();
    for (r, p) in ids.iter().zip(&pad) {
        for (&t, &q) in r.iter().zip(p) {
            if q == 0.0 {
                *counts.entry(t).or_default() += 1;
            }
        }
    }
    most_frequent(counts).context("the held-out batch has no text")
}

/// Writes the reconstruction panel of a held-out batch: per sample a row of
/// original | masked input | prediction | prediction with the visible patches pasted back.
pub fn write_reconstruction(
    cfg: &M3aeConfig,
    out: &m3ae_model::Output,
    batch: &Batch,
    tok: Option<&Tokenizer>,
    normalization: m3ae_data::Normalization,
    png: &Path,
) -> Result<()> {
    let patches = batch.input.image_patches.as_ref().context("no image")?;
    let pred = out.image.clone().context("no image output")?;
    let mask = out.image_mask.clone().context("no image mask")?;
    let m3 = mask.unsqueeze(2)?.broadcast_as(pred.shape())?;
    let grey = patches.zeros_like()?;
    let masked_in = ((patches * (1.0 - &m3)?)? + (&grey * &m3)?)?;
    let pasted = ((&pred * &m3)? + (patches * (1.0 - &m3)?)?)?;
    let panels = [patches.clone(), masked_in, pred, pasted];
    let (b, s) = (patches.dim(0)?, cfg.image_size);
    let scale = (192 / s).max(1);
    let gap = 4;
    let (w, h) = (4 * s * scale + 5 * gap, b * s * scale + (b + 1) * gap);
    let mut img = image::RgbImage::from_pixel(w as u32, h as u32, image::Rgb([255, 255, 255]));
    let (mean, std) = normalization.mean_std();
    for (col, p) in panels.iter().enumerate() {
        let pix = m3ae_model::unpatchify(p, cfg.patch_size, 3)?.to_dtype(DType::F32)?;
        let v = pix.flatten_all()?.to_vec1::<f32>()?;
        for i in 0..b {
            for y in 0..s {
                for x in 0..s {
                    let o = ((i * s + y) * s + x) * 3;
                    let mut rgb = [0u8; 3];
                    for c in 0..3 {
                        rgb[c] = ((v[o + c] * std[c] + mean[c]) * 255.0)
                            .round()
                            .clamp(0.0, 255.0) as u8;
                    }
                    for dy in 0..scale {
                        for dx in 0..scale {
                            let px = gap + col * (s * scale + gap) + x * scale + dx;
                            let py = gap + i * (s * scale + gap) + y * scale + dy;
                            img.put_pixel(px as u32, py as u32, image::Rgb(rgb));
                        }
                    }
                }
            }
        }
    }
    if let Some(parent) = png.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = png.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, png)?;
    // Captions, masked words and predicted words.
    if let (Some(tok), Some(logits), Some(tmask), Some(ids)) = (
        tok,
        out.text_logits.as_ref(),
        out.text_mask.as_ref(),
        batch.input.text_ids.as_ref(),
    ) {
        let pred = logits.argmax(candle_core::D::Minus1)?.to_vec2::<u32>()?;
        let ids = ids.to_vec2::<u32>()?;
        let pad = batch
            .input
            .text_padding
            .as_ref()
            .context("no padding")?
            .to_vec2::<f32>()?;
        let tmask = tmask.to_vec2::<f32>()?;
        let mut text = String::new();
        for i in 0..ids.len() {
            let valid: Vec<u32> = ids[i]
                .iter()
                .zip(&pad[i])
                .filter(|(_, &p)| p == 0.0)
                .map(|(&t, _)| t)
                .collect();
            text.push_str(&format!("sample {i}: {}\n", tok.decode(&valid)?));
            let mut masked = Vec::new();
            let mut predicted = Vec::new();
            for t in 0..ids[i].len() {
                if tmask[i][t] > 0.0 && pad[i][t] == 0.0 {
                    masked.push(tok.decode(&[ids[i][t]])?);
                    predicted.push(tok.decode(&[pred[i][t]])?);
                }
            }
            text.push_str(&format!("  masked words:    {}\n", masked.join(" ")));
            text.push_str(&format!("  predicted words: {}\n", predicted.join(" ")));
        }
        std::fs::write(png.with_extension("txt"), text)?;
    }
    Ok(())
}

/// The probe recipe of the run's final scene probe ([`probe_scenes`]): LARS as in the official
/// recipe, but 40 epochs at a peak learning rate of 2.0 (batch 256, 4 warmup epochs), which
/// converges on the few thousand scene features.
pub fn scene_probe_config(seed: u64) -> m3ae_eval::ProbeConfig {
    m3ae_eval::ProbeConfig {
        epochs: 40,
        batch_size: 256,
        lr_peak: 2.0,
        warmup_epochs: 4,
        seed,
        ..Default::default()
    }
}

/// Linear-probe top-1 of a representation on the scenes' shape labels (train/test splits).
pub fn probe_scenes(model: &dyn Represent, cfg: &PretrainConfig, seed: u64) -> Result<f64> {
    let mc = model.config().clone();
    let feats = |split: SceneSplit, n: usize| -> Result<(Tensor, Vec<u32>)> {
        let src = scenes(cfg, split, n)?;
        let mut lc = LoaderConfig::eval(256, mc.image_size, mc.patch_size);
        lc.num_threads = cfg.data.num_threads;
        let loader = Loader::new(Arc::new(src), None, lc)?;
        let mut labels = Vec::new();
        let mut parts = Vec::new();
        for b in loader.iter(Position::default()) {
            let b = b?;
            labels.extend(b.labels.iter().map(|l| l.unwrap_or(0) as u32));
            let patches = b.input.image_patches.as_ref().context("no image")?;
            parts.push(m3ae_model::pool(&model.represent(patches)?, Pooling::Cls)?.detach());
        }
        Ok((Tensor::cat(&parts, 0)?, labels))
    };
    let (ntr, nte) = cfg.probe_samples;
    let (xtr, ytr) = feats(SceneSplit::Train, ntr)?;
    let (xte, yte) = feats(SceneSplit::Test, nte)?;
    let classes = (ytr.iter().chain(&yte).copied().max().unwrap_or(0) + 1) as usize;
    let (head, _) = m3ae_eval::train_probe(&xtr, &ytr, classes, &scene_probe_config(seed))?;
    let logits = m3ae_eval::probe::probe_logits(&head, &xte)?;
    Ok(m3ae_eval::metrics::top_k_accuracy(
        &logits, classes, &yte, 1,
    )?)
}

/// Runs (or resumes) a pre-training job.
pub fn run(mut cfg: PretrainConfig, opts: RunOptions) -> Result<RunSummary> {
    let dev = Device::Cpu;
    cfg.train.validate()?;
    cfg.model.validate(cfg.objective == ObjectiveKind::M3ae)?;
    let run_dir = cfg.run_dir();
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let ck_dir = run_dir.join("checkpoints");
    let latest = m3ae_train::checkpoint::latest(&ck_dir)?;
    if latest.is_some() && !opts.resume {
        bail!(
            "{} already holds checkpoints: pass --resume to continue it, or choose another --name",
            run_dir.display()
        );
    }
    if opts.resume && latest.is_none() {
        bail!("--resume: no checkpoint under {}", ck_dir.display());
    }
    let (train_source, tok): (Arc<dyn Source>, Arc<Tokenizer>) = match cfg.data.source.as_str() {
        "scenes" => {
            let train_scenes = CaptionedScenes::new(ScenesConfig {
                split: SceneSplit::Train,
                ..cfg.data.scenes.clone()
            })?;
            let tok = Arc::new(tokenizer(&cfg, &run_dir, &train_scenes)?);
            cfg.model.image_size = cfg.data.scenes.image_size;
            (Arc::new(train_scenes), tok)
        }
        "webdataset" => {
            let spec = cfg
                .data
                .shards
                .as_deref()
                .context("data.shards is required for data.source = \"webdataset\"")?;
            let path = cfg
                .data
                .tokenizer
                .as_ref()
                .context("data.tokenizer (a tokenizer.json, e.g. bert-base-uncased) is required for webdataset")?;
            let tok = Tokenizer::from_file(path)?;
            tok.save(run_dir.join("tokenizer.json"))?;
            cfg.probe = false;
            (
                Arc::new(m3ae_data::WebDataset::from_spec(spec)?),
                Arc::new(tok),
            )
        }
        other => bail!("data.source = {other:?}: expected \"scenes\" or \"webdataset\""),
    };
    cfg.model.text_vocab_size = tok.vocab_size();
    cfg.validate()?;
    let model_cfg = cfg.model.resolved();
    // the resolved configuration, as run
    let cfg_path = run_dir.join("config.toml");
    let text = toml::to_string_pretty(&cfg).context("serialising the configuration")?;
    std::fs::write(&cfg_path, text).with_context(|| format!("writing {}", cfg_path.display()))?;

    let with_text = cfg.objective == ObjectiveKind::M3ae;
    let mut lc = loader_config(&cfg, &model_cfg);
    let unpaired = match (
        &cfg.data.unpaired_text,
        with_text && model_cfg.unpaired_text_loss_weight > 0.0,
    ) {
        (Some(p), true) => {
            lc.unpaired_text_len = model_cfg.text_length;
            Some(Arc::new(m3ae_data::TextCorpus::from_file(p.clone())?) as Arc<dyn Source>)
        }
        (None, true) => bail!("model.unpaired_text_loss_weight > 0 needs data.unpaired_text"),
        _ => None,
    };
    let mut loader = Loader::new(train_source, Some(tok.clone()), lc)?;
    if let Some(u) = unpaired {
        loader = loader.with_unpaired_text(u)?;
    }
    let mut source = LoaderSource {
        loader,
        iter: None,
        position: Position::default(),
        text: with_text,
    };
    let eval = eval_batch(&cfg, &model_cfg, &tok, 8)?;
    let norm = m3ae_data::Normalization::Cc12m;
    let (mut summary, final_model) = match cfg.objective {
        ObjectiveKind::M3ae => {
            let m = M3ae::init(&model_cfg, cfg.seed, &dev)?;
            train_loop(
                &cfg,
                &opts,
                Trainer::new(m, cfg.train.clone())?,
                &mut source,
                latest,
                &run_dir,
                |t, path| {
                    let m = t.objective();
                    let out = m.forward(
                        &eval.input,
                        eval.image_masking.as_ref(),
                        eval.text_masking.as_ref(),
                    )?;
                    write_reconstruction(m.config(), &out, &eval, Some(&tok), norm, path)
                },
            )?
        }
        ObjectiveKind::Mae => {
            let m = Mae::init(&model_cfg, cfg.seed, &dev)?;
            let image_only = eval_image_only(&eval);
            train_loop(
                &cfg,
                &opts,
                Trainer::new(m, cfg.train.clone())?,
                &mut source,
                latest,
                &run_dir,
                |t, path| {
                    let m = t.objective();
                    let patches = image_only
                        .input
                        .image_patches
                        .as_ref()
                        .context("no image")?;
                    let masking = image_only.image_masking.as_ref().context("no masking")?;
                    let out = m.forward(patches, masking)?;
                    write_reconstruction(m.config(), &out, &image_only, None, norm, path)
                },
            )?
        }
    };
    if let Trained::M3ae(m) = &final_model {
        let held_out = eval_batch(&cfg, &model_cfg, &tok, 256)?;
        let most_frequent = match cfg.data.source.as_str() {
            "scenes" => most_frequent_token(&tok, &scenes(&cfg, SceneSplit::Train, 2000)?)?,
            _ => most_frequent_in_batch(&held_out)?,
        };
        let (acc, base) = masked_word_accuracy(m, &held_out, most_frequent)?;
        summary.masked_word_accuracy = Some(acc);
        summary.frequency_baseline = Some(base);
    }
    if cfg.probe && !summary.interrupted {
        let trained = match &final_model {
            Trained::M3ae(m) => probe_scenes(m, &cfg, 1)?,
            Trained::Mae(m) => probe_scenes(m, &cfg, 1)?,
        };
        let random = Mae::init(&model_cfg, cfg.seed.wrapping_add(1000), &dev)?;
        let baseline = probe_scenes(&random, &cfg, 1)?;
        summary.probe = Some((trained, baseline));
    }
    let summary_path = run_dir.join("summary.json");
    std::fs::write(&summary_path, serde_json::to_string_pretty(&summary)?)?;
    Ok(summary)
}

/// The trained model handed back by the loop.
enum Trained {
    M3ae(M3ae),
    Mae(Mae),
}

fn eval_image_only(b: &Batch) -> Batch {
    let mut b = b.clone();
    b.input.text_ids = None;
    b.input.text_padding = None;
    b.text_masking = None;
    b
}

trait IntoTrained {
    fn into_trained(self) -> Trained;
}
impl IntoTrained for M3ae {
    fn into_trained(self) -> Trained {
        Trained::M3ae(self)
    }
}
impl IntoTrained for Mae {
    fn into_trained(self) -> Trained {
        Trained::Mae(self)
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

#[allow(clippy::too_many_arguments)]
fn train_loop<O: Objective + Clone + IntoTrained>(
    cfg: &PretrainConfig,
    opts: &RunOptions,
    mut trainer: Trainer<O>,
    source: &mut LoaderSource,
    latest: Option<PathBuf>,
    run_dir: &Path,
    mut draw: impl FnMut(&Trainer<O>, &Path) -> Result<()>,
) -> Result<(RunSummary, Trained)> {
    let ck_dir = run_dir.join("checkpoints");
    let mut first_window: Option<(f64, f64)> = None;
    let mut history = serde_json::json!({});
    if let Some(dir) = &latest {
        let (pos, extra) = trainer
            .restore(dir)
            .with_context(|| format!("resuming from {}", dir.display()))?;
        source.restore(&pos)?;
        history = extra;
        if let (Some(a), Some(b)) = (
            history["first_image_loss"].as_f64(),
            history["first_text_loss"].as_f64(),
        ) {
            first_window = Some((a, b));
        }
        eprintln!("resumed from {} at step {}", dir.display(), trainer.step());
    }
    let mut jsonl = JsonlSink::open(&run_dir.join("metrics.jsonl"))?;
    let mut tb = TensorBoardSink::create(&run_dir.join("tb"))?;
    let total = cfg.train.steps;
    let bar = if opts.plain {
        None
    } else {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}<{eta_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_position(trainer.step());
        Some(b)
    };
    let start = Instant::now();
    let start_step = trainer.step();
    let mut window: Vec<StepReport> = Vec::new();
    let mut last_window = (f64::NAN, f64::NAN);
    let mut checkpoint = latest.clone();
    let mut interrupted = false;
    let mut window_start = Instant::now();
    let mut data_wait = 0f64;
    let extra = |first: Option<(f64, f64)>| {
        serde_json::json!({
            "first_image_loss": first.map(|f| f.0),
            "first_text_loss": first.map(|f| f.1),
        })
    };
    while trainer.step() < total {
        if opts.stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let t_data = Instant::now();
        let batch = source.next_batch()?;
        data_wait += t_data.elapsed().as_secs_f64();
        let r = trainer.train_step(&batch)?;
        if !r.updated {
            if r.skipped {
                eprintln!(
                    "step {}: non-finite loss or gradient, batch skipped",
                    trainer.step()
                );
            }
            continue;
        }
        let step = trainer.step();
        window.push(r);
        if step % cfg.log_every == 0 || step == total {
            let avg = |k: &str| {
                mean(
                    &window
                        .iter()
                        .filter_map(|r| r.scalars.get(k).copied())
                        .collect::<Vec<_>>(),
                )
            };
            let secs = window_start.elapsed().as_secs_f64();
            let sps = (window.len() * cfg.train.batch_size) as f64 / secs.max(1e-9);
            let mut rec = serde_json::Map::new();
            for k in [
                "loss",
                "image_loss",
                "text_loss",
                "text_accuracy",
                "unpaired_text_loss",
            ] {
                if window.iter().any(|r| r.scalars.contains_key(k)) {
                    rec.insert(k.into(), avg(k).into());
                }
            }
            let last = window.last().expect("window has a step");
            rec.insert("lr".into(), last.lr.into());
            rec.insert(
                "grad_norm".into(),
                last.grad_norm.unwrap_or(f64::NAN).into(),
            );
            rec.insert("samples_per_s".into(), sps.into());
            let tokens = source.loader.config().text_len.unwrap_or(0) + cfg.model.num_patches();
            rec.insert("tokens_per_s".into(), (sps * tokens as f64).into());
            rec.insert("skipped_steps".into(), trainer.skipped_steps().into());
            rec.insert(
                "data_wait_fraction".into(),
                (data_wait / secs.max(1e-9)).into(),
            );
            let bad = &source.position.stats;
            rec.insert("bad_samples".into(), serde_json::to_value(bad)?);
            let rec = serde_json::Value::Object(rec);
            jsonl.record(step, &rec)?;
            tb.record(step, &rec)?;
            let il = avg("image_loss");
            let tl = avg("text_loss");
            if first_window.is_none() {
                first_window = Some((il, tl));
            }
            last_window = (il, tl);
            let msg = format!(
                "loss {:.4} image {:.4} text {:.3} acc {:.2} | {:.0} samples/s, data wait {:.0}%",
                avg("loss"),
                il,
                tl,
                avg("text_accuracy"),
                sps,
                100.0 * data_wait / secs.max(1e-9)
            );
            match &bar {
                Some(b) => b.set_message(msg),
                None => eprintln!("step {step}/{total} {msg}"),
            }
            window.clear();
            window_start = Instant::now();
            data_wait = 0.0;
        }
        if let Some(b) = &bar {
            b.set_position(step);
        }
        if cfg.image_every > 0 && step % cfg.image_every == 0 {
            draw(
                &trainer,
                &run_dir.join("recon").join(format!("step-{step:08}.png")),
            )?;
        }
        if step % cfg.save_every == 0 && step < total {
            checkpoint = Some(trainer.save_checkpoint(
                &ck_dir,
                source.position(),
                extra(first_window),
                cfg.keep_checkpoints,
            )?);
        }
    }
    if let Some(b) = &bar {
        b.finish();
    }
    let train_seconds = start.elapsed().as_secs_f64();
    let done = trainer.step() - start_step;
    if done > 0 || checkpoint.is_none() {
        checkpoint = Some(trainer.save_checkpoint(
            &ck_dir,
            source.position(),
            extra(first_window),
            cfg.keep_checkpoints,
        )?);
    }
    draw(
        &trainer,
        &run_dir
            .join("recon")
            .join(format!("step-{:08}.png", trainer.step())),
    )?;
    let summary = RunSummary {
        run_dir: run_dir.to_path_buf(),
        steps: trainer.step(),
        interrupted,
        image_loss: first_window
            .map(|f| (f.0, last_window.0))
            .filter(|p| p.0.is_finite() && p.1.is_finite()),
        text_loss: first_window
            .map(|f| (f.1, last_window.1))
            .filter(|p| p.0.is_finite() && p.1.is_finite()),
        masked_word_accuracy: None,
        frequency_baseline: None,
        samples_per_s: (done as usize * cfg.train.batch_size) as f64 / train_seconds.max(1e-9),
        train_seconds,
        probe: None,
        skipped_steps: trainer.skipped_steps(),
        checkpoint,
    };
    Ok((summary, trainer.objective().clone().into_trained()))
}
