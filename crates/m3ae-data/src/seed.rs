//! Explicit seeding: every random draw of the crate comes from a ChaCha8 stream keyed by the
//! tuple it depends on (seed, purpose, epoch, index ...), never from a shared RNG, so results do
//! not depend on the number of threads or the order in which work is done.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Purposes, so that two streams keyed by the same numbers never coincide.
pub mod purpose {
    /// Shard order of an epoch.
    pub const SHARDS: u64 = 1;
    /// Shuffle buffer.
    pub const SHUFFLE: u64 = 2;
    /// Per-sample augmentation.
    pub const AUGMENT: u64 = 3;
    /// Image mask noise.
    pub const IMAGE_NOISE: u64 = 4;
    /// Text mask noise.
    pub const TEXT_NOISE: u64 = 5;
    /// Captioned scenes.
    pub const SCENES: u64 = 6;
    /// Unpaired-text shuffle buffer.
    pub const TEXT_SHUFFLE: u64 = 7;
    /// Unpaired-text mask noise.
    pub const UNPAIRED_NOISE: u64 = 8;
    /// Mixup / CutMix of a fine-tuning batch.
    pub const MIXUP: u64 = 9;
}

/// A ChaCha8 generator keyed by `seed`, a `purpose` and up to two more words.
///
/// ```
/// use rand::Rng;
/// let a: u64 = m3ae_data::seed::rng(7, 1, 2, 3).random();
/// let b: u64 = m3ae_data::seed::rng(7, 1, 2, 3).random();
/// let c: u64 = m3ae_data::seed::rng(7, 1, 2, 4).random();
/// assert_eq!(a, b);
/// assert_ne!(a, c);
/// ```
pub fn rng(seed: u64, purpose: u64, a: u64, b: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (i, w) in [seed, purpose, a, b].iter().enumerate() {
        key[i * 8..(i + 1) * 8].copy_from_slice(&w.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}
