//! Layer-wise learning-rate decay and the weight-decay mask of fine-tuning (`finetune_main`).
//!
//! Every weight of the classifier gets a layer id in `0..=num_layer` with
//! `num_layer = depth + 1`, and its learning rate is scaled by
//! `decay^(num_layer - layer_id)` ([`lr_scale`]). Two assignments ([`LayerDecayRule`]):
//!
//! * [`LayerDecayRule::Official`] (default): the rule of the official fine-tuning code, quirks
//!   included, on the official path of the weight in the classifier's tree (`base_model.…`,
//!   head `LayerNorm_0.…` / `Dense_0.…`): encoder `Block_i` -> `i + 1`; the encoder's final
//!   LayerNorm (`base_model.encoder.LayerNorm_0`) -> 0; `base_model.cls_token` -> 0; everything
//!   else -> `num_layer` (no decay), **including the patch embedding `image_embedding` and the
//!   learned `encoder_image_type_embedding`**, and the head. (The official rule looks for
//!   `patch_emb` and `patch_mask_emb`, which this model does not have, and its `LayerNorm_0`
//!   match hits the final norm right before the head.)
//! * [`LayerDecayRule::Mae`]: the rule of the MAE / BEiT reference code the official one
//!   imitates: cls token, mask token, position / type embedding and patch embedding -> 0,
//!   encoder block `i` -> `i + 1`, everything else (final norm, head) -> `num_layer`.
//!
//! The weight-decay mask ([`finetune_weight_decay`]) is the one the official code *means*: a
//! weight is decayed iff it has more than one dimension and no component of its path is in
//! the base model's (`MaskedAutoencoder`) no-decay list or is `bias`. The official code
//! matches the mask by object identity against the optimizer's update arrays, so in practice
//! it decays nothing; its default weight decay is 0 anyway, so the difference only shows with
//! an explicit non-zero weight decay.
//!
//! ```
//! use m3ae_model::layer_decay::{layer_id, lr_scale, LayerDecayRule};
//! let depth = 12;
//! let id = |n: &str| layer_id(n, depth, LayerDecayRule::Official);
//! assert_eq!(id("base_model.encoder.Block_3.LayerNorm_0.scale"), 4);
//! assert_eq!(id("base_model.encoder.LayerNorm_0.scale"), 0);
//! assert_eq!(id("base_model.image_embedding.kernel"), 13);
//! assert_eq!(id("Dense_0.kernel"), 13);
//! assert_eq!(layer_id("base_model.image_embedding.kernel", depth, LayerDecayRule::Mae), 0);
//! assert_eq!(layer_id("base_model.encoder.LayerNorm_0.scale", depth, LayerDecayRule::Mae), 13);
//! assert_eq!(lr_scale(13, depth, 0.75), 1.0);
//! assert_eq!(lr_scale(11, depth, 0.5), 0.25);
//! ```

use crate::params::{no_decay_list, ParamSpec, Variant};
use serde::{Deserialize, Serialize};

/// Which layer-id assignment the layer-wise learning-rate decay uses (in configurations
/// `"official"` / `"mae"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerDecayRule {
    /// The official fine-tuning code's assignment, quirks included (see the module docs).
    #[default]
    Official,
    /// The MAE / BEiT reference assignment (embeddings 0, final norm and head last).
    Mae,
}

/// The path components of an official name relative to the `params` collection (a leading
/// `params.` is dropped).
fn components(official: &str) -> Vec<&str> {
    let name = official.strip_prefix("params.").unwrap_or(official);
    name.split('.').collect()
}

/// `Block_<i>` -> `i`.
fn block_index(component: &str) -> Option<usize> {
    component.strip_prefix("Block_")?.parse().ok()
}

/// The layer id (`0..=depth + 1`) of the weight with official name `official` in the
/// classifier's tree (`base_model.encoder.Block_0.…`, `LayerNorm_0.scale`, `Dense_0.kernel`;
/// a leading `params.` is accepted), for an encoder of `depth` blocks.
pub fn layer_id(official: &str, depth: usize, rule: LayerDecayRule) -> usize {
    let num_layer = depth + 1;
    let p = components(official);
    match rule {
        LayerDecayRule::Official => {
            // The official rule indexes the full path `('params', ...)`: its `name[k]` is
            // `p[k - 1]` here.
            if p.len() > 2 && p[2].starts_with("Block") {
                if let Some(i) = block_index(p[2]) {
                    return i + 1;
                }
            }
            let in_base = p.first() == Some(&"base_model");
            if p.len() > 2 && in_base && ["LayerNorm_0", "patch_emb"].contains(&p[2]) {
                return 0;
            }
            let second = p.get(1).copied().unwrap_or("");
            if p.len() <= 2 && in_base && ["cls_token", "patch_mask_emb"].contains(&second) {
                return 0;
            }
            num_layer
        }
        LayerDecayRule::Mae => {
            if p.first() != Some(&"base_model") || p.len() < 2 {
                return num_layer;
            }
            match p[1] {
                "cls_token"
                | "image_mask_embedding"
                | "encoder_image_type_embedding"
                | "image_embedding" => 0,
                "encoder" => match p.get(2).and_then(|c| block_index(c)) {
                    Some(i) if i < depth => i + 1,
                    _ => num_layer,
                },
                _ => num_layer,
            }
        }
    }
}

