//! Elementwise passes over one row of an attention score tile: the softmax of the forward, the
//! recomputed probabilities and the score gradient of the backward.
//!
//! A row holds `l` scores inside a scratch row of `pad8(l)` floats. With AVX2+FMA the passes run
//! on whole vectors up to the padded length (the lanes past `l` are written with unspecified
//! values and excluded from the maximum and the sum; the key-padding mask is read with a masked
//! load there), with an FMA form of [`math::exp`]. Otherwise the scalar [`math`] routines run.
//! Padding keys (`pad[j] > 0`) have their score replaced by `fill` and their score gradient zeroed.

use super::math;

/// Softmax numerator of a row: replaces `row[j]` by `exp(s_j - max)` where `s_j` is the score
/// (or `fill` at a padding key) and returns `(max, sum)` over the `l` scores.
///
/// # Safety
/// `row` must hold `l` rounded up to 8 floats and `pad` (if any) `l`.
#[inline(always)]
pub unsafe fn softmax(
    simd: bool,
    row: *mut f32,
    l: usize,
    pad: Option<&[f32]>,
    fill: f32,
) -> (f32, f32) {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if simd {
        return avx2::softmax(row, l, pad, fill);
    }
    let _ = simd;
    let row = std::slice::from_raw_parts_mut(row, l);
    match pad {
        Some(pad) => {
            let m = math::masked_max(row, pad, fill);
            (m, math::masked_exp_sum(row, pad, fill, m))
        }
        None => {
            let m = math::max(row);
            (m, math::exp_sum(row, m))
        }
    }
}

/// Probabilities of a row from the saved statistics: `row[j] = exp((s_j - max) - log_sum)`.
///
/// # Safety
/// As [`softmax`].
#[inline(always)]
pub unsafe fn probabilities(
    simd: bool,
    row: *mut f32,
    l: usize,
    pad: Option<&[f32]>,
    fill: f32,
    (max, log_sum): (f32, f32),
) {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if simd {
        return avx2::probabilities(row, l, pad, fill, (max, log_sum));
    }
    let _ = simd;
    let row = std::slice::from_raw_parts_mut(row, l);
    match pad {
        Some(pad) => {
            for (x, &pm) in row.iter_mut().zip(pad) {
                let y = if pm > 0.0 { fill } else { *x };
                *x = math::exp((y - max) - log_sum);
            }
        }
        None => {
            for x in row.iter_mut() {
                *x = math::exp((*x - max) - log_sum);
            }
        }
    }
}

/// Score gradient of a row: `g[j] = p[j] * (g[j] - delta)`, zero at padding keys.
///
/// # Safety
/// `g` and `p` must hold `l` rounded up to 8 floats, `pad` (if any) `l`.
#[inline(always)]
pub unsafe fn score_grad(
    simd: bool,
    g: *mut f32,
    p: *const f32,
    l: usize,
    pad: Option<&[f32]>,
    delta: f32,
) {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if simd {
        return avx2::score_grad(g, p, l, pad, delta);
    }
    let _ = simd;
    let g = std::slice::from_raw_parts_mut(g, l);
    let p = std::slice::from_raw_parts(p, l);
    match pad {
        Some(pad) => {
            for ((x, &pv), &pm) in g.iter_mut().zip(p).zip(pad) {
                *x = if pm > 0.0 { 0.0 } else { pv * (*x - delta) };
            }
        }
        None => {
            for (x, &pv) in g.iter_mut().zip(p) {
                *x = pv * (*x - delta);
            }
        }
    }
}

