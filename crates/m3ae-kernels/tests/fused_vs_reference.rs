//! The fused kernels against the reference compositions: values and every gradient, on awkward
//! shapes and inputs, plus finite-difference checks of each fused backward.

use candle_core::{DType, Device, Tensor, Var};
use m3ae_kernels::{fused, reference};

mod common;
use common::{
    assert_close, assert_same_for_any_thread_count, flat, padding, rel_err, tensor, values, Pad,
    ALL_PADS,
};

type AttnFn = fn(&Tensor, &Tensor, &Tensor, Option<&Tensor>, f64) -> m3ae_kernels::Result<Tensor>;

/// An attention output and the gradients of q, k, v.
type Grads4 = [Tensor; 4];

/// Runs an attention implementation, returns the output and the gradients of `sum(y * w)`.
fn attn_with_grads(
    f: AttnFn,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pad: Option<&Tensor>,
    scale: f64,
    w: &Tensor,
) -> Grads4 {
    let (qv, kv, vv) = (
        Var::from_tensor(q).unwrap(),
        Var::from_tensor(k).unwrap(),
        Var::from_tensor(v).unwrap(),
    );
    let y = f(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), pad, scale).unwrap();
    let g = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
    let get = |x: &Var| g.get(x.as_tensor()).expect("gradient").clone();
    [y, get(&qv), get(&kv), get(&vv)]
}

fn check_attention(b: usize, h: usize, l: usize, dh: usize, pad: Pad, magnitude: f32, seed: u64) {
    let q = tensor(&[b, h, l, dh], seed, magnitude);
    let k = tensor(&[b, h, l, dh], seed + 1, magnitude);
    let v = tensor(&[b, h, l, dh], seed + 2, 1.0);
    let w = tensor(&[b, h, l, dh], seed + 3, 1.0);
    let p = padding(b, l, pad, seed + 4);
    let scale = 1.0 / (dh as f64).sqrt();
    let r = attn_with_grads(
        reference::masked_attention,
        &q,
        &k,
        &v,
        p.as_ref(),
        scale,
        &w,
    );
    let f = attn_with_grads(fused::masked_attention, &q, &k, &v, p.as_ref(), scale, &w);
    assert_close(
        &f,
        &r,
        &format!("b{b} h{h} l{l} dh{dh} {pad:?} x{magnitude}"),
    );
}

#[test]
fn attention_matches_reference_on_awkward_shapes() {
    for (i, &(b, h, l, dh)) in [
        (2, 3, 70, 8),
        (1, 2, 1, 32),
        (2, 2, 130, 64),
        (1, 1, 65, 80),
        (3, 2, 17, 32),
        (1, 2, 64, 16),
    ]
    .iter()
    .enumerate()
    {
        for pad in ALL_PADS {
            check_attention(b, h, l, dh, pad, 1.0, 10 * i as u64);
        }
    }
}

/// Gradients of `sum(y)` (an output gradient of ones; candle materialises it before the op's
/// backward, the strided and broadcast reads are tested inside the crate).
fn grads_of_sum(
    f: AttnFn,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pad: Option<&Tensor>,
) -> Vec<Tensor> {
    let vars: Vec<Var> = [q, k, v]
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let y = f(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
        pad,
        0.3,
    )
    .unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    vars.iter()
        .map(|x| g.get(x.as_tensor()).unwrap().clone())
        .collect()
}