/// The learning-rate factor of layer `layer_id`: `decay^(depth + 1 - layer_id)` (1 for the
/// last layer). Computed with `powf`, as Python's `**`.
pub fn lr_scale(layer_id: usize, depth: usize, decay: f64) -> f64 {
    let num_layer = depth + 1;
    decay.powf(num_layer.saturating_sub(layer_id) as f64)
}

/// Whether fine-tuning decays the weight with official name `official` (classifier tree, see
/// [`layer_id`]) and `ndim` dimensions: the mask the official code intends, i.e. more than one
/// dimension and no path component in `MaskedAutoencoder`'s no-decay list or equal to `bias`.
/// (The official mask decays nothing in practice; see the module docs.)
///
/// ```
/// use m3ae_model::layer_decay::finetune_weight_decay;
/// assert!(finetune_weight_decay("base_model.encoder.Block_0.Attention_0.Dense_0.kernel", 2));
/// assert!(finetune_weight_decay("Dense_0.kernel", 2));
/// assert!(!finetune_weight_decay("Dense_0.bias", 1));
/// assert!(!finetune_weight_decay("base_model.encoder.LayerNorm_0.scale", 1));
/// assert!(!finetune_weight_decay("base_model.cls_token", 3));
/// assert!(finetune_weight_decay("base_model.decoder_image_type_embedding", 3));
/// ```
pub fn finetune_weight_decay(official: &str, ndim: usize) -> bool {
    let list = no_decay_list(Variant::Mae);
    ndim > 1
        && !components(official)
            .iter()
            .any(|c| *c == "bias" || list.contains(c))
}

/// One row of the layer-decay table of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerScale {
    /// Native name of the weight.
    pub name: String,
    /// Official name (in the classifier's tree, without `params.`).
    pub official: String,
    /// Layer id, `0..=depth + 1`.
    pub layer_id: usize,
    /// Learning-rate factor `decay^(depth + 1 - layer_id)`.
    pub lr_scale: f64,
    /// Whether the weight is decayed ([`finetune_weight_decay`]).
    pub weight_decay: bool,
}

/// The layer id, learning-rate factor and weight-decay flag of every weight of `specs` (in
/// order), for an encoder of `depth` blocks. `specs` are a classifier's
/// ([`crate::Classifier::specs`]); their official names are what the rules read.
pub fn layer_decay_table(
    specs: &[ParamSpec],
    depth: usize,
    decay: f64,
    rule: LayerDecayRule,
) -> Vec<LayerScale> {
    specs
        .iter()
        .map(|s| {
            let id = layer_id(&s.official, depth, rule);
            LayerScale {
                name: s.name.clone(),
                official: s.official.clone(),
                layer_id: id,
                lr_scale: lr_scale(id, depth, decay),
                weight_decay: finetune_weight_decay(&s.official, s.shape.len()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_rule_keeps_its_quirks_and_accepts_the_params_prefix() {
        let id = |n: &str| layer_id(n, 3, LayerDecayRule::Official);
        assert_eq!(id("params.base_model.cls_token"), 0);
        assert_eq!(id("params.base_model.encoder.LayerNorm_0.bias"), 0);
        assert_eq!(id("params.base_model.decoder.LayerNorm_0.bias"), 0);
        assert_eq!(id("params.base_model.decoder.Block_0.LayerNorm_0.scale"), 1);
        assert_eq!(
            id("params.base_model.encoder.Block_2.TransformerMLP_0.fc2.bias"),
            3
        );
        assert_eq!(id("params.base_model.encoder_image_type_embedding"), 4);
        assert_eq!(id("params.base_model.image_mask_embedding"), 4);
        assert_eq!(id("params.LayerNorm_0.scale"), 4);
        assert_eq!(id("base_model.encoder.LayerNorm_0.bias"), 0);
    }

    #[test]
    fn mae_rule_puts_embeddings_first_and_norm_and_head_last() {
        let id = |n: &str| layer_id(n, 3, LayerDecayRule::Mae);
        assert_eq!(id("base_model.cls_token"), 0);
        assert_eq!(id("base_model.image_embedding.bias"), 0);
        assert_eq!(id("base_model.encoder_image_type_embedding"), 0);
        assert_eq!(id("base_model.encoder.Block_0.LayerNorm_0.scale"), 1);
        assert_eq!(id("base_model.encoder.LayerNorm_0.scale"), 4);
        assert_eq!(id("base_model.decoder.Block_0.LayerNorm_0.scale"), 4);
        assert_eq!(id("Dense_0.bias"), 4);
    }

    #[test]
    fn scales_are_powers_of_the_decay() {
        let s: Vec<f64> = (0..=4).map(|i| lr_scale(i, 3, 0.75)).collect();
        assert_eq!(s, vec![0.31640625, 0.421875, 0.5625, 0.75, 1.0]);
    }
}
