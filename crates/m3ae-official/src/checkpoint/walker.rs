//! The walk over a parsed pickle's value graph that finds the train state: the attribute dicts
//! of the (placeholder) train-state objects, nested param dicts flattened to dotted official
//! names, numpy arrays turned into [`RawTensor`]s (byte order and Fortran layout normalised), and
//! the optax state recognised by the class names of its NamedTuples.

use super::{CheckpointKind, OfficialCheckpoint, OptState, RawDtype, RawTensor};
use crate::pickle::{Array, DtypeKind, Id, Pickle, Value};
use crate::{Error, Result};
use std::collections::BTreeMap;

/// Deepest dict nesting the walk follows (the pickle itself is bounded by its reader limits).
const MAX_WALK_DEPTH: usize = 64;

struct Walker<'p, 'a> {
    p: &'p Pickle<'a>,
    origin: &'p str,
}

impl Walker<'_, '_> {
    fn err<T>(&self, key: &str, msg: impl Into<String>) -> Result<T> {
        Err(Error::Structure {
            origin: self.origin.to_string(),
            key: key.to_string(),
            msg: msg.into(),
        })
    }

    /// The attribute dict of a train-state object (its `BUILD` state), or a dict itself.
    fn fields(&self, id: Id, key: &str) -> Result<Id> {
        if self.p.dict_items(id).is_some() {
            return Ok(id);
        }
        if let Some(o) = self.p.object(id) {
            if let Some(s) = o.state {
                if self.p.dict_items(s).is_some() {
                    return Ok(s);
                }
                // (dict, slots) state of objects with __slots__.
                if let Some(t) = self.p.tuple_items(s) {
                    for &x in t {
                        if self.p.dict_items(x).is_some() {
                            return Ok(x);
                        }
                    }
                }
            }
        }
        self.err(
            key,
            format!("expected an object with fields, got {}", self.p.kind(id)),
        )
    }

    fn field(&self, dict: Id, name: &str, key: &str) -> Result<Id> {
        match self.p.dict_get(dict, name) {
            Some(v) => Ok(v),
            None => self.err(&format!("{key}.{name}"), "missing"),
        }
    }

    /// A dict with the single key `level` is replaced by its value.
    fn strip(&self, id: Id, level: &str) -> Id {
        match self.p.dict_items(id) {
            Some([(k, v)]) if self.p.as_str(*k) == Some(level) => *v,
            _ => id,
        }
    }

    fn raw(&self, a: &Array, key: &str) -> Result<RawTensor> {
        let dtype = match (&a.dtype.kind, a.dtype.itemsize) {
            (DtypeKind::Float, 2) => RawDtype::F16,
            (DtypeKind::Float, 4) => RawDtype::F32,
            (DtypeKind::Float, 8) => RawDtype::F64,
            (DtypeKind::Int, 1) => RawDtype::I8,
            (DtypeKind::Int, 2) => RawDtype::I16,
            (DtypeKind::Int, 4) => RawDtype::I32,
            (DtypeKind::Int, 8) => RawDtype::I64,
            (DtypeKind::UInt, 1) => RawDtype::U8,
            (DtypeKind::UInt, 2) => RawDtype::U16,
            (DtypeKind::UInt, 4) => RawDtype::U32,
            (DtypeKind::UInt, 8) => RawDtype::U64,
            (DtypeKind::Bool, 1) => RawDtype::Bool,
            _ => return self.err(key, format!("unsupported dtype {}", a.dtype.descr())),
        };
        let src = self.p.array_data(a);
        let size = a.dtype.itemsize;
        let mut data = src.to_vec();
        if a.dtype.big_endian && size > 1 {
            for el in data.chunks_exact_mut(size) {
                el.reverse();
            }
        }
        if a.fortran && a.shape.len() > 1 {
            data = fortran_to_c(&data, &a.shape, size);
        }
        Ok(RawTensor {
            dtype,
            shape: a.shape.clone(),
            data,
        })
    }

    fn tensor(&self, id: Id, key: &str) -> Result<RawTensor> {
        match self.p.get(id) {
            Value::Array(a) => self.raw(a, key),
            Value::Int(i) => Ok(match i32::try_from(*i) {
                Ok(v) => RawTensor {
                    dtype: RawDtype::I32,
                    shape: Vec::new(),
                    data: v.to_le_bytes().to_vec(),
                },
                Err(_) => RawTensor {
                    dtype: RawDtype::I64,
                    shape: Vec::new(),
                    data: i.to_le_bytes().to_vec(),
                },
            }),
            Value::Float(f) => Ok(RawTensor {
                dtype: RawDtype::F32,
                shape: Vec::new(),
                data: (*f as f32).to_le_bytes().to_vec(),
            }),
            _ => self.err(key, format!("expected an array, got {}", self.p.kind(id))),
        }
    }

