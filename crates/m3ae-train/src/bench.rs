//! Training-step benchmarks on generated input (no data loading): forward, backward and AdamW,
//! timed separately.
//!
//! * [`vit_s_workload`]: the reference workload of the performance notes: a ViT-S-like encoder
//!   (dim 384, 6 heads, MLP 1536, depth 4, tanh-GELU, LayerNorm eps 1e-6) on sequences of 64 with
//!   a key-padding mask, batch 32, a 384 -> 768 head with an MSE loss, AdamW over all weights.
//!   93.0 GFLOP per step by the notes' count (3 x 2 x tokens x [depth (12 C^2 + 2 S C) + 768 C]).
//! * [`preset_workload`]: a full M3AE step of any configuration at a given batch size.
//!
//! Both run on any device at either [`Precision`] (the caller checks that the device supports
//! it); on an asynchronous device (CUDA) every timed phase ends with a device synchronisation,
//! so the times are the device's.
//!
//! Besides the medians, a report carries the process's CPU time (user and system), page faults
//! and peak resident memory over the timed steps alone ([`ProcessUsage`], from `getrusage`), so
//! that the share of a step spent in the kernel is the step's, not that of the model's set-up.

use crate::objective::{Objective, TrainBatch};
use crate::optim::{named_grads, AdamW, AdamWConfig};
use crate::Result;
use candle_core::{Device, Tensor};
use m3ae_kernels::testing::uniform;
use m3ae_model::layers::{Dense, Transformer};
use m3ae_model::params::{Init, ParamSpec};
use m3ae_model::{
    flops, M3ae, M3aeConfig, Masking, ModelInput, Noise, ParamStore, Precision, Variant,
};
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
    /// CPU time and page faults of the whole process (all threads) over the timed steps, and
    /// its peak resident memory at their end; `None` where `getrusage` is not available.
    pub usage: Option<ProcessUsage>,
}

/// Resource usage of this process from `getrusage(RUSAGE_SELF)`: all threads together. A
/// difference of two readings ([`ProcessUsage::since`]) is the usage between them; its
/// `peak_rss_bytes` is the later reading's (a high-water mark does not subtract).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ProcessUsage {
    /// CPU seconds in user mode.
    pub user_s: f64,
    /// CPU seconds in the kernel (system calls, page faults).
    pub system_s: f64,
    /// Page faults served without I/O (e.g. a fresh anonymous page: zero-filled).
    pub minor_faults: u64,
    /// Page faults that needed I/O.
    pub major_faults: u64,
    /// Peak resident set size of the process so far, bytes.
    pub peak_rss_bytes: u64,
}

impl ProcessUsage {
    /// The usage of this process so far (every thread, finished or not), or `None` where
    /// `getrusage` is not available (non-Unix) or fails.
    pub fn now() -> Option<Self> {
        #[cfg(unix)]
        {
            // SAFETY: getrusage writes a plain-data struct that we own.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
                return None;
            }
            let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
            // ru_maxrss is in KiB on Linux and the BSDs, in bytes on macOS
            let rss_unit = if cfg!(target_vendor = "apple") {
                1
            } else {
                1024
            };
            Some(Self {
                user_s: secs(ru.ru_utime),
                system_s: secs(ru.ru_stime),
                minor_faults: ru.ru_minflt as u64,
                major_faults: ru.ru_majflt as u64,
                peak_rss_bytes: (ru.ru_maxrss as u64).saturating_mul(rss_unit),
            })
        }
        #[cfg(not(unix))]
        None
    }

    /// The usage from `earlier` to `self` (counters subtracted, never below zero; the peak RSS
    /// stays `self`'s).
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            user_s: (self.user_s - earlier.user_s).max(0.0),
            system_s: (self.system_s - earlier.system_s).max(0.0),
            minor_faults: self.minor_faults.saturating_sub(earlier.minor_faults),
            major_faults: self.major_faults.saturating_sub(earlier.major_faults),
            peak_rss_bytes: self.peak_rss_bytes,
        }
    }

    /// CPU seconds, user + system.
    pub fn cpu_s(&self) -> f64 {
        self.user_s + self.system_s
    }

    /// The kernel's share of the CPU time, `system / (user + system)` (0 when no CPU time was
    /// counted).
    pub fn system_share(&self) -> f64 {
        let cpu = self.cpu_s();
        if cpu > 0.0 {
            self.system_s / cpu
        } else {
            0.0
        }
    }
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
        )?;
        if let Some(u) = &self.usage {
            let n = self.steps.max(1) as f64;
            write!(
                f,
                "\nkernel: {:.1}% of the timed steps' CPU time (system {:.1} ms, user {:.1} ms per \
                 step, all threads), {:.0} minor page faults per step; peak RSS {:.0} MB",
                100.0 * u.system_share(),
                u.system_s * 1e3 / n,
                u.user_s * 1e3 / n,
                u.minor_faults as f64 / n,
                u.peak_rss_bytes as f64 / 1e6
            )?;
        }
        Ok(())
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
    usage: Option<ProcessUsage>,
}

fn time_steps(
    dev: &Device,
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
        usage: None,
    };
    let mut start = None;
    for i in 0..warmup + steps {
        if i == warmup {
            start = ProcessUsage::now();
        }
        let t0 = Instant::now();
        let loss = fwd()?;
        dev.synchronize()?;
        let f = t0.elapsed().as_secs_f64() * 1e3;
        let (b, o) = bwd_opt(&loss)?;
        dev.synchronize()?;
        let all = t0.elapsed().as_secs_f64() * 1e3;
        if i >= warmup {
            t.fwd.push(f);
            t.bwd.push(b);
            t.opt.push(o);
            t.all.push(all);
        }
    }
    t.usage = start.zip(ProcessUsage::now()).map(|(a, b)| b.since(&a));
    Ok(t)
}

