//! Runs `m3ae embed | probe | ood | reconstruct` on tiny generated data (a random-init tiny
//! model, a small uint8 safetensors file written here, the built-in captioned scenes), and on
//! the real Fashion-MNIST / MNIST when `M3AE_DATA_DIR` is set; WebDataset shards labelled by
//! a json field (written here, and the Tux Paint categories with `M3AE_DATA_DIR`).
//! Errors and hostile input (wrong paths, bad flag values, NaN checkpoints, corrupt shards) are
//! in `tests/eval_cli_errors.rs`; the helpers both share are in `tests/common`.

use common::{random_m3ae, run, s, save_checkpoint, write_category_shard, write_u8_arrays};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn percent_after(stdout: &str, prefix: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?} in {stdout}"));
    let after = line.split("top-1 ").nth(1).expect("a top-1 value");
    after
        .split('%')
        .next()
        .unwrap()
        .trim()
        .parse::<f64>()
        .unwrap()
        / 100.0
}
#[test]
fn embed_writes_features_labels_and_keys() {
    let d = tmp("embed");
    let data = d.join("small.safetensors");
    write_u8_arrays(&data, 40, 6);
    let out = d.join("feats.safetensors");
    let (ok, stdout, stderr) = run(&[
        "embed",
        "--random-init",
        "--data",
        &format!("u8:{}", s(&data)),
        "--out",
        s(&out),
        "--limit",
        "30",
        "--pool",
        "mean",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("30 x 128 features"), "{stdout}");
    let f = m3ae::eval::FeatureSet::load(&out).unwrap();
    assert_eq!(f.features.dims(), &[30, 128]);
    assert_eq!(f.classes, 6);
    assert_eq!(f.keys.len(), 30);
    // evenly strided subset of 40: 0, 1, 2, 4, ...; labels follow the keys
    for (k, l) in f.keys.iter().zip(&f.labels) {
        assert_eq!(k.parse::<usize>().unwrap() % 6, *l as usize);
    }
}

#[test]
fn probe_on_scenes_trains_saves_evaluates_and_caches() {
    let d = tmp("probe");
    let cache = d.join("cache");
    let head = d.join("probe.safetensors");
    let args = [
        "probe",
        "--random-init",
        "--train-data",
        "scenes:train:240",
        "--test-data",
        "scenes:test:120",
        "--epochs",
        "3",
        "--probe-batch",
        "64",
        "--cache-dir",
        s(&cache),
        "--save-probe",
        s(&head),
    ];
    let (ok, stdout, stderr) = run(&args);
    assert!(ok, "{stderr}");
    let top1 = percent_after(&stdout, "probe: ");
    assert!((0.0..=1.0).contains(&top1), "{stdout}");
    assert!(stdout.contains("top-5 "), "{stdout}");
    let knn = percent_after(&stdout, "knn (k=20, T=0.07)");
    assert!(knn > 0.0, "{stdout}");
    assert!(head.is_file());
    // second run: features come from the cache
    let (ok, stdout2, stderr) = run(&args);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("cached features"), "{stderr}");
    assert_eq!(percent_after(&stdout2, "probe: "), top1);
    // the saved head evaluates to the same accuracy
    let (ok, stdout3, stderr) = run(&[
        "probe",
        "--random-init",
        "--test-data",
        "scenes:test:120",
        "--cache-dir",
        s(&cache),
        "--evaluate",
        s(&head),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(percent_after(&stdout3, "probe (evaluated)"), top1);
}

#[test]
fn probe_separates_easy_u8_classes_with_a_saved_checkpoint_run_dir() {
    // a run directory with checkpoints/step-*/model.safetensors (config in the metadata)
    let d = tmp("rundir");
    let model = m3ae::eval::load_model(
        &m3ae::eval::ModelSource::RandomInit {
            preset: "tiny".into(),
            seed: 1,
            mae: false,
        },
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for step in [5u64, 20] {
        let dir = d.join(format!("run/checkpoints/step-{step:08}"));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = serde_json::to_string(model.config()).unwrap();
        model
            .params()
            .save(
                &dir.join("model.safetensors"),
                HashMap::from([("m3ae_config".to_string(), cfg)]),
            )
            .unwrap();
    }
    let data = d.join("easy.safetensors");
    write_u8_arrays(&data, 180, 6);
    let (ok, stdout, stderr) = run(&[
        "probe",
        "--checkpoint",
        s(&d.join("run")),
        "--train-data",
        &format!("u8:{}", s(&data)),
        "--test-data",
        &format!("u8:{}", s(&data)),
        "--epochs",
        "30",
        "--probe-batch",
        "32",
        "--lr",
        "5",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("step-00000020"), "{stdout}");
    assert!(percent_after(&stdout, "probe: ") > 0.9, "{stdout}");
    assert!(percent_after(&stdout, "knn") > 0.9, "{stdout}");
}

#[test]
fn ood_prints_a_table_for_three_scores() {
    let (ok, stdout, stderr) = run(&[
        "ood",
        "--random-init",
        "--train-data",
        "scenes:train:200",
        "--in-data",
        "scenes:test:80",
        "--out-data",
        "scenes:ood:80",
        "--epochs",
        "2",
        "--probe-batch",
        "64",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("AUROC") && stdout.contains("FPR@95"),
        "{stdout}"
    );
    for score in ["msp", "mahalanobis", "knn (k=20)"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(score))
            .unwrap_or_else(|| panic!("{score} row missing: {stdout}"));
        let nums: Vec<f64> = line[14..]
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        assert_eq!(nums.len(), 4, "{line}");
        assert!(nums.iter().all(|v| (0.0..=1.0).contains(v)), "{line}");
    }
}

#[test]
fn reconstruct_writes_panels_attention_and_masked_words() {
    use m3ae::data::{CaptionedScenes, ScenesConfig};
    let d = tmp("recon");
    let scenes = CaptionedScenes::new(ScenesConfig {
        len: 4,
        ..Default::default()
    })
    .unwrap();
    let sc = scenes.scene(0);
    let img = d.join("scene.png");
    image::RgbImage::from_raw(64, 64, sc.pixels.clone())
        .unwrap()
        .save(&img)
        .unwrap();
    // run directory with a checkpoint and its tokenizer (found without --tokenizer)
    let run_dir = d.join("run");
    let ckpt = run_dir.join("checkpoints/step-00000001");
    std::fs::create_dir_all(&ckpt).unwrap();
    let tok = scenes.train_tokenizer(300, 400).unwrap();
    tok.save(run_dir.join("tokenizer.json")).unwrap();
    let model = m3ae::eval::load_model(
        &m3ae::eval::ModelSource::RandomInit {
            preset: "tiny".into(),
            seed: 2,
            mae: false,
        },
        &candle_core::Device::Cpu,
    )
    .unwrap();
    model
        .params()
        .save(
            &ckpt.join("model.safetensors"),
            HashMap::from([(
                "m3ae_config".to_string(),
                serde_json::to_string(model.config()).unwrap(),
            )]),
        )
        .unwrap();
    let out = d.join("recon.png");
    let (ok, stdout, stderr) = run(&[
        "reconstruct",
        "--checkpoint",
        s(&run_dir),
        "--image",
        s(&img),
        "--caption",
        &sc.caption,
        "--out",
        s(&out),
        "--seed",
        "3",
    ]);
    assert!(ok, "{stderr}");
    let png = image::open(&out).unwrap();
    // tiny: 32 px panels magnified 4x, four panels with 4 px gaps
    assert_eq!((png.width(), png.height()), (4 * 128 + 12, 128));
    let att = d.join("recon-attention.png");
    let a = image::open(&att).unwrap();
    assert_eq!((a.width(), a.height()), (128, 128 + 16));
    assert!(stdout.contains("masked patches: 12 of 16"), "{stdout}");
    assert!(stdout.contains("masked word "), "{stdout}");
    assert!(stdout.contains("predicted caption: "), "{stdout}");
    assert!(stdout.contains("cls attention over words: "), "{stdout}");
    // visible patches are pasted back unchanged: panel 4 equals the original on them
    let rgb = png.to_rgb8();
    let (mut same, mut total) = (0, 0);
    for y in 0..128 {
        for x in 0..128 {
            total += 1;
            if rgb.get_pixel(x, y) == rgb.get_pixel(x + 3 * 132, y) {
                same += 1;
            }
        }
    }
    assert!(same * 4 >= total, "{same} of {total}");
}
#[test]
fn probe_labels_webdataset_samples_by_a_json_field() {
    let d = tmp("wds-label");
    let (train, test) = (d.join("train-00000.tar"), d.join("test-00000.tar"));
    write_category_shard(&train, 60, 0);
    write_category_shard(&test, 20, 1000);
    let wds = |p: &Path| format!("wds:{}", s(p));
    let probe = |extra: &[&str]| {
        let mut args = vec![
            "probe".to_string(),
            "--random-init".into(),
            "--train-data".into(),
            wds(&train),
            "--test-data".into(),
            wds(&test),
            "--epochs".into(),
            "30".into(),
            "--probe-batch".into(),
            "16".into(),
            "--lr".into(),
            "2".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // two classes (`cold`, `warm`) at depth 1: red vs blue separates them
    let (ok, stdout, stderr) = probe(&["--label-field", "category", "--label-depth", "1"]);
    assert!(ok, "{stderr}");
    assert!(percent_after(&stdout, "probe: ") > 0.9, "{stdout}");
    assert!(stdout.contains("top-2 "), "{stdout}");
    // the whole value: still two classes here
    let (ok, stdout, stderr) = probe(&["--label-field", "category"]);
    assert!(ok, "{stderr}");
    assert!(percent_after(&stdout, "knn") > 0.9, "{stdout}");
    // the embedded labels follow the sorted classes: cold = 0, warm = 1
    let out = d.join("feats.safetensors");
    let (ok, _, stderr) = run(&[
        "embed",
        "--random-init",
        "--data",
        &wds(&test),
        "--label-field",
        "category",
        "--label-depth",
        "1",
        "--out",
        s(&out),
    ]);
    assert!(ok, "{stderr}");
    let f = m3ae::eval::FeatureSet::load(&out).unwrap();
    assert_eq!(f.classes, 2);
    for (k, l) in f.keys.iter().zip(&f.labels) {
        assert_eq!(*l, (k.parse::<usize>().unwrap() % 2 == 0) as i64, "{k}");
    }
    // errors name the field, the flag or the data
    let (ok, _, stderr) = probe(&["--label-field", "colour"]);
    assert!(
        !ok && stderr.contains("colour") && stderr.contains("test-00000.tar"),
        "{stderr}"
    );
    let (ok, _, stderr) = probe(&[]);
    assert!(!ok && stderr.contains("--label-field"), "{stderr}");
    let (ok, _, stderr) = probe(&["--label-field", "category", "--label-depth", "0"]);
    assert!(!ok && stderr.contains("--label-depth"), "{stderr}");
    let (ok, _, stderr) = probe(&["--label-field", "category", "--limit", "5"]);
    assert!(!ok && stderr.contains("--limit"), "{stderr}");
    let (ok, _, stderr) = run(&[
        "probe",
        "--random-init",
        "--train-data",
        "scenes:train:20",
        "--test-data",
        "scenes:test:20",
        "--label-field",
        "category",
    ]);
    assert!(!ok && stderr.contains("webdataset"), "{stderr}");
}
fn data_dir() -> PathBuf {
    std::env::var_os("M3AE_DATA_DIR")
        .map(PathBuf::from)
        .expect("this test reads real data: set M3AE_DATA_DIR")
}

#[test]
#[ignore = "needs the real Fashion-MNIST and MNIST under $M3AE_DATA_DIR"]
fn fashion_mnist_probe_and_mnist_ood_with_m3ae_data_dir() {
    let root = data_dir();
    let fm = |split: &str| {
        format!(
            "fashion_mnist:{}",
            s(&root.join(format!("fashion_mnist/{split}.safetensors")))
        )
    };
    let mn = format!("mnist:{}", s(&root.join("mnist/test.safetensors")));
    let (ok, stdout, stderr) = run(&[
        "probe",
        "--random-init",
        "--train-data",
        &fm("train"),
        "--test-data",
        &fm("test"),
        "--train-limit",
        "2000",
        "--limit",
        "1000",
        "--epochs",
        "10",
        "--lr",
        "5",
    ]);
    assert!(ok, "{stderr}");
    // random features still separate Fashion-MNIST well above chance (10%)
    assert!(percent_after(&stdout, "probe: ") > 0.4, "{stdout}");
    assert!(percent_after(&stdout, "knn") > 0.5, "{stdout}");
    let (ok, stdout, stderr) = run(&[
        "ood",
        "--random-init",
        "--train-data",
        &fm("train"),
        "--in-data",
        &fm("test"),
        "--out-data",
        &mn,
        "--train-limit",
        "2000",
        "--limit",
        "1000",
        "--epochs",
        "10",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("mahalanobis"), "{stdout}");
}

#[test]
#[ignore = "needs the real Tux Paint shards under $M3AE_DATA_DIR"]
fn tuxpaint_category_probe_with_m3ae_data_dir() {
    let root = data_dir();
    let shard = |split: &str| {
        format!(
            "wds:{}",
            s(&root.join(format!("tuxpaint_captions/{split}-00000.tar")))
        )
    };
    let (ok, stdout, stderr) = run(&[
        "probe",
        "--random-init",
        "--train-data",
        &shard("train"),
        "--test-data",
        &shard("test"),
        "--label-field",
        "category",
        "--label-depth",
        "1",
        "--epochs",
        "40",
        "--lr",
        "2",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("features: train 851, test 99"), "{stdout}");
    // 16 top-level categories; the most frequent test class (symbols) is 26 of 99
    let top1 = percent_after(&stdout, "probe: ");
    assert!(top1 > 0.2, "{stdout}");
}
#[test]
fn embed_limit_takes_a_subset_of_a_counted_scenes_set() {
    let d = tmp("scenes-limit");
    let out = d.join("f.safetensors");
    let (ok, stdout, stderr) = run(&[
        "embed",
        "--random-init",
        "--data",
        "scenes:train:40",
        "--limit",
        "10",
        "--out",
        s(&out),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("10 x 128 features"), "{stdout}");
    // an evenly strided 10 of the 40 scenes
    let f = m3ae::eval::FeatureSet::load(&out).unwrap();
    let idx: Vec<usize> = f
        .keys
        .iter()
        .map(|k| k.rsplit('/').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(idx, vec![0, 4, 8, 12, 16, 20, 24, 28, 32, 36]);
    // a larger --limit keeps the whole counted set
    let (ok, stdout, stderr) = run(&[
        "embed",
        "--random-init",
        "--data",
        "scenes:train:12",
        "--limit",
        "50",
        "--out",
        s(&out),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("12 x 128 features"), "{stdout}");
}
#[test]
fn models_without_type_embeddings_embed_probe_and_reconstruct() {
    let d = tmp("no-type-emb");
    let mut cfg = m3ae::model::M3aeConfig::preset("tiny").unwrap();
    cfg.use_type_embedding = false;
    let model = random_m3ae(&cfg, 3);
    assert!(!model
        .params()
        .tensors()
        .keys()
        .any(|k| k.contains("type_embedding")));
    let ckpt = save_checkpoint(&d, &model, false);
    let out = d.join("f.safetensors");
    let (ok, stdout, stderr) = run(&[
        "embed",
        "--checkpoint",
        s(&ckpt),
        "--data",
        "scenes:train:16",
        "--out",
        s(&out),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("16 x 128 features"), "{stdout}");
    let (ok, stdout, stderr) = run(&[
        "probe",
        "--checkpoint",
        s(&ckpt),
        "--train-data",
        "scenes:train:60",
        "--test-data",
        "scenes:test:30",
        "--epochs",
        "2",
        "--probe-batch",
        "16",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("probe: top-1 "), "{stdout}");
    use m3ae::data::{CaptionedScenes, ScenesConfig};
    let scenes = CaptionedScenes::new(ScenesConfig {
        len: 4,
        ..Default::default()
    })
    .unwrap();
    let tok = scenes.train_tokenizer(300, 400).unwrap();
    tok.save(d.join("tokenizer.json")).unwrap();
    let sc = scenes.scene(1);
    let img = d.join("scene.png");
    image::RgbImage::from_raw(64, 64, sc.pixels.clone())
        .unwrap()
        .save(&img)
        .unwrap();
    let (ok, stdout, stderr) = run(&[
        "reconstruct",
        "--checkpoint",
        s(&ckpt),
        "--image",
        s(&img),
        "--caption",
        &sc.caption,
        "--out",
        s(&d.join("recon.png")),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("predicted caption: "), "{stdout}");
    assert!(stdout.contains("cls attention over words: "), "{stdout}");
}

mod common;

fn tmp(name: &str) -> PathBuf {
    common::temp_dir("eval", name)
}
