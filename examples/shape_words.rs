//! Does the model see shapes? The masked shape word of a held-out scene, predicted from pixels.
//!
//! The captions name every object's shape, and a shape word can be read from nowhere but the
//! image (no other word gives it away). For held-out scenes (the test split) the model gets the
//! scene's caption with the main object's shape word masked (and, as far as the model's text
//! mask ratio needs, the words after it), and the image masked at the model's own ratio in two
//! ways: the object's patches kept first (the object visible, the rest of the scene mostly
//! hidden), or masked first (the object hidden: what the model guesses without seeing it). A
//! model that recognises shapes names the visible object's shape; any word of the shape's
//! synonyms counts ([`m3ae::data::scenes::SHAPE_WORDS`]).
//!
//! ```text
//! cargo run --release --example shape_words                  # runs/tiny-scenes
//! cargo run --release --example shape_words -- runs/a runs/b --scenes 512
//! ```
//!
//! Prints one markdown row per checkpoint: the shape-word accuracy with the object visible and
//! hidden, and the share of the most frequent shape among the scored scenes (always guessing
//! it scores that).

use anyhow::{bail, Context, Result};
use m3ae::data::scenes::{Object, SHAPES, SHAPE_WORDS};
use m3ae::data::{CaptionedScenes, Normalization, RgbImage, SceneSplit, ScenesConfig, Tokenizer};
use m3ae::eval::{find_tokenizer, load_model, reconstruct_with, MaskNoise, ModelSource};
use m3ae::model::AnyModel;
use rand::Rng;
use std::path::PathBuf;

/// The token position of the main object's shape word in the scene's `caption` (the main
/// object is described first): the one position whose token changes when that word is swapped
/// for another shape's name (`None` when the word spans several tokens).
fn shape_position(tok: &Tokenizer, o: &Object, caption: &str, len: usize) -> Result<Option<usize>> {
    let Some((at, word)) = SHAPE_WORDS[o.shape]
        .iter()
        .filter_map(|w| caption.find(w).map(|at| (at, *w)))
        .min()
    else {
        bail!("the caption `{caption}` does not name its main object's shape");
    };
    let other = SHAPES[(o.shape + 1) % 6];
    let swapped = format!("{}{other}{}", &caption[..at], &caption[at + word.len()..]);
    let (a, b) = (tok.encode(caption, len)?, tok.encode(&swapped, len)?);
    let differ: Vec<usize> = (0..len).filter(|&j| a.ids[j] != b.ids[j]).collect();
    let same_length = a.padding == b.padding;
    Ok((same_length && differ.len() == 1).then(|| differ[0]))
}

/// (scored scenes, right with the object visible, right with it hidden, per-shape counts).
fn score(
    model: &AnyModel,
    tok: &Tokenizer,
    scenes: &CaptionedScenes,
    count: usize,
    seed: u64,
) -> Result<(usize, usize, usize, [usize; 8])> {
    let cfg = model.config().clone();
    let (size, patch) = (cfg.image_size, cfg.patch_size);
    let grid = size / patch;
    let li = grid * grid;
    let text_masked = cfg.text_length - cfg.text_keep(cfg.text_length);
    let mut rng = m3ae::data::seed::rng(seed, 0, 0, 0);
    let (mut n, mut seen, mut unseen, mut shapes) = (0, 0, 0, [0usize; 8]);
    for i in 0..count {
        let scene = scenes.scene(i);
        let o = scene.objects[0];
        let caption = scene.caption.clone();
        let Some(pos) = shape_position(tok, &o, &caption, cfg.text_length)? else {
            continue;
        };
        let enc = tok.encode(&caption, cfg.text_length)?;
        if text_masked == 0 {
            bail!("the model masks no text (text_mask_ratio 0)");
        }
        // the shape word masked first, then padding, then the caption's later words (other
        // objects) as far as the model's ratio needs; the words before it stay visible
        let t = cfg.text_length as f32;
        let text: Vec<f32> = (0..cfg.text_length)
            .map(|j| match (j == pos, enc.padding[j]) {
                (true, _) => 3.0,
                (false, 1) => 2.0,
                _ if j > pos => 1.0 + j as f32 / t,
                _ => 0.0,
            })
            .collect();
        let image = RgbImage {
            width: size,
            height: size,
            data: scene.pixels.clone(),
        };
        let hidden = o.patches(grid, patch);
        let base: Vec<f32> = (0..li).map(|_| rng.random::<f32>()).collect();
        let mut right = [false; 2];
        for (k, shift) in [-2.0f32, 2.0].into_iter().enumerate() {
            let mut noise = base.clone();
            for &p in &hidden {
                noise[p] += shift;
            }
            let masks = MaskNoise {
                image: Some(noise),
                text: Some(text.clone()),
            };
            let r = reconstruct_with(
                model,
                &image,
                Some((&caption, tok)),
                seed,
                &masks,
                Normalization::Cc12m,
            )?;
            let predicted =
                r.words.iter().find(|w| w.0 == pos).with_context(|| {
                    format!("scene {i}: no prediction at the shape position {pos}")
                })?;
            right[k] = SHAPE_WORDS[o.shape].contains(&predicted.2.as_str());
        }
        n += 1;
        seen += right[0] as usize;
        unseen += right[1] as usize;
        shapes[o.shape] += 1;
    }
    Ok((n, seen, unseen, shapes))
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut checkpoints, mut count, mut seed) = (Vec::new(), 512usize, 0u64);
    while let Some(a) = args.next() {
        let mut value = |flag: &str| args.next().with_context(|| format!("{flag} needs a value"));
        match a.as_str() {
            "--scenes" => count = value("--scenes")?.parse()?,
            "--seed" => seed = value("--seed")?.parse()?,
            flag if flag.starts_with("--") => bail!("unknown flag {flag}"),
            other => checkpoints.push(PathBuf::from(other)),
        }
    }
    if checkpoints.is_empty() {
        checkpoints.push("runs/tiny-scenes".into());
    }
    println!("| checkpoint | scenes | shape word, object visible | object hidden | most frequent shape |");
    println!("|---|---|---|---|---|");
    for ck in &checkpoints {
        let model = load_model(
            &ModelSource::Checkpoint(ck.clone()),
            &candle_core::Device::Cpu,
        )?;
        if !model.is_m3ae() {
            bail!("{}: an image-only MAE predicts no words", ck.display());
        }
        let tok = find_tokenizer(None, Some(ck))?;
        let scenes = CaptionedScenes::new(ScenesConfig {
            split: SceneSplit::Test,
            len: count,
            image_size: model.config().image_size,
            ..Default::default()
        })?;
        let (n, seen, unseen, shapes) = score(&model, &tok, &scenes, count, seed)?;
        if n == 0 {
            bail!("{}: no scene's shape word is a single token", ck.display());
        }
        let pct = |k: usize| 100.0 * k as f64 / n as f64;
        println!(
            "| {} | {n} | {:.1}% | {:.1}% | {:.1}% |",
            ck.display(),
            pct(seen),
            pct(unseen),
            pct(*shapes.iter().max().unwrap_or(&0))
        );
    }
    Ok(())
}
