//! Parity with the official JAX code on the `official_tiny` (pre-training) and
//! `official_finetune` (fine-tuning) fixtures (copied into the repo), and checks that the
//! harness really fails when the numbers are off.

use candle_core::Device;
use m3ae_kernels::KernelPath;
use m3ae_official::parity::{compare, run, run_with, Tolerance};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/official_tiny")
}

fn finetune_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/official_finetune")
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

/// The names of the checks that fail on a copy of `fixture` whose weight `key` (in
/// `params_file`) is scaled by 1.001.
fn failures_with_perturbed_weight(
    fixture: &std::path::Path,
    tag: &str,
    params_file: &str,
    key: &str,
) -> anyhow::Result<Vec<String>> {
    let dir = std::env::temp_dir().join(format!("m3ae-parity-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for e in std::fs::read_dir(fixture)? {
        let e = e?;
        std::fs::copy(e.path(), dir.join(e.file_name()))?;
    }
    let path = dir.join(params_file);
    let (mut t, meta) = m3ae_model::params::read_safetensors(&path, &Device::Cpu)?;
    let scaled = (t[key].clone() * 1.001)?;
    t.insert(key.into(), scaled);
    m3ae_model::params::write_safetensors(&path, &t, meta)?;
    let bad = run(&dir)?
        .into_iter()
        .filter(|c| !c.ok)
        .map(|c| c.name)
        .collect();
    std::fs::remove_dir_all(&dir)?;
    Ok(bad)
}

#[test]
fn a_small_weight_perturbation_is_caught() -> anyhow::Result<()> {
    let bad = failures_with_perturbed_weight(
        &fixture(),
        "tiny",
        "m3ae_params.safetensors",
        "decoder.LayerNorm_0.scale",
    )?;
    assert!(bad.iter().any(|b| b == "m3ae_io:out.image"), "{bad:?}");
    assert!(bad.iter().any(|b| b == "m3ae_io:dec.output"), "{bad:?}");
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

#[test]
fn the_probe_backbone_takes_use_type_embedding_from_config_json() -> anyhow::Result<()> {
    // A copy of the fixture whose M3AE has no type embeddings (config.json says so and the
    // params have none): the linear-probe backbone must follow config.json instead of
    // forcing type embeddings on (which fails on the missing parameters).
    use candle_core::Tensor;
    use m3ae_model::{M3ae, ModelInput, Unexpected};
    let dir = std::env::temp_dir().join(format!("m3ae-parity-notype-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    for e in std::fs::read_dir(fixture())? {
        let e = e?;
        std::fs::copy(e.path(), dir.join(e.file_name()))?;
    }
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)?;
    cfg["model"]["use_type_embedding"] = serde_json::Value::Bool(false);
    std::fs::write(&cfg_path, serde_json::to_string(&cfg)?)?;
    let dev = Device::Cpu;
    let params_path = dir.join("m3ae_params.safetensors");
    let (mut params, meta) = m3ae_model::params::read_safetensors(&params_path, &dev)?;
    params.retain(|k, _| !k.contains("type_embedding"));
    m3ae_model::params::write_safetensors(&params_path, &params, meta)?;
    // golden probe features of this model: the M3AE's own image-only representation
    let fc = m3ae_official::parity::FixtureConfig::read(&dir)?;
    let model = M3ae::from_official(&fc.m3ae, params, Unexpected::Error, "params", &dev)?;
    let lp_path = dir.join("linear_probe.safetensors");
    let (mut lp, meta) = m3ae_model::params::read_safetensors(&lp_path, &dev)?;
    let rep = model.forward_representation(&ModelInput {
        image_patches: Some(lp["linear.input_image_patches"].clone()),
        ..Default::default()
    })?;
    let li = rep.dim(1)? - 1;
    lp.insert("linear.representation".into(), rep.clone());
    lp.insert(
        "linear.feature_cls".into(),
        rep.narrow(1, 0, 1)?.squeeze(1)?,
    );
    let mean: Tensor = rep.narrow(1, 1, li)?.mean(1)?;
    lp.insert("linear.feature_meanpool".into(), mean);
    m3ae_model::params::write_safetensors(&lp_path, &lp, meta)?;
    let checks = run(&dir)?;
    for key in [
        "linear_probe:linear.representation",
        "linear_probe:linear.feature_cls",
        "linear_probe:linear.feature_meanpool",
    ] {
        let c = checks
            .iter()
            .find(|c| c.name == key)
            .unwrap_or_else(|| panic!("{key} was not checked"));
        assert!(c.ok, "{c}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn the_finetune_fixture_matches_the_official_code_on_both_kernel_paths() -> anyhow::Result<()> {
    let dir = finetune_fixture();
    assert!(m3ae_official::parity::is_finetune_fixture(&dir));
    assert!(!m3ae_official::parity::is_finetune_fixture(&fixture()));
    for path in [KernelPath::Reference, KernelPath::Fused] {
        let checks = run_with(&dir, path)?;
        let failed: Vec<String> = checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.to_string())
            .collect();
        assert!(
            failed.is_empty(),
            "{path:?}: out of tolerance:\n{}",
            failed.join("\n")
        );
        // 1 patchify + 1 left-out + 1 repr + 2 x (7 io + 46 + 20 grads) + 2 + 66 layer decay
        // + mixup (2 + 6 + 2)
        assert!(
            checks.len() >= 223,
            "{path:?}: only {} checks ran",
            checks.len()
        );
        for key in [
            "vit_io:repr.output",
            "vit_io:cls.logits",
            "vit_io:gp.log_probs",
            "vit_io:gp.loss.smoothing_0.1",
            "vit_io:cls.loss.soft",
            "vit_io:gp.accuracy",
            "vit_grads:grad.params.base_model.encoder.Block_0.Attention_0.Dense_0.kernel",
            "vit_grads:grad_gp.params.Dense_0.kernel",
            "vit_grads:grad_gp.params.base_model.decoder.Block_0.LayerNorm_0.scale",
            "layer_decay:params.base_model.encoder.LayerNorm_0.scale",
            "layer_decay:params.base_model.decoder_image_type_embedding",
            "mixup:cutmix.box",
            "mixup:default_flags.branch",
        ] {
            assert!(
                checks.iter().any(|c| c.name == key),
                "{key} was not checked"
            );
        }
    }
    Ok(())
}

#[test]
fn the_fixture_soft_labels_are_smoothed_labels_mixed_with_the_reversed_batch() -> anyhow::Result<()>
{
    // README: input.soft_labels = 0.7 s + 0.3 s[::-1], s = one-hot smoothed by 0.1.
    use m3ae_data::mixup::{mix_with, MixChoice};
    let (io, _) = m3ae_model::params::read_safetensors(
        &finetune_fixture().join("vit_io.safetensors"),
        &Device::Cpu,
    )?;
    let labels: Vec<u32> = io["input.labels"]
        .to_dtype(candle_core::DType::I64)?
        .to_vec1::<i64>()?
        .into_iter()
        .map(|l| l as u32)
        .collect();
    let mixed = mix_with(
        &io["input.image"],
        &labels,
        5,
        0.1,
        MixChoice::Mixup { lambda: 0.7 },
    )?;
    let c = compare(
        "soft_labels",
        &mixed.labels,
        &io["input.soft_labels"],
        Tolerance::FORWARD,
    );
    assert!(c.ok, "{c}");
    Ok(())
}

#[test]
fn a_perturbed_head_fails_the_finetune_checks() -> anyhow::Result<()> {
    let bad = failures_with_perturbed_weight(
        &finetune_fixture(),
        "ft",
        "vit_params.safetensors",
        "params.LayerNorm_0.scale",
    )?;
    assert!(bad.iter().any(|b| b == "vit_io:cls.logits"), "{bad:?}");
    assert!(bad.iter().any(|b| b == "vit_io:gp.logits"), "{bad:?}");
    assert!(!bad.iter().any(|b| b == "vit_io:repr.output"), "{bad:?}");
    Ok(())
}

#[test]
fn run_on_a_device_scales_the_tolerances_and_keeps_exact_checks_exact() -> anyhow::Result<()> {
    let base = run_with(&fixture(), KernelPath::Fused)?;
    let scaled = m3ae_official::parity::run_on(&fixture(), KernelPath::Fused, &Device::Cpu, 10.0)?;
    assert_eq!(base.len(), scaled.len());
    for (b, s) in base.iter().zip(&scaled) {
        assert_eq!(
            (&b.name, b.ok, b.max_abs_err),
            (&s.name, s.ok, s.max_abs_err)
        );
        match b.tolerance.as_str() {
            "exact" | "-" => assert_eq!(s.tolerance, b.tolerance, "{}", b.name),
            _ => assert_ne!(s.tolerance, b.tolerance, "{}", b.name),
        }
    }
    let loss = scaled
        .iter()
        .find(|c| c.name == "m3ae_io:loss.total")
        .unwrap();
    assert_eq!(loss.tolerance, "0e0+1e-4|b|");
    // a fine-tuning fixture is checked on the CPU with its own tolerances only
    let e =
        m3ae_official::parity::run_on(&finetune_fixture(), KernelPath::Fused, &Device::Cpu, 10.0)
            .unwrap_err();
    assert!(e.to_string().contains("CPU only"), "{e}");
    Ok(())
}
