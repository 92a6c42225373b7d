//! Resuming an official run: the fixture pickles (`m3ae_model.pkl`, `mae_model.pkl`, 2 AdamW
//! updates) converted into resumable checkpoints (`convert official --resumable`), restored by the
//! trainer with their step, weights and AdamW moments exactly, then trained one more step on
//! synthetic data; and the same through the CLI (`m3ae pretrain --resume <dir>`).

use candle_core::{Device, Tensor};
use m3ae::model::{param_specs, M3ae, M3aeConfig, Mae, Masking, ModelInput, Noise, Variant};
use m3ae::official::{self, OfficialCheckpoint};
use m3ae::train::{Objective, TrainBatch, Trainer, TrainerState};
mod common;
use common::{ckpt_dir, f32_bits as bits};
use std::path::{Path, PathBuf};

/// A batch of 3 random images (and texts) with the official batch-shared masks.
fn synthetic_batch(cfg: &M3aeConfig, with_text: bool, dev: &Device) -> anyhow::Result<TrainBatch> {
    let (b, li, t) = (3usize, cfg.num_patches(), cfg.text_length);
    let noise = |l: usize, k: usize| {
        Noise::Shared(
            (0..l)
                .map(|i| ((i * 7 + k) % l) as f32 / l as f32)
                .collect(),
        )
    };
    let image_masking = Masking::new(&noise(li, 1), b, cfg.image_keep(li), dev)?;
    let patches = m3ae::kernels::testing::tensor(&[b, li, cfg.patch_dim()], 18, 1.0, dev)?;
    let (ids, padding, text_masking) = if with_text {
        let ids: Vec<u32> = (0..b * t)
            .map(|i| (i * 37 % cfg.text_vocab_size) as u32)
            .collect();
        let mut pad = vec![0f32; b * t];
        pad[t - 3..t].fill(1.0); // a little padding in the first row
        (
            Some(Tensor::from_vec(ids, (b, t), dev)?),
            Some(Tensor::from_vec(pad, (b, t), dev)?),
            Some(Masking::new(&noise(t, 3), b, cfg.text_keep(t), dev)?),
        )
    } else {
        (None, None, None)
    };
    Ok(TrainBatch {
        input: ModelInput {
            image_patches: Some(patches),
            text_ids: ids,
            text_padding: padding,
        },
        image_masking: Some(image_masking),
        text_masking,
        unpaired: None,
        targets: None,
    })
}

/// Restores `dir` into a fresh trainer, checks step, weights and moments against the pickle,
/// trains one step and checks that it moved the step and the moments.
fn restore_and_step<O: Objective>(
    model: O,
    dir: &Path,
    pkl: &Path,
    variant: Variant,
    state: &TrainerState,
) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let official = OfficialCheckpoint::read(pkl)?;
    let opt = official.opt.as_ref().expect("AdamW state");
    let mut train = state.train.clone();
    train.steps = 3;
    let mut trainer = Trainer::new(model, train)?;
    let (position, extra) = trainer.restore(dir)?;
    assert_eq!(trainer.step(), 2);
    assert_eq!(position["step"], 2);
    assert_eq!(extra["official"]["checkpoint_step"], 1);
    // weights and both moments of every parameter, bit for bit, in native layout
    let specs = param_specs(&state.model, variant);
    let (moments, meta) = trainer.optimizer().state(&dev)?;
    assert_eq!(meta["step"], "2");
    for s in &specs {
        let native = |t: &Tensor| -> anyhow::Result<Tensor> {
            Ok(if s.transposed {
                t.t()?.contiguous()?
            } else {
                t.clone()
            })
        };
        let w = native(&official.params[&s.official].to_tensor(&dev)?)?;
        assert_eq!(
            bits(trainer.objective().params().var(&s.name)?.as_tensor()),
            bits(&w),
            "weight {}",
            s.name
        );
        for (ours, theirs) in [("m", &opt.mu), ("v", &opt.nu)] {
            let want = native(&theirs[&s.official].to_tensor(&dev)?)?;
            assert_eq!(
                bits(&moments[&format!("{ours}.{}", s.name)]),
                bits(&want),
                "{ours} of {}",
                s.name
            );
        }
    }
    // one more step on synthetic data
    let batch = synthetic_batch(&state.model, variant == Variant::M3ae, &dev)?;
    let r = trainer.train_step(&batch)?;
    assert!(r.updated && !r.skipped);
    assert_eq!(trainer.step(), 3);
    assert!(r.scalars["loss"].is_finite() && r.lr > 0.0, "{r:?}");
    let (after, meta) = trainer.optimizer().state(&dev)?;
    assert_eq!(meta["step"], "3");
    let name = format!("m.{}", specs[0].name);
    assert_ne!(bits(&after[&name]), bits(&moments[&name]), "moments moved");
    Ok(())
}

