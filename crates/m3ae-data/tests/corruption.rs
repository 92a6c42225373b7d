//! Bad input: truncated tars, random bytes in tar headers and images, invalid UTF-8, empty
//! shards. Bad samples are skipped and counted per reason; too many turn into an error that
//! says what was found; nothing panics on any bytes.

mod common;
use common::*;
use m3ae_data::*;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

fn count_all(ds: &WebDataset) -> (usize, Vec<BadReason>) {
    let mut good = 0;
    let mut bad = Vec::new();
    for r in ds.open(&Partition::whole(0, 0)).unwrap() {
        match r.unwrap() {
            Record::Sample(_) => good += 1,
            Record::Bad(b) => bad.push(b.reason),
        }
    }
    (good, bad)
}

fn image_only(batch: usize) -> LoaderConfig {
    let mut cfg = LoaderConfig::pretrain(batch, 16, 8);
    cfg.text_len = None;
    cfg.shuffle_buffer = 0;
    cfg.epochs = Some(1);
    cfg.drop_last = false;
    cfg
}

#[test]
fn truncated_tar_keeps_what_came_before_and_goes_on() {
    let dir = TempDir::new("trunc");
    let full = shard_bytes(0, 6);
    let a = dir.path().join("a.tar");
    // cut in the middle of the fourth sample's image
    std::fs::write(&a, &full[..full.len() * 3 / 5]).unwrap();
    let b = dir.path().join("b.tar");
    std::fs::write(&b, shard_bytes(1, 2)).unwrap();
    let ds = WebDataset::new(vec![a, b]).unwrap();
    let (good, bad) = count_all(&ds);
    assert_eq!(bad, [BadReason::TruncatedTar]);
    assert!((2..=4).contains(&(good - 2)), "good {good}");
}

