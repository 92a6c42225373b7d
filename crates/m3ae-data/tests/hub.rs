//! Tokenizers by Hugging Face repository id (feature `hub`), on a fake Hugging Face cache the test
//! builds itself in the real layout (`models--{org}--{name}/refs/main` holding a commit hash,
//! `snapshots/{hash}/tokenizer.json`). Nothing here uses the network: lookups are offline, and the
//! one lookup that is allowed to go online points at a closed port on the loopback address.
#![cfg(feature = "hub")]

mod common;
use common::TempDir;
use m3ae_data::hub::{hub_file, is_cached, HubOptions};
use m3ae_data::Tokenizer;
use std::path::Path;

const HASH: &str = "0123456789abcdef0123456789abcdef01234567";

/// Puts `files` into the fake cache at `cache` as repository `repo`, revision `main`.
fn cache_repo(cache: &Path, repo: &str, files: &[(&str, &[u8])]) {
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs/main"), HASH).unwrap();
    let snap = folder.join("snapshots").join(HASH);
    std::fs::create_dir_all(&snap).unwrap();
    for (name, data) in files {
        std::fs::write(snap.join(name), data).unwrap();
    }
}

fn small_tokenizer() -> Tokenizer {
    Tokenizer::train_wordpiece(["a red ring on the left", "a blue star"], 80).unwrap()
}

fn tokenizer_bytes(dir: &Path) -> Vec<u8> {
    let f = dir.join("saved-tokenizer.json");
    small_tokenizer().save(&f).unwrap();
    std::fs::read(f).unwrap()
}

#[test]
fn tokenizer_resolves_from_the_cache_offline() {
    let tmp = TempDir::new("hub-tok");
    let cache = tmp.path().join("hub");
    cache_repo(
        &cache,
        "test-org/tiny-bert",
        &[("tokenizer.json", &tokenizer_bytes(tmp.path()))],
    );
    let opts = HubOptions::offline().with_cache_dir(&cache);
    assert!(is_cached("test-org/tiny-bert", "tokenizer.json", &opts));
    let path = hub_file("test-org/tiny-bert", "tokenizer.json", &opts).unwrap();
    assert!(path.ends_with(format!("snapshots/{HASH}/tokenizer.json")));
    let tok = Tokenizer::from_pretrained("test-org/tiny-bert", &opts).unwrap();
    let want = small_tokenizer();
    assert_eq!(
        tok.encode("a red star", 6).unwrap(),
        want.encode("a red star", 6).unwrap()
    );
    // A repository id without an organisation, and a pinned commit hash.
    cache_repo(
        &cache,
        "tiny-bert",
        &[("tokenizer.json", &tokenizer_bytes(tmp.path()))],
    );
    assert!(Tokenizer::from_pretrained("tiny-bert", &opts).is_ok());
    let pinned = HubOptions {
        revision: Some(HASH.into()),
        ..opts.clone()
    };
    assert!(Tokenizer::from_pretrained("tiny-bert", &pinned).is_ok());
}

#[test]
fn missing_file_offline_names_the_repo_and_the_file() {
    let tmp = TempDir::new("hub-missing");
    let cache = tmp.path().join("hub");
    // The repository is cached, but without a tokenizer.
    cache_repo(&cache, "test-org/no-tok", &[("config.json", b"{}")]);
    let opts = HubOptions::offline().with_cache_dir(&cache);
    for repo in ["test-org/no-tok", "test-org/not-cached-at-all"] {
        let e = Tokenizer::from_pretrained(repo, &opts)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(repo) && e.contains("tokenizer.json") && e.contains("offline"),
            "{e}"
        );
    }
}

#[test]
fn online_lookup_uses_the_cache_first_and_names_the_repo_when_the_hub_is_unreachable() {
    let tmp = TempDir::new("hub-online");
    let cache = tmp.path().join("hub");
    cache_repo(
        &cache,
        "test-org/cached",
        &[("tokenizer.json", &tokenizer_bytes(tmp.path()))],
    );
    // Online, but the "hub" is a closed port on this machine: a cached file must not need it.
    let opts = HubOptions {
        cache_dir: Some(cache.clone()),
        offline: false,
        revision: None,
        endpoint: Some("http://127.0.0.1:9".into()),
    };
    assert!(
        !opts.is_offline(),
        "HF_HUB_OFFLINE is set: this test checks the online path; run it without that variable"
    );
    assert!(Tokenizer::from_pretrained("test-org/cached", &opts).is_ok());
    let e = hub_file("test-org/elsewhere", "tokenizer.json", &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("test-org/elsewhere") && e.contains("tokenizer.json"),
        "{e}"
    );
}

#[test]
fn local_paths_still_win_over_repository_ids() {
    let tmp = TempDir::new("hub-local");
    let dir = tmp.path().join("test-org");
    std::fs::create_dir_all(dir.join("local")).unwrap();
    small_tokenizer()
        .save(dir.join("local/tokenizer.json"))
        .unwrap();
    // `test-org/local` exists relative to the temp dir: read it as a folder, not a repo id.
    let path = dir.join("local");
    let tok = Tokenizer::from_pretrained(path.to_str().unwrap(), &HubOptions::offline());
    assert!(tok.is_ok());
}
