//! The training loop: loss, backward, gradient accumulation, NaN/Inf guards, global-norm
//! clipping, the warmup-cosine schedule, AdamW, metrics and checkpoints with exact resume.

use crate::checkpoint;
use crate::objective::{Objective, TrainBatch};
use crate::optim::{
    clip_group_norms_on, global_norm_on, named_grads, AdamW, AdamWConfig, NamedGrads, ParamGroup,
    UpdatePath,
};
use crate::schedule::WarmupCosine;
use crate::{Error, Result};
use m3ae_model::{Precision, Stochastic};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Where batches come from. The position must restore the exact stream (epoch, offset, RNG).
pub trait BatchSource {
    /// The next batch.
    fn next_batch(&mut self) -> Result<TrainBatch>;
    /// The position after the last batch returned (saved in checkpoints).
    fn position(&self) -> serde_json::Value;
    /// Moves to a position written by [`BatchSource::position`].
    fn restore(&mut self, position: &serde_json::Value) -> Result<()>;
    /// The position of the whole job from every rank's [`BatchSource::position`] (in rank
    /// order), for the checkpoint rank 0 writes. The default accepts one process only.
    fn merge_positions(&self, positions: &[serde_json::Value]) -> Result<serde_json::Value> {
        match positions {
            [one] => Ok(one.clone()),
            _ => Err(Error::State(format!(
                "this batch source cannot merge the data positions of {} ranks",
                positions.len()
            ))),
        }
    }
    /// Counts of bad samples met so far, logged with the metrics (`None`: not tracked).
    fn stats(&self) -> Option<serde_json::Value> {
        None
    }
}

/// Optimisation settings (official pre-training defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimiser steps to run.
    pub steps: u64,
    /// Global batch size (scales the learning rates by `batch_size / 256`).
    pub batch_size: usize,
    /// Peak learning rate before scaling.
    pub lr_peak: f64,
    /// Learning rate at step 0 before scaling.
    pub lr_init: f64,
    /// Final learning rate before scaling.
    pub lr_end: f64,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// Multiply the learning rates by `batch_size / 256` (official behaviour).
    pub scale_lr_by_batch: bool,
    /// AdamW settings.
    pub adamw: AdamWConfig,
    /// Global-norm clipping threshold (official default 1e9: effectively off).
    pub clip_gradient: f64,
    /// Micro-batches whose (averaged) gradients make one optimiser step.
    pub accumulate_grad_steps: u64,
    /// Consecutive non-finite steps that stop the run.
    pub max_bad_steps: u32,
    /// Compute precision: `f32`, or `bf16` matmuls with f32 master weights, optimiser state,
    /// normalisation statistics and losses (on the CPU: AMX or AVX512-BF16 where the CPU has them,
    /// else emulated at about f32 speed; see [`Precision::notice`]).
    pub precision: Precision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 256,
            lr_peak: 1.5e-4,
            lr_init: 0.0,
            lr_end: 0.0,
            warmup_steps: 0,
            scale_lr_by_batch: true,
            adamw: AdamWConfig::default(),
            clip_gradient: 1e9,
            accumulate_grad_steps: 1,
            max_bad_steps: 5,
            precision: Precision::F32,
        }
    }
}

impl TrainConfig {
    /// The schedule these settings describe.
    pub fn schedule(&self) -> WarmupCosine {
        WarmupCosine {
            init: self.lr_init,
            peak: self.lr_peak,
            end: self.lr_end,
            warmup_steps: self.warmup_steps,
            decay_steps: self.steps,
        }
    }

    /// The learning-rate multiplier.
    pub fn lr_scale(&self) -> f64 {
        if self.scale_lr_by_batch {
            self.batch_size as f64 / 256.0
        } else {
            1.0
        }
    }

