//! Fused text-head loss (CPU): `sum_i w_i * -log softmax(h_i W^T + b)[t_i]` and the weighted
//! accuracy, without ever storing the `N x V` logits.
//!
//! **Why.** M3AE predicts a word at every text position over the whole vocabulary (30,522 words
//! for BERT). Composed from candle ops, the text head writes an `N x V` logits tensor, its
//! log-softmax, and in the backward as many gradient tensors of that size: hundreds of MB per
//! step that are faulted in, written once and read once, at a fraction of the GEMM speed. Only
//! the rows the loss counts (masked, non-padding tokens) matter, and of a row's `V` logits only
//! its log-sum-exp, its target logit and its argmax.
//!
//! **What is computed.** The rows with a non-zero weight are gathered (`M` of the `N` rows; the
//! others get a zero gradient and are never multiplied). With `s_ij = h_i . w_j + b_j`:
//! loss `= sum_i w_i (lse_i - s_i,t_i)` and accuracy `= sum_i w_i [argmax_j s_ij = t_i]` (ties
//! go to the smallest index, as candle's `argmax`; a row with any NaN logit is never correct and
//! its loss is NaN). The op's output is the pair `[loss, accuracy]`; only the loss carries a
//! gradient.
//!
//! **Tiling.** The vocabulary is cut into tiles of [`VOCAB_TILE`] words and the tiles into at
//! most [`MAX_TASKS`] contiguous ranges, one parallel task each (the split depends only on `V`,
//! so results are bit-identical for any number of threads). A task walks its tiles; for each tile
//! it walks the gathered rows in tiles of [`ROW_TILE`], computing the logit tile `S = H_r W_v^T +
//! b_v` with one GEMM into scratch (the `W_v` tile stays in cache across the row tiles).
//! - Forward: per row and tile, the tile's maximum, first arg-max and sum of `exp(s - max)`
//!   update the row's running maximum and sum (online log-sum-exp); the target logit is read
//!   when the target falls in the tile. The tasks' per-row partials are merged in vocabulary
//!   order. Only the row maximum and `ln(sum)` (and the gathered rows) are kept for the backward.
//! - Backward (the output gradient `g` is a scalar): the logit tile is recomputed and turned in
//!   place into `G = g w_i (softmax - onehot(t_i))`; then `dW_v += G^T H_r` and `db_v +=
//!   colsum(G)` (each task owns its vocabulary rows) and `dH_r += G W_v` into a per-task partial
//!   of `M x D`, summed in task order at the end and scattered back to the `N` rows.
//!
//! Memory beyond the inputs and gradients: one `ROW_TILE x VOCAB_TILE` scratch tile and (backward)
//! one `M x D` partial per task. FLOPs: `2 M V D` forward, `6 M V D` backward.

use super::storage::{f32_slice, output, storage_slice, zeroed_buffer};
use super::{for_each_index, math, rows, SharedMut};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// Words per vocabulary tile (a multiple of 8).
pub const VOCAB_TILE: usize = 256;
/// Gathered rows per row tile.
pub const ROW_TILE: usize = 256;
/// Most parallel tasks (contiguous ranges of vocabulary tiles).
pub const MAX_TASKS: usize = 16;

/// [`super::linear::gemm_strided`] single-threaded: the callers run inside parallel tasks.
pub(super) fn gemm_serial(
    dims: (usize, usize, usize),
    dst: (&mut [f32], usize),
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
) {
    super::linear::gemm_strided(dims, dst, accumulate, lhs, rhs, gemm::Parallelism::None);
}

/// Runs the `n` vocabulary tasks on rayon, one task per work item: each task is long (tens of
/// ms at BERT's vocabulary), so work stealing evens out threads slowed by other processes, where
/// a static split would wait for the slowest thread.
pub(super) fn run_tasks(n: usize, f: impl Fn(usize) + Sync + Send) {
    use rayon::prelude::*;
    (0..n).into_par_iter().with_max_len(1).for_each(f);
}

/// The contiguous ranges of vocabulary tiles, one per task.
pub(super) fn task_ranges(v: usize) -> Vec<std::ops::Range<usize>> {
    let tiles = v.div_ceil(VOCAB_TILE);
    let n = tiles.clamp(1, MAX_TASKS);
    (0..n).map(|k| k * tiles / n..(k + 1) * tiles / n).collect()
}

