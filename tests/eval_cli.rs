//! Runs `m3ae embed | probe | ood | reconstruct` on tiny generated data (a random-init tiny
//! model, a small uint8 safetensors file written here, the built-in captioned scenes), and on
//! the real Fashion-MNIST / MNIST when `M3AE_DATA_DIR` is set; WebDataset shards labelled by
//! a json field (written here, and the Tux Paint categories with `M3AE_DATA_DIR`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_m3ae"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .expect("the m3ae binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `n` 28x28 grey images of `classes` classes: class c has a bright 8x8 square at a
/// class-dependent place, plus a little deterministic noise.
fn write_u8_arrays(path: &Path, n: usize, classes: usize) {
    let mut images = vec![0u8; n * 28 * 28];
    let mut labels = vec![0u8; n];
    for i in 0..n {
        let c = i % classes;
        labels[i] = c as u8;
        let (y0, x0) = ((c / 3) * 9 + 1, (c % 3) * 9 + 1);
        for y in 0..28 {
            for x in 0..28 {
                let inside = (y0..y0 + 8).contains(&y) && (x0..x0 + 8).contains(&x);
                let noise = ((i * 131 + y * 29 + x * 7) % 23) as u8;
                images[i * 784 + y * 28 + x] = if inside { 230 - noise } else { noise };
            }
        }
    }
    let views = vec![
        (
            "images",
            safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![n, 28, 28], &images)
                .unwrap(),
        ),
        (
            "labels",
            safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![n], &labels).unwrap(),
        ),
    ];
    let meta = HashMap::from([(
        "classes".to_string(),
        serde_json_list((0..classes).map(|c| format!("c{c}"))),
    )]);
    safetensors::tensor::serialize_to_file(views, Some(meta), path).unwrap();
}

fn serde_json_list(items: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = items.map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", v.join(","))
}

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
    let model = m3ae::eval::load_model(&m3ae::eval::ModelSource::RandomInit {
        preset: "tiny".into(),
        seed: 1,
        mae: false,
    })
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
    use m3ae::data::{CaptionedScenes, ScenesConfig, Tokenizer};
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
    let tok =
        Tokenizer::train_wordpiece(scenes.corpus(300).iter().map(String::as_str), 400).unwrap();
    tok.save(run_dir.join("tokenizer.json")).unwrap();
    let model = m3ae::eval::load_model(&m3ae::eval::ModelSource::RandomInit {
        preset: "tiny".into(),
        seed: 2,
        mae: false,
    })
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

/// A WebDataset shard of `n` samples: a JPEG that is red for category `warm/...` and blue for
/// `cold/...` (with a little variation), a caption and a json whose `category` names the class.
fn write_category_shard(path: &Path, n: usize, offset: usize) {
    fn member(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    }
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..n {
        let j = i + offset;
        let warm = j.is_multiple_of(2);
        let img = image::RgbImage::from_fn(32, 32, |x, y| {
            let v = ((x + y + j as u32) % 40) as u8;
            if warm {
                image::Rgb([200 + v, 40, 30])
            } else {
                image::Rgb([30, 60, 200 + v])
            }
        });
        let mut jpg = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(
                &mut std::io::Cursor::new(&mut jpg),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        let key = format!("{j:09}");
        let category = if warm { "warm/fire" } else { "cold/ice/deep" };
        member(&mut b, &format!("{key}.jpg"), &jpg);
        member(&mut b, &format!("{key}.txt"), b"a picture");
        member(
            &mut b,
            &format!("{key}.json"),
            format!("{{\"key\": \"{key}\", \"category\": \"{category}\"}}").as_bytes(),
        );
    }
    std::fs::write(path, b.into_inner().unwrap()).unwrap();
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

#[test]
fn wrong_paths_give_one_line_errors_naming_them() {
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "probe",
                "--checkpoint",
                "/no/such/run",
                "--train-data",
                "scenes",
                "--test-data",
                "scenes:test",
            ],
            "/no/such/run",
        ),
        (
            &[
                "embed",
                "--random-init",
                "--data",
                "u8:/no/such/file.safetensors",
                "--out",
                "/tmp/x.safetensors",
            ],
            "/no/such/file.safetensors",
        ),
        (
            &[
                "reconstruct",
                "--random-init",
                "--image",
                "/no/such/image.png",
                "--out",
                "/tmp/r.png",
            ],
            "/no/such/image.png",
        ),
        (
            &[
                "probe",
                "--random-init",
                "--test-data",
                "scenes:test:10",
                "--evaluate",
                "/no/such/probe.safetensors",
            ],
            "/no/such/probe.safetensors",
        ),
        (
            &[
                "ood",
                "--random-init",
                "--train-data",
                "scenes:train:10",
                "--in-data",
                "folder:/no/such/dir",
                "--out-data",
                "scenes:ood:10",
            ],
            "/no/such/dir",
        ),
    ];
    for (args, path) in cases {
        let (ok, _, stderr) = run(args);
        assert!(!ok, "{args:?} succeeded");
        let lines: Vec<&str> = stderr.trim().lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(lines[0].contains(path), "{args:?}: {stderr}");
    }
    let (ok, _, stderr) = run(&[
        "embed",
        "--random-init",
        "--data",
        "scenes:valid",
        "--out",
        "/tmp/x.safetensors",
    ]);
    assert!(!ok && stderr.contains("scenes:valid"), "{stderr}");
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

