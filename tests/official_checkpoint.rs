//! Official checkpoints: bit-identical conversion of the six fixture pickles (two writer stacks),
//! the converted model against `M3ae::from_official` on the `official_tiny` inputs, the native /
//! official round trip, the optimizer and probe outputs, and the CLI.

use candle_core::{DType, Device, Tensor};
use m3ae::model::{param_specs, patchify, M3ae, Masking, ModelInput, Noise, Unexpected, Variant};
use m3ae::official::{self, CheckpointKind, OfficialCheckpoint};
mod common;
use common::{ckpt_dir, f32_bits, fixtures};
use m3ae::official::parity::FixtureConfig;
use std::collections::BTreeSet;
use std::path::PathBuf;

#[test]
fn all_six_pickles_convert_bit_identically_to_the_expected_files() -> anyhow::Result<()> {
    for stack in ["", "modern/"] {
        for kind in ["m3ae", "mae", "linear"] {
            let pkl = ckpt_dir().join(format!("{stack}{kind}_model.pkl"));
            let expected_path = ckpt_dir().join(format!("{stack}{kind}_expected.safetensors"));
            let ckpt = OfficialCheckpoint::read(&pkl)?;
            assert_eq!(ckpt.kind.name(), kind, "{}", pkl.display());
            let ours = ckpt.flat_tensors();
            let bytes = std::fs::read(&expected_path)?;
            let expected = safetensors::SafeTensors::deserialize(&bytes)?;
            let want: BTreeSet<String> = expected
                .names()
                .into_iter()
                .map(|s| s.to_string())
                .collect();
            let got: BTreeSet<String> = ours.keys().cloned().collect();
            assert_eq!(
                got.symmetric_difference(&want).collect::<Vec<_>>(),
                Vec::<&String>::new(),
                "{stack}{kind}: key sets differ"
            );
            for name in &want {
                let e = expected.tensor(name)?;
                let o = &ours[name];
                assert_eq!(
                    format!("{:?}", e.dtype()),
                    o.dtype.safetensors_name(),
                    "{stack}{kind}: dtype of {name}"
                );
                assert_eq!(
                    e.shape(),
                    o.shape.as_slice(),
                    "{stack}{kind}: shape of {name}"
                );
                assert!(
                    e.data() == o.data.as_slice(),
                    "{stack}{kind}: bytes of {name}"
                );
            }
            // The metadata of the expected file agrees with what the walk found.
            let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
            let meta = header.metadata().clone().unwrap_or_default();
            assert_eq!(meta["kind"], kind);
            assert_eq!(
                meta["checkpoint_step"],
                ckpt.checkpoint_step.unwrap().to_string()
            );
            assert_eq!(
                meta["state_step"],
                ckpt.state_step
                    .as_ref()
                    .unwrap()
                    .to_i64()
                    .unwrap()
                    .to_string()
            );
            let variant: serde_json::Value = serde_json::from_str(&meta["variant"])?;
            assert_eq!(
                variant,
                serde_json::Value::Object(ckpt.flags.clone()),
                "{stack}{kind}"
            );
        }
    }
    Ok(())
}

#[test]
fn configs_are_rebuilt_from_the_flag_sets() -> anyhow::Result<()> {
    let tiny = FixtureConfig::read(&fixtures().join("official_tiny"))?;
    for stack in ["", "modern/"] {
        let m3ae = OfficialCheckpoint::read(&ckpt_dir().join(format!("{stack}m3ae_model.pkl")))?;
        let c = m3ae.config()?;
        let mut want = tiny.m3ae.resolved();
        want.kernels = c.kernels;
        assert_eq!(c, want, "{stack}m3ae");
        let mae = OfficialCheckpoint::read(&ckpt_dir().join(format!("{stack}mae_model.pkl")))?;
        let c = mae.config()?;
        assert!(!c.use_type_embedding);
        assert_eq!(
            (c.emb_dim, c.depth, c.patch_size, c.image_size),
            (64, 2, 8, 32)
        );
        let lin = OfficialCheckpoint::read(&ckpt_dir().join(format!("{stack}linear_model.pkl")))?;
        assert_eq!(lin.kind, CheckpointKind::Linear);
        let c = lin.config()?;
        assert!(c.use_type_embedding);
        assert_eq!(param_specs(&c, Variant::Mae).len(), 50);
    }
    Ok(())
}

