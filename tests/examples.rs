//! The examples' own logic, run as tests (an example's `run` is included as a module: building
//! and running it through `cargo run --example` would take minutes).

mod common;

#[allow(dead_code)] // the example's `main` is not called here
#[path = "../examples/embed.rs"]
mod embed;

use m3ae::data::{CaptionedScenes, ScenesConfig, Tokenizer};
use m3ae::model::{AnyModel, M3aeConfig, Variant};

#[test]
fn the_embed_example_embeds_images_and_pairs_with_random_init_and_a_checkpoint() {
    let d = common::temp_dir("examples", "embed");
    let scenes = CaptionedScenes::new(ScenesConfig {
        len: 3,
        ..Default::default()
    })
    .unwrap();
    let folder = d.join("images");
    std::fs::create_dir_all(&folder).unwrap();
    let size = scenes.config().image_size as u32;
    for i in 0..3 {
        image::RgbImage::from_raw(size, size, scenes.scene(i).pixels.clone())
            .unwrap()
            .save(folder.join(format!("{i}.png")))
            .unwrap();
    }
    // not an image: skipped
    std::fs::write(folder.join("notes.txt"), "x").unwrap();
    let captions: Vec<String> = (0..2).map(|i| scenes.scene(i).caption.clone()).collect();
    let cfg = M3aeConfig::preset("tiny").unwrap();
    let [images, pairs] = embed::run(&folder, &captions, None).unwrap();
    assert_eq!(images.len(), 3);
    assert_eq!(pairs.len(), 2);
    assert!(images.iter().chain(&pairs).all(|f| f.len() == cfg.emb_dim));
    assert!(images.iter().flatten().all(|x| x.is_finite()));
    // a checkpoint folder with its tokenizer next to it
    let ckpt = d.join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    AnyModel::init(Variant::M3ae, &cfg, 7, &candle_core::Device::Cpu)
        .unwrap()
        .save(&ckpt.join("model.safetensors"))
        .unwrap();
    Tokenizer::train_wordpiece(scenes.corpus(200).iter().map(String::as_str), 300)
        .unwrap()
        .save(ckpt.join("tokenizer.json"))
        .unwrap();
    let [images2, pairs2] = embed::run(&folder, &captions, Some(&ckpt)).unwrap();
    assert_eq!((images2.len(), pairs2.len()), (3, 2));
    // other weights, other features
    assert_ne!(images2[0], images[0]);
    // more captions than images is refused
    let many: Vec<String> = (0..4).map(|i| format!("caption {i}")).collect();
    assert!(embed::run(&folder, &many, Some(&ckpt)).is_err());
    std::fs::remove_dir_all(&d).ok();
}
