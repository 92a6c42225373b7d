//! The M3AE model (image + text, image-only and text-only paths) and the image-only MAE baseline.
//!
//! Both share one private implementation (`Core`): MAE is the image half of M3AE with its own parameter
//! set ([`Variant::Mae`]). The encoder sees only kept tokens plus cls; the decoder restores the
//! full sequence with mask embeddings and predicts every position; losses select.
//!
//! The `*_with` methods take an `Option<&Stochastic>`: with a key they are training forwards
//! with the configuration's dropout, attention dropout and drop path (encoder and decoder
//! blocks; [`crate::stochastic`]); without one, or with rates of 0, they are the deterministic
//! forwards, bit for bit. Every other method is deterministic.

use crate::attention::{AttentionTrace, TraceLayers};
use crate::config::M3aeConfig;
use crate::device::Precision;
use crate::layers::{Dense, Head, Transformer};
use crate::loss::{cross_entropy_loss_and_accuracy, patch_mse_loss};
use crate::masking::Masking;
use crate::params::{param_specs, ParamSpec, ParamStore, Unexpected, Variant};
use crate::posemb::{sincos_1d, sincos_2d};
use crate::stochastic::{site, DropRates, Stochastic};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A collated batch as the model consumes it. Either modality may be absent.
#[derive(Debug, Clone, Default)]
pub struct ModelInput {
    /// `[B, Li, P*P*3]` f32 patches (see [`crate::patchify`]).
    pub image_patches: Option<Tensor>,
    /// `[B, T]` token ids (u32, or any integer dtype convertible to it).
    pub text_ids: Option<Tensor>,
    /// `[B, T]` f32, 1 = padding. Required with `text_ids`.
    pub text_padding: Option<Tensor>,
}

impl ModelInput {
    /// The same input with its tensors on `device` (a cheap clone when they are there already).
    /// The model moves its inputs to its weights' device by itself; this lets a loader copy a
    /// batch ahead of the step.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let mv = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
            Ok(t.as_ref().map(|t| t.to_device(device)).transpose()?)
        };
        Ok(Self {
            image_patches: mv(&self.image_patches)?,
            text_ids: mv(&self.text_ids)?,
            text_padding: mv(&self.text_padding)?,
        })
    }
}

/// Intermediate tensors of a forward pass (kept for parity checks and inspection; they exist
/// anyway, so keeping them costs nothing).
#[derive(Debug, Clone)]
pub struct Trace {
    /// `[B, 1+ki+kt, D]`: encoder transformer input.
    pub enc_input: Tensor,
    /// `[B, 1+ki+kt]`: key padding given to the encoder (`None` for MAE).
    pub enc_padding: Option<Tensor>,
    /// `[B, 1+ki+kt, D]`: encoder output after its final LayerNorm.
    pub enc_output: Tensor,
    /// `[B, 1+Li+T, Dd]`: decoder transformer input.
    pub dec_input: Tensor,
    /// `[B, 1+Li+T]`: key padding given to the decoder (`None` for MAE).
    pub dec_padding: Option<Tensor>,
    /// `[B, 1+Li+T, Dd]`: decoder output after its final LayerNorm.
    pub dec_output: Tensor,
}

/// Outputs of a masked forward pass.
#[derive(Debug, Clone)]
pub struct Output {
    /// `[B, Li, image_output_dim]` predictions at every image position.
    pub image: Option<Tensor>,
    /// `[B, T, V]` text logits at every position. `None` from [`M3ae::forward_train`] with
    /// fused kernels, whose losses never materialise the logits.
    pub text_logits: Option<Tensor>,
    /// `[B, T, Dh]` input of the text head's last projection (the logits are this times the
    /// projection); present whenever text was given.
    pub text_hidden: Option<Tensor>,
    /// `[B, Li]` 1 = masked image patch.
    pub image_mask: Option<Tensor>,
    /// `[B, T]` 1 = masked text token.
    pub text_mask: Option<Tensor>,
    /// Intermediates.
    pub trace: Trace,
}

/// Losses of one forward pass.
#[derive(Debug, Clone)]
pub struct Losses {
    /// Patch MSE (scalar), when an image was given.
    pub image_loss: Option<Tensor>,
    /// Text cross-entropy (scalar), when text was given.
    pub text_loss: Option<Tensor>,
    /// Text accuracy (scalar, no gradient).
    pub text_accuracy: Option<Tensor>,
    /// `[B, T]` the mask the text loss used (masked or all, and not padding).
    pub text_valid: Option<Tensor>,
    /// `image_loss_weight * image_loss + text_loss_weight * text_loss` over what is present.
    pub total: Tensor,
}

