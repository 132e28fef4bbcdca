//! Reading `tokenizer.json` and deciding whether the fast path reproduces it.
//!
//! Only the parts that influence `encode(.., add_special_tokens=false)` ids are
//! inspected: truncation/padding, normalizer, pre-tokenizer and model. The
//! decoder and post-processor do not change those ids. Anything not
//! recognised exactly is reported as a reason to fall back.

use rustc_hash::FxHashMap;
use serde::Deserialize;
use serde_json::Value;

use super::pretok::SplitPattern;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Normalizer {
    None,
    Nfc,
}

pub(crate) struct FastConfig {
    pub normalizer: Normalizer,
    pub pattern: SplitPattern,
    /// ByteLevel `add_prefix_space` (only with the ByteLevel regex itself).
    pub add_prefix_space: bool,
    pub vocab: FxHashMap<String, u32>,
    /// In rank order.
    pub merges: Vec<(String, String)>,
    pub ignore_merges: bool,
}

#[derive(Deserialize)]
struct Root {
    #[serde(default)]
    truncation: Value,
    #[serde(default)]
    padding: Value,
    #[serde(default)]
    normalizer: Value,
    #[serde(default)]
    pre_tokenizer: Value,
    model: ModelJson,
}

/// The BPE model section; other model types fail to deserialize or are
/// rejected by `type`.
#[derive(Deserialize)]
struct ModelJson {
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    dropout: Option<f64>,
    #[serde(default)]
    continuing_subword_prefix: Option<String>,
    #[serde(default)]
    end_of_word_suffix: Option<String>,
    #[serde(default)]
    byte_fallback: Option<bool>,
    #[serde(default)]
    ignore_merges: Option<bool>,
    #[serde(default)]
    vocab: Option<FxHashMap<String, u32>>,
    #[serde(default)]
    merges: Option<Vec<MergeJson>>,
}

/// `"a b"` (legacy) or `["a", "b"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum MergeJson {
    Pair(String, String),
    Line(String),
}

pub(crate) fn parse(json: &str) -> Result<FastConfig, String> {
    let root: Root =
        serde_json::from_str(json).map_err(|e| format!("model is not a BPE model ({e})"))?;
    if !root.truncation.is_null() {
        return Err("truncation is configured".into());
    }
    if !root.padding.is_null() {
        return Err("padding is configured".into());
    }
    let normalizer = parse_normalizer(&root.normalizer)?;
    let (pattern, add_prefix_space) = parse_pre_tokenizer(&root.pre_tokenizer)?;
    let m = root.model;
    if m.kind.as_deref() != Some("BPE") {
        return Err(format!("model type {:?} is not BPE", m.kind));
    }
    if m.dropout.is_some_and(|d| d != 0.0) {
        return Err("BPE dropout".into());
    }
    if m.continuing_subword_prefix
        .as_deref()
        .is_some_and(|s| !s.is_empty())
    {
        return Err("continuing_subword_prefix".into());
    }
    if m.end_of_word_suffix
        .as_deref()
        .is_some_and(|s| !s.is_empty())
    {
        return Err("end_of_word_suffix".into());
    }
    if m.byte_fallback == Some(true) {
        return Err("byte_fallback".into());
    }
    let vocab = m.vocab.ok_or("model has no vocab")?;
    let merges = parse_merges(m.merges.ok_or("model has no merges")?)?;
    Ok(FastConfig {
        normalizer,
        pattern,
        add_prefix_space,
        vocab,
        merges,
        ignore_merges: m.ignore_merges.unwrap_or(false),
    })
}

/// Mirrors HF: list-form merges are taken as they are; in the legacy string
/// form, lines starting with `#version` are skipped and every other line
/// must be exactly two space-separated parts.
fn parse_merges(items: Vec<MergeJson>) -> Result<Vec<(String, String)>, String> {
    let pairs = items
        .iter()
        .filter(|m| matches!(m, MergeJson::Pair(..)))
        .count();
    if pairs != 0 && pairs != items.len() {
        return Err("merges mix list and string forms".into());
    }
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        match item {
            MergeJson::Pair(a, b) => out.push((a, b)),
            MergeJson::Line(line) => {
                if line.starts_with("#version") {
                    continue;
                }
                let mut parts = line.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => out.push((a.to_string(), b.to_string())),
                    _ => return Err(format!("bad merge line {line:?}")),
                }
            }
        }
    }
    Ok(out)
}

