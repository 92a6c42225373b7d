//! Data-parallel pre-training over MPI (feature `mpi`): `mpirun -n 2` at batch B per rank
//! against one process at the global batch 2B, resuming a 2-rank checkpoint in one process, the
//! two failures a job must survive: a rank killed (the job stops, naming it) and a rank that
//! hangs (the collective timeout aborts the job, naming it), and a scheduler's SIGTERM (every
//! rank stops at the same step with a checkpoint and exit 0). The last checkpoint loads after
//! each. A job on a CUDA device under the launcher needs the `nccl` feature.
//!
//! Needs `mpirun` (Debian: `openmpi-bin libopenmpi-dev`); `.ci/run` installs it and runs
//! `cargo test --features mpi --test distributed`. Without the feature this file is empty.
#![cfg(feature = "mpi")]

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The jobs of these tests use both cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const BIN: &str = env!("CARGO_BIN_EXE_m3ae");

fn config(dir: &Path, steps: u64, save_every: u64, timeout_s: f64) -> PathBuf {
    let text = format!(
        "output_dir = {out:?}\nprobe = false\nimage_every = 0\nlog_every = 1\nsave_every = {save_every}\n\
         keep_checkpoints = 3\n[train]\nsteps = {steps}\nbatch_size = 16\nwarmup_steps = 2\nlr_peak = 1.5e-4\n\
         [distributed]\nstreams = 2\nlocal_ranks = 1\ntimeout_s = {timeout_s}\n",
        out = dir.display().to_string(),
    );
    let p = dir.join(format!("job-{steps}-{save_every}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn mpirun() -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-n", "2", "--oversubscribe", "-x", "RAYON_NUM_THREADS=1"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1");
    c
}

fn pretrain(launcher: Option<Command>, cfg: &Path, name: &str, extra: &[&str]) -> Command {
    let mut c = match launcher {
        Some(mut l) => {
            l.arg(BIN);
            l
        }
        None => {
            let mut c = Command::new(BIN);
            c.env("RAYON_NUM_THREADS", "1");
            c
        }
    };
    c.args(["pretrain", "--plain", "--config"])
        .arg(cfg)
        .args(["--name", name])
        .args(extra);
    c
}

fn run_ok(c: Command) -> String {
    common::run_ok(c)
}

fn checkpoint(dir: &Path, name: &str, step: u64) -> PathBuf {
    dir.join(name)
        .join("checkpoints")
        .join(format!("step-{step:08}"))
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// Largest |a - b| over every tensor of two safetensors files with the same names.
fn max_abs_diff(a: &Path, b: &Path) -> f32 {
    common::max_abs_diff(&tensors(a), &tensors(b))
}

fn trainer_json(ck: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(ck.join("trainer.json")).unwrap()).unwrap()
}

fn losses(dir: &Path, name: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join(name).join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// Tolerance on parameters after a few steps: the two runs differ only in the order of the
/// float sums (per-rank means then their mean, vs one mean over the global batch); AdamW
/// normalises each update to at most about `lr` (here 1.5e-4 x 16 / 256 = 9.4e-6 per step at
/// the peak), so a bound on the order of one step's update shows the runs follow the same
/// trajectory (another seed differs by far more, checked below).
const PARAM_TOL: f32 = 1e-5;

#[test]
fn two_ranks_match_one_process_at_the_global_batch_and_resume_in_one_process() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempdir("match");
    let cfg = config(&tmp, 4, 4, 60.0);
    run_ok(pretrain(None, &cfg, "one", &[]));
    let text = run_ok(pretrain(Some(mpirun()), &cfg, "two", &[]));
    assert!(text.contains("data-parallel over MPI: 2 ranks"), "{text}");
    let (one, two) = (checkpoint(&tmp, "one", 4), checkpoint(&tmp, "two", 4));
    let d = max_abs_diff(
        &one.join("model.safetensors"),
        &two.join("model.safetensors"),
    );
    eprintln!("2 ranks vs 1 process after 4 steps: max abs parameter difference {d:e}");
    assert!(d < PARAM_TOL, "parameters differ by {d}");
    let d = max_abs_diff(
        &one.join("optimizer.safetensors"),
        &two.join("optimizer.safetensors"),
    );
    assert!(d < 1e-6, "optimizer moments differ by {d}");
    // the same samples: every stream at the same position (records consumed, batches, epoch)
    let (p1, p2) = (trainer_json(&one), trainer_json(&two));
    assert_eq!(p1["data_position"], p2["data_position"]);
    assert_eq!(p1["data_position"]["streams"], 2);
    // the logged losses are means over the ranks: the same as the global batch's
    for (a, b) in losses(&tmp, "one").iter().zip(losses(&tmp, "two")) {
        assert!((a - b).abs() < 1e-5, "loss {a} vs {b}");
    }
    // a different data order is far outside the tolerance (the comparison can fail)
    let other = config(&tmp, 4, 4, 60.0);
    run_ok(pretrain(None, &other, "seed", &["--seed", "7"]));
    let d = max_abs_diff(
        &one.join("model.safetensors"),
        &checkpoint(&tmp, "seed", 4).join("model.safetensors"),
    );
    eprintln!("another seed: {d:e}");
    assert!(d > 100.0 * PARAM_TOL, "another seed only differs by {d}");

    // the 2-rank checkpoint continues in one process exactly like the 1-process run
    let longer = config(&tmp, 6, 6, 60.0);
    run_ok(pretrain(None, &longer, "one", &["--resume"]));
    run_ok(pretrain(None, &longer, "two", &["--resume"]));
    let d = max_abs_diff(
        &checkpoint(&tmp, "one", 6).join("model.safetensors"),
        &checkpoint(&tmp, "two", 6).join("model.safetensors"),
    );
    eprintln!("after resuming both in one process for 2 more steps: {d:e}");
    assert!(d < PARAM_TOL, "after resuming in one process: {d}");
    std::fs::remove_dir_all(&tmp).ok();
}

/// Pids of the processes of rank `rank` whose command line mentions `marker`.
fn rank_pids(marker: &str, rank: usize) -> Vec<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let has = |hay: &[u8], needle: &str| {
            hay.split(|&b| b == 0)
                .any(|s| String::from_utf8_lossy(s).contains(needle))
        };
        if has(&cmd, marker)
            && has(&cmd, "pretrain")
            && env.split(|&b| b == 0).any(|s| s == want.as_bytes())
        {
            out.push(pid);
        }
    }
    out
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill {sig} {pid}");
}

