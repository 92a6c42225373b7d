//! Reconstruction through the inference pipeline: masks a captioned scene and its caption, runs
//! the model, writes the four-panel PNG (original | masked | prediction | prediction + visible)
//! and the cls attention overlay, and prints the predicted masked words.
//!
//! ```text
//! cargo run --release --example reconstruct                       # random-init tiny model
//! cargo run --release --example reconstruct -- runs/x             # its tokenizer.json is found
//! cargo run --release --example reconstruct -- runs/x tok.json    # a checkpoint + tokenizer
//! ```

use m3ae::data::{CaptionedScenes, RgbImage, ScenesConfig};
use m3ae::eval::panels::{write_attention_png, write_reconstruction_png};
use m3ae::eval::{Pipeline, PipelineOptions};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scenes = CaptionedScenes::new(ScenesConfig {
        len: 1,
        split: m3ae::data::SceneSplit::Test,
        ..Default::default()
    })?;
    let pipe = match args.as_slice() {
        [ckpt, rest @ ..] => {
            let opts = PipelineOptions {
                tokenizer: rest.first().map(Into::into),
                ..Default::default()
            };
            Pipeline::from_pretrained(ckpt, &opts)?
        }
        // the tiny preset has a 1,000-token vocabulary: train a small WordPiece
        [] => Pipeline::random_init("tiny", 0, false)?
            .with_tokenizer(scenes.train_tokenizer(2000, 400)?)?,
    };
    let scene = scenes.scene(0);
    let size = scenes.config().image_size;
    let image = RgbImage {
        width: size,
        height: size,
        data: scene.pixels.clone(),
    };
    println!("caption: {}", scene.caption);
    let r = pipe.reconstruct(&image, Some(&scene.caption))?;
    let dir = std::env::temp_dir();
    let (out, att) = (
        dir.join("m3ae-recon.png"),
        dir.join("m3ae-recon-attention.png"),
    );
    write_reconstruction_png(&r, &out)?;
    write_attention_png(&r, &att)?;
    println!("wrote {} and {}", out.display(), att.display());
    println!("masked-patch MSE: {:.4}", r.masked_mse);
    for (pos, orig, pred) in &r.words {
        println!("masked word {pos}: {orig:?} -> {pred:?}");
    }
    if let Some(c) = &r.predicted_caption {
        println!("predicted caption: {c}");
    }
    Ok(())
}
