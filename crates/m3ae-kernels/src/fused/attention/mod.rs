//! Fused masked attention (CPU): forward and FlashAttention-2 style backward.
//!
//! Work is split over `(batch, head)` pairs (`for_each_index`: candle's worker pool or rayon);
//! each task owns whole heads. A task first
//! transposes `K` (and, for the backward, `V`) of its head into `Dh x L` panels in per-thread
//! scratch (reused across calls). Queries are then processed in tiles of at most [`QUERY_TILE`]
//! rows (the tiles of a head are made as even as possible). The score tile lives in scratch, the
//! softmax is exact per row, and only the row maximum and the log of the row sum are kept for the
//! backward pass (no `[B, H, L, L]` tensor is ever stored); the forward leaves `P` unnormalised and
//! scales the rows of `O = P V` instead. The products run on the register-blocked AVX2+FMA
//! micro-kernel of [`super::tile`] and the row passes (masking, `exp`, sums) on the AVX2 code of
//! [`super::rows`], with scalar loops on other CPUs. The micro-kernel reads its left operand
//! through arbitrary strides, so `P^T` and `dS^T` come from the row-major tiles without copies,
//! and its right operand by rows, so `Q`, `K`, `V` and `dO` are read in place when the head width
//! is a multiple of 8 (otherwise they are packed at a padded row stride). Two input layouts are
//! served: separate `[B, H, L, Dh]` tensors, or the packed output of the qkv projection
//! `[B, L, 3 D]` read in place (writing `[B, L, D]`, heads concatenated). Each task first asks
//! the CPU to prefetch the rows of the next head into L2, so a head does not start with misses.
//!
//! The backward recomputes each probability tile from the saved statistics and reuses it for
//! `dV` and `dS`; `delta = rowsum(dO * O)` is computed per tile. The output gradient is read
//! through its own strides whatever its layout (strided or broadcast: no `contiguous()` copy).
//! `dQ` of a tile is written straight to its place; `dK` and `dV` of a head are
//! written by its first query tile and accumulated by the later ones in place, so no buffer is
//! zero-filled and the outputs are allocated uninitialised. The summation order depends only on
//! the shapes, so results are bit-identical for any number of threads. Padding keys get the score
//! `-1e7` (replacement, as the official code), so a fully padded row attends uniformly; their
//! score gradient is zero.
//!
//! Padding keys are left out of the products altogether when a sample has some (most of M3AE's
//! text positions are padding), so the work of a head scales with its real keys. When only the
//! last keys are padding (the decoder's text) the kept rows are read and written in place;
//! otherwise (an encoder's randomly ordered kept tokens) they are gathered: `K`, `V` rows into
//! scratch, `dK`, `dV` accumulated there and scattered back. Padding rows of `dK`, `dV` are
//! zero. This is exact wherever a padding key's probability is zero in f32, which holds when a
//! row's best real score is more than [`SKIP_MARGIN`] above the padding score; a head with any
//! row below that runs over all keys instead (the backward repeats the decision from the saved
//! row maxima, and reuses the forward's list of kept keys).
//!
//! Attention dropout (`att_drop` in training, see [`mod@crate::dropout`]): the forward multiplies
//! each probability row by its mask after the softmax statistics are taken (`O = (P * M) V`;
//! the row maxima and log-sums saved for the backward are those of the undropped softmax), and
//! the backward regenerates the same mask from the key: `dV += (P * M)^T dO` and
//! `dS = (P * M) * dP - P * delta`, i.e. `P * (M * dP - delta)` (`delta = rowsum(dO * O)` is
//! still `sum_j P_j M_j dP_j`). The mask of a probability is indexed by the query row
//! `(b H + h) L + q` and the key's original index, so leaving padding keys out of the products
//! does not change it, and it is the reference path's mask.
//!
//! This module holds the two candle ops and what they share; the passes are in `forward` (one
//! head, then all heads) and `backward` (likewise), the leaving out of padding keys in `padding`,
//! and the per-thread scratch, tile size, row packing and prefetching in `tiling`.
//!
//! [`SKIP_MARGIN`]: padding::SKIP_MARGIN

mod backward;
mod forward;
mod padding;
mod tiling;

use super::storage::{f32_slice, output, storage_slice};
use crate::Dropout;
use backward::backward;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use forward::forward;
use padding::KeptKeys;
use std::sync::{Arc, Mutex};

/// Most query rows per tile (tiles of a head are made as even as possible below this).
pub const QUERY_TILE: usize = 72;

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

