//! Hand-written scanners for the three split regexes used by byte-level BPE
//! tokenizers, producing exactly the matches Oniguruma produces for them.
//!
//! Each pattern covers every character (its last alternatives are `\s+` and
//! a negated class), so the regex's `find_iter` never skips input: every match
//! starts where the previous one ended. A scanner therefore only has to answer
//! "where does the match starting at `p` end?", trying the alternatives in
//! order the way a backtracking engine does.
//!
//! The character classes (`\p{L}`, `\p{N}`, `\s`) are not taken from a Rust
//! Unicode table: they are read out of the very Oniguruma build the
//! `tokenizers` crate links (see `CharClasses::from_onig`), so both sides
//! agree on every code point whatever Unicode version each was built with.

use std::sync::OnceLock;

/// Oniguruma `\p{L}`.
pub(crate) const LETTER: u8 = 1;
/// Oniguruma `\p{N}`.
pub(crate) const NUMBER: u8 = 2;
/// Oniguruma `\s`.
pub(crate) const SPACE: u8 = 4;
/// `\r` or `\n` (also flagged [`SPACE`]).
pub(crate) const NEWLINE: u8 = 8;
/// Neither letter, number nor space: `[^\s\p{L}\p{N}]`.
const OTHER_MASK: u8 = LETTER | NUMBER | SPACE;

/// The GPT-2 pattern hard-coded in HF's `ByteLevel` pre-tokenizer.
pub const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// The Qwen2 split pattern (single digits).
pub const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The cl100k / Llama-3 split pattern (digit groups of up to three).
pub const CL100K_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Which of the supported split regexes a scanner reproduces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitPattern {
    Gpt2,
    Qwen2,
    Cl100k,
}

impl SplitPattern {
    /// Recognises a regex by its exact source text.
    pub fn from_regex(regex: &str) -> Option<Self> {
        match regex {
            GPT2_PATTERN => Some(Self::Gpt2),
            QWEN2_PATTERN => Some(Self::Qwen2),
            CL100K_PATTERN => Some(Self::Cl100k),
            _ => None,
        }
    }

    pub fn regex(self) -> &'static str {
        match self {
            Self::Gpt2 => GPT2_PATTERN,
            Self::Qwen2 => QWEN2_PATTERN,
            Self::Cl100k => CL100K_PATTERN,
        }
    }
}

/// Per-code-point class bits, stored as deduplicated 128-code-point blocks.
pub(crate) struct CharClasses {
    index: Vec<u16>,
    blocks: Vec<u8>,
}

const BLOCK_BITS: u32 = 7;
const BLOCK: usize = 1 << BLOCK_BITS;
const MAX_CP: u32 = 0x10FFFF;

impl CharClasses {
    /// The process-wide table, built on first use (tens of milliseconds).
    /// `Err` when Oniguruma's classes overlap in a way the scanners do not
    /// model; callers then fall back to the `tokenizers` crate.
    pub(crate) fn get() -> Result<&'static CharClasses, &'static str> {
        static TABLE: OnceLock<Result<CharClasses, String>> = OnceLock::new();
        TABLE
            .get_or_init(Self::from_onig)
            .as_ref()
            .map_err(|e| e.as_str())
    }

