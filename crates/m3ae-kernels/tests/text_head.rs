//! The fused text-head loss against the reference composition (logits, log-softmax, gather):
//! loss, accuracy and the gradients of hidden, weight and bias, on the weightings M3AE uses
//! (masked-only, all tokens, padding), zero-weight rows, vocabularies that are not a multiple of
//! the tile, very large logits, NaN rows, argmax ties, thread counts and finite differences.

use candle_core::{DType, Device, Tensor, Var};
use m3ae_kernels::{fused, reference};

mod common;
use common::{rel_err, tensor, values};

type HeadFn =
    fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor) -> m3ae_kernels::Result<(Tensor, Tensor)>;

/// loss, accuracy, dHidden, dWeight, dBias.
struct Run {
    loss: f32,
    acc: f32,
    dh: Tensor,
    dw: Tensor,
    db: Tensor,
}

fn run(f: HeadFn, h: &Tensor, w: &Tensor, b: &Tensor, t: &[u32], rw: &[f32]) -> Run {
    let dev = Device::Cpu;
    let (hv, wv, bv) = (
        Var::from_tensor(h).unwrap(),
        Var::from_tensor(w).unwrap(),
        Var::from_tensor(b).unwrap(),
    );
    let tt = Tensor::new(t, &dev).unwrap();
    let rwt = Tensor::new(rw, &dev).unwrap();
    let (loss, acc) = f(hv.as_tensor(), wv.as_tensor(), bv.as_tensor(), &tt, &rwt).unwrap();
    assert!(loss.dims().is_empty() && acc.dims().is_empty());
    // scale the loss so the incoming gradient is not 1
    let g = (&loss * 1.5).unwrap().backward().unwrap();
    let get = |x: &Var| {
        g.get(x.as_tensor())
            .expect("every input gets a gradient")
            .clone()
    };
    Run {
        loss: loss.to_scalar::<f32>().unwrap(),
        acc: acc.to_scalar::<f32>().unwrap(),
        dh: get(&hv),
        dw: get(&wv),
        db: get(&bv),
    }
}

/// Per-row weights the way M3AE's loss builds them: per sample `valid / max(sum(valid), 1e-5)`,
/// divided by the batch size. `valid` is `[B * T]` 0/1.
fn sample_weights(valid: &[f32], t: usize) -> Vec<f32> {
    let b = valid.len() / t;
    valid
        .chunks(t)
        .flat_map(|row| {
            let c = row.iter().sum::<f32>().max(1e-5);
            row.iter().map(move |&v| v / c / b as f32)
        })
        .collect()
}

/// Valid positions of `b` samples of `t` tokens: sample `s` has `s % (t / 2)` padding tokens at
/// its end; `masked_only` keeps only the positions `i % 4 != 0` (75% masked).
fn valid(b: usize, t: usize, masked_only: bool) -> Vec<f32> {
    (0..b * t)
        .map(|j| {
            let (s, i) = (j / t, j % t);
            let pad = i >= t - s % (t / 2).max(1);
            let sel = !masked_only || i % 4 != 0;
            (sel && !pad) as u8 as f32
        })
        .collect()
}

fn targets(n: usize, v: usize, seed: u64) -> Vec<u32> {
    values(n, seed)
        .iter()
        .map(|x| (((x + 1.0) * 0.5 * v as f32) as usize).min(v - 1) as u32)
        .collect()
}

fn assert_close(f: &Run, r: &Run, loss_tol: f32, grad_tol: f32, ctx: &str) {
    assert!(
        (f.loss - r.loss).abs() <= loss_tol * r.loss.abs().max(1e-3),
        "loss {ctx}: fused {} reference {}",
        f.loss,
        r.loss
    );
    assert!(
        (f.acc - r.acc).abs() <= 1e-6,
        "accuracy {ctx}: fused {} reference {}",
        f.acc,
        r.acc
    );
    for (name, a, e) in [
        ("dh", &f.dh, &r.dh),
        ("dw", &f.dw, &r.dw),
        ("db", &f.db, &r.db),
    ] {
        assert_eq!(a.dims(), e.dims(), "{name} {ctx}");
        let err = rel_err(a, e);
        assert!(err <= grad_tol, "{name} {ctx}: {err}");
    }
}