/// A checkpoint folder `dir/step-00000001` holding `model` with every weight replaced by
/// NaN (`nan`) or as is; returns the folder.
fn save_checkpoint(dir: &Path, model: &m3ae::model::AnyModel, nan: bool) -> PathBuf {
    let ckpt = dir.join("step-00000001");
    std::fs::create_dir_all(&ckpt).unwrap();
    let mut tensors = model.params().tensors();
    if nan {
        for t in tensors.values_mut() {
            *t = (t.ones_like().unwrap() * f64::NAN).unwrap();
        }
    }
    m3ae::model::params::write_safetensors(
        &ckpt.join("model.safetensors"),
        &tensors,
        HashMap::from([(
            "m3ae_config".to_string(),
            serde_json::to_string(model.config()).unwrap(),
        )]),
    )
    .unwrap();
    ckpt
}

fn random_m3ae(cfg: &m3ae::model::M3aeConfig, seed: u64) -> m3ae::model::AnyModel {
    m3ae::model::AnyModel::M3ae(
        m3ae::model::M3ae::init(cfg, seed, &candle_core::Device::Cpu).unwrap(),
    )
}

/// The one line an error prints (log lines about single samples, `[WARN ...] ...`, aside).
fn one_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr
        .trim()
        .lines()
        .filter(|l| !l.starts_with("[WARN"))
        .collect();
    assert_eq!(lines.len(), 1, "not one line: {stderr}");
    lines[0]
}