    /// Reads the classes out of Oniguruma by running `\p{L}+`, `\p{N}+` and
    /// `\s+` over one string that holds the Unicode scalar values in order.
    /// Planes 4 to 13 are left out (as "other"): no Unicode version assigns
    /// anything there, and skipping them halves the scan.
    fn from_onig() -> Result<CharClasses, String> {
        let all: String = (0..=MAX_CP)
            .filter(|cp| !(0x4_0000..0xE_0000).contains(cp))
            .filter_map(char::from_u32)
            .collect();
        let members = |pattern: &str| -> Result<Vec<u32>, String> {
            let re = tokenizers::utils::SysRegex::new(pattern).map_err(|e| e.to_string())?;
            Ok(re
                .find_iter(&all)
                .flat_map(|(start, end)| all[start..end].chars().map(|c| c as u32))
                .collect())
        };
        // Plain threads, not rayon: a rayon worker waiting in `join` may pick up
        // a task that re-enters this `OnceLock` initialisation and deadlock.
        let (letters, numbers, spaces) = std::thread::scope(|scope| {
            let numbers = scope.spawn(|| members(r"\p{N}+"));
            let spaces = scope.spawn(|| members(r"\s+"));
            let letters = members(r"\p{L}+");
            let join = |h: std::thread::ScopedJoinHandle<'_, Result<Vec<u32>, String>>| {
                h.join()
                    .unwrap_or_else(|_| Err("class scan panicked".into()))
            };
            (letters, join(numbers), join(spaces))
        });
        let mut flat = vec![0u8; (MAX_CP as usize) + 1];
        for (cps, bit) in [(letters?, LETTER), (numbers?, NUMBER), (spaces?, SPACE)] {
            for cp in cps {
                flat[cp as usize] |= bit;
            }
        }
        flat[b'\r' as usize] |= NEWLINE;
        flat[b'\n' as usize] |= NEWLINE;
        if flat[b'\r' as usize] & SPACE == 0 || flat[b'\n' as usize] & SPACE == 0 {
            return Err("onig \\s does not contain \\r and \\n".into());
        }
        if let Some(cp) = flat.iter().position(|&c| (c & OTHER_MASK).count_ones() > 1) {
            return Err(format!("onig classes overlap at U+{cp:04X}"));
        }
        let mut index = Vec::with_capacity(flat.len() / BLOCK);
        let mut blocks: Vec<u8> = Vec::new();
        let mut seen: rustc_hash::FxHashMap<&[u8], u16> = Default::default();
        for chunk in flat.chunks(BLOCK) {
            let next = seen.len() as u16;
            let id = *seen.entry(chunk).or_insert(next);
            if id == next {
                blocks.extend_from_slice(chunk);
            }
            index.push(id);
        }
        Ok(CharClasses { index, blocks })
    }

    #[inline(always)]
    fn of(&self, cp: u32) -> u8 {
        let block = self.index[(cp >> BLOCK_BITS) as usize] as usize;
        self.blocks[block * BLOCK + (cp as usize & (BLOCK - 1))]
    }

    /// Class bits and UTF-8 length of the character starting at byte `i`.
    #[inline(always)]
    fn at(&self, s: &[u8], i: usize) -> (u8, usize) {
        let b0 = s[i];
        if b0 < 0x80 {
            return (self.of(b0 as u32), 1);
        }
        let (cp, len) = decode_multibyte(s, i);
        (self.of(cp), len)
    }

    /// End of the run of characters whose class intersects `mask`.
    #[inline(always)]
    fn run(&self, s: &[u8], mut i: usize, mask: u8) -> usize {
        while i < s.len() {
            let (c, l) = self.at(s, i);
            if c & mask == 0 {
                break;
            }
            i += l;
        }
        i
    }

    /// End of the run of `[^\s\p{L}\p{N}]` characters.
    #[inline(always)]
    fn run_other(&self, s: &[u8], mut i: usize) -> usize {
        while i < s.len() {
            let (c, l) = self.at(s, i);
            if c & OTHER_MASK != 0 {
                break;
            }
            i += l;
        }
        i
    }
}

