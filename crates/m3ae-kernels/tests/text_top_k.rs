//! The fused text-head top-k against the composed logits (the dense layer the model runs, then
//! candle's `argmax` or a full sort): random shapes with vocabularies that are not a multiple of
//! the tile, `k` from 1 to beyond `V`, subsets of rows in any order, no rows, exact ties across
//! tiles and tasks, NaN logits, thread counts, the reference path and input errors.

use candle_core::{Device, Tensor, D};
use m3ae_kernels::{fused, reference, TextTopK};

mod common;
use common::tensor;

/// Top-k of each row of `logits` by a full sort: larger first, equal by the lower id, NaN last.
fn sorted_top_k(logits: &[Vec<f32>], rows: &[usize], k: usize) -> TextTopK {
    let mut out = TextTopK::default();
    for &r in rows {
        let row = &logits[r];
        let mut ids: Vec<u32> = (0..row.len() as u32).collect();
        ids.sort_by(|&a, &b| {
            let (x, y) = (row[a as usize], row[b as usize]);
            let key = |v: f32| (v.is_nan(), if v.is_nan() { 0.0 } else { -v });
            key(x).partial_cmp(&key(y)).unwrap().then(a.cmp(&b))
        });
        ids.truncate(k);
        out.logits
            .push(ids.iter().map(|&i| row[i as usize]).collect());
        out.ids.push(ids);
    }
    out
}

/// Asserts equal ids and bit-identical logits (NaN equal to NaN).
fn assert_same(got: &TextTopK, want: &TextTopK, what: &str) {
    assert_eq!(got.ids, want.ids, "{what}: ids");
    assert_eq!(got.logits.len(), want.logits.len(), "{what}");
    for (g, w) in got.logits.iter().zip(&want.logits) {
        let bits = |v: &Vec<f32>| {
            v.iter()
                .map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() })
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(g), bits(w), "{what}: logits");
    }
}

/// Shapes `(N, D, V)`: `V` below, at and around the tile, a composed product of at most 256
/// outputs and one of a single row (other GEMM kernels).
const SHAPES: [(usize, usize, usize); 8] = [
    (7, 5, 3),
    (33, 16, 255),
    (64, 32, 256),
    (40, 24, 257),
    (96, 64, 1000),
    (130, 128, 3001),
    (5, 8, 1),
    (1, 16, 700),
];

fn row_sets(n: usize) -> Vec<Vec<usize>> {
    let every_other: Vec<usize> = (0..n).step_by(2).collect();
    let mut shuffled: Vec<usize> = (0..n).rev().filter(|r| r % 3 != 1).collect();
    shuffled.push(0);
    shuffled.push(0); // repeats are answered twice
    vec![(0..n).collect(), every_other, shuffled, vec![n - 1], vec![]]
}

#[test]
fn matches_the_composed_logits_and_argmax() {
    for (s, &(n, d, v)) in SHAPES.iter().enumerate() {
        let s = s as u64 * 10;
        let h = tensor(&[n, d], s + 1, 1.0);
        let w = tensor(&[v, d], s + 2, 0.5);
        let b = tensor(&[v], s + 3, 0.2);
        // the composed path the model runs: its dense layer, then argmax
        let logits = fused::linear(&h, &w, &b).unwrap();
        let argmax = logits.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
        let logits = logits.to_vec2::<f32>().unwrap();
        for rows in row_sets(n) {
            for k in [1, 3, 10, v + 2] {
                let what = format!("N {n} D {d} V {v}, {} rows, k {k}", rows.len());
                let got = fused::text_head_top_k(&h, &w, Some(&b), &rows, k).unwrap();
                assert_same(&got, &sorted_top_k(&logits, &rows, k), &what);
                assert!(got.ids.iter().all(|l| l.len() == k.min(v)), "{what}");
                let first: Vec<u32> = got.ids.iter().map(|l| l[0]).collect();
                let want: Vec<u32> = rows.iter().map(|&r| argmax[r]).collect();
                assert_eq!(first, want, "{what}: argmax");
                // the reference composes the logits of the requested rows: same words
                let r = reference::text_head_top_k(&h, &w, Some(&b), &rows, k).unwrap();
                assert_eq!(r.ids, got.ids, "{what}: reference");
            }
        }
        // without a bias: as a zero bias
        let rows: Vec<usize> = (0..n).collect();
        let zero = Tensor::zeros(v, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            fused::text_head_top_k(&h, &w, None, &rows, 2).unwrap(),
            fused::text_head_top_k(&h, &w, Some(&zero), &rows, 2).unwrap()
        );
    }
}

#[test]
fn the_model_sized_head_matches_argmax() {
    // decoder width 128 at BERT's vocabulary, half of a 16 x 32 batch requested
    let (n, d, v) = (512, 128, 30_522);
    let h = tensor(&[n, d], 7, 1.0);
    let w = tensor(&[v, d], 8, 0.1);
    let b = tensor(&[v], 9, 0.1);
    let logits = fused::linear(&h, &w, &b).unwrap();
    let argmax = logits.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
    let rows: Vec<usize> = (0..n).filter(|r| r % 2 == 0).collect();
    let got = m3ae_kernels::text_head_top_k(&h, &w, Some(&b), &rows, 5).unwrap();
    let want = sorted_top_k(&logits.to_vec2::<f32>().unwrap(), &rows, 5);
    assert_same(&got, &want, "BERT vocabulary");
    for (l, &r) in got.ids.iter().zip(&rows) {
        assert_eq!(l[0], argmax[r]);
    }
}

