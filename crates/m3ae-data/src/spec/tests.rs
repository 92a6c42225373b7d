//! Parsing, writing, opening and registering data specs.

use super::*;
use crate::{CaptionedScenes, Partition, Record, RecordIter};

#[test]
fn data_specs_parse_and_reject() {
    assert_eq!(
        "u8:/a/b.safetensors".parse::<DataSpec>().unwrap(),
        DataSpec::arrays("/a/b.safetensors")
    );
    assert_eq!(
        "fashion_mnist:x.safetensors".parse::<DataSpec>().unwrap(),
        DataSpec::arrays("x.safetensors")
    );
    assert_eq!(
        "scenes:ood:12".parse::<DataSpec>().unwrap(),
        DataSpec::scenes(SceneSplit::Ood, Some(12))
    );
    assert_eq!(
        "scenes".parse::<DataSpec>().unwrap(),
        DataSpec::scenes(SceneSplit::Train, None)
    );
    assert_eq!(
        "wds:/d/train-{00000..00001}.tar"
            .parse::<DataSpec>()
            .unwrap(),
        DataSpec::webdataset("/d/train-{00000..00001}.tar")
    );
    let tar = "/d/test-00000.tar".parse::<DataSpec>().unwrap();
    assert_eq!(tar, DataSpec::webdataset("/d/test-00000.tar"));
    assert_eq!(tar.to_string(), "wds:/d/test-00000.tar");
    for bad in [
        "scenes:val",
        "scenes:test:0",
        "scenesx",
        "nothing-here",
        "wds:",
    ] {
        let e = bad.parse::<DataSpec>().unwrap_err().to_string();
        assert!(e.contains(bad), "{e}");
    }
}

#[test]
fn specs_are_written_canonically_and_errors_are_the_clis() {
    let shown = |s: &str| s.parse::<DataSpec>().unwrap().to_string();
    assert_eq!(shown("scenes"), "scenes:train");
    assert_eq!(shown("scenes:test"), "scenes:test");
    assert_eq!(shown("mnist:m.safetensors"), "u8:m.safetensors");
    assert_eq!(shown("arrays:m"), "u8:m");
    assert_eq!(shown("x.safetensors"), "u8:x.safetensors");
    assert_eq!(shown("webdataset:a::b"), "wds:a::b");
    let dir = std::env::temp_dir();
    assert_eq!(
        shown(&dir.display().to_string()),
        format!("folder:{}", dir.display())
    );
    let e = |s: &str| s.parse::<DataSpec>().unwrap_err().to_string();
    let kinds = if cfg!(feature = "hdf5") {
        "folder:<dir>, wds:<shards> or hdf5:<file>"
    } else {
        "folder:<dir> or wds:<shards>"
    };
    assert_eq!(
        e("nothing-here"),
        format!(
            "--data \"nothing-here\": expected u8:<file>, fashion_mnist:<file>, \
             mnist:<file>, scenes[:train|test|ood[:N]], {kinds}"
        )
    );
    assert_eq!(
        e("scenes:test:0"),
        "--data \"scenes:test:0\": the scene count must be a positive integer"
    );
    assert_eq!(
        e("scenes:a:1:2"),
        "--data \"scenes:a:1:2\": the scenes split must be train, test or ood"
    );
    assert_eq!(
        e("scenes:ood:1:2"),
        "--data \"scenes:ood:1:2\": too many `:` fields"
    );
    assert_eq!(e("wds:"), "--data \"wds:\": expected wds:<shards>");
    // kinds by name, checked like parsed specs
    assert_eq!(
        DataSpec::new("scenes", "ood:3").unwrap(),
        DataSpec::scenes(SceneSplit::Ood, Some(3))
    );
    assert_eq!(DataSpec::new("webdataset", "a.tar").unwrap().kind(), "wds");
    assert!(DataSpec::new("scenes", "val").is_err());
    assert!(DataSpec::new("nope", "x")
        .unwrap_err()
        .to_string()
        .contains("unknown kind `nope`"));
}

