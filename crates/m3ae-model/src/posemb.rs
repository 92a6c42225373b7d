//! Fixed sin-cos position embeddings, exactly as the official code builds them.
//!
//! 1-D of width `E` at position `p`: `[sin(p w_0) .. sin(p w_{E/2-1}), cos(p w_0) .. cos(p w_{E/2-1})]`
//! with `w_k = 1 / 10000^(k / (E/2))` (all sines first, then all cosines). 2-D of width `E` on a
//! `G x G` grid: token `n = r G + c` gets `[1-D_{E/2}(c), 1-D_{E/2}(r)]`, the column half first.

use crate::{Error, Result};
use candle_core::{Device, Tensor};

fn sincos_1d_into(out: &mut [f32], width: usize, pos: f64) {
    let half = width / 2;
    for k in 0..half {
        let omega = 1.0 / 10000f64.powf(k as f64 / half as f64);
        let a = pos * omega;
        out[k] = a.sin() as f32;
        out[half + k] = a.cos() as f32;
    }
}

/// 1-D table `[len, width]` for positions `0..len` (`width` must be even).
///
/// ```
/// let t = m3ae_model::posemb::sincos_1d_values(3, 4).unwrap();
/// // position 0: sines 0, cosines 1
/// assert_eq!(&t[0..4], &[0.0, 0.0, 1.0, 1.0]);
/// assert!((t[4] - 1f32.sin()).abs() < 1e-7);
/// ```
pub fn sincos_1d_values(len: usize, width: usize) -> Result<Vec<f32>> {
    if !width.is_multiple_of(2) || width == 0 {
        return Err(Error::Shape(format!(
            "1-D sin-cos embedding needs an even, non-zero width, got {width}"
        )));
    }
    let mut v = vec![0f32; len * width];
    for p in 0..len {
        sincos_1d_into(&mut v[p * width..(p + 1) * width], width, p as f64);
    }
    Ok(v)
}

/// 2-D table `[num_tokens, width]` for a square grid (`num_tokens` must be a perfect square,
/// `width` divisible by 4). The first half of each row encodes the column index.
pub fn sincos_2d_values(num_tokens: usize, width: usize) -> Result<Vec<f32>> {
    let g = (num_tokens as f64).sqrt().round() as usize;
    if g * g != num_tokens {
        return Err(Error::Shape(format!(
            "2-D sin-cos embedding needs a square number of tokens, got {num_tokens}"
        )));
    }
    if !width.is_multiple_of(4) || width == 0 {
        return Err(Error::Shape(format!(
            "2-D sin-cos embedding needs a width divisible by 4, got {width}"
        )));
    }
    let half = width / 2;
    let mut v = vec![0f32; num_tokens * width];
    for n in 0..num_tokens {
        let (r, c) = (n / g, n % g);
        let row = &mut v[n * width..(n + 1) * width];
        sincos_1d_into(&mut row[..half], half, c as f64);
        sincos_1d_into(&mut row[half..], half, r as f64);
    }
    Ok(v)
}

/// [`sincos_1d_values`] as a `[1, len, width]` tensor.
pub fn sincos_1d(len: usize, width: usize, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        sincos_1d_values(len, width)?,
        (1, len, width),
        device,
    )?)
}

/// [`sincos_2d_values`] as a `[1, num_tokens, width]` tensor.
pub fn sincos_2d(num_tokens: usize, width: usize, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        sincos_2d_values(num_tokens, width)?,
        (1, num_tokens, width),
        device,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_d_puts_the_column_first() {
        // grid 2x2, width 4: token 1 is (r=0, c=1); its first half encodes c = 1.
        let v = sincos_2d_values(4, 4).unwrap();
        let tok1 = &v[4..8];
        assert!((tok1[0] - 1f32.sin()).abs() < 1e-7 && (tok1[1] - 1f32.cos()).abs() < 1e-7);
        assert_eq!(&tok1[2..4], &[0.0, 1.0]);
        let tok2 = &v[8..12]; // (r=1, c=0)
        assert_eq!(&tok2[0..2], &[0.0, 1.0]);
        assert!(sincos_2d_values(5, 4).is_err());
        assert!(sincos_2d_values(4, 6).is_err());
        assert!(sincos_1d_values(4, 3).is_err());
    }
}