/// How a sequence representation is pooled into one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The cls token output (official default, `global_pool=False`).
    #[default]
    Cls,
    /// Mean of the non-cls token outputs (`global_pool=True`).
    Mean,
}

/// Pools a representation `[B, 1+N, D]` into `[B, D]`.
pub fn pool(repr: &Tensor, pooling: Pooling) -> Result<Tensor> {
    let n = repr.dim(1)?;
    Ok(match pooling {
        Pooling::Cls => repr.narrow(1, 0, 1)?.squeeze(1)?,
        Pooling::Mean => repr.narrow(1, 1, n - 1)?.mean(1)?,
    })
}

/// The unmasked image representation evaluation needs (linear probe, kNN, OOD).
pub trait Represent {
    /// `[B, Li, P*P*3]` patches -> `[B, 1+Li, D]` encoder output after its final LayerNorm.
    fn represent(&self, image_patches: &Tensor) -> Result<Tensor>;
    /// The configuration of the model.
    fn config(&self) -> &M3aeConfig;
}

/// Shared implementation of M3AE and MAE.
#[derive(Debug, Clone)]
struct Core {
    cfg: M3aeConfig,
    variant: Variant,
    params: ParamStore,
    cls: Tensor,
    image_embedding: Dense,
    text_embedding: Option<Tensor>,
    enc_image_type: Option<Tensor>,
    enc_text_type: Option<Tensor>,
    dec_image_type: Option<Tensor>,
    dec_text_type: Option<Tensor>,
    image_mask_token: Tensor,
    text_mask_token: Option<Tensor>,
    encoder: Transformer,
    input_projection: Dense,
    decoder: Transformer,
    image_head: Head,
    text_head: Option<Head>,
    precision: Precision,
}

fn add_opt(x: Tensor, t: &Option<Tensor>) -> Result<Tensor> {
    Ok(match t {
        Some(t) => x.broadcast_add(t)?,
        None => x,
    })
}

impl Core {
    fn new(cfg: &M3aeConfig, variant: Variant, params: ParamStore) -> Result<Self> {
        let text = variant == Variant::M3ae;
        cfg.validate(text)?;
        let cfg = cfg.resolved();
        // Every spec must be present with its shape; the store may not hold extra weights.
        let specs = param_specs(&cfg, variant);
        check_store(&specs, &params)?;
        let p = &params;
        let opt = |name: &str, cond: bool| -> Result<Option<Tensor>> {
            if cond {
                Ok(Some(p.get(name)?))
            } else {
                Ok(None)
            }
        };
        let te = cfg.use_type_embedding;
        let kp = cfg.kernels;
        Ok(Self {
            cls: p.get("cls_token")?,
            image_embedding: Dense::new(p, "image_embedding", kp)?,
            text_embedding: opt("text_embedding.weight", text)?,
            enc_image_type: opt("encoder.image_type_embedding", te)?,
            enc_text_type: opt("encoder.text_type_embedding", te && text)?,
            dec_image_type: opt("decoder.image_type_embedding", te)?,
            dec_text_type: opt("decoder.text_type_embedding", te && text)?,
            image_mask_token: p.get("decoder.image_mask_embedding")?,
            text_mask_token: opt("decoder.text_mask_embedding", text)?,
            encoder: Transformer::new(p, "encoder", cfg.depth, cfg.num_heads, kp)?
                .with_rates(DropRates::of(&cfg)),
            input_projection: Dense::new(p, "decoder.input_projection", kp)?,
            decoder: Transformer::new(p, "decoder", cfg.dec_depth, cfg.dec_num_heads, kp)?
                .with_rates(DropRates::of(&cfg)),
            image_head: Head::new(p, "decoder.image_head", cfg.output_head_depth, kp)?,
            text_head: if text {
                Some(Head::new(
                    p,
                    "decoder.text_head",
                    cfg.output_head_depth,
                    kp,
                )?)
            } else {
                None
            },
            cfg,
            variant,
            params,
            precision: Precision::F32,
        })
    }

    /// Every dense layer at `precision` (see [`crate::layers`]).
    fn with_precision(mut self, precision: Precision) -> Self {
        self.image_embedding = self.image_embedding.with_precision(precision);
        self.encoder = self.encoder.with_precision(precision);
        self.input_projection = self.input_projection.with_precision(precision);
        self.decoder = self.decoder.with_precision(precision);
        self.image_head = self.image_head.with_precision(precision);
        self.text_head = self.text_head.map(|h| h.with_precision(precision));
        self.precision = precision;
        self
    }

