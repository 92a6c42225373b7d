//! The one-op fused transformer block against the block composed from reference ops: output,
//! gradient of the input and of every parameter, at the model's shapes (tiny encoder and
//! decoder, ViT-S), with and without padding keys, batch 1; plus thread-count independence, the
//! no-gradient path and the rejection of bad shapes. The same block with bf16 products against
//! the f32 reference.

use candle_core::{DType, Device, Tensor, Var};
use m3ae_kernels::{BlockParams, KernelPath};

mod common;
use common::{assert_same_for_any_thread_count, flat, padding, rel_err, tensor, Pad};

const NAMES: [&str; 12] = m3ae_kernels::fused::BLOCK_PARAM_ORDER;

/// Block parameters of width `c`, MLP width `m`, at realistic scales (weights ~ 1/sqrt(fan-in),
/// LayerNorm scales near 1, small biases).
fn params(c: usize, m: usize, seed: u64) -> Vec<Tensor> {
    let shapes: [Vec<usize>; 12] = [
        vec![c],
        vec![c],
        vec![3 * c, c],
        vec![3 * c],
        vec![c, c],
        vec![c],
        vec![c],
        vec![c],
        vec![m, c],
        vec![m],
        vec![c, m],
        vec![c],
    ];
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let t = tensor(s, seed + i as u64, 1.0);
            match i {
                0 | 6 => t.affine(0.2, 1.0).unwrap(),
                1 | 3 | 5 | 7 | 9 | 11 => (t * 0.1).unwrap(),
                _ => (t * (3.0 / s[1] as f64).sqrt()).unwrap(),
            }
        })
        .collect()
}

fn block_params(p: &[Tensor]) -> BlockParams<'_> {
    BlockParams {
        norm1: (&p[0], &p[1]),
        qkv: (&p[2], &p[3]),
        proj: (&p[4], &p[5]),
        norm2: (&p[6], &p[7]),
        fc1: (&p[8], &p[9]),
        fc2: (&p[10], &p[11]),
    }
}

/// The output and the gradients of `sum(y * w)` with respect to `x` and the 12 parameters.
fn run(
    path: KernelPath,
    x: &Tensor,
    p: &[Tensor],
    heads: usize,
    pad: Option<&Tensor>,
    w: &Tensor,
) -> Vec<Tensor> {
    run_block(x, p, w, |x, bp| {
        path.transformer_block(x, bp, heads, pad, 1e-6).unwrap()
    })
}

