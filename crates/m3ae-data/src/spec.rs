//! Data sets by name: a [`DataSpec`] such as `scenes:test:500`, `wds:shards/{0..9}.tar` or
//! `u8:train.safetensors`, parsed from a command-line flag or a configuration string alike
//! ([`FromStr`], serde) and opened into a [`Source`] ([`DataSpec::open`]).
//!
//! Every kind of data set is a [`SourceKind`] in a [`Registry`]: the kind's name is the prefix of
//! its specs (`<name>:<arg>`), and the kind checks the argument and opens the source. The
//! built-in kinds ([`Registry::default`]):
//!
//! * `u8:<file>` (also `fashion_mnist:`, `mnist:`, `arrays:` or a bare `*.safetensors` path):
//!   uint8 arrays ([`U8Arrays`](crate::U8Arrays));
//! * `scenes[:train|test|ood[:N]]`: the built-in captioned scenes
//!   ([`CaptionedScenes`](crate::CaptionedScenes)), labelled by [`DataOptions::label`];
//! * `folder:<dir>` (or a bare existing directory): one sub-folder per class
//!   ([`ImageFolder`](crate::ImageFolder));
//! * `wds:<shards>` (also `webdataset:` or a bare `*.tar` path): WebDataset tar shards, a path,
//!   a `::` list, a glob or a brace range ([`WebDataset`](crate::WebDataset)), labelled by their
//!   `.cls` members or by a json field ([`DataOptions::json_label`]);
//! * with the feature `hdf5`, `hdf5:<file>`: an official HDF5 file with `jpg` and `caption`
//!   datasets.
//!
//! A new kind is added in one place: implement [`SourceKind`] and [`Registry::register`] it,
//! then parse with [`Registry::parse`]; the spec remembers its kind, so [`DataSpec::open`] (and
//! whatever takes a spec) opens it without the registry.
//!
//! ```
//! use m3ae_data::{DataOptions, DataSpec, SceneSplit};
//! let spec: DataSpec = "scenes:test:64".parse()?;
//! assert_eq!(spec, DataSpec::scenes(SceneSplit::Test, Some(64)));
//! assert_eq!((spec.kind(), spec.arg()), ("scenes", "test:64"));
//! // aliases and bare paths are written in their canonical form
//! let tar: DataSpec = "shards/train-00000.tar".parse()?;
//! assert_eq!(tar.to_string(), "wds:shards/train-00000.tar");
//! assert_eq!("webdataset:a.tar".parse::<DataSpec>()?, DataSpec::webdataset("a.tar"));
//! // errors name the flag and the value
//! let e = "scenes:valid".parse::<DataSpec>().unwrap_err().to_string();
//! assert_eq!(e, r#"--data "scenes:valid": the scenes split must be train, test or ood"#);
//! // opening: `limit` takes an evenly strided subset
//! let opts = DataOptions { limit: Some(16), ..Default::default() };
//! let data = spec.open(&opts)?;
//! assert_eq!((data.source.len_hint(), data.classes), (Some(16), 8));
//! # Ok::<(), m3ae_data::Error>(())
//! ```
//!
//! [`FromStr`]: std::str::FromStr

use crate::sample::Source;
use crate::{Error, JsonLabel, LabelKind, Normalization, Result, SceneSplit, ScenesConfig};
#[cfg(feature = "hdf5")]
use kinds::Hdf5File;
use kinds::{scenes_arg, Arrays, Folder, Scenes, Strided, Wds};
use m3ae_model::Pooling;
use std::path::Path;
use std::sync::Arc;