    /// Settings that are valid but most likely not what was meant, one line each (callers
    /// print them before training): a warmup as long as the run, whose learning rate never
    /// reaches `lr_peak`, and a zero peak learning rate, which never changes the weights.
    ///
    /// ```
    /// let mut t = m3ae_train::TrainConfig { steps: 50, warmup_steps: 100, ..Default::default() };
    /// assert_eq!(t.warnings().len(), 1);
    /// assert!(t.warnings()[0].contains("train.warmup_steps = 100"));
    /// t.warmup_steps = 10;
    /// assert!(t.warnings().is_empty());
    /// ```
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.warmup_steps > 0 && self.warmup_steps >= self.steps {
            out.push(format!(
                "train.warmup_steps = {} is not below train.steps = {}: the learning rate rises \
                 for the whole run and never reaches train.lr_peak",
                self.warmup_steps, self.steps
            ));
        }
        if self.lr_peak == 0.0 && self.lr_init == 0.0 && self.lr_end == 0.0 {
            out.push("train.lr_peak, lr_init and lr_end are 0: the weights never change".into());
        }
        out
    }

    /// Checks every value; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| Err(Error::Config(format!("train.{field}: {msg}")));
        if self.steps == 0 {
            return bad("steps", "must be > 0".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be > 0".into());
        }
        if self.accumulate_grad_steps == 0 {
            return bad("accumulate_grad_steps", "must be > 0".into());
        }
        for (f, v) in [
            ("lr_peak", self.lr_peak),
            ("lr_init", self.lr_init),
            ("lr_end", self.lr_end),
            ("adamw.weight_decay", self.adamw.weight_decay),
            ("adamw.eps", self.adamw.eps),
        ] {
            if !v.is_finite() || v < 0.0 {
                return bad(f, format!("{v} must be finite and >= 0"));
            }
        }
        for (f, v) in [("adamw.b1", self.adamw.b1), ("adamw.b2", self.adamw.b2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(f, format!("{v} is outside [0, 1)"));
            }
        }
        if self.clip_gradient.is_nan() || self.clip_gradient <= 0.0 {
            return bad(
                "clip_gradient",
                format!("{} must be > 0", self.clip_gradient),
            );
        }
        Ok(())
    }
}

/// What one call of [`Trainer::train_step`] did.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// Optimiser steps completed after this call.
    pub step: u64,
    /// Learning rate used (when an update was applied).
    pub lr: f64,
    /// Loss scalars of the micro-batch.
    pub scalars: BTreeMap<String, f64>,
    /// Global gradient norm before clipping (when an update was applied).
    pub grad_norm: Option<f64>,
    /// Whether the optimiser updated the weights.
    pub updated: bool,
    /// Whether the micro-batch was skipped for a non-finite loss or gradient.
    pub skipped: bool,
}

/// The content of a checkpoint's `trainer.json`: counters, the training and model
/// configurations, the data position and any extra state of the caller. [`Trainer`] writes and
/// reads it; other writers of resumable checkpoints (the official-checkpoint converter) build it
/// directly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps done (equal to the AdamW step of `optimizer.safetensors`).
    pub step: u64,
    /// Micro-batches done (`step * accumulate_grad_steps` at a checkpoint).
    pub micro_step: u64,
    /// Micro-batches skipped for non-finite values.
    pub skipped_steps: u64,
    /// The training configuration.
    pub train: TrainConfig,
    /// The model configuration.
    pub model: m3ae_model::M3aeConfig,
    /// Where the data stream stands (the [`BatchSource`]'s position).
    pub data_position: serde_json::Value,
    /// Caller state (loss history, provenance, ...).
    pub extra: serde_json::Value,
}

impl TrainerState {
    /// Reads `trainer.json` of the checkpoint folder `dir`; errors name the file.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("trainer.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Io {
            path: path.clone(),
            error: e,
        })?;
        serde_json::from_str(&text).map_err(|e| Error::Parse {
            path,
            msg: e.to_string(),
        })
    }
}

/// Drives an [`Objective`].
pub struct Trainer<O: Objective> {
    objective: O,
    sync: Box<dyn crate::sync::GradSync + Send>,
    opt: AdamW,
    groups: BTreeMap<String, ParamGroup>,
    cfg: TrainConfig,
    micro_step: u64,
    accum: Option<NamedGrads>,
    bad_in_row: u32,
    skipped_steps: u64,
    seed: u64,
    path: Option<UpdatePath>,
}

impl<O: Objective> Trainer<O> {
    /// A trainer with fresh optimiser state, on the device of the objective's weights: the
    /// update runs on host slices when they are on the CPU and with tensor ops on their device
    /// otherwise ([`UpdatePath`]). `train.precision` is checked against that device
    /// ([`Precision::check`]) and handed to the objective ([`Objective::set_precision`]).
    pub fn new(mut objective: O, cfg: TrainConfig) -> Result<Self> {
        cfg.validate()?;
        cfg.precision
            .check(objective.params().device(), "train.precision")?;
        objective.set_precision(cfg.precision)?;
        let groups = objective.param_groups();
        let opt = AdamW::with_groups(cfg.adamw, &objective.specs(), &groups);
        Ok(Self {
            objective,
            sync: Box::new(crate::sync::SingleProcess),
            opt,
            groups,
            cfg,
            micro_step: 0,
            accum: None,
            bad_in_row: 0,
            skipped_steps: 0,
            seed: 0,
            path: None,
        })
    }

