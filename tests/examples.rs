//! The examples' own logic, run as tests (an example's `run` is included as a module: building
//! and running it through `cargo run --example` would take minutes).

mod common;

#[allow(dead_code)] // the example's `main` is not called here
#[path = "../examples/embed.rs"]
mod embed;

use m3ae::data::{CaptionedScenes, ScenesConfig};
use m3ae::eval::Pipeline;
use m3ae::model::{AnyModel, M3aeConfig, Variant};

#[test]
fn the_embed_example_embeds_images_and_pairs_from_a_checkpoint() {
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
    let captions: Vec<String> = (0..2).map(|i| scenes.scene(i).caption.clone()).collect();
    // a checkpoint folder with its tokenizer next to it
    let cfg = M3aeConfig::preset("tiny").unwrap();
    let ckpt = d.join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    AnyModel::init(Variant::M3ae, &cfg, 7, &candle_core::Device::Cpu)
        .unwrap()
        .save(&ckpt.join("model.safetensors"))
        .unwrap();
    scenes
        .train_tokenizer(200, 300)
        .unwrap()
        .save(ckpt.join("tokenizer.json"))
        .unwrap();
    let pipe = Pipeline::from_pretrained(&ckpt, &Default::default()).unwrap();
    let [images, pairs] = embed::embed(&pipe, &folder, &captions).unwrap();
    assert_eq!(images.dims(), [3, cfg.emb_dim]);
    assert_eq!(pairs.dims(), [2, cfg.emb_dim]);
    let v = images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
    // the image alone and with its caption give different features
    let (a, p) = (images.get(0).unwrap(), pairs.get(0).unwrap());
    let diff = (a - p).unwrap().abs().unwrap().sum_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() > 0.0);
    // the same image through the pipeline directly gives the same features
    let one = pipe.embed_images(&[folder.join("0.png")]).unwrap();
    let same = (one.get(0).unwrap() - images.get(0).unwrap())
        .unwrap()
        .abs()
        .unwrap();
    assert_eq!(same.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    // more captions than images is refused
    let many: Vec<String> = (0..4).map(|i| format!("caption {i}")).collect();
    assert!(embed::embed(&pipe, &folder, &many).is_err());
    std::fs::remove_dir_all(&d).ok();
}
