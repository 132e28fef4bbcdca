//! The preparation pipeline end to end, without Python: rows in, shards out, read back.
//!
//! Truncation keeps the chat template (for a ChatML and a Llama-3-shaped template), examples that
//! fit are stored as the template renders them, y_gen given as ids is stored as those ids, the
//! spill file round-trips every field, and the shard files read back to what went in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dppo_core::prep::{encode_prompts, DataKind, Encoder, MaxLen, PrepOptions, Preparer, YgenRow};
use dppo_core::record::{RawMessage, RawMessages, RawPairRow, RawSftRow, RawStr};
use dppo_core::shard::{self, open_index};
use dppo_core::template::{ChatTemplate, Message, CHATML_TEMPLATE};
use dppo_core::tokenizer::Tokenizer;
use dppo_core::truncate::KeepPart;
use serde_json::Value;

const LLAMA3_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";

fn tokenizer(llama_specials: bool) -> Arc<Tokenizer> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/bpe_qwen2.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    if llama_specials {
        let list = v["added_tokens"].as_array_mut().unwrap();
        let mut id = list.iter().map(|t| t["id"].as_u64().unwrap()).max().unwrap() + 1;
        let vocab_len = v["model"]["vocab"].as_object().unwrap().len() as u64;
        id = id.max(vocab_len);
        let list = v["added_tokens"].as_array_mut().unwrap();
        for content in ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"] {
            list.push(serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                                         "rstrip": false, "normalized": false, "special": true}));
            id += 1;
        }
    }
    Arc::new(Tokenizer::from_json_str(&v.to_string()).unwrap())
}

fn template(llama: bool) -> ChatTemplate {
    if llama {
        let mut sp = BTreeMap::new();
        sp.insert("bos_token".to_string(), "<|begin_of_text|>".to_string());
        ChatTemplate::new(LLAMA3_TEMPLATE, sp).unwrap()
    } else {
        ChatTemplate::new(CHATML_TEMPLATE, BTreeMap::new()).unwrap()
    }
}

fn msg(role: &str, content: &str) -> RawMessage {
    RawMessage { role: RawStr::Str(role.into()), content: RawStr::Str(content.into()) }
}

fn words(n: usize, seed: usize) -> String {
    let pool = ["alpha", "beta", "gamma", "delta", "data", "model", "answer", "question", "list", "step"];
    (0..n).map(|i| pool[(i * 7 + seed) % pool.len()]).collect::<Vec<_>>().join(" ")
}

fn sft_row(row: u64, user: &str, assistant: &str) -> RawSftRow {
    RawSftRow { row, messages: RawMessages::List(vec![msg("user", user), msg("assistant", assistant)]), invalid: false }
}

fn pair_row(row: u64, id: &str, user: &str, chosen: &str, rejected: &str) -> RawPairRow {
    RawPairRow {
        row,
        prompt_id: RawStr::Str(id.into()),
        chosen: RawMessages::List(vec![msg("user", user), msg("assistant", chosen)]),
        rejected: RawMessages::List(vec![msg("user", user), msg("assistant", rejected)]),
        score_chosen: Some(8.0),
        score_rejected: Some(2.0),
        score_error: false,
        invalid: false,
    }
}

/// Every example of a prepared folder as its segments (kind, ids), plus meta.json's counts.
fn read_back(dir: &Path) -> (Vec<Vec<(u32, Vec<u32>)>>, Value) {
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    let mut out = Vec::new();
    for s in meta["shards"].as_array().unwrap() {
        let name = s["name"].as_str().unwrap();
        let (tok_path, idx_path) = shard::shard_paths(dir, name);
        let h = open_index(&idx_path, true).unwrap();
        let idx = std::fs::read(&idx_path).unwrap();
        let toks: Vec<u32> =
            std::fs::read(&tok_path).unwrap().chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
        let sec = |name: &str| h.sections().into_iter().find(|s| s.name == name).unwrap();
        let u64s = |name: &str| -> Vec<u64> {
            let s = sec(name);
            (0..s.count as usize)
                .map(|i| u64::from_le_bytes(idx[s.offset as usize + 8 * i..][..8].try_into().unwrap()))
                .collect()
        };
        let u32s = |name: &str| -> Vec<u32> {
            let s = sec(name);
            (0..s.count as usize)
                .map(|i| u32::from_le_bytes(idx[s.offset as usize + 4 * i..][..4].try_into().unwrap()))
                .collect()
        };
        let (ex_seg, seg_off, seg_len, seg_kind) = (u64s("ex_seg_off"), u64s("seg_tok_off"), u32s("seg_len"), u32s("seg_kind"));
        for e in 0..h.n_examples as usize {
            let segs = (ex_seg[e] as usize..ex_seg[e + 1] as usize)
                .map(|j| (seg_kind[j], toks[seg_off[j] as usize..seg_off[j] as usize + seg_len[j] as usize].to_vec()))
                .collect();
            out.push(segs);
        }
    }
    (out, meta["counts"].clone())
}