    /// Forces the update path of the optimiser and the gradient norms (`None`: by the weights'
    /// device). The tensor path on the CPU runs the code of a GPU run without a GPU (tests).
    pub fn with_update_path(mut self, path: Option<UpdatePath>) -> Self {
        self.path = path;
        self.opt.set_path(path);
        self
    }

    /// The path the optimiser step and the gradient norms take.
    pub fn update_path(&self) -> UpdatePath {
        self.opt.path_for(self.objective.params().device())
    }

    /// Sets the run seed the micro-batches' dropout keys derive from (default 0; see
    /// [`Trainer::micro_batch_key`]). The pre-training recipe passes its `seed`.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The run seed of the dropout keys.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The key of the random choices (dropout, attention dropout, drop path) of the next
    /// micro-batch: derived from the run seed ([`Trainer::with_seed`]), the number of
    /// micro-batches run so far (applied or skipped: `micro_step + skipped_steps`, so with
    /// gradient accumulation each micro-batch of a step gets its own, and a skipped one is
    /// never reused) and this process's rank. The counters are saved in checkpoints, so a
    /// resumed run draws the same masks as an uninterrupted one. (A data-parallel run with
    /// dropout is reproducible for its number of processes; unlike the data and the masking
    /// noise, the dropout masks of a sample depend on the rank that holds it.)
    pub fn micro_batch_key(&self) -> Stochastic {
        let counter = self.micro_step + self.skipped_steps;
        Stochastic::derive(self.seed, &[counter, self.sync.rank() as u64])
    }

    /// Replaces the gradient synchronisation (default: [`crate::SingleProcess`]).
    pub fn with_sync(mut self, sync: Box<dyn crate::sync::GradSync + Send>) -> Self {
        self.sync = sync;
        self
    }

    /// The model being trained.
    pub fn objective(&self) -> &O {
        &self.objective
    }

    /// Optimiser steps done.
    pub fn step(&self) -> u64 {
        self.opt.step_count()
    }

