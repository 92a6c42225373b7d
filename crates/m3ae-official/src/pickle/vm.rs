//! The pickle machine's state: the input cursor, the value arena with its nesting depths, the
//! stack, marks and memo, and the allocation account every [`Limits`] check is made against; and
//! the semantics of calling a global (the numpy, flax, jax and codecs functions understood by
//! name, placeholders for everything else), `BUILD`, `SETITEM(S)` and `APPEND(S)`.

use super::value::{Array, ByteBuf, Dtype, DtypeKind, Object, Value};
use super::{Error, Id, Limits, Result};
use std::collections::HashMap;

/// The executing machine.
pub(super) struct Vm<'a> {
    pub(super) data: &'a [u8],
    pub(super) pos: usize,
    /// Offset of the opcode being executed.
    pub(super) op_at: usize,
    pub(super) limits: Limits,
    pub(super) values: Vec<Value>,
    pub(super) depth: Vec<u32>,
    pub(super) stack: Vec<Id>,
    pub(super) marks: Vec<usize>,
    pub(super) memo: HashMap<u64, Id>,
    pub(super) alloc: usize,
}

const VALUE_COST: usize = std::mem::size_of::<Value>() + 4;
const ID_COST: usize = std::mem::size_of::<Id>();

impl<'a> Vm<'a> {
    /// A machine at the start of `data`.
    pub(super) fn new(data: &'a [u8], limits: Limits) -> Self {
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
    }

    pub(super) fn malformed<T>(&self, msg: impl Into<String>) -> Result<T> {
        Err(Error::Malformed {
            offset: self.op_at,
            msg: msg.into(),
        })
    }

    pub(super) fn limit<T>(&self, what: &'static str, limit: usize) -> Result<T> {
        Err(Error::Limit {
            offset: self.op_at,
            what,
            limit,
        })
    }

    pub(super) fn charge(&mut self, bytes: usize) -> Result<()> {
        self.alloc = self.alloc.saturating_add(bytes);
        if self.alloc > self.limits.max_alloc_bytes {
            return self.limit("allocated bytes", self.limits.max_alloc_bytes);
        }
        Ok(())
    }

    pub(super) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
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

