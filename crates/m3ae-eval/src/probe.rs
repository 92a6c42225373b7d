//! Training of the official linear probe (`LinearCLS`: BatchNorm without scale or bias, then a
//! dense layer) on cached features: LARS, warmup + cosine learning rate scaled by batch/256. The
//! head itself, [`LinearProbeHead`], lives in `m3ae-model` (re-exported here).

use crate::{Error, Result};
use candle_core::Tensor;

pub use m3ae_model::probe_head::{LinearProbeHead, BN_EPS, BN_MOMENTUM, NO_CLASS};

/// Settings of the linear probe (official recipe; defaults sized for CPU runs on cached features).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// Passes over the training features.
    pub epochs: usize,
    /// Batch size (the learning rate is scaled by `batch_size / 256`).
    pub batch_size: usize,
    /// Peak learning rate before scaling (official README: 0.1).
    pub lr_peak: f64,
    /// Warmup epochs (official README: 10 of 90).
    pub warmup_epochs: usize,
    /// LARS weight decay (official README: 0).
    pub weight_decay: f64,
    /// LARS momentum.
    pub momentum: f64,
    /// LARS trust coefficient (optax default).
    pub trust_coefficient: f64,
    /// Seed of the head initialisation and the shuffling.
    pub seed: u64,
}

impl ProbeConfig {
    /// `Err(Config)` unless every float setting is finite and in range: `lr_peak > 0`,
    /// `weight_decay >= 0`, `momentum` in [0, 1), `trust_coefficient >= 0`.
    pub fn validate(&self) -> Result<()> {
        let check = |field, value: f64, ok: bool, expected| {
            if value.is_finite() && ok {
                Ok(())
            } else {
                Err(Error::Config {
                    field,
                    value,
                    expected,
                })
            }
        };
        check("lr_peak", self.lr_peak, self.lr_peak > 0.0, "> 0")?;
        check(
            "weight_decay",
            self.weight_decay,
            self.weight_decay >= 0.0,
            ">= 0",
        )?;
        check(
            "momentum",
            self.momentum,
            (0.0..1.0).contains(&self.momentum),
            "in [0, 1)",
        )?;
        check(
            "trust_coefficient",
            self.trust_coefficient,
            self.trust_coefficient >= 0.0,
            ">= 0",
        )
    }
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            epochs: 30,
            batch_size: 256,
            lr_peak: 0.1,
            warmup_epochs: 3,
            weight_decay: 0.0,
            momentum: 0.9,
            trust_coefficient: 0.001,
            seed: 1,
        }
    }
}

/// `optax.lars` as the official probe uses it: decayed weights added to the gradient, the update
/// scaled by the layer-wise trust ratio `tc * |p| / |g|` (1 when either norm is 0), by `-lr`, then
/// accumulated with momentum (`m = u + momentum m`, `p += m`).
#[derive(Debug, Clone)]
pub struct Lars {
    momentum: f64,
    weight_decay: f64,
    trust_coefficient: f64,
    traces: Vec<Option<Vec<f32>>>,
}

impl Lars {
    /// A LARS optimiser for `n` parameter tensors.
    pub fn new(n: usize, momentum: f64, weight_decay: f64, trust_coefficient: f64) -> Self {
        Self {
            momentum,
            weight_decay,
            trust_coefficient,
            traces: vec![None; n],
        }
    }

    /// One step over `(param, grad)` pairs (in the same order every call).
    pub fn step(&mut self, params: &[&candle_core::Var], grads: &[Tensor], lr: f64) -> Result<()> {
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let pv = p.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let mut gv = g.flatten_all()?.to_vec1::<f32>()?;
            for (gi, pi) in gv.iter_mut().zip(&pv) {
                *gi += (self.weight_decay as f32) * pi;
            }
            let pn = pv.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let gn = gv.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let ratio = if pn == 0.0 || gn == 0.0 {
                1.0
            } else {
                self.trust_coefficient * pn / gn
            };
            let scale = (-lr * ratio) as f32;
            let trace = self.traces[i].get_or_insert_with(|| vec![0.0; pv.len()]);
            let mut new = pv.clone();
            for j in 0..pv.len() {
                trace[j] = scale * gv[j] + self.momentum as f32 * trace[j];
                new[j] += trace[j];
            }
            p.set(&Tensor::from_vec(new, p.shape(), p.device())?)?;
        }
        Ok(())
    }
}

