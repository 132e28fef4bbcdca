//! Parity of the fast tokenizer path with the `tokenizers` crate.
//!
//! Every variant is derived from `tests/data/bpe_qwen2.json` (see
//! `tests/data/make_fixtures.py`) by editing its JSON, then loaded twice: once
//! normally and once with the fallback forced. Both must produce the same ids
//! on a large deterministic corpus and on proptest-generated strings.

use std::path::PathBuf;

use dppo_core::tokenizer::pretok::{PreTokenizer, SplitPattern};
use dppo_core::tokenizer::{Tokenizer, TokenizerOptions};
use proptest::prelude::*;
use serde_json::{json, Value};

const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const CL100K: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/bpe_qwen2.json")
}

fn base() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture_path()).unwrap()).unwrap()
}

fn split_then_bytelevel(regex: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
    ]})
}

fn byte_level_regex(add_prefix_space: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true, "use_regex": true})
}

fn add_tokens(v: &mut Value, tokens: &[(&str, bool, bool)]) {
    let list = v["added_tokens"].as_array_mut().unwrap();
    let first = list
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .max()
        .unwrap()
        + 1;
    for (id, &(content, special, normalized)) in (first..).zip(tokens) {
        list.push(
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": normalized, "special": special}),
        );
    }
}

/// Puts every added token into the model vocab at its own id (as GPT-2 and
/// Qwen2 files do), so new model entries can follow without id clashes.
fn added_tokens_into_vocab(v: &mut Value) -> u64 {
    let added: Vec<(String, u64)> = v["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["content"].as_str().unwrap().to_string(),
                t["id"].as_u64().unwrap(),
            )
        })
        .collect();
    let vocab = v["model"]["vocab"].as_object_mut().unwrap();
    for (content, id) in &added {
        vocab.insert(content.clone(), json!(id));
    }
    vocab.values().map(|x| x.as_u64().unwrap()).max().unwrap() + 1
}

/// Pre-tokens (under the Qwen2 pattern) added as whole vocab entries in the
/// `ignore_merges` variant.
#[rustfmt::skip]
const WHOLE_WORDS: &[&str] = &[
    "Hello", " world", " internationalization", "internationalization", " Straße", "中文字符",
    "   ", "...", "!!!", " tokenizer", " Ελληνικά", "😀", "\n\n\n", "'ll", " Русский", "you",
    " naïve", "\u{3000}", " rock", "\tthe", " THE", "hello",
];

/// The GPT-2 byte-to-unicode spelling of `text`'s UTF-8 bytes.
fn byte_level(text: &str) -> String {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    text.bytes()
        .map(|b| {
            if printable(b) {
                char::from(b)
            } else {
                let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
                char::from_u32(256 + rank).unwrap()
            }
        })
        .collect()
}

/// Named tokenizer.json variants that must take the fast path.
fn fast_variants() -> Vec<(&'static str, Value)> {
    let mut out = vec![("qwen2", base())];

    let mut v = base();
    v["pre_tokenizer"] = split_then_bytelevel(CL100K);
    out.push(("cl100k", v));

    let mut v = base();
    v["normalizer"] = Value::Null;
    v["pre_tokenizer"] = byte_level_regex(false);
    out.push(("gpt2", v));

    let mut v = base();
    v["normalizer"] = Value::Null;
    v["pre_tokenizer"] = byte_level_regex(true);
    out.push(("gpt2-prefix-space", v));

    let mut v = base();
    v["pre_tokenizer"] = split_then_bytelevel(GPT2);
    v["normalizer"] = json!({"type": "Sequence", "normalizers": [{"type": "NFC"}]});
    out.push(("gpt2-split-nfc-seq", v));

    let mut v = base();
    v["normalizer"] = Value::Null;
    out.push(("qwen2-no-normalizer", v));

    // ignore_merges, with whole-word entries that the merges do not build.
    let plain = Tokenizer::from_json_str(&base().to_string()).unwrap();
    let mut v = base();
    v["model"]["ignore_merges"] = json!(true);
    let mut next = added_tokens_into_vocab(&mut v);
    let mut added = 0;
    for word in WHOLE_WORDS {
        if plain.encode(word).unwrap().len() > 1 {
            let vocab = v["model"]["vocab"].as_object_mut().unwrap();
            vocab.insert(byte_level(word), json!(next));
            next += 1;
            added += 1;
        }
    }
    assert!(added >= 6, "only {added} whole words need several tokens");
    out.push(("qwen2-ignore-merges", v));

    // Legacy "a b" merges with a #version header.
    let mut v = base();
    let merges: Vec<Value> = std::iter::once(json!("#version: 0.2"))
        .chain(v["model"]["merges"].as_array().unwrap().iter().map(|m| {
            json!(format!(
                "{} {}",
                m[0].as_str().unwrap(),
                m[1].as_str().unwrap()
            ))
        }))
        .collect();
    v["model"]["merges"] = Value::Array(merges);
    out.push(("qwen2-legacy-merges", v));

    // More added tokens: overlapping prefixes, non-special ones, normalized
    // ones (matched after NFC, one of them written in NFD), one that is also a
    // common word.
    let mut v = base();
    add_tokens(
        &mut v,
        &[
            ("<think>", true, false),
            ("</think>", true, false),
            ("<|im", false, false),
            ("<|im_start|>user", false, false),
            ("cafe\u{301}", false, true),
            ("the", false, true),
            (" world", false, true),
            ("ſt", false, false),
        ],
    );
    out.push(("qwen2-more-added", v.clone()));
    v["normalizer"] = Value::Null;
    v["pre_tokenizer"] = split_then_bytelevel(CL100K);
    out.push(("cl100k-more-added-no-normalizer", v));

    out
}

