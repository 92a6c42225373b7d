//! Running a fine-tuned classifier over a data set: its logits ([`predict`], behind
//! `m3ae predict`) and the accuracy report of labelled data ([`ClassReport`]: top-1, top-5,
//! per-class accuracy, cross-entropy).

use crate::features::eval_image_config;
use crate::metrics::top_k_accuracy;
use crate::{escape_control, Error, Result};
use m3ae_data::{BadStats, DataOptions, DataSpec, Loader, LoaderConfig, Source};
use m3ae_model::Classifier;
use serde::Serialize;
use std::sync::Arc;

/// Logits of every image of a data set.
#[derive(Debug, Clone)]
pub struct Predictions {
    /// Sample keys, in data order.
    pub keys: Vec<String>,
    /// Row-major `[N, classes]` logits.
    pub logits: Vec<f32>,
    /// Labels (`None`: unlabelled sample).
    pub labels: Vec<Option<i64>>,
    /// Classes of the classifier.
    pub classes: usize,
    /// Bad samples met (skipped).
    pub stats: BadStats,
}

/// Accuracy of a classifier on labelled data.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassReport {
    /// Labelled samples scored.
    pub samples: usize,
    /// Top-1 accuracy.
    pub top1: f64,
    /// Top-`top5_k` accuracy (`k` = min(5, classes)).
    pub top5: f64,
    /// The `k` of [`ClassReport::top5`].
    pub top5_k: usize,
    /// Mean cross-entropy of the true class.
    pub loss: f64,
    /// Per class: (correct top-1, samples).
    pub per_class: Vec<(usize, usize)>,
}

impl Predictions {
    /// The predicted class of each image: the arg-max of its logits (ties to the lower index;
    /// NaN never wins; `None` when no logit is finite).
    pub fn argmax(&self) -> Result<Vec<Option<u32>>> {
        Ok(m3ae_model::ranking::argmax_rows(
            &self.logits,
            self.classes,
        )?)
    }

    /// The report over the labelled samples; an error when none is labelled or a label is
    /// outside the classifier's classes.
    pub fn report(&self) -> Result<ClassReport> {
        let c = self.classes;
        let mut rows = Vec::new();
        let mut labels = Vec::new();
        for (i, l) in self.labels.iter().enumerate() {
            let Some(l) = *l else { continue };
            if l < 0 || l as usize >= c {
                return Err(Error::Shape(format!(
                    "sample `{}` has label {l}, outside the classifier's {c} classes",
                    escape_control(&self.keys[i])
                )));
            }
            rows.extend_from_slice(&self.logits[i * c..(i + 1) * c]);
            labels.push(l as u32);
        }
        if labels.is_empty() {
            return Err(Error::Shape("no labelled sample to score".into()));
        }
        let k = c.min(5);
        let top1 = top_k_accuracy(&rows, c, &labels, 1)?;
        let top5 = top_k_accuracy(&rows, c, &labels, k)?;
        let best = m3ae_model::ranking::argmax_rows(&rows, c)?;
        let mut per_class = vec![(0usize, 0usize); c];
        let mut loss = 0f64;
        for ((row, &y), &p) in rows.chunks_exact(c).zip(&labels).zip(&best) {
            let y = y as usize;
            per_class[y].1 += 1;
            if p == Some(y as u32) {
                per_class[y].0 += 1;
            }
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            loss += lse - row[y] as f64;
        }
        Ok(ClassReport {
            samples: labels.len(),
            top1,
            top5,
            top5_k: k,
            loss: loss / labels.len() as f64,
            per_class,
        })
    }
}

/// Logits of every image of `source` (evaluation transform: resize + centre crop, `opts`'
/// normalisation and batch size; bad samples skipped and counted up to
/// `opts.max_bad_fraction`).
pub fn predict_source(
    classifier: &Classifier,
    source: Arc<dyn Source>,
    opts: &DataOptions,
) -> Result<Predictions> {
    let cfg = classifier.model_config();
    let mut lc = LoaderConfig::eval(opts.batch_size.max(1), cfg.image_size, cfg.patch_size);
    lc.image = Some(eval_image_config(cfg, opts.normalization));
    lc.max_bad_fraction = opts.max_bad_fraction;
    let loader = Loader::new(source, None, lc)?;
    let classes = classifier.config().num_classes;
    let mut out = Predictions {
        keys: Vec::new(),
        logits: Vec::new(),
        labels: Vec::new(),
        classes,
        stats: BadStats::default(),
    };
    let mut it = loader.iter(Default::default());
    for b in it.by_ref() {
        let b = b?;
        let patches = b
            .input
            .image_patches
            .ok_or_else(|| Error::Shape("an evaluation batch without images".into()))?;
        let logits = classifier.forward(&patches)?;
        out.logits.extend(logits.flatten_all()?.to_vec1::<f32>()?);
        out.keys.extend(b.keys);
        out.labels.extend(b.labels);
    }
    out.stats = it.stats();
    Ok(out)
}

