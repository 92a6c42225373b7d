//! Loader behaviour: the same batches for a seed whatever the thread count, resume from a saved
//! position, drop-last and epochs, masks from (seed, step), and mixing with unpaired text.

mod common;
use common::*;
use m3ae_data::*;
use std::sync::Arc;

/// One tokenizer for all tests of the binary (trained once on scene captions).
fn tokenizer() -> Arc<Tokenizer> {
    static TOK: std::sync::OnceLock<Arc<Tokenizer>> = std::sync::OnceLock::new();
    TOK.get_or_init(|| {
        let scenes = CaptionedScenes::new(ScenesConfig::default()).unwrap();
        let corpus = scenes.corpus(300);
        Arc::new(Tokenizer::train_wordpiece(corpus.iter().map(String::as_str), 300).unwrap())
    })
    .clone()
}

/// A comparable digest of a batch: keys, all tensor values, masks.
type Digest = (Vec<String>, Vec<f32>, Vec<u32>, Vec<f32>, Vec<f32>);

fn digest(b: &Batch) -> Digest {
    let i = &b.input;
    (
        b.keys.clone(),
        i.image_patches
            .as_ref()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap(),
        i.text_ids
            .as_ref()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap(),
        b.image_masking
            .as_ref()
            .unwrap()
            .mask
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap(),
        b.text_masking
            .as_ref()
            .unwrap()
            .mask
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap(),
    )
}

fn shard_loader(dir: &TempDir, threads: usize) -> Loader {
    let shards = write_shards(dir.path(), &[9, 7, 8]);
    let mut cfg = LoaderConfig::pretrain(4, 32, 8);
    cfg.num_threads = threads;
    cfg.shuffle_buffer = 6;
    cfg.seed = 11;
    cfg.epochs = Some(2);
    cfg.text_len = Some(12);
    Loader::new(
        Arc::new(WebDataset::new(shards).unwrap()),
        Some(tokenizer()),
        cfg,
    )
    .unwrap()
}

#[test]
fn same_batches_for_one_and_two_threads() {
    let dir = TempDir::new("det");
    let one: Vec<_> = shard_loader(&dir, 1)
        .iter(Position::default())
        .map(|b| digest(&b.unwrap()))
        .collect();
    let two: Vec<_> = shard_loader(&dir, 2)
        .iter(Position::default())
        .map(|b| digest(&b.unwrap()))
        .collect();
    // 24 samples, batch 4, drop-last, 2 epochs
    assert_eq!(one.len(), 12);
    assert_eq!(one, two);
    // the two epochs are shuffled differently, and each sees every sample once
    let e0: Vec<String> = one[..6].iter().flat_map(|d| d.0.clone()).collect();
    let e1: Vec<String> = one[6..].iter().flat_map(|d| d.0.clone()).collect();
    assert_ne!(e0, e1);
    let mut s0 = e0.clone();
    s0.sort();
    s0.dedup();
    assert_eq!(s0.len(), 24);
    // a different seed gives different batches
    let mut other = shard_loader(&dir, 2);
    let mut cfg = other.config().clone();
    cfg.seed = 12;
    other = Loader::new(
        Arc::new(WebDataset::from_spec(&format!("{}/*.tar", dir.path().display())).unwrap()),
        Some(tokenizer()),
        cfg,
    )
    .unwrap();
    let first = digest(&other.iter(Position::default()).next().unwrap().unwrap());
    assert_ne!(first, one[0]);
}

#[test]
fn resume_from_a_saved_position_sees_the_same_batches() {
    let dir = TempDir::new("resume");
    let loader = shard_loader(&dir, 2);
    let all: Vec<Batch> = loader
        .iter(Position::default())
        .map(|b| b.unwrap())
        .collect();
    for cut in [0usize, 2, 5, 6, 9] {
        // save the position (through JSON, as a checkpoint would) after batch `cut`
        let json = serde_json::to_string(&all[cut].position).unwrap();
        let pos: Position = serde_json::from_str(&json).unwrap();
        let rest: Vec<_> = loader.iter(pos).map(|b| digest(&b.unwrap())).collect();
        let want: Vec<_> = all[cut + 1..].iter().map(digest).collect();
        assert_eq!(rest, want, "resume after batch {cut}");
        assert_eq!(all[cut].step, cut as u64);
    }
}

