//! Dropout, drop path and attention dropout: the masks' statistics and determinism, the fused
//! attention kernel with dropout against the reference composition (values and gradients), and
//! independence from the thread count.

use candle_core::{DType, Device, Tensor, Var};
use m3ae_kernels::{drop_path, dropout, fused, reference, Dropout, KernelPath};

mod common;
use common::{
    assert_close, assert_same_for_any_thread_count, flat, padding, rel_err, tensor, Pad, ALL_PADS,
};

type AttnDropFn = fn(
    &Tensor,
    &Tensor,
    &Tensor,
    Option<&Tensor>,
    f64,
    Option<&Dropout>,
) -> m3ae_kernels::Result<Tensor>;

/// The output and the gradients of q, k, v of `sum(y * w)`.
fn attn_with_grads(
    f: AttnDropFn,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    pad: Option<&Tensor>,
    d: Option<&Dropout>,
    w: &Tensor,
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
        0.35,
        d,
    )
    .unwrap();
    let g = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
    let mut out = vec![y];
    out.extend(
        vars.iter()
            .map(|x| g.get(x.as_tensor()).expect("gradient").clone()),
    );
    out
}

#[test]
fn fused_attention_with_dropout_matches_the_reference() {
    // lengths below, at and above the 72-row query tile, none of them a multiple of it
    for (i, &(b, h, l, dh)) in [
        (2, 3, 70, 8),
        (1, 2, 1, 32),
        (2, 2, 130, 64),
        (1, 1, 65, 80),
        (3, 2, 17, 12),
        (2, 2, 150, 16),
    ]
    .iter()
    .enumerate()
    {
        for pad in ALL_PADS {
            for rate in [0.1, 0.5] {
                let seed = 40 * i as u64;
                let q = tensor(&[b, h, l, dh], seed, 1.0);
                let k = tensor(&[b, h, l, dh], seed + 1, 1.0);
                let v = tensor(&[b, h, l, dh], seed + 2, 1.0);
                let w = tensor(&[b, h, l, dh], seed + 3, 1.0);
                let p = padding(b, l, pad, seed + 4);
                let d = Dropout::new(rate, 1000 + seed).unwrap();
                let ins = (&q, &k, &v);
                let r = attn_with_grads(
                    reference::masked_attention_dropout,
                    ins,
                    p.as_ref(),
                    Some(&d),
                    &w,
                );
                let f = attn_with_grads(
                    fused::masked_attention_dropout,
                    ins,
                    p.as_ref(),
                    Some(&d),
                    &w,
                );
                let ctx = format!("b{b} h{h} l{l} dh{dh} {pad:?} rate {rate}");
                assert_close(&f, &r, &ctx);
                // dropout changed something (except where one key is all there is)
                if l > 1 {
                    let plain =
                        attn_with_grads(fused::masked_attention_dropout, ins, p.as_ref(), None, &w);
                    assert!(rel_err(&f[0], &plain[0]) > 1e-3, "{ctx}: no effect");
                }
            }
        }
    }
}

/// The packed qkv layout (what the model runs) against the reference on the split heads.
#[test]
fn fused_qkv_attention_with_dropout_matches_the_reference() {
    for (i, &(b, heads, l, dh)) in [(2, 3, 77, 8), (2, 2, 30, 16), (1, 4, 145, 8)]
        .iter()
        .enumerate()
    {
        for pad in [Pad::None, Pad::Random, Pad::Suffix, Pad::Full] {
            let seed = 500 + 10 * i as u64;
            let qkv = tensor(&[b, l, 3 * heads * dh], seed, 1.0);
            let w = tensor(&[b, l, heads * dh], seed + 1, 1.0);
            let p = padding(b, l, pad, seed + 2);
            let d = Dropout::new(0.3, seed).unwrap();
            let run = |path: KernelPath| {
                let x = Var::from_tensor(&qkv).unwrap();
                let y = path
                    .qkv_attention_dropout(x.as_tensor(), heads, p.as_ref(), 0.3, Some(&d))
                    .unwrap();
                let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                (y, g.get(x.as_tensor()).unwrap().clone())
            };
            let (yf, gf) = run(KernelPath::Fused);
            let (yr, gr) = run(KernelPath::Reference);
            let ctx = format!("b{b} heads{heads} l{l} dh{dh} {pad:?}");
            assert!(rel_err(&yf, &yr) <= 1e-5, "forward {ctx}");
            assert!(rel_err(&gf, &gr) <= 1e-4, "dqkv {ctx}");
        }
    }
}

#[test]
fn attention_dropout_is_a_function_of_the_key() {
    let (b, h, l, dh) = (2, 2, 40, 8);
    let q = tensor(&[b, h, l, dh], 1, 1.0);
    let k = tensor(&[b, h, l, dh], 2, 1.0);
    let v = tensor(&[b, h, l, dh], 3, 1.0);
    let p = padding(b, l, Pad::Random, 4);
    let run = |key: u64| {
        let d = Dropout::new(0.2, key).unwrap();
        flat(&fused::masked_attention_dropout(&q, &k, &v, p.as_ref(), 0.3, Some(&d)).unwrap())
    };
    assert_eq!(run(5), run(5));
    assert_ne!(run(5), run(6));
}

