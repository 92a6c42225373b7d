//! The memory side of the per-head kernels: the per-thread scratch, the query tile size, the
//! packing of rows at a padded stride, and the prefetch of the next head's rows.

use super::{Dims, Packing, QUERY_TILE};
use crate::fused::tile;
use std::cell::RefCell;

thread_local! {
    /// Per-thread scratch of the head kernels, grown on demand and reused across calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` floats of this thread's scratch (contents unspecified).
pub(super) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

/// Query rows per tile for a head of `l` rows: tiles as even as possible, a multiple of the
/// register block, at most [`QUERY_TILE`].
pub(super) fn tile_rows(l: usize) -> usize {
    let tiles = l.div_ceil(QUERY_TILE).max(1);
    (l.div_ceil(tiles).div_ceil(tile::MR) * tile::MR).clamp(1, QUERY_TILE)
}

/// `n` rounded up to a whole vector of 8 floats.
pub(super) fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// Copies `l x dh` rows at `src` (row stride `rs`, column stride `cs`) into `dst` (`l x dp`).
#[inline(always)]
pub(super) unsafe fn pack_rows(
    src: *const f32,
    (rs, cs): (usize, usize),
    (l, dh, dp): (usize, usize, usize),
    dst: &mut [f32],
) {
    for (j, drow) in dst.chunks_exact_mut(dp).take(l).enumerate() {
        let s = src.add(j * rs);
        if cs == 1 {
            drow[..dh].copy_from_slice(std::slice::from_raw_parts(s, dh));
        } else {
            for (c, x) in drow[..dh].iter_mut().enumerate() {
                *x = *s.add(c * cs);
            }
        }
    }
}

/// Hints the CPU to bring `rows` rows of `width` floats at `ptr` (row stride `rs`) into its L2
/// cache. Used on the head after the current one, so that a task does not start it with misses.
#[inline(always)]
pub(super) fn prefetch_rows(ptr: *const f32, rows: usize, rs: usize, width: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        if width == 0 {
            return;
        }
        for j in 0..rows {
            let row = ptr.wrapping_add(j * rs);
            let mut c = 0;
            while c < width {
                // SAFETY: a prefetch never faults or changes memory; SSE is part of x86_64.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(c) as *const i8) };
                c += 16;
            }
            // SAFETY: as above (the last line of a row that is not line-aligned).
            unsafe { _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(width - 1) as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ptr, rows, rs, width);
}

/// [`prefetch_rows`] of the q, k, v rows of head `bh`, if it exists.
#[inline(always)]
pub(super) fn prefetch_head(
    inputs: (&[f32], &[f32], &[f32]),
    packing: Packing,
    d: Dims,
    bh: usize,
) {
    if bh < d.b * d.h {
        let vw = packing.view(d, bh);
        for (buf, off) in [(inputs.0, vw.q), (inputs.1, vw.k), (inputs.2, vw.v)] {
            prefetch_rows(buf.as_ptr().wrapping_add(off), d.l, vw.rs_in, d.dh);
        }
    }
}
