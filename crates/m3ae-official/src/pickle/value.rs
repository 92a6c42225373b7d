//! The inert value graph a pickle parses into ([`Value`] in an arena indexed by [`Id`]) and the
//! accessors the checkpoint walker reads it with ([`Pickle`]).

use super::vm::Vm;
use super::{Id, Limits, Result};

/// Bytes of a payload: borrowed from the input or owned (decoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ByteBuf {
    /// `len` bytes of the input starting at `start`.
    Borrowed {
        /// Offset in the input.
        start: usize,
        /// Length.
        len: usize,
    },
    /// Bytes produced by decoding (e.g. `_codecs.encode`).
    Owned(Vec<u8>),
}

impl ByteBuf {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            ByteBuf::Borrowed { len, .. } => *len,
            ByteBuf::Owned(v) => v.len(),
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Element kind of a numpy dtype.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DtypeKind {
    /// `f`: IEEE float.
    Float,
    /// `i`: signed integer.
    Int,
    /// `u`: unsigned integer.
    UInt,
    /// `b`: bool.
    Bool,
    /// Anything else (the descriptor as written), e.g. `O8`, `U5`, `c8`.
    Other(String),
}

/// A numpy dtype.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dtype {
    /// Element kind.
    pub kind: DtypeKind,
    /// Bytes per element.
    pub itemsize: usize,
    /// True for big-endian (`>`) data.
    pub big_endian: bool,
}

impl Dtype {
    /// Parses a numpy type string such as `f4`, `<i8`, `|b1`.
    pub fn parse(descr: &str) -> Dtype {
        let (big_endian, rest) = match descr.as_bytes().first() {
            Some(b'>') | Some(b'!') => (true, &descr[1..]),
            Some(b'<') | Some(b'|') | Some(b'=') => (false, &descr[1..]),
            _ => (false, descr),
        };
        let named = match rest {
            "float32" => Some(("f", 4)),
            "float64" => Some(("f", 8)),
            "float16" => Some(("f", 2)),
            "int32" => Some(("i", 4)),
            "int64" => Some(("i", 8)),
            "uint8" => Some(("u", 1)),
            "bool" => Some(("b", 1)),
            _ => None,
        };
        let (k, size) = match named {
            Some(x) => x,
            None => {
                let (k, digits) = rest.split_at(rest.len().min(1));
                match digits.parse::<usize>() {
                    Ok(n) => (k, n),
                    Err(_) => ("?", 0),
                }
            }
        };
        let kind = match (k, size) {
            ("f", 2 | 4 | 8) => DtypeKind::Float,
            ("i", 1 | 2 | 4 | 8) => DtypeKind::Int,
            ("u", 1 | 2 | 4 | 8) => DtypeKind::UInt,
            ("b", 1) => DtypeKind::Bool,
            _ => DtypeKind::Other(descr.to_string()),
        };
        Dtype {
            kind,
            itemsize: size,
            big_endian,
        }
    }

    /// The numpy type string (`<f4`).
    pub fn descr(&self) -> String {
        let k = match &self.kind {
            DtypeKind::Float => "f",
            DtypeKind::Int => "i",
            DtypeKind::UInt => "u",
            DtypeKind::Bool => "b",
            DtypeKind::Other(s) => return s.clone(),
        };
        let order = if self.itemsize == 1 {
            "|"
        } else if self.big_endian {
            ">"
        } else {
            "<"
        };
        format!("{order}{k}{}", self.itemsize)
    }
}

/// A numpy array: dtype, shape and its raw bytes (in the dtype's byte order).
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    /// Element type.
    pub dtype: Dtype,
    /// Shape (empty for 0-d arrays and scalars).
    pub shape: Vec<usize>,
    /// True when the data is in Fortran (column-major) order.
    pub fortran: bool,
    /// `product(shape) * itemsize` bytes.
    pub data: ByteBuf,
}

/// A call of a placeholder (an unknown global or another placeholder object).
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// What was called (usually a [`Value::Global`]).
    pub callable: Id,
    /// The argument tuple.
    pub args: Id,
    /// Keyword arguments (`NEWOBJ_EX`).
    pub kwargs: Option<Id>,
    /// True when created by `NEWOBJ`/`NEWOBJ_EX` (`cls.__new__(cls, *args)`), false for `REDUCE`.
    pub new_obj: bool,
    /// The last `BUILD` state.
    pub state: Option<Id>,
    /// `SETITEM(S)` pairs, in order.
    pub items: Vec<(Id, Id)>,
    /// `APPEND(S)` / `ADDITEMS` elements, in order.
    pub list_items: Vec<Id>,
}

/// One value of the graph.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer that fits `i64`.
    Int(i64),
    /// A larger integer: little-endian two's complement bytes.
    BigInt(ByteBuf),
    /// A float.
    Float(f64),
    /// A str.
    Str(String),
    /// bytes or bytearray.
    Bytes(ByteBuf),
    /// A tuple.
    Tuple(Vec<Id>),
    /// A list.
    List(Vec<Id>),
    /// A dict as `(key, value)` pairs in insertion order (later pairs win on lookup).
    Dict(Vec<(Id, Id)>),
    /// A set or frozenset.
    Set(Vec<Id>),
    /// An unresolved global `module.name` (an inert placeholder).
    Global {
        /// Module path.
        module: String,
        /// Qualified name.
        name: String,
    },
    /// A call of a placeholder.
    Object(Object),
    /// flax `FrozenDict` wrapping the dict `Id`.
    FrozenDict(Id),
    /// A numpy dtype.
    Dtype(Dtype),
    /// A numpy array.
    Array(Array),
    /// `numpy _reconstruct(...)` awaiting its `BUILD` state.
    PendingArray,
}