#[test]
fn attention_backward_of_a_plain_sum_and_odd_head_widths() {
    for (i, &(b, h, l, dh)) in [(2, 3, 19, 12), (1, 2, 70, 5), (2, 2, 33, 8), (1, 1, 9, 1)]
        .iter()
        .enumerate()
    {
        for pad in [Pad::None, Pad::Random, Pad::Full] {
            let seed = 200 + 10 * i as u64;
            let q = tensor(&[b, h, l, dh], seed, 1.0);
            let k = tensor(&[b, h, l, dh], seed + 1, 1.0);
            let v = tensor(&[b, h, l, dh], seed + 2, 1.0);
            let p = padding(b, l, pad, seed + 3);
            let r = grads_of_sum(reference::masked_attention, &q, &k, &v, p.as_ref());
            let f = grads_of_sum(fused::masked_attention, &q, &k, &v, p.as_ref());
            for (name, a, e) in [
                ("dq", &f[0], &r[0]),
                ("dk", &f[1], &r[1]),
                ("dv", &f[2], &r[2]),
            ] {
                let err = rel_err(a, e);
                assert!(err <= 1e-4, "{name} b{b} h{h} l{l} dh{dh} {pad:?}: {err}");
            }
        }
    }
}

#[test]
fn attention_is_bit_identical_for_any_thread_count() {
    let (b, h, l, dh) = (3, 4, 150, 24);
    let q = tensor(&[b, h, l, dh], 1, 1.0);
    let k = tensor(&[b, h, l, dh], 2, 1.0);
    let v = tensor(&[b, h, l, dh], 3, 1.0);
    let w = tensor(&[b, h, l, dh], 4, 1.0);
    let p = padding(b, l, Pad::Random, 5);
    assert_same_for_any_thread_count("attention", || {
        let [y, dq, dk, dv] =
            attn_with_grads(fused::masked_attention, &q, &k, &v, p.as_ref(), 0.2, &w);
        [y, dq, dk, dv].iter().map(flat).collect()
    });
}

#[test]
fn layer_norm_and_gelu_are_bit_identical_for_any_thread_count() {
    // several row chunks of LayerNorm (dgamma / dbeta summed over them) and GELU chunks, with a
    // shorter last one
    let (rows, d) = (333, 40);
    let x = Var::from_tensor(&tensor(&[rows, d], 11, 2.0)).unwrap();
    let g = Var::from_tensor(&tensor(&[d], 12, 1.0)).unwrap();
    let b = Var::from_tensor(&tensor(&[d], 13, 1.0)).unwrap();
    let w = tensor(&[rows, d], 14, 1.0);
    assert_same_for_any_thread_count("layer_norm", || {
        let y = fused::layer_norm(&x, &g, &b, 1e-6).unwrap();
        let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let mut out = vec![flat(&y)];
        out.extend([&x, &g, &b].map(|v| flat(grads.get(v.as_tensor()).unwrap())));
        out
    });
    let h = Var::from_tensor(&tensor(&[rows * 250 + 7], 15, 3.0)).unwrap();
    let wh = tensor(&[rows * 250 + 7], 16, 1.0);
    assert_same_for_any_thread_count("gelu", || {
        let y = fused::gelu_tanh(&h).unwrap();
        let grads = (&y * &wh).unwrap().sum_all().unwrap().backward().unwrap();
        vec![flat(&y), flat(grads.get(h.as_tensor()).unwrap())]
    });
}

#[test]
fn attention_handles_large_scores() {
    // scores of order 1e3: any exp without max subtraction would overflow
    check_attention(2, 2, 33, 16, Pad::Random, 30.0, 99);
    let q = tensor(&[1, 1, 9, 8], 5, 300.0);
    let y = fused::masked_attention(&q, &q, &q, None, 1.0).unwrap();
    assert!(y
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|x| x.is_finite()));
}

#[test]
fn attention_accepts_non_contiguous_inputs() {
    // [B, L, H, Dh] transposed to [B, H, L, Dh]: strided views
    let mk = |s| tensor(&[2, 19, 3, 16], s, 1.0).transpose(1, 2).unwrap();
    let (q, k, v) = (mk(1), mk(2), mk(3));
    assert!(!q.is_contiguous());
    let p = padding(2, 19, Pad::Random, 4);
    let r = reference::masked_attention(&q, &k, &v, p.as_ref(), 0.25).unwrap();
    let f = fused::masked_attention(&q, &k, &v, p.as_ref(), 0.25).unwrap();
    assert!(rel_err(&f, &r) <= 1e-5);
}