/// As [`run`] for any block function `f(x, params)`.
fn run_block(
    x: &Tensor,
    p: &[Tensor],
    w: &Tensor,
    f: impl Fn(&Tensor, &BlockParams<'_>) -> Tensor,
) -> Vec<Tensor> {
    let xv = Var::from_tensor(x).unwrap();
    let pv: Vec<Var> = p.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let pt: Vec<Tensor> = pv.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(xv.as_tensor(), &block_params(&pt));
    let g = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
    let mut out = vec![y, g.get(xv.as_tensor()).expect("gradient of x").clone()];
    for (v, name) in pv.iter().zip(NAMES) {
        let gv = g
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient of {name}"));
        out.push(gv.clone());
    }
    out
}

fn check(b: usize, l: usize, c: usize, heads: usize, pad: Pad, seed: u64) {
    let m = 4 * c;
    let x = tensor(&[b, l, c], seed, 1.0);
    let w = tensor(&[b, l, c], seed + 100, 1.0);
    let p = params(c, m, seed + 200);
    let pad_t = padding(b, l, pad, seed + 300);
    let f = run(KernelPath::Fused, &x, &p, heads, pad_t.as_ref(), &w);
    let r = run(KernelPath::Reference, &x, &p, heads, pad_t.as_ref(), &w);
    let ctx = format!("b{b} l{l} c{c} h{heads} {pad:?}");
    let err = rel_err(&f[0], &r[0]);
    assert!(err <= 2e-5, "output {ctx}: {err}");
    let err = rel_err(&f[1], &r[1]);
    assert!(err <= 2e-4, "dx {ctx}: {err}");
    for (i, name) in NAMES.iter().enumerate() {
        let err = rel_err(&f[i + 2], &r[i + 2]);
        assert!(err <= 2e-4, "d {name} {ctx}: {err}");
    }
}

#[test]
fn tiny_encoder_and_decoder_shapes_match_the_composed_block() {
    // tiny preset: encoder width 128 / 4 heads, decoder width 64 / 4 heads
    for (i, pad) in [
        Pad::None,
        Pad::Random,
        Pad::Suffix,
        Pad::AllButOne,
        Pad::Full,
    ]
    .into_iter()
    .enumerate()
    {
        check(3, 21, 128, 4, pad, 10 * i as u64);
        check(2, 70, 64, 4, pad, 10 * i as u64 + 5);
    }
}

#[test]
fn vit_s_shape_matches_the_composed_block() {
    check(2, 64, 384, 6, Pad::Suffix, 1);
    check(2, 64, 384, 6, Pad::None, 2);
}

#[test]
fn batch_one_and_single_token_match_the_composed_block() {
    check(1, 17, 128, 4, Pad::None, 3);
    check(1, 17, 64, 4, Pad::Random, 4);
    check(1, 1, 64, 2, Pad::None, 5);
    // odd head width (24 / 2 = 12) and a row count that is not a multiple of the row chunk
    check(2, 33, 24, 2, Pad::Random, 6);
}

#[test]
fn fused_block_is_bit_identical_for_any_thread_count() {
    let (b, l, c) = (3, 29, 64);
    let x = tensor(&[b, l, c], 7, 1.0);
    let w = tensor(&[b, l, c], 8, 1.0);
    let p = params(c, 4 * c, 9);
    let pad = padding(b, l, Pad::Random, 10);
    // with f32 and with bf16 products
    for products in [DType::F32, DType::BF16] {
        assert_same_for_any_thread_count(&format!("transformer block, {products:?}"), || {
            run_block(&x, &p, &w, |x, bp| {
                m3ae_kernels::fused::transformer_block_with(x, bp, 4, pad.as_ref(), 1e-6, products)
                    .unwrap()
            })
            .iter()
            .map(flat)
            .collect()
        });
    }
}

#[test]
fn untracked_inputs_give_the_same_output_without_saving_state() {
    let (b, l, c) = (2, 9, 32);
    let x = tensor(&[b, l, c], 11, 1.0);
    let p = params(c, 4 * c, 12);
    let w = tensor(&[b, l, c], 13, 1.0);
    let y = m3ae_kernels::transformer_block(&x, &block_params(&p), 2, None, 1e-6).unwrap();
    let trained = run(KernelPath::Fused, &x, &p, 2, None, &w);
    assert_eq!(flat(&y), flat(&trained[0]));
    // the gradient of a block whose input is data (not a variable) still reaches the weights
    let pv: Vec<Var> = p.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let pt: Vec<Tensor> = pv.iter().map(|v| v.as_tensor().clone()).collect();
    let y = m3ae_kernels::transformer_block(&x, &block_params(&pt), 2, None, 1e-6).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(pv.iter().all(|v| g.get(v.as_tensor()).is_some()));
}

/// bf16 products (operands rounded to bf16, f32 sums): within what the rounding of the operands
/// moves of the f32 reference, and measurably different from it, at the tiny and ViT-S shapes.
#[test]
fn bf16_products_stay_within_bf16_rounding_of_the_f32_block() {
    for (b, l, c, heads, pad, seed) in [
        (3, 21, 128, 4, Pad::Random, 1),
        (2, 70, 64, 4, Pad::Suffix, 2),
        (2, 64, 384, 6, Pad::None, 3),
    ] {
        let x = tensor(&[b, l, c], seed, 1.0);
        let w = tensor(&[b, l, c], seed + 100, 1.0);
        let p = params(c, 4 * c, seed + 200);
        let pad_t = padding(b, l, pad, seed + 300);
        let bf = run_block(&x, &p, &w, |x, bp| {
            m3ae_kernels::fused::transformer_block_with(
                x,
                bp,
                heads,
                pad_t.as_ref(),
                1e-6,
                DType::BF16,
            )
            .unwrap()
        });
        let r = run(KernelPath::Reference, &x, &p, heads, pad_t.as_ref(), &w);
        let ctx = format!("b{b} l{l} c{c} {pad:?}");
        // bf16 keeps 8 significant bits (relative rounding up to 2^-9 = 0.2%); errors of the
        // two rounded operands of each product add up through the block's chain of products
        let err = rel_err(&bf[0], &r[0]);
        assert!((1e-4..=1e-2).contains(&err), "output {ctx}: {err}");
        for (i, name) in ["x"].iter().chain(NAMES.iter()).enumerate() {
            let err = rel_err(&bf[i + 1], &r[i + 1]);
            // fc2's bias gradient is colsum(dy): no product on its way
            let range = if *name == "fc2.bias" {
                0.0..=1e-5
            } else {
                1e-3..=2e-2
            };
            assert!(range.contains(&err), "d {name} {ctx}: {err}");
        }
    }
    // bf16 products on CUDA or with bf16 tensors are not the one-op block: refused, not ignored
    let x = tensor(&[1, 4, 16], 1, 1.0).to_dtype(DType::BF16).unwrap();
    let p = params(16, 64, 2);
    let e = m3ae_kernels::fused::transformer_block_with(
        &x,
        &block_params(&p),
        2,
        None,
        1e-6,
        DType::BF16,
    )
    .unwrap_err();
    assert!(e.to_string().contains("one-op block"), "{e}");
}

#[test]
fn bad_shapes_are_rejected_with_the_parameter_named() {
    let c = 16;
    let x = tensor(&[1, 4, c], 1, 1.0);
    let mut p = params(c, 4 * c, 2);
    p[4] = tensor(&[c, c + 1], 3, 1.0);
    let e = m3ae_kernels::transformer_block(&x, &block_params(&p), 2, None, 1e-6).unwrap_err();
    assert!(e.to_string().contains("proj.weight"), "{e}");
    let p = params(c, 4 * c, 2);
    let e = m3ae_kernels::transformer_block(&x, &block_params(&p), 3, None, 1e-6).unwrap_err();
    assert!(e.to_string().contains("heads"), "{e}");
    let pad = Tensor::zeros((1, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e =
        m3ae_kernels::transformer_block(&x, &block_params(&p), 2, Some(&pad), 1e-6).unwrap_err();
    assert!(e.to_string().contains("key_padding"), "{e}");
}
