//! The WebDataset tar reader on arbitrary shard bytes: every record (sample, bad sample or
//! error) is read to the end, and the json values of the shard are listed (the second user
//! of the tar reader); nothing may panic, hang or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use m3ae_data::{Partition, Source, WebDataset};

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("m3ae-fuzz-{}.tar", std::process::id()));
    std::fs::write(&path, data).expect("write the shard");
    let ds = WebDataset::new(vec![path]).expect("the shard exists");
    // two partitions of a split too, as the loader uses them
    for p in [
        Partition::whole(0, 0),
        Partition {
            rank: 1,
            world_size: 2,
            worker: 0,
            num_workers: 1,
            seed: 3,
            epoch: 1,
        },
    ] {
        if let Ok(records) = ds.open(&p) {
            for r in records {
                let _ = r;
            }
        }
    }
    let _ = ds.json_values("category", Some(1));
});
