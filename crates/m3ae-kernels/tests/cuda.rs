//! The CUDA kernels (feature `cuda`): the source compiles with NVRTC (no GPU needed), and on a
//! GPU every op's values and gradients match the CPU reference path on awkward shapes and
//! padding patterns, and the text-head loss and top-k match the fused CPU ops (values,
//! gradients, ids). The device tests are `#[ignore]`d (they need a GPU) and fail when run without
//! one.
#![cfg(feature = "cuda")]

use candle_core::{Device, Tensor, Var};
use m3ae_kernels::{fused, reference, TextTopK};

mod common;
use common::{padding, rel_err, tensor, values, ALL_PADS};

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
    assert_eq!(fused::cuda::TOP_K_MAX, 32);
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
#[ignore = "needs a CUDA GPU (run with --include-ignored on a GPU machine with cargo; m3ae doctor --device cuda checks the same without cargo)"]
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
            // A fully padded sample at large scores is ill-conditioned in the reference itself:
            // its padding score (-1e7) rounds the scores to whole numbers in f32 (the fused CPU
            // kernel differs from it there by ~3e-3 in the gradients too).
            if magnitude > 1.0 && matches!(pad, common::Pad::Full) {
                continue;
            }
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
#[ignore = "needs a CUDA GPU (run with --include-ignored on a GPU machine with cargo; m3ae doctor --device cuda checks the same without cargo)"]
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
#[ignore = "needs a CUDA GPU (run with --include-ignored on a GPU machine with cargo; m3ae doctor --device cuda checks the same without cargo)"]
fn fully_padded_rows_attend_uniformly_on_gpu() {
    let dev = fused::cuda::first_gpu().expect("this test needs a CUDA GPU");
    common::assert_fully_padded_rows_attend_uniformly(&dev);
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored on a GPU machine with cargo; m3ae doctor --device cuda checks the same without cargo)"]
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

