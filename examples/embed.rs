//! Embeds a folder of images (each alone) and a list of captions (each with the image of the same
//! rank) through the inference pipeline, and prints the features' sizes and first values.
//!
//! ```text
//! cargo run --release --example embed -- <image-folder> [caption ...] [--checkpoint PATH]
//! ```
//! Without `--checkpoint` it uses a random-init tiny M3AE with a WordPiece trained on the
//! captions; a checkpoint brings its configuration and the `tokenizer.json` next to it.

use m3ae::data::Tokenizer;
use m3ae::eval::Pipeline;
use std::path::{Path, PathBuf};

/// Image features (one row per image, in file-name order) and pair features (one per caption).
pub fn run(
    folder: &Path,
    captions: &[String],
    checkpoint: Option<&Path>,
) -> anyhow::Result<(Vec<Vec<f32>>, Vec<Vec<f32>>)> {
    let pipe = match checkpoint {
        Some(c) => Pipeline::from_pretrained(c, &Default::default())?,
        None => Pipeline::random_init("tiny", 0, false)?.with_tokenizer(
            Tokenizer::train_wordpiece(captions.iter().map(String::as_str), 200)?,
        )?,
    };
    let mut images: Vec<PathBuf> = std::fs::read_dir(folder)?
        .map(|e| Ok(e?.path()))
        .collect::<std::io::Result<_>>()?;
    images.retain(|p| {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or_default();
        ["png", "jpg", "jpeg", "webp"].contains(&ext.to_ascii_lowercase().as_str())
    });
    images.sort();
    anyhow::ensure!(captions.len() <= images.len(), "more captions than images");
    let image_feats = pipe.embed_images_vec(&images)?;
    let pair_feats = pipe
        .embed_pairs(&images[..captions.len()], captions)?
        .to_vec2::<f32>()?;
    for (p, f) in images.iter().zip(&image_feats) {
        println!("{}: {} features, [0] = {:+.4}", p.display(), f.len(), f[0]);
    }
    for (c, f) in captions.iter().zip(&pair_feats) {
        println!("{c:?} + image: {} features, [0] = {:+.4}", f.len(), f[0]);
    }
    Ok((image_feats, pair_feats))
}

#[allow(dead_code)] // a test includes this file as a module and calls `run`
fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let checkpoint = match args.iter().position(|a| a == "--checkpoint") {
        Some(i) if i + 1 < args.len() => Some(PathBuf::from(args.drain(i..i + 2).nth(1).unwrap())),
        Some(_) => anyhow::bail!("--checkpoint needs a path"),
        None => None,
    };
    anyhow::ensure!(
        !args.is_empty(),
        "usage: embed <image-folder> [caption ...] [--checkpoint PATH]"
    );
    let folder = PathBuf::from(args.remove(0));
    run(&folder, &args, checkpoint.as_deref())?;
    Ok(())
}