/// Problem sizes and the gathered rows' targets and weights.
struct Problem<'a> {
    m: usize,
    d: usize,
    v: usize,
    h: &'a [f32],
    w: &'a [f32],
    b: &'a [f32],
    targets: &'a [u32],
}

impl Problem<'_> {
    /// Logit tile of rows `r0..r0 + rn` and words `v0..v0 + l` into `s` (row stride
    /// [`VOCAB_TILE`]).
    fn logits(&self, s: &mut [f32], (r0, rn): (usize, usize), (v0, l): (usize, usize)) {
        let d = self.d;
        for i in 0..rn {
            s[i * VOCAB_TILE..i * VOCAB_TILE + l].copy_from_slice(&self.b[v0..v0 + l]);
        }
        gemm_serial(
            (rn, l, d),
            (s, VOCAB_TILE),
            true,
            (&self.h[r0 * d..(r0 + rn) * d], d, 1),
            (&self.w[v0 * d..(v0 + l) * d], 1, d),
        );
    }
}

/// Running per-row statistics of the forward over part of the vocabulary.
#[derive(Debug, Clone, Copy)]
struct Partial {
    max: f32,
    sum: f32,
    best: f32,
    best_idx: u32,
    nan: bool,
    target: Option<f32>,
}

impl Partial {
    const EMPTY: Partial = Partial {
        max: f32::NEG_INFINITY,
        sum: 0.0,
        best: f32::NEG_INFINITY,
        best_idx: u32::MAX,
        nan: false,
        target: None,
    };

    /// Adds a block with maximum `m` and sum `s` of `exp(x - m)` (online log-sum-exp).
    /// (A block's sum is at least 1, the term of its maximum; 0 marks an empty block.)
    fn add_exp(&mut self, m: f32, s: f32) {
        if s == 0.0 {
            return;
        }
        if self.sum == 0.0 {
            (self.max, self.sum) = (m, s);
        } else if m > self.max {
            self.sum = self.sum * (self.max - m).exp() + s;
            self.max = m;
        } else {
            self.sum += s * (m - self.max).exp();
        }
    }

    /// Merges the statistics of a later part of the vocabulary.
    fn merge(&mut self, o: &Partial) {
        self.add_exp(o.max, o.sum);
        if o.best > self.best {
            (self.best, self.best_idx) = (o.best, o.best_idx);
        }
        self.nan |= o.nan;
        if o.target.is_some() {
            self.target = o.target;
        }
    }
}

/// What the forward keeps for the backward.
struct Saved {
    /// The gathered rows, `M x D`.
    h: Vec<f32>,
    /// Per gathered row: maximum logit and `ln(sum exp(s - max))`; NaN rows are flagged.
    max: Vec<f32>,
    log_sum: Vec<f32>,
    nan: Vec<bool>,
}

fn forward(p: &Problem) -> Vec<Partial> {
    let simd = super::has_avx2_fma();
    let ranges = task_ranges(p.v);
    let parts: Vec<Mutex<Vec<Partial>>> = ranges.iter().map(|_| Mutex::new(Vec::new())).collect();
    run_tasks(ranges.len(), |k| {
        let mut part = vec![Partial::EMPTY; p.m];
        let mut s = vec![0f32; ROW_TILE.min(p.m.max(1)) * VOCAB_TILE];
        for tile in ranges[k].clone() {
            let v0 = tile * VOCAB_TILE;
            let l = VOCAB_TILE.min(p.v - v0);
            for r0 in (0..p.m).step_by(ROW_TILE) {
                let rn = ROW_TILE.min(p.m - r0);
                p.logits(&mut s, (r0, rn), (v0, l));
                for i in 0..rn {
                    let full = &mut s[i * VOCAB_TILE..(i + 1) * VOCAB_TILE];
                    let row = &full[..l];
                    let st = &mut part[r0 + i];
                    if math::sum(row).is_nan() {
                        st.nan = true;
                        continue;
                    }
                    let m = math::max(row);
                    if m > st.best {
                        let j = row.iter().position(|&x| x == m).unwrap_or(0);
                        (st.best, st.best_idx) = (m, (v0 + j) as u32);
                    }
                    let t = p.targets[r0 + i] as usize;
                    if (v0..v0 + l).contains(&t) {
                        st.target = Some(row[t - v0]);
                    }
                    // SAFETY: `full` holds `VOCAB_TILE` floats, a multiple of 8 and at least `l`.
                    let (me, se) = unsafe { rows::softmax(simd, full.as_mut_ptr(), l, None, 0.0) };
                    st.add_exp(me, se);
                }
            }
        }
        *parts[k].lock().expect("partials lock") = part;
    });
    let mut acc = vec![Partial::EMPTY; p.m];
    for part in parts {
        let part = part.into_inner().expect("partials lock");
        for (a, o) in acc.iter_mut().zip(&part) {
            a.merge(o);
        }
    }
    acc
}

