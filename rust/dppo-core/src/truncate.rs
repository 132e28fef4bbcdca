//! Truncation that keeps the chat template intact.
//!
//! An example whose sequences (prompt + each response) all fit `max_len` is stored as it is. An
//! example that does not fit loses, first, content of its prompt's last turn (the user turn) when
//! the prompt is longer than `max_prompt_len`, and then, keep-start, the part of each response that
//! does not fit the room left. The template's tokens around the user turn's content (the system
//! turn and headers before it; the end-of-turn tokens and the generation header after it) are never
//! removed, so a truncated prompt still ends exactly as it does at inference.
//!
//! Where the content lies in the prompt's ids is the prompt's [`PromptLayout`], found once per
//! example while tokenizing (see `prep`).

use crate::record::Skip;
use crate::shard::SegKind;

/// Which part of a too-long user turn is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeepPart {
    /// Its first tokens (the paper's keep-start reading; the default).
    #[default]
    Start,
    /// Its last tokens.
    End,
}

impl KeepPart {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "start" => Some(Self::Start),
            "end" => Some(Self::End),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::End => "end",
        }
    }
}

/// Where the user turn's content lies in a prompt's ids.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PromptLayout {
    /// Template tokens before the content (system turn, user header).
    pub head: u32,
    /// Template tokens after it (end-of-turn tokens, generation header).
    pub tail: u32,
    /// When the canonical ids cannot be cut at the content's edges (the tokenizer merged a token
    /// across one of them), the prompt tokenized piece by piece, `head ++ content ++ tail`, with
    /// `head` and `tail` counted in it. A truncated prompt is built from these pieces.
    pub pieces: Option<Vec<u32>>,
}

/// Where the exchanges of a whole conversation lie in its ids (`--turns all`): the label spans of
/// its assistant turns (for pairs: those of the shared history) and where the first exchange
/// begins. Exchange 1 is `first..spans[0].1`, exchange j+1 is `spans[j-1].1..spans[j].1`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConvLayout {
    /// Token position where the first exchange (the first user turn's header) begins: set when the
    /// template renders the conversation without its earliest exchange as the same text with that
    /// exchange removed, so that dropping exchanges keeps the template. None: none can be dropped.
    pub first: Option<u32>,
    /// `[start, end)` of each assistant turn: its content, end-of-turn tokens and what the template
    /// writes after it.
    pub spans: Vec<(u32, u32)>,
}

/// Drop the earliest of the first `droppable` exchanges of `ids` until it is at most `target`
/// tokens long (or none is left to drop). The layout of the conversation's last prompt (`last`,
/// counted in the same ids) and the spans follow. Returns (exchanges dropped, tokens removed).
fn drop_exchanges(
    ids: &mut Vec<u32>,
    conv: &mut ConvLayout,
    droppable: usize,
    target: usize,
    last: &mut PromptLayout,
) -> (u32, u32) {
    let Some(first) = conv.first.map(|f| f as usize) else { return (0, 0) };
    let (mut d, mut removed) = (0usize, 0usize);
    while d < droppable && ids.len() - removed > target {
        d += 1;
        removed = conv.spans[d - 1].1 as usize - first;
    }
    if d == 0 {
        return (0, 0);
    }
    ids.drain(first..first + removed);
    if let Some(p) = last.pieces.as_mut() {
        p.drain(first..first + removed);
    }
    last.head = last.head.saturating_sub(removed as u32);
    conv.spans = conv.spans[d..].iter().map(|&(a, b)| (a - removed as u32, b - removed as u32)).collect();
    (d as u32, removed as u32)
}

