//! Seeded dropout masks drawn from a counter-based hash, and the dropout and drop-path ops.
//!
//! A mask never comes from a stateful random-number generator: whether element `(row, col)` of
//! an array is kept under the key `key` is a pure function of the three numbers,
//!
//! ```text
//! rk   = derive_key(key, row)                  (64 bits, splitmix64-style mixing)
//! h    = mix32(mix32(col * 0x9E3779B9 + lo32(rk)) ^ hi32(rk))
//! kept = h >= round(rate * 2^32)               (so P(kept) = 1 - rate up to 2^-32)
//! ```
//!
//! where `mix32` is a 32-bit multiply-xorshift finaliser. A kept element is multiplied by
//! `1 / (1 - rate)` (computed in f64, applied as f32), a dropped one by 0 (`x * 0`: a NaN stays
//! NaN, so the trainer's non-finite guard still sees it). So the mask of a tensor does not
//! depend on how the work is split over threads or tiles, and a backward pass regenerates the
//! forward's mask from the key instead of storing it.
//!
//! What `row` and `col` are:
//! * [`dropout`] (activations): the tensor viewed as `[rows, last dim]`, row-major.
//! * [`drop_path`] (stochastic depth): `row` = the sample (dim 0), `col` = 0; the whole sample
//!   is kept or dropped.
//! * attention dropout ([`crate::qkv_attention_dropout`], [`crate::masked_attention_dropout`]):
//!   the probabilities `[B, H, Lq, Lk]` viewed as `[B H Lq, Lk]`, i.e. `row = (b H + h) Lq + q`
//!   and `col` = the key's index in the input (the fused kernel, which leaves padding keys out
//!   of its products, uses the original key indices).
//!
//! The fused and the reference paths draw the same masks, so their results agree with dropout
//! on as they do without.

use crate::{Error, Result};
use candle_core::{DType, Tensor};

const GOLDEN64: u64 = 0x9E37_79B9_7F4A_7C15;
const GOLDEN32: u32 = 0x9E37_79B9;

/// The splitmix64 finaliser: a bijection of `u64` with good avalanche.
///
/// ```
/// use m3ae_kernels::dropout::mix64;
/// assert_ne!(mix64(1), mix64(2));
/// assert_eq!(mix64(0), 0);
/// ```
#[inline(always)]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A 32-bit multiply-xorshift finaliser (a bijection of `u32`).
#[inline(always)]
fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7FEB_352D);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846C_A68B);
    x ^ (x >> 16)
}

/// The key of sub-stream `tag` of `key` (a site of a model, a row of an array): different tags
/// give unrelated keys, and `derive_key(derive_key(k, a), b)` differs from
/// `derive_key(derive_key(k, b), a)`.
///
/// ```
/// use m3ae_kernels::dropout::derive_key;
/// assert_ne!(derive_key(7, 0), derive_key(7, 1));
/// assert_ne!(derive_key(derive_key(7, 1), 2), derive_key(derive_key(7, 2), 1));
/// ```
#[inline(always)]
pub fn derive_key(key: u64, tag: u64) -> u64 {
    mix64(mix64(key) ^ tag.wrapping_add(1).wrapping_mul(GOLDEN64))
}

/// The 32-bit hash of column `col` of the row whose key is `row_key`.
#[inline(always)]
fn hash32(row_key: u64, col: u32) -> u32 {
    let lo = row_key as u32;
    let hi = (row_key >> 32) as u32;
    mix32(mix32(col.wrapping_mul(GOLDEN32).wrapping_add(lo)) ^ hi)
}

/// A dropout mask: a rate in `[0, 1)` and the key the mask is drawn from (module docs).
///
/// ```
/// use m3ae_kernels::Dropout;
/// let d = Dropout::new(0.25, 42)?;
/// let m = d.mask(100, 1000);
/// let kept = m.iter().filter(|&&x| x != 0.0).count() as f64 / 1e5;
/// assert!((kept - 0.75).abs() < 0.01);
/// assert!(m.iter().all(|&x| x == 0.0 || x == d.scale()));
/// assert_eq!(m, Dropout::new(0.25, 42)?.mask(100, 1000));
/// assert_ne!(m, Dropout::new(0.25, 43)?.mask(100, 1000));
/// assert!(Dropout::new(1.0, 0).is_err());
/// # Ok::<(), m3ae_kernels::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    rate: f64,
    key: u64,
}

impl Dropout {
    /// A mask of `rate` (in `[0, 1)`, else an error) drawn from `key`.
    pub fn new(rate: f64, key: u64) -> Result<Self> {
        if !(0.0..1.0).contains(&rate) {
            return Err(Error::Value {
                op: "dropout",
                msg: format!("rate {rate} is outside [0, 1)"),
            });
        }
        Ok(Self { rate, key })
    }

