//! Files of Hugging Face Hub repositories, found by repository id (`bert-base-uncased`,
//! `org/name`) in the local Hugging Face cache and downloaded only when they are not cached and
//! offline mode is off.
//!
//! The cache has the layout every Hugging Face client shares:
//!
//! ```text
//! <cache>/models--{org}--{name}/refs/main              the commit hash of `main`
//! <cache>/models--{org}--{name}/snapshots/{hash}/...   the files of that commit
//! ```
//!
//! `<cache>` is [`HubOptions::cache_dir`], else `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`. Offline mode is [`HubOptions::offline`] or the environment variable
//! `HF_HUB_OFFLINE` set to `1` (or `true`, `yes`, `on`): a file that is not cached is then an error
//! naming the repository and the file, and nothing is sent over the network. A cached file is
//! always used as it is, without asking the Hub for a newer revision.
//!
//! Lookups and downloads need the crate feature `hub` (the `hf-hub` crate); without it
//! [`hub_file`] answers every repository id with an error that says so. [`is_repo_id`] and
//! [`HubOptions`] exist in every build, so callers need no `cfg` of their own.

use crate::{Error, Result};
use std::path::PathBuf;

/// Where and how Hub files are looked up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache folder (the one holding `models--*`); `None`: `$HF_HUB_CACHE`,
    /// `$HF_HOME/hub` or `~/.cache/huggingface/hub`.
    pub cache_dir: Option<PathBuf>,
    /// Never use the network: a file that is not cached is an error. `HF_HUB_OFFLINE=1` has the
    /// same effect.
    pub offline: bool,
    /// Branch, tag or commit hash (`None`: `main`).
    pub revision: Option<String>,
    /// Hub address for downloads (`None`: `$HF_ENDPOINT`, else `https://huggingface.co`).
    pub endpoint: Option<String>,
}

impl HubOptions {
    /// Options that never touch the network.
    ///
    /// ```
    /// let o = m3ae_data::hub::HubOptions::offline();
    /// assert!(o.is_offline());
    /// assert_eq!(o.revision(), "main");
    /// ```
    pub fn offline() -> Self {
        Self {
            offline: true,
            ..Self::default()
        }
    }

    /// The same options with another cache folder.
    pub fn with_cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = Some(dir.into());
        self
    }

    /// True when [`HubOptions::offline`] is set or `HF_HUB_OFFLINE` is `1`, `true`, `yes` or `on`.
    pub fn is_offline(&self) -> bool {
        self.offline
            || std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            })
    }

    /// The revision looked up (`main` unless set).
    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }

    /// The cache folder these options use, if one can be named (no home folder and no
    /// environment variable gives `None`).
    pub fn resolved_cache_dir(&self) -> Option<PathBuf> {
        if let Some(d) = &self.cache_dir {
            return Some(d.clone());
        }
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        if let Some(d) = var("HF_HUB_CACHE") {
            return Some(PathBuf::from(d));
        }
        if let Some(d) = var("HF_HOME") {
            return Some(PathBuf::from(d).join("hub"));
        }
        var("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
    }
}

/// File endings that mark a name as a local file rather than a repository id.
const FILE_ENDINGS: [&str; 10] = [
    ".json",
    ".safetensors",
    ".pkl",
    ".toml",
    ".txt",
    ".jsonl",
    ".h5",
    ".hdf5",
    ".tar",
    ".csv",
];

/// True when `s` has the form of a Hub repository id: `name` or `org/name`, each part of ASCII
/// letters, digits, `-`, `_` and `.`, not starting or ending with `-` or `.`, without `--` or
/// `..`, at most 96 characters, and not ending like a file name (`.json`, `.safetensors`, ...).
///
/// ```
/// use m3ae_data::hub::is_repo_id;
/// assert!(is_repo_id("bert-base-uncased"));
/// assert!(is_repo_id("young-geng/m3ae_large"));
/// assert!(!is_repo_id("runs/tiny/checkpoints/step-00000400"));
/// assert!(!is_repo_id("./weights"));
/// assert!(!is_repo_id("tokenizer.json"));
/// ```
pub fn is_repo_id(s: &str) -> bool {
    if s.is_empty() || s.len() > 96 || s.contains("--") || s.contains("..") {
        return false;
    }
    let lower = s.to_ascii_lowercase();
    if FILE_ENDINGS.iter().any(|e| lower.ends_with(e)) {
        return false;
    }
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !p.starts_with(['-', '.'])
                && !p.ends_with(['-', '.'])
        })
}

