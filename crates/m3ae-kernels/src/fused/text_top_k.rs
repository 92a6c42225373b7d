//! Top-k words of a linear text head at requested rows (CPU, inference only), without the
//! `N x V` logits.
//!
//! **Why.** The commands that show predicted words (reconstructions, masked-word accuracy) need
//! the best word at the masked positions only, typically half of the `N` rows, and only its id:
//! composing `logits = H W^T + b` and `argmax` writes and reads an `N x V` tensor (250 MB at a
//! 64 x 32 batch and BERT's 30,522 words) to keep one number per row.
//!
//! **What is computed.** The requested rows are gathered (`M` rows) and the vocabulary is walked
//! in tiles of [`VOCAB_TILE`] words, split into the same contiguous task ranges as the fused
//! loss (one parallel task each). Per tile, one GEMM writes the `rows x VOCAB_TILE` logit tile
//! into scratch and each row's running top-k list is updated; the tasks' lists are merged in
//! vocabulary order. Order (best first): larger logit first, equal logits by the lower id (as
//! candle's `argmax` and `m3ae_model::ranking::argmax_rows`), NaN after every number (a NaN
//! logit never wins over a number; a row of NaN yields NaN logits, lowest ids first).
//!
//! **Same numbers as the composed path.** The `gemm` crate picks a different kernel (with a
//! different summation order) for products of one row (`gemv`) or of at most 256 outputs
//! (horizontal dot products) than for larger ones, which is what the composed `N x V` product
//! uses for `N x V` above 256 with `N > 1`. So every tile is [`VOCAB_TILE`] words wide (the last
//! one overlaps its predecessor and skips the words already seen) and holds enough rows (zero
//! rows are appended) for the GEMM to take its general kernel; where the composed product
//! itself is small (`N V <= 256`) or a single row, each requested row is multiplied on its own
//! (one `1 x V` product, the same kernel class). Each logit is then the same float as in the
//! composed product and the chosen words are identical, ties included (for any `D > 2` and
//! `V > 1`; the general kernel's depth blocks depend on `D` alone up to `D = 512`, beyond it also
//! on whether `N` and `V` are both at most 64).

use super::text_head::{gemm_serial, run_tasks, task_ranges, VOCAB_TILE};
use std::sync::Mutex;

/// Rows per logit tile.
const ROW_TILE: usize = 256;

/// Whether logit `x` ranks strictly before `y` (NaN after every number; equal values tie).
fn better(x: f32, y: f32) -> bool {
    !x.is_nan() && (y.is_nan() || x > y)
}

/// A row's running top-k list, best first.
type List = Vec<(u32, f32)>;

/// Logits compared at once when skipping those that cannot enter a full list.
const SCAN: usize = 16;

/// Offers the logits `row` (ids `id0..`, increasing, all above the ids already in `list`).
fn offer(list: &mut List, k: usize, row: &[f32], id0: usize) {
    let mut j = 0;
    while j < row.len() {
        if list.len() == k {
            let kth = list[k - 1].1;
            if !kth.is_nan() {
                // almost no logit beats a full list: skip blocks without a candidate with a
                // branch-free (vectorised) comparison instead of one branch per logit
                while j + SCAN <= row.len()
                    && !row[j..j + SCAN].iter().fold(false, |a, &x| a | (x > kth))
                {
                    j += SCAN;
                }
                if j == row.len() {
                    break;
                }
            }
        }
        let (x, id) = (row[j], (id0 + j) as u32);
        j += 1;
        if list.len() == k && !better(x, list[k - 1].1) {
            // a later id enters only when strictly better than the current k-th
            continue;
        }
        let p = list
            .iter()
            .position(|&(_, y)| better(x, y))
            .unwrap_or(list.len());
        list.insert(p, (id, x));
        list.truncate(k);
    }
}

/// Merges `later` (ids above all of `acc`'s) into `acc`: on equal logits `acc`'s lower ids first.
fn merge(acc: &mut List, later: &List, k: usize) {
    let mut out = Vec::with_capacity(k.min(acc.len() + later.len()));
    let (mut i, mut j) = (0, 0);
    while out.len() < k && (i < acc.len() || j < later.len()) {
        let take_later = i == acc.len() || (j < later.len() && better(later[j].1, acc[i].1));
        if take_later {
            out.push(later[j]);
            j += 1;
        } else {
            out.push(acc[i]);
            i += 1;
        }
    }
    *acc = out;
}

