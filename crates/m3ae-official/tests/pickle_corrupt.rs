//! Corrupt and hostile pickles: truncation at every offset, flipped bytes, deep nesting and huge
//! declared lengths. Each must return an error (or, for a flip that keeps the stream valid, a
//! value); none may panic, recurse without bound or allocate without bound.

use m3ae_official::pickle::{Error, Limits, Pickle};
use m3ae_official::OfficialCheckpoint;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

/// A tiny protocol-5 writer, enough to build a train-state-shaped pickle by hand.
struct W {
    body: Vec<u8>,
    memo: u32,
}

impl W {
    fn new() -> Self {
        Self {
            body: Vec::new(),
            memo: 0,
        }
    }
    fn op(&mut self, b: &[u8]) -> &mut Self {
        self.body.extend_from_slice(b);
        self
    }
    fn memoize(&mut self) -> u32 {
        self.body.push(0x94);
        self.memo += 1;
        self.memo - 1
    }
    fn get(&mut self, k: u32) -> &mut Self {
        self.body.push(b'j');
        self.body.extend_from_slice(&k.to_le_bytes());
        self
    }
    fn s(&mut self, s: &str) -> &mut Self {
        self.body.push(0x8c);
        self.body.push(s.len() as u8);
        self.body.extend_from_slice(s.as_bytes());
        self
    }
    fn int(&mut self, i: i32) -> &mut Self {
        self.body.push(b'J');
        self.body.extend_from_slice(&i.to_le_bytes());
        self
    }
    fn global(&mut self, m: &str, n: &str) -> u32 {
        self.s(m).s(n).op(&[0x93]);
        self.memoize()
    }
    fn dtype(&mut self, dtype_g: u32, d: &str) -> &mut Self {
        self.get(dtype_g).s(d).op(&[0x89, 0x88, 0x87, b'R']);
        self.op(b"(K\x03")
            .s("<")
            .op(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    }
    fn array(&mut self, fb: u32, dt: u32, data: &[u8], d: &str, shape: &[i32]) -> &mut Self {
        self.get(fb).op(b"(");
        self.body.push(b'B');
        self.body
            .extend_from_slice(&(data.len() as u32).to_le_bytes());
        self.body.extend_from_slice(data);
        self.dtype(dt, d).op(b"(");
        for &x in shape {
            self.int(x);
        }
        self.op(b"t").s("C").op(b"tR")
    }
    fn finish(&self) -> Vec<u8> {
        let mut out = vec![0x80, 5, 0x95];
        out.extend_from_slice(&(self.body.len() as u64 + 1).to_le_bytes());
        out.extend_from_slice(&self.body);
        out.push(b'.');
        out
    }
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `{"step": 1, "epoch": 0, "variant": {...}, "state": TrainState(params=FrozenDict(...),
/// opt_state=(EmptyState(), (ScaleByAdamState(count, mu, nu), ...)), step=array(2))}`.
fn small_checkpoint() -> Vec<u8> {
    let mut w = W::new();
    let fb = w.global("numpy.core.numeric", "_frombuffer");
    let dt = w.global("numpy", "dtype");
    let fd = w.global("flax.core.frozen_dict", "FrozenDict");
    let ts = w.global("m3ae.model", "M3AETrainState");
    let adam = w.global("optax._src.transform", "ScaleByAdamState");
    let empty = w.global("optax._src.base", "EmptyState");
    let evil = w.global("os", "system");
    let kernel = f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let bias = f32s(&[0.5, -0.5, 0.25]);
    w.op(b"}").op(b"(");
    w.s("step").int(1).s("epoch").int(0);
    w.s("variant")
        .op(b"}(")
        .s("patch_size")
        .int(8)
        .s("lr")
        .op(b"G?\xb9\x99\x99\x99\x99\x99\x9a");
    w.s("name").s("tiny").s("flag").op(&[0x88]).op(b"u");
    w.s("hook").get(evil).s("ls").op(&[0x85, b'R']);
    w.s("state").get(ts).op(&[b')', 0x81]).op(b"}(");
    w.s("step").array(fb, dt, &2i32.to_le_bytes(), "i4", &[]);
    w.s("apply_fn").op(b"N");
    // params = FrozenDict({"params": {"Dense_0": {"kernel", "bias"}}})
    w.s("params")
        .get(fd)
        .op(b"}")
        .s("params")
        .op(b"}")
        .s("Dense_0")
        .op(b"}(");
    w.s("kernel").array(fb, dt, &kernel, "f4", &[2, 3]);
    let _k = w.memoize();
    w.s("bias").array(fb, dt, &bias, "f4", &[3]);
    w.op(b"uss").op(&[0x85, b'R']);
    // opt_state
    w.s("opt_state").get(empty).op(&[b')', 0x81]);
    w.get(adam).op(b"(");
    w.array(fb, dt, &2i32.to_le_bytes(), "i4", &[]);
    for _ in 0..2 {
        w.op(b"}").s("params").op(b"}").s("Dense_0").op(b"}(");
        w.s("kernel").array(fb, dt, &kernel, "f4", &[2, 3]);
        w.s("bias").array(fb, dt, &bias, "f4", &[3]);
        w.op(b"uss");
    }
    w.op(&[b't', 0x81, 0x85, 0x86]);
    w.op(b"ub").op(b"u");
    w.finish()
}

fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(_) => panic!("panicked on {what}"),
    }
}

