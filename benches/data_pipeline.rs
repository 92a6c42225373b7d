//! The full per-sample data path in samples/s with 1 and 2 threads: decode a 256 px JPEG,
//! RandomResizedCrop to 224, flip, normalise, patchify, tokenise (and collate + masks), through
//! the `Loader`. Uses the bert-base-uncased tokenizer under `M3AE_DATA_DIR`, else one trained
//! on the captioned scenes.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use m3ae::data::{
    CaptionedScenes, ImageData, Loader, LoaderConfig, Partition, Position, Record, RecordIter,
    Sample, ScenesConfig, Source, Tokenizer,
};
use std::sync::Arc;

/// Samples held in memory (so the bench measures processing, not disk).
struct InMemory(Vec<Sample>);

impl Source for InMemory {
    fn open(&self, p: &Partition) -> m3ae::data::Result<RecordIter> {
        let v: Vec<_> = self
            .0
            .iter()
            .enumerate()
            .filter(|(i, _)| p.owns(*i))
            .map(|(_, s)| Ok(Record::Sample(s.clone())))
            .collect();
        Ok(Box::new(v.into_iter()))
    }
    fn describe(&self) -> String {
        "in-memory".into()
    }
}

fn samples(n: usize) -> Vec<Sample> {
    // photo-like 256x256 JPEGs (quality 90): smooth gradients plus texture
    let scenes = CaptionedScenes::new(ScenesConfig::default()).unwrap();
    (0..n)
        .map(|i| {
            let sc = scenes.scene(i);
            let img = image::RgbImage::from_fn(256, 256, |x, y| {
                let p = &sc.pixels[(((y / 4) * 64 + x / 4) * 3) as usize..][..3];
                let t = ((x * 13 + y * 7 + i as u32) % 17) as u8;
                image::Rgb([p[0].saturating_add(t), p[1], p[2].saturating_sub(t)])
            });
            let mut jpg = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 90)
                .encode_image(&img)
                .unwrap();
            Sample {
                key: i.to_string(),
                image: Some(ImageData::Encoded(Arc::new(jpg))),
                text: Some(sc.caption),
                label: None,
                file: "memory".into(),
            }
        })
        .collect()
}

fn tokenizer() -> Tokenizer {
    if let Some(d) = std::env::var_os("M3AE_DATA_DIR") {
        let p = std::path::Path::new(&d).join("tokenizer/bert-base-uncased/tokenizer.json");
        if let Ok(t) = Tokenizer::from_file(p) {
            return t;
        }
    }
    let scenes = CaptionedScenes::new(ScenesConfig::default()).unwrap();
    let corpus = scenes.corpus(2000);
    Tokenizer::train_wordpiece(corpus.iter().map(String::as_str), 500).unwrap()
}

fn bench(c: &mut Criterion) {
    let n = 256;
    let src: Arc<dyn Source> = Arc::new(InMemory(samples(n)));
    let tok = Arc::new(tokenizer());
    let mut g = c.benchmark_group("data_pipeline");
    g.throughput(Throughput::Elements(n as u64));
    g.sample_size(10);
    for threads in [1usize, 2] {
        let mut cfg = LoaderConfig::pretrain(64, 224, 16);
        cfg.num_threads = threads;
        cfg.epochs = Some(1);
        cfg.shuffle_buffer = 0;
        let loader = Loader::new(src.clone(), Some(tok.clone()), cfg).unwrap();
        g.bench_function(format!("jpeg256_rrc224_tokenize/{threads}_threads"), |b| {
            b.iter(|| {
                let mut k = 0;
                for batch in loader.iter(Position::default()) {
                    k += batch.unwrap().keys.len();
                }
                assert_eq!(k, n);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
