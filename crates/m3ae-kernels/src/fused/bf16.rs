//! Matrix products with bf16 operands and f32 accumulation on the CPU: the products of the
//! one-op transformer block at `train.precision = "bf16"`.
//!
//! [`gemm()`] computes `dst (m x n) = [dst +] lhs (m x k) * rhs (k x n)` where every operand element
//! is first rounded to bf16 (round to nearest, ties to even, [`round`]) and the products are
//! summed in f32, as bf16 hardware does. Operands and result are f32 buffers with any strides, so
//! callers keep f32 master weights and f32 activations and change nothing but the call.
//!
//! Three implementations ([`Backend`]) give the same numerics up to the order of the f32 sums:
//!
//! * [`Backend::Avx512Bf16`]: a packed GEMM whose micro-kernel is `VDPBF16PS` (AVX512-BF16: AMD
//!   Zen 4 and later, Intel Cooper Lake, Sapphire Rapids and later). Operands are rounded while
//!   they are packed into bf16 panels, so no pass of its own converts them; each instruction
//!   multiplies 16 pairs of bf16 and adds them to 16 f32 accumulators.
//! * [`Backend::Emulated`]: every CPU. The operands are rounded into f32 copies and multiplied
//!   by the f32 GEMM (`gemm` crate): bf16 numerics at about f32 speed (the copies cost a few
//!   percent of a product), so a bf16 recipe can be checked on a CPU without bf16 arithmetic.
//! * [`Backend::Portable`]: the packed GEMM of the first with a scalar micro-kernel that does
//!   what `VDPBF16PS` does lane by lane. It is slow and exists to test the packing and blocking
//!   on every CPU; the AVX512-BF16 kernel is then tested against it where the CPU has one.
//!
//! [`backend`] picks the fastest the CPU offers, once per process; `M3AE_BF16_GEMM=emulated`
//! forces the emulated one (for side-by-side measurements on a CPU with AVX512-BF16).
//!
//! AMX (`TDPBF16PS`, Intel Sapphire Rapids and later) is not used yet: its instructions are
//! not stable in Rust's `core::arch`, and a CPU with AMX also has AVX512-BF16, which this module
//! uses.

use super::linear::{gemm_strided, parallelism};
use std::sync::OnceLock;

/// The nearest bf16 of `x` (ties to even) as the upper half of an f32's bits; NaN stays NaN
/// (quieted), infinities stay infinite, and finite values beyond bf16's range become infinite.
#[inline(always)]
pub fn bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        ((b >> 16) as u16) | 0x0040
    } else {
        rounded
    }
}

/// `x` rounded to the nearest bf16 value, as an f32 (see [`bits`]).
///
/// ```
/// use m3ae_kernels::fused::bf16::round;
/// assert_eq!(round(1.0), 1.0);
/// assert_eq!(round(1.0 + 1.0 / 256.0), 1.0); // a tie: to the even neighbour
/// assert_eq!(round(1.0 + 3.0 / 512.0), 1.0 + 1.0 / 128.0);
/// assert_eq!(round(f32::MAX), f32::INFINITY);
/// assert!(round(f32::NAN).is_nan());
/// ```
#[inline(always)]
pub fn round(x: f32) -> f32 {
    f32::from_bits((bits(x) as u32) << 16)
}

/// An implementation of [`gemm()`]; see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `VDPBF16PS` micro-kernel on packed bf16 panels (the CPU must have AVX512-BF16).
    Avx512Bf16,
    /// Operands rounded to bf16 in f32 copies, multiplied by the f32 GEMM.
    Emulated,
    /// The packed GEMM with a scalar model of `VDPBF16PS` (for tests).
    Portable,
}

impl Backend {
    /// A short name for notices and benchmark labels.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Avx512Bf16 => "avx512-bf16",
            Backend::Emulated => "emulated",
            Backend::Portable => "portable",
        }
    }

    /// Whether bf16 products run on bf16 arithmetic of the CPU (faster than f32), rather than
    /// on f32 arithmetic with the numerics of bf16.
    pub fn is_native(self) -> bool {
        self == Backend::Avx512Bf16
    }
}

