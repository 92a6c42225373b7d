//! Criterion benchmarks of the training hot path: fused vs reference kernels.
//!
//! `cargo bench --bench kernels`. Throughput is reported in "elements" per second where one
//! element is one FLOP (attention forward `4 B H L^2 Dh`, forward+backward 3x that; LayerNorm and
//! GELU count elements of the input, so their rate reads as elements/s; the dense layer counts
//! `2 rows in out` per forward). Shapes are the ones M3AE runs: base and small encoders at
//! 224 px / patch 16 with 64 text tokens and 75%/75% masking (L = 1 + 49 + 16 = 66) and the
//! decoder (L = 1 + 196 + 64 = 261), batch 32; the dense layers of a ViT-S block.
//!
//! Each attention shape also runs a `floor` op: it has attention's inputs and outputs but
//! computes nothing (it fills its output and its three input gradients with a constant), so its
//! forward+backward time is what candle's autograd (the `sum_all().backward()` harness, the
//! gradient accumulation of each input) and writing the outputs cost on their own. No attention
//! kernel can be faster than that floor under this harness; reference / floor bounds the speed-up.
//!
//! The key padding of the main rows is light (the last quarter of the keys of every other
//! sample). Captions are mostly padding in practice (the bundled caption sets have a median of 3
//! words; M3AE pads text to 64 tokens), and the fused kernel skips padding keys, so each shape
//! also runs `fused/fwd+bwd/captions16`: every sample's text is 16 real tokens of 64, so 12 of
//! the encoder's 16 kept text keys (scattered among them, as random masking keeps them in random
//! order) and the last 48 of the decoder's 64 text keys are padding. The reference does the same
//! work whatever the padding.
//!
//! `transformer_block` times a whole pre-LN block as the one fused op, as the composition of
//! the fused per-op kernels and as the reference composition (see the function's docs).

use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape as CShape, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use m3ae_kernels::KernelPath;

struct Shape {
    name: &'static str,
    b: usize,
    h: usize,
    l: usize,
    dh: usize,
}

const SHAPES: [Shape; 3] = [
    Shape {
        name: "base_encoder_B32_H12_L66_D64",
        b: 32,
        h: 12,
        l: 66,
        dh: 64,
    },
    Shape {
        name: "small_encoder_B32_H6_L66_D64",
        b: 32,
        h: 6,
        l: 66,
        dh: 64,
    },
    Shape {
        name: "decoder_B32_H16_L261_D32",
        b: 32,
        h: 16,
        l: 261,
        dh: 32,
    },
];

const PATHS: [(&str, KernelPath); 2] = [
    ("fused", KernelPath::Fused),
    ("reference", KernelPath::Reference),
];

fn var(shape: &[usize], salt: usize) -> Var {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (((i * 2654435761 + salt) % 1000) as f32 / 500.0) - 1.0)
        .collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
}

/// The zero-compute stand-in for attention (see the module docs).
struct Floor;

