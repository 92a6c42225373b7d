//! Inputs and comparisons shared by the kernel integration tests (CPU and CUDA).
#![allow(dead_code)] // each test binary uses a subset

use candle_core::{Device, Tensor};
use m3ae_kernels::testing::uniform;

/// Deterministic pseudo-random values in [-1, 1): [`uniform`] from `seed` without its first
/// value (the inputs these tests have always had).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    uniform(seed, n + 1).split_off(1)
}

pub fn tensor(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f32> = values(n, seed).into_iter().map(|x| x * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `max|a - b| / max|b|` (0 when both are 0), with `a` moved to `b`'s device first.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let a = &a.to_device(b.device()).unwrap();
    assert_eq!(a.dims(), b.dims());
    let max_abs = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (d, m) = (max_abs(&(a - b).unwrap()), max_abs(b));
    if m == 0.0 {
        d
    } else {
        d / m
    }
}

/// A query row whose keys are all padding attends uniformly: the fused output on `dev` equals
/// the mean of the values.
pub fn assert_fully_padded_rows_attend_uniformly(dev: &Device) {
    let on = |t: Tensor| t.to_device(dev).unwrap();
    let v = tensor(&[1, 1, 4, 8], 3, 1.0);
    let (q, k) = (
        on(tensor(&[1, 1, 4, 8], 1, 1.0)),
        on(tensor(&[1, 1, 4, 8], 2, 1.0)),
    );
    let pad = Tensor::ones((1, 4), candle_core::DType::F32, dev).unwrap();
    let y = m3ae_kernels::fused::masked_attention(&q, &k, &on(v.clone()), Some(&pad), 0.3).unwrap();
    let mean = v
        .mean_keepdim(2)
        .unwrap()
        .broadcast_as((1, 1, 4, 8))
        .unwrap();
    assert!(rel_err(&y, &mean) < 1e-6);
}

#[derive(Clone, Copy, Debug)]
pub enum Pad {
    None,
    Random,
    AllButOne,
    Full,
    /// Sample `b` pads its last `(b + 1) l / 4` keys (at most `l - 1`): the kept keys are the
    /// first ones.
    Suffix,
}

/// Every padding pattern, for tests that run each.
pub const ALL_PADS: [Pad; 5] = [
    Pad::None,
    Pad::Random,
    Pad::AllButOne,
    Pad::Full,
    Pad::Suffix,
];

pub fn padding(b: usize, l: usize, kind: Pad, seed: u64) -> Option<Tensor> {
    let v: Vec<f32> = match kind {
        Pad::None => return None,
        Pad::Random => values(b * l, seed)
            .into_iter()
            .map(|x| if x > 0.3 { 1.0 } else { 0.0 })
            .collect(),
        Pad::AllButOne => (0..b * l)
            .map(|i| if i % l == l / 2 { 0.0 } else { 1.0 })
            .collect(),
        Pad::Suffix => (0..b * l)
            .map(|i| {
                let (s, j) = (i / l, i % l);
                let padded = ((s + 1) * l / 4).min(l - 1);
                (j >= l - padded) as u8 as f32
            })
            .collect(),
        Pad::Full => (0..b * l)
            .map(|i| if i / l == 0 { 1.0 } else { 0.0 })
            .collect(),
    };
    Some(Tensor::from_vec(v, (b, l), &Device::Cpu).unwrap())
}

/// The values of a tensor as `f32`.
pub fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// `[output, dq, dk, dv]` of an attention within 1e-5 (output) and 1e-4 (gradients), relative,
/// of the reference's.
pub fn assert_close(f: &[Tensor], r: &[Tensor], ctx: &str) {
    let err = rel_err(&f[0], &r[0]);
    assert!(err <= 1e-5, "forward {ctx}: {err}");
    for (name, a, e) in [
        ("dq", &f[1], &r[1]),
        ("dk", &f[2], &r[2]),
        ("dv", &f[3], &r[3]),
    ] {
        let err = rel_err(a, e);
        assert!(err <= 1e-4, "{name} {ctx}: {err}");
    }
}

/// Runs `f` in rayon pools of several sizes and checks the results are bit-identical. A pool as
/// large as candle's worker pool runs the kernels' tasks on candle's pool, any other size on
/// rayon (`fused::for_each_index`): both are compared.
pub fn assert_same_for_any_thread_count(what: &str, f: impl Fn() -> Vec<Vec<f32>> + Sync) {
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(&f)
    };
    let candle_pool = candle_core::utils::barrier_pool().n_workers() + 1;
    let one = run(1);
    for threads in [2, 3, candle_pool, candle_pool + 1] {
        assert!(one == run(threads), "{what}: {threads} threads");
    }
}