#[test]
fn drop_last_epochs_and_eval_config() {
    let scenes = Arc::new(
        CaptionedScenes::new(ScenesConfig {
            len: 10,
            ..Default::default()
        })
        .unwrap(),
    );
    let mut cfg = LoaderConfig::eval(4, 32, 16);
    let loader = Loader::new(scenes.clone(), None, cfg.clone()).unwrap();
    let sizes: Vec<usize> = loader
        .iter(Position::default())
        .map(|b| b.unwrap().keys.len())
        .collect();
    assert_eq!(sizes, [4, 4, 2]);
    cfg.drop_last = true;
    cfg.epochs = Some(3);
    let loader = Loader::new(scenes, None, cfg).unwrap();
    let batches: Vec<Batch> = loader
        .iter(Position::default())
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(batches.len(), 6);
    assert_eq!(batches[5].epoch, 2);
    let b = &batches[0];
    assert!(b.input.text_ids.is_none() && b.image_masking.is_none());
    assert_eq!(b.labels_tensor().unwrap().unwrap().dims(), &[4]);
    // eval without shuffle and a test transform is fully deterministic in order
    assert_eq!(b.keys[0], "captioned-scenes/train/0");
}

#[test]
fn masks_depend_on_seed_and_step_only() {
    let scenes = Arc::new(
        CaptionedScenes::new(ScenesConfig {
            len: 16,
            ..Default::default()
        })
        .unwrap(),
    );
    let mut cfg = LoaderConfig::pretrain(4, 32, 8);
    cfg.epochs = Some(1);
    cfg.text_len = Some(16);
    let tok = tokenizer();
    let a: Vec<Batch> = Loader::new(scenes.clone(), Some(tok.clone()), cfg.clone())
        .unwrap()
        .iter(Position::default())
        .map(|b| b.unwrap())
        .collect();
    let sampler = MaskSampler::new(cfg.seed, NoiseKind::Shared);
    for b in &a {
        let m = sampler
            .masking(
                b.step,
                masks::Stream::Image,
                4,
                16,
                0.75,
                &candle_core::Device::Cpu,
            )
            .unwrap();
        assert_eq!(
            m.mask.to_vec2::<f32>().unwrap(),
            b.image_masking
                .as_ref()
                .unwrap()
                .mask
                .to_vec2::<f32>()
                .unwrap()
        );
        assert_eq!(b.image_masking.as_ref().unwrap().keep, 4);
        assert_eq!(b.text_masking.as_ref().unwrap().keep, 4);
    }
    assert_ne!(
        a[0].image_masking
            .as_ref()
            .unwrap()
            .mask
            .to_vec2::<f32>()
            .unwrap(),
        a[1].image_masking
            .as_ref()
            .unwrap()
            .mask
            .to_vec2::<f32>()
            .unwrap()
    );
    cfg.masks = Some(MaskConfig {
        noise: NoiseKind::PerSample,
        ..Default::default()
    });
    let b = Loader::new(scenes, Some(tok), cfg)
        .unwrap()
        .iter(Position::default())
        .next()
        .unwrap()
        .unwrap();
    let m = b.image_masking.unwrap().mask.to_vec2::<f32>().unwrap();
    assert_ne!(m[0], m[1]);
}

