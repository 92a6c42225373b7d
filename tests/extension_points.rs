//! The library's extension points, used from outside the crates as a user's project would:
//! a new kind of data set (a [`SourceKind`] over the user's own [`Source`], registered so that its
//! specs parse, open with `limit` and load like the built-in ones), and a new metric sink and
//! progress display in the training loop ([`MetricSink`], [`Progress`]).

use m3ae_data::sample::{ImageData, Partition, Record, RecordIter, Sample};
use m3ae_data::spec::{OpenedData, Registry, SourceKind};
use m3ae_data::{DataOptions, Loader, LoaderConfig, Source};
use m3ae_train::{Learner, MetricSink, Progress, TrainConfig, Trainer, Window};
use std::sync::{Arc, Mutex};

/// `n` grey squares of brightness `i`, labelled `i % 3`.
struct Squares {
    n: usize,
}

impl Source for Squares {
    fn open(&self, p: &Partition) -> m3ae_data::Result<RecordIter> {
        let p = *p;
        Ok(Box::new((0..self.n).filter(move |&i| p.owns(i)).map(|i| {
            Ok(Record::Sample(Sample {
                key: format!("square/{i}"),
                image: Some(ImageData::Pixels {
                    width: 16,
                    height: 16,
                    channels: 1,
                    data: vec![i as u8; 16 * 16],
                }),
                label: Some(i as i64 % 3),
                file: Arc::from("squares"),
                ..Default::default()
            }))
        })))
    }
    fn len_hint(&self) -> Option<usize> {
        Some(self.n)
    }
    fn describe(&self) -> String {
        format!("{} squares", self.n)
    }
}

/// `squares:<N>`.
struct SquaresKind;

impl SourceKind for SquaresKind {
    fn name(&self) -> &str {
        "squares"
    }
    fn usage(&self) -> String {
        "squares:<N>".into()
    }
    fn parse(&self, arg: &str) -> Result<String, String> {
        match arg.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n.to_string()),
            _ => Err("the number of squares must be a positive integer".into()),
        }
    }
    fn open(&self, arg: &str, _: &DataOptions) -> m3ae_data::Result<OpenedData> {
        let n = arg.parse().expect("checked by parse");
        Ok(OpenedData {
            source: Arc::new(Squares { n }),
            classes: 3,
        })
    }
}

#[test]
fn a_user_kind_parses_opens_and_loads() -> anyhow::Result<()> {
    let mut registry = Registry::default();
    registry.register(Box::new(SquaresKind));
    // built-in kinds still parse through the same registry
    assert_eq!(registry.parse("scenes:test:4")?.kind(), "scenes");
    let spec = registry.parse("squares:10")?;
    assert_eq!(spec.to_string(), "squares:10");
    let e = registry.parse("squares:0").unwrap_err().to_string();
    assert_eq!(
        e,
        "--data \"squares:0\": the number of squares must be a positive integer"
    );
    let e = registry.parse("circles:3").unwrap_err().to_string();
    assert!(e.ends_with(" or squares:<N>"), "{e}");
    // the spec opens without the registry, and `limit` takes an evenly strided subset
    let opts = DataOptions {
        limit: Some(4),
        ..Default::default()
    };
    let data = spec.open(&opts)?;
    assert_eq!((data.source.len_hint(), data.classes), (Some(4), 3));
    let loader = Loader::new(data.source, None, LoaderConfig::eval(2, 16, 8))?;
    let keys: Vec<String> = loader
        .iter(Default::default())
        .map(|b| b.map(|b| b.keys))
        .collect::<Result<Vec<_>, _>>()?
        .concat();
    assert_eq!(keys, ["square/0", "square/2", "square/5", "square/7"]);
    Ok(())
}

/// Keeps every record in memory (e.g. to forward them to an experiment tracker).
#[derive(Clone, Default)]
struct Memory(Arc<Mutex<Vec<(u64, serde_json::Value)>>>);

impl MetricSink for Memory {
    fn record(&mut self, step: u64, values: &serde_json::Value) -> m3ae_train::Result<()> {
        self.0.lock().unwrap().push((step, values.clone()));
        Ok(())
    }
}

/// Counts the windows and the steps it was told about.
#[derive(Clone, Default)]
struct Counter(Arc<Mutex<(usize, u64)>>);

impl Progress for Counter {
    fn advance(&mut self, step: u64) {
        self.0.lock().unwrap().1 = step;
    }
    fn window(&mut self, _: &Window) {
        self.0.lock().unwrap().0 += 1;
    }
}

#[test]
fn a_user_sink_and_progress_receive_the_training_loops_windows() -> anyhow::Result<()> {
    let mut cfg = m3ae_model::M3aeConfig::preset("tiny")?;
    cfg.image_size = 16;
    let mut registry = Registry::default();
    registry.register(Box::new(SquaresKind));
    let opened = registry.parse("squares:64")?.open(&Default::default())?;
    let mut lc = LoaderConfig::pretrain(8, cfg.image_size, cfg.patch_size);
    lc.text_len = None;
    lc.masks = Some(m3ae_data::MaskConfig::from_model(&cfg, Default::default()));
    let source = m3ae_data::Streams::from_source(1, 0, 1, false, opened.source, None, &lc)?;
    let tc = TrainConfig {
        steps: 10,
        batch_size: 8,
        ..Default::default()
    };
    let model = m3ae_model::Mae::init(&cfg, 0, &candle_core::Device::Cpu)?;
    let (sink, progress) = (Memory::default(), Counter::default());
    Learner::new(Trainer::new(model, tc)?, source)
        .log_every(4)
        .sink(Box::new(sink.clone()))
        .progress(Box::new(progress.clone()))
        .fit()?;
    let records = sink.0.lock().unwrap().clone();
    let steps: Vec<u64> = records.iter().map(|r| r.0).collect();
    assert_eq!(steps, [4, 8, 10], "every 4 steps and at the last one");
    for (_, r) in &records {
        for key in ["loss", "image_loss", "lr", "samples_per_s", "bad_samples"] {
            assert!(r.get(key).is_some(), "{key} missing from {r}");
        }
        assert!(r["image_loss"].as_f64().unwrap().is_finite());
    }
    assert_eq!(*progress.0.lock().unwrap(), (3, 10));
    Ok(())
}
