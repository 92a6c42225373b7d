//! The official linear-probe head (`LinearCLS`): BatchNorm without scale or bias (momentum 0.9,
//! eps 1e-5, biased batch variance in training) followed by a dense layer.

use crate::{Error, Result};
use candle_core::{Tensor, D};

/// BatchNorm epsilon of the official probe.
pub const BN_EPS: f64 = 1e-5;
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

    /// Predicted classes `[B]` (u32).
    pub fn predict(&self, features: &Tensor) -> Result<Tensor> {
        Ok(self.forward_eval(features)?.argmax(D::Minus1)?)
    }
}