#[test]
fn text_head_loss_matches_reference_on_m3ae_weightings() {
    // (batch, text length, D, V): V below, at and above the tile, not multiples of it; more
    // rows than one row tile.
    for (i, &(b, t, d, v)) in [
        (2, 8, 16, 5),
        (3, 16, 24, 300),
        (4, 16, 32, 517),
        (20, 20, 16, 1000),
    ]
    .iter()
    .enumerate()
    {
        let n = b * t;
        let seed = 10 * i as u64;
        let h = tensor(&[n, d], seed, 1.0);
        let w = tensor(&[v, d], seed + 1, 0.5);
        let bias = tensor(&[v], seed + 2, 0.5);
        let tg = targets(n, v, seed + 3);
        for masked_only in [true, false] {
            let rw = sample_weights(&valid(b, t, masked_only), t);
            let ctx = format!("b{b} t{t} d{d} v{v} masked_only {masked_only}");
            let r = run(reference::text_head_loss, &h, &w, &bias, &tg, &rw);
            let f = run(fused::text_head_loss, &h, &w, &bias, &tg, &rw);
            assert_close(&f, &r, 1e-5, 1e-4, &ctx);
        }
    }
}

#[test]
fn text_head_accuracy_counts_argmax_hits() {
    // the logits of row i are one-hot at word i % 7
    let (n, d, v) = (14, 7, 7);
    let h: Vec<f32> = (0..n * d)
        .map(|j| (j % d == (j / d) % 7) as u8 as f32)
        .collect();
    let h = Tensor::from_vec(h, (n, d), &Device::Cpu).unwrap();
    let w = Tensor::eye(7, DType::F32, &Device::Cpu).unwrap();
    let bias = Tensor::zeros(v, DType::F32, &Device::Cpu).unwrap();
    // rows 0..7 hit; of the others (target 0) only row 7
    let tg: Vec<u32> = (0..n as u32).map(|i| if i < 7 { i } else { 0 }).collect();
    let rw = vec![1.0f32; n];
    let f = run(fused::text_head_loss, &h, &w, &bias, &tg, &rw);
    let r = run(reference::text_head_loss, &h, &w, &bias, &tg, &rw);
    assert_eq!(f.acc, 8.0);
    assert_close(&f, &r, 1e-5, 1e-4, "argmax hits");
}

#[test]
fn text_head_argmax_ties_go_to_the_smallest_index() {
    // every logit equal (zero hidden): argmax is word 0 in both paths, across vocabulary tiles
    let (n, d, v) = (4, 8, 700);
    let h = Tensor::zeros((n, d), DType::F32, &Device::Cpu).unwrap();
    let w = tensor(&[v, d], 1, 1.0);
    // ties between word 3 and word 600 (second tile / task), larger than every other bias
    let mut bv = vec![0f32; v];
    bv[3] = 2.0;
    bv[600] = 2.0;
    let bias = Tensor::from_vec(bv, v, &Device::Cpu).unwrap();
    let tg = vec![3u32, 600, 0, 3];
    let rw = vec![0.25f32; n];
    let f = run(fused::text_head_loss, &h, &w, &bias, &tg, &rw);
    let r = run(reference::text_head_loss, &h, &w, &bias, &tg, &rw);
    assert_eq!(f.acc, 0.5);
    assert_close(&f, &r, 1e-5, 1e-4, "ties");
}

