//! `m3ae doctor`: one check of a device (a GPU above all) that prints one markdown table.
//!
//! Four sections, each row `PASS`, `FAIL` or `SKIP` with its numbers and its tolerance; a row
//! that errors or panics is a `FAIL` with the message, and the next row runs (nothing aborts the
//! check):
//!
//! * **kernels** ([`kernels`]): every fused op on the device (the CUDA kernels on a GPU, the CPU
//!   kernels on the CPU) against the reference ops on the CPU, values and gradients, in f32 and
//!   with bf16 inputs, plus the bf16 dense layer (cuBLAS bf16 GEMM on a GPU);
//! * **parity**: the official fixture (`tests/fixtures/official_tiny`) through
//!   [`m3ae_official::parity::run_on`] on the device, both kernel paths, with the CPU tolerances
//!   times [`Plan::parity_tolerance_scale`] (10 off the CPU);
//! * **training** ([`train`]): the `tiny` pre-training job (the built-in scenes) for
//!   [`Plan::train_steps`] steps on the CPU and on the device in f32, then in bf16, comparing the
//!   logged loss windows;
//! * **throughput** ([`perf`]): training steps of `small` and `base` (224 px, patch 16, text 64,
//!   vocabulary 30,522) at batch 64 and 256, f32 and bf16: samples/s and model FLOP utilisation
//!   against the GPU's peak ([`perf::peak_for`]).
//!
//! [`Plan::full`] is sized for a GPU (the whole check in a few minutes on an H100);
//! [`Plan::quick`] shrinks every workload so the program itself runs in the test suite on the
//! CPU (`m3ae doctor --device cpu --quick`).

pub mod kernels;
pub mod perf;
pub mod train;

use candle_core::Device;
use m3ae_kernels::KernelPath;
use std::path::PathBuf;
use std::time::Instant;

/// The outcome of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Within tolerance (or, for throughput, ran and met its target if it has one).
    Pass,
    /// Out of tolerance, below target, or errored.
    Fail,
    /// Not applicable on this device (e.g. bf16 throughput on the CPU).
    Skip,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
        })
    }
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// `kernels`, `parity`, `training` or `throughput`.
    pub section: &'static str,
    /// What was checked.
    pub name: String,
    /// The outcome.
    pub status: Status,
    /// The numbers (errors, losses, samples/s) or the error message.
    pub result: String,
    /// The tolerance or target.
    pub tolerance: String,
    /// Wall time of the row in seconds.
    pub seconds: f64,
}

/// What a row's body returns: pass or not, and its numbers.
pub type Outcome = anyhow::Result<(Status, String)>;

/// Runs one row's body, turning an error or a panic into a `FAIL` row with its message.
pub fn row(
    section: &'static str,
    name: impl Into<String>,
    tolerance: impl Into<String>,
    body: impl FnOnce() -> Outcome,
) -> Row {
    let t0 = Instant::now();
    let (status, result) = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            // the first line only (a candle error may carry a backtrace)
            let msg = crate::cli::one_line(&e);
            let msg = msg.split("\\n").next().unwrap_or_default().trim_end();
            (Status::Fail, format!("error: {msg}"))
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(no message)".into());
            (Status::Fail, format!("panic: {msg}"))
        }
    };
    Row {
        section,
        name: name.into(),
        status,
        result,
        tolerance: tolerance.into(),
        seconds: t0.elapsed().as_secs_f64(),
    }
}

/// `Pass` when `ok`, else `Fail`.
pub fn pass_if(ok: bool) -> Status {
    if ok {
        Status::Pass
    } else {
        Status::Fail
    }
}

/// The sections of a check, in the order they run.
pub const SECTIONS: [&str; 4] = ["kernels", "parity", "training", "throughput"];

/// The sizes of a check.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The sections to run (of [`SECTIONS`]).
    pub sections: Vec<String>,
    /// Small kernel shapes only (no model-sized attention, no BERT-vocabulary text head).
    pub small_kernels: bool,
    /// The official fixture folder (`None`: no parity rows).
    pub fixture: Option<PathBuf>,
    /// Factor on the CPU tolerances of the parity harness.
    pub parity_tolerance_scale: f64,
    /// Pre-training steps of the training rows.
    pub train_steps: u64,
    /// Global batch of the training rows.
    pub train_batch: usize,
    /// Steps per logged loss window of the training rows.
    pub train_window: u64,
    /// Where the training runs write their run directories (removed afterwards).
    pub work_dir: PathBuf,
    /// Throughput rows: (preset, batch).
    pub throughput: Vec<(String, usize)>,
    /// Model fields set over each throughput preset (image size, text length, vocabulary).
    pub throughput_model: perf::ThroughputModel,
    /// Timed steps per throughput row (after 2 warm-up steps).
    pub bench_steps: usize,
}

