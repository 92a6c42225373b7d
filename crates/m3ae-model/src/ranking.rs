//! Ranking of scores that may be NaN or infinite: the rule by which the linear probe head
//! ([`crate::LinearProbeHead::predict`]) picks a class, shared with the evaluation metrics of
//! `m3ae-eval` (which re-exports these functions from its `metrics` module).

use crate::{Error, Result};

/// Order of two scores for ranking, best first: larger finite or infinite values first, NaN
/// after everything (a NaN score never ranks above a number); equal scores compare equal.
///
/// ```
/// use m3ae_model::ranking::rank_order;
/// let mut v = [1.0f32, f32::NAN, 3.0, f32::NEG_INFINITY];
/// v.sort_by(|a, b| rank_order(*a, *b));
/// assert_eq!(&v[..3], &[3.0, 1.0, f32::NEG_INFINITY]);
/// assert!(v[3].is_nan());
/// ```
pub fn rank_order(a: f32, b: f32) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => b.partial_cmp(&a).unwrap_or(Ordering::Equal),
    }
}

/// Index of the largest score of each row of `scores` (row-major `[n, classes]`): ties go to
/// the lower index, NaN never wins, and a row whose best score is not finite (all NaN, or
/// infinite) has no prediction (`None`).
///
/// ```
/// use m3ae_model::ranking::argmax_rows;
/// let s = [0.1, f32::NAN, 0.1,   f32::NAN, f32::NAN, f32::NAN];
/// assert_eq!(argmax_rows(&s, 3).unwrap(), vec![Some(0), None]);
/// ```
pub fn argmax_rows(scores: &[f32], classes: usize) -> Result<Vec<Option<u32>>> {
    if classes == 0 || !scores.len().is_multiple_of(classes) {
        return Err(Error::Shape(format!(
            "argmax: {} scores for {classes} classes",
            scores.len()
        )));
    }
    Ok(scores
        .chunks_exact(classes)
        .map(|row| {
            let mut best = 0usize;
            for (j, &v) in row.iter().enumerate().skip(1) {
                if rank_order(v, row[best]) == std::cmp::Ordering::Less {
                    best = j;
                }
            }
            row[best].is_finite().then_some(best as u32)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_never_wins_ties_go_low_and_a_non_finite_best_is_no_prediction() {
        let (nan, inf) = (f32::NAN, f32::INFINITY);
        let s = [nan, 0.2, 0.2, 1.0, nan, 3.0, nan, nan, nan, -inf, nan, nan];
        assert_eq!(
            argmax_rows(&s, 3).unwrap(),
            vec![Some(1), Some(2), None, None]
        );
        assert_eq!(argmax_rows(&[0.0, inf], 2).unwrap(), vec![None]);
        assert!(argmax_rows(&s, 5).is_err());
        assert!(argmax_rows(&s, 0).is_err());
    }
}
