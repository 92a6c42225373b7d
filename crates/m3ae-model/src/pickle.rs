//! A pickle reader that never runs pickled code: it executes the opcode stream of Python pickle
//! protocols 2 to 5 into an inert value graph, so the official (cloudpickled Flax) checkpoints can
//! be read without Python.
//!
//! * Every global (`module.name`) becomes a [`Value::Global`] placeholder; calling it (`REDUCE`,
//!   `NEWOBJ`, `NEWOBJ_EX`) records an [`Object`] with its arguments, `BUILD` records the state,
//!   `SETITEM(S)` / `APPEND(S)` on it record items. Nothing is imported or executed.
//! * A few globals are understood **by name**, whatever their module path (`numpy.core.*` and
//!   `numpy._core.*` alike): numpy `_frombuffer`, `_reconstruct` (+ `BUILD` with the ndarray
//!   state), `scalar` and `dtype` build [`Array`]s and [`Dtype`]s; flax `FrozenDict(dict)` becomes
//!   [`Value::FrozenDict`]; jax `_reconstruct_array` / `reconstruct_device_array` apply the wrapped
//!   ndarray reduction; `_codecs.encode(str, "latin1")` gives bytes (protocol-2 byte strings).
//! * Values live in an arena ([`Pickle::get`] by [`Id`]): shared references and cycles are plain
//!   ids, mutation after memoisation is seen by every reference (as in Python), and dropping the
//!   graph never recurses.
//! * Byte payloads are not copied: [`ByteBuf::Borrowed`] points into the input.
//! * [`Limits`] bound the memo, the stack, the mark stack, the nesting depth, the number of values
//!   and the bytes the reader allocates; every length read from the file is checked against the
//!   bytes that remain before anything is allocated. A corrupt or hostile file gives an [`Error`]
//!   naming what was met and the byte offset of the opcode, never a panic.
//!
//! ```
//! use m3ae_model::pickle::{Pickle, Value};
//! // {"a": (1, b"xy")} pickled with protocol 5 (frame and memo omitted).
//! let data = b"\x80\x05}\x8c\x01aK\x01C\x02xy\x86s.";
//! let p = Pickle::parse(data)?;
//! let a = p.dict_get(p.root(), "a").unwrap();
//! let items = p.tuple_items(a).unwrap();
//! assert_eq!(p.as_int(items[0]), Some(1));
//! assert!(matches!(p.get(items[1]), Value::Bytes(_)));
//! assert_eq!(p.bytes_of(items[1]), Some(&b"xy"[..]));
//! // A truncated stream is an error with its offset, not a panic.
//! let e = Pickle::parse(&data[..9]).unwrap_err();
//! assert!(e.to_string().contains("byte 9"), "{e}");
//! # Ok::<(), m3ae_model::pickle::Error>(())
//! ```

use std::collections::HashMap;

/// Index of a value in a [`Pickle`]'s arena.
pub type Id = usize;

/// Errors of the reader; each names the byte offset of the opcode (or argument) it concerns.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The data ends inside an opcode or before `STOP`.
    #[error("pickle truncated at byte {offset}: expected {what}")]
    Truncated {
        /// Where the missing bytes should have been.
        offset: usize,
        /// What was being read.
        what: &'static str,
    },
    /// A length read from the file is larger than the rest of the file.
    #[error(
        "pickle: {what} of {len} bytes at byte {offset} is longer than the {remaining} bytes left"
    )]
    PayloadTooLong {
        /// Offset of the opcode.
        offset: usize,
        /// What was being read.
        what: &'static str,
        /// The declared length.
        len: u64,
        /// Bytes left after the length field.
        remaining: usize,
    },
    /// An opcode that is not part of pickle.
    #[error("pickle: unknown opcode 0x{opcode:02x} at byte {offset}")]
    UnknownOpcode {
        /// The byte.
        opcode: u8,
        /// Its offset.
        offset: usize,
    },
    /// A valid opcode this reader refuses (protocol 0/1 text forms, persistent ids, extensions,
    /// out-of-band buffers).
    #[error("pickle: unsupported opcode {name} at byte {offset}")]
    UnsupportedOpcode {
        /// The opcode's name.
        name: &'static str,
        /// Its offset.
        offset: usize,
    },
    /// A resource limit was reached.
    #[error("pickle: {what} exceeds the limit of {limit} at byte {offset}")]
    Limit {
        /// Offset of the opcode.
        offset: usize,
        /// Which limit.
        what: &'static str,
        /// Its value.
        limit: usize,
    },
    /// Structurally invalid data (stack underflow, wrong operand types, inconsistent array).
    #[error("pickle: {msg} at byte {offset}")]
    Malformed {
        /// Offset of the opcode.
        offset: usize,
        /// What is wrong.
        msg: String,
    },
}