#[test]
fn paired_stream_mixed_with_unpaired_text() {
    let dir = TempDir::new("mix");
    let txt = dir.path().join("corpus.txt");
    let lines: Vec<String> = ["red", "green", "blue", "yellow", "purple", "orange", "cyan"]
        .iter()
        .map(|c| format!("a {c} ring on the left"))
        .collect();
    std::fs::write(&txt, lines.join("\n")).unwrap();
    let scenes = Arc::new(
        CaptionedScenes::new(ScenesConfig {
            len: 12,
            ..Default::default()
        })
        .unwrap(),
    );
    let mut cfg = LoaderConfig::pretrain(3, 32, 16);
    cfg.epochs = Some(2);
    cfg.unpaired_text_len = 20;
    let tok = tokenizer();
    let loader = Loader::new(scenes, Some(tok.clone()), cfg)
        .unwrap()
        .with_unpaired_text(Arc::new(TextCorpus::from_file(&txt).unwrap()))
        .unwrap();
    let all: Vec<Batch> = loader
        .iter(Position::default())
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(all.len(), 8);
    let mut seen = Vec::new();
    for b in &all {
        let u = b.unpaired.as_ref().unwrap();
        assert_eq!(u.ids.dims(), &[3, 20]);
        assert_eq!(u.masking.as_ref().unwrap().keep, 5);
        for row in u.ids.to_vec2::<u32>().unwrap() {
            seen.push(tok.decode(&row).unwrap());
        }
    }
    // 24 texts drawn from a 7-line corpus: it cycles through its own epochs
    assert_eq!(seen.len(), 24);
    for l in &lines {
        assert!(seen.iter().filter(|s| s == &l).count() >= 3, "{l}");
    }
    // resume keeps the unpaired stream in step too
    let rest: Vec<Vec<Vec<u32>>> = loader
        .iter(all[4].position.clone())
        .map(|b| b.unwrap().unpaired.unwrap().ids.to_vec2().unwrap())
        .collect();
    let want: Vec<Vec<Vec<u32>>> = all[5..]
        .iter()
        .map(|b| b.unpaired.as_ref().unwrap().ids.to_vec2().unwrap())
        .collect();
    assert_eq!(rest, want);
}

#[test]
fn config_errors() {
    let scenes: Arc<dyn Source> = Arc::new(CaptionedScenes::new(ScenesConfig::default()).unwrap());
    let cfg = LoaderConfig::pretrain(4, 30, 16);
    assert!(Loader::new(scenes.clone(), Some(tokenizer()), cfg).is_err());
    let cfg = LoaderConfig::pretrain(4, 32, 16);
    let err = Loader::new(scenes.clone(), None, cfg).unwrap_err();
    assert!(err.to_string().contains("tokenizer"), "{err}");
    let mut cfg = LoaderConfig::pretrain(0, 32, 16);
    cfg.text_len = None;
    assert!(Loader::new(scenes, None, cfg).is_err());
}

/// The in-memory source of the tests below (pixel images, every third one corrupt: a buffer of
/// the wrong size), described as "mixed".
fn mixed(samples: Vec<Sample>) -> InMemory {
    InMemory::new(samples).described("mixed")
}

