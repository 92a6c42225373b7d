//! Converts an official M3AE `model.pkl` (no Python needed), loads the converted model through
//! the inference pipeline and prints the joint features of an image and a caption.
//!
//! ```text
//! cargo run --release --example load_official -- [model.pkl] [out-dir] [tokenizer]
//! ```
//! Without arguments it uses the tiny fixture checkpoint of the repository. The released weights
//! take the `bert-base-uncased` tokenizer (a `tokenizer.json`, or the repository id with the
//! `hub` feature); the fixture's 300-token vocabulary gets a small WordPiece trained here.

use m3ae::data::{CaptionedScenes, RgbImage, Tokenizer};
use m3ae::eval::{Pipeline, PipelineOptions};
use m3ae::official;
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let pkl = args.next().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/official_checkpoint/m3ae_model.pkl")
    });
    let out = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("m3ae-load-official"));
    let tokenizer = args.next().map(PathBuf::from);

    let converted = official::convert_official(&pkl, &out, false)?;
    println!(
        "converted {} ({} checkpoint, {} weights) into {}",
        pkl.display(),
        converted.kind.name(),
        converted.weights.0,
        out.display()
    );
    let opts = PipelineOptions {
        tokenizer: tokenizer.clone(),
        ..Default::default()
    };
    let mut pipe = Pipeline::from_pretrained(&out, &opts)?;
    if tokenizer.is_none() {
        let corpus = CaptionedScenes::new(Default::default())?.corpus(300);
        let vocab = pipe.config().text_vocab_size.min(150);
        let tok = Tokenizer::train_wordpiece(corpus.iter().map(String::as_str), vocab)?;
        pipe = pipe.with_tokenizer(tok)?;
    }

    // A synthetic image: any size, the pipeline resizes and normalises it.
    let image = RgbImage {
        width: 48,
        height: 48,
        data: (0..48 * 48 * 3).map(|i| (i % 251) as u8).collect(),
    };
    let caption = "a red circle on a blue background";
    let joint = pipe.embed_pairs(std::slice::from_ref(&image), &[caption])?;
    let image_only = pipe.embed_images(&[image])?;
    println!(
        "cls feature of the pair {:?}, of the image alone {:?}",
        joint.dims(),
        image_only.dims()
    );
    let v = joint.to_vec2::<f32>()?.remove(0);
    let shown: Vec<String> = v.iter().take(8).map(|x| format!("{x:+.4}")).collect();
    println!("cls feature [0..8]: {}", shown.join(" "));
    Ok(())
}