/// Truncated-normal `lecun_normal` initialisation of a `[classes, dim]` weight (flax default).
fn lecun_normal(classes: usize, dim: usize, seed: u64) -> Vec<f32> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    // std of N(0,1) truncated to [-2, 2] is 0.8796; rescale so the variance is 1 / fan_in
    let std = (1.0 / dim as f64).sqrt() / 0.879_625_661_034_239_8;
    let normal = rand_distr::StandardNormal;
    (0..classes * dim)
        .map(|_| loop {
            let z: f64 = normal.sample(&mut rng);
            if z.abs() <= 2.0 {
                break (z * std) as f32;
            }
        })
        .collect()
}

/// Per-epoch record of a probe run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeEpoch {
    /// Epoch index (0-based).
    pub epoch: usize,
    /// Mean training loss.
    pub loss: f64,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
}

/// Trains the official probe head on cached features `[N, D]` with labels in `0..classes`.
pub fn train_probe(
    features: &Tensor,
    labels: &[u32],
    classes: usize,
    cfg: &ProbeConfig,
) -> Result<(LinearProbeHead, Vec<ProbeEpoch>)> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let (n, d) = features.dims2()?;
    if n != labels.len() || n == 0 || classes == 0 {
        return Err(Error::Shape(format!(
            "probe: {n} feature rows, {} labels, {classes} classes",
            labels.len()
        )));
    }
    if let Some(&bad) = labels.iter().find(|&&y| y as usize >= classes) {
        return Err(Error::Shape(format!(
            "probe: label {bad} outside {classes} classes"
        )));
    }
    if cfg.batch_size == 0 || cfg.epochs == 0 {
        return Err(Error::Shape(
            "probe: batch_size and epochs must be > 0".into(),
        ));
    }
    cfg.validate()?;
    let dev = features.device().clone();
    let w = candle_core::Var::from_tensor(&Tensor::from_vec(
        lecun_normal(classes, d, cfg.seed),
        (classes, d),
        &dev,
    )?)?;
    let b = candle_core::Var::zeros(classes, candle_core::DType::F32, &dev)?;
    let mut head = LinearProbeHead::new(
        w.as_tensor().clone(),
        b.as_tensor().clone(),
        Tensor::zeros(d, candle_core::DType::F32, &dev)?,
        Tensor::ones(d, candle_core::DType::F32, &dev)?,
    )?;
    let steps_per_epoch = n.div_ceil(cfg.batch_size).max(1);
    let schedule = m3ae_model::WarmupCosine {
        init: 0.0,
        peak: cfg.lr_peak,
        end: 0.0,
        warmup_steps: (cfg.warmup_epochs * steps_per_epoch) as u64,
        decay_steps: (cfg.epochs * steps_per_epoch) as u64,
    };
    let scale = cfg.batch_size as f64 / 256.0;
    let mut lars = Lars::new(2, cfg.momentum, cfg.weight_decay, cfg.trust_coefficient);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(0x9e37_79b9));
    let mut order: Vec<u32> = (0..n as u32).collect();
    let labels_t = Tensor::from_slice(labels, n, &dev)?;
    let mut history = Vec::new();
    let mut step = 0u64;
    for epoch in 0..cfg.epochs {
        order.shuffle(&mut rng);
        let mut total = 0.0;
        let mut count = 0usize;
        let mut lr = 0.0;
        for chunk in order.chunks(cfg.batch_size) {
            if chunk.len() < 2 {
                continue; // BatchNorm needs at least two samples
            }
            let idx = Tensor::from_slice(chunk, chunk.len(), &dev)?;
            let x = features.index_select(&idx, 0)?;
            let y = labels_t.index_select(&idx, 0)?;
            head.weight = w.as_tensor().clone();
            head.bias = b.as_tensor().clone();
            let (logits, _) = head.forward_train(&x)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            let grads = loss.backward()?;
            let gw = grads
                .get(w.as_tensor())
                .ok_or_else(|| Error::Shape("probe: no gradient for the weight".into()))?
                .clone();
            let gb = grads
                .get(b.as_tensor())
                .ok_or_else(|| Error::Shape("probe: no gradient for the bias".into()))?
                .clone();
            lr = schedule.at(step, scale);
            lars.step(&[&w, &b], &[gw, gb], lr)?;
            step += 1;
            total += loss.to_scalar::<f32>()? as f64 * chunk.len() as f64;
            count += chunk.len();
        }
        history.push(ProbeEpoch {
            epoch,
            loss: total / count.max(1) as f64,
            lr,
        });
    }
    head.weight = w.as_tensor().detach();
    head.bias = b.as_tensor().detach();
    Ok((head, history))
}

