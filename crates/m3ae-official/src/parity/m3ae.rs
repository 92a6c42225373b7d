//! The checks of `m3ae_io`: the M3AE inputs and maskings replayed from the fixture's noise, the
//! encoder and decoder traces and outputs, the losses under every loss flag, the text-only
//! (unpaired) path, the unmasked representation and the position tables.

use super::compare::{compare, Check, Tolerance};
use super::fixture::{check_masking, noise, scalar_check, Env, FixtureConfig, FixtureFile};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use m3ae_model::{patchify, posemb, M3ae, M3aeConfig, Masking, ModelInput, Output};
use std::path::Path;

/// What the later checks of the harness need from the M3AE pass.
pub(super) struct M3aeIo {
    /// The patchified input images (the probe's input must equal them).
    pub(super) image_patches: Tensor,
    /// The total loss, for the gradients.
    pub(super) total_loss: Tensor,
}

/// The model's inputs and the two maskings of the fixture's noise.
struct Inputs {
    input: ModelInput,
    image_mask: Masking,
    text_mask: Masking,
}

fn missing(what: &str) -> Error {
    Error::Fixture(what.into())
}

/// Checks every tensor of `m3ae_io.safetensors` against `model`.
pub(super) fn m3ae_io(
    out: &mut Vec<Check>,
    env: &Env,
    dir: &Path,
    fc: &FixtureConfig,
    model: &M3ae,
) -> Result<M3aeIo> {
    let cfg = model.config().clone();
    let mut io = FixtureFile::open(dir, "m3ae_io", env)?;
    let inputs = inputs(out, env, &mut io, fc, &cfg)?;
    let o = model.forward(
        &inputs.input,
        Some(&inputs.image_mask),
        Some(&inputs.text_mask),
    )?;
    check_forward(out, &mut io, &o)?;
    let losses = model.losses(&inputs.input, &o)?;
    scalar_check(out, &mut io, "loss.image", losses.image_loss.as_ref())?;
    scalar_check(out, &mut io, "loss.text", losses.text_loss.as_ref())?;
    scalar_check(out, &mut io, "loss.total", Some(&losses.total))?;
    scalar_check(out, &mut io, "acc.text", losses.text_accuracy.as_ref())?;
    io.check(
        out,
        "loss.text_valid_mask",
        losses
            .text_valid
            .as_ref()
            .ok_or_else(|| missing("no text valid mask"))?,
        Tolerance::Exact,
    );
    check_loss_variants(out, &mut io, model, &inputs.input, &o)?;
    check_text_only(out, env, &mut io, model, &inputs.input)?;
    check_representation(out, env, &mut io, model, &inputs.input)?;
    io.finish(out);
    Ok(M3aeIo {
        image_patches: inputs
            .input
            .image_patches
            .ok_or_else(|| missing("no image patches"))?,
        total_loss: losses.total,
    })
}

/// The patches, text and padding of the fixture, the padding pattern against `config.json`, and
/// the maskings of the fixture's noise.
fn inputs(
    out: &mut Vec<Check>,
    env: &Env,
    io: &mut FixtureFile,
    fc: &FixtureConfig,
    cfg: &M3aeConfig,
) -> Result<Inputs> {
    let dev = &env.dev;
    let image = io.get("input.image")?;
    let patches = patchify(&image, cfg.patch_size)?;
    io.check(out, "input.image_patches", &patches, Tolerance::FORWARD);
    let text = io.get("input.text")?.to_dtype(DType::U32)?;
    let pad = io.get("input.text_padding_mask")?;
    // The padding pattern must be the one config.json describes.
    let (b, t) = pad.dims2()?;
    if b != fc.batch || fc.n_pad.len() != b {
        return Err(Error::Fixture(format!(
            "config.json batch {} / n_pad {:?} do not match input.text_padding_mask {:?}",
            fc.batch,
            fc.n_pad,
            pad.dims()
        )));
    }
    let mut want = vec![0f32; b * t];
    for (i, &n) in fc.n_pad.iter().enumerate() {
        for j in t.saturating_sub(n)..t {
            want[i * t + j] = 1.0;
        }
    }
    out.push(compare(
        "config.json:n_pad (vs m3ae_io:input.text_padding_mask)",
        &pad,
        &Tensor::from_vec(want, (b, t), dev)?,
        Tolerance::Exact,
    ));
    let li = patches.dim(1)?;
    let im = Masking::new(&noise(io, "noise.image")?, b, cfg.image_keep(li), dev)?;
    let tm = Masking::new(&noise(io, "noise.text")?, b, cfg.text_keep(t), dev)?;
    check_masking(out, io, "mask.image", &im);
    check_masking(out, io, "mask.text", &tm);
    io.check(
        out,
        "mask.text_padding_mask_kept",
        &tm.keep_mask(&pad)?,
        Tolerance::Exact,
    );
    Ok(Inputs {
        input: ModelInput {
            image_patches: Some(patches),
            text_ids: Some(text),
            text_padding: Some(pad),
        },
        image_mask: im,
        text_mask: tm,
    })
}

