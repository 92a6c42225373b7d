//! Where the image loss of a model trained on the captioned scenes stands against two oracles:
//! one that knows each scene without its background noise texture (the irreducible floor of
//! the loss) and one that predicts the plain background colour everywhere (a model that has
//! learned the background but none of the objects). The masked patches are split into those
//! that show part of an object and those that show background only.
//!
//! ```text
//! cargo run --release --example scene_floor                          # runs/tiny-scenes
//! cargo run --release --example scene_floor -- runs/x --scenes 512 --seed 1
//! ```
//!
//! Held-out scenes (the test split), the evaluation transform (the scenes are drawn at the
//! model's image size), CC12M normalisation, per-sample random masks at the model's ratio, the
//! caption given to an M3AE model with its text masked at the model's ratio.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use m3ae::data::{CaptionedScenes, Normalization, SceneSplit, ScenesConfig};
use m3ae::eval::{find_tokenizer, load_model, ModelSource};
use m3ae::model::{patchify, AnyModel, Masking, ModelInput, Noise};
use rand::Rng;

/// Sums of squared errors per patch class: (background patches, object patches).
#[derive(Default)]
struct Sums {
    sse: [f64; 2],
    n: [usize; 2],
}

impl Sums {
    fn add(&mut self, class: usize, e: f64) {
        self.sse[class] += e;
        self.n[class] += 1;
    }
    fn mean(&self, class: Option<usize>) -> f64 {
        match class {
            Some(c) => self.sse[c] / self.n[c].max(1) as f64,
            None => (self.sse[0] + self.sse[1]) / (self.n[0] + self.n[1]).max(1) as f64,
        }
    }
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut checkpoint = "runs/tiny-scenes".to_string();
    let (mut count, mut seed) = (256usize, 0u64);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--scenes" => count = args.next().context("--scenes N")?.parse()?,
            "--seed" => seed = args.next().context("--seed N")?.parse()?,
            other => checkpoint = other.to_string(),
        }
    }
    let model = load_model(
        &ModelSource::Checkpoint(checkpoint.clone().into()),
        &candle_core::Device::Cpu,
    )?;
    let cfg = model.config().clone();
    let dev = Device::Cpu;
    let scenes = CaptionedScenes::new(ScenesConfig {
        split: SceneSplit::Test,
        len: count,
        image_size: cfg.image_size,
        ..Default::default()
    })?;
    let tokenizer = match &model {
        AnyModel::M3ae(_) => Some(find_tokenizer(None, Some(checkpoint.as_ref()))?),
        AnyModel::Mae(_) => None,
    };
    let (mean, std) = Normalization::Cc12m.mean_std();
    let to_patches = |px: &[u8]| -> Result<Tensor> {
        let v: Vec<f32> = px
            .iter()
            .enumerate()
            .map(|(i, &p)| (p as f32 / 255.0 - mean[i % 3]) / std[i % 3])
            .collect();
        let t = Tensor::from_vec(v, (1, cfg.image_size, cfg.image_size, 3), &dev)?;
        Ok(patchify(&t, cfg.patch_size)?)
    };
    let li = cfg.num_patches();
    let keep = cfg.image_keep(li);
    // image and text masks from their own streams: every model sees the same image masks
    let mut rng = m3ae::data::seed::rng(seed, 0, 0, 0);
    let mut text_rng = m3ae::data::seed::rng(seed, 1, 0, 0);
    let (mut model_err, mut clean_err, mut bg_err) =
        (Sums::default(), Sums::default(), Sums::default());
    for i in 0..count {
        let layers = scenes.scene_layers(i);
        let (noisy, clean, bg) = (
            to_patches(&layers.pixels)?,
            to_patches(&layers.clean)?,
            to_patches(&layers.background)?,
        );
        let noise: Vec<f32> = (0..li).map(|_| rng.random()).collect();
        let im = Masking::new(&Noise::Shared(noise), 1, keep, &dev)?;
        let pred = match (&model, &tokenizer) {
            (AnyModel::Mae(m), _) => m.forward(&noisy, &im)?.image,
            (AnyModel::M3ae(m), Some(tok)) => {
                let t = tok.encode(&scenes.scene(i).caption, cfg.text_length)?;
                let n = t.ids.len();
                let pad: Vec<f32> = t.padding.iter().map(|&p| p as f32).collect();
                let text_noise: Vec<f32> = (0..n).map(|_| text_rng.random()).collect();
                let tm = Masking::new(&Noise::Shared(text_noise), 1, cfg.text_keep(n), &dev)?;
                let input = ModelInput {
                    image_patches: Some(noisy.clone()),
                    text_ids: Some(Tensor::from_vec(t.ids.clone(), (1, n), &dev)?),
                    text_padding: Some(Tensor::from_vec(pad, (1, n), &dev)?),
                };
                m.forward_train(&input, Some(&im), Some(&tm))?.image
            }
            (AnyModel::M3ae(_), None) => unreachable!("M3AE models have a tokenizer"),
        }
        .context("the model returned no image")?;
        // a normalised-pixel model predicts standardised patches: in pixels with the true
        // patch's statistics (as MAE shows them), which hands it each patch's mean and contrast
        let pred = m3ae::model::loss::prediction_pixels(&pred, &noisy, cfg.image_target)?;
        let rows = |t: &Tensor| -> Result<Vec<Vec<f32>>> { Ok(t.squeeze(0)?.to_vec2::<f32>()?) };
        let (pred, noisy, clean, bg) = (rows(&pred)?, rows(&noisy)?, rows(&clean)?, rows(&bg)?);
        let mask = im.mask.squeeze(0)?.to_vec1::<f32>()?;
        let mse = |a: &[f32], b: &[f32]| -> f64 {
            a.iter()
                .zip(b)
                .map(|(x, y)| ((x - y) as f64).powi(2))
                .sum::<f64>()
                / a.len() as f64
        };
        for p in (0..li).filter(|&p| mask[p] > 0.5) {
            // a patch shows an object when its noise-free rendering differs from the background
            let class = usize::from(clean[p] != bg[p]);
            model_err.add(class, mse(&pred[p], &noisy[p]));
            clean_err.add(class, mse(&clean[p], &noisy[p]));
            bg_err.add(class, mse(&bg[p], &noisy[p]));
        }
    }
    let n = model_err.n;
    if cfg.image_target != m3ae::model::ImageTarget::Pixels {
        println!(
            "note: the model predicts normalised patches; they are rescaled with each true \
             patch's mean and standard deviation, so its row is not comparable with the oracles'"
        );
    }
    println!(
        "{count} held-out scenes, {} masked patches: {} background only, {} with an object ({:.1}%)",
        n[0] + n[1],
        n[0],
        n[1],
        100.0 * n[1] as f64 / (n[0] + n[1]).max(1) as f64
    );
    println!("| predictor | masked patches | background patches | object patches |");
    println!("|---|---|---|---|");
    for (name, s) in [
        ("the model", &model_err),
        (
            "oracle: the scene without its noise texture (the floor)",
            &clean_err,
        ),
        ("oracle: the plain background colour everywhere", &bg_err),
    ] {
        println!(
            "| {name} | {:.4} | {:.4} | {:.4} |",
            s.mean(None),
            s.mean(Some(0)),
            s.mean(Some(1))
        );
    }
    Ok(())
}