/// Truncate a whole SFT conversation in place (`ids`, its label spans in `conv`; `last`: the
/// layout of the prompt of its last assistant turn, `ids[..spans.last().0]`).
///
/// A conversation that fits `max_len` is untouched. Otherwise its earliest exchanges go first,
/// whole, each with its label span, until it fits or one exchange is left; that last exchange is
/// then truncated as a single-turn example (content of its user turn, then the response's end).
/// Template tokens after the last span (rare) go with it.
pub fn truncate_conversation(ids: &mut Vec<u32>, conv: &mut ConvLayout, last: &PromptLayout, lim: Limits) -> Result<Cut, Skip> {
    let max_len = lim.max_len as usize;
    let mut cut = Cut::default();
    if ids.len() <= max_len || conv.spans.is_empty() {
        return Ok(cut);
    }
    let mut last = last.clone();
    let n = conv.spans.len();
    if n > 1 && conv.first.is_none() {
        return Err(Skip::NotTruncatable);
    }
    let (d, removed) = drop_exchanges(ids, conv, n - 1, max_len, &mut last);
    cut.exchanges_dropped = d;
    cut.exchange_tokens_removed = removed;
    if ids.len() <= max_len {
        return Ok(cut);
    }
    let (s, e) = conv.spans[conv.spans.len() - 1];
    let mut prompt = ids[..s as usize].to_vec();
    let mut resp = [(SegKind::Response, ids[s as usize..e as usize].to_vec())];
    let one = truncate_example(&mut prompt, &last, &mut resp, lim)?;
    cut.prompt_removed = one.prompt_removed;
    cut.response_removed = one.response_removed;
    cut.responses_cut = one.responses_cut;
    let p = prompt.len() as u32;
    let r = resp[0].1.len() as u32;
    prompt.extend_from_slice(&resp[0].1);
    cut.exchange_tokens_removed += (ids.len() - e as usize) as u32; // trailing template tokens
    *ids = prompt;
    conv.spans = vec![(p, p + r)];
    Ok(cut)
}

/// The limits an example is truncated to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_len: u32,
    pub max_prompt_len: u32,
    pub keep: KeepPart,
}

/// What truncating one example removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cut {
    /// Prompt tokens removed (0: the prompt is untouched).
    pub prompt_removed: u32,
    /// Response tokens removed, over all of the example's responses.
    pub response_removed: u32,
    /// Responses that lost tokens.
    pub responses_cut: u32,
    /// y_gen tokens removed (not included in `response_removed`).
    pub ygen_removed: u32,
    /// Whole exchanges (user turn and assistant turn) dropped from the start of a conversation.
    pub exchanges_dropped: u32,
    /// Tokens those exchanges held (not included in `prompt_removed`).
    pub exchange_tokens_removed: u32,
}

impl Cut {
    pub fn prompt_truncated(&self) -> bool {
        self.prompt_removed > 0
    }

    pub fn response_truncated(&self) -> bool {
        self.responses_cut > 0
    }

    pub fn ygen_truncated(&self) -> bool {
        self.ygen_removed > 0
    }
}

/// Truncate one example in place (see the module docs).
///
/// Whether the example is cut, and how much of its prompt stays, is decided by its own responses
/// (the response of SFT; chosen and rejected of a pair), never by y_gen: the same pair gets the
/// same prompt with and without y_gen. y_gen keeps its start, up to the room the prompt leaves.
///
/// Fails with [`Skip::PromptTooLong`] when the prompt must be shortened but its template tokens
/// alone (head and tail of its layout) leave no room for a single content token.
pub fn truncate_example(
    prompt: &mut Vec<u32>,
    layout: &PromptLayout,
    responses: &mut [(SegKind, Vec<u32>)],
    lim: Limits,
) -> Result<Cut, Skip> {
    truncate_pair(prompt, layout, None, responses, lim)
}

/// [`truncate_example`] for a prompt that may be a multi-turn history (`conv`): while the prompt
/// is longer than `max_prompt_len`, its earliest exchanges go first, whole; then the content of its
/// oldest remaining user turn (the last one) is shortened.
pub fn truncate_pair(
    prompt: &mut Vec<u32>,
    layout: &PromptLayout,
    conv: Option<&ConvLayout>,
    responses: &mut [(SegKind, Vec<u32>)],
    lim: Limits,
) -> Result<Cut, Skip> {
    let max_len = lim.max_len as usize;
    let mut cut = Cut::default();
    let fits = responses.iter().filter(|(k, _)| *k != SegKind::Ygen).all(|(_, r)| prompt.len() + r.len() <= max_len);
    if !fits {
        let budget = lim.max_prompt_len.min(lim.max_len.saturating_sub(1));
        let (d, removed, shortened) = shorten_history(prompt, layout, conv, budget, lim.keep)?;
        cut.exchanges_dropped = d;
        cut.exchange_tokens_removed = removed;
        cut.prompt_removed = shortened;
    }
    let room = max_len.saturating_sub(prompt.len());
    for (kind, ids) in responses.iter_mut() {
        if ids.len() > room {
            let removed = (ids.len() - room) as u32;
            ids.truncate(room);
            if *kind == SegKind::Ygen {
                cut.ygen_removed += removed;
            } else {
                cut.response_removed += removed;
                cut.responses_cut += 1;
            }
        }
    }
    Ok(cut)
}

