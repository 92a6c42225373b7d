//! The official HDF5 layouts (feature `hdf5`): small files written here with the `hdf5` crate's
//! writer (paired `jpg` + `caption`, ImageNet `{split}_jpg` + `{split}_labels`, unpaired `text`)
//! and read back through the `Hdf5` source: counts, images, captions, labels, the split over ranks
//! and workers (nothing lost or read twice), bad rows, malformed files and the loader on top.
#![cfg(feature = "hdf5")]

mod common;
use common::{assert_split_exact, jpeg, samples, TempDir};
use hdf5_metno::types::{VarLenArray, VarLenAscii, VarLenUnicode};
use m3ae_data::sample::count_records;
use m3ae_data::*;
use std::path::Path;
use std::sync::Arc;

fn vlen_bytes(rows: &[Vec<u8>]) -> Vec<VarLenArray<u8>> {
    rows.iter().map(|r| VarLenArray::from_slice(r)).collect()
}

fn unicode(rows: &[String]) -> Vec<VarLenUnicode> {
    rows.iter().map(|r| r.parse().unwrap()).collect()
}

/// A paired file with `n` JPEGs of size (8 + i) x 8 and captions "caption i".
fn write_paired(path: &Path, n: usize) {
    let f = hdf5_metno::File::create(path).unwrap();
    let images: Vec<Vec<u8>> = (0..n).map(|i| jpeg(8 + i as u32, 8, i as u8)).collect();
    let captions: Vec<String> = (0..n).map(|i| format!("caption {i}")).collect();
    f.new_dataset_builder()
        .with_data(&vlen_bytes(&images))
        .create("jpg")
        .unwrap();
    f.new_dataset_builder()
        .with_data(&unicode(&captions))
        .create("caption")
        .unwrap();
}

#[test]
fn paired_file_reads_images_and_captions_and_splits_exactly() {
    let dir = TempDir::new("h5-paired");
    let path = dir.path().join("cc12m.h5");
    // more rows than one slab, so slabs and partition borders both matter
    let n = Hdf5::SLAB + 45;
    write_paired(&path, n);
    let src = Hdf5::paired(&path).unwrap();
    assert_eq!(src.len(), n);
    assert_eq!(src.len_hint(), Some(n));
    assert!(src.describe().contains("cc12m.h5"));
    let all = samples(&src, &Partition::whole(0, 0));
    assert_eq!(all.len(), n);
    for i in [0usize, 7, n - 1] {
        let s = &all[i];
        assert_eq!(s.key, i.to_string());
        assert_eq!(s.text.as_deref(), Some(format!("caption {i}").as_str()));
        assert_eq!(s.label, None);
        let Some(ImageData::Encoded(bytes)) = &s.image else {
            panic!("no image")
        };
        assert_eq!(bytes.as_slice(), jpeg(8 + i as u32, 8, i as u8).as_slice());
        let img = decode_rgb(bytes).unwrap();
        assert_eq!((img.width, img.height), (8 + i, 8));
    }
    for (ranks, workers) in [(1, 1), (2, 2), (3, 1), (1, 4), (4, 3)] {
        assert_split_exact(&src, ranks, workers, n);
    }
    // more partitions than rows: some are empty, none loses a row
    let small = dir.path().join("small.h5");
    write_paired(&small, 3);
    assert_split_exact(&Hdf5::paired(&small).unwrap(), 2, 3, 3);
    // the official start_index / max_length
    let part = Hdf5::paired(&path).unwrap().with_range(10, Some(5));
    let keys: Vec<String> = samples(&part, &Partition::whole(0, 0))
        .into_iter()
        .map(|s| s.key)
        .collect();
    assert_eq!(keys, ["10", "11", "12", "13", "14"]);
    assert_eq!(
        Hdf5::paired(&path).unwrap().with_range(n - 2, None).len(),
        2
    );
}

