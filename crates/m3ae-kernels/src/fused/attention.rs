//! Fused masked attention (CPU): forward and FlashAttention-2 style backward.
//!
//! Work is split over `(batch, head)` pairs with rayon. Inside a head, queries are processed in
//! tiles of [`QUERY_TILE`] rows against all keys: the score tile (`QUERY_TILE x L`) lives in a
//! per-task scratch buffer, the softmax is exact per row, and only the row maximum and the log of
//! the row sum are kept for the backward pass (no `[B, H, L, L]` tensor is ever stored). The
//! backward recomputes each probability tile from those statistics. The four products of a tile
//! run on the `gemm` crate (runtime-dispatched AVX2/AVX-512 micro-kernels) directly on strided
//! views, so the kernel reads two layouts without copies: separate `[B, H, L, Dh]` tensors, or the
//! packed output of the qkv projection `[B, L, 3 D]` (writing `[B, L, D]`, heads concatenated).
//! The elementwise parts are compiled for AVX2+FMA when available. Padding keys get the score
//! `-1e7` (replacement, as the official code), so a fully padded row attends uniformly; their
//! score gradient is zero.

use super::math;
use super::storage::{f32_slice, output, storage_slice};
use crate::reference::PADDING_SCORE;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Query rows per tile.
pub const QUERY_TILE: usize = 64;

#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    l: usize,
    dh: usize,
}

/// Where the rows of one head live: element offsets of q, k, v and the output for `(b, h)`, and
/// the row strides of the inputs and of the output.
#[derive(Debug, Clone, Copy)]
enum Packing {
    /// q, k, v, o are separate `[B, H, L, Dh]` buffers.
    Separate,
    /// q, k, v are column blocks of one `[B, L, 3 D]` buffer; o is `[B, L, D]`.
    Qkv,
}

#[derive(Debug, Clone, Copy)]
struct View {
    q: usize,
    k: usize,
    v: usize,
    o: usize,
    rs_in: usize,
    rs_out: usize,
}

impl Packing {
    fn view(self, d: Dims, bh: usize) -> View {
        let (b, h) = (bh / d.h, bh % d.h);
        match self {
            Packing::Separate => {
                let base = bh * d.l * d.dh;
                View {
                    q: base,
                    k: base,
                    v: base,
                    o: base,
                    rs_in: d.dh,
                    rs_out: d.dh,
                }
            }
            Packing::Qkv => {
                let width = d.h * d.dh;
                let base = b * d.l * 3 * width + h * d.dh;
                View {
                    q: base,
                    k: base + width,
                    v: base + 2 * width,
                    o: b * d.l * width + h * d.dh,
                    rs_in: 3 * width,
                    rs_out: width,
                }
            }
        }
    }
}

/// Per-row softmax statistics saved by the forward pass: max and log of the shifted sum.
#[derive(Debug, Default)]
struct Stats {
    max: Vec<f32>,
    log_sum: Vec<f32>,
}

/// A raw pointer that tasks share; each task touches a disjoint set of elements.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: tasks write disjoint (batch, head) regions; see `forward` / `backward`.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// `dst (m x n, row stride dst_rs) = [dst +] beta * lhs (m x k) * rhs (k x n)`, strides in elements.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    beta: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Replaces padded scores in a `rows x l` tile.
#[inline(always)]
fn mask_tile(s: &mut [f32], l: usize, pad: Option<&[f32]>) {
    if let Some(pad) = pad {
        for row in s.chunks_exact_mut(l) {
            for (x, &p) in row.iter_mut().zip(pad) {
                *x = if p > 0.0 { PADDING_SCORE as f32 } else { *x };
            }
        }
    }
}

/// Forward of one head. `q, k, v` point at the head's first row (row stride `rs_in`), `o` likewise
/// (`rs_out`); `max, log_sum`: `[l]`; `s`: scratch of `QUERY_TILE * l`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn head_fwd(
    (q, k, v): (*const f32, *const f32, *const f32),
    rs_in: usize,
    (o, rs_out): (*mut f32, usize),
    pad: Option<&[f32]>,
    d: Dims,
    scale: f32,
    (max, log_sum): (&mut [f32], &mut [f32]),
    s: &mut [f32],
) {
    let (l, dh) = (d.l, d.dh);
    let mut r0 = 0;
    while r0 < l {
        let bq = QUERY_TILE.min(l - r0);
        let s = &mut s[..bq * l];
        // S = scale * Q_tile K^T
        mm(
            bq,
            l,
            dh,
            s.as_mut_ptr(),
            l,
            false,
            q.add(r0 * rs_in),
            rs_in,
            1,
            k,
            1,
            rs_in,
            scale,
        );
        mask_tile(s, l, pad);
        for (i, row) in s.chunks_exact_mut(l).enumerate() {
            let m = math::max(row);
            for x in row.iter_mut() {
                *x = math::exp(*x - m);
            }
            let total = math::sum(row);
            let inv = 1.0 / total;
            for x in row.iter_mut() {
                *x *= inv;
            }
            max[r0 + i] = m;
            log_sum[r0 + i] = total.ln();
        }
        // O_tile = P V
        mm(
            bq,
            dh,
            l,
            o.add(r0 * rs_out),
            rs_out,
            false,
            s.as_ptr(),
            l,
            1,
            v,
            rs_in,
            1,
            1.0,
        );
        r0 += bq;
    }
}