#[test]
fn dropout_results_do_not_depend_on_the_thread_count() {
    let (b, h, l, dh) = (3, 4, 150, 24);
    let q = tensor(&[b, h, l, dh], 1, 1.0);
    let k = tensor(&[b, h, l, dh], 2, 1.0);
    let v = tensor(&[b, h, l, dh], 3, 1.0);
    let w = tensor(&[b, h, l, dh], 4, 1.0);
    let p = padding(b, l, Pad::Random, 5);
    let d = Dropout::new(0.25, 77).unwrap();
    assert_same_for_any_thread_count("attention dropout", || {
        let g = attn_with_grads(
            fused::masked_attention_dropout,
            (&q, &k, &v),
            p.as_ref(),
            Some(&d),
            &w,
        );
        g.iter().map(flat).collect()
    });
    let x = Var::from_tensor(&tensor(&[7, 123, 517], 6, 1.0)).unwrap();
    let wx = tensor(&[7, 123, 517], 7, 1.0);
    assert_same_for_any_thread_count("dropout", || {
        let y = dropout(x.as_tensor(), Some(&d)).unwrap();
        let g = (&y * &wx).unwrap().sum_all().unwrap().backward().unwrap();
        vec![flat(&y), flat(g.get(x.as_tensor()).unwrap())]
    });
}

#[test]
fn dropout_keeps_about_one_minus_rate_scaled_and_its_gradient_is_the_mask() {
    let shape = [4, 50, 300];
    let x = Var::from_tensor(&tensor(&shape, 9, 1.0)).unwrap();
    for rate in [0.1, 0.5, 0.8] {
        let d = Dropout::new(rate, 3).unwrap();
        let y = dropout(x.as_tensor(), Some(&d)).unwrap();
        let (xs, ys) = (flat(x.as_tensor()), flat(&y));
        let scale = (1.0 / (1.0 - rate)) as f32;
        let mut kept = 0usize;
        for (&a, &b) in xs.iter().zip(&ys) {
            if b != 0.0 {
                kept += 1;
                assert_eq!(b, a * scale);
            }
        }
        let frac = kept as f64 / xs.len() as f64;
        assert!(
            (frac - (1.0 - rate)).abs() < 0.01,
            "rate {rate}: kept {frac}"
        );
        // the gradient of sum(y) is the mask itself, and the reference path is bit-identical
        let g = y.sum_all().unwrap().backward().unwrap();
        let mask = Tensor::from_vec(d.mask(200, 300), &shape, &Device::Cpu).unwrap();
        assert_eq!(flat(g.get(x.as_tensor()).unwrap()), flat(&mask));
        let r = KernelPath::Reference
            .dropout(x.as_tensor(), Some(&d))
            .unwrap();
        assert_eq!(flat(&r), ys);
        // same key, same mask; another key, another mask
        assert_eq!(flat(&dropout(x.as_tensor(), Some(&d)).unwrap()), ys);
        let other = Dropout::new(rate, 4).unwrap();
        assert_ne!(flat(&dropout(x.as_tensor(), Some(&other)).unwrap()), ys);
    }
    // no mask: the input itself (no op added)
    let y = dropout(x.as_tensor(), None).unwrap();
    assert_eq!(y.id(), x.as_tensor().id());
    // other dtypes are computed in f32 and converted back
    let xb = x.as_tensor().to_dtype(DType::BF16).unwrap();
    let d = Dropout::new(0.5, 3).unwrap();
    let yb = dropout(&xb, Some(&d)).unwrap();
    assert_eq!(yb.dtype(), DType::BF16);
    let want = KernelPath::Reference
        .dropout(&xb.to_dtype(DType::F32).unwrap(), Some(&d))
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    assert_eq!(
        flat(&yb.to_dtype(DType::F32).unwrap()),
        flat(&want.to_dtype(DType::F32).unwrap())
    );
}

#[test]
fn drop_path_zeroes_whole_samples_and_scales_the_others() {
    let (b, l, c) = (400, 5, 6);
    let x = Var::from_tensor(&tensor(&[b, l, c], 21, 1.0)).unwrap();
    let rate = 0.3;
    let d = Dropout::new(rate, 8).unwrap();
    let y = drop_path(x.as_tensor(), Some(&d)).unwrap();
    let scale = (1.0 / (1.0 - rate)) as f32;
    let (xs, ys) = (flat(x.as_tensor()), flat(&y));
    let mut kept = 0;
    for s in 0..b {
        let (xa, ya) = (&xs[s * l * c..][..l * c], &ys[s * l * c..][..l * c]);
        if ya.iter().all(|&v| v == 0.0) {
            assert!(!d.keeps(s as u64, 0));
        } else {
            assert!(d.keeps(s as u64, 0));
            kept += 1;
            for (&a, &v) in xa.iter().zip(ya) {
                assert_eq!(v, a * scale);
            }
        }
    }
    let frac = kept as f64 / b as f64;
    assert!((frac - 0.7).abs() < 0.08, "{frac}");
    // gradient: the per-sample factor
    let g = y.sum_all().unwrap().backward().unwrap();
    let gs = flat(g.get(x.as_tensor()).unwrap());
    for s in 0..b {
        let want = if d.keeps(s as u64, 0) { scale } else { 0.0 };
        assert!(gs[s * l * c..][..l * c].iter().all(|&v| v == want));
    }
    // identity without a mask
    assert_eq!(
        drop_path(x.as_tensor(), None).unwrap().id(),
        x.as_tensor().id()
    );
    assert_eq!(flat(&drop_path(x.as_tensor(), Some(&d)).unwrap()), ys);
    let other = Dropout::new(rate, 9).unwrap();
    assert_ne!(flat(&drop_path(x.as_tensor(), Some(&other)).unwrap()), ys);
}