impl Plan {
    /// The GPU check: model-sized kernels, the fixture at `fixture`, 200 steps of the tiny job
    /// at batch 64, `small` and `base` at batch 64 and 256 (224 px, patch 16, text 64,
    /// vocabulary 30,522), 5 timed steps each.
    pub fn full(fixture: Option<PathBuf>, work_dir: PathBuf, dev: &Device) -> Self {
        Self {
            sections: SECTIONS.iter().map(|s| s.to_string()).collect(),
            small_kernels: false,
            fixture,
            parity_tolerance_scale: if dev.is_cpu() { 1.0 } else { 10.0 },
            train_steps: 200,
            train_batch: 64,
            train_window: 10,
            work_dir,
            throughput: ["small", "base"]
                .iter()
                .flat_map(|p| [64, 256].map(|b| (p.to_string(), b)))
                .collect(),
            throughput_model: perf::ThroughputModel::paper(),
            bench_steps: 5,
        }
    }

    /// The same rows at toy sizes (seconds on the CPU): small kernel shapes, 4 training steps
    /// of batch 8, the `tiny` preset at batch 2 for throughput, 1 timed step.
    pub fn quick(fixture: Option<PathBuf>, work_dir: PathBuf, dev: &Device) -> Self {
        Self {
            small_kernels: true,
            train_steps: 4,
            train_batch: 8,
            train_window: 2,
            throughput: vec![("tiny".into(), 2)],
            throughput_model: perf::ThroughputModel::preset(),
            bench_steps: 1,
            ..Self::full(fixture, work_dir, dev)
        }
    }

    /// Whether `section` runs.
    pub fn runs(&self, section: &str) -> bool {
        self.sections.iter().any(|s| s == section)
    }
}

/// The finished check: a header (device, GPU, build) and the rows.
#[derive(Debug, Clone)]
pub struct Report {
    /// (name, value) lines printed above the table.
    pub header: Vec<(String, String)>,
    /// The rows in the order they ran.
    pub rows: Vec<Row>,
}

impl Report {
    /// Rows that failed.
    pub fn failed(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| r.status == Status::Fail)
            .count()
    }

    /// The header as a list and the rows as one markdown table, then a `N passed, N failed,
    /// N skipped` line.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.header {
            s.push_str(&format!("- {k}: {v}\n"));
        }
        s.push('\n');
        s.push_str("| section | check | status | result | tolerance / target | s |\n");
        s.push_str("|---|---|---|---|---|---|\n");
        let cell = |x: &str| x.replace('|', "\\|").replace('\n', " ");
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {:.1} |\n",
                r.section,
                cell(&r.name),
                r.status,
                cell(&r.result),
                cell(&r.tolerance),
                r.seconds
            ));
        }
        let count = |st: Status| self.rows.iter().filter(|r| r.status == st).count();
        s.push_str(&format!(
            "\n{} passed, {} failed, {} skipped\n",
            count(Status::Pass),
            count(Status::Fail),
            count(Status::Skip)
        ));
        s
    }
}

/// `cpu` or `cuda:N`.
pub fn device_label(dev: &Device) -> String {
    m3ae_model::DeviceSpec::of(dev)
        .map(|s| s.to_string())
        .unwrap_or_else(|_| format!("{:?}", dev.location()))
}

/// The GPU's name, or `None` on the CPU (or when it cannot be read).
pub fn device_name(dev: &Device) -> Option<String> {
    #[cfg(feature = "cuda")]
    if let Ok(cuda) = dev.as_cuda_device() {
        return cuda.cuda_stream().context().name().ok();
    }
    let _ = dev;
    None
}

