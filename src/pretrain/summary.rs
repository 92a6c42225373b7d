//! What a finished (or interrupted) pre-training run reports: `summary.json` and the lines
//! `m3ae pretrain` prints.

use serde::Serialize;
use std::path::PathBuf;

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
    /// Text loss of the first logged window and of the last one (none for MAE, which has no
    /// text head).
    pub text_loss: Option<(f64, f64)>,
    /// Masked-word accuracy on held-out scenes.
    pub masked_word_accuracy: Option<f64>,
    /// Accuracy of always predicting the most frequent training word at the same positions.
    pub frequency_baseline: Option<f64>,
    /// Training samples per second (whole loop, data included).
    pub samples_per_s: f64,
    /// Wall time of the training loop in seconds.
    pub train_seconds: f64,
    /// Probe top-1 of the trained model and of a random-init model (scene labels), cls token.
    pub probe: Option<(f64, f64)>,
    /// The same with the mean of the patch tokens (the official `global_pool`).
    pub probe_mean: Option<(f64, f64)>,
    /// Micro-batches skipped for non-finite values.
    pub skipped_steps: u64,
    /// The newest checkpoint.
    pub checkpoint: Option<PathBuf>,
    /// What the held-out figures were measured on (`held-out scenes`, `held-out data`).
    pub held_out: String,
    /// Why the final held-out evaluation could not be made, if it failed (training and its
    /// checkpoint are unaffected).
    pub held_out_error: Option<String>,
    /// Bad samples met in the training data (all ranks' streams of this process).
    pub bad_samples: m3ae_data::BadStats,
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
                "masked-word accuracy ({}): {:.1}% (most-frequent-word baseline {:.1}%)",
                self.held_out,
                100.0 * a,
                100.0 * b
            )?;
        }
        if let Some(e) = &self.held_out_error {
            writeln!(f, "held-out evaluation failed ({}): {e}", self.held_out)?;
        }
        if self.bad_samples.total_bad() > 0 {
            writeln!(f, "training data: {}", self.bad_samples)?;
        } else {
            writeln!(
                f,
                "training data: {} samples read, none bad",
                self.bad_samples.good
            )?;
        }
        writeln!(
            f,
            "throughput: {:.1} samples/s over {:.0} s of training",
            self.samples_per_s, self.train_seconds
        )?;
        for (probe, pooling) in [
            (self.probe, "cls token"),
            (self.probe_mean, "mean of patches"),
        ] {
            if let Some((t, r)) = probe {
                writeln!(
                    f,
                    "linear probe on scene shapes, {pooling}: {:.1}% (random-init model: {:.1}%)",
                    100.0 * t,
                    100.0 * r
                )?;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_prints_the_probe_of_each_pooling_against_random_init() {
        let summary = RunSummary {
            run_dir: "runs/x".into(),
            steps: 10,
            interrupted: false,
            image_loss: None,
            text_loss: None,
            masked_word_accuracy: None,
            frequency_baseline: None,
            samples_per_s: 1.0,
            train_seconds: 1.0,
            probe: Some((0.4, 0.3)),
            probe_mean: Some((0.53, 0.395)),
            skipped_steps: 0,
            checkpoint: None,
            held_out: "held-out scenes".into(),
            held_out_error: None,
            bad_samples: Default::default(),
        };
        let text = summary.to_string();
        assert!(text
            .contains("linear probe on scene shapes, cls token: 40.0% (random-init model: 30.0%)"));
        assert!(text.contains(
            "linear probe on scene shapes, mean of patches: 53.0% (random-init model: 39.5%)"
        ));
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(json["probe_mean"][0], 0.53);
    }
}