/// Shorten a prompt that may be a multi-turn history (`conv`, None for one user turn) to at most
/// `budget` tokens: its earliest exchanges go first, whole; then content of its oldest remaining
/// user turn (the last one). The one rule for a pair's prompt (`truncate_pair`) and for the prompts
/// `dppo generate` and `dppo eval` answer. Returns (exchanges dropped, their tokens, content tokens
/// removed).
pub fn shorten_history(
    prompt: &mut Vec<u32>,
    layout: &PromptLayout,
    conv: Option<&ConvLayout>,
    budget: u32,
    keep: KeepPart,
) -> Result<(u32, u32, u32), Skip> {
    let mut layout = std::borrow::Cow::Borrowed(layout);
    let (mut dropped, mut removed, mut wanted_drop) = (0, 0, false);
    if let Some(conv) = conv {
        if prompt.len() > budget as usize && !conv.spans.is_empty() {
            wanted_drop = conv.first.is_none();
            let mut conv = conv.clone();
            let n = conv.spans.len();
            (dropped, removed) = drop_exchanges(prompt, &mut conv, n, budget as usize, layout.to_mut());
        }
    }
    let shortened =
        shorten_prompt(prompt, &layout, budget, keep).map_err(|e| if wanted_drop { Skip::NotTruncatable } else { e })?;
    Ok((dropped, removed, shortened))
}

