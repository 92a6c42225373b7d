//! Criterion benchmarks of the CUDA kernels (feature `cuda`): fused CUDA ops against the reference
//! compositions of candle ops on the same GPU, at the shapes of `benches/kernels.rs`.
//!
//! `cargo bench --features cuda --bench kernels_cuda` (needs a GPU; without one it stops with
//! "no CUDA device"). Every timed iteration ends with a device synchronisation. Throughput
//! counts FLOP for attention (forward `4 B H L^2 Dh`, forward+backward 3x) and input elements for
//! LayerNorm and GELU, as in the CPU benchmarks; for the text-head loss the FLOP of the rows that
//! count (`6 M V D` forward and backward, `M` rows of non-zero weight).

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use m3ae_kernels::KernelPath;

const SHAPES: [(&str, usize, usize, usize, usize); 3] = [
    ("base_encoder_B32_H12_L66_D64", 32, 12, 66, 64),
    ("small_encoder_B32_H6_L66_D64", 32, 6, 66, 64),
    ("decoder_B32_H16_L261_D32", 32, 16, 261, 32),
];

const PATHS: [(&str, KernelPath); 2] = [
    ("fused", KernelPath::Fused),
    ("reference", KernelPath::Reference),
];

fn var(shape: &[usize], salt: usize, dev: &Device) -> Var {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (((i * 2654435761 + salt) % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
    Var::from_tensor(&t.to_device(dev).unwrap()).unwrap()
}

fn attention(c: &mut Criterion) {
    let dev = m3ae_kernels::fused::cuda::first_gpu().expect("this benchmark needs a CUDA GPU");
    for (name, b, h, l, dh) in SHAPES {
        let dims = [b, h, l, dh];
        let (q, k, v) = (
            var(&dims, 1, &dev),
            var(&dims, 2, &dev),
            var(&dims, 3, &dev),
        );
        let pad: Vec<f32> = (0..b * l)
            .map(|i| f32::from((i / l) % 2 == 1 && i % l >= 3 * l / 4))
            .collect();
        let pad = Tensor::from_vec(pad, (b, l), &Device::Cpu)
            .unwrap()
            .to_device(&dev)
            .unwrap();
        let scale = 1.0 / (dh as f64).sqrt();
        let flops = (4 * b * h * l * l * dh) as u64;
        let mut g = c.benchmark_group(format!("cuda_attention/{name}"));
        for (path_name, path) in PATHS {
            g.throughput(Throughput::Elements(flops));
            g.bench_function(format!("{path_name}/fwd"), |bch| {
                bch.iter(|| {
                    let y = path
                        .masked_attention(&q, &k, &v, Some(&pad), scale)
                        .unwrap();
                    dev.synchronize().unwrap();
                    y
                })
            });
            g.throughput(Throughput::Elements(3 * flops));
            g.bench_function(format!("{path_name}/fwd+bwd"), |bch| {
                bch.iter(|| {
                    let y = path
                        .masked_attention(&q, &k, &v, Some(&pad), scale)
                        .unwrap();
                    let grads = y.sum_all().unwrap().backward().unwrap();
                    dev.synchronize().unwrap();
                    grads
                })
            });
        }
        g.finish();
    }
}

fn layer_norm_and_gelu(c: &mut Criterion) {
    let dev = m3ae_kernels::fused::cuda::first_gpu().expect("this benchmark needs a CUDA GPU");
    let rows = 32 * 66;
    for d in [384usize, 768] {
        let x = var(&[rows, d], 4, &dev);
        let (gamma, beta) = (var(&[d], 5, &dev), var(&[d], 6, &dev));
        let h = var(&[rows, 4 * d], 7, &dev);
        let mut g = c.benchmark_group(format!("cuda_layer_norm_gelu/{rows}x{d}"));
        for (path_name, path) in PATHS {
            g.throughput(Throughput::Elements((rows * d) as u64));
            g.bench_function(format!("layer_norm/{path_name}/fwd+bwd"), |bch| {
                bch.iter(|| {
                    let y = path.layer_norm(&x, &gamma, &beta, 1e-6).unwrap();
                    let grads = y.sum_all().unwrap().backward().unwrap();
                    dev.synchronize().unwrap();
                    grads
                })
            });
            g.throughput(Throughput::Elements((rows * 4 * d) as u64));
            g.bench_function(format!("gelu/{path_name}/fwd+bwd"), |bch| {
                bch.iter(|| {
                    let y = path.gelu_tanh(&h).unwrap();
                    let grads = y.sum_all().unwrap().backward().unwrap();
                    dev.synchronize().unwrap();
                    grads
                })
            });
        }
        g.finish();
    }
}

/// The text-head loss at the CPU-sized M3AE workload (batch 64 x 32 tokens, decoder width 128,
/// BERT's 30,522 words, 75% of the non-padding tokens masked), forward + backward.
fn text_head(c: &mut Criterion) {
    let dev = m3ae_kernels::fused::cuda::first_gpu().expect("this benchmark needs a CUDA GPU");
    let (b, t, d, v) = (64usize, 32usize, 128usize, 30_522usize);
    let n = b * t;
    let h = var(&[n, d], 8, &dev);
    let w = var(&[v, d], 9, &dev);
    let bias = var(&[v], 10, &dev);
    let targets: Vec<u32> = (0..n).map(|i| ((i * 7919) % v) as u32).collect();
    let targets = Tensor::new(targets.as_slice(), &dev).unwrap();
    // sample s has s % 16 padding tokens; positions i % 4 != 0 are masked
    let rw: Vec<f32> = (0..n)
        .map(|j| {
            let (s, i) = (j / t, j % t);
            f32::from(i % 4 != 0 && i < t - s % 16) / (t as f32 * b as f32)
        })
        .collect();
    let m = rw.iter().filter(|&&x| x != 0.0).count();
    let rw = Tensor::new(rw.as_slice(), &dev).unwrap();
    let mut g = c.benchmark_group(format!("cuda_text_head/N{n}_M{m}_D{d}_V{v}"));
    g.sample_size(20);
    for (path_name, path) in PATHS {
        g.throughput(Throughput::Elements((6 * m * v * d) as u64));
        g.bench_function(format!("{path_name}/fwd+bwd"), |bch| {
            bch.iter(|| {
                let (loss, _) = path.text_head_loss(&h, &w, &bias, &targets, &rw).unwrap();
                let grads = loss.backward().unwrap();
                dev.synchronize().unwrap();
                grads
            })
        });
    }
    g.finish();
}

criterion_group!(benches, attention, layer_norm_and_gelu, text_head);
criterion_main!(benches);
