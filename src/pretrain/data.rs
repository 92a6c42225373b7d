//! The job's data: its tokenizer (trained on the scenes' captions, or a file), the loader
//! settings and the fixed held-out batch used for reconstruction images and masked-word accuracy.

use super::PretrainConfig;
use anyhow::{Context, Result};
use m3ae_data::{
    Batch, CaptionedScenes, LabelKind, Loader, LoaderConfig, MaskConfig, Position, SceneSplit,
    ScenesConfig, Tokenizer, Transform,
};
use m3ae_model::M3aeConfig;
use std::path::Path;
use std::sync::Arc;

/// Saves a tokenizer (atomically, so that another process of the job never reads it
/// half-written).
pub(crate) fn save_tokenizer(tok: &Tokenizer, path: &Path) -> Result<()> {
    Ok(tok.save(path)?)
}

/// A `data.tokenizer` value: a `tokenizer.json`, a folder holding one, or (feature `hub`) a
/// Hugging Face repository id such as `bert-base-uncased` (local cache first; `HF_HUB_OFFLINE=1`
/// keeps it off the network).
pub(crate) fn load_tokenizer(p: &Path) -> Result<Tokenizer> {
    let name = p
        .to_str()
        .with_context(|| format!("data.tokenizer {}: not UTF-8", p.display()))?;
    Ok(Tokenizer::from_pretrained(
        name,
        &m3ae_data::HubOptions::default(),
    )?)
}

/// Builds (or loads) the tokenizer of a run and saves it in the run directory (`save`: rank 0).
pub(crate) fn tokenizer(
    cfg: &PretrainConfig,
    run_dir: &Path,
    scenes: &CaptionedScenes,
    save: bool,
) -> Result<Tokenizer> {
    let saved = run_dir.join("tokenizer.json");
    let tok = if let Some(p) = &cfg.data.tokenizer {
        load_tokenizer(p)?
    } else if saved.is_file() {
        Tokenizer::from_file(&saved)?
    } else {
        let corpus = scenes.corpus(5000);
        Tokenizer::train_wordpiece(corpus.iter().map(String::as_str), cfg.data.vocab_size)?
    };
    if save && !saved.is_file() {
        save_tokenizer(&tok, &saved)?;
    }
    Ok(tok)
}

pub(crate) fn scenes(
    cfg: &PretrainConfig,
    split: SceneSplit,
    len: usize,
) -> Result<CaptionedScenes> {
    Ok(CaptionedScenes::new(ScenesConfig {
        split,
        len,
        label: LabelKind::Shape,
        ..cfg.data.scenes.clone()
    })?)
}

pub(crate) fn loader_config(cfg: &PretrainConfig, model: &M3aeConfig) -> LoaderConfig {
    let mut lc = LoaderConfig::pretrain(cfg.train.batch_size, model.image_size, model.patch_size);
    lc.seed = cfg.seed;
    lc.num_threads = cfg.data.num_threads;
    lc.max_bad_fraction = cfg.data.max_bad_fraction;
    lc.text_len = Some(model.text_length);
    lc.masks = Some(MaskConfig::from_model(model, cfg.data.noise));
    lc
}

/// A fixed held-out batch with masks: for reconstruction images and masked-word accuracy.
pub(crate) fn eval_batch(
    cfg: &PretrainConfig,
    model: &M3aeConfig,
    tok: &Arc<Tokenizer>,
    n: usize,
) -> Result<Batch> {
    let test = cfg
        .data
        .eval_spec(n)?
        .open(&cfg.data.options(LabelKind::Shape))?
        .source;
    let mut lc = loader_config(cfg, model);
    lc.batch_size = n;
    lc.shuffle_buffer = 0;
    lc.epochs = Some(1);
    // a held-out set smaller than `n` (the 99 Tux Paint test pairs) gives one shorter batch
    lc.drop_last = false;
    lc.seed = cfg.seed ^ 0x5eed;
    if let Some(im) = lc.image.as_mut() {
        im.transform = Transform::test();
    }
    let what = test.describe();
    let loader = Loader::new(test, Some(tok.clone()), lc)?;
    let b = loader
        .iter(Position::default())
        .next()
        .with_context(|| format!("the held-out data ({what}) gave no batch"))?
        .with_context(|| format!("reading the held-out data ({what})"))?;
    Ok(b)
}
