//! Integration tests of the model: gradients reach every weight, parameter counts match the
//! official table, and the forward paths agree with each other.

use candle_core::{DType, Device, Tensor};
use m3ae_kernels::KernelPath;
use m3ae_model::{
    param_count, param_specs, M3ae, M3aeConfig, Mae, Masking, ModelInput, Noise, Stochastic,
    Variant,
};

mod common;
use common::{batch, noise};

#[test]
fn every_m3ae_weight_gets_a_nonzero_gradient() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for head_depth in [0, 2] {
        let mut cfg = M3aeConfig::preset("tiny")?;
        cfg.output_head_depth = head_depth;
        let model = M3ae::init(&cfg, 1, &dev)?;
        let input = batch(&cfg, 3, &dev)?;
        let li = cfg.num_patches();
        let t = cfg.text_length;
        let im = Masking::new(&noise(li, 1), 3, cfg.image_keep(li), &dev)?;
        let tm = Masking::new(&noise(t, 2), 3, cfg.text_keep(t), &dev)?;
        let out = model.forward(&input, Some(&im), Some(&tm))?;
        let grads = model.losses(&input, &out)?.total.backward()?;
        assert_eq!(model.params().len(), param_specs(&cfg, Variant::M3ae).len());
        for (name, var) in model.params().vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name} (head depth {head_depth})"));
            let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{name}: gradient norm {norm}"
            );
        }
    }
    Ok(())
}

#[test]
fn every_mae_weight_gets_a_nonzero_gradient() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for use_type in [false, true] {
        let mut cfg = M3aeConfig::preset("tiny")?;
        cfg.use_type_embedding = use_type;
        let model = Mae::init(&cfg, 2, &dev)?;
        let patches = batch(&cfg, 2, &dev)?.image_patches.unwrap();
        let li = cfg.num_patches();
        let m = Masking::new(&noise(li, 3), 2, cfg.image_keep(li), &dev)?;
        let out = model.forward(&patches, &m)?;
        let grads = model.losses(&patches, &out)?.total.backward()?;
        for (name, var) in model.params().vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            assert!(g.sqr()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{name}");
        }
    }
    Ok(())
}

#[test]
fn the_normalised_pixel_target_changes_only_the_image_loss_target() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let mut cfg = M3aeConfig::preset("tiny")?;
    let model = Mae::init(&cfg, 2, &dev)?;
    let patches = batch(&cfg, 2, &dev)?.image_patches.unwrap();
    let li = cfg.num_patches();
    let m = Masking::new(&noise(li, 3), 2, cfg.image_keep(li), &dev)?;
    let out = model.forward(&patches, &m)?;
    let pixels = model.losses(&patches, &out)?.image_loss.unwrap();
    cfg.image_target = m3ae_model::ImageTarget::NormalizedPixels;
    let norm = Mae::new(&cfg, model.params().clone())?;
    let out2 = norm.forward(&patches, &m)?;
    // the same prediction; only the target differs
    assert_eq!(
        bits(out2.image.as_ref().unwrap()),
        bits(out.image.as_ref().unwrap())
    );
    let l = norm.losses(&patches, &out2)?.image_loss.unwrap();
    let target = m3ae_model::loss::patch_target(&patches, cfg.image_target)?;
    let want = m3ae_model::patch_mse_loss(out.image.as_ref().unwrap(), &target, &m.mask)?;
    assert_eq!(l.to_scalar::<f32>()?, want.to_scalar::<f32>()?);
    assert_ne!(l.to_scalar::<f32>()?, pixels.to_scalar::<f32>()?);
    // gradients flow through the normalised target's loss
    let grads = l.backward()?;
    assert!(grads
        .get(
            norm.params()
                .var("decoder.image_head.out.weight")?
                .as_tensor()
        )
        .is_some());
    Ok(())
}

