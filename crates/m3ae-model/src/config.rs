//! Model configuration: every field of the official model config, the official presets, and
//! validation with messages that name the offending field.
//!
//! The official code applies user overrides first and then, when `model_type` is set, lets the
//! preset overwrite the seven architecture fields. [`M3aeConfig::resolved`] does the same.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Named architecture presets of the official code, plus our CPU-sized `tiny`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    /// ViT-S encoder (384 wide, 12 deep, 6 heads).
    Small,
    /// ViT-B encoder (768 wide, 12 deep, 12 heads).
    Base,
    /// ViT-L encoder (1024 wide, 24 deep, 16 heads).
    Large,
    /// ViT-H encoder (1280 wide, 32 deep, 16 heads).
    Huge,
    /// The official debug preset (1024 wide, 2 deep).
    Debug,
    /// Ours: a few hundred thousand parameters, for CPU tests and examples.
    Tiny,
}

impl ModelType {
    /// All presets, in order of size (official ones first).
    pub const ALL: [ModelType; 6] = [
        ModelType::Small,
        ModelType::Base,
        ModelType::Large,
        ModelType::Huge,
        ModelType::Debug,
        ModelType::Tiny,
    ];

    /// Parses a preset name (`small`, `base`, `large`, `huge`, `debug`, `tiny`).
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "small" => Self::Small,
            "base" => Self::Base,
            "large" => Self::Large,
            "huge" => Self::Huge,
            "debug" => Self::Debug,
            "tiny" => Self::Tiny,
            other => {
                return Err(Error::Config {
                    field: "model_type",
                    msg: format!(
                        "unknown preset {other:?}; expected small, base, large, huge, debug or tiny"
                    ),
                })
            }
        })
    }

    /// The names of the [`M3aeConfig`] fields a preset sets, in the order of
    /// [`ModelType::architecture`]'s tuple (for checks that compare a file's fields with a
    /// preset's).
    pub const ARCHITECTURE_FIELDS: [&'static str; 7] = [
        "emb_dim",
        "depth",
        "num_heads",
        "dec_emb_dim",
        "dec_depth",
        "dec_num_heads",
        "mlp_ratio",
    ];

    /// `(emb_dim, depth, num_heads, dec_emb_dim, dec_depth, dec_num_heads, mlp_ratio)`.
    pub fn architecture(self) -> (usize, usize, usize, usize, usize, usize, f64) {
        match self {
            Self::Small => (384, 12, 6, 512, 8, 16, 4.0),
            Self::Base => (768, 12, 12, 512, 8, 16, 4.0),
            Self::Large => (1024, 24, 16, 512, 8, 16, 4.0),
            Self::Huge => (1280, 32, 16, 512, 8, 16, 4.0),
            Self::Debug => (1024, 2, 16, 512, 2, 16, 4.0),
            Self::Tiny => (128, 2, 4, 64, 2, 4, 4.0),
        }
    }

    /// The preset's name as written in configs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Small => "small",
            Self::Base => "base",
            Self::Large => "large",
            Self::Huge => "huge",
            Self::Debug => "debug",
            Self::Tiny => "tiny",
        }
    }
}

