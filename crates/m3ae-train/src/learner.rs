//! The training loop a user would otherwise copy: [`Learner`] drives a [`Trainer`] over any
//! [`BatchSource`] with checkpoint cadence (keeping the newest N), exact resume including the
//! data position, metric windows written to any list of [`MetricSink`]s, progress behind the
//! small [`Progress`] trait, an interrupt flag, and hooks for periodic work (reconstruction
//! images, evaluations).
//!
//! With several processes (a [`crate::GradSync`] of world size > 1) every rank runs the same
//! loop: they stop together when any rank's interrupt flag is set, rank 0 gathers every rank's
//! data position ([`BatchSource::merge_positions`]) and alone writes checkpoints, metrics and
//! runs the hooks.
//!
//! The sketch below compiles but does not run (it needs a trainer and a data source); the same
//! loop runs, with its results checked, in `tests/extension_points.rs` and
//! `examples/custom_training_loop.rs`.
//!
//! ```no_run
//! # fn demo(trainer: m3ae_train::Trainer<m3ae_model::M3ae>,
//! #         source: impl m3ae_train::BatchSource) -> m3ae_train::Result<()> {
//! use m3ae_train::{JsonlSink, Learner};
//! let run = std::path::Path::new("runs/mine");
//! let fitted = Learner::new(trainer, source)
//!     .checkpoints(run.join("checkpoints"), 100, 2) // every 100 steps, keep the newest 2
//!     .resume_latest()?                              // continue if the run has a checkpoint
//!     .log_every(25)
//!     .sink(Box::new(JsonlSink::open(&run.join("metrics.jsonl"))?))
//!     .fit()?;
//! println!("{} steps, newest checkpoint {:?}", fitted.report.steps, fitted.report.checkpoint);
//! # Ok(()) }
//! ```

use crate::checkpoint;
use crate::metrics::MetricSink;
use crate::objective::Objective;
use crate::trainer::{BatchSource, StepReport, Trainer};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The means of one logging window (the steps since the previous one).
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// The optimiser step that closed the window.
    pub step: u64,
    /// The step the run trains to.
    pub total: u64,
    /// Optimiser steps in the window.
    pub steps: usize,
    /// Mean of every scalar of the objective's loss report over the steps that have it.
    pub scalars: BTreeMap<String, f64>,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Global gradient norm of the last step (before clipping).
    pub grad_norm: Option<f64>,
    /// Training samples per second (global batch), data loading included.
    pub samples_per_s: f64,
    /// Share of the window's wall time spent waiting for batches.
    pub data_wait_fraction: f64,
}

impl Window {
    /// The window's mean of `name`, or 0 when no step reported it (e.g. a text loss of an
    /// image-only model).
    pub fn mean(&self, name: &str) -> f64 {
        self.scalars.get(name).copied().unwrap_or(0.0)
    }
}

/// Where the loop reports progress. Every method has a default, so an implementation overrides
/// only what it shows; [`LogLines`] prints one line per window.
pub trait Progress {
    /// The loop starts at `step` of `total` (rank 0 only).
    fn start(&mut self, _step: u64, _total: u64) {}
    /// An optimiser step finished (rank 0 only).
    fn advance(&mut self, _step: u64) {}
    /// A logging window closed (rank 0 only).
    fn window(&mut self, _window: &Window) {}
    /// Something worth telling the user: a resume, a skipped non-finite batch (every rank).
    fn note(&mut self, message: &str) {
        eprintln!("{message}");
    }
    /// The loop ended (rank 0 only).
    fn finish(&mut self) {}
}

/// [`Progress`] as plain lines on stderr: `step S/T name value ...` per window.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogLines;

impl Progress for LogLines {
    fn window(&mut self, w: &Window) {
        let scalars: Vec<String> = w
            .scalars
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect();
        eprintln!(
            "step {}/{} {} | {:.0} samples/s, data wait {:.0}%",
            w.step,
            w.total,
            scalars.join(" "),
            w.samples_per_s,
            100.0 * w.data_wait_fraction
        );
    }
}

