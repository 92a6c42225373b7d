//! Can the model draw an object it cannot see, from the words that name it?
//!
//! For held-out scenes (the test split) every patch that touches the main object is masked
//! (plus random others up to the model's mask ratio), and the model is given a caption that
//! names only that object ("large red circle at the top left"), with all of its words visible.
//! The same masked image is reconstructed four times: with that caption, with the caption's
//! colour word swapped for another colour, with its shape word swapped for another shape, and
//! with no caption at all. A model that reads the caption puts the object there, in the named
//! colour; the swapped colour changes its colour, and a model that draws shapes from words
//! scores worse with the swapped shape than with the right one.
//!
//! ```text
//! cargo run --release --example named_object                        # runs/tiny-scenes
//! cargo run --release --example named_object -- runs/x --rows 6 --scenes 256 --out panel.png
//! ```
//!
//! Prints, over `--scenes` scenes, the mean squared error (RGB in [0, 1]) on the hidden object's
//! patches for each caption, and for four drawings that need no model: the plain background (a
//! model that draws no object), the object drawn from its caption alone (named shape, colour and
//! size at its cell's centre: what reading the words could give), the same in another shape (a
//! model that reads the words but draws the wrong shape), and the mean of the same drawn in each
//! shape the training split uses (the best a model that reads place, colour and size but not the
//! shape could draw at the cell's centre), then the last two averaged over the position jitter
//! and size variation the words do not give (`CaptionedScenes::named_variants`): the drawings of
//! least squared error from the words with and without the shape. Their difference, over what
//! the words can take off the background's error, is the share of the caption's worth that is
//! the shape, printed for all scenes and for small and large objects apart. It writes `--rows` of
//! them as a PNG (default
//! `<checkpoint>/named-object.png`): original | masked input | with the caption | colour
//! swapped | shape swapped | no caption, the captions of each row in the text output.

use anyhow::{bail, Context, Result};
use m3ae::data::scenes::{Object, COLOURS, SHAPES, SHAPE_WORDS};
use m3ae::data::{CaptionedScenes, Normalization, RgbImage, SceneSplit, ScenesConfig};
use m3ae::eval::panels::{panel_scale, upscale, write_png};
use m3ae::eval::{find_tokenizer, load_model, reconstruct_with, MaskNoise, ModelSource};
use rand::Rng;
use std::path::PathBuf;

