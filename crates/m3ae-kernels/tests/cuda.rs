//! The CUDA kernels (feature `cuda`): the source compiles with NVRTC (no GPU needed), and on a
//! GPU every op's values and gradients match the CPU reference path on awkward shapes and
//! padding patterns. The device tests are `#[ignore]`d (they need a GPU) and fail when run without one.
#![cfg(feature = "cuda")]

use candle_core::{Device, Tensor, Var};
use m3ae_kernels::{fused, reference};

mod common;
use common::{padding, rel_err, tensor, ALL_PADS};

#[test]
fn nvrtc_compiles_every_kernel() {
    let ptx = fused::cuda::ptx().expect("NVRTC compiles kernels.cu");
    for name in fused::cuda::KERNELS {
        assert!(
            ptx.contains(&format!(".entry {name}(")),
            "{name} missing from the PTX"
        );
    }
    assert!(fused::cuda::attention_fits(261, 32));
    assert!(fused::cuda::attention_fits(1024, 64));
    assert!(!fused::cuda::attention_fits(4096, 64));
}

/// Value of `f(inputs)` and the gradients of `sum(f(inputs) * w)` with respect to every input.
fn with_grads(
    f: &dyn Fn(&[&Tensor]) -> Tensor,
    inputs: &[Tensor],
    w: &Tensor,
    dev: &Device,
) -> Vec<Tensor> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap())
        .collect();
    let refs: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    let y = f(&refs);
    let g = (&y * w.to_device(dev).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut out = vec![y];
    out.extend(vars.iter().map(|v| g.get(v.as_tensor()).unwrap().clone()));
    out
}

fn assert_close(got: &[Tensor], want: &[Tensor], names: &[&str], ctx: &str) {
    for (i, ((g, w), name)) in got.iter().zip(want).zip(names).enumerate() {
        let err = rel_err(g, w);
        let tol = if i == 0 { 1e-5 } else { 1e-4 };
        assert!(err <= tol, "{name} {ctx}: relative error {err} > {tol}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it with --ignored)"]
fn attention_matches_reference_on_gpu() {
    let dev = fused::cuda::first_gpu().expect("this test needs a CUDA GPU");
    for (i, &(b, h, l, dh, magnitude)) in [
        (2usize, 3usize, 70usize, 8usize, 1f32),
        (1, 2, 1, 32, 1.0),
        (2, 2, 130, 64, 1.0),
        (1, 1, 65, 80, 1.0),
        (3, 2, 17, 32, 30.0),
        (2, 4, 261, 32, 1.0),
    ]
    .iter()
    .enumerate()
    {
        for (kind, &pad) in ALL_PADS.iter().enumerate() {
            let seed = 10 * i as u64 + kind as u64;
            let shape = [b, h, l, dh];
            let ins = [
                tensor(&shape, seed, magnitude),
                tensor(&shape, seed + 1, magnitude),
                tensor(&shape, seed + 2, 1.0),
            ];
            let w = tensor(&shape, seed + 3, 1.0);
            let p = padding(b, l, pad, seed + 4);
            let scale = 1.0 / (dh as f64).sqrt();
            let want = with_grads(
                &|x| reference::masked_attention(x[0], x[1], x[2], p.as_ref(), scale).unwrap(),
                &ins,
                &w,
                &Device::Cpu,
            );
            let pg = p.as_ref().map(|p| p.to_device(&dev).unwrap());
            let got = with_grads(
                &|x| fused::masked_attention(x[0], x[1], x[2], pg.as_ref(), scale).unwrap(),
                &ins,
                &w,
                &dev,
            );
            let ctx = format!("b{b} h{h} l{l} dh{dh} {pad:?} x{magnitude}");
            assert_close(&got, &want, &["forward", "dq", "dk", "dv"], &ctx);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it with --ignored)"]
fn packed_qkv_attention_matches_reference_on_gpu() {
    let dev = fused::cuda::first_gpu().expect("this test needs a CUDA GPU");
    for (i, &(b, l, heads, dh)) in [
        (2usize, 70usize, 3usize, 8usize),
        (1, 1, 2, 32),
        (2, 66, 6, 64),
    ]
    .iter()
    .enumerate()
    {
        for (kind, &pad) in ALL_PADS.iter().enumerate() {
            let seed = 40 + 10 * i as u64 + kind as u64;
            let qkv = tensor(&[b, l, 3 * heads * dh], seed, 1.0);
            let w = tensor(&[b, l, heads * dh], seed + 1, 1.0);
            let p = padding(b, l, pad, seed + 2);
            let scale = 1.0 / (dh as f64).sqrt();
            let want = with_grads(
                &|x| reference::qkv_attention(x[0], heads, p.as_ref(), scale).unwrap(),
                std::slice::from_ref(&qkv),
                &w,
                &Device::Cpu,
            );
            let pg = p.as_ref().map(|p| p.to_device(&dev).unwrap());
            let got = with_grads(
                &|x| fused::qkv_attention(x[0], heads, pg.as_ref(), scale).unwrap(),
                std::slice::from_ref(&qkv),
                &w,
                &dev,
            );
            let ctx = format!("b{b} l{l} heads{heads} dh{dh} {pad:?}");
            assert_close(&got, &want, &["forward", "dqkv"], &ctx);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it with --ignored)"]
fn fully_padded_rows_attend_uniformly_on_gpu() {
    let dev = fused::cuda::first_gpu().expect("this test needs a CUDA GPU");
    common::assert_fully_padded_rows_attend_uniformly(&dev);
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it with --ignored)"]
fn layer_norm_and_gelu_match_reference_on_gpu() {
    let dev = fused::cuda::first_gpu().expect("this test needs a CUDA GPU");
    for (i, shape) in [
        vec![5usize, 7, 384],
        vec![33, 768],
        vec![1, 1],
        vec![3, 100],
    ]
    .iter()
    .enumerate()
    {
        let d = *shape.last().unwrap();
        let seed = 100 + 10 * i as u64;
        let ins = [
            tensor(shape, seed, 3.0),
            tensor(&[d], seed + 1, 1.0),
            tensor(&[d], seed + 2, 1.0),
        ];
        let w = tensor(shape, seed + 3, 1.0);
        let want = with_grads(
            &|x| reference::layer_norm(x[0], x[1], x[2], 1e-6).unwrap(),
            &ins,
            &w,
            &Device::Cpu,
        );
        let got = with_grads(
            &|x| fused::layer_norm(x[0], x[1], x[2], 1e-6).unwrap(),
            &ins,
            &w,
            &dev,
        );
        let ctx = format!("layer_norm {shape:?}");
        assert_close(&got, &want, &["forward", "dx", "dgamma", "dbeta"], &ctx);

        let x = [tensor(shape, seed + 4, 4.0)];
        let want = with_grads(
            &|x| reference::gelu_tanh(x[0]).unwrap(),
            &x,
            &w,
            &Device::Cpu,
        );
        let got = with_grads(&|x| fused::gelu_tanh(x[0]).unwrap(), &x, &w, &dev);
        assert_close(&got, &want, &["forward", "dx"], &format!("gelu {shape:?}"));
    }
}