/// Configuration of the M3AE model (and of the image-only MAE, which ignores the text fields).
///
/// The first fifteen fields are the official model config (`get_default_config`) with its
/// defaults. The rest are the constructor arguments and loss settings the official main scripts
/// pass in.
///
/// ```
/// use m3ae_model::M3aeConfig;
/// let cfg = M3aeConfig::preset("base").unwrap();
/// assert_eq!((cfg.emb_dim, cfg.depth, cfg.num_heads), (768, 12, 12));
/// let json = serde_json::to_string(&cfg).unwrap();
/// assert_eq!(serde_json::from_str::<M3aeConfig>(&json).unwrap(), cfg);
/// assert!(serde_json::from_str::<M3aeConfig>(r#"{"emb_dimm": 3}"#).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct M3aeConfig {
    /// Encoder width D.
    pub emb_dim: usize,
    /// Decoder width Dd.
    pub dec_emb_dim: usize,
    /// Number of encoder blocks.
    pub depth: usize,
    /// Number of decoder blocks.
    pub dec_depth: usize,
    /// Encoder attention heads.
    pub num_heads: usize,
    /// Decoder attention heads.
    pub dec_num_heads: usize,
    /// MLP hidden width as a multiple of the block width.
    pub mlp_ratio: f64,
    /// Depth of the output heads (0: a single Dense).
    pub output_head_depth: usize,
    /// Dropout on the attention probabilities, in `[0, 1)` (pre-training: 0). Active only in
    /// training forwards (see [`crate::stochastic`]).
    pub att_drop: f64,
    /// Dropout after the attention projection and after both MLP layers, in `[0, 1)`
    /// (pre-training: 0).
    pub drop: f64,
    /// Drop path (stochastic depth, per sample) of every residual branch, the same rate in every
    /// encoder and decoder block, in `[0, 1)` (pre-training: 0).
    pub drop_path: f64,
    /// Fraction of image patches removed before the encoder.
    pub image_mask_ratio: f64,
    /// Fraction of text tokens removed before the encoder.
    pub text_mask_ratio: f64,
    /// Add learned modality (type) embeddings.
    pub use_type_embedding: bool,
    /// Preset that overwrites the seven architecture fields when set.
    pub model_type: Option<ModelType>,
    /// Patch side P (pixels).
    pub patch_size: usize,
    /// Image side (pixels); must be divisible by `patch_size`.
    pub image_size: usize,
    /// Text vocabulary size V (bert-base-uncased: 30522).
    pub text_vocab_size: usize,
    /// Text length T fed to the model (tokenizer max length; 64 for image-text).
    pub text_length: usize,
    /// Width of the image output head; `None` means `P*P*3` (raw patch regression).
    pub image_output_dim: Option<usize>,
    /// Weight of the image loss in the total.
    pub image_loss_weight: f64,
    /// Weight of the paired text loss in the total.
    pub text_loss_weight: f64,
    /// Weight of the unpaired text loss in the total.
    pub unpaired_text_loss_weight: f64,
    /// Image loss on every patch instead of the masked ones only.
    pub image_all_token_loss: bool,
    /// Text loss on every non-padding token instead of the masked ones only.
    pub text_all_token_loss: bool,
    /// What the image head regresses: the patch pixels (official) or each patch's pixels
    /// normalised by its own mean and standard deviation (MAE's `norm_pix_loss`).
    pub image_target: ImageTarget,
    /// Kernel implementation: `fused` (default, fast) or `reference` (plain candle ops).
    pub kernels: m3ae_kernels::KernelPath,
}

impl Default for M3aeConfig {
    fn default() -> Self {
        Self {
            emb_dim: 1024,
            dec_emb_dim: 512,
            depth: 24,
            dec_depth: 8,
            num_heads: 16,
            dec_num_heads: 16,
            mlp_ratio: 4.0,
            output_head_depth: 0,
            att_drop: 0.0,
            drop: 0.0,
            drop_path: 0.0,
            image_mask_ratio: 0.75,
            text_mask_ratio: 0.75,
            use_type_embedding: true,
            model_type: None,
            patch_size: 16,
            image_size: 256,
            text_vocab_size: 30522,
            text_length: 64,
            image_output_dim: None,
            image_loss_weight: 1.0,
            text_loss_weight: 0.1,
            unpaired_text_loss_weight: 0.0,
            image_all_token_loss: false,
            text_all_token_loss: false,
            image_target: ImageTarget::Pixels,
            kernels: m3ae_kernels::KernelPath::Fused,
        }
    }
}

/// The regression target of the image head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageTarget {
    /// The patch pixels as the model sees them (the official M3AE target).
    #[default]
    Pixels,
    /// Each patch's pixels minus their mean, divided by `sqrt(var + 1e-6)` with the unbiased
    /// variance over the patch (MAE's `norm_pix_loss`); predictions are mapped back to pixels
    /// with the visible image's patch statistics for display ([`crate::loss::patch_target`]).
    NormalizedPixels,
}

impl M3aeConfig {
    /// The preset with the official defaults for everything else (`tiny` also shrinks the image
    /// to 32 px / patch 8, the vocabulary to 1000 and the text to 16 tokens).
    pub fn preset(name: &str) -> Result<Self> {
        Ok(Self::from_model_type(ModelType::parse(name)?))
    }

    /// See [`M3aeConfig::preset`].
    pub fn from_model_type(model_type: ModelType) -> Self {
        let mut cfg = Self {
            model_type: Some(model_type),
            ..Self::default()
        };
        if model_type == ModelType::Tiny {
            cfg.patch_size = 8;
            cfg.image_size = 32;
            cfg.text_vocab_size = 1000;
            cfg.text_length = 16;
        }
        cfg.resolved()
    }

    /// The config with the preset (if any) applied over the architecture fields, as the official
    /// code does regardless of user values.
    pub fn resolved(&self) -> Self {
        let mut c = self.clone();
        if let Some(t) = c.model_type {
            let (e, d, h, de, dd, dh, m) = t.architecture();
            c.emb_dim = e;
            c.depth = d;
            c.num_heads = h;
            c.dec_emb_dim = de;
            c.dec_depth = dd;
            c.dec_num_heads = dh;
            c.mlp_ratio = m;
        }
        c
    }