#[test]
fn text_head_rows_of_weight_zero_are_skipped_and_get_zero_gradients() {
    let (n, d, v) = (12, 16, 300);
    let h = tensor(&[n, d], 1, 1.0);
    let w = tensor(&[v, d], 2, 0.5);
    let bias = tensor(&[v], 3, 0.5);
    let tg = targets(n, v, 4);
    let rw: Vec<f32> = (0..n).map(|i| if i % 3 == 0 { 0.0 } else { 0.1 }).collect();
    let f = run(fused::text_head_loss, &h, &w, &bias, &tg, &rw);
    let r = run(reference::text_head_loss, &h, &w, &bias, &tg, &rw);
    assert_close(&f, &r, 1e-5, 1e-4, "some rows of weight 0");
    let dh = f.dh.to_vec2::<f32>().unwrap();
    for (i, row) in dh.iter().enumerate() {
        assert_eq!(row.iter().all(|&x| x == 0.0), i % 3 == 0, "row {i}");
    }

    // all rows of weight 0: zero loss, zero accuracy and zero (not missing) gradients
    let rw = vec![0f32; n];
    let f = run(fused::text_head_loss, &h, &w, &bias, &tg, &rw);
    let r = run(reference::text_head_loss, &h, &w, &bias, &tg, &rw);
    assert_eq!((f.loss, f.acc), (0.0, 0.0));
    assert_close(&f, &r, 1e-5, 1e-4, "all rows of weight 0");
    for g in [&f.dh, &f.dw, &f.db] {
        let m = g
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(m, 0.0);
    }
}

#[test]
fn text_head_handles_very_large_logits() {
    // logits of order 1e4: exp would overflow without the running maximum
    let (n, d, v) = (10, 16, 600);
    let h = tensor(&[n, d], 1, 30.0);
    let w = tensor(&[v, d], 2, 30.0);
    let bias = tensor(&[v], 3, 1e3);
    let tg = targets(n, v, 4);
    let rw = vec![0.1f32; n];
    let f = run(fused::text_head_loss, &h, &w, &bias, &tg, &rw);
    let r = run(reference::text_head_loss, &h, &w, &bias, &tg, &rw);
    assert!(f.loss.is_finite() && f.loss > 100.0, "loss {}", f.loss);
    // the f32 logits themselves carry an absolute error of about 1e-3 at this scale
    assert_close(&f, &r, 1e-5, 1e-4, "logits x1e4");
}

#[test]
fn text_head_nan_rows() {
    let (n, d, v) = (6, 8, 300);
    let mut hv = values(n * d, 1);
    for x in &mut hv[2 * d..3 * d] {
        *x = f32::NAN;
    }
    let h = Tensor::from_vec(hv.clone(), (n, d), &Device::Cpu).unwrap();
    let w = tensor(&[v, d], 2, 0.5);
    let bias = tensor(&[v], 3, 0.5);
    let mut tg = targets(n, v, 4);
    tg[2] = 0;
    // a NaN row of weight 0 does not touch the fused loss (the reference, which multiplies
    // every row, would be NaN): compare with the reference on a finite copy
    let mut rw = vec![0.2f32; n];
    rw[2] = 0.0;
    let f = run(fused::text_head_loss, &h, &w, &bias, &tg, &rw);
    for x in &mut hv[2 * d..3 * d] {
        *x = 0.0;
    }
    let clean = Tensor::from_vec(hv, (n, d), &Device::Cpu).unwrap();
    let r = run(reference::text_head_loss, &clean, &w, &bias, &tg, &rw);
    assert_close(&f, &r, 1e-5, 1e-4, "NaN row of weight 0");

    // a NaN row that counts: NaN loss and gradients, and it is never a correct prediction
    let mut rw = vec![0f32; n];
    rw[2] = 1.0;
    let f = run(fused::text_head_loss, &h, &w, &bias, &tg, &rw);
    assert!(f.loss.is_nan());
    assert_eq!(f.acc, 0.0);
    assert!(f.dw.sum_all().unwrap().to_scalar::<f32>().unwrap().is_nan());
    // a NaN in one word's weight row makes every counted row NaN, none correct
    let mut wv = values(v * d, 2);
    wv[5 * d] = f32::NAN;
    let wn = Tensor::from_vec(wv, (v, d), &Device::Cpu).unwrap();
    let h = tensor(&[n, d], 1, 1.0);
    let f = run(fused::text_head_loss, &h, &wn, &bias, &tg, &vec![1.0; n]);
    assert!(f.loss.is_nan());
    assert_eq!(f.acc, 0.0);
}

