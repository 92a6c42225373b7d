//! Training-step benchmarks on generated input (no data loading): forward, backward and AdamW,
//! timed separately.
//!
//! * [`vit_s_workload`]: the reference workload of the performance notes: a ViT-S-like encoder
//!   (dim 384, 6 heads, MLP 1536, depth 4, tanh-GELU, LayerNorm eps 1e-6) on sequences of 64 with
//!   a key-padding mask, batch 32, a 384 -> 768 head with an MSE loss, AdamW over all weights.
//!   93.0 GFLOP per step by the notes' count (3 x 2 x tokens x [depth (12 C^2 + 2 S C) + 768 C]).
//! * [`preset_workload`]: a full M3AE step of any configuration at a given batch size.

use crate::objective::{Objective, TrainBatch};
use crate::optim::{named_grads, AdamW, AdamWConfig};
use crate::Result;
use candle_core::{Device, Tensor};
use m3ae_kernels::testing::uniform;
use m3ae_model::layers::{Dense, Transformer};
use m3ae_model::params::{Init, ParamSpec};
use m3ae_model::{flops, M3ae, M3aeConfig, Masking, ModelInput, Noise, ParamStore, Variant};
use std::time::Instant;

/// Timings of a benchmark (medians over the timed steps).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// Workload name.
    pub name: String,
    /// Timed steps.
    pub steps: usize,
    /// Median forward milliseconds.
    pub forward_ms: f64,
    /// Median backward milliseconds.
    pub backward_ms: f64,
    /// Median optimiser milliseconds.
    pub optimizer_ms: f64,
    /// Median whole-step milliseconds.
    pub step_ms: f64,
    /// Samples per step.
    pub batch: usize,
    /// Tokens per sample the FLOP count is based on.
    pub tokens_per_sample: usize,
    /// FLOPs per step (matmul count).
    pub flops_per_step: f64,
}

impl BenchReport {
    /// Samples per second.
    pub fn samples_per_s(&self) -> f64 {
        self.batch as f64 / (self.step_ms / 1e3)
    }
    /// Tokens per second.
    pub fn tokens_per_s(&self) -> f64 {
        self.samples_per_s() * self.tokens_per_sample as f64
    }
    /// Achieved GFLOP/s.
    pub fn gflops(&self) -> f64 {
        self.flops_per_step / (self.step_ms / 1e3) / 1e9
    }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "workload: {} (batch {}, {} timed steps, medians)",
            self.name, self.batch, self.steps
        )?;
        writeln!(
            f,
            "step: {:.1} ms  (forward {:.1} ms, backward {:.1} ms, optimizer {:.1} ms)",
            self.step_ms, self.forward_ms, self.backward_ms, self.optimizer_ms
        )?;
        write!(
            f,
            "throughput: {:.1} samples/s, {:.0} tokens/s, {:.1} GFLOP/s ({:.2} GFLOP/step)",
            self.samples_per_s(),
            self.tokens_per_s(),
            self.gflops(),
            self.flops_per_step / 1e9
        )
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Timed {
    fwd: Vec<f64>,
    bwd: Vec<f64>,
    opt: Vec<f64>,
    all: Vec<f64>,
}

fn time_steps(
    warmup: usize,
    steps: usize,
    mut fwd: impl FnMut() -> Result<Tensor>,
    mut bwd_opt: impl FnMut(&Tensor) -> Result<(f64, f64)>,
) -> Result<Timed> {
    let mut t = Timed {
        fwd: vec![],
        bwd: vec![],
        opt: vec![],
        all: vec![],
    };
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        let loss = fwd()?;
        let f = t0.elapsed().as_secs_f64() * 1e3;
        let (b, o) = bwd_opt(&loss)?;
        let all = t0.elapsed().as_secs_f64() * 1e3;
        if i >= warmup {
            t.fwd.push(f);
            t.bwd.push(b);
            t.opt.push(o);
            t.all.push(all);
        }
    }
    Ok(t)
}