fn prepare_sft(dir: &Path, llama: bool, rows: &[RawSftRow], opts: PrepOptions) -> (Vec<Vec<(u32, Vec<u32>)>>, Value) {
    let out = dir.join("out");
    let mut p = Preparer::new(tokenizer(llama), template(llama), PrepOptions { kind: DataKind::Sft, ..opts }, &out, false).unwrap();
    p.feed_sft(rows).unwrap();
    p.finish(serde_json::json!({}), &mut |_, _| true).unwrap();
    read_back(&out)
}

fn prompt_ids(llama: bool, user: &str) -> Vec<u32> {
    let t = template(llama);
    let text = t.render(&[Message::new("user", user)], true).unwrap();
    tokenizer(llama).encode(&text).unwrap()
}

fn header_ids(llama: bool) -> Vec<u32> {
    let tail = if llama { "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n" } else { "<|im_end|>\n<|im_start|>assistant\n" };
    tokenizer(llama).encode(tail).unwrap()
}

#[test]
fn rows_that_fit_are_stored_as_rendered_and_long_prompts_keep_the_template() {
    for llama in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let short = words(5, 1);
        let long = words(300, 2);
        let rows = vec![
            sft_row(0, &short, &words(10, 3)),
            sft_row(1, &long, &words(10, 4)), // long prompt, fits
            sft_row(2, &long, &words(400, 5)), // does not fit: prompt and response cut
        ];
        let n_long = prompt_ids(llama, &long).len() as u32;
        let opts = PrepOptions { max_len: MaxLen::Fixed(n_long + 40), max_prompt_len: Some(120), ..Default::default() };
        let (ex, counts) = prepare_sft(dir.path(), llama, &rows, opts);
        assert_eq!(ex[0][0].1, prompt_ids(llama, &short), "llama={llama}");
        assert_eq!(ex[1][0].1, prompt_ids(llama, &long), "a fitting example is not truncated (llama={llama})");
        let cut = &ex[2][0].1;
        assert_eq!(cut.len(), 120);
        assert!(cut.ends_with(&header_ids(llama)), "llama={llama}: {cut:?}");
        let full = prompt_ids(llama, &long);
        let head = full.len() - header_ids(llama).len() - (full.len() - 120);
        assert_eq!(&cut[..head], &full[..head], "the start of the prompt is kept");
        assert_eq!(ex[2][0].1.len() + ex[2][1].1.len(), (n_long + 40) as usize);
        assert_eq!(counts["truncated_prompt"], 1);
        assert_eq!(counts["truncated_response"], 1);
        assert_eq!(counts["prompt_tokens_removed"], full.len() as u64 - 120);
    }
}

#[test]
fn keep_end_keeps_the_end_of_the_user_turn() {
    let dir = tempfile::tempdir().unwrap();
    let long = format!("{} omega", words(300, 2));
    let rows = vec![sft_row(0, &long, &words(300, 5))];
    let opts = PrepOptions { max_len: MaxLen::Fixed(300), max_prompt_len: Some(100), truncate_prompt: KeepPart::End, ..Default::default() };
    let (ex, _) = prepare_sft(dir.path(), false, &rows, opts);
    let p = &ex[0][0].1;
    let tok = tokenizer(false);
    let tail = [tok.encode(" omega").unwrap(), header_ids(false)].concat();
    assert_eq!(p.len(), 100);
    assert!(p.ends_with(&tail), "{p:?}");
    let head = tok.encode("<|im_start|>system\n").unwrap();
    assert!(p.starts_with(&head));
}

