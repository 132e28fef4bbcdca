//! Raw rows as read from a source, their validation, and the reasons a row is skipped.
//!
//! A source row becomes a `RawSftRow` / `RawPairRow` whatever its format (Arrow from parquet,
//! polars' JSON-text fallback for ragged jsonl, ...). Validation turns it into a prompt
//! (messages up to and including the first user turn, with an optional leading system message)
//! and the first assistant turn after it, or into a `Skip` reason that the summary counts.

use std::fmt;

use crate::template::Message;

/// A string field as found in the source.
#[derive(Debug, Clone, PartialEq)]
pub enum RawStr {
    Missing,
    NotString,
    Str(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RawMessage {
    pub role: RawStr,
    pub content: RawStr,
}

/// A message list as found in the source.
#[derive(Debug, Clone, PartialEq)]
pub enum RawMessages {
    Missing,
    NotAList,
    List(Vec<RawMessage>),
}

/// A row of SmolTalk-schema chat data.
#[derive(Debug, Clone)]
pub struct RawSftRow {
    pub row: u64,
    pub messages: RawMessages,
    /// The row could not be parsed at all (a jsonl line that is not a JSON object).
    pub invalid: bool,
}

/// A row of UltraFeedback-binarized-schema preference data.
#[derive(Debug, Clone)]
pub struct RawPairRow {
    pub row: u64,
    pub prompt_id: RawStr,
    pub chosen: RawMessages,
    pub rejected: RawMessages,
    pub score_chosen: Option<f64>,
    pub score_rejected: Option<f64>,
    /// A score is present but not a number.
    pub score_error: bool,
    pub invalid: bool,
}

/// Why a row was dropped. The `name` is the key used in the summary and `meta.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Skip {
    MissingField,
    EmptyContent,
    NonStringContent,
    BadRoles,
    NoAssistantTurn,
    PromptMismatch,
    MissingYgen,
    TemplateNotPrefix,
    TemplateError,
    InvalidJson,
    PromptTooLong,
    TokenizerError,
    NonNumericScore,
    NotTruncatable,
}

impl Skip {
    pub const ALL: [Skip; 14] = [
        Skip::MissingField,
        Skip::EmptyContent,
        Skip::NonStringContent,
        Skip::BadRoles,
        Skip::NoAssistantTurn,
        Skip::PromptMismatch,
        Skip::MissingYgen,
        Skip::TemplateNotPrefix,
        Skip::TemplateError,
        Skip::InvalidJson,
        Skip::PromptTooLong,
        Skip::TokenizerError,
        Skip::NonNumericScore,
        Skip::NotTruncatable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Skip::MissingField => "missing_field",
            Skip::EmptyContent => "empty_content",
            Skip::NonStringContent => "non_string_content",
            Skip::BadRoles => "bad_roles",
            Skip::NoAssistantTurn => "no_assistant_turn",
            Skip::PromptMismatch => "prompt_mismatch",
            Skip::MissingYgen => "missing_ygen",
            Skip::TemplateNotPrefix => "template_not_prefix",
            Skip::TemplateError => "template_error",
            Skip::InvalidJson => "invalid_json",
            Skip::PromptTooLong => "prompt_too_long",
            Skip::TokenizerError => "tokenizer_error",
            Skip::NonNumericScore => "non_numeric_score",
            Skip::NotTruncatable => "not_truncatable",
        }
    }