fn hub_err(repo: &str, file: &str, msg: impl Into<String>) -> Error {
    Error::Hub {
        repo: repo.into(),
        file: file.into(),
        msg: msg.into(),
    }
}

/// The local path of `file` of the model repository `repo`: from the cache, else downloaded
/// into it (unless offline). Errors name the repository and the file.
///
/// Without the `hub` feature every call is an error that says to enable it.
pub fn hub_file(repo: &str, file: &str, opts: &HubOptions) -> Result<PathBuf> {
    if !is_repo_id(repo) {
        return Err(hub_err(
            repo,
            file,
            "not a valid Hugging Face repository id",
        ));
    }
    fetch(repo, file, opts)
}

/// True when `file` of `repo` is in the cache (never uses the network; always false without
/// the `hub` feature).
pub fn is_cached(repo: &str, file: &str, opts: &HubOptions) -> bool {
    cached(repo, file, opts).is_some()
}

#[cfg(not(feature = "hub"))]
fn cached(_repo: &str, _file: &str, _opts: &HubOptions) -> Option<PathBuf> {
    None
}

#[cfg(not(feature = "hub"))]
fn fetch(repo: &str, file: &str, _opts: &HubOptions) -> Result<PathBuf> {
    Err(hub_err(
        repo,
        file,
        "loading by Hugging Face repository id needs the `hub` feature (build with \
         `--features hub`); otherwise give the path of a local file or folder",
    ))
}

#[cfg(feature = "hub")]
fn cached(repo: &str, file: &str, opts: &HubOptions) -> Option<PathBuf> {
    use hf_hub::{Cache, Repo, RepoType};
    let dir = opts.resolved_cache_dir()?;
    let rev = opts.revision().to_string();
    let r = Repo::with_revision(repo.to_string(), RepoType::Model, rev.clone());
    let folder = dir.join(r.folder_name());
    if let Some(p) = Cache::new(dir).repo(r).get(file) {
        return Some(p);
    }
    // A revision given as a commit hash has a snapshot but no `refs/` entry.
    let is_hash = rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit());
    let direct = folder.join("snapshots").join(&rev).join(file);
    (is_hash && direct.is_file()).then_some(direct)
}

#[cfg(feature = "hub")]
fn fetch(repo: &str, file: &str, opts: &HubOptions) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Cache, Repo, RepoType};
    if let Some(p) = cached(repo, file, opts) {
        return Ok(p);
    }
    let dir = opts.resolved_cache_dir().ok_or_else(|| {
        hub_err(
            repo,
            file,
            "no cache folder: set HF_HOME or HF_HUB_CACHE (no home folder found)",
        )
    })?;
    if opts.is_offline() {
        return Err(hub_err(
            repo,
            file,
            format!(
                "not in the local cache {} (revision `{}`) and offline mode is on \
                 (HF_HUB_OFFLINE or the offline flag); fetch it once while online",
                dir.display(),
                opts.revision()
            ),
        ));
    }
    let endpoint = opts
        .endpoint
        .clone()
        .or_else(|| std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()));
    let mut builder = ApiBuilder::from_cache(Cache::new(dir.clone())).with_progress(false);
    if let Some(e) = endpoint {
        builder = builder.with_endpoint(e);
    }
    let api = builder
        .build()
        .map_err(|e| hub_err(repo, file, e.to_string()))?;
    let r = Repo::with_revision(repo.to_string(), RepoType::Model, opts.revision().into());
    api.repo(r).get(file).map_err(|e| {
        hub_err(
            repo,
            file,
            format!("download into {} failed: {e}", dir.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_paths_are_told_apart() {
        for id in ["gpt2", "bert-base-uncased", "org/name", "a.b_c/d-e.f"] {
            assert!(is_repo_id(id), "{id}");
        }
        for p in [
            "",
            "/abs/path",
            "a/b/c",
            "./x",
            "x/",
            "-x",
            "a--b",
            "a..b",
            "model.safetensors",
            "dir/model.pkl",
            "has space",
        ] {
            assert!(!is_repo_id(p), "{p}");
        }
    }

    #[test]
    fn explicit_cache_dir_wins() {
        let o = HubOptions::default().with_cache_dir("/tmp/x");
        assert_eq!(o.resolved_cache_dir(), Some(PathBuf::from("/tmp/x")));
    }

    #[cfg(not(feature = "hub"))]
    #[test]
    fn without_the_feature_a_repo_id_says_to_enable_it() {
        let e = hub_file("org/name", "tokenizer.json", &HubOptions::offline())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("org/name") && e.contains("tokenizer.json") && e.contains("`hub` feature"),
            "{e}"
        );
    }
}