/// The ViT-S-like encoder step of the performance notes (see the module docs) on `dev`, the
/// dense layers at `precision`.
pub fn vit_s_workload(
    cfg_kernels: m3ae_kernels::KernelPath,
    steps: usize,
    dev: &Device,
    precision: Precision,
) -> Result<BenchReport> {
    let (batch, seq, dim, depth, heads, out) =
        (32usize, 64usize, 384usize, 4usize, 6usize, 768usize);
    let dev = dev.clone();
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
    let encoder =
        Transformer::new(&params, "encoder", depth, heads, cfg_kernels)?.with_precision(precision);
    let head = Dense::new(&params, "head", cfg_kernels)?.with_precision(precision);
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
        &dev,
        2,
        steps,
        || {
            let y = head.forward(&encoder.forward(&x, Some(&pad))?)?;
            Ok((y - &target)?.sqr()?.mean_all()?)
        },
        |loss| {
            let t0 = Instant::now();
            let grads = named_grads(&params, &loss.backward()?);
            dev.synchronize()?;
            let b = t0.elapsed().as_secs_f64() * 1e3;
            let t1 = Instant::now();
            opt.step(&params, &grads, 1e-4)?;
            dev.synchronize()?;
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
        name: format!(
            "vit-s (dim 384, depth 4, seq 64, {cfg_kernels:?} kernels, {precision}, {})",
            device_name(&dev)
        ),
        steps,
        forward_ms: median(t.fwd),
        backward_ms: median(t.bwd),
        optimizer_ms: median(t.opt),
        step_ms: median(t.all),
        batch,
        tokens_per_sample: seq,
        flops_per_step: flops,
        usage: t.usage,
    })
}

/// `cpu` or `cuda:N`.
fn device_name(dev: &Device) -> String {
    m3ae_model::DeviceSpec::of(dev)
        .map(|d| d.to_string())
        .unwrap_or_else(|_| format!("{:?}", dev.location()))
}

/// A full M3AE training step of `cfg` at `batch` on generated images and text (official
/// batch-shared masking) on `dev`, the dense layers at `precision`. Tokens per sample are the
/// encoder's (`1 + kept image + kept text`).
pub fn preset_workload(
    cfg: &M3aeConfig,
    batch: usize,
    steps: usize,
    dev: &Device,
    precision: Precision,
) -> Result<BenchReport> {
    let dev = dev.clone();
    let model = M3ae::init(cfg, 0, &dev)?.with_precision(precision);
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
        &dev,
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
            dev.synchronize()?;
            let b = t0.elapsed().as_secs_f64() * 1e3;
            let t1 = Instant::now();
            opt.step(model.params(), &grads, 1e-4)?;
            dev.synchronize()?;
            Ok((b, t1.elapsed().as_secs_f64() * 1e3))
        },
    )?;
    let f = flops::training_flops(&c, Variant::M3ae);
    Ok(BenchReport {
        name: format!(
            "m3ae {} ({:?} kernels, {precision}, {})",
            c.model_type.map(|m| m.name()).unwrap_or("custom"),
            c.kernels,
            device_name(&dev)
        ),
        steps,
        forward_ms: median(timed.fwd),
        backward_ms: median(timed.bwd),
        optimizer_ms: median(timed.opt),
        step_ms: median(timed.all),
        batch,
        tokens_per_sample: f.encoder_tokens,
        flops_per_step: f.training * batch as f64,
        usage: timed.usage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_difference_and_system_share() {
        let a = ProcessUsage {
            user_s: 1.0,
            system_s: 0.25,
            minor_faults: 100,
            major_faults: 2,
            peak_rss_bytes: 10 << 20,
        };
        let b = ProcessUsage {
            user_s: 4.6,
            system_s: 0.65,
            minor_faults: 1100,
            major_faults: 2,
            peak_rss_bytes: 30 << 20,
        };
        let d = b.since(&a);
        assert!((d.user_s - 3.6).abs() < 1e-12 && (d.system_s - 0.4).abs() < 1e-12);
        assert_eq!((d.minor_faults, d.major_faults), (1000, 0));
        assert_eq!(
            d.peak_rss_bytes,
            30 << 20,
            "the high-water mark is the later reading's"
        );
        assert!((d.system_share() - 0.1).abs() < 1e-12);
        // counters never run backwards, and no CPU time means no share
        let back = a.since(&b);
        assert_eq!((back.user_s, back.minor_faults), (0.0, 0));
        assert_eq!(ProcessUsage::default().system_share(), 0.0);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn usage_counts_cpu_time_and_fresh_pages() {
        let a = ProcessUsage::now().expect("getrusage on Linux");
        // 64 MiB touched once: 16,384 fresh 4 KiB pages (fewer with huge pages), and some CPU
        let pages = 64 << 20;
        let mut v = vec![0u8; pages];
        for i in (0..pages).step_by(4096) {
            v[i] = (i / 4096) as u8;
        }
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(i ^ v[(i as usize * 4096) % pages] as u64);
        }
        std::hint::black_box((x, &v));
        let d = ProcessUsage::now().unwrap().since(&a);
        assert!(d.minor_faults >= 16, "{d:?}");
        assert!(d.cpu_s() > 0.0, "{d:?}");
        assert!(d.peak_rss_bytes >= pages as u64, "{d:?}");
        assert!((0.0..=1.0).contains(&d.system_share()));
    }
}