/// Mean squared error (RGB scaled to [0, 1]) of `got` against `want` over the pixels of
/// `patches`.
fn patch_mse(got: &[u8], want: &[u8], patches: &[usize], grid: usize, patch: usize) -> f64 {
    let side = grid * patch;
    let (mut sse, mut n) = (0f64, 0usize);
    for &p in patches {
        let (px, py) = (p % grid, p / grid);
        for y in py * patch..(py + 1) * patch {
            for x in px * patch..(px + 1) * patch {
                for c in 0..3 {
                    let i = (y * side + x) * 3 + c;
                    let d = (got[i] as f64 - want[i] as f64) / 255.0;
                    sse += d * d;
                    n += 1;
                }
            }
        }
    }
    sse / n.max(1) as f64
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut checkpoint = PathBuf::from("runs/tiny-scenes");
    let (mut rows, mut count, mut seed, mut out) = (6usize, 256usize, 0u64, None);
    while let Some(a) = args.next() {
        let mut value = |flag: &str| args.next().with_context(|| format!("{flag} needs a value"));
        match a.as_str() {
            "--rows" => rows = value("--rows")?.parse()?,
            "--scenes" => count = value("--scenes")?.parse()?,
            "--seed" => seed = value("--seed")?.parse()?,
            "--out" => out = Some(PathBuf::from(value("--out")?)),
            flag if flag.starts_with("--") => bail!("unknown flag {flag}"),
            other => checkpoint = other.into(),
        }
    }
    let out = out.unwrap_or_else(|| checkpoint.join("named-object.png"));
    let model = load_model(
        &ModelSource::Checkpoint(checkpoint.clone()),
        &candle_core::Device::Cpu,
    )?;
    let tok = find_tokenizer(None, Some(&checkpoint))?;
    let cfg = model.config().clone();
    let (size, patch) = (cfg.image_size, cfg.patch_size);
    let grid = size / patch;
    let li = grid * grid;
    let masked = li - cfg.image_keep(li);
    let scenes = CaptionedScenes::new(ScenesConfig {
        split: SceneSplit::Test,
        len: count,
        image_size: size,
        ..Default::default()
    })?;
    let norm = Normalization::Cc12m;
    // the shapes the training split draws (a swapped shape word is one the model was trained on)
    let train_shapes: Vec<usize> = (0..SHAPES.len())
        .filter(|s| !scenes.config().held_out_shapes.contains(s))
        .collect();
    let mut rng = m3ae::data::seed::rng(seed, 0, 0, 0);
    let (mut sums, mut shown) = ([0f64; 10], 0usize);
    let mut canvas_rows: Vec<[Vec<u8>; 6]> = Vec::new();
    // per size (small, large): scenes, and the sums of the six oracles
    let mut by_size = [(0usize, [0f64; 6]); 2];
    for i in 0..count {
        let scene = scenes.scene(i);
        let o = scene.objects[0];
        let hidden = o.patches(grid, patch);
        if hidden.len() > masked {
            continue;
        }
        // hidden patches get the highest noise (masked first), the rest a random order
        let mut noise: Vec<f32> = (0..li).map(|_| rng.random::<f32>()).collect();
        for &p in &hidden {
            noise[p] += 2.0;
        }
        // the first text positions (the caption's words) are kept, the padding masked
        let text: Vec<f32> = (0..cfg.text_length).map(|j| j as f32).collect();
        let caption = o.phrase();
        let other = (o.colour + 1 + i % 7) % 8; // another colour the training split uses
        let swapped = caption.replacen(COLOURS[o.colour].0, COLOURS[other].0, 1);
        let others: Vec<usize> = train_shapes
            .iter()
            .copied()
            .filter(|&s| s != o.shape)
            .collect();
        let other_shape = others[i % others.len()];
        let reshaped = caption.replacen(SHAPE_WORDS[o.shape][0], SHAPE_WORDS[other_shape][0], 1);
        let image = RgbImage {
            width: size,
            height: size,
            data: scene.pixels.clone(),
        };
        let masks = MaskNoise {
            image: Some(noise),
            text: Some(text),
        };
        let mut panels = Vec::new();
        for cap in [
            Some(caption.as_str()),
            Some(swapped.as_str()),
            Some(reshaped.as_str()),
            None,
        ] {
            let r = reconstruct_with(&model, &image, cap.map(|c| (c, &tok)), seed, &masks, norm)?;
            if let Some(c) = cap {
                let kept = tok
                    .encode(c, cfg.text_length)?
                    .padding
                    .iter()
                    .filter(|&&p| p == 0)
                    .count();
                if kept > cfg.text_keep(cfg.text_length) {
                    bail!(
                        "the caption `{c}` has {kept} tokens; the model shows only {}",
                        cfg.text_keep(cfg.text_length)
                    );
                }
            }
            panels.push(r);
        }
        let original = &panels[0].panels[0];
        for (k, r) in panels.iter().enumerate() {
            sums[k] += patch_mse(&r.panels[3], original, &hidden, grid, patch);
        }
        // drawings that need no model, each scored on the hidden object's patches
        let named = scenes.as_named(&o);
        let variants = scenes.named_variants(&o, 3);
        // the mean of `shapes` drawn as each of `objects` on the scene's plain background
        let average = |shapes: &[usize], objects: &[Object]| -> Vec<u8> {
            let mut acc = vec![0f64; size * size * 3];
            let n = (shapes.len() * objects.len()) as f64;
            for &shape in shapes {
                for o in objects {
                    let img = scenes.render_on_background(i, &[Object { shape, ..*o }]);
                    for (a, &p) in acc.iter_mut().zip(&img) {
                        *a += p as f64 / n;
                    }
                }
            }
            acc.iter().map(|v| v.round() as u8).collect()
        };
        let oracles = [
            // a model that draws only the background
            scenes.scene_layers(i).background,
            // the named object at its cell's centre with its size's mean radius (jitter and
            // size variation are not in the words), in its shape, in another, and the mean of
            // the training shapes (every word read but the shape)
            average(&[o.shape], &[named]),
            average(&[other_shape], &[named]),
            average(&train_shapes, &[named]),
            // the first and last averaged over the jitter and size variation the words do not
            // give: the least-squares drawings from the words with and without the shape
            average(&[o.shape], &variants),
            average(&train_shapes, &variants),
        ];
        let by = &mut by_size[usize::from(o.large)];
        by.0 += 1;
        for (k, img) in oracles.iter().enumerate() {
            let e = patch_mse(img, original, &hidden, grid, patch);
            sums[4 + k] += e;
            by.1[k] += e;
        }
        shown += 1;
        if canvas_rows.len() < rows {
            println!(
                "row {}: \"{caption}\" | colour swapped: \"{swapped}\" | shape swapped: \"{reshaped}\"",
                canvas_rows.len() + 1
            );
            canvas_rows.push([
                original.clone(),
                panels[0].panels[1].clone(),
                panels[0].panels[3].clone(),
                panels[1].panels[3].clone(),
                panels[2].panels[3].clone(),
                panels[3].panels[3].clone(),
            ]);
        }
    }
    if shown == 0 {
        bail!("no scene's object fits in the masked patches");
    }
    println!(
        "{shown} held-out scenes, every patch of the main object masked ({} patches masked of {li}); \
         mean squared error on the object's patches (RGB in [0, 1]):",
        masked
    );
    println!("| caption | object patches |\n|---|---|");
    for (name, s) in [
        "names the object",
        "names it in another colour",
        "names it as another shape",
        "none",
        "(oracle: the plain background, no object)",
        "(oracle: the object drawn where and as the caption says)",
        "(oracle: the same drawn in another shape)",
        "(oracle: the mean of the same drawn in each training shape)",
        "(oracle: the named object averaged over the jitter and size the words do not give)",
        "(oracle: the same averaged over the training shapes too)",
    ]
    .iter()
    .zip(sums)
    {
        println!("| {name} | {:.4} |", s / shown as f64);
    }
    // how much of what the words can take off is the shape, for small and for large objects
    let share = |background: f64, right: f64, mean: f64| {
        100.0 * (mean - right) / (background - right).max(f64::MIN_POSITIVE)
    };
    println!(
        "all ({shown} scenes): the shape is {:.1}% of what the words can take off (averaged \
         over the jitter)",
        share(sums[4], sums[8], sums[9])
    );
    for (size, (n, e)) in ["small", "large"].iter().zip(by_size) {
        if n > 0 {
            let [background, right, _, mean, jittered, agnostic] = e.map(|v| v / n as f64);
            println!(
                "{size} objects ({n} scenes): background {background:.4}; at the cell's centre \
                 right shape {right:.4}, mean of shapes {mean:.4} (shape {:.1}%); averaged over \
                 the jitter right shape {jittered:.4}, mean of shapes {agnostic:.4} (shape {:.1}%)",
                share(background, right, mean),
                share(background, jittered, agnostic)
            );
        }
    }
    let scale = panel_scale(size);
    let side = size * scale;
    let gap = 4;
    let columns = canvas_rows.first().map_or(0, |r| r.len());
    let w = columns * side + columns.saturating_sub(1) * gap;
    let h = canvas_rows.len() * side + canvas_rows.len().saturating_sub(1) * gap;
    let mut data = vec![255u8; w * h * 3];
    for (row, panels) in canvas_rows.iter().enumerate() {
        for (k, p) in panels.iter().enumerate() {
            let big = upscale(p, size, scale);
            let (x0, y0) = (k * (side + gap), row * (side + gap));
            for y in 0..side {
                let d = ((y0 + y) * w + x0) * 3;
                data[d..d + side * 3].copy_from_slice(&big[y * side * 3..(y + 1) * side * 3]);
            }
        }
    }
    write_png(&out, w, h, data)?;
    println!("wrote {}", out.display());
    Ok(())
}