/// Result type of the reader.
pub type Result<T> = std::result::Result<T, Error>;

/// Resource limits of the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most memo entries.
    pub max_memo: usize,
    /// Most values on the stack.
    pub max_stack: usize,
    /// Most open marks.
    pub max_marks: usize,
    /// Deepest nesting of containers/objects (tracked as values are built).
    pub max_depth: usize,
    /// Most values in the arena.
    pub max_values: usize,
    /// Most bytes the reader allocates for its own structures (strings, containers, values);
    /// byte payloads borrowed from the input are not counted.
    pub max_alloc_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_memo: 1 << 22,
            max_stack: 1 << 22,
            max_marks: 1 << 16,
            max_depth: 512,
            max_values: 1 << 24,
            max_alloc_bytes: 1 << 30,
        }
    }
}

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
    fn kind(&self) -> &'static str {
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

const NONE_ID: Id = 0;
const TRUE_ID: Id = 1;
const FALSE_ID: Id = 2;

/// A parsed pickle: the value arena and the root value, borrowing byte payloads from the input.
#[derive(Debug, Clone)]
pub struct Pickle<'a> {
    data: &'a [u8],
    values: Vec<Value>,
    root: Id,
}

fn opcode_name(op: u8) -> Option<&'static str> {
    Some(match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return None,
    })
}

/// The executing machine.
struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed.
    op_at: usize,
    limits: Limits,
    values: Vec<Value>,
    depth: Vec<u32>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
    alloc: usize,
}

const VALUE_COST: usize = std::mem::size_of::<Value>() + 4;
const ID_COST: usize = std::mem::size_of::<Id>();

impl<'a> Vm<'a> {
    fn malformed<T>(&self, msg: impl Into<String>) -> Result<T> {
        Err(Error::Malformed {
            offset: self.op_at,
            msg: msg.into(),
        })
    }

    fn limit<T>(&self, what: &'static str, limit: usize) -> Result<T> {
        Err(Error::Limit {
            offset: self.op_at,
            what,
            limit,
        })
    }

    fn charge(&mut self, bytes: usize) -> Result<()> {
        self.alloc = self.alloc.saturating_add(bytes);
        if self.alloc > self.limits.max_alloc_bytes {
            return self.limit("allocated bytes", self.limits.max_alloc_bytes);
        }
        Ok(())
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        let data: &'a [u8] = self.data;
        match data.get(self.pos..) {
            Some(rest) if rest.len() >= n => {
                let s = &rest[..n];
                self.pos += n;
                Ok(s)
            }
            _ => Err(Error::Truncated {
                offset: data.len(),
                what,
            }),
        }
    }

    fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    /// Reads a declared length and checks it against the bytes left.
    fn payload_len(&mut self, len: u64, what: &'static str) -> Result<usize> {
        let remaining = self.data.len().saturating_sub(self.pos);
        if len > remaining as u64 {
            return Err(Error::PayloadTooLong {
                offset: self.op_at,
                what,
                len,
                remaining,
            });
        }
        Ok(len as usize)
    }

    fn borrowed(&mut self, len: usize, what: &'static str) -> Result<ByteBuf> {
        let start = self.pos;
        self.take(len, what)?;
        Ok(ByteBuf::Borrowed { start, len })
    }

