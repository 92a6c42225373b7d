//! Learning-rate schedule of the official code: optax `warmup_cosine_decay_schedule` with every
//! value scaled by `batch_size / 256`.

use serde::{Deserialize, Serialize};

/// Linear warmup from `init` to `peak` over `warmup_steps`, then cosine from `peak` to `end` until
/// `decay_steps` (constant `end` afterwards). Values are before the batch scaling.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WarmupCosine {
    /// Learning rate at step 0.
    pub init: f64,
    /// Learning rate at the end of the warmup.
    pub peak: f64,
    /// Learning rate at `decay_steps`.
    pub end: f64,
    /// Steps of linear warmup.
    pub warmup_steps: u64,
    /// Step at which the cosine reaches `end` (the total number of optimiser steps).
    pub decay_steps: u64,
}

impl WarmupCosine {
    /// The learning rate at optimiser step `step` (0-based), multiplied by `scale`.
    ///
    /// ```
    /// use m3ae_model::schedule::WarmupCosine;
    /// let s = WarmupCosine { init: 0.0, peak: 1.0, end: 0.0, warmup_steps: 10, decay_steps: 110 };
    /// assert_eq!(s.at(0, 1.0), 0.0);
    /// assert!((s.at(5, 1.0) - 0.5).abs() < 1e-12);
    /// assert!((s.at(10, 2.0) - 2.0).abs() < 1e-12);
    /// assert!((s.at(60, 1.0) - 0.5).abs() < 1e-12);
    /// assert!(s.at(110, 1.0).abs() < 1e-12 && s.at(500, 1.0).abs() < 1e-12);
    /// ```
    pub fn at(&self, step: u64, scale: f64) -> f64 {
        let v = if step < self.warmup_steps {
            self.init + (self.peak - self.init) * step as f64 / self.warmup_steps as f64
        } else {
            let span = self.decay_steps.saturating_sub(self.warmup_steps);
            if span == 0 {
                self.peak
            } else {
                let t = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
                self.end + (self.peak - self.end) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        };
        v * scale
    }
}