#[test]
fn parameter_counts_match_the_official_table() -> anyhow::Result<()> {
    // Spec §1: total params of M3AE with V = 30522 and P = 16, in millions (one decimal).
    for (name, millions) in [
        ("small", 74.8),
        ("base", 150.8),
        ("large", 376.2),
        ("huge", 711.7),
        ("debug", 80.1),
    ] {
        let cfg = M3aeConfig::preset(name)?;
        let n = param_count(&cfg, Variant::M3ae) as f64 / 1e6;
        assert!(
            (n - millions).abs() < 0.05 + 1e-9,
            "{name}: {n:.3} M vs {millions} M"
        );
    }
    // The count is the sum over the weights an initialised model really holds.
    let cfg = M3aeConfig::preset("tiny")?;
    let model = M3ae::init(&cfg, 0, &Device::Cpu)?;
    assert_eq!(
        model.params().num_scalars(),
        param_count(&cfg, Variant::M3ae)
    );
    Ok(())
}

#[test]
fn per_sample_noise_masks_each_sample_differently() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let cfg = M3aeConfig::preset("tiny")?;
    let model = Mae::init(&cfg, 0, &dev)?;
    let patches = batch(&cfg, 2, &dev)?.image_patches.unwrap();
    let li = cfg.num_patches();
    let mut values = Vec::new();
    for s in 0..2 {
        if let Noise::Shared(v) = noise(li, s + 5) {
            values.extend(v);
        }
    }
    let m = Masking::new(
        &Noise::PerSample { batch: 2, values },
        2,
        cfg.image_keep(li),
        &dev,
    )?;
    let out = model.forward(&patches, &m)?;
    let mask = out.image_mask.unwrap().to_vec2::<f32>()?;
    assert_ne!(mask[0], mask[1]);
    assert_eq!(
        mask[0].iter().sum::<f32>() as usize,
        li - cfg.image_keep(li)
    );
    Ok(())
}

#[test]
fn text_only_and_representation_paths() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let cfg = M3aeConfig::preset("tiny")?;
    let model = M3ae::init(&cfg, 4, &dev)?;
    let full = batch(&cfg, 2, &dev)?;
    let t = cfg.text_length;
    let tm = Masking::new(&noise(t, 9), 2, cfg.text_keep(t), &dev)?;
    let text_only = ModelInput {
        image_patches: None,
        ..full.clone()
    };
    let out = model.forward(&text_only, None, Some(&tm))?;
    assert!(out.image.is_none());
    assert_eq!(
        out.text_logits.unwrap().dims(),
        &[2, t, cfg.text_vocab_size]
    );
    let l = model.losses(&text_only, &model.forward(&text_only, None, Some(&tm))?)?;
    assert!(l.image_loss.is_none() && l.text_loss.is_some());
    // representation of the image alone equals the MAE backbone's on the same weights
    let repr = model.forward_representation(&full)?;
    assert_eq!(repr.dims(), &[2, 1 + cfg.num_patches() + t, cfg.emb_dim]);
    let image_only = ModelInput {
        image_patches: full.image_patches.clone(),
        ..Default::default()
    };
    let a = model.forward_representation(&image_only)?;
    let mae = Mae::new(&cfg, {
        let specs = Mae::specs(&cfg);
        m3ae_model::ParamStore::from_tensors(
            &specs,
            model.params().tensors(),
            m3ae_model::Unexpected::Ignore,
            "m3ae",
            &dev,
        )?
    })?;
    let b = mae.forward_representation(full.image_patches.as_ref().unwrap())?;
    assert_eq!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
    Ok(())
}