/// Top-k of one row of logits by the module's order (the selection of the reference path).
pub(crate) fn top_k_of_row(row: &[f32], k: usize) -> List {
    let mut list = Vec::with_capacity(k.min(row.len()));
    if k > 0 {
        offer(&mut list, k, row, 0);
    }
    list
}

/// Top-k lists of the `m` gathered rows `h` (`m x d`) against `w` (`v x d`) and `b` (`v`);
/// `n` is the number of rows of the whole hidden input (it decides the composed product's
/// kernel class).
pub(crate) fn top_k(
    h: &[f32],
    w: &[f32],
    b: &[f32],
    (n, m, d, v): (usize, usize, usize, usize),
    k: usize,
) -> Vec<List> {
    if m == 0 || k == 0 || v == 0 {
        return vec![Vec::new(); m];
    }
    if n == 1 || n * v <= 256 {
        // the composed product is small or one row: its kernel is the one of a `1 x V` product
        let mut s = vec![0f32; v];
        return (0..m)
            .map(|i| {
                s.copy_from_slice(b);
                gemm_serial(
                    (1, v, d),
                    (&mut s, v),
                    true,
                    (&h[i * d..(i + 1) * d], d, 1),
                    (w, 1, d),
                );
                top_k_of_row(&s, k)
            })
            .collect();
    }
    let width = VOCAB_TILE.min(v);
    // enough rows per GEMM for the general kernel: more than 256 outputs and at least 2 rows
    let min_rows = (256 / width + 1).max(2);
    let mp = m.max(min_rows);
    let mut hp;
    let h = if mp > m {
        hp = vec![0f32; mp * d];
        hp[..m * d].copy_from_slice(h);
        &hp[..]
    } else {
        h
    };
    let row_tile = ROW_TILE.max(min_rows);
    // row tiles of near-equal size, so that none is a single row
    let row_tiles = mp.div_ceil(row_tile);
    let bounds: Vec<usize> = (0..=row_tiles).map(|t| t * mp / row_tiles).collect();
    let ranges = task_ranges(v);
    let parts: Vec<Mutex<Vec<List>>> = ranges.iter().map(|_| Mutex::new(Vec::new())).collect();
    run_tasks(ranges.len(), |task| {
        let mut lists = vec![Vec::with_capacity(k + 1); m];
        let mut s = vec![0f32; (bounds[1] - bounds[0] + 1) * VOCAB_TILE];
        for tile in ranges[task].clone() {
            // the last tile ends at `v` and skips the words of its predecessor
            let v0 = (tile * VOCAB_TILE).min(v - width);
            let skip = tile * VOCAB_TILE - v0;
            for rt in 0..row_tiles {
                let (r0, rn) = (bounds[rt], bounds[rt + 1] - bounds[rt]);
                for i in 0..rn {
                    s[i * VOCAB_TILE..i * VOCAB_TILE + width].copy_from_slice(&b[v0..v0 + width]);
                }
                gemm_serial(
                    (rn, width, d),
                    (&mut s, VOCAB_TILE),
                    true,
                    (&h[r0 * d..(r0 + rn) * d], d, 1),
                    (&w[v0 * d..(v0 + width) * d], 1, d),
                );
                for i in 0..rn.min(m.saturating_sub(r0)) {
                    let row = &s[i * VOCAB_TILE + skip..i * VOCAB_TILE + width];
                    offer(&mut lists[r0 + i], k, row, v0 + skip);
                }
            }
        }
        *parts[task].lock().expect("top-k lock") = lists;
    });
    let mut acc = vec![Vec::new(); m];
    for part in parts {
        let part = part.into_inner().expect("top-k lock");
        for (a, p) in acc.iter_mut().zip(&part) {
            merge(a, p, k);
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_ties_low_nan_last() {
        let nan = f32::NAN;
        let l = top_k_of_row(&[nan, 1.0, 3.0, 3.0, nan, 1.0], 4);
        let ids: Vec<u32> = l.iter().map(|p| p.0).collect();
        assert_eq!(ids, vec![2, 3, 1, 5]);
        let l = top_k_of_row(&[nan, nan, nan], 2);
        assert_eq!(l.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 1]);
        let mut a = vec![(0, 2.0), (1, 1.0)];
        merge(&mut a, &vec![(5, 2.0), (6, nan)], 3);
        assert_eq!(a.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 5, 1]);
    }
}
