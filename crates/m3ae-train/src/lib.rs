//! Pre-training of M3AE and MAE.
//!
//! Planned contents (issue "m3ae-train"): AdamW with the official no-decay lists and exactly
//! restorable state, warmup + cosine schedule scaled by batch/256, global-norm clipping, gradient
//! accumulation, atomic checkpoints (weights, optimiser state, config, data position) and exact
//! resume, metrics sinks, and gradient synchronisation across processes.
//!
//! Status: nothing is implemented in this crate yet. The model crate already provides what a
//! training step needs (a differentiable forward, the official losses, seeded initialisation and
//! atomic safetensors writes).