#[test]
fn bad_inputs_are_rejected_with_clear_messages() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let cfg = M3aeConfig::preset("tiny")?;
    let model = M3ae::init(&cfg, 0, &dev)?;
    let input = batch(&cfg, 2, &dev)?;
    let li = cfg.num_patches();
    let wrong = Masking::new(&noise(li, 1), 2, cfg.image_keep(li) + 1, &dev)?;
    let e = model
        .forward(&input, Some(&wrong), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("image masking"), "{e}");
    let mut bad = input.clone();
    bad.text_ids = Some(Tensor::full(5000u32, (2, cfg.text_length), &dev)?);
    let tm = Masking::new(
        &noise(cfg.text_length, 1),
        2,
        cfg.text_keep(cfg.text_length),
        &dev,
    )?;
    let im = Masking::new(&noise(li, 1), 2, cfg.image_keep(li), &dev)?;
    let e = model
        .forward(&bad, Some(&im), Some(&tm))
        .unwrap_err()
        .to_string();
    assert!(e.contains("5000"), "{e}");
    let mut cfg2 = cfg.clone();
    cfg2.model_type = None;
    cfg2.num_heads = 3;
    let e = M3ae::init(&cfg2, 0, &dev).unwrap_err().to_string();
    assert!(e.contains("emb_dim") && e.contains("num_heads"), "{e}");
    let _ = DType::F32;
    Ok(())
}

#[test]
fn fused_layers_at_bf16_run_the_bf16_kernels_and_the_reference_ones_cast() -> anyhow::Result<()> {
    use m3ae_kernels::{fused, BlockParams};
    use m3ae_model::layers::{cast_linear, Block, Dense, LN_EPS};
    use m3ae_model::Precision;
    let dev = Device::Cpu;
    let cfg = M3aeConfig::preset("tiny")?;
    let model = M3ae::init(&cfg, 4, &dev)?;
    let p = model.params();
    let c = cfg.emb_dim;
    let x = m3ae_kernels::testing::tensor(&[2, 5, c], 7, 1.0, &dev)?;
    let get = |n: &str| p.get(&format!("encoder.blocks.0.{n}"));
    let (w, b) = (get("mlp.fc1.weight")?, get("mlp.fc1.bias")?);
    for (path, want) in [
        (
            KernelPath::Fused,
            fused::linear_with(&x, &w, &b, DType::BF16)?,
        ),
        (KernelPath::Reference, cast_linear(&x, &w, &b, DType::BF16)?),
    ] {
        let y = Dense::new(p, "encoder.blocks.0.mlp.fc1", path)?
            .with_precision(Precision::Bf16)
            .forward(&x)?;
        assert_eq!(rel(&y, &want)?, 0.0, "{path:?} dense layer");
    }
    let t = [
        "norm1.weight",
        "norm1.bias",
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
    ]
    .map(|n| get(n).unwrap());
    let params = BlockParams {
        norm1: (&t[0], &t[1]),
        qkv: (&t[2], &t[3]),
        proj: (&t[4], &t[5]),
        norm2: (&t[6], &t[7]),
        fc1: (&t[8], &t[9]),
        fc2: (&t[10], &t[11]),
    };
    let block = Block::new(p, "encoder.blocks.0", cfg.num_heads, KernelPath::Fused)?;
    let y16 = block
        .clone()
        .with_precision(Precision::Bf16)
        .forward(&x, None)?;
    let want =
        fused::transformer_block_with(&x, &params, cfg.num_heads, None, LN_EPS, DType::BF16)?;
    assert_eq!(rel(&y16, &want)?, 0.0, "one-op block at bf16");
    assert!(
        rel(&y16, &block.forward(&x, None)?)? > 1e-4,
        "bf16 differs from f32"
    );
    Ok(())
}

/// `max|a - b| / max|b|`.
fn rel(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let m = b.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(if m == 0.0 { d } else { d / m })
}