#[test]
fn the_hand_built_checkpoint_is_read_and_walked() {
    let data = small_checkpoint();
    let c = OfficialCheckpoint::from_bytes(&data, "small.pkl").expect("valid pickle");
    let flat = c.flat_tensors();
    let keys: Vec<&str> = flat.keys().map(|k| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "Dense_0.bias",
            "Dense_0.kernel",
            "checkpoint.epoch",
            "checkpoint.step",
            "opt.count",
            "opt.mu.Dense_0.bias",
            "opt.mu.Dense_0.kernel",
            "opt.nu.Dense_0.bias",
            "opt.nu.Dense_0.kernel",
            "state.step"
        ]
    );
    assert_eq!(flat["Dense_0.kernel"].shape, vec![2, 3]);
    assert_eq!(flat["state.step"].to_i64(), Some(2));
    assert_eq!(c.flags["patch_size"], 8);
    assert_eq!(c.flags["name"], "tiny");
    assert_eq!(c.flags["flag"], true);
}

#[test]
fn truncation_at_every_offset_is_an_error_with_that_offset() {
    let data = small_checkpoint();
    assert!(data.len() > 500, "{}", data.len());
    for n in 0..data.len() {
        let r = no_panic(&format!("truncation at {n}"), || {
            OfficialCheckpoint::from_bytes(&data[..n], "small.pkl")
        });
        let e = r.expect_err("a truncated pickle must not parse");
        let msg = e.to_string();
        assert!(msg.contains("small.pkl"), "{msg}");
        assert!(msg.contains("byte"), "{n}: {msg}");
    }
}

#[test]
fn flipped_bytes_never_panic() {
    let data = small_checkpoint();
    let mut errors = 0;
    for i in 0..data.len() {
        for mask in [0xffu8, 0x01, 0x80] {
            let mut d = data.clone();
            d[i] ^= mask;
            let r = no_panic(&format!("flip {mask:#x} at {i}"), || {
                OfficialCheckpoint::from_bytes(&d, "flipped.pkl").map(|c| c.flat_tensors().len())
            });
            errors += usize::from(r.is_err());
        }
    }
    assert!(errors > data.len(), "only {errors} flips were detected");
}

#[test]
fn real_checkpoint_truncated_and_flipped_never_panics() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/official_checkpoint/linear_model.pkl");
    let data = std::fs::read(path).expect("fixture");
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..150 {
        let n = (next() % data.len() as u64) as usize;
        let r = no_panic(&format!("truncation at {n}"), || {
            OfficialCheckpoint::from_bytes(&data[..n], "linear_model.pkl")
        });
        assert!(r.is_err(), "truncation at {n} parsed");
        let mut d = data.clone();
        let i = (next() % data.len() as u64) as usize;
        d[i] ^= (next() % 255 + 1) as u8;
        let _ = no_panic(&format!("flip at {i}"), || {
            OfficialCheckpoint::from_bytes(&d, "linear_model.pkl").map(|c| c.flat_tensors().len())
        });
    }
}