impl View {
    /// Pointers to the head's first q, k and v rows in the input buffers.
    ///
    /// # Safety
    /// The view must come from [`Packing::view`] of the buffers' own dims.
    unsafe fn inputs(&self, (q, k, v): (&[f32], &[f32], &[f32])) -> Ptrs3 {
        (
            q.as_ptr().add(self.q),
            k.as_ptr().add(self.k),
            v.as_ptr().add(self.v),
        )
    }
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

/// What the forward pass saves for the backward: per-row softmax statistics (max and log of the
/// shifted sum) and the kept keys of partly padded samples.
#[derive(Default)]
struct Stats {
    max: Vec<f32>,
    log_sum: Vec<f32>,
    kept: Option<KeptKeys>,
}

/// The output gradient as candle hands it over, read through its strides (it is often a
/// broadcast of ones, stride 0): the whole storage, and per `(b, h)` the offset of the head's
/// first element plus the row and column strides.
#[derive(Clone, Copy)]
struct GradView<'a> {
    data: &'a [f32],
    start: usize,
    /// Strides of batch, head, row and column.
    strides: [usize; 4],
}

impl GradView<'_> {
    fn head(&self, d: Dims, bh: usize) -> (usize, usize, usize) {
        let (b, h) = (bh / d.h, bh % d.h);
        let [sb, sh, sr, sc] = self.strides;
        (self.start + b * sb + h * sh, sr, sc)
    }
}

type Ptrs3 = (*const f32, *const f32, *const f32);

/// The full f32 data of a CPU tensor's storage with its layout's start offset and strides.
fn grad_view<'a>(s: &'a Storage, l: &Layout, strides: [usize; 4]) -> Result<GradView<'a>> {
    let data = match s {
        Storage::Cpu(c) => c.as_slice::<f32>()?,
        _ => candle_core::bail!("fused attention: only CPU tensors are supported"),
    };
    Ok(GradView {
        data,
        start: l.start_offset(),
        strides,
    })
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

/// What a packed attention forward ([`packed_forward`]) leaves for its backward: the per-row
/// softmax statistics and the kept keys (opaque outside this module).
pub(crate) struct PackedState(Stats);

/// Attention on a packed qkv buffer `[B, L, 3 H Dh]` (slices, for the fused transformer block):
/// returns the output `[B, L, H Dh]` and the state its backward needs. `pad`: `[B, L]`.
pub(crate) fn packed_forward(
    qkv: &[f32],
    pad: Option<&[f32]>,
    (b, l, h, dh): (usize, usize, usize, usize),
    scale: f32,
) -> (Vec<f32>, PackedState) {
    let d = Dims { b, h, l, dh };
    let (o, stats) = forward((qkv, qkv, qkv), Packing::Qkv, pad, d, scale, None);
    (o, PackedState(stats))
}

/// Backward of [`packed_forward`]: `o` its output, `dout` the contiguous output gradient
/// `[B, L, H Dh]`; returns the gradient of `qkv`, `[B, L, 3 H Dh]`.
pub(crate) fn packed_backward(
    qkv: &[f32],
    o: &[f32],
    dout: &[f32],
    state: &PackedState,
    pad: Option<&[f32]>,
    (b, l, h, dh): (usize, usize, usize, usize),
    scale: f32,
) -> Vec<f32> {
    let d = Dims { b, h, l, dh };
    let width = h * dh;
    let grad = GradView {
        data: dout,
        start: 0,
        strides: [l * width, dh, width, 1],
    };
    let mut g = backward(
        (qkv, qkv, qkv),
        o,
        grad,
        Packing::Qkv,
        &state.0,
        pad,
        d,
        scale,
        None,
    );
    g.pop().expect("one gradient buffer")
}

/// The op on separate `[B, H, L, Dh]` q, k, v. One instance per call: it keeps the statistics of
/// its own forward pass.
pub(crate) struct FusedAttention {
    scale: f32,
    padding: Option<Arc<Vec<f32>>>,
    dropout: Option<Dropout>,
    stats: Mutex<Option<Arc<Stats>>>,
}