/// Acceptance 2: the converted model equals `M3ae::from_official` on the same tensors, on the
/// `official_tiny` inputs, and native -> official names is lossless.
#[test]
fn converted_m3ae_runs_like_the_parity_model_and_round_trips_losslessly() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let pkl = ckpt_dir().join("m3ae_model.pkl");
    let out = tmp("acc2");
    let c = official::convert_official(&pkl, &out, false)?;
    assert_eq!(c.kind, CheckpointKind::M3ae);
    let converted = official::load_m3ae(&out, &dev)?;

    let ckpt = OfficialCheckpoint::read(&pkl)?;
    let tiny = FixtureConfig::read(&fixtures().join("official_tiny"))?;
    let reference = M3ae::from_official(
        &tiny.m3ae,
        ckpt.official_tensors(&dev)?,
        Unexpected::Error,
        "m3ae_model.pkl",
        &dev,
    )?;

    // Round trip: native (file) -> official names equals the pickle's bytes.
    let specs = param_specs(converted.config(), Variant::M3ae);
    let official = converted.params().to_official(&specs)?;
    assert_eq!(official.len(), ckpt.params.len());
    for (k, raw) in &ckpt.params {
        let t = &official[k];
        assert_eq!(t.dims(), raw.shape.as_slice(), "{k}");
        let bytes: Vec<u8> = f32_bits(t).iter().flat_map(|b| b.to_le_bytes()).collect();
        assert!(bytes == raw.data, "{k}: round trip changed bytes");
    }
    // The export command writes the same bytes.
    let exported = out.join("exported.safetensors");
    official::export_official(&out, &exported)?;
    let bytes = std::fs::read(&exported)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    assert_eq!(st.len(), ckpt.params.len());
    for (k, raw) in &ckpt.params {
        assert!(st.tensor(k)?.data() == raw.data.as_slice(), "export {k}");
    }

    // Forward on the official_tiny inputs.
    let io =
        candle_core::safetensors::load(fixtures().join("official_tiny/m3ae_io.safetensors"), &dev)?;
    let cfg = converted.config().clone();
    let patches = patchify(&io["input.image"], cfg.patch_size)?;
    let text = io["input.text"].to_dtype(DType::U32)?;
    let pad = io["input.text_padding_mask"].clone();
    let (b, t) = pad.dims2()?;
    let li = patches.dim(1)?;
    let im = Masking::new(
        &Noise::from_tensor(&io["noise.image"])?,
        b,
        cfg.image_keep(li),
        &dev,
    )?;
    let tm = Masking::new(
        &Noise::from_tensor(&io["noise.text"])?,
        b,
        cfg.text_keep(t),
        &dev,
    )?;
    let input = ModelInput {
        image_patches: Some(patches),
        text_ids: Some(text),
        text_padding: Some(pad),
    };
    let a = converted.forward(&input, Some(&im), Some(&tm))?;
    let r = reference.forward(&input, Some(&im), Some(&tm))?;
    assert_eq!(
        f32_bits(a.image.as_ref().unwrap()),
        f32_bits(r.image.as_ref().unwrap())
    );
    assert_eq!(
        f32_bits(a.text_logits.as_ref().unwrap()),
        f32_bits(r.text_logits.as_ref().unwrap())
    );
    let la = converted.losses(&input, &a)?.total.to_scalar::<f32>()?;
    let lr = reference.losses(&input, &r)?.total.to_scalar::<f32>()?;
    assert_eq!(la.to_bits(), lr.to_bits());
    assert_eq!(
        f32_bits(&converted.forward_representation(&input)?),
        f32_bits(&reference.forward_representation(&input)?)
    );
    // Loading straight from the pickle gives the same model.
    let direct = official::load_m3ae(&pkl, &dev)?;
    let d = direct.forward(&input, Some(&im), Some(&tm))?;
    assert_eq!(
        f32_bits(d.image.as_ref().unwrap()),
        f32_bits(r.image.as_ref().unwrap())
    );
    std::fs::remove_dir_all(&out)?;
    Ok(())
}

