//! The JSONL and CSV manifest parsers on arbitrary bytes (the first byte picks the format).
//! Image paths in the input are resolved next to the manifest, in an empty directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use m3ae_data::{Manifest, Partition, Source};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("m3ae-fuzz-manifest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let name = if sel & 1 == 0 { "m.jsonl" } else { "m.csv" };
    let path = dir.join(name);
    std::fs::write(&path, body).expect("write the manifest");
    let m = Manifest::new(&path).expect("the manifest exists");
    if let Ok(records) = m.open(&Partition::whole(0, 0)) {
        for r in records {
            let _ = r;
        }
    }
});