/// How a data set is opened, and (for feature extraction) read and pooled.
#[derive(Debug, Clone, PartialEq)]
pub struct DataOptions {
    /// Label of the captioned scenes.
    pub label: LabelKind,
    /// At most this many images (an evenly strided subset; `None`: all).
    pub limit: Option<usize>,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Pixel normalisation.
    pub normalization: Normalization,
    /// cls token or mean of the patch tokens.
    pub pooling: Pooling,
    /// Print a progress line on stderr every this many batches (0: never).
    pub progress_every: usize,
    /// Labels of WebDataset data from a field of each sample's `.json`; `None`: the `.cls`
    /// members.
    pub json_label: Option<JsonLabel>,
    /// Largest tolerated fraction of bad samples (undecodable or missing image, ...) in [0, 1]:
    /// they are skipped and counted; above it, extraction stops.
    pub max_bad_fraction: f64,
    /// The built-in scenes' settings other than the split, the count and the label (which come
    /// from the spec, [`DataOptions::limit`] and [`DataOptions::label`]): seed, image size,
    /// held-out shapes and colours.
    pub scenes: ScenesConfig,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            json_label: None,
            label: LabelKind::Shape,
            limit: None,
            batch_size: 256,
            normalization: Normalization::Cc12m,
            pooling: Pooling::Cls,
            progress_every: 0,
            max_bad_fraction: 0.1,
            scenes: ScenesConfig::default(),
        }
    }
}

/// An opened data set: its source and number of classes (0 when unlabelled).
pub struct OpenedData {
    /// The samples.
    pub source: Arc<dyn Source>,
    /// Number of classes the labels range over (from the metadata or the labels).
    pub classes: usize,
}

/// A kind of data set: how its specs are written and how it is opened. See the module docs
/// for the built-in kinds.
///
/// ```
/// use m3ae_data::spec::{OpenedData, Registry, SourceKind};
/// use m3ae_data::{CaptionedScenes, DataOptions, ScenesConfig};
/// use std::sync::Arc;
///
/// /// `tiny:<N>`: N small scenes.
/// struct Tiny;
/// impl SourceKind for Tiny {
///     fn name(&self) -> &str { "tiny" }
///     fn usage(&self) -> String { "tiny:<N>".into() }
///     fn parse(&self, arg: &str) -> Result<String, String> {
///         arg.parse::<usize>().map(|n| n.to_string()).map_err(|_| "expected tiny:<N>".into())
///     }
///     fn open(&self, arg: &str, _: &DataOptions) -> m3ae_data::Result<OpenedData> {
///         let len = arg.parse().expect("checked by parse");
///         let cfg = ScenesConfig { len, image_size: 16, ..Default::default() };
///         let s = CaptionedScenes::new(cfg)?;
///         Ok(OpenedData { classes: s.num_classes(), source: Arc::new(s) })
///     }
/// }
///
/// let mut registry = Registry::default();
/// registry.register(Box::new(Tiny));
/// let spec = registry.parse("tiny:5")?;
/// assert_eq!(spec.open(&DataOptions::default())?.source.len_hint(), Some(5));
/// assert!(registry.parse("tiny:x").is_err());
/// assert!("tiny:5".parse::<m3ae_data::DataSpec>().is_err()); // not a built-in kind
/// # Ok::<(), m3ae_data::Error>(())
/// ```
pub trait SourceKind: Send + Sync {
    /// The kind's name: the prefix of its specs (`<name>:<arg>`) and their written form.
    fn name(&self) -> &str;

    /// Other prefixes of its specs (`webdataset` for `wds`).
    fn aliases(&self) -> &[&str] {
        &[]
    }

    /// How its specs are written, for the "expected ..." message of a spec no kind reads.
    fn usage(&self) -> String {
        format!("{}:<arg>", self.name())
    }