#[test]
fn a_nan_checkpoint_fails_feature_extraction_and_nan_scores_are_never_correct() {
    let d = tmp("nan");
    let tiny = m3ae::model::M3aeConfig::preset("tiny").unwrap();
    let ckpt = save_checkpoint(&d, &random_m3ae(&tiny, 0), true);
    let data = d.join("small.safetensors");
    write_u8_arrays(&data, 24, 3);
    let u8data = format!("u8:{}", s(&data));
    // embed: an error naming the count of non-finite samples and the checkpoint, no file
    let out = d.join("feats.safetensors");
    let (ok, _, stderr) = run(&[
        "embed",
        "--checkpoint",
        s(&ckpt),
        "--data",
        &u8data,
        "--out",
        s(&out),
    ]);
    let line = one_line(&stderr);
    assert!(!ok, "{stderr}");
    assert!(line.contains("24 of 24 samples"), "{line}");
    assert!(line.contains("non-finite"), "{line}");
    assert!(line.contains(s(&ckpt)), "{line}");
    assert!(!out.exists());
    // probe: the same error instead of 100% accuracies
    let (ok, stdout, stderr) = run(&[
        "probe",
        "--checkpoint",
        s(&ckpt),
        "--train-data",
        &u8data,
        "--test-data",
        &u8data,
        "--epochs",
        "1",
    ]);
    assert!(!ok, "{stdout}");
    assert!(!stdout.contains("top-1"), "{stdout}");
    assert!(one_line(&stderr).contains("non-finite"), "{stderr}");
    // reconstruct: no panels of NaN, an error naming the checkpoint
    let img = d.join("img.png");
    image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([x as u8 * 8, y as u8 * 8, 90]))
        .save(&img)
        .unwrap();
    let png = d.join("recon.png");
    let (ok, stdout, stderr) = run(&[
        "reconstruct",
        "--checkpoint",
        s(&ckpt),
        "--image",
        s(&img),
        "--out",
        s(&png),
    ]);
    assert!(!ok, "{stdout}");
    let line = one_line(&stderr);
    assert!(
        line.contains(s(&ckpt)) && line.contains("not finite"),
        "{line}"
    );
    assert!(!png.exists());
    // a probe head of NaN weights on finite features: NaN logits are never a correct
    // prediction, at top-1 nor at top-k
    let head = d.join("nan-probe.safetensors");
    let dim = tiny.emb_dim;
    let nan = |shape: &[usize]| {
        candle_core::Tensor::full(f32::NAN, shape, &candle_core::Device::Cpu).unwrap()
    };
    m3ae::model::params::write_safetensors(
        &head,
        &HashMap::from([
            ("weight".to_string(), nan(&[3, dim])),
            ("bias".to_string(), nan(&[3])),
            ("running_mean".to_string(), nan(&[dim])),
            ("running_var".to_string(), nan(&[dim])),
        ]),
        HashMap::new(),
    )
    .unwrap();
    let (ok, stdout, stderr) = run(&[
        "probe",
        "--random-init",
        "--test-data",
        &u8data,
        "--evaluate",
        s(&head),
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("probe (evaluated): top-1 0.00% top-3 0.00%"),
        "{stdout}"
    );
}

#[test]
fn float_and_knn_flags_are_checked_with_one_line_naming_flag_and_value() {
    let base = [
        "probe",
        "--random-init",
        "--train-data",
        "scenes:train:20",
        "--test-data",
        "scenes:test:20",
    ];
    let ood = [
        "ood",
        "--random-init",
        "--train-data",
        "scenes:train:20",
        "--in-data",
        "scenes:test:20",
        "--out-data",
        "scenes:ood:20",
    ];
    let embed = [
        "embed",
        "--random-init",
        "--data",
        "scenes:train:20",
        "--out",
        "/tmp/m3ae-never-written.safetensors",
    ];
    let cases: Vec<(&[&str], [&str; 2])> = vec![
        (&base, ["--lr", "NaN"]),
        (&base, ["--lr", "inf"]),
        (&base, ["--lr", "-1"]),
        (&base, ["--lr", "0"]),
        (&base, ["--weight-decay", "NaN"]),
        (&base, ["--weight-decay", "-0.5"]),
        (&base, ["--knn-t", "0"]),
        (&base, ["--knn-t", "NaN"]),
        (&base, ["--knn-t", "-inf"]),
        (&base, ["--knn-k", "0"]),
        (&base, ["--max-bad-fraction", "1.5"]),
        (&base, ["--max-bad-fraction", "NaN"]),
        (&ood, ["--knn-k", "0"]),
        (&ood, ["--lr", "NaN"]),
        (&ood, ["--max-bad-fraction", "-0.1"]),
        (&embed, ["--max-bad-fraction", "inf"]),
        // a batch that cannot fit in memory: refused before the loader allocates it
        (&embed, ["--batch-size", "1000000000000"]),
        (&base, ["--batch-size", "1000000000000"]),
    ];
    for (args, [flag, value]) in cases {
        let mut all = args.to_vec();
        // `--flag=value`: clap would take a separate `-1` for a flag
        let arg = format!("{flag}={value}");
        all.push(&arg);
        let (ok, stdout, stderr) = run(&all);
        assert!(!ok, "{all:?} succeeded: {stdout}");
        let line = one_line(&stderr);
        assert!(
            line.contains(flag) && line.contains(value),
            "{all:?}: {line}"
        );
    }
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

fn tar_member(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, name, data).unwrap();
}

