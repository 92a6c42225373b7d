//! A tour of m3ae-data: open a source, iterate a few batches, print shapes, masks and the
//! decoded captions.
//!
//! ```text
//! cargo run --release --example data_tour                  # built-in captioned scenes
//! M3AE_DATA_DIR=shared/data cargo run --release --example data_tour   # Tux Paint shards + BERT
//! ```

use m3ae::data::{
    CaptionedScenes, Loader, LoaderConfig, Position, ScenesConfig, Source, Tokenizer, WebDataset,
};
use std::sync::Arc;

fn main() -> anyhow::Result<()> {
    let (source, tokenizer, image_size): (Arc<dyn Source>, Tokenizer, usize) =
        match std::env::var_os("M3AE_DATA_DIR") {
            Some(d) => {
                let d = std::path::PathBuf::from(d);
                let shards = format!("{}/tuxpaint_captions/train-00000.tar", d.display());
                let tok =
                    Tokenizer::from_file(d.join("tokenizer/bert-base-uncased/tokenizer.json"))?;
                (Arc::new(WebDataset::from_spec(&shards)?), tok, 224)
            }
            None => {
                println!("M3AE_DATA_DIR not set: using the built-in captioned scenes");
                let scenes = CaptionedScenes::new(ScenesConfig::default())?;
                let corpus = scenes.corpus(2000);
                let tok = Tokenizer::train_wordpiece(corpus.iter().map(String::as_str), 400)?;
                (Arc::new(scenes), tok, 64)
            }
        };
    println!("source: {}", source.describe());
    let tok = Arc::new(tokenizer);
    let mut cfg = LoaderConfig::pretrain(8, image_size, 16);
    cfg.seed = 42;
    cfg.shuffle_buffer = 256;
    let loader = Loader::new(source, Some(tok.clone()), cfg)?;
    let start = std::time::Instant::now();
    let mut last = Position::default();
    for batch in loader.iter(Position::default()).take(3) {
        let b = batch?;
        let patches = b.input.image_patches.as_ref().expect("images");
        let ids = b.input.text_ids.as_ref().expect("text");
        let im = b.image_masking.as_ref().expect("image mask");
        let tm = b.text_masking.as_ref().expect("text mask");
        println!(
            "step {} epoch {}: patches {:?}, ids {:?}, image keeps {}/{} patches, text keeps {}/{} tokens",
            b.step,
            b.epoch,
            patches.dims(),
            ids.dims(),
            im.keep,
            im.len,
            tm.keep,
            tm.len
        );
        let mask_row: Vec<f32> = im.mask.get(0)?.to_vec1()?;
        let picture: String = mask_row
            .iter()
            .map(|&m| if m > 0.5 { '.' } else { '#' })
            .collect();
        println!("  image mask of sample 0 (# = kept): {picture}");
        for (key, row) in b.keys.iter().zip(ids.to_vec2::<u32>()?).take(3) {
            println!("  {key}: {:?}", tok.decode(&row)?);
        }
        last = b.position;
    }
    println!(
        "3 batches in {:.2?}; resume position: {}",
        start.elapsed(),
        serde_json::to_string(&last)?
    );
    Ok(())
}