    /// A sentence for `--strict` errors.
    pub fn explain(self) -> &'static str {
        match self {
            Skip::MissingField => "a required field is missing or null",
            Skip::EmptyContent => "a message has empty content",
            Skip::NonStringContent => "a message content or role is not a string",
            Skip::BadRoles => "roles must be [system], user, assistant (alternating, ending with assistant for --turns all)",
            Skip::NoAssistantTurn => "the conversation has no assistant turn after the first user turn",
            Skip::PromptMismatch => {
                "chosen and rejected do not share the same prompt messages (with --turns all: every message but the last)"
            }
            Skip::MissingYgen => "the y_gen file has no response for this prompt_id",
            Skip::TemplateNotPrefix => {
                "the rendered prompt is not a prefix of the rendered conversation (chat template)"
            }
            Skip::TemplateError => "the chat template raised an error for this conversation",
            Skip::InvalidJson => "the line is not a JSON object",
            Skip::PromptTooLong => {
                "the prompt must be shortened, but its template tokens alone (system turn, headers, generation \
                 header) exceed --max-prompt-len"
            }
            Skip::TokenizerError => "the tokenizer failed on this row's text",
            Skip::NonNumericScore => "score_chosen or score_rejected is present but not a number",
            Skip::NotTruncatable => {
                "the conversation is longer than max_len and its chat template does not render it without its \
                 earliest exchange as the same text, so no exchange can be dropped"
            }
        }
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn text(s: &RawStr) -> Result<&str, Skip> {
    match s {
        RawStr::Missing => Err(Skip::MissingField),
        RawStr::NotString => Err(Skip::NonStringContent),
        RawStr::Str(s) => Ok(s),
    }
}

fn message(m: &RawMessage) -> Result<Message, Skip> {
    let role = text(&m.role)?;
    let content = text(&m.content)?;
    if content.trim().is_empty() {
        return Err(Skip::EmptyContent);
    }
    Ok(Message::new(role, content))
}

/// The first exchange of a conversation: `([system,] user)` as the prompt and the first
/// assistant turn as the response. Later turns are ignored and not validated.
pub fn first_exchange(messages: &RawMessages) -> Result<(Vec<Message>, Message), Skip> {
    let list = match messages {
        RawMessages::Missing => return Err(Skip::MissingField),
        RawMessages::NotAList => return Err(Skip::MissingField),
        RawMessages::List(l) => l,
    };
    let mut i = 0;
    let mut prompt = Vec::with_capacity(2);
    let role_of = |m: &RawMessage| text(&m.role).map(str::to_owned);
    if let Some(first) = list.first() {
        if role_of(first)? == "system" {
            prompt.push(message(first)?);
            i = 1;
        }
    }
    match list.get(i) {
        None => return Err(if prompt.is_empty() { Skip::MissingField } else { Skip::BadRoles }),
        Some(m) if role_of(m)? != "user" => return Err(Skip::BadRoles),
        Some(m) => prompt.push(message(m)?),
    }
    match list.get(i + 1) {
        None => Err(Skip::NoAssistantTurn),
        Some(m) if role_of(m)? != "assistant" => Err(Skip::BadRoles),
        Some(m) => Ok((prompt, message(m)?)),
    }
}

/// Which turns of a conversation make an example (`--turns`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Turns {
    /// The first exchange only (the paper's reading; the default).
    #[default]
    First,
    /// The whole conversation.
    All,
}

impl Turns {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "first" => Some(Self::First),
            "all" => Some(Self::All),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::First => "first",
            Self::All => "all",
        }
    }
}

/// A whole conversation: an optional leading system message, then user and assistant turns
/// alternating, starting with a user turn and ending with an assistant turn. Every message is
/// validated.
pub fn conversation(messages: &RawMessages) -> Result<Vec<Message>, Skip> {
    let list = match messages {
        RawMessages::Missing | RawMessages::NotAList => return Err(Skip::MissingField),
        RawMessages::List(l) => l,
    };
    if list.is_empty() {
        return Err(Skip::MissingField);
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let msg = message(m)?;
        let sys = usize::from(out.first().is_some_and(|f: &Message| f.role == "system"));
        let want = if i == 0 && msg.role == "system" {
            "system"
        } else if (i - sys) % 2 == 0 {
            "user"
        } else {
            "assistant"
        };
        if msg.role != want {
            return Err(Skip::BadRoles);
        }
        out.push(msg);
    }
    match out.last() {
        Some(m) if m.role == "assistant" => Ok(out),
        Some(m) if m.role == "user" => Err(Skip::NoAssistantTurn),
        _ => Err(Skip::BadRoles),
    }
}