#[test]
fn imagenet_and_text_layouts() {
    let dir = TempDir::new("h5-imagenet");
    let path = dir.path().join("imagenet.h5");
    {
        let f = hdf5_metno::File::create(&path).unwrap();
        for (split, n) in [("train", 6usize), ("val", 4)] {
            let images: Vec<Vec<u8>> = (0..n).map(|i| jpeg(8, 8, i as u8)).collect();
            let labels: Vec<i32> = (0..n as i32).map(|i| i % 3).collect();
            f.new_dataset_builder()
                .with_data(&vlen_bytes(&images))
                .create(format!("{split}_jpg").as_str())
                .unwrap();
            f.new_dataset_builder()
                .with_data(&labels)
                .create(format!("{split}_labels").as_str())
                .unwrap();
        }
    }
    let train = Hdf5::imagenet(&path, "train").unwrap();
    let val = Hdf5::imagenet(&path, "val").unwrap();
    assert_eq!((train.len(), val.len()), (6, 4));
    let labels: Vec<Option<i64>> = samples(&train, &Partition::whole(0, 0))
        .iter()
        .map(|s| s.label)
        .collect();
    assert_eq!(labels, [0, 1, 2, 0, 1, 2].map(Some));
    assert!(samples(&val, &Partition::whole(0, 0))
        .iter()
        .all(|s| s.text.is_none() && s.image.is_some()));
    assert_split_exact(&train, 2, 2, 6);

    let text_path = dir.path().join("text.h5");
    {
        let f = hdf5_metno::File::create(&text_path).unwrap();
        let lines: Vec<VarLenAscii> = ["Call me Ishmael.", "It was the best of times."]
            .iter()
            .map(|s| VarLenAscii::from_ascii(s).unwrap())
            .collect();
        f.new_dataset_builder()
            .with_data(&lines)
            .create("text")
            .unwrap();
    }
    let text = Hdf5::text(&text_path).unwrap();
    let got: Vec<String> = samples(&text, &Partition::whole(0, 0))
        .into_iter()
        .map(|s| s.text.unwrap())
        .collect();
    assert_eq!(got, ["Call me Ishmael.", "It was the best of times."]);
}