/// The error a hook may return (anything that converts, e.g. `anyhow::Error`).
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

type HookFn<'h, O> = Box<dyn FnMut(&Trainer<O>, u64) -> std::result::Result<(), HookError> + 'h>;

/// Periodic work run on rank 0 between steps: every `every` optimiser steps (0: never) and,
/// when `at_end`, once after the last step.
pub struct Hook<'h, O: Objective> {
    name: String,
    every: u64,
    at_end: bool,
    run: HookFn<'h, O>,
}

impl<'h, O: Objective> Hook<'h, O> {
    /// A hook called with the trainer and the step reached.
    pub fn new(
        name: impl Into<String>,
        every: u64,
        at_end: bool,
        run: impl FnMut(&Trainer<O>, u64) -> std::result::Result<(), HookError> + 'h,
    ) -> Self {
        Self {
            name: name.into(),
            every,
            at_end,
            run: Box::new(run),
        }
    }

    fn call(&mut self, trainer: &Trainer<O>, step: u64) -> Result<()> {
        (self.run)(trainer, step).map_err(|error| Error::Hook {
            name: self.name.clone(),
            step,
            error,
        })
    }
}

/// What a finished (or interrupted) [`Learner::fit`] reports.
#[derive(Debug, Clone, Default)]
pub struct FitReport {
    /// Optimiser step the loop started at (0, or the resumed checkpoint's step).
    pub start_step: u64,
    /// Optimiser step reached.
    pub steps: u64,
    /// True when the interrupt flag stopped the loop.
    pub interrupted: bool,
    /// The checkpoint the loop resumed from.
    pub resumed_from: Option<PathBuf>,
    /// Scalar means of the run's first logging window (kept across resumes).
    pub first_window: Option<BTreeMap<String, f64>>,
    /// Scalar means of this loop's last logging window.
    pub last_window: Option<BTreeMap<String, f64>>,
    /// Training samples per second over the loop (global batch, data loading included).
    pub samples_per_s: f64,
    /// Wall time of the loop in seconds.
    pub train_seconds: f64,
    /// Micro-batches skipped for non-finite values (whole run).
    pub skipped_steps: u64,
    /// The newest checkpoint (rank 0; `None` elsewhere unless resumed).
    pub checkpoint: Option<PathBuf>,
    /// State carried in the checkpoints besides the loop's own (e.g. an official run's
    /// provenance), as read on resume.
    pub carried: serde_json::Value,
}

/// The trained state handed back by [`Learner::fit`].
pub struct Fitted<O: Objective, S: BatchSource> {
    /// The trainer (model and optimiser state).
    pub trainer: Trainer<O>,
    /// The data source, positioned after the last batch used.
    pub source: S,
    /// What happened.
    pub report: FitReport,
}

/// The key of the first window's means in a checkpoint's `extra` state.
const FIRST_WINDOW: &str = "first_window";

/// Builds and runs the training loop; see the [module docs](self).
pub struct Learner<'h, O: Objective, S: BatchSource> {
    trainer: Trainer<O>,
    source: S,
    checkpoint_dir: Option<PathBuf>,
    save_every: u64,
    keep: usize,
    resume: Option<PathBuf>,
    log_every: u64,
    sinks: Vec<Box<dyn MetricSink + 'h>>,
    progress: Box<dyn Progress + 'h>,
    interrupt: Arc<AtomicBool>,
    hooks: Vec<Hook<'h, O>>,
    tokens_per_sample: Option<usize>,
}

impl<'h, O: Objective, S: BatchSource> Learner<'h, O, S> {
    /// A loop over `source` to the trainer's `steps`: logs every 25 steps through [`LogLines`],
    /// no checkpoints, no sinks, no hooks until set.
    pub fn new(trainer: Trainer<O>, source: S) -> Self {
        Self {
            trainer,
            source,
            checkpoint_dir: None,
            save_every: 0,
            keep: 1,
            resume: None,
            log_every: 25,
            sinks: Vec::new(),
            progress: Box::new(LogLines),
            interrupt: Arc::new(AtomicBool::new(false)),
            hooks: Vec::new(),
            tokens_per_sample: None,
        }
    }

