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
//! use m3ae_official::pickle::{Pickle, Value};
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
//! # Ok::<(), m3ae_official::pickle::Error>(())
//! ```
//!
//! The reader is split into the value graph it produces and its accessors (`value`), the
//! machine's state and the semantics of calls and `BUILD` (`vm`), and the opcode dispatch
//! (`opcodes`).

mod opcodes;
mod value;
mod vm;

pub use value::{Array, ByteBuf, Dtype, DtypeKind, Object, Pickle, Value};

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