    fn device(&self) -> &Device {
        self.params.device()
    }

    /// `[B, Li, P*P*3]` -> `[B, Li, D]` with 2-D position and type embeddings.
    fn embed_image(&self, patches: &Tensor) -> Result<Tensor> {
        let (_, li, pd) = patches.dims3()?;
        if pd != self.cfg.patch_dim() {
            return Err(Error::Shape(format!(
                "image patches have dim {pd}, the model expects P*P*3 = {}",
                self.cfg.patch_dim()
            )));
        }
        let x = self.image_embedding.forward(patches)?;
        let x = x.broadcast_add(&sincos_2d(li, self.cfg.emb_dim, self.device())?)?;
        add_opt(x, &self.enc_image_type)
    }

    /// `[B, T]` ids -> `[B, T, D]` with 1-D position and type embeddings.
    fn embed_text(&self, ids: &Tensor) -> Result<Tensor> {
        let table = self
            .text_embedding
            .as_ref()
            .ok_or_else(|| Error::Shape("this model has no text embedding".into()))?;
        let (b, t) = ids.dims2()?;
        let ids = ids.to_dtype(DType::U32)?;
        let max = ids.max_all()?.to_scalar::<u32>()? as usize;
        if max >= self.cfg.text_vocab_size {
            return Err(Error::Shape(format!(
                "token id {max} is outside the vocabulary of {} tokens",
                self.cfg.text_vocab_size
            )));
        }
        let x = table
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.emb_dim))?;
        let x = x.broadcast_add(&sincos_1d(t, self.cfg.emb_dim, self.device())?)?;
        add_opt(x, &self.enc_text_type)
    }

    fn batch_of(input: &ModelInput) -> Result<usize> {
        match (&input.image_patches, &input.text_ids) {
            (Some(i), _) => Ok(i.dim(0)?),
            (None, Some(t)) => Ok(t.dim(0)?),
            (None, None) => Err(Error::Shape("the input has neither image nor text".into())),
        }
    }

    fn text_padding<'a>(input: &'a ModelInput, ids: &Tensor) -> Result<&'a Tensor> {
        let pad = input
            .text_padding
            .as_ref()
            .ok_or_else(|| Error::Shape("text_ids given without text_padding".into()))?;
        if pad.dims() != ids.dims() {
            return Err(Error::Shape(format!(
                "text_padding {:?} does not match text_ids {:?}",
                pad.dims(),
                ids.dims()
            )));
        }
        Ok(pad)
    }

    fn forward(
        &self,
        input: &ModelInput,
        image_masking: Option<&Masking>,
        text_masking: Option<&Masking>,
        text_logits: bool,
        st: Option<&Stochastic>,
    ) -> Result<Output> {
        // inputs and maskings built on the host (a loader's batch) move to the weights'
        // device here (a clone when they are there already)
        let input = &input.to_device(self.device())?;
        let on_device = |m: Option<&Masking>| m.map(|m| m.to_device(self.device())).transpose();
        let (image_masking, text_masking) = (on_device(image_masking)?, on_device(text_masking)?);
        let (image_masking, text_masking) = (image_masking.as_ref(), text_masking.as_ref());
        let b = Self::batch_of(input)?;
        let dev = self.device().clone();
        let with_padding = self.variant == Variant::M3ae;
        let d = self.cfg.emb_dim;
        let mut tokens = vec![self.cls.broadcast_as((b, 1, d))?];
        let mut pads = vec![Tensor::zeros((b, 1), DType::F32, &dev)?];
        let mut image = None;
        if let Some(patches) = &input.image_patches {
            let m = image_masking
                .ok_or_else(|| Error::Shape("an image was given without its masking".into()))?;
            let li = patches.dim(1)?;
            self.check_keep("image", m, li, self.cfg.image_keep(li))?;
            tokens.push(m.keep_tokens(&self.embed_image(patches)?)?);
            pads.push(Tensor::zeros((b, m.keep), DType::F32, &dev)?);
            image = Some((m, li));
        }
        let mut text = None;
        if let Some(ids) = &input.text_ids {
            if self.variant == Variant::Mae {
                return Err(Error::Shape("the MAE model takes no text".into()));
            }
            let m = text_masking
                .ok_or_else(|| Error::Shape("text was given without its masking".into()))?;
            let pad = Self::text_padding(input, ids)?.to_dtype(DType::F32)?;
            let t = ids.dim(1)?;
            self.check_keep("text", m, t, self.cfg.text_keep(t))?;
            tokens.push(m.keep_tokens(&self.embed_text(ids)?)?);
            pads.push(m.keep_mask(&pad)?);
            text = Some((m, t, pad));
        }
        let enc_input = Tensor::cat(&tokens, 1)?;
        let enc_padding = if with_padding {
            Some(Tensor::cat(&pads, 1)?)
        } else {
            None
        };
        let enc_st = st.map(|s| s.fork(site::ENCODER));
        let enc_output =
            self.encoder
                .forward_with(&enc_input, enc_padding.as_ref(), enc_st.as_ref())?;

        // Decoder: project everything once, then restore each modality to its original order.
        let dd = self.cfg.dec_emb_dim;
        let y = self.input_projection.forward(&enc_output)?;
        let mut dec_tokens = vec![y.narrow(1, 0, 1)?];
        let mut dec_pads = vec![Tensor::zeros((b, 1), DType::F32, &dev)?];
        let mut offset = 1;
        if let Some((m, li)) = image {
            let kept = y.narrow(1, offset, m.keep)?;
            offset += m.keep;
            let x = m.restore_tokens(&kept, &self.image_mask_token)?;
            let x = x.broadcast_add(&sincos_2d(li, dd, &dev)?)?;
            dec_tokens.push(add_opt(x, &self.dec_image_type)?);
            dec_pads.push(Tensor::zeros((b, li), DType::F32, &dev)?);
        }
        if let Some((m, t, pad)) = &text {
            let kept = y.narrow(1, offset, m.keep)?;
            let mask_token = self
                .text_mask_token
                .as_ref()
                .expect("M3AE has a text mask token");
            let x = m.restore_tokens(&kept, mask_token)?;
            let x = x.broadcast_add(&sincos_1d(*t, dd, &dev)?)?;
            dec_tokens.push(add_opt(x, &self.dec_text_type)?);
            dec_pads.push(pad.clone());
        }
        let dec_input = Tensor::cat(&dec_tokens, 1)?;
        let dec_padding = if with_padding {
            Some(Tensor::cat(&dec_pads, 1)?)
        } else {
            None
        };
        let dec_st = st.map(|s| s.fork(site::DECODER));
        let dec_output =
            self.decoder
                .forward_with(&dec_input, dec_padding.as_ref(), dec_st.as_ref())?;
        let mut offset = 1;
        let image_out = match image {
            Some((_, li)) => {
                let o = self
                    .image_head
                    .forward(&dec_output.narrow(1, offset, li)?)?;
                offset += li;
                Some(o)
            }
            None => None,
        };
        let (text_hidden, text_out) = match &text {
            Some((_, t, _)) => {
                let head = self.text_head.as_ref().expect("M3AE has a text head");
                let hidden = head.forward_hidden(&dec_output.narrow(1, offset, *t)?)?;
                let logits = if text_logits {
                    Some(head.out().forward(&hidden)?)
                } else {
                    None
                };
                (Some(hidden), logits)
            }
            None => (None, None),
        };
        Ok(Output {
            image: image_out,
            text_logits: text_out,
            text_hidden,
            image_mask: image.map(|(m, _)| m.mask.clone()),
            text_mask: text.as_ref().map(|(m, _, _)| m.mask.clone()),
            trace: Trace {
                enc_input,
                enc_padding,
                enc_output,
                dec_input,
                dec_padding,
                dec_output,
            },
        })
    }

    fn check_keep(&self, what: &str, m: &Masking, len: usize, keep: usize) -> Result<()> {
        if m.len != len || m.keep != keep {
            return Err(Error::Shape(format!(
                "{what} masking keeps {} of {} tokens, the config needs {keep} of {len}",
                m.keep, m.len
            )));
        }
        Ok(())
    }

    fn represent(&self, input: &ModelInput, st: Option<&Stochastic>) -> Result<Tensor> {
        let (x, pad) = self.encoder_input(input)?;
        let st = st.map(|s| s.fork(site::ENCODER));
        self.encoder.forward_with(&x, pad.as_ref(), st.as_ref())
    }

    /// [`Core::represent`] recording the attention of the blocks `layers` names.
    fn represent_traced(&self, input: &ModelInput, layers: &TraceLayers) -> Result<AttentionTrace> {
        let (x, pad) = self.encoder_input(input)?;
        let depth = self.encoder.depth();
        let (representation, attention) = self
            .encoder
            .forward_traced(&x, pad.as_ref(), |i| layers.records(i, depth))?;
        Ok(AttentionTrace {
            representation,
            key_padding: pad,
            attention,
        })
    }

    /// The unmasked encoder input `[B, 1+Li+T, D]` (cls, embedded patches, embedded text) and
    /// its key padding `[B, 1+Li+T]` (`None` without text).
    fn encoder_input(&self, input: &ModelInput) -> Result<(Tensor, Option<Tensor>)> {
        let input = &input.to_device(self.device())?;
        let b = Self::batch_of(input)?;
        let dev = self.device().clone();
        let d = self.cfg.emb_dim;
        let mut tokens = vec![self.cls.broadcast_as((b, 1, d))?];
        let mut pads = vec![Tensor::zeros((b, 1), DType::F32, &dev)?];
        if let Some(p) = &input.image_patches {
            tokens.push(self.embed_image(p)?);
            pads.push(Tensor::zeros((b, p.dim(1)?), DType::F32, &dev)?);
        }
        let mut has_text = false;
        if let Some(ids) = &input.text_ids {
            let pad = Self::text_padding(input, ids)?.to_dtype(DType::F32)?;
            tokens.push(self.embed_text(ids)?);
            pads.push(pad);
            has_text = true;
        }
        let x = Tensor::cat(&tokens, 1)?;
        let pad = if has_text {
            Some(Tensor::cat(&pads, 1)?)
        } else {
            None
        };
        Ok((x, pad))
    }

    fn losses(&self, input: &ModelInput, out: &Output) -> Result<Losses> {
        let input = &input.to_device(self.device())?;
        let mut total: Option<Tensor> = None;
        let mut add = |t: &Tensor, w: f64| -> Result<()> {
            let wt = (t * w)?;
            total = Some(match total.take() {
                Some(acc) => (acc + wt)?,
                None => wt,
            });
            Ok(())
        };
        let mut image_loss = None;
        if let (Some(pred), Some(target), Some(mask)) =
            (&out.image, &input.image_patches, &out.image_mask)
        {
            let valid = if self.cfg.image_all_token_loss {
                mask.ones_like()?
            } else {
                mask.clone()
            };
            let target = crate::loss::patch_target(target, self.cfg.image_target)?;
            let l = patch_mse_loss(pred, &target, &valid)?;
            add(&l, self.cfg.image_loss_weight)?;
            image_loss = Some(l);
        }
        let (mut text_loss, mut text_accuracy, mut text_valid) = (None, None, None);
        let text_out = out.text_logits.as_ref().or(out.text_hidden.as_ref());
        if let (Some(text_out), Some(ids), Some(mask)) = (text_out, &input.text_ids, &out.text_mask)
        {
            let pad = Self::text_padding(input, ids)?.to_dtype(DType::F32)?;
            let selected = if self.cfg.text_all_token_loss {
                mask.ones_like()?
            } else {
                mask.clone()
            };
            let valid = (selected * (1.0 - pad)?)?;
            let (l, a) = match &out.text_logits {
                Some(logits) => cross_entropy_loss_and_accuracy(logits, ids, &valid)?,
                None => self.text_head_loss(text_out, ids, &valid)?,
            };
            add(&l, self.cfg.text_loss_weight)?;
            text_loss = Some(l);
            text_accuracy = Some(a);
            text_valid = Some(valid);
        }
        Ok(Losses {
            image_loss,
            text_loss,
            text_accuracy,
            text_valid,
            total: total.ok_or_else(|| Error::Shape("no modality to compute a loss on".into()))?,
        })
    }
}

