//! A kind of data set added from outside the crate: a user implements [`SourceKind`] over their
//! own [`Source`], registers it, and its specs parse, open (with `limit`) and load like the
//! built-in ones.

use m3ae_data::sample::{ImageData, Partition, Record, RecordIter, Sample};
use m3ae_data::spec::{OpenedData, Registry, SourceKind};
use m3ae_data::{DataOptions, Loader, LoaderConfig, Source};
use std::sync::Arc;

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
