//! The reports of `m3ae probe` and `m3ae ood` on [`FeatureSet`]s: the official linear probe with
//! top-1 / top-k accuracy and the kNN classifier ([`probe_report`]), a saved probe head
//! evaluated ([`evaluate_head`]), and OOD detection with three scores ([`ood_report`]). Every
//! setting is checked first; an error names the flag that sets it.
//!
//! ```
//! use m3ae_eval::{extract, probe_report, DataOptions, KnnConfig, ProbeConfig};
//! use m3ae_model::{AnyModel, M3aeConfig, Variant};
//! let cfg = M3aeConfig::preset("tiny")?;
//! let model = AnyModel::init(Variant::Mae, &cfg, 0, &candle_core::Device::Cpu)?;
//! let opts = DataOptions::default();
//! let train = extract(&model, &"scenes:train:64".parse()?, &opts, None)?;
//! let test = extract(&model, &"scenes:test:32".parse()?, &opts, None)?;
//! let probe = ProbeConfig { epochs: 2, batch_size: 32, ..Default::default() };
//! let (report, head) = probe_report(&train, &test, &probe, KnnConfig::default())?;
//! assert!((0.0..=1.0).contains(&report.top1));
//! assert_eq!(head.weight.dims(), &[8, cfg.emb_dim]);
//! # Ok::<(), m3ae_eval::Error>(())
//! ```

use crate::error::{check_float, Error, Result, POSITIVE};
use crate::features::FeatureSet;
use crate::metrics::{ood_metrics, top_k_accuracy, OodMetrics};
use crate::probe::{probe_logits, train_probe, LinearProbeHead, ProbeConfig};
use candle_core::Device;
use std::path::Path;
use std::time::Instant;

/// Accuracies of a probe run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProbeReport {
    /// Top-1 accuracy of the linear probe on the test set.
    pub top1: f64,
    /// Top-k accuracy (k = min(5, classes)).
    pub top5: f64,
    /// k of `top5`.
    pub top5_k: usize,
    /// kNN top-1 accuracy (None when no training features).
    pub knn_top1: Option<f64>,
    /// Seconds spent training the probe.
    pub train_seconds: f64,
    /// Final mean training loss.
    pub final_loss: f64,
}

/// kNN settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnnConfig {
    /// Neighbours.
    pub k: usize,
    /// Vote temperature.
    pub temperature: f64,
}

impl KnnConfig {
    /// `Err` naming `--knn-k` or `--knn-t` unless `k >= 1` and the temperature is finite and
    /// positive.
    pub fn validate(&self) -> Result<()> {
        if self.k == 0 {
            return Err(Error::arg("--knn-k", 0, "must be at least 1"));
        }
        check_float("--knn-t", self.temperature, POSITIVE, "> 0").map(|_| ())
    }
}

impl Default for KnnConfig {
    fn default() -> Self {
        Self {
            k: 20,
            temperature: 0.07,
        }
    }
}

/// Top-1 and top-k accuracy of a probe head on labelled features: `(top-1, top-k, k)` with
/// k = min(5, classes).
pub fn evaluate_head(
    head: &LinearProbeHead,
    test: &FeatureSet,
    classes: usize,
) -> Result<(f64, f64, usize)> {
    let labels = test.labels_u32("--test-data")?;
    let logits = probe_logits(head, &test.features)?;
    let k5 = classes.min(5);
    Ok((
        top_k_accuracy(&logits, classes, &labels, 1)?,
        top_k_accuracy(&logits, classes, &labels, k5)?,
        k5,
    ))
}

/// Number of classes over a train and a test set (metadata and labels).
pub fn class_count(sets: &[&FeatureSet]) -> usize {
    sets.iter()
        .map(|s| {
            let from_labels = s.labels.iter().copied().max().unwrap_or(-1) + 1;
            s.classes.max(from_labels.max(0) as usize)
        })
        .max()
        .unwrap_or(0)
}

