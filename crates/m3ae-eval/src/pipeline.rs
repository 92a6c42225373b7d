//! The high-level inference API: a model by name with everything needed to use it, in the
//! spirit of open_clip's `create_model_and_transforms` and Hugging Face pipelines.
//!
//! [`Pipeline::from_pretrained`] takes what `--checkpoint` takes (a checkpoint `step-*`, a run
//! directory, a converted folder, a `model.safetensors`, an official `model.pkl` or, with the
//! `hub` feature, a Hugging Face repository id) and builds the model with its configuration, the
//! official evaluation transform (resize, centre crop, normalisation) and, when a caption first
//! needs it, the tokenizer (given in [`PipelineOptions::tokenizer`] or found next to the
//! checkpoint). [`Pipeline::random_init`] gives the random baseline of a preset.
//!
//! Then, without building patches, masks, token ids or padding by hand:
//! * [`Pipeline::embed_images`]: pooled image features `[N, D]` of image files or decoded images,
//!   batched (cls pooling by default, as `m3ae embed`);
//! * [`Pipeline::embed_pairs`]: pooled joint features of image-caption pairs (M3AE);
//! * [`Pipeline::embed_dataset`]: features of a whole data set with labels (`m3ae embed`);
//! * [`Pipeline::reconstruct`]: masked reconstruction, predicted words and cls attention
//!   (`m3ae reconstruct`; write it with [`crate::panels`]);
//! * [`Pipeline::predict_masked_words`]: the words the model fills in for a masked caption.
//!
//! ```
//! use m3ae_data::RgbImage;
//! use m3ae_eval::Pipeline;
//! let pipe = Pipeline::random_init("tiny", 0, false)?;
//! let grey = RgbImage { width: 48, height: 40, data: vec![128; 48 * 40 * 3] };
//! let red = RgbImage { width: 32, height: 32, data: [255, 0, 0].repeat(32 * 32) };
//! let feats = pipe.embed_images(&[grey.clone(), red, grey])?;
//! let d = pipe.config().emb_dim;
//! assert_eq!(feats.dims(), &[3, d]);
//! // the same image gives the same features, whatever batch it is in
//! let rows = feats.to_vec2::<f32>()?;
//! assert_eq!(rows[0], rows[2]);
//! assert_ne!(rows[0], rows[1]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::cache::extract_cached_as;
use crate::error::{Error, Result};
use crate::features::{eval_image_config, extract_features, DataOptions, DataSpec, FeatureSet};
use crate::reconstruct::{reconstruct, Reconstruction};
use crate::source::{find_tokenizer_and_source, read_image, ModelSource};
use candle_core::{DType, Device, Tensor};
use m3ae_data::{HubOptions, Normalization, RgbImage, Tokenizer};
use m3ae_model::{pool, AnyModel, DeviceSpec, M3aeConfig, ModelInput, Pooling};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// An image the pipeline can take: a decoded [`RgbImage`] or the path of a JPEG, PNG or WebP
/// file (read when used; errors name it).
pub trait ImageInput {
    /// The decoded image.
    fn rgb(&self) -> Result<Cow<'_, RgbImage>>;
}

impl ImageInput for RgbImage {
    fn rgb(&self) -> Result<Cow<'_, RgbImage>> {
        Ok(Cow::Borrowed(self))
    }
}

impl ImageInput for Path {
    fn rgb(&self) -> Result<Cow<'_, RgbImage>> {
        Ok(Cow::Owned(read_image(self)?))
    }
}

impl ImageInput for PathBuf {
    fn rgb(&self) -> Result<Cow<'_, RgbImage>> {
        self.as_path().rgb()
    }
}

impl ImageInput for str {
    fn rgb(&self) -> Result<Cow<'_, RgbImage>> {
        Path::new(self).rgb()
    }
}

impl ImageInput for String {
    fn rgb(&self) -> Result<Cow<'_, RgbImage>> {
        Path::new(self).rgb()
    }
}

impl<T: ImageInput + ?Sized> ImageInput for &T {
    fn rgb(&self) -> Result<Cow<'_, RgbImage>> {
        (**self).rgb()
    }
}