#[test]
fn training_forward_uses_the_fused_text_loss_without_logits() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for (head_depth, all_tokens) in [(0, false), (0, true), (2, false)] {
        let mut cfg = M3aeConfig::preset("tiny")?;
        cfg.output_head_depth = head_depth;
        cfg.text_all_token_loss = all_tokens;
        let ctx = format!("head depth {head_depth}, all-token loss {all_tokens}");
        let model = M3ae::init(&cfg, 3, &dev)?;
        let input = batch(&cfg, 3, &dev)?;
        let (li, t) = (cfg.num_patches(), cfg.text_length);
        let im = Masking::new(&noise(li, 1), 3, cfg.image_keep(li), &dev)?;
        let tm = Masking::new(&noise(t, 2), 3, cfg.text_keep(t), &dev)?;
        // the logits path (as the official code) against the training path (fused text loss)
        let full = model.forward(&input, Some(&im), Some(&tm))?;
        let train = model.forward_train(&input, Some(&im), Some(&tm))?;
        assert!(full.text_logits.is_some() && full.text_hidden.is_some());
        assert!(train.text_logits.is_none(), "{ctx}: logits computed");
        let (a, b) = (model.losses(&input, &full)?, model.losses(&input, &train)?);
        let scalar = |t: &Option<Tensor>| t.as_ref().unwrap().to_scalar::<f32>().unwrap();
        let (la, lb) = (scalar(&a.text_loss), scalar(&b.text_loss));
        assert!(
            (la - lb).abs() <= 1e-5 * la.abs(),
            "{ctx}: loss {la} vs {lb}"
        );
        let (aa, ab) = (scalar(&a.text_accuracy), scalar(&b.text_accuracy));
        assert!((aa - ab).abs() <= 1e-6, "{ctx}: accuracy {aa} vs {ab}");
        let (ta, tb) = (a.total.to_scalar::<f32>()?, b.total.to_scalar::<f32>()?);
        assert!(
            (ta - tb).abs() <= 1e-5 * ta.abs(),
            "{ctx}: total {ta} vs {tb}"
        );
        let (ga, gb) = (a.total.backward()?, b.total.backward()?);
        for (name, var) in model.params().vars() {
            let (x, y) = (ga.get(var.as_tensor()), gb.get(var.as_tensor()));
            let (x, y) = (
                x.unwrap_or_else(|| panic!("{ctx}: no gradient for {name} (logits path)")),
                y.unwrap_or_else(|| panic!("{ctx}: no gradient for {name} (training path)")),
            );
            let e = rel(y, x)?;
            assert!(e <= 1e-4, "{ctx}: gradient of {name} differs by {e}");
        }
    }
    // reference kernels: the training forward is the logits forward
    let mut cfg = M3aeConfig::preset("tiny")?;
    cfg.kernels = m3ae_kernels::KernelPath::Reference;
    let model = M3ae::init(&cfg, 3, &dev)?;
    let input = batch(&cfg, 2, &dev)?;
    let (li, t) = (cfg.num_patches(), cfg.text_length);
    let im = Masking::new(&noise(li, 1), 2, cfg.image_keep(li), &dev)?;
    let tm = Masking::new(&noise(t, 2), 2, cfg.text_keep(t), &dev)?;
    assert!(model
        .forward_train(&input, Some(&im), Some(&tm))?
        .text_logits
        .is_some());
    Ok(())
}

#[test]
fn predicted_words_are_the_argmax_of_the_logits_at_the_requested_positions() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for (head_depth, kernels) in [
        (0, m3ae_kernels::KernelPath::Fused),
        (2, m3ae_kernels::KernelPath::Fused),
        (0, m3ae_kernels::KernelPath::Reference),
    ] {
        let mut cfg = M3aeConfig::preset("tiny")?;
        cfg.output_head_depth = head_depth;
        cfg.kernels = kernels;
        let ctx = format!("head depth {head_depth}, {kernels:?}");
        let model = M3ae::init(&cfg, 5, &dev)?;
        let input = batch(&cfg, 3, &dev)?;
        let (li, t) = (cfg.num_patches(), cfg.text_length);
        let im = Masking::new(&noise(li, 1), 3, cfg.image_keep(li), &dev)?;
        let tm = Masking::new(&noise(t, 2), 3, cfg.text_keep(t), &dev)?;
        let full = model.forward(&input, Some(&im), Some(&tm))?;
        let argmax = full
            .text_logits
            .as_ref()
            .unwrap()
            .argmax(candle_core::D::Minus1)?
            .to_vec2::<u32>()?;
        let mask = full.text_mask.as_ref().unwrap().to_vec2::<f32>()?;
        let positions: Vec<(usize, usize)> = (0..3)
            .flat_map(|i| (0..t).map(move |j| (i, j)))
            .filter(|&(i, j)| mask[i][j] > 0.0)
            .collect();
        assert!(!positions.is_empty());
        let train = model.forward_train(&input, Some(&im), Some(&tm))?;
        for out in [&full, &train] {
            let top = model.predict_text(out, &positions, 3)?;
            assert_eq!(top.ids.len(), positions.len());
            for (&(i, j), (ids, logits)) in positions.iter().zip(top.ids.iter().zip(&top.logits)) {
                assert_eq!(ids[0], argmax[i][j], "{ctx}: ({i}, {j})");
                assert_eq!(ids.len(), 3);
                assert!(logits[0] >= logits[1] && logits[1] >= logits[2], "{ctx}");
            }
        }
        assert!(model.predict_text(&train, &[(3, 0)], 1).is_err(), "{ctx}");
        assert!(model.predict_text(&train, &[], 1)?.ids.is_empty());
    }
    Ok(())
}

