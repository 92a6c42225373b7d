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

/// One feature vector per image or pair.
pub type Features = Vec<Vec<f32>>;

/// Image features (one row per image, in file-name order) and pair features (one per caption).
pub fn run(
    folder: &Path,
    captions: &[String],
    ckpt: Option<&Path>,
) -> anyhow::Result<[Features; 2]> {
    let pipe = match ckpt {
        Some(c) => Pipeline::from_pretrained(c, &Default::default())?,
        None => Pipeline::random_init("tiny", 0, false)?.with_tokenizer(
            Tokenizer::train_wordpiece(captions.iter().map(String::as_str), 200)?,
        )?,
    };
    let mut images: Vec<PathBuf> = std::fs::read_dir(folder)?
        .flatten()
        .map(|e| e.path())
        .collect();
    images.retain(|p| {
        p.extension().is_some_and(|e| {
            ["png", "jpg", "jpeg", "webp"]
                .iter()
                .any(|x| e.eq_ignore_ascii_case(x))
        })
    });
    images.sort();
    anyhow::ensure!(captions.len() <= images.len(), "more captions than images");
    let alone = pipe.embed_images_vec(&images)?;
    let pairs = pipe
        .embed_pairs(&images[..captions.len()], captions)?
        .to_vec2::<f32>()?;
    for (name, f) in images
        .iter()
        .map(|p| p.display().to_string())
        .chain(captions.iter().cloned())
        .zip(alone.iter().chain(&pairs))
    {
        println!("{name}: {} features, first {:+.4}", f.len(), f[0]);
    }
    Ok([alone, pairs])
}

#[allow(dead_code)] // the examples test includes this file as a module and calls `run`
fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let ckpt = args.iter().position(|a| a == "--checkpoint").map(|i| {
        let flag: Vec<String> = args.drain(i..(i + 2).min(args.len())).collect();
        PathBuf::from(flag.get(1).cloned().unwrap_or_default())
    });
    anyhow::ensure!(
        !args.is_empty(),
        "usage: embed <image-folder> [caption ...] [--checkpoint PATH]"
    );
    run(Path::new(&args[0]), &args[1..], ckpt.as_deref()).map(|_| ())
}
