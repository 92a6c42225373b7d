//! The full per-sample data path in samples/s with 1 and 2 threads: decode a 256 px JPEG,
//! RandomResizedCrop to 224, flip, normalise, patchify, tokenise (and collate + masks), through
//! the `Loader`. Uses the bert-base-uncased tokenizer under `M3AE_DATA_DIR`, else one trained
//! on the captioned scenes.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use m3ae::data::{
    CaptionedScenes, InMemory, Loader, LoaderConfig, Position, ScenesConfig, Source, Tokenizer,
};
use std::sync::Arc;

mod common;
use common::samples;

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
    let src: Arc<dyn Source> = Arc::new(InMemory::new(samples(n)));
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
