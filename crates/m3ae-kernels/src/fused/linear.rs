//! Fused dense layer `y = x W^T + b` (CPU) whose forward and backward call the GEMM directly on
//! contiguous buffers: forward one GEMM into a bias-initialised output; backward
//! `dX = dY W`, `dW = dY^T X` and `db = colsum(dY)` (fixed-order reduction). With bf16 products
//! the three GEMMs take bf16-rounded operands and sum in f32 ([`super::bf16`]).

use super::storage::{f32_slice, output, storage_slice, zeroed_buffer};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

pub(crate) struct FusedLinear {
    /// Whether the products take bf16-rounded operands ([`super::bf16`]).
    pub(crate) bf16: bool,
}

pub(super) fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// `dst (m x n, row-major) = [dst +] lhs (m x k, strides rs/cs) * rhs (k x n, strides rs/cs)`
/// ([`product`]).
#[allow(clippy::too_many_arguments)]
fn gemm_into(
    bf16: bool,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    (lrs, lcs): (usize, usize),
    rhs: &[f32],
    (rrs, rcs): (usize, usize),
) {
    product(
        bf16,
        (m, n, k),
        (dst, n),
        accumulate,
        (lhs, lrs, lcs),
        (rhs, rrs, rcs),
    );
}

/// `dst (m x n, row stride drs) = [dst +] lhs (m x k) * rhs (k x n)`, operands as (slice, row
/// stride, column stride): with `bf16`, on bf16-rounded operands ([`super::bf16::gemm`]), else
/// the f32 GEMM, on rayon when large enough. The products of the dense layer and the one-op
/// block.
pub(super) fn product(
    bf16: bool,
    shape: (usize, usize, usize),
    dst: (&mut [f32], usize),
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
) {
    if bf16 {
        super::bf16::gemm(shape, dst, accumulate, lhs, rhs)
    } else {
        let (m, n, k) = shape;
        gemm_strided(shape, dst, accumulate, lhs, rhs, parallelism(m, n, k))
    }
}

/// Does a product with no terms (`m`, `n` or `k` zero), if it is one: with `k = 0` the result is
/// zero (`dst` cleared, or left as it is when accumulating). Returns whether it was.
pub(super) fn empty_product(
    (m, n, k): (usize, usize, usize),
    (dst, drs): (&mut [f32], usize),
    accumulate: bool,
) -> bool {
    if m == 0 || n == 0 {
        return true;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * drs..i * drs + n].fill(0.0);
            }
        }
        return true;
    }
    false
}

/// `dst (m x n, row stride drs) = [dst +] lhs (m x k) * rhs (k x n)` with any strides: the one
/// checked entry to the `gemm` crate of the fused ops (dense layer, text head).
pub(super) fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    (dst, drs): (&mut [f32], usize),
    accumulate: bool,
    (lhs, lrs, lcs): (&[f32], usize, usize),
    (rhs, rrs, rcs): (&[f32], usize, usize),
    par: gemm::Parallelism,
) {
    if empty_product((m, n, k), (dst, drs), accumulate) {
        return;
    }
    assert!(dst.len() >= (m - 1) * drs + n);
    assert!(lhs.len() > (m - 1) * lrs + (k - 1) * lcs);
    assert!(rhs.len() > (k - 1) * rrs + (n - 1) * rcs);
    // SAFETY: the asserts above check that every element the strides address lies inside its
    // slice; `dst` is a unique borrow, so it does not overlap the operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            drs as isize,
            accumulate,
            lhs.as_ptr(),
            lcs as isize,
            lrs as isize,
            rhs.as_ptr(),
            rcs as isize,
            rrs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

fn dims(lx: &Layout, lw: &Layout, lb: &Layout) -> Result<(usize, usize, usize)> {
    let (rows, inp) = lx.shape().dims2()?;
    let (out, inp2) = lw.shape().dims2()?;
    if inp != inp2 || lb.shape().dims() != [out] {
        candle_core::bail!(
            "fused linear: x {:?}, weight {:?}, bias {:?} do not agree",
            lx.shape(),
            lw.shape(),
            lb.shape()
        );
    }
    Ok((rows, inp, out))
}

impl CustomOp3 for FusedLinear {
    fn name(&self) -> &'static str {
        "m3ae-fused-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, inp, out) = dims(lx, lw, lb)?;
        let (x, w, b) = (f32_slice(sx, lx)?, f32_slice(sw, lw)?, f32_slice(sb, lb)?);
        let mut y = zeroed_buffer(rows * out);
        y.par_chunks_mut(out.max(1) * 64).for_each(|c| {
            for r in c.chunks_exact_mut(out) {
                r.copy_from_slice(b);
            }
        });
        gemm_into(
            self.bf16,
            rows,
            out,
            inp,
            &mut y,
            true,
            x,
            (inp, 1),
            w,
            (1, inp),
        );
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = grad.contiguous()?;
        let (rows, inp) = x.dims2()?;
        let out = w.dim(0)?;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (ds, dl) = dy.storage_and_layout();
        let (xv, wv, dv) = (
            storage_slice(&xs, xl)?,
            storage_slice(&ws, wl)?,
            storage_slice(&ds, dl)?,
        );
        let mut dx = zeroed_buffer(rows * inp);
        gemm_into(
            self.bf16,
            rows,
            inp,
            out,
            &mut dx,
            false,
            dv,
            (out, 1),
            wv,
            (inp, 1),
        );
        let mut dw = zeroed_buffer(out * inp);
        gemm_into(
            self.bf16,
            out,
            inp,
            rows,
            &mut dw,
            false,
            dv,
            (1, out),
            xv,
            (inp, 1),
        );
        // bias: column sums over fixed 256-row chunks, added in chunk order
        let partials: Vec<Vec<f32>> = dv
            .par_chunks(256 * out.max(1))
            .map(|c| {
                let mut s = vec![0f32; out];
                for r in c.chunks_exact(out) {
                    for (a, v) in s.iter_mut().zip(r) {
                        *a += v;
                    }
                }
                s
            })
            .collect();
        let mut db = vec![0f32; out];
        for p in &partials {
            for (a, v) in db.iter_mut().zip(p) {
                *a += v;
            }
        }
        drop((xs, ws, ds));
        Ok((
            Some(output(dx, x.shape(), x.device())?),
            Some(output(dw, w.shape(), w.device())?),
            Some(output(db, b.shape(), b.device())?),
        ))
    }
}