/// Backward of one head: writes `dq` and accumulates into zeroed `dk`, `dv` (same strides as the
/// inputs); `o` and `dout` use the output stride.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn head_bwd(
    (q, k, v): (*const f32, *const f32, *const f32),
    rs_in: usize,
    (o, dout, rs_out): (*const f32, *const f32, usize),
    (max, log_sum): (&[f32], &[f32]),
    pad: Option<&[f32]>,
    d: Dims,
    scale: f32,
    (dq, dk, dv): (*mut f32, *mut f32, *mut f32),
    (p, dp, delta): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let (l, dh) = (d.l, d.dh);
    for (i, di) in delta.iter_mut().enumerate().take(l) {
        let a = std::slice::from_raw_parts(dout.add(i * rs_out), dh);
        let b = std::slice::from_raw_parts(o.add(i * rs_out), dh);
        *di = math::dot(a, b);
    }
    let mut r0 = 0;
    while r0 < l {
        let bq = QUERY_TILE.min(l - r0);
        let p = &mut p[..bq * l];
        let dp = &mut dp[..bq * l];
        mm(
            bq,
            l,
            dh,
            p.as_mut_ptr(),
            l,
            false,
            q.add(r0 * rs_in),
            rs_in,
            1,
            k,
            1,
            rs_in,
            scale,
        );
        mask_tile(p, l, pad);
        for (i, row) in p.chunks_exact_mut(l).enumerate() {
            let (m, ls) = (max[r0 + i], log_sum[r0 + i]);
            for x in row.iter_mut() {
                *x = math::exp((*x - m) - ls);
            }
        }
        let do_tile = dout.add(r0 * rs_out);
        // dV += P^T dO_tile
        mm(
            l,
            dh,
            bq,
            dv,
            rs_in,
            true,
            p.as_ptr(),
            1,
            l,
            do_tile,
            rs_out,
            1,
            1.0,
        );
        // dP = dO_tile V^T
        mm(
            bq,
            l,
            dh,
            dp.as_mut_ptr(),
            l,
            false,
            do_tile,
            rs_out,
            1,
            v,
            1,
            rs_in,
            1.0,
        );
        // dS = P * (dP - delta); zero where the score was replaced by the padding constant.
        for (i, (prow, dprow)) in p.chunks_exact(l).zip(dp.chunks_exact_mut(l)).enumerate() {
            let di = delta[r0 + i];
            for (g, &pv) in dprow.iter_mut().zip(prow) {
                *g = pv * (*g - di);
            }
            if let Some(pad) = pad {
                for (g, &pm) in dprow.iter_mut().zip(pad) {
                    *g = if pm > 0.0 { 0.0 } else { *g };
                }
            }
        }
        // dQ_tile = scale * dS K ; dK += scale * dS^T Q_tile
        mm(
            bq,
            dh,
            l,
            dq.add(r0 * rs_in),
            rs_in,
            false,
            dp.as_ptr(),
            l,
            1,
            k,
            rs_in,
            1,
            scale,
        );
        mm(
            l,
            dh,
            bq,
            dk,
            rs_in,
            true,
            dp.as_ptr(),
            1,
            l,
            q.add(r0 * rs_in),
            rs_in,
            1,
            scale,
        );
        r0 += bq;
    }
}

