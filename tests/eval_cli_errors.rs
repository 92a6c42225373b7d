//! Errors and hostile input of `m3ae embed | probe | ood | reconstruct`: wrong paths, invalid
//! flag values, NaN checkpoints and NaN probe heads, WebDataset shards with corrupt, truncated or
//! missing members, and file bytes that must come out escaped. Failures are one line on stderr
//! naming the argument; bad samples are skipped and counted per reason. The working paths and the
//! real-data runs are in `tests/eval_cli.rs`.

use common::{random_m3ae, run, s, save_checkpoint, write_category_shard, write_u8_arrays};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

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
fn jpeg_bytes(seed: u32) -> Vec<u8> {
    common::jpeg(image::RgbImage::from_fn(32, 32, |x, y| {
        image::Rgb([(x * 7 + seed) as u8, (y * 5) as u8, (seed * 40) as u8])
    }))
}
#[test]
fn embed_skips_counts_and_reports_bad_samples_of_a_hostile_shard() {
    let d = tmp("hostile");
    let mut b = tar::Builder::new(Vec::new());
    let mut good = Vec::new();
    for i in 0..4 {
        let key = format!("good{i}");
        common::member(&mut b, &format!("{key}.jpg"), &jpeg_bytes(i));
        common::member(&mut b, &format!("{key}.txt"), b"a picture");
        good.push(key);
    }
    // image faults: bad samples
    common::member(&mut b, "corrupt.jpg", b"\xff\xd8 this is not a jpeg at all");
    common::member(&mut b, "corrupt.txt", b"a caption");
    let jpg = jpeg_bytes(9);
    common::member(&mut b, "truncjpg.jpg", &jpg[..jpg.len() * 2 / 5]);
    common::member(&mut b, "truncjpg.txt", b"a caption");
    common::member(&mut b, "noimage.txt", b"a caption without an image");
    // caption faults: good samples for embed, which reads images only
    common::member(&mut b, "nocaption.jpg", &jpeg_bytes(5));
    common::member(&mut b, "emptycaption.jpg", &jpeg_bytes(6));
    common::member(&mut b, "emptycaption.txt", b"");
    common::member(&mut b, "nonutf8.jpg", &jpeg_bytes(7));
    common::member(&mut b, "nonutf8.txt", b"caf\xe9 \xff\xfe");
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
    common::member(&mut b, "zzz.jpg", b"garbage");
    common::member(&mut b, "zzz.json", br#"{"category": "warm"}"#);
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
    use m3ae::data::{CaptionedScenes, ScenesConfig};
    let scenes = CaptionedScenes::new(ScenesConfig {
        len: 4,
        ..Default::default()
    })
    .unwrap();
    let tok = scenes.train_tokenizer(300, 400).unwrap();
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
    common::member(&mut b, "evil\x1b[31m\nkey.jpg", b"not an image");
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
mod common;

fn tmp(name: &str) -> PathBuf {
    common::temp_dir("eval-errors", name)
}