/// Score gradient of a row under attention dropout: `g[j] = pm[j] * g[j] - p[j] * delta` where
/// `pm = P * M` is the dropped-out row, i.e. `P * (M * dP - delta)`; zero at padding keys. One
/// loop over the row (vectorised by the compiler where the caller is compiled for AVX2).
#[inline(always)]
pub fn score_grad_dropout(g: &mut [f32], p: &[f32], pm: &[f32], pad: Option<&[f32]>, delta: f32) {
    match pad {
        Some(pad) => {
            for (((x, &pv), &mv), &pf) in g.iter_mut().zip(p).zip(pm).zip(pad) {
                let y = mv * *x - pv * delta;
                *x = if pf > 0.0 { 0.0 } else { y };
            }
        }
        None => {
            for ((x, &pv), &mv) in g.iter_mut().zip(p).zip(pm) {
                *x = mv * *x - pv * delta;
            }
        }
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod avx2 {
    #[cfg(target_arch = "x86")]
    use std::arch::x86::*;
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    /// [`super::math::exp`] on 8 lanes with FMA (same range reduction and polynomial).
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
            _mm256_set1_ps(88.0),
        );
        let round = _mm256_set1_ps(12_582_912.0);
        let t = _mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), round);
        let n = _mm256_sub_ps(t, round);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B40_0000)),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(bits))
    }

    /// All-ones in the lanes `j0 + lane < l`.
    #[inline(always)]
    unsafe fn valid(j0: usize, l: usize) -> __m256 {
        let left = (l - j0).min(8) as i32;
        _mm256_castsi256_ps(_mm256_cmpgt_epi32(
            _mm256_set1_epi32(left),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        ))
    }

    /// All-ones in the lanes of padding keys among `j0..j0 + 8` (lanes past `l` read as 0).
    #[inline(always)]
    unsafe fn padded(pad: &[f32], j0: usize) -> __m256 {
        let left = pad.len() - j0;
        let p = if left >= 8 {
            _mm256_loadu_ps(pad.as_ptr().add(j0))
        } else {
            _mm256_maskload_ps(
                pad.as_ptr().add(j0),
                _mm256_castps_si256(valid(j0, pad.len())),
            )
        };
        _mm256_cmp_ps::<_CMP_GT_OQ>(p, _mm256_setzero_ps())
    }

    /// The scores of `j0..j0 + 8` with padding keys replaced by `fill`.
    #[inline(always)]
    unsafe fn scores(row: *const f32, j0: usize, pad: Option<&[f32]>, fill: __m256) -> __m256 {
        let x = _mm256_loadu_ps(row.add(j0));
        match pad {
            Some(pad) => _mm256_blendv_ps(x, fill, padded(pad, j0)),
            None => x,
        }
    }

    #[inline(always)]
    unsafe fn hsum(x: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    #[inline(always)]
    unsafe fn hmax(x: __m256) -> f32 {
        let s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_max_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax(
        row: *mut f32,
        l: usize,
        pad: Option<&[f32]>,
        fill: f32,
    ) -> (f32, f32) {
        let fill = _mm256_set1_ps(fill);
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        let full = l / 8 * 8;
        let mut mx = ninf;
        let mut j = 0;
        while j < full {
            mx = _mm256_max_ps(mx, scores(row, j, pad, fill));
            j += 8;
        }
        if full < l {
            let x = _mm256_blendv_ps(ninf, scores(row, full, pad, fill), valid(full, l));
            mx = _mm256_max_ps(mx, x);
        }
        let m = hmax(mx);
        let mv = _mm256_set1_ps(m);
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        j = 0;
        while j + 16 <= full {
            let e0 = exp8(_mm256_sub_ps(scores(row, j, pad, fill), mv));
            let e1 = exp8(_mm256_sub_ps(scores(row, j + 8, pad, fill), mv));
            _mm256_storeu_ps(row.add(j), e0);
            _mm256_storeu_ps(row.add(j + 8), e1);
            s0 = _mm256_add_ps(s0, e0);
            s1 = _mm256_add_ps(s1, e1);
            j += 16;
        }
        while j < l {
            let e = exp8(_mm256_sub_ps(scores(row, j, pad, fill), mv));
            let e = _mm256_and_ps(e, valid(j, l));
            _mm256_storeu_ps(row.add(j), e);
            s0 = _mm256_add_ps(s0, e);
            j += 8;
        }
        (m, hsum(_mm256_add_ps(s0, s1)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn probabilities(
        row: *mut f32,
        l: usize,
        pad: Option<&[f32]>,
        fill: f32,
        (max, log_sum): (f32, f32),
    ) {
        let fill = _mm256_set1_ps(fill);
        let (mv, lv) = (_mm256_set1_ps(max), _mm256_set1_ps(log_sum));
        let mut j = 0;
        while j < l {
            let x = _mm256_sub_ps(_mm256_sub_ps(scores(row, j, pad, fill), mv), lv);
            _mm256_storeu_ps(row.add(j), exp8(x));
            j += 8;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn score_grad(
        g: *mut f32,
        p: *const f32,
        l: usize,
        pad: Option<&[f32]>,
        delta: f32,
    ) {
        let dv = _mm256_set1_ps(delta);
        let mut j = 0;
        while j < l {
            let x = _mm256_loadu_ps(g.add(j));
            let y = _mm256_mul_ps(_mm256_loadu_ps(p.add(j)), _mm256_sub_ps(x, dv));
            let y = match pad {
                Some(pad) => _mm256_andnot_ps(padded(pad, j), y),
                None => y,
            };
            _mm256_storeu_ps(g.add(j), y);
            j += 8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The vector rows exist on x86 only, and there they are what this test checks: a CPU
    // without AVX2 + FMA fails it rather than passing unchecked.
    #[test]
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    fn vector_rows_match_the_scalar_rows() {
        assert!(
            crate::fused::has_avx2_fma(),
            "this CPU has no AVX2 + FMA: the vector rows under test cannot run"
        );
        for l in [1usize, 5, 8, 13, 16, 33] {
            let lp = l.div_ceil(8) * 8;
            let x: Vec<f32> = (0..lp).map(|i| ((i * 7) % 11) as f32 * 0.7 - 3.0).collect();
            let pad: Vec<f32> = (0..l).map(|i| (i % 3 == 1) as u8 as f32).collect();
            for pad in [None, Some(&pad[..])] {
                let (mut a, mut b) = (x.clone(), x.clone());
                // SAFETY: rows of `lp` floats, `pad` of `l`.
                let (sa, sb) = unsafe {
                    (
                        softmax(false, a.as_mut_ptr(), l, pad, -50.0),
                        softmax(true, b.as_mut_ptr(), l, pad, -50.0),
                    )
                };
                assert_eq!(sa.0, sb.0);
                assert!((sa.1 - sb.1).abs() <= 1e-6 * sa.1, "l{l}");
                for j in 0..l {
                    assert!(
                        (a[j] - b[j]).abs() <= 1e-6 * a[j].abs().max(1e-30),
                        "l{l} {j}"
                    );
                }
                let (mut a, mut b) = (x.clone(), x.clone());
                let (mut ga, mut gb) = (x.clone(), x.clone());
                // SAFETY: as above.
                unsafe {
                    probabilities(false, a.as_mut_ptr(), l, pad, -50.0, (2.0, 0.5));
                    probabilities(true, b.as_mut_ptr(), l, pad, -50.0, (2.0, 0.5));
                    score_grad(false, ga.as_mut_ptr(), a.as_ptr(), l, pad, 0.3);
                    score_grad(true, gb.as_mut_ptr(), a.as_ptr(), l, pad, 0.3);
                }
                for j in 0..l {
                    assert!(
                        (a[j] - b[j]).abs() <= 1e-6 * a[j].abs().max(1e-30),
                        "l{l} {j}"
                    );
                    assert_eq!(ga[j], gb[j], "l{l} {j}");
                }
            }
        }
    }
}
