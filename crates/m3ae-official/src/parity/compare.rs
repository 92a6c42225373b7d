//! How one computed tensor is compared with its golden value: the tolerance rules
//! ([`Tolerance`]) and the result of one comparison ([`Check`]).

use crate::Result;
use candle_core::{DType, Tensor};

/// How two tensors are compared.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Tolerance {
    /// Bit-for-bit (integer tensors and 0/1 masks).
    Exact,
    /// Elementwise `|a - b| <= atol + rtol |b|`.
    Elementwise {
        /// Absolute part.
        atol: f64,
        /// Relative part.
        rtol: f64,
    },
    /// Gradients: `|a - b| <= scale * max|b| + rtol |b|` per tensor.
    Gradient {
        /// Multiple of the tensor's largest magnitude.
        scale: f64,
        /// Relative part.
        rtol: f64,
    },
}

impl Tolerance {
    /// Forward tensors: `1e-5 + 1e-4 |b|`.
    pub const FORWARD: Tolerance = Tolerance::Elementwise {
        atol: 1e-5,
        rtol: 1e-4,
    };
    /// Losses and accuracies: relative `1e-5`.
    pub const LOSS: Tolerance = Tolerance::Elementwise {
        atol: 0.0,
        rtol: 1e-5,
    };
    /// Gradients: `1e-4 max|b| + 1e-3 |b|`.
    pub const GRAD: Tolerance = Tolerance::Gradient {
        scale: 1e-4,
        rtol: 1e-3,
    };
    /// BatchNorm outputs (batch of 3, ill-conditioned): `1e-4 + 1e-3 |b|`.
    pub const BATCHNORM: Tolerance = Tolerance::Elementwise {
        atol: 1e-4,
        rtol: 1e-3,
    };

    /// The rule with its allowed error multiplied by `factor` (`Exact` stays exact): e.g. the
    /// CPU tolerances x10 for a run on a GPU.
    ///
    /// ```
    /// use m3ae_official::parity::Tolerance;
    /// assert_eq!(
    ///     Tolerance::LOSS.scaled(10.0),
    ///     Tolerance::Elementwise { atol: 0.0, rtol: 1e-4 }
    /// );
    /// assert_eq!(Tolerance::Exact.scaled(10.0), Tolerance::Exact);
    /// ```
    pub fn scaled(self, factor: f64) -> Tolerance {
        match self {
            Tolerance::Exact => Tolerance::Exact,
            Tolerance::Elementwise { atol, rtol } => Tolerance::Elementwise {
                atol: atol * factor,
                rtol: rtol * factor,
            },
            Tolerance::Gradient { scale, rtol } => Tolerance::Gradient {
                scale: scale * factor,
                rtol: rtol * factor,
            },
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Tolerance::Exact => "exact".into(),
            Tolerance::Elementwise { atol, rtol } => format!("{atol:.0e}+{rtol:.0e}|b|"),
            Tolerance::Gradient { scale, rtol } => format!("{scale:.0e}max|b|+{rtol:.0e}|b|"),
        }
    }
}

/// The result of comparing one tensor.
#[derive(Debug, Clone)]
pub struct Check {
    /// `file:key` of the fixture tensor.
    pub name: String,
    /// Largest absolute difference (NaN when the tensor could not be computed).
    pub max_abs_err: f64,
    /// The tolerance rule.
    pub tolerance: String,
    /// Whether every element is within tolerance.
    pub ok: bool,
    /// Why it failed, when it did (shape mismatch, missing tensor, ...).
    pub note: String,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<58} max_abs_err {:>10.3e}  tol {:<18} {}{}",
            self.name,
            self.max_abs_err,
            self.tolerance,
            if self.ok { "ok" } else { "FAIL" },
            if self.note.is_empty() {
                String::new()
            } else {
                format!("  ({})", self.note)
            }
        )
    }
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    // on the host: the casts below exist there for every dtype (a GPU result is read back)
    let t = t.to_device(&candle_core::Device::Cpu)?;
    let t = match t.dtype() {
        DType::U32 | DType::U8 | DType::I32 | DType::I64 | DType::I16 => {
            t.to_dtype(DType::I64)?.to_dtype(DType::F64)?
        }
        _ => t.to_dtype(DType::F64)?,
    };
    Ok(t.flatten_all()?.to_vec1::<f64>()?)
}

/// Compares `ours` with the reference `expected` under `tol`.
pub fn compare(name: &str, ours: &Tensor, expected: &Tensor, tol: Tolerance) -> Check {
    let mut check = Check {
        name: name.into(),
        max_abs_err: f64::NAN,
        tolerance: tol.describe(),
        ok: false,
        note: String::new(),
    };
    // Scalars are stored with shape [1].
    let same_shape =
        ours.dims() == expected.dims() || ours.elem_count() == 1 && expected.elem_count() == 1;
    if !same_shape {
        check.note = format!("shape {:?} vs expected {:?}", ours.dims(), expected.dims());
        return check;
    }
    let (a, b) = match (to_f64(ours), to_f64(expected)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            check.note = e.to_string();
            return check;
        }
    };
    let max_b = b.iter().fold(0f64, |m, x| m.max(x.abs()));
    let mut max_err = 0f64;
    let mut ok = true;
    for (x, y) in a.iter().zip(&b) {
        let err = (x - y).abs();
        if !(err.is_finite()) {
            ok = false;
        }
        max_err = max_err.max(err);
        let allowed = match tol {
            Tolerance::Exact => 0.0,
            Tolerance::Elementwise { atol, rtol } => atol + rtol * y.abs(),
            Tolerance::Gradient { scale, rtol } => scale * max_b + rtol * y.abs(),
        };
        if err > allowed {
            ok = false;
        }
    }
    check.max_abs_err = max_err;
    check.ok = ok;
    check
}
