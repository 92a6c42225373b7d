//! The fused pre-LN transformer block (CPU, f32 tensors): one candle op for
//! `x1 = x + proj(attn(qkv(LN1(x))))`, `y = x1 + fc2(gelu(fc1(LN2(x1))))`, with a hand-written
//! backward that returns the gradient of `x` and of all twelve parameters.
//!
//! Why one op: the composed block (even from fused per-op kernels) runs about thirty candle ops
//! per block and as many again in the backward, each allocating its result and, in the backward,
//! accumulating gradients as `zeros_like` + `add`, transposing, broadcasting and reducing biases
//! through generic tensor code. Here every product is one call of the `gemm` crate on contiguous
//! row-major buffers (weights read in place through strides, never transposed), and everything
//! between the products is one row pass each, parallel over fixed 32-row chunks:
//!
//! * Forward: bias and residual are the initial contents of the product's output (the GEMM
//!   accumulates into `bias` rows, or into `x + bias` rows for the two residual products), the
//!   LayerNorm pass also writes its row statistics, and the GELU pass runs on the fc1 output in
//!   place and also writes `gelu'(h)` (from the same `tanh`), so the backward computes no `tanh`.
//! * Saved for the backward: the row statistics of both LayerNorms (2 floats per row), the qkv
//!   projection, the attention output and its softmax statistics, `x1`, `gelu(h)` and
//!   `gelu'(h)`. The LayerNorm outputs are recomputed from their inputs and statistics (one
//!   cheap pass each) instead of being stored.
//! * Backward: `dh = (dy W2) * gelu'(h)` with `db1 = colsum(dh)` in one pass; the LayerNorm-2
//!   backward adds the residual gradient and also reduces `db2 = colsum(dy)`, `dgamma`, `dbeta`
//!   and `dbproj = colsum(dx1)`; attention's backward is the fused kernel's (packed qkv, padding
//!   keys left out where exact); the recomputation of `LN1(x)` also reduces `dbqkv`. Weight
//!   gradients are written by the GEMMs straight into their slices of the flat parameter
//!   gradient.
//!
//! Reductions over rows (bias and LayerNorm parameter gradients) sum per-chunk partials in chunk
//! order, so results do not depend on the number of threads. The forward and the backward each
//! run as one task on a rayon worker, so the GEMMs (parallel on rayon) and the row passes share
//! one pool of busy threads: alternating between rayon and candle's spinning worker pool, as
//! the composed block does, left each pool spinning while the other worked. Temporary buffers
//! (the LayerNorm outputs, `dh`, the activation gradients) come from a small process-wide pool
//! and are reused from call to call. The parameters arrive as one flat tensor (the twelve tensors flattened and
//! concatenated in [`PARAM_ORDER`]; candle's `cat` backward hands each tensor its slice of the
//! gradient), because candle's custom ops take at most three tensors.
//! At bf16 precision the twelve products (four forward, eight backward) take bf16-rounded operands
//! and sum in f32 ([`super::bf16`]: AMX or `VDPBF16PS` where the CPU has them); everything else,
//! attention's products included, stays f32, and so do the saved activations and the gradients.
//! Dropout, attention dropout and drop path are not supported here: the model runs its composed
//! block when any of them is active.

use super::attention::{packed_backward, packed_forward, PackedState};
use super::linear::product;
use super::storage::{f32_slice, output, storage_slice, uninit_buffer, zeroed_buffer};
use super::{math, SharedMut};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Rows per parallel task of the row passes (fixed, so reductions do not depend on threads).
const ROWS: usize = 32;

/// The parameters of a block in the order of the flat parameter tensor.
pub const PARAM_ORDER: [&str; 12] = [
    "norm1.weight",
    "norm1.bias",
    "qkv.weight",
    "qkv.bias",
    "proj.weight",
    "proj.bias",
    "norm2.weight",
    "norm2.bias",
    "fc1.weight",
    "fc1.bias",
    "fc2.weight",
    "fc2.bias",
];

/// Shapes of a block: batch, sequence, width, MLP width, heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockDims {
    pub(crate) b: usize,
    pub(crate) l: usize,
    pub(crate) c: usize,
    pub(crate) m: usize,
    pub(crate) heads: usize,
}