impl Core {
    /// The text loss and accuracy from the text head's hidden input `[B, T, Dh]` without the
    /// logits: the same per-sample averaging as [`cross_entropy_loss_and_accuracy`], expressed
    /// as row weights `valid / max(sum_t valid, 1e-5) / B` of one weighted cross-entropy over
    /// the `B T` rows, computed by [`m3ae_kernels::text_head_loss`] on the config's kernel path.
    fn text_head_loss(
        &self,
        hidden: &Tensor,
        ids: &Tensor,
        valid: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (b, t, dh) = hidden.dims3()?;
        if ids.dims() != [b, t] || valid.dims() != [b, t] {
            return Err(Error::Shape(format!(
                "text loss: hidden {:?}, tokens {:?}, valid {:?}",
                hidden.dims(),
                ids.dims(),
                valid.dims()
            )));
        }
        let head = self.text_head.as_ref().expect("M3AE has a text head");
        let count = valid.sum_keepdim(1)?.maximum(1e-5)?;
        let weights = (valid.broadcast_div(&count)? / b as f64)?
            .detach()
            .flatten_all()?;
        Ok(self.cfg.kernels.text_head_loss(
            &hidden.reshape((b * t, dh))?,
            head.out().weight(),
            head.out().bias(),
            &ids.to_dtype(DType::U32)?.flatten_all()?,
            &weights,
        )?)
    }
}

