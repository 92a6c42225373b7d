//! The fine-tuning job through the library: an interrupted and resumed run ends bit-identical to
//! an uninterrupted one (weights and every evaluation), the optimiser gets the layer-decay
//! groups, and bad input is refused with the flag or field named.

use candle_core::Device;
use m3ae_eval::finetune::{ClassifierObjective, Finetune, FinetuneConfig, FinetuneReport};
use m3ae_model::{AnyModel, Classifier, ClassifierConfig, LayerDecayRule, M3aeConfig, Variant};
use m3ae_train::Objective;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn small_model() -> AnyModel {
    let mut cfg = M3aeConfig::preset("tiny").unwrap();
    cfg.image_size = 32;
    cfg.patch_size = 8;
    cfg.emb_dim = 32;
    cfg.num_heads = 4;
    cfg.depth = 2;
    cfg.dec_emb_dim = 16;
    cfg.dec_num_heads = 2;
    cfg.dec_depth = 1;
    AnyModel::init(Variant::M3ae, &cfg, 3, &Device::Cpu).unwrap()
}

fn config() -> FinetuneConfig {
    FinetuneConfig {
        epochs: 3,
        warmup_epochs: 1,
        batch_size: 16,
        lr_peak: 1e-3,
        drop_path: 0.2,
        drop: 0.1,
        att_drop: 0.1,
        ..Default::default()
    }
}

fn out_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("m3ae-finetune-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn run(base: &AnyModel, cfg: FinetuneConfig, out: &Path, stop_at_epoch: Option<u64>) -> bool {
    run_report(base, cfg, out, stop_at_epoch).interrupted
}

fn run_report(
    base: &AnyModel,
    cfg: FinetuneConfig,
    out: &Path,
    stop_at_epoch: Option<u64>,
) -> FinetuneReport {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    Finetune::new(
        base,
        cfg,
        "scenes:train:64".parse().unwrap(),
        "scenes:test:32".parse().unwrap(),
        out,
    )
    .unwrap()
    .interrupt(flag)
    .on_eval(move |e| {
        if Some(e.epoch) == stop_at_epoch {
            f.store(true, Ordering::SeqCst);
        }
    })
    .run()
    .unwrap()
}

fn weights(path: &Path) -> HashMap<String, Vec<u32>> {
    let c = Classifier::load(path, &Device::Cpu).unwrap();
    c.params()
        .tensors()
        .into_iter()
        .map(|(k, t)| {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (k, v.into_iter().map(f32::to_bits).collect())
        })
        .collect()
}

#[test]
fn an_interrupted_run_resumes_bit_exactly() {
    let base = small_model();
    let straight = out_dir("straight");
    let report = run_report(&base, config(), &straight, None);
    assert!(!report.interrupted);
    // the best epoch is the first evaluation with the best top-1, and the kept classifier's
    let first_best = report
        .evaluations
        .iter()
        .find(|e| e.top1 == report.best_top1)
        .unwrap();
    assert_eq!(report.best_epoch, first_best.epoch);
    assert_eq!(report.best.top1, report.best_top1);
    let resumed = out_dir("resumed");
    assert!(
        run(&base, config(), &resumed, Some(1)),
        "the run was not interrupted"
    );
    assert!(resumed.join("checkpoints/step-00000004").is_dir());
    assert!(!resumed.join("checkpoints/step-00000012").exists());
    assert!(!run(&base, config(), &resumed, None));
    let (a, b) = (
        weights(&straight.join("classifier.safetensors")),
        weights(&resumed.join("classifier.safetensors")),
    );
    assert_eq!(a.len(), b.len());
    for (k, v) in &a {
        assert!(&b[k] == v, "weight {k} differs after resuming");
    }
    let evals = |d: &Path| std::fs::read_to_string(d.join("eval.jsonl")).unwrap();
    assert_eq!(evals(&straight), evals(&resumed));
    assert_eq!(evals(&straight).lines().count(), 3);
    // training changed the encoder, and the base model is untouched
    let c = Classifier::load(&straight.join("classifier.safetensors"), &Device::Cpu).unwrap();
    let w = "encoder.blocks.0.mlp.fc1.weight";
    let before = base.params().get(w).unwrap().flatten_all().unwrap();
    let after = c.params().get(w).unwrap().flatten_all().unwrap();
    let diff = (before - after).unwrap().abs().unwrap().max(0).unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() > 0.0);
    for d in [straight, resumed] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn dropout_and_drop_path_act_in_training_only() {
    let mut cfg = small_model().config().clone();
    cfg.drop_path = 0.5;
    cfg.drop = 0.1;
    let cc = ClassifierConfig {
        num_classes: 3,
        pooling: Default::default(),
    };
    let c = Classifier::from_base(&small_model(), cc, 0).unwrap();
    let c = Classifier::new(&cfg, cc, c.params().clone()).unwrap();
    let n = 2 * cfg.num_patches() * cfg.patch_dim();
    let patches = candle_core::Tensor::from_vec(
        (0..n)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect::<Vec<_>>(),
        (2, cfg.num_patches(), cfg.patch_dim()),
        &Device::Cpu,
    )
    .unwrap();
    let bits = |t: candle_core::Tensor| -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    };
    let eval = bits(c.forward(&patches).unwrap());
    assert_eq!(bits(c.forward_train(&patches, None).unwrap()), eval);
    let key = m3ae_model::Stochastic::new(7);
    let a = bits(c.forward_train(&patches, Some(&key)).unwrap());
    assert_ne!(a, eval);
    assert_eq!(bits(c.forward_train(&patches, Some(&key)).unwrap()), a);
    let other = m3ae_model::Stochastic::new(8);
    assert_ne!(bits(c.forward_train(&patches, Some(&other)).unwrap()), a);
}