/// Flattened values of a tensor, for bit-exact comparisons.
fn bits(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The tensors of a forward pass that depend on every block: decoder output, predictions.
fn outputs(o: &m3ae_model::Output) -> Vec<Vec<f32>> {
    let mut v = vec![bits(&o.trace.enc_output), bits(&o.trace.dec_output)];
    v.extend(o.image.iter().map(bits));
    v.extend(o.text_logits.iter().map(bits));
    v.extend(o.text_hidden.iter().map(bits));
    v
}

fn with_rates(cfg: &M3aeConfig, att: f64, drop: f64, path: f64) -> M3aeConfig {
    let mut c = cfg.clone();
    (c.att_drop, c.drop, c.drop_path) = (att, drop, path);
    c
}

#[test]
fn training_forwards_at_rate_zero_or_without_a_key_are_the_deterministic_ones() -> anyhow::Result<()>
{
    let dev = Device::Cpu;
    let key = Stochastic::new(99);
    for kernels in [KernelPath::Fused, KernelPath::Reference] {
        let mut base = M3aeConfig::preset("tiny")?;
        base.kernels = kernels;
        let input = batch(&base, 3, &dev)?;
        let (li, t) = (base.num_patches(), base.text_length);
        let im = Masking::new(&noise(li, 1), 3, base.image_keep(li), &dev)?;
        let tm = Masking::new(&noise(t, 2), 3, base.text_keep(t), &dev)?;
        let patches = input.image_patches.clone().unwrap();
        // rate 0 with a key; non-zero rates without a key (evaluation)
        for (cfg, st) in [
            (base.clone(), Some(&key)),
            (with_rates(&base, 0.2, 0.3, 0.4), None),
        ] {
            let ctx = format!("{kernels:?}, rates {}, key {st:?}", cfg.drop);
            let m = M3ae::init(&cfg, 5, &dev)?;
            let plain = m.forward(&input, Some(&im), Some(&tm))?;
            let with = m.forward_with(&input, Some(&im), Some(&tm), st)?;
            assert!(outputs(&plain) == outputs(&with), "{ctx}: forward");
            let plain = m.forward_train(&input, Some(&im), Some(&tm))?;
            let with = m.forward_train_with(&input, Some(&im), Some(&tm), st)?;
            assert!(outputs(&plain) == outputs(&with), "{ctx}: forward_train");
            let (a, b) = (
                m.forward_representation(&input)?,
                m.forward_representation_with(&input, st)?,
            );
            assert_eq!(bits(&a), bits(&b), "{ctx}: representation");
            let any = m3ae_model::AnyModel::M3ae(m);
            assert_eq!(
                bits(&any.forward_representation_with(&input, st)?),
                bits(&a),
                "{ctx}"
            );
            let mae = Mae::init(&cfg, 6, &dev)?;
            let plain = mae.forward(&patches, &im)?;
            let with = mae.forward_with(&patches, &im, st)?;
            assert!(outputs(&plain) == outputs(&with), "{ctx}: MAE forward");
            assert_eq!(
                bits(&mae.forward_representation(&patches)?),
                bits(&mae.forward_representation_with(&patches, st)?),
                "{ctx}: MAE representation"
            );
        }
    }
    Ok(())
}

#[test]
fn dropout_and_drop_path_are_seeded_and_the_same_on_both_kernel_paths() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let base = with_rates(&M3aeConfig::preset("tiny")?, 0.1, 0.1, 0.2);
    let input = batch(&base, 4, &dev)?;
    let (li, t) = (base.num_patches(), base.text_length);
    let im = Masking::new(&noise(li, 1), 4, base.image_keep(li), &dev)?;
    let tm = Masking::new(&noise(t, 2), 4, base.text_keep(t), &dev)?;
    let run = |kernels: KernelPath, key: u64| -> anyhow::Result<_> {
        let mut cfg = base.clone();
        cfg.kernels = kernels;
        let m = M3ae::init(&cfg, 7, &dev)?;
        let out = m.forward_with(&input, Some(&im), Some(&tm), Some(&Stochastic::new(key)))?;
        let loss = m.losses(&input, &out)?.total;
        let grads = loss.backward()?;
        let mut g = Vec::new();
        for (name, var) in m.params().vars() {
            let x = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{kernels:?}: no gradient for {name}"));
            g.push((name.to_string(), x.clone()));
        }
        g.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((outputs(&out), out, g))
    };
    let (a, out_a, ga) = run(KernelPath::Fused, 1)?;
    let (again, _, _) = run(KernelPath::Fused, 1)?;
    let (other, _, _) = run(KernelPath::Fused, 2)?;
    assert!(a == again, "same key, different outputs");
    assert!(a != other, "another key, same outputs");
    // not the deterministic forward
    let m = M3ae::init(&base, 7, &dev)?;
    let det = outputs(&m.forward(&input, Some(&im), Some(&tm))?);
    assert!(a != det, "dropout had no effect");
    // the reference path draws the same masks: values and gradients agree
    let (_, out_r, gr) = run(KernelPath::Reference, 1)?;
    for (x, y, what) in [
        (
            &out_a.trace.dec_output,
            &out_r.trace.dec_output,
            "decoder output",
        ),
        (
            out_a.image.as_ref().unwrap(),
            out_r.image.as_ref().unwrap(),
            "image",
        ),
    ] {
        let e = rel(x, y)?;
        assert!(e <= 1e-4, "{what}: fused vs reference {e}");
    }
    for ((name, x), (_, y)) in ga.iter().zip(&gr) {
        let e = rel(x, y)?;
        assert!(e <= 1e-3, "gradient of {name}: fused vs reference {e}");
    }
    // bit-identical for any number of threads
    let in_pool = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| run(KernelPath::Fused, 1).map(|r| r.0).unwrap())
    };
    assert!(
        in_pool(1) == a && in_pool(3) == a,
        "thread count changed the results"
    );
    Ok(())
}

