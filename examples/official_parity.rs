//! Compares this implementation with golden outputs of the official JAX code.
//!
//! ```text
//! cargo run --release --example official_parity -- tests/fixtures/official_tiny
//! cargo run --release --example official_parity -- tests/fixtures/official_tiny reference
//! cargo run --release --example official_parity -- tests/fixtures/official_finetune
//! ```
//! The optional second argument picks the kernels: `fused` (default) or `reference`.
//! A pre-training fixture folder needs `config.json` and the `m3ae_*`, `mae_*` and
//! `linear_probe` safetensors files (see `tests/fixtures/official_tiny/README.md`); a
//! fine-tuning one (recognised by its `vit_params` / `vit_io` / `vit_grads` safetensors and
//! `layer_decay.json`) `config.json` and those files, plus `mixup.json` (see
//! `tests/fixtures/official_finetune/README.md`). Prints one line per check and exits non-zero
//! if any tensor is out of tolerance, missing, or not checked.

fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tests/fixtures/official_tiny".into());
    let kernels = match std::env::args().nth(2).as_deref() {
        None | Some("fused") => m3ae::kernels::KernelPath::Fused,
        Some("reference") => m3ae::kernels::KernelPath::Reference,
        Some(other) => anyhow::bail!("unknown kernel path {other:?}: expected fused or reference"),
    };
    let checks = m3ae::official::parity::run_with(std::path::Path::new(&dir), kernels)?;
    for c in &checks {
        println!("{c}");
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    println!("{} passed, {} failed", checks.len() - failed, failed);
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
