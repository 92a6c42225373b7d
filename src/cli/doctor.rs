//! `m3ae doctor`: checks a device (a GPU above all) and prints one markdown table — the kernels
//! against the CPU, the official fixture on the device, a short training run against the CPU's
//! and the throughput of `small` and `base` (see [`crate::doctor`]). Exits 1 when a row fails.

use anyhow::{Context, Result};
use std::path::PathBuf;

/// Arguments of `m3ae doctor`.
#[derive(clap::Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    device: super::DeviceArg,
    /// Toy sizes (seconds on the CPU): small kernel shapes, 4 training steps, the `tiny` preset
    /// for throughput. Without it the check is sized for a GPU (a few minutes on an H100).
    #[arg(long)]
    quick: bool,
    /// The official fixture folder of the parity rows.
    #[arg(long, default_value = "tests/fixtures/official_tiny")]
    fixture: PathBuf,
    /// Sections to run, comma-separated: kernels, parity, training, throughput.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kernels,parity,training,throughput"
    )]
    sections: Vec<String>,
    /// Where the training runs write (removed afterwards; default: a folder in the temporary
    /// directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Also write the table (markdown) to this file (rewritten after every row, so a check that
    /// is stopped leaves the rows it finished).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Runs the check, prints each row to stderr as it finishes and the table to stdout.
pub fn run(a: DoctorArgs) -> Result<()> {
    for s in &a.sections {
        anyhow::ensure!(
            crate::doctor::SECTIONS.contains(&s.as_str()),
            "--sections: unknown section {s:?} (expected {})",
            crate::doctor::SECTIONS.join(", ")
        );
    }
    let dev = a.device.open()?;
    let (work_dir, temporary) = match a.work_dir {
        Some(d) => (d, false),
        None => (
            std::env::temp_dir().join(format!("m3ae-doctor-{}", std::process::id())),
            true,
        ),
    };
    let mut plan = if a.quick {
        crate::doctor::Plan::quick(Some(a.fixture), work_dir.clone(), &dev)
    } else {
        crate::doctor::Plan::full(Some(a.fixture), work_dir.clone(), &dev)
    };
    plan.sections = a.sections;
    eprintln!(
        "m3ae doctor on {}{}: sections {}",
        crate::doctor::device_label(&dev),
        crate::doctor::device_name(&dev)
            .map(|n| format!(" ({n})"))
            .unwrap_or_default(),
        plan.sections.join(", ")
    );
    // `--out` holds the table of the rows so far after every row: a check stopped by a time
    // limit still leaves what it measured
    let mut so_far = crate::doctor::Report {
        header: Vec::new(),
        rows: Vec::new(),
    };
    let report = crate::doctor::run(&dev, &plan, |r| {
        eprintln!(
            "[doctor] {} {}: {} ({:.1} s): {}",
            r.status, r.section, r.name, r.seconds, r.result
        );
        if let Some(path) = &a.out {
            so_far.rows.push(r.clone());
            let _ = std::fs::write(path, so_far.markdown());
        }
    });
    if temporary {
        let _ = std::fs::remove_dir_all(&work_dir);
    }
    let table = report.markdown();
    print!("{table}");
    if let Some(path) = &a.out {
        std::fs::write(path, &table).with_context(|| format!("writing {}", path.display()))?;
    }
    if report.failed() > 0 {
        std::process::exit(1);
    }
    Ok(())
}
