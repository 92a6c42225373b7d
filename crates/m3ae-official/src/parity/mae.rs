//! The checks of `mae_io`: the image-only MAE's input and masking replayed from the fixture's
//! noise, its encoder and decoder traces and output, its losses under both loss flags, the
//! unmasked representation and the position tables.

use super::compare::{Check, Tolerance};
use super::fixture::{check_masking, noise, scalar_check, Env, FixtureFile};
use crate::{Error, Result};
use candle_core::Tensor;
use m3ae_model::{patchify, posemb, Mae, Masking};
use std::path::Path;

/// Checks every tensor of `mae_io.safetensors` against `mae`; returns the total loss (for the
/// gradients).
pub(super) fn mae_io(out: &mut Vec<Check>, env: &Env, dir: &Path, mae: &Mae) -> Result<Tensor> {
    let dev = &env.dev;
    let mcfg = mae.config().clone();
    let mut mio = FixtureFile::open(dir, "mae_io", env)?;
    let mimage = mio.get("input.image")?;
    let mpatches = patchify(&mimage, mcfg.patch_size)?;
    mio.check(out, "input.image_patches", &mpatches, Tolerance::FORWARD);
    let (mb, mli) = (mpatches.dim(0)?, mpatches.dim(1)?);
    let mm = Masking::new(
        &noise(&mut mio, "noise.image")?,
        mb,
        mcfg.image_keep(mli),
        dev,
    )?;
    check_masking(out, &mut mio, "mask.image", &mm);
    let mo = mae.forward(&mpatches, &mm)?;
    mio.check(out, "enc.input", &mo.trace.enc_input, Tolerance::FORWARD);
    mio.check(out, "enc.output", &mo.trace.enc_output, Tolerance::FORWARD);
    mio.check(out, "dec.input", &mo.trace.dec_input, Tolerance::FORWARD);
    mio.check(out, "dec.output", &mo.trace.dec_output, Tolerance::FORWARD);
    mio.check(
        out,
        "out.image",
        mo.image
            .as_ref()
            .ok_or_else(|| Error::Fixture("no image output".into()))?,
        Tolerance::FORWARD,
    );
    let ml = mae.losses(&mpatches, &mo)?;
    scalar_check(out, &mut mio, "loss.image", ml.image_loss.as_ref())?;
    scalar_check(out, &mut mio, "loss.total", Some(&ml.total))?;
    // The loss under the other `image_all_token_loss` flag; the fixture holds the all-token one.
    let mut all_cfg = mcfg.clone();
    all_cfg.image_all_token_loss = !mcfg.image_all_token_loss;
    let mall = Mae::new(&all_cfg, mae.params().clone())?.losses(&mpatches, &mo)?;
    let all_l = if mcfg.image_all_token_loss {
        &ml
    } else {
        &mall
    };
    scalar_check(
        out,
        &mut mio,
        "loss.variant.image_all_token",
        all_l.image_loss.as_ref(),
    )?;
    mio.check(
        out,
        "repr.output",
        &mae.forward_representation(&mpatches)?,
        Tolerance::FORWARD,
    );
    mio.check(
        out,
        "posemb.enc_image_2d",
        &posemb::sincos_2d(mli, mcfg.emb_dim, dev)?.squeeze(0)?,
        Tolerance::FORWARD,
    );
    mio.check(
        out,
        "posemb.dec_image_2d",
        &posemb::sincos_2d(mli, mcfg.dec_emb_dim, dev)?.squeeze(0)?,
        Tolerance::FORWARD,
    );
    mio.finish(out);
    Ok(ml.total)
}
