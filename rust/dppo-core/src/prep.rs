//! The preparation pipeline: rows in, shards out.
//!
//! Pass 1 (`feed_*`, once per source batch): validate rows, render the chat template, tokenize in
//! parallel, append the untruncated ids (and where the user turn's content lies in the prompt, see
//! `truncate`) to a spill file, and count full-sequence lengths in a histogram (constant memory,
//! exact percentiles). Pass 2 (`finish`): choose `max_len`, read the spill back in order, truncate
//! what does not fit without breaking the template, write shards and `meta.json`, and only then
//! move the folder into place. Memory does not grow with the number of rows; a killed run leaves
//! only a `*.partial-PID` folder that the next run removes.
//!
//! Response ids are "the rendered full conversation's ids after the prompt's". The prompt is
//! tokenized once per example, not once per response: special tokens always split the text, so
//! the ids of `prompt + response` are the prompt's ids up to its last special token followed by
//! the ids of the short tail after it (`"assistant\n"` for ChatML) joined with the response text.
//! Only that joint tail is tokenized per response. When the tail's ids are not a prefix of the
//! joint ids (the pre-tokenizer merged across the boundary, e.g. a response starting with a
//! newline), the prompt's ids are not a prefix of the conversation's ids either; the response's
//! ids are then those of the response text on its own, the example is flagged and counted
//! (`boundary_resplit`), and `prompt + response` stays a valid, decodable sequence.
//!
//! y_gen responses given as token ids (what the model generated, from `dppo generate`) are used as
//! they are: the stored y_gen is the template's text before an assistant turn's content (usually
//! nothing), the generated ids, and the template's end-of-turn text, never a re-tokenization.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use aho_corasick::{AhoCorasick, MatchKind};
use rayon::prelude::*;
use serde_json::json;

use crate::error::{IoContext, PrepError, Result};
use crate::record::{conversation, first_exchange, pair, pair_conversations, RawPairRow, RawSftRow, Skip, Turns};
use crate::shard::{self, SegKind, ShardStats, ShardWriter};
use crate::template::{ChatTemplate, Message};
use crate::tokenizer::Tokenizer;
use crate::truncate::{shorten_history, truncate_conversation, truncate_pair, ConvLayout, KeepPart, Limits, PromptLayout};

/// What kind of data a run prepares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKind {
    Sft,
    Pairs,
}

/// How `max_len` is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaxLen {
    /// The given percentile of full-sequence token lengths (nearest rank).
    Auto { percentile: f64 },
    Fixed(u32),
}

#[derive(Debug, Clone)]
pub struct PrepOptions {
    pub kind: DataKind,
    pub max_len: MaxLen,
    /// Default: `max_len - 21`, at least `max_len / 2` (with the paper's 989 this is the 968
    /// prompt tokens the author's runs kept). Only examples that do not fit `max_len` are cut.
    pub max_prompt_len: Option<u32>,
    /// Which part of a too-long user turn a shortened prompt keeps.
    pub truncate_prompt: KeepPart,
    /// Stop at the first bad row with an error naming it.
    pub strict: bool,
    /// Drop (and count) pairs whose prompt_id is not in the y_gen file, instead of failing.
    pub allow_missing_ygen: bool,
    /// A new shard starts once this many tokens are written.
    pub shard_max_tokens: u64,
    /// The first exchange of each conversation, or the whole conversation.
    pub turns: Turns,
    /// Prepare only the pairs whose prompt_id the y_gen file has (a curriculum round's own pairs):
    /// the others are not rows of this run, only counted as `outside_ygen`.
    pub ygen_subset: bool,
}

impl Default for PrepOptions {
    fn default() -> Self {
        Self {
            kind: DataKind::Pairs,
            max_len: MaxLen::Auto { percentile: 95.0 },
            max_prompt_len: None,
            truncate_prompt: KeepPart::Start,
            strict: false,
            allow_missing_ygen: false,
            shard_max_tokens: 256 << 20,
            turns: Turns::First,
            ygen_subset: false,
        }
    }
}

/// The smallest length L such that at least `p` percent of the counted lengths are <= L
/// (numpy's `percentile(..., method="inverted_cdf")`).
pub fn nearest_rank(hist: &[u64], p: f64) -> Option<u32> {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (len, &c) in hist.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(len as u32);
        }
    }
    Some((hist.len() - 1) as u32)
}

pub fn default_max_prompt_len(max_len: u32) -> u32 {
    max_len.saturating_sub(21).max(max_len / 2)
}

/// A y_gen response: its text, and (when known) the ids the model generated, stop token excluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YgenRow {
    pub prompt_id: String,
    pub response: String,
    pub ids: Option<Vec<u32>>,
}

struct YgenEntry {
    text: String,
    ids: Option<Vec<u32>>,
}

/// A pair's responses as the ids a policy generated (stop token excluded), joined to the pair by
/// `prompt_id`: what online rounds train on, never a re-tokenization of their text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairIdsRow {
    pub prompt_id: String,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

