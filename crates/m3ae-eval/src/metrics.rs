//! Evaluation metrics with their standard definitions: top-k accuracy, and for OOD detection
//! (in-distribution = positive class, higher score = more in-distribution) AUROC, AUPR with either
//! class as positive, and FPR at 95% TPR. Ties are grouped: all samples with one score value
//! enter the curves together.

use crate::{Error, Result};

pub use m3ae_model::ranking::{argmax_rows, rank_order};

/// Fraction of rows whose label is among the `k` highest logits (`logits` row-major `[n, c]`).
/// A tie at the k-th place counts in favour of the lower class index (stable order). A
/// non-finite score of the true class (NaN or infinite) is never a hit, and a NaN score of
/// another class ranks below every number.
///
/// ```
/// let logits = [0.1, 0.7, 0.2,   0.5, 0.2, 0.3];
/// assert_eq!(m3ae_eval::metrics::top_k_accuracy(&logits, 3, &[1, 2], 1).unwrap(), 0.5);
/// assert_eq!(m3ae_eval::metrics::top_k_accuracy(&logits, 3, &[1, 2], 2).unwrap(), 1.0);
/// let nan = [f32::NAN; 6];
/// assert_eq!(m3ae_eval::metrics::top_k_accuracy(&nan, 3, &[0, 1], 3).unwrap(), 0.0);
/// ```
pub fn top_k_accuracy(logits: &[f32], classes: usize, labels: &[u32], k: usize) -> Result<f64> {
    if classes == 0 || logits.len() != labels.len() * classes {
        return Err(Error::Shape(format!(
            "top-k: {} logits for {} labels and {classes} classes",
            logits.len(),
            labels.len()
        )));
    }
    if labels.is_empty() {
        return Err(Error::Shape("top-k of no samples".into()));
    }
    let mut hits = 0usize;
    for (row, &y) in logits.chunks_exact(classes).zip(labels) {
        let y = y as usize;
        if y >= classes {
            return Err(Error::Shape(format!("label {y} outside {classes} classes")));
        }
        let truth = row[y];
        if !truth.is_finite() {
            continue;
        }
        // rank of the true class: how many classes beat it (ties: lower index wins; NaN loses)
        let better = row
            .iter()
            .enumerate()
            .filter(|&(j, &v)| v > truth || (v == truth && j < y))
            .count();
        if better < k {
            hits += 1;
        }
    }
    Ok(hits as f64 / labels.len() as f64)
}