/// Evaluation-mode logits `[N, C]` as a row-major vector, computed in batches.
pub fn probe_logits(head: &LinearProbeHead, features: &Tensor) -> Result<Vec<f32>> {
    let n = features.dim(0)?;
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let len = 4096.min(n - start);
        let l = head.forward_eval(&features.narrow(0, start, len)?)?;
        out.extend(l.flatten_all()?.to_vec1::<f32>()?);
        start += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn probe_separates_linearly_separable_features() -> anyhow::Result<()> {
        // 3 classes, 8-dim features: class c has a large coordinate c plus noise
        let (n, d, c) = (300usize, 8usize, 3usize);
        let mut v = Vec::with_capacity(n * d);
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let y = i % c;
            labels.push(y as u32);
            for j in 0..d {
                let noise = (((i * 31 + j * 17) % 13) as f32 - 6.0) / 20.0;
                v.push(if j == y { 3.0 + noise } else { noise });
            }
        }
        let x = Tensor::from_vec(v, (n, d), &Device::Cpu)?;
        let cfg = ProbeConfig {
            epochs: 40,
            batch_size: 32,
            lr_peak: 5.0,
            warmup_epochs: 2,
            ..Default::default()
        };
        let (head, hist) = train_probe(&x, &labels, c, &cfg)?;
        assert!(hist.last().unwrap().loss < hist[0].loss);
        let logits = probe_logits(&head, &x)?;
        let acc = crate::metrics::top_k_accuracy(&logits, c, &labels, 1)?;
        assert_eq!(acc, 1.0);
        Ok(())
    }

    #[test]
    fn non_finite_or_out_of_range_settings_are_rejected() {
        let x = Tensor::zeros((4, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        for (cfg, field) in [
            (
                ProbeConfig {
                    lr_peak: f64::NAN,
                    ..Default::default()
                },
                "lr_peak",
            ),
            (
                ProbeConfig {
                    lr_peak: 0.0,
                    ..Default::default()
                },
                "lr_peak",
            ),
            (
                ProbeConfig {
                    weight_decay: f64::INFINITY,
                    ..Default::default()
                },
                "weight_decay",
            ),
            (
                ProbeConfig {
                    momentum: 1.0,
                    ..Default::default()
                },
                "momentum",
            ),
        ] {
            let e = train_probe(&x, &[0, 1, 0, 1], 2, &cfg).unwrap_err();
            assert!(e.to_string().contains(field), "{e}");
        }
    }

    #[test]
    fn lars_matches_the_optax_formula() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let p = candle_core::Var::from_tensor(&Tensor::new(&[3f32, 4.0], &dev)?)?; // |p| = 5
        let g = Tensor::new(&[0.6f32, 0.8], &dev)?; // |g| = 1
        let mut lars = Lars::new(1, 0.9, 0.0, 0.001);
        lars.step(&[&p], std::slice::from_ref(&g), 2.0)?;
        // ratio 0.001 * 5 / 1 = 0.005; update = -2 * 0.005 * g = -0.01 g
        let v = p.as_tensor().to_vec1::<f32>()?;
        assert!((v[0] - (3.0 - 0.006)).abs() < 1e-6 && (v[1] - (4.0 - 0.008)).abs() < 1e-6);
        Ok(())
    }
}