/// The fused kernel leaves padding keys out of its products only where they cannot matter. Here
/// the rows of head 1 from 80 on (in the second query tile) score every real key at about
/// `-3e7`, far below the padding score `-1e7`, so those rows attend to the padding keys: the
/// whole head must run over all keys again, and match the reference.
#[test]
fn padding_keys_are_left_out_only_where_they_cannot_matter() {
    let (b, h, l, dh) = (2, 2, 100, 8);
    let big = 3.0e7f32;
    let small = common::values(2 * b * h * l, 7);
    let (mut q, mut k) = (vec![0f32; b * h * l * dh], vec![0f32; b * h * l * dh]);
    for bh in 0..b * h {
        for j in 0..l {
            let (r, i) = ((bh * l + j) * dh, bh * l + j);
            let sign = if bh % h == 1 && j >= 80 { -1.0 } else { 1.0 };
            // scores are +-3e7 plus an even integer in [-2, 2]: exact in f32 in any order
            q[r] = sign * big;
            q[r + 1] = small[i].round();
            k[r] = 1.0;
            k[r + 1] = 2.0 * small[b * h * l + i].round();
        }
    }
    let mk = |v: Vec<f32>| Tensor::from_vec(v, (b, h, l, dh), &Device::Cpu).unwrap();
    let (q, k) = (mk(q), mk(k));
    let v = tensor(&[b, h, l, dh], 3, 1.0);
    let w = tensor(&[b, h, l, dh], 4, 1.0);
    // sample 0: every third key is padding; sample 1: the last ten
    let pad: Vec<f32> = (0..b * l)
        .map(|i| {
            let (s, j) = (i / l, i % l);
            (if s == 0 { j % 3 == 0 } else { j >= 90 }) as u8 as f32
        })
        .collect();
    let pad = Tensor::from_vec(pad, (b, l), &Device::Cpu).unwrap();
    let r = attn_with_grads(reference::masked_attention, &q, &k, &v, Some(&pad), 1.0, &w);
    let f = attn_with_grads(fused::masked_attention, &q, &k, &v, Some(&pad), 1.0, &w);
    // the low rows really do attend to padding: their output is the mean of the padding values
    let padding_mean = v.narrow(2, 90, 10).unwrap().mean_keepdim(2).unwrap();
    let low = f[0]
        .narrow(2, 80, 20)
        .unwrap()
        .get(1)
        .unwrap()
        .get(1)
        .unwrap();
    let want = padding_mean.get(1).unwrap().get(1).unwrap();
    assert!(rel_err(&low, &want.broadcast_as((20, dh)).unwrap()) < 1e-6);
    assert_close(&f, &r, "padding test");
    // the padding keys' gradients are exactly zero in the heads that left them out (head 0 of
    // both samples); in head 1 the low rows attend to them
    let dk = f[2].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let dv = f[3].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let rows = |bh: usize, j: usize| (bh * l + j) * dh..(bh * l + j + 1) * dh;
    for (bh, j) in [(1, 0), (1, 3), (3, 90), (3, 99)] {
        assert!(dv[rows(bh, j)].iter().any(|&x| x != 0.0), "({bh}, {j})");
    }
    for (bh, j) in [(0, 0), (0, 3), (2, 95), (2, 99)] {
        let r = rows(bh, j);
        assert!(
            dk[r.clone()].iter().chain(&dv[r]).all(|&x| x == 0.0),
            "({bh}, {j})"
        );
    }
}

#[test]
fn fully_padded_rows_attend_uniformly() {
    common::assert_fully_padded_rows_attend_uniformly(&Device::Cpu);
}

