//! Models by Hugging Face repository id (feature `hub`) on a fake Hugging Face cache built here in
//! the real layout (`models--{org}--{name}/refs/main` holding a commit hash,
//! `snapshots/{hash}/<files>`): a converted repository (`model.safetensors` + `config.json` +
//! `tokenizer.json`) and one holding only the official `model.pkl`, through the library
//! (`FromPretrained`) and the CLI (`--checkpoint org/name` with `HF_HOME`, `--offline` and
//! `HF_HUB_OFFLINE=1`). Nothing here uses the network. Without the feature, the CLI's error for a
//! repository id says to enable it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs the CLI with `HF_HOME` set and the given extra environment.
fn cli(args: &[&str], hf_home: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_m3ae"));
    c.args(args)
        .env("HF_HOME", hf_home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .env("RAYON_NUM_THREADS", "2");
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("m3ae runs");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
    )
}

#[cfg(feature = "hub")]
mod with_hub {
    use super::*;
    use candle_core::Device;
    use m3ae::model::AnyModel;
    use m3ae::model::{M3ae, Mae};
    use m3ae::official;
    use m3ae::{FromPretrained, HubOptions};

    const HASH: &str = "89abcdef0123456789abcdef0123456789abcdef";

    use crate::common::{ckpt_dir as fixtures, f32_bits as bits};

    /// The snapshot folder of `repo` in the fake cache under `cache` (created, with `refs/main`).
    fn snapshot(cache: &Path, repo: &str) -> PathBuf {
        let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
        std::fs::create_dir_all(folder.join("refs")).unwrap();
        std::fs::write(folder.join("refs/main"), HASH).unwrap();
        let snap = folder.join("snapshots").join(HASH);
        std::fs::create_dir_all(&snap).unwrap();
        snap
    }

    /// `<hf_home>/hub` with `m3ae-test/m3ae-tiny` (converted + tokenizer) and
    /// `m3ae-test/official-mae` (only the official pickle).
    fn fake_cache(hf_home: &Path) -> PathBuf {
        let cache = hf_home.join("hub");
        let snap = snapshot(&cache, "m3ae-test/m3ae-tiny");
        official::convert_official(&fixtures().join("m3ae_model.pkl"), &snap, false).unwrap();
        let scenes = m3ae::data::CaptionedScenes::new(Default::default()).unwrap();
        let corpus = scenes.corpus(300);
        m3ae::data::Tokenizer::train_wordpiece(corpus.iter().map(String::as_str), 150)
            .unwrap()
            .save(snap.join("tokenizer.json"))
            .unwrap();
        let snap = snapshot(&cache, "m3ae-test/official-mae");
        std::fs::copy(fixtures().join("mae_model.pkl"), snap.join("model.pkl")).unwrap();
        cache
    }

    fn same_weights(a: &m3ae::model::ParamStore, b: &m3ae::model::ParamStore) {
        assert_eq!(a.len(), b.len());
        for (name, v) in a.vars() {
            assert_eq!(
                bits(v.as_tensor()),
                bits(&b.get(name).unwrap()),
                "weight {name}"
            );
        }
    }

    #[test]
    fn both_repository_layouts_load_from_the_cache_offline() {
        let home = tmp("lib");
        let cache = fake_cache(&home);
        let dev = Device::Cpu;
        let opts = HubOptions::offline().with_cache_dir(&cache);
        // converted repository: model.safetensors + config.json
        let m = M3ae::from_pretrained("m3ae-test/m3ae-tiny", &opts, &dev).unwrap();
        let want = official::load_m3ae(&fixtures().join("m3ae_model.pkl"), &dev).unwrap();
        same_weights(m.params(), want.params());
        assert_eq!(m.config(), want.config());
        // official pickle only: converted on the fly
        let mae = Mae::from_pretrained("m3ae-test/official-mae", &opts, &dev).unwrap();
        let want = official::load_mae(&fixtures().join("mae_model.pkl"), &dev).unwrap();
        same_weights(mae.params(), want.params());
        // the variant follows the weights
        let any = AnyModel::from_pretrained("m3ae-test/official-mae", &opts, &dev).unwrap();
        assert!(matches!(any, AnyModel::Mae(_)));
        // the wrong model type is an error naming the right loader
        let e = Mae::from_pretrained("m3ae-test/m3ae-tiny", &opts, &dev)
            .unwrap_err()
            .to_string();
        assert!(e.contains("load_m3ae"), "{e}");
        // local paths keep working through the same entry point
        let local = M3ae::from_pretrained(fixtures().join("m3ae_model.pkl"), &opts, &dev).unwrap();
        same_weights(local.params(), m.params());
        std::fs::remove_dir_all(&home).ok();
    }

