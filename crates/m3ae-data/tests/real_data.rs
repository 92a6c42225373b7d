//! End-to-end reads of the real files in `shared/data`; counts must match its README. The tests
//! are ignored by default: run them with `M3AE_DATA_DIR` set (e.g. to `../shared/data`) and
//! `cargo test -p m3ae-data --test real_data -- --ignored`.

mod common;
use common::data_dir;
use m3ae_data::sample::count_records;
use m3ae_data::*;
use std::sync::Arc;

#[test]
#[ignore = "needs the real data under $M3AE_DATA_DIR"]
fn tuxpaint_and_openclipart_shards_count_and_decode() {
    let d = data_dir();
    let tux = WebDataset::from_spec(&format!(
        "{}/tuxpaint_captions/train-00000.tar",
        d.display()
    ))
    .unwrap();
    assert_eq!(
        count_records(&tux, &Partition::whole(0, 0)).unwrap(),
        (851, 0)
    );
    let test = WebDataset::from_spec(&format!("{}/tuxpaint_captions/test-00000.tar", d.display()))
        .unwrap();
    assert_eq!(
        count_records(&test, &Partition::whole(0, 0)).unwrap(),
        (99, 0)
    );
    let oc = WebDataset::from_spec(&format!(
        "{}/openclipart_captions/train-{{00000..00001}}.tar",
        d.display()
    ))
    .unwrap();
    assert_eq!(
        count_records(&oc, &Partition::whole(0, 0)).unwrap(),
        (3081, 0)
    );
    // every tuxpaint pair decodes and tokenizes through the loader
    let tok = Tokenizer::from_file(d.join("tokenizer/bert-base-uncased/tokenizer.json")).unwrap();
    let mut cfg = LoaderConfig::pretrain(64, 64, 16);
    cfg.epochs = Some(1);
    cfg.drop_last = false;
    cfg.max_bad_fraction = 0.0;
    let loader = Loader::new(Arc::new(tux), Some(Arc::new(tok)), cfg).unwrap();
    let mut n = 0;
    let mut last = None;
    for b in loader.iter(Position::default()) {
        let b = b.unwrap();
        n += b.keys.len();
        last = Some(b.position);
    }
    assert_eq!(n, 851);
    assert_eq!(last.unwrap().stats.total_bad(), 0);
}

#[test]
#[ignore = "needs the real data under $M3AE_DATA_DIR"]
fn tuxpaint_categories_from_json() {
    let d = data_dir();
    let shard = |s: &str| {
        WebDataset::from_spec(&format!("{}/tuxpaint_captions/{s}-00000.tar", d.display())).unwrap()
    };
    let (train, missing) = shard("train").json_values("category", Some(1)).unwrap();
    assert_eq!((train.len(), missing), (16, 0));
    let (test, _) = shard("test").json_values("category", Some(1)).unwrap();
    assert!(test.is_subset(&train), "{test:?}");
    let (full, _) = shard("train").json_values("category", None).unwrap();
    assert_eq!(full.len(), 120);
    let rule = JsonLabel::new("category", Some(1), train.iter().cloned());
    let ds = shard("test").with_json_label(rule.clone());
    let mut counts = vec![0usize; rule.classes.len()];
    for r in ds.open(&Partition::whole(0, 0)).unwrap() {
        let Record::Sample(s) = r.unwrap() else {
            panic!("bad record")
        };
        counts[s.label.expect("every test sample has a category") as usize] += 1;
    }
    assert_eq!(counts.iter().sum::<usize>(), 99);
    let symbols = rule.classes.iter().position(|c| c == "symbols").unwrap();
    assert_eq!(counts[symbols], 26);
}

#[test]
#[ignore = "needs the real data under $M3AE_DATA_DIR"]
fn fashion_mnist_and_mnist_arrays() {
    let d = data_dir();
    let f = U8Arrays::from_file(d.join("fashion_mnist/train.safetensors")).unwrap();
    assert_eq!(f.len(), 60_000);
    assert_eq!(f.image_shape(), (28, 28, 1));
    assert_eq!(f.classes().len(), 10);
    let mut per_class = [0usize; 10];
    for &l in f.labels().unwrap() {
        per_class[l as usize] += 1;
    }
    assert_eq!(per_class, [6000; 10]);
    assert_eq!(
        count_records(&f, &Partition::whole(0, 0)).unwrap(),
        (60_000, 0)
    );
    let t = U8Arrays::from_file(d.join("fashion_mnist/test.safetensors")).unwrap();
    assert_eq!(t.len(), 10_000);
    let m = U8Arrays::from_file(d.join("mnist/train.safetensors")).unwrap();
    assert_eq!(m.len(), 8_004);
    let m = U8Arrays::from_file(d.join("mnist/test.safetensors")).unwrap();
    assert_eq!(m.len(), 1_996);
}

#[test]
#[ignore = "needs the real data under $M3AE_DATA_DIR"]
fn text_corpus_counts() {
    let d = data_dir();
    let c = TextCorpus::from_file(d.join("text/train.txt")).unwrap();
    assert_eq!(
        count_records(&c, &Partition::whole(0, 0)).unwrap(),
        (47_479, 0)
    );
    let c = TextCorpus::from_file(d.join("text/test.txt")).unwrap();
    assert_eq!(
        count_records(&c, &Partition::whole(0, 0)).unwrap(),
        (2_107, 0)
    );
}

/// Expected ids obtained independently, once, with the Python `tokenizers` package 0.23.3
/// (`pip install tokenizers`):
/// ```python
/// t = Tokenizer.from_file(".../tokenizer/bert-base-uncased/tokenizer.json")
/// t.no_truncation(); t.no_padding()
/// t.encode(s, add_special_tokens=False).ids
/// ```
#[test]
#[ignore = "needs the real data under $M3AE_DATA_DIR"]
fn bert_base_uncased_token_ids_are_pinned() {
    let d = data_dir();
    let tok = Tokenizer::from_file(d.join("tokenizer/bert-base-uncased/tokenizer.json")).unwrap();
    assert_eq!(tok.vocab_size(), 30_522);
    let cases: [(&str, &[u32]); 3] = [
        ("A brown potato.", &[1037, 2829, 14557, 1012]),
        (
            "Hello, World! M3AE learns from images and text.",
            &[
                7592, 1010, 2088, 999, 29061, 6679, 10229, 2013, 4871, 1998, 3793, 1012,
            ],
        ),
        (
            "The quick brown fox jumps over the lazy dog",
            &[1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899],
        ),
    ];
    for (s, ids) in cases {
        assert_eq!(tok.ids(s).unwrap(), ids, "{s}");
        // official encoding: no [CLS]/[SEP], padded with 0 to 64 (not the file's 128)
        let e = tok.encode(s, 64).unwrap();
        assert_eq!(&e.ids[..ids.len()], ids);
        assert!(e.ids[ids.len()..].iter().all(|&i| i == 0));
        assert_eq!(e.padding.iter().filter(|&&p| p == 0).count(), ids.len());
        assert_eq!(e.ids.len(), 64);
    }
    let t = tok
        .encode("The quick brown fox jumps over the lazy dog", 4)
        .unwrap();
    assert_eq!(t.ids, [1996, 4248, 2829, 4419]);
    assert_eq!(t.padding, [0, 0, 0, 0]);
}