impl BlockDims {
    fn n(&self) -> usize {
        self.b * self.l
    }

    /// Element counts of the parameters, in [`PARAM_ORDER`].
    fn sizes(&self) -> [usize; 12] {
        let (c, m) = (self.c, self.m);
        [c, c, 3 * c * c, 3 * c, c * c, c, c, c, m * c, m, c * m, c]
    }

    /// Elements of the flat parameter tensor.
    pub(crate) fn param_len(&self) -> usize {
        self.sizes().iter().sum()
    }

    fn attention(&self) -> (usize, usize, usize, usize) {
        (self.b, self.l, self.heads, self.c / self.heads)
    }
}

/// The twelve parameter slices of a flat buffer, in [`PARAM_ORDER`].
fn split<'a, T>(mut flat: &'a [T], dims: &BlockDims) -> [&'a [T]; 12] {
    dims.sizes().map(|len| {
        let (a, rest) = flat.split_at(len);
        flat = rest;
        a
    })
}

/// As [`split`] for a mutable buffer.
fn split_mut<'a>(mut flat: &'a mut [f32], dims: &BlockDims) -> [&'a mut [f32]; 12] {
    dims.sizes().map(|len| {
        let (a, rest) = std::mem::take(&mut flat).split_at_mut(len);
        flat = rest;
        a
    })
}

// ---------------------------------------------------------------------------------------------
// Workspaces

/// Reused temporary buffers (at most [`POOL_MAX`] kept).
static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
const POOL_MAX: usize = 8;

/// A buffer of `len` floats with unspecified (initialised) contents: the smallest pooled buffer
/// that is large enough, or a fresh one.
fn take(len: usize) -> Vec<f32> {
    let mut pool = POOL.lock().expect("workspace pool");
    let best = pool
        .iter()
        .enumerate()
        .filter(|(_, v)| v.capacity() >= len)
        .min_by_key(|(_, v)| v.capacity())
        .map(|(i, _)| i);
    match best {
        Some(i) => {
            let mut v = pool.swap_remove(i);
            drop(pool);
            if v.len() >= len {
                v.truncate(len);
            } else {
                v.resize(len, 0.0);
            }
            v
        }
        None => {
            drop(pool);
            zeroed_buffer(len)
        }
    }
}

/// Returns a buffer to the pool (the smallest pooled one is dropped when the pool is full).
fn give(v: Vec<f32>) {
    let mut pool = POOL.lock().expect("workspace pool");
    if pool.len() < POOL_MAX {
        pool.push(v);
    } else if let Some((i, _)) = pool
        .iter()
        .enumerate()
        .min_by_key(|(_, p)| p.capacity())
        .filter(|(_, p)| p.capacity() < v.capacity())
    {
        pool[i] = v;
    }
}

// ---------------------------------------------------------------------------------------------
// Products

/// `dst (m x n) = [dst +] lhs (m x k) rhs (k x n)`, operands as (slice, row stride, column
/// stride); with `bf16`, the operands are rounded to bf16 and summed in f32 ([`super::bf16`]).
fn mm(
    bf16: bool,
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
) {
    product(bf16, (m, n, k), (dst, n), accumulate, lhs, rhs)
}

// ---------------------------------------------------------------------------------------------
// Row passes (compiled for AVX2+FMA and for the baseline, picked at run time)

macro_rules! dispatch {
    ($(fn $name:ident => $inner:ident($($arg:ident: $ty:ty),* $(,)?);)*) => {$(
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) {
            #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) {
                    $inner($($arg),*)
                }
                if super::has_avx2_fma() {
                    // SAFETY: the CPU supports AVX2 and FMA.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $inner($($arg),*)
        }
    )*};
}