type Ptrs3 = (*const f32, *const f32, *const f32);

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn head_fwd_avx2(
    qkv: Ptrs3,
    rs_in: usize,
    out: (*mut f32, usize),
    pad: Option<&[f32]>,
    d: Dims,
    scale: f32,
    st: (&mut [f32], &mut [f32]),
    s: &mut [f32],
) {
    head_fwd(qkv, rs_in, out, pad, d, scale, st, s)
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn head_bwd_avx2(
    qkv: Ptrs3,
    rs_in: usize,
    od: (*const f32, *const f32, usize),
    st: (&[f32], &[f32]),
    pad: Option<&[f32]>,
    d: Dims,
    scale: f32,
    grads: (*mut f32, *mut f32, *mut f32),
    scratch: (&mut [f32], &mut [f32], &mut [f32]),
) {
    head_bwd(qkv, rs_in, od, st, pad, d, scale, grads, scratch)
}

/// Forward over all heads; inputs share one buffer (`Qkv`) or are three (`Separate`).
fn forward(
    inputs: (&[f32], &[f32], &[f32]),
    packing: Packing,
    pad: Option<&[f32]>,
    d: Dims,
    scale: f32,
) -> (Vec<f32>, Stats) {
    let (q, k, v) = inputs;
    let mut o = vec![0f32; d.b * d.h * d.l * d.dh];
    let mut max = vec![0f32; d.b * d.h * d.l];
    let mut log_sum = vec![0f32; d.b * d.h * d.l];
    let out = SharedMut(o.as_mut_ptr());
    max.par_chunks_mut(d.l)
        .zip(log_sum.par_chunks_mut(d.l))
        .enumerate()
        .for_each_init(
            || vec![0f32; QUERY_TILE * d.l],
            |s, (bh, (mx, ls))| {
                let vw = packing.view(d, bh);
                let pad = pad.map(|p| &p[(bh / d.h) * d.l..(bh / d.h + 1) * d.l]);
                // SAFETY: the view of (b, h) stays inside the buffers and no two tasks write the
                // same output element.
                unsafe {
                    let ptrs = (
                        q.as_ptr().add(vw.q),
                        k.as_ptr().add(vw.k),
                        v.as_ptr().add(vw.v),
                    );
                    let o_ptr = (out.ptr().add(vw.o), vw.rs_out);
                    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
                    if super::has_avx2_fma() {
                        return head_fwd_avx2(ptrs, vw.rs_in, o_ptr, pad, d, scale, (mx, ls), s);
                    }
                    head_fwd(ptrs, vw.rs_in, o_ptr, pad, d, scale, (mx, ls), s)
                }
            },
        );
    (o, Stats { max, log_sum })
}

/// Backward over all heads. Returns one gradient buffer (`Qkv`: `[B, L, 3 D]`) or three.
fn backward(
    inputs: (&[f32], &[f32], &[f32]),
    (o, dout): (&[f32], &[f32]),
    packing: Packing,
    stats: &Stats,
    pad: Option<&[f32]>,
    d: Dims,
    scale: f32,
) -> Vec<Vec<f32>> {
    let (q, k, v) = inputs;
    let n = d.b * d.h * d.l * d.dh;
    let mut grads: Vec<Vec<f32>> = match packing {
        Packing::Separate => vec![vec![0f32; n]; 3],
        Packing::Qkv => vec![vec![0f32; 3 * n]],
    };
    let ptrs: Vec<SharedMut> = grads
        .iter_mut()
        .map(|g| SharedMut(g.as_mut_ptr()))
        .collect();
    let (gq, gk, gv) = match packing {
        Packing::Separate => (ptrs[0], ptrs[1], ptrs[2]),
        Packing::Qkv => (ptrs[0], ptrs[0], ptrs[0]),
    };
    (0..d.b * d.h).into_par_iter().for_each_init(
        || {
            (
                vec![0f32; QUERY_TILE * d.l],
                vec![0f32; QUERY_TILE * d.l],
                vec![0f32; d.l],
            )
        },
        |(p, dp, delta), bh| {
            let vw = packing.view(d, bh);
            let rl = bh * d.l..(bh + 1) * d.l;
            let pad = pad.map(|p| &p[(bh / d.h) * d.l..(bh / d.h + 1) * d.l]);
            // SAFETY: as in `forward`: each task reads and writes only its own (b, h) view.
            unsafe {
                let ins = (
                    q.as_ptr().add(vw.q),
                    k.as_ptr().add(vw.k),
                    v.as_ptr().add(vw.v),
                );
                let od = (o.as_ptr().add(vw.o), dout.as_ptr().add(vw.o), vw.rs_out);
                let st = (&stats.max[rl.clone()], &stats.log_sum[rl]);
                let outs = (gq.ptr().add(vw.q), gk.ptr().add(vw.k), gv.ptr().add(vw.v));
                #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
                if super::has_avx2_fma() {
                    return head_bwd_avx2(
                        ins,
                        vw.rs_in,
                        od,
                        st,
                        pad,
                        d,
                        scale,
                        outs,
                        (p, dp, delta),
                    );
                }
                head_bwd(ins, vw.rs_in, od, st, pad, d, scale, outs, (p, dp, delta))
            }
        },
    );
    grads
}

fn take_stats(m: &Mutex<Option<Arc<Stats>>>) -> Result<Arc<Stats>> {
    m.lock()
        .expect("stats lock")
        .clone()
        .ok_or_else(|| candle_core::Error::Msg("fused attention: backward before forward".into()))
}

fn check_padding(p: &Option<Arc<Vec<f32>>>, d: Dims) -> Result<()> {
    if let Some(p) = p {
        if p.len() != d.b * d.l {
            candle_core::bail!(
                "fused attention: key padding has {} values, expected {}",
                p.len(),
                d.b * d.l
            );
        }
    }
    Ok(())
}

/// The op on separate `[B, H, L, Dh]` q, k, v. One instance per call: it keeps the statistics of
/// its own forward pass.
pub(crate) struct FusedAttention {
    scale: f32,
    padding: Option<Arc<Vec<f32>>>,
    stats: Mutex<Option<Arc<Stats>>>,
}

impl FusedAttention {
    pub(crate) fn new(scale: f64, padding: Option<Vec<f32>>) -> Self {
        Self {
            scale: scale as f32,
            padding: padding.map(Arc::new),
            stats: Mutex::new(None),
        }
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "m3ae-fused-masked-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, l, dh) = l1.shape().dims4()?;
        if l2.shape() != l1.shape() || l3.shape() != l1.shape() {
            candle_core::bail!(
                "fused attention: q {:?}, k {:?}, v {:?} must have one shape",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let d = Dims { b, h, l, dh };
        check_padding(&self.padding, d)?;
        let ins = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let (o, stats) = forward(
            ins,
            Packing::Separate,
            self.padding.as_deref().map(|p| p.as_slice()),
            d,
            self.scale,
        );
        *self.stats.lock().expect("stats lock") = Some(Arc::new(stats));
        Ok((CpuStorage::F32(o), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = take_stats(&self.stats)?;
        let (b, h, l, dh) = q.dims4()?;
        let d = Dims { b, h, l, dh };
        let grad = grad_res.contiguous()?;
        let tensors = [q, k, v, res, &grad];
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let mut s = Vec::with_capacity(5);
        for (g, l) in &guards {
            s.push(storage_slice(g, l)?);
        }
        let mut g = backward(
            (s[0], s[1], s[2]),
            (s[3], s[4]),
            Packing::Separate,
            &stats,
            self.padding.as_deref().map(|p| p.as_slice()),
            d,
            self.scale,
        );
        drop(guards);
        let shape = q.shape().clone();
        let (dv, dk, dq) = (g.pop(), g.pop(), g.pop());
        let mk = |x: Option<Vec<f32>>| -> Result<Option<Tensor>> {
            x.map(|x| output(x, &shape, q.device())).transpose()
        };
        Ok((mk(dq)?, mk(dk)?, mk(dv)?))
    }
}

/// The op on the packed qkv projection `[B, L, 3 D]` -> `[B, L, D]`.
pub(crate) struct FusedQkvAttention {
    heads: usize,
    scale: f32,
    padding: Option<Arc<Vec<f32>>>,
    stats: Mutex<Option<Arc<Stats>>>,
}

impl FusedQkvAttention {
    pub(crate) fn new(heads: usize, scale: f64, padding: Option<Vec<f32>>) -> Self {
        Self {
            heads,
            scale: scale as f32,
            padding: padding.map(Arc::new),
            stats: Mutex::new(None),
        }
    }

    fn dims(&self, shape: &Shape) -> Result<Dims> {
        let (b, l, c3) = shape.dims3()?;
        if self.heads == 0 || c3 % (3 * self.heads) != 0 {
            candle_core::bail!(
                "fused attention: qkv width {c3} is not 3 x heads ({}) x head dim",
                self.heads
            );
        }
        Ok(Dims {
            b,
            h: self.heads,
            l,
            dh: c3 / (3 * self.heads),
        })
    }
}

impl CustomOp1 for FusedQkvAttention {
    fn name(&self) -> &'static str {
        "m3ae-fused-qkv-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(l.shape())?;
        check_padding(&self.padding, d)?;
        let x = f32_slice(s, l)?;
        let (o, stats) = forward(
            (x, x, x),
            Packing::Qkv,
            self.padding.as_deref().map(|p| p.as_slice()),
            d,
            self.scale,
        );
        *self.stats.lock().expect("stats lock") = Some(Arc::new(stats));
        Ok((CpuStorage::F32(o), Shape::from((d.b, d.l, d.h * d.dh))))
    }

    fn bwd(&self, qkv: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let stats = take_stats(&self.stats)?;
        let d = self.dims(qkv.shape())?;
        let grad = grad_res.contiguous()?;
        let (xs, xl) = qkv.storage_and_layout();
        let (os, ol) = res.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let x = storage_slice(&xs, xl)?;
        let mut g = backward(
            (x, x, x),
            (storage_slice(&os, ol)?, storage_slice(&gs, gl)?),
            Packing::Qkv,
            &stats,
            self.padding.as_deref().map(|p| p.as_slice()),
            d,
            self.scale,
        );
        drop((xs, os, gs));
        let dqkv = g.pop().expect("one gradient buffer");
        Ok(Some(output(dqkv, qkv.shape(), qkv.device())?))
    }
}