/// kNN top-1 accuracy of `test` against `train`.
pub fn knn_accuracy(
    train: &FeatureSet,
    test: &FeatureSet,
    classes: usize,
    knn: KnnConfig,
) -> Result<f64> {
    knn.validate()?;
    let tl = train.labels_u32("--train-data")?;
    let yl = test.labels_u32("--test-data")?;
    // at most every training sample
    let k = knn.k.min(tl.len());
    let scores = crate::knn::knn_classify(
        &train.features,
        &tl,
        &test.features,
        classes,
        k,
        knn.temperature,
    )?;
    top_k_accuracy(&scores, classes, &yl, 1)
}

/// `Err` naming the flag (`--lr`, `--weight-decay`, ...) of a probe setting that is not a
/// finite number in its range.
pub fn check_probe_config(cfg: &ProbeConfig) -> Result<()> {
    check_float("--lr", cfg.lr_peak, POSITIVE, "> 0")?;
    check_float("--weight-decay", cfg.weight_decay, 0.0.., ">= 0")?;
    check_float("momentum", cfg.momentum, 0.0..1.0, "in [0, 1)")?;
    check_float("trust_coefficient", cfg.trust_coefficient, 0.0.., ">= 0")?;
    if cfg.epochs == 0 {
        return Err(Error::arg("--epochs", 0, "must be at least 1"));
    }
    if cfg.batch_size < 2 {
        return Err(Error::arg(
            "--probe-batch",
            cfg.batch_size,
            "must be at least 2 (BatchNorm needs two samples)",
        ));
    }
    Ok(())
}

/// Trains the official probe on `train` and evaluates it (and kNN) on `test`.
pub fn probe_report(
    train: &FeatureSet,
    test: &FeatureSet,
    cfg: &ProbeConfig,
    knn: KnnConfig,
) -> Result<(ProbeReport, LinearProbeHead)> {
    let classes = class_count(&[train, test]);
    if classes < 2 {
        return Err(Error::arg(
            "--train-data",
            &train.data,
            format!(
                "has {classes} class(es); a probe needs at least two (label webdataset data \
                 with --label-field)"
            ),
        ));
    }
    check_probe_config(cfg)?;
    knn.validate()?;
    let labels = train.labels_u32("--train-data")?;
    let t0 = Instant::now();
    let (head, hist) = train_probe(&train.features, &labels, classes, cfg)?;
    let train_seconds = t0.elapsed().as_secs_f64();
    let final_loss = hist.last().map(|e| e.loss).unwrap_or(f64::NAN);
    if !final_loss.is_finite() {
        return Err(Error::arg(
            "--lr",
            cfg.lr_peak,
            format!("the probe diverged (final training loss {final_loss}): lower it"),
        ));
    }
    let (top1, top5, top5_k) = evaluate_head(&head, test, classes)?;
    let knn_top1 = Some(knn_accuracy(train, test, classes, knn)?);
    Ok((
        ProbeReport {
            top1,
            top5,
            top5_k,
            knn_top1,
            train_seconds,
            final_loss,
        },
        head,
    ))
}

/// Reads a probe head written by `m3ae convert official` (or `m3ae probe --save-probe`):
/// `weight` `[C, D]`, `bias`, `running_mean`, `running_var` (see [`LinearProbeHead::load`]).
pub fn load_probe_head(path: &Path) -> Result<LinearProbeHead> {
    if !path.is_file() {
        return Err(Error::path(path, "no such probe file"));
    }
    // on the host, with the feature sets it evaluates
    LinearProbeHead::load(path, &Device::Cpu).map_err(|e| match e {
        m3ae_model::Error::MissingWeight { name, .. } => {
            Error::path(path, format!("no tensor `{name}`"))
        }
        e => e.into(),
    })
}

/// Writes a probe head in the `probe.safetensors` layout (see [`LinearProbeHead::save`]).
pub fn save_probe_head(head: &LinearProbeHead, path: &Path) -> Result<()> {
    Ok(head.save(path)?)
}

/// One row of the OOD table.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OodRow {
    /// Score name.
    pub score: String,
    /// Its metrics (in-distribution = positive).
    pub metrics: OodMetrics,
}