    fn utf8(&mut self, len: usize, what: &'static str) -> Result<String> {
        let s = self.take(len, what)?;
        self.charge(len)?;
        match std::str::from_utf8(s) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => self.malformed(format!("{what} is not valid UTF-8 ({e})")),
        }
    }

    fn line(&mut self, what: &'static str) -> Result<String> {
        let rest = self.data.get(self.pos..).unwrap_or(&[]);
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return Err(Error::Truncated {
                offset: self.data.len(),
                what,
            });
        };
        let s = self.utf8(n, what)?;
        self.pos += 1;
        Ok(s)
    }

    fn new_value(&mut self, v: Value, depth: u32) -> Result<Id> {
        if self.values.len() >= self.limits.max_values {
            return self.limit("number of values", self.limits.max_values);
        }
        if depth as usize > self.limits.max_depth {
            return self.limit("nesting depth", self.limits.max_depth);
        }
        self.charge(VALUE_COST)?;
        self.values.push(v);
        self.depth.push(depth);
        Ok(self.values.len() - 1)
    }

    fn push(&mut self, id: Id) -> Result<()> {
        if self.stack.len() >= self.limits.max_stack {
            return self.limit("stack size", self.limits.max_stack);
        }
        self.charge(ID_COST)?;
        self.stack.push(id);
        Ok(())
    }

    fn push_new(&mut self, v: Value) -> Result<()> {
        let id = self.new_value(v, 0)?;
        self.push(id)
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<Id> {
        if self.stack.len() <= self.floor() {
            return self.malformed("stack underflow");
        }
        match self.stack.pop() {
            Some(id) => Ok(id),
            None => self.malformed("stack underflow"),
        }
    }

    fn top(&self) -> Result<Id> {
        if self.stack.len() <= self.floor() {
            return self.malformed("stack underflow");
        }
        match self.stack.last() {
            Some(&id) => Ok(id),
            None => self.malformed("stack underflow"),
        }
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>> {
        let Some(m) = self.marks.pop() else {
            return self.malformed("no MARK on the stack");
        };
        if m > self.stack.len() {
            return self.malformed("MARK above the stack");
        }
        Ok(self.stack.split_off(m))
    }

    fn max_depth(&self, ids: &[Id]) -> u32 {
        ids.iter()
            .map(|&i| self.depth.get(i).copied().unwrap_or(0))
            .max()
            .unwrap_or(0)
    }

    fn container(&mut self, items: Vec<Id>, make: fn(Vec<Id>) -> Value) -> Result<Id> {
        self.charge(items.len() * ID_COST)?;
        let d = self.max_depth(&items) + 1;
        self.new_value(make(items), d)
    }

    /// Records that `child` now sits inside `parent` (nesting bookkeeping).
    fn nest(&mut self, parent: Id, children: &[Id]) -> Result<()> {
        let d = self.max_depth(children).saturating_add(1);
        if d as usize > self.limits.max_depth {
            return self.limit("nesting depth", self.limits.max_depth);
        }
        if let Some(p) = self.depth.get_mut(parent) {
            *p = (*p).max(d);
        }
        Ok(())
    }

    fn memo_put(&mut self, key: u64) -> Result<()> {
        let top = self.top()?;
        if self.memo.len() >= self.limits.max_memo && !self.memo.contains_key(&key) {
            return self.limit("memo size", self.limits.max_memo);
        }
        self.charge(3 * ID_COST)?;
        self.memo.insert(key, top);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<()> {
        match self.memo.get(&key) {
            Some(&id) => self.push(id),
            None => self.malformed(format!("memo key {key} is not defined")),
        }
    }

    fn str_of(&self, id: Id) -> Option<&str> {
        match self.values.get(id) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    fn tuple_of(&self, id: Id) -> Option<&[Id]> {
        match self.values.get(id) {
            Some(Value::Tuple(t)) => Some(t),
            _ => None,
        }
    }

    fn kind_of(&self, id: Id) -> &'static str {
        self.values.get(id).map(|v| v.kind()).unwrap_or("?")
    }

    fn dtype_of(&self, id: Id, what: &str) -> Result<Dtype> {
        match self.values.get(id) {
            Some(Value::Dtype(d)) => Ok(d.clone()),
            Some(Value::Str(s)) => Ok(Dtype::parse(s)),
            _ => self.malformed(format!(
                "{what}: expected a dtype, got {}",
                self.kind_of(id)
            )),
        }
    }

    fn shape_of(&self, id: Id, what: &str) -> Result<Vec<usize>> {
        let items: &[Id] = match self.values.get(id) {
            Some(Value::Tuple(t)) | Some(Value::List(t)) => t,
            // A bare int is a 1-d shape.
            Some(Value::Int(n)) => {
                return match usize::try_from(*n) {
                    Ok(n) => Ok(vec![n]),
                    Err(_) => self.malformed(format!("{what}: negative dimension {n}")),
                }
            }
            _ => {
                return self.malformed(format!(
                    "{what}: expected a shape tuple, got {}",
                    self.kind_of(id)
                ))
            }
        };
        let mut shape = Vec::with_capacity(items.len().min(64));
        for &d in items {
            match self.values.get(d) {
                Some(Value::Int(n)) => match usize::try_from(*n) {
                    Ok(n) => shape.push(n),
                    Err(_) => return self.malformed(format!("{what}: negative dimension {n}")),
                },
                _ => {
                    return self.malformed(format!(
                        "{what}: dimension is a {}, not an int",
                        self.kind_of(d)
                    ))
                }
            }
        }
        Ok(shape)
    }

    fn bytes_buf(&mut self, id: Id, what: &str) -> Result<ByteBuf> {
        match self.values.get(id) {
            Some(Value::Bytes(b)) => Ok(b.clone()),
            Some(Value::Str(s)) => {
                // Python 2 / latin-1 strings used as raw data.
                let mut out = Vec::with_capacity(s.len());
                for c in s.chars() {
                    match u8::try_from(u32::from(c)) {
                        Ok(b) => out.push(b),
                        Err(_) => {
                            return self.malformed(format!(
                                "{what}: str data has a character above U+00FF"
                            ))
                        }
                    }
                }
                let n = out.len();
                self.charge(n)?;
                Ok(ByteBuf::Owned(out))
            }
            _ => self.malformed(format!("{what}: expected bytes, got {}", self.kind_of(id))),
        }
    }

    fn make_array(
        &mut self,
        dtype: Dtype,
        shape: Vec<usize>,
        fortran: bool,
        data: ByteBuf,
        what: &str,
    ) -> Result<Value> {
        if let DtypeKind::Other(d) = &dtype.kind {
            return self.malformed(format!("{what}: unsupported array dtype {d:?}"));
        }
        let numel = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.itemsize));
        match numel {
            Some(n) if n == data.len() => {}
            _ => {
                return self.malformed(format!(
                "{what}: array of shape {shape:?} and dtype {} does not match its {} data bytes",
                dtype.descr(),
                data.len()
            ))
            }
        }
        self.charge(shape.len() * ID_COST)?;
        Ok(Value::Array(Array {
            dtype,
            shape,
            fortran,
            data,
        }))
    }

    fn global_name(&self, id: Id) -> Option<(&str, &str)> {
        match self.values.get(id) {
            Some(Value::Global { module, name }) => Some((module.as_str(), name.as_str())),
            _ => None,
        }
    }

    /// `callable(*args)`: a recognised numpy/flax/jax/codecs function, else a placeholder.
    fn call(&mut self, callable: Id, args: Id, nested: bool) -> Result<Id> {
        let recognised = self.global_name(callable).map(|(m, n)| {
            let top = m.split('.').next().unwrap_or("");
            (top.to_string(), m.to_string(), n.to_string())
        });
        let argv: Vec<Id> = self.tuple_of(args).map(|t| t.to_vec()).unwrap_or_default();
        if let Some((top, module, name)) = recognised {
            match (top.as_str(), name.as_str()) {
                ("numpy", "_frombuffer") => {
                    if argv.len() != 4 {
                        return self.malformed(format!(
                            "{module}._frombuffer takes 4 arguments, got {}",
                            argv.len()
                        ));
                    }
                    let data = self.bytes_buf(argv[0], "_frombuffer buffer")?;
                    let dtype = self.dtype_of(argv[1], "_frombuffer dtype")?;
                    let shape = self.shape_of(argv[2], "_frombuffer shape")?;
                    let fortran = match self.str_of(argv[3]) {
                        Some("C") => false,
                        Some("F") => true,
                        _ => return self.malformed("_frombuffer order must be \"C\" or \"F\""),
                    };
                    let v = self.make_array(dtype, shape, fortran, data, "_frombuffer")?;
                    return self.new_value(v, 1);
                }
                ("numpy", "_reconstruct") => return self.new_value(Value::PendingArray, 1),
                ("numpy", "scalar") => {
                    if argv.len() != 2 {
                        return self.malformed(format!(
                            "{module}.scalar takes 2 arguments here, got {}",
                            argv.len()
                        ));
                    }
                    let dtype = self.dtype_of(argv[0], "scalar dtype")?;
                    let data = self.bytes_buf(argv[1], "scalar data")?;
                    let v = self.make_array(dtype, Vec::new(), false, data, "scalar")?;
                    return self.new_value(v, 1);
                }
                ("numpy", "dtype") => {
                    let Some(descr) = argv.first().and_then(|&a| self.str_of(a)) else {
                        return self.malformed("numpy.dtype needs a type string");
                    };
                    let d = Dtype::parse(descr);
                    return self.new_value(Value::Dtype(d), 1);
                }
                ("flax", "FrozenDict") if argv.len() == 1 => {
                    if matches!(self.values.get(argv[0]), Some(Value::Dict(_))) {
                        let d = self.max_depth(&argv) + 1;
                        return self.new_value(Value::FrozenDict(argv[0]), d);
                    }
                }
                ("jax" | "jaxlib", "_reconstruct_array" | "reconstruct_device_array") => {
                    if nested || argv.len() < 3 {
                        return self.malformed(format!(
                            "{module}.{name}: expected (fun, args, state, ...)"
                        ));
                    }
                    let inner = self.call(argv[0], argv[1], true)?;
                    self.build(inner, argv[2])?;
                    return Ok(inner);
                }
                ("_codecs", "encode") if argv.len() == 2 => {
                    let enc = self.str_of(argv[1]).unwrap_or("").to_ascii_lowercase();
                    if enc == "latin1" || enc == "latin-1" {
                        let b = self.bytes_buf(argv[0], "_codecs.encode")?;
                        return self.new_value(Value::Bytes(b), 0);
                    }
                }
                _ => {}
            }
        }
        let d = self.max_depth(&[callable, args]) + 1;
        self.new_value(
            Value::Object(Object {
                callable,
                args,
                kwargs: None,
                new_obj: false,
                state: None,
                items: Vec::new(),
                list_items: Vec::new(),
            }),
            d,
        )
    }

    /// `BUILD`: sets the state of `obj`.
    fn build(&mut self, obj: Id, state: Id) -> Result<()> {
        match self.values.get(obj) {
            Some(Value::Dtype(_)) => {
                let order = self
                    .tuple_of(state)
                    .and_then(|t| t.get(1).copied())
                    .and_then(|o| self.str_of(o).map(|s| s.to_string()));
                if let (Some(o), Some(Value::Dtype(d))) = (order, self.values.get_mut(obj)) {
                    d.big_endian = o == ">";
                }
                Ok(())
            }
            Some(Value::PendingArray) => {
                let Some(t) = self.tuple_of(state).map(|t| t.to_vec()) else {
                    return self.malformed("ndarray state must be a tuple");
                };
                let t = match t.len() {
                    5 => &t[1..],
                    4 => &t[..],
                    n => return self.malformed(format!("ndarray state has {n} fields")),
                };
                let shape = self.shape_of(t[0], "ndarray shape")?;
                let dtype = self.dtype_of(t[1], "ndarray dtype")?;
                let fortran = match self.values.get(t[2]) {
                    Some(Value::Bool(b)) => *b,
                    Some(Value::Int(i)) => *i != 0,
                    _ => return self.malformed("ndarray is_fortran must be a bool"),
                };
                let data = self.bytes_buf(t[3], "ndarray data")?;
                let v = self.make_array(dtype, shape, fortran, data, "ndarray")?;
                self.values[obj] = v;
                Ok(())
            }
            Some(Value::Object(_)) => {
                self.nest(obj, &[state])?;
                if let Some(Value::Object(o)) = self.values.get_mut(obj) {
                    o.state = Some(state);
                }
                Ok(())
            }
            // Setting attributes on anything else has no effect on the data we read.
            Some(_) => Ok(()),
            None => self.malformed("BUILD on an unknown value"),
        }
    }

    fn set_items(&mut self, target: Id, flat: Vec<Id>) -> Result<()> {
        if !flat.len().is_multiple_of(2) {
            return self.malformed("SETITEMS with an odd number of values");
        }
        self.charge(flat.len() * ID_COST)?;
        self.nest(target, &flat)?;
        let pairs = flat.chunks_exact(2).map(|c| (c[0], c[1]));
        match self.values.get_mut(target) {
            Some(Value::Dict(d)) => d.extend(pairs),
            Some(Value::Object(o)) => o.items.extend(pairs),
            _ => {
                let k = self.kind_of(target);
                return self.malformed(format!("SETITEM(S) on a {k}"));
            }
        }
        Ok(())
    }

    fn append_items(&mut self, target: Id, items: Vec<Id>, set: bool) -> Result<()> {
        self.charge(items.len() * ID_COST)?;
        self.nest(target, &items)?;
        match self.values.get_mut(target) {
            Some(Value::List(l)) if !set => l.extend(items),
            Some(Value::Set(l)) if set => l.extend(items),
            Some(Value::Object(o)) => o.list_items.extend(items),
            _ => {
                let k = self.kind_of(target);
                let op = if set { "ADDITEMS" } else { "APPEND(S)" };
                return self.malformed(format!("{op} on a {k}"));
            }
        }
        Ok(())
    }

    fn run(mut self) -> Result<Pickle<'a>> {
        for v in [Value::None, Value::Bool(true), Value::Bool(false)] {
            self.new_value(v, 0)?;
        }
        loop {
            self.op_at = self.pos;
            let op = self.u8("an opcode (no STOP)")?;
            match op {
                0x80 => {
                    let p = self.u8("the protocol number")?;
                    if p > 5 {
                        return self.malformed(format!("unsupported protocol {p}"));
                    }
                }
                0x95 => {
                    let n = u64::from_le_bytes(self.array("the frame length")?);
                    self.payload_len(n, "frame")?;
                }
                b'.' => {
                    let root = self.pop()?;
                    return Ok(Pickle {
                        data: self.data,
                        values: self.values,
                        root,
                    });
                }
                b'(' => {
                    if self.marks.len() >= self.limits.max_marks {
                        return self.limit("open marks", self.limits.max_marks);
                    }
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    if self.stack.len() > self.floor() {
                        self.pop()?;
                    } else {
                        self.pop_mark()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let t = self.top()?;
                    self.push(t)?;
                }
                b'N' => self.push(NONE_ID)?,
                0x88 => self.push(TRUE_ID)?,
                0x89 => self.push(FALSE_ID)?,
                b'J' => {
                    let v = i32::from_le_bytes(self.array("a 4-byte int")?);
                    self.push_new(Value::Int(v.into()))?;
                }
                b'K' => {
                    let v = self.u8("a 1-byte int")?;
                    self.push_new(Value::Int(v.into()))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array("a 2-byte int")?);
                    self.push_new(Value::Int(v.into()))?;
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        u64::from(self.u8("the LONG1 length")?)
                    } else {
                        u64::from(u32::from_le_bytes(self.array("the LONG4 length")?))
                    };
                    let n = self.payload_len(n, "long integer")?;
                    let v = if n <= 8 {
                        let b = self.take(n, "long integer bytes")?;
                        let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                            [0xffu8; 8]
                        } else {
                            [0u8; 8]
                        };
                        buf[..n].copy_from_slice(b);
                        Value::Int(i64::from_le_bytes(buf))
                    } else {
                        Value::BigInt(self.borrowed(n, "long integer bytes")?)
                    };
                    self.push_new(v)?;
                }
                b'I' => {
                    let line = self.line("an INT line")?;
                    let v = match line.as_str() {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        s => match s.parse::<i64>() {
                            Ok(i) => Value::Int(i),
                            Err(_) => return self.malformed(format!("bad INT {s:?}")),
                        },
                    };
                    self.push_new(v)?;
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.array("an 8-byte float")?);
                    self.push_new(Value::Float(v))?;
                }
                b'F' => {
                    let line = self.line("a FLOAT line")?;
                    match line.parse::<f64>() {
                        Ok(f) => self.push_new(Value::Float(f))?,
                        Err(_) => return self.malformed(format!("bad FLOAT {line:?}")),
                    }
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        0x8c => u64::from(self.u8("the string length")?),
                        b'X' => u64::from(u32::from_le_bytes(self.array("the string length")?)),
                        _ => u64::from_le_bytes(self.array("the string length")?),
                    };
                    let n = self.payload_len(n, "string")?;
                    let s = self.utf8(n, "string")?;
                    self.push_new(Value::Str(s))?;
                }
                b'C' | b'B' | 0x8e | 0x96 | b'U' | b'T' => {
                    let n = match op {
                        b'C' | b'U' => u64::from(self.u8("the bytes length")?),
                        b'B' | b'T' => {
                            u64::from(u32::from_le_bytes(self.array("the bytes length")?))
                        }
                        _ => u64::from_le_bytes(self.array("the bytes length")?),
                    };
                    let n = self.payload_len(n, "bytes payload")?;
                    let b = self.borrowed(n, "bytes payload")?;
                    self.push_new(Value::Bytes(b))?;
                }
                0x98 => {
                    self.top()?;
                }
                b')' => {
                    let id = self.container(Vec::new(), Value::Tuple)?;
                    self.push(id)?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < self.floor() + n {
                        return self.malformed("stack underflow");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    let id = self.container(items, Value::Tuple)?;
                    self.push(id)?;
                }
                b't' | b'l' | 0x91 => {
                    let items = self.pop_mark()?;
                    let make: fn(Vec<Id>) -> Value = match op {
                        b't' => Value::Tuple,
                        b'l' => Value::List,
                        _ => Value::Set,
                    };
                    let id = self.container(items, make)?;
                    self.push(id)?;
                }
                b']' => {
                    let id = self.container(Vec::new(), Value::List)?;
                    self.push(id)?;
                }
                0x8f => {
                    let id = self.container(Vec::new(), Value::Set)?;
                    self.push(id)?;
                }
                b'}' => {
                    let id = self.new_value(Value::Dict(Vec::new()), 1)?;
                    self.push(id)?;
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let id = self.new_value(Value::Dict(Vec::new()), 1)?;
                    self.set_items(id, items)?;
                    self.push(id)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    let target = self.top()?;
                    self.append_items(target, vec![v], false)?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    self.append_items(target, items, op == 0x90)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let target = self.top()?;
                    self.set_items(target, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    self.set_items(target, items)?;
                }
                0x94 => {
                    let key = self.memo.len() as u64;
                    self.memo_put(key)?;
                }
                b'q' => {
                    let k = self.u8("the memo key")?;
                    self.memo_put(k.into())?;
                }
                b'r' => {
                    let k = u32::from_le_bytes(self.array("the memo key")?);
                    self.memo_put(k.into())?;
                }
                b'h' => {
                    let k = self.u8("the memo key")?;
                    self.memo_get(k.into())?;
                }
                b'j' => {
                    let k = u32::from_le_bytes(self.array("the memo key")?);
                    self.memo_get(k.into())?;
                }
                b'p' | b'g' => {
                    let line = self.line("a memo key line")?;
                    let Ok(k) = line.parse::<u64>() else {
                        return self.malformed(format!("bad memo key {line:?}"));
                    };
                    if op == b'p' {
                        self.memo_put(k)?;
                    } else {
                        self.memo_get(k)?;
                    }
                }
                b'c' => {
                    let module = self.line("the GLOBAL module")?;
                    let name = self.line("the GLOBAL name")?;
                    self.push_new(Value::Global { module, name })?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (self.str_of(module), self.str_of(name)) {
                        (Some(m), Some(n)) => {
                            let v = Value::Global {
                                module: m.to_string(),
                                name: n.to_string(),
                            };
                            self.charge(m.len() + n.len())?;
                            self.push_new(v)?;
                        }
                        _ => return self.malformed("STACK_GLOBAL needs two strings"),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    if self.tuple_of(args).is_none() {
                        return self.malformed(format!(
                            "REDUCE arguments must be a tuple, got {}",
                            self.kind_of(args)
                        ));
                    }
                    let id = self.call(callable, args, false)?;
                    self.push(id)?;
                }
                0x81 | 0x92 => {
                    let kwargs = if op == 0x92 { Some(self.pop()?) } else { None };
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    if self.tuple_of(args).is_none() {
                        return self.malformed(format!(
                            "NEWOBJ arguments must be a tuple, got {}",
                            self.kind_of(args)
                        ));
                    }
                    let d = self.max_depth(&[cls, args]) + 1;
                    let id = self.new_value(
                        Value::Object(Object {
                            callable: cls,
                            args,
                            kwargs,
                            new_obj: true,
                            state: None,
                            items: Vec::new(),
                            list_items: Vec::new(),
                        }),
                        d,
                    )?;
                    self.push(id)?;
                }
                b'b' => {
                    let state = self.pop()?;
                    let obj = self.top()?;
                    self.build(obj, state)?;
                }
                other => {
                    return Err(match opcode_name(other) {
                        Some(name) => Error::UnsupportedOpcode {
                            name,
                            offset: self.op_at,
                        },
                        None => Error::UnknownOpcode {
                            opcode: other,
                            offset: self.op_at,
                        },
                    })
                }
            }
        }
    }
}

