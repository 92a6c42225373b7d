//! The official linear-probe head (`LinearCLS`): BatchNorm without scale or bias (momentum 0.9,
//! eps 1e-5, biased batch variance in training) followed by a dense layer, on pooled encoder
//! features. It is part of the model (an official probe checkpoint holds it next to the
//! backbone); `m3ae-eval` trains it and re-exports it.

use crate::params::{read_safetensors, write_safetensors};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// BatchNorm epsilon of the official probe.
pub const BN_EPS: f64 = 1e-5;
/// What [`LinearProbeHead::predict`] gives for a row without a finite best logit.
pub const NO_CLASS: u32 = u32::MAX;
/// Running-statistics momentum of the official probe (`new = 0.9 old + 0.1 batch`).
pub const BN_MOMENTUM: f64 = 0.9;

/// Non-affine BatchNorm + linear classifier on pooled features `[B, D]`.
#[derive(Debug, Clone)]
pub struct LinearProbeHead {
    /// `[C, D]` classifier weight.
    pub weight: Tensor,
    /// `[C]` classifier bias.
    pub bias: Tensor,
    /// `[D]` running mean.
    pub running_mean: Tensor,
    /// `[D]` running (biased) variance.
    pub running_var: Tensor,
}

impl LinearProbeHead {
    /// A head from its weights; `weight` is `[C, D]`, statistics `[D]`.
    pub fn new(
        weight: Tensor,
        bias: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
    ) -> Result<Self> {
        let (c, d) = weight.dims2()?;
        if bias.dims() != [c] || running_mean.dims() != [d] || running_var.dims() != [d] {
            return Err(Error::Shape(format!(
                "probe head: weight {:?}, bias {:?}, mean {:?}, var {:?} do not agree",
                weight.dims(),
                bias.dims(),
                running_mean.dims(),
                running_var.dims()
            )));
        }
        Ok(Self {
            weight,
            bias,
            running_mean,
            running_var,
        })
    }

    fn normalize(x: &Tensor, mean: &Tensor, var: &Tensor) -> Result<Tensor> {
        Ok(x.broadcast_sub(mean)?
            .broadcast_div(&(var + BN_EPS)?.sqrt()?)?)
    }

    fn classify(&self, z: &Tensor) -> Result<Tensor> {
        Ok(z.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?)
    }