/// Points of the ROC / precision-recall sweep: thresholds from high to low, one point per distinct
/// score, as cumulative (true positives, false positives).
fn sweep(pos: &[f64], neg: &[f64]) -> Result<Vec<(usize, usize)>> {
    if pos.is_empty() || neg.is_empty() {
        return Err(Error::Shape(
            "OOD metrics need in- and out-of-distribution scores".into(),
        ));
    }
    if pos.iter().chain(neg).any(|x| x.is_nan()) {
        return Err(Error::Shape("OOD scores contain NaN".into()));
    }
    let mut all: Vec<(f64, bool)> = pos
        .iter()
        .map(|&s| (s, true))
        .chain(neg.iter().map(|&s| (s, false)))
        .collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut pts = Vec::new();
    let (mut tp, mut fp) = (0, 0);
    let mut i = 0;
    while i < all.len() {
        let s = all[i].0;
        while i < all.len() && all[i].0 == s {
            if all[i].1 {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        pts.push((tp, fp));
    }
    Ok(pts)
}

/// Area under the ROC curve (trapezoids; equals the probability that a random in-distribution
/// score exceeds a random OOD score, ties counting one half).
///
/// ```
/// use m3ae_eval::metrics::auroc;
/// assert_eq!(auroc(&[3.0, 2.0], &[1.0, 0.0]).unwrap(), 1.0);
/// assert_eq!(auroc(&[1.0], &[1.0]).unwrap(), 0.5);
/// assert_eq!(auroc(&[2.0, 0.0], &[1.0]).unwrap(), 0.5);
/// ```
pub fn auroc(in_scores: &[f64], out_scores: &[f64]) -> Result<f64> {
    let pts = sweep(in_scores, out_scores)?;
    let (p, n) = (in_scores.len() as f64, out_scores.len() as f64);
    let (mut area, mut prev) = (0.0, (0usize, 0usize));
    for &(tp, fp) in &pts {
        area += (fp - prev.1) as f64 / n * (tp + prev.0) as f64 / 2.0 / p;
        prev = (tp, fp);
    }
    Ok(area)
}

/// Average precision with the in-distribution samples as positives:
/// `sum_n (R_n - R_{n-1}) P_n` over the distinct thresholds (the usual step-wise AP).
pub fn aupr_in(in_scores: &[f64], out_scores: &[f64]) -> Result<f64> {
    let pts = sweep(in_scores, out_scores)?;
    let p = in_scores.len() as f64;
    let (mut ap, mut prev_tp) = (0.0, 0usize);
    for &(tp, fp) in &pts {
        if tp > prev_tp {
            ap += (tp - prev_tp) as f64 / p * tp as f64 / (tp + fp) as f64;
        }
        prev_tp = tp;
    }
    Ok(ap)
}

/// Average precision with the OOD samples as positives (scores negated).
pub fn aupr_out(in_scores: &[f64], out_scores: &[f64]) -> Result<f64> {
    let neg = |v: &[f64]| v.iter().map(|x| -x).collect::<Vec<_>>();
    aupr_in(&neg(out_scores), &neg(in_scores))
}

/// False-positive rate (OOD accepted) at the first threshold, from high to low, where at least
/// 95% of in-distribution samples are accepted.
///
/// ```
/// use m3ae_eval::metrics::fpr_at_95_tpr;
/// let inn: Vec<f64> = (0..20).map(|i| i as f64).collect(); // 19 of 20 is exactly 95%
/// assert_eq!(fpr_at_95_tpr(&inn, &[0.5, 100.0]).unwrap(), 0.5);
/// ```
pub fn fpr_at_95_tpr(in_scores: &[f64], out_scores: &[f64]) -> Result<f64> {
    let pts = sweep(in_scores, out_scores)?;
    let (p, n) = (in_scores.len(), out_scores.len());
    for &(tp, fp) in &pts {
        // tp / p >= 0.95 without float rounding: 20 tp >= 19 p
        if 20 * tp >= 19 * p {
            return Ok(fp as f64 / n as f64);
        }
    }
    Ok(1.0)
}

/// All OOD metrics of one score.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct OodMetrics {
    /// Area under the ROC curve.
    pub auroc: f64,
    /// Average precision, in-distribution positive.
    pub aupr_in: f64,
    /// Average precision, OOD positive.
    pub aupr_out: f64,
    /// FPR at 95% TPR.
    pub fpr95: f64,
}

/// Computes [`OodMetrics`].
pub fn ood_metrics(in_scores: &[f64], out_scores: &[f64]) -> Result<OodMetrics> {
    Ok(OodMetrics {
        auroc: auroc(in_scores, out_scores)?,
        aupr_in: aupr_in(in_scores, out_scores)?,
        aupr_out: aupr_out(in_scores, out_scores)?,
        fpr95: fpr_at_95_tpr(in_scores, out_scores)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_cases() {
        // in: 0.9 0.8 0.4, out: 0.7 0.4 0.1
        let (i, o) = ([0.9, 0.8, 0.4], [0.7, 0.4, 0.1]);
        // pairs: 0.9 beats 3, 0.8 beats 3, 0.4 beats 0.1 and ties 0.4 -> (3 + 3 + 1.5) / 9
        assert!((auroc(&i, &o).unwrap() - 7.5 / 9.0).abs() < 1e-12);
        // AP_in: thresholds 0.9 (tp1 fp0 P=1), 0.8 (tp2 fp0 P=1), 0.7 (tp2 fp1), 0.4 (tp3 fp2 P=3/5)
        let ap = 1.0 / 3.0 + 1.0 / 3.0 + (1.0 / 3.0) * 0.6;
        assert!((aupr_in(&i, &o).unwrap() - ap).abs() < 1e-12);
        // AP_out (negated): out scores -0.1 (tp1 P=1), -0.4 tie with in -0.4 (tp2 fp1 P=2/3), -0.7 (tp3, fp1 P=3/4)
        let ap_out = 1.0 / 3.0 + (1.0 / 3.0) * (2.0 / 3.0) + (1.0 / 3.0) * 0.75;
        assert!((aupr_out(&i, &o).unwrap() - ap_out).abs() < 1e-12);
        // 95% of 3 in-samples needs all 3: threshold 0.4 accepts 0.7 and 0.4 of out -> 2/3
        assert!((fpr_at_95_tpr(&i, &o).unwrap() - 2.0 / 3.0).abs() < 1e-12);
        let m = ood_metrics(&[1.0, 2.0], &[-1.0, 0.0]).unwrap();
        assert_eq!(
            (m.auroc, m.aupr_in, m.aupr_out, m.fpr95),
            (1.0, 1.0, 1.0, 0.0)
        );
        assert!(auroc(&[], &[1.0]).is_err());
        assert!(auroc(&[f64::NAN], &[1.0]).is_err());
    }

    #[test]
    fn top_k_ties_and_errors() {
        let logits = [1.0, 1.0, 0.0];
        assert_eq!(top_k_accuracy(&logits, 3, &[0], 1).unwrap(), 1.0);
        assert_eq!(top_k_accuracy(&logits, 3, &[1], 1).unwrap(), 0.0);
        assert_eq!(top_k_accuracy(&logits, 3, &[1], 2).unwrap(), 1.0);
        assert!(top_k_accuracy(&logits, 3, &[5], 1).is_err());
        assert!(top_k_accuracy(&logits, 2, &[0], 1).is_err());
    }

    #[test]
    fn non_finite_scores_are_never_correct() {
        let nan = f32::NAN;
        // all NaN: no row is a hit, whatever k
        let all = [nan; 6];
        for k in 1..=3 {
            assert_eq!(top_k_accuracy(&all, 3, &[0, 2], k).unwrap(), 0.0, "k={k}");
        }
        // a NaN of another class does not push the true class down
        assert_eq!(top_k_accuracy(&[nan, 0.5, 0.1], 3, &[1], 1).unwrap(), 1.0);
        assert_eq!(top_k_accuracy(&[nan, nan, 0.1], 3, &[2], 1).unwrap(), 1.0);
        // an infinite true score is not a hit either; an infinite other score beats the truth
        let inf = f32::INFINITY;
        assert_eq!(top_k_accuracy(&[inf, 0.0], 2, &[0], 1).unwrap(), 0.0);
        assert_eq!(top_k_accuracy(&[0.0, inf], 2, &[0], 1).unwrap(), 0.0);
        assert_eq!(top_k_accuracy(&[0.0, inf], 2, &[0], 2).unwrap(), 1.0);
        // argmax: NaN never wins, ties go to the lower index, a non-finite best is no prediction
        let s = [nan, 0.2, 0.2, 1.0, nan, 3.0, nan, nan, nan, -inf, nan, nan];
        assert_eq!(
            argmax_rows(&s, 3).unwrap(),
            vec![Some(1), Some(2), None, None]
        );
        assert!(argmax_rows(&s, 5).is_err());
    }
}