    /// Width of the image output head (`image_output_dim` or `P*P*3`).
    pub fn image_output_dim(&self) -> usize {
        self.image_output_dim
            .unwrap_or(self.patch_size * self.patch_size * 3)
    }

    /// Patch vector length `P*P*3`.
    pub fn patch_dim(&self) -> usize {
        self.patch_size * self.patch_size * 3
    }

    /// Image tokens per image, `(image_size / patch_size)^2`.
    pub fn num_patches(&self) -> usize {
        let g = self.image_size / self.patch_size.max(1);
        g * g
    }

    /// MLP hidden width of a block of width `dim` (`int(dim * mlp_ratio)`, as the official code).
    pub fn mlp_dim(&self, dim: usize) -> usize {
        (dim as f64 * self.mlp_ratio) as usize
    }

    /// Kept image tokens for `len` patches: `int(len * (1 - image_mask_ratio))`.
    pub fn image_keep(&self, len: usize) -> usize {
        crate::masking::keep_len(len, self.image_mask_ratio)
    }

    /// Kept text tokens for `len` tokens: `int(len * (1 - text_mask_ratio))`.
    pub fn text_keep(&self, len: usize) -> usize {
        crate::masking::keep_len(len, self.text_mask_ratio)
    }

    /// Checks every rule; the error names the first field that breaks one.
    /// `with_text` is false for the image-only MAE (text fields are then not checked).
    pub fn validate(&self, with_text: bool) -> Result<()> {
        let bad = |field: &'static str, msg: String| Err(Error::Config { field, msg });
        let positive = [
            ("emb_dim", self.emb_dim),
            ("dec_emb_dim", self.dec_emb_dim),
            ("num_heads", self.num_heads),
            ("dec_num_heads", self.dec_num_heads),
            ("patch_size", self.patch_size),
            ("image_size", self.image_size),
        ];
        for (field, v) in positive {
            if v == 0 {
                return bad(field, "must be > 0".into());
            }
        }
        // Far above every real model; beyond them sizes overflow or abort in the allocator.
        let limits = [
            ("emb_dim", self.emb_dim, 1 << 16),
            ("dec_emb_dim", self.dec_emb_dim, 1 << 16),
            ("depth", self.depth, 1024),
            ("dec_depth", self.dec_depth, 1024),
            ("num_heads", self.num_heads, 1024),
            ("dec_num_heads", self.dec_num_heads, 1024),
            ("output_head_depth", self.output_head_depth, 64),
            ("image_size", self.image_size, 1 << 14),
            ("patch_size", self.patch_size, 1024),
            ("text_length", self.text_length, 1 << 16),
            ("text_vocab_size", self.text_vocab_size, 1 << 24),
        ];
        for (field, v, max) in limits {
            if v > max {
                return bad(
                    field,
                    format!("{v} is larger than the supported maximum {max}"),
                );
            }
        }
        if self.mlp_ratio > 64.0 {
            return bad(
                "mlp_ratio",
                format!("{} is larger than the supported maximum 64", self.mlp_ratio),
            );
        }
        if self.num_patches() > 1 << 16 {
            return bad(
                "image_size",
                format!(
                    "{} / patch_size {} gives {} patches, more than the supported 65,536",
                    self.image_size,
                    self.patch_size,
                    self.num_patches()
                ),
            );
        }
        if !self.emb_dim.is_multiple_of(self.num_heads) {
            return bad(
                "emb_dim",
                format!(
                    "{} is not divisible by num_heads = {}",
                    self.emb_dim, self.num_heads
                ),
            );
        }
        if !self.dec_emb_dim.is_multiple_of(self.dec_num_heads) {
            return bad(
                "dec_emb_dim",
                format!(
                    "{} is not divisible by dec_num_heads = {}",
                    self.dec_emb_dim, self.dec_num_heads
                ),
            );
        }
        if !self.emb_dim.is_multiple_of(4) {
            return bad(
                "emb_dim",
                format!(
                    "{} is not divisible by 4 (2-D sin-cos position embedding)",
                    self.emb_dim
                ),
            );
        }
        if !self.dec_emb_dim.is_multiple_of(4) {
            return bad(
                "dec_emb_dim",
                format!(
                    "{} is not divisible by 4 (2-D sin-cos position embedding)",
                    self.dec_emb_dim
                ),
            );
        }
        if !(self.mlp_ratio > 0.0 && self.mlp_ratio.is_finite())
            || self.mlp_dim(self.dec_emb_dim.min(self.emb_dim)) == 0
        {
            return bad("mlp_ratio", format!("{} must be > 0", self.mlp_ratio));
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return bad(
                "image_size",
                format!(
                    "{} is not divisible by patch_size = {}",
                    self.image_size, self.patch_size
                ),
            );
        }
        let mut ratios = vec![("image_mask_ratio", self.image_mask_ratio)];
        if with_text {
            ratios.push(("text_mask_ratio", self.text_mask_ratio));
        }
        for (field, r) in ratios {
            if !(0.0..1.0).contains(&r) {
                return bad(field, format!("{r} is outside [0, 1)"));
            }
        }
        for (field, r) in [
            ("att_drop", self.att_drop),
            ("drop", self.drop),
            ("drop_path", self.drop_path),
        ] {
            if !(0.0..1.0).contains(&r) {
                return bad(field, format!("{r} is outside [0, 1) (a dropout rate)"));
            }
        }
        if let Some(d) = self.image_output_dim {
            // the image loss compares the head's output with the P*P*3 patch pixels
            if d != self.patch_dim() {
                return bad(
                    "image_output_dim",
                    format!(
                        "{d} must equal patch_size^2 * 3 = {} (the image loss compares the output \
                         with the patch pixels)",
                        self.patch_dim()
                    ),
                );
            }
        }
        if with_text {
            if self.text_vocab_size == 0 {
                return bad("text_vocab_size", "must be > 0".into());
            }
            if self.text_length == 0 {
                return bad("text_length", "must be > 0".into());
            }
        }
        for (field, w) in [
            ("image_loss_weight", self.image_loss_weight),
            ("text_loss_weight", self.text_loss_weight),
            ("unpaired_text_loss_weight", self.unpaired_text_loss_weight),
        ] {
            if !w.is_finite() || w < 0.0 {
                return bad(field, format!("{w} must be finite and >= 0"));
            }
        }
        Ok(())
    }

