//! Matrix products with bf16 operands and f32 accumulation on the CPU: the products of the
//! one-op transformer block at `train.precision = "bf16"`.
//!
//! [`gemm()`] computes `dst (m x n) = [dst +] lhs (m x k) * rhs (k x n)` where every operand element
//! is first rounded to bf16 (round to nearest, ties to even, [`round`]) and the products are
//! summed in f32, as bf16 hardware does. Operands and result are f32 buffers with any strides, so
//! callers keep f32 master weights and f32 activations and change nothing but the call.
//!
//! Four implementations ([`Backend`]) give the same numerics up to the order of the f32 sums:
//!
//! * [`Backend::Amx`]: the packed GEMM with an AMX micro-kernel (`TDPBF16PS` on 16 x 16 tiles of
//!   f32 sums, four per 32 x 32 block of the result; Intel Sapphire Rapids and later, Linux).
//! * [`Backend::Avx512Bf16`]: a packed GEMM whose micro-kernel is `VDPBF16PS` (AVX512-BF16: AMD
//!   Zen 4 and later, Intel Cooper Lake, Sapphire Rapids and later). Each operand is rounded
//!   once per product, in parallel and in its memory order, by `VCVTNE2PS2BF16` while it is
//!   packed (the left one into a row-major matrix of bf16 pairs that the micro-kernel reads in
//!   place, the right one into panels); each `VDPBF16PS` multiplies 16 pairs of bf16 and adds
//!   them to 16 f32 accumulators.
//! * [`Backend::Emulated`]: every CPU. The operands are rounded into f32 copies and multiplied
//!   by the f32 GEMM (`gemm` crate): bf16 numerics at about f32 speed (the copies cost a few
//!   percent of a product), so a bf16 recipe can be checked on a CPU without bf16 arithmetic.
//! * [`Backend::Portable`]: the packed GEMM with a scalar micro-kernel that does what the bf16
//!   instructions do lane by lane. It is slow and exists to test the packing and blocking on
//!   every CPU (the tests run it on both kernels' layouts); the hardware kernels are tested
//!   against it where the CPU has them.
//!
//! [`backend`] picks the fastest the process can run, once, and uses a native kernel only after
//! a small product on it agrees with the scalar model; `M3AE_BF16_GEMM=<name>` asks for one (for
//! side-by-side measurements). The AMX kernel is written with `asm!` (AMX's intrinsics are not
//! stable in Rust); the process asks Linux for the AMX state before its first use.

use super::linear::{empty_product, gemm_strided, parallelism};
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
    /// AMX `TDPBF16PS` micro-kernel on packed bf16 panels (the CPU must have AMX-BF16 and the
    /// operating system must grant the process AMX state: Linux, [`amx_usable`]).
    Amx,
    /// `VDPBF16PS` micro-kernel on packed bf16 panels (the CPU must have AVX512-BF16).
    Avx512Bf16,
    /// Operands rounded to bf16 in f32 copies, multiplied by the f32 GEMM.
    Emulated,
    /// The packed GEMM with a scalar model of `VDPBF16PS` on its layout (for tests).
    Portable,
}

impl Backend {
    /// A short name for notices, benchmark labels and `M3AE_BF16_GEMM`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Amx => "amx",
            Backend::Avx512Bf16 => "avx512-bf16",
            Backend::Emulated => "emulated",
            Backend::Portable => "portable",
        }
    }

    /// Whether bf16 products run on bf16 arithmetic of the CPU (faster than f32), rather than
    /// on f32 arithmetic with the numerics of bf16.
    pub fn is_native(self) -> bool {
        matches!(self, Backend::Amx | Backend::Avx512Bf16)
    }

    /// Whether this process can run the backend.
    pub fn is_available(self) -> bool {
        match self {
            Backend::Amx => amx_usable(),
            Backend::Avx512Bf16 => cpu_has_avx512_bf16(),
            Backend::Emulated | Backend::Portable => true,
        }
    }
}