    /// The argument of `value` when `value` is one of this kind's specs: by default what
    /// follows `<name>:` or `<alias>:`.
    fn arg<'a>(&self, value: &'a str) -> Option<&'a str> {
        std::iter::once(self.name())
            .chain(self.aliases().iter().copied())
            .find_map(|p| value.strip_prefix(p)?.strip_prefix(':'))
    }

    /// Whether `value`, which has no kind's prefix, names data of this kind (a `*.tar` file,
    /// a directory); it is then the argument. Kinds are asked in registration order.
    fn bare(&self, _value: &str) -> bool {
        false
    }

    /// Checks an argument and returns it in its written form (which [`DataSpec`] shows and
    /// compares), or what is wrong with it.
    fn parse(&self, arg: &str) -> std::result::Result<String, String> {
        Ok(arg.to_string())
    }

    /// Opens the data set of an argument returned by [`SourceKind::parse`]. `opts.limit` is
    /// applied afterwards by [`DataSpec::open`] to a source that knows its length.
    fn open(&self, arg: &str, opts: &DataOptions) -> Result<OpenedData>;
}

/// The kinds of data sets specs can name, in order: a spec is read by the first kind whose
/// prefix it has, else by the first kind that claims it bare ([`SourceKind::bare`]).
#[derive(Clone)]
pub struct Registry {
    kinds: Vec<Arc<dyn SourceKind>>,
}

impl Default for Registry {
    /// The built-in kinds (see the module docs).
    fn default() -> Self {
        let mut r = Self::empty();
        r.register(Box::new(Arrays));
        r.register(Box::new(Scenes));
        r.register(Box::new(Folder));
        r.register(Box::new(Wds));
        #[cfg(feature = "hdf5")]
        r.register(Box::new(Hdf5File));
        r
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Registry {
    /// A registry without any kind.
    pub fn empty() -> Self {
        Self { kinds: Vec::new() }
    }

    /// Adds a kind after the others, or replaces the kind of the same name in its place.
    pub fn register(&mut self, kind: Box<dyn SourceKind>) -> &mut Self {
        let kind: Arc<dyn SourceKind> = Arc::from(kind);
        match self.kinds.iter_mut().find(|k| k.name() == kind.name()) {
            Some(k) => *k = kind,
            None => self.kinds.push(kind),
        }
        self
    }

    /// The names of the kinds, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.kinds.iter().map(|k| k.name())
    }

    /// The kind named `name` (or with the alias `name`).
    pub fn get(&self, name: &str) -> Option<&Arc<dyn SourceKind>> {
        self.kinds
            .iter()
            .find(|k| k.name() == name || k.aliases().contains(&name))
    }

    /// The spec written `value` (`<kind>:<arg>`, or a bare value a kind claims).
    pub fn parse(&self, value: &str) -> Result<DataSpec> {
        let found = self
            .kinds
            .iter()
            .find_map(|k| Some((k, k.arg(value)?)))
            .or_else(|| {
                self.kinds
                    .iter()
                    .find(|k| k.bare(value))
                    .map(|k| (k, value))
            });
        let Some((kind, arg)) = found else {
            return Err(spec_err(value, format!("expected {}", self.expected())));
        };
        DataSpec::checked(kind.clone(), arg).map_err(|msg| spec_err(value, msg))
    }

    /// The spec of kind `kind` (a name or an alias) with the argument `arg`.
    pub fn spec(&self, kind: &str, arg: &str) -> Result<DataSpec> {
        let value = format!("{kind}:{arg}");
        let k = self.get(kind).ok_or_else(|| {
            spec_err(
                &value,
                format!("unknown kind `{kind}`: expected {}", self.expected()),
            )
        })?;
        DataSpec::checked(k.clone(), arg).map_err(|msg| spec_err(&value, msg))
    }

    /// The kinds' usages as a list: `a, b or c`.
    fn expected(&self) -> String {
        let usages: Vec<String> = self.kinds.iter().map(|k| k.usage()).collect();
        match usages.split_last() {
            None => "a registered kind of data (there is none)".into(),
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        }
    }
}

fn spec_err(value: &str, msg: impl Into<String>) -> Error {
    Error::Arg {
        flag: "--data",
        value: value.to_string(),
        msg: msg.into(),
    }
}

/// A data set: a [`SourceKind`] and its argument, written `<kind>:<arg>` (see the module docs).
/// Two specs are equal when they are written alike.
#[derive(Clone)]
pub struct DataSpec {
    kind: Arc<dyn SourceKind>,
    arg: String,
}

impl DataSpec {
    fn checked(kind: Arc<dyn SourceKind>, arg: &str) -> std::result::Result<Self, String> {
        let arg = kind.parse(arg)?;
        Ok(Self { kind, arg })
    }