/// Central finite differences (f64 accumulation of the f32 kernel) against the fused backward.
fn finite_difference_check(f: &dyn Fn(&[f32]) -> f64, x: &[f32], grad: &[f32], h: f32, tol: f64) {
    for i in 0..x.len() {
        let mut plus = x.to_vec();
        plus[i] += h;
        let mut minus = x.to_vec();
        minus[i] -= h;
        let fd = (f(&plus) - f(&minus)) / (2.0 * h as f64);
        assert!(
            (fd - grad[i] as f64).abs() <= tol * (1.0 + fd.abs()),
            "element {i}: fd {fd} vs analytic {}",
            grad[i]
        );
    }
}

fn sum_weighted(y: &Tensor, w: &Tensor) -> f64 {
    (y.to_dtype(DType::F64).unwrap() * w.to_dtype(DType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn attention_backward_matches_finite_differences() {
    let shape = [1usize, 2, 5, 4];
    let (k, v, w) = (
        tensor(&shape, 2, 1.0),
        tensor(&shape, 3, 1.0),
        tensor(&shape, 4, 1.0),
    );
    let pad = Tensor::new(&[[0f32, 0., 1., 0., 0.]], &Device::Cpu).unwrap();
    let q0 = values(40, 1);
    let eval = |qv: &[f32]| {
        let q = Tensor::from_vec(qv.to_vec(), &shape, &Device::Cpu).unwrap();
        sum_weighted(
            &fused::masked_attention(&q, &k, &v, Some(&pad), 0.5).unwrap(),
            &w,
        )
    };
    let q = Var::from_tensor(&Tensor::from_vec(q0.clone(), &shape, &Device::Cpu).unwrap()).unwrap();
    let y = fused::masked_attention(q.as_tensor(), &k, &v, Some(&pad), 0.5).unwrap();
    let g = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gq = g
        .get(q.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    finite_difference_check(&eval, &q0, &gq, 1e-2, 2e-3);
    // dk through the same harness
    let k0 = k.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let qt = q.as_tensor().clone();
    let eval_k = |kv: &[f32]| {
        let k = Tensor::from_vec(kv.to_vec(), &shape, &Device::Cpu).unwrap();
        sum_weighted(
            &fused::masked_attention(&qt, &k, &v, Some(&pad), 0.5).unwrap(),
            &w,
        )
    };
    let kvar = Var::from_tensor(&k).unwrap();
    let y = fused::masked_attention(&qt, kvar.as_tensor(), &v, Some(&pad), 0.5).unwrap();
    let g = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gk = g
        .get(kvar.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    finite_difference_check(&eval_k, &k0, &gk, 1e-2, 2e-3);
}

fn ln_grads(fused_path: bool, x: &Tensor, g: &Tensor, b: &Tensor, w: &Tensor) -> Vec<Tensor> {
    let (xv, gv, bv) = (
        Var::from_tensor(x).unwrap(),
        Var::from_tensor(g).unwrap(),
        Var::from_tensor(b).unwrap(),
    );
    let y = if fused_path {
        fused::layer_norm(xv.as_tensor(), gv.as_tensor(), bv.as_tensor(), 1e-6).unwrap()
    } else {
        reference::layer_norm(xv.as_tensor(), gv.as_tensor(), bv.as_tensor(), 1e-6).unwrap()
    };
    let grads = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
    vec![
        y,
        grads.get(xv.as_tensor()).unwrap().clone(),
        grads.get(gv.as_tensor()).unwrap().clone(),
        grads.get(bv.as_tensor()).unwrap().clone(),
    ]
}

#[test]
fn layer_norm_matches_reference() {
    for (i, shape) in [
        vec![5, 7, 384],
        vec![3, 768],
        vec![4, 33],
        vec![1, 1, 8],
        vec![70, 5],
    ]
    .into_iter()
    .enumerate()
    {
        for offset in [0.0f32, 1000.0] {
            let d = *shape.last().unwrap();
            let x = (tensor(&shape, i as u64, 3.0) + offset as f64).unwrap();
            let g = tensor(&[d], 50 + i as u64, 1.0);
            let b = tensor(&[d], 60 + i as u64, 1.0);
            let w = tensor(&shape, 70 + i as u64, 1.0);
            let r = ln_grads(false, &x, &g, &b, &w);
            let f = ln_grads(true, &x, &g, &b, &w);
            // with an offset of 1000, f32 loses digits in x itself: both paths see the same loss
            let (tf, tb) = if offset == 0.0 {
                (1e-5, 1e-4)
            } else {
                (1e-3, 1e-2)
            };
            assert!(
                rel_err(&f[0], &r[0]) <= tf,
                "forward {shape:?}: {}",
                rel_err(&f[0], &r[0])
            );
            for (n, j) in [("dx", 1), ("dgamma", 2), ("dbeta", 3)] {
                assert!(
                    rel_err(&f[j], &r[j]) <= tb,
                    "{n} {shape:?} +{offset}: {}",
                    rel_err(&f[j], &r[j])
                );
            }
        }
    }
    // non-contiguous input
    let x = tensor(&[16, 12], 3, 1.0).t().unwrap();
    let (g, b) = (tensor(&[16], 4, 1.0), tensor(&[16], 5, 1.0));
    let r = reference::layer_norm(&x, &g, &b, 1e-6).unwrap();
    let f = fused::layer_norm(&x, &g, &b, 1e-6).unwrap();
    assert!(rel_err(&f, &r) <= 1e-5);
}

#[test]
fn layer_norm_backward_matches_finite_differences() {
    let shape = [3usize, 6];
    let (g, b, w) = (
        tensor(&[6], 1, 1.0),
        tensor(&[6], 2, 1.0),
        tensor(&shape, 3, 1.0),
    );
    let x0 = values(18, 4);
    let eval = |xv: &[f32]| {
        let x = Tensor::from_vec(xv.to_vec(), &shape, &Device::Cpu).unwrap();
        sum_weighted(&fused::layer_norm(&x, &g, &b, 1e-6).unwrap(), &w)
    };
    let x = Tensor::from_vec(x0.clone(), &shape, &Device::Cpu).unwrap();
    let grads = ln_grads(true, &x, &g, &b, &w);
    let gx = grads[1].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    finite_difference_check(&eval, &x0, &gx, 1e-2, 3e-3);
    let g0 = g.to_vec1::<f32>().unwrap();
    let eval_g = |gv: &[f32]| {
        let g = Tensor::from_vec(gv.to_vec(), 6, &Device::Cpu).unwrap();
        sum_weighted(&fused::layer_norm(&x, &g, &b, 1e-6).unwrap(), &w)
    };
    let gg = grads[2].to_vec1::<f32>().unwrap();
    finite_difference_check(&eval_g, &g0, &gg, 1e-2, 3e-3);
}

#[test]
fn gelu_matches_reference_and_finite_differences() {
    for (shape, magnitude) in [(vec![1000], 10.0f32), (vec![7, 33], 3.0), (vec![5], 60.0)] {
        let x = tensor(&shape, 8, magnitude);
        let w = tensor(&shape, 9, 1.0);
        let run = |fused_path: bool| {
            let xv = Var::from_tensor(&x).unwrap();
            let y = if fused_path {
                fused::gelu_tanh(xv.as_tensor())
            } else {
                reference::gelu_tanh(xv.as_tensor())
            }
            .unwrap();
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g.get(xv.as_tensor()).unwrap().clone())
        };
        let (yr, gr) = run(false);
        let (yf, gf) = run(true);
        assert!(
            rel_err(&yf, &yr) <= 1e-5,
            "{shape:?}: {}",
            rel_err(&yf, &yr)
        );
        assert!(
            rel_err(&gf, &gr) <= 1e-4,
            "{shape:?}: {}",
            rel_err(&gf, &gr)
        );
    }
    let x0 = values(12, 3)
        .into_iter()
        .map(|v| v * 4.0)
        .collect::<Vec<_>>();
    let eval = |xv: &[f32]| {
        let x = Tensor::from_vec(xv.to_vec(), 12, &Device::Cpu).unwrap();
        fused::gelu_tanh(&x)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let xv = Var::from_tensor(&Tensor::from_vec(x0.clone(), 12, &Device::Cpu).unwrap()).unwrap();
    let g = fused::gelu_tanh(xv.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gx = g.get(xv.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    finite_difference_check(&eval, &x0, &gx, 1e-2, 2e-3);
    // non-contiguous
    let x = tensor(&[9, 4], 1, 2.0).t().unwrap();
    assert!(
        rel_err(
            &fused::gelu_tanh(&x).unwrap(),
            &reference::gelu_tanh(&x).unwrap()
        ) <= 1e-5
    );
}

#[test]
fn linear_matches_reference_and_finite_differences() {
    for (i, (xs, out)) in [
        (vec![7usize, 5, 48], 36usize),
        (vec![300, 64], 192),
        (vec![1, 3], 1),
        (vec![2, 9, 33], 17),
    ]
    .into_iter()
    .enumerate()
    {
        let inp = *xs.last().unwrap();
        let x = tensor(&xs, 1 + i as u64, 1.0);
        let w = tensor(&[out, inp], 2 + i as u64, 0.3);
        let b = tensor(&[out], 3 + i as u64, 1.0);
        let mut ys = xs.clone();
        *ys.last_mut().unwrap() = out;
        let g = tensor(&ys, 4 + i as u64, 1.0);
        let run = |fused_path: bool| {
            let (xv, wv, bv) = (
                Var::from_tensor(&x).unwrap(),
                Var::from_tensor(&w).unwrap(),
                Var::from_tensor(&b).unwrap(),
            );
            let y = if fused_path {
                fused::linear(xv.as_tensor(), wv.as_tensor(), bv.as_tensor())
            } else {
                reference::linear(xv.as_tensor(), wv.as_tensor(), bv.as_tensor())
            }
            .unwrap();
            let gr = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let get = |v: &Var| gr.get(v.as_tensor()).unwrap().clone();
            (y, get(&xv), get(&wv), get(&bv))
        };
        let (r, f) = (run(false), run(true));
        assert!(rel_err(&f.0, &r.0) <= 1e-5, "y {xs:?}");
        assert!(rel_err(&f.1, &r.1) <= 1e-4, "dx {xs:?}");
        assert!(rel_err(&f.2, &r.2) <= 1e-4, "dw {xs:?}");
        assert!(rel_err(&f.3, &r.3) <= 1e-4, "db {xs:?}");
    }
    // finite differences on the weight
    let x = tensor(&[4, 3], 1, 1.0);
    let b = tensor(&[2], 2, 1.0);
    let wt = tensor(&[2, 3], 3, 1.0);
    let w0 = wt.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let eval = |wv: &[f32]| {
        let w = Tensor::from_vec(wv.to_vec(), (2, 3), &Device::Cpu).unwrap();
        fused::linear(&x, &w, &b)
            .unwrap()
            .sqr()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let wv = Var::from_tensor(&wt).unwrap();
    let gr = fused::linear(&x, wv.as_tensor(), &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gw = gr
        .get(wv.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    finite_difference_check(&eval, &w0, &gw, 1e-2, 2e-3);
    // non-contiguous input
    let xt = tensor(&[16, 5], 9, 1.0).t().unwrap();
    let w = tensor(&[4, 16], 8, 1.0);
    let b = tensor(&[4], 7, 1.0);
    assert!(
        rel_err(
            &fused::linear(&xt, &w, &b).unwrap(),
            &reference::linear(&xt, &w, &b).unwrap()
        ) <= 1e-5
    );
}

/// The dense layer with bf16 products against f32 products of the bf16-rounded operands:
/// `y = r(x) r(W)^T + b`, `dx = r(dy) r(W)`, `dW = r(dy)^T r(x)`, `db = colsum(dy)`.
#[test]
fn bf16_linear_is_the_f32_product_of_rounded_operands() {
    let r = |t: &Tensor| {
        let v: Vec<f32> = flat(t).iter().map(|&x| fused::bf16::round(x)).collect();
        Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
    };
    for (i, (rows, inp, out)) in [(7usize, 48usize, 36usize), (300, 64, 192), (1, 3, 1)]
        .into_iter()
        .enumerate()
    {
        let x = tensor(&[rows, inp], 11 + i as u64, 1.0);
        let w = tensor(&[out, inp], 12 + i as u64, 0.3);
        let b = tensor(&[out], 13 + i as u64, 1.0);
        let g = tensor(&[rows, out], 14 + i as u64, 1.0);
        let (xv, wv, bv) = (
            Var::from_tensor(&x).unwrap(),
            Var::from_tensor(&w).unwrap(),
            Var::from_tensor(&b).unwrap(),
        );
        let y = fused::linear_with(xv.as_tensor(), wv.as_tensor(), bv.as_tensor(), DType::BF16)
            .unwrap();
        let gr = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let get = |v: &Var| gr.get(v.as_tensor()).unwrap().clone();
        let want_y = reference::linear(&r(&x), &r(&w), &b).unwrap();
        let want_dx = r(&g).matmul(&r(&w)).unwrap();
        let want_dw = r(&g).t().unwrap().matmul(&r(&x)).unwrap();
        let want_db = g.sum(0).unwrap();
        let ctx = format!("{rows}x{inp}->{out}");
        assert!(rel_err(&y, &want_y) <= 1e-6, "y {ctx}");
        assert!(rel_err(&get(&xv), &want_dx) <= 1e-6, "dx {ctx}");
        assert!(rel_err(&get(&wv), &want_dw) <= 1e-6, "dw {ctx}");
        assert!(rel_err(&get(&bv), &want_db) <= 1e-6, "db {ctx}");
        // and it is not the f32 layer
        if inp > 3 {
            assert!(
                rel_err(&y, &fused::linear(&x, &w, &b).unwrap()) > 1e-4,
                "{ctx}"
            );
        }
    }
}

#[test]
fn packed_qkv_attention_matches_reference() {
    for (i, &(b, l, heads, dh)) in [
        (2usize, 70usize, 3usize, 8usize),
        (1, 1, 2, 32),
        (3, 17, 4, 16),
        (2, 66, 2, 64),
        (2, 21, 3, 12),
    ]
    .iter()
    .enumerate()
    {
        for pad in ALL_PADS {
            let qkv = tensor(&[b, l, 3 * heads * dh], 40 + i as u64, 1.0);
            let w = tensor(&[b, l, heads * dh], 50 + i as u64, 1.0);
            let p = padding(b, l, pad, 60 + i as u64);
            let scale = 1.0 / (dh as f64).sqrt();
            let run = |fused_path: bool| {
                let x = Var::from_tensor(&qkv).unwrap();
                let y = if fused_path {
                    fused::qkv_attention(x.as_tensor(), heads, p.as_ref(), scale)
                } else {
                    reference::qkv_attention(x.as_tensor(), heads, p.as_ref(), scale)
                }
                .unwrap();
                let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                (y, g.get(x.as_tensor()).unwrap().clone())
            };
            let (r, f) = (run(false), run(true));
            assert!(
                rel_err(&f.0, &r.0) <= 1e-5,
                "forward b{b} l{l} h{heads} dh{dh} {pad:?}: {}",
                rel_err(&f.0, &r.0)
            );
            assert!(
                rel_err(&f.1, &r.1) <= 1e-4,
                "dqkv b{b} l{l} h{heads} dh{dh} {pad:?}: {}",
                rel_err(&f.1, &r.1)
            );
        }
    }
}