fn jpeg_bytes(seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(32, 32, |x, y| {
        image::Rgb([(x * 7 + seed) as u8, (y * 5) as u8, (seed * 40) as u8])
    });
    let mut jpg = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(
            &mut std::io::Cursor::new(&mut jpg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    jpg
}

#[test]
fn embed_skips_counts_and_reports_bad_samples_of_a_hostile_shard() {
    let d = tmp("hostile");
    let mut b = tar::Builder::new(Vec::new());
    let mut good = Vec::new();
    for i in 0..4 {
        let key = format!("good{i}");
        tar_member(&mut b, &format!("{key}.jpg"), &jpeg_bytes(i));
        tar_member(&mut b, &format!("{key}.txt"), b"a picture");
        good.push(key);
    }
    // image faults: bad samples
    tar_member(&mut b, "corrupt.jpg", b"\xff\xd8 this is not a jpeg at all");
    tar_member(&mut b, "corrupt.txt", b"a caption");
    let jpg = jpeg_bytes(9);
    tar_member(&mut b, "truncjpg.jpg", &jpg[..jpg.len() * 2 / 5]);
    tar_member(&mut b, "truncjpg.txt", b"a caption");
    tar_member(&mut b, "noimage.txt", b"a caption without an image");
    // caption faults: good samples for embed, which reads images only
    tar_member(&mut b, "nocaption.jpg", &jpeg_bytes(5));
    tar_member(&mut b, "emptycaption.jpg", &jpeg_bytes(6));
    tar_member(&mut b, "emptycaption.txt", b"");
    tar_member(&mut b, "nonutf8.jpg", &jpeg_bytes(7));
    tar_member(&mut b, "nonutf8.txt", b"caf\xe9 \xff\xfe");
    good.extend(["nocaption", "emptycaption", "nonutf8"].map(String::from));
    let shard = d.join("hostile-00000.tar");
    let bytes = b.into_inner().unwrap();
    std::fs::write(&shard, &bytes).unwrap();
    let wds = format!("wds:{}", s(&shard));
    let out = d.join("feats.safetensors");
    let embed = |data: &str, extra: &[&str]| {
        let mut args = vec!["embed", "--random-init", "--data", data, "--out", s(&out)];
        args.extend(extra);
        run(&args)
    };
    let (ok, stdout, stderr) = embed(&wds, &["--max-bad-fraction", "1"]);
    assert!(ok, "{stderr}");
    let f = m3ae::eval::FeatureSet::load(&out).unwrap();
    let mut keys = f.keys.clone();
    keys.sort();
    let mut want_keys = good.clone();
    want_keys.sort();
    assert!(
        stdout.contains(&format!("{} x 128 features", keys.len())),
        "{stdout}"
    );
    // one summary line on stderr with the per-reason counts, naming the data set
    let summary = one_line(&stderr).to_string();
    assert!(summary.starts_with(&format!("embed: {wds}: ")), "{summary}");
    assert!(summary.contains("missing_image 1"), "{summary}");
    assert!(!summary.contains("caption"), "{summary}");
    for k in [
        "good0",
        "good1",
        "good2",
        "good3",
        "nocaption",
        "emptycaption",
    ] {
        assert!(keys.iter().any(|x| x == k), "{k} missing: {keys:?}");
    }
    for k in ["corrupt", "noimage"] {
        assert!(!keys.iter().any(|x| x == k), "{k} written: {keys:?}");
    }
    // at the default --max-bad-fraction (0.1), 3 bad samples are within the allowance of a
    // small set (0.1 x a window of 100 samples, docs/data.md); at 0.01 they stop the command
    // with one line
    let (ok, _, stderr) = embed(&wds, &[]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = embed(&wds, &["--max-bad-fraction", "0.01"]);
    assert!(!ok);
    let line = one_line(&stderr);
    assert!(
        line.contains("--max-bad-fraction 0.01") && line.contains(s(&shard)),
        "{line}"
    );
    assert!(line.contains("corrupt_image 2"), "{line}");

    // a truncated shard: the samples before the cut are used, the cut is counted (exit 0
    // with --max-bad-fraction 1: the samples read are good), one summary line names it
    let cut = d.join("cut-00000.tar");
    // inside a 512-byte block, never on a member boundary
    std::fs::write(&cut, &bytes[..bytes.len() / 3 / 512 * 512 + 100]).unwrap();
    let cut_wds = format!("wds:{}", s(&cut));
    let (ok, stdout, stderr) = embed(&cut_wds, &["--max-bad-fraction", "1"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains(" x 128 features"), "{stdout}");
    let line = one_line(&stderr);
    assert!(
        line.starts_with(&format!("embed: {cut_wds}: ")) && line.contains("truncated_tar 1"),
        "{line}"
    );

    // an empty shard: nothing usable, so exit 1 with one line naming the shard and the reason,
    // whatever the --max-bad-fraction
    let empty = d.join("empty-00000.tar");
    std::fs::write(&empty, tar::Builder::new(Vec::new()).into_inner().unwrap()).unwrap();
    for extra in [&["--max-bad-fraction", "1"][..], &[]] {
        let (ok, _, stderr) = embed(&format!("wds:{}", s(&empty)), extra);
        assert!(!ok, "{extra:?}");
        let line = one_line(&stderr);
        assert!(
            line.contains(s(&empty)) && line.contains("empty_shard"),
            "{extra:?}: {line}"
        );
    }
    // a zero-byte file is an empty shard too
    std::fs::write(&empty, b"").unwrap();
    let (ok, _, stderr) = embed(&format!("wds:{}", s(&empty)), &["--max-bad-fraction", "1"]);
    assert!(!ok);
    assert!(one_line(&stderr).contains("empty_shard"), "{stderr}");

    // corrupt + the JPEG cut to 40% (truncated-JPEG detection is also being hardened in the
    // data crate; this cut is already rejected by the decoder)
    assert!(summary.contains("corrupt_image 2"), "{summary}");
    // Exactly the good samples' features. PENDING DATA-CRATE FIX (issue 16, in parallel):
    // `nonutf8` (a good image whose caption is not UTF-8) is kept only once the WebDataset
    // reader / loader stop dropping caption faults when no text is requested; until that
    // merge these two assertions fail on the eval branch, for that reason only.
    assert!(!summary.contains("non_utf8"), "{summary}");
    assert_eq!(keys, want_keys, "{summary}");
}

#[test]
fn probe_and_ood_report_bad_samples_of_each_data_set() {
    let d = tmp("probe-bad");
    let train = d.join("train-00000.tar");
    write_category_shard(&train, 20, 0);
    // the test shard: 10 good samples and one undecodable image
    let test = d.join("test-00000.tar");
    write_category_shard(&test, 10, 100);
    let mut bytes = std::fs::read(&test).unwrap();
    bytes.truncate(bytes.len() - 1024); // drop the end-of-archive blocks
    let mut b = tar::Builder::new(Vec::new());
    tar_member(&mut b, "zzz.jpg", b"garbage");
    tar_member(&mut b, "zzz.json", br#"{"category": "warm"}"#);
    bytes.extend(b.into_inner().unwrap());
    std::fs::write(&test, bytes).unwrap();
    let (train_wds, test_wds) = (format!("wds:{}", s(&train)), format!("wds:{}", s(&test)));
    let (ok, stdout, stderr) = run(&[
        "probe",
        "--random-init",
        "--train-data",
        &train_wds,
        "--test-data",
        &test_wds,
        "--label-field",
        "category",
        "--label-depth",
        "1",
        "--epochs",
        "2",
        "--probe-batch",
        "8",
        "--knn-k",
        "5",
        "--max-bad-fraction",
        "0.5",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("features: train 20, test 10"), "{stdout}");
    let summary: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("probe: "))
        .collect();
    assert_eq!(summary.len(), 2, "{stderr}");
    assert!(
        summary
            .iter()
            .any(|l| l.starts_with(&format!("probe: {test_wds} (test): "))
                && l.contains("corrupt_image 1")),
        "{stderr}"
    );
    assert!(
        summary
            .iter()
            .any(|l| l.starts_with(&format!("probe: {train_wds} (train): 0 bad"))),
        "{stderr}"
    );
}

#[test]
fn errors_name_the_argument_show_os_errors_once_and_escape_file_bytes() {
    let d = tmp("messages");
    // a one-class training set: the message names the data set, not the class count
    let data = d.join("one-class.safetensors");
    write_u8_arrays(&data, 12, 1);
    let u8data = format!("u8:{}", s(&data));
    let (ok, _, stderr) = run(&[
        "probe",
        "--random-init",
        "--train-data",
        &u8data,
        "--test-data",
        &u8data,
    ]);
    assert!(!ok);
    let line = one_line(&stderr);
    assert!(
        line.contains(&format!("--train-data \"{u8data}\"")),
        "{line}"
    );
    assert!(line.contains("1 class"), "{line}");
    // a tokenizer larger than the model's vocabulary: the message names the tokenizer file
    use m3ae::data::{CaptionedScenes, ScenesConfig, Tokenizer};
    let scenes = CaptionedScenes::new(ScenesConfig {
        len: 4,
        ..Default::default()
    })
    .unwrap();
    let tok =
        Tokenizer::train_wordpiece(scenes.corpus(300).iter().map(String::as_str), 400).unwrap();
    let tok_file = d.join("tokenizer.json");
    tok.save(&tok_file).unwrap();
    let mut cfg = m3ae::model::M3aeConfig::preset("tiny").unwrap();
    cfg.text_vocab_size = 100;
    let ckpt = save_checkpoint(&d.join("small-vocab"), &random_m3ae(&cfg, 0), false);
    let img = d.join("img.png");
    image::RgbImage::from_raw(64, 64, scenes.scene(0).pixels.clone())
        .unwrap()
        .save(&img)
        .unwrap();
    let recon = |ckpt: &Path, tokenizer: &Path| {
        run(&[
            "reconstruct",
            "--checkpoint",
            s(ckpt),
            "--image",
            s(&img),
            "--caption",
            "a red circle",
            "--tokenizer",
            s(tokenizer),
            "--out",
            s(&d.join("r.png")),
        ])
    };
    let (ok, _, stderr) = recon(&ckpt, &tok_file);
    assert!(!ok);
    let line = one_line(&stderr);
    assert!(
        line.contains(&format!("--tokenizer \"{}\"", s(&tok_file))) && line.contains("(100)"),
        "{line}"
    );
    // an OS error appears once
    let no_tok = d.join("no-tokenizer-here");
    std::fs::create_dir_all(&no_tok).unwrap();
    let (ok, _, stderr) = recon(&ckpt, &no_tok);
    assert!(!ok);
    let line = one_line(&stderr);
    assert_eq!(line.matches("os error").count(), 1, "{line}");
    // a sample key with terminal escapes and a newline comes out escaped, on one line
    let shard = d.join("keys-00000.tar");
    let mut b = tar::Builder::new(Vec::new());
    tar_member(&mut b, "evil\x1b[31m\nkey.jpg", b"not an image");
    std::fs::write(&shard, b.into_inner().unwrap()).unwrap();
    let (ok, _, stderr) = run(&[
        "embed",
        "--random-init",
        "--data",
        &format!("wds:{}", s(&shard)),
        "--out",
        s(&d.join("f.safetensors")),
    ]);
    assert!(!ok);
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
    // the error is one line; the sample's key appears (escaped) in its log line
    one_line(&stderr);
    assert!(stderr.contains("evil\\u{1b}[31m\\u{a}key"), "{stderr}");
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
    use m3ae::data::{CaptionedScenes, ScenesConfig, Tokenizer};
    let scenes = CaptionedScenes::new(ScenesConfig {
        len: 4,
        ..Default::default()
    })
    .unwrap();
    let tok =
        Tokenizer::train_wordpiece(scenes.corpus(300).iter().map(String::as_str), 400).unwrap();
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