    /// The built-in kind `kind` with the argument `arg` (checked like a parsed one).
    pub fn new(kind: &str, arg: &str) -> Result<Self> {
        Registry::default().spec(kind, arg)
    }

    /// `scenes:<split>[:<len>]`: the built-in captioned scenes (`len`: `None` takes
    /// [`DataOptions::limit`], else 1,000 scenes).
    pub fn scenes(split: SceneSplit, len: Option<usize>) -> Self {
        Self {
            kind: Arc::new(Scenes),
            arg: scenes_arg(split, len),
        }
    }

    /// `wds:<shards>`: WebDataset tar shards (a path, a `::` list, a glob or a brace range).
    pub fn webdataset(shards: impl Into<String>) -> Self {
        Self {
            kind: Arc::new(Wds),
            arg: shards.into(),
        }
    }

    /// `u8:<file>`: uint8 arrays in safetensors.
    pub fn arrays(path: impl AsRef<Path>) -> Self {
        Self {
            kind: Arc::new(Arrays),
            arg: path.as_ref().display().to_string(),
        }
    }

    /// `folder:<dir>`: an image folder with one sub-folder per class.
    pub fn folder(path: impl AsRef<Path>) -> Self {
        Self {
            kind: Arc::new(Folder),
            arg: path.as_ref().display().to_string(),
        }
    }

    /// `hdf5:<file>`: an official HDF5 file with `jpg` and `caption` datasets.
    #[cfg(feature = "hdf5")]
    pub fn hdf5(path: impl AsRef<Path>) -> Self {
        Self {
            kind: Arc::new(Hdf5File),
            arg: path.as_ref().display().to_string(),
        }
    }

    /// The kind's name (`scenes`, `wds`, `u8`, `folder`, ...).
    pub fn kind(&self) -> &str {
        self.kind.name()
    }

    /// The argument, in its written form.
    pub fn arg(&self) -> &str {
        &self.arg
    }

    /// Opens the data set. With [`DataOptions::limit`] below its length, an evenly strided
    /// subset of that many samples; a data set whose length is unknown does not take a limit.
    pub fn open(&self, opts: &DataOptions) -> Result<OpenedData> {
        let OpenedData { source, classes } = self.kind.open(&self.arg, opts)?;
        let source = match (opts.limit, source.len_hint()) {
            (Some(take), Some(n)) if take > 0 && take < n => Arc::new(Strided {
                inner: source,
                n,
                take,
            }) as Arc<dyn Source>,
            (Some(take), None) => {
                return Err(Error::Arg {
                    flag: "--limit",
                    value: take.to_string(),
                    msg: format!("is not supported for {} data ({self})", self.kind()),
                })
            }
            _ => source,
        };
        Ok(OpenedData { source, classes })
    }
}

impl PartialEq for DataSpec {
    fn eq(&self, other: &Self) -> bool {
        self.kind() == other.kind() && self.arg == other.arg
    }
}

impl Eq for DataSpec {}

impl std::hash::Hash for DataSpec {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.kind(), &self.arg).hash(state)
    }
}

impl std::fmt::Display for DataSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind(), self.arg)
    }
}

impl std::fmt::Debug for DataSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataSpec({self})")
    }
}

impl std::str::FromStr for DataSpec {
    type Err = Error;

    /// A spec of a built-in kind ([`Registry::default`]); errors name `--data` and the value.
    fn from_str(s: &str) -> Result<Self> {
        Registry::default().parse(s)
    }
}

impl serde::Serialize for DataSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DataSpec {
    /// A spec of a built-in kind, written as on the command line.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

mod kinds;
#[cfg(test)]
mod tests;
