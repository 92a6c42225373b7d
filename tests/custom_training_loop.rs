//! `examples/custom_training_loop.rs` (the library's training loop, no root package): it trains,
//! writes checkpoints, and a second call resumes from the newest one to exactly the weights of
//! an uninterrupted run.

#[allow(dead_code)] // the example's `main` is not called here
#[path = "../examples/custom_training_loop.rs"]
mod example;

use std::path::Path;

fn weights(run: &Path, step: u64) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let path = run.join(format!("checkpoints/step-{step:08}/model.safetensors"));
    let bytes = std::fs::read(&path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut out: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| (name, t.data().to_vec()))
        .collect();
    out.sort();
    Ok(out)
}

#[test]
fn the_example_trains_checkpoints_and_resumes_exactly() -> anyhow::Result<()> {
    let run = std::env::temp_dir().join(format!("m3ae-loop-test-{}", std::process::id()));
    let first = example::train(&run, 60)?;
    assert_eq!((first.start_step, first.steps), (0, 60));
    assert!(first.resumed_from.is_none());
    // keep 2: steps 40 and 60 remain, 20 was pruned
    let ck = run.join("checkpoints");
    assert!(!ck.join("step-00000020").exists() && ck.join("step-00000040").exists());
    let uninterrupted = weights(&run, 60)?;
    // as if the run had stopped after step 40: it resumes there and reaches the same weights
    std::fs::remove_dir_all(ck.join("step-00000060"))?;
    let second = example::train(&run, 60)?;
    assert_eq!((second.start_step, second.steps), (40, 60));
    assert_eq!(second.resumed_from, Some(ck.join("step-00000040")));
    assert_eq!(weights(&run, 60)?, uninterrupted);
    // the first window is carried across the resume (through JSON: to the last bit or two)
    let (a, b) = (first.first_window.unwrap(), second.first_window.unwrap());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(
        a.iter().all(|(k, v)| (v - b[k]).abs() <= 1e-12 * v.abs()),
        "{a:?} {b:?}"
    );
    let lines = std::fs::read_to_string(run.join("metrics.jsonl"))?
        .lines()
        .count();
    assert_eq!(
        lines, 8,
        "one record per 10 steps: 6, then 2 after the resume"
    );
    std::fs::remove_dir_all(&run)?;
    Ok(())
}
