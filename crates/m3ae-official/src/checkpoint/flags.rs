//! The official flag set (`variant`) and tensor shapes mapped onto our settings: the model
//! config, the optimisation settings of a resumed run and our AdamW state.

use super::{CheckpointKind, OfficialCheckpoint, RawDtype};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use m3ae_model::{param_specs, M3aeConfig, ModelType, Variant};
use std::collections::HashMap;

impl OfficialCheckpoint {
    fn flag(&self, name: &str) -> Option<&serde_json::Value> {
        self.flags.get(name).filter(|v| !v.is_null())
    }

    fn flag_err(&self, name: &str, want: &str) -> Error {
        Error::Structure {
            origin: self.origin.clone(),
            key: format!("variant.{name}"),
            msg: format!("expected {want}, got {:?}", self.flags.get(name)),
        }
    }

    fn flag_usize(&self, name: &str) -> Result<Option<usize>> {
        match self.flag(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.flag_err(name, "a non-negative integer")),
        }
    }

    fn first_flag(&self, groups: &[String], field: &str) -> Result<Option<usize>> {
        for g in groups {
            if let Some(v) = self.flag_usize(&format!("{g}.{field}"))? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    fn flag_f64(&self, name: &str) -> Result<Option<f64>> {
        match self.flag(name) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.flag_err(name, "a number")),
        }
    }

    fn flag_bool(&self, name: &str) -> Result<Option<bool>> {
        match self.flag(name) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .or_else(|| v.as_i64().map(|i| i != 0))
                .map(Some)
                .ok_or_else(|| self.flag_err(name, "a bool")),
        }
    }

    /// Rebuilds the model config from the flag set (`m3ae.*` or `mae.*` model flags, `patch_size`,
    /// loss weights, data image size and tokenizer length) and the tensor shapes (vocabulary from
    /// the text embedding, image head width). The result is resolved and validated.
    pub fn config(&self) -> Result<M3aeConfig> {
        let prefix = match self.kind {
            CheckpointKind::M3ae => "m3ae",
            _ => "mae",
        };
        let mut c = M3aeConfig {
            model_type: None,
            ..M3aeConfig::default()
        };
        let f = |n: &str| format!("{prefix}.{n}");
        for (name, slot) in [
            ("emb_dim", &mut c.emb_dim),
            ("dec_emb_dim", &mut c.dec_emb_dim),
            ("depth", &mut c.depth),
            ("dec_depth", &mut c.dec_depth),
            ("num_heads", &mut c.num_heads),
            ("dec_num_heads", &mut c.dec_num_heads),
            ("output_head_depth", &mut c.output_head_depth),
        ] {
            if let Some(v) = self.flag_usize(&f(name))? {
                *slot = v;
            }
        }
        for (name, slot) in [
            ("mlp_ratio", &mut c.mlp_ratio),
            ("att_drop", &mut c.att_drop),
            ("drop", &mut c.drop),
            ("drop_path", &mut c.drop_path),
            ("image_mask_ratio", &mut c.image_mask_ratio),
            ("text_mask_ratio", &mut c.text_mask_ratio),
        ] {
            if let Some(v) = self.flag_f64(&f(name))? {
                *slot = v;
            }
        }
        if let Some(v) = self.flag_bool(&f("use_type_embedding"))? {
            c.use_type_embedding = v;
        }
        match self.flag(&f("model_type")) {
            None => {}
            Some(serde_json::Value::String(s)) if s.is_empty() => {}
            Some(serde_json::Value::String(s)) => {
                c.model_type = Some(ModelType::parse(s).map_err(|e| Error::Structure {
                    origin: self.origin.clone(),
                    key: format!("variant.{}", f("model_type")),
                    msg: e.to_string(),
                })?)
            }
            Some(_) => return Err(self.flag_err(&f("model_type"), "a string")),
        }
        if let Some(p) = self.flag_usize("patch_size")? {
            c.patch_size = p;
        }
        // m3ae_main: `data.*`; linear_main: `train_data.*`; mae_main: `{dataset}_data.*`.
        let mut groups = Vec::new();
        if let Some(serde_json::Value::String(d)) = self.flag("dataset") {
            groups.push(format!("{d}_data"));
        }
        groups.extend(["data", "train_data", "imagenet_data", "cc12m_data"].map(String::from));
        if let Some(s) = self.first_flag(&groups, "image_size")? {
            c.image_size = s;
        }
        if let Some(t) = self.first_flag(&groups, "tokenizer_max_length")? {
            c.text_length = t;
        }
        for (name, slot) in [
            ("image_loss_weight", &mut c.image_loss_weight),
            ("text_loss_weight", &mut c.text_loss_weight),
            (
                "unpaired_text_loss_weight",
                &mut c.unpaired_text_loss_weight,
            ),
        ] {
            if let Some(v) = self.flag_f64(name)? {
                *slot = v;
            }
        }
        for (name, slot) in [
            ("image_all_token_loss", &mut c.image_all_token_loss),
            ("text_all_token_loss", &mut c.text_all_token_loss),
        ] {
            if let Some(v) = self.flag_bool(name)? {
                *slot = v;
            }
        }
        if self.flag_bool("discretized_image")? == Some(true) {
            return Err(Error::Structure {
                origin: self.origin.clone(),
                key: "variant.discretized_image".into(),
                msg: "checkpoints trained on discretized (VQGAN token) images are not supported"
                    .into(),
            });
        }
        let mut c = c.resolved();
        let params = self.model_params();
        if let Some(t) = params.get("text_embedding.embedding") {
            if let Some(&v) = t.shape.first() {
                c.text_vocab_size = v;
            }
        }
        let head = format!("decoder_image_output.Dense_{}.kernel", c.output_head_depth);
        if let Some(&w) = params.get(&head).and_then(|t| t.shape.get(1)) {
            if w != c.patch_dim() {
                c.image_output_dim = Some(w);
            }
        }
        c.validate(self.variant() == Variant::M3ae)?;
        Ok(c)
    }

    /// Our AdamW state (`m.{native}`, `v.{native}` as 1-D f32 in native layout; metadata `step`
    /// = `ScaleByAdamState.count` and `adamw` with the checkpoint's weight decay and the official
    /// b1 = 0.9, b2 = 0.95, eps = 1e-8).
    pub fn adamw_state(
        &self,
        config: &M3aeConfig,
        device: &Device,
    ) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
        let no_state = |msg: &str| Error::Structure {
            origin: self.origin.clone(),
            key: "state.opt_state".into(),
            msg: msg.into(),
        };
        let opt = self
            .opt
            .as_ref()
            .ok_or_else(|| no_state("the checkpoint has no optimizer state"))?;
        let count =
            opt.count.as_ref().and_then(|c| c.to_i64()).ok_or_else(|| {
                no_state("no AdamW state (ScaleByAdamState) with an integer count")
            })?;
        let step = u64::try_from(count).map_err(|_| no_state("negative AdamW count"))?;
        let specs = param_specs(config, self.variant());
        let mut out = HashMap::new();
        for s in &specs {
            for (prefix, m) in [("m", &opt.mu), ("v", &opt.nu)] {
                let t = m.get(&s.official).ok_or_else(|| Error::Structure {
                    origin: self.origin.clone(),
                    key: format!(
                        "opt.{}.{}",
                        if prefix == "m" { "mu" } else { "nu" },
                        s.official
                    ),
                    msg: "missing optimizer moment".into(),
                })?;
                if t.shape != s.official_shape() || t.dtype != RawDtype::F32 {
                    return Err(Error::Structure {
                        origin: self.origin.clone(),
                        key: s.official.clone(),
                        msg: format!(
                            "moment has shape {:?} / {:?}, expected {:?} / F32",
                            t.shape,
                            t.dtype,
                            s.official_shape()
                        ),
                    });
                }
                let x = t.to_tensor(device)?;
                let x = if s.transposed {
                    x.t()?.contiguous()?
                } else {
                    x
                };
                out.insert(format!("{prefix}.{}", s.name), x.flatten_all()?);
            }
        }
        let mut cfg = m3ae_train::optim::AdamWConfig::default();
        if let Some(wd) = self.flag_f64("weight_decay")? {
            cfg.weight_decay = wd;
        }
        let meta = HashMap::from([
            ("step".to_string(), step.to_string()),
            (
                "adamw".to_string(),
                serde_json::to_string(&cfg).map_err(|e| Error::Json {
                    origin: "adamw".into(),
                    msg: e.to_string(),
                })?,
            ),
        ]);
        Ok((out, meta))
    }

    /// The optimisation settings of the official run, from its flags: batch size (global),
    /// `lr_{init,peak,end}_value`, weight decay (AdamW b1 0.9, b2 0.95, eps 1e-8 as the official
    /// `adamw`), `clip_gradient`, `accumulate_grad_steps`, and the schedule length in optimiser
    /// steps: `total_steps` when given, else `epochs * int(data length / batch_size) /
    /// accumulate_grad_steps` when the flags record the data length (`{data}.length`), else the
    /// checkpoint's own step (the run is then complete: pass `--steps` to `m3ae pretrain`).
    /// Warmup is `lr_warmup_epochs` epochs; a non-zero warmup needs the epoch length (from the
    /// data length or `total_steps / epochs`) and is otherwise an error naming the flag.
    pub fn train_config(&self, total_steps: Option<u64>) -> Result<m3ae_train::TrainConfig> {
        let mut t = m3ae_train::TrainConfig::default();
        if let Some(b) = self.flag_usize("batch_size")? {
            t.batch_size = b;
        }
        for (flag, field) in [
            ("lr_init_value", &mut t.lr_init),
            ("lr_peak_value", &mut t.lr_peak),
            ("lr_end_value", &mut t.lr_end),
            ("clip_gradient", &mut t.clip_gradient),
            ("weight_decay", &mut t.adamw.weight_decay),
        ] {
            if let Some(v) = self.flag_f64(flag)? {
                *field = v;
            }
        }
        let accum = self
            .flag_usize("accumulate_grad_steps")?
            .unwrap_or(1)
            .max(1) as u64;
        t.accumulate_grad_steps = accum;
        let epochs = self.flag_usize("epochs")?.map(|e| e as u64);
        // The data config group: m3ae_main `data.*`, mae_main `{dataset}_data.*`.
        let group = match self.flag("dataset").and_then(|v| v.as_str()) {
            Some(d) => format!("{d}_data"),
            None => "data".to_string(),
        };
        let length = self.flag_usize(&format!("{group}.length"))?;
        // Loop steps (micro-batches) per epoch, as the official `int(len(dataset) / batch)`.
        let per_epoch = match (length, t.batch_size) {
            (Some(n), b) if b > 0 => Some((n / b) as u64),
            _ => match (total_steps, epochs) {
                (Some(s), Some(e)) if e > 0 => Some(s * accum / e),
                _ => None,
            },
        };
        let state_step = self
            .state_step
            .as_ref()
            .and_then(|s| s.to_i64())
            .unwrap_or(0)
            .max(0) as u64;
        t.steps = match (total_steps, per_epoch, epochs) {
            (Some(s), _, _) => s,
            (None, Some(pe), Some(e)) => pe * e / accum,
            _ => state_step,
        }
        .max(1);
        let warmup_epochs = self.flag_f64("lr_warmup_epochs")?.unwrap_or(0.0);
        if warmup_epochs > 0.0 {
            let pe = per_epoch.ok_or_else(|| Error::Structure {
                origin: self.origin.clone(),
                key: "variant.lr_warmup_epochs".into(),
                msg: "a warmup in epochs needs the epoch length, which the flags do not record: \
                      give the run's total steps (--total-steps)"
                    .into(),
            })?;
            t.warmup_steps = (warmup_epochs * pe as f64) as u64 / accum;
        }
        Ok(t)
    }
}