#[test]
fn official_runs_convert_to_resumable_checkpoints_and_train_on() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for kind in ["m3ae", "mae"] {
        let pkl = ckpt_dir().join(format!("{kind}_model.pkl"));
        let out = tmp(kind);
        let c = official::convert_official_resumable(&pkl, &out, None)?;
        let dir = out.join("checkpoints/step-00000002");
        for f in ["model.safetensors", "optimizer.safetensors", "trainer.json"] {
            assert!(dir.join(f).is_file(), "{kind}: {f}");
        }
        assert!(c.files.iter().all(|f| f.starts_with(&dir)));
        let state = TrainerState::read(&dir)?;
        assert_eq!((state.step, state.micro_step), (2, 2));
        assert_eq!(state.model, c.config);
        // the official flags: batch 3, lr 0.1 (x 3/256), wd 0.05, 6 samples x 1 epoch / 3 = 2 steps
        assert_eq!(state.train.batch_size, 3);
        assert_eq!(state.train.lr_peak, 0.1);
        assert_eq!(state.train.adamw.weight_decay, 0.05);
        assert_eq!((state.train.steps, state.train.warmup_steps), (2, 0));
        assert_eq!(state.train.clip_gradient, 1e9);
        // `--total-steps` overrides the derived schedule length
        let longer = tmp(&format!("{kind}-longer"));
        official::convert_official_resumable(&pkl, &longer, Some(500))?;
        let s = TrainerState::read(&longer.join("checkpoints/step-00000002"))?;
        assert_eq!(s.train.steps, 500);
        std::fs::remove_dir_all(&longer)?;
        // evaluation commands read the folder as a run directory
        let resolved = m3ae::official::pretrained::resolve(&out, &m3ae::HubOptions::offline())?;
        assert_eq!(resolved, dir);
        if kind == "m3ae" {
            let model = M3ae::init(&state.model, 7, &dev)?;
            restore_and_step(model, &dir, &pkl, Variant::M3ae, &state)?;
        } else {
            let model = Mae::init(&state.model, 7, &dev)?;
            restore_and_step(model, &dir, &pkl, Variant::Mae, &state)?;
        }
        std::fs::remove_dir_all(&out)?;
    }
    // a probe checkpoint is not a pre-training run
    let out = tmp("linear");
    let e = official::convert_official_resumable(&ckpt_dir().join("linear_model.pkl"), &out, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("linear_model.pkl") && e.contains("--resumable"),
        "{e}"
    );
    std::fs::remove_dir_all(&out)?;
    Ok(())
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_m3ae"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("m3ae runs");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

#[test]
fn cli_resumes_a_converted_official_run() {
    let root = tmp("cli");
    for kind in ["m3ae", "mae"] {
        let converted = root.join(format!("official-{kind}"));
        let pkl = ckpt_dir().join(format!("{kind}_model.pkl"));
        let (ok, stdout, stderr) = cli(&[
            "convert",
            "official",
            pkl.to_str().unwrap(),
            converted.to_str().unwrap(),
            "--resumable",
        ]);
        assert!(ok, "{stderr}");
        assert!(
            stdout.contains("step-00000002") && stdout.contains("pretrain --resume"),
            "{stdout}"
        );
        let runs = root.join("runs");
        // `pretrain --resume <converted dir>` into run `kind`, up to `steps`
        let resume_converted = |steps: &str| {
            cli(&[
                "pretrain",
                "--resume",
                converted.to_str().unwrap(),
                "--steps",
                steps,
                "--name",
                kind,
                "--output-dir",
                runs.to_str().unwrap(),
                "--plain",
                "--no-probe",
            ])
        };
        let (ok, stdout, stderr) = resume_converted("3");
        assert!(ok, "{kind}: {stderr}");
        assert!(
            stderr.contains("resumed from") && stderr.contains("at step 2"),
            "{stderr}"
        );
        assert!(stdout.contains("steps: 3"), "{stdout}");
        let next = runs.join(kind).join("checkpoints/step-00000003");
        let state = TrainerState::read(&next).unwrap();
        assert_eq!(state.step, 3);
        assert_eq!(state.extra["official"]["kind"], kind);
        // a second --resume <dir> into the same run is refused; --resume with its config.toml
        // continues it
        let (ok, _, stderr) = resume_converted("4");
        assert!(!ok && stderr.contains("another --name"), "{stderr}");
        let (ok, stdout, stderr) = cli(&[
            "pretrain",
            "--config",
            runs.join(kind).join("config.toml").to_str().unwrap(),
            "--resume",
            "--steps",
            "4",
            "--plain",
            "--no-probe",
        ]);
        assert!(ok, "{kind}: {stderr}");
        assert!(stdout.contains("steps: 4"), "{stdout}");
    }
    std::fs::remove_dir_all(&root).ok();
}

fn tmp(name: &str) -> PathBuf {
    common::temp_dir("resume", name)
}
