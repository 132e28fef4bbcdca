//! The lean byte-level BPE path (what it accepts is listed in the module
//! docs of `tokenizer`; `config` decides).
//!
//! Encoding is: split on added tokens (two passes, as HF), NFC each piece,
//! split it with a hand-written scanner, then BPE each pre-token's raw bytes
//! through a per-thread cache. No offsets, token strings or alignment maps
//! are built, which is where HF spends most of its time.

use std::borrow::Cow;

use unicode_normalization_alignments::{is_nfc_quick, IsNormalized, UnicodeNormalization};

use super::added::{self, AddedMatcher, Piece};
use super::bpe::{BpeModel, Session, DEFAULT_CACHE_CAPACITY};
use super::config::{self, Normalizer};
use super::pretok::{PreTokenizer, SplitPattern};

pub(crate) struct FastTokenizer {
    raw_added: Option<AddedMatcher>,
    normalized_added: Option<AddedMatcher>,
    normalizer: Normalizer,
    add_prefix_space: bool,
    pre_tokenizer: PreTokenizer,
    bpe: BpeModel,
}

impl FastTokenizer {
    /// Builds the fast path for `json`, or says why it does not apply.
    /// `hf` is the same file loaded by the `tokenizers` crate: it assigns the
    /// added-token ids.
    pub(crate) fn from_json(json: &str, hf: &tokenizers::Tokenizer) -> Result<Self, String> {
        let cfg = config::parse(json)?;
        let mut raw = Vec::new();
        let mut normalized = Vec::new();
        for (id, t) in hf.get_added_tokens_decoder() {
            if t.lstrip || t.rstrip || t.single_word {
                return Err(format!(
                    "added token {:?} uses lstrip/rstrip/single_word",
                    t.content
                ));
            }
            if t.normalized {
                // Matched in its normalized spelling on normalized text.
                normalized.push((normalize(&t.content, cfg.normalizer).into_owned(), id));
            } else {
                raw.push((t.content, id));
            }
        }
        let pre_tokenizer = PreTokenizer::new(cfg.pattern).map_err(str::to_string)?;
        let bpe = BpeModel::new(
            &cfg.vocab,
            &cfg.merges,
            cfg.ignore_merges,
            DEFAULT_CACHE_CAPACITY,
        )?;
        Ok(Self {
            raw_added: AddedMatcher::new(raw)?,
            normalized_added: AddedMatcher::new(normalized)?,
            normalizer: cfg.normalizer,
            add_prefix_space: cfg.add_prefix_space,
            pre_tokenizer,
            bpe,
        })
    }

    pub(crate) fn backend_name(&self) -> &'static str {
        match self.pre_tokenizer.pattern() {
            SplitPattern::Gpt2 => "bpe-fast:gpt2",
            SplitPattern::Qwen2 => "bpe-fast:qwen2",
            SplitPattern::Cl100k => "bpe-fast:cl100k",
        }
    }

    pub(crate) fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        self.bpe.with_session(|session| {
            added::split(self.raw_added.as_ref(), text, |piece| match piece {
                Piece::Token(id) => out.push(id),
                Piece::Text(raw) => {
                    let normalized = normalize(raw, self.normalizer);
                    added::split(
                        self.normalized_added.as_ref(),
                        &normalized,
                        |piece| match piece {
                            Piece::Token(id) => out.push(id),
                            Piece::Text(t) => self.encode_piece(t, session, &mut out),
                        },
                    );
                }
            });
        });
        out
    }

    /// Pre-tokenizes and BPE-encodes one piece of normalized text.
    #[inline]
    fn encode_piece(&self, text: &str, session: &mut Session<'_>, out: &mut Vec<u32>) {
        if self.add_prefix_space && !text.starts_with(' ') {
            let prefixed = format!(" {text}");
            self.pre_tokenizer
                .for_each(&prefixed, |w| session.encode_word(w, out));
        } else {
            self.pre_tokenizer
                .for_each(text, |w| session.encode_word(w, out));
        }
    }
}

/// HF's NFC (Unicode 9 tables of `unicode-normalization-alignments`), skipped
/// when a quick check proves the text is already NFC.
fn normalize(text: &str, normalizer: Normalizer) -> Cow<'_, str> {
    match normalizer {
        Normalizer::None => Cow::Borrowed(text),
        Normalizer::Nfc => {
            if text.is_ascii() || is_nfc_quick(text.chars()) == IsNormalized::Yes {
                Cow::Borrowed(text)
            } else {
                Cow::Owned(text.nfc().map(|(c, _)| c).collect())
            }
        }
    }
}