/// Decodes a multi-byte UTF-8 sequence (the input comes from a `&str`).
#[inline(always)]
fn decode_multibyte(s: &[u8], i: usize) -> (u32, usize) {
    let b0 = s[i] as u32;
    if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | (s[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        (
            ((b0 & 0x0F) << 12) | ((s[i + 1] as u32 & 0x3F) << 6) | (s[i + 2] as u32 & 0x3F),
            3,
        )
    } else {
        (
            ((b0 & 0x07) << 18)
                | ((s[i + 1] as u32 & 0x3F) << 12)
                | ((s[i + 2] as u32 & 0x3F) << 6)
                | (s[i + 3] as u32 & 0x3F),
            4,
        )
    }
}

/// Splits text into pre-tokens exactly as Oniguruma's `find_iter` with one of
/// the supported patterns (HF `Split(.., Isolated)` keeps every match).
#[derive(Clone, Copy)]
pub struct PreTokenizer {
    pattern: SplitPattern,
    classes: &'static CharClasses,
}

impl PreTokenizer {
    pub fn new(pattern: SplitPattern) -> Result<Self, &'static str> {
        Ok(Self {
            pattern,
            classes: CharClasses::get()?,
        })
    }

    pub fn pattern(&self) -> SplitPattern {
        self.pattern
    }

    /// Calls `f` with every pre-token of `text`, in order.
    #[inline]
    pub fn for_each<'a>(&self, text: &'a str, mut f: impl FnMut(&'a [u8])) {
        let s = text.as_bytes();
        let mut p = 0;
        while p < s.len() {
            let e = match self.pattern {
                SplitPattern::Gpt2 => self.next_gpt2(s, p),
                SplitPattern::Qwen2 => self.next_qwen(s, p, 1),
                SplitPattern::Cl100k => self.next_qwen(s, p, 3),
            };
            f(&s[p..e]);
            p = e;
        }
    }

    /// Byte ranges of the pre-tokens (for tests and debugging).
    pub fn split_offsets(&self, text: &str) -> Vec<(usize, usize)> {
        let base = text.as_ptr() as usize;
        let mut out = Vec::new();
        self.for_each(text, |w| {
            let start = w.as_ptr() as usize - base;
            out.push((start, start + w.len()));
        });
        out
    }

    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
    #[inline]
    fn next_gpt2(&self, s: &[u8], p: usize) -> usize {
        let cc = self.classes;
        if s[p] == b'\'' {
            if let Some(e) = contraction(s, p + 1, false) {
                return e;
            }
        }
        let (c0, l0) = cc.at(s, p);
        let after0 = p + l0;
        // ` ?X+`: an optional leading space, then a run of the next char's class.
        let (class, run_start) = if s[p] == b' ' && after0 < s.len() {
            let (c1, l1) = cc.at(s, after0);
            if c1 & SPACE == 0 {
                (c1, after0 + l1)
            } else {
                (c0, after0)
            }
        } else {
            (c0, after0)
        };
        if class & LETTER != 0 {
            cc.run(s, run_start, LETTER)
        } else if class & NUMBER != 0 {
            cc.run(s, run_start, NUMBER)
        } else if class & SPACE == 0 {
            cc.run_other(s, run_start)
        } else {
            self.whitespace_tail(s, p, false)
        }
    }

    /// Qwen2 (`max_digits == 1`) and cl100k (`max_digits == 3`):
    /// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,k}|
    ///  ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
    #[inline]
    fn next_qwen(&self, s: &[u8], p: usize, max_digits: usize) -> usize {
        let cc = self.classes;
        let n = s.len();
        if s[p] == b'\'' {
            if let Some(e) = contraction(s, p + 1, true) {
                return e;
            }
        }
        let (c0, l0) = cc.at(s, p);
        let after0 = p + l0;
        if c0 & LETTER != 0 {
            return cc.run(s, after0, LETTER);
        }
        // `[^\r\n\p{L}\p{N}]?\p{L}+` with the optional char present; this
        // includes whitespace such as ' ', '\t' or U+3000 before a letter.
        if c0 & (NEWLINE | NUMBER) == 0 && after0 < n {
            let (c1, l1) = cc.at(s, after0);
            if c1 & LETTER != 0 {
                return cc.run(s, after0 + l1, LETTER);
            }
        }
        if c0 & NUMBER != 0 {
            let mut e = after0;
            for _ in 1..max_digits {
                if e >= n {
                    break;
                }
                let (c, l) = cc.at(s, e);
                if c & NUMBER == 0 {
                    break;
                }
                e += l;
            }
            return e;
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
        let punct_start = if c0 & SPACE == 0 {
            Some(after0)
        } else if s[p] == b' ' && after0 < n {
            let (c1, l1) = cc.at(s, after0);
            (c1 & OTHER_MASK == 0).then_some(after0 + l1)
        } else {
            None
        };
        if let Some(start) = punct_start {
            let mut e = cc.run_other(s, start);
            while e < n && (s[e] == b'\r' || s[e] == b'\n') {
                e += 1;
            }
            return e;
        }
        self.whitespace_tail(s, p, true)
    }

    /// The whitespace alternatives, for a match starting on a `\s` char at `p`:
    /// `\s*[\r\n]+` (when `newline_alt`), then `\s+(?!\S)`, then `\s+`.
    #[inline]
    fn whitespace_tail(&self, s: &[u8], p: usize, newline_alt: bool) -> usize {
        let cc = self.classes;
        let n = s.len();
        let mut e = p;
        let mut last_start = p;
        let mut after_last_newline = None;
        while e < n {
            let (c, l) = cc.at(s, e);
            if c & SPACE == 0 {
                break;
            }
            if c & NEWLINE != 0 {
                after_last_newline = Some(e + l);
            }
            last_start = e;
            e += l;
        }
        // `\s*` backtracks from the end of the run to its last newline, and
        // `[\r\n]+` then takes that newline (nothing after it is `[\r\n]`).
        if newline_alt {
            if let Some(end) = after_last_newline {
                return end;
            }
        }
        if e == n {
            return e;
        }
        // `(?!\S)` fails before the non-space char, so `\s+` gives back its
        // last char; with a single-char run `\s+` takes that char alone.
        if last_start > p {
            last_start
        } else {
            e
        }
    }
}

/// Matches the contraction suffix (the part after `'`) at `i`, returning the
/// end of the match. Case-insensitive matching follows Oniguruma's Unicode
/// case folding, where U+017F LATIN SMALL LETTER LONG S folds to `s`.
#[inline]
fn contraction(s: &[u8], i: usize, case_insensitive: bool) -> Option<usize> {
    let at = |k: usize| s.get(k).copied();
    let is = |k: usize, lower: u8| match at(k) {
        Some(b) if b == lower => true,
        Some(b) if case_insensitive => b == lower.to_ascii_uppercase(),
        _ => false,
    };
    if is(i, b's') || is(i, b't') || is(i, b'm') || is(i, b'd') {
        return Some(i + 1);
    }
    if case_insensitive && at(i) == Some(0xC5) && at(i + 1) == Some(0xBF) {
        return Some(i + 2);
    }
    if (is(i, b'r') || is(i, b'v')) && is(i + 1, b'e') {
        return Some(i + 2);
    }
    if is(i, b'l') && is(i + 1, b'l') {
        return Some(i + 2);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn onig_offsets(pattern: SplitPattern, text: &str) -> Vec<(usize, usize)> {
        let re = tokenizers::utils::SysRegex::new(pattern.regex()).unwrap();
        re.find_iter(text).collect()
    }

    fn check(pattern: SplitPattern, text: &str) {
        let pt = PreTokenizer::new(pattern).unwrap();
        let ours = pt.split_offsets(text);
        let theirs = onig_offsets(pattern, text);
        if let Some(i) = (0..ours.len().max(theirs.len())).find(|&i| ours.get(i) != theirs.get(i)) {
            let show = |v: &[(usize, usize)]| -> Vec<String> {
                v[i.saturating_sub(2)..(i + 3).min(v.len())]
                    .iter()
                    .map(|&(a, b)| format!("{:?}", &text[a..b]))
                    .collect()
            };
            panic!(
                "{pattern:?} split mismatch at pre-token {i}\n ours: {:?}\n onig: {:?}",
                show(&ours),
                show(&theirs)
            );
        }
    }

    const ALL: [SplitPattern; 3] = [
        SplitPattern::Gpt2,
        SplitPattern::Qwen2,
        SplitPattern::Cl100k,
    ];

    #[test]
    fn handpicked_cases_match_onig() {
        let cases = [
            "Hello world",
            "  leading and trailing  ",
            "tabs\tand\t\tmore\t",
            "line\nbreaks\r\n\r\nand  \n  indented",
            "I'm you're he'll 'S 'LL 'Re 'ſ 'ﬆ 'K x'",
            "123456789 12,345.67 ٠١٢٣ ²³ ⅫⅣ ½",
            "!!! ... ?!\n\n--- ```rust\n",
            "e\u{301}te\u{301} cafe\u{301}",
            "中文字符，还有标点。日本語のテキスト",
            "emoji 👨\u{200d}👩\u{200d}👧 🇫🇷 👍🏽!",
            "nbsp\u{a0}word ideographic\u{3000}space \u{2028}sep\u{85}nel",
            "\u{b}\u{c}\u{1c}\u{1d}\u{1e}\u{1f} ctrl",
            " $hello #tag @user 3rd 4x4",
            "   ",
            "\n",
            " \n ",
            "a",
            "'",
            "''s",
            "x'ſe x'ſt x'Se x'ſ",
        ];
        for p in ALL {
            for c in cases {
                check(p, c);
            }
        }
    }

    /// Every cased code point (plus a sample of the others) after an
    /// apostrophe, alone and followed by `e`/`l`, and as the second letter of
    /// `'re`, `'ve`, `'ll`: the case-insensitive contraction matcher must agree
    /// with Oniguruma's case folding. Only cased characters take part in case
    /// folding, so the sample of uncased ones is a sanity check.
    #[test]
    fn contractions_agree_with_onig_for_cased_code_points() {
        let cased = |c: char| {
            c.to_lowercase().ne(std::iter::once(c)) || c.to_uppercase().ne(std::iter::once(c))
        };
        let mut text = String::new();
        for c in (0..=MAX_CP).filter_map(char::from_u32) {
            if !(cased(c) || c as u32 & 63 == 0) {
                continue;
            }
            // A lone newline before the apostrophe keeps it from being taken
            // into a preceding punctuation or space run.
            for tail in ["", "e", "l"] {
                text.push('\'');
                text.push(c);
                text.push_str(tail);
                text.push('\n');
            }
            for head in ["r", "v", "l"] {
                text.push('\'');
                text.push_str(head);
                text.push(c);
                text.push('\n');
            }
        }
        for p in ALL {
            check(p, &text);
        }
    }

    #[test]
    fn every_code_point_in_context() {
        // Each code point between letters, digits, spaces and newlines.
        let mut text = String::new();
        for c in (0..=MAX_CP).filter_map(char::from_u32).step_by(7) {
            text.push(c);
            text.push_str("a ");
            text.push(c);
            text.push('1');
            text.push(c);
            text.push_str(" \n");
            text.push(c);
            text.push(' ');
        }
        for p in ALL {
            check(p, &text);
        }
    }
}