/// A response to tokenize: text rendered by the template, or ids used as they are.
#[derive(Clone, Copy)]
enum Reply<'a> {
    Text(&'a Message),
    Ids(&'a [u32]),
}

/// A whole conversation, tokenized (see [`Encoder::encode_whole`]).
struct Whole {
    ids: Vec<u32>,
    conv: ConvLayout,
    layout: PromptLayout,
    fallback: bool,
    resplit: bool,
    /// A turn's own rendering (as the last turn) is not a prefix of the conversation's.
    rerendered: bool,
}

/// One tokenized example before truncation.
struct Encoded {
    row: u64,
    id: String,
    prompt: Vec<u32>,
    layout: PromptLayout,
    /// (kind, ids) per response, in shard order: Response | Chosen, Rejected[, Ygen]. Empty for a
    /// whole SFT conversation, whose ids are all in `prompt` and its label spans in `conv`.
    responses: Vec<(SegKind, Vec<u32>)>,
    /// `--turns all`: the exchanges of the conversation (SFT) or of the pair's history.
    conv: Option<ConvLayout>,
    resplit: bool,
    /// The template did not place the user turn's content verbatim: only the generation header
    /// is protected from truncation.
    frame_fallback: bool,
    /// y_gen came from generated ids (Some(true)) or was tokenized from text (Some(false)).
    ygen_from_ids: Option<bool>,
    /// chosen and rejected came from generated ids (Some(true)) or from text (Some(false)).
    pair_from_ids: Option<bool>,
    scores: [f32; 2],
    /// See [`Whole::rerendered`].
    rerendered: bool,
}

#[derive(Default)]
struct Counts {
    rows_in: u64,
    kept: u64,
    skipped: BTreeMap<Skip, u64>,
    boundary_resplit: u64,
    frame_fallback: u64,
    rerendered: u64,
    outside_ygen: u64,
    untruncated_tokens: u64,
    ygen_missing_examples: Vec<String>,
    ygen_bad_rows: u64,
    ygen_bad_ids: u64,
    ygen_duplicates: u64,
    ygen_from_ids: u64,
    ygen_from_text: u64,
    pair_ids_bad_rows: u64,
    pair_ids_duplicates: u64,
    pair_ids_from_ids: u64,
    pair_ids_from_text: u64,
}

/// Renders conversations with a chat template and tokenizes them: the prompt once, each response
/// as the rendered conversation's ids after the prompt's (see the module docs). Shared by
/// preparation and by [`encode_prompts`] (the prompts `dppo generate` answers).
pub struct Encoder {
    tok: Arc<Tokenizer>,
    template: ChatTemplate,
    specials: Option<AhoCorasick>,
}

impl Encoder {
    pub fn new(tok: Arc<Tokenizer>, template: ChatTemplate) -> Result<Self> {
        let added: Vec<String> = tok.added_tokens().into_iter().map(|(s, _, _)| s).collect();
        let specials = if added.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(&added)
                    .map_err(|e| PrepError::Tokenizer(e.to_string()))?,
            )
        };
        Ok(Self { tok, template, specials })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Byte offset just past the last added/special token in `text` (0 if none).
    fn tail_start(&self, text: &str) -> usize {
        self.specials.as_ref().and_then(|ac| ac.find_iter(text).last()).map(|m| m.end()).unwrap_or(0)
    }

    fn tokenize(&self, text: &str) -> std::result::Result<Vec<u32>, Skip> {
        self.tok.encode(text).map_err(|_| Skip::TokenizerError)
    }

    /// Where the user turn's content lies in the prompt's ids (see `truncate`). The template's
    /// pieces around it are tokenized on their own; when the canonical ids do not split at their
    /// edges, the prompt is also kept tokenized piece by piece. `fallback`: the template does not
    /// place the content verbatim, so only the generation header is protected.
    fn layout(&self, msgs: &[Message], text: &str, prompt: &[u32]) -> std::result::Result<(PromptLayout, bool), Skip> {
        let Some((start, end)) = self.template.content_span(msgs, text, true) else {
            let header = self.template.generation_header(msgs).unwrap_or_default();
            let tail = self.tokenize(&header)?;
            let tail = if prompt.ends_with(&tail) { tail.len() as u32 } else { 0 };
            return Ok((PromptLayout { head: 0, tail, pieces: None }, true));
        };
        let head = self.tokenize(&text[..start])?;
        let tail = self.tokenize(&text[end..])?;
        let aligned = head.len() + tail.len() <= prompt.len() && prompt.starts_with(&head) && prompt.ends_with(&tail);
        let pieces = if aligned {
            None
        } else {
            let mut p = head.clone();
            p.extend(self.tokenize(&text[start..end])?);
            p.extend_from_slice(&tail);
            Some(p)
        };
        Ok((PromptLayout { head: head.len() as u32, tail: tail.len() as u32, pieces }, false))
    }

    /// The ids of `text` and the token position of each byte offset of `marks`.
    ///
    /// Special tokens always split the text, so the ids are those of the pieces between them,
    /// tokenized one by one. A mark inside a piece lands after the tokens `text[piece..mark]`
    /// tokenizes to when they are a prefix of the piece's ids; otherwise (a token merged across the
    /// mark) after their longest common prefix, and its `clean` entry is false.
    fn encode_marked(&self, text: &str, marks: &[usize]) -> std::result::Result<(Vec<u32>, Vec<u32>, Vec<bool>), Skip> {
        let mut order: Vec<usize> = (0..marks.len()).collect();
        order.sort_by_key(|&i| marks[i]);
        let mut cuts = vec![0];
        if let Some(ac) = &self.specials {
            for m in ac.find_iter(text) {
                cuts.push(m.start());
                cuts.push(m.end());
            }
        }
        cuts.push(text.len());
        cuts.dedup();
        let mut ids: Vec<u32> = Vec::with_capacity(text.len() / 3);
        let mut pos = vec![0u32; marks.len()];
        let mut clean = vec![true; marks.len()];
        let mut next = 0;
        for w in cuts.windows(2) {
            let (a, b) = (w[0], w[1]);
            while next < order.len() && marks[order[next]] <= a {
                pos[order[next]] = ids.len() as u32;
                next += 1;
            }
            if a >= b {
                continue;
            }
            let piece = self.tokenize(&text[a..b])?;
            while next < order.len() && marks[order[next]] < b {
                let i = order[next];
                let left = self.tokenize(&text[a..marks[i]])?;
                let common = left.iter().zip(&piece).take_while(|(x, y)| x == y).count();
                clean[i] = common == left.len();
                pos[i] = (ids.len() + common) as u32;
                next += 1;
            }
            ids.extend_from_slice(&piece);
        }
        for &i in &order[next..] {
            pos[i] = ids.len() as u32;
        }
        Ok((ids, pos, clean))
    }

    /// A whole conversation `msgs` rendered as `text` (`self.render(msgs, generation)`): its ids,
    /// the label span of each assistant turn, where its first exchange begins (when it can be
    /// dropped), and the layout of the prompt of its last turn: `text[..start of the last span]`
    /// for an SFT conversation (`generation` false), all of `text` for a pair's history.
    ///
    /// The label span of assistant turn k runs from the end of `msgs[..k]` rendered with the
    /// generation header to the end of `msgs[..=k]` rendered without it: both must be prefixes of
    /// `text` (else `template_not_prefix`).
    fn encode_whole(&self, msgs: &[Message], text: &str, generation: bool) -> std::result::Result<Whole, Skip> {
        let render = |m: &[Message], g: bool| self.template.render(m, g).map_err(|_| Skip::TemplateError);
        let asst: Vec<usize> = msgs.iter().enumerate().filter(|(_, m)| m.role == "assistant").map(|(i, _)| i).collect();
        let mut marks = Vec::with_capacity(2 * asst.len() + 3);
        let mut rerendered = false;
        for &k in &asst {
            let p = render(&msgs[..k], true)?;
            let f = render(&msgs[..=k], false)?;
            if !text.starts_with(&p) {
                return Err(Skip::TemplateNotPrefix);
            }
            // A template that writes a turn differently once later turns exist (an end-of-text
            // after the last turn only): the span ends where the two renderings part.
            let end = if text.starts_with(&f) {
                f.len()
            } else {
                rerendered = true;
                let mut common = text.bytes().zip(f.bytes()).take_while(|(a, b)| a == b).count();
                while !text.is_char_boundary(common) {
                    common -= 1;
                }
                // never inside a special token (`<|end|>` and `<|endoftext|>` share `<|`)
                if let Some(ac) = &self.specials {
                    if let Some(m) = ac.find_iter(text).find(|m| m.end() > common) {
                        if m.start() < common {
                            common = m.start();
                        }
                    }
                }
                common
            };
            if end <= p.len() {
                return Err(Skip::TemplateNotPrefix);
            }
            marks.push(p.len());
            marks.push(end);
        }
        let n = asst.len();
        let (prompt_msgs, prompt_end) = if generation { (msgs, text.len()) } else { (&msgs[..asst[n - 1]], marks[2 * n - 2]) };
        let prompt_text = &text[..prompt_end];
        let content = self.template.content_span(prompt_msgs, prompt_text, true);
        if let Some((a, b)) = content {
            marks.push(a);
            marks.push(b);
        }
        // the first exchange can be dropped when the template renders the conversation without it
        // as the same text with it removed
        let droppable = if generation { n } else { n - 1 };
        let mut first_mark = None;
        if droppable > 0 {
            let u1 = usize::from(msgs[0].role == "system");
            let rest: Vec<Message> = msgs[..u1].iter().chain(&msgs[asst[0] + 1..]).cloned().collect();
            let shorter = render(&rest, generation)?;
            let after = &text[marks[1]..];
            if let Some(before) = shorter.strip_suffix(after) {
                if text.starts_with(before) && before.len() <= marks[0] {
                    first_mark = Some(marks.len());
                    marks.push(before.len());
                }
            }
        }
        let (ids, pos, clean) = self.encode_marked(text, &marks)?;
        let spans: Vec<(u32, u32)> = (0..n).map(|j| (pos[2 * j], pos[2 * j + 1])).collect();
        let resplit = !clean[..2 * n].iter().all(|&c| c);
        let first = first_mark.filter(|&i| clean[i]).map(|i| pos[i]);
        let prompt_len = if generation { ids.len() } else { spans[n - 1].0 as usize };
        let (layout, fallback) = match content {
            Some(_) if clean[2 * n] && clean[2 * n + 1] => (
                PromptLayout { head: pos[2 * n], tail: (prompt_len as u32).saturating_sub(pos[2 * n + 1]), pieces: None },
                false,
            ),
            _ => self.layout(prompt_msgs, prompt_text, &ids[..prompt_len])?,
        };
        Ok(Whole { ids, conv: ConvLayout { first, spans }, layout, fallback, resplit, rerendered })
    }

    /// A whole SFT conversation (`--turns all`): its ids, every assistant turn a label span.
    fn encode_conversation(&self, msgs: &[Message]) -> std::result::Result<Encoded, Skip> {
        let text = self.template.render(msgs, false).map_err(|_| Skip::TemplateError)?;
        let w = self.encode_whole(msgs, &text, false)?;
        Ok(Encoded {
            row: 0,
            id: String::new(),
            prompt: w.ids,
            layout: w.layout,
            responses: Vec::new(),
            conv: Some(w.conv),
            resplit: w.resplit,
            frame_fallback: w.fallback,
            ygen_from_ids: None,
            pair_from_ids: None,
            scores: [f32::NAN; 2],
            rerendered: w.rerendered,
        })
    }

    /// Tokenize a prompt and its responses; see the module docs for the response rule. `whole`:
    /// the prompt is a multi-turn history (`--turns all`), whose exchanges are recorded.
    fn encode(&self, prompt_msgs: &[Message], responses: &[(SegKind, Reply<'_>)], whole: bool) -> std::result::Result<Encoded, Skip> {
        let prompt_text = self.template.render(prompt_msgs, true).map_err(|_| Skip::TemplateError)?;
        let cut = self.tail_start(&prompt_text);
        let tail_ids = self.tokenize(&prompt_text[cut..])?;
        let mut conv = None;
        let mut rerendered = false;
        let (prompt, layout, frame_fallback) = if whole {
            let w = self.encode_whole(prompt_msgs, &prompt_text, true)?;
            conv = Some(w.conv);
            rerendered = w.rerendered;
            (w.ids, w.layout, w.fallback)
        } else {
            let mut prompt = self.tokenize(&prompt_text[..cut])?;
            prompt.extend_from_slice(&tail_ids);
            let (layout, fallback) = self.layout(prompt_msgs, &prompt_text, &prompt)?;
            (prompt, layout, fallback)
        };
        let mut resplit = false;
        let mut msgs = prompt_msgs.to_vec();
        let mut out = Vec::with_capacity(responses.len());
        let mut frame: Option<(Vec<u32>, Vec<u32>)> = None;
        for &(kind, reply) in responses {
            let ids = match reply {
                Reply::Ids(generated) => {
                    if frame.is_none() {
                        let (before, after) =
                            self.template.assistant_frame(prompt_msgs, &prompt_text).ok_or(Skip::TemplateNotPrefix)?;
                        frame = Some((self.tokenize(&before)?, self.tokenize(&after)?));
                    }
                    let (before, after) = frame.as_ref().unwrap();
                    let mut ids = Vec::with_capacity(before.len() + generated.len() + after.len());
                    ids.extend_from_slice(before);
                    ids.extend_from_slice(generated);
                    ids.extend_from_slice(after);
                    ids
                }
                Reply::Text(resp) => {
                    msgs.push(resp.clone());
                    let full = self.template.render(&msgs, false).map_err(|_| Skip::TemplateError)?;
                    msgs.pop();
                    let Some(suffix) = full.strip_prefix(prompt_text.as_str()) else {
                        return Err(Skip::TemplateNotPrefix);
                    };
                    let joint = self.tokenize(&full[cut..])?;
                    if joint.starts_with(&tail_ids) {
                        joint[tail_ids.len()..].to_vec()
                    } else {
                        resplit = true;
                        self.tokenize(suffix)?
                    }
                }
            };
            out.push((kind, ids));
        }
        Ok(Encoded {
            row: 0,
            id: String::new(),
            prompt,
            layout,
            responses: out,
            conv,
            resplit,
            frame_fallback,
            ygen_from_ids: None,
            pair_from_ids: None,
            scores: [f32::NAN; 2],
            rerendered,
        })
    }

    /// The prompt of `messages` (rendered with the generation header, tokenized), shortened to at
    /// most `max_prompt_len` tokens as prep shortens a pair's prompt (`truncate::shorten_history`):
    /// a multi-turn history (one with an assistant turn, `--turns all`) loses its earliest
    /// exchanges whole first, then content of its last user turn goes; template tokens never do.
    pub fn prompt_ids(&self, messages: &[Message], max_prompt_len: Option<u32>, keep: KeepPart) -> std::result::Result<Vec<u32>, Skip> {
        let history = messages.iter().any(|m| m.role == "assistant");
        let mut ex = self.encode(messages, &[], history)?;
        if let Some(budget) = max_prompt_len {
            shorten_history(&mut ex.prompt, &ex.layout, ex.conv.as_ref(), budget, keep)?;
        }
        Ok(ex.prompt)
    }
}

/// The prompts of many conversations (in parallel), as [`Encoder::prompt_ids`]; an error names
/// the conversation (its index).
pub fn encode_prompts(
    encoder: &Encoder,
    conversations: &[Vec<Message>],
    max_prompt_len: Option<u32>,
    keep: KeepPart,
) -> Result<Vec<Vec<u32>>> {
    conversations
        .par_iter()
        .enumerate()
        .map(|(i, msgs)| {
            encoder.prompt_ids(msgs, max_prompt_len, keep).map_err(|skip| {
                PrepError::Input(format!("conversation {i}: {} ({})", skip.explain(), skip.name()))
            })
        })
        .collect()
}

/// Pass 1 and pass 2 of a preparation run. See the module docs.
pub struct Preparer {
    enc: Encoder,
    opts: PrepOptions,
    out_dir: PathBuf,
    work_dir: PathBuf,
    overwrite: bool,
    spill_path: PathBuf,
    spill: Option<BufWriter<File>>,
    hist: Vec<u64>,
    counts: Counts,
    ygen: Option<HashMap<String, YgenEntry>>,
    pair_ids: Option<HashMap<String, (Vec<u32>, Vec<u32>)>>,
    started: Instant,
}

impl Preparer {
    /// Check the output folder and create the working folder beside it.
    pub fn new(
        tok: Arc<Tokenizer>,
        template: ChatTemplate,
        opts: PrepOptions,
        out_dir: &Path,
        overwrite: bool,
    ) -> Result<Self> {
        if let MaxLen::Auto { percentile } = opts.max_len {
            if !(percentile > 0.0 && percentile <= 100.0) {
                return Err(PrepError::Config(format!("--percentile must be in (0, 100], got {percentile}")));
            }
        }
        if let MaxLen::Fixed(0) = opts.max_len {
            return Err(PrepError::Config("--max-len must be positive".into()));
        }
        if looks_complete(out_dir) && !overwrite {
            return Err(PrepError::Config(format!(
                "{} already holds prepared shards; pass --overwrite to replace them",
                out_dir.display()
            )));
        }
        if out_dir.exists() && !out_dir.is_dir() {
            return Err(PrepError::Config(format!("{} exists and is not a folder", out_dir.display())));
        }
        remove_stale_partials(out_dir);
        let enc = Encoder::new(tok, template)?;
        let work_dir = partial_dir(out_dir);
        fs::create_dir_all(&work_dir).at(&work_dir)?;
        let spill_path = work_dir.join("spill.bin");
        let spill = BufWriter::with_capacity(4 << 20, File::create(&spill_path).at(&spill_path)?);
        Ok(Self {
            enc,
            opts,
            out_dir: out_dir.to_owned(),
            work_dir,
            overwrite,
            spill_path,
            spill: Some(spill),
            hist: Vec::new(),
            counts: Counts::default(),
            ygen: None,
            pair_ids: None,
            started: Instant::now(),
        })
    }

    /// Register y_gen responses (`None` entries are unusable rows of the y_gen file). Ids outside
    /// the tokenizer's vocabulary make the row unusable too (counted as `bad_ids`).
    pub fn add_ygen(&mut self, rows: Vec<Option<YgenRow>>) {
        let vocab = self.enc.tok.vocab_size() as u32;
        let map = self.ygen.get_or_insert_with(HashMap::new);
        for r in rows {
            match r {
                None => self.counts.ygen_bad_rows += 1,
                Some(r) if r.ids.as_ref().is_some_and(|ids| ids.iter().any(|&t| t >= vocab)) => {
                    self.counts.ygen_bad_rows += 1;
                    self.counts.ygen_bad_ids += 1;
                }
                Some(r) => {
                    if map.contains_key(&r.prompt_id) {
                        self.counts.ygen_duplicates += 1;
                    } else {
                        map.insert(r.prompt_id, YgenEntry { text: r.response, ids: r.ids });
                    }
                }
            }
        }
    }

    /// Register generated ids for the chosen and rejected responses of pairs, by `prompt_id`
    /// (`None` entries are unusable rows; ids outside the vocabulary make a row unusable too).
    /// A pair whose prompt_id has ids here stores them, framed as y_gen's ids are; the others are
    /// tokenized from their text (both counted).
    pub fn add_pair_ids(&mut self, rows: Vec<Option<PairIdsRow>>) {
        let vocab = self.enc.tok.vocab_size() as u32;
        let map = self.pair_ids.get_or_insert_with(HashMap::new);
        for r in rows {
            match r {
                Some(r) if !r.chosen.iter().chain(&r.rejected).any(|&t| t >= vocab) => {
                    if map.contains_key(&r.prompt_id) {
                        self.counts.pair_ids_duplicates += 1;
                    } else {
                        map.insert(r.prompt_id, (r.chosen, r.rejected));
                    }
                }
                _ => self.counts.pair_ids_bad_rows += 1,
            }
        }
    }

    pub fn has_ygen(&self) -> bool {
        self.ygen.is_some()
    }

    fn encode_sft(&self, row: &RawSftRow) -> std::result::Result<Encoded, Skip> {
        if row.invalid {
            return Err(Skip::InvalidJson);
        }
        let mut ex = match self.opts.turns {
            Turns::First => {
                let (prompt, resp) = first_exchange(&row.messages)?;
                self.enc.encode(&prompt, &[(SegKind::Response, Reply::Text(&resp))], false)?
            }
            Turns::All => self.enc.encode_conversation(&conversation(&row.messages)?)?,
        };
        ex.row = row.row;
        Ok(ex)
    }

    /// A pair's id, history and two answers, by `--turns`.
    fn pair_of(&self, row: &RawPairRow) -> std::result::Result<(String, Vec<Message>, Message, Message), Skip> {
        if self.opts.turns == Turns::All { pair_conversations(row) } else { pair(row) }
    }

    fn encode_pair(&self, row: &RawPairRow) -> std::result::Result<Encoded, Skip> {
        let whole = self.opts.turns == Turns::All;
        let (id, prompt, chosen, rejected) = self.pair_of(row)?;
        let ygen_msg;
        let generated = self.pair_ids.as_ref().map(|m| m.get(&id));
        let mut responses = match generated {
            Some(Some((c, r))) => vec![(SegKind::Chosen, Reply::Ids(c)), (SegKind::Rejected, Reply::Ids(r))],
            _ => vec![(SegKind::Chosen, Reply::Text(&chosen)), (SegKind::Rejected, Reply::Text(&rejected))],
        };
        let mut ygen_from_ids = None;
        if let Some(map) = &self.ygen {
            let y = map.get(&id).ok_or(Skip::MissingYgen)?;
            match &y.ids {
                Some(ids) => responses.push((SegKind::Ygen, Reply::Ids(ids))),
                None => {
                    ygen_msg = Message::new("assistant", y.text.as_str());
                    responses.push((SegKind::Ygen, Reply::Text(&ygen_msg)));
                }
            }
            ygen_from_ids = Some(y.ids.is_some());
        }
        let mut ex = self.enc.encode(&prompt, &responses, whole)?;
        let score = |s: Option<f64>| s.map(|v| v as f32).unwrap_or(f32::NAN);
        ex.row = row.row;
        ex.id = id;
        ex.ygen_from_ids = ygen_from_ids;
        ex.pair_from_ids = generated.map(|g| g.is_some());
        ex.scores = [score(row.score_chosen), score(row.score_rejected)];
        Ok(ex)
    }

    pub fn feed_sft(&mut self, rows: &[RawSftRow]) -> Result<()> {
        let encoded: Vec<_> = rows.par_iter().map(|r| (r.row, String::new(), self.encode_sft(r))).collect();
        self.absorb(encoded)
    }

    pub fn feed_pairs(&mut self, rows: &[RawPairRow]) -> Result<()> {
        let encoded: Vec<_> = rows
            .par_iter()
            .map(|r| {
                let encoded = self.encode_pair(r);
                let id = match (&r.prompt_id, &encoded) {
                    (crate::record::RawStr::Str(s), _) if !s.is_empty() => s.clone(),
                    (_, Ok(ex)) => ex.id.clone(),
                    // a row named by its derived id that y_gen lacks: the report names that id
                    (_, Err(Skip::MissingYgen)) => self.pair_of(r).map(|p| p.0).unwrap_or_default(),
                    _ => String::new(),
                };
                (r.row, id, encoded)
            })
            .collect();
        self.absorb(encoded)
    }

    fn absorb(&mut self, encoded: Vec<(u64, String, std::result::Result<Encoded, Skip>)>) -> Result<()> {
        for (row, id, e) in encoded {
            if self.opts.ygen_subset && matches!(e, Err(Skip::MissingYgen)) {
                self.counts.outside_ygen += 1;
                continue;
            }
            self.counts.rows_in += 1;
            match e {
                Err(skip) => {
                    if skip == Skip::MissingYgen && !self.opts.allow_missing_ygen {
                        // not a row problem: reported as a whole at the end
                        if self.counts.ygen_missing_examples.len() < 5 {
                            self.counts.ygen_missing_examples.push(id.clone());
                        }
                    } else if self.opts.strict {
                        return Err(PrepError::BadRow {
                            row,
                            prompt_id: (!id.is_empty()).then_some(id),
                            reason: format!("{} ({})", skip.explain(), skip.name()),
                        });
                    }
                    *self.counts.skipped.entry(skip).or_default() += 1;
                }
                Ok(ex) => {
                    self.counts.kept += 1;
                    self.counts.boundary_resplit += ex.resplit as u64;
                    self.counts.frame_fallback += ex.frame_fallback as u64;
                    self.counts.rerendered += ex.rerendered as u64;
                    match ex.ygen_from_ids {
                        Some(true) => self.counts.ygen_from_ids += 1,
                        Some(false) => self.counts.ygen_from_text += 1,
                        None => {}
                    }
                    match ex.pair_from_ids {
                        Some(true) => self.counts.pair_ids_from_ids += 1,
                        Some(false) => self.counts.pair_ids_from_text += 1,
                        None => {}
                    }
                    if ex.responses.is_empty() {
                        // a whole SFT conversation: one sequence
                        let n = ex.prompt.len();
                        self.counts.untruncated_tokens += n as u64;
                        if self.hist.len() <= n {
                            self.hist.resize(n + 1, 0);
                        }
                        self.hist[n] += 1;
                    }
                    for (kind, ids) in &ex.responses {
                        let n = ex.prompt.len() + ids.len();
                        self.counts.untruncated_tokens += n as u64;
                        if *kind != SegKind::Ygen {
                            if self.hist.len() <= n {
                                self.hist.resize(n + 1, 0);
                            }
                            self.hist[n] += 1;
                        }
                    }
                    self.spill_write(&ex)?;
                }
            }
        }
        Ok(())
    }

    fn spill_write(&mut self, ex: &Encoded) -> Result<()> {
        let w = self.spill.as_mut().expect("spill open until finish");
        let pieces = ex.layout.pieces.as_deref().unwrap_or(&[]);
        let n_ids = ex.prompt.len() + pieces.len() + ex.responses.iter().map(|r| r.1.len()).sum::<usize>();
        let mut buf = Vec::with_capacity(64 + ex.id.len() + 4 * n_ids);
        buf.extend_from_slice(&ex.row.to_le_bytes());
        buf.extend_from_slice(&(ex.resplit as u32).to_le_bytes());
        buf.extend_from_slice(&ex.scores[0].to_le_bytes());
        buf.extend_from_slice(&ex.scores[1].to_le_bytes());
        buf.extend_from_slice(&(ex.id.len() as u32).to_le_bytes());
        buf.extend_from_slice(ex.id.as_bytes());
        buf.extend_from_slice(&ex.layout.head.to_le_bytes());
        buf.extend_from_slice(&ex.layout.tail.to_le_bytes());
        buf.extend_from_slice(&(ex.layout.pieces.as_ref().map_or(u32::MAX, |p| p.len() as u32)).to_le_bytes());
        buf.extend_from_slice(&(ex.responses.len() as u32).to_le_bytes());
        buf.extend_from_slice(&(ex.prompt.len() as u32).to_le_bytes());
        for (kind, ids) in &ex.responses {
            buf.extend_from_slice(&(*kind as u32).to_le_bytes());
            buf.extend_from_slice(&(ids.len() as u32).to_le_bytes());
        }
        match &ex.conv {
            None => buf.extend_from_slice(&u32::MAX.to_le_bytes()),
            Some(c) => {
                buf.extend_from_slice(&(c.spans.len() as u32).to_le_bytes());
                buf.extend_from_slice(&c.first.unwrap_or(u32::MAX).to_le_bytes());
                for &(a, b) in &c.spans {
                    buf.extend_from_slice(&a.to_le_bytes());
                    buf.extend_from_slice(&b.to_le_bytes());
                }
            }
        }
        let ids = ex.prompt.iter().chain(pieces).chain(ex.responses.iter().flat_map(|r| r.1.iter()));
        for &t in ids {
            buf.extend_from_slice(&t.to_le_bytes());
        }
        w.write_all(&buf).at(&self.spill_path)
    }

    /// Rows seen so far.
    pub fn rows_in(&self) -> u64 {
        self.counts.rows_in
    }

    /// Pass 2. `extra_meta` (source description, tokenizer name, ...) is merged into meta.json.
    /// `progress(done, total)` is called as examples are written; when it returns false the run
    /// stops, its working folder is removed and [`PrepError::Interrupted`] is returned.
    pub fn finish(mut self, extra_meta: serde_json::Value, progress: &mut dyn FnMut(u64, u64) -> bool) -> Result<serde_json::Value> {
        let result = self.finish_inner(extra_meta, progress);
        if result.is_err() {
            let _ = fs::remove_dir_all(&self.work_dir);
        }
        result
    }

    /// Remove the working folder (used when the caller aborts).
    pub fn abort(self) {
        let _ = fs::remove_dir_all(&self.work_dir);
    }

    fn finish_inner(&mut self, extra_meta: serde_json::Value, progress: &mut dyn FnMut(u64, u64) -> bool) -> Result<serde_json::Value> {
        let mut spill = self.spill.take().expect("finish called once");
        spill.flush().at(&self.spill_path)?;
        drop(spill);
        let c = &self.counts;
        if !c.ygen_missing_examples.is_empty() {
            let missing = c.skipped.get(&Skip::MissingYgen).copied().unwrap_or(0);
            return Err(PrepError::Input(format!(
                "the y_gen file lacks {missing} of the data's prompt_ids (e.g. {}); generate them with \
                 `dppo generate`, or pass --allow-missing-ygen to drop those pairs",
                c.ygen_missing_examples.join(", ")
            )));
        }
        if c.kept == 0 {
            let reasons: Vec<String> = c.skipped.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            return Err(PrepError::Input(format!(
                "no usable rows: {} rows read, all skipped ({})",
                c.rows_in,
                if reasons.is_empty() { "the source is empty".into() } else { reasons.join(", ") }
            )));
        }
        let (max_len, max_len_from) = match self.opts.max_len {
            MaxLen::Auto { percentile } => {
                (nearest_rank(&self.hist, percentile).unwrap_or(1), json!({"auto": {"percentile": percentile}}))
            }
            MaxLen::Fixed(n) => (n, json!("fixed")),
        };
        let max_len = max_len.max(2);
        let max_prompt_len = self.opts.max_prompt_len.unwrap_or_else(|| default_max_prompt_len(max_len)).min(max_len - 1);
        let limits = Limits { max_len, max_prompt_len, keep: self.opts.truncate_prompt };
        let kind = match self.opts.kind {
            DataKind::Sft => shard::KIND_SFT,
            DataKind::Pairs => shard::KIND_PAIRS,
        };
        let hflags = if self.ygen.is_some() { shard::HAS_YGEN } else { 0 };

        let mut reader = BufReader::with_capacity(4 << 20, File::open(&self.spill_path).at(&self.spill_path)?);
        let mut shards: Vec<ShardStats> = Vec::new();
        let mut writer: Option<ShardWriter> = None;
        let mut t = Truncated::default();
        let mut late_skips: BTreeMap<Skip, u64> = BTreeMap::new();
        let total = self.counts.kept;
        for done in 0..total {
            let mut ex = read_spilled(&mut reader, &self.spill_path)?;
            let mut flags = if ex.resplit { shard::FLAG_BOUNDARY_RESPLIT } else { 0 };
            let truncated = match ex.conv.as_mut() {
                Some(conv) if ex.responses.is_empty() => truncate_conversation(&mut ex.prompt, conv, &ex.layout, limits),
                conv => truncate_pair(&mut ex.prompt, &ex.layout, conv.as_deref(), &mut ex.responses, limits),
            };
            let cut = match truncated {
                Ok(cut) => cut,
                Err(skip) => {
                    if self.opts.strict {
                        return Err(PrepError::BadRow {
                            row: ex.row,
                            prompt_id: (!ex.id.is_empty()).then(|| ex.id.clone()),
                            reason: format!("{} ({})", skip.explain(), skip.name()),
                        });
                    }
                    *late_skips.entry(skip).or_default() += 1;
                    continue;
                }
            };
            if cut.prompt_truncated() {
                flags |= shard::FLAG_PROMPT_TRUNCATED;
            }
            if cut.response_truncated() || cut.ygen_truncated() {
                flags |= shard::FLAG_RESPONSE_TRUNCATED;
            }
            if cut.exchanges_dropped > 0 {
                flags |= shard::FLAG_EXCHANGES_DROPPED;
            }
            let sft_conversation = ex.conv.is_some() && ex.responses.is_empty();
            t.add(&cut, sft_conversation);
            if sft_conversation {
                t.label_spans += ex.conv.as_ref().map_or(0, |c| c.spans.len() as u64);
            } else if self.opts.kind == DataKind::Sft {
                t.label_spans += 1;
            }
            if writer.as_ref().is_some_and(|w| w.tokens() >= self.opts.shard_max_tokens) {
                shards.push(writer.take().unwrap().finish()?);
            }
            if writer.is_none() {
                let name = format!("shard-{:05}", shards.len());
                writer = Some(ShardWriter::create(&self.work_dir, &name, kind, hflags)?);
            }
            let mut segs: Vec<(SegKind, &[u32])> = Vec::with_capacity(3);
            match &ex.conv {
                Some(conv) if ex.responses.is_empty() => {
                    // context and label segments in turn: [context, label]+ [context]
                    let mut at = 0usize;
                    for &(a, b) in &conv.spans {
                        let (a, b) = (a as usize, b as usize);
                        if a > at || segs.is_empty() {
                            segs.push((SegKind::Prompt, &ex.prompt[at..a]));
                        }
                        segs.push((SegKind::Response, &ex.prompt[a..b]));
                        at = b;
                    }
                    if at < ex.prompt.len() {
                        segs.push((SegKind::Prompt, &ex.prompt[at..]));
                    }
                }
                _ => {
                    segs.push((SegKind::Prompt, &ex.prompt));
                    segs.extend(ex.responses.iter().map(|(k, ids)| (*k, ids.as_slice())));
                }
            }
            writer.as_mut().unwrap().add(ex.row, &ex.id, &segs, flags, ex.scores)?;
            if (done % 4096 == 4095 || done + 1 == total) && !progress(done + 1, total) {
                return Err(PrepError::Interrupted);
            }
        }
        if let Some(w) = writer.take() {
            shards.push(w.finish()?);
        }
        fs::remove_file(&self.spill_path).at(&self.spill_path)?;
        for (skip, n) in late_skips {
            *self.counts.skipped.entry(skip).or_default() += n;
            self.counts.kept -= n;
        }
        if self.counts.kept == 0 {
            let reasons: Vec<String> = self.counts.skipped.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            return Err(PrepError::Input(format!(
                "no usable rows: {} rows read, all skipped ({})",
                self.counts.rows_in,
                reasons.join(", ")
            )));
        }

        let tokens: u64 = shards.iter().map(|s| s.tokens).sum();
        let packed: u64 = shards.iter().map(|s| s.packed_tokens).sum();
        let elapsed = self.started.elapsed().as_secs_f64();
        let c = &self.counts;
        let mut dropped = serde_json::Map::new();
        for s in Skip::ALL {
            dropped.insert(s.name().into(), json!(c.skipped.get(&s).copied().unwrap_or(0)));
        }
        let summary = json!({
            "kind": match self.opts.kind { DataKind::Sft => "sft", DataKind::Pairs => "pairs" },
            "rows_in": c.rows_in,
            "rows_kept": c.kept,
            "rows_dropped": c.rows_in - c.kept,
            "dropped": dropped,
            "truncated": t.examples,
            "truncated_prompt": t.prompts,
            "truncated_response": t.responses_examples,
            "truncated_responses": t.responses,
            "prompt_tokens_removed": t.prompt_tokens,
            "prompt_tokens_removed_max": t.prompt_tokens_max,
            "response_tokens_removed": t.response_tokens,
            "response_tokens_removed_max": t.response_tokens_max,
            "ygen_tokens_removed": t.ygen_tokens,
            "ygen_truncated": t.ygen_truncated,
            "turns": self.opts.turns.name(),
            "exchanges_dropped": t.exchanges_dropped,
            "exchange_tokens_removed": t.exchange_tokens,
            "conversations_shortened": t.conversations_shortened,
            "label_spans": t.label_spans,
            "label_spans_dropped": t.label_spans_dropped,
            "truncate_prompt": self.opts.truncate_prompt.name(),
            "template_frame_fallback": c.frame_fallback,
            "boundary_resplit": c.boundary_resplit,
            "turns_rendered_differently": c.rerendered,
            "outside_ygen": c.outside_ygen,
            "max_len": max_len,
            "max_len_from": max_len_from,
            "max_prompt_len": max_prompt_len,
            "tokens": tokens,
            "packed_tokens": packed,
            "tokens_before_truncation": c.untruncated_tokens,
            "has_ygen": self.ygen.is_some(),
            "ygen": self.ygen.as_ref().map(|m| json!({
                "responses": m.len(), "bad_rows": c.ygen_bad_rows, "bad_ids": c.ygen_bad_ids,
                "duplicates": c.ygen_duplicates, "from_ids": c.ygen_from_ids, "from_text": c.ygen_from_text,
            })),
            "pair_ids": self.pair_ids.as_ref().map(|m| json!({
                "pairs": m.len(), "bad_rows": c.pair_ids_bad_rows, "duplicates": c.pair_ids_duplicates,
                "from_ids": c.pair_ids_from_ids, "from_text": c.pair_ids_from_text,
            })),
            "seconds": elapsed,
            "rows_per_s": c.rows_in as f64 / elapsed.max(1e-9),
            "tokens_per_s": c.untruncated_tokens as f64 / elapsed.max(1e-9),
        });
        let mut meta = json!({
            "format": "dppo-shards",
            "version": shard::VERSION,
            "kind": summary["kind"],
            "tokenizer": {
                "fingerprint": self.enc.tok.fingerprint(),
                "backend": self.enc.tok.backend_name(),
                "vocab_size": self.enc.tok.vocab_size(),
            },
            "chat_template": self.enc.template.source(),
            "chat_template_hash": format!("{:016x}", xxhash_rust::xxh3::xxh3_64(self.enc.template.source().as_bytes())),
            "shards": shards.iter().map(|s| json!({
                "name": s.name, "examples": s.examples, "tokens": s.tokens, "packed_tokens": s.packed_tokens,
                "tok_checksum": format!("{:016x}", s.tok_checksum),
            })).collect::<Vec<_>>(),
            "counts": summary,
        });
        merge(&mut meta, extra_meta);
        let meta_path = self.work_dir.join("meta.json");
        let text = serde_json::to_string_pretty(&meta).expect("meta serializes");
        fs::write(&meta_path, text).at(&meta_path)?;
        self.publish()?;
        Ok(meta["counts"].clone())
    }

    /// Move the finished working folder to the output path (replacing an old one only now).
    fn publish(&self) -> Result<()> {
        let out = &self.out_dir;
        if out.exists() {
            if looks_complete(out) && !self.overwrite {
                return Err(PrepError::Config(format!("{} appeared while preparing; not replaced", out.display())));
            }
            let is_empty = fs::read_dir(out).at(out)?.next().is_none();
            if !is_empty && !looks_complete(out) {
                // a folder with the user's own files: move ours in beside them
                for e in fs::read_dir(&self.work_dir).at(&self.work_dir)? {
                    let e = e.at(&self.work_dir)?;
                    if e.file_name() != "meta.json" {
                        fs::rename(e.path(), out.join(e.file_name())).at(out)?;
                    }
                }
                fs::rename(self.work_dir.join("meta.json"), out.join("meta.json")).at(out)?;
                let _ = fs::remove_dir(&self.work_dir);
                return Ok(());
            }
            let old = out.with_file_name(format!(
                "{}.old-{}",
                out.file_name().unwrap_or_default().to_string_lossy(),
                std::process::id()
            ));
            fs::rename(out, &old).at(out)?;
            fs::rename(&self.work_dir, out).at(out)?;
            let _ = fs::remove_dir_all(&old);
        } else {
            if let Some(parent) = out.parent() {
                if !parent.as_os_str().is_empty() {
                    fs::create_dir_all(parent).at(parent)?;
                }
            }
            fs::rename(&self.work_dir, out).at(out)?;
        }
        Ok(())
    }
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    if let (Some(a), serde_json::Value::Object(b)) = (into.as_object_mut(), from) {
        for (k, v) in b {
            a.insert(k, v);
        }
    }
}

/// A folder is complete when it has `meta.json` (written last, just before the rename).
pub fn looks_complete(dir: &Path) -> bool {
    dir.join("meta.json").is_file()
}

fn partial_dir(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "shards".into());
    out.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Remove working folders left by killed runs (their process no longer exists).
fn remove_stale_partials(out: &Path) {
    let Some(name) = out.file_name().map(|n| n.to_string_lossy().into_owned()) else { return };
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let prefix = format!(".{name}.partial-");
    let Ok(entries) = fs::read_dir(&parent) else { return };
    for e in entries.flatten() {
        let fname = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = fname.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) {
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

/// What truncation removed over a whole run (the `truncated*` counts of meta.json).
#[derive(Debug, Default)]
struct Truncated {
    examples: u64,
    prompts: u64,
    responses_examples: u64,
    responses: u64,
    prompt_tokens: u64,
    prompt_tokens_max: u64,
    response_tokens: u64,
    response_tokens_max: u64,
    ygen_tokens: u64,
    ygen_truncated: u64,
    exchanges_dropped: u64,
    exchange_tokens: u64,
    conversations_shortened: u64,
    label_spans_dropped: u64,
    label_spans: u64,
}

impl Truncated {
    fn add(&mut self, cut: &crate::truncate::Cut, sft_conversation: bool) {
        let (p, r) = (cut.prompt_removed as u64, cut.response_removed as u64);
        self.examples += (cut.prompt_truncated() || cut.response_truncated() || cut.exchanges_dropped > 0) as u64;
        self.ygen_truncated += cut.ygen_truncated() as u64;
        self.exchanges_dropped += cut.exchanges_dropped as u64;
        self.exchange_tokens += cut.exchange_tokens_removed as u64;
        self.conversations_shortened += (cut.exchanges_dropped > 0) as u64;
        if sft_conversation {
            self.label_spans_dropped += cut.exchanges_dropped as u64;
        }
        self.prompts += cut.prompt_truncated() as u64;
        self.responses_examples += cut.response_truncated() as u64;
        self.responses += cut.responses_cut as u64;
        self.prompt_tokens += p;
        self.prompt_tokens_max = self.prompt_tokens_max.max(p);
        self.response_tokens += r;
        self.response_tokens_max = self.response_tokens_max.max(r);
        self.ygen_tokens += cut.ygen_removed as u64;
    }
}

struct Spilled {
    row: u64,
    id: String,
    resplit: bool,
    scores: [f32; 2],
    prompt: Vec<u32>,
    layout: PromptLayout,
    responses: Vec<(SegKind, Vec<u32>)>,
    conv: Option<ConvLayout>,
}

fn read_spilled(r: &mut impl Read, path: &Path) -> Result<Spilled> {
    let mut b8 = [0u8; 8];
    let mut b4 = [0u8; 4];
    let mut u32_ = |r: &mut dyn Read| -> Result<u32> {
        r.read_exact(&mut b4).at(path)?;
        Ok(u32::from_le_bytes(b4))
    };
    r.read_exact(&mut b8).at(path)?;
    let row = u64::from_le_bytes(b8);
    let resplit = u32_(r)? != 0;
    let s0 = f32::from_bits(u32_(r)?);
    let s1 = f32::from_bits(u32_(r)?);
    let id_len = u32_(r)? as usize;
    let mut id = vec![0u8; id_len];
    r.read_exact(&mut id).at(path)?;
    let (head, tail, n_pieces) = (u32_(r)?, u32_(r)?, u32_(r)?);
    let n = u32_(r)? as usize;
    let plen = u32_(r)? as usize;
    let mut heads = Vec::with_capacity(n);
    for _ in 0..n {
        let k = match u32_(r)? {
            1 => SegKind::Response,
            2 => SegKind::Chosen,
            3 => SegKind::Rejected,
            _ => SegKind::Ygen,
        };
        heads.push((k, u32_(r)? as usize));
    }
    let n_spans = u32_(r)?;
    let conv = if n_spans == u32::MAX {
        None
    } else {
        let first = u32_(r)?;
        let mut spans = Vec::with_capacity(n_spans as usize);
        for _ in 0..n_spans {
            spans.push((u32_(r)?, u32_(r)?));
        }
        Some(ConvLayout { first: (first != u32::MAX).then_some(first), spans })
    };
    let mut read_ids = |len: usize| -> Result<Vec<u32>> {
        let mut bytes = vec![0u8; 4 * len];
        r.read_exact(&mut bytes).at(path)?;
        Ok(bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect())
    };
    let prompt = read_ids(plen)?;
    let pieces = if n_pieces == u32::MAX { None } else { Some(read_ids(n_pieces as usize)?) };
    let mut responses = Vec::with_capacity(n);
    for (k, len) in heads {
        responses.push((k, read_ids(len)?));
    }
    Ok(Spilled {
        row,
        id: String::from_utf8_lossy(&id).into_owned(),
        resplit,
        scores: [s0, s1],
        prompt,
        layout: PromptLayout { head, tail, pieces },
        responses,
        conv,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_matches_inverted_cdf() {
        // lengths 1..=100 once each: the 95th percentile is 95, the 100th is 100, the 1st is 1
        let mut hist = vec![0u64; 101];
        for l in 1..=100 {
            hist[l] = 1;
        }
        assert_eq!(nearest_rank(&hist, 95.0), Some(95));
        assert_eq!(nearest_rank(&hist, 100.0), Some(100));
        assert_eq!(nearest_rank(&hist, 0.5), Some(1));
        // 19 short and one long: p95 stays short, p96 needs the long one
        let mut h = vec![0u64; 1001];
        h[10] = 19;
        h[1000] = 1;
        assert_eq!(nearest_rank(&h, 95.0), Some(10));
        assert_eq!(nearest_rank(&h, 96.0), Some(1000));
        assert_eq!(nearest_rank(&[], 95.0), None);
    }

    #[test]
    fn defaults() {
        assert_eq!(default_max_prompt_len(989), 968);
        assert_eq!(default_max_prompt_len(30), 15);
    }
}