    /// Checkpoints under `dir` every `every` steps (0: only at the end) and at the end, keeping
    /// the newest `keep`.
    pub fn checkpoints(mut self, dir: impl Into<PathBuf>, every: u64, keep: usize) -> Self {
        self.checkpoint_dir = Some(dir.into());
        self.save_every = every;
        self.keep = keep.max(1);
        self
    }

    /// Starts from this checkpoint folder (weights, optimiser, counters, data position).
    pub fn resume_from(mut self, dir: impl Into<PathBuf>) -> Self {
        self.resume = Some(dir.into());
        self
    }

    /// Starts from the newest checkpoint under the [`Learner::checkpoints`] folder, if any.
    pub fn resume_latest(mut self) -> Result<Self> {
        if let Some(dir) = &self.checkpoint_dir {
            self.resume = checkpoint::latest(dir)?;
        }
        Ok(self)
    }

    /// Closes a logging window every `every` steps (and at the last step).
    pub fn log_every(mut self, every: u64) -> Self {
        self.log_every = every.max(1);
        self
    }

    /// Adds a metric sink (written on rank 0).
    pub fn sink(mut self, sink: Box<dyn MetricSink + 'h>) -> Self {
        self.sinks.push(sink);
        self
    }

    /// Replaces the progress reporting.
    pub fn progress(mut self, progress: Box<dyn Progress + 'h>) -> Self {
        self.progress = progress;
        self
    }

    /// Stops at the next step boundary once `flag` is set (a checkpoint is written first).
    pub fn interrupt(mut self, flag: Arc<AtomicBool>) -> Self {
        self.interrupt = flag;
        self
    }

    /// Adds periodic work.
    pub fn hook(mut self, hook: Hook<'h, O>) -> Self {
        self.hooks.push(hook);
        self
    }

    /// Tokens (patches + text) per sample, for the `tokens_per_s` metric.
    pub fn tokens_per_sample(mut self, tokens: usize) -> Self {
        self.tokens_per_sample = Some(tokens);
        self
    }

    /// Gathers every rank's data position at rank 0, which writes the checkpoint (`None`
    /// elsewhere or without a checkpoint folder).
    fn save(&mut self, extra: serde_json::Value) -> Result<Option<PathBuf>> {
        let Some(dir) = self.checkpoint_dir.clone() else {
            return Ok(None);
        };
        let local = serde_json::to_vec(&self.source.position())?;
        let Some(all) = self.trainer.sync_mut().gather(&local)? else {
            return Ok(None);
        };
        let locals = all
            .iter()
            .map(|b| serde_json::from_slice(b))
            .collect::<std::result::Result<Vec<serde_json::Value>, _>>()?;
        let position = self.source.merge_positions(&locals)?;
        Ok(Some(
            self.trainer
                .save_checkpoint(&dir, position, extra, self.keep)?,
        ))
    }

    /// Restores the resume checkpoint; returns the carried state and the first window.
    fn restore(&mut self) -> Result<(serde_json::Value, Option<BTreeMap<String, f64>>)> {
        let Some(dir) = self.resume.clone() else {
            return Ok((serde_json::Value::Null, None));
        };
        let (position, mut extra) = self.trainer.restore(&dir).map_err(|e| Error::Resume {
            dir: dir.clone(),
            error: Box::new(e),
        })?;
        self.source.restore(&position)?;
        let first = take_first_window(&mut extra);
        self.progress.note(&format!(
            "resumed from {} at step {}",
            dir.display(),
            self.trainer.step()
        ));
        Ok((extra, first))
    }