/// OOD detection with three scores (higher = in-distribution): MSP of a probe trained on
/// `train`, Mahalanobis distance (class means, shared covariance) and kNN similarity to the
/// `k`-th neighbour. Returns the rows and the in-distribution probe accuracy on `inside` when
/// it is labelled.
pub fn ood_report(
    train: &FeatureSet,
    inside: &FeatureSet,
    outside: &FeatureSet,
    cfg: &ProbeConfig,
    knn_k: usize,
) -> Result<(Vec<OodRow>, Option<f64>)> {
    let classes = class_count(&[train]);
    if classes < 2 {
        return Err(Error::arg(
            "--train-data",
            &train.data,
            format!(
                "has {classes} class(es); OOD scores need at least two (label webdataset data \
                 with --label-field)"
            ),
        ));
    }
    if knn_k == 0 {
        return Err(Error::arg("--knn-k", 0, "must be at least 1"));
    }
    check_probe_config(cfg)?;
    let labels = train.labels_u32("--train-data")?;
    let (head, _) = train_probe(&train.features, &labels, classes, cfg)?;
    let msp = |f: &FeatureSet| -> Result<Vec<f64>> {
        crate::ood::max_softmax(&probe_logits(&head, &f.features)?, classes)
    };
    let maha = crate::ood::Mahalanobis::fit(&train.features, &labels, classes, 1e-4)?;
    // at most every training sample
    let k = knn_k.min(labels.len());
    let knn = |f: &FeatureSet| -> Result<Vec<f64>> {
        crate::knn::knn_score(&train.features, &f.features, k)
    };
    let rows = vec![
        OodRow {
            score: "msp".into(),
            metrics: ood_metrics(&msp(inside)?, &msp(outside)?)?,
        },
        OodRow {
            score: "mahalanobis".into(),
            metrics: ood_metrics(
                &maha.score(&inside.features)?,
                &maha.score(&outside.features)?,
            )?,
        },
        OodRow {
            score: format!("knn (k={k})"),
            metrics: ood_metrics(&knn(inside)?, &knn(outside)?)?,
        },
    ];
    let acc = if inside
        .labels
        .iter()
        .all(|&l| l >= 0 && (l as usize) < classes)
    {
        Some(evaluate_head(&head, inside, classes)?.0)
    } else {
        None
    };
    Ok((rows, acc))
}

/// The OOD rows as a plain-text table.
pub fn format_ood_table(rows: &[OodRow]) -> String {
    let mut s = format!(
        "{:<14} {:>7} {:>8} {:>9} {:>7}\n",
        "score", "AUROC", "AUPR-in", "AUPR-out", "FPR@95"
    );
    for r in rows {
        let m = r.metrics;
        s.push_str(&format!(
            "{:<14} {:>7.4} {:>8.4} {:>9.4} {:>7.4}\n",
            r.score, m.auroc, m.aupr_in, m.aupr_out, m.fpr95
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    #[test]
    fn settings_are_checked_by_flag_and_heads_round_trip() -> anyhow::Result<()> {
        let e = KnnConfig {
            k: 0,
            temperature: 1.0,
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.to_string(), "--knn-k \"0\": must be at least 1");
        let bad = ProbeConfig {
            batch_size: 1,
            ..Default::default()
        };
        let e = check_probe_config(&bad).unwrap_err().to_string();
        assert!(e.starts_with("--probe-batch \"1\""), "{e}");
        let dev = Device::Cpu;
        let head = LinearProbeHead::new(
            Tensor::ones((3, 2), candle_core::DType::F32, &dev)?,
            Tensor::zeros(3, candle_core::DType::F32, &dev)?,
            Tensor::zeros(2, candle_core::DType::F32, &dev)?,
            Tensor::ones(2, candle_core::DType::F32, &dev)?,
        )?;
        let dir = std::env::temp_dir().join(format!("m3ae-eval-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let p = dir.join("probe.safetensors");
        save_probe_head(&head, &p)?;
        assert_eq!(load_probe_head(&p)?.weight.dims(), &[3, 2]);
        let e = load_probe_head(&dir.join("none.safetensors")).unwrap_err();
        assert!(e
            .to_string()
            .ends_with("none.safetensors: no such probe file"));
        // a file without the head's tensors names the first missing one
        m3ae_model::params::write_safetensors(
            &p,
            &std::collections::HashMap::from([("weight".to_string(), head.weight.clone())]),
            Default::default(),
        )?;
        let e = load_probe_head(&p).unwrap_err().to_string();
        assert!(e.ends_with("probe.safetensors: no tensor `bias`"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
