//! Runs the `m3ae` binary.

use std::process::Command;

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_m3ae"))
        .args(args)
        .output()
        .expect("the m3ae binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn parameters(stdout: &str) -> u64 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("parameters: "))
        .expect("a parameters line")
        .trim()
        .parse()
        .expect("an integer")
}

#[test]
fn info_prints_exact_parameter_counts_matching_the_spec_table() {
    for (preset, millions) in [
        ("small", 74.8),
        ("base", 150.8),
        ("large", 376.2),
        ("huge", 711.7),
        ("debug", 80.1),
    ] {
        let (ok, stdout, stderr) = run(&["info", "--preset", preset]);
        assert!(ok, "{stderr}");
        let n = parameters(&stdout);
        assert!(((n as f64 / 1e6) - millions).abs() < 0.05, "{preset}: {n}");
        assert!(stdout.contains("training FLOPs per sample:"), "{stdout}");
        assert!(
            stdout.contains(&format!("\"model_type\": \"{preset}\"")),
            "{stdout}"
        );
    }
    let (_, stdout, _) = run(&["info", "--preset", "base"]);
    assert_eq!(parameters(&stdout), 150_757_434);
}

#[test]
fn info_reads_config_files_and_reports_bad_ones() {
    let dir = std::env::temp_dir().join(format!("m3ae-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("c.toml");
    std::fs::write(&good, "emb_dim = 64\ndepth = 1\nnum_heads = 4\ndec_emb_dim = 32\ndec_depth = 1\ndec_num_heads = 4\n").unwrap();
    let (ok, stdout, stderr) = run(&["info", "--config", good.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(parameters(&stdout) > 0);
    let bad = dir.join("bad.json");
    std::fs::write(&bad, r#"{"emb_dim": 66, "num_heads": 4}"#).unwrap();
    let (ok, _, stderr) = run(&["info", "--config", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("emb_dim"), "{stderr}");
    let unknown = dir.join("unknown.json");
    std::fs::write(&unknown, r#"{"emb_dimm": 64}"#).unwrap();
    let (ok, _, stderr) = run(&["info", "--config", unknown.to_str().unwrap()]);
    assert!(!ok && stderr.contains("emb_dimm"), "{stderr}");
    let (ok, _, stderr) = run(&["info", "--preset", "gigantic"]);
    assert!(!ok && stderr.contains("gigantic"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bench_runs_a_tiny_preset_and_rejects_bad_flags() {
    let (ok, stdout, stderr) = run(&[
        "bench",
        "--workload",
        "preset",
        "--preset",
        "tiny",
        "--batch",
        "2",
        "--steps",
        "1",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("tokens/s") && stdout.contains("GFLOP/s"),
        "{stdout}"
    );
    // the timed steps' kernel-time share, page faults and peak RSS (getrusage)
    #[cfg(unix)]
    assert!(
        stdout.contains("kernel: ")
            && stdout.contains("% of the timed steps' CPU time")
            && stdout.contains("minor page faults per step; peak RSS"),
        "{stdout}"
    );
    let (ok, _, stderr) = run(&["bench", "--kernels", "turbo"]);
    assert!(!ok && stderr.contains("turbo"), "{stderr}");
}

#[test]
fn bench_takes_the_model_from_a_config_file_and_field_flags() {
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/bench-cpu-bert.toml");
    // the file's model (192 x 6, 64 px / patch 8, text 32) with a small vocabulary and batch
    let (ok, stdout, stderr) = run(&[
        "bench",
        "--workload",
        "preset",
        "--config",
        cfg,
        "--model",
        "text_vocab_size=64",
        "--batch",
        "2",
        "--steps",
        "1",
    ]);
    assert!(ok, "{stderr}");
    let model = stdout
        .lines()
        .find_map(|l| l.strip_prefix("model: "))
        .expect("a model line");
    let m: serde_json::Value = serde_json::from_str(model).unwrap();
    assert_eq!(
        (
            m["emb_dim"].as_u64(),
            m["depth"].as_u64(),
            m["text_vocab_size"].as_u64(),
            m["image_size"].as_u64()
        ),
        (Some(192), Some(6), Some(64), Some(64))
    );
    assert!(stdout.contains("batch 2"), "{stdout}");
    for (flag, needle) in [
        ("nope=3", "no model field `nope`"),
        ("emb_dim=abc", "emb_dim=abc"),
        ("emb_dim", "FIELD=VALUE"),
        ("emb_dim=6", "emb_dim"),
    ] {
        let (ok, _, stderr) = run(&["bench", "--workload", "preset", "--model", flag]);
        assert!(!ok, "{flag}");
        assert!(stderr.contains(needle), "{flag}: {stderr}");
    }
}

#[test]
fn pretrain_errors_are_one_line_and_name_the_culprit() {
    let dir = std::env::temp_dir().join(format!("m3ae-cli-pre-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("runs");
    let cases: Vec<(&str, &str)> = vec![
        ("stepz = 3\n", "stepz"),
        ("[train]\nsteps = 0\n", "train.steps"),
        ("[model]\ntext_mask_ratio = 1.5\n", "text_mask_ratio"),
        (
            "[data]\nsource = \"webdataset\"\nshards = \"/nonexistent/{0..1}.tar\"\ntokenizer = \"/nonexistent/tokenizer.json\"\n",
            "/nonexistent/tokenizer.json",
        ),
    ];
    for (i, (toml_text, needle)) in cases.iter().enumerate() {
        let cfg = dir.join(format!("c{i}.toml"));
        std::fs::write(&cfg, toml_text).unwrap();
        let (ok, _, stderr) = run(&[
            "pretrain",
            "--config",
            cfg.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--plain",
        ]);
        assert!(!ok, "case {i} should fail");
        let err: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(err.len(), 1, "case {i}: {stderr}");
        assert!(err[0].contains(needle), "case {i}: {stderr}");
    }
    // an unreadable checkpoint on --resume
    let run_dir = out.join("broken");
    let ck = run_dir.join("checkpoints").join("step-00000005");
    std::fs::create_dir_all(&ck).unwrap();
    std::fs::write(ck.join("trainer.json"), "{}").unwrap();
    std::fs::write(ck.join("model.safetensors"), b"not a safetensors file").unwrap();
    let (ok, _, stderr) = run(&[
        "pretrain",
        "--name",
        "broken",
        "--output-dir",
        out.to_str().unwrap(),
        "--resume",
        "--steps",
        "10",
        "--plain",
        "--no-probe",
    ]);
    assert!(!ok);
    let err: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(err.len(), 1, "{stderr}");
    assert!(err[0].contains("model.safetensors"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pretrain_runs_a_few_steps_and_resumes() {
    let dir = std::env::temp_dir().join(format!("m3ae-cli-run-{}", std::process::id()));
    let out = dir.join("runs");
    let base = [
        "pretrain",
        "--name",
        "t",
        "--output-dir",
        out.to_str().unwrap(),
        "--plain",
        "--no-probe",
        "--batch-size",
        "8",
    ];
    let (ok, stdout, stderr) = run(&[&base[..], &["--steps", "4"]].concat());
    assert!(ok, "{stderr}");
    assert!(stdout.contains("steps: 4"), "{stdout}");
    let r = out.join("t");
    for f in [
        "config.toml",
        "tokenizer.json",
        "metrics.jsonl",
        "summary.json",
        "checkpoints/step-00000004/model.safetensors",
    ] {
        assert!(r.join(f).exists(), "{f} missing");
    }
    assert!(std::fs::read_dir(r.join("recon")).unwrap().count() >= 1);
    // without --resume an existing run is refused; with it the run continues to 6 steps
    let (ok, _, stderr) = run(&[&base[..], &["--steps", "6"]].concat());
    assert!(!ok && stderr.contains("--resume"), "{stderr}");
    let (ok, stdout, stderr) = run(&[&base[..], &["--steps", "6", "--resume"]].concat());
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("steps: 6") && stderr.contains("resumed from"),
        "{stdout}{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[ignore = "needs the real Tux Paint shards under $M3AE_DATA_DIR"]
fn pretrain_on_caption_shards_with_a_held_out_set_smaller_than_the_eval_batch() {
    let d = std::path::PathBuf::from(
        std::env::var_os("M3AE_DATA_DIR").expect("M3AE_DATA_DIR (the shared data folder)"),
    );
    let dir = std::env::temp_dir().join(format!("m3ae-cli-wds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // the 99 Tux Paint test pairs: fewer than the 256 held-out captions the summary asks for
    let shard = d.join("tuxpaint_captions/test-00000.tar");
    let cfg = dir.join("wds.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"w\"\noutput_dir = {:?}\n[model]\nmodel_type = \"tiny\"\npatch_size = 8\n\
             image_size = 32\ntext_length = 16\n[train]\nsteps = 2\nbatch_size = 8\n\
             warmup_steps = 1\n[data]\nsource = \"webdataset\"\nshards = {:?}\n\
             tokenizer = {:?}\n",
            dir.join("runs"),
            shard,
            d.join("tokenizer/bert-base-uncased/tokenizer.json"),
        ),
    )
    .unwrap();
    let (ok, stdout, stderr) = run(&["pretrain", "--config", cfg.to_str().unwrap(), "--plain"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("masked-word accuracy"), "{stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}