#[test]
fn ties_go_to_the_lower_id_across_tiles_and_tasks() {
    // words 3, 700 and 2999 (different tiles and tasks) share weights and bias: exact ties
    let (n, d, v) = (9, 16, 3000);
    let h = tensor(&[n, d], 21, 1.0);
    let mut wv = tensor(&[v, d], 22, 0.3).to_vec2::<f32>().unwrap();
    let big: Vec<f32> = (0..d)
        .map(|j| if j % 2 == 0 { 4.0 } else { -4.0 })
        .collect();
    for i in [3, 700, 2999] {
        wv[i] = big.clone();
    }
    let w = Tensor::new(wv, &Device::Cpu).unwrap();
    let b = Tensor::zeros(v, candle_core::DType::F32, &Device::Cpu).unwrap();
    let logits = fused::linear(&h, &w, &b).unwrap();
    let argmax = logits.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
    let rows: Vec<usize> = (0..n).collect();
    let got = fused::text_head_top_k(&h, &w, Some(&b), &rows, 4).unwrap();
    let want = sorted_top_k(&logits.to_vec2::<f32>().unwrap(), &rows, 4);
    assert_same(&got, &want, "ties");
    let mut tied_rows = 0;
    for (r, l) in got.ids.iter().enumerate() {
        assert_eq!(l[0], argmax[r]);
        if l[..3] == [3, 700, 2999] {
            tied_rows += 1;
        }
    }
    assert!(tied_rows > 0, "the test must exercise a tie at the top");
}

#[test]
fn nan_never_wins() {
    let (n, d, v) = (4, 8, 600);
    let mut hv = tensor(&[n, d], 31, 1.0).to_vec2::<f32>().unwrap();
    hv[1][3] = f32::NAN; // every logit of row 1 is NaN
    let h = Tensor::new(hv, &Device::Cpu).unwrap();
    let mut wv = tensor(&[v, d], 32, 1.0).to_vec2::<f32>().unwrap();
    wv[0][0] = f32::NAN; // word 0 (first of every row) is NaN for every row
    wv[400] = vec![50.0; d]; // a clear winner elsewhere
    let w = Tensor::new(wv, &Device::Cpu).unwrap();
    let b = tensor(&[v], 33, 0.1);
    let rows = [0, 1, 2, 3];
    let got = fused::text_head_top_k(&h, &w, Some(&b), &rows, 3).unwrap();
    let logits = fused::linear(&h, &w, &b).unwrap().to_vec2::<f32>().unwrap();
    assert_same(&got, &sorted_top_k(&logits, &rows, 3), "NaN");
    assert_eq!(
        got.ids[1],
        vec![0, 1, 2],
        "a NaN row: NaN logits, lowest ids"
    );
    assert!(got.logits[1].iter().all(|x| x.is_nan()));
    for r in [0, 2, 3] {
        assert!(
            !got.ids[r].contains(&0),
            "the NaN word never ranks above a number"
        );
    }
    // all of V requested: the NaN word comes last
    let all = fused::text_head_top_k(&h, &w, Some(&b), &[0], v).unwrap();
    assert_eq!(all.ids[0][v - 1], 0);
}

#[test]
fn any_thread_count_gives_the_same_words() {
    let (n, d, v) = (70, 32, 5000);
    let h = tensor(&[n, d], 41, 1.0);
    let w = tensor(&[v, d], 42, 0.5);
    let b = tensor(&[v], 43, 0.2);
    let rows: Vec<usize> = (0..n).collect();
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| fused::text_head_top_k(&h, &w, Some(&b), &rows, 4).unwrap())
    };
    let one = run(1);
    for threads in [2, 3, 5] {
        assert_eq!(run(threads), one, "{threads} threads");
    }
}

#[test]
fn bad_inputs_are_errors() {
    let h = tensor(&[4, 8], 51, 1.0);
    let w = tensor(&[10, 8], 52, 1.0);
    let b = tensor(&[10], 53, 1.0);
    assert!(fused::text_head_top_k(&h, &w, Some(&b), &[4], 1).is_err());
    assert!(fused::text_head_top_k(&h, &tensor(&[10, 7], 1, 1.0), None, &[0], 1).is_err());
    assert!(fused::text_head_top_k(&h, &w, Some(&tensor(&[9], 1, 1.0)), &[0], 1).is_err());
    assert!(fused::text_head_top_k(&tensor(&[2, 4, 8], 1, 1.0), &w, None, &[0], 1).is_err());
    assert!(reference::text_head_top_k(&h, &w, Some(&b), &[4], 1).is_err());
    // k = 0: one empty list per row
    let z = fused::text_head_top_k(&h, &w, Some(&b), &[0, 1], 0).unwrap();
    assert_eq!(z.ids, vec![Vec::<u32>::new(); 2]);
}
