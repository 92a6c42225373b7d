//! Trainer integration tests: learning, exact resume, accumulation, NaN guards, and checkpoints
//! that survive a process killed mid-write.

use candle_core::{Device, Tensor};
use m3ae_kernels::testing::uniform;
use m3ae_model::{M3ae, M3aeConfig, Masking, ModelInput, Noise};
use m3ae_train::checkpoint;
use m3ae_train::{BatchSource, Objective, TrainBatch, TrainConfig, Trainer};

/// Deterministic synthetic batches: batch `i` depends only on (seed, i).
struct Synthetic {
    cfg: M3aeConfig,
    batch: usize,
    next: u64,
    poison_at: Option<u64>,
}

/// `n` deterministic values in [0, 1) from `seed`.
fn lcg(seed: u64, n: usize) -> Vec<f32> {
    uniform(seed, n)
        .into_iter()
        .map(|v| (v + 1.0) * 0.5)
        .collect()
}

impl BatchSource for Synthetic {
    fn next_batch(&mut self) -> m3ae_train::Result<TrainBatch> {
        let i = self.next;
        self.next += 1;
        let dev = Device::Cpu;
        let (b, li, t) = (self.batch, self.cfg.num_patches(), self.cfg.text_length);
        let pd = self.cfg.patch_dim();
        // images: a smooth pattern per sample so there is something to learn
        let mut img = Vec::with_capacity(b * li * pd);
        for s in 0..b {
            let phase = lcg(i * 31 + s as u64, 1)[0] * 6.0;
            for p in 0..li * pd {
                img.push(((p as f32) * 0.01 + phase).sin());
            }
        }
        if self.poison_at == Some(i) {
            img[0] = f32::NAN;
        }
        let ids: Vec<u32> = lcg(i * 7 + 1, b * t)
            .iter()
            .map(|x| (x * 20.0) as u32)
            .collect();
        let pad: Vec<f32> = (0..b * t)
            .map(|j| if j % t >= t - 2 { 1.0 } else { 0.0 })
            .collect();
        let input = ModelInput {
            image_patches: Some(Tensor::from_vec(img, (b, li, pd), &dev)?),
            text_ids: Some(Tensor::from_vec(ids, (b, t), &dev)?),
            text_padding: Some(Tensor::from_vec(pad, (b, t), &dev)?),
        };
        let im = Masking::new(
            &Noise::Shared(lcg(i * 13 + 2, li)),
            b,
            self.cfg.image_keep(li),
            &dev,
        )?;
        let tm = Masking::new(
            &Noise::Shared(lcg(i * 17 + 3, t)),
            b,
            self.cfg.text_keep(t),
            &dev,
        )?;
        Ok(TrainBatch {
            input,
            image_masking: Some(im),
            text_masking: Some(tm),
            unpaired: None,
            targets: None,
        })
    }
    fn position(&self) -> serde_json::Value {
        serde_json::json!({ "next": self.next })
    }
    fn restore(&mut self, p: &serde_json::Value) -> m3ae_train::Result<()> {
        self.next = p["next"].as_u64().expect("next");
        Ok(())
    }
}

fn setup(poison_at: Option<u64>) -> (Trainer<M3ae>, Synthetic) {
    setup_with(poison_at, 0.0, 0)
}

/// [`setup`] with every dropout rate `rate` and the trainer's seed `seed`.
fn setup_with(poison_at: Option<u64>, rate: f64, seed: u64) -> (Trainer<M3ae>, Synthetic) {
    let mut cfg = M3aeConfig::preset("tiny").unwrap();
    cfg.model_type = None;
    cfg.depth = 1;
    cfg.text_vocab_size = 20;
    (cfg.att_drop, cfg.drop, cfg.drop_path) = (rate, rate, rate);
    let model = M3ae::init(&cfg, 3, &Device::Cpu).unwrap();
    let tc = TrainConfig {
        steps: 40,
        batch_size: 4,
        lr_peak: 1e-3,
        warmup_steps: 3,
        scale_lr_by_batch: false,
        ..Default::default()
    };
    (
        Trainer::new(model, tc).unwrap().with_seed(seed),
        Synthetic {
            cfg: M3aeConfig::preset("tiny").unwrap(),
            batch: 4,
            next: 0,
            poison_at,
        },
    )
}

