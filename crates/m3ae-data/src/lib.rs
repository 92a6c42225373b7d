//! Data for M3AE: turns files into [`m3ae_model::ModelInput`] batches with their masks.
//!
//! * [`Sample`], [`Record`] and the [`Source`] trait: the samples of one partition (rank, world
//!   size, worker, epoch seed). Sources: [`WebDataset`] tar shards (img2dataset layout),
//!   [`Manifest`] (JSONL / CSV), [`ImageFolder`], [`TextCorpus`], [`U8Arrays`] (safetensors),
//!   the built-in [`CaptionedScenes`] and [`InMemory`] (samples built in code); with the feature
//!   `hdf5`, `hdf5::Hdf5` over the official HDF5 files.
//! * [`DataSpec`] ([`spec`]): a data set by name (`scenes:test:500`, `wds:<shards>`,
//!   `u8:<file>`, ...), parsed from a flag or a configuration string and opened through a
//!   [`Registry`] of [`SourceKind`]s, to which a user adds kinds of their own.
//! * [`tarstream`]: the bounded streaming tar reader under [`WebDataset`] (no size from a header
//!   is trusted for an allocation; extension headers are capped at 64 KiB).
//! * [`image`](mod@image): decoding (grey / alpha to RGB on white) and the official transforms and
//!   normalisations.
//! * [`Tokenizer`]: BERT WordPiece over the `tokenizers` crate with the official behaviour, from a
//!   file or (feature `hub`) a Hugging Face repository id through the local cache ([`hub`]).
//! * [`MaskSampler`]: batch-shared or per-sample noise from (seed, step) into
//!   [`m3ae_model::Masking`]; [`BatchMasks`], the one place a batch's masks are drawn (for the
//!   rows of the global batch it holds), with ratios from the model ([`MaskConfig::from_model`]).
//! * [`mixup`]: Mixup / CutMix of a fine-tuning batch with label smoothing
//!   ([`mixup_cutmix`], [`MixupConfig`]), as the official fine-tuning code.
//! * [`Loader`]: parallel, bounded, deterministic batches with a resumable [`Position`].
//! * [`Streams`] ([`streams`]): the data of a (data-parallel) pre-training run as `S` streams,
//!   independent of the number of processes.
//!
//! ```
//! use m3ae_data::{CaptionedScenes, Loader, LoaderConfig, ScenesConfig};
//! let scenes = CaptionedScenes::new(ScenesConfig { len: 8, ..Default::default() })?;
//! let tok = scenes.train_tokenizer(200, 500)?;
//! let mut cfg = LoaderConfig::pretrain(4, 64, 16);
//! cfg.epochs = Some(1);
//! let loader = Loader::new(std::sync::Arc::new(scenes), Some(std::sync::Arc::new(tok)), cfg)?;
//! let batches: Vec<_> = loader.iter(Default::default()).collect::<Result<_, _>>()?;
//! assert_eq!(batches.len(), 2);
//! let b = &batches[0];
//! assert_eq!(b.input.image_patches.as_ref().unwrap().dims(), &[4, 16, 16 * 16 * 3]);
//! assert_eq!(b.input.text_ids.as_ref().unwrap().dims(), &[4, 64]);
//! assert_eq!(b.image_masking.as_ref().unwrap().keep, 4); // 75 % of 16 patches masked
//! # Ok::<(), m3ae_data::Error>(())
//! ```

pub mod arrays;
pub mod batch;
pub mod error;
pub mod folder;
#[cfg(feature = "hdf5")]
pub mod hdf5;
pub mod hub;
pub mod image;
pub mod loader;
pub mod manifest;
pub mod masks;
pub mod memory;
pub mod mixup;
pub mod sample;
pub mod scenes;
pub mod seed;
pub mod shards;
pub mod spec;
pub mod streams;
pub mod tarstream;
pub mod text;
pub mod tokenize;
pub mod webdataset;

pub use arrays::U8Arrays;
pub use error::{BadReason, BadSample, BadStats, Error, Result};
pub use folder::ImageFolder;
#[cfg(feature = "hdf5")]
pub use hdf5::{Hdf5, Hdf5Layout};
pub use hub::HubOptions;
pub use image::{decode_rgb, ImageConfig, Normalization, RgbImage, Transform};
pub use loader::{collate, Batch, Loader, LoaderConfig, Position, TextBatch};
pub use manifest::Manifest;
pub use masks::{BatchMasks, BatchRows, MaskConfig, MaskSampler, NoiseKind};
pub use memory::InMemory;
pub use mixup::{mixup_cutmix, MixChoice, Mixed, MixupConfig};
pub use sample::{ImageData, PartFault, Partition, Record, RecordIter, Sample, Source};
pub use scenes::{CaptionedScenes, LabelKind, SceneSplit, ScenesConfig};
pub use shards::expand_shards;
pub use spec::{DataOptions, DataSpec, OpenedData, Registry, SourceKind};
pub use streams::Streams;
pub use text::TextCorpus;
pub use tokenize::{Tokenized, Tokenizer};
pub use webdataset::{JsonLabel, WebDataset};