    pub(super) fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }

    pub(super) fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    /// Reads a declared length and checks it against the bytes left.
    pub(super) fn payload_len(&mut self, len: u64, what: &'static str) -> Result<usize> {
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

    pub(super) fn borrowed(&mut self, len: usize, what: &'static str) -> Result<ByteBuf> {
        let start = self.pos;
        self.take(len, what)?;
        Ok(ByteBuf::Borrowed { start, len })
    }

    pub(super) fn utf8(&mut self, len: usize, what: &'static str) -> Result<String> {
        let s = self.take(len, what)?;
        self.charge(len)?;
        match std::str::from_utf8(s) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => self.malformed(format!("{what} is not valid UTF-8 ({e})")),
        }
    }

    pub(super) fn line(&mut self, what: &'static str) -> Result<String> {
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

    pub(super) fn new_value(&mut self, v: Value, depth: u32) -> Result<Id> {
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

    pub(super) fn push(&mut self, id: Id) -> Result<()> {
        if self.stack.len() >= self.limits.max_stack {
            return self.limit("stack size", self.limits.max_stack);
        }
        self.charge(ID_COST)?;
        self.stack.push(id);
        Ok(())
    }

    pub(super) fn push_new(&mut self, v: Value) -> Result<()> {
        let id = self.new_value(v, 0)?;
        self.push(id)
    }

    pub(super) fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    pub(super) fn pop(&mut self) -> Result<Id> {
        if self.stack.len() <= self.floor() {
            return self.malformed("stack underflow");
        }
        match self.stack.pop() {
            Some(id) => Ok(id),
            None => self.malformed("stack underflow"),
        }
    }

    pub(super) fn top(&self) -> Result<Id> {
        if self.stack.len() <= self.floor() {
            return self.malformed("stack underflow");
        }
        match self.stack.last() {
            Some(&id) => Ok(id),
            None => self.malformed("stack underflow"),
        }
    }

    pub(super) fn pop_mark(&mut self) -> Result<Vec<Id>> {
        let Some(m) = self.marks.pop() else {
            return self.malformed("no MARK on the stack");
        };
        if m > self.stack.len() {
            return self.malformed("MARK above the stack");
        }
        Ok(self.stack.split_off(m))
    }

    pub(super) fn max_depth(&self, ids: &[Id]) -> u32 {
        ids.iter()
            .map(|&i| self.depth.get(i).copied().unwrap_or(0))
            .max()
            .unwrap_or(0)
    }

    pub(super) fn container(&mut self, items: Vec<Id>, make: fn(Vec<Id>) -> Value) -> Result<Id> {
        self.charge(items.len() * ID_COST)?;
        let d = self.max_depth(&items) + 1;
        self.new_value(make(items), d)
    }

    /// Records that `child` now sits inside `parent` (nesting bookkeeping).
    pub(super) fn nest(&mut self, parent: Id, children: &[Id]) -> Result<()> {
        let d = self.max_depth(children).saturating_add(1);
        if d as usize > self.limits.max_depth {
            return self.limit("nesting depth", self.limits.max_depth);
        }
        if let Some(p) = self.depth.get_mut(parent) {
            *p = (*p).max(d);
        }
        Ok(())
    }

    pub(super) fn memo_put(&mut self, key: u64) -> Result<()> {
        let top = self.top()?;
        if self.memo.len() >= self.limits.max_memo && !self.memo.contains_key(&key) {
            return self.limit("memo size", self.limits.max_memo);
        }
        self.charge(3 * ID_COST)?;
        self.memo.insert(key, top);
        Ok(())
    }

    pub(super) fn memo_get(&mut self, key: u64) -> Result<()> {
        match self.memo.get(&key) {
            Some(&id) => self.push(id),
            None => self.malformed(format!("memo key {key} is not defined")),
        }
    }

    pub(super) fn str_of(&self, id: Id) -> Option<&str> {
        match self.values.get(id) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    pub(super) fn tuple_of(&self, id: Id) -> Option<&[Id]> {
        match self.values.get(id) {
            Some(Value::Tuple(t)) => Some(t),
            _ => None,
        }
    }

    pub(super) fn kind_of(&self, id: Id) -> &'static str {
        self.values.get(id).map(|v| v.kind()).unwrap_or("?")
    }

    pub(super) fn dtype_of(&self, id: Id, what: &str) -> Result<Dtype> {
        match self.values.get(id) {
            Some(Value::Dtype(d)) => Ok(d.clone()),
            Some(Value::Str(s)) => Ok(Dtype::parse(s)),
            _ => self.malformed(format!(
                "{what}: expected a dtype, got {}",
                self.kind_of(id)
            )),
        }
    }

    pub(super) fn shape_of(&self, id: Id, what: &str) -> Result<Vec<usize>> {
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

    pub(super) fn bytes_buf(&mut self, id: Id, what: &str) -> Result<ByteBuf> {
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

    pub(super) fn make_array(
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

    pub(super) fn global_name(&self, id: Id) -> Option<(&str, &str)> {
        match self.values.get(id) {
            Some(Value::Global { module, name }) => Some((module.as_str(), name.as_str())),
            _ => None,
        }
    }

    /// `callable(*args)`: a recognised numpy/flax/jax/codecs function, else a placeholder.
    pub(super) fn call(&mut self, callable: Id, args: Id, nested: bool) -> Result<Id> {
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
    pub(super) fn build(&mut self, obj: Id, state: Id) -> Result<()> {
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

    pub(super) fn set_items(&mut self, target: Id, flat: Vec<Id>) -> Result<()> {
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

    pub(super) fn append_items(&mut self, target: Id, items: Vec<Id>, set: bool) -> Result<()> {
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
}
