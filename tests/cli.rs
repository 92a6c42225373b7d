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
    let (ok, _, stderr) = run(&["bench", "--kernels", "turbo"]);
    assert!(!ok && stderr.contains("turbo"), "{stderr}");
}
