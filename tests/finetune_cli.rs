//! `m3ae finetune` and `m3ae predict` end to end on small generated data: a run writes its
//! checkpoints, evaluations, best classifier and report; `predict` reads the run back; errors
//! are one line naming the flag, file or field.

mod common;

use common::{run, s, temp_dir, write_u8_arrays};

fn finetune_args<'a>(train: &'a str, val: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "finetune",
        "--random-init",
        "--train-data",
        train,
        "--val-data",
        val,
        "--out",
        out,
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--batch-size",
        "16",
        "--plain",
    ]
}

/// `args` with the value after `flag` replaced.
fn with<'a>(mut args: Vec<&'a str>, flag: &str, value: &'a str) -> Vec<&'a str> {
    let i = args.iter().position(|a| *a == flag).expect("flag present");
    args[i + 1] = value;
    args
}

#[test]
fn finetune_then_predict_on_uint8_arrays() {
    let dir = temp_dir("finetune-cli", "run");
    let (train, val) = (dir.join("train.safetensors"), dir.join("val.safetensors"));
    write_u8_arrays(&train, 64, 4);
    write_u8_arrays(&val, 24, 4);
    let (train, val) = (format!("u8:{}", s(&train)), format!("u8:{}", s(&val)));
    let out = dir.join("run");
    let (ok, stdout, stderr) = run(&finetune_args(&train, &val, s(&out)));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("best validation top-1"), "{stdout}");
    assert!(stdout.contains("class 3:"), "{stdout}");
    assert_eq!(stderr.matches("validation top-1").count(), 2, "{stderr}");
    for f in [
        "best/classifier.safetensors",
        "classifier.safetensors",
        "report.json",
        "eval.jsonl",
        "metrics.jsonl",
        "checkpoints/step-00000008/model.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let evals = std::fs::read_to_string(out.join("eval.jsonl")).unwrap();
    assert_eq!(evals.lines().count(), 2, "{evals}");

    // a finished run is not overwritten; --resume has nothing left to do
    let (ok, _, stderr) = run(&finetune_args(&train, &val, s(&out)));
    assert!(
        !ok && stderr.contains("--resume") && stderr.contains(s(&out)),
        "{stderr}"
    );
    let mut again = finetune_args(&train, &val, s(&out));
    again.push("--resume");
    let (ok, _, stderr) = run(&again);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("nothing to train"), "{stderr}");

    let preds = dir.join("preds.jsonl");
    let (ok, stdout, stderr) = run(&[
        "predict",
        "--checkpoint",
        s(&out),
        "--data",
        &val,
        "--out",
        s(&preds),
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("top-1") && stdout.contains("(24 samples)"),
        "{stdout}"
    );
    let lines = std::fs::read_to_string(&preds).unwrap();
    assert_eq!(lines.lines().count(), 24);
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert_eq!(first["logits"].as_array().unwrap().len(), 4);
    // the same classifier through a checkpoint folder
    let step = out.join("checkpoints/step-00000008");
    let (ok, stdout2, stderr) = run(&["predict", "--checkpoint", s(&step), "--data", &val]);
    assert!(ok, "{stderr}");
    assert!(stdout2.contains("(24 samples)"), "{stdout2}");
}

#[test]
fn finetune_errors_are_one_line_naming_the_flag_file_or_field() {
    let dir = temp_dir("finetune-cli", "errors");
    let train = dir.join("train.safetensors");
    write_u8_arrays(&train, 32, 3);
    let train = format!("u8:{}", s(&train));
    let out = dir.join("run");
    let missing = "u8:/no/such/val.safetensors";
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            finetune_args(&train, missing, s(&out)),
            "/no/such/val.safetensors",
        ),
        (
            [
                finetune_args(&train, &train, s(&out)),
                vec!["--layer-decay", "0"],
            ]
            .concat(),
            "finetune.layer_decay",
        ),
        (
            [
                finetune_args(&train, &train, s(&out)),
                vec!["--drop-path", "1.5"],
            ]
            .concat(),
            "finetune.drop_path",
        ),
        (
            with(finetune_args(&train, &train, s(&out)), "--batch-size", "64"),
            "--batch-size",
        ),
        (
            with(finetune_args(&train, &train, s(&out)), "--epochs", "0"),
            "finetune.epochs",
        ),
        (
            [
                finetune_args(&train, &train, s(&out)),
                vec!["--auto-augment", "rand-m9-q2"],
            ]
            .concat(),
            "--auto-augment",
        ),
        (
            vec!["predict", "--checkpoint", "/no/such/run", "--data", &train],
            "/no/such/run",
        ),
    ];
    for (args, needle) in cases {
        let (ok, _, stderr) = run(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    }
}

#[test]
fn auto_augment_defaults_to_the_official_policy_and_can_be_turned_off() {
    let cfg = |extra: &[&str]| {
        let base = [
            "finetune",
            "--random-init",
            "--train-data",
            "x",
            "--val-data",
            "y",
        ];
        let args = [&base[..], &["--print-config"], extra].concat();
        let (ok, stdout, stderr) = run(&args);
        assert!(ok, "{stderr}");
        stdout
            .lines()
            .find(|l| l.starts_with("auto_augment"))
            .unwrap_or_else(|| panic!("no auto_augment in {stdout}"))
            .to_string()
    };
    assert_eq!(
        cfg(&[]),
        r#"auto_augment = "rand-m9-n2-mstd0.5-mmax10-p0.5-inc1""#
    );
    assert_eq!(cfg(&["--auto-augment", "none"]), r#"auto_augment = "none""#);
}
