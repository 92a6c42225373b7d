//! The kernel rows of `m3ae doctor`: every fused op on the device against the CPU.
//!
//! Attention (separate q, k, v and the packed qkv projection, every padding pattern; a fully
//! padded sample only at unit-scale scores, where the reference's `-1e7` padding score does not
//! round them), LayerNorm
//! and tanh-GELU: values and the gradients of `sum(f(x) * w)` against the reference ops on the
//! CPU, in f32 (relative errors `max|a - b| / max|b|` within 1e-5 for values and 1e-4 for
//! gradients, the CUDA kernel tests' tolerances) and with bf16 inputs (the reference gets the
//! same bf16-rounded inputs in f32; 1e-2 and 2e-2). The text-head loss and top-k against the
//! fused CPU op (loss within 1e-5 relative, accuracy 1e-6, gradients 1e-4; top-k ids equal
//! except between logits within rounding). The bf16 dense layer (`cast_linear`, cuBLAS bf16 GEMM
//! on a GPU) against the f32 one on the CPU (2e-2).
//!
//! On the CPU the same rows check the fused CPU kernels against the reference ops.

use super::{pass_if, row, Outcome, Row};
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use m3ae_kernels::testing::{self, uniform};
use m3ae_kernels::{fused, reference};

/// Relative error `max|a - b| / max|b|` (`max|a - b|` when `b` is 0), on the CPU in f32.
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    let host = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    let (a, b) = (host(a)?, host(b)?);
    anyhow::ensure!(
        a.dims() == b.dims(),
        "shapes {:?} and {:?} differ",
        a.dims(),
        b.dims()
    );
    let max_abs = |t: &Tensor| -> Result<f32> { Ok(t.abs()?.max_all()?.to_scalar::<f32>()?) };
    let (d, m) = (max_abs(&(&a - &b)?)?, max_abs(&b)?);
    Ok(if m == 0.0 { d } else { d / m })
}

/// Deterministic values in `[-scale, scale)` of `shape` on the CPU.
fn tensor(shape: &[usize], seed: u64, scale: f32) -> Result<Tensor> {
    Ok(testing::tensor(shape, seed, scale, &Device::Cpu)?)
}

/// Key-padding patterns (1 = padded): none, random, all keys but one, sample 0 fully padded,
/// and a padded suffix growing with the sample.
fn paddings(b: usize, l: usize, seed: u64) -> Result<Vec<(&'static str, Option<Tensor>)>> {
    let mk = |v: Vec<f32>| Tensor::from_vec(v, (b, l), &Device::Cpu);
    Ok(vec![
        ("no padding", None),
        (
            "random",
            Some(mk(uniform(seed, b * l)
                .into_iter()
                .map(|x| (x > 0.3) as u8 as f32)
                .collect())?),
        ),
        (
            "all but one",
            Some(mk((0..b * l)
                .map(|i| (i % l != l / 2) as u8 as f32)
                .collect())?),
        ),
        (
            "sample 0 fully padded",
            Some(mk((0..b * l).map(|i| (i / l == 0) as u8 as f32).collect())?),
        ),
        (
            "suffix",
            Some(mk((0..b * l)
                .map(|i| {
                    let (s, j) = (i / l, i % l);
                    (j >= l - ((s + 1) * l / 4).min(l - 1)) as u8 as f32
                })
                .collect())?),
        ),
    ])
}

type Op<'a> = &'a dyn Fn(&[&Tensor]) -> candle_core::Result<Tensor>;

/// `[f(inputs), d/dinput_i of sum(f(inputs) * w)...]` on `dev` with the inputs in `dtype`,
/// every result on the CPU.
fn with_grads(
    f: Op,
    inputs: &[Tensor],
    w: &Tensor,
    dev: &Device,
    dtype: DType,
) -> Result<Vec<Tensor>> {
    let vars = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype)?.to_device(dev)?))
        .collect::<candle_core::Result<Vec<Var>>>()?;
    let refs: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    let y = f(&refs)?;
    let g = y
        .to_dtype(DType::F32)?
        .mul(&w.to_device(dev)?)?
        .sum_all()?
        .backward()?;
    let mut out = vec![y.to_device(&Device::Cpu)?];
    for v in &vars {
        let gi = g
            .get(v.as_tensor())
            .ok_or_else(|| anyhow::anyhow!("an input got no gradient"))?;
        out.push(gi.to_device(&Device::Cpu)?);
    }
    Ok(out)
}

/// The worst value and gradient errors over the cases, and the case of the worst.
#[derive(Default)]
struct Worst {
    value: f32,
    grad: f32,
    case: String,
    cases: usize,
}