impl Value {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Set(_) => "set",
            Value::Global { .. } => "global",
            Value::Object(_) => "object",
            Value::FrozenDict(_) => "FrozenDict",
            Value::Dtype(_) => "dtype",
            Value::Array(_) => "ndarray",
            Value::PendingArray => "ndarray (unbuilt)",
        }
    }
}

/// Ids of the three singletons every arena starts with.
pub(super) const NONE_ID: Id = 0;
pub(super) const TRUE_ID: Id = 1;
pub(super) const FALSE_ID: Id = 2;

/// A parsed pickle: the value arena and the root value, borrowing byte payloads from the input.
#[derive(Debug, Clone)]
pub struct Pickle<'a> {
    pub(super) data: &'a [u8],
    pub(super) values: Vec<Value>,
    pub(super) root: Id,
}

impl<'a> Pickle<'a> {
    /// Parses `data` with the default [`Limits`].
    pub fn parse(data: &'a [u8]) -> Result<Self> {
        Self::parse_with(data, Limits::default())
    }

    /// Parses `data` under `limits`.
    pub fn parse_with(data: &'a [u8], limits: Limits) -> Result<Self> {
        Vm::new(data, limits).run()
    }

    /// The value `STOP` returned.
    pub fn root(&self) -> Id {
        self.root
    }

    /// The value `id` (`Value::None` for an id outside the arena).
    pub fn get(&self, id: Id) -> &Value {
        self.values.get(id).unwrap_or(&Value::None)
    }

    /// Number of values in the arena.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True when the arena is empty (never, after a successful parse).
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The bytes of a payload.
    pub fn buf(&self, b: &'a ByteBuf) -> &'a [u8] {
        match b {
            ByteBuf::Borrowed { start, len } => self
                .data
                .get(*start..start.saturating_add(*len))
                .unwrap_or(&[]),
            ByteBuf::Owned(v) => v,
        }
    }

    /// The bytes of a `bytes` value.
    pub fn bytes_of(&self, id: Id) -> Option<&[u8]> {
        match self.values.get(id) {
            Some(Value::Bytes(b)) => Some(match b {
                ByteBuf::Borrowed { start, len } => self.data.get(*start..start + len)?,
                ByteBuf::Owned(v) => v,
            }),
            _ => None,
        }
    }

    /// The raw data of an array.
    pub fn array_data<'s>(&'s self, a: &'s Array) -> &'s [u8] {
        match &a.data {
            ByteBuf::Borrowed { start, len } => self
                .data
                .get(*start..start.saturating_add(*len))
                .unwrap_or(&[]),
            ByteBuf::Owned(v) => v,
        }
    }

    /// The string of a `str` value.
    pub fn as_str(&self, id: Id) -> Option<&str> {
        match self.values.get(id) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// The integer of an `int` (or bool) value.
    pub fn as_int(&self, id: Id) -> Option<i64> {
        match self.values.get(id) {
            Some(Value::Int(i)) => Some(*i),
            Some(Value::Bool(b)) => Some(i64::from(*b)),
            _ => None,
        }
    }

    /// The elements of a tuple.
    pub fn tuple_items(&self, id: Id) -> Option<&[Id]> {
        match self.values.get(id) {
            Some(Value::Tuple(t)) => Some(t),
            _ => None,
        }
    }

    /// The `(key, value)` pairs of a dict-like value: a dict, a `FrozenDict`, or a placeholder
    /// object filled by `SETITEM(S)` (e.g. `collections.OrderedDict`).
    pub fn dict_items(&self, id: Id) -> Option<&[(Id, Id)]> {
        match self.values.get(id) {
            Some(Value::Dict(d)) => Some(d),
            Some(Value::FrozenDict(inner)) => match self.values.get(*inner) {
                Some(Value::Dict(d)) => Some(d),
                _ => None,
            },
            Some(Value::Object(o)) if !o.items.is_empty() => Some(&o.items),
            Some(Value::Object(o)) if o.state.is_none() => {
                let (_, name) = self.global(o.callable)?;
                (name == "OrderedDict").then_some(&o.items[..])
            }
            _ => None,
        }
    }

    /// The value under string key `key` of a dict-like value (the last one wins, as in Python).
    pub fn dict_get(&self, id: Id, key: &str) -> Option<Id> {
        self.dict_items(id)?
            .iter()
            .rev()
            .find(|(k, _)| self.as_str(*k) == Some(key))
            .map(|&(_, v)| v)
    }

    /// `(module, name)` of a global.
    pub fn global(&self, id: Id) -> Option<(&str, &str)> {
        match self.values.get(id) {
            Some(Value::Global { module, name }) => Some((module, name)),
            _ => None,
        }
    }

    /// The placeholder object `id`.
    pub fn object(&self, id: Id) -> Option<&Object> {
        match self.values.get(id) {
            Some(Value::Object(o)) => Some(o),
            _ => None,
        }
    }

    /// `(module, name)` of the class (callable) of a placeholder object, when it is a global.
    pub fn class_of(&self, id: Id) -> Option<(&str, &str)> {
        self.global(self.object(id)?.callable)
    }

    /// A short description of the kind of a value, for error messages.
    pub fn kind(&self, id: Id) -> &'static str {
        self.get(id).kind()
    }
}