/// Shorten a prompt longer than `budget` tokens to `budget` by removing content of its user turn
/// (the template's head and tail stay); returns the number of tokens removed (0 if it fits).
pub fn shorten_prompt(prompt: &mut Vec<u32>, layout: &PromptLayout, budget: u32, keep: KeepPart) -> Result<u32, Skip> {
    let budget = budget as usize;
    if prompt.len() <= budget {
        return Ok(0);
    }
    let src: &[u32] = layout.pieces.as_deref().unwrap_or(prompt);
    let (head, tail) = (layout.head as usize, layout.tail as usize);
    if head + tail + 1 > budget || head + tail > src.len() {
        return Err(Skip::PromptTooLong);
    }
    let content = &src[head..src.len() - tail];
    let n = (budget - head - tail).min(content.len());
    let kept = match keep {
        KeepPart::Start => &content[..n],
        KeepPart::End => &content[content.len() - n..],
    };
    let mut shorter = Vec::with_capacity(head + n + tail);
    shorter.extend_from_slice(&src[..head]);
    shorter.extend_from_slice(kept);
    shorter.extend_from_slice(&src[src.len() - tail..]);
    let removed = prompt.len().saturating_sub(shorter.len()) as u32;
    *prompt = shorter;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // A prompt [H H | c1 .. cn | T T T]: head 2, tail 3.
    fn prompt(n: u32) -> (Vec<u32>, PromptLayout) {
        let mut p = vec![900, 901];
        p.extend(1..=n);
        p.extend([902, 903, 904]);
        (p, PromptLayout { head: 2, tail: 3, pieces: None })
    }

    fn lim(max_len: u32, max_prompt_len: u32, keep: KeepPart) -> Limits {
        Limits { max_len, max_prompt_len, keep }
    }

    #[test]
    fn an_example_that_fits_is_untouched_even_with_a_long_prompt() {
        let (mut p, layout) = prompt(20); // 25 tokens, over max_prompt_len 10
        let orig = p.clone();
        let mut r = vec![(SegKind::Chosen, vec![7; 5]), (SegKind::Rejected, vec![8; 4])];
        let cut = truncate_example(&mut p, &layout, &mut r, lim(30, 10, KeepPart::Start)).unwrap();
        assert_eq!(cut, Cut::default());
        assert_eq!(p, orig);
        assert_eq!(r[0].1.len(), 5);
    }

    #[test]
    fn a_long_prompt_keeps_head_and_tail_and_the_content_start() {
        let (mut p, layout) = prompt(20);
        let mut r = vec![(SegKind::Response, vec![7; 20])];
        let cut = truncate_example(&mut p, &layout, &mut r, lim(30, 10, KeepPart::Start)).unwrap();
        assert_eq!(p, vec![900, 901, 1, 2, 3, 4, 5, 902, 903, 904]);
        assert_eq!(cut.prompt_removed, 15);
        assert_eq!(r[0].1.len(), 20, "room 20 holds the response");
        assert_eq!(cut.responses_cut, 0);
    }

    #[test]
    fn keep_end_keeps_the_content_end() {
        let (mut p, layout) = prompt(20);
        let mut r = vec![(SegKind::Response, vec![7; 40])];
        let cut = truncate_example(&mut p, &layout, &mut r, lim(30, 10, KeepPart::End)).unwrap();
        assert_eq!(p, vec![900, 901, 16, 17, 18, 19, 20, 902, 903, 904]);
        assert_eq!((cut.prompt_removed, cut.response_removed, cut.responses_cut), (15, 20, 1));
        assert_eq!(r[0].1, vec![7; 20]);
    }

    #[test]
    fn a_short_prompt_is_kept_and_only_responses_lose_their_end() {
        let (mut p, layout) = prompt(3); // 8 tokens
        let mut r = vec![(SegKind::Chosen, vec![1, 2, 3, 4, 5, 6]), (SegKind::Rejected, vec![9; 2]), (SegKind::Ygen, vec![5; 9])];
        let cut = truncate_example(&mut p, &layout, &mut r, lim(12, 10, KeepPart::Start)).unwrap();
        assert_eq!(p.len(), 8);
        assert_eq!(r[0].1, vec![1, 2, 3, 4]);
        assert_eq!(r[1].1, vec![9; 2]);
        assert_eq!(r[2].1.len(), 4);
        assert_eq!((cut.response_removed, cut.responses_cut, cut.ygen_removed), (2, 1, 5));
    }

    #[test]
    fn pieces_are_used_when_the_canonical_ids_do_not_split() {
        let canonical = vec![900, 50, 51, 52, 53, 54, 902];
        let layout = PromptLayout { head: 2, tail: 1, pieces: Some(vec![900, 10, 1, 2, 3, 4, 5, 902]) };
        let mut p = canonical;
        let mut r = vec![(SegKind::Response, vec![7; 10])];
        truncate_example(&mut p, &layout, &mut r, lim(10, 5, KeepPart::Start)).unwrap();
        assert_eq!(p, vec![900, 10, 1, 2, 902]);
    }

    #[test]
    fn a_template_longer_than_the_budget_is_a_skip() {
        let (mut p, layout) = prompt(20);
        let mut r = vec![(SegKind::Response, vec![7; 40])];
        let e = truncate_example(&mut p, &layout, &mut r, lim(30, 5, KeepPart::Start)).unwrap_err();
        assert_eq!(e, Skip::PromptTooLong);
    }

    #[test]
    fn a_long_ygen_never_shortens_the_prompt() {
        // chosen and rejected fit: nothing of the prompt goes, y_gen keeps its start
        let (mut p, layout) = prompt(20);
        let orig = p.clone();
        let mut r = vec![(SegKind::Chosen, vec![7; 3]), (SegKind::Rejected, vec![8; 3]), (SegKind::Ygen, vec![9; 40])];
        let cut = truncate_example(&mut p, &layout, &mut r, lim(30, 10, KeepPart::Start)).unwrap();
        assert_eq!(p, orig);
        assert_eq!(r[2].1, vec![9; 5]);
        assert_eq!((cut.prompt_removed, cut.responses_cut, cut.ygen_removed), (0, 0, 35));
        // the same pair without y_gen: the same prompt
        let (mut q, _) = prompt(20);
        let mut r2 = vec![(SegKind::Chosen, vec![7; 3]), (SegKind::Rejected, vec![8; 3])];
        truncate_example(&mut q, &layout, &mut r2, lim(30, 10, KeepPart::Start)).unwrap();
        assert_eq!(q, p);
    }

    // [S S | U 1 1 A 2 2 e | U 3 3 A 4 4 e | U c c c c G | 6 6 e]: system 2, three exchanges
    fn conversation() -> (Vec<u32>, ConvLayout, PromptLayout) {
        let ids = vec![90, 91, 80, 1, 1, 81, 2, 2, 82, 80, 3, 3, 81, 4, 4, 82, 80, 5, 5, 5, 5, 81, 6, 6, 82];
        let conv = ConvLayout { first: Some(2), spans: vec![(6, 9), (13, 16), (22, 25)] };
        // the last prompt ids[..22]: content 5 5 5 5 at 17..21, tail [81] (the generation header)
        let last = PromptLayout { head: 17, tail: 1, pieces: None };
        (ids, conv, last)
    }

    #[test]
    fn a_conversation_loses_its_earliest_exchanges_whole() {
        let (mut ids, mut conv, last) = conversation();
        let cut = truncate_conversation(&mut ids, &mut conv, &last, lim(20, 15, KeepPart::Start)).unwrap();
        assert_eq!(ids, vec![90, 91, 80, 3, 3, 81, 4, 4, 82, 80, 5, 5, 5, 5, 81, 6, 6, 82]);
        assert_eq!(conv.spans, vec![(6, 9), (15, 18)]);
        assert_eq!((cut.exchanges_dropped, cut.exchange_tokens_removed, cut.prompt_removed), (1, 7, 0));
        // down to the last exchange, whose user turn is then shortened (system and headers stay)
        let (mut ids, mut conv, last) = conversation();
        let cut = truncate_conversation(&mut ids, &mut conv, &last, lim(9, 6, KeepPart::Start)).unwrap();
        assert_eq!(ids, vec![90, 91, 80, 5, 5, 81, 6, 6, 82]);
        assert_eq!(conv.spans, vec![(6, 9)]);
        assert_eq!((cut.exchanges_dropped, cut.prompt_removed, cut.responses_cut), (2, 2, 0));
        // a template that cannot drop exchanges
        let (mut ids, mut conv, last) = conversation();
        conv.first = None;
        let e = truncate_conversation(&mut ids, &mut conv, &last, lim(20, 15, KeepPart::Start)).unwrap_err();
        assert_eq!(e, Skip::NotTruncatable);
        // a conversation that fits is untouched
        let (mut ids, mut conv, last) = conversation();
        let orig = (ids.clone(), conv.clone());
        assert_eq!(truncate_conversation(&mut ids, &mut conv, &last, lim(25, 10, KeepPart::Start)).unwrap(), Cut::default());
        assert_eq!((ids, conv), orig);
    }

    #[test]
    fn a_history_prompt_loses_earliest_exchanges_then_user_content() {
        let (ids, conv, _) = conversation();
        // the pair's prompt is the history up to the last generation header
        let mut p = ids[..22].to_vec();
        let hist = ConvLayout { first: conv.first, spans: conv.spans[..2].to_vec() };
        let layout = PromptLayout { head: 17, tail: 1, pieces: None };
        let mut r = vec![(SegKind::Chosen, vec![7; 4]), (SegKind::Rejected, vec![8; 2])];
        let cut = truncate_pair(&mut p, &layout, Some(&hist), &mut r, lim(20, 15, KeepPart::Start)).unwrap();
        assert_eq!(p, vec![90, 91, 80, 3, 3, 81, 4, 4, 82, 80, 5, 5, 5, 5, 81]);
        assert_eq!((cut.exchanges_dropped, cut.prompt_removed, cut.responses_cut), (1, 0, 0));
        let mut p = ids[..22].to_vec();
        let cut = truncate_pair(&mut p, &layout, Some(&hist), &mut r, lim(9, 6, KeepPart::End)).unwrap();
        assert_eq!(p, vec![90, 91, 80, 5, 5, 81]);
        assert_eq!((cut.exchanges_dropped, cut.prompt_removed, cut.responses_cut), (2, 2, 1));
        assert_eq!(r[0].1, vec![7; 3]);
    }

    proptest! {
        #[test]
        fn invariants(n in 1u32..60, resp in prop::collection::vec(0usize..80, 1..4), max_len in 8u32..120,
                      max_prompt_len in 6u32..100, end in any::<bool>()) {
            let (mut p, layout) = prompt(n);
            let orig = p.clone();
            let mut r: Vec<(SegKind, Vec<u32>)> = resp.iter().map(|&k| (SegKind::Response, vec![1; k])).collect();
            let fits = r.iter().all(|(_, x)| orig.len() + x.len() <= max_len as usize);
            let keep = if end { KeepPart::End } else { KeepPart::Start };
            match truncate_example(&mut p, &layout, &mut r, lim(max_len, max_prompt_len, keep)) {
                Err(_) => prop_assert!(5 + 1 > max_prompt_len.min(max_len - 1) as usize),
                Ok(cut) => {
                    if fits {
                        prop_assert_eq!(&p, &orig);
                        prop_assert_eq!(cut, Cut::default());
                    }
                    // the template's tokens survive: head first, tail last
                    prop_assert_eq!(&p[..2], &orig[..2]);
                    prop_assert_eq!(&p[p.len() - 3..], &orig[orig.len() - 3..]);
                    prop_assert_eq!(cut.prompt_removed as usize, orig.len() - p.len());
                    for (_, x) in &r {
                        prop_assert!(p.len() + x.len() <= max_len as usize || fits);
                    }
                }
            }
        }
    }
}