impl<'a> Pickle<'a> {
    /// Parses `data` with the default [`Limits`].
    pub fn parse(data: &'a [u8]) -> Result<Self> {
        Self::parse_with(data, Limits::default())
    }

    /// Parses `data` under `limits`.
    pub fn parse_with(data: &'a [u8], limits: Limits) -> Result<Self> {
        Vm {
            data,
            pos: 0,
            op_at: 0,
            limits,
            values: Vec::new(),
            depth: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            alloc: 0,
        }
        .run()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn frombuffer_pickle(module: &str, order: &str, shape: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, 5];
        for s in [module, "_frombuffer"] {
            p.push(0x8c);
            p.push(s.len() as u8);
            p.extend_from_slice(s.as_bytes());
        }
        p.push(0x93);
        p.push(b'(');
        p.extend_from_slice(&[b'C', 8]);
        p.extend_from_slice(&1.5f32.to_le_bytes());
        p.extend_from_slice(&(-2.0f32).to_le_bytes());
        // dtype("f4", False, True) + BUILD((3, "<", ...))
        for s in ["numpy", "dtype"] {
            p.push(0x8c);
            p.push(s.len() as u8);
            p.extend_from_slice(s.as_bytes());
        }
        p.push(0x93);
        p.extend_from_slice(b"\x8c\x02f4\x89\x88\x87R");
        p.extend_from_slice(b"(K\x03\x8c\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb");
        p.push(b'(');
        p.extend_from_slice(shape);
        p.push(b't');
        p.push(0x8c);
        p.push(order.len() as u8);
        p.extend_from_slice(order.as_bytes());
        p.extend_from_slice(b"tR.");
        p
    }