/// How a [`Pipeline`] loads and runs its model.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineOptions {
    /// The tokenizer: a `tokenizer.json`, a folder holding one or (feature `hub`) a repository
    /// id; `None`: the `tokenizer.json` next to the checkpoint, in its parent or in the run
    /// directory (see [`crate::find_tokenizer`]).
    pub tokenizer: Option<PathBuf>,
    /// How Hugging Face repository ids are looked up (models and tokenizers).
    pub hub: HubOptions,
    /// Pixel normalisation of the evaluation transform.
    pub normalization: Normalization,
    /// Pooling of the embeddings: the cls token (default) or the mean of the other tokens.
    pub pooling: Pooling,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Seed of the masks of [`Pipeline::reconstruct`] and [`Pipeline::predict_masked_words`].
    pub mask_seed: u64,
    /// Where the model runs (`cpu`, `cuda:N`); inputs are prepared on the host and copied,
    /// features and reconstructions come back to the host.
    pub device: DeviceSpec,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        Self {
            tokenizer: None,
            hub: HubOptions::default(),
            normalization: Normalization::Cc12m,
            pooling: Pooling::Cls,
            batch_size: 256,
            mask_seed: 0,
            device: DeviceSpec::Cpu,
        }
    }
}

/// A model (M3AE or MAE) with its evaluation transform and tokenizer; see the module docs.
/// The model runs on [`PipelineOptions::device`]; what it returns is on the host.
pub struct Pipeline {
    model: AnyModel,
    source: ModelSource,
    resolved: Option<PathBuf>,
    opts: PipelineOptions,
    /// Loaded when a caption first needs it: a model used on images only needs none.
    tokenizer: OnceLock<(Tokenizer, String)>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("model", &self.source.describe())
            .field("variant", &self.model.variant())
            .field("resolved", &self.resolved)
            .field("tokenizer", &self.tokenizer.get().map(|t| &t.1))
            .field("opts", &self.opts)
            .finish()
    }
}

impl Pipeline {
    /// The model `name_or_path` stands for (see the module docs), M3AE or MAE as its weights
    /// say.
    pub fn from_pretrained(name_or_path: impl AsRef<Path>, opts: &PipelineOptions) -> Result<Self> {
        Self::load(
            &ModelSource::Checkpoint(name_or_path.as_ref().to_path_buf()),
            opts,
        )
    }

    /// A randomly initialised `preset` (M3AE, or the image-only MAE with `mae`) drawn from
    /// `seed`, with the default options.
    pub fn random_init(preset: &str, seed: u64, mae: bool) -> Result<Self> {
        Self::load(
            &ModelSource::RandomInit {
                preset: preset.into(),
                seed,
                mae,
            },
            &PipelineOptions::default(),
        )
    }

    /// The model of `source` with `opts`.
    pub fn load(source: &ModelSource, opts: &PipelineOptions) -> Result<Self> {
        let resolved = source.resolve(&opts.hub)?;
        let device = opts.device.open()?;
        let model = source.load_resolved(resolved.as_deref(), &device)?;
        Ok(Self {
            model,
            source: source.clone(),
            resolved,
            opts: opts.clone(),
            tokenizer: OnceLock::new(),
        })
    }

    /// This pipeline with `tokenizer` for its captions instead of the one it would look for.
    pub fn with_tokenizer(self, tokenizer: Tokenizer) -> Result<Self> {
        check_vocab(&tokenizer, "the given tokenizer", self.config())?;
        let cell = OnceLock::new();
        let _ = cell.set((tokenizer, "the given tokenizer".to_string()));
        Ok(Self {
            tokenizer: cell,
            ..self
        })
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        self.model.params().device()
    }

    /// The model.
    pub fn model(&self) -> &AnyModel {
        &self.model
    }

    /// The model's resolved configuration.
    pub fn config(&self) -> &M3aeConfig {
        self.model.config()
    }

    /// Where the model came from.
    pub fn source(&self) -> &ModelSource {
        &self.source
    }

    /// The model file or folder the checkpoint name resolved to (`None`: random init).
    pub fn resolved(&self) -> Option<&Path> {
        self.resolved.as_deref()
    }