/// The ViT-S-like encoder step of the performance notes (see the module docs).
pub fn vit_s_workload(cfg_kernels: m3ae_kernels::KernelPath, steps: usize) -> Result<BenchReport> {
    let (batch, seq, dim, depth, heads, out) =
        (32usize, 64usize, 384usize, 4usize, 6usize, 768usize);
    let dev = Device::Cpu;
    let mut mcfg = M3aeConfig::preset("tiny")?;
    mcfg.model_type = None;
    mcfg.emb_dim = dim;
    mcfg.depth = depth;
    mcfg.num_heads = heads;
    mcfg.kernels = cfg_kernels;
    let mut specs: Vec<ParamSpec> = m3ae_model::param_specs(&mcfg, Variant::Mae)
        .into_iter()
        .filter(|s| s.name.starts_with("encoder.blocks.") || s.name.starts_with("encoder.norm."))
        .collect();
    for (name, shape, init) in [
        (
            "head.weight",
            vec![out, dim],
            Init::XavierUniform {
                fan_in: dim,
                fan_out: out,
            },
        ),
        ("head.bias", vec![out], Init::Zeros),
    ] {
        specs.push(ParamSpec {
            name: name.into(),
            official: name.into(),
            shape,
            init,
            transposed: name.ends_with("weight"),
        });
    }
    let params = ParamStore::init(&specs, 0, &dev)?;
    let encoder = Transformer::new(&params, "encoder", depth, heads, cfg_kernels)?;
    let head = Dense::new(&params, "head", cfg_kernels)?;
    let x = Tensor::from_vec(uniform(1, batch * seq * dim), (batch, seq, dim), &dev)?;
    let target = Tensor::from_vec(uniform(2, batch * seq * out), (batch, seq, out), &dev)?;
    // sample i keeps seq - (i mod 4) * seq / 8 keys
    let pad: Vec<f32> = (0..batch * seq)
        .map(|j| {
            let (i, k) = (j / seq, j % seq);
            if k >= seq - (i % 4) * seq / 8 {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    let pad = Tensor::from_vec(pad, (batch, seq), &dev)?;
    let mut opt = AdamW::new(
        AdamWConfig {
            b2: 0.999,
            ..Default::default()
        },
        &specs,
        Variant::M3ae,
    );
    let t = time_steps(
        2,
        steps,
        || {
            let y = head.forward(&encoder.forward(&x, Some(&pad))?)?;
            Ok((y - &target)?.sqr()?.mean_all()?)
        },
        |loss| {
            let t0 = Instant::now();
            let grads = named_grads(&params, &loss.backward()?);
            let b = t0.elapsed().as_secs_f64() * 1e3;
            let t1 = Instant::now();
            opt.step(&params, &grads, 1e-4)?;
            Ok((b, t1.elapsed().as_secs_f64() * 1e3))
        },
    )?;
    let c = dim as f64;
    let tokens = (batch * seq) as f64;
    let flops = 3.0
        * 2.0
        * tokens
        * (depth as f64 * (12.0 * c * c + 2.0 * seq as f64 * c) + out as f64 * c);
    Ok(BenchReport {
        name: format!("vit-s (dim 384, depth 4, seq 64, {cfg_kernels:?} kernels)"),
        steps,
        forward_ms: median(t.fwd),
        backward_ms: median(t.bwd),
        optimizer_ms: median(t.opt),
        step_ms: median(t.all),
        batch,
        tokens_per_sample: seq,
        flops_per_step: flops,
    })
}

/// A full M3AE training step of `cfg` at `batch` on generated images and text (official
/// batch-shared masking). Tokens per sample are the encoder's (`1 + kept image + kept text`).
pub fn preset_workload(cfg: &M3aeConfig, batch: usize, steps: usize) -> Result<BenchReport> {
    let dev = Device::Cpu;
    let model = M3ae::init(cfg, 0, &dev)?;
    let c = model.config().clone();
    let (li, t, pd) = (c.num_patches(), c.text_length, c.patch_dim());
    let input = ModelInput {
        image_patches: Some(Tensor::from_vec(
            uniform(3, batch * li * pd),
            (batch, li, pd),
            &dev,
        )?),
        text_ids: Some(Tensor::from_vec(
            uniform(4, batch * t)
                .iter()
                .map(|v| ((v + 1.0) * 0.5 * (c.text_vocab_size - 1) as f32) as u32)
                .collect::<Vec<u32>>(),
            (batch, t),
            &dev,
        )?),
        text_padding: Some(Tensor::from_vec(
            (0..batch * t)
                .map(|j| {
                    if j % t >= t - (j / t) % (t / 2).max(1) {
                        1.0f32
                    } else {
                        0.0
                    }
                })
                .collect::<Vec<f32>>(),
            (batch, t),
            &dev,
        )?),
    };
    let noise =
        |s: u64, l: usize| Noise::Shared(uniform(s, l).iter().map(|v| (v + 1.0) * 0.5).collect());
    let batch_data = TrainBatch {
        input,
        image_masking: Some(Masking::new(&noise(5, li), batch, c.image_keep(li), &dev)?),
        text_masking: Some(Masking::new(&noise(6, t), batch, c.text_keep(t), &dev)?),
        unpaired: None,
        targets: None,
    };
    let specs = M3ae::specs(&c);
    let mut opt = AdamW::new(AdamWConfig::default(), &specs, Variant::M3ae);
    let timed = time_steps(
        2,
        steps,
        // a training forward: the configuration's dropout rates (if any) are timed too
        || {
            let key = m3ae_model::Stochastic::new(0);
            Ok(model.loss_with(&batch_data, Some(&key))?.total)
        },
        |loss| {
            let t0 = Instant::now();
            let grads = named_grads(model.params(), &loss.backward()?);
            let b = t0.elapsed().as_secs_f64() * 1e3;
            let t1 = Instant::now();
            opt.step(model.params(), &grads, 1e-4)?;
            Ok((b, t1.elapsed().as_secs_f64() * 1e3))
        },
    )?;
    let f = flops::training_flops(&c, Variant::M3ae);
    Ok(BenchReport {
        name: format!(
            "m3ae {} ({:?} kernels)",
            c.model_type.map(|m| m.name()).unwrap_or("custom"),
            c.kernels
        ),
        steps,
        forward_ms: median(timed.fwd),
        backward_ms: median(timed.bwd),
        optimizer_ms: median(timed.opt),
        step_ms: median(timed.all),
        batch,
        tokens_per_sample: f.encoder_tokens,
        flops_per_step: f.training * batch as f64,
    })
}