dispatch! {
    fn ln_forward_rows => ln_forward_rows_impl(
        x: &[f32], g: &[f32], b: &[f32], out: &mut [f32], st: &mut [f32], eps: f32,
    );
    fn ln_apply_rows => ln_apply_rows_impl(
        x: &[f32], st: &[f32], g: &[f32], b: &[f32], out: &mut [f32],
    );
    fn ln_backward_rows => ln_backward_rows_impl(
        x: &[f32], st: &[f32], g: &[f32], da: &[f32], resid: &[f32], dx: &mut [f32],
        dg: &mut [f32], db: &mut [f32],
    );
    fn gelu_rows => gelu_rows_impl(h: &mut [f32], gp: Option<&mut [f32]>);
    fn gelu_backward_rows => gelu_backward_rows_impl(dg: &mut [f32], gp: &[f32], db: &mut [f32]);
    fn col_sum_rows => col_sum_rows_impl(rows: &[f32], acc: &mut [f32]);
    fn fill_rows => fill_rows_impl(base: Option<&[f32]>, bias: &[f32], out: &mut [f32]);
}

/// LayerNorm of each row of `x` into `out`, and each row's `(mean, 1/std)` into `st`.
#[inline(always)]
fn ln_forward_rows_impl(
    x: &[f32],
    g: &[f32],
    b: &[f32],
    out: &mut [f32],
    st: &mut [f32],
    eps: f32,
) {
    let d = g.len();
    for ((xr, yr), s) in x
        .chunks_exact(d)
        .zip(out.chunks_exact_mut(d))
        .zip(st.chunks_exact_mut(2))
    {
        let (mean, rstd) = super::layer_norm::row_stats(xr, eps);
        s[0] = mean;
        s[1] = rstd;
        for j in 0..d {
            yr[j] = (xr[j] - mean) * rstd * g[j] + b[j];
        }
    }
}

/// LayerNorm of each row of `x` from saved statistics (the backward's recomputation).
#[inline(always)]
fn ln_apply_rows_impl(x: &[f32], st: &[f32], g: &[f32], b: &[f32], out: &mut [f32]) {
    let d = g.len();
    for ((xr, yr), s) in x
        .chunks_exact(d)
        .zip(out.chunks_exact_mut(d))
        .zip(st.chunks_exact(2))
    {
        let (mean, rstd) = (s[0], s[1]);
        for j in 0..d {
            yr[j] = (xr[j] - mean) * rstd * g[j] + b[j];
        }
    }
}