/// A row read for its prompt only (`dppo generate`, `dppo eval`, `dppo curriculum`): whichever
/// of the pair, SFT and prompt-only schemas it has.
#[derive(Debug, Clone)]
pub struct RawPromptRow {
    pub row: u64,
    pub prompt_id: RawStr,
    pub chosen: RawMessages,
    pub messages: RawMessages,
    /// A prompt-only file's `prompt` column (a string: one user turn).
    pub prompt: RawStr,
    pub invalid: bool,
}

/// The prompt of a row, by the rules `dppo prep` takes it: from `chosen` (the pair schema), else
/// `messages` (the SFT schema), else a `prompt` string (one user turn). `--turns first`: the
/// optional system turn and the first user turn; `all`: the whole history, every message up to
/// the last user turn (a trailing assistant turn, the answer, is not part of it). Returns the
/// prompt id (the row's, else [`derived_prompt_id`] of the prompt) and the messages.
pub fn prompt_of(row: &RawPromptRow, turns: Turns) -> Result<(String, Vec<Message>), Skip> {
    if row.invalid {
        return Err(Skip::InvalidJson);
    }
    let id = given_id(&row.prompt_id)?;
    let (id, prompt) = prompt_messages(row, turns, id)?;
    let id = id.unwrap_or_else(|| derived_prompt_id(&prompt));
    Ok((id, prompt))
}

fn prompt_messages(row: &RawPromptRow, turns: Turns, id: Option<String>) -> Result<(Option<String>, Vec<Message>), Skip> {
    let msgs = match (&row.chosen, &row.messages) {
        (RawMessages::List(_) | RawMessages::NotAList, _) => &row.chosen,
        (_, RawMessages::List(_) | RawMessages::NotAList) => &row.messages,
        _ => {
            let text = text(&row.prompt)?;
            if text.trim().is_empty() {
                return Err(Skip::EmptyContent);
            }
            return Ok((id, vec![Message::new("user", text)]));
        }
    };
    let RawMessages::List(list) = msgs else { return Err(Skip::MissingField) };
    let mut out: Vec<Message> = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let msg = message(m)?;
        let sys = usize::from(out.first().is_some_and(|f| f.role == "system"));
        let want = if i == 0 && msg.role == "system" {
            "system"
        } else if (i - sys) % 2 == 0 {
            "user"
        } else {
            "assistant"
        };
        if msg.role != want {
            return Err(Skip::BadRoles);
        }
        let first_user = msg.role == "user";
        out.push(msg);
        if turns == Turns::First && first_user {
            return Ok((id, out));
        }
    }
    if out.last().is_some_and(|m| m.role == "assistant") {
        out.pop();
    }
    match out.last() {
        Some(m) if m.role == "user" => Ok((id, out)),
        None => Err(Skip::MissingField),
        _ => Err(Skip::BadRoles),
    }
}

