//! The paper's claim on our data: M3AE vs the image-only MAE, same images, steps and seeds, both
//! linearly probed on the captioned scenes' shape labels; then M3AE over text mask ratios.
//!
//! ```text
//! cargo run --release --example compare -- [steps] [seeds] [ratios]
//! cargo run --release --example compare -- 1200 3 0.15,0.5,0.75,0.9
//! ```
//! Runs go to `runs/compare-*`; the table prints mean ± std of probe top-1 over the seeds.

use anyhow::Result;
use m3ae::pretrain::{run, ObjectiveKind, PretrainConfig, RunOptions};

fn stats(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len().max(2) - 1) as f64;
    (m, var.sqrt())
}

fn probe(objective: ObjectiveKind, seed: u64, steps: u64, text_ratio: f64) -> Result<(f64, f64)> {
    let mut cfg = PretrainConfig {
        objective,
        seed,
        image_every: 0,
        ..Default::default()
    };
    cfg.train.steps = steps;
    cfg.model.text_mask_ratio = text_ratio;
    cfg.name = format!("compare-{objective:?}-t{text_ratio}-s{seed}-n{steps}").to_lowercase();
    let dir = cfg.run_dir();
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let opts = RunOptions {
        plain: true,
        ..Default::default()
    };
    let s = run(cfg, opts)?;
    let (trained, random) = s.probe.unwrap_or((f64::NAN, f64::NAN));
    eprintln!("{objective:?} text ratio {text_ratio} seed {seed}: probe {trained:.4} (random init {random:.4})");
    Ok((trained, random))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let steps: u64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1200);
    let seeds: u64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let ratios: Vec<f64> = args
        .get(3)
        .map(|s| s.split(',').map(|r| r.parse()).collect::<Result<_, _>>())
        .transpose()?
        .unwrap_or_else(|| vec![0.75]);
    let t0 = std::time::Instant::now();
    let mut rows = Vec::new();
    let (mut mae, mut random) = (Vec::new(), Vec::new());
    for seed in 0..seeds {
        let (m, r) = probe(ObjectiveKind::Mae, seed, steps, 0.75)?;
        mae.push(m);
        random.push(r);
    }
    for &ratio in &ratios {
        let v: Vec<f64> = (0..seeds)
            .map(|seed| probe(ObjectiveKind::M3ae, seed, steps, ratio).map(|p| p.0))
            .collect::<Result<_>>()?;
        rows.push((format!("M3AE, text mask ratio {ratio}"), v));
    }
    rows.push(("MAE (image only)".into(), mae));
    rows.push(("random init".into(), random));
    println!(
        "| model | probe top-1 (scene shapes), mean ± std over {seeds} seeds, {steps} steps |"
    );
    println!("|---|---|");
    for (name, v) in rows {
        let (m, s) = stats(&v);
        println!("| {name} | {:.1}% ± {:.1} |", 100.0 * m, 100.0 * s);
    }
    println!("wall time: {:.0} s", t0.elapsed().as_secs_f64());
    Ok(())
}
