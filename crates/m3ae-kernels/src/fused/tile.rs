//! Register-blocked f32 products on the small per-head tiles of the fused attention kernel.
//!
//! [`matmul`] computes `C (m x n) = alpha * A (m x k) B (k x n)`, or adds that to `C`. `A` is read
//! one element at a time through arbitrary row and column strides (each element is broadcast), so
//! the same routine serves `A` and `A^T`. `B` has unit column stride and its rows must be readable
//! up to `n` rounded up to a multiple of 8 (the extra lanes only reach columns that are never
//! stored). `C` has unit column stride; exactly its `m x n` elements are written.
//!
//! With AVX2+FMA the work is cut into blocks of up to [`MR`] rows by 16 columns (12 accumulator
//! registers, two loads of `B` and one broadcast of `A` per step of `k`); the last partial vector
//! of a row is stored with a mask. Otherwise a plain scalar loop runs. Both orders of summation
//! are fixed by the shapes alone, so results do not depend on threads.
//!
//! [`transpose`] copies a strided block transposed (8 x 8 blocks in registers with AVX2), which
//! the attention kernel uses to lay out `K^T` and `V^T` once per head.

/// Rows of the register block.
pub const MR: usize = 6;

/// One product; see the module docs. `simd` selects the AVX2+FMA kernel (the caller checked it).
///
/// # Safety
/// All pointers must cover the described elements (`B` rows padded as above) and `C` must not
/// overlap `A` or `B`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub unsafe fn matmul(
    simd: bool,
    (m, n, k): (usize, usize, usize),
    (a, ars, acs): (*const f32, usize, usize),
    (b, brs): (*const f32, usize),
    (c, crs): (*mut f32, usize),
    alpha: f32,
    accumulate: bool,
) {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if simd {
        return avx2::matmul(
            (m, n, k),
            (a, ars, acs),
            (b, brs),
            (c, crs),
            alpha,
            accumulate,
        );
    }
    let _ = simd;
    scalar(
        (m, n, k),
        (a, ars, acs),
        (b, brs),
        (c, crs),
        alpha,
        accumulate,
    )
}