impl FusedAttention {
    pub(crate) fn new(scale: f64, padding: Option<Vec<f32>>, dropout: Option<Dropout>) -> Self {
        Self {
            scale: scale as f32,
            padding: padding.map(Arc::new),
            dropout,
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
            self.dropout.as_ref(),
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
        let tensors = [q, k, v, res];
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let mut s = Vec::with_capacity(4);
        for (g, l) in &guards {
            s.push(storage_slice(g, l)?);
        }
        let (gs, gl) = grad_res.storage_and_layout();
        let st = gl.stride();
        let grad = grad_view(&gs, gl, [st[0], st[1], st[2], st[3]])?;
        let mut g = backward(
            (s[0], s[1], s[2]),
            s[3],
            grad,
            Packing::Separate,
            &stats,
            self.padding.as_deref().map(|p| p.as_slice()),
            d,
            self.scale,
            self.dropout.as_ref(),
        );
        drop((guards, gs));
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
    dropout: Option<Dropout>,
    stats: Mutex<Option<Arc<Stats>>>,
}

impl FusedQkvAttention {
    pub(crate) fn new(
        heads: usize,
        scale: f64,
        padding: Option<Vec<f32>>,
        dropout: Option<Dropout>,
    ) -> Self {
        Self {
            heads,
            scale: scale as f32,
            padding: padding.map(Arc::new),
            dropout,
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
            self.dropout.as_ref(),
        );
        *self.stats.lock().expect("stats lock") = Some(Arc::new(stats));
        Ok((CpuStorage::F32(o), Shape::from((d.b, d.l, d.h * d.dh))))
    }

    fn bwd(&self, qkv: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let stats = take_stats(&self.stats)?;
        let d = self.dims(qkv.shape())?;
        let (xs, xl) = qkv.storage_and_layout();
        let (os, ol) = res.storage_and_layout();
        let (gs, gl) = grad_res.storage_and_layout();
        let st = gl.stride();
        let grad = grad_view(&gs, gl, [st[0], d.dh * st[2], st[1], st[2]])?;
        let x = storage_slice(&xs, xl)?;
        let mut g = backward(
            (x, x, x),
            storage_slice(&os, ol)?,
            grad,
            Packing::Qkv,
            &stats,
            self.padding.as_deref().map(|p| p.as_slice()),
            d,
            self.scale,
            self.dropout.as_ref(),
        );
        drop((xs, os, gs));
        let dqkv = g.pop().expect("one gradient buffer");
        Ok(Some(output(dqkv, qkv.shape(), qkv.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn values(shape: &[usize], seed: usize) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Runs the op's forward on CPU storage and returns its output as a tensor.
    fn forward3(op: &FusedAttention, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (sq, lq) = q.storage_and_layout();
        let (sk, lk) = k.storage_and_layout();
        let (sv, lv) = v.storage_and_layout();
        let cpu = |s: &Storage| match s {
            Storage::Cpu(c) => c.clone(),
            _ => unreachable!(),
        };
        let (o, shape) = op
            .cpu_fwd(&cpu(&sq), lq, &cpu(&sk), lk, &cpu(&sv), lv)
            .unwrap();
        match o {
            CpuStorage::F32(o) => Tensor::from_vec(o, shape, &Device::Cpu).unwrap(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn strided_and_broadcast_output_gradients_match_contiguous_ones() {
        let (b, h, l, dh) = (2, 3, 21, 16);
        let (q, k, v) = (
            values(&[b, h, l, dh], 1),
            values(&[b, h, l, dh], 2),
            values(&[b, h, l, dh], 3),
        );
        let pad: Vec<f32> = (0..b * l).map(|i| (i % 5 == 3) as u8 as f32).collect();
        let op = FusedAttention::new(0.3, Some(pad.clone()), None);
        let res = forward3(&op, &q, &k, &v);
        // a gradient stored as [B, H, Dh, L] and transposed: column stride L
        let strided = values(&[b, h, dh, l], 4).transpose(2, 3).unwrap();
        let broadcast = Tensor::ones((), DType::F32, &Device::Cpu)
            .unwrap()
            .broadcast_as((b, h, l, dh))
            .unwrap();
        for grad in [strided, broadcast] {
            assert!(!grad.is_contiguous());
            let dense = grad.contiguous().unwrap();
            let a = op.bwd(&q, &k, &v, &res, &grad).unwrap();
            let e = op.bwd(&q, &k, &v, &res, &dense).unwrap();
            for (x, y) in [(a.0, e.0), (a.1, e.1), (a.2, e.2)] {
                assert_eq!(flat(&x.unwrap()), flat(&y.unwrap()));
            }
        }
        // the packed layout: [B, L, 3 D] in, gradient [B, L, D] stored as [B, D, L]
        let heads = 2;
        let qkv = values(&[b, l, 3 * heads * dh], 5);
        let op = FusedQkvAttention::new(heads, 0.3, Some(pad), None);
        let (s, lay) = qkv.storage_and_layout();
        let x = match &*s {
            Storage::Cpu(c) => c.clone(),
            _ => unreachable!(),
        };
        let (o, shape) = op.cpu_fwd(&x, lay).unwrap();
        drop(s);
        let res = match o {
            CpuStorage::F32(o) => Tensor::from_vec(o, shape, &Device::Cpu).unwrap(),
            _ => unreachable!(),
        };
        let grad = values(&[b, heads * dh, l], 6).transpose(1, 2).unwrap();
        let a = op.bwd(&qkv, &res, &grad).unwrap().unwrap();
        let e = op
            .bwd(&qkv, &res, &grad.contiguous().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(flat(&a), flat(&e));
    }
}