    /// Flattens a nested dict of arrays to `prefix.a.b` names.
    fn flatten(
        &self,
        id: Id,
        prefix: &str,
        depth: usize,
        out: &mut BTreeMap<String, RawTensor>,
    ) -> Result<()> {
        if depth > MAX_WALK_DEPTH {
            return self.err(
                prefix,
                format!("nested deeper than {MAX_WALK_DEPTH} levels"),
            );
        }
        if let Some(items) = self.p.dict_items(id) {
            for &(k, v) in items {
                let Some(k) = self.p.as_str(k) else {
                    return self.err(prefix, format!("dict key is a {}", self.p.kind(k)));
                };
                let name = if prefix.is_empty() {
                    k.to_string()
                } else {
                    format!("{prefix}.{k}")
                };
                self.flatten(v, &name, depth + 1, out)?;
            }
            return Ok(());
        }
        let t = self.tensor(id, prefix)?;
        out.insert(prefix.to_string(), t);
        Ok(())
    }

    fn flat(&self, id: Id, key: &str) -> Result<BTreeMap<String, RawTensor>> {
        let mut out = BTreeMap::new();
        if self.p.dict_items(id).is_none() {
            return self.err(key, format!("expected a dict, got {}", self.p.kind(id)));
        }
        // Names are relative to `id`; messages use `key` as prefix.
        let mut rel = BTreeMap::new();
        self.flatten(id, "", 0, &mut rel).map_err(|e| match e {
            Error::Structure {
                origin,
                key: k,
                msg,
            } => Error::Structure {
                origin,
                key: format!("{key}.{k}"),
                msg,
            },
            e => e,
        })?;
        out.append(&mut rel);
        Ok(out)
    }

    fn positional(&self, id: Id) -> Vec<Id> {
        self.p
            .object(id)
            .and_then(|o| self.p.tuple_items(o.args))
            .map(|t| t.to_vec())
            .unwrap_or_default()
    }

