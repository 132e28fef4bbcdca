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
}

impl Skip {
    pub const ALL: [Skip; 12] = [
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
        }
    }

    /// A sentence for `--strict` errors.
    pub fn explain(self) -> &'static str {
        match self {
            Skip::MissingField => "a required field is missing or null",
            Skip::EmptyContent => "a message has empty content",
            Skip::NonStringContent => "a message content or role is not a string",
            Skip::BadRoles => "roles must be [system], user, assistant",
            Skip::NoAssistantTurn => "the conversation has no assistant turn after the first user turn",
            Skip::PromptMismatch => "chosen and rejected do not share the same prompt messages",
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

/// A validated preference pair: the shared prompt and the two responses.
pub fn pair(row: &RawPairRow) -> Result<(String, Vec<Message>, Message, Message), Skip> {
    if row.invalid {
        return Err(Skip::InvalidJson);
    }
    let prompt_id = match &row.prompt_id {
        RawStr::Str(s) if !s.is_empty() => s.clone(),
        RawStr::NotString => return Err(Skip::NonStringContent),
        _ => return Err(Skip::MissingField),
    };
    let (p_chosen, chosen) = first_exchange(&row.chosen)?;
    let (p_rejected, rejected) = first_exchange(&row.rejected)?;
    if p_chosen != p_rejected {
        return Err(Skip::PromptMismatch);
    }
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
            invalid: false,
        };
        assert_eq!(pair(&row).unwrap_err(), Skip::PromptMismatch);
    }
}