    /// Runs the loop to the trainer's `steps` (or the interrupt); writes the final checkpoint,
    /// runs the end-of-run hooks and returns the trainer, the source and a report.
    pub fn fit(mut self) -> Result<Fitted<O, S>> {
        let (carried, mut first_window) = self.restore()?;
        let total = self.trainer.config().steps;
        let batch_size = self.trainer.config().batch_size;
        if self.resume.is_some() && self.trainer.step() >= total {
            self.progress.note(&format!(
                "nothing to train: the run is already at step {} and train.steps = {total} \
                 (pass a larger --steps to train further)",
                self.trainer.step()
            ));
        }
        let (rank, world) = self.trainer.rank_and_world();
        let lead = rank == 0;
        if lead {
            self.progress.start(self.trainer.step(), total);
        }
        let extra = |first: &Option<BTreeMap<String, f64>>| {
            let mut e = match &carried {
                serde_json::Value::Object(m) => m.clone(),
                _ => serde_json::Map::new(),
            };
            e.insert(
                FIRST_WINDOW.into(),
                serde_json::to_value(first).unwrap_or(serde_json::Value::Null),
            );
            serde_json::Value::Object(e)
        };
        let start = Instant::now();
        let start_step = self.trainer.step();
        let mut window: Vec<StepReport> = Vec::new();
        let mut last_window = None;
        let mut newest = self.resume.clone();
        // the same on every rank (`newest` is only set on rank 0)
        let mut have_checkpoint = self.resume.is_some();
        let mut interrupted = false;
        let mut window_start = Instant::now();
        let mut data_wait = 0f64;
        while self.trainer.step() < total {
            let mut stop = [f64::from(u8::from(self.interrupt.load(Ordering::SeqCst)))];
            if world > 1 {
                // stop together: a rank that left alone would leave the others waiting
                self.trainer.sync_mut().all_reduce_sum(&mut stop)?;
            }
            if stop[0] > 0.0 {
                interrupted = true;
                break;
            }
            let t_data = Instant::now();
            let batch = self.source.next_batch()?;
            data_wait += t_data.elapsed().as_secs_f64();
            let r = self.trainer.train_step(&batch)?;
            if !r.updated {
                if r.skipped {
                    self.progress.note(&format!(
                        "step {}: non-finite loss or gradient, batch skipped",
                        self.trainer.step()
                    ));
                }
                continue;
            }
            let step = self.trainer.step();
            window.push(r);
            if step.is_multiple_of(self.log_every) || step == total {
                let secs = window_start.elapsed().as_secs_f64().max(1e-9);
                let w = close_window(&window, step, total, batch_size, secs, data_wait);
                if lead {
                    let mut rec = record(&w);
                    if let Some(t) = self.tokens_per_sample {
                        rec.insert("tokens_per_s".into(), (w.samples_per_s * t as f64).into());
                    }
                    rec.insert("skipped_steps".into(), self.trainer.skipped_steps().into());
                    if let Some(stats) = self.source.stats() {
                        rec.insert("bad_samples".into(), stats);
                    }
                    let rec = serde_json::Value::Object(rec);
                    for sink in &mut self.sinks {
                        sink.record(step, &rec)?;
                    }
                    self.progress.window(&w);
                }
                first_window.get_or_insert_with(|| w.scalars.clone());
                last_window = Some(w.scalars);
                window.clear();
                window_start = Instant::now();
                data_wait = 0.0;
            }
            if lead {
                self.progress.advance(step);
                for h in &mut self.hooks {
                    if h.every > 0 && step.is_multiple_of(h.every) {
                        h.call(&self.trainer, step)?;
                    }
                }
            }
            if self.save_every > 0 && step.is_multiple_of(self.save_every) && step < total {
                let saved = self.save(extra(&first_window))?;
                newest = saved.or(newest);
                have_checkpoint = true;
            }
        }
        if lead {
            self.progress.finish();
        }
        let train_seconds = start.elapsed().as_secs_f64();
        let done = self.trainer.step() - start_step;
        if done > 0 || !have_checkpoint {
            let saved = self.save(extra(&first_window))?;
            newest = saved.or(newest);
        }
        if lead {
            let step = self.trainer.step();
            for h in &mut self.hooks {
                if h.at_end {
                    h.call(&self.trainer, step)?;
                }
            }
        }
        let report = FitReport {
            start_step,
            steps: self.trainer.step(),
            interrupted,
            resumed_from: self.resume.clone(),
            first_window,
            last_window,
            samples_per_s: (done as usize * batch_size) as f64 / train_seconds.max(1e-9),
            train_seconds,
            skipped_steps: self.trainer.skipped_steps(),
            checkpoint: newest,
            carried,
        };
        Ok(Fitted {
            trainer: self.trainer,
            source: self.source,
            report,
        })
    }
}