fn run(tr: &mut Trainer<M3ae>, src: &mut Synthetic, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let r = tr.train_step(&src.next_batch().unwrap()).unwrap();
            serde_json::to_string(&r).unwrap()
        })
        .collect()
}

fn weights(tr: &Trainer<M3ae>) -> Vec<Vec<u32>> {
    tr.objective()
        .params()
        .vars()
        .map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect()
}

fn tmpdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("m3ae-train-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn resume_reproduces_an_uninterrupted_run_bit_for_bit() {
    let n = 4;
    let (mut a, mut sa) = setup(None);
    let straight = run(&mut a, &mut sa, 2 * n);

    let dir = tmpdir("resume");
    let (mut b, mut sb) = setup(None);
    let first = run(&mut b, &mut sb, n);
    b.save_checkpoint(&dir, sb.position(), serde_json::json!({"note": "x"}), 2)
        .unwrap();
    drop(b);
    let (mut c, mut sc) = setup(None);
    let latest = checkpoint::latest(&dir).unwrap().expect("a checkpoint");
    let (pos, extra) = c.restore(&latest).unwrap();
    assert_eq!(extra["note"], "x");
    sc.restore(&pos).unwrap();
    let second = run(&mut c, &mut sc, n);
    let resumed: Vec<String> = first.into_iter().chain(second).collect();
    assert_eq!(straight, resumed);
    assert_eq!(weights(&a), weights(&c));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dropout_training_is_seeded_and_resumes_bit_for_bit() {
    let n = 3;
    let (mut a, mut sa) = setup_with(None, 0.2, 11);
    let straight = run(&mut a, &mut sa, 2 * n);
    // the same seed again: the same run; another seed: other losses
    let (mut b, mut sb) = setup_with(None, 0.2, 11);
    assert_eq!(run(&mut b, &mut sb, 2 * n), straight);
    let (mut c, mut sc) = setup_with(None, 0.2, 12);
    assert_ne!(run(&mut c, &mut sc, 2 * n), straight);
    // dropout is on: the run differs from one without
    let (mut d, mut sd) = setup_with(None, 0.0, 11);
    assert_ne!(run(&mut d, &mut sd, 2 * n), straight);
    // at rate 0 the seed changes nothing
    let (mut e, mut se) = setup_with(None, 0.0, 99);
    let (mut f, mut sf) = setup_with(None, 0.0, 11);
    assert_eq!(run(&mut e, &mut se, n), run(&mut f, &mut sf, n));
    // every micro-batch has its own key
    let k0 = f.micro_batch_key();
    run(&mut f, &mut sf, 1);
    assert_ne!(f.micro_batch_key(), k0);

    let dir = tmpdir("resume-dropout");
    let (mut g, mut sg) = setup_with(None, 0.2, 11);
    let first = run(&mut g, &mut sg, n);
    g.save_checkpoint(&dir, sg.position(), serde_json::Value::Null, 2)
        .unwrap();
    drop(g);
    let (mut h, mut sh) = setup_with(None, 0.2, 11);
    let latest = checkpoint::latest(&dir).unwrap().expect("a checkpoint");
    let (pos, _) = h.restore(&latest).unwrap();
    sh.restore(&pos).unwrap();
    let second = run(&mut h, &mut sh, n);
    let resumed: Vec<String> = first.into_iter().chain(second).collect();
    assert_eq!(straight, resumed);
    assert_eq!(weights(&a), weights(&h));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn training_reduces_the_loss() {
    let (mut tr, mut src) = setup(None);
    let first = tr.train_step(&src.next_batch().unwrap()).unwrap().scalars["image_loss"];
    let mut last = first;
    for _ in 0..30 {
        last = tr.train_step(&src.next_batch().unwrap()).unwrap().scalars["image_loss"];
    }
    assert!(last < 0.7 * first, "image loss {first} -> {last}");
}

#[test]
fn non_finite_batches_are_skipped_then_stop_the_run() {
    let (mut tr, mut src) = setup(Some(1));
    run(&mut tr, &mut src, 1);
    let r = tr.train_step(&src.next_batch().unwrap()).unwrap();
    assert!(r.skipped && !r.updated);
    assert_eq!(tr.skipped_steps(), 1);
    let r = tr.train_step(&src.next_batch().unwrap()).unwrap();
    assert!(r.updated && r.scalars["loss"].is_finite());
    // every batch bad: stops after max_bad_steps
    let (mut tr, _) = setup(None);
    let mut bad = Synthetic {
        cfg: M3aeConfig::preset("tiny").unwrap(),
        batch: 4,
        next: 0,
        poison_at: None,
    };
    let mut err = None;
    for i in 0..10 {
        bad.poison_at = Some(i);
        match tr.train_step(&bad.next_batch().unwrap()) {
            Ok(_) => {}
            Err(e) => {
                err = Some(e.to_string());
                break;
            }
        }
    }
    let e = err.expect("the run stops");
    assert!(e.contains("5 consecutive steps"), "{e}");
}

#[test]
fn accumulation_averages_micro_batches() {
    let (mut tr, mut src) = setup(None);
    let mut tc = tr.config().clone();
    tc.accumulate_grad_steps = 2;
    let model = M3ae::new(
        tr.objective().model_config(),
        tr.objective().params().clone(),
    )
    .unwrap();
    tr = Trainer::new(model, tc).unwrap();
    let r1 = tr.train_step(&src.next_batch().unwrap()).unwrap();
    let r2 = tr.train_step(&src.next_batch().unwrap()).unwrap();
    assert!(!r1.updated && r2.updated);
    assert_eq!(tr.step(), 1);
}

#[test]
fn invalid_settings_name_the_field() {
    let (tr, _) = setup(None);
    let model = M3ae::new(
        tr.objective().model_config(),
        tr.objective().params().clone(),
    )
    .unwrap();
    let tc = TrainConfig {
        accumulate_grad_steps: 0,
        ..Default::default()
    };
    let e = Trainer::new(model, tc).err().expect("rejected").to_string();
    assert!(e.contains("accumulate_grad_steps"), "{e}");
    let bad: Result<TrainConfig, _> = serde_json::from_str(r#"{"stepz": 3}"#);
    assert!(bad.unwrap_err().to_string().contains("stepz"));
}

/// Child mode: writes checkpoints in a loop until killed (used by the test below).
#[test]
#[ignore]
fn child_checkpoint_writer() {
    let Some(dir) = std::env::var_os("M3AE_CHILD_CKPT_DIR") else {
        return;
    };
    let (mut tr, mut src) = setup(None);
    loop {
        run(&mut tr, &mut src, 1);
        tr.save_checkpoint(
            std::path::Path::new(&dir),
            src.position(),
            serde_json::Value::Null,
            3,
        )
        .unwrap();
    }
}

#[test]
fn a_process_killed_while_writing_leaves_a_loadable_checkpoint() {
    let dir = tmpdir("kill");
    let exe = std::env::current_exe().unwrap();
    for (round, delay_ms) in [150u64, 400, 700, 1100, 1600].into_iter().enumerate() {
        let mut child = std::process::Command::new(&exe)
            .args([
                "--exact",
                "child_checkpoint_writer",
                "--ignored",
                "--nocapture",
            ])
            .env("M3AE_CHILD_CKPT_DIR", &dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(
            delay_ms + 37 * round as u64,
        ));
        child.kill().unwrap();
        child.wait().unwrap();
        if let Some(latest) = checkpoint::latest(&dir).unwrap() {
            let (mut tr, _) = setup(None);
            tr.restore(&latest)
                .unwrap_or_else(|e| panic!("round {round}: {} unreadable: {e}", latest.display()));
        }
    }
    assert!(
        checkpoint::latest(&dir).unwrap().is_some(),
        "no checkpoint was ever completed"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
