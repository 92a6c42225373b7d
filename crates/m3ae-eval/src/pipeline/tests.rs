//! Tests of the pipeline: files and decoded images embed alike and like the data-set path,
//! pairs need a tokenizer (found next to a checkpoint or given), reconstructions match the
//! function.

use super::*;
use m3ae_data::{CaptionedScenes, ScenesConfig};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("m3ae-pipeline-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn scenes() -> CaptionedScenes {
    CaptionedScenes::new(ScenesConfig {
        len: 6,
        ..Default::default()
    })
    .unwrap()
}

fn scene_image(s: &CaptionedScenes, i: usize) -> RgbImage {
    let size = s.config().image_size;
    RgbImage {
        width: size,
        height: size,
        data: s.scene(i).pixels.clone(),
    }
}

fn tokenizer(s: &CaptionedScenes) -> Tokenizer {
    Tokenizer::train_wordpiece(s.corpus(300).iter().map(String::as_str), 400).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn image_files_embed_like_decoded_images_and_like_the_data_set_path() -> anyhow::Result<()> {
    let d = tmp("files");
    let s = scenes();
    let mut paths = Vec::new();
    let mut decoded = Vec::new();
    for i in 0..5 {
        let img = scene_image(&s, i);
        // one class folder: the `folder:` data set reads the same files
        let p = d.join("all").join(format!("{i}.png"));
        std::fs::create_dir_all(p.parent().unwrap())?;
        image::RgbImage::from_raw(img.width as u32, img.height as u32, img.data.clone())
            .unwrap()
            .save(&p)?;
        paths.push(p);
        decoded.push(img);
    }
    let opts = PipelineOptions {
        batch_size: 2,
        ..Default::default()
    };
    let pipe = Pipeline::load(
        &ModelSource::RandomInit {
            preset: "tiny".into(),
            seed: 4,
            mae: false,
        },
        &opts,
    )?;
    let from_files = pipe.embed_images(&paths)?;
    let from_images = pipe.embed_images(&decoded)?;
    assert_eq!(from_files.dims(), &[5, pipe.config().emb_dim]);
    assert_eq!(max_diff(&from_files, &from_images), 0.0);
    // the batch size does not change the features
    let one_batch = Pipeline::random_init("tiny", 4, false)?.embed_images(&decoded)?;
    assert!(max_diff(&one_batch, &from_images) < 1e-5);
    // `m3ae embed folder:<dir>` goes through the loader's fast transform: equal to rounding
    let spec = DataSpec::folder(&d);
    let set = pipe.embed_dataset(&spec, &DataOptions::default(), None, "t")?;
    assert_eq!(set.keys.len(), 5);
    assert!(max_diff(&set.features, &from_files) < 1e-3);
    assert_eq!(pipe.embed_images_vec(&paths[..1])?.len(), 1);
    assert_eq!(
        pipe.embed_images::<RgbImage>(&[])?.dims(),
        &[0, pipe.config().emb_dim]
    );
    // a missing file is named
    let e = pipe
        .embed_images(&[d.join("nope.png")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.png"), "{e}");
    std::fs::remove_dir_all(&d).ok();
    Ok(())
}

#[test]
fn pairs_embed_with_a_tokenizer_and_mae_refuses_captions() -> anyhow::Result<()> {
    let s = scenes();
    let images: Vec<RgbImage> = (0..3).map(|i| scene_image(&s, i)).collect();
    let captions: Vec<String> = (0..3).map(|i| s.scene(i).caption.clone()).collect();
    let pipe = Pipeline::random_init("tiny", 1, false)?;
    // no checkpoint, no --tokenizer: the error says what to pass
    let e = pipe
        .embed_pairs(&images, &captions)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("--tokenizer: a caption needs a tokenizer"),
        "{e}"
    );
    let pipe = pipe.with_tokenizer(tokenizer(&s))?;
    let joint = pipe.embed_pairs(&images, &captions)?;
    let dim = pipe.config().emb_dim;
    assert_eq!(joint.dims(), &[3, dim]);
    // the caption changes the joint features, not the image-only ones
    let swapped = [
        captions[1].clone(),
        captions[0].clone(),
        captions[2].clone(),
    ];
    let other = pipe.embed_pairs(&images, &swapped)?;
    assert!(max_diff(&joint.narrow(0, 0, 1)?, &other.narrow(0, 0, 1)?) > 1e-4);
    assert_eq!(
        max_diff(&joint.narrow(0, 2, 1)?, &other.narrow(0, 2, 1)?),
        0.0
    );
    let e = pipe.embed_pairs(&images, &captions[..2]).unwrap_err();
    assert!(e.to_string().contains("3 images but 2 captions"), "{e}");
    // mean pooling leaves the padding out: a row equals its own mean
    let mean = Pipeline::load(
        pipe.source(),
        &PipelineOptions {
            pooling: Pooling::Mean,
            ..Default::default()
        },
    )?
    .with_tokenizer(tokenizer(&s))?;
    let m = mean.embed_pairs(&images[..1], &captions[..1])?;
    assert_eq!(m.dims(), &[1, dim]);
    assert!(max_diff(&m, &joint.narrow(0, 0, 1)?) > 1e-4);
    let mae = Pipeline::random_init("tiny", 1, true)?;
    let e = mae.embed_pairs(&images, &captions).unwrap_err().to_string();
    assert_eq!(
        e,
        "random-init MAE preset tiny (seed 1): an image-only MAE takes no captions"
    );
    assert!(mae.predict_masked_words(&images[0], &captions[0]).is_err());
    Ok(())
}

#[test]
fn checkpoints_bring_their_tokenizer_and_reconstruct_like_the_function() -> anyhow::Result<()> {
    let d = tmp("ckpt");
    let s = scenes();
    let tok = tokenizer(&s);
    let run = d.join("run");
    let ckpt = run.join("checkpoints/step-00000002");
    std::fs::create_dir_all(&ckpt)?;
    tok.save(run.join("tokenizer.json"))?;
    let cfg = M3aeConfig::preset("tiny")?;
    let model = AnyModel::init(m3ae_model::Variant::M3ae, &cfg, 2, &Device::Cpu)?;
    model.save(&ckpt.join("model.safetensors"))?;
    let opts = PipelineOptions {
        mask_seed: 3,
        ..Default::default()
    };
    let pipe = Pipeline::from_pretrained(&run, &opts)?;
    assert_eq!(pipe.resolved(), Some(ckpt.as_path()));
    assert!(pipe.identity()?.contains("model.safetensors"));
    let image = scene_image(&s, 0);
    let caption = s.scene(0).caption.clone();
    let r = pipe.reconstruct(&image, Some(&caption))?;
    assert_eq!(
        pipe.tokenizer_and_source()?.1,
        run.join("tokenizer.json").display().to_string()
    );
    let want = reconstruct(
        &model,
        &image,
        Some((&caption, &tok)),
        3,
        opts.normalization,
    )?;
    assert_eq!(r.panels, want.panels);
    assert_eq!(r.words, want.words);
    assert!(!r.words.is_empty());
    let words = pipe.predict_masked_words(&image, &caption)?;
    let want_words: Vec<String> = want.words.iter().map(|w| w.2.clone()).collect();
    assert_eq!(words, want_words);
    // a tokenizer larger than the model's vocabulary is refused, naming the file
    let mut small = cfg.clone();
    small.text_vocab_size = 100;
    let small_run = d.join("small");
    std::fs::create_dir_all(&small_run)?;
    tok.save(small_run.join("tokenizer.json"))?;
    AnyModel::init(m3ae_model::Variant::M3ae, &small, 2, &Device::Cpu)?
        .save(&small_run.join("model.safetensors"))?;
    let pipe = Pipeline::from_pretrained(&small_run, &opts)?;
    let e = pipe
        .reconstruct(&image, Some(&caption))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("--tokenizer \""), "{e}");
    assert!(e.ends_with("is larger than the model's (100)"), "{e}");
    // without a caption no tokenizer is needed
    assert_eq!(pipe.reconstruct(&image, None)?.words.len(), 0);
    // a missing checkpoint is named
    let e = Pipeline::from_pretrained(d.join("none"), &opts).unwrap_err();
    assert!(e.to_string().contains("none"), "{e}");
    std::fs::remove_dir_all(&d).ok();
    Ok(())
}