/// Takes the first window's means out of a checkpoint's extra state. Checkpoints written before
/// the loop moved into this crate kept the two M3AE losses under their own keys.
fn take_first_window(extra: &mut serde_json::Value) -> Option<BTreeMap<String, f64>> {
    let map = extra.as_object_mut()?;
    let mut first: Option<BTreeMap<String, f64>> = map
        .remove(FIRST_WINDOW)
        .and_then(|v| serde_json::from_value(v).ok());
    let legacy = [
        ("first_image_loss", "image_loss"),
        ("first_text_loss", "text_loss"),
    ];
    let mut old = BTreeMap::new();
    for (key, name) in legacy {
        if let Some(v) = map.remove(key).and_then(|v| v.as_f64()) {
            old.insert(name.to_string(), v);
        }
    }
    if first.is_none() && !old.is_empty() {
        first = Some(old);
    }
    first
}

fn close_window(
    steps: &[StepReport],
    step: u64,
    total: u64,
    batch_size: usize,
    secs: f64,
    data_wait: f64,
) -> Window {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for r in steps {
        for (k, v) in &r.scalars {
            let e = sums.entry(k.clone()).or_insert((0.0, 0));
            e.0 += v;
            e.1 += 1;
        }
    }
    let last = steps.last();
    Window {
        step,
        total,
        steps: steps.len(),
        scalars: sums
            .into_iter()
            .map(|(k, (s, n))| (k, s / n as f64))
            .collect(),
        lr: last.map_or(f64::NAN, |r| r.lr),
        grad_norm: last.and_then(|r| r.grad_norm),
        samples_per_s: (steps.len() * batch_size) as f64 / secs,
        data_wait_fraction: data_wait / secs,
    }
}

/// The metrics record of a window (JSON object; NaN becomes null).
fn record(w: &Window) -> serde_json::Map<String, serde_json::Value> {
    let mut rec = serde_json::Map::new();
    for (k, v) in &w.scalars {
        rec.insert(k.clone(), (*v).into());
    }
    rec.insert("lr".into(), w.lr.into());
    rec.insert("grad_norm".into(), w.grad_norm.unwrap_or(f64::NAN).into());
    rec.insert("samples_per_s".into(), w.samples_per_s.into());
    rec.insert("data_wait_fraction".into(), w.data_wait_fraction.into());
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_first_losses_are_read_as_the_first_window() {
        let mut extra = serde_json::json!({
            "first_image_loss": 1.5, "first_text_loss": 4.9, "source": "official"
        });
        let first = take_first_window(&mut extra).unwrap();
        assert_eq!(first["image_loss"], 1.5);
        assert_eq!(first["text_loss"], 4.9);
        assert_eq!(extra, serde_json::json!({ "source": "official" }));
    }

    #[test]
    fn window_means_only_count_steps_that_report_a_scalar() {
        let step = |s: &[(&str, f64)]| StepReport {
            step: 0,
            lr: 0.5,
            scalars: s.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            grad_norm: Some(2.0),
            updated: true,
            skipped: false,
        };
        let w = close_window(
            &[step(&[("a", 1.0), ("b", 4.0)]), step(&[("a", 3.0)])],
            2,
            10,
            8,
            2.0,
            0.5,
        );
        assert_eq!(w.mean("a"), 2.0);
        assert_eq!(w.mean("b"), 4.0);
        assert_eq!(w.mean("c"), 0.0);
        assert_eq!(w.samples_per_s, 8.0);
        assert_eq!(w.data_wait_fraction, 0.25);
    }
}