/// Variants the fast path must refuse, with the expected reason fragment.
fn fallback_variants() -> Vec<(&'static str, Value)> {
    let mut out = Vec::new();

    let mut v = base();
    v["pre_tokenizer"] = split_then_bytelevel(r"\w+|[^\w\s]+|\s+");
    out.push(("other-split-regex", v));

    let mut v = base();
    v["normalizer"] = json!({"type": "NFKC"});
    out.push(("nfkc", v));

    let mut v = base();
    v["added_tokens"][1]["lstrip"] = json!(true);
    v["added_tokens"][2]["rstrip"] = json!(true);
    out.push(("added-lstrip", v));

    let mut v = base();
    v["model"]["byte_fallback"] = json!(true);
    out.push(("byte-fallback", v));

    let mut v = base();
    v["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = json!(true);
    out.push(("split-then-prefix-space", v));

    // A byte token no merge uses, removed from the vocab: HF drops that byte.
    let mut v = base();
    let used: std::collections::HashSet<String> = v["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| {
            [
                m[0].as_str().unwrap().to_string(),
                m[1].as_str().unwrap().to_string(),
            ]
        })
        .collect();
    let victim = ["\u{100}", "\u{101}", "\u{102}", "\u{103}"]
        .into_iter()
        .find(|t| !used.contains(*t))
        .unwrap();
    v["model"]["vocab"].as_object_mut().unwrap().remove(victim);
    out.push(("missing-byte-token", v));

    out.push(("wordpiece", wordpiece()));
    out
}

fn wordpiece() -> Value {
    let mut vocab = serde_json::Map::new();
    let words = [
        "[UNK]", "[CLS]", "[SEP]", "the", "a", "hello", "world", "##s", "##ing", "token", "##ize",
        "##r", ",", ".", "!", "'", "un", "##believ", "##able", "中", "文",
    ];
    for (i, w) in words.iter().enumerate() {
        vocab.insert(w.to_string(), json!(i));
    }
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 0, "content": "[UNK]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "[CLS]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "[SEP]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": vocab}
    })
}

fn load_pair(v: &Value) -> (Tokenizer, Tokenizer) {
    let s = v.to_string();
    let fast = Tokenizer::from_json_str(&s).unwrap();
    let slow = Tokenizer::from_json_str_with_options(
        &s,
        &TokenizerOptions {
            force_fallback: true,
        },
    )
    .unwrap();
    assert!(!slow.is_fast_path());
    (fast, slow)
}

// ---------------------------------------------------------------- corpus --