#[test]
fn deep_nesting_and_huge_lengths_are_refused() {
    // One million nested lists, tuples, dicts and marks.
    let n = 1_000_000;
    let mut lists = vec![0x80, 5];
    lists.resize(lists.len() + n, b']');
    lists.resize(lists.len() + n - 1, b'a');
    lists.push(b'.');
    let mut tuples = vec![0x80, 5, b')'];
    tuples.resize(tuples.len() + n, 0x85);
    tuples.push(b'.');
    let mut marks = vec![0x80, 5];
    marks.resize(marks.len() + n, b'(');
    let mut dicts = vec![0x80, 5, b'}'];
    for _ in 1..n {
        dicts.extend_from_slice(b"\x8c\x01k}");
    }
    dicts.resize(dicts.len() + n - 1, b's');
    dicts.push(b'.');
    for (what, data) in [
        ("lists", lists),
        ("tuples", tuples),
        ("marks", marks),
        ("dicts", dicts),
    ] {
        let e = no_panic(what, || Pickle::parse(&data)).expect_err(what);
        assert!(matches!(e, Error::Limit { .. }), "{what}: {e}");
    }
    // A self-referencing list (list.append(list) via the memo) is refused, not looped on.
    let mut cyc = vec![0x80, 5, b']', 0x94];
    for _ in 0..1000 {
        cyc.extend_from_slice(b"h\x00a");
    }
    cyc.push(b'.');
    assert!(Pickle::parse(&cyc).is_err());
    // Huge declared lengths: each is checked against the bytes that remain.
    for op in [0x8eu8, 0x96, 0x8d, 0x95] {
        let mut d = vec![0x80, 5, op];
        d.extend_from_slice(&u64::MAX.to_le_bytes());
        d.extend_from_slice(b"abc.");
        let e = no_panic("huge length", || Pickle::parse(&d)).expect_err("huge length");
        assert!(
            matches!(
                e,
                Error::PayloadTooLong {
                    offset: 2,
                    len: u64::MAX,
                    remaining: 4,
                    ..
                }
            ),
            "{e}"
        );
    }
    for op in [b'B', b'X', 0x8b] {
        let mut d = vec![0x80, 5, op];
        d.extend_from_slice(&u32::MAX.to_le_bytes());
        d.push(b'.');
        let e = Pickle::parse(&d).expect_err("huge length");
        assert!(matches!(e, Error::PayloadTooLong { offset: 2, .. }), "{e}");
    }
    // A huge array shape over a small buffer overflows nothing.
    let mut w = W::new();
    let fb = w.global("numpy._core.numeric", "_frombuffer");
    let dt = w.global("numpy", "dtype");
    w.array(
        fb,
        dt,
        &[0u8; 4],
        "f4",
        &[i32::MAX, i32::MAX, i32::MAX, i32::MAX],
    );
    let e = Pickle::parse(&w.finish()).expect_err("shape mismatch");
    assert!(e.to_string().contains("does not match"), "{e}");
    // Memo and allocation limits.
    let mut d = vec![0x80, 5, b'N'];
    d.resize(d.len() + 10_000, 0x94);
    d.push(b'.');
    let lim = Limits {
        max_memo: 100,
        ..Limits::default()
    };
    assert!(matches!(
        Pickle::parse_with(&d, lim),
        Err(Error::Limit {
            what: "memo size",
            offset: 103,
            ..
        })
    ));
    let lim = Limits {
        max_alloc_bytes: 10_000,
        ..Limits::default()
    };
    assert!(matches!(
        Pickle::parse_with(&d, lim),
        Err(Error::Limit {
            what: "allocated bytes",
            ..
        })
    ));
}