    /// The options.
    pub fn options(&self) -> &PipelineOptions {
        &self.opts
    }

    /// The model's identity in feature caches (see [`ModelSource::identity`]).
    pub fn identity(&self) -> Result<String> {
        self.source.identity(self.resolved.as_deref())
    }

    /// The tokenizer, loaded on first use (see [`PipelineOptions::tokenizer`]); an error when
    /// none is given or found, or when its vocabulary is larger than the model's.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        Ok(&self.tokenizer_and_source()?.0)
    }

    /// The tokenizer and where it came from (the path given, or the file found).
    pub fn tokenizer_and_source(&self) -> Result<&(Tokenizer, String)> {
        if let Some(t) = self.tokenizer.get() {
            return Ok(t);
        }
        let (tok, from) = find_tokenizer_and_source(
            self.opts.tokenizer.as_deref(),
            self.resolved.as_deref(),
            &self.opts.hub,
        )?;
        check_vocab(&tok, &from, self.config())?;
        Ok(self.tokenizer.get_or_init(|| (tok, from)))
    }

    /// `[B, Li, P*P*3]` patches of `images` through the evaluation transform.
    fn patches<I: ImageInput>(&self, images: &[I]) -> Result<Tensor> {
        let cfg = self.config();
        let transform = eval_image_config(cfg, self.opts.normalization);
        let s = cfg.image_size;
        let mut data = Vec::with_capacity(images.len() * s * s * 3);
        for image in images {
            // the evaluation transform draws nothing: any generator gives the same pixels
            let mut rng = m3ae_data::seed::rng(0, 0, 0, 0);
            data.extend(transform.apply(&*image.rgb()?, &mut rng));
        }
        let t = Tensor::from_vec(data, (images.len(), s, s, 3), self.device())?;
        Ok(m3ae_model::patchify(&t, cfg.patch_size)?)
    }

    /// Pooled image features `[N, D]` (f32) of `images`, images only and unmasked, in batches
    /// of [`PipelineOptions::batch_size`], pooled by [`PipelineOptions::pooling`].
    pub fn embed_images<I: ImageInput>(&self, images: &[I]) -> Result<Tensor> {
        if images.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.config().emb_dim),
                DType::F32,
                &Device::Cpu, // features are returned on the host
            )?);
        }
        let batches = images
            .chunks(self.opts.batch_size.max(1))
            .map(|chunk| self.patches(chunk));
        extract_features(&self.model, batches, self.opts.pooling, |_| {})
    }

    /// [`Pipeline::embed_images`] as one `Vec<f32>` per image.
    pub fn embed_images_vec<I: ImageInput>(&self, images: &[I]) -> Result<Vec<Vec<f32>>> {
        Ok(self.embed_images(images)?.to_vec2::<f32>()?)
    }

    /// Pooled joint features `[N, D]` (f32) of image-caption pairs, unmasked (M3AE only): the
    /// cls token, or with mean pooling the mean over the patches and the caption's tokens
    /// (padding left out).
    pub fn embed_pairs<I: ImageInput, S: AsRef<str>>(
        &self,
        images: &[I],
        captions: &[S],
    ) -> Result<Tensor> {
        let AnyModel::M3ae(m) = &self.model else {
            return Err(self.unusable("an image-only MAE takes no captions"));
        };
        if images.len() != captions.len() {
            return Err(Error::Shape(format!(
                "{} images but {} captions: pairs need one caption per image",
                images.len(),
                captions.len()
            )));
        }
        let tok = self.tokenizer()?;
        let cfg = self.config();
        let t = cfg.text_length;
        let mut parts = Vec::new();
        let step = self.opts.batch_size.max(1);
        for (imgs, caps) in images.chunks(step).zip(captions.chunks(step)) {
            let b = imgs.len();
            let mut ids = Vec::with_capacity(b * t);
            let mut pad = Vec::with_capacity(b * t);
            for c in caps {
                let enc = tok.encode(c.as_ref(), t)?;
                ids.extend(enc.ids);
                pad.extend(enc.padding.iter().map(|&p| p as f32));
            }
            let dev = self.device();
            let pad = Tensor::from_vec(pad, (b, t), dev)?;
            let input = ModelInput {
                image_patches: Some(self.patches(imgs)?),
                text_ids: Some(Tensor::from_vec(ids, (b, t), dev)?),
                text_padding: Some(pad.clone()),
            };
            let repr = m.forward_representation(&input)?;
            let pooled = match self.opts.pooling {
                Pooling::Cls => pool(&repr, Pooling::Cls)?,
                Pooling::Mean => {
                    let n = repr.dim(1)?;
                    let li = n - 1 - t;
                    let weights = Tensor::cat(
                        &[
                            Tensor::zeros((b, 1), DType::F32, dev)?,
                            Tensor::ones((b, li), DType::F32, dev)?,
                            (1.0 - &pad)?,
                        ],
                        1,
                    )?;
                    let sum = repr.broadcast_mul(&weights.unsqueeze(2)?)?.sum(1)?;
                    sum.broadcast_div(&weights.sum_keepdim(1)?)?
                }
            };
            parts.push(pooled.detach());
        }
        // features are returned on the host
        if parts.is_empty() {
            return Ok(Tensor::zeros((0, cfg.emb_dim), DType::F32, &Device::Cpu)?);
        }
        Ok(m3ae_model::device::to_host(
            &Tensor::cat(&parts, 0)?.contiguous()?,
        )?)
    }

    /// Pooled image features of a data set with labels and keys (`m3ae embed`), read through
    /// the feature cache `cache_dir` when given; `tag` names the set in progress lines (see
    /// [`crate::extract_cached`]). `opts` sets the data's normalisation, pooling and batch size.
    pub fn embed_dataset(
        &self,
        spec: &DataSpec,
        opts: &DataOptions,
        cache_dir: Option<&Path>,
        tag: &str,
    ) -> Result<FeatureSet> {
        extract_cached_as(
            &self.model,
            &self.source.describe(),
            || self.identity(),
            spec,
            opts,
            cache_dir,
            tag,
        )
    }

    /// Masks `image` (and `caption`, M3AE only; an MAE ignores it) with
    /// [`PipelineOptions::mask_seed`] and reconstructs it: the four panels, the masked and
    /// predicted words and the cls attention (see [`crate::reconstruct()`]). Errors about the
    /// model's outputs name the model.
    pub fn reconstruct<I: ImageInput + ?Sized>(
        &self,
        image: &I,
        caption: Option<&str>,
    ) -> Result<Reconstruction> {
        let image = image.rgb()?;
        let caption = match caption {
            Some(c) if self.model.is_m3ae() => Some((c, self.tokenizer()?)),
            _ => None,
        };
        reconstruct(
            &self.model,
            &image,
            caption,
            self.opts.mask_seed,
            self.opts.normalization,
        )
        .map_err(|e| match e {
            Error::Unusable { msg, .. } => Error::Unusable {
                model: self.source.describe(),
                msg,
            },
            e => e,
        })
    }

    /// The words the model predicts at the masked positions of `caption` (in caption order),
    /// with the image masked too (M3AE only; see [`Pipeline::reconstruct`]).
    pub fn predict_masked_words<I: ImageInput + ?Sized>(
        &self,
        image: &I,
        caption: &str,
    ) -> Result<Vec<String>> {
        if !self.model.is_m3ae() {
            return Err(self.unusable("an image-only MAE predicts no words"));
        }
        let r = self.reconstruct(image, Some(caption))?;
        Ok(r.words
            .into_iter()
            .map(|(_, _, predicted)| predicted)
            .collect())
    }

    fn unusable(&self, msg: &str) -> Error {
        Error::Unusable {
            model: self.source.describe(),
            msg: msg.into(),
        }
    }
}

/// `Err` naming the tokenizer `from` (as `--tokenizer`) when its vocabulary is larger than the
/// model's: its ids would index past the text embedding.
fn check_vocab(tok: &Tokenizer, from: &str, cfg: &M3aeConfig) -> Result<()> {
    let vocab = cfg.text_vocab_size;
    if tok.vocab_size() > vocab {
        return Err(Error::arg(
            "--tokenizer",
            from,
            format!(
                "its vocabulary ({} tokens) is larger than the model's ({vocab})",
                tok.vocab_size()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