#[test]
fn the_optimiser_gets_the_layer_decay_groups() {
    let base = small_model();
    let cc = ClassifierConfig {
        num_classes: 4,
        pooling: Default::default(),
    };
    let c = Classifier::from_base(&base, cc, 0).unwrap();
    let obj = ClassifierObjective::new(c, 0.5, LayerDecayRule::Official, HashMap::new()).unwrap();
    let g = obj.param_groups();
    assert_eq!(g.len(), obj.specs().len());
    // depth 2: block i -> layer i + 1, scale 0.5^(3 - id); the head and patch embedding: 1
    assert_eq!(g["encoder.blocks.0.attn.qkv.weight"].lr_scale, 0.25);
    assert_eq!(g["encoder.blocks.1.norm1.weight"].lr_scale, 0.5);
    assert_eq!(g["head.fc.weight"].lr_scale, 1.0);
    assert_eq!(g["image_embedding.weight"].lr_scale, 1.0);
    assert_eq!(g["cls_token"].lr_scale, 0.125);
    assert_eq!(g["encoder.norm.weight"].lr_scale, 0.125);
    // clipping per layer group; decay: 2-D weights, not biases or the cls token
    assert_ne!(
        g["encoder.blocks.0.attn.qkv.weight"].clip_group,
        g["encoder.blocks.1.attn.qkv.weight"].clip_group
    );
    assert!(g["head.fc.weight"].decayed && !g["head.fc.bias"].decayed && !g["cls_token"].decayed);
    // the checkpoints hold both configs: Classifier::load reads them
    assert!(obj
        .checkpoint_metadata()
        .unwrap()
        .contains_key("m3ae_classifier"));
}

#[test]
fn bad_input_names_the_flag_or_field() {
    let base = small_model();
    let bad = |cfg: FinetuneConfig| {
        Finetune::new(
            &base,
            cfg,
            "scenes:train:64".parse().unwrap(),
            "scenes:test:32".parse().unwrap(),
            out_dir("bad"),
        )
        .err()
        .expect("refused")
        .to_string()
    };
    let e = bad(FinetuneConfig {
        warmup_epochs: 9,
        ..config()
    });
    assert!(e.contains("finetune.warmup_epochs"), "{e}");
    let e = bad(FinetuneConfig {
        crop_scale: (0.5, 0.1),
        ..config()
    });
    assert!(e.contains("finetune.crop_scale"), "{e}");
    let mut mixup = config();
    mixup.mixup.switch_prob = 2.0;
    let e = bad(mixup);
    assert!(e.contains("switch_prob"), "{e}");
    // a batch larger than the training set
    let e = Finetune::new(
        &base,
        FinetuneConfig {
            batch_size: 128,
            ..config()
        },
        "scenes:train:64".parse().unwrap(),
        "scenes:test:32".parse().unwrap(),
        out_dir("big-batch"),
    )
    .unwrap()
    .run()
    .expect_err("refused")
    .to_string();
    assert!(
        e.contains("--batch-size") && e.contains("64 training images"),
        "{e}"
    );
}