/// The fused op on `(hidden [N, D], weight [V, D], bias [V])`; output `[2]` = `[loss, accuracy]`.
/// One instance per call: it keeps the statistics of its own forward pass.
pub(crate) struct FusedTextHeadLoss {
    /// Indices (into the `N` rows) of the rows with a non-zero weight.
    rows: Vec<u32>,
    /// Target word of each gathered row.
    targets: Vec<u32>,
    /// Weight of each gathered row.
    weights: Vec<f32>,
    saved: Mutex<Option<Arc<Saved>>>,
}

impl FusedTextHeadLoss {
    pub(crate) fn new(rows: Vec<u32>, targets: Vec<u32>, weights: Vec<f32>) -> Self {
        Self {
            rows,
            targets,
            weights,
            saved: Mutex::new(None),
        }
    }

    fn dims(&self, lh: &Layout, lw: &Layout, lb: &Layout) -> Result<(usize, usize, usize)> {
        let (n, d) = lh.shape().dims2()?;
        let (v, d2) = lw.shape().dims2()?;
        if d != d2 || lb.shape().dims() != [v] {
            candle_core::bail!(
                "fused text head: hidden {:?}, weight {:?}, bias {:?} do not agree",
                lh.shape(),
                lw.shape(),
                lb.shape()
            );
        }
        if self.rows.iter().any(|&r| r as usize >= n)
            || self.targets.iter().any(|&t| t as usize >= v)
        {
            candle_core::bail!("fused text head: a row or target index is out of range");
        }
        Ok((n, d, v))
    }
}