impl Worst {
    /// Runs `fused` on `dev` and `reference` on the CPU on the (bf16-rounded when `dtype` is
    /// bf16) inputs and records the errors.
    fn case(
        &mut self,
        name: String,
        (fused, reference): (Op, Op),
        inputs: &[Tensor],
        w: &Tensor,
        dev: &Device,
        dtype: DType,
    ) -> Result<()> {
        let rounded = inputs
            .iter()
            .map(|t| t.to_dtype(dtype)?.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let want = with_grads(reference, &rounded, w, &Device::Cpu, DType::F32)?;
        let got = with_grads(fused, inputs, w, dev, dtype)?;
        let v = rel_err(&got[0], &want[0])?;
        let mut g = 0f32;
        for (a, b) in got[1..].iter().zip(&want[1..]) {
            let e = rel_err(a, b)?;
            g = if e.is_nan() { f32::NAN } else { g.max(e) };
        }
        let score = |x: f32| if x.is_nan() { f32::INFINITY } else { x };
        if score(v) / 1e-5 + score(g) / 1e-4 >= score(self.value) / 1e-5 + score(self.grad) / 1e-4 {
            self.case = name;
        }
        self.value = if v.is_nan() {
            f32::NAN
        } else {
            self.value.max(v)
        };
        self.grad = if g.is_nan() {
            f32::NAN
        } else {
            self.grad.max(g)
        };
        self.cases += 1;
        Ok(())
    }

    fn outcome(&self, tol: (f32, f32)) -> Outcome {
        let ok = self.value <= tol.0 && self.grad <= tol.1;
        Ok((
            pass_if(ok && self.cases > 0),
            format!(
                "{} cases; worst: value {:.1e}, gradient {:.1e} ({})",
                self.cases, self.value, self.grad, self.case
            ),
        ))
    }
}

/// `(value, gradient)` tolerances of a dtype.
fn tolerances(dtype: DType) -> (f32, f32) {
    if dtype == DType::BF16 {
        (1e-2, 2e-2)
    } else {
        (1e-5, 1e-4)
    }
}

fn tol_text(dtype: DType) -> String {
    let (v, g) = tolerances(dtype);
    format!("value {v:.0e}, gradient {g:.0e} (relative to max)")
}

fn dtype_name(dtype: DType) -> &'static str {
    if dtype == DType::BF16 {
        "bf16"
    } else {
        "f32"
    }
}

/// The kernel rows on `dev`; `small` keeps to small shapes (the CPU quick check).
pub fn rows(dev: &Device, small: bool) -> Vec<Row> {
    let mut out = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        out.push(row(
            "kernels",
            format!("masked attention, {} vs reference", dtype_name(dtype)),
            tol_text(dtype),
            || attention(dev, dtype, small),
        ));
        out.push(row(
            "kernels",
            format!("packed-qkv attention, {} vs reference", dtype_name(dtype)),
            tol_text(dtype),
            || qkv_attention(dev, dtype, small),
        ));
        out.push(row(
            "kernels",
            format!(
                "LayerNorm and tanh-GELU, {} vs reference",
                dtype_name(dtype)
            ),
            tol_text(dtype),
            || layer_norm_gelu(dev, dtype, small),
        ));
    }
    out.push(row(
        "kernels",
        "attention, fully padded rows attend uniformly, f32",
        "1e-6 relative",
        || fully_padded(dev),
    ));
    out.push(row(
        "kernels",
        "text-head loss, f32 vs the CPU fused op",
        "loss 1e-5, accuracy 1e-6, gradients 1e-4",
        || text_head_loss(dev, small),
    ));
    out.push(row(
        "kernels",
        "text-head top-k, f32 vs the CPU fused op",
        "logits 1e-4; ids equal but for near ties",
        || text_head_top_k(dev, small),
    ));
    out.push(row(
        "kernels",
        "dense layer, bf16 GEMM vs f32 on the CPU",
        "value and gradients 2e-2",
        || dense_bf16(dev, small),
    ));
    out
}