/// The id of a prompt whose row has none, 64 hex digits; the one definition: prep, generate, eval
/// and curriculum all name such a row by it.
/// - A prompt that is exactly one user turn (no system turn, no earlier turns): the sha256 of its
///   text, UltraFeedback's convention (its `prompt_id` is the sha256 of `prompt`).
/// - Any other history: the sha256 of its messages in order, each written as two netstrings,
///   `<byte length of role>:<role>,<byte length of content>:<content>,` (lengths in decimal, UTF-8),
///   so two histories ending with the same user turn get different ids.
pub fn derived_prompt_id(prompt: &[Message]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    match prompt {
        [only] if only.role == "user" => h.update(only.content.as_bytes()),
        _ => {
            for m in prompt {
                for part in [m.role.as_str(), m.content.as_str()] {
                    h.update(format!("{}:", part.len()).as_bytes());
                    h.update(part.as_bytes());
                    h.update(b",");
                }
            }
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The row's own prompt id; None where it has none (missing, null or empty).
fn given_id(id: &RawStr) -> Result<Option<String>, Skip> {
    match id {
        RawStr::Str(s) if !s.is_empty() => Ok(Some(s.clone())),
        RawStr::NotString => Err(Skip::NonStringContent),
        _ => Ok(None),
    }
}

fn pair_id(row: &RawPairRow) -> Result<Option<String>, Skip> {
    if row.invalid {
        return Err(Skip::InvalidJson);
    }
    given_id(&row.prompt_id)
}

/// A validated preference pair of whole conversations (`--turns all`): `chosen` and `rejected`
/// share every message but their last assistant turn, and that shared history is the prompt.
pub fn pair_conversations(row: &RawPairRow) -> Result<(String, Vec<Message>, Message, Message), Skip> {
    let id = pair_id(row)?;
    if row.score_error {
        return Err(Skip::NonNumericScore);
    }
    let mut chosen = conversation(&row.chosen)?;
    let mut rejected = conversation(&row.rejected)?;
    let (c, r) = (chosen.pop().unwrap(), rejected.pop().unwrap());
    if chosen != rejected {
        return Err(Skip::PromptMismatch);
    }
    let id = id.unwrap_or_else(|| derived_prompt_id(&chosen));
    Ok((id, chosen, c, r))
}

/// A validated preference pair: the shared prompt and the two responses.
pub fn pair(row: &RawPairRow) -> Result<(String, Vec<Message>, Message, Message), Skip> {
    let prompt_id = pair_id(row)?;
    if row.score_error {
        return Err(Skip::NonNumericScore);
    }
    let (p_chosen, chosen) = first_exchange(&row.chosen)?;
    let (p_rejected, rejected) = first_exchange(&row.rejected)?;
    if p_chosen != p_rejected {
        return Err(Skip::PromptMismatch);
    }
    let prompt_id = prompt_id.unwrap_or_else(|| derived_prompt_id(&p_chosen));
    Ok((prompt_id, p_chosen, chosen, rejected))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(role: &str, content: &str) -> RawMessage {
        RawMessage { role: RawStr::Str(role.into()), content: RawStr::Str(content.into()) }
    }

    #[test]
    fn keeps_first_exchange_with_optional_system() {
        let l = RawMessages::List(vec![m("system", "s"), m("user", "u"), m("assistant", "a"), m("user", "")]);
        let (p, r) = first_exchange(&l).unwrap();
        assert_eq!(p, vec![Message::new("system", "s"), Message::new("user", "u")]);
        assert_eq!(r, Message::new("assistant", "a"));
    }

    #[test]
    fn skip_reasons() {
        let cases = [
            (RawMessages::Missing, Skip::MissingField),
            (RawMessages::List(vec![]), Skip::MissingField),
            (RawMessages::List(vec![m("user", "u")]), Skip::NoAssistantTurn),
            (RawMessages::List(vec![m("assistant", "a"), m("user", "u")]), Skip::BadRoles),
            (RawMessages::List(vec![m("user", "u"), m("user", "u")]), Skip::BadRoles),
            (RawMessages::List(vec![m("user", "  "), m("assistant", "a")]), Skip::EmptyContent),
            (
                RawMessages::List(vec![
                    RawMessage { role: RawStr::Str("user".into()), content: RawStr::NotString },
                    m("assistant", "a"),
                ]),
                Skip::NonStringContent,
            ),
            (
                RawMessages::List(vec![
                    m("user", "u"),
                    RawMessage { role: RawStr::Str("assistant".into()), content: RawStr::Missing },
                ]),
                Skip::MissingField,
            ),
        ];
        for (msgs, want) in cases {
            assert_eq!(first_exchange(&msgs).unwrap_err(), want, "{msgs:?}");
        }
    }

    #[test]
    fn pair_prompts_must_match() {
        let row = RawPairRow {
            row: 0,
            prompt_id: RawStr::Str("p".into()),
            chosen: RawMessages::List(vec![m("user", "u"), m("assistant", "a")]),
            rejected: RawMessages::List(vec![m("user", "v"), m("assistant", "b")]),
            score_chosen: None,
            score_rejected: None,
            score_error: false,
            invalid: false,
        };
        assert_eq!(pair(&row).unwrap_err(), Skip::PromptMismatch);
        assert_eq!(pair_conversations(&row).unwrap_err(), Skip::PromptMismatch);
    }

    #[test]
    fn prompts_of_each_schema() {
        let conv = RawMessages::List(vec![m("system", "s"), m("user", "u"), m("assistant", "a"), m("user", "v"), m("assistant", "b")]);
        let row = |chosen: RawMessages, messages: RawMessages, prompt: RawStr| RawPromptRow {
            row: 0,
            prompt_id: RawStr::Missing,
            chosen,
            messages,
            prompt,
            invalid: false,
        };
        let r = row(conv.clone(), RawMessages::Missing, RawStr::Missing);
        let (id, p) = prompt_of(&r, Turns::First).unwrap();
        assert_eq!((id.as_str(), p.len(), p[1].content.as_str()), (SHA_SU, 2, "u"));
        let (_, p) = prompt_of(&r, Turns::All).unwrap();
        assert_eq!((p.len(), p[3].content.as_str()), (4, "v"));
        let r = row(RawMessages::Missing, conv, RawStr::Missing);
        assert_eq!(prompt_of(&r, Turns::All).unwrap().1.len(), 4);
        let r = row(RawMessages::Missing, RawMessages::Missing, RawStr::Str("hi".into()));
        assert_eq!(prompt_of(&r, Turns::First).unwrap().1, vec![Message::new("user", "hi")]);
        let r = row(RawMessages::Missing, RawMessages::Missing, RawStr::Str("  ".into()));
        assert_eq!(prompt_of(&r, Turns::First).unwrap_err(), Skip::EmptyContent);
        let r = row(RawMessages::List(vec![m("assistant", "a")]), RawMessages::Missing, RawStr::Missing);
        assert_eq!(prompt_of(&r, Turns::First).unwrap_err(), Skip::BadRoles);
    }

    // Computed apart (Python's hashlib): sha256 of "hi" (a prompt of one user turn), and of the
    // netstring serialization of [system s, user u] and of [system s, user u, assistant a, user v].
    const SHA_HI: &str = "8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4";
    const SHA_SU: &str = "97517f496e05abf978c59245aabf62b6dc11b90375a36289b9976e22a6b23313";
    const SHA_SUAV: &str = "36c24f3afdd4179683883982f2d6e191f23039b780f9e009c24150cb64237d3c";
    const SHA_V: &str = "4c94485e0c21ae6c41ce1dfe7b6bfaceea5ab68e40a2476f50208e526f506080";

    #[test]
    fn one_user_turn_is_named_by_its_text_and_any_other_history_by_all_its_messages() {
        assert_eq!(derived_prompt_id(&[Message::new("user", "hi")]), SHA_HI);
        assert_eq!(derived_prompt_id(&[Message::new("system", "s"), Message::new("user", "u")]), SHA_SU);
        assert_eq!(derived_prompt_id(&[Message::new("system", "s"), Message::new("user", "u"), Message::new("assistant", "a"), Message::new("user", "v")]), SHA_SUAV);
        // histories that end with the same user turn are told apart, and from the turn alone
        let ids = [
            derived_prompt_id(&[Message::new("user", "v")]),
            derived_prompt_id(&[Message::new("system", "s"), Message::new("user", "v")]),
            derived_prompt_id(&[Message::new("system", "t"), Message::new("user", "v")]),
            derived_prompt_id(&[Message::new("user", "u"), Message::new("assistant", "a"), Message::new("user", "v")]),
            derived_prompt_id(&[Message::new("user", "u"), Message::new("assistant", "b"), Message::new("user", "v")]),
            // the length prefixes keep a boundary moved between fields from colliding
            derived_prompt_id(&[Message::new("user", "u,"), Message::new("assistant", "a"), Message::new("user", "v")]),
            derived_prompt_id(&[Message::new("user", "u"), Message::new("assistant", ",a"), Message::new("user", "v")]),
        ];
        assert_eq!(ids[0], SHA_V);
        assert_eq!(ids.iter().collect::<std::collections::HashSet<_>>().len(), ids.len());
    }

    #[test]
    fn a_missing_prompt_id_is_derived_from_the_prompt_on_every_path() {
        let conv = vec![m("system", "s"), m("user", "u"), m("assistant", "a"), m("user", "v"), m("assistant", "b")];
        let mut rejected = conv.clone();
        rejected[4] = m("assistant", "worse");
        for (raw, first, all) in [
            (RawStr::Missing, SHA_SU, SHA_SUAV),
            (RawStr::Str(String::new()), SHA_SU, SHA_SUAV),
            (RawStr::Str("given".into()), "given", "given"),
        ] {
            let prompt_row = |chosen: RawMessages, messages: RawMessages, prompt: RawStr| RawPromptRow {
                row: 0,
                prompt_id: raw.clone(),
                chosen,
                messages,
                prompt,
                invalid: false,
            };
            let list = RawMessages::List(conv.clone());
            for r in [prompt_row(list.clone(), RawMessages::Missing, RawStr::Missing), prompt_row(RawMessages::Missing, list.clone(), RawStr::Missing)] {
                assert_eq!(prompt_of(&r, Turns::First).unwrap().0, first);
                assert_eq!(prompt_of(&r, Turns::All).unwrap().0, all);
            }
            let plain = prompt_row(RawMessages::Missing, RawMessages::Missing, RawStr::Str("hi".into()));
            let want = if matches!(raw, RawStr::Str(ref s) if !s.is_empty()) { "given" } else { SHA_HI };
            assert_eq!(prompt_of(&plain, Turns::All).unwrap().0, want);
            let pair_row = RawPairRow {
                row: 0,
                prompt_id: raw.clone(),
                chosen: list.clone(),
                rejected: RawMessages::List(rejected.clone()),
                score_chosen: None,
                score_rejected: None,
                score_error: false,
                invalid: false,
            };
            assert_eq!(pair(&pair_row).unwrap().0, first);
            assert_eq!(pair_conversations(&pair_row).unwrap().0, all);
        }
        let bad = RawPromptRow {
            row: 0,
            prompt_id: RawStr::NotString,
            chosen: RawMessages::List(conv),
            messages: RawMessages::Missing,
            prompt: RawStr::Missing,
            invalid: false,
        };
        assert_eq!(prompt_of(&bad, Turns::First).unwrap_err(), Skip::NonStringContent);
    }

    #[test]
    fn conversations_alternate_and_end_with_an_assistant_turn() {
        let l = RawMessages::List(vec![m("system", "s"), m("user", "u"), m("assistant", "a"), m("user", "v"), m("assistant", "b")]);
        assert_eq!(conversation(&l).unwrap().len(), 5);
        let cases = [
            (vec![m("user", "u"), m("assistant", "a"), m("user", "v")], Skip::NoAssistantTurn),
            (vec![m("user", "u"), m("assistant", "a"), m("assistant", "b")], Skip::BadRoles),
            (vec![m("user", "u"), m("assistant", "a"), m("system", "s"), m("assistant", "b")], Skip::BadRoles),
            (vec![m("system", "s")], Skip::BadRoles),
            (vec![m("user", "u"), m("assistant", "a"), m("user", " "), m("assistant", "b")], Skip::EmptyContent),
        ];
        for (msgs, want) in cases {
            assert_eq!(conversation(&RawMessages::List(msgs.clone())).unwrap_err(), want, "{msgs:?}");
        }
    }

    #[test]
    fn pair_conversations_share_the_history() {
        let hist = vec![m("user", "u"), m("assistant", "a"), m("user", "v")];
        let mut c = hist.clone();
        c.push(m("assistant", "good"));
        let mut r = hist.clone();
        r.push(m("assistant", "bad"));
        let row = RawPairRow {
            row: 0,
            prompt_id: RawStr::Str("p".into()),
            chosen: RawMessages::List(c),
            rejected: RawMessages::List(r),
            score_chosen: Some(1.0),
            score_rejected: None,
            score_error: false,
            invalid: false,
        };
        let (id, p, c, r) = pair_conversations(&row).unwrap();
        assert_eq!((id.as_str(), p.len(), c.content.as_str(), r.content.as_str()), ("p", 3, "good", "bad"));

    }
}