/// Whether this CPU has AVX512-BF16 (and the AVX-512 foundation its kernel uses).
pub fn cpu_has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The backend [`gemm()`] uses in this process: [`Backend::Avx512Bf16`] where the CPU has it,
/// else [`Backend::Emulated`]; `M3AE_BF16_GEMM=emulated` forces the latter.
pub fn backend() -> Backend {
    static CHOICE: OnceLock<Backend> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        let forced = std::env::var("M3AE_BF16_GEMM").ok();
        if forced.as_deref() != Some("emulated") && cpu_has_avx512_bf16() {
            Backend::Avx512Bf16
        } else {
            Backend::Emulated
        }
    })
}

/// `dst (m x n, row stride drs) = [dst +] lhs (m x k) * rhs (k x n)` with bf16-rounded operands
/// and f32 sums, on [`backend`]. Operands are (slice, row stride, column stride).
///
/// ```
/// use m3ae_kernels::fused::bf16;
/// // 1 + 2^-9 rounds to 1 in bf16, so the product is exactly 3 (f32 would give 3.0058594)
/// let a = [1.0 + 1.0 / 512.0; 3];
/// let b = [1.0f32; 3];
/// let mut c = [0f32; 1];
/// bf16::gemm((1, 1, 3), (&mut c, 1), false, (&a, 3, 1), (&b, 1, 1));
/// assert_eq!(c[0], 3.0);
/// ```
pub fn gemm(
    shape: (usize, usize, usize),
    dst: (&mut [f32], usize),
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
) {
    gemm_with(backend(), shape, dst, accumulate, lhs, rhs)
}

/// [`gemm()`] on a given backend (for tests and benchmarks). Panics where the backend is
/// [`Backend::Avx512Bf16`] and the CPU lacks it, or where a slice is too short for its strides.
pub fn gemm_with(
    backend: Backend,
    (m, n, k): (usize, usize, usize),
    (dst, drs): (&mut [f32], usize),
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * drs..i * drs + n].fill(0.0);
            }
        }
        return;
    }
    assert!(dst.len() >= (m - 1) * drs + n, "bf16 gemm: dst too short");
    let lhs_end = (m - 1) * lhs.1 + (k - 1) * lhs.2 + 1;
    let rhs_end = (k - 1) * rhs.1 + (n - 1) * rhs.2 + 1;
    assert!(lhs.0.len() >= lhs_end, "bf16 gemm: lhs too short");
    assert!(rhs.0.len() >= rhs_end, "bf16 gemm: rhs too short");
    match backend {
        Backend::Emulated => {
            // Rounding the addressed span keeps the strides; the spans the block passes are
            // exactly its operands.
            let l = rounded(&lhs.0[..lhs_end]);
            let r = rounded(&rhs.0[..rhs_end]);
            gemm_strided(
                (m, n, k),
                (dst, drs),
                accumulate,
                (&l, lhs.1, lhs.2),
                (&r, rhs.1, rhs.2),
                parallelism(m, n, k),
            );
        }
        Backend::Portable => {
            packed::gemm(&packed::Scalar, (m, n, k), (dst, drs), accumulate, lhs, rhs)
        }
        Backend::Avx512Bf16 => {
            assert!(
                cpu_has_avx512_bf16(),
                "bf16 gemm: this CPU has no AVX512-BF16"
            );
            #[cfg(target_arch = "x86_64")]
            packed::gemm(&packed::Avx512, (m, n, k), (dst, drs), accumulate, lhs, rhs);
        }
    }
}

/// The f32 product with [`gemm()`]'s arguments, as the one-op block runs it at f32 precision (the
/// `gemm` crate, on rayon when large enough): the baseline of side-by-side benchmarks.
pub fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: (&mut [f32], usize),
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
) {
    gemm_strided((m, n, k), dst, accumulate, lhs, rhs, parallelism(m, n, k))
}

