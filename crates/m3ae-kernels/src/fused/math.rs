//! Vectorisable elementwise math for the fused kernels: a branch-free `exp`, `tanh` from it, and
//! reductions with several independent accumulators (Rust does not reassociate float sums, so a
//! plain loop would not vectorise).
//!
//! Every routine is `#[inline(always)]` so that the `target_feature` wrappers in [`crate::fused`]
//! compile it for AVX2+FMA when the CPU has it, and for the baseline otherwise.

/// Lanes of the manual accumulators (one AVX2 register of f32).
pub const LANES: usize = 8;

/// `exp(x)` with relative error below 2e-7 on `[-87, 88]`; inputs are clamped to that range
/// (so very negative scores give about 1.6e-38 rather than 0, far below any tolerance).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    const ROUND_BITS: i32 = 0x4B40_0000; // bits of ROUND
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    // minimax-style polynomial of exp on [-ln2/2, ln2/2] (Cephes expf coefficients)
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // `t` is ROUND + n exactly, so its low bits hold the integer n (no float-to-int conversion,
    // which would not vectorise)
    let bits = (((t.to_bits() as i32) - ROUND_BITS + 127) << 23) as u32;
    y * f32::from_bits(bits)
}

/// `tanh(x)` as `1 - 2 / (exp(2x) + 1)` (absolute error about 1e-7).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// Sum of a slice with [`LANES`] accumulators.
#[inline(always)]
pub fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for &x in rest {
        s += x;
    }
    s
}

/// Dot product with [`LANES`] accumulators.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Maximum of a non-empty slice with [`LANES`] accumulators.
#[inline(always)]
pub fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = acc
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for &x in rest {
        m = if x > m { x } else { m };
    }
    m
}

/// Maximum of `xs` where each `xs[i]` with `pad[i] > 0` counts as `fill` (`xs` non-empty, `pad`
/// at least as long).
#[inline(always)]
pub fn masked_max(xs: &[f32], pad: &[f32], fill: f32) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    let pads = pad[..xs.len()].chunks_exact(LANES);
    let prest = pads.remainder();
    for (c, p) in chunks.zip(pads) {
        for i in 0..LANES {
            let x = if p[i] > 0.0 { fill } else { c[i] };
            acc[i] = if x > acc[i] { x } else { acc[i] };
        }
    }
    let mut m = acc
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for (&x, &p) in rest.iter().zip(prest) {
        let x = if p > 0.0 { fill } else { x };
        m = if x > m { x } else { m };
    }
    m
}

/// As [`exp_sum`] with `xs[i]` counting as `fill` where `pad[i] > 0`.
#[inline(always)]
pub fn masked_exp_sum(xs: &mut [f32], pad: &[f32], fill: f32, shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let n = xs.len();
    let mut chunks = xs.chunks_exact_mut(LANES);
    let mut pads = pad[..n].chunks_exact(LANES);
    for (c, p) in (&mut chunks).zip(&mut pads) {
        for i in 0..LANES {
            let x = if p[i] > 0.0 { fill } else { c[i] };
            let e = exp(x - shift);
            c[i] = e;
            acc[i] += e;
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, &p) in chunks.into_remainder().iter_mut().zip(pads.remainder()) {
        let y = if p > 0.0 { fill } else { *x };
        *x = exp(y - shift);
        s += *x;
    }
    s
}

/// Replaces every `x` by `exp(x - shift)` and returns the sum of the results ([`LANES`]
/// accumulators, one pass).
#[inline(always)]
pub fn exp_sum(xs: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let e = exp(c[i] - shift);
            c[i] = e;
            acc[i] += e;
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for x in chunks.into_remainder() {
        *x = exp(*x - shift);
        s += *x;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_tanh_are_accurate() {
        let mut worst = 0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let e = (exp(x) as f64 - (x as f64).exp()).abs() / (x as f64).exp();
            worst = worst.max(e);
            x += 0.01731;
        }
        assert!(worst < 3e-7, "exp relative error {worst}");
        assert_eq!(exp(-1e7), exp(-87.0));
        assert!(exp(1e7).is_finite());
        let mut x = -20.0f32;
        while x < 20.0 {
            assert!(
                (tanh(x) as f64 - (x as f64).tanh()).abs() < 3e-7,
                "tanh({x})"
            );
            x += 0.0123;
        }
    }

    #[test]
    fn reductions_match_plain_loops() {
        let v: Vec<f32> = (0..37).map(|i| ((i * 13) % 17) as f32 - 8.0).collect();
        assert_eq!(sum(&v), v.iter().sum::<f32>());
        assert_eq!(max(&v), 8.0);
        assert_eq!(dot(&v, &v), v.iter().map(|x| x * x).sum::<f32>());
        let mut w = v.clone();
        let pad: Vec<f32> = (0..37).map(|i| (i % 3 == 0) as u8 as f32).collect();
        let masked: Vec<f32> = (0..37)
            .map(|i| if i % 3 == 0 { -9.0 } else { v[i] })
            .collect();
        assert_eq!(masked_max(&v, &pad, -9.0), max(&masked));
        let want: f32 = masked.iter().map(|&x| exp(x - 1.0)).sum();
        let got = masked_exp_sum(&mut w, &pad, -9.0, 1.0);
        assert!((got - want).abs() <= 1e-5 * want);
        assert_eq!(w[0], exp(-10.0));
        let mut u = v.clone();
        let got = exp_sum(&mut u, 1.0);
        let want: f32 = v.iter().map(|&x| exp(x - 1.0)).sum();
        assert!((got - want).abs() <= 1e-5 * want);
        assert_eq!(w[2], exp(v[2] - 1.0));
    }
}
