//! The safe pickle reader (`m3ae_official::pickle`) on arbitrary bytes, and a walk over every value
//! of what it accepts with the accessors the checkpoint converter uses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use m3ae_official::pickle::{Pickle, Value};

fuzz_target!(|data: &[u8]| {
    let Ok(p) = Pickle::parse(data) else {
        return;
    };
    let root = p.root();
    let _ = p.kind(root);
    // ids are dense indices into the value table
    for id in 0..p.len() {
        let _ = (p.kind(id), p.as_str(id), p.as_int(id), p.bytes_of(id));
        let _ = (p.global(id), p.class_of(id), p.object(id));
        if let Some(items) = p.dict_items(id) {
            for (k, _) in items {
                if let Some(key) = p.as_str(*k) {
                    let _ = p.dict_get(id, key);
                }
            }
        }
        let _ = p.tuple_items(id);
        if let Value::Array(a) = p.get(id) {
            let _ = p.array_data(a);
        }
    }
});
