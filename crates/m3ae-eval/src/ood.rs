//! Out-of-distribution scores on features and probe outputs (higher = more in-distribution):
//! maximum softmax probability of the probe, Mahalanobis distance to the closest class mean with a
//! shared covariance, and (in [`crate::knn`]) the kNN distance.

use crate::{Error, Result};
use candle_core::{DType, Tensor};

/// Maximum softmax probability of each row of logits `[N, C]` (row-major).
pub fn max_softmax(logits: &[f32], classes: usize) -> Result<Vec<f64>> {
    if classes == 0 || !logits.len().is_multiple_of(classes) {
        return Err(Error::Shape(format!(
            "MSP: {} logits for {classes} classes",
            logits.len()
        )));
    }
    Ok(logits
        .chunks_exact(classes)
        .map(|r| {
            let m = r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let z: f64 = r.iter().map(|&v| (v as f64 - m).exp()).sum();
            1.0 / z
        })
        .collect())
}

/// Class means and the inverse of the shared (pooled, biased) covariance of training features.
#[derive(Debug, Clone)]
pub struct Mahalanobis {
    means: Tensor,
    precision: Tensor,
}

/// Inverts a symmetric positive-definite matrix (row-major `d x d`, f64) by Cholesky.
fn spd_inverse(a: &[f64], d: usize) -> Result<Vec<f64>> {
    let mut l = vec![0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            let mut s = a[i * d + j];
            for k in 0..j {
                s -= l[i * d + k] * l[j * d + k];
            }
            if i == j {
                if s <= 0.0 {
                    return Err(Error::Shape(
                        "Mahalanobis: covariance is not positive definite".into(),
                    ));
                }
                l[i * d + i] = s.sqrt();
            } else {
                l[i * d + j] = s / l[j * d + j];
            }
        }
    }
    // inverse of L, then A^-1 = L^-T L^-1
    let mut li = vec![0f64; d * d];
    for i in 0..d {
        li[i * d + i] = 1.0 / l[i * d + i];
        for j in 0..i {
            let mut s = 0.0;
            for k in j..i {
                s -= l[i * d + k] * li[k * d + j];
            }
            li[i * d + j] = s / l[i * d + i];
        }
    }
    let mut inv = vec![0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            let mut s = 0.0;
            for k in i..d {
                s += li[k * d + i] * li[k * d + j];
            }
            inv[i * d + j] = s;
            inv[j * d + i] = s;
        }
    }
    Ok(inv)
}

impl Mahalanobis {
    /// Fits class means and the shared covariance (plus `ridge * mean variance` on the diagonal
    /// for stability) from training features `[N, D]` and labels.
    pub fn fit(features: &Tensor, labels: &[u32], classes: usize, ridge: f64) -> Result<Self> {
        let (n, d) = features.dims2()?;
        if n != labels.len() || n == 0 {
            return Err(Error::Shape(format!(
                "Mahalanobis: {n} rows, {} labels",
                labels.len()
            )));
        }
        let x = features.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let mut means = vec![0f64; classes * d];
        let mut counts = vec![0usize; classes];
        for (row, &y) in x.iter().zip(labels) {
            let y = y as usize;
            if y >= classes {
                return Err(Error::Shape(format!(
                    "Mahalanobis: label {y} outside {classes} classes"
                )));
            }
            counts[y] += 1;
            for j in 0..d {
                means[y * d + j] += row[j];
            }
        }
        for c in 0..classes {
            for j in 0..d {
                means[c * d + j] /= counts[c].max(1) as f64;
            }
        }
        let mut cov = vec![0f64; d * d];
        for (row, &y) in x.iter().zip(labels) {
            let c: Vec<f64> = (0..d).map(|j| row[j] - means[y as usize * d + j]).collect();
            for i in 0..d {
                for j in 0..=i {
                    cov[i * d + j] += c[i] * c[j];
                }
            }
        }
        let mean_var = (0..d).map(|i| cov[i * d + i]).sum::<f64>() / (n as f64 * d as f64);
        for i in 0..d {
            for j in 0..=i {
                cov[i * d + j] /= n as f64;
                cov[j * d + i] = cov[i * d + j];
            }
            cov[i * d + i] += ridge * mean_var.max(1e-12);
        }
        let precision = spd_inverse(&cov, d)?;
        let dev = features.device();
        Ok(Self {
            means: Tensor::from_vec(means, (classes, d), dev)?,
            precision: Tensor::from_vec(precision, (d, d), dev)?,
        })
    }

    /// Score of each row of `[M, D]`: minus the smallest squared Mahalanobis distance to a class mean.
    pub fn score(&self, features: &Tensor) -> Result<Vec<f64>> {
        let x = features.to_dtype(DType::F64)?;
        let classes = self.means.dim(0)?;
        let mut best = vec![f64::INFINITY; x.dim(0)?];
        for c in 0..classes {
            let diff = x.broadcast_sub(&self.means.get(c)?)?;
            let q = (diff.matmul(&self.precision)? * &diff)?
                .sum(1)?
                .to_vec1::<f64>()?;
            for (b, v) in best.iter_mut().zip(q) {
                *b = b.min(v);
            }
        }
        Ok(best.into_iter().map(|v| -v).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn mahalanobis_prefers_points_near_class_means() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(
            &[
                [0f32, 0.0],
                [0.2, 0.1],
                [-0.1, 0.2],
                [5.0, 5.0],
                [5.1, 4.8],
                [4.9, 5.2],
            ],
            &dev,
        )?;
        let m = Mahalanobis::fit(&x, &[0, 0, 0, 1, 1, 1], 2, 1e-3)?;
        let s = m.score(&Tensor::new(
            &[[0.05f32, 0.1], [2.5, 2.5], [5.0, 5.0]],
            &dev,
        )?)?;
        assert!(s[0] > s[1] && s[2] > s[1]);
        let inv = spd_inverse(&[4.0, 2.0, 2.0, 3.0], 2)?;
        let expect = [3.0 / 8.0, -2.0 / 8.0, -2.0 / 8.0, 4.0 / 8.0];
        for (a, b) in inv.iter().zip(expect) {
            assert!((a - b).abs() < 1e-12);
        }
        assert!(spd_inverse(&[1.0, 2.0, 2.0, 1.0], 2).is_err());
        let p = max_softmax(&[0.0, 0.0, 10.0, 0.0], 2)?;
        assert!((p[0] - 0.5).abs() < 1e-12 && p[1] > 0.99);
        Ok(())
    }
}