/// [`predict_source`] on the data set `spec` names.
pub fn predict(
    classifier: &Classifier,
    spec: &DataSpec,
    opts: &DataOptions,
) -> Result<Predictions> {
    let data = spec.open(opts)?;
    let p = predict_source(classifier, data.source, opts)?;
    if p.keys.is_empty() {
        return Err(Error::arg(
            "--data",
            spec,
            format!("no usable sample: {}", escape_control(&p.stats.to_string())),
        ));
    }
    Ok(p)
}

impl ClassReport {
    /// The report as lines: top-1, top-k, and one line per class (`names`: class names when
    /// known).
    ///
    /// ```
    /// use m3ae_eval::finetune::ClassReport;
    /// let r = ClassReport { samples: 4, top1: 0.75, top5: 1.0, top5_k: 2, loss: 0.5,
    ///     per_class: vec![(2, 2), (1, 2)] };
    /// let text = r.format(None);
    /// assert!(text.contains("top-1 75.00%") && text.contains("class 1: 50.00% (1/2)"));
    /// ```
    pub fn format(&self, names: Option<&[String]>) -> String {
        let mut s = format!(
            "top-1 {:.2}% top-{} {:.2}% loss {:.4} ({} samples)\n",
            100.0 * self.top1,
            self.top5_k,
            100.0 * self.top5,
            self.loss,
            self.samples
        );
        for (c, &(hit, n)) in self.per_class.iter().enumerate() {
            let name = names
                .and_then(|n| n.get(c))
                .map(|n| format!(" ({n})"))
                .unwrap_or_default();
            let acc = if n > 0 {
                format!("{:.2}%", 100.0 * hit as f64 / n as f64)
            } else {
                "-".into()
            };
            s.push_str(&format!("  class {c}{name}: {acc} ({hit}/{n})\n"));
        }
        s
    }
}

/// A saved classifier: the model, the file it came from and the fine-tuning settings saved
/// with it (absent from classifiers saved by other means).
#[derive(Debug, Clone)]
pub struct SavedClassifier {
    /// The classifier.
    pub classifier: Classifier,
    /// The file it was read from.
    pub file: std::path::PathBuf,
    /// The settings it was fine-tuned with (the pixel normalisation to evaluate it with).
    pub settings: Option<crate::finetune::FinetuneConfig>,
}

/// The classifier a path names: a fine-tuning run folder (its `best/classifier.safetensors`,
/// else its `classifier.safetensors`), a checkpoint folder `step-*` of one, or a classifier
/// `.safetensors` file. The classifier is loaded onto `device`.
pub fn load_classifier(
    path: &std::path::Path,
    device: &candle_core::Device,
) -> Result<SavedClassifier> {
    let candidates = [
        path.join("best").join("classifier.safetensors"),
        path.join("classifier.safetensors"),
        path.join("model.safetensors"),
    ];
    let file = if path.is_file() {
        path.to_path_buf()
    } else if let Some(f) = candidates.iter().find(|f| f.is_file()) {
        f.clone()
    } else if path.is_dir() {
        return Err(Error::Path {
            path: path.to_path_buf(),
            msg: "holds no classifier (best/classifier.safetensors, classifier.safetensors or \
                  model.safetensors of a fine-tuning checkpoint)"
                .into(),
        });
    } else {
        return Err(Error::Path {
            path: path.to_path_buf(),
            msg: "does not exist".into(),
        });
    };
    let meta = m3ae_model::params::read_safetensors_metadata(&file)?;
    let settings = match meta.get(crate::finetune::FINETUNE_METADATA_KEY) {
        Some(json) => Some(serde_json::from_str(json).map_err(|e| Error::Path {
            path: file.clone(),
            msg: format!("{}: {e}", crate::finetune::FINETUNE_METADATA_KEY),
        })?),
        None => None,
    };
    let classifier = Classifier::load(&file, device)?;
    Ok(SavedClassifier {
        classifier,
        file,
        settings,
    })
}