    #[test]
    fn the_pipeline_takes_a_repository_id_with_its_tokenizer() {
        use m3ae::eval::{Pipeline, PipelineOptions};
        let home = tmp("pipeline");
        let cache = fake_cache(&home);
        let opts = PipelineOptions {
            hub: HubOptions::offline().with_cache_dir(&cache),
            ..Default::default()
        };
        let pipe = Pipeline::from_pretrained("m3ae-test/m3ae-tiny", &opts).unwrap();
        assert!(pipe.resolved().unwrap().to_string_lossy().contains(HASH));
        let image = m3ae::data::RgbImage {
            width: 32,
            height: 32,
            data: [200, 40, 40].repeat(32 * 32),
        };
        // the tokenizer of the snapshot, found next to the weights
        let words = pipe.predict_masked_words(&image, "a red ring").unwrap();
        assert!(!words.is_empty());
        let (_, from) = pipe.tokenizer_and_source().unwrap();
        assert!(
            from.ends_with("tokenizer.json") && from.contains(HASH),
            "{from}"
        );
        let feats = pipe.embed_pairs(&[image], &["a red ring"]).unwrap();
        assert_eq!(feats.dims(), &[1, pipe.config().emb_dim]);
        std::fs::remove_dir_all(&home).ok();
    }

    #[test]
    fn uncached_model_offline_is_an_error_naming_repo_and_file() {
        let home = tmp("missing");
        let cache = fake_cache(&home);
        let opts = HubOptions::offline().with_cache_dir(&cache);
        let e = M3ae::from_pretrained("m3ae-test/not-there", &opts, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m3ae-test/not-there") && e.contains("model.safetensors"),
            "{e}"
        );
        assert!(e.contains("offline"), "{e}");
        std::fs::remove_dir_all(&home).ok();
    }

    #[test]
    fn cli_uses_hf_home_and_stays_offline() {
        let home = tmp("cli");
        fake_cache(&home);
        let out = home.join("feats.safetensors");
        // `--offline`
        let (ok, text) = cli(
            &[
                "--offline",
                "embed",
                "--checkpoint",
                "m3ae-test/m3ae-tiny",
                "--data",
                "scenes:test:4",
                "--out",
                out.to_str().unwrap(),
            ],
            &home,
            &[],
        );
        assert!(ok, "{text}");
        assert!(text.contains("4 x 64 features"), "{text}");
        assert!(text.contains(HASH), "the snapshot is used: {text}");
        // HF_HUB_OFFLINE=1, the official pickle repository
        let (ok, text) = cli(
            &[
                "embed",
                "--checkpoint",
                "m3ae-test/official-mae",
                "--data",
                "scenes:test:4",
                "--out",
                out.to_str().unwrap(),
            ],
            &home,
            &[("HF_HUB_OFFLINE", "1")],
        );
        assert!(ok, "{text}");
        assert!(text.contains("model: MAE"), "{text}");
        // reconstruct with a caption: the tokenizer comes from the repository's snapshot
        let png = home.join("x.png");
        image::RgbImage::from_pixel(32, 32, image::Rgb([200, 40, 40]))
            .save(&png)
            .unwrap();
        let recon = home.join("recon.png");
        let (ok, text) = cli(
            &[
                "--offline",
                "reconstruct",
                "--checkpoint",
                "m3ae-test/m3ae-tiny",
                "--image",
                png.to_str().unwrap(),
                "--caption",
                "a red ring",
                "--out",
                recon.to_str().unwrap(),
            ],
            &home,
            &[],
        );
        assert!(ok, "{text}");
        assert!(text.contains("predicted caption"), "{text}");
        // not cached, offline: the error names the repository and the file
        let (ok, text) = cli(
            &[
                "--offline",
                "embed",
                "--checkpoint",
                "m3ae-test/absent",
                "--data",
                "scenes:test:4",
                "--out",
                out.to_str().unwrap(),
            ],
            &home,
            &[],
        );
        assert!(!ok);
        assert!(
            text.contains("m3ae-test/absent") && text.contains("model.safetensors"),
            "{text}"
        );
        std::fs::remove_dir_all(&home).ok();
    }
}

#[cfg(not(feature = "hub"))]
#[test]
fn without_the_feature_a_repository_id_says_to_enable_it() {
    let home = tmp("nohub");
    let (ok, text) = cli(
        &[
            "embed",
            "--checkpoint",
            "some-org/some-model",
            "--data",
            "scenes:test:4",
            "--out",
            home.join("f.safetensors").to_str().unwrap(),
        ],
        &home,
        &[],
    );
    assert!(!ok);
    assert!(
        text.contains("some-org/some-model") && text.contains("`hub` feature"),
        "{text}"
    );
    std::fs::remove_dir_all(&home).ok();
}

mod common;

fn tmp(name: &str) -> PathBuf {
    common::temp_dir("hub", name)
}
