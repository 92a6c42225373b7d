//! Parity with the official JAX code on the `official_tiny` fixture (copied into the repo), and
//! checks that the harness really fails when the numbers are off.

use candle_core::Device;
use m3ae::kernels::KernelPath;
use m3ae::parity::{compare, run, run_with, Tolerance};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/official_tiny")
}

#[test]
fn every_fixture_tensor_matches_the_official_code_on_the_fused_kernels() -> anyhow::Result<()> {
    all_checks_pass(KernelPath::Fused)
}

#[test]
fn every_fixture_tensor_matches_the_official_code_on_the_reference_kernels() -> anyhow::Result<()> {
    all_checks_pass(KernelPath::Reference)
}

fn all_checks_pass(path: KernelPath) -> anyhow::Result<()> {
    let checks = run_with(&fixture(), path)?;
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "out of tolerance:\n{}",
        failed.join("\n")
    );
    // 44 m3ae_io + 1 config + 56 m3ae grads + 10 probe + 1 cross-check + 18 mae_io + 39 mae grads
    assert!(checks.len() >= 169, "only {} checks ran", checks.len());
    for key in [
        "m3ae_io:out.text_logits",
        "m3ae_grads:grad.text_embedding.embedding",
        "linear_probe:linear.logits_train",
        "mae_io:repr.output",
    ] {
        assert!(
            checks.iter().any(|c| c.name == key),
            "{key} was not checked"
        );
    }
    Ok(())
}

#[test]
fn a_small_weight_perturbation_is_caught() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("m3ae-parity-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for e in std::fs::read_dir(fixture())? {
        let e = e?;
        std::fs::copy(e.path(), dir.join(e.file_name()))?;
    }
    let path = dir.join("m3ae_params.safetensors");
    let (mut t, meta) = m3ae::model::params::read_safetensors(&path, &Device::Cpu)?;
    let key = "decoder.LayerNorm_0.scale";
    let scaled = (t[key].clone() * 1.001)?;
    t.insert(key.into(), scaled);
    m3ae::model::params::write_safetensors(&path, &t, meta)?;
    let checks = run(&dir)?;
    let bad: Vec<&str> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.name.as_str())
        .collect();
    assert!(bad.contains(&"m3ae_io:out.image"), "{bad:?}");
    assert!(bad.contains(&"m3ae_io:dec.output"), "{bad:?}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn compare_applies_each_tolerance() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let b = candle_core::Tensor::new(&[1.0f32, -2.0, 100.0], &dev)?;
    let close = candle_core::Tensor::new(&[1.0f32 + 5e-6, -2.0, 100.005], &dev)?;
    let far = candle_core::Tensor::new(&[1.0f32 + 5e-4, -2.0, 100.0], &dev)?;
    assert!(compare("x", &close, &b, Tolerance::FORWARD).ok);
    assert!(!compare("x", &far, &b, Tolerance::FORWARD).ok);
    assert!(!compare("x", &close, &b, Tolerance::Exact).ok);
    assert!(compare("x", &b, &b, Tolerance::Exact).ok);
    // gradient rule: 1e-4 * max|b| = 1e-2 absolute slack here
    assert!(compare("g", &far, &b, Tolerance::GRAD).ok);
    let wrong_shape = candle_core::Tensor::new(&[1.0f32, 2.0], &dev)?;
    let c = compare("s", &wrong_shape, &b, Tolerance::FORWARD);
    assert!(!c.ok && c.note.contains("shape"));
    Ok(())
}