impl CustomOp3 for FusedTextHeadLoss {
    fn name(&self) -> &'static str {
        "m3ae-fused-text-head-loss"
    }

    fn cpu_fwd(
        &self,
        sh: &CpuStorage,
        lh: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, d, v) = self.dims(lh, lw, lb)?;
        let (hidden, w, b) = (f32_slice(sh, lh)?, f32_slice(sw, lw)?, f32_slice(sb, lb)?);
        let m = self.rows.len();
        let mut h = Vec::with_capacity(m * d);
        for &r in &self.rows {
            let r = r as usize;
            h.extend_from_slice(&hidden[r * d..(r + 1) * d]);
        }
        let p = Problem {
            m,
            d,
            v,
            h: &h,
            w,
            b,
            targets: &self.targets,
        };
        let stats = forward(&p);
        let (mut loss, mut acc) = (0f64, 0f64);
        let mut saved = Saved {
            h: Vec::new(),
            max: Vec::with_capacity(m),
            log_sum: Vec::with_capacity(m),
            nan: Vec::with_capacity(m),
        };
        for ((st, &t), &wi) in stats.iter().zip(&self.targets).zip(&self.weights) {
            let log_sum = st.sum.ln();
            let nan = st.nan || st.target.is_none();
            let nll = if nan {
                f32::NAN
            } else {
                (st.max - st.target.unwrap_or(f32::NAN)) + log_sum
            };
            loss += wi as f64 * nll as f64;
            if !nan && st.best_idx == t {
                acc += wi as f64;
            }
            saved.max.push(st.max);
            saved.log_sum.push(log_sum);
            saved.nan.push(nan);
        }
        saved.h = h;
        *self.saved.lock().expect("saved lock") = Some(Arc::new(saved));
        Ok((
            CpuStorage::F32(vec![loss as f32, acc as f32]),
            Shape::from(2),
        ))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .saved
            .lock()
            .expect("saved lock")
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("fused text head: backward before forward".into())
            })?;
        let g = grad.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?[0];
        let (n, d) = hidden.dims2()?;
        let v = weight.dim(0)?;
        let m = self.rows.len();
        let (ws, wl) = weight.storage_and_layout();
        let (bs, bl) = bias.storage_and_layout();
        let (w, b) = (storage_slice(&ws, wl)?, storage_slice(&bs, bl)?);
        let p = Problem {
            m,
            d,
            v,
            h: &saved.h,
            w,
            b,
            targets: &self.targets,
        };
        // per-row factor of the logit gradient; NaN for NaN rows so their gradients are NaN
        let scale: Vec<f32> = self
            .weights
            .iter()
            .zip(&saved.nan)
            .map(|(&wi, &nan)| if nan { f32::NAN } else { g * wi })
            .collect();
        let mut dw = zeroed_buffer(v * d);
        let mut db = vec![0f32; v];
        let (dwp, dbp) = (SharedMut(dw.as_mut_ptr()), SharedMut(db.as_mut_ptr()));
        let simd = super::has_avx2_fma();
        let ranges = task_ranges(v);
        let parts: Vec<Mutex<Vec<f32>>> = ranges.iter().map(|_| Mutex::new(Vec::new())).collect();
        run_tasks(ranges.len(), |k| {
            let mut dh = vec![0f32; m * d];
            let mut s = vec![0f32; ROW_TILE.min(m.max(1)) * VOCAB_TILE];
            for tile in ranges[k].clone() {
                let v0 = tile * VOCAB_TILE;
                let l = VOCAB_TILE.min(v - v0);
                // SAFETY: the vocabulary tiles of different tasks are disjoint, so each task
                // writes only its own rows of `dw` and entries of `db`, which outlive the call.
                let (dwv, dbv) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(dwp.ptr().add(v0 * d), l * d),
                        std::slice::from_raw_parts_mut(dbp.ptr().add(v0), l),
                    )
                };
                for r0 in (0..m).step_by(ROW_TILE) {
                    let rn = ROW_TILE.min(m - r0);
                    p.logits(&mut s, (r0, rn), (v0, l));
                    for i in 0..rn {
                        let r = r0 + i;
                        let full = &mut s[i * VOCAB_TILE..(i + 1) * VOCAB_TILE];
                        // SAFETY: as in the forward.
                        unsafe {
                            rows::probabilities(
                                simd,
                                full.as_mut_ptr(),
                                l,
                                None,
                                0.0,
                                (saved.max[r], saved.log_sum[r]),
                            )
                        };
                        let row = &mut full[..l];
                        let c = scale[r];
                        for x in row.iter_mut() {
                            *x *= c;
                        }
                        let t = self.targets[r] as usize;
                        if (v0..v0 + l).contains(&t) {
                            row[t - v0] -= c;
                        }
                        for (a, &x) in dbv.iter_mut().zip(row.iter()) {
                            *a += x;
                        }
                    }
                    let gt = &s[..(rn - 1) * VOCAB_TILE + l];
                    // dH_r += G W_v
                    gemm_serial(
                        (rn, d, l),
                        (&mut dh[r0 * d..(r0 + rn) * d], d),
                        true,
                        (gt, VOCAB_TILE, 1),
                        (&w[v0 * d..(v0 + l) * d], d, 1),
                    );
                    // dW_v += G^T H_r
                    gemm_serial(
                        (l, d, rn),
                        (dwv, d),
                        true,
                        (gt, 1, VOCAB_TILE),
                        (&saved.h[r0 * d..(r0 + rn) * d], d, 1),
                    );
                }
            }
            *parts[k].lock().expect("partials lock") = dh;
        });
        drop((ws, bs));
        let parts: Vec<Vec<f32>> = parts
            .into_iter()
            .map(|p| p.into_inner().expect("partials lock"))
            .collect();
        let mut dh = zeroed_buffer(n * d);
        let dhp = SharedMut(dh.as_mut_ptr());
        for_each_index(m.div_ceil(64), |c| {
            for j in c * 64..((c + 1) * 64).min(m) {
                let r = self.rows[j] as usize;
                // SAFETY: the gathered row indices are distinct, so the tasks write disjoint rows
                // of `dh`, which outlives the call.
                let dst = unsafe { std::slice::from_raw_parts_mut(dhp.ptr().add(r * d), d) };
                for part in &parts {
                    for (a, &x) in dst.iter_mut().zip(&part[j * d..(j + 1) * d]) {
                        *a += x;
                    }
                }
            }
        });
        Ok((
            Some(output(dh, hidden.shape(), hidden.device())?),
            Some(output(dw, weight.shape(), weight.device())?),
            Some(output(db, bias.shape(), bias.device())?),
        ))
    }
}