/// LayerNorm backward of each row plus a residual gradient: `dx = resid + rstd (da g - c1 -
/// xhat c2)`; adds the row's `da xhat` to `dg` and `da` to `db`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn ln_backward_rows_impl(
    x: &[f32],
    st: &[f32],
    g: &[f32],
    da: &[f32],
    resid: &[f32],
    dx: &mut [f32],
    dg: &mut [f32],
    db: &mut [f32],
) {
    let d = g.len();
    for ((((xr, s), dar), rr), dxr) in x
        .chunks_exact(d)
        .zip(st.chunks_exact(2))
        .zip(da.chunks_exact(d))
        .zip(resid.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
    {
        let (mean, rstd) = (s[0], s[1]);
        let (c1, c2) = super::layer_norm::grad_row_means(xr, dar, g, mean, rstd);
        for j in 0..d {
            let xhat = (xr[j] - mean) * rstd;
            dxr[j] = rr[j] + rstd * (dar[j] * g[j] - c1 - xhat * c2);
            dg[j] += dar[j] * xhat;
            db[j] += dar[j];
        }
    }
}

const GELU_C: f32 = 0.797_884_6; // sqrt(2 / pi)
const GELU_A: f32 = 0.044_715;

/// tanh-GELU in place; with `gp`, also its derivative at the input (same `tanh`).
#[inline(always)]
fn gelu_rows_impl(h: &mut [f32], gp: Option<&mut [f32]>) {
    match gp {
        Some(gp) => {
            for (v, p) in h.iter_mut().zip(gp.iter_mut()) {
                let x = *v;
                let t = math::tanh(GELU_C * (x + GELU_A * x * x * x));
                let du = GELU_C * (1.0 + 3.0 * GELU_A * x * x);
                *p = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du;
                *v = 0.5 * x * (1.0 + t);
            }
        }
        None => {
            for v in h.iter_mut() {
                let x = *v;
                let t = math::tanh(GELU_C * (x + GELU_A * x * x * x));
                *v = 0.5 * x * (1.0 + t);
            }
        }
    }
}

/// `dg *= gp` in place, and the column sums of the result added to `db` (`db.len()` wide rows).
#[inline(always)]
fn gelu_backward_rows_impl(dg: &mut [f32], gp: &[f32], db: &mut [f32]) {
    let w = db.len();
    for (r, p) in dg.chunks_exact_mut(w).zip(gp.chunks_exact(w)) {
        for j in 0..w {
            let v = r[j] * p[j];
            r[j] = v;
            db[j] += v;
        }
    }
}

/// Adds the column sums of `rows` (`acc.len()` wide) to `acc`.
#[inline(always)]
fn col_sum_rows_impl(rows: &[f32], acc: &mut [f32]) {
    let w = acc.len();
    for r in rows.chunks_exact(w) {
        for j in 0..w {
            acc[j] += r[j];
        }
    }
}

/// Each row of `out` = `bias` (+ the row of `base`).
#[inline(always)]
fn fill_rows_impl(base: Option<&[f32]>, bias: &[f32], out: &mut [f32]) {
    let w = bias.len();
    match base {
        Some(base) => {
            for (o, x) in out.chunks_exact_mut(w).zip(base.chunks_exact(w)) {
                for j in 0..w {
                    o[j] = x[j] + bias[j];
                }
            }
        }
        None => {
            for o in out.chunks_exact_mut(w) {
                o.copy_from_slice(bias);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parallel drivers over row chunks

/// Rows `r` of a buffer of `w`-wide rows behind `p`.
///
/// # Safety
/// The rows must lie inside the buffer, and no other task may touch them meanwhile.
unsafe fn rows_mut<'a>(p: SharedMut, r: &Range<usize>, w: usize) -> &'a mut [f32] {
    std::slice::from_raw_parts_mut(p.ptr().add(r.start * w), (r.end - r.start) * w)
}

fn chunk(i: usize, n: usize) -> Range<usize> {
    i * ROWS..((i + 1) * ROWS).min(n)
}

/// Runs `f(rows)` for every [`ROWS`]-row chunk of `n` rows, in parallel.
fn par_rows(n: usize, f: impl Fn(Range<usize>) + Sync + Send) {
    super::for_each_index(n.div_ceil(ROWS), |i| f(chunk(i, n)));
}

/// Runs `f(rows, partial)` for every [`ROWS`]-row chunk in parallel, each with its own zeroed
/// `w`-float partial; returns the partials summed in chunk order.
fn par_rows_sum(
    n: usize,
    w: usize,
    f: impl Fn(Range<usize>, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    let mut parts = vec![0f32; n.div_ceil(ROWS) * w];
    if w > 0 {
        super::for_each_chunk_mut(&mut parts, w, |i, p| f(chunk(i, n), p));
    }
    let mut acc = vec![0f32; w];
    for p in parts.chunks_exact(w.max(1)) {
        for (a, v) in acc.iter_mut().zip(p) {
            *a += v;
        }
    }
    acc
}

/// A fresh `n x w` buffer whose rows are `bias` (+ the rows of `base`): the initial contents of
/// a product with fused bias (and residual).
fn filled(n: usize, base: Option<&[f32]>, bias: &[f32]) -> Vec<f32> {
    let w = bias.len();
    let mut out = uninit_buffer(n * w);
    let p = SharedMut(out.as_mut_ptr());
    par_rows(n, |r| {
        // SAFETY: chunk `r` of the buffer's capacity is written by this task only.
        let o = unsafe { rows_mut(p, &r, w) };
        fill_rows(base.map(|b| &b[r.start * w..r.end * w]), bias, o)
    });
    // SAFETY: the chunks cover all `n` rows, so every element was written.
    unsafe { out.set_len(n * w) };
    out
}

/// LayerNorm of the rows of `x` into `out` (`n x c`); writes the statistics into `st` when it is
/// `Ok`, reads them from it when it is `Err` (recomputation).
fn layer_norm(
    x: &[f32],
    g: &[f32],
    b: &[f32],
    out: &mut [f32],
    st: std::result::Result<&mut [f32], &[f32]>,
    eps: f32,
) {
    let c = g.len();
    let n = x.len() / c.max(1);
    let op = SharedMut(out.as_mut_ptr());
    match st {
        Ok(st) => {
            let sp = SharedMut(st.as_mut_ptr());
            par_rows(n, |r| {
                // SAFETY: rows `r` of `out` and of the statistics belong to this task.
                let (o, s) = unsafe { (rows_mut(op, &r, c), rows_mut(sp, &r, 2)) };
                ln_forward_rows(&x[r.start * c..r.end * c], g, b, o, s, eps)
            })
        }
        Err(st) => par_rows(n, |r| {
            // SAFETY: rows `r` of `out` belong to this task.
            let o = unsafe { rows_mut(op, &r, c) };
            let s = &st[r.start * 2..r.end * 2];
            ln_apply_rows(&x[r.start * c..r.end * c], s, g, b, o)
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// The op

/// What the forward saves for the backward (see the module docs).
struct Saved {
    st1: Vec<f32>,
    qkv: Vec<f32>,
    att: PackedState,
    o: Vec<f32>,
    x1: Vec<f32>,
    st2: Vec<f32>,
    g: Vec<f32>,
    gp: Vec<f32>,
}

/// The block op on `(x [B, L, C], flat parameters [P])`. One instance per call: it keeps what
/// its own forward saved.
pub(crate) struct FusedBlock {
    dims: BlockDims,
    eps: f32,
    scale: f32,
    padding: Option<Arc<Vec<f32>>>,
    /// Whether a backward may follow (otherwise nothing is saved and `gelu'` is not computed).
    train: bool,
    /// Whether the products (not attention's) run with bf16 operands ([`super::bf16`]).
    bf16: bool,
    saved: Mutex<Option<Arc<Saved>>>,
}

impl FusedBlock {
    pub(crate) fn new(
        dims: BlockDims,
        eps: f64,
        padding: Option<Vec<f32>>,
        train: bool,
        bf16: bool,
    ) -> Self {
        Self {
            dims,
            bf16,
            eps: eps as f32,
            scale: 1.0 / ((dims.c / dims.heads) as f32).sqrt(),
            padding: padding.map(Arc::new),
            train,
            saved: Mutex::new(None),
        }
    }

    fn check(&self, lx: &Layout, lp: &Layout) -> Result<()> {
        let d = self.dims;
        if lx.shape().dims() != [d.b, d.l, d.c] || lp.shape().dims() != [d.param_len()] {
            candle_core::bail!(
                "fused block: x {:?} and parameters {:?} do not match {d:?}",
                lx.shape(),
                lp.shape()
            );
        }
        if let Some(p) = &self.padding {
            if p.len() != d.n() {
                candle_core::bail!("fused block: {} padding values for {d:?}", p.len());
            }
        }
        Ok(())
    }

    fn forward(&self, x: &[f32], flat: &[f32]) -> (Vec<f32>, Option<Saved>) {
        let d = self.dims;
        let (n, c, m) = (d.n(), d.c, d.m);
        let [g1, b1, w_qkv, b_qkv, w_proj, b_proj, g2, b2, w_fc1, b_fc1, w_fc2, b_fc2] =
            split(flat, &d);
        let pad = self.padding.as_deref().map(|p| p.as_slice());
        let mut a = take(n * c);
        let mut st1 = vec![0f32; 2 * n];
        layer_norm(x, g1, b1, &mut a, Ok(&mut st1), self.eps);
        let mut qkv = filled(n, None, b_qkv);
        mm(
            self.bf16,
            (n, 3 * c, c),
            &mut qkv,
            true,
            (&a, c, 1),
            (w_qkv, 1, c),
        );
        let (o, att) = packed_forward(&qkv, pad, d.attention(), self.scale);
        let mut x1 = filled(n, Some(x), b_proj);
        mm(
            self.bf16,
            (n, c, c),
            &mut x1,
            true,
            (&o, c, 1),
            (w_proj, 1, c),
        );
        let mut st2 = vec![0f32; 2 * n];
        layer_norm(&x1, g2, b2, &mut a, Ok(&mut st2), self.eps);
        let mut h = filled(n, None, b_fc1);
        mm(
            self.bf16,
            (n, m, c),
            &mut h,
            true,
            (&a, c, 1),
            (w_fc1, 1, c),
        );
        give(a);
        let mut gp = if self.train {
            uninit_buffer(n * m)
        } else {
            Vec::new()
        };
        let (hp, gpp) = (SharedMut(h.as_mut_ptr()), SharedMut(gp.as_mut_ptr()));
        let train = self.train;
        par_rows(n, |r| {
            // SAFETY: rows `r` of `h` (and of `gp`'s capacity) belong to this task.
            let hr = unsafe { rows_mut(hp, &r, m) };
            let gr = train.then(|| unsafe { rows_mut(gpp, &r, m) });
            gelu_rows(hr, gr)
        });
        if train {
            // SAFETY: the chunks covered every row of `gp`.
            unsafe { gp.set_len(n * m) };
        }
        let mut y = filled(n, Some(&x1), b_fc2);
        mm(
            self.bf16,
            (n, c, m),
            &mut y,
            true,
            (&h, m, 1),
            (w_fc2, 1, m),
        );
        let saved = train.then_some(Saved {
            st1,
            qkv,
            att,
            o,
            x1,
            st2,
            g: h,
            gp,
        });
        (y, saved)
    }

    /// The gradients of `x` and of the flat parameters for the output gradient `dy`.
    fn backward(&self, s: &Saved, x: &[f32], flat: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let d = self.dims;
        let (n, c, m) = (d.n(), d.c, d.m);
        let [g1, b1, w_qkv, _, w_proj, _, g2, b2, w_fc1, _, w_fc2, _] = split(flat, &d);
        let mut dflat = zeroed_buffer(d.param_len());
        let [dg1, db1, dw_qkv, db_qkv, dw_proj, db_proj, dg2, db2, dw_fc1, db_fc1, dw_fc2, db_fc2] =
            split_mut(&mut dflat, &d);
        let pad = self.padding.as_deref().map(|p| p.as_slice());

        // MLP: dW2 = dy^T g, dh = (dy W2) * gelu'(h), db1 = colsum(dh)
        mm(
            self.bf16,
            (c, m, n),
            dw_fc2,
            false,
            (dy, 1, c),
            (&s.g, m, 1),
        );
        let mut dh = take(n * m);
        mm(
            self.bf16,
            (n, m, c),
            &mut dh,
            false,
            (dy, c, 1),
            (w_fc2, m, 1),
        );
        let dhp = SharedMut(dh.as_mut_ptr());
        let sums = par_rows_sum(n, m, |r, part| {
            // SAFETY: rows `r` of `dh` belong to this task.
            let rows = unsafe { rows_mut(dhp, &r, m) };
            gelu_backward_rows(rows, &s.gp[r.start * m..r.end * m], part)
        });
        db_fc1.copy_from_slice(&sums);
        // fc1: dW1 = dh^T LN2(x1) (recomputed), da2 = dh W1
        let mut a = take(n * c);
        layer_norm(&s.x1, g2, b2, &mut a, Err(&s.st2), self.eps);
        mm(self.bf16, (m, c, n), dw_fc1, false, (&dh, 1, m), (&a, c, 1));
        let mut da = take(n * c);
        mm(
            self.bf16,
            (n, c, m),
            &mut da,
            false,
            (&dh, m, 1),
            (w_fc1, c, 1),
        );
        give(dh);
        // LayerNorm 2 + residual: dx1 = dy + LN2'(da2); dgamma2, dbeta2, db_fc2 = colsum(dy),
        // db_proj = colsum(dx1)
        let mut dx1 = take(n * c);
        let dxp = SharedMut(dx1.as_mut_ptr());
        let sums = par_rows_sum(n, 4 * c, |r, part| {
            let rows = r.start * c..r.end * c;
            // SAFETY: rows `r` of `dx1` belong to this task.
            let out = unsafe { rows_mut(dxp, &r, c) };
            let (pg, rest) = part.split_at_mut(c);
            let (pb, rest) = rest.split_at_mut(c);
            let (py, px) = rest.split_at_mut(c);
            let st = &s.st2[r.start * 2..r.end * 2];
            let (x1, da, dyr) = (&s.x1[rows.clone()], &da[rows.clone()], &dy[rows]);
            ln_backward_rows(x1, st, g2, da, dyr, out, pg, pb);
            col_sum_rows(dyr, py);
            col_sum_rows(out, px);
        });
        dg2.copy_from_slice(&sums[..c]);
        db2.copy_from_slice(&sums[c..2 * c]);
        db_fc2.copy_from_slice(&sums[2 * c..3 * c]);
        db_proj.copy_from_slice(&sums[3 * c..]);
        // projection: dW = dx1^T o, do = dx1 Wp
        mm(
            self.bf16,
            (c, c, n),
            dw_proj,
            false,
            (&dx1, 1, c),
            (&s.o, c, 1),
        );
        let mut d_o = take(n * c);
        mm(
            self.bf16,
            (n, c, c),
            &mut d_o,
            false,
            (&dx1, c, 1),
            (w_proj, c, 1),
        );
        // attention
        let dqkv = packed_backward(&s.qkv, &s.o, &d_o, &s.att, pad, d.attention(), self.scale);
        give(d_o);
        // qkv: LN1(x) recomputed together with db_qkv = colsum(dqkv); dW = dqkv^T a1,
        // da1 = dqkv Wqkv
        let ap = SharedMut(a.as_mut_ptr());
        let sums = par_rows_sum(n, 3 * c, |r, part| {
            // SAFETY: rows `r` of `a` belong to this task.
            let out = unsafe { rows_mut(ap, &r, c) };
            let st = &s.st1[r.start * 2..r.end * 2];
            ln_apply_rows(&x[r.start * c..r.end * c], st, g1, b1, out);
            col_sum_rows(&dqkv[r.start * 3 * c..r.end * 3 * c], part);
        });
        db_qkv.copy_from_slice(&sums);
        mm(
            self.bf16,
            (3 * c, c, n),
            dw_qkv,
            false,
            (&dqkv, 1, 3 * c),
            (&a, c, 1),
        );
        mm(
            self.bf16,
            (n, c, 3 * c),
            &mut da,
            false,
            (&dqkv, 3 * c, 1),
            (w_qkv, c, 1),
        );
        give(a);
        // LayerNorm 1 + residual: dx = dx1 + LN1'(da1)
        let mut dx = uninit_buffer(n * c);
        let dxp = SharedMut(dx.as_mut_ptr());
        let sums = par_rows_sum(n, 2 * c, |r, part| {
            let rows = r.start * c..r.end * c;
            // SAFETY: rows `r` of `dx`'s capacity belong to this task.
            let out = unsafe { rows_mut(dxp, &r, c) };
            let (pg, pb) = part.split_at_mut(c);
            let st = &s.st1[r.start * 2..r.end * 2];
            ln_backward_rows(
                &x[rows.clone()],
                st,
                g1,
                &da[rows.clone()],
                &dx1[rows],
                out,
                pg,
                pb,
            );
        });
        // SAFETY: the chunks covered every row.
        unsafe { dx.set_len(n * c) };
        dg1.copy_from_slice(&sums[..c]);
        db1.copy_from_slice(&sums[c..]);
        give(da);
        give(dx1);
        (dx, dflat)
    }
}

impl CustomOp2 for FusedBlock {
    fn name(&self) -> &'static str {
        "m3ae-fused-transformer-block"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sp: &CpuStorage,
        lp: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check(lx, lp)?;
        let (x, flat) = (f32_slice(sx, lx)?, f32_slice(sp, lp)?);
        // On a rayon worker, so that GEMMs and row passes share one pool (`for_each_index`).
        let (y, saved) = rayon::scope(|_| self.forward(x, flat));
        *self.saved.lock().expect("saved state") = saved.map(Arc::new);
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        flat: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .saved
            .lock()
            .expect("saved state")
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("fused block: backward without a training forward".into())
            })?;
        let dy = grad.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ps, pl) = flat.storage_and_layout();
        let (gs, gl) = dy.storage_and_layout();
        let (xv, pv, gv) = (
            storage_slice(&xs, xl)?,
            storage_slice(&ps, pl)?,
            storage_slice(&gs, gl)?,
        );
        let (dx, dflat) = rayon::scope(|_| self.backward(&saved, xv, pv, gv));
        drop((xs, ps, gs));
        Ok((
            Some(output(dx, x.shape(), x.device())?),
            Some(output(dflat, flat.shape(), flat.device())?),
        ))
    }
}
