//! Tokenization with the official behaviour over the `tokenizers` crate.
//!
//! bert-base-uncased WordPiece, **no special tokens** (`[CLS]` / `[SEP]` are not added), truncation to
//! `max_len` (64 for image-text, 256 for unpaired text), padding with id 0, padding mask
//! `1 - attention_mask` (1 = padding). An empty text (or one that tokenizes to nothing) gives
//! all-zero ids and an all-ones mask. Truncation and padding baked into a `tokenizer.json` are
//! switched off and done here instead, so the file's settings never leak in.

use crate::{Error, Result};
use std::path::{Path, PathBuf};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::AddedToken;

/// A tokenized text of fixed length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    /// `max_len` token ids, padded with 0.
    pub ids: Vec<u32>,
    /// `max_len` flags, 1 = padding, 0 = token.
    pub padding: Vec<u8>,
}

/// A WordPiece tokenizer with the official encoding rules.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tokenizer({}, vocab {})",
            self.path.display(),
            self.vocab_size()
        )
    }
}

impl Tokenizer {
    /// Loads a `tokenizer.json` (e.g. bert-base-uncased) and disables its own truncation and
    /// padding. A file that does not exist or does not parse is an error naming the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| Error::Tokenizer {
            path: path.into(),
            msg: e.to_string(),
        })?;
        Self::wrap(inner, path.into())
    }

    /// Loads a tokenizer by name or path: an existing file is read as a `tokenizer.json`, an
    /// existing folder's `tokenizer.json` is read, and anything else that has the form of a
    /// Hugging Face repository id (`bert-base-uncased`, `org/name`) is looked up as that
    /// repository's `tokenizer.json` in the local Hugging Face cache, downloaded only when it is
    /// not cached and `opts` is not offline (see [`crate::hub`]; needs the `hub` feature,
    /// without which the error says so).
    ///
    /// ```
    /// use m3ae_data::{HubOptions, Tokenizer};
    /// let dir = std::env::temp_dir().join(format!("m3ae-doc-tok-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir)?;
    /// Tokenizer::train_wordpiece(["a red ring"], 50)?.save(dir.join("tokenizer.json"))?;
    /// let tok = Tokenizer::from_pretrained(dir.to_str().unwrap(), &HubOptions::offline())?;
    /// assert_eq!(tok.decode(&tok.encode("a red ring", 3)?.ids)?, "a red ring");
    /// std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_pretrained(name_or_path: &str, opts: &crate::hub::HubOptions) -> Result<Self> {
        let p = Path::new(name_or_path);
        if p.is_dir() {
            return Self::from_file(p.join("tokenizer.json"));
        }
        if !p.exists() && crate::hub::is_repo_id(name_or_path) {
            let file = crate::hub::hub_file(name_or_path, "tokenizer.json", opts)?;
            return Self::from_file(file);
        }
        Self::from_file(p)
    }

    fn wrap(mut inner: tokenizers::Tokenizer, path: PathBuf) -> Result<Self> {
        inner
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer {
                path: path.clone(),
                msg: e.to_string(),
            })?
            .with_padding(None);
        Ok(Self { inner, path })
    }

    /// Trains a BERT-style WordPiece tokenizer (lower-casing BERT normaliser and
    /// pre-tokenizer) on `corpus` with at most `vocab_size` tokens; `[PAD]` is id 0, followed by
    /// `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]`. For the captioned scenes and users without a hub.
    ///
    /// ```
    /// let tok = m3ae_data::Tokenizer::train_wordpiece(["a red ring", "a blue ring on the left"], 100)?;
    /// let t = tok.encode("A red ring", 4)?;
    /// assert_eq!(t.padding, vec![0, 0, 0, 1]);
    /// assert_eq!(tok.decode(&t.ids)?, "a red ring");
    /// # Ok::<(), m3ae_data::Error>(())
    /// ```
    pub fn train_wordpiece<'a>(
        corpus: impl IntoIterator<Item = &'a str>,
        vocab_size: usize,
    ) -> Result<Self> {
        let err = |e: tokenizers::Error| Error::Tokenizer {
            path: PathBuf::new(),
            msg: e.to_string(),
        };
        let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
        let bert = |model: WordPiece| -> Result<tokenizers::Tokenizer> {
            let mut t = tokenizers::Tokenizer::new(model);
            t.with_normalizer(Some(BertNormalizer::default()))
                .map_err(err)?;
            t.with_pre_tokenizer(Some(BertPreTokenizer));
            t.with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::default()));
            Ok(t)
        };
        let added: Vec<AddedToken> = specials
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect();
        // A deterministic WordPiece vocabulary (the `tokenizers` trainer breaks ties in hash-map
        // order, so two trainings on one corpus can give different vocabularies): every character
        // seen, as a word start and as a `##` continuation (so any word can be spelled), then
        // whole words by frequency (ties by text) while room remains. BERT splitting: lower-case,
        // whitespace, and each punctuation character on its own.
        let mut words = std::collections::BTreeMap::<String, usize>::new();
        let mut chars = std::collections::BTreeSet::<char>::new();
        for line in corpus {
            let lower = line.to_lowercase();
            let mut word = String::new();
            let flush = |w: &mut String, words: &mut std::collections::BTreeMap<String, usize>| {
                if !w.is_empty() {
                    *words.entry(std::mem::take(w)).or_default() += 1;
                }
            };
            for c in lower.chars() {
                if c.is_whitespace() {
                    flush(&mut word, &mut words);
                } else if c.is_ascii_punctuation() || (!c.is_alphanumeric() && !c.is_whitespace()) {
                    flush(&mut word, &mut words);
                    chars.insert(c);
                    *words.entry(c.to_string()).or_default() += 1;
                } else {
                    chars.insert(c);
                    word.push(c);
                }
            }
            flush(&mut word, &mut words);
        }
        let mut tokens = std::collections::BTreeSet::<String>::new();
        for c in &chars {
            tokens.insert(c.to_string());
            tokens.insert(format!("##{c}"));
        }
        let mut by_freq: Vec<(&String, &usize)> = words.iter().collect();
        by_freq.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (w, _) in by_freq {
            if tokens.len() + specials.len() >= vocab_size.max(specials.len() + 2 * chars.len()) {
                break;
            }
            tokens.insert(w.clone());
        }
        let rest: Vec<String> = tokens.into_iter().collect();
        let vocab: serde_json::Map<String, serde_json::Value> = specials
            .iter()
            .map(|s| s.to_string())
            .chain(rest)
            .enumerate()
            .map(|(i, t)| (t, serde_json::Value::from(i as u32)))
            .collect();
        let model_json = serde_json::json!({
            "type": "WordPiece",
            "unk_token": "[UNK]",
            "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100,
            "vocab": vocab,
        })
        .to_string();
        let model: WordPiece = serde_json::from_str(&model_json).map_err(|e| Error::Tokenizer {
            path: PathBuf::new(),
            msg: e.to_string(),
        })?;
        let mut inner = bert(model)?;
        inner.add_special_tokens(added).map_err(err)?;
        Self::wrap(inner, PathBuf::new())
    }

    /// Saves the tokenizer as `tokenizer.json` (atomically: see [`m3ae_model::fsio`]).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let json = self.inner.to_string(false).map_err(|e| Error::Tokenizer {
            path: path.into(),
            msg: e.to_string(),
        })?;
        m3ae_model::fsio::atomic_write(path, json.as_bytes()).map_err(|e| Error::io(path, e))
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text` without special tokens and without truncation.
    pub fn ids(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                msg: e.to_string(),
            })?
            .get_ids()
            .to_vec())
    }

    /// Official encoding: no special tokens, truncated to `max_len`, padded with 0; padding
    /// mask 1 at padding. Empty text gives all-zero ids and an all-ones mask.
    pub fn encode(&self, text: &str, max_len: usize) -> Result<Tokenized> {
        let mut ids = if text.trim().is_empty() {
            Vec::new()
        } else {
            self.ids(text)?
        };
        ids.truncate(max_len);
        let n = ids.len();
        ids.resize(max_len, 0);
        let mut padding = vec![0u8; n];
        padding.resize(max_len, 1);
        Ok(Tokenized { ids, padding })
    }

    /// Text of `ids`, skipping special tokens and padding.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            msg: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_truncated_and_bad_files() {
        let tok = Tokenizer::train_wordpiece(["one two three four five"], 60).unwrap();
        let e = tok.encode("", 3).unwrap();
        assert_eq!(e.ids, vec![0, 0, 0]);
        assert_eq!(e.padding, vec![1, 1, 1]);
        let t = tok.encode("one two three four five", 2).unwrap();
        assert_eq!(t.padding, vec![0, 0]);
        assert_eq!(tok.decode(&t.ids).unwrap(), "one two");
        let dir = std::env::temp_dir().join(format!("m3ae-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("tokenizer.json");
        std::fs::write(&bad, b"{ not json").unwrap();
        let err = Tokenizer::from_file(&bad).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        assert!(Tokenizer::from_file(dir.join("missing.json")).is_err());
        let good = dir.join("trained.json");
        tok.save(&good).unwrap();
        let back = Tokenizer::from_file(&good).unwrap();
        assert_eq!(
            back.encode("three four", 4).unwrap(),
            tok.encode("three four", 4).unwrap()
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn training_is_deterministic() {
        let corpus = [
            "a red ring on the left",
            "a big blue star at the top",
            "a tiny cross",
        ];
        let a = Tokenizer::train_wordpiece(corpus, 80).unwrap();
        let b = Tokenizer::train_wordpiece(corpus, 80).unwrap();
        for s in corpus {
            assert_eq!(a.ids(s).unwrap(), b.ids(s).unwrap());
        }
    }
}

#[cfg(test)]
mod determinism_tests {
    use super::*;

    #[test]
    fn trained_vocabulary_is_the_same_every_time() {
        let corpus: Vec<String> = (0..300)
            .map(|i| {
                format!(
                    "a {} ring, {} at the left.",
                    ["red", "blue", "big"][i % 3],
                    ["square", "disc"][i % 2]
                )
            })
            .collect();
        let a = Tokenizer::train_wordpiece(corpus.iter().map(String::as_str), 60).unwrap();
        for _ in 0..5 {
            let b = Tokenizer::train_wordpiece(corpus.iter().map(String::as_str), 60).unwrap();
            assert_eq!(a.vocab_size(), b.vocab_size());
            let s = "A big red ring, square at the left.";
            assert_eq!(a.ids(s).unwrap(), b.ids(s).unwrap());
        }
        // words not in the vocabulary are spelled from characters, never lost
        let ids = a.ids("zebra").unwrap();
        assert!(!ids.is_empty());
    }
}