impl Core {
    /// See [`M3ae::predict_text`].
    fn predict_text(
        &self,
        out: &Output,
        positions: &[(usize, usize)],
        k: usize,
    ) -> Result<m3ae_kernels::TextTopK> {
        let hidden = out
            .text_hidden
            .as_ref()
            .ok_or_else(|| Error::Shape("predict_text: the forward pass had no text".into()))?;
        let (b, t, dh) = hidden.dims3()?;
        let rows = positions
            .iter()
            .map(|&(i, j)| {
                if i < b && j < t {
                    Ok(i * t + j)
                } else {
                    Err(Error::Shape(format!(
                        "predict_text: position ({i}, {j}) is outside the text of {b} x {t}"
                    )))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let head = self.text_head.as_ref().expect("M3AE has a text head");
        Ok(self.cfg.kernels.text_head_top_k(
            &hidden.reshape((b * t, dh))?,
            head.out().weight(),
            Some(head.out().bias()),
            &rows,
            k,
        )?)
    }
}

pub(crate) fn check_store(specs: &[ParamSpec], store: &ParamStore) -> Result<()> {
    for s in specs {
        let t = store.get(&s.name)?;
        if t.dims() != s.shape.as_slice() {
            return Err(Error::WeightShape {
                name: s.name.clone(),
                expected: s.shape.clone(),
                got: t.dims().to_vec(),
                origin: "parameter store".into(),
            });
        }
    }
    if store.len() != specs.len() {
        let known: std::collections::HashSet<&str> =
            specs.iter().map(|s| s.name.as_str()).collect();
        if let Some((name, _)) = store.vars().find(|(n, _)| !known.contains(n)) {
            return Err(Error::UnexpectedWeight {
                name: name.into(),
                origin: "parameter store".into(),
            });
        }
    }
    Ok(())
}

macro_rules! model_common {
    ($ty:ident, $variant:expr) => {
        impl $ty {
            /// Builds the model from `params`; the config is validated (errors name the field)
            /// and every weight is checked by name and shape.
            pub fn new(cfg: &M3aeConfig, params: ParamStore) -> Result<Self> {
                Ok(Self(Core::new(cfg, $variant, params)?))
            }

            /// A freshly initialised model (official initialisers) drawn from `seed`.
            pub fn init(cfg: &M3aeConfig, seed: u64, device: &Device) -> Result<Self> {
                cfg.validate($variant == Variant::M3ae)?;
                let specs = Self::specs(cfg);
                Self::new(cfg, ParamStore::init(&specs, seed, device)?)
            }

            /// Loads from official (Flax-named) tensors, e.g. a fixture or converted checkpoint.
            pub fn from_official(
                cfg: &M3aeConfig,
                tensors: HashMap<String, Tensor>,
                unexpected: Unexpected,
                source: &str,
                device: &Device,
            ) -> Result<Self> {
                cfg.validate($variant == Variant::M3ae)?;
                let specs = Self::specs(cfg);
                Self::new(
                    cfg,
                    ParamStore::from_official(&specs, tensors, unexpected, source, device)?,
                )
            }

            /// Every weight of this model for `cfg`.
            pub fn specs(cfg: &M3aeConfig) -> Vec<ParamSpec> {
                param_specs(cfg, $variant)
            }

            /// The trainable weights.
            pub fn params(&self) -> &ParamStore {
                &self.0.params
            }

            /// The resolved configuration.
            pub fn config(&self) -> &M3aeConfig {
                &self.0.cfg
            }

            /// The model with its dense layers' matmuls at `precision` (the same weights;
            /// see [`crate::layers`] for what bf16 changes). Training on CUDA uses this for
            /// `train.precision = "bf16"`.
            pub fn with_precision(self, precision: Precision) -> Self {
                Self(self.0.with_precision(precision))
            }

            /// The precision of the dense layers' matmuls.
            pub fn precision(&self) -> Precision {
                self.0.precision
            }
        }

        impl Represent for $ty {
            fn represent(&self, image_patches: &Tensor) -> Result<Tensor> {
                self.0.represent(
                    &ModelInput {
                        image_patches: Some(image_patches.clone()),
                        ..Default::default()
                    },
                    None,
                )
            }
            fn config(&self) -> &M3aeConfig {
                &self.0.cfg
            }
        }
    };
}

/// The multimodal masked autoencoder (`MaskedMultimodalAutoencoder`).
#[derive(Debug, Clone)]
pub struct M3ae(Core);

model_common!(M3ae, Variant::M3ae);

impl M3ae {
    /// Masked forward pass. Each present modality needs its masking (built from noise with the
    /// config's keep length). Image-only, text-only (unpaired text) and paired inputs all work.
    pub fn forward(
        &self,
        input: &ModelInput,
        image_masking: Option<&Masking>,
        text_masking: Option<&Masking>,
    ) -> Result<Output> {
        self.0
            .forward(input, image_masking, text_masking, true, None)
    }

    /// [`M3ae::forward`] in training mode when `stochastic` is given: the configuration's
    /// dropout, attention dropout and drop path in the encoder and decoder blocks, drawn from
    /// the key (see [`crate::stochastic`]). `None`, or rates of 0: [`M3ae::forward`], bit for
    /// bit.
    pub fn forward_with(
        &self,
        input: &ModelInput,
        image_masking: Option<&Masking>,
        text_masking: Option<&Masking>,
        stochastic: Option<&Stochastic>,
    ) -> Result<Output> {
        self.0
            .forward(input, image_masking, text_masking, true, stochastic)
    }

    /// Masked forward pass for training: as [`M3ae::forward`], except that with
    /// [`m3ae_kernels::KernelPath::Fused`] kernels the text logits are not computed
    /// (`text_logits` is `None`, `text_hidden` is set) and [`M3ae::losses`] computes the text
    /// loss with the fused text-head op, so the `B x T x V` logits never exist. With reference
    /// kernels it is [`M3ae::forward`]. Use [`M3ae::forward`] where the logits are needed
    /// (predicted words, parity checks).
    pub fn forward_train(
        &self,
        input: &ModelInput,
        image_masking: Option<&Masking>,
        text_masking: Option<&Masking>,
    ) -> Result<Output> {
        self.forward_train_with(input, image_masking, text_masking, None)
    }

    /// [`M3ae::forward_train`] in training mode when `stochastic` is given (dropout, attention
    /// dropout and drop path as [`M3ae::forward_with`]); what the trainer's objective runs.
    pub fn forward_train_with(
        &self,
        input: &ModelInput,
        image_masking: Option<&Masking>,
        text_masking: Option<&Masking>,
        stochastic: Option<&Stochastic>,
    ) -> Result<Output> {
        let logits = self.0.cfg.kernels != m3ae_kernels::KernelPath::Fused;
        self.0
            .forward(input, image_masking, text_masking, logits, stochastic)
    }

    /// Losses of a forward pass (weights and all-token flags from the config). The text loss
    /// comes from `out.text_logits` when present (log-softmax and gather, as the official code),
    /// otherwise from `out.text_hidden` through the fused text-head op ([`M3ae::forward_train`]).
    pub fn losses(&self, input: &ModelInput, out: &Output) -> Result<Losses> {
        self.0.losses(input, out)
    }

    /// The `k` best words (ids and logits, best first) at the text `positions` `(sample, index)`
    /// of a forward pass, from its `text_hidden` ([`M3ae::forward_train`] or [`M3ae::forward`]),
    /// one list per position in order. Only those positions are multiplied by the text head's
    /// last projection ([`m3ae_kernels::text_head_top_k`] on the config's kernel path), so the
    /// `B x T x V` logits are never built; the first id is the argmax the logits of
    /// [`M3ae::forward`] give (ties to the lower id; a NaN logit never wins over a number).
    pub fn predict_text(
        &self,
        out: &Output,
        positions: &[(usize, usize)],
        k: usize,
    ) -> Result<m3ae_kernels::TextTopK> {
        self.0.predict_text(out, positions, k)
    }

    /// Unmasked representation `[B, 1+Li+T, D]` after the encoder's final LayerNorm; text padding
    /// keys are masked.
    pub fn forward_representation(&self, input: &ModelInput) -> Result<Tensor> {
        self.0.represent(input, None)
    }

    /// [`M3ae::forward_representation`] in training mode when `stochastic` is given (the
    /// encoder's dropout, attention dropout and drop path; fine-tuning). `None`, or rates of 0:
    /// [`M3ae::forward_representation`], bit for bit.
    pub fn forward_representation_with(
        &self,
        input: &ModelInput,
        stochastic: Option<&Stochastic>,
    ) -> Result<Tensor> {
        self.0.represent(input, stochastic)
    }

    /// [`M3ae::forward_representation`] that also records the attention probabilities of the
    /// encoder blocks `layers` names (see [`AttentionTrace`]); the representation is the
    /// untraced one.
    pub fn forward_representation_traced(
        &self,
        input: &ModelInput,
        layers: &TraceLayers,
    ) -> Result<AttentionTrace> {
        self.0.represent_traced(input, layers)
    }

    /// Attention of the cls token in the last encoder block, averaged over heads, for the first
    /// sample of the unmasked input: `[1 + Li]`, or `[1 + Li + T]` over (cls, patches, text
    /// tokens) with `text` = `(ids [B, T], padding [B, T])` (padding tokens get 0). See
    /// [`AttentionTrace::cls_attention`].
    pub fn cls_attention(
        &self,
        image_patches: &Tensor,
        text: Option<(&Tensor, &Tensor)>,
    ) -> Result<Vec<f32>> {
        let first = |t: &Tensor| t.narrow(0, 0, 1);
        let input = ModelInput {
            image_patches: Some(first(image_patches)?),
            text_ids: text.map(|(ids, _)| first(ids)).transpose()?,
            text_padding: text.map(|(_, pad)| first(pad)).transpose()?,
        };
        let trace = self.forward_representation_traced(&input, &TraceLayers::Last)?;
        trace.cls_attention(self.0.cfg.depth - 1, 0)
    }
}

/// The image-only masked autoencoder baseline (`MaskedAutoencoder`).
#[derive(Debug, Clone)]
pub struct Mae(Core);

model_common!(Mae, Variant::Mae);

impl Mae {
    /// Masked forward pass on `[B, Li, P*P*3]` patches.
    pub fn forward(&self, image_patches: &Tensor, masking: &Masking) -> Result<Output> {
        self.forward_with(image_patches, masking, None)
    }

    /// [`Mae::forward`] in training mode when `stochastic` is given (dropout, attention dropout
    /// and drop path as [`M3ae::forward_with`]). `None`, or rates of 0: [`Mae::forward`], bit
    /// for bit.
    pub fn forward_with(
        &self,
        image_patches: &Tensor,
        masking: &Masking,
        stochastic: Option<&Stochastic>,
    ) -> Result<Output> {
        self.0.forward(
            &ModelInput {
                image_patches: Some(image_patches.clone()),
                ..Default::default()
            },
            Some(masking),
            None,
            true,
            stochastic,
        )
    }

    /// Patch MSE of a forward pass (masked patches, or all with `image_all_token_loss`).
    pub fn losses(&self, image_patches: &Tensor, out: &Output) -> Result<Losses> {
        self.0.losses(
            &ModelInput {
                image_patches: Some(image_patches.clone()),
                ..Default::default()
            },
            out,
        )
    }

    /// Unmasked representation `[B, 1+Li, D]` after the encoder's final LayerNorm.
    pub fn forward_representation(&self, image_patches: &Tensor) -> Result<Tensor> {
        self.represent(image_patches)
    }

    /// [`Mae::forward_representation`] in training mode when `stochastic` is given (the
    /// encoder's dropout, attention dropout and drop path; fine-tuning). `None`, or rates of 0:
    /// [`Mae::forward_representation`], bit for bit.
    pub fn forward_representation_with(
        &self,
        image_patches: &Tensor,
        stochastic: Option<&Stochastic>,
    ) -> Result<Tensor> {
        self.0.represent(
            &ModelInput {
                image_patches: Some(image_patches.clone()),
                ..Default::default()
            },
            stochastic,
        )
    }

    /// [`Mae::forward_representation`] that also records the attention probabilities of the
    /// encoder blocks `layers` names (see [`AttentionTrace`]); the representation is the
    /// untraced one.
    pub fn forward_representation_traced(
        &self,
        image_patches: &Tensor,
        layers: &TraceLayers,
    ) -> Result<AttentionTrace> {
        self.0.represent_traced(
            &ModelInput {
                image_patches: Some(image_patches.clone()),
                ..Default::default()
            },
            layers,
        )
    }

    /// Attention of the cls token in the last encoder block, averaged over heads, for the first
    /// sample: `[1 + Li]` over (cls, patches). See [`AttentionTrace::cls_attention`].
    pub fn cls_attention(&self, image_patches: &Tensor) -> Result<Vec<f32>> {
        let trace = self
            .forward_representation_traced(&image_patches.narrow(0, 0, 1)?, &TraceLayers::Last)?;
        trace.cls_attention(self.0.cfg.depth - 1, 0)
    }
}