impl CustomOp3 for Floor {
    fn name(&self) -> &'static str {
        "attention-floor"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        l: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, CShape)> {
        let n = l.shape().elem_count();
        Ok((CpuStorage::F32(vec![0.5; n]), l.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = || Tensor::full(0.5f32, q.shape(), q.device()).map(Some);
        Ok((g()?, g()?, g()?))
    }
}

fn attention(c: &mut Criterion) {
    for s in &SHAPES {
        let dims = [s.b, s.h, s.l, s.dh];
        let (q, k, v) = (var(&dims, 1), var(&dims, 2), var(&dims, 3));
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
        let pad = Tensor::from_vec(pad, (s.b, s.l), &Device::Cpu).unwrap();
        // Text keys are the last positions (16 kept of 64 in the encoders, all 64 in the
        // decoder); three quarters of them are padding (16 real tokens of 64). In the decoder the
        // padding is the end of the text; in an encoder the kept text tokens come in random
        // order, so the padding is scattered among them.
        let encoder = s.l < 1 + 196;
        let text_start = if encoder { 1 + 49 } else { 1 + 196 };
        let text = s.l - text_start;
        let captions: Vec<f32> = (0..s.b * s.l)
            .map(|i| {
                let (b, j) = (i / s.l, i % s.l);
                let t = j.checked_sub(text_start);
                let real = match t {
                    None => true,
                    Some(t) if encoder => (5 * t + 3 * b) % text < text / 4,
                    Some(t) => t < text / 4,
                };
                (!real) as u8 as f32
            })
            .collect();
        let captions = Tensor::from_vec(captions, (s.b, s.l), &Device::Cpu).unwrap();
        let scale = 1.0 / (s.dh as f64).sqrt();
        let flops = (4 * s.b * s.h * s.l * s.l * s.dh) as u64;
        let mut g = c.benchmark_group(format!("attention/{}", s.name));
        g.sample_size(10);
        for (name, path) in PATHS {
            g.throughput(Throughput::Elements(flops));
            g.bench_function(format!("{name}/fwd"), |bch| {
                bch.iter(|| {
                    path.masked_attention(&q, &k, &v, Some(&pad), scale)
                        .unwrap()
                })
            });
            g.throughput(Throughput::Elements(3 * flops));
            g.bench_function(format!("{name}/fwd+bwd"), |bch| {
                bch.iter(|| {
                    let y = path
                        .masked_attention(&q, &k, &v, Some(&pad), scale)
                        .unwrap();
                    y.sum_all().unwrap().backward().unwrap()
                })
            });
        }
        g.throughput(Throughput::Elements(3 * flops));
        g.bench_function("fused/fwd+bwd/captions16", |bch| {
            bch.iter(|| {
                let y = KernelPath::Fused
                    .masked_attention(&q, &k, &v, Some(&captions), scale)
                    .unwrap();
                y.sum_all().unwrap().backward().unwrap()
            })
        });
        g.bench_function("floor/fwd+bwd", |bch| {
            bch.iter(|| {
                let y = q.as_tensor().apply_op3(&k, &v, Floor).unwrap();
                y.sum_all().unwrap().backward().unwrap()
            })
        });
        g.finish();
    }
}

fn layer_norm_and_gelu(c: &mut Criterion) {
    let rows = 32 * 66;
    for d in [384usize, 768] {
        let x = var(&[rows, d], 4);
        let (gamma, beta) = (var(&[d], 5), var(&[d], 6));
        let mut g = c.benchmark_group(format!("layer_norm/{rows}x{d}"));
        g.sample_size(20);
        g.throughput(Throughput::Elements((rows * d) as u64));
        for (name, path) in PATHS {
            g.bench_function(format!("{name}/fwd"), |bch| {
                bch.iter(|| path.layer_norm(&x, &gamma, &beta, 1e-6).unwrap())
            });
            g.bench_function(format!("{name}/fwd+bwd"), |bch| {
                bch.iter(|| {
                    let y = path.layer_norm(&x, &gamma, &beta, 1e-6).unwrap();
                    y.sum_all().unwrap().backward().unwrap()
                })
            });
        }
        g.finish();
        let h = var(&[rows, 4 * d], 7);
        let mut g = c.benchmark_group(format!("gelu/{rows}x{}", 4 * d));
        g.sample_size(20);
        g.throughput(Throughput::Elements((rows * 4 * d) as u64));
        for (name, path) in PATHS {
            g.bench_function(format!("{name}/fwd"), |bch| {
                bch.iter(|| path.gelu_tanh(&h).unwrap())
            });
            g.bench_function(format!("{name}/fwd+bwd"), |bch| {
                bch.iter(|| {
                    let y = path.gelu_tanh(&h).unwrap();
                    y.sum_all().unwrap().backward().unwrap()
                })
            });
        }
        g.finish();
    }
}

/// The dense layers of a ViT-S block (`2048 = 32 x 64` tokens, width 384): qkv, projection, MLP.
fn linear(c: &mut Criterion) {
    let rows = 2048;
    for (inp, out) in [(384usize, 1152usize), (384, 384), (384, 1536), (1536, 384)] {
        let x = var(&[rows, inp], 8);
        let (w, b) = (var(&[out, inp], 9), var(&[out], 10));
        let mut g = c.benchmark_group(format!("linear/{rows}x{inp}->{out}"));
        g.sample_size(20);
        // one element = one FLOP (forward 2 rows in out, forward+backward 3x)
        let flops = (2 * rows * inp * out) as u64;
        for (name, path) in PATHS {
            g.throughput(Throughput::Elements(flops));
            g.bench_function(format!("{name}/fwd"), |bch| {
                bch.iter(|| path.linear(&x, &w, &b).unwrap())
            });
            g.throughput(Throughput::Elements(3 * flops));
            g.bench_function(format!("{name}/fwd+bwd"), |bch| {
                bch.iter(|| {
                    let y = path.linear(&x, &w, &b).unwrap();
                    y.sum_all().unwrap().backward().unwrap()
                })
            });
        }
        g.finish();
    }
}

/// The text head of a CPU-sized M3AE step: batch 64 x text 32 = 2048 rows of width 128, 75% of
/// them masked (weight 1/1536 each, the rest 0), vocabularies of BERT (30,522) and 1,024. One
/// element = one FLOP of the rows the loss counts (forward `2 M V D`, forward+backward 4x that);
/// the reference multiplies all 2048 rows.
fn text_head(c: &mut Criterion) {
    let (n, d, masked) = (64 * 32, 128, 1536);
    let dev = Device::Cpu;
    let h = var(&[n, d], 11);
    let rw: Vec<f32> = (0..n)
        .map(|i| if i % 4 != 0 { 1.0 / masked as f32 } else { 0.0 })
        .collect();
    let rw = Tensor::from_vec(rw, n, &dev).unwrap();
    for v in [30_522usize, 1024] {
        let (w, b) = (var(&[v, d], 12), var(&[v], 13));
        let t: Vec<u32> = (0..n).map(|i| ((i * 7919) % v) as u32).collect();
        let t = Tensor::from_vec(t, n, &dev).unwrap();
        let mut g = c.benchmark_group(format!("text_head/{n}x{d}->{v}"));
        g.sample_size(10);
        let flops = (2 * masked * v * d) as u64;
        for (name, path) in PATHS {
            g.throughput(Throughput::Elements(flops));
            g.bench_function(format!("{name}/fwd"), |bch| {
                bch.iter(|| path.text_head_loss(&h, &w, &b, &t, &rw).unwrap())
            });
            g.throughput(Throughput::Elements(4 * flops));
            g.bench_function(format!("{name}/fwd+bwd"), |bch| {
                bch.iter(|| {
                    let (loss, _) = path.text_head_loss(&h, &w, &b, &t, &rw).unwrap();
                    loss.backward().unwrap()
                })
            });
        }
        g.finish();
    }
}

/// Predicted words at masked positions (`m3ae reconstruct`, the reconstruction images,
/// masked-word accuracy): the text head of the CPU-sized workload (2048 rows = batch 64 x text
/// 32, width 128, BERT's 30,522 words), argmax at the 1,024 requested rows (every other row).
/// `fused`: [`m3ae_kernels::text_head_top_k`] (only those rows, tiled, no logits tensor);
/// `composed`: the logits of all rows through the model's dense layer, then `argmax` (what the
/// commands did before); `composed-rows`: the logits of the requested rows only, then `argmax`.
/// One element = one FLOP of the requested rows (`2 M V D`).
fn text_top_k(c: &mut Criterion) {
    let (n, d, v) = (64 * 32, 128, 30_522);
    let (h, w, b) = (var(&[n, d], 21), var(&[v, d], 22), var(&[v], 23));
    let (h, w, b) = (h.as_tensor(), w.as_tensor(), b.as_tensor());
    let rows: Vec<usize> = (0..n).step_by(2).collect();
    let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    let idx = Tensor::new(idx.as_slice(), &Device::Cpu).unwrap();
    let mut g = c.benchmark_group(format!("text_top_k/{n}x{d}->{v}"));
    g.sample_size(10);
    g.throughput(Throughput::Elements((2 * rows.len() * v * d) as u64));
    g.bench_function("fused/argmax", |bch| {
        bch.iter(|| m3ae_kernels::text_head_top_k(h, w, Some(b), &rows, 1).unwrap())
    });
    g.bench_function("fused/top5", |bch| {
        bch.iter(|| m3ae_kernels::text_head_top_k(h, w, Some(b), &rows, 5).unwrap())
    });
    g.bench_function("composed/argmax", |bch| {
        bch.iter(|| {
            let logits = m3ae_kernels::linear(h, w, b).unwrap();
            let a = logits.argmax(candle_core::D::Minus1).unwrap();
            a.index_select(&idx, 0).unwrap().to_vec1::<u32>().unwrap()
        })
    });
    g.bench_function("composed-rows/argmax", |bch| {
        bch.iter(|| {
            let hr = h.index_select(&idx, 0).unwrap();
            let logits = m3ae_kernels::linear(&hr, w, b).unwrap();
            logits
                .argmax(candle_core::D::Minus1)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap()
        })
    });
    g.finish();
}

/// One pre-LN transformer block, forward and forward+backward (gradients of the input and all
/// twelve parameters): `fused` is the one-op block (`m3ae_kernels::transformer_block`),
/// `fused-bf16-<backend>` the same with bf16 products (`m3ae_kernels::fused::bf16`; the backend
/// this CPU runs: `avx512-bf16`, or `emulated` in f32 arithmetic), `fused-ops` the block
/// composed from the fused per-op kernels (what the model ran before the one-op block),
/// `reference` composed from reference ops. Shapes: the `small` encoder at
/// 224 px with 75% image and text masking (B32, L66, width 384, 6 heads) and the `small`
/// decoder (L261, width 512, 16 heads) at batch 8; every other sample pads the last quarter of
/// its keys. One element = one FLOP (forward `2 N (12 C^2) + 4 N L C`, forward+backward 3x).
fn transformer_block(c: &mut Criterion) {
    for (name, b, l, width, heads) in [
        (
            "small_encoder_B32_L66_C384_H6",
            32usize,
            66usize,
            384usize,
            6usize,
        ),
        ("small_decoder_B8_L261_C512_H16", 8, 261, 512, 16),
    ] {
        let m = 4 * width;
        let x = var(&[b, l, width], 30);
        let shapes: [Vec<usize>; 12] = [
            vec![width],
            vec![width],
            vec![3 * width, width],
            vec![3 * width],
            vec![width, width],
            vec![width],
            vec![width],
            vec![width],
            vec![m, width],
            vec![m],
            vec![width, m],
            vec![width],
        ];
        let p: Vec<Var> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| var(s, 31 + i))
            .collect();
        let pt: Vec<Tensor> = p.iter().map(|v| v.as_tensor().clone()).collect();
        let params = m3ae_kernels::BlockParams {
            norm1: (&pt[0], &pt[1]),
            qkv: (&pt[2], &pt[3]),
            proj: (&pt[4], &pt[5]),
            norm2: (&pt[6], &pt[7]),
            fc1: (&pt[8], &pt[9]),
            fc2: (&pt[10], &pt[11]),
        };
        let pad: Vec<f32> = (0..b * l)
            .map(|j| (j / l % 2 == 1 && j % l >= l - l / 4) as u8 as f32)
            .collect();
        let pad = Tensor::from_vec(pad, (b, l), &Device::Cpu).unwrap();
        let n = (b * l) as u64;
        let (wd, lu) = (width as u64, l as u64);
        let flops = 2 * n * 12 * wd * wd + 4 * n * lu * wd;
        let mut g = c.benchmark_group(format!("transformer_block/{name}"));
        g.sample_size(10);
        let bf16 = format!("fused-bf16-{}", m3ae_kernels::fused::bf16::backend().name());
        let paths: [(&str, &dyn Fn() -> Tensor); 4] = [
            ("fused", &|| {
                KernelPath::Fused
                    .transformer_block(x.as_tensor(), &params, heads, Some(&pad), 1e-6)
                    .unwrap()
            }),
            (&bf16, &|| {
                m3ae_kernels::fused::transformer_block_with(
                    x.as_tensor(),
                    &params,
                    heads,
                    Some(&pad),
                    1e-6,
                    candle_core::DType::BF16,
                )
                .unwrap()
            }),
            ("fused-ops", &|| {
                m3ae_kernels::fused::transformer_block_composed(
                    x.as_tensor(),
                    &params,
                    heads,
                    Some(&pad),
                    1e-6,
                )
                .unwrap()
            }),
            ("reference", &|| {
                KernelPath::Reference
                    .transformer_block(x.as_tensor(), &params, heads, Some(&pad), 1e-6)
                    .unwrap()
            }),
        ];
        for (path, f) in paths {
            g.throughput(Throughput::Elements(flops));
            g.bench_function(format!("{path}/fwd"), |bch| bch.iter(f));
            g.throughput(Throughput::Elements(3 * flops));
            g.bench_function(format!("{path}/fwd+bwd"), |bch| {
                bch.iter(|| f().sum_all().unwrap().backward().unwrap())
            });
        }
        g.finish();
    }
}

