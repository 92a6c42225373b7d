//! `m3ae doctor` on the CPU at toy sizes (`--quick`): the program the GPU check runs
//! (scripts/gpu-check.sh) is itself exercised without a GPU: every section runs, prints one
//! markdown table, writes it with `--out`, and exits 0 when no row fails (the bf16 training run
//! included); bf16 throughput is skipped on the CPU; a section can be chosen; an unknown one is refused.

use std::process::Command;

fn m3ae() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_m3ae"));
    c.env("RAYON_NUM_THREADS", "2")
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

#[test]
fn the_quick_check_passes_on_the_cpu_and_prints_one_table() {
    let dir = std::env::temp_dir().join(format!("m3ae-doctor-test-{}", std::process::id()));
    let table = dir.join("table.md");
    let out = m3ae()
        .args(["doctor", "--device", "cpu", "--quick", "--work-dir"])
        .arg(dir.join("work"))
        .arg("--out")
        .arg(&table)
        .output()
        .expect("m3ae runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    // one table, a row per check of every section, nothing failed
    assert_eq!(
        stdout.matches("| section | check | status |").count(),
        1,
        "{stdout}"
    );
    for section in ["kernels", "parity", "training", "throughput"] {
        assert!(
            stdout.contains(&format!("| {section} | ")),
            "no {section} row:\n{stdout}"
        );
    }
    assert!(!stdout.contains("| FAIL |"), "{stdout}");
    // bf16 throughput is measured only where a bf16 kernel of the CPU runs (the same choice as
    // the binary's: same CPU, same environment)
    let bf16_row = stdout
        .lines()
        .find(|l| l.starts_with("| throughput |") && l.contains(", bf16 |"))
        .unwrap_or_else(|| panic!("no bf16 throughput row:\n{stdout}"));
    if m3ae_kernels::fused::bf16::backend().is_native() {
        assert!(bf16_row.contains("| PASS |"), "{bf16_row}");
    } else {
        assert!(
            bf16_row.contains("| SKIP | bf16 on this CPU is emulated in f32 arithmetic"),
            "{bf16_row}"
        );
    }
    assert!(
        stdout.contains("169 tensors, 0 out of tolerance"),
        "{stdout}"
    );
    assert!(stdout.contains(" 0 failed, "), "{stdout}");
    assert_eq!(std::fs::read_to_string(&table).unwrap(), stdout);
    // every row was reported as it finished
    assert!(stderr.matches("[doctor] ").count() >= 15, "{stderr}");
    // the training runs cleaned up after themselves
    assert!(!dir.join("work").join("doctor-cpu-f32").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sections_are_chosen_by_name() {
    let out = m3ae()
        .args([
            "doctor",
            "--device",
            "cpu",
            "--quick",
            "--sections",
            "parity",
        ])
        .output()
        .expect("m3ae runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("| parity | ") && !stdout.contains("| kernels | "));
    assert!(stdout.contains("2 passed, 0 failed, 0 skipped"), "{stdout}");

    let out = m3ae()
        .args(["doctor", "--device", "cpu", "--sections", "kernel"])
        .output()
        .expect("m3ae runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("unknown section \"kernel\""), "{stderr}");

    // a missing fixture is a failed row, and the check exits 1 after printing the table
    let out = m3ae()
        .args([
            "doctor",
            "--device",
            "cpu",
            "--quick",
            "--sections",
            "parity",
        ])
        .args(["--fixture", "no/such/fixture"])
        .output()
        .expect("m3ae runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("no fixture at no/such/fixture"), "{stdout}");
}