#[test]
fn a_prompt_whose_template_alone_is_too_long_is_a_counted_skip_or_a_strict_error() {
    let dir = tempfile::tempdir().unwrap();
    let rows = vec![sft_row(0, &words(5, 1), &words(5, 2)), sft_row(1, &words(200, 1), &words(200, 2))];
    // the default ChatML system turn alone is ~60 tokens here
    let opts = PrepOptions { max_len: MaxLen::Fixed(120), max_prompt_len: Some(30), ..Default::default() };
    let (ex, counts) = prepare_sft(dir.path(), false, &rows, opts.clone());
    assert_eq!(ex.len(), 1);
    assert_eq!(counts["dropped"]["prompt_too_long"], 1);
    assert_eq!(counts["rows_kept"], 1);
    let out = dir.path().join("strict");
    let mut p = Preparer::new(tokenizer(false), template(false), PrepOptions { strict: true, kind: DataKind::Sft, ..opts }, &out, false).unwrap();
    p.feed_sft(&rows).unwrap();
    let e = p.finish(serde_json::json!({}), &mut |_, _| true).unwrap_err().to_string();
    assert!(e.contains("row 2") && e.contains("prompt_too_long"), "{e}");
}

#[test]
fn ygen_ids_are_stored_as_generated_and_text_is_tokenized() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let tok = tokenizer(false);
    // a non-canonical split of "data model": one id per character
    let text = "data model";
    let odd: Vec<u32> = text.chars().map(|c| tok.encode(&c.to_string()).unwrap()[0]).collect();
    assert_ne!(odd, tok.encode(text).unwrap());
    let mut p = Preparer::new(tok.clone(), template(false), PrepOptions { max_len: MaxLen::Fixed(500), ..Default::default() }, &out, false).unwrap();
    p.add_ygen(vec![
        Some(YgenRow { prompt_id: "a".into(), response: text.into(), ids: Some(odd.clone()) }),
        Some(YgenRow { prompt_id: "b".into(), response: text.into(), ids: None }),
        Some(YgenRow { prompt_id: "c".into(), response: text.into(), ids: Some(vec![u32::MAX]) }),
    ]);
    p.feed_pairs(&[pair_row(0, "a", "q one", "yes", "no"), pair_row(1, "b", "q two", "yes", "no")]).unwrap();
    p.finish(serde_json::json!({}), &mut |_, _| true).unwrap();
    let (ex, counts) = read_back(&out);
    let end = tok.encode("<|im_end|>\n").unwrap();
    assert_eq!(ex[0][3].0, shard::SegKind::Ygen as u32);
    assert_eq!(ex[0][3].1, [odd, end.clone()].concat());
    assert_eq!(ex[1][3].1, [tok.encode(text).unwrap(), end].concat());
    assert_eq!(counts["ygen"]["from_ids"], 1);
    assert_eq!(counts["ygen"]["from_text"], 1);
    assert_eq!(counts["ygen"]["bad_ids"], 1);
}

#[test]
fn the_spill_round_trips_every_field() {
    // many rows with varied lengths and ids: what comes out equals a direct encoding
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let rows: Vec<RawPairRow> = (0..50)
        .map(|i| pair_row(i, &format!("id-{i}"), &words(3 + i as usize, i as usize), &words(1 + i as usize % 7, 2), &words(2, i as usize)))
        .collect();
    let mut p = Preparer::new(tokenizer(false), template(false), PrepOptions { max_len: MaxLen::Fixed(4096), ..Default::default() }, &out, false).unwrap();
    p.feed_pairs(&rows[..20]).unwrap();
    p.feed_pairs(&rows[20..]).unwrap();
    p.finish(serde_json::json!({"extra": 1}), &mut |_, _| true).unwrap();
    let (ex, counts) = read_back(&out);
    assert_eq!(ex.len(), 50);
    assert_eq!(counts["truncated"], 0);
    for (i, e) in ex.iter().enumerate() {
        let user = words(3 + i, i);
        assert_eq!(e[0].1, prompt_ids(false, &user));
        assert_eq!(e.iter().map(|s| s.0).collect::<Vec<_>>(), vec![0, 2, 3]);
    }
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["extra"], 1);
    assert_eq!(meta["version"], shard::VERSION);
}

#[test]
fn encode_prompts_shortens_like_prep() {
    let enc = Encoder::new(tokenizer(true), template(true)).unwrap();
    let convs = vec![vec![Message::new("user", &words(300, 2))], vec![Message::new("user", "hi")]];
    let ids = encode_prompts(&enc, &convs, Some(50), KeepPart::Start).unwrap();
    assert_eq!(ids[0].len(), 50);
    assert!(ids[0].ends_with(&header_ids(true)));
    assert_eq!(ids[1], prompt_ids(true, "hi"));
    let e = encode_prompts(&enc, &convs, Some(3), KeepPart::Start).unwrap_err().to_string();
    assert!(e.contains("conversation 0"), "{e}");
}

