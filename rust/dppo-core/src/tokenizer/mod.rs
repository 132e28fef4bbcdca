//! Tokenization: ids identical to Hugging Face `tokenizers`, computed faster.
//!
//! [`Tokenizer`] loads a `tokenizer.json` and encodes text to the ids that
//! `tokenizers::Tokenizer::encode(text, add_special_tokens = false)` returns.
//! Byte-level BPE tokenizers in the GPT-2, Qwen2 and cl100k/Llama-3 styles are
//! encoded by a lean path of this module; any configuration that path does
//! not reproduce exactly (see [`Tokenizer::fallback_reason`]) is encoded by
//! the `tokenizers` crate itself, so correctness never depends on the fast
//! path. Decoding and vocabulary queries always use the `tokenizers` crate.
//!
//! The fast path handles:
//! - model `BPE` whose vocab holds all 256 byte-level tokens, merges in the
//!   `"a b"` or `["a", "b"]` form, `ignore_merges`; no dropout, no
//!   continuing-subword prefix or end-of-word suffix, no byte fallback;
//! - normalizer none, `NFC`, or a `Sequence` of `NFC`s;
//! - pre-tokenizer `ByteLevel(use_regex=true)` (any `add_prefix_space`), or
//!   `Split(Regex(P), Isolated, invert=false)` followed by
//!   `ByteLevel(use_regex=false, add_prefix_space=false)` where P is the
//!   GPT-2, Qwen2 or cl100k pattern ([`pretok`]);
//! - added tokens without `lstrip`, `rstrip` or `single_word` (special or not,
//!   normalized or not);
//! - no `truncation` and no `padding` section.

mod added;
mod bpe;
mod bytelevel;
mod config;
mod fast;
pub mod pretok;

use std::path::Path;

use rayon::prelude::*;

pub use pretok::SplitPattern;

/// Errors of [`Tokenizer`].
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid tokenizer.json: {0}")]
    Invalid(String),
    /// An error of the `tokenizers` crate while encoding or decoding.
    #[error("tokenizers: {0}")]
    Tokenizers(String),
}

/// How a [`Tokenizer`] is built.
#[derive(Clone, Debug, Default)]
pub struct TokenizerOptions {
    /// Never use the fast path: every call goes to the `tokenizers` crate.
    /// Meant for parity tests and for ruling the fast path out when debugging.
    pub force_fallback: bool,
}

/// A `tokenizer.json` tokenizer that returns ids only. `Send + Sync`.
pub struct Tokenizer {
    hf: tokenizers::Tokenizer,
    fast: Option<fast::FastTokenizer>,
    fallback_reason: Option<String>,
    fingerprint: String,
    vocab_size: usize,
    added: Vec<(String, u32, bool)>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("backend", &self.backend_name())
            .field("fallback_reason", &self.fallback_reason)
            .field("vocab_size", &self.vocab_size)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads a `tokenizer.json`, using the fast path when it applies.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        Self::from_file_with_options(path, &TokenizerOptions::default())
    }

    /// Loads a `tokenizer.json` that always encodes with the `tokenizers` crate.
    pub fn from_file_fallback(path: &Path) -> Result<Self, TokenizerError> {
        Self::from_file_with_options(
            path,
            &TokenizerOptions {
                force_fallback: true,
            },
        )
    }

    pub fn from_file_with_options(
        path: &Path,
        options: &TokenizerOptions,
    ) -> Result<Self, TokenizerError> {
        let json = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json_str_with_options(&json, options)
    }

    /// Parses the content of a `tokenizer.json`, using the fast path when it applies.
    pub fn from_json_str(json: &str) -> Result<Self, TokenizerError> {
        Self::from_json_str_with_options(json, &TokenizerOptions::default())
    }

    /// Parses the content of a `tokenizer.json`; always encodes with the `tokenizers` crate.
    pub fn from_json_str_fallback(json: &str) -> Result<Self, TokenizerError> {
        Self::from_json_str_with_options(
            json,
            &TokenizerOptions {
                force_fallback: true,
            },
        )
    }

    pub fn from_json_str_with_options(
        json: &str,
        options: &TokenizerOptions,
    ) -> Result<Self, TokenizerError> {
        // The `tokenizers` crate is always built: it validates the file, is the
        // fallback, decodes, and is the authority on added-token ids.
        let hf: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e: tokenizers::Error| TokenizerError::Invalid(e.to_string()))?;

        let mut added: Vec<(String, u32, bool)> = hf
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (t.content, id, t.special))
            .collect();
        added.sort_by_key(|t| t.1);

        let vocab_size = hf
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1);

        let (fast, fallback_reason) = if options.force_fallback {
            (None, Some("fallback forced by options".to_string()))
        } else {
            match fast::FastTokenizer::from_json(json, &hf) {
                Ok(f) => (Some(f), None),
                Err(reason) => (None, Some(reason)),
            }
        };

        Ok(Self {
            hf,
            fast,
            fallback_reason,
            fingerprint: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(json.as_bytes())),
            vocab_size,
            added,
        })
    }

    /// Token ids of `text`, as HF `encode(text, add_special_tokens=False).ids`:
    /// no BOS/EOS are added, added/special tokens written in the text are recognised.
    ///
    /// The fast path never fails; the `tokenizers` crate's fallback path fails only with
    /// inconsistent files (for instance an `unk_token` missing from the vocabulary).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match &self.fast {
            Some(f) => Ok(f.encode(text)),
            None => self
                .hf
                .encode(text, false)
                .map(|enc| enc.get_ids().to_vec())
                .map_err(|e| TokenizerError::Tokenizers(e.to_string())),
        }
    }

    /// [`encode`](Self::encode) over many texts, in parallel on the rayon pool.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, TokenizerError> {
        texts.par_iter().map(|t| self.encode(t)).collect()
    }

    /// Whether encoding runs on the lean byte-level BPE path.
    pub fn is_fast_path(&self) -> bool {
        self.fast.is_some()
    }

    /// `"bpe-fast:<pattern>"` (e.g. `"bpe-fast:qwen2"`) or `"tokenizers"`.
    pub fn backend_name(&self) -> &'static str {
        match &self.fast {
            Some(f) => f.backend_name(),
            None => "tokenizers",
        }
    }

    /// Why the fast path is not used (`None` when it is), e.g.
    /// `"normalizer Some(\"NFKC\") is not supported"`.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    /// Id of a token (added tokens first, then the model vocabulary), in the
    /// vocabulary's own spelling (byte-level strings such as `"Ġthe"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.hf.token_to_id(token)
    }

    /// The token string of an id, in the vocabulary's own spelling.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.hf.id_to_token(id)
    }

    /// Largest id (model vocabulary or added token) plus one.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// `(content, id, special)` of every added token, by increasing id.
    pub fn added_tokens(&self) -> Vec<(String, u32, bool)> {
        self.added.clone()
    }

    /// Decodes ids to text with the `tokenizers` crate's decoder.
    /// Returns an empty string when the ids cannot be decoded (unknown ids).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        self.try_decode(ids, skip_special_tokens)
            .unwrap_or_default()
    }

    pub fn try_decode(
        &self,
        ids: &[u32],
        skip_special_tokens: bool,
    ) -> Result<String, TokenizerError> {
        self.hf
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))
    }

    /// xxh3-64 of the `tokenizer.json` content, as 16 lowercase hex digits.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// The underlying `tokenizers` crate tokenizer.
    pub fn hf_tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.hf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
    }
}