/// The elements of `xs` rounded to bf16 (in parallel for large spans).
fn rounded(xs: &[f32]) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut out = super::storage::uninit_buffer(xs.len());
    // SAFETY: every element is written below before the vector is read.
    unsafe { out.set_len(xs.len()) };
    let fill = |o: &mut [f32], x: &[f32]| {
        for (o, &x) in o.iter_mut().zip(x) {
            *o = round(x);
        }
    };
    if xs.len() <= CHUNK {
        fill(&mut out, xs);
    } else {
        super::for_each_chunk_mut(&mut out, CHUNK, |i, o| {
            fill(o, &xs[i * CHUNK..i * CHUNK + o.len()])
        });
    }
    out
}

/// The packed GEMM: operands rounded and packed into bf16 panels laid out for `VDPBF16PS`, then
/// multiplied tile by tile by a micro-kernel ([`MicroKernel`]).
///
/// Layout: `k` is cut into pairs (an odd `k` gets a zero partner). A panel of `lhs` holds [`MR`]
/// rows as one `u32` per row and pair (`lo` = even element, `hi` = odd), pair-major; a panel of
/// `rhs` holds [`NR`] columns as two bf16 per column and pair, pair-major. One step of the
/// micro-kernel broadcasts a row's pair and multiplies it with the pairs of 16 columns.
mod packed {
    use super::bits;
    use crate::fused::SharedMut;

    /// Rows of a micro-tile.
    pub const MR: usize = 12;
    /// Columns of a micro-tile (two vectors of 16 f32).
    pub const NR: usize = 32;
    /// Elements of `k` per packed block (a multiple of 2).
    const KC: usize = 256;
    /// Columns per packed block of `rhs`.
    const NC: usize = 2048;
    /// Most rows per packed block of `lhs`.
    const MC: usize = 16 * MR;

    /// One micro-tile: `c (mr x nr) = [c +] A-panel * B-panel` over `kp` pairs.
    pub trait MicroKernel: Sync {
        /// # Safety
        /// `a` holds `kp * MR` words, `b` holds `kp * NR * 2` halves, and `c` covers `mr` rows of
        /// stride `ldc` with `nr` columns each (`mr <= MR`, `nr <= NR`).
        #[allow(clippy::too_many_arguments)]
        unsafe fn run(
            &self,
            kp: usize,
            a: *const u32,
            b: *const u16,
            c: *mut f32,
            ldc: usize,
            tile: (usize, usize),
            accumulate: bool,
        );
    }

    /// The lanes of `VDPBF16PS` in scalar code: per column, the odd pair's product and then the
    /// even one's are added to the f32 sum, each product exact in f32 (the instruction also
    /// flushes subnormal inputs and outputs to zero, which this model does not).
    pub struct Scalar;