#[rustfmt::skip]
const FRAGMENTS: &[&str] = &[
    // English, contractions in all cases, Unicode case-folding look-alikes.
    "Hello", "world", "the", "The", "tokenization", "tokenizer", "THE", "internationalization",
    "I'm", "you're", "he'll", "she'd", "we've", "they're", "it's", "don't", "DON'T", "WE'LL",
    "I'D", "YOU'VE", "'s", "'S", "'ll", "'LL", "'Ll", "'re", "'Re", "'d", "'M", "'t", "'T", "'ve",
    "'ſ", "'ﬆ", "'ſt", "'K", "'", "''", "'''s", "o'clock", "rock'n'roll",
    // Accents, precomposed and NFD, lone combining marks.
    "café", "cafe\u{301}", "naïve", "nai\u{308}ve", "résumé", "re\u{301}sume\u{301}", "Straße", "ÅNGSTRÖM",
    "A\u{30a}", "\u{301}", "\u{301}\u{302}", "e\u{301}\u{323}", "\u{1100}\u{1161}\u{11a8}", "Ǆ", "ǅ",
    // CJK, Hangul, Japanese, other scripts.
    "中文字符", "你好，世界。", "日本語のテキスト", "한국어", "가나다라", "カタカナ", "ｶﾀｶﾅ",
    "مرحبا بالعالم", "كتاب", "שלום", "हिन्दी", "தமிழ்", "ไทย", "Ελληνικά", "Русский текст",
    // Emoji and symbols.
    "😀", "👍🏽", "👨\u{200d}👩\u{200d}👧\u{200d}👦", "🇫🇷🇩🇪", "🚀🚀🚀", "❤️", "™", "©", "€100", "£", "→",
    // Numbers in several scripts.
    "0", "7", "42", "123", "2024", "1234567", "3.14159", "1,000,000", "٠١٢٣٤٥٦٧٨٩", "۱۲۳", "१२३",
    "１２３", "²³", "½", "¾", "ⅫⅣ", "①②", "0x1F", "v2.0.1", "3rd", "4x4",
    // Whitespace of every kind.
    " ", "  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", "\r\n\r\n", "\r", " \n",
    "\n ", "  \n  ", "\t\n", "\u{a0}", "\u{a0}\u{a0}", "\u{3000}", "\u{2028}", "\u{2029}", "\u{85}",
    "\u{b}", "\u{c}", "\u{1680}", "\u{2002}\u{2003}", "\u{200b}", "\u{feff}", "\u{0}", "\u{7f}", "\u{1b}[0m",
    // Punctuation runs, with trailing newlines.
    ".", ",", "!", "?", "...", "!!!", "?!", "---", "***", "```", "```python\n", "#", "##", "$",
    "$$", "%", "@", "&&", "||", "->", "=>", "::", "();", "{}", "[]", "<>", "</", "/>", ".\n", "!\n\n",
    ":\r\n", ")\n\n\n", "\"", "“quoted”", "«»", "—", "…", "・",
    // Special tokens, partial special tokens and lookalikes.
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_start|>user\n", "<|im_start|>assistant\n",
    "<|im_end|>\n", "<|im_", "<|im", "<|", "|>", "<|endoftext", "<<|im_end|>>", "<think>", "</think>",
    "<|im_start|><|im_end|>", "ſt",
];

/// SplitMix64: a small deterministic generator for the corpus.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn random_char(rng: &mut Rng) -> char {
    // Mostly BMP, sometimes astral, never a surrogate.
    loop {
        let cp = match rng.below(4) {
            0 => rng.below(0x80) as u32,
            1 => rng.below(0x800) as u32,
            2 => rng.below(0x10000) as u32,
            _ => rng.below(0x110000) as u32,
        };
        if let Some(c) = char::from_u32(cp) {
            return c;
        }
    }
}

fn corpus(n: usize, seed: u64) -> Vec<String> {
    let mut rng = Rng(seed);
    let separators = [
        " ", " ", " ", "", "", "\n", "  ", "\t", "\u{3000}", "\u{a0}", "\r\n", "   ",
    ];
    (0..n)
        .map(|_| {
            let mut s = String::new();
            for _ in 0..rng.below(30) + 1 {
                if rng.below(12) == 0 {
                    for _ in 0..rng.below(4) + 1 {
                        s.push(random_char(&mut rng));
                    }
                } else {
                    s.push_str(FRAGMENTS[rng.below(FRAGMENTS.len())]);
                }
                s.push_str(separators[rng.below(separators.len())]);
            }
            s
        })
        .collect()
}

