//! The checks of `linear_probe`: the image-only backbone (the M3AE params under the probe's
//! config), its representation and pooled features, and the probe head (BatchNorm in training
//! and evaluation mode, logits, updated running statistics).

use super::compare::{compare, Check, Tolerance};
use super::fixture::{Env, FixtureConfig, FixtureFile};
use crate::{Error, Result};
use candle_core::Tensor;
use m3ae_model::{pool, Mae, Pooling, Unexpected};
use std::collections::HashMap;
use std::path::Path;

/// An error of the probe head, with its message unchanged.
fn head_err(e: impl std::fmt::Display) -> Error {
    Error::Fixture(e.to_string())
}

/// Checks every tensor of `linear_probe.safetensors`: the backbone built from `m3ae_params`
/// (official names) and the head of the file; `image_patches` are the M3AE's patchified inputs,
/// which the probe's input must equal.
pub(super) fn linear_probe(
    out: &mut Vec<Check>,
    env: &Env,
    dir: &Path,
    fc: &FixtureConfig,
    m3ae_params: HashMap<String, Tensor>,
    image_patches: &Tensor,
) -> Result<()> {
    let mut lp = FixtureFile::open(dir, "linear_probe", env)?;
    let backbone = Mae::from_official(
        &fc.probe,
        m3ae_params,
        Unexpected::Ignore,
        "m3ae_params.safetensors",
        &env.dev,
    )?;
    let lp_patches = lp.get("linear.input_image_patches")?;
    out.push(compare(
        "linear_probe:linear.input_image_patches (vs patchify)",
        image_patches,
        &lp_patches,
        env.tol(Tolerance::FORWARD),
    ));
    let rep = backbone.forward_representation(&lp_patches)?;
    lp.check(out, "linear.representation", &rep, Tolerance::FORWARD);
    let cls = pool(&rep, Pooling::Cls)?;
    let mean = pool(&rep, Pooling::Mean)?;
    lp.check(out, "linear.feature_cls", &cls, Tolerance::FORWARD);
    lp.check(out, "linear.feature_meanpool", &mean, Tolerance::FORWARD);
    let head = m3ae_model::LinearProbeHead::new(
        lp.get("linear.head.Dense_0.kernel")?.t()?.contiguous()?,
        lp.get("linear.head.Dense_0.bias")?,
        lp.get("linear.bn.init_mean")?,
        lp.get("linear.bn.init_var")?,
    )
    .map_err(head_err)?;
    if let Some(n) = fc.num_classes {
        let c = head.weight.dim(0)?;
        if c != n {
            return Err(Error::Fixture(format!(
                "config.json num_classes {n} does not match the probe head's {c} classes"
            )));
        }
    }
    let mut train_head = head.clone();
    let (logits, bn_out) = train_head.forward_train(&cls).map_err(head_err)?;
    lp.check(out, "linear.bn_out_train", &bn_out, Tolerance::BATCHNORM);
    lp.check(out, "linear.logits_train", &logits, Tolerance::BATCHNORM);
    lp.check(
        out,
        "linear.bn.new_mean",
        &train_head.running_mean,
        Tolerance::BATCHNORM,
    );
    lp.check(
        out,
        "linear.bn.new_var",
        &train_head.running_var,
        Tolerance::BATCHNORM,
    );
    let eval_logits = head.forward_eval(&cls).map_err(head_err)?;
    lp.check(
        out,
        "linear.logits_eval",
        &eval_logits,
        Tolerance::BATCHNORM,
    );
    let (pool_logits, _) = head.clone().forward_train(&mean).map_err(head_err)?;
    lp.check(
        out,
        "linear.logits_train_pool",
        &pool_logits,
        Tolerance::BATCHNORM,
    );
    lp.finish(out);
    Ok(())
}
