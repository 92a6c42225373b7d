//! Embeds the images of a folder, alone and paired with captions, through the inference API.
//!
//! ```text
//! cargo run --release --example embed -- <checkpoint> <image-folder> [caption ...]
//! ```

use candle_core::Tensor;
use m3ae::eval::Pipeline;
use std::path::{Path, PathBuf};

/// Features `(images, dim)` of every image in `folder` (file-name order), and `(captions, dim)`
/// of the first images each paired with a caption.
pub fn embed(pipe: &Pipeline, folder: &Path, captions: &[String]) -> anyhow::Result<[Tensor; 2]> {
    let mut images: Vec<PathBuf> = std::fs::read_dir(folder)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    images.sort();
    let pairs = images
        .get(..captions.len())
        .ok_or(anyhow::anyhow!("more captions than images"))?;
    Ok([
        pipe.embed_images(&images)?,
        pipe.embed_pairs(pairs, captions)?,
    ])
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        args.len() >= 2,
        "usage: embed <checkpoint> <image-folder> [caption ...]"
    );
    let pipe = Pipeline::from_pretrained(&args[0], &Default::default())?;
    let [images, pairs] = embed(&pipe, Path::new(&args[1]), &args[2..])?;
    println!("images {:?}, pairs {:?}", images.dims(), pairs.dims());
    Ok(())
}
