//! Data for M3AE: turns files into `ModelInput` batches.
//!
//! Planned contents (issue "m3ae-data"): sources (WebDataset tar shards in the img2dataset
//! layout, JSONL/CSV manifests, image folders, text corpora, the MNIST / Fashion-MNIST / CIFAR
//! folders through candle-datasets), image decoding and the official augmentations, BERT
//! tokenization with padding masks, mask-noise sampling (batch-shared as the official code, or per
//! sample) feeding `m3ae_model::Masking`, collation, and a parallel deterministic loader sharded by
//! rank and worker.
//!
//! Status: nothing is implemented in this crate yet; the model already accepts explicit
//! [`m3ae_model::ModelInput`]-shaped tensors and noise, so it can be driven without it.