#[test]
fn specs_deserialize_from_configuration_strings() {
    #[derive(serde::Deserialize, serde::Serialize)]
    struct Cfg {
        train: DataSpec,
        test: Vec<DataSpec>,
    }
    let c: Cfg = toml::from_str(
        "train = \"scenes:train:100\"\ntest = [\"scenes:test\", \"webdataset:t.tar\"]\n",
    )
    .unwrap();
    assert_eq!(c.train, DataSpec::scenes(SceneSplit::Train, Some(100)));
    assert_eq!(c.test[1], DataSpec::webdataset("t.tar"));
    let back = toml::to_string(&c).unwrap();
    assert!(back.contains("\"wds:t.tar\""), "{back}");
    let bad = toml::from_str::<Cfg>("train = \"scenes:val\"\ntest = []\n");
    assert!(bad
        .err()
        .unwrap()
        .to_string()
        .contains("the scenes split must be train, test or ood"));
}

#[test]
fn opening_applies_the_limit_and_refuses_what_cannot_be_read() {
    let opts = |limit| DataOptions {
        limit,
        ..Default::default()
    };
    // without a count the scenes are `limit` scenes; with one, a strided subset of them
    let s = DataSpec::scenes(SceneSplit::Test, None);
    assert_eq!(s.open(&opts(Some(7))).unwrap().source.len_hint(), Some(7));
    assert_eq!(s.open(&opts(None)).unwrap().source.len_hint(), Some(1000));
    let s = DataSpec::scenes(SceneSplit::Test, Some(20));
    let d = s.open(&opts(Some(5))).unwrap();
    assert_eq!(d.source.len_hint(), Some(5));
    assert!(d.source.describe().starts_with("5 of "));
    let e = |s: DataSpec, o| s.open(&o).err().unwrap().to_string();
    assert_eq!(
        e(DataSpec::webdataset("a.tar"), opts(Some(5))),
        "--limit \"5\": is not supported for webdataset data (wds:a.tar)"
    );
    assert_eq!(
        e(DataSpec::arrays("/no/such.safetensors"), opts(None)),
        "/no/such.safetensors: no such data file"
    );
    assert_eq!(
        e(DataSpec::folder("/no/such/dir"), opts(None)),
        "/no/such/dir: no such image folder"
    );
}

/// A kind of a user: `const:<N>`, N copies of one caption, with no length to limit.
struct Const;

impl SourceKind for Const {
    fn name(&self) -> &str {
        "const"
    }
    fn open(&self, arg: &str, _: &DataOptions) -> Result<OpenedData> {
        let _: usize = arg.parse().map_err(|_| spec_err(arg, "not a count"))?;
        Ok(OpenedData {
            source: Arc::new(Nothing),
            classes: 0,
        })
    }
}

struct Nothing;

impl Source for Nothing {
    fn open(&self, _: &Partition) -> Result<RecordIter> {
        Ok(Box::new(std::iter::empty()))
    }
    fn describe(&self) -> String {
        "nothing".into()
    }
}

#[test]
fn a_registered_kind_parses_opens_and_replaces() {
    let mut r = Registry::default();
    r.register(Box::new(Const));
    let spec = r.parse("const:3").unwrap();
    assert_eq!(spec.to_string(), "const:3");
    assert!(spec.open(&DataOptions::default()).is_ok());
    // no length: a limit is refused, naming the kind
    let e = spec
        .open(&DataOptions {
            limit: Some(2),
            ..Default::default()
        })
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        e,
        "--limit \"2\": is not supported for const data (const:3)"
    );
    assert!(r.expected().ends_with("or const:<arg>"), "{}", r.expected());
    assert!("const:3".parse::<DataSpec>().is_err());
    // a kind of an existing name takes its place
    let n = r.names().count();
    r.register(Box::new(Const));
    assert_eq!(r.names().count(), n);
    assert!(Registry::empty().parse("scenes").is_err());
}

#[test]
fn strided_subset_is_even_and_exact() {
    let s = CaptionedScenes::new(ScenesConfig {
        len: 10,
        image_size: 16,
        ..Default::default()
    })
    .unwrap();
    let st = Strided {
        inner: Arc::new(s),
        n: 10,
        take: 4,
    };
    let keys: Vec<String> = st
        .open(&Partition::whole(0, 0))
        .unwrap()
        .map(|r| match r.unwrap() {
            Record::Sample(s) => s.key,
            Record::Bad(_) => unreachable!(),
        })
        .collect();
    let idx: Vec<&str> = keys.iter().map(|k| k.rsplit('/').next().unwrap()).collect();
    assert_eq!(idx, vec!["0", "2", "5", "7"]);
}