/// The encoder and decoder traces and the two outputs of the masked forward pass.
fn check_forward(out: &mut Vec<Check>, io: &mut FixtureFile, o: &Output) -> Result<()> {
    let tr = &o.trace;
    io.check(out, "enc.input", &tr.enc_input, Tolerance::FORWARD);
    io.check(
        out,
        "enc.padding_mask",
        tr.enc_padding
            .as_ref()
            .ok_or_else(|| missing("no encoder padding"))?,
        Tolerance::Exact,
    );
    io.check(out, "enc.output", &tr.enc_output, Tolerance::FORWARD);
    io.check(out, "dec.input", &tr.dec_input, Tolerance::FORWARD);
    io.check(
        out,
        "dec.padding_mask",
        tr.dec_padding
            .as_ref()
            .ok_or_else(|| missing("no decoder padding"))?,
        Tolerance::Exact,
    );
    io.check(out, "dec.output", &tr.dec_output, Tolerance::FORWARD);
    io.check(
        out,
        "out.image",
        o.image.as_ref().ok_or_else(|| missing("no image output"))?,
        Tolerance::FORWARD,
    );
    io.check(
        out,
        "out.text_logits",
        o.text_logits
            .as_ref()
            .ok_or_else(|| missing("no text output"))?,
        Tolerance::FORWARD,
    );
    Ok(())
}

/// The same outputs under the masked-only and the all-token loss flags.
fn check_loss_variants(
    out: &mut Vec<Check>,
    io: &mut FixtureFile,
    model: &M3ae,
    input: &ModelInput,
    o: &Output,
) -> Result<()> {
    for (img_all, txt_all) in [(false, false), (true, true)] {
        let mut vcfg = model.config().clone();
        vcfg.image_all_token_loss = img_all;
        vcfg.text_all_token_loss = txt_all;
        let vmodel = M3ae::new(&vcfg, model.params().clone())?;
        let l = vmodel.losses(input, o)?;
        let (ik, tk) = if img_all {
            (
                "loss.variant.image_all_token",
                "loss.variant.text_all_token",
            )
        } else {
            (
                "loss.variant.image_masked_only",
                "loss.variant.text_masked_only",
            )
        };
        scalar_check(out, io, ik, l.image_loss.as_ref())?;
        scalar_check(out, io, tk, l.text_loss.as_ref())?;
        if txt_all {
            scalar_check(
                out,
                io,
                "acc.variant.text_all_token",
                l.text_accuracy.as_ref(),
            )?;
            io.check(
                out,
                "loss.variant.text_all_token_valid_mask",
                l.text_valid
                    .as_ref()
                    .ok_or_else(|| missing("no valid mask"))?,
                Tolerance::Exact,
            );
        }
    }
    Ok(())
}

/// The text-only (unpaired) path with its own masking.
fn check_text_only(
    out: &mut Vec<Check>,
    env: &Env,
    io: &mut FixtureFile,
    model: &M3ae,
    input: &ModelInput,
) -> Result<()> {
    let cfg = model.config();
    let text = input.text_ids.clone().ok_or_else(|| missing("no text"))?;
    let pad = input
        .text_padding
        .clone()
        .ok_or_else(|| missing("no text padding"))?;
    let (b, t) = pad.dims2()?;
    let ttm = Masking::new(&noise(io, "textonly.noise")?, b, cfg.text_keep(t), &env.dev)?;
    let tinput = ModelInput {
        image_patches: None,
        text_ids: Some(text),
        text_padding: Some(pad),
    };
    let to = model.forward(&tinput, None, Some(&ttm))?;
    io.check(
        out,
        "textonly.text_logits",
        to.text_logits
            .as_ref()
            .ok_or_else(|| missing("no text output"))?,
        Tolerance::FORWARD,
    );
    io.check(
        out,
        "textonly.text_mask",
        to.text_mask
            .as_ref()
            .ok_or_else(|| missing("no text mask"))?,
        Tolerance::Exact,
    );
    let tl = model.losses(&tinput, &to)?;
    scalar_check(out, io, "textonly.loss", tl.text_loss.as_ref())?;
    scalar_check(out, io, "textonly.acc", tl.text_accuracy.as_ref())?;
    Ok(())
}

/// The unmasked representation and the encoder and decoder position tables.
fn check_representation(
    out: &mut Vec<Check>,
    env: &Env,
    io: &mut FixtureFile,
    model: &M3ae,
    input: &ModelInput,
) -> Result<()> {
    let dev = &env.dev;
    let cfg = model.config();
    let repr = model.forward_representation(input)?;
    io.check(out, "m3ae_repr.output", &repr, Tolerance::FORWARD);
    let li = input
        .image_patches
        .as_ref()
        .ok_or_else(|| missing("no image patches"))?
        .dim(1)?;
    let t = input
        .text_padding
        .as_ref()
        .ok_or_else(|| missing("no text padding"))?
        .dim(1)?;
    let (d, dd) = (cfg.emb_dim, cfg.dec_emb_dim);
    io.check(
        out,
        "posemb.enc_image_2d",
        &posemb::sincos_2d(li, d, dev)?.squeeze(0)?,
        Tolerance::FORWARD,
    );
    io.check(
        out,
        "posemb.enc_text_1d",
        &posemb::sincos_1d(t, d, dev)?.squeeze(0)?,
        Tolerance::FORWARD,
    );
    io.check(
        out,
        "posemb.dec_image_2d",
        &posemb::sincos_2d(li, dd, dev)?.squeeze(0)?,
        Tolerance::FORWARD,
    );
    io.check(
        out,
        "posemb.dec_text_1d",
        &posemb::sincos_1d(t, dd, dev)?.squeeze(0)?,
        Tolerance::FORWARD,
    );
    Ok(())
}