    fn opt_walk(&self, id: Id, key: &str, depth: usize, opt: &mut OptState) -> Result<()> {
        if depth > MAX_WALK_DEPTH {
            return self.err(key, "optimizer state nested too deeply");
        }
        if let Some(items) = self.p.tuple_items(id) {
            for (i, &x) in items.iter().enumerate() {
                self.opt_walk(x, &format!("{key}[{i}]"), depth + 1, opt)?;
            }
            return Ok(());
        }
        let Some((_, name)) = self.p.class_of(id) else {
            return Ok(());
        };
        let short = name.rsplit('.').next().unwrap_or(name);
        let f = self.positional(id);
        let arg = |i: usize, field: &str| -> Result<Id> {
            match f.get(i) {
                Some(&x) => Ok(x),
                None => self.err(
                    &format!("{key}.{field}"),
                    format!("{short} has no field {i}"),
                ),
            }
        };
        let k = format!("{key}<{short}>");
        match short {
            "ScaleByAdamState" => {
                if opt.count.is_some() {
                    return self.err(&k, "more than one ScaleByAdamState");
                }
                opt.count = Some(self.tensor(arg(0, "count")?, &format!("{k}.count"))?);
                let mu = self.strip(arg(1, "mu")?, "params");
                opt.mu = self.flat(mu, &format!("{k}.mu"))?;
                let nu = self.strip(arg(2, "nu")?, "params");
                opt.nu = self.flat(nu, &format!("{k}.nu"))?;
            }
            "ScaleByScheduleState" => {
                opt.schedule_count = Some(self.tensor(arg(0, "count")?, &format!("{k}.count"))?);
            }
            "TraceState" => {
                let t = self.strip(arg(0, "trace")?, "params");
                opt.trace = self.flat(t, &format!("{k}.trace"))?;
            }
            _ if short.ends_with("State") => {
                for (i, &x) in f.iter().enumerate() {
                    self.opt_walk(x, &format!("{k}[{i}]"), depth + 1, opt)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn flag_value(&self, id: Id) -> serde_json::Value {
        use serde_json::Value as J;
        match self.p.get(id) {
            Value::None => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::Str(s) => J::String(s.clone()),
            other => J::String(format!("<{}>", other_kind(other))),
        }
    }
}

fn other_kind(v: &Value) -> &'static str {
    match v {
        Value::Tuple(_) => "tuple",
        Value::List(_) => "list",
        Value::Dict(_) | Value::FrozenDict(_) => "dict",
        Value::Array(_) => "ndarray",
        _ => "object",
    }
}

/// Reorders Fortran-order elements to C order.
fn fortran_to_c(data: &[u8], shape: &[usize], size: usize) -> Vec<u8> {
    let n: usize = shape.iter().product();
    let mut out = vec![0u8; data.len()];
    // Fortran strides (elements): first axis fastest.
    let mut fstride = vec![1usize; shape.len()];
    for k in 1..shape.len() {
        fstride[k] = fstride[k - 1] * shape[k - 1];
    }
    let mut idx = vec![0usize; shape.len()];
    for c in 0..n {
        let f: usize = idx.iter().zip(&fstride).map(|(i, s)| i * s).sum();
        out[c * size..(c + 1) * size].copy_from_slice(&data[f * size..(f + 1) * size]);
        for k in (0..shape.len()).rev() {
            idx[k] += 1;
            if idx[k] < shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    out
}

impl OfficialCheckpoint {
    /// Walks a parsed pickle.
    pub fn from_pickle(p: &Pickle<'_>, origin: &str) -> Result<Self> {
        let w = Walker { p, origin };
        let root = p.root();
        if p.dict_items(root).is_none() {
            return w.err("<root>", format!("expected a dict, got {}", p.kind(root)));
        }
        let int_field = |name: &str| -> Result<Option<i64>> {
            match p.dict_get(root, name) {
                None => Ok(None),
                Some(id) => match p.as_int(id) {
                    Some(i) => Ok(Some(i)),
                    None => match p.get(id) {
                        Value::Array(_) => Ok(w.tensor(id, name)?.to_i64()),
                        _ => w.err(name, format!("expected an int, got {}", p.kind(id))),
                    },
                },
            }
        };
        let checkpoint_step = int_field("step")?;
        let checkpoint_epoch = int_field("epoch")?;
        let mut flags = serde_json::Map::new();
        if let Some(v) = p.dict_get(root, "variant") {
            let Some(items) = p.dict_items(v) else {
                return w.err("variant", format!("expected a dict, got {}", p.kind(v)));
            };
            for &(k, x) in items {
                if let Some(k) = p.as_str(k) {
                    flags.insert(k.to_string(), w.flag_value(x));
                }
            }
        }
        let best_val_acc = match p.dict_get(root, "best_val_acc") {
            Some(id) => Some(w.tensor(id, "best_val_acc")?),
            None => None,
        };
        let state = w.field(root, "state", "<root>")?;
        let fields = w.fields(state, "state")?;
        let params_id = w.field(fields, "params", "state")?;
        let state_step = match p.dict_get(fields, "step") {
            Some(id) => Some(w.tensor(id, "state.step")?),
            None => None,
        };
        let (kind, params, backbone, batch_stats) = match p.dict_get(fields, "backbone_params") {
            Some(bb) => {
                let head = w.flat(w.strip(params_id, "params"), "state.params")?;
                let backbone = w.flat(w.strip(bb, "params"), "state.backbone_params")?;
                let bs = match p.dict_get(fields, "batch_stats") {
                    Some(b) => w.flat(w.strip(b, "batch_stats"), "state.batch_stats")?,
                    None => BTreeMap::new(),
                };
                (CheckpointKind::Linear, head, backbone, bs)
            }
            None => {
                let params = w.flat(w.strip(params_id, "params"), "state.params")?;
                let kind = if params.keys().any(|k| k.starts_with("text_embedding.")) {
                    CheckpointKind::M3ae
                } else {
                    CheckpointKind::Mae
                };
                (kind, params, BTreeMap::new(), BTreeMap::new())
            }
        };
        let opt = match p.dict_get(fields, "opt_state") {
            Some(id) if !matches!(p.get(id), Value::None) => {
                let mut o = OptState::default();
                w.opt_walk(id, "state.opt_state", 0, &mut o)?;
                Some(o)
            }
            _ => None,
        };
        Ok(Self {
            origin: origin.to_string(),
            kind,
            flags,
            checkpoint_step,
            checkpoint_epoch,
            state_step,
            params,
            backbone,
            batch_stats,
            opt,
            best_val_acc,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fortran_order_is_reordered() {
        // 2x3 array [[0,1,2],[3,4,5]] in Fortran order is 0,3,1,4,2,5.
        let f: Vec<u8> = [0u8, 3, 1, 4, 2, 5].to_vec();
        assert_eq!(fortran_to_c(&f, &[2, 3], 1), vec![0, 1, 2, 3, 4, 5]);
    }
}