    /// Training-mode forward on features `[B, D]`: normalises with the batch statistics, updates
    /// the running statistics, returns `(logits [B, C], normalised features [B, D])`.
    pub fn forward_train(&mut self, features: &Tensor) -> Result<(Tensor, Tensor)> {
        let mean = features.mean_keepdim(0)?;
        let var = features.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)?;
        let z = Self::normalize(features, &mean, &var)?;
        let (mean, var) = (mean.squeeze(0)?.detach(), var.squeeze(0)?.detach());
        self.running_mean = ((&self.running_mean * BN_MOMENTUM)? + (mean * (1.0 - BN_MOMENTUM))?)?;
        self.running_var = ((&self.running_var * BN_MOMENTUM)? + (var * (1.0 - BN_MOMENTUM))?)?;
        Ok((self.classify(&z)?, z))
    }

    /// Evaluation-mode forward (running statistics): logits `[B, C]`.
    pub fn forward_eval(&self, features: &Tensor) -> Result<Tensor> {
        let z = Self::normalize(features, &self.running_mean, &self.running_var)?;
        self.classify(&z)
    }

    /// Predicted classes `[B]` (u32), by [`crate::ranking::argmax_rows`]: ties go to the lower
    /// class, a NaN logit never wins, and a row whose best logit is not finite predicts
    /// [`NO_CLASS`].
    pub fn predict(&self, features: &Tensor) -> Result<Tensor> {
        let logits = self.forward_eval(features)?;
        let (b, c) = logits.dims2()?;
        let flat = logits.flatten_all()?.to_vec1::<f32>()?;
        let pred: Vec<u32> = crate::ranking::argmax_rows(&flat, c)?
            .into_iter()
            .map(|p| p.unwrap_or(NO_CLASS))
            .collect();
        Ok(Tensor::from_vec(pred, b, features.device())?)
    }

    /// The four tensors under the names of the `probe.safetensors` layout: `weight`, `bias`,
    /// `running_mean`, `running_var`.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        HashMap::from([
            ("weight".to_string(), self.weight.clone()),
            ("bias".to_string(), self.bias.clone()),
            ("running_mean".to_string(), self.running_mean.clone()),
            ("running_var".to_string(), self.running_var.clone()),
        ])
    }

    /// Writes the head as `probe.safetensors` (the layout `m3ae convert official` and
    /// `m3ae probe --save-probe` write), atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_safetensors(path, &self.tensors(), HashMap::new())
    }

    /// Reads a head in the `probe.safetensors` layout (see [`LinearProbeHead::save`]) as f32 on
    /// `device`; a missing tensor or disagreeing shapes are errors naming the file.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let (t, _) = read_safetensors(path, device)?;
        let get = |k: &str| -> Result<Tensor> {
            Ok(t.get(k)
                .ok_or_else(|| Error::MissingWeight {
                    name: k.into(),
                    origin: path.display().to_string(),
                })?
                .to_dtype(DType::F32)?)
        };
        Self::new(
            get("weight")?,
            get("bias")?,
            get("running_mean")?,
            get("running_var")?,
        )
        .map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(dev: &Device) -> Result<LinearProbeHead> {
        LinearProbeHead::new(
            Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [-1.0, -1.0]], dev)?,
            Tensor::new(&[0f32, 0.5, 0.0], dev)?,
            Tensor::new(&[1f32, -1.0], dev)?,
            Tensor::new(&[4f32, 1.0], dev)?,
        )
    }

    #[test]
    fn eval_forward_normalises_with_running_statistics_then_classifies() -> Result<()> {
        let dev = Device::Cpu;
        let h = head(&dev)?;
        let x = Tensor::new(&[[3f32, -1.0], [f32::NAN, 0.0]], &dev)?;
        let logits = h.forward_eval(&x)?.to_vec2::<f32>()?;
        // z = ((3 - 1) / sqrt(4 + eps), (-1 + 1) / sqrt(1 + eps)) ~ (1, 0)
        let z0 = 2.0 / (4.0f64 + BN_EPS).sqrt();
        assert!((logits[0][0] as f64 - z0).abs() < 1e-6);
        assert!((logits[0][1] - 0.5).abs() < 1e-6);
        assert!((logits[0][2] as f64 + z0).abs() < 1e-6);
        // a NaN feature makes every logit of its row NaN: no class
        let pred = h.predict(&x)?.to_vec1::<u32>()?;
        assert_eq!(pred, vec![0, NO_CLASS]);
        Ok(())
    }

    #[test]
    fn train_forward_updates_running_statistics_with_momentum() -> Result<()> {
        let dev = Device::Cpu;
        let mut h = head(&dev)?;
        let x = Tensor::new(&[[0f32, 2.0], [2.0, 2.0]], &dev)?; // mean (1, 2), var (1, 0)
        let (_, z) = h.forward_train(&x)?;
        assert_eq!(z.dims(), &[2, 2]);
        let m = h.running_mean.to_vec1::<f32>()?;
        let v = h.running_var.to_vec1::<f32>()?;
        assert!((m[0] - (0.9 + 0.1)).abs() < 1e-6 && (m[1] - (-0.9 + 0.2)).abs() < 1e-6);
        assert!((v[0] - (3.6 + 0.1)).abs() < 1e-6 && (v[1] - 0.9).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn saves_and_loads_the_probe_layout_and_rejects_bad_shapes() -> Result<()> {
        let dev = Device::Cpu;
        let dir = std::env::temp_dir().join(format!("m3ae-probe-head-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::Io {
            path: dir.clone(),
            error: e,
        })?;
        let path = dir.join("probe.safetensors");
        let h = head(&dev)?;
        h.save(&path)?;
        let back = LinearProbeHead::load(&path, &dev)?;
        for (a, b) in [
            (&h.weight, &back.weight),
            (&h.bias, &back.bias),
            (&h.running_mean, &back.running_mean),
            (&h.running_var, &back.running_var),
        ] {
            assert_eq!(
                a.flatten_all()?.to_vec1::<f32>()?,
                b.flatten_all()?.to_vec1::<f32>()?
            );
        }
        let mut t = h.tensors();
        t.remove("running_var");
        write_safetensors(&path, &t, HashMap::new())?;
        let e = LinearProbeHead::load(&path, &dev).unwrap_err().to_string();
        assert!(
            e.contains("running_var") && e.contains("probe.safetensors"),
            "{e}"
        );
        let e = LinearProbeHead::new(
            h.weight.clone(),
            h.running_mean.clone(),
            h.running_mean.clone(),
            h.running_var.clone(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("do not agree"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