#[test]
fn drop_path_passes_a_sample_through_a_block_whose_branches_are_both_dropped() -> anyhow::Result<()>
{
    use m3ae_model::layers::Block;
    use m3ae_model::stochastic::site;
    let dev = Device::Cpu;
    let cfg = M3aeConfig::preset("tiny")?;
    let m = M3ae::init(&cfg, 8, &dev)?;
    let rate = 0.5;
    let rates = m3ae_model::DropRates {
        drop_path: rate,
        ..Default::default()
    };
    let block =
        Block::new(m.params(), "encoder.blocks.0", cfg.num_heads, cfg.kernels)?.with_rates(rates);
    let b = 32;
    let x = Tensor::from_vec(
        (0..b * 5 * cfg.emb_dim)
            .map(|i| ((i * 31 % 97) as f32 / 48.0) - 1.0)
            .collect::<Vec<_>>(),
        (b, 5, cfg.emb_dim),
        &dev,
    )?;
    let key = Stochastic::new(3);
    let y = block.forward_with(&x, None, Some(&key))?;
    assert_eq!(
        bits(&block.forward_with(&x, None, None)?),
        bits(&block.forward(&x, None)?)
    );
    let keeps = |tag: u64, s: usize| {
        m3ae_kernels::Dropout::new(rate, key.fork(tag).seed)
            .unwrap()
            .keeps(s as u64, 0)
    };
    let (mut passed, mut changed) = (0, 0);
    for s in 0..b {
        let (xs, ys) = (bits(&x.get(s)?), bits(&y.get(s)?));
        if !keeps(site::PATH_ATTENTION, s) && !keeps(site::PATH_MLP, s) {
            assert_eq!(xs, ys, "sample {s}: both branches dropped");
            passed += 1;
        } else {
            assert_ne!(xs, ys, "sample {s}: a branch kept");
            changed += 1;
        }
    }
    assert!(
        passed > 0 && changed > 0,
        "{passed} passed, {changed} changed"
    );
    Ok(())
}