/// Whether this CPU has AVX512-BF16 (and the AVX-512 foundation and byte/word instructions its
/// kernel and packing use; every CPU with AVX512-BF16 has them).
pub fn cpu_has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this process may run AMX bf16 instructions: the CPU reports AMX-TILE and AMX-BF16
/// (CPUID leaf 7), and Linux grants the process the AMX tile state (`arch_prctl(
/// ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, requested once; without it the first tile
/// instruction would kill the process). Always false elsewhere.
pub fn amx_usable() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        static USABLE: OnceLock<bool> = OnceLock::new();
        *USABLE.get_or_init(|| {
            // leaf 7 only where the CPU reports a maximum leaf of at least 7
            use std::arch::x86_64::{__cpuid, __cpuid_count};
            let leaf7 = (__cpuid(0).eax >= 7).then(|| __cpuid_count(7, 0));
            let Some(leaf7) = leaf7 else { return false };
            let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
            if !(amx_bf16 && amx_tile) {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call with integer arguments; it only changes which
            // register state the kernel lets this process use.
            unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                ) == 0
            }
        })
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// The backend [`gemm()`] uses in this process, chosen once: [`Backend::Amx`] where the process
/// can run it, else [`Backend::Avx512Bf16`] where the CPU has it, else [`Backend::Emulated`].
/// A native backend is used only after it has multiplied a small product (partial tiles,
/// several blocks of `k`) to within float rounding of its scalar model; otherwise the next one
/// is tried and a warning is logged. `M3AE_BF16_GEMM=<name>` ([`Backend::name`]) asks for one
/// backend (still checked; an unavailable one falls back, with a warning).
pub fn backend() -> Backend {
    static CHOICE: OnceLock<Backend> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        let forced = std::env::var("M3AE_BF16_GEMM").ok();
        let order = [Backend::Amx, Backend::Avx512Bf16];
        let candidates: Vec<Backend> = match forced.as_deref() {
            None | Some("") => order.to_vec(),
            Some(name) => match order.iter().find(|b| b.name() == name) {
                Some(&b) => vec![b],
                None if name == Backend::Emulated.name() => Vec::new(),
                None => {
                    log::warn!(
                        "M3AE_BF16_GEMM={name:?}: expected amx, avx512-bf16 or emulated; \
                         choosing by the CPU"
                    );
                    order.to_vec()
                }
            },
        };
        for b in candidates {
            if !b.is_available() {
                if forced.is_some() {
                    log::warn!("M3AE_BF16_GEMM={}: not available here", b.name());
                }
                continue;
            }
            match self_check(b) {
                Ok(()) => return b,
                Err(e) => log::warn!(
                    "bf16 products: the {} kernel disagrees with its model on this CPU ({e}); \
                     not used",
                    b.name()
                ),
            }
        }
        Backend::Emulated
    })
}

/// Multiplies a small product with partial tiles, an odd `k` over two blocks and
/// accumulation on `backend` and on its scalar model; `Err` names the worst difference. It runs
/// on a pool of its own with one thread: [`backend`] may first be called from inside a parallel
/// task, and other threads wait for it meanwhile.
fn self_check(backend: Backend) -> Result<(), String> {
    match rayon::ThreadPoolBuilder::new().num_threads(1).build() {
        Ok(pool) => pool.install(|| check_against_model(backend)),
        Err(e) => Err(format!("no thread for the check: {e}")),
    }
}

fn check_against_model(backend: Backend) -> Result<(), String> {
    let (m, n, k) = (45, 37, 1200 + 77);
    let uniform = crate::testing::uniform;
    let (lhs, rhs, init) = (uniform(1, m * k), uniform(2, k * n), uniform(3, m * n));
    let (mut got, mut want) = (init.clone(), init);
    // lhs read transposed, as the weight-gradient products do
    let (l, r) = ((&lhs[..], 1, m), (&rhs[..], n, 1));
    gemm_with(backend, (m, n, k), (&mut got, n), true, l, r);
    match backend {
        Backend::Amx => packed::gemm(
            &packed::Scalar::<packed::AmxLayout>(Default::default()),
            (m, n, k),
            (&mut want, n),
            true,
            l,
            r,
        ),
        _ => gemm_with(Backend::Portable, (m, n, k), (&mut want, n), true, l, r),
    }
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| {
            if g.is_finite() {
                (g - w).abs()
            } else {
                f32::INFINITY
            }
        })
        .fold(0f32, f32::max);
    // sums of 1,277 products below 1 in magnitude: orders of summation differ by ~1e-4 at most
    if worst <= 1e-3 {
        Ok(())
    } else {
        Err(format!("largest difference {worst}"))
    }
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

/// [`gemm()`] on a given backend (for tests and benchmarks). Panics where the backend is not
/// available ([`Backend::is_available`]), or where a slice is too short for its strides.
pub fn gemm_with(
    backend: Backend,
    (m, n, k): (usize, usize, usize),
    (dst, drs): (&mut [f32], usize),
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
) {
    if empty_product((m, n, k), (dst, drs), accumulate) {
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
        Backend::Portable => packed::gemm(
            &packed::Scalar::<packed::VdpLayout>(Default::default()),
            (m, n, k),
            (dst, drs),
            accumulate,
            lhs,
            rhs,
        ),
        Backend::Avx512Bf16 => {
            assert!(
                cpu_has_avx512_bf16(),
                "bf16 gemm: this CPU has no AVX512-BF16"
            );
            #[cfg(target_arch = "x86_64")]
            packed::gemm(&packed::Avx512, (m, n, k), (dst, drs), accumulate, lhs, rhs);
        }
        Backend::Amx => {
            assert!(amx_usable(), "bf16 gemm: this process cannot use AMX-BF16");
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            packed::gemm(&packed::Amx, (m, n, k), (dst, drs), accumulate, lhs, rhs);
        }
    }
}