fn assert_same(name: &str, fast: &Tokenizer, slow: &Tokenizer, text: &str) {
    let a = fast.encode(text).unwrap();
    let b = slow.encode(text).unwrap();
    assert_eq!(a, b, "variant {name}: ids differ for {text:?}");
}

// ----------------------------------------------------------------- tests --

#[test]
fn fast_variants_take_the_fast_path() {
    assert_eq!(
        base()["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"],
        json!(QWEN2)
    );
    for (name, v) in fast_variants() {
        let t = Tokenizer::from_json_str(&v.to_string()).unwrap();
        assert!(t.is_fast_path(), "{name}: {:?}", t.fallback_reason());
        assert!(t.backend_name().starts_with("bpe-fast:"), "{name}");
    }
    let names: Vec<&str> = fast_variants()
        .iter()
        .map(|(_, v)| {
            Tokenizer::from_json_str(&v.to_string())
                .unwrap()
                .backend_name()
        })
        .collect();
    assert_eq!(
        &names[..5],
        &[
            "bpe-fast:qwen2",
            "bpe-fast:cl100k",
            "bpe-fast:gpt2",
            "bpe-fast:gpt2",
            "bpe-fast:gpt2"
        ]
    );
}

#[test]
fn unsupported_configurations_fall_back_and_stay_correct() {
    let texts = corpus(300, 7);
    for (name, v) in fallback_variants() {
        let (t, slow) = load_pair(&v);
        assert!(!t.is_fast_path(), "{name} should fall back");
        assert_eq!(t.backend_name(), "tokenizers");
        assert!(t.fallback_reason().is_some());
        for text in &texts {
            assert_same(name, &t, &slow, text);
        }
        // And the result is HF's own.
        let hf = t.hf_tokenizer();
        for text in texts.iter().take(20) {
            assert_eq!(
                t.encode(text).unwrap(),
                hf.encode(text.as_str(), false).unwrap().get_ids()
            );
        }
    }
}

/// Pre-token boundaries against HF's own pre-tokenizers. Stronger than id
/// parity where the small vocabulary has no merge across a boundary.
#[test]
fn pre_token_boundaries_match_hf_pre_tokenizers() {
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer as _};
    let texts = corpus(2000, 99);
    let cases = [
        (SplitPattern::Qwen2, split_then_bytelevel(QWEN2)),
        (SplitPattern::Cl100k, split_then_bytelevel(CL100K)),
        (SplitPattern::Gpt2, split_then_bytelevel(GPT2)),
        (SplitPattern::Gpt2, byte_level_regex(false)),
    ];
    for (pattern, json) in cases {
        let hf: tokenizers::PreTokenizerWrapper = serde_json::from_value(json).unwrap();
        let ours = PreTokenizer::new(pattern).unwrap();
        for text in &texts {
            let mut pre = PreTokenizedString::from(text.as_str());
            hf.pre_tokenize(&mut pre).unwrap();
            let theirs: Vec<(usize, usize)> = pre
                .get_splits(OffsetReferential::Original, OffsetType::Byte)
                .into_iter()
                .map(|(_, offsets, _)| offsets)
                .collect();
            assert_eq!(ours.split_offsets(text), theirs, "{pattern:?} on {text:?}");
        }
    }
}

#[test]
fn deterministic_corpus_parity() {
    let texts = corpus(3000, 42);
    for (name, v) in fast_variants() {
        let (fast, slow) = load_pair(&v);
        for text in &texts {
            assert_same(name, &fast, &slow, text);
        }
    }
}

#[test]
fn batch_equals_single() {
    let texts = corpus(500, 3);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let (fast, slow) = load_pair(&base());
    let batch = fast.encode_batch(&refs).unwrap();
    assert_eq!(batch, slow.encode_batch(&refs).unwrap());
    for (t, ids) in refs.iter().zip(&batch) {
        assert_eq!(&fast.encode(t).unwrap(), ids);
    }
    assert!(fast.encode("").unwrap().is_empty());
    assert!(fast.encode_batch(&[]).unwrap().is_empty());
}

