//! Splitting text on added tokens, as HF's `AddedVocabulary` does.
//!
//! HF extracts added tokens in two passes: tokens with `normalized = false`
//! are matched on the raw text; each remaining piece is then normalized and
//! the `normalized = true` tokens (in their normalized spelling) are matched
//! on it. Both passes take leftmost-longest matches.

use aho_corasick::{AhoCorasick, MatchKind};

pub(crate) enum Piece<'a> {
    Text(&'a str),
    Token(u32),
}

/// One pass: a leftmost-longest automaton over the token strings.
pub(crate) struct AddedMatcher {
    automaton: AhoCorasick,
    ids: Vec<u32>,
}

impl AddedMatcher {
    /// `None` when there is nothing to match.
    pub(crate) fn new(tokens: Vec<(String, u32)>) -> Result<Option<Self>, String> {
        if tokens.is_empty() {
            return Ok(None);
        }
        let (patterns, ids): (Vec<String>, Vec<u32>) = tokens.into_iter().unzip();
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&patterns)
            .map_err(|e| e.to_string())?;
        Ok(Some(Self { automaton, ids }))
    }

    /// Calls `f` with the tokens and the non-empty text between them, in order.
    #[inline]
    pub(crate) fn split<'a>(&self, text: &'a str, mut f: impl FnMut(Piece<'a>)) {
        let mut last = 0;
        for m in self.automaton.find_iter(text) {
            if m.start() > last {
                f(Piece::Text(&text[last..m.start()]));
            }
            f(Piece::Token(self.ids[m.pattern().as_usize()]));
            last = m.end();
        }
        if last < text.len() {
            f(Piece::Text(&text[last..]));
        }
    }
}

/// Splits with an optional matcher (no matcher: the whole non-empty text).
#[inline]
pub(crate) fn split<'a>(
    matcher: Option<&AddedMatcher>,
    text: &'a str,
    mut f: impl FnMut(Piece<'a>),
) {
    match matcher {
        Some(m) => m.split(text, f),
        None if !text.is_empty() => f(Piece::Text(text)),
        None => {}
    }
}