    /// Reads a config from a JSON or TOML file (chosen by extension; JSON otherwise).
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            error: e,
        })?;
        let parsed = if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str(&text).map_err(|e| e.to_string())
        } else {
            serde_json::from_str(&text).map_err(|e| e.to_string())
        };
        parsed.map_err(|msg| Error::Parse {
            path: path.to_path_buf(),
            msg,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A preset changes exactly the fields it names: [`ModelType::ARCHITECTURE_FIELDS`] is the
    /// list checks rely on, so it must match what [`M3aeConfig::resolved`] does.
    #[test]
    fn a_preset_sets_exactly_its_architecture_fields() {
        for t in ModelType::ALL {
            // start from values no preset uses, so every architecture field must change
            let mut c = M3aeConfig {
                emb_dim: 3,
                depth: 5,
                num_heads: 7,
                dec_emb_dim: 11,
                dec_depth: 13,
                dec_num_heads: 17,
                mlp_ratio: 1.5,
                ..M3aeConfig::default()
            };
            c.model_type = Some(t);
            let before = serde_json::to_value(&c).unwrap();
            let after = serde_json::to_value(c.resolved()).unwrap();
            let (before, after) = (before.as_object().unwrap(), after.as_object().unwrap());
            let mut changed: Vec<&str> = before
                .iter()
                .filter(|(k, v)| after.get(k.as_str()) != Some(v))
                .map(|(k, _)| k.as_str())
                .collect();
            changed.sort_unstable();
            let mut want = ModelType::ARCHITECTURE_FIELDS.to_vec();
            want.sort_unstable();
            assert_eq!(changed, want, "{t:?}");
            let (e, d, h, de, dd, dh, m) = t.architecture();
            let values = [
                e as f64, d as f64, h as f64, de as f64, dd as f64, dh as f64, m,
            ];
            for (field, value) in ModelType::ARCHITECTURE_FIELDS.iter().zip(values) {
                assert_eq!(after[*field].as_f64(), Some(value), "{t:?}.{field}");
            }
        }
    }

    fn err_field(cfg: &M3aeConfig) -> &'static str {
        match cfg.validate(true) {
            Err(Error::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn presets_are_valid_and_round_trip_json_and_toml() {
        for t in ModelType::ALL {
            let cfg = M3aeConfig::from_model_type(t);
            cfg.validate(true).unwrap();
            let json = serde_json::to_string_pretty(&cfg).unwrap();
            assert_eq!(serde_json::from_str::<M3aeConfig>(&json).unwrap(), cfg);
            let toml_text = toml::to_string(&cfg).unwrap();
            assert_eq!(toml::from_str::<M3aeConfig>(&toml_text).unwrap(), cfg);
        }
    }

    #[test]
    fn preset_overrides_user_architecture() {
        let cfg = M3aeConfig {
            emb_dim: 12,
            depth: 1,
            model_type: Some(ModelType::Small),
            ..Default::default()
        };
        let r = cfg.resolved();
        assert_eq!((r.emb_dim, r.depth, r.num_heads), (384, 12, 6));
        assert!(M3aeConfig::preset("medium").is_err());
    }

    #[test]
    fn each_invalid_rule_names_its_field() {
        let ok = M3aeConfig::preset("tiny").unwrap();
        type Edit = Box<dyn Fn(&mut M3aeConfig)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("emb_dim", Box::new(|c| c.emb_dim = 0)),
            ("emb_dim", Box::new(|c| c.emb_dim = 66)),
            (
                "emb_dim",
                Box::new(|c| {
                    c.emb_dim = 18;
                    c.num_heads = 3
                }),
            ),
            ("dec_emb_dim", Box::new(|c| c.dec_emb_dim = 34)),
            (
                "dec_emb_dim",
                Box::new(|c| {
                    c.dec_emb_dim = 6;
                    c.dec_num_heads = 2
                }),
            ),
            ("num_heads", Box::new(|c| c.num_heads = 0)),
            ("dec_num_heads", Box::new(|c| c.dec_num_heads = 0)),
            ("mlp_ratio", Box::new(|c| c.mlp_ratio = 0.0)),
            ("mlp_ratio", Box::new(|c| c.mlp_ratio = f64::NAN)),
            ("patch_size", Box::new(|c| c.patch_size = 0)),
            ("image_size", Box::new(|c| c.image_size = 30)),
            ("image_size", Box::new(|c| c.image_size = 0)),
            ("image_mask_ratio", Box::new(|c| c.image_mask_ratio = 1.0)),
            ("image_mask_ratio", Box::new(|c| c.image_mask_ratio = -0.1)),
            ("text_mask_ratio", Box::new(|c| c.text_mask_ratio = 1.5)),
            ("att_drop", Box::new(|c| c.att_drop = 1.0)),
            ("att_drop", Box::new(|c| c.att_drop = -0.1)),
            ("drop", Box::new(|c| c.drop = f64::NAN)),
            ("drop", Box::new(|c| c.drop = 1.5)),
            ("drop_path", Box::new(|c| c.drop_path = 1.0)),
            ("drop_path", Box::new(|c| c.drop_path = f64::INFINITY)),
            (
                "image_output_dim",
                Box::new(|c| c.image_output_dim = Some(0)),
            ),
            (
                "image_output_dim",
                Box::new(|c| c.image_output_dim = Some(c.patch_dim() + 1)),
            ),
            ("emb_dim", Box::new(|c| c.emb_dim = 4_000_000_000)),
            ("dec_depth", Box::new(|c| c.dec_depth = 1 << 20)),
            ("image_size", Box::new(|c| c.image_size = 1 << 20)),
            (
                "image_size",
                Box::new(|c| {
                    c.image_size = 8192;
                    c.patch_size = 8
                }),
            ),
            ("text_length", Box::new(|c| c.text_length = 1_000_000_000)),
            ("mlp_ratio", Box::new(|c| c.mlp_ratio = 1e9)),
            ("text_vocab_size", Box::new(|c| c.text_vocab_size = 0)),
            ("text_length", Box::new(|c| c.text_length = 0)),
            ("text_loss_weight", Box::new(|c| c.text_loss_weight = -1.0)),
            (
                "image_loss_weight",
                Box::new(|c| c.image_loss_weight = f64::INFINITY),
            ),
            (
                "unpaired_text_loss_weight",
                Box::new(|c| c.unpaired_text_loss_weight = -0.5),
            ),
        ];
        for (field, edit) in cases {
            let mut c = ok.clone();
            c.model_type = None;
            edit(&mut c);
            assert_eq!(err_field(&c), field, "{c:?}");
            let msg = c.validate(true).unwrap_err().to_string();
            assert!(msg.contains(field), "{msg}");
        }
        // dropout rates in [0, 1) are accepted
        for r in [0.0, 0.1, 0.5, 0.999] {
            let mut c = ok.clone();
            (c.att_drop, c.drop, c.drop_path) = (r, r, r);
            c.validate(true).unwrap();
            c.validate(false).unwrap();
        }
        // MAE ignores text fields.
        let mut c = ok.clone();
        c.text_vocab_size = 0;
        c.text_mask_ratio = 2.0;
        c.validate(false).unwrap();
    }
}