#[test]
fn text_head_rejects_bad_inputs() {
    let dev = Device::Cpu;
    let h = tensor(&[3, 4], 1, 1.0);
    let w = tensor(&[5, 4], 2, 1.0);
    let b = tensor(&[5], 3, 1.0);
    let t = Tensor::new(&[0u32, 1, 2], &dev).unwrap();
    let rw = Tensor::new(&[1f32, 1., 1.], &dev).unwrap();
    for f in [fused::text_head_loss as HeadFn, reference::text_head_loss] {
        assert!(f(&h, &tensor(&[5, 3], 2, 1.0), &b, &t, &rw).is_err());
        assert!(f(&h, &w, &tensor(&[4], 3, 1.0), &t, &rw).is_err());
        assert!(f(&h, &w, &b, &Tensor::new(&[0u32, 1], &dev).unwrap(), &rw).is_err());
        assert!(f(&h, &w, &b, &Tensor::new(&[0u32, 1, 5], &dev).unwrap(), &rw).is_err());
    }
}

#[test]
fn text_head_is_bit_identical_for_any_thread_count() {
    let (n, d, v) = (300, 16, 2000);
    let h = tensor(&[n, d], 1, 1.0);
    let w = tensor(&[v, d], 2, 0.5);
    let bias = tensor(&[v], 3, 0.5);
    let tg = targets(n, v, 4);
    let rw = sample_weights(&valid(10, 30, true), 30);
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let go = || {
        let r = run(fused::text_head_loss, &h, &w, &bias, &tg, &rw);
        vec![vec![r.loss, r.acc], flat(&r.dh), flat(&r.dw), flat(&r.db)]
    };
    let in_pool = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(go)
    };
    let one = in_pool(1);
    let candle_pool = candle_core::utils::barrier_pool().n_workers() + 1;
    for threads in [2, 3, candle_pool] {
        assert!(one == in_pool(threads), "{threads} threads");
    }
}

#[test]
fn text_head_backward_matches_finite_differences() {
    let (n, d, v) = (3, 4, 5);
    let (hv, wv, bv) = (values(n * d, 1), values(v * d, 2), values(v, 3));
    let tg = vec![1u32, 4, 0];
    let rw = vec![0.5f32, 0.0, 0.25];
    let dev = Device::Cpu;
    let tt = Tensor::new(&tg[..], &dev).unwrap();
    let rwt = Tensor::new(&rw[..], &dev).unwrap();
    let loss = |h: &[f32], w: &[f32], b: &[f32]| -> f64 {
        let (l, _) = fused::text_head_loss(
            &Tensor::from_slice(h, (n, d), &dev).unwrap(),
            &Tensor::from_slice(w, (v, d), &dev).unwrap(),
            &Tensor::from_slice(b, v, &dev).unwrap(),
            &tt,
            &rwt,
        )
        .unwrap();
        l.to_scalar::<f32>().unwrap() as f64
    };
    let g = run(
        fused::text_head_loss,
        &Tensor::from_slice(&hv, (n, d), &dev).unwrap(),
        &Tensor::from_slice(&wv, (v, d), &dev).unwrap(),
        &Tensor::from_slice(&bv, v, &dev).unwrap(),
        &tg,
        &rw,
    );
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (eps, tol) = (1e-2f32, 2e-3f64);
    let check = |name: &str, x: &[f32], grad: &[f32], f: &dyn Fn(&[f32]) -> f64| {
        for i in 0..x.len() {
            let (mut plus, mut minus) = (x.to_vec(), x.to_vec());
            plus[i] += eps;
            minus[i] -= eps;
            let fd = (f(&plus) - f(&minus)) / (2.0 * eps as f64);
            // the run's loss was scaled by 1.5 before the backward
            let an = grad[i] as f64 / 1.5;
            assert!(
                (fd - an).abs() <= tol * (1.0 + fd.abs()),
                "{name}[{i}]: fd {fd} vs analytic {an}"
            );
        }
    };
    check("hidden", &hv, &flat(&g.dh), &|x| loss(x, &wv, &bv));
    check("weight", &wv, &flat(&g.dw), &|x| loss(&hv, x, &bv));
    check("bias", &bv, &flat(&g.db), &|x| loss(&hv, &wv, x));
}