/// The products of a block at the `small` decoder's shape (B8 x L261 = 2,088 rows, width 512,
/// MLP 2,048): forward `rows x 4C <- rows x C`, backward data `rows x C <- rows x 4C` and
/// weight gradient `4C x C <- (rows)`, in f32 (`gemm` crate, as the one-op block runs them) and
/// with bf16 operands on each bf16 backend this CPU runs (`m3ae_kernels::fused::bf16`). One
/// element = one FLOP (`2 m n k`).
fn bf16_gemm(c: &mut Criterion) {
    use m3ae_kernels::fused::bf16::{self, Backend};
    let (rows, width, mlp) = (2088usize, 512usize, 2048usize);
    let mut backends = vec![Backend::Emulated];
    if bf16::cpu_has_avx512_bf16() {
        backends.push(Backend::Avx512Bf16);
    }
    let data = |len: usize, seed: usize| -> Vec<f32> {
        var(&[len], seed).as_tensor().to_vec1::<f32>().unwrap()
    };
    // (name, m, n, k, lhs strides, rhs strides): operands stored as the block stores them
    let cases = [
        ("fc1_fwd", rows, mlp, width, (width, 1), (1, width)),
        ("fc1_bwd_data", rows, width, mlp, (mlp, 1), (width, 1)),
        ("fc1_bwd_weight", mlp, width, rows, (1, mlp), (width, 1)),
    ];
    let mut g = c.benchmark_group("bf16_gemm");
    g.sample_size(10);
    for (name, m, n, k, ls, rs) in cases {
        let (lhs, rhs) = (data(m * k, 60), data(k * n, 61));
        let mut dst = vec![0f32; m * n];
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        g.bench_function(format!("{name}/f32"), |bch| {
            bch.iter(|| {
                m3ae_kernels::fused::bf16::gemm_f32(
                    (m, n, k),
                    (&mut dst, n),
                    false,
                    (&lhs, ls.0, ls.1),
                    (&rhs, rs.0, rs.1),
                )
            })
        });
        for &b in &backends {
            g.bench_function(format!("{name}/bf16-{}", b.name()), |bch| {
                bch.iter(|| {
                    bf16::gemm_with(
                        b,
                        (m, n, k),
                        (&mut dst, n),
                        false,
                        (&lhs, ls.0, ls.1),
                        (&rhs, rs.0, rs.1),
                    )
                })
            });
        }
    }
    g.finish();
}

criterion_group!(
    benches,
    attention,
    transformer_block,
    bf16_gemm,
    layer_norm_and_gelu,
    linear,
    text_head,
    text_top_k
);
criterion_main!(benches);