#[test]
fn long_inputs_take_the_heap_merge() {
    let cases = [
        " ".repeat(5000),
        "\n".repeat(3000),
        format!("x{}y", " ".repeat(777)),
        "a".repeat(2000),
        "the".repeat(700),
        "中文字符你好世界".repeat(60),
        "!?".repeat(500),
        format!("{}<|im_end|>{}", "ab".repeat(300), "😀".repeat(200)),
        "1234567890".repeat(100),
    ];
    for (name, v) in fast_variants() {
        let (fast, slow) = load_pair(&v);
        for text in &cases {
            assert_same(name, &fast, &slow, text);
        }
    }
}

#[test]
fn api_matches_tokenizers() {
    let path = fixture_path();
    let t = Tokenizer::from_file(&path).unwrap();
    let fb = Tokenizer::from_file_fallback(&path).unwrap();
    assert!(t.is_fast_path());
    assert_eq!(t.backend_name(), "bpe-fast:qwen2");
    assert_eq!(t.fallback_reason(), None);
    assert!(!fb.is_fast_path());
    assert_eq!(fb.backend_name(), "tokenizers");

    assert_eq!(t.vocab_size(), 3003);
    assert_eq!(
        t.added_tokens(),
        vec![
            ("<|endoftext|>".to_string(), 3000, true),
            ("<|im_start|>".to_string(), 3001, true),
            ("<|im_end|>".to_string(), 3002, true),
        ]
    );
    assert_eq!(t.token_to_id("<|im_end|>"), Some(3002));
    assert_eq!(t.id_to_token(3001).as_deref(), Some("<|im_start|>"));
    let space_id = t.token_to_id("Ġ").unwrap();
    assert_eq!(t.id_to_token(space_id).as_deref(), Some("Ġ"));
    assert_eq!(t.token_to_id("definitely not a token"), None);

    let text = "<|im_start|>user\nHello, café! 你好 😀<|im_end|>";
    let ids = t.encode(text).unwrap();
    assert_eq!(ids[0], 3001);
    assert_eq!(*ids.last().unwrap(), 3002);
    assert_eq!(t.decode(&ids, false), text);
    assert_eq!(t.decode(&ids, true), "user\nHello, café! 你好 😀");

    // The fingerprint hashes the file content.
    let json = std::fs::read_to_string(&path).unwrap();
    let again = Tokenizer::from_json_str(&json).unwrap();
    assert_eq!(t.fingerprint(), again.fingerprint());
    assert_eq!(t.fingerprint(), fb.fingerprint());
    assert_eq!(t.fingerprint().len(), 16);
    let other = Tokenizer::from_json_str(&json.replacen("\"NFC\"", "\"NFKC\"", 1)).unwrap();
    assert_ne!(t.fingerprint(), other.fingerprint());

    assert!(Tokenizer::from_json_str("{not json").is_err());
    assert!(Tokenizer::from_file(&path.with_file_name("missing.json")).is_err());
}

#[test]
fn many_tokenizers_in_one_thread_keep_their_own_caches() {
    // More live tokenizers than per-thread caches, used in turns.
    let variants = fast_variants();
    let pairs: Vec<(Tokenizer, Tokenizer)> = variants.iter().map(|(_, v)| load_pair(v)).collect();
    let texts = corpus(60, 11);
    for _round in 0..2 {
        for text in &texts {
            for ((name, _), (fast, slow)) in variants.iter().zip(&pairs) {
                assert_same(name, fast, slow, text);
            }
        }
    }
}

fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(FRAGMENTS).prop_map(str::to_string),
        1 => proptest::collection::vec(any::<char>(), 1..6).prop_map(|v| v.into_iter().collect()),
        1 => "[ \t\n\r\u{a0}\u{3000}a-zA-Z0-9'.,!?]{1,12}",
    ]
}

fn text() -> impl Strategy<Value = String> {
    proptest::collection::vec(fragment(), 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn proptest_parity(s in text()) {
        thread_local! {
            static PAIRS: Vec<(&'static str, Tokenizer, Tokenizer)> = fast_variants()
                .into_iter()
                .map(|(name, v)| {
                    let (a, b) = load_pair(&v);
                    (name, a, b)
                })
                .collect();
        }
        PAIRS.with(|pairs| {
            for (name, fast, slow) in pairs {
                prop_assert_eq!(fast.encode(&s).unwrap(), slow.encode(&s).unwrap(), "variant {}: {:?}", name, s);
            }
            Ok(())
        })?;
    }
}
