//! Models by name: the resolution of [`m3ae_official::pretrained`] (local checkpoints, runs,
//! converted folders, official `model.pkl` files and, with feature `hub`, Hugging Face
//! repository ids), re-exported here, and [`FromPretrained`] for the evaluation front end's
//! [`LoadedModel`] (an M3AE or an MAE, as the weights say).

pub use m3ae_official::pretrained::*;

use crate::evaluate::LoadedModel;
use candle_core::Device;
use m3ae_model::{M3ae, Mae, Variant};
use std::path::Path;

impl FromPretrained for LoadedModel {
    fn from_pretrained(
        name_or_path: impl AsRef<Path>,
        opts: &HubOptions,
        device: &Device,
    ) -> m3ae_official::Result<Self> {
        let (cfg, variant, store) = load_pretrained(name_or_path, opts, device)?;
        Ok(match variant {
            Variant::M3ae => LoadedModel::M3ae(M3ae::new(&cfg, store)?),
            Variant::Mae => LoadedModel::Mae(Mae::new(&cfg, store)?),
        })
    }
}
