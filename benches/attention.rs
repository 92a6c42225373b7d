//! Criterion benchmarks of the masked-attention hot path at the shapes M3AE runs.
//!
//! `cargo bench --bench attention`. Each shape is measured forward and forward+backward (gradients
//! for q, k and v) on the kernel path the model uses. The fused kernels of `m3ae-kernels` will be
//! added here beside the reference path so both are compared in one run.

use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

struct Shape {
    name: &'static str,
    b: usize,
    h: usize,
    l: usize,
    dh: usize,
}

const SHAPES: [Shape; 3] = [
    // base encoder: 224 px / patch 16, 64 text tokens, 75%/75% masking -> 1 + 49 + 16 tokens
    Shape {
        name: "base_encoder",
        b: 32,
        h: 12,
        l: 66,
        dh: 64,
    },
    Shape {
        name: "small_encoder",
        b: 32,
        h: 6,
        l: 66,
        dh: 64,
    },
    // decoder: 1 + 196 + 64 tokens
    Shape {
        name: "decoder",
        b: 32,
        h: 16,
        l: 261,
        dh: 32,
    },
];

fn inputs(s: &Shape) -> candle_core::Result<(Var, Var, Var, Tensor)> {
    let dev = Device::Cpu;
    let n = s.b * s.h * s.l * s.dh;
    let make = |salt: usize| -> candle_core::Result<Var> {
        let v: Vec<f32> = (0..n)
            .map(|i| (((i * 2654435761 + salt) % 1000) as f32 / 500.0) - 1.0)
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, (s.b, s.h, s.l, s.dh), &dev)?)
    };
    // the last quarter of the keys of every other sample are padding
    let pad: Vec<f32> = (0..s.b * s.l)
        .map(|i| {
            if (i / s.l) % 2 == 1 && i % s.l >= 3 * s.l / 4 {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    Ok((
        make(1)?,
        make(2)?,
        make(3)?,
        Tensor::from_vec(pad, (s.b, s.l), &dev)?.to_dtype(DType::F32)?,
    ))
}

fn bench(c: &mut Criterion) {
    for s in &SHAPES {
        let (q, k, v, pad) = inputs(s).expect("inputs");
        let scale = 1.0 / (s.dh as f64).sqrt();
        let flops = 4 * s.b * s.h * s.l * s.l * s.dh;
        let mut g = c.benchmark_group(format!("attention/{}", s.name));
        g.sample_size(10);
        g.throughput(Throughput::Elements(flops as u64));
        g.bench_function("reference/fwd", |bch| {
            bch.iter(|| {
                m3ae_kernels::reference::masked_attention(&q, &k, &v, Some(&pad), scale).unwrap()
            })
        });
        g.throughput(Throughput::Elements(3 * flops as u64));
        g.bench_function("reference/fwd+bwd", |bch| {
            bch.iter(|| {
                let y = m3ae_kernels::reference::masked_attention(&q, &k, &v, Some(&pad), scale)
                    .unwrap();
                y.sum_all().unwrap().backward().unwrap()
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