/// Loss, accuracy and the gradients of hidden, weight and bias (the loss scaled by 1.5 before
/// the backward) of `fused::text_head_loss` on `dev`, moved to the CPU.
fn text_head_run(
    (h, w, b): (&Tensor, &Tensor, &Tensor),
    t: &[u32],
    rw: &[f32],
    dev: &Device,
) -> (f32, f32, Vec<Tensor>) {
    let vars: Vec<Var> = [h, w, b]
        .iter()
        .map(|x| Var::from_tensor(&x.to_device(dev).unwrap()).unwrap())
        .collect();
    let tt = Tensor::new(t, dev).unwrap();
    let rwt = Tensor::new(rw, dev).unwrap();
    let (loss, acc) = fused::text_head_loss(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
        &tt,
        &rwt,
    )
    .unwrap();
    let g = (&loss * 1.5).unwrap().backward().unwrap();
    let grads = vars
        .iter()
        .map(|v| {
            g.get(v.as_tensor())
                .expect("every input gets a gradient")
                .to_device(&Device::Cpu)
                .unwrap()
        })
        .collect();
    let scalar = |x: &Tensor| {
        x.to_device(&Device::Cpu)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    (scalar(&loss), scalar(&acc), grads)
}

/// Row weights of `samples` samples of `len` tokens the way M3AE builds them: sample `s` has
/// `s % (len / 2)` padding tokens at its end; with `masked_only` only the positions `i % 4 != 0`
/// count; each sample's weights sum to `1 / samples`.
fn m3ae_weights(samples: usize, len: usize, masked_only: bool) -> Vec<f32> {
    let valid: Vec<f32> = (0..samples * len)
        .map(|j| {
            let (s, i) = (j / len, j % len);
            let pad = i >= len - s % (len / 2).max(1);
            ((!masked_only || i % 4 != 0) && !pad) as u8 as f32
        })
        .collect();
    valid
        .chunks(len)
        .flat_map(|row| {
            let c = row.iter().sum::<f32>().max(1e-5);
            row.iter().map(move |&v| v / c / samples as f32)
        })
        .collect()
}

/// Targets: every third row its arg-max (so the accuracy is not 0), the others random.
fn head_targets(h: &Tensor, w: &Tensor, b: &Tensor, seed: u64) -> Vec<u32> {
    let v = w.dim(0).unwrap();
    let argmax = fused::linear(h, w, b)
        .unwrap()
        .argmax(candle_core::D::Minus1)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    values(argmax.len(), seed)
        .iter()
        .enumerate()
        .map(|(i, x)| {
            if i % 3 == 0 {
                argmax[i]
            } else {
                (((x + 1.0) * 0.5 * v as f32) as u32).min(v as u32 - 1)
            }
        })
        .collect()
}

/// A text-head case: (what, N, D, V, row weights, scale of hidden and weight, scale of bias).
type HeadCase = (&'static str, usize, usize, usize, Vec<f32>, f32, f32);

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored on a GPU machine with cargo; m3ae doctor --device cuda checks the same without cargo)"]
fn text_head_loss_matches_the_cpu_op_on_gpu() {
    let dev = fused::cuda::first_gpu().expect("this test needs a CUDA GPU");
    // (what, N, D, V, row weights, scale of hidden and weight, scale of bias)
    let zero_some = |n: usize| -> Vec<f32> {
        values(n, 77)
            .iter()
            .map(|&x| if x < -0.6 { 0.0 } else { 0.01 })
            .collect()
    };
    let cases: Vec<HeadCase> = vec![
        (
            "masked-only",
            50,
            40,
            300,
            m3ae_weights(5, 10, true),
            1.0,
            0.5,
        ),
        (
            "all-token",
            50,
            40,
            300,
            m3ae_weights(5, 10, false),
            1.0,
            0.5,
        ),
        ("one tile", 7, 16, 64, vec![1.0; 7], 1.0, 0.5),
        ("one word", 3, 5, 1, vec![0.5; 3], 1.0, 0.5),
        ("20% weight 0", 130, 70, 1000, zero_some(130), 1.0, 0.5),
        ("chunks of tiles", 12, 16, 4250, zero_some(12), 1.0, 0.5),
        ("logits x1e4", 10, 16, 600, vec![0.1; 10], 30.0, 1e3),
        ("all weight 0", 10, 8, 100, vec![0.0; 10], 1.0, 0.5),
        (
            "BERT vocabulary",
            64 * 16,
            192,
            30_522,
            m3ae_weights(64, 16, true),
            1.0,
            0.5,
        ),
    ];
    for (i, (what, n, d, v, rw, scale, bias_scale)) in cases.into_iter().enumerate() {
        let seed = 200 + 10 * i as u64;
        let h = tensor(&[n, d], seed, scale);
        let w = tensor(&[v, d], seed + 1, 0.5 * scale);
        let b = tensor(&[v], seed + 2, bias_scale);
        let t = head_targets(&h, &w, &b, seed + 3);
        let (cl, ca, cg) = text_head_run((&h, &w, &b), &t, &rw, &Device::Cpu);
        let (gl, ga, gg) = text_head_run((&h, &w, &b), &t, &rw, &dev);
        let ctx = format!("{what}: N {n} D {d} V {v}");
        assert!(
            (gl - cl).abs() <= 1e-5 * cl.abs().max(1e-3),
            "{ctx}: loss {gl} on the GPU, {cl} on the CPU"
        );
        assert!((ga - ca).abs() <= 1e-6, "{ctx}: accuracy {ga} vs {ca}");
        for ((name, g), c) in ["dhidden", "dweight", "dbias"].iter().zip(&gg).zip(&cg) {
            let err = rel_err(g, c);
            assert!(err <= 1e-4, "{ctx}: {name} relative error {err}");
        }
        println!("text head {ctx}: loss {gl} (CPU {cl}), accuracy {ga}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored on a GPU machine with cargo; m3ae doctor --device cuda checks the same without cargo)"]
fn text_head_loss_nan_and_ties_on_gpu() {
    let dev = fused::cuda::first_gpu().expect("this test needs a CUDA GPU");
    // ties: zero hidden, equal biases of words 3, 6 (one tile), 69 (next tile) and 4200 (another
    // chunk): word 3 is every row's arg-max
    let (n, d, v) = (4, 8, 4250);
    let h = Tensor::zeros((n, d), candle_core::DType::F32, &Device::Cpu).unwrap();
    let w = tensor(&[v, d], 1, 1.0);
    let mut bv = vec![0f32; v];
    for j in [3, 6, 69, 4200] {
        bv[j] = 2.0;
    }
    let b = Tensor::from_vec(bv, v, &Device::Cpu).unwrap();
    let t = [3u32, 69, 4200, 3];
    let (cl, ca, cg) = text_head_run((&h, &w, &b), &t, &[0.25; 4], &Device::Cpu);
    let (gl, ga, gg) = text_head_run((&h, &w, &b), &t, &[0.25; 4], &dev);
    assert_eq!((ga, ca), (0.5, 0.5), "ties go to the lowest word");
    assert!((gl - cl).abs() <= 1e-5 * cl.abs());
    for (g, c) in gg.iter().zip(&cg) {
        assert!(rel_err(g, c) <= 1e-4);
    }

    // a NaN row of weight 0 changes nothing; one that counts makes the loss and the weight
    // gradients NaN and is never correct
    let (n, d, v) = (6, 8, 300);
    let mut hv = values(n * d, 1);
    for x in &mut hv[2 * d..3 * d] {
        *x = f32::NAN;
    }
    let h = Tensor::from_vec(hv, (n, d), &Device::Cpu).unwrap();
    let w = tensor(&[v, d], 2, 0.5);
    let b = tensor(&[v], 3, 0.5);
    let t = head_targets(&h, &w, &b, 4);
    let mut rw = vec![0.2f32; n];
    rw[2] = 0.0;
    let (cl, ca, cg) = text_head_run((&h, &w, &b), &t, &rw, &Device::Cpu);
    let (gl, ga, gg) = text_head_run((&h, &w, &b), &t, &rw, &dev);
    assert!(
        (gl - cl).abs() <= 1e-5 * cl.abs() && ga == ca,
        "NaN row of weight 0"
    );
    for (g, c) in gg.iter().zip(&cg) {
        assert!(rel_err(g, c) <= 1e-4, "NaN row of weight 0");
    }
    rw[2] = 1.0;
    let (cl, ca, _) = text_head_run((&h, &w, &b), &t, &rw, &Device::Cpu);
    let (gl, ga, gg) = text_head_run((&h, &w, &b), &t, &rw, &dev);
    assert!(
        gl.is_nan() && cl.is_nan(),
        "a NaN row that counts: NaN loss"
    );
    assert_eq!(ga, ca, "a NaN row is never correct");
    let sum = |t: &Tensor| t.sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(sum(&gg[1]).is_nan() && sum(&gg[2]).is_nan());
}

/// Asserts the GPU's top-k `got` equals the CPU's `want`: values within rounding of the logits,
/// NaN where the CPU has NaN, and equal ids except between logits within rounding of each other
/// (the two devices sum the products in different orders); `exact` ids everywhere.
fn assert_top_k_close(got: &TextTopK, want: &TextTopK, exact: bool, ctx: &str) {
    assert_eq!(got.ids.len(), want.ids.len(), "{ctx}");
    for (r, (((gi, gv), wi), wv)) in got
        .ids
        .iter()
        .zip(&got.logits)
        .zip(&want.ids)
        .zip(&want.logits)
        .enumerate()
    {
        assert_eq!(gi.len(), wi.len(), "{ctx}: row {r}");
        for p in 0..gi.len() {
            let (a, b) = (gv[p], wv[p]);
            let tol = 1e-4 * b.abs().max(1.0);
            assert!(
                (a.is_nan() && b.is_nan()) || (a - b).abs() <= tol,
                "{ctx}: row {r} position {p}: logit {a} vs {b}"
            );
            if gi[p] != wi[p] {
                let near = |q: usize| q < wv.len() && (wv[q] - b).abs() <= tol;
                assert!(
                    !exact && ((p > 0 && near(p - 1)) || near(p + 1)),
                    "{ctx}: row {r} position {p}: word {} vs {}",
                    gi[p],
                    wi[p]
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored on a GPU machine with cargo; m3ae doctor --device cuda checks the same without cargo)"]
fn text_head_top_k_matches_the_cpu_op_on_gpu() {
    let dev = fused::cuda::first_gpu().expect("this test needs a CUDA GPU");
    let on = |t: &Tensor| t.to_device(&dev).unwrap();
    for (i, &(n, d, v)) in [
        (20usize, 24usize, 300usize),
        (70, 20, 5000),
        (7, 5, 3),
        (1, 16, 700),
        (512, 192, 30_522),
    ]
    .iter()
    .enumerate()
    {
        let seed = 300 + 10 * i as u64;
        let h = tensor(&[n, d], seed, 1.0);
        let w = tensor(&[v, d], seed + 1, 0.5);
        let b = tensor(&[v], seed + 2, 0.2);
        let mut shuffled: Vec<usize> = (0..n).rev().filter(|r| r % 3 != 1).collect();
        shuffled.push(0);
        shuffled.push(0);
        for rows in [(0..n).collect::<Vec<_>>(), shuffled, vec![n - 1], vec![]] {
            // k beyond V only for small V (the CPU's list insertion is quadratic in k)
            let ks = [
                1,
                5,
                fused::cuda::TOP_K_MAX,
                fused::cuda::TOP_K_MAX + 8,
                v + 2,
            ];
            for &k in ks.iter().filter(|&&k| k <= 1000) {
                let ctx = format!("N {n} D {d} V {v}, {} rows, k {k}", rows.len());
                let want = fused::text_head_top_k(&h, &w, Some(&b), &rows, k).unwrap();
                let got =
                    fused::text_head_top_k(&on(&h), &on(&w), Some(&on(&b)), &rows, k).unwrap();
                assert_top_k_close(&got, &want, false, &ctx);
            }
        }
        // no bias
        let rows: Vec<usize> = (0..n).collect();
        let want = fused::text_head_top_k(&h, &w, None, &rows, 3).unwrap();
        let got = fused::text_head_top_k(&on(&h), &on(&w), None, &rows, 3).unwrap();
        assert_top_k_close(&got, &want, false, &format!("N {n} D {d} V {v}, no bias"));
    }

    // exact ties (zero hidden rows: the logits are the biases) across tiles and chunks, and NaN
    // (a NaN row: NaN logits, lowest words first; a NaN word: after every number)
    let (n, d, v) = (6, 8, 5000);
    let mut hv = values(n * d, 1);
    for x in &mut hv[..2 * d] {
        *x = 0.0;
    }
    for x in &mut hv[3 * d..4 * d] {
        *x = f32::NAN;
    }
    let h = Tensor::from_vec(hv, (n, d), &Device::Cpu).unwrap();
    let mut wv = values(v * d, 2);
    wv[5 * d + 1] = f32::NAN;
    let w = Tensor::from_vec(wv, (v, d), &Device::Cpu).unwrap();
    let mut bv: Vec<f32> = values(v, 3).iter().map(|x| 0.1 * x).collect();
    for j in [10, 70, 200, 4900] {
        bv[j] = 50.0;
    }
    let b = Tensor::from_vec(bv, v, &Device::Cpu).unwrap();
    let rows = [0usize, 1, 3, 4, 1];
    let want = fused::text_head_top_k(&h, &w, Some(&b), &rows, 6).unwrap();
    let got = fused::text_head_top_k(&on(&h), &on(&w), Some(&on(&b)), &rows, 6).unwrap();
    assert_eq!(
        &got.ids[0][..4],
        &[10, 70, 200, 4900],
        "ties go to the lower word"
    );
    // the zero rows' logits are the biases on both devices, so their words agree exactly
    for r in [0, 1, 2, 4] {
        assert_eq!(got.ids[r], want.ids[r], "row {r}");
    }
    assert_eq!(got.ids[2], vec![0, 1, 2, 3, 4, 5], "a NaN row");
    assert!(!got.ids[3].contains(&5), "a NaN word never wins");
    assert_top_k_close(&got, &want, false, "ties and NaN");
}