#[test]
fn bf16_matmuls_stay_close_to_f32_and_every_f32_weight_gets_an_f32_gradient() -> anyhow::Result<()>
{
    // Both bf16 paths, on the CPU: the reference kernels cast around candle's matmul (the path
    // CUDA runs, device-generic) and the fused ones take bf16-rounded operands in the one-op
    // block and the dense layers (m3ae_kernels::fused::bf16).
    use m3ae_model::Precision;
    let dev = Device::Cpu;
    let mut bf16_losses = Vec::new();
    for kernels in [KernelPath::Reference, KernelPath::Fused] {
        let mut cfg = M3aeConfig::preset("tiny")?;
        cfg.output_head_depth = 1;
        cfg.kernels = kernels;
        let f32_model = M3ae::init(&cfg, 4, &dev)?;
        let bf16_model = f32_model.clone().with_precision(Precision::Bf16);
        assert_eq!(bf16_model.precision(), Precision::Bf16);
        assert_eq!(f32_model.precision(), Precision::F32);
        let input = batch(&cfg, 2, &dev)?;
        let (li, t) = (cfg.num_patches(), cfg.text_length);
        let im = Masking::new(&noise(li, 5), 2, cfg.image_keep(li), &dev)?;
        let tm = Masking::new(&noise(t, 6), 2, cfg.text_keep(t), &dev)?;
        let loss = |m: &M3ae| -> anyhow::Result<Tensor> {
            let out = m.forward_train(&input, Some(&im), Some(&tm))?;
            Ok(m.losses(&input, &out)?.total)
        };
        let (a, b) = (loss(&f32_model)?, loss(&bf16_model)?);
        assert_eq!(b.dtype(), DType::F32, "losses stay f32");
        let (a, b) = (a.to_scalar::<f32>()?, b.to_scalar::<f32>()?);
        assert!(a != b, "{kernels:?}: bf16 must change the matmuls");
        assert!(
            (a - b).abs() / a.abs() < 2e-2,
            "{kernels:?}: f32 {a} vs bf16 {b}"
        );
        bf16_losses.push(b);
        let grads = loss(&bf16_model)?.backward()?;
        for (name, var) in bf16_model.params().vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{kernels:?}: no gradient for {name}"));
            assert_eq!(g.dtype(), DType::F32, "{name}");
            assert_eq!(var.dtype(), DType::F32, "{name}");
            let n = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            assert!(n > 0.0 && n.is_finite(), "{kernels:?} {name}: {n}");
        }
    }
    // the two paths differ only in rounding the products to bf16 (the cast path does)
    let (r, f) = (bf16_losses[0], bf16_losses[1]);
    assert!(
        (r - f).abs() / r.abs() < 1e-2,
        "reference bf16 {r} vs fused bf16 {f}"
    );
    Ok(())
}