#[test]
fn batches_hold_patchified_transforms_even_around_bad_samples() {
    // The loader writes each sample's normalised patches straight into the batch and closes
    // the gaps bad samples leave; check every slot against `apply` + `m3ae_model::patchify`.
    let (w, h) = (40usize, 30usize);
    let samples: Vec<Sample> = (0..23)
        .map(|i| {
            let data: Vec<u8> = (0..w * h * 3)
                .map(|j| ((j * 7 + i * 31) % 251) as u8)
                .collect();
            let data = if i % 3 == 1 { data[1..].to_vec() } else { data };
            Sample {
                key: format!("s{i}"),
                image: Some(ImageData::Pixels {
                    width: w,
                    height: h,
                    channels: 3,
                    data,
                }),
                text: None,
                label: None,
                file: "memory".into(),
                ..Default::default()
            }
        })
        .collect();
    let mut cfg = LoaderConfig::pretrain(4, 16, 4);
    cfg.text_len = None;
    cfg.masks = None;
    cfg.shuffle_buffer = 0;
    cfg.epochs = Some(1);
    cfg.drop_last = false;
    cfg.max_bad_fraction = 0.5;
    cfg.num_threads = 2;
    let ic = cfg.image.unwrap();
    let src = Arc::new(mixed(samples.clone()));
    let mut seen = 0;
    for b in Loader::new(src, None, cfg.clone())
        .unwrap()
        .iter(Position::default())
    {
        let b = b.unwrap();
        let got = b.input.image_patches.unwrap();
        for (slot, key) in b.keys.iter().enumerate() {
            let idx: usize = key[1..].parse().unwrap();
            assert_ne!(idx % 3, 1, "a corrupt sample was kept");
            let img = RgbImage::from_data(samples[idx].image.as_ref().unwrap()).unwrap();
            let mut rng = seed::rng(cfg.seed, seed::purpose::AUGMENT, 0, idx as u64);
            let hwc = ic.apply(&img, &mut rng);
            let t = candle_core::Tensor::from_vec(hwc, (1, 16, 16, 3), &candle_core::Device::Cpu)
                .unwrap();
            let want = m3ae_model::patchify(&t, 4).unwrap().squeeze(0).unwrap();
            let have = got.get(slot).unwrap();
            let d: f32 = (have - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(d == 0.0, "sample {key} differs by {d}");
            seen += 1;
        }
    }
    assert_eq!(seen, 23 - 8);
}

#[test]
fn not_enough_data_names_the_data_the_usable_count_and_the_batch() {
    let samples: Vec<Sample> = (0..3)
        .map(|i| Sample {
            key: format!("s{i}"),
            image: Some(ImageData::Pixels {
                width: 8,
                height: 8,
                channels: 3,
                data: vec![i as u8; 8 * 8 * 3],
            }),
            file: "memory".into(),
            ..Default::default()
        })
        .collect();
    let mut cfg = LoaderConfig::pretrain(4, 16, 8);
    cfg.text_len = None;
    cfg.masks = None;
    cfg.epochs = None;
    let loader = Loader::new(Arc::new(mixed(samples)), None, cfg).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(loader.iter(Position::default()).find_map(|b| b.err()));
    });
    let err = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the loader ends")
        .expect("an error");
    assert!(
        matches!(
            &err,
            Error::NotEnoughData { data, usable: 3, batch_size: 4, drop_last: true, .. }
                if data == "mixed"
        ),
        "{err}"
    );
}

#[test]
fn text_only_loading_keeps_samples_whose_image_is_at_fault() {
    let fault = || PartFault {
        reason: BadReason::Oversized,
        detail: "k.jpg: too big".into(),
    };
    let samples: Vec<Sample> = (0..4)
        .map(|i| Sample {
            key: format!("s{i}"),
            text: Some(format!("a red cube {i}")),
            image_fault: (i % 2 == 1).then(fault),
            image: (i % 2 == 0).then(|| ImageData::Pixels {
                width: 8,
                height: 8,
                channels: 3,
                data: vec![9; 8 * 8 * 3],
            }),
            file: "memory".into(),
            ..Default::default()
        })
        .collect();
    let mut cfg = LoaderConfig::pretrain(4, 16, 8);
    cfg.image = None;
    cfg.masks = None;
    cfg.text_len = Some(8);
    cfg.shuffle_buffer = 0;
    cfg.epochs = Some(1);
    let src = Arc::new(mixed(samples));
    let b: Vec<Batch> = Loader::new(src.clone(), Some(tokenizer()), cfg.clone())
        .unwrap()
        .iter(Position::default())
        .collect::<Result<_>>()
        .unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].keys, ["s0", "s1", "s2", "s3"]);
    // with images the faulty ones are skipped with the reader's reason
    cfg.image = Some(ImageConfig {
        size: 16,
        ..Default::default()
    });
    cfg.batch_size = 2;
    cfg.max_bad_fraction = 1.0;
    let b: Vec<Batch> = Loader::new(src, Some(tokenizer()), cfg)
        .unwrap()
        .iter(Position::default())
        .collect::<Result<_>>()
        .unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].keys, ["s0", "s2"]);
    // counted up to the batch: s1 (s3 comes after it)
    let st = &b[0].position.stats;
    assert_eq!(st.count(BadReason::Oversized), 1, "{st}");
    assert_eq!(st.examples[0].detail, "k.jpg: too big");
}