/// A running job: killed with all its ranks when dropped, so a failing test leaves nothing behind.
struct Job {
    child: Child,
    marker: String,
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for p in rank_pids(&self.marker, 1)
            .into_iter()
            .chain(rank_pids(&self.marker, 0))
        {
            let _ = Command::new("kill")
                .args(["-KILL", &p.to_string()])
                .status();
        }
    }
}

/// Starts a long 2-rank job, waits for its first checkpoint, sends `sig` to rank 1, and returns
/// the job's exit code and output (a job still running 180 s after the signal fails the test).
fn fault(tmp: &Path, name: &str, sig: &str, timeout_s: f64) -> (Option<i32>, String) {
    let cfg = config(tmp, 100_000, 2, timeout_s);
    let log = tmp.join(format!("{name}.log"));
    let mut c = pretrain(Some(mpirun()), &cfg, name, &[]);
    let f = std::fs::File::create(&log).unwrap();
    c.stdout(Stdio::from(f.try_clone().unwrap()))
        .stderr(Stdio::from(f));
    let marker = cfg.display().to_string();
    let mut job = Job {
        child: c.spawn().expect("mpirun"),
        marker: marker.clone(),
    };
    let child = &mut job.child;
    let ck = checkpoint(tmp, name, 2);
    let t0 = Instant::now();
    while !ck.is_dir() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint after 300 s"
        );
        assert!(child.try_wait().unwrap().is_none(), "job ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    let pids = rank_pids(&marker, 1);
    assert_eq!(pids.len(), 1, "rank 1 processes: {pids:?}");
    signal(pids[0], sig);
    let hit = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if hit.elapsed() > Duration::from_secs(180) {
            panic!("the job did not stop within 180 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(job);
    (status.code(), std::fs::read_to_string(&log).unwrap())
}

/// The newest checkpoint of a run resumes in one process for one more step.
fn resume_newest(tmp: &Path, name: &str) {
    let newest = m3ae::train::checkpoint::latest(&tmp.join(name).join("checkpoints"))
        .unwrap()
        .expect("a checkpoint");
    let step = trainer_json(&newest)["step"].as_u64().unwrap();
    let cfg = config(tmp, step + 1, 100, 60.0);
    let text = run_ok(pretrain(None, &cfg, name, &["--resume"]));
    assert!(text.contains(&format!("at step {step}")), "{text}");
}

#[test]
fn a_killed_rank_stops_the_job_naming_it_and_the_last_checkpoint_loads() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempdir("kill");
    let (code, log) = fault(&tmp, "killed", "-KILL", 60.0);
    assert_ne!(code, Some(0), "{log}");
    assert!(
        log.contains("rank 1"),
        "the log does not name rank 1: {log}"
    );
    resume_newest(&tmp, "killed");
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn a_hanging_rank_is_named_by_the_collective_timeout() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempdir("hang");
    let (code, log) = fault(&tmp, "hung", "-STOP", 5.0);
    assert_eq!(
        code,
        Some(m3ae::train::sync::mpi::TIMEOUT_EXIT_CODE),
        "{log}"
    );
    assert!(
        log.contains("rank 1 did not reach"),
        "the timeout does not name rank 1: {log}"
    );
    resume_newest(&tmp, "hung");
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn sigterm_to_one_rank_stops_every_rank_with_a_checkpoint_and_exit_0() {
    // Schedulers signal every task; one rank alone must be enough for all to stop together.
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempdir("term");
    let (code, log) = fault(&tmp, "term", "-TERM", 60.0);
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("(interrupted)"), "{log}");
    resume_newest(&tmp, "term");
    std::fs::remove_dir_all(&tmp).ok();
}

mod common;

fn tempdir(tag: &str) -> PathBuf {
    common::temp_dir("dist", tag)
}

/// Under a launcher on a CUDA device, a binary without NCCL refuses to start (the MPI all-reduce
/// reads host memory), naming the feature, before anything is written.
#[cfg(not(feature = "nccl"))]
#[test]
fn a_gpu_job_under_mpirun_needs_the_nccl_feature() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempdir("gpu-no-nccl");
    let cfg = config(&tmp, 2, 2, 60.0);
    let out = pretrain(Some(mpirun()), &cfg, "gpu", &["--device", "cuda"])
        .output()
        .expect("mpirun");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("rebuild with `--features nccl`"), "{text}");
    assert!(!tmp.join("gpu").exists(), "nothing is written");
    let _ = std::fs::remove_dir_all(&tmp);
}
