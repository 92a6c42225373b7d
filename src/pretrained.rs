//! Models by name: the resolution of [`m3ae_official::pretrained`] (local checkpoints, runs,
//! converted folders, official `model.pkl` files and, with feature `hub`, Hugging Face
//! repository ids), re-exported here. [`FromPretrained`] loads an [`m3ae_model::M3ae`], an
//! [`m3ae_model::Mae`] or, whichever the weights hold, an [`m3ae_model::AnyModel`].

pub use m3ae_official::pretrained::*;