fn attention(dev: &Device, dtype: DType, small: bool) -> Outcome {
    let mut shapes = vec![
        (2usize, 3usize, 70usize, 8usize, 1f32),
        (1, 2, 1, 32, 1.0),
        (3, 2, 17, 32, 30.0),
    ];
    if !small {
        shapes.extend([
            (2, 2, 130, 64, 1.0),
            (1, 1, 65, 80, 1.0),
            (2, 4, 261, 32, 1.0),
            // the decoder of `base` at 224 px (1 + 196 + 64 tokens, 16 heads of 32)
            (4, 16, 261, 32, 1.0),
            // past the CUDA kernels' shared memory: the reference path on CUDA
            (1, 2, 1600, 64, 1.0),
        ]);
    }
    let mut worst = Worst::default();
    for (i, &(b, h, l, dh, mag)) in shapes.iter().enumerate() {
        let pads = paddings(b, l, 7 + i as u64)?;
        let pads = if l > 1000 { &pads[..2] } else { &pads[..] };
        for (j, (pad_name, pad)) in pads.iter().enumerate() {
            // A fully padded sample at large scores is ill-conditioned in the reference itself:
            // its padding score (-1e7) rounds the scores to whole numbers in f32.
            if mag > 1.0 && pad_name.contains("fully") {
                continue;
            }
            let seed = 1000 + 10 * i as u64 + j as u64;
            let shape = [b, h, l, dh];
            let ins = [
                tensor(&shape, seed, mag)?,
                tensor(&shape, seed + 1, mag)?,
                tensor(&shape, seed + 2, 1.0)?,
            ];
            let w = tensor(&shape, seed + 3, 1.0)?;
            let scale = 1.0 / (dh as f64).sqrt();
            let pd = pad.as_ref().map(|p| p.to_device(dev)).transpose()?;
            let f = |x: &[&Tensor]| {
                fused::masked_attention(x[0], x[1], x[2], pd.as_ref(), scale).map_err(to_candle)
            };
            let r = |x: &[&Tensor]| {
                reference::masked_attention(x[0], x[1], x[2], pad.as_ref(), scale)
                    .map_err(to_candle)
            };
            let name = format!("b{b} h{h} l{l} dh{dh} x{mag} {pad_name}");
            worst.case(name, (&f, &r), &ins, &w, dev, dtype)?;
        }
    }
    worst.outcome(tolerances(dtype))
}

fn qkv_attention(dev: &Device, dtype: DType, small: bool) -> Outcome {
    let mut shapes = vec![(2usize, 70usize, 3usize, 8usize), (1, 1, 2, 32)];
    if !small {
        shapes.extend([(2, 66, 6, 64), (4, 66, 12, 64)]);
    }
    let mut worst = Worst::default();
    for (i, &(b, l, heads, dh)) in shapes.iter().enumerate() {
        for (j, (pad_name, pad)) in paddings(b, l, 50 + i as u64)?.iter().enumerate() {
            let seed = 2000 + 10 * i as u64 + j as u64;
            let qkv = tensor(&[b, l, 3 * heads * dh], seed, 1.0)?;
            let w = tensor(&[b, l, heads * dh], seed + 1, 1.0)?;
            let scale = 1.0 / (dh as f64).sqrt();
            let pd = pad.as_ref().map(|p| p.to_device(dev)).transpose()?;
            let f = |x: &[&Tensor]| {
                fused::qkv_attention(x[0], heads, pd.as_ref(), scale).map_err(to_candle)
            };
            let r = |x: &[&Tensor]| {
                reference::qkv_attention(x[0], heads, pad.as_ref(), scale).map_err(to_candle)
            };
            let name = format!("b{b} l{l} heads{heads} dh{dh} {pad_name}");
            worst.case(name, (&f, &r), std::slice::from_ref(&qkv), &w, dev, dtype)?;
        }
    }
    worst.outcome(tolerances(dtype))
}

fn layer_norm_gelu(dev: &Device, dtype: DType, small: bool) -> Outcome {
    let mut shapes = vec![vec![5usize, 7, 384], vec![1, 1], vec![3, 100]];
    if !small {
        shapes.extend([vec![33, 768], vec![64, 261, 512]]);
    }
    let mut worst = Worst::default();
    for (i, shape) in shapes.iter().enumerate() {
        let d = *shape.last().unwrap_or(&1);
        let seed = 3000 + 10 * i as u64;
        let ins = [
            tensor(shape, seed, 3.0)?,
            tensor(&[d], seed + 1, 1.0)?,
            tensor(&[d], seed + 2, 1.0)?,
        ];
        let w = tensor(shape, seed + 3, 1.0)?;
        let f = |x: &[&Tensor]| fused::layer_norm(x[0], x[1], x[2], 1e-6).map_err(to_candle);
        let r = |x: &[&Tensor]| reference::layer_norm(x[0], x[1], x[2], 1e-6).map_err(to_candle);
        worst.case(
            format!("layer_norm {shape:?}"),
            (&f, &r),
            &ins,
            &w,
            dev,
            dtype,
        )?;
        let x = [tensor(shape, seed + 4, 4.0)?];
        let f = |x: &[&Tensor]| fused::gelu_tanh(x[0]).map_err(to_candle);
        let r = |x: &[&Tensor]| reference::gelu_tanh(x[0]).map_err(to_candle);
        worst.case(format!("gelu {shape:?}"), (&f, &r), &x, &w, dev, dtype)?;
    }
    worst.outcome(tolerances(dtype))
}