#[test]
fn bad_rows_are_skipped_and_counted() {
    let dir = TempDir::new("h5-bad");
    let path = dir.path().join("bad.h5");
    {
        let f = hdf5_metno::File::create(&path).unwrap();
        let images = vec![jpeg(8, 8, 0), Vec::new(), jpeg(8, 8, 2), jpeg(8, 8, 3)];
        // captions as raw UTF-8 bytes (h5py vlen uint8), one of them not UTF-8
        let captions = vec![
            "fine".as_bytes().to_vec(),
            b"no image".to_vec(),
            vec![0xff, 0xfe, b'x'],
            "caf\u{e9}".as_bytes().to_vec(),
        ];
        f.new_dataset_builder()
            .with_data(&vlen_bytes(&images))
            .create("jpg")
            .unwrap();
        f.new_dataset_builder()
            .with_data(&vlen_bytes(&captions))
            .create("caption")
            .unwrap();
    }
    let src = Hdf5::paired(&path).unwrap();
    let recs: Vec<Record> = src
        .open(&Partition::whole(0, 0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    let reasons: Vec<Option<BadReason>> = recs
        .iter()
        .map(|r| match r {
            Record::Sample(_) => None,
            Record::Bad(b) => Some(b.reason),
        })
        .collect();
    assert_eq!(
        reasons,
        [
            None,
            Some(BadReason::MissingImage),
            Some(BadReason::NonUtf8),
            None
        ]
    );
    let Record::Sample(s) = &recs[3] else {
        panic!()
    };
    assert_eq!(s.text.as_deref(), Some("café"));
    assert_eq!(
        count_records(&src, &Partition::whole(0, 0)).unwrap(),
        (2, 2)
    );
}

#[test]
fn malformed_files_are_errors_naming_file_and_dataset() {
    let dir = TempDir::new("h5-malformed");
    let err = |p: &Path, layout: Hdf5Layout| Hdf5::open(p, layout).unwrap_err().to_string();
    // missing dataset
    let p = dir.path().join("nocaption.h5");
    {
        let f = hdf5_metno::File::create(&p).unwrap();
        f.new_dataset_builder()
            .with_data(&vlen_bytes(&[jpeg(8, 8, 0)]))
            .create("jpg")
            .unwrap();
    }
    let e = err(&p, Hdf5Layout::Paired);
    assert!(e.contains("nocaption.h5") && e.contains("`caption`"), "{e}");
    // lengths differ
    let p = dir.path().join("lengths.h5");
    {
        let f = hdf5_metno::File::create(&p).unwrap();
        f.new_dataset_builder()
            .with_data(&vlen_bytes(&[jpeg(8, 8, 0), jpeg(8, 8, 1)]))
            .create("jpg")
            .unwrap();
        f.new_dataset_builder()
            .with_data(&unicode(&["one".to_string()]))
            .create("caption")
            .unwrap();
    }
    let e = err(&p, Hdf5Layout::Paired);
    assert!(e.contains("`caption`") && e.contains("1 rows"), "{e}");
    // images stored as floats, labels as strings, 2-D text
    let p = dir.path().join("types.h5");
    {
        let f = hdf5_metno::File::create(&p).unwrap();
        f.new_dataset_builder()
            .with_data(&[1.0f32, 2.0])
            .create("train_jpg")
            .unwrap();
        f.new_dataset_builder()
            .with_data(&vlen_bytes(&[jpeg(8, 8, 0), jpeg(8, 8, 1)]))
            .create("val_jpg")
            .unwrap();
        f.new_dataset_builder()
            .with_data(&unicode(&["a".to_string(), "b".to_string()]))
            .create("val_labels")
            .unwrap();
        f.new_dataset_builder()
            .empty::<u8>()
            .shape([2, 2])
            .create("text")
            .unwrap();
    }
    let e = err(
        &p,
        Hdf5Layout::ImageNet {
            split: "train".into(),
        },
    );
    assert!(
        e.contains("`train_jpg`") && e.contains("not supported"),
        "{e}"
    );
    let e = err(
        &p,
        Hdf5Layout::ImageNet {
            split: "val".into(),
        },
    );
    assert!(e.contains("`val_labels`") && e.contains("integers"), "{e}");
    let e = err(&p, Hdf5Layout::Text);
    assert!(e.contains("`text`") && e.contains("1-D"), "{e}");
    // not a file / not HDF5
    let e = err(&dir.path().join("absent.h5"), Hdf5Layout::Paired);
    assert!(e.contains("absent.h5"), "{e}");
    let junk = dir.path().join("junk.h5");
    std::fs::write(&junk, b"not an hdf5 file").unwrap();
    let e = err(&junk, Hdf5Layout::Paired);
    assert!(e.contains("junk.h5"), "{e}");
}

#[test]
fn the_loader_batches_an_hdf5_file() {
    let dir = TempDir::new("h5-loader");
    let path = dir.path().join("pairs.h5");
    write_paired(&path, 10);
    let src = Arc::new(Hdf5::paired(&path).unwrap());
    let corpus: Vec<String> = (0..10).map(|i| format!("caption {i}")).collect();
    let tok = Tokenizer::train_wordpiece(corpus.iter().map(String::as_str), 60).unwrap();
    let mut cfg = LoaderConfig::pretrain(4, 16, 8);
    cfg.epochs = Some(1);
    let loader = Loader::new(src, Some(Arc::new(tok)), cfg).unwrap();
    let batches: Vec<Batch> = loader
        .iter(Position::default())
        .collect::<Result<_>>()
        .unwrap();
    assert_eq!(batches.len(), 2); // 10 rows, batches of 4, last partial batch dropped
    let b = &batches[0];
    assert_eq!(b.input.image_patches.as_ref().unwrap().dims(), &[4, 4, 192]);
    assert_eq!(b.input.text_ids.as_ref().unwrap().dims()[0], 4);
}
