//! Converts an official M3AE `model.pkl` (no Python needed), loads the converted model and prints
//! the features of an image and a caption.
//!
//! ```text
//! cargo run --release --example load_official -- [model.pkl] [out-dir]
//! ```
//! Without arguments it uses the tiny fixture checkpoint of the repository.

use candle_core::{DType, Device, Tensor};
use m3ae::model::{patchify, pool, ModelInput, Pooling};
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

    let converted = official::convert_official(&pkl, &out, false)?;
    println!(
        "converted {} ({} checkpoint, {} weights) into {}",
        pkl.display(),
        converted.kind.name(),
        converted.weights.0,
        out.display()
    );
    let dev = Device::Cpu;
    let model = official::load_m3ae(&out, &dev)?;
    let cfg = model.config().clone();

    // A synthetic image (NHWC, normalised values) and a caption given as token ids (tokenize
    // with the bert-base-uncased tokenizer for the released weights; the fixture uses vocab 300).
    let s = cfg.image_size;
    let pixels: Vec<f32> = (0..s * s * 3)
        .map(|i| ((i % 97) as f32 / 48.0) - 1.0)
        .collect();
    let image = Tensor::from_vec(pixels, (1, s, s, 3), &dev)?;
    let ids: Vec<u32> = (0..cfg.text_length)
        .map(|i| {
            if i < 6 {
                (i as u32 * 37 + 5) % cfg.text_vocab_size as u32
            } else {
                0
            }
        })
        .collect();
    let pad: Vec<f32> = (0..cfg.text_length)
        .map(|i| if i < 6 { 0.0 } else { 1.0 })
        .collect();
    let input = ModelInput {
        image_patches: Some(patchify(&image, cfg.patch_size)?),
        text_ids: Some(Tensor::from_vec(ids, (1, cfg.text_length), &dev)?),
        text_padding: Some(Tensor::from_vec(pad, (1, cfg.text_length), &dev)?),
    };
    let repr = model.forward_representation(&input)?;
    let cls = pool(&repr, Pooling::Cls)?;
    println!(
        "representation {:?}, cls feature {:?}",
        repr.dims(),
        cls.dims()
    );
    let v = cls.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let shown: Vec<String> = v.iter().take(8).map(|x| format!("{x:+.4}")).collect();
    println!("cls feature [0..8]: {}", shown.join(" "));
    Ok(())
}
