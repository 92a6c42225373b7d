//! Training-mode randomness of a forward pass: dropout, attention dropout and drop path
//! (stochastic depth), seeded and deterministic.
//!
//! ## What the official code does (`m3ae/model.py`)
//! * `Attention`: the softmax probabilities go through `Dropout(att_drop)`, the output
//!   projection through `Dropout(drop)`.
//! * `TransformerMLP`: `fc1 -> GELU -> Dropout(drop) -> fc2 -> Dropout(drop)`.
//! * `Block`: each residual branch (attention, MLP) goes through `DropPath(drop_path)` before its
//!   residual add. DropPath is per sample: `floor(keep + U[0, 1))` per sample, the branch
//!   divided by `keep = 1 - drop_path`. The rate is the **same for every block** (the model
//!   config's `drop_path` is passed unchanged to each `Block`; there is no linear ramp over
//!   depth), and the same three rates are used by the encoder **and** the decoder.
//! * Nowhere else: no dropout on the embeddings (patch, text, position, type, cls), on the
//!   decoder's input projection, on the output heads or on the final LayerNorms.
//! * The rates are active only with `deterministic=False` (training); with rate 0 `Dropout` is
//!   the identity and `DropPath` multiplies by exactly 1. All three default to 0, so the
//!   official pre-training uses none of them. The official fine-tuning (`ViTClassifier`) runs
//!   `forward_representation` with `deterministic=False` and declares the rng streams
//!   `params, noise, drop_path` only: drop path works there, while a non-zero `drop` or
//!   `att_drop` would need the `dropout` stream it does not declare.
//!
//! ## Here
//! Layers take an `Option<&Stochastic>`: `None` (every evaluation and inference path:
//! representations, features, probes, the pipeline, parity) is the deterministic forward,
//! identical to a model without dropout; `Some(key)` is training mode. A site with rate 0 adds no
//! op at all, so a training forward at rate 0 is bit-identical to the deterministic one.
//!
//! The masks cannot reproduce JAX's random bits; they are a pure function of the key, the site
//! and the element ([`mod@m3ae_kernels::dropout`]), independent of threads and tiling. The key of a
//! site is the forward's key forked ([`Stochastic::fork`]) by the transformer (encoder
//! [`site::ENCODER`], decoder [`site::DECODER`]), the block index, and the site in the block
//! (the constants of [`site`]). The trainer derives the forward's key from the run seed, its
//! micro-batch counter and the rank ([`Stochastic::derive`]).

use m3ae_kernels::dropout::derive_key;
use m3ae_kernels::Dropout;

use crate::config::M3aeConfig;
use crate::Result;

/// The key of the random choices of one training forward pass (see the module docs).
///
/// ```
/// use m3ae_model::Stochastic;
/// let a = Stochastic::derive(42, &[7, 0]);
/// assert_eq!(a, Stochastic::derive(42, &[7, 0]));
/// assert_ne!(a, Stochastic::derive(42, &[8, 0]));
/// assert_ne!(a.fork(1), a.fork(2));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stochastic {
    /// The key every mask of the forward pass is derived from.
    pub seed: u64,
}

impl Stochastic {
    /// A key.
    pub const fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// The key of one forward pass from a run seed and counters (for example the micro-batch
    /// and the rank), mixed in order.
    pub fn derive(run_seed: u64, parts: &[u64]) -> Self {
        parts
            .iter()
            .fold(Self::new(derive_key(run_seed, site::DERIVE)), |s, &p| {
                s.fork(p)
            })
    }

    /// The key of a sub-stream (a transformer, a block, a site): unrelated to `self` and to
    /// every other tag's.
    pub fn fork(&self, tag: u64) -> Self {
        Self::new(derive_key(self.seed, tag))
    }

    /// The dropout mask of site `tag` at `rate`, or `None` when the rate is 0.
    pub(crate) fn site(st: Option<&Self>, tag: u64, rate: f64) -> Result<Option<Dropout>> {
        Ok(Dropout::active(rate, st.map(|s| s.fork(tag).seed))?)
    }
}

/// The tags that fork a forward pass's key into its sites.
pub mod site {
    /// The encoder transformer (of the masked forward and of the representation).
    pub const ENCODER: u64 = 0x454e_434f_4445_5201;
    /// The decoder transformer.
    pub const DECODER: u64 = 0x4445_434f_4445_5202;
    /// A block's attention layer (its probabilities: tag [`ATT_PROBS`] below that).
    pub const ATTENTION: u64 = 0;
    /// In the attention layer: dropout on the probabilities (`att_drop`).
    pub const ATT_PROBS: u64 = 0;
    /// In the attention layer: dropout on the output projection (`drop`).
    pub const ATT_PROJ: u64 = 1;
    /// In a block: dropout after the MLP's GELU (`drop`).
    pub const MLP_HIDDEN: u64 = 2;
    /// In a block: dropout after the MLP's second layer (`drop`).
    pub const MLP_OUT: u64 = 3;
    /// In a block: drop path of the attention branch (`drop_path`).
    pub const PATH_ATTENTION: u64 = 4;
    /// In a block: drop path of the MLP branch (`drop_path`).
    pub const PATH_MLP: u64 = 5;
    /// [`super::Stochastic::derive`]'s first fork of the run seed.
    pub(crate) const DERIVE: u64 = 0x5354_4f43_4841_5354;
}

/// The dropout rates of a transformer's blocks (the official config fields).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DropRates {
    /// Dropout on the attention probabilities.
    pub att_drop: f64,
    /// Dropout after the attention projection and after both MLP layers.
    pub drop: f64,
    /// Drop path (per sample) of each residual branch, the same in every block.
    pub drop_path: f64,
}

impl DropRates {
    /// The rates of a model configuration (used by the encoder and the decoder alike).
    pub fn of(cfg: &M3aeConfig) -> Self {
        Self {
            att_drop: cfg.att_drop,
            drop: cfg.drop,
            drop_path: cfg.drop_path,
        }
    }

    /// Whether every rate is 0 (a training forward is then the deterministic one).
    pub fn is_zero(&self) -> bool {
        self.att_drop == 0.0 && self.drop == 0.0 && self.drop_path == 0.0
    }
}