#[test]
fn random_bytes_in_tar_headers_never_panic() {
    let dir = TempDir::new("hdr");
    let full = shard_bytes(0, 4);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    for t in 0..150 {
        let mut bytes = full.clone();
        // corrupt one header region (multiples of 512 are header or data blocks)
        let block = rng.random_range(0..bytes.len() / 512);
        for _ in 0..rng.random_range(1..40) {
            let i = block * 512 + rng.random_range(0..512);
            bytes[i] = rng.random();
        }
        if t % 3 == 0 {
            bytes.truncate(rng.random_range(0..bytes.len()));
        }
        let p = dir.path().join(format!("{t}.tar"));
        std::fs::write(&p, &bytes).unwrap();
        let ds = WebDataset::new(vec![p]).unwrap();
        let (good, bad) = count_all(&ds);
        assert!(good <= 4 && bad.len() <= 4);
        // and through the loader (image decode of whatever survived)
        let l = Loader::new(Arc::new(ds), None, {
            let mut c = image_only(2);
            c.max_bad_fraction = 1.0;
            c
        })
        .unwrap();
        for b in l.iter(Position::default()) {
            match b {
                Ok(_) => {}
                // nothing usable survived: an error, not an endless loop
                Err(Error::NotEnoughData { usable: 0, .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
    }
    // pure noise as a tar file
    for t in 0..50 {
        let n = rng.random_range(0..4000);
        let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
        let p = dir.path().join(format!("noise{t}.tar"));
        std::fs::write(&p, &bytes).unwrap();
        let (good, _) = count_all(&WebDataset::new(vec![p]).unwrap());
        assert_eq!(good, 0);
    }
}

#[test]
fn random_bytes_in_images_are_skipped_as_corrupt() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let good = jpeg(32, 32, 9);
    for _ in 0..200 {
        let mut b = good.clone();
        for _ in 0..rng.random_range(1..30) {
            let i = rng.random_range(0..b.len());
            b[i] = rng.random();
        }
        if rng.random::<bool>() {
            b.truncate(rng.random_range(0..b.len()));
        }
        // must return (Ok or Err), never panic
        let _ = decode_rgb(&b);
    }
    for n in [0usize, 1, 8, 100] {
        let noise: Vec<u8> = (0..n).map(|_| rng.random()).collect();
        assert!(decode_rgb(&noise).is_err());
    }
    // a PNG whose header claims a huge image is refused, not allocated
    let mut png = png_rgba(4, 4);
    png[16..24].copy_from_slice(&[0x7f, 0xff, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff]);
    assert!(decode_rgb(&png).is_err());
}

#[test]
fn bad_samples_are_counted_per_reason_and_logged_with_key_and_file() {
    let dir = TempDir::new("reasons");
    let mut b = tar::Builder::new(Vec::new());
    member(&mut b, "k0.jpg", &jpeg(16, 16, 1));
    member(&mut b, "k0.txt", b"fine caption");
    member(&mut b, "k1.jpg", b"\xff\xd8 definitely not a jpeg");
    member(&mut b, "k1.txt", b"corrupt image");
    member(&mut b, "k2.jpg", &jpeg(16, 16, 2));
    member(&mut b, "k2.txt", b"bad \xff\xfe utf8");
    member(&mut b, "k3.jpg", &jpeg(16, 16, 3));
    member(&mut b, "k4.jpg", &jpeg(16, 16, 4));
    member(&mut b, "k4.txt", b"   ");
    member(&mut b, "k5.png", &png_rgba(16, 16));
    member(&mut b, "k5.txt", b"alpha on white");
    let shard = dir.path().join("mixed.tar");
    std::fs::write(&shard, b.into_inner().unwrap()).unwrap();
    let empty = dir.path().join("empty.tar");
    std::fs::write(&empty, tar::Builder::new(Vec::new()).into_inner().unwrap()).unwrap();
    let ds = Arc::new(WebDataset::new(vec![shard, empty]).unwrap());
    let scenes = CaptionedScenes::new(ScenesConfig::default()).unwrap();
    let tok = scenes.train_tokenizer(50, 200).unwrap();
    let mut cfg = LoaderConfig::pretrain(8, 16, 8);
    cfg.shuffle_buffer = 0;
    cfg.epochs = Some(1);
    cfg.drop_last = false;
    cfg.max_bad_fraction = 1.0;
    let loader = Loader::new(ds.clone(), Some(Arc::new(tok.clone())), cfg.clone()).unwrap();
    let batches: Vec<Batch> = loader
        .iter(Position::default())
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].keys, ["k0", "k5"]);
    let st = &batches[0].position.stats;
    assert_eq!(st.good, 2);
    for r in [
        BadReason::CorruptImage,
        BadReason::NonUtf8,
        BadReason::MissingCaption,
        BadReason::EmptyCaption,
        BadReason::EmptyShard,
    ] {
        assert_eq!(st.count(r), 1, "{r:?}: {st}");
    }
    let ex = st
        .examples
        .iter()
        .find(|e| e.reason == BadReason::CorruptImage)
        .unwrap();
    assert_eq!(ex.key, "k1");
    assert!(ex.file.ends_with("mixed.tar"));
    // the transparent half of the RGBA PNG became white: its patches are all (1 - mean) / std
    let (mean, std) = Normalization::Cc12m.mean_std();
    let p = batches[0]
        .input
        .image_patches
        .as_ref()
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
    assert!((p[1][0][0] - (1.0 - mean[0]) / std[0]).abs() < 1e-3);

    // max_bad_fraction turns it into an error that says what was found
    cfg.max_bad_fraction = 0.2;
    cfg.bad_window = 1;
    let loader = Loader::new(ds, Some(Arc::new(tok)), cfg).unwrap();
    let err = loader
        .iter(Position::default())
        .find_map(|b| b.err())
        .expect("too many bad samples");
    let msg = err.to_string();
    assert!(matches!(err, Error::TooManyBad { .. }));
    assert!(msg.contains("bad of") && msg.contains("mixed.tar"), "{msg}");
}

#[test]
fn invalid_utf8_in_text_corpus_and_manifest() {
    let dir = TempDir::new("utf8");
    let t = dir.path().join("c.txt");
    std::fs::write(&t, b"good line\nbad \xc3\x28 line\nanother\n").unwrap();
    let reasons: Vec<Option<BadReason>> = TextCorpus::from_file(&t)
        .unwrap()
        .open(&Partition::whole(0, 0))
        .unwrap()
        .map(|r| match r.unwrap() {
            Record::Sample(_) => None,
            Record::Bad(b) => Some(b.reason),
        })
        .collect();
    assert_eq!(reasons, [None, Some(BadReason::NonUtf8), None]);
    let m = dir.path().join("m.csv");
    std::fs::write(dir.path().join("a.jpg"), jpeg(8, 8, 0)).unwrap();
    std::fs::write(&m, b"image,caption\na.jpg,ok\na.jpg,bad \xff\n").unwrap();
    let reasons: Vec<Option<BadReason>> = Manifest::new(&m)
        .unwrap()
        .open(&Partition::whole(0, 0))
        .unwrap()
        .map(|r| match r.unwrap() {
            // the manifest keeps the sample with its caption fault: the loader decides
            Record::Sample(s) => s.text_fault.map(|f| f.reason),
            Record::Bad(b) => panic!("unexpected bad record {b}"),
        })
        .collect();
    assert_eq!(reasons, [None, Some(BadReason::NonUtf8)]);
}

#[test]
fn random_manifest_bytes_never_panic() {
    let dir = TempDir::new("manifest-noise");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    for t in 0..100 {
        let base =
            b"{\"image\": \"a.jpg\", \"caption\": \"x\", \"label\": 3}\nimage,caption\n\"q,\"\n";
        let mut b = base.to_vec();
        for _ in 0..rng.random_range(0..20) {
            let i = rng.random_range(0..b.len());
            b[i] = rng.random();
        }
        for ext in ["jsonl", "csv"] {
            let p = dir.path().join(format!("{t}.{ext}"));
            std::fs::write(&p, &b).unwrap();
            for r in Manifest::new(&p)
                .unwrap()
                .open(&Partition::whole(0, 0))
                .into_iter()
                .flatten()
            {
                let _ = r;
            }
        }
    }
}

#[test]
fn manifest_image_paths_to_devices_and_directories_are_errors_not_hangs() {
    // Found while writing the manifest fuzz target: the image named by a line was read with an
    // unbounded `fs::read`, so `/dev/zero` read forever (and a FIFO would block).
    let dir = TempDir::new("manifest-devices");
    std::fs::create_dir_all(dir.path().join("sub")).unwrap();
    let p = dir.path().join("m.jsonl");
    std::fs::write(
        &p,
        "{\"image\": \"/dev/zero\", \"caption\": \"zeros\"}\n{\"image\": \"sub\", \"caption\": \"a dir\"}\n",
    )
    .unwrap();
    let recs: Vec<_> = Manifest::new(&p)
        .unwrap()
        .open(&Partition::whole(0, 0))
        .unwrap()
        .collect();
    assert_eq!(recs.len(), 2);
    for r in recs {
        let Err(e) = r else {
            panic!("expected an error, not a record")
        };
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }
}