    #[test]
    fn frombuffer_arrays_by_name_under_both_numpy_paths() {
        for module in ["numpy.core.numeric", "numpy._core.numeric"] {
            let data = frombuffer_pickle(module, "C", b"K\x02");
            let p = Pickle::parse(&data).unwrap();
            let Value::Array(a) = p.get(p.root()) else {
                panic!("{:?}", p.get(p.root()))
            };
            assert_eq!(a.shape, vec![2]);
            assert_eq!(a.dtype.descr(), "<f4");
            let d = p.array_data(a);
            assert_eq!(&d[..4], &1.5f32.to_le_bytes());
        }
        // Shape that does not match the buffer.
        let data = frombuffer_pickle("numpy.core.numeric", "C", b"K\x03");
        let e = Pickle::parse(&data).unwrap_err().to_string();
        assert!(e.contains("does not match its 8 data bytes"), "{e}");
        // Negative dimension.
        let data = frombuffer_pickle("numpy.core.numeric", "C", b"J\xff\xff\xff\xff");
        assert!(Pickle::parse(&data).is_err());
    }

    #[test]
    fn unknown_globals_are_inert_placeholders() {
        // os.system("rm") is recorded, never run.
        let data = b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93\x8c\x02rm\x85R}\x8c\x01k\x8c\x01vsb.";
        // Frame length 0 is only a hint; the reader checks it against the remaining bytes.
        let p = Pickle::parse(data).unwrap();
        let o = p.object(p.root()).unwrap();
        assert_eq!(p.class_of(p.root()), Some(("os", "system")));
        assert!(o.state.is_some());
    }

    #[test]
    fn limits_and_bad_lengths_report_offsets() {
        // BINBYTES8 declaring 2^60 bytes.
        let mut data = vec![0x80, 5, 0x8e];
        data.extend_from_slice(&(1u64 << 60).to_le_bytes());
        data.push(b'.');
        let e = Pickle::parse(&data).unwrap_err();
        assert!(matches!(e, Error::PayloadTooLong { offset: 2, .. }), "{e}");
        // Too many marks.
        let data = vec![b'('; 100];
        let lim = Limits {
            max_marks: 10,
            ..Limits::default()
        };
        let e = Pickle::parse_with(&data, lim).unwrap_err();
        assert!(matches!(e, Error::Limit { offset: 10, .. }), "{e}");
        // Memo miss, stack underflow, unknown opcode, unsupported opcode.
        assert!(Pickle::parse(b"h\x05.")
            .unwrap_err()
            .to_string()
            .contains("memo key 5"));
        assert!(Pickle::parse(b"(R.")
            .unwrap_err()
            .to_string()
            .contains("underflow"));
        assert!(matches!(
            Pickle::parse(b"\xff").unwrap_err(),
            Error::UnknownOpcode {
                opcode: 0xff,
                offset: 0
            }
        ));
        assert!(matches!(
            Pickle::parse(b"NQ.").unwrap_err(),
            Error::UnsupportedOpcode {
                name: "BINPERSID",
                offset: 1
            }
        ));
    }

    #[test]
    fn deep_nesting_is_refused_without_recursion() {
        let n = 100_000;
        let mut data = vec![0x80, 5];
        data.resize(data.len() + n, b']');
        data.resize(data.len() + n - 1, b'a');
        data.push(b'.');
        let e = Pickle::parse(&data).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Limit {
                    what: "nesting depth",
                    ..
                }
            ),
            "{e}"
        );
        // With a huge limit it parses, and dropping the graph does not recurse.
        let lim = Limits {
            max_depth: usize::MAX,
            ..Limits::default()
        };
        let p = Pickle::parse_with(&data, lim).unwrap();
        assert!(matches!(p.get(p.root()), Value::List(_)));
        drop(p);
    }
}