    /// The mask that training with `rate` draws from `key`, or `None` when nothing is dropped
    /// (no key: evaluation, or rate 0), in which case the op is the identity and adds no work.
    pub fn active(rate: f64, key: Option<u64>) -> Result<Option<Self>> {
        match key {
            Some(k) if rate != 0.0 => Self::new(rate, k).map(Some),
            _ => Ok(None),
        }
    }

    /// The rate.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The key.
    pub fn key(&self) -> u64 {
        self.key
    }

    /// The factor of a kept element, `1 / (1 - rate)` as f32.
    pub fn scale(&self) -> f32 {
        (1.0 / (1.0 - self.rate)) as f32
    }

    fn threshold(&self) -> u32 {
        let t = (self.rate * 4_294_967_296.0).round();
        if t >= u32::MAX as f64 {
            u32::MAX
        } else {
            t as u32
        }
    }

    /// The mask of row `row` (see the module docs).
    #[inline]
    pub fn row(&self, row: u64) -> MaskRow {
        MaskRow {
            key: derive_key(self.key, row),
            threshold: self.threshold(),
            scale: self.scale(),
        }
    }

    /// Whether element `(row, col)` is kept.
    pub fn keeps(&self, row: u64, col: u32) -> bool {
        self.row(row).value(col) != 0.0
    }

    /// The mask of a `[rows, cols]` array, row-major: `1 / (1 - rate)` where kept, 0 elsewhere.
    /// Computed in parallel; the values do not depend on the thread count.
    pub fn mask(&self, rows: usize, cols: usize) -> Vec<f32> {
        let mut m = vec![0f32; rows * cols];
        self.for_rows(&mut m, cols, |_, r, out| r.fill(out));
        m
    }

    /// Runs `f(r, mask of row r, row r of out)` for every row `r` of `out` (`cols` wide), in
    /// parallel.
    pub(crate) fn for_rows(
        &self,
        out: &mut [f32],
        cols: usize,
        f: impl Fn(usize, &MaskRow, &mut [f32]) + Sync + Send,
    ) {
        if cols == 0 || out.is_empty() {
            return;
        }
        // about 16 Ki elements per task, whole rows
        let rows_per = (16_384 / cols).max(1);
        crate::fused::for_each_chunk_mut(out, rows_per * cols, |c, piece| {
            for (i, row) in piece.chunks_mut(cols).enumerate() {
                let r = c * rows_per + i;
                f(r, &self.row(r as u64), row);
            }
        });
    }
}

/// The mask of one row of an array under a [`Dropout`] (see [`Dropout::row`]).
#[derive(Debug, Clone, Copy)]
pub struct MaskRow {
    key: u64,
    threshold: u32,
    scale: f32,
}

impl MaskRow {
    /// The mask value of column `col`: the scale when kept, 0 when dropped.
    #[inline(always)]
    pub fn value(&self, col: u32) -> f32 {
        if hash32(self.key, col) >= self.threshold {
            self.scale
        } else {
            0.0
        }
    }

    /// `out[j] = value(j)`.
    #[inline(always)]
    pub fn fill(&self, out: &mut [f32]) {
        for (j, o) in out.iter_mut().enumerate() {
            *o = self.value(j as u32);
        }
    }

    /// `x[j] *= value(j)`.
    #[inline(always)]
    pub fn apply(&self, x: &mut [f32]) {
        for (j, o) in x.iter_mut().enumerate() {
            *o *= self.value(j as u32);
        }
    }

    /// `x[j] *= value(cols[j])` (columns gathered, e.g. the kept keys of a padded sample).
    #[inline(always)]
    pub fn apply_at(&self, x: &mut [f32], cols: &[u32]) {
        for (o, &c) in x.iter_mut().zip(cols) {
            *o *= self.value(c);
        }
    }
}

/// The mask of `x` viewed as `[rows, last dim]`, as a tensor of `x`'s shape and dtype on its
/// device.
fn mask_like(x: &Tensor, d: &Dropout) -> Result<Tensor> {
    let cols = x.dims().last().copied().unwrap_or(1);
    let rows = x.elem_count() / cols.max(1);
    let m = Tensor::from_vec(d.mask(rows, cols), x.shape(), x.device())?;
    Ok(m.to_dtype(x.dtype())?)
}

/// Activation dropout composed from candle ops: `x * mask` with the mask of
/// [`Dropout::mask`] over `x` viewed as `[rows, last dim]` (built on the host). `None`: `x`.
/// Differentiable (the mask is a constant).
pub fn dropout_reference(x: &Tensor, d: Option<&Dropout>) -> Result<Tensor> {
    match d {
        None => Ok(x.clone()),
        Some(d) => Ok((x * mask_like(x, d)?)?),
    }
}