#[test]
fn optimizer_state_converts_to_our_adamw_format() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for kind in ["m3ae", "mae"] {
        let pkl = ckpt_dir().join(format!("modern/{kind}_model.pkl"));
        let out = tmp(&format!("opt-{kind}"));
        let c = official::convert_official(&pkl, &out, true)?;
        let variant = if kind == "m3ae" {
            Variant::M3ae
        } else {
            Variant::Mae
        };
        let specs = param_specs(&c.config, variant);
        let (t, meta) =
            m3ae::model::params::read_safetensors(&out.join("optimizer.safetensors"), &dev)?;
        assert_eq!(meta["step"], "2");
        let mut opt = m3ae::train::optim::AdamW::new(
            m3ae::train::optim::AdamWConfig::default(),
            &specs,
            variant,
        );
        opt.load_state(&t, &meta, "optimizer.safetensors")?;
        assert_eq!(opt.step_count(), 2);
        // m.{native} is the native (transposed) layout of opt.mu.{official}, flattened.
        let ckpt = OfficialCheckpoint::read(&pkl)?;
        let mu = &ckpt.opt.as_ref().unwrap().mu["encoder.Block_0.Attention_0.Dense_0.kernel"];
        let mu_native = mu.to_tensor(&dev)?.t()?.contiguous()?;
        assert_eq!(
            f32_bits(&t["m.encoder.blocks.0.attn.qkv.weight"]),
            f32_bits(&mu_native)
        );
        std::fs::remove_dir_all(&out)?;
    }
    Ok(())
}

#[test]
fn linear_probe_converts_to_backbone_and_head() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let pkl = ckpt_dir().join("linear_model.pkl");
    let out = tmp("linear");
    let c = official::convert_official(&pkl, &out, false)?;
    assert_eq!(c.kind, CheckpointKind::Linear);
    let backbone = official::load_mae(&out, &dev)?;
    assert!(backbone.config().use_type_embedding);
    let (t, _) = m3ae::model::params::read_safetensors(&out.join("probe.safetensors"), &dev)?;
    assert_eq!(t["weight"].dims(), &[10, 64]);
    let ckpt = OfficialCheckpoint::read(&pkl)?;
    let head = ckpt.probe_head(&dev)?;
    assert_eq!(f32_bits(&head.weight), f32_bits(&t["weight"]));
    assert_eq!(
        f32_bits(&t["running_var"]),
        f32_bits(&ckpt.batch_stats["bn.var"].to_tensor(&dev)?)
    );
    // The probe predicts on backbone features.
    let feats = m3ae::kernels::testing::tensor(&[3, 64], 17, 1.0, &dev)?;
    assert_eq!(head.predict(&feats)?.dims(), &[3]);
    // LARS state is not AdamW.
    let e = official::convert_official(&pkl, &out, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("LARS"), "{e}");
    std::fs::remove_dir_all(&out)?;
    Ok(())
}

