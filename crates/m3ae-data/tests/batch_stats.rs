//! `BatchIter::stats`: the good / bad counts of a whole loader run, including the bad samples
//! read after the last batch (which no batch's `position.stats` can carry).

mod common;
use common::*;
use m3ae_data::*;
use std::sync::Arc;

#[test]
fn batch_iter_stats_count_bad_samples_after_the_last_batch() {
    let dir = TempDir::new("iter-stats");
    // two good samples, then three samples whose image does not decode
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..2 {
        member(&mut b, &format!("good{i}.jpg"), &jpeg(24, 20, i as u8));
    }
    for i in 0..3 {
        member(&mut b, &format!("zbad{i}.jpg"), b"not an image");
    }
    let shard = dir.path().join("s.tar");
    std::fs::write(&shard, b.into_inner().unwrap()).unwrap();
    let ds = WebDataset::new(vec![shard]).unwrap();
    let mut cfg = LoaderConfig::eval(2, 16, 8);
    cfg.max_bad_fraction = 1.0;
    let loader = Loader::new(Arc::new(ds), None, cfg).unwrap();
    let mut it = loader.iter(Position::default());
    let batches: Vec<Batch> = it.by_ref().map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 1);
    // the only batch was sent before the bad samples were read
    assert_eq!(batches[0].position.stats.total_bad(), 0);
    let stats = it.stats();
    assert_eq!(stats.good, 2);
    assert_eq!(stats.count(BadReason::CorruptImage), 3, "{stats}");
    assert!(stats.to_string().contains("corrupt_image 3"), "{stats}");
}
