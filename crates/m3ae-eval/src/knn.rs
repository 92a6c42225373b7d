//! k-nearest-neighbour evaluation on features: a cosine kNN classifier with temperature-weighted
//! votes (k = 20, T = 0.07 by default), and the kNN-distance OOD score.

use crate::{Error, Result};
use candle_core::{Tensor, D};

/// L2-normalises the rows of `[N, D]` features.
pub fn normalize_rows(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    Ok(x.broadcast_div(&norm)?)
}

/// For every query row, the `k` largest cosine similarities to `bank` rows and their indices,
/// row-major `[M, k]` (descending; equal similarities in bank order). A NaN similarity ranks
/// after every number, so a non-finite bank row is never a nearer neighbour than a finite one.
/// Both inputs must already be normalised.
pub fn top_k_similar(queries: &Tensor, bank: &Tensor, k: usize) -> Result<(Vec<f32>, Vec<u32>)> {
    let (m, d) = queries.dims2()?;
    let (n, d2) = bank.dims2()?;
    if d != d2 || k == 0 || k > n {
        return Err(Error::Shape(format!(
            "kNN: queries [{m}, {d}], bank [{n}, {d2}], k = {k}"
        )));
    }
    let bank_t = bank.t()?.contiguous()?;
    let (mut sims, mut idx) = (Vec::with_capacity(m * k), Vec::with_capacity(m * k));
    let mut start = 0;
    while start < m {
        let len = 256.min(m - start);
        let s = queries.narrow(0, start, len)?.matmul(&bank_t)?;
        let rows = s.to_vec2::<f32>()?;
        for row in rows {
            let mut order: Vec<u32> = (0..n as u32).collect();
            let cmp = |a: &u32, b: &u32| {
                crate::metrics::rank_order(row[*a as usize], row[*b as usize]).then(a.cmp(b))
            };
            order.select_nth_unstable_by(k - 1, cmp);
            order.truncate(k);
            order.sort_by(cmp);
            for &j in &order {
                sims.push(row[j as usize]);
                idx.push(j);
            }
        }
        start += len;
    }
    Ok((sims, idx))
}

/// Cosine kNN classification: each of the `k` neighbours votes for its label with weight
/// `exp(sim / temperature)` (times `exp(-s_max / temperature)`, `s_max` the query's largest
/// similarity, so that small temperatures do not overflow); returns class scores `[M, classes]`
/// row-major. A neighbour whose similarity is not finite (a NaN feature) casts no vote, and a
/// query without any voting neighbour scores NaN for every class (no prediction, never
/// correct). `temperature` must be finite and positive.
pub fn knn_classify(
    train: &Tensor,
    train_labels: &[u32],
    test: &Tensor,
    classes: usize,
    k: usize,
    temperature: f64,
) -> Result<Vec<f32>> {
    if train.dim(0)? != train_labels.len() {
        return Err(Error::Shape(format!(
            "kNN: {} train rows but {} labels",
            train.dim(0)?,
            train_labels.len()
        )));
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(Error::Shape(format!(
            "kNN: the temperature must be finite and positive, not {temperature}"
        )));
    }
    let (train, test) = (normalize_rows(train)?, normalize_rows(test)?);
    let (sims, idx) = top_k_similar(&test, &train, k)?;
    let m = test.dim(0)?;
    let mut scores = vec![0f32; m * classes];
    for q in 0..m {
        let row = &sims[q * k..(q + 1) * k];
        // the largest finite similarity: votes are scaled by exp(-max / T) so that a small
        // temperature cannot overflow them (the class ranking is unchanged)
        let Some(top) = row
            .iter()
            .copied()
            .filter(|s| s.is_finite())
            .reduce(f32::max)
        else {
            // no neighbour with a usable similarity: no prediction
            scores[q * classes..(q + 1) * classes].fill(f32::NAN);
            continue;
        };
        for j in 0..k {
            let label = train_labels[idx[q * k + j] as usize] as usize;
            if label >= classes {
                return Err(Error::Shape(format!(
                    "kNN: label {label} outside {classes} classes"
                )));
            }
            let sim = row[j];
            if sim.is_finite() {
                scores[q * classes + label] += (((sim - top) as f64) / temperature).exp() as f32;
            }
        }
    }
    Ok(scores)
}

/// kNN-distance OOD score: the cosine similarity to the `k`-th nearest training feature
/// (higher = more in-distribution).
pub fn knn_score(train: &Tensor, test: &Tensor, k: usize) -> Result<Vec<f64>> {
    let (train, test) = (normalize_rows(train)?, normalize_rows(test)?);
    let (sims, _) = top_k_similar(&test, &train, k)?;
    Ok(sims.chunks(k).map(|r| r[k - 1] as f64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn neighbours_vote_for_their_class() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let train = Tensor::new(&[[1f32, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], &dev)?;
        let test = Tensor::new(&[[1f32, 0.05], [0.05, 1.0]], &dev)?;
        let s = knn_classify(&train, &[0, 0, 1, 1], &test, 2, 2, 0.07)?;
        assert!(s[0] > s[1] && s[3] > s[2]);
        let (sims, idx) = top_k_similar(&normalize_rows(&test)?, &normalize_rows(&train)?, 1)?;
        assert_eq!(idx, vec![0, 2]);
        assert!(sims[0] > 0.99);
        let far = Tensor::new(&[[-1f32, -1.0]], &dev)?;
        let near = knn_score(&train, &test, 1)?;
        let out = knn_score(&train, &far, 1)?;
        assert!(near[0] > out[0]);
        assert!(top_k_similar(&test, &train, 5).is_err());
        assert!(knn_classify(&train, &[0, 0, 1, 1], &test, 2, 2, 0.0).is_err());
        assert!(knn_classify(&train, &[0, 0, 1, 1], &test, 2, 2, f64::NAN).is_err());
        Ok(())
    }

    #[test]
    fn nan_features_are_never_the_nearest_neighbour_nor_a_correct_vote() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let nan = f32::NAN;
        // bank: a NaN row (class 1) and two finite rows of class 0
        let train = Tensor::new(&[[nan, nan], [1f32, 0.0], [0.0, 1.0]], &dev)?;
        let test = Tensor::new(&[[1f32, 0.1]], &dev)?;
        let (_, idx) = top_k_similar(&normalize_rows(&test)?, &normalize_rows(&train)?, 2)?;
        assert_eq!(idx, vec![1, 2]);
        let s = knn_classify(&train, &[1, 0, 0], &test, 2, 3, 0.07)?;
        assert!(s[0] > 0.0 && s[1] == 0.0, "{s:?}");
        // an all-NaN bank and query: no class gets a vote, so no kNN prediction is correct
        // (not even class 0 by the tie rule)
        let all = Tensor::new(&[[nan, nan], [nan, nan]], &dev)?;
        let s = knn_classify(&all, &[0, 1], &all, 2, 2, 0.07)?;
        assert!(s.iter().all(|v| v.is_nan()), "{s:?}");
        assert_eq!(crate::metrics::top_k_accuracy(&s, 2, &[0, 1], 1)?, 0.0);
        // a tiny temperature does not overflow the votes
        let train = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &dev)?;
        let s = knn_classify(&train, &[0, 1], &test, 2, 2, 1e-6)?;
        assert!(s.iter().all(|v| v.is_finite()) && s[0] > s[1], "{s:?}");
        Ok(())
    }
}