fn fully_padded(dev: &Device) -> Outcome {
    let on = |t: Tensor| t.to_device(dev);
    let v = tensor(&[1, 1, 4, 8], 3, 1.0)?;
    let (q, k) = (
        on(tensor(&[1, 1, 4, 8], 1, 1.0)?)?,
        on(tensor(&[1, 1, 4, 8], 2, 1.0)?)?,
    );
    let pad = Tensor::ones((1, 4), DType::F32, dev)?;
    let y = fused::masked_attention(&q, &k, &on(v.clone())?, Some(&pad), 0.3)?;
    let mean = v.mean_keepdim(2)?.broadcast_as((1, 1, 4, 8))?;
    let e = rel_err(&y, &mean)?;
    Ok((pass_if(e <= 1e-6), format!("error {e:.1e}")))
}

fn to_candle(e: m3ae_kernels::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Row weights of `samples` samples of `len` tokens as M3AE builds them (see the CUDA kernel
/// tests): sample `s` has `s % (len / 2)` padding tokens; `masked_only` counts `i % 4 != 0`.
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

/// A text-head case: (what, N, D, V, row weights, scale of hidden and weight, scale of bias).
type HeadCase = (&'static str, usize, usize, usize, Vec<f32>, f32, f32);

/// Loss, accuracy and the gradients of hidden, weight and bias (loss scaled by 1.5) on `dev`.
fn text_head_run(
    (h, w, b): (&Tensor, &Tensor, &Tensor),
    t: &[u32],
    rw: &[f32],
    dev: &Device,
) -> Result<(f32, f32, Vec<Tensor>)> {
    let vars = [h, w, b]
        .iter()
        .map(|x| Var::from_tensor(&x.to_device(dev)?))
        .collect::<candle_core::Result<Vec<Var>>>()?;
    let (loss, acc) = fused::text_head_loss(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
        &Tensor::new(t, dev)?,
        &Tensor::new(rw, dev)?,
    )?;
    let g = (&loss * 1.5)?.backward()?;
    let grads = vars
        .iter()
        .map(|v| {
            g.get(v.as_tensor())
                .ok_or_else(|| anyhow::anyhow!("an input got no gradient"))?
                .to_device(&Device::Cpu)
                .map_err(Into::into)
        })
        .collect::<Result<Vec<_>>>()?;
    let scalar = |x: &Tensor| -> Result<f32> { Ok(x.to_device(&Device::Cpu)?.to_scalar::<f32>()?) };
    Ok((scalar(&loss)?, scalar(&acc)?, grads))
}

fn text_head_loss(dev: &Device, small: bool) -> Outcome {
    let zero_some = |n: usize| -> Vec<f32> {
        uniform(77, n)
            .iter()
            .map(|&x| if x < -0.6 { 0.0 } else { 0.01 })
            .collect()
    };
    let mut cases: Vec<HeadCase> = vec![
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
        ("one word", 3, 5, 1, vec![0.5; 3], 1.0, 0.5),
        ("all weight 0", 10, 8, 100, vec![0.0; 10], 1.0, 0.5),
    ];
    if !small {
        cases.extend([
            ("20% weight 0", 130, 70, 1000, zero_some(130), 1.0, 0.5),
            ("chunks of tiles", 12, 16, 4250, zero_some(12), 1.0, 0.5),
            ("logits x1e4", 10, 16, 600, vec![0.1; 10], 30.0, 1e3),
            (
                "BERT vocabulary",
                64 * 16,
                192,
                30_522,
                m3ae_weights(64, 16, true),
                1.0,
                0.5,
            ),
        ]);
    }
    let (mut worst_loss, mut worst_grad, mut bad) = (0f32, 0f32, Vec::new());
    for (i, (what, n, d, v, rw, scale, bias_scale)) in cases.iter().enumerate() {
        let seed = 4000 + 10 * i as u64;
        let h = tensor(&[*n, *d], seed, *scale)?;
        let w = tensor(&[*v, *d], seed + 1, 0.5 * scale)?;
        let b = tensor(&[*v], seed + 2, *bias_scale)?;
        let t: Vec<u32> = uniform(seed + 3, *n)
            .iter()
            .map(|x| (((x + 1.0) * 0.5 * *v as f32) as u32).min(*v as u32 - 1))
            .collect();
        let (cl, ca, cg) = text_head_run((&h, &w, &b), &t, rw, &Device::Cpu)?;
        let (gl, ga, gg) = text_head_run((&h, &w, &b), &t, rw, dev)?;
        let le = (gl - cl).abs() / cl.abs().max(1e-3);
        let mut ge = 0f32;
        for (a, c) in gg.iter().zip(&cg) {
            ge = ge.max(rel_err(a, c)?);
        }
        worst_loss = worst_loss.max(le);
        worst_grad = worst_grad.max(ge);
        if !(le <= 1e-5 && (ga - ca).abs() <= 1e-6 && ge <= 1e-4) {
            bad.push(format!(
                "{what} (loss {le:.1e}, acc {ga} vs {ca}, grad {ge:.1e})"
            ));
        }
    }
    Ok((
        pass_if(bad.is_empty()),
        format!(
            "{} cases; worst: loss {worst_loss:.1e}, gradient {worst_grad:.1e}{}",
            cases.len(),
            if bad.is_empty() {
                String::new()
            } else {
                format!("; out of tolerance: {}", bad.join(", "))
            }
        ),
    ))
}

fn text_head_top_k(dev: &Device, small: bool) -> Outcome {
    let mut shapes = vec![(20usize, 24usize, 300usize), (7, 5, 3)];
    if !small {
        shapes.extend([(70, 20, 5000), (512, 192, 30_522)]);
    }
    let (mut rows_checked, mut mismatches) = (0usize, Vec::new());
    for (i, &(n, d, v)) in shapes.iter().enumerate() {
        let seed = 5000 + 10 * i as u64;
        let h = tensor(&[n, d], seed, 1.0)?;
        let w = tensor(&[v, d], seed + 1, 0.5)?;
        let b = tensor(&[v], seed + 2, 0.2)?;
        let on = |t: &Tensor| t.to_device(dev);
        let rows: Vec<usize> = (0..n).rev().collect();
        for k in [1usize, 5, 32] {
            let want = fused::text_head_top_k(&h, &w, Some(&b), &rows, k)?;
            let got = fused::text_head_top_k(&on(&h)?, &on(&w)?, Some(&on(&b)?), &rows, k)?;
            rows_checked += rows.len();
            for (r, (((gi, gv), wi), wv)) in got
                .ids
                .iter()
                .zip(&got.logits)
                .zip(&want.ids)
                .zip(&want.logits)
                .enumerate()
            {
                if gi.len() != wi.len() {
                    mismatches.push(format!("N{n} V{v} k{k} row {r}: lengths"));
                    continue;
                }
                for p in 0..gi.len() {
                    let (a, c) = (gv[p], wv[p]);
                    let tol = 1e-4 * c.abs().max(1.0);
                    let near = |q: usize| q < wv.len() && (wv[q] - c).abs() <= tol;
                    let value_ok = (a.is_nan() && c.is_nan()) || (a - c).abs() <= tol;
                    let id_ok = gi[p] == wi[p] || (p > 0 && near(p - 1)) || near(p + 1);
                    if !(value_ok && id_ok) {
                        mismatches.push(format!("N{n} V{v} k{k} row {r} position {p}"));
                    }
                }
            }
        }
    }
    Ok((
        pass_if(mismatches.is_empty()),
        format!(
            "{rows_checked} rows; {} mismatches{}",
            mismatches.len(),
            mismatches
                .first()
                .map(|m| format!(" (first: {m})"))
                .unwrap_or_default()
        ),
    ))
}

fn dense_bf16(dev: &Device, small: bool) -> Outcome {
    let (rows, inp, out) = if small {
        (16, 64, 48)
    } else {
        (4096, 768, 3072)
    };
    let ins = [
        tensor(&[rows, inp], 6000, 1.0)?,
        tensor(&[out, inp], 6001, 0.05)?,
        tensor(&[out], 6002, 0.1)?,
    ];
    let w = tensor(&[rows, out], 6003, 1.0)?;
    let f = |x: &[&Tensor]| {
        m3ae_model::layers::cast_linear(x[0], x[1], x[2], DType::BF16)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    };
    let r = |x: &[&Tensor]| reference::linear(x[0], x[1], x[2]).map_err(to_candle);
    let mut worst = Worst::default();
    // f32 master inputs on both sides: the bf16 rounding is the op's own
    worst.case(
        format!("[{rows}, {inp}] x [{out}, {inp}]^T"),
        (&f, &r),
        &ins,
        &w,
        dev,
        DType::F32,
    )?;
    worst.outcome((2e-2, 2e-2))
}