#[test]
fn cli_converts_and_exports() -> anyhow::Result<()> {
    let out = tmp("cli");
    let pkl = ckpt_dir().join("mae_model.pkl");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_m3ae"))
            .args(args)
            .output()
            .expect("m3ae runs");
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
        )
    };
    let dir = out.join("mae");
    let (ok, text) = run(&[
        "convert",
        "official",
        pkl.to_str().unwrap(),
        dir.to_str().unwrap(),
        "--optimizer",
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("converted mae checkpoint: 48 weights"),
        "{text}"
    );
    for f in ["model.safetensors", "config.json", "optimizer.safetensors"] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    let exported = out.join("flax.safetensors");
    let (ok, text) = run(&[
        "convert",
        "export",
        dir.join("model.safetensors").to_str().unwrap(),
        exported.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let bytes = std::fs::read(&exported)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    assert!(st
        .names()
        .contains(&"encoder.Block_1.TransformerMLP_0.fc2.kernel"));
    // A corrupt pickle fails with the file and the offset in the message.
    let bad = out.join("bad.pkl");
    std::fs::write(&bad, &std::fs::read(&pkl)?[..1000])?;
    let (ok, text) = run(&[
        "convert",
        "official",
        bad.to_str().unwrap(),
        dir.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        text.contains("bad.pkl") && text.contains("at byte 2"),
        "{text}"
    );
    // Truncated in a later frame: the frame's declared length exceeds the bytes left.
    let data = std::fs::read(&pkl)?;
    std::fs::write(&bad, &data[..data.len() - 7])?;
    let (ok, text) = run(&[
        "convert",
        "official",
        bad.to_str().unwrap(),
        dir.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        text.contains("frame of") && text.contains("bytes left"),
        "{text}"
    );
    std::fs::remove_dir_all(&out)?;
    Ok(())
}

/// A fixture tensor as the converter holds pickled arrays (raw little-endian f32 bytes).
fn raw_f32(t: &Tensor) -> official::RawTensor {
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    official::RawTensor {
        dtype: official::RawDtype::F32,
        shape: t.dims().to_vec(),
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// `m3ae probe --evaluate` on a converted official probe head. The fixtures carry official
/// features with official logits only in `official_tiny/linear_probe.safetensors` (the cls features
/// of 3 images, the official LinearCLS head in Flax layout, its initial BatchNorm statistics and
/// the eval-mode logits `linear_main` computed); the pickled probe checkpoint
/// (`official_checkpoint/linear_model.pkl`) has a head but no features or logits. So the head of
/// `linear_probe` goes through the converter's probe mapping (`OfficialCheckpoint::probe_head`,
/// as for a pickle), is written and read back as `probe.safetensors` (what `--evaluate` loads),
/// and must reproduce the official logits within the fixture's BatchNorm tolerance
/// (`|a - b| <= 1e-4 + 1e-3 |b|`) and the official predictions exactly. The head converted from
/// `linear_model.pkl` is checked against the BatchNorm-eval formula on its own tensors.
#[test]
fn converted_probe_head_reproduces_the_official_logits() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let (lp, _) = m3ae::model::params::read_safetensors(
        &fixtures().join("official_tiny/linear_probe.safetensors"),
        &dev,
    )?;
    let features = lp["linear.feature_cls"].clone();
    let official = lp["linear.logits_eval"].to_vec2::<f32>()?;
    let mut ckpt = OfficialCheckpoint::read(&ckpt_dir().join("linear_model.pkl"))?;
    ckpt.params = [
        ("Dense_0.kernel", "linear.head.Dense_0.kernel"),
        ("Dense_0.bias", "linear.head.Dense_0.bias"),
    ]
    .into_iter()
    .map(|(k, f)| (k.to_string(), raw_f32(&lp[f])))
    .collect();
    ckpt.batch_stats = [
        ("bn.mean", "linear.bn.init_mean"),
        ("bn.var", "linear.bn.init_var"),
    ]
    .into_iter()
    .map(|(k, f)| (k.to_string(), raw_f32(&lp[f])))
    .collect();
    let out = tmp("probe-eval");
    let file = out.join("probe.safetensors");
    m3ae::eval::save_probe_head(&ckpt.probe_head(&dev)?, &file)?;
    let head = m3ae::eval::load_probe_head(&file)?;
    let ours = m3ae::eval::probe::probe_logits(&head, &features)?;
    let classes = official[0].len();
    let mut worst = 0f32;
    for (i, row) in official.iter().enumerate() {
        for (j, &b) in row.iter().enumerate() {
            let a = ours[i * classes + j];
            worst = worst.max((a - b).abs());
            assert!(
                (a - b).abs() <= 1e-4 + 1e-3 * b.abs(),
                "logit [{i},{j}]: {a} vs {b}"
            );
        }
    }
    eprintln!("largest logit error vs the official eval logits: {worst:.2e}");
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(k, _)| k as u32)
            .unwrap()
    };
    let official_pred: Vec<u32> = official.iter().map(|r| argmax(r)).collect();
    assert_eq!(head.predict(&features)?.to_vec1::<u32>()?, official_pred);
    let set = m3ae::eval::FeatureSet {
        features: features.clone(),
        labels: official_pred.iter().map(|&p| p as i64).collect(),
        keys: (0..official.len()).map(|i| i.to_string()).collect(),
        classes,
        data: "official probe features".into(),
        stats: None,
    };
    let (top1, _, _) = m3ae::eval::evaluate_head(&head, &set, classes)?;
    assert_eq!(top1, 1.0);

    // The head converted from the pickled probe: the eval formula on its own tensors.
    let conv = out.join("linear");
    official::convert_official(&ckpt_dir().join("linear_model.pkl"), &conv, false)?;
    let head = m3ae::eval::load_probe_head(&conv.join("probe.safetensors"))?;
    let (exp, _) = m3ae::model::params::read_safetensors(
        &ckpt_dir().join("linear_expected.safetensors"),
        &dev,
    )?;
    let z = features
        .broadcast_sub(&exp["batch_stats.bn.mean"])?
        .broadcast_div(&(&exp["batch_stats.bn.var"] + 1e-5)?.sqrt()?)?;
    let want = z
        .matmul(&exp["Dense_0.kernel"])?
        .broadcast_add(&exp["Dense_0.bias"])?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let got = m3ae::eval::probe::probe_logits(&head, &features)?;
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-5 + 1e-5 * b.abs(), "{a} vs {b}");
    }
    std::fs::remove_dir_all(&out)?;
    Ok(())
}

fn tmp(name: &str) -> PathBuf {
    common::temp_dir("convert", name)
}