/// Activation dropout (flax `nn.Dropout` in training): each element of `x` (viewed as
/// `[rows, last dim]`) is kept with probability `1 - rate` and scaled by `1 / (1 - rate)`, or
/// zeroed; `None` returns `x` unchanged (no op is added). On the CPU this is one fused op whose
/// backward regenerates the mask (no mask tensor is kept); elsewhere [`dropout_reference`].
/// Both give bit-identical values.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use m3ae_kernels::{dropout, Dropout};
/// let x = Tensor::ones((4, 1000), candle_core::DType::F32, &Device::Cpu)?;
/// let d = Dropout::new(0.5, 1)?;
/// let y = dropout(&x, Some(&d))?.flatten_all()?.to_vec1::<f32>()?;
/// assert!(y.iter().all(|&v| v == 0.0 || v == 2.0));
/// assert_eq!(dropout(&x, None)?.flatten_all()?.to_vec1::<f32>()?, vec![1f32; 4000]);
/// # Ok::<(), m3ae_kernels::Error>(())
/// ```
pub fn dropout(x: &Tensor, d: Option<&Dropout>) -> Result<Tensor> {
    let Some(d) = d else {
        return Ok(x.clone());
    };
    if !x.device().is_cpu() {
        return dropout_reference(x, Some(d));
    }
    let y = x
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1(crate::fused::dropout::FusedDropout(*d))?;
    Ok(y.to_dtype(x.dtype())?)
}

/// Drop path (stochastic depth, per sample): sample `b` of `x` (`[B, ..]`) is kept with
/// probability `1 - rate` and scaled by `1 / (1 - rate)`, or zeroed as a whole; sample `b`'s
/// choice is element `(b, 0)` of the mask (module docs). `None` returns `x` unchanged.
/// Composed from candle ops (a `[B, 1, ..]` factor broadcast over the sample).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use m3ae_kernels::{drop_path, Dropout};
/// let x = Tensor::ones((64, 3, 5), candle_core::DType::F32, &Device::Cpu)?;
/// let y = drop_path(&x, Some(&Dropout::new(0.5, 7)?))?.to_vec3::<f32>()?;
/// for s in &y {
///     let v = s[0][0];
///     assert!(v == 0.0 || v == 2.0);
///     assert!(s.iter().flatten().all(|&w| w == v));
/// }
/// # Ok::<(), m3ae_kernels::Error>(())
/// ```
pub fn drop_path(x: &Tensor, d: Option<&Dropout>) -> Result<Tensor> {
    let Some(d) = d else {
        return Ok(x.clone());
    };
    let b = x.dim(0)?;
    let factors: Vec<f32> = (0..b).map(|s| d.row(s as u64).value(0)).collect();
    let mut shape = vec![1usize; x.rank()];
    shape[0] = b;
    let f = Tensor::from_vec(factors, shape, x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_mul(&f)?)
}

/// The attention-dropout mask of probabilities `[b, h, lq, lk]` as a tensor on `like`'s device
/// and dtype (rows `(b H + h) Lq + q`, columns the key indices).
pub(crate) fn attention_mask(
    d: &Dropout,
    (b, h, lq, lk): (usize, usize, usize, usize),
    like: &Tensor,
) -> Result<Tensor> {
    let m = Tensor::from_vec(d.mask(b * h * lq, lk), (b, h, lq, lk), like.device())?;
    Ok(m.to_dtype(like.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_bits_are_balanced_and_rows_differ() {
        let d = Dropout::new(0.5, 3).unwrap();
        let (rows, cols) = (64, 4096);
        let m = d.mask(rows, cols);
        // each row keeps about half, and no two rows are the same
        for r in m.chunks(cols) {
            let k = r.iter().filter(|&&x| x != 0.0).count() as f64 / cols as f64;
            assert!((k - 0.5).abs() < 0.04, "{k}");
        }
        for a in 0..rows {
            for b in a + 1..rows {
                assert_ne!(m[a * cols..][..cols], m[b * cols..][..cols]);
            }
        }
        // neighbouring columns are not correlated
        let same = (0..rows * cols - 1)
            .filter(|&i| (m[i] != 0.0) == (m[i + 1] != 0.0))
            .count() as f64
            / (rows * cols - 1) as f64;
        assert!((same - 0.5).abs() < 0.01, "{same}");
    }

    #[test]
    fn rates_and_thresholds() {
        assert!(Dropout::new(-0.1, 0).is_err());
        assert!(Dropout::new(f64::NAN, 0).is_err());
        assert!(Dropout::active(0.0, Some(1)).unwrap().is_none());
        assert!(Dropout::active(0.3, None).unwrap().is_none());
        assert!(Dropout::active(1.5, Some(1)).is_err());
        let d = Dropout::new(0.9, 11).unwrap();
        let m = d.mask(10, 10_000);
        let kept = m.iter().filter(|&&x| x != 0.0).count() as f64 / 1e5;
        assert!((kept - 0.1).abs() < 0.005, "{kept}");
        assert_eq!(d.scale(), (1.0f64 / 0.1) as f32);
        let d = Dropout::new(0.999_999_999_9, 1).unwrap();
        assert!(d.mask(1, 10_000).iter().all(|&x| x == 0.0));
    }
}