/// Runs every section of `plan` on `dev`; `on_row` sees each row as it finishes (progress).
pub fn run(dev: &Device, plan: &Plan, mut on_row: impl FnMut(&Row)) -> Report {
    let gpu = device_name(dev);
    let mut header = vec![
        ("device".to_string(), device_label(dev)),
        (
            "GPU".to_string(),
            gpu.clone().unwrap_or_else(|| "none".into()),
        ),
        (
            "host".to_string(),
            format!(
                "{} threads",
                std::thread::available_parallelism().map_or(1, |n| n.get())
            ),
        ),
        (
            "m3ae".to_string(),
            format!(
                "{} (features: {})",
                env!("CARGO_PKG_VERSION"),
                if cfg!(feature = "cuda") { "cuda" } else { "-" }
            ),
        ),
    ];
    if !dev.is_cpu() {
        header.push((
            "f32 matmuls".into(),
            "full FP32 (candle's TF32 switch is off); MFU against the FP32 and TF32 peaks".into(),
        ));
    }
    let mut rows = Vec::new();
    let mut push = |r: Row| {
        on_row(&r);
        rows.push(r);
    };
    if plan.runs("kernels") {
        for r in kernels::rows(dev, plan.small_kernels) {
            push(r);
        }
    }
    if let (true, Some(dir)) = (plan.runs("parity"), &plan.fixture) {
        for path in [KernelPath::Fused, KernelPath::Reference] {
            push(parity_row(dir, path, dev, plan.parity_tolerance_scale));
        }
    }
    if plan.runs("training") {
        for r in train::rows(dev, plan) {
            push(r);
        }
    }
    if plan.runs("throughput") {
        for r in perf::rows(dev, plan, gpu.as_deref()) {
            push(r);
        }
    }
    Report { header, rows }
}

/// The official fixture on `dev` on one kernel path.
fn parity_row(dir: &std::path::Path, path: KernelPath, dev: &Device, scale: f64) -> Row {
    row(
        "parity",
        format!("{} ({path:?} kernels, f32)", dir.display()),
        format!("the CPU tolerances x{scale}"),
        || {
            anyhow::ensure!(
                dir.join("config.json").is_file(),
                "no fixture at {} (run from the repository root, or pass --fixture)",
                dir.display()
            );
            let checks = m3ae_official::parity::run_on(dir, path, dev, scale)?;
            let failed: Vec<&str> = checks
                .iter()
                .filter(|c| !c.ok)
                .map(|c| c.name.as_str())
                .collect();
            let mut msg = format!(
                "{} tensors, {} out of tolerance",
                checks.len(),
                failed.len()
            );
            if !failed.is_empty() {
                let first: Vec<&str> = failed.iter().take(4).copied().collect();
                msg.push_str(&format!(": {}", first.join(", ")));
                if failed.len() > 4 {
                    msg.push_str(", ...");
                }
            }
            Ok((pass_if(failed.is_empty() && !checks.is_empty()), msg))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_or_panicking_row_does_not_stop_the_next() {
        let rows = [
            row("kernels", "errors", "-", || anyhow::bail!("boom")),
            row("kernels", "panics", "-", || panic!("bang {}", 1)),
            row("kernels", "passes", "1e-5", || {
                Ok((Status::Pass, "0".into()))
            }),
        ];
        assert_eq!(rows[0].status, Status::Fail);
        assert!(rows[0].result.contains("boom"), "{}", rows[0].result);
        assert_eq!(rows[1].status, Status::Fail);
        assert!(rows[1].result.contains("bang 1"), "{}", rows[1].result);
        assert_eq!(rows[2].status, Status::Pass);
        let report = Report {
            header: vec![("device".into(), "Cpu".into())],
            rows: rows.to_vec(),
        };
        assert_eq!(report.failed(), 2);
        let md = report.markdown();
        assert!(md.contains("| section | check | status |"), "{md}");
        assert!(
            md.contains("| kernels | passes | PASS | 0 | 1e-5 |"),
            "{md}"
        );
        assert!(md.ends_with("1 passed, 2 failed, 0 skipped\n"), "{md}");
    }

    #[test]
    fn cells_escape_pipes_and_newlines() {
        let r = row("parity", "a|b", "-", || Ok((Status::Skip, "x\ny".into())));
        let md = Report {
            header: vec![],
            rows: vec![r],
        }
        .markdown();
        assert!(md.contains("| a\\|b | SKIP | x y |"), "{md}");
    }
}
