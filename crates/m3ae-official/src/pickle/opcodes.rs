//! The opcode dispatch of the pickle machine: one arm per opcode of protocols 2 to 5 that the
//! reader executes, and the names of the opcodes it refuses (for the error message).

use super::value::{Object, Pickle, Value, FALSE_ID, NONE_ID, TRUE_ID};
use super::vm::Vm;
use super::{Error, Id, Result};

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

impl<'a> Vm<'a> {
    /// Executes the stream up to `STOP` and returns the parsed graph.
    pub(super) fn run(mut self) -> Result<Pickle<'a>> {
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