/// `dst[c * drs + r] = src[r * rs + c]` for `r < rows`, `c < cols` (8 x 8 register blocks with
/// AVX2 when `simd`).
///
/// # Safety
/// Both pointers must cover the described elements and not overlap.
#[inline(always)]
pub unsafe fn transpose(
    simd: bool,
    (src, rs): (*const f32, usize),
    (rows, cols): (usize, usize),
    (dst, drs): (*mut f32, usize),
) {
    let (r8, c8) = if simd {
        (rows / 8 * 8, cols / 8 * 8)
    } else {
        (0, 0)
    };
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if simd {
        avx2::transpose((src, rs), (r8, c8), (dst, drs));
    }
    for r in 0..rows {
        let c0 = if r < r8 { c8 } else { 0 };
        for c in c0..cols {
            *dst.add(c * drs + r) = *src.add(r * rs + c);
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn scalar(
    (m, n, k): (usize, usize, usize),
    (a, ars, acs): (*const f32, usize, usize),
    (b, brs): (*const f32, usize),
    (c, crs): (*mut f32, usize),
    alpha: f32,
    accumulate: bool,
) {
    for i in 0..m {
        let crow = c.add(i * crs);
        for j in 0..n {
            let mut s = 0f32;
            for p in 0..k {
                s += *a.add(i * ars + p * acs) * *b.add(p * brs + j);
            }
            let x = alpha * s;
            *crow.add(j) = if accumulate { *crow.add(j) + x } else { x };
        }
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod avx2 {
    #[cfg(target_arch = "x86")]
    use std::arch::x86::*;
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    use super::MR;

    /// A lane mask with the first `n` (< 8) lanes set.
    #[inline(always)]
    unsafe fn lanes(n: usize) -> __m256i {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// One block of `R` rows by `V` vectors of 8 columns, of which `cols` are stored.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn block<const R: usize, const V: usize>(
        k: usize,
        (a, ars, acs): (*const f32, usize, usize),
        (b, brs): (*const f32, usize),
        (c, crs): (*mut f32, usize),
        cols: usize,
        alpha: f32,
        accumulate: bool,
    ) {
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        for p in 0..k {
            let bp = b.add(p * brs);
            let mut bv = [_mm256_setzero_ps(); V];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(bp.add(8 * v));
            }
            let ap = a.add(p * acs);
            for (i, row) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*ap.add(i * ars));
                for (r, &y) in row.iter_mut().zip(&bv) {
                    *r = _mm256_fmadd_ps(x, y, *r);
                }
            }
        }
        let al = _mm256_set1_ps(alpha);
        for (i, row) in acc.iter().enumerate() {
            let cp = c.add(i * crs);
            for (v, &r) in row.iter().enumerate() {
                let x = if alpha == 1.0 {
                    r
                } else {
                    _mm256_mul_ps(r, al)
                };
                let dst = cp.add(8 * v);
                if 8 * v + 8 <= cols {
                    let x = if accumulate {
                        _mm256_add_ps(_mm256_loadu_ps(dst), x)
                    } else {
                        x
                    };
                    _mm256_storeu_ps(dst, x);
                } else if 8 * v < cols {
                    let mask = lanes(cols - 8 * v);
                    let x = if accumulate {
                        _mm256_add_ps(_mm256_maskload_ps(dst, mask), x)
                    } else {
                        x
                    };
                    _mm256_maskstore_ps(dst, mask, x);
                }
            }
        }
    }

    /// All row blocks of one column panel of `V` vectors.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn panel<const V: usize>(
        (m, k): (usize, usize),
        (a, ars, acs): (*const f32, usize, usize),
        (b, brs): (*const f32, usize),
        (c, crs): (*mut f32, usize),
        cols: usize,
        alpha: f32,
        accumulate: bool,
    ) {
        let mut i = 0;
        while i + MR <= m {
            block::<MR, V>(
                k,
                (a.add(i * ars), ars, acs),
                (b, brs),
                (c.add(i * crs), crs),
                cols,
                alpha,
                accumulate,
            );
            i += MR;
        }
        let (a, c) = ((a.add(i * ars), ars, acs), (c.add(i * crs), crs));
        let args = (k, a, (b, brs), c, cols, alpha, accumulate);
        match m - i {
            0 => {}
            1 => block::<1, V>(args.0, args.1, args.2, args.3, args.4, args.5, args.6),
            2 => block::<2, V>(args.0, args.1, args.2, args.3, args.4, args.5, args.6),
            3 => block::<3, V>(args.0, args.1, args.2, args.3, args.4, args.5, args.6),
            4 => block::<4, V>(args.0, args.1, args.2, args.3, args.4, args.5, args.6),
            _ => block::<5, V>(args.0, args.1, args.2, args.3, args.4, args.5, args.6),
        }
    }

    /// The 8 x 8 blocks of [`super::transpose`] (`rows`, `cols` multiples of 8).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transpose(
        (src, rs): (*const f32, usize),
        (rows, cols): (usize, usize),
        (dst, drs): (*mut f32, usize),
    ) {
        for r in (0..rows).step_by(8) {
            for c in (0..cols).step_by(8) {
                let s = src.add(r * rs + c);
                let x: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(s.add(i * rs)));
                let t: [__m256; 8] = std::array::from_fn(|i| {
                    let (a, b) = (x[2 * (i / 2)], x[2 * (i / 2) + 1]);
                    if i % 2 == 0 {
                        _mm256_unpacklo_ps(a, b)
                    } else {
                        _mm256_unpackhi_ps(a, b)
                    }
                });
                // u[4h + m]: columns m and m + 4 of rows 4h..4h + 4
                let u: [__m256; 8] = std::array::from_fn(|i| {
                    let (h, m) = (i / 4, i % 4);
                    let (a, b) = (t[4 * h + m / 2], t[4 * h + 2 + m / 2]);
                    if m % 2 == 0 {
                        _mm256_shuffle_ps::<0x44>(a, b)
                    } else {
                        _mm256_shuffle_ps::<0xEE>(a, b)
                    }
                });
                let d = dst.add(c * drs + r);
                for m in 0..4 {
                    let lo = _mm256_permute2f128_ps::<0x20>(u[m], u[4 + m]);
                    let hi = _mm256_permute2f128_ps::<0x31>(u[m], u[4 + m]);
                    _mm256_storeu_ps(d.add(m * drs), lo);
                    _mm256_storeu_ps(d.add((m + 4) * drs), hi);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn matmul(
        (m, n, k): (usize, usize, usize),
        a: (*const f32, usize, usize),
        (b, brs): (*const f32, usize),
        (c, crs): (*mut f32, usize),
        alpha: f32,
        accumulate: bool,
    ) {
        let mut j = 0;
        while j < n {
            let cols = (n - j).min(16);
            let (bj, cj) = ((b.add(j), brs), (c.add(j), crs));
            if cols > 8 {
                panel::<2>((m, k), a, bj, cj, cols, alpha, accumulate);
            } else {
                panel::<1>((m, k), a, bj, cj, cols, alpha, accumulate);
            }
            j += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(simd: bool, m: usize, n: usize, k: usize, transposed_a: bool, accumulate: bool) {
        let np = n.div_ceil(8) * 8;
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let b: Vec<f32> = (0..k * np).map(|i| ((i * 5) % 13) as f32 - 6.0).collect();
        let crs = n + 3;
        let c0: Vec<f32> = (0..m * crs).map(|i| (i % 7) as f32).collect();
        let mut c = c0.clone();
        let (ars, acs) = if transposed_a { (1, m) } else { (k, 1) };
        // SAFETY: the buffers cover the shapes above.
        unsafe {
            matmul(
                simd,
                (m, n, k),
                (a.as_ptr(), ars, acs),
                (b.as_ptr(), np),
                (c.as_mut_ptr(), crs),
                0.5,
                accumulate,
            )
        };
        for i in 0..m {
            for j in 0..crs {
                let want = if j < n {
                    let s: f32 = (0..k).map(|p| a[i * ars + p * acs] * b[p * np + j]).sum();
                    0.5 * s + if accumulate { c0[i * crs + j] } else { 0.0 }
                } else {
                    c0[i * crs + j]
                };
                assert_eq!(c[i * crs + j], want, "m{m} n{n} k{k} ({i}, {j})");
            }
        }
    }

    #[test]
    fn transposes_match_a_plain_loop() {
        for &simd in [false, crate::fused::has_avx2_fma()].iter() {
            for (rows, cols) in [(1, 1), (8, 8), (19, 16), (66, 64), (13, 5), (16, 21)] {
                let rs = cols + 2;
                let src: Vec<f32> = (0..rows * rs).map(|i| i as f32).collect();
                let drs = rows + 3;
                let mut dst = vec![-1f32; cols * drs];
                // SAFETY: the buffers cover the shapes.
                unsafe {
                    transpose(
                        simd,
                        (src.as_ptr(), rs),
                        (rows, cols),
                        (dst.as_mut_ptr(), drs),
                    )
                };
                for c in 0..cols {
                    for r in 0..drs {
                        let want = if r < rows { src[r * rs + c] } else { -1.0 };
                        assert_eq!(dst[c * drs + r], want, "{rows}x{cols} ({r}, {c})");
                    }
                }
            }
        }
    }

    #[test]
    fn products_match_a_plain_loop() {
        let simd = [false, crate::fused::has_avx2_fma()];
        for &s in simd.iter() {
            for (m, n, k) in [(1, 1, 1), (7, 13, 5), (13, 40, 9), (6, 16, 3), (11, 5, 2)] {
                for t in [false, true] {
                    for acc in [false, true] {
                        check(s, m, n, k, t, acc);
                    }
                }
            }
        }
    }
}