    /// The optimiser (its step and moments: [`AdamW::state`]).
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// Micro-batches skipped for non-finite values.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped_steps
    }

    /// The gradient synchronisation (rank, world size, collectives).
    pub fn sync_mut(&mut self) -> &mut (dyn crate::sync::GradSync + Send) {
        self.sync.as_mut()
    }

    /// This process's rank and the number of processes.
    pub fn rank_and_world(&self) -> (usize, usize) {
        (self.sync.rank(), self.sync.world_size())
    }

    /// The training configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// One micro-batch: forward (in training mode, with [`Trainer::micro_batch_key`]), backward,
    /// accumulate; every `accumulate_grad_steps` micro-batches
    /// the averaged gradients are clipped and applied. A non-finite loss or gradient skips the
    /// micro-batch; `max_bad_steps` in a row is an error.
    pub fn train_step(&mut self, batch: &TrainBatch) -> Result<StepReport> {
        let key = self.micro_batch_key();
        // a batch still on the host is copied here (a clone when it is on the device already,
        // e.g. from a `DeviceFeed`)
        let batch = &batch.to_device(self.objective.params().device())?;
        let path = self.update_path();
        let report = self.objective.loss_with(batch, Some(&key))?;
        let loss = report.scalars.get("loss").copied().unwrap_or(f64::NAN);
        let mut out = StepReport {
            step: self.step(),
            lr: 0.0,
            scalars: report.scalars.clone(),
            grad_norm: None,
            updated: false,
            skipped: false,
        };
        let grads = if loss.is_finite() {
            Some(named_grads(
                self.objective.params(),
                &report.total.backward()?,
            ))
        } else {
            None
        };
        let grads = match grads {
            // one device reduction and one scalar read on the tensor path
            Some(g) if global_norm_on(&g, path)?.is_finite() => Some(g),
            _ => None,
        };
        // with several ranks, skipping is decided together (a rank that skipped alone would
        // desynchronise the collectives), and the logged scalars become means over the ranks
        let world = self.sync.world_size();
        let mut any_bad = grads.is_none();
        if world > 1 {
            let mut v: Vec<f64> = std::iter::once(f64::from(u8::from(any_bad)))
                .chain(out.scalars.values().copied())
                .collect();
            self.sync.all_reduce_sum(&mut v)?;
            any_bad = v[0] > 0.0;
            for (x, s) in out.scalars.values_mut().zip(&v[1..]) {
                *x = s / world as f64;
            }
        }
        let grads = match grads {
            Some(g) if !any_bad => g,
            _ => {
                self.bad_in_row += 1;
                self.skipped_steps += 1;
                out.skipped = true;
                if self.bad_in_row >= self.cfg.max_bad_steps {
                    return Err(Error::NonFinite {
                        count: self.bad_in_row,
                        step: self.step(),
                    });
                }
                return Ok(out);
            }
        };
        self.bad_in_row = 0;
        self.micro_step += 1;
        self.accum = Some(match self.accum.take() {
            None => grads,
            Some(mut acc) => {
                for (k, g) in grads {
                    let sum = match acc.remove(&k) {
                        Some(a) => (a + g)?,
                        None => g,
                    };
                    acc.insert(k, sum);
                }
                acc
            }
        });
        if self
            .micro_step
            .is_multiple_of(self.cfg.accumulate_grad_steps)
        {
            let mut grads = self.accum.take().unwrap_or_default();
            let k = self.cfg.accumulate_grad_steps as f64;
            if k > 1.0 {
                for g in grads.values_mut() {
                    *g = (&*g / k)?;
                }
            }
            // pmean across processes, then clipping on the global gradient of each clipping
            // group (official order)
            self.sync.all_reduce_mean(&mut grads)?;
            let norm = clip_group_norms_on(&mut grads, &self.groups, self.cfg.clip_gradient, path)?;
            let lr = self.cfg.schedule().at(self.step(), self.cfg.lr_scale());
            self.opt.step(self.objective.params(), &grads, lr)?;
            out.lr = lr;
            out.grad_norm = Some(norm);
            out.updated = true;
            out.step = self.step();
        }
        Ok(out)
    }

    /// Writes a checkpoint under `root` (see [`checkpoint`]) with the data position and any
    /// `extra` state, keeping the newest `keep` checkpoints.
    pub fn save_checkpoint(
        &self,
        root: &Path,
        data_position: serde_json::Value,
        extra: serde_json::Value,
        keep: usize,
    ) -> Result<std::path::PathBuf> {
        let params = self.objective.params();
        let model_cfg = self.objective.model_config();
        let model_meta = self.objective.checkpoint_metadata()?;
        // written from host copies, whatever the device
        let host = candle_core::Device::Cpu;
        let (opt_t, opt_meta) = self.opt.state(&host)?;
        let weights = params
            .tensors()
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(&host)?)))
            .collect::<Result<std::collections::HashMap<_, _>>>()?;
        let saved = TrainerState {
            step: self.step(),
            micro_step: self.micro_step,
            skipped_steps: self.skipped_steps,
            train: self.cfg.clone(),
            model: model_cfg.clone(),
            data_position,
            extra,
        };
        let dir = checkpoint::save(
            root,
            self.step(),
            (&weights, model_meta),
            (&opt_t, opt_meta),
            &serde_json::to_value(&saved)?,
        )?;
        checkpoint::prune(root, keep)?;
        Ok(dir)
    }

    /// Restores weights, optimiser state and counters from a checkpoint directory; returns the
    /// data position and the extra state saved with it. Gradient accumulation must be at a step
    /// boundary (checkpoints are only written there). The files are read to the host and the
    /// weights copied onto the weights' device, so a checkpoint written on one device resumes
    /// on any other with the same values.
    pub fn restore(&mut self, dir: &Path) -> Result<(serde_json::Value, serde_json::Value)> {
        let params = self.objective.params();
        let ck = checkpoint::load(dir, &candle_core::Device::Cpu)?;
        let source = dir.join("model.safetensors").display().to_string();
        for (name, var) in params.vars() {
            let t = ck
                .model
                .get(name)
                .ok_or_else(|| Error::State(format!("{source}: missing weight `{name}`")))?;
            if t.dims() != var.dims() {
                return Err(Error::State(format!(
                    "{source}: weight `{name}` has shape {:?}, expected {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_device(var.device())?)?;
        }
        let opt_source = dir.join("optimizer.safetensors").display().to_string();
        self.opt
            .load_state(&ck.optimizer, &ck.optimizer_meta, &opt_source)?;
        let saved: TrainerState = serde_json::from_value(ck.trainer).map_err(|e| Error::Parse {
            path: dir.join("trainer.json"),
            msg: e.to_string(),
        })?;
        if saved.step != self.opt.step_count() {
            return Err(Error::State(format!(
                "{}: step {} but {opt_source} holds AdamW step {}",
                dir.join("trainer.json").display(),
                saved.step,
                self.opt.step_count()
            )));
        }
        self.micro_step = saved.micro_step;
        self.skipped_steps = saved.skipped_steps;
        self.accum = None;
        self.bad_in_row = 0;
        Ok((saved.data_position, saved.extra))
    }
}