/// The f32 product with [`gemm()`]'s arguments, as the one-op block runs it at f32 precision (the
/// `gemm` crate, on rayon when large enough): the baseline of side-by-side benchmarks.
pub fn gemm_f32(
    shape: (usize, usize, usize),
    dst: (&mut [f32], usize),
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
) {
    super::linear::product(false, shape, dst, accumulate, lhs, rhs)
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

/// The packed GEMM: operands rounded and packed into bf16 laid out for the bf16 instructions,
/// then multiplied tile by tile by a micro-kernel ([`MicroKernel`]).
///
/// Layout: `k` is cut into pairs (an odd `k` gets a zero partner, and each kernel may ask for
/// the pairs to be padded with zeros to a multiple of its own). A panel of `rhs` holds `NR`
/// columns as two bf16 per column and pair, pair-major (the layout both `VDPBF16PS` and AMX's
/// `TDPBF16PS` read: one pair of a column per 32-bit lane). `lhs` becomes one row-major matrix
/// of one `u32` per row and pair (`lo` = even element, `hi` = odd), its rows padded to a whole
/// micro-tile: `VDPBF16PS` broadcasts one word per row and pair from it, and an AMX tile row is
/// 16 consecutive words of one row.
mod packed {
    use super::bits;
    use crate::fused::SharedMut;

    /// Columns of a micro-tile for every kernel (two vectors or two tiles of 16 f32).
    pub const NR: usize = 32;

    /// One micro-tile: `c (mr x nr) = [c +] A-panel * B-panel` over `kp` pairs.
    pub trait MicroKernel: Sync {
        /// The packing this kernel reads.
        type Layout: Layout;

        /// # Safety
        /// `a` holds `MR` rows of `kp` words at a stride of `lda` words, `b` holds `kp * NR * 2`
        /// halves (`kp` a multiple of `KP_ALIGN`), and `c` covers `mr` rows of stride `ldc`
        /// with `nr` columns each (`mr <= MR`, `nr <= NR`; constants of
        /// [`MicroKernel::Layout`]).
        #[allow(clippy::too_many_arguments)]
        unsafe fn run(
            &self,
            kp: usize,
            a: *const u32,
            lda: usize,
            b: *const u16,
            c: *mut f32,
            ldc: usize,
            tile: (usize, usize),
            accumulate: bool,
        );

        /// Whether packing for this kernel may round with the CPU's `VCVTNE2PS2BF16`
        /// ([`Convert::Native`]).
        fn native_convert(&self) -> bool {
            false
        }
    }

    /// `c (mr x nr) = [c +] acc`, the first `nr` of each of the first `mr` rows of `acc`.
    ///
    /// # Safety
    /// As [`MicroKernel::run`]'s `c`.
    unsafe fn store<const W: usize>(
        acc: &[[f32; W]],
        c: *mut f32,
        ldc: usize,
        (mr, nr): (usize, usize),
        accumulate: bool,
    ) {
        for (r, row) in acc.iter().enumerate().take(mr) {
            let out = std::slice::from_raw_parts_mut(c.add(r * ldc), nr);
            for (o, &s) in out.iter_mut().zip(row) {
                *o = if accumulate { *o + s } else { s };
            }
        }
    }

    /// The lanes of the bf16 dot-product instructions in scalar code, on the layout of kernel
    /// `K`: per column, the odd pair's product and then the even one's are added to the f32
    /// sum, each product exact in f32 (the instructions also flush subnormal inputs and outputs
    /// to zero, which this model does not).
    pub struct Scalar<K>(pub std::marker::PhantomData<K>);

    /// Layout parameters of [`Avx512`] for the scalar model.
    pub struct VdpLayout;
    /// Layout parameters of [`Amx`] for the scalar model.
    pub struct AmxLayout;

    /// A kernel's packing (shared by the hardware kernel and its scalar model).
    pub trait Layout: Sync {
        /// Rows of a micro-tile.
        const MR: usize;
        /// Elements of `k` per packed block (a multiple of 2 * `KP_ALIGN`).
        const KC: usize;
        /// The pairs of `k` are padded with zeros to a multiple of this.
        const KP_ALIGN: usize;
    }

    impl Layout for VdpLayout {
        const MR: usize = 12;
        const KC: usize = 256;
        const KP_ALIGN: usize = 1;
    }

    impl Layout for AmxLayout {
        const MR: usize = 32;
        const KC: usize = 1024;
        const KP_ALIGN: usize = 16;
    }

    impl<K: Layout> MicroKernel for Scalar<K> {
        type Layout = K;

        unsafe fn run(
            &self,
            kp: usize,
            a: *const u32,
            lda: usize,
            b: *const u16,
            c: *mut f32,
            ldc: usize,
            tile: (usize, usize),
            accumulate: bool,
        ) {
            let f = |h: u32| f32::from_bits(h << 16);
            let mut acc = vec![[0f32; NR]; K::MR];
            for p in 0..kp {
                let bp = std::slice::from_raw_parts(b.add(p * NR * 2), NR * 2);
                for (r, row) in acc.iter_mut().enumerate() {
                    let w = *a.add(r * lda + p);
                    let (a0, a1) = (f(w & 0xFFFF), f(w >> 16));
                    for (j, s) in row.iter_mut().enumerate() {
                        *s += a1 * f(bp[2 * j + 1] as u32);
                        *s += a0 * f(bp[2 * j] as u32);
                    }
                }
            }
            store(&acc, c, ldc, tile, accumulate)
        }
    }

    /// The `VDPBF16PS` micro-kernel (AVX512-BF16): 12 x 2 accumulator registers, two loads of
    /// the `rhs` panel and one broadcast of an `lhs` pair per pair of `k`.
    #[cfg(target_arch = "x86_64")]
    pub struct Avx512;

    #[cfg(target_arch = "x86_64")]
    impl MicroKernel for Avx512 {
        type Layout = VdpLayout;

        unsafe fn run(
            &self,
            kp: usize,
            a: *const u32,
            lda: usize,
            b: *const u16,
            c: *mut f32,
            ldc: usize,
            tile: (usize, usize),
            accumulate: bool,
        ) {
            avx512_tile(kp, (a, lda), b, (c, ldc), tile, accumulate)
        }

        fn native_convert(&self) -> bool {
            true
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn avx512_tile(
        kp: usize,
        (a, lda): (*const u32, usize),
        b: *const u16,
        (c, ldc): (*mut f32, usize),
        (mr, nr): (usize, usize),
        accumulate: bool,
    ) {
        use std::arch::x86_64::*;
        const MR: usize = VdpLayout::MR;
        let bh = |v: __m512i| std::mem::transmute::<__m512i, __m512bh>(v);
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..kp {
            let b0 = bh(_mm512_loadu_si512(b.add(p * NR * 2) as *const _));
            let b1 = bh(_mm512_loadu_si512(b.add(p * NR * 2 + 32) as *const _));
            let ap = a.add(p);
            for (r, row) in acc.iter_mut().enumerate() {
                let av = bh(_mm512_set1_epi32(*ap.add(r * lda) as i32));
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
                let mask = native::lanes(nr - lo);
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

    /// The AMX micro-kernel (`TDPBF16PS`): a 32 x 32 tile of `c` in four 16 x 16 accumulator
    /// tiles (tmm0-3), two 16-row tiles of `lhs` (tmm4-5) and two 16-column tiles of `rhs`
    /// (tmm6-7) per 16 pairs of `k`. The tile configuration is loaded at the start of each
    /// micro-tile and released at its end, so no thread keeps AMX state between calls.
    /// Written with `asm!` (AMX's intrinsics are not stable in Rust).
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    pub struct Amx;

    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    impl MicroKernel for Amx {
        type Layout = AmxLayout;

        unsafe fn run(
            &self,
            kp: usize,
            a: *const u32,
            lda: usize,
            b: *const u16,
            c: *mut f32,
            ldc: usize,
            tile: (usize, usize),
            accumulate: bool,
        ) {
            use std::arch::asm;
            /// Palette 1, every tile 16 rows of 64 bytes.
            #[repr(C, align(64))]
            struct Config([u8; 64]);
            // a static, so that the 64-byte block has its declared alignment
            static CONFIG: Config = {
                let mut c = [0u8; 64];
                c[0] = 1;
                let mut t = 0;
                while t < 8 {
                    c[16 + 2 * t] = 64; // bytes per row (little-endian u16)
                    c[48 + t] = 16; // rows
                    t += 1;
                }
                Config(c)
            };
            #[repr(C, align(64))]
            struct Out([[f32; NR]; 32]);
            let mut out = Out([[0f32; NR]; 32]);
            let a_stride = lda * 4; // bytes between lhs rows
            let b_stride = NR * 4; // bytes between pairs of the rhs panel
            let a1 = (a as *const u8).add(16 * a_stride);
            asm!(
                "ldtilecfg [{cfg}]",
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                cfg = in(reg) CONFIG.0.as_ptr(),
                options(nostack, readonly),
            );
            for s in 0..kp / 16 {
                let pa0 = (a as *const u8).add(s * 64);
                let pa1 = a1.add(s * 64);
                let pb = (b as *const u8).add(s * 16 * b_stride);
                asm!(
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) pa0,
                    a1 = in(reg) pa1,
                    b0 = in(reg) pb,
                    b1 = in(reg) pb.add(64),
                    sa = in(reg) a_stride,
                    sb = in(reg) b_stride,
                    options(nostack, readonly),
                );
            }
            let o = out.0.as_mut_ptr() as *mut u8;
            let so = NR * 4;
            asm!(
                "tilestored [{o0} + {so}*1], tmm0",
                "tilestored [{o1} + {so}*1], tmm1",
                "tilestored [{o2} + {so}*1], tmm2",
                "tilestored [{o3} + {so}*1], tmm3",
                "tilerelease",
                o0 = in(reg) o,
                o1 = in(reg) o.add(64),
                o2 = in(reg) o.add(16 * so),
                o3 = in(reg) o.add(16 * so + 64),
                so = in(reg) so,
                options(nostack),
            );
            store(&out.0, c, ldc, tile, accumulate)
        }

        fn native_convert(&self) -> bool {
            super::cpu_has_avx512_bf16()
        }
    }

    /// One `u32` of a packed operand: `lo` (even `k`) in the low half, `hi` in the high half.
    #[inline(always)]
    fn pair(lo: f32, hi: f32) -> u32 {
        bits(lo) as u32 | ((bits(hi) as u32) << 16)
    }

    /// How packing rounds f32 to bf16.
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub enum Convert {
        /// [`bits`], element by element: exactly the numerics of the module docs.
        Scalar,
        /// `VCVTNE2PS2BF16`, 32 elements per instruction: the same rounding (to nearest, ties
        /// to even; NaN stays NaN), except that subnormal inputs become zero, which changes no
        /// product: the bf16 dot-product instructions treat subnormal operands as zero anyway.
        Native,
    }

    impl Convert {
        /// `dst[i] = bits(src[i])`.
        pub(super) fn run(self, src: &[f32], dst: &mut [u16]) {
            debug_assert_eq!(src.len(), dst.len());
            #[cfg(target_arch = "x86_64")]
            if self == Convert::Native {
                // SAFETY: `Native` is chosen only where the CPU has AVX512-BF16 (and with it
                // AVX512-BW, checked by `cpu_has_avx512_bf16`).
                return unsafe { native::run(src, dst) };
            }
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = bits(x);
            }
        }

        /// `dst[i] = pair(lo[i], hi[i])`.
        pub(super) fn interleave(self, lo: &[f32], hi: &[f32], dst: &mut [u32]) {
            assert!(lo.len() == dst.len() && hi.len() == dst.len());
            let chunk = dst.len().next_multiple_of(16).max(16);
            // SAFETY: one chunk covering `dst`.
            unsafe { self.interleave_to(lo, hi, dst.as_mut_ptr(), (chunk, 0)) }
        }

        /// `pair(lo[i], hi[i])` into `dst`, in chunks of `chunk` words (a multiple of 16)
        /// `stride` words apart: element `i` at `(i / chunk) * stride + i % chunk`. One call
        /// writes a row of `rhs` into the same pair of every panel.
        ///
        /// # Safety
        /// `dst` must be valid for those writes, and `hi` as long as `lo`.
        pub(super) unsafe fn interleave_to(
            self,
            lo: &[f32],
            hi: &[f32],
            dst: *mut u32,
            (chunk, stride): (usize, usize),
        ) {
            debug_assert!(hi.len() == lo.len() && chunk % 16 == 0);
            #[cfg(target_arch = "x86_64")]
            if self == Convert::Native {
                // SAFETY: as in `run`; the caller vouches for `dst`.
                return native::interleave_to(lo, hi, dst, (chunk, stride));
            }
            for (i, (&l, &h)) in lo.iter().zip(hi).enumerate() {
                *dst.add((i / chunk) * stride + i % chunk) = pair(l, h);
            }
        }
    }

    /// The AVX512-BF16 conversions of [`Convert::Native`].
    #[cfg(target_arch = "x86_64")]
    mod native {
        use std::arch::x86_64::*;

        /// A mask of the first `n` lanes (all 16 where `n >= 16`).
        pub fn lanes(n: usize) -> __mmask16 {
            if n >= 16 {
                0xFFFF
            } else {
                (1u16 << n) - 1
            }
        }

        /// # Safety
        /// The CPU must have AVX512-BF16 and AVX512-BW; `dst` is as long as `src`.
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        pub unsafe fn run(src: &[f32], dst: &mut [u16]) {
            let n = src.len();
            let mut i = 0;
            while i < n {
                let (m0, m1) = (lanes(n - i), lanes((n - i).saturating_sub(16)));
                let x0 = _mm512_maskz_loadu_ps(m0, src.as_ptr().add(i));
                let x1 = _mm512_maskz_loadu_ps(m1, src.as_ptr().wrapping_add(i + 16));
                // the low 16 halves come from the second operand
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(x1, x0));
                let mask = (m0 as u32) | ((m1 as u32) << 16);
                _mm512_mask_storeu_epi16(dst.as_mut_ptr().add(i) as *mut i16, mask, v);
                i += 32;
            }
        }

        /// # Safety
        /// As [`run`], and as [`super::Convert::interleave_to`].
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        pub unsafe fn interleave_to(
            lo: &[f32],
            hi: &[f32],
            dst: *mut u32,
            (chunk, stride): (usize, usize),
        ) {
            // halves 0..16 from `lo`, 16..32 from `hi`, into lo0 hi0 lo1 hi1 ...
            let order = _mm512_set_epi16(
                31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5,
                20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
            );
            let n = lo.len();
            let mut i = 0;
            while i < n {
                let m = lanes(n - i);
                let l = _mm512_maskz_loadu_ps(m, lo.as_ptr().add(i));
                let h = _mm512_maskz_loadu_ps(m, hi.as_ptr().add(i));
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(h, l));
                let v = _mm512_permutexvar_epi16(order, v);
                let out = dst.add((i / chunk) * stride + i % chunk);
                _mm512_mask_storeu_epi32(out as *mut i32, m, v);
                i += 16;
            }
        }
    }

    thread_local! {
        /// The packed operands of the last product on this thread, kept so that a training
        /// step does not allocate (and fault in) megabytes per product.
        static WORKSPACE: std::cell::Cell<(Vec<u32>, Vec<u32>)> =
            const { std::cell::Cell::new((Vec::new(), Vec::new())) };
    }

    /// `buf` at least `len` long (reusing its allocation; the caller writes every element it
    /// reads).
    fn at_least<T: Copy + Default>(buf: &mut Vec<T>, len: usize) {
        if buf.len() < len {
            buf.clear();
            buf.resize(len, T::default());
        }
    }

    /// `words` viewed as their halves (little-endian: the low half first).
    fn halves(words: &mut [u32]) -> &mut [u16] {
        // SAFETY: u16 has a smaller alignment than u32 and every bit pattern is valid.
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u16, 2 * words.len()) }
    }

    /// Pairs (and rows) gathered before they are written transposed.
    const BLOCK: usize = 64;

    /// Rounds `lhs` (`m x k`) into `out`: `rows` rows (`rows >= m`) of `lda` words (`lda >=
    /// k / 2`), one word per pair of `k` ([`pair`]); the pairs past `k` and the rows past `m`
    /// are zero. Tasks of [`BLOCK`] rows in parallel, each reading its operand in memory order.
    fn pack_lhs(
        cv: Convert,
        (lhs, rs, cs): (&[f32], usize, usize),
        (m, k): (usize, usize),
        (rows, lda): (usize, usize),
        out: &mut Vec<u32>,
    ) {
        let kp = k.div_ceil(2);
        at_least(out, rows * lda);
        out[m * lda..rows * lda].fill(0);
        let o = SharedMut(out.as_mut_ptr());
        crate::fused::for_each_index(m.div_ceil(BLOCK), |t| {
            let (i0, i1) = (t * BLOCK, ((t + 1) * BLOCK).min(m));
            // SAFETY: rows `i0..i1` of `out` (`lda` words each) belong to this task alone.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(o.ptr().add(i0 * lda), (i1 - i0) * lda) };
            if cs == 1 {
                // rows are contiguous: a row's pairs are its elements in order
                for (i, d) in (i0..i1).zip(dst.chunks_exact_mut(lda)) {
                    let d = halves(d);
                    cv.run(&lhs[i * rs..i * rs + k], &mut d[..k]);
                    d[k..].fill(0);
                }
            } else if rs == 1 {
                // columns are contiguous (a transposed operand): interleave two columns into
                // one word of every row, BLOCK pairs at a time, then write them row by row
                let mut tmp = vec![0u32; BLOCK * BLOCK];
                let zeros = vec![0f32; i1 - i0];
                let col = |kk: usize| &lhs[kk * cs + i0..kk * cs + i1];
                for p0 in (0..kp).step_by(BLOCK) {
                    let pairs = (kp - p0).min(BLOCK);
                    for (p, t) in (p0..p0 + pairs).zip(tmp.chunks_exact_mut(BLOCK)) {
                        let hi = if 2 * p + 1 < k {
                            col(2 * p + 1)
                        } else {
                            &zeros
                        };
                        cv.interleave(col(2 * p), hi, &mut t[..i1 - i0]);
                    }
                    for (r, d) in dst.chunks_exact_mut(lda).enumerate() {
                        for (p, w) in d[p0..p0 + pairs].iter_mut().enumerate() {
                            *w = tmp[p * BLOCK + r];
                        }
                    }
                }
                for d in dst.chunks_exact_mut(lda) {
                    d[kp..].fill(0);
                }
            } else {
                for (i, d) in (i0..i1).zip(dst.chunks_exact_mut(lda)) {
                    for (p, w) in d.iter_mut().enumerate() {
                        let at = |kk: usize| if kk < k { lhs[i * rs + kk * cs] } else { 0.0 };
                        *w = pair(at(2 * p), at(2 * p + 1));
                    }
                }
            }
        });
    }

    /// Rounds `rhs` (`k x n`) into `out`: panels of `NR` columns (the last one zero-padded),
    /// each `kp` pairs of `k` (`kp >= k / 2`; the pairs past `k` are zero), a pair of a column
    /// as one word ([`pair`]), pair-major. In parallel: by blocks of pairs where the rows of
    /// `rhs` are contiguous (each task reads whole rows), else by panels.
    fn pack_rhs(
        cv: Convert,
        (rhs, rs, cs): (&[f32], usize, usize),
        (k, n): (usize, usize),
        kp: usize,
        out: &mut Vec<u32>,
    ) {
        let (pairs, panel, panels) = (k.div_ceil(2), kp * NR, n.div_ceil(NR));
        // pair `p` of column `j` of a panel at word `p * NR + j`
        at_least(out, panels * panel);
        for q in 0..panels {
            out[q * panel + pairs * NR..(q + 1) * panel].fill(0);
        }
        let o = SharedMut(out.as_mut_ptr());
        if cs == 1 {
            // rows are contiguous: tasks of BLOCK pairs read whole rows (in memory order) and
            // interleave two of them into one pair of every panel
            let zeros = vec![0f32; n];
            crate::fused::for_each_index(pairs.div_ceil(BLOCK), |t| {
                for p in t * BLOCK..((t + 1) * BLOCK).min(pairs) {
                    let lo = &rhs[2 * p * rs..2 * p * rs + n];
                    let hi = match 2 * p + 1 < k {
                        true => &rhs[(2 * p + 1) * rs..(2 * p + 1) * rs + n],
                        false => &zeros[..],
                    };
                    // SAFETY: pair `p` of every panel belongs to this task alone; columns
                    // `q * NR ..` go to panel `q`.
                    unsafe {
                        cv.interleave_to(lo, hi, o.ptr().add(p * NR), (NR, panel));
                        let last = (panels - 1) * panel + p * NR;
                        for j in n - (panels - 1) * NR..NR {
                            *o.ptr().add(last + j) = 0;
                        }
                    }
                }
            });
            return;
        }
        crate::fused::for_each_index(panels, |q| {
            // SAFETY: panel `q` of `out` belongs to this task alone.
            let dst = unsafe { std::slice::from_raw_parts_mut(o.ptr().add(q * panel), panel) };
            let (j0, cols) = (q * NR, (n - q * NR).min(NR));
            if rs == 1 {
                // columns are contiguous: a column's pairs are its elements in order; convert
                // BLOCK pairs of every column, then write them pair by pair
                let mut tmp = vec![0u32; NR * BLOCK];
                for p0 in (0..pairs).step_by(BLOCK) {
                    let np = (pairs - p0).min(BLOCK);
                    let (k0, k1) = (2 * p0, (2 * (p0 + np)).min(k));
                    for (j, t) in tmp.chunks_exact_mut(BLOCK).take(cols).enumerate() {
                        let c = (j0 + j) * cs;
                        let t = halves(&mut t[..np]);
                        cv.run(&rhs[c + k0..c + k1], &mut t[..k1 - k0]);
                        t[k1 - k0..].fill(0);
                    }
                    for (p, d) in dst[p0 * NR..(p0 + np) * NR]
                        .chunks_exact_mut(NR)
                        .enumerate()
                    {
                        for (j, w) in d[..cols].iter_mut().enumerate() {
                            *w = tmp[j * BLOCK + p];
                        }
                        d[cols..].fill(0);
                    }
                }
            } else {
                for (p, d) in dst.chunks_exact_mut(NR).take(pairs).enumerate() {
                    for (j, w) in d.iter_mut().enumerate() {
                        let at = |kk: usize| {
                            if j < cols && kk < k {
                                rhs[kk * rs + (j0 + j) * cs]
                            } else {
                                0.0
                            }
                        };
                        *w = pair(at(2 * p), at(2 * p + 1));
                    }
                }
            }
        });
    }

    /// The packed product on `kernel`; arguments as [`super::gemm_with`] (already checked).
    ///
    /// Both operands are rounded and packed once, in parallel (each element read once); the
    /// micro-kernel then reads `lhs` rows in place, so no panel of it is copied per block of
    /// the result. Tasks are blocks of rows (a multiple of the thread count, at most 16
    /// micro-tiles each, equal to one micro-tile); inside one, blocks of `k` ([`Layout::KC`]), then `rhs` panels
    /// (each reused from L1 by every micro-tile of the block), then micro-tiles.
    pub fn gemm<K: MicroKernel>(
        kernel: &K,
        (m, n, k): (usize, usize, usize),
        (dst, drs): (&mut [f32], usize),
        accumulate: bool,
        lhs: (&[f32], usize, usize),
        rhs: (&[f32], usize, usize),
    ) {
        let (mr, kc) = (K::Layout::MR, K::Layout::KC);
        let lda = k.div_ceil(2).next_multiple_of(K::Layout::KP_ALIGN);
        let (mut apack, mut bpack) = WORKSPACE.take();
        let cv = if kernel.native_convert() {
            Convert::Native
        } else {
            Convert::Scalar
        };
        pack_lhs(cv, lhs, (m, k), (m.next_multiple_of(mr), lda), &mut apack);
        pack_rhs(cv, rhs, (k, n), lda, &mut bpack);
        let threads = rayon::current_num_threads().max(1);
        let tiles = m.div_ceil(mr);
        let blocks = tiles
            .div_ceil(16)
            .max(2 * threads)
            .next_multiple_of(threads)
            .min(tiles);
        let c = SharedMut(dst.as_mut_ptr());
        let (ap, bp) = (&apack, &bpack);
        crate::fused::for_each_index(blocks, |blk| {
            // micro-tiles spread evenly: blocks differ by one tile at most, so every thread
            // gets the same share
            let (t0, t1) = (blk * tiles / blocks, (blk + 1) * tiles / blocks);
            let i0 = t0 * mr;
            let rows = (t1 * mr).min(m) - i0;
            for p0 in (0..lda).step_by(kc / 2) {
                let kp = (lda - p0).min(kc / 2);
                let add = accumulate || p0 > 0;
                for q in 0..n.div_ceil(NR) {
                    let cols = (n - q * NR).min(NR);
                    let b = bp[(q * lda + p0) * NR..].as_ptr() as *const u16;
                    for s in 0..rows.div_ceil(mr) {
                        let tile_rows = (rows - s * mr).min(mr);
                        let a = ap[(i0 + s * mr) * lda + p0..].as_ptr();
                        // SAFETY: the packed `lhs` has `mr`-padded rows of `lda` words and
                        // the panel `kp` pairs from `p0`; the tile's rows `i0 + s*MR ..` and
                        // columns `q*NR ..` lie inside `dst` (checked by the caller), and row
                        // blocks are disjoint per task.
                        unsafe {
                            let cp = c.ptr().add((i0 + s * mr) * drs + q * NR);
                            kernel.run(kp, a, lda, b, cp, drs, (tile_rows, cols), add);
                        }
                    }
                }
            }
        });
        WORKSPACE.set((apack, bpack));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic operand in [-2, 2).
    fn operand(len: usize, seed: u32) -> Vec<f32> {
        crate::testing::uniform(seed as u64, len)
            .into_iter()
            .map(|x| 2.0 * x)
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

    type Product<'a> = &'a dyn Fn(
        (usize, usize, usize),
        (&mut [f32], usize),
        bool,
        (&[f32], usize, usize),
        (&[f32], usize, usize),
    );

    /// `product` against the exact bf16 product, on shapes with partial tiles, odd `k`, several
    /// `k` blocks of either layout (256 and 1,024) and `n` blocks, transposed operands and
    /// accumulation.
    fn check(name: &str, product: Product<'_>) {
        let shapes = [
            (1, 1, 1),
            (5, 7, 3),
            (12, 32, 2),
            (13, 33, 9),
            (25, 70, 257),
            (40, 2100, 6),
            (300, 65, 600),
            (70, 40, 2100),
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
                    product(
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
                                assert_eq!(g, init[i * drs + j], "{name} wrote past n");
                                continue;
                            }
                            // f32 sums of k terms of magnitude <= 4
                            let tol = 1e-6 * (k as f32 * 4.0 + w.abs()) + 1e-6;
                            assert!(
                                (g - w).abs() <= tol,
                                "{name} {m}x{n}x{k} t{transposed} a{accumulate} ({i},{j}): \
                                 {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    fn check_backend(backend: Backend) {
        check(backend.name(), &|s, d, a, l, r| {
            gemm_with(backend, s, d, a, l, r)
        });
    }

    #[test]
    fn emulated_and_portable_backends_match_the_exact_bf16_product() {
        check_backend(Backend::Emulated);
        check_backend(Backend::Portable);
        // the scalar model on the AMX kernel's layout (row-major lhs panels of 32 rows, pairs
        // padded to multiples of 16, k blocks of 1,024)
        let amx_model = packed::Scalar::<packed::AmxLayout>(Default::default());
        check("amx layout", &|s, d, a, l, r| {
            packed::gemm(&amx_model, s, d, a, l, r)
        });
    }

    #[test]
    fn the_chosen_backend_passed_its_check_and_the_emulated_one_always_does() {
        let b = backend();
        assert!(b.is_available() && b != Backend::Portable, "{b:?}");
        assert_eq!(self_check(b), Ok(()));
        assert_eq!(self_check(Backend::Emulated), Ok(()));
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

    /// `VCVTNE2PS2BF16` packing rounds as [`bits`] does (ties, NaN, infinities, overflow, both
    /// signs) except that subnormal inputs become zero, at every length around its 16- and
    /// 32-lane steps.
    #[test]
    #[ignore = "needs a CPU with AVX512-BF16 (AMD Zen 4 or later, Intel Cooper Lake, Sapphire \
                Rapids or later)"]
    fn avx512_bf16_packing_rounds_as_the_scalar_model() {
        use packed::Convert;
        assert!(
            cpu_has_avx512_bf16(),
            "this CPU has no AVX512-BF16: the test cannot run here"
        );
        let mut special = vec![
            0.0,
            -0.0,
            1.0,
            -1.0 - 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            f32::MAX,
            -f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
            3.3e38,
        ];
        special.extend(operand(200, 11));
        let subnormal = f32::MIN_POSITIVE / 4.0;
        special.push(subnormal);
        let same = |native: u16, scalar: u16, x: f32| {
            if x.is_nan() {
                f32::from_bits((native as u32) << 16).is_nan()
            } else if x.is_subnormal() {
                native & 0x7FFF == 0
            } else {
                native == scalar
            }
        };
        for len in (0..70).chain([special.len()]) {
            let src = &special[special.len() - len..];
            let (mut n, mut sc) = (vec![7u16; len], vec![0u16; len]);
            Convert::Native.run(src, &mut n);
            Convert::Scalar.run(src, &mut sc);
            for i in 0..len {
                assert!(
                    same(n[i], sc[i], src[i]),
                    "len {len}, {}: {:#x} vs {:#x}",
                    src[i],
                    n[i],
                    sc[i]
                );
            }
            let hi: Vec<f32> = src.iter().rev().copied().collect();
            let (mut n, mut sc) = (vec![7u32; len], vec![0u32; len]);
            Convert::Native.interleave(src, &hi, &mut n);
            Convert::Scalar.interleave(src, &hi, &mut sc);
            for i in 0..len {
                let (lo_ok, hi_ok) = (
                    same(n[i] as u16, sc[i] as u16, src[i]),
                    same((n[i] >> 16) as u16, (sc[i] >> 16) as u16, hi[i]),
                );
                assert!(
                    lo_ok && hi_ok,
                    "interleave len {len}, {i}: {:#x} vs {:#x}",
                    n[i],
                    sc[i]
                );
            }
        }
    }

    /// The AMX kernel, which only a CPU with AMX-BF16 under Linux runs (run it there with
    /// `cargo test --release -p m3ae-kernels -- --ignored amx`).
    #[test]
    #[ignore = "needs a CPU with AMX-BF16 (Intel Sapphire Rapids or later) and Linux"]
    fn amx_backend_matches_the_exact_bf16_product() {
        assert!(
            amx_usable(),
            "this process cannot use AMX-BF16 (CPU or kernel): the test cannot run here"
        );
        check_backend(Backend::Amx);
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
