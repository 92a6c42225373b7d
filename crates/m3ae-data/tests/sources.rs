//! Every source on small files the tests write themselves: WebDataset shards (with the shard
//! split over 2 ranks x 2 workers), JSONL and CSV manifests, image folders, text corpora,
//! uint8 safetensors arrays and the captioned scenes.

mod common;
use common::*;
use m3ae_data::sample::count_records;
use m3ae_data::*;
use std::sync::Arc;

#[test]
fn webdataset_reads_pairs_and_splits_over_ranks_and_workers() {
    let dir = TempDir::new("wds");
    write_shards(dir.path(), &[5, 4, 6, 3, 2]);
    let spec = format!("{}/{{00000..00004}}.tar", dir.path().display());
    let mut ds = WebDataset::from_spec(&spec).unwrap();
    assert_eq!(ds.shards().len(), 5);
    let recs: Vec<Record> = ds
        .open(&Partition::whole(0, 0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(recs.len(), 20);
    let Record::Sample(s) = &recs[0] else {
        panic!()
    };
    assert_eq!(s.key, "000000000");
    assert_eq!(s.text.as_deref(), Some("caption 0 0"));
    assert_eq!(s.label, Some(0));
    assert!(matches!(s.image, Some(ImageData::Encoded(_))));
    assert!(s.file.ends_with("00000.tar"));
    // 5 shards over 4 partitions: shard level; with shuffled shard order too
    assert_split_exact(&ds, 2, 2, 20);
    ds.shuffle_shards = true;
    assert_split_exact(&ds, 2, 2, 20);
    // glob and list forms
    let g = WebDataset::from_spec(&format!("{}/*.tar", dir.path().display())).unwrap();
    assert_eq!(g.shards(), ds.shards());
    let l = WebDataset::from_spec(&format!(
        "{0}/00000.tar::{0}/00003.tar",
        dir.path().display()
    ))
    .unwrap();
    assert_eq!(count_records(&l, &Partition::whole(0, 0)).unwrap(), (8, 0));
}

#[test]
fn webdataset_labels_from_a_json_field() {
    let dir = TempDir::new("wds-json");
    let mut b = tar::Builder::new(Vec::new());
    let cats = [
        Some(r#"{"category": "animals/birds"}"#),
        Some(r#"{"category": "food/fruit", "key": "x"}"#),
        Some(r#"{"category": "animals/mammals/cats"}"#),
        Some(r#"{"category": 7}"#),
        Some(r#"{"caption": "no category"}"#),
        None, // no json member at all: unlabelled, even with a .cls
    ];
    for (i, c) in cats.iter().enumerate() {
        let key = format!("00000{i:04}");
        member(&mut b, &format!("{key}.jpg"), &jpeg(8, 8, i as u8));
        member(&mut b, &format!("{key}.txt"), b"a caption");
        member(&mut b, &format!("{key}.cls"), b"5");
        if let Some(c) = c {
            member(&mut b, &format!("{key}.json"), c.as_bytes());
        }
    }
    let shard = dir.path().join("00000.tar");
    std::fs::write(&shard, b.into_inner().unwrap()).unwrap();
    let ds = WebDataset::new(vec![shard]).unwrap();
    // the values over the shard, cut to the top level; one json lacks the field
    let (values, missing) = ds.json_values("category", Some(1)).unwrap();
    assert_eq!(
        values.iter().map(String::as_str).collect::<Vec<_>>(),
        ["7", "animals", "food"]
    );
    assert_eq!(missing, 1);
    let (full, _) = ds.json_values("category", None).unwrap();
    assert_eq!(full.len(), 4);
    let labels = |ds: &WebDataset| -> Vec<Option<i64>> {
        ds.open(&Partition::whole(0, 0))
            .unwrap()
            .map(|r| match r.unwrap() {
                Record::Sample(s) => s.label,
                Record::Bad(b) => panic!("unexpected bad record {b}"),
            })
            .collect()
    };
    // without a json rule the .cls label is kept
    assert_eq!(labels(&ds), vec![Some(5); 6]);
    let rule = JsonLabel::new("category", Some(1), values.iter().cloned());
    let ds = ds.with_json_label(rule);
    assert_eq!(
        labels(&ds),
        [Some(1), Some(2), Some(1), Some(0), None, None]
    );
    // a value outside the class list leaves the sample unlabelled
    let ds = ds.with_json_label(JsonLabel::new("category", Some(1), ["food"]));
    assert_eq!(labels(&ds), [None, Some(0), None, None, None, None]);
}

#[test]
fn fewer_shards_than_partitions_split_by_sample() {
    let dir = TempDir::new("wds1");
    let shards = write_shards(dir.path(), &[7, 4]);
    let ds = WebDataset::new(shards).unwrap();
    assert_split_exact(&ds, 2, 2, 11);
    assert_split_exact(&ds, 3, 1, 11);
}

#[test]
fn missing_shard_is_an_error_naming_it() {
    let ds = WebDataset::new(vec!["/nonexistent/m3ae/00000.tar".into()]).unwrap();
    let err = ds
        .open(&Partition::whole(0, 0))
        .unwrap()
        .next()
        .unwrap()
        .unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/m3ae/00000.tar"),
        "{err}"
    );
}

#[test]
fn jsonl_and_csv_manifests() {
    let dir = TempDir::new("manifest");
    std::fs::create_dir_all(dir.path().join("img")).unwrap();
    for i in 0..4 {
        std::fs::write(dir.path().join(format!("img/{i}.jpg")), jpeg(16, 16, i)).unwrap();
    }
    let jl = dir.path().join("m.jsonl");
    std::fs::write(
        &jl,
        "{\"image\": \"img/0.jpg\", \"caption\": \"a cat\", \"label\": 1}\n\n\
         {\"image\": \"img/1.jpg\", \"caption\": \"a dog\"}\n\
         {\"image\": \"img/2.jpg\", \"caption\": \"a cow\", \"label\": 0}\n",
    )
    .unwrap();
    let m = Manifest::new(&jl).unwrap();
    let recs: Vec<Sample> = m
        .open(&Partition::whole(0, 0))
        .unwrap()
        .map(|r| match r.unwrap() {
            Record::Sample(s) => s,
            Record::Bad(b) => panic!("{b}"),
        })
        .collect();
    assert_eq!(recs.len(), 3);
    assert_eq!(recs[0].label, Some(1));
    assert_eq!(recs[1].label, None);
    assert_eq!(recs[2].key, "line 4");
    assert_split_exact(&m, 2, 1, 3);

    let csv = dir.path().join("m.csv");
    std::fs::write(
        &csv,
        "image,caption,label\nimg/0.jpg,\"a cat, sitting\",2\nimg/3.jpg,a bird,\n",
    )
    .unwrap();
    let c = Manifest::new(&csv).unwrap();
    let recs: Vec<Record> = c
        .open(&Partition::whole(0, 0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    let Record::Sample(s) = &recs[0] else {
        panic!()
    };
    assert_eq!(s.text.as_deref(), Some("a cat, sitting"));
    assert_eq!(s.label, Some(2));
    let Record::Sample(s) = &recs[1] else {
        panic!()
    };
    assert_eq!(s.label, None);

    // a bad line and a missing image are errors naming the file and line
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"image\": \"img/0.jpg\"}\n{oops\n").unwrap();
    let err = Manifest::new(&bad)
        .unwrap()
        .open(&Partition::whole(0, 0))
        .unwrap()
        .find_map(|r| r.err())
        .unwrap()
        .to_string();
    assert!(err.contains("bad.jsonl:2"), "{err}");
    let missing = dir.path().join("missing.jsonl");
    std::fs::write(&missing, "{\"image\": \"img/9.jpg\", \"caption\": \"x\"}\n").unwrap();
    let err = Manifest::new(&missing)
        .unwrap()
        .open(&Partition::whole(0, 0))
        .unwrap()
        .find_map(|r| r.err())
        .unwrap()
        .to_string();
    assert!(
        err.contains("missing.jsonl:1") && err.contains("9.jpg"),
        "{err}"
    );
    assert!(Manifest::new(dir.path().join("nope.jsonl")).is_err());
}

#[test]
fn image_folder_sorted_classes() {
    let dir = TempDir::new("folder");
    for (c, n) in [("zebra", 2), ("ant", 3)] {
        std::fs::create_dir_all(dir.path().join(c)).unwrap();
        for i in 0..n {
            std::fs::write(dir.path().join(format!("{c}/{i}.jpg")), jpeg(8, 8, i)).unwrap();
        }
    }
    std::fs::write(dir.path().join("ant/notes.txt"), "not an image").unwrap();
    let f = ImageFolder::new(dir.path()).unwrap();
    assert_eq!(f.classes(), ["ant", "zebra"]);
    assert_eq!(f.len(), 5);
    let labels: Vec<i64> = f
        .open(&Partition::whole(0, 0))
        .unwrap()
        .map(|r| match r.unwrap() {
            Record::Sample(s) => s.label.unwrap(),
            Record::Bad(_) => panic!(),
        })
        .collect();
    assert_eq!(labels, [0, 0, 0, 1, 1]);
    assert_split_exact(&f, 2, 2, 5);
    assert!(ImageFolder::new(dir.path().join("missing")).is_err());
}

#[test]
fn text_corpora_txt_and_jsonl() {
    let dir = TempDir::new("text");
    let txt = dir.path().join("a.txt");
    std::fs::write(&txt, "first passage\nsecond passage\r\n\nfourth\n").unwrap();
    let jl = dir.path().join("b.jsonl");
    std::fs::write(&jl, "{\"text\": \"json one\"}\n{\"other\": 1}\n").unwrap();
    let c = TextCorpus::new(vec![txt.clone(), jl.clone()]).unwrap();
    let mut texts = Vec::new();
    let mut bad = Vec::new();
    for r in c.open(&Partition::whole(0, 0)).unwrap() {
        match r.unwrap() {
            Record::Sample(s) => texts.push(s.text.unwrap()),
            Record::Bad(b) => bad.push(b.reason),
        }
    }
    assert_eq!(
        texts,
        ["first passage", "second passage", "fourth", "json one"]
    );
    assert_eq!(bad, [BadReason::EmptyCaption, BadReason::MissingCaption]);
    let bj = dir.path().join("bad.jsonl");
    std::fs::write(&bj, "{\"text\": \"ok\"}\nnot json\n").unwrap();
    let err = TextCorpus::from_file(&bj)
        .unwrap()
        .open(&Partition::whole(0, 0))
        .unwrap()
        .find_map(|r| r.err())
        .unwrap()
        .to_string();
    assert!(err.contains("bad.jsonl:2"), "{err}");
}

#[test]
fn u8_arrays_grey_and_rgb() {
    let dir = TempDir::new("arrays");
    let imgs: Vec<u8> = (0..5 * 4 * 4).map(|i| i as u8).collect();
    let labels: Vec<u8> = vec![0, 1, 2, 1, 0];
    let views = vec![
        (
            "images",
            safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![5, 4, 4], &imgs)
                .unwrap(),
        ),
        (
            "labels",
            safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![5], &labels).unwrap(),
        ),
    ];
    let meta = std::collections::HashMap::from([(
        "classes".to_string(),
        "[\"a\", \"b\", \"c\"]".to_string(),
    )]);
    let p = dir.path().join("x.safetensors");
    safetensors::serialize_to_file(views, Some(meta), &p).unwrap();
    let a = U8Arrays::from_file(&p).unwrap();
    assert_eq!((a.len(), a.image_shape()), (5, (4, 4, 1)));
    assert_eq!(a.classes(), ["a", "b", "c"]);
    let recs: Vec<Sample> = a
        .open(&Partition::whole(0, 0))
        .unwrap()
        .map(|r| match r.unwrap() {
            Record::Sample(s) => s,
            Record::Bad(_) => panic!(),
        })
        .collect();
    assert_eq!(recs[3].label, Some(1));
    let Some(ImageData::Pixels { data, channels, .. }) = &recs[1].image else {
        panic!()
    };
    assert_eq!((*channels, data[0]), (1, 16));
    assert_split_exact(&a, 2, 2, 5);
    // wrong dtype is an error naming the file
    let f32s = vec![0u8; 4 * 5];
    let views = vec![(
        "images",
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![5, 1, 1], &f32s)
            .unwrap(),
    )];
    let q = dir.path().join("bad.safetensors");
    safetensors::serialize_to_file(views, None, &q).unwrap();
    let err = U8Arrays::from_file(&q).unwrap_err().to_string();
    assert!(
        err.contains("bad.safetensors") && err.contains("U8"),
        "{err}"
    );
}

#[test]
fn captioned_scenes_source_split_and_determinism() {
    let ds = CaptionedScenes::new(ScenesConfig {
        len: 23,
        ..Default::default()
    })
    .unwrap();
    assert_split_exact(&ds, 2, 2, 23);
    let a: Vec<Record> = ds
        .open(&Partition::whole(0, 0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    let b: Vec<Record> = ds
        .open(&Partition::whole(0, 0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(a, b);
    let both = CaptionedScenes::new(ScenesConfig {
        label: LabelKind::Both,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(both.num_classes(), 80);
    let sc = both.scene(3);
    assert_eq!(
        sc.label,
        (sc.objects[0].shape * 10 + sc.objects[0].colour) as i64
    );
    let _ = Arc::new(ds);
}