    impl MicroKernel for Scalar {
        unsafe fn run(
            &self,
            kp: usize,
            a: *const u32,
            b: *const u16,
            c: *mut f32,
            ldc: usize,
            (mr, nr): (usize, usize),
            accumulate: bool,
        ) {
            let f = |h: u32| f32::from_bits(h << 16);
            let mut acc = [[0f32; NR]; MR];
            for p in 0..kp {
                let bp = std::slice::from_raw_parts(b.add(p * NR * 2), NR * 2);
                for (r, row) in acc.iter_mut().enumerate() {
                    let w = *a.add(p * MR + r);
                    let (a0, a1) = (f(w & 0xFFFF), f(w >> 16));
                    for (j, s) in row.iter_mut().enumerate() {
                        *s += a1 * f(bp[2 * j + 1] as u32);
                        *s += a0 * f(bp[2 * j] as u32);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate().take(mr) {
                let out = std::slice::from_raw_parts_mut(c.add(r * ldc), nr);
                for (o, &s) in out.iter_mut().zip(row) {
                    *o = if accumulate { *o + s } else { s };
                }
            }
        }
    }

    /// The `VDPBF16PS` micro-kernel: 12 x 2 accumulator registers, two loads of the `rhs` panel
    /// and one broadcast of an `lhs` pair per pair of `k`.
    #[cfg(target_arch = "x86_64")]
    pub struct Avx512;

    #[cfg(target_arch = "x86_64")]
    impl MicroKernel for Avx512 {
        unsafe fn run(
            &self,
            kp: usize,
            a: *const u32,
            b: *const u16,
            c: *mut f32,
            ldc: usize,
            tile: (usize, usize),
            accumulate: bool,
        ) {
            avx512_tile(kp, a, b, c, ldc, tile, accumulate)
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn avx512_tile(
        kp: usize,
        a: *const u32,
        b: *const u16,
        c: *mut f32,
        ldc: usize,
        (mr, nr): (usize, usize),
        accumulate: bool,
    ) {
        use std::arch::x86_64::*;
        let bh = |v: __m512i| std::mem::transmute::<__m512i, __m512bh>(v);
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..kp {
            let b0 = bh(_mm512_loadu_si512(b.add(p * NR * 2) as *const _));
            let b1 = bh(_mm512_loadu_si512(b.add(p * NR * 2 + 32) as *const _));
            let ap = a.add(p * MR);
            for (r, row) in acc.iter_mut().enumerate() {
                let av = bh(_mm512_set1_epi32(*ap.add(r) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                row[1] = _mm512_dpbf16_ps(row[1], av, b1);
            }
        }
        for (r, row) in acc.iter().enumerate().take(mr) {
            for (h, &v) in row.iter().enumerate() {
                let lo = 16 * h;
                if lo >= nr {
                    break;
                }
                let cols = (nr - lo).min(16);
                let mask: __mmask16 = if cols == 16 {
                    0xFFFF
                } else {
                    (1u16 << cols) - 1
                };
                let dst = c.add(r * ldc + lo);
                let v = if accumulate {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst), v)
                } else {
                    v
                };
                _mm512_mask_storeu_ps(dst, mask, v);
            }
        }
    }

    /// Packs rows `k0..k0 + kc` and columns `j0..j0 + nc` of `rhs` into `NR`-column panels.
    fn pack_rhs(
        (rhs, rs, cs): (&[f32], usize, usize),
        (k0, kc): (usize, usize),
        (j0, nc): (usize, usize),
        out: &mut Vec<u16>,
    ) {
        let kp = kc.div_ceil(2);
        let panels = nc.div_ceil(NR);
        out.clear();
        out.resize(panels * kp * NR * 2, 0);
        for (q, panel) in out.chunks_exact_mut(kp * NR * 2).enumerate() {
            let cols = (nc - q * NR).min(NR);
            for p in 0..kp {
                let dst = &mut panel[p * NR * 2..(p + 1) * NR * 2];
                for t in 0..2 {
                    let kk = 2 * p + t;
                    if kk >= kc {
                        break;
                    }
                    let row = (k0 + kk) * rs;
                    for j in 0..cols {
                        dst[2 * j + t] = bits(rhs[row + (j0 + q * NR + j) * cs]);
                    }
                }
            }
        }
    }

    /// Packs rows `i0..i0 + mc` and columns `k0..k0 + kc` of `lhs` into `MR`-row panels.
    fn pack_lhs(
        (lhs, rs, cs): (&[f32], usize, usize),
        (i0, mc): (usize, usize),
        (k0, kc): (usize, usize),
        out: &mut Vec<u32>,
    ) {
        let kp = kc.div_ceil(2);
        let panels = mc.div_ceil(MR);
        out.clear();
        out.resize(panels * kp * MR, 0);
        for (q, panel) in out.chunks_exact_mut(kp * MR).enumerate() {
            let rows = (mc - q * MR).min(MR);
            for r in 0..rows {
                let base = (i0 + q * MR + r) * rs;
                for p in 0..kp {
                    let k = k0 + 2 * p;
                    let lo = bits(lhs[base + k * cs]) as u32;
                    let hi = if 2 * p + 1 < kc {
                        bits(lhs[base + (k + 1) * cs]) as u32
                    } else {
                        0
                    };
                    panel[p * MR + r] = lo | (hi << 16);
                }
            }
        }
    }

    /// The packed product on `kernel`; arguments as [`super::gemm_with`] (already checked).
    pub fn gemm(
        kernel: &impl MicroKernel,
        (m, n, k): (usize, usize, usize),
        (dst, drs): (&mut [f32], usize),
        accumulate: bool,
        lhs: (&[f32], usize, usize),
        rhs: (&[f32], usize, usize),
    ) {
        // Enough row blocks for every thread to get two, but not below one micro-tile.
        let threads = rayon::current_num_threads().max(1);
        let mc = m.div_ceil(2 * threads).next_multiple_of(MR).clamp(MR, MC);
        let blocks = m.div_ceil(mc);
        let c = SharedMut(dst.as_mut_ptr());
        let mut bpack = Vec::new();
        for j0 in (0..n).step_by(NC) {
            let nc = (n - j0).min(NC);
            for k0 in (0..k).step_by(KC) {
                let kc = (k - k0).min(KC);
                let kp = kc.div_ceil(2);
                pack_rhs(rhs, (k0, kc), (j0, nc), &mut bpack);
                let add = accumulate || k0 > 0;
                let bp = &bpack;
                crate::fused::for_each_index(blocks, |blk| {
                    let i0 = blk * mc;
                    let rows = (m - i0).min(mc);
                    let mut apack = Vec::new();
                    pack_lhs(lhs, (i0, rows), (k0, kc), &mut apack);
                    for q in 0..nc.div_ceil(NR) {
                        let cols = (nc - q * NR).min(NR);
                        let b = bp[q * kp * NR * 2..].as_ptr();
                        for s in 0..rows.div_ceil(MR) {
                            let tile_rows = (rows - s * MR).min(MR);
                            let a = apack[s * kp * MR..].as_ptr();
                            // SAFETY: the panels hold `kp` pairs each; the tile's rows
                            // `i0 + s*MR ..` and columns `j0 + q*NR ..` lie inside `dst`
                            // (checked by the caller), and row blocks are disjoint per task.
                            unsafe {
                                let cp = c.ptr().add((i0 + s * MR) * drs + j0 + q * NR);
                                kernel.run(kp, a, b, cp, drs, (tile_rows, cols), add);
                            }
                        }
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic operand with values of several magnitudes and signs.
    fn operand(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(12_345);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    /// `dst = [dst +] round(lhs) round(rhs)` summed in f64: the exact bf16 product.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        (m, n, k): (usize, usize, usize),
        dst: &mut [f32],
        drs: usize,
        accumulate: bool,
        (l, lrs, lcs): (&[f32], usize, usize),
        (r, rrs, rcs): (&[f32], usize, usize),
    ) {
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    s += round(l[i * lrs + p * lcs]) as f64 * round(r[p * rrs + j * rcs]) as f64;
                }
                let d = &mut dst[i * drs + j];
                *d = if accumulate {
                    (*d as f64 + s) as f32
                } else {
                    s as f32
                };
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(bits(1.0), 0x3F80);
        assert_eq!(bits(-2.0), 0xC000);
        // ties: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7 (even: 1); 1 + 3 * 2^-8 between
        // 1 + 2^-7 and 1 + 2^-6 (even: the upper)
        assert_eq!(round(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round(1.0 + 3.0 / 256.0), 1.0 + 1.0 / 64.0);
        assert_eq!(round(1.0 + 1.0 / 256.0 + 1e-6), 1.0 + 1.0 / 128.0);
        assert_eq!(round(f32::INFINITY), f32::INFINITY);
        assert_eq!(round(f32::NEG_INFINITY), f32::NEG_INFINITY);
        assert_eq!(round(-f32::MAX), f32::NEG_INFINITY);
        assert!(round(f32::NAN).is_nan() && round(-f32::NAN).is_nan());
        assert_eq!(round(0.0).to_bits(), 0);
        assert_eq!(round(-0.0).to_bits(), (-0.0f32).to_bits());
        let x = operand(10_000, 7);
        for &v in &x {
            let r = round(v);
            assert_eq!(r.to_bits() & 0xFFFF, 0);
            assert!((r - v).abs() <= v.abs() / 256.0, "{v} -> {r}");
        }
    }

    /// `backend` against the exact bf16 product, on shapes with partial tiles, odd `k`, several
    /// `k` and `n` blocks, transposed operands and accumulation.
    fn check_backend(backend: Backend) {
        let shapes = [
            (1, 1, 1),
            (5, 7, 3),
            (12, 32, 2),
            (13, 33, 9),
            (25, 70, 257),
            (40, 2100, 6),
            (300, 65, 600),
        ];
        for (si, &(m, n, k)) in shapes.iter().enumerate() {
            for transposed in [false, true] {
                for accumulate in [false, true] {
                    let seed = si as u32 * 4 + transposed as u32 * 2 + accumulate as u32;
                    let (l, r) = (operand(m * k, seed), operand(k * n, seed + 100));
                    // as stored: lhs m x k (or k x m read transposed), rhs k x n (or n x k)
                    let (ls, rs) = if transposed {
                        ((1, m), (1, k))
                    } else {
                        ((k, 1), (n, 1))
                    };
                    let drs = n + 3;
                    let init = operand(m * drs, seed + 200);
                    let mut want = init.clone();
                    reference(
                        (m, n, k),
                        &mut want,
                        drs,
                        accumulate,
                        (&l, ls.0, ls.1),
                        (&r, rs.0, rs.1),
                    );
                    let mut got = init.clone();
                    gemm_with(
                        backend,
                        (m, n, k),
                        (&mut got, drs),
                        accumulate,
                        (&l, ls.0, ls.1),
                        (&r, rs.0, rs.1),
                    );
                    for i in 0..m {
                        for j in 0..drs {
                            let (g, w) = (got[i * drs + j], want[i * drs + j]);
                            if j >= n {
                                assert_eq!(g, init[i * drs + j], "{backend:?} wrote past n");
                                continue;
                            }
                            // f32 sums of k terms of magnitude <= 4
                            let tol = 1e-6 * (k as f32 * 4.0 + w.abs()) + 1e-6;
                            assert!(
                                (g - w).abs() <= tol,
                                "{backend:?} {m}x{n}x{k} t{transposed} a{accumulate} ({i},{j}): \
                                 {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn emulated_and_portable_backends_match_the_exact_bf16_product() {
        check_backend(Backend::Emulated);
        check_backend(Backend::Portable);
    }

    /// The `VDPBF16PS` kernel, which only a CPU with AVX512-BF16 runs (run it there with
    /// `cargo test --release -p m3ae-kernels -- --ignored avx512_bf16`).
    #[test]
    #[ignore = "needs a CPU with AVX512-BF16 (AMD Zen 4 or later, Intel Cooper Lake, Sapphire \
                Rapids or later)"]
    fn avx512_bf16_backend_matches_the_exact_bf16_product() {
        assert!(
            cpu_has_avx512_bf16(),
            "this CPU has no AVX512-BF16: the test cannot run here"
        );
        check_backend(Backend::Avx512Bf16);
    }

    #[test]
    fn bf16_products_differ_from_f32_by_the_operand_rounding() {
        let (m, n, k) = (8, 16, 64);
        let (l, r) = (operand(m * k, 1), operand(k * n, 2));
        let mut exact = vec![0f32; m * n];
        super::super::linear::gemm_strided(
            (m, n, k),
            (&mut exact, n),
            false,
            (&l, k, 1),
            (&r, n, 1),
            gemm::Parallelism::None,
        );
        let mut c = vec![0f32; m * n];
        gemm((m, n, k), (&mut c, n), false, (&l, k, 1), (&r, n, 1));
        let worst = c
            .iter()
            .zip(&exact)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // each operand is off by at most 2^-9 relative: 2 * 2^-9 * k * 4 * 2 at most
        assert!(
            worst > 0.0 && worst < 2.0 * k as f32 * 8.0 / 512.0,
            "{worst}"
        );
    }
}
