//! Data-parallel ranks as threads of one process (`distributed.local_ranks`): two ranks at
//! batch B each against one rank at the global batch 2B (same streams, so the same samples),
//! bit-identical reruns, and a two-rank checkpoint that resumes in one rank. No MPI needed.

mod common;

use candle_core::{Device, Tensor};
use common::max_abs_diff;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The jobs of these tests use both cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const BIN: &str = env!("CARGO_BIN_EXE_m3ae");

fn config(dir: &Path, steps: u64, ranks: usize) -> PathBuf {
    let text = format!(
        "output_dir = {out:?}\nprobe = false\nimage_every = 0\nlog_every = 1\nsave_every = {steps}\n\
         [train]\nsteps = {steps}\nbatch_size = 16\nwarmup_steps = 2\nlr_peak = 1.5e-4\n\
         [distributed]\nstreams = 2\nlocal_ranks = {ranks}\n",
        out = dir.display().to_string(),
    );
    let p = dir.join(format!("job-{steps}-{ranks}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn run_ok(cfg: &Path, name: &str, extra: &[&str]) -> String {
    let mut c = Command::new(BIN);
    c.env("RAYON_NUM_THREADS", "1")
        .args(["pretrain", "--plain", "--config"])
        .arg(cfg)
        .args(["--name", name])
        .args(extra);
    common::run_ok(c)
}

fn model(dir: &Path, name: &str, step: u64) -> HashMap<String, Tensor> {
    let p = dir
        .join(name)
        .join("checkpoints")
        .join(format!("step-{step:08}"))
        .join("model.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn tempdir(tag: &str) -> PathBuf {
    common::temp_dir("local-ranks", tag)
}

/// As in the MPI test (tests/distributed.rs): the runs differ only in the order of float sums,
/// and AdamW moves a weight by about `lr` (9.4e-6 here) per step, so a bound of one step's
/// update shows the same trajectory; another seed differs by far more (checked).
const PARAM_TOL: f32 = 1e-5;

#[test]
fn two_thread_ranks_match_one_rank_at_the_global_batch_rerun_bit_identically_and_resume() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempdir("match");
    let (one_cfg, two_cfg) = (config(&tmp, 4, 1), config(&tmp, 4, 2));
    run_ok(&one_cfg, "one", &[]);
    let text = run_ok(&two_cfg, "two", &[]);
    assert!(
        text.contains("2 ranks as threads, 1 compute thread each"),
        "{text}"
    );
    let (one, two) = (model(&tmp, "one", 4), model(&tmp, "two", 4));
    let d = max_abs_diff(&one, &two);
    eprintln!("2 thread ranks vs 1 rank after 4 steps: max abs parameter difference {d:e}");
    assert!(d < PARAM_TOL, "parameters differ by {d}");
    // the summary is rank 0's and covers the global batch: 4 steps x 16 samples
    assert!(text.contains("64 samples read"), "{text}");

    run_ok(&two_cfg, "two-again", &[]);
    assert_eq!(
        max_abs_diff(&two, &model(&tmp, "two-again", 4)),
        0.0,
        "two thread ranks are not deterministic"
    );

    run_ok(&one_cfg, "seed", &["--seed", "7"]);
    let d = max_abs_diff(&one, &model(&tmp, "seed", 4));
    assert!(d > 100.0 * PARAM_TOL, "another seed only differs by {d}");

    // the two-rank checkpoint continues in one rank like the one-rank run
    let longer = config(&tmp, 6, 1);
    run_ok(&longer, "one", &["--resume"]);
    run_ok(&longer, "two", &["--resume"]);
    let d = max_abs_diff(&model(&tmp, "one", 6), &model(&tmp, "two", 6));
    eprintln!("after resuming both in one rank for 2 more steps: {d:e}");
    assert!(d < PARAM_TOL, "after resuming in one rank: {d}");
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn local_ranks_are_checked_against_the_streams_and_the_device() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempdir("bad");
    let cfg = config(&tmp, 2, 2);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("streams = 2", "streams = 3");
    std::fs::write(&cfg, text).unwrap();
    for (args, want) in [
        (vec![], "must be a multiple of the number of ranks (2)"),
        (vec!["--device", "cuda"], "runs ranks as CPU threads"),
    ] {
        let out = Command::new(BIN)
            .args(["pretrain", "--plain", "--config"])
            .arg(&cfg)
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{err}");
    }
    std::fs::remove_dir_all(&tmp).ok();
}