fn type_of(v: &Value) -> Option<&str> {
    v.get("type").and_then(Value::as_str)
}

fn parse_normalizer(v: &Value) -> Result<Normalizer, String> {
    if v.is_null() {
        return Ok(Normalizer::None);
    }
    match type_of(v) {
        Some("NFC") => Ok(Normalizer::Nfc),
        // NFC is idempotent, so any sequence of NFCs is one NFC.
        Some("Sequence") => {
            let items = v
                .get("normalizers")
                .and_then(Value::as_array)
                .ok_or("normalizer Sequence without a list")?;
            let mut out = Normalizer::None;
            for item in items {
                if parse_normalizer(item)? == Normalizer::Nfc {
                    out = Normalizer::Nfc;
                }
            }
            Ok(out)
        }
        other => Err(format!("normalizer {other:?} is not supported")),
    }
}

fn flatten_sequence<'a>(v: &'a Value, out: &mut Vec<&'a Value>) -> Result<(), String> {
    if type_of(v) == Some("Sequence") {
        let items = v
            .get("pretokenizers")
            .and_then(Value::as_array)
            .ok_or("pre_tokenizer Sequence without a list")?;
        for item in items {
            flatten_sequence(item, out)?;
        }
    } else {
        out.push(v);
    }
    Ok(())
}

/// ByteLevel fields: `(add_prefix_space, use_regex)`.
fn byte_level(v: &Value) -> Result<(bool, bool), String> {
    let add_prefix_space = v
        .get("add_prefix_space")
        .and_then(Value::as_bool)
        .ok_or("ByteLevel without add_prefix_space")?;
    let use_regex = match v.get("use_regex") {
        None | Some(Value::Null) => true,
        Some(b) => b.as_bool().ok_or("ByteLevel use_regex is not a bool")?,
    };
    Ok((add_prefix_space, use_regex))
}

/// Accepted shapes:
/// - `ByteLevel(use_regex=true)`, any `add_prefix_space`;
/// - `Split(Regex(P), Isolated, invert=false)` then
///   `ByteLevel(use_regex=false, add_prefix_space=false)`, P a known pattern.
fn parse_pre_tokenizer(v: &Value) -> Result<(SplitPattern, bool), String> {
    if v.is_null() {
        return Err("no pre_tokenizer (not byte-level)".into());
    }
    let mut steps = Vec::new();
    flatten_sequence(v, &mut steps)?;
    let types: Vec<Option<&str>> = steps.iter().map(|s| type_of(s)).collect();
    match types.as_slice() {
        [Some("ByteLevel")] => {
            let (prefix, use_regex) = byte_level(steps[0])?;
            if !use_regex {
                return Err("ByteLevel without regex and without a split".into());
            }
            Ok((SplitPattern::Gpt2, prefix))
        }
        [Some("Split"), Some("ByteLevel")] => {
            let split = steps[0];
            let regex = split
                .get("pattern")
                .and_then(|p| p.get("Regex"))
                .and_then(Value::as_str)
                .ok_or("Split pattern is not a regex")?;
            let pattern = SplitPattern::from_regex(regex)
                .ok_or_else(|| format!("Split regex {regex:?} is not supported"))?;
            if split.get("behavior").and_then(Value::as_str) != Some("Isolated") {
                return Err("Split behavior is not Isolated".into());
            }
            if split.get("invert").and_then(Value::as_bool) != Some(false) {
                return Err("Split invert is not false".into());
            }
            let (prefix, use_regex) = byte_level(steps[1])?;
            if use_regex {
                return Err("ByteLevel regex after a Split".into());
            }
            if prefix {
                return Err("ByteLevel add_prefix_space after a Split".into());
            }
            Ok((pattern, false))
        }
        _ => Err(format!("pre_tokenizer {types:?} is not supported")),
    }
}
