//! Chat templates: the tokenizer's own Jinja `chat_template`, rendered with minijinja so that the
//! text equals what `transformers`' `apply_chat_template(..., tokenize=False)` produces.
//!
//! `transformers` renders with a sandboxed jinja2 environment configured with `trim_blocks=True`,
//! `lstrip_blocks=True` and the loop-controls extension, and passes `messages`, `tools`,
//! `documents`, `add_generation_prompt` and the tokenizer's special tokens (`bos_token`,
//! `eos_token`, ...) as variables, plus the globals `raise_exception` and `strftime_now` (the
//! local date and time formatted by a strftime format, which Llama 3.2's template stamps into its
//! system header). We mirror that setup;
//! Python string methods used by templates (`.strip()`, `.startswith()`, ...) come from
//! minijinja-contrib's pycompat layer.

use std::collections::BTreeMap;

use minijinja::{syntax::SyntaxConfig, Environment, Error as JinjaError, ErrorKind, Value};
use crate::error::{PrepError, Result};

/// One chat message: `{"role": ..., "content": ...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template plus the special-token variables it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    special_tokens: BTreeMap<String, String>,
}

const NAME: &str = "chat_template";

fn raise_exception(msg: String) -> std::result::Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(format)`: `datetime.now().strftime(format)`, as transformers registers it.
fn strftime_now(format: String) -> std::result::Result<Value, JinjaError> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format))
        .map_err(|_| JinjaError::new(ErrorKind::InvalidOperation, format!("strftime_now: bad format {format:?}")))?;
    Ok(Value::from(out))
}

impl ChatTemplate {
    /// Compile `source`; `special_tokens` maps names such as `bos_token` to their text.
    pub fn new(source: &str, special_tokens: BTreeMap<String, String>) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| PrepError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| PrepError::Template(format!("the chat template does not compile: {e}")))?;
        Ok(Self { env, source: source.to_owned(), special_tokens })
    }

    /// The template's source text (recorded in `meta.json`).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render a conversation exactly as `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` does.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template(NAME).expect("template was added in new()");
        let mut ctx: BTreeMap<String, Value> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        let msgs: Value = messages
            .iter()
            .map(|m| Value::from_pairs([("role", Value::from(m.role.as_str())), ("content", Value::from(m.content.as_str()))]))
            .collect();
        ctx.insert("messages".into(), msgs);
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        tmpl.render(Value::from(ctx)).map_err(|e| {
            let mut msg = e.to_string();
            if let Some(detail) = e.detail() {
                if !msg.contains(detail) {
                    msg = format!("{msg}: {detail}");
                }
            }
            PrepError::Template(format!("rendering the chat template failed: {msg}"))
        })
    }
}

/// Stands in for a message's content while finding where the template puts it.
const CONTENT_MARKER: &str = "DPPOCONTENTMARKER7F3A";

impl ChatTemplate {
    /// Load and compile the chat template of a tokenizer folder (see [`load_from_dir`]).
    pub fn from_dir(dir: &std::path::Path) -> Result<Self> {
        let (source, specials) = load_from_dir(dir)?;
        Self::new(&source, specials)
    }

    /// The byte range of the last message's content inside `rendered`, which must be
    /// `self.render(messages, add_generation_prompt)`: everything before it and after it is the
    /// template's (system turn, headers, end-of-turn tokens, the generation header).
    ///
    /// Found by rendering the conversation again with that content replaced by a marker; `None`
    /// when the template does not place the content verbatim between two fixed pieces of text.
    pub fn content_span(&self, messages: &[Message], rendered: &str, add_generation_prompt: bool) -> Option<(usize, usize)> {
        let mut probe = messages.to_vec();
        probe.last_mut()?.content = CONTENT_MARKER.to_owned();
        let framed = self.render(&probe, add_generation_prompt).ok()?;
        let (head, tail) = framed.split_once(CONTENT_MARKER)?;
        if tail.contains(CONTENT_MARKER) || head.len() + tail.len() > rendered.len() {
            return None;
        }
        (rendered.starts_with(head) && rendered.ends_with(tail)).then(|| (head.len(), rendered.len() - tail.len()))
    }

    /// The text a conversation's last message ends with: what the template writes after the
    /// generation header and before an assistant turn's content, and what it writes after that
    /// content (the end-of-turn tokens), for an assistant turn appended to `prompt_messages`.
    /// `prompt_text` is `self.render(prompt_messages, true)`.
    pub fn assistant_frame(&self, prompt_messages: &[Message], prompt_text: &str) -> Option<(String, String)> {
        let mut msgs = prompt_messages.to_vec();
        msgs.push(Message::new("assistant", CONTENT_MARKER));
        let full = self.render(&msgs, false).ok()?;
        let (before, after) = full.strip_prefix(prompt_text)?.split_once(CONTENT_MARKER)?;
        (!after.contains(CONTENT_MARKER)).then(|| (before.to_owned(), after.to_owned()))
    }

    /// The generation header: what `add_generation_prompt` appends (e.g. `<|im_start|>assistant\n`).
    pub fn generation_header(&self, messages: &[Message]) -> Option<String> {
        let with = self.render(messages, true).ok()?;
        let without = self.render(messages, false).ok()?;
        with.strip_prefix(without.as_str()).map(str::to_owned)
    }
}

/// A Qwen2.5-style ChatML template (without the tool-calling branches), used by tests and the demo.
pub const CHATML_TEMPLATE: &str = "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen() -> ChatTemplate {
        ChatTemplate::new(CHATML_TEMPLATE, BTreeMap::new()).unwrap()
    }

    #[test]
    fn renders_chatml_with_default_system() {
        let msgs = [Message::new("user", "Hi"), Message::new("assistant", "Hello!")];
        let text = qwen().render(&msgs, false).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        );
    }

    #[test]
    fn generation_prompt_is_a_prefix_of_the_full_conversation() {
        let t = qwen();
        let prompt = t.render(&[Message::new("system", "Be brief."), Message::new("user", "2+2?")], true).unwrap();
        let full = t
            .render(
                &[Message::new("system", "Be brief."), Message::new("user", "2+2?"), Message::new("assistant", "4")],
                false,
            )
            .unwrap();
        assert!(prompt.ends_with("<|im_start|>assistant\n"));
        assert_eq!(&full[prompt.len()..], "4<|im_end|>\n");
    }

    #[test]
    fn content_span_and_frames_of_chatml() {
        let t = qwen();
        let msgs = [Message::new("system", "Be brief."), Message::new("user", "2+2?")];
        let text = t.render(&msgs, true).unwrap();
        let (a, b) = t.content_span(&msgs, &text, true).unwrap();
        assert_eq!(&text[a..b], "2+2?");
        assert_eq!(&text[b..], "<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(t.generation_header(&msgs).unwrap(), "<|im_start|>assistant\n");
        let (before, after) = t.assistant_frame(&msgs, &text).unwrap();
        assert_eq!((before.as_str(), after.as_str()), ("", "<|im_end|>\n"));
    }

    #[test]
    fn content_span_of_a_trimming_header_template() {
        // Llama-3's shape: headers as special tokens, content trimmed
        let src = "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";
        let mut sp = BTreeMap::new();
        sp.insert("bos_token".to_string(), "<|begin_of_text|>".to_string());
        let t = ChatTemplate::new(src, sp).unwrap();
        let msgs = [Message::new("user", "  hello there \n")];
        let text = t.render(&msgs, true).unwrap();
        let (a, b) = t.content_span(&msgs, &text, true).unwrap();
        assert_eq!(&text[a..b], "hello there");
        assert_eq!(&text[b..], "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
        assert_eq!(&text[..a], "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n");
    }

    #[test]
    fn content_span_is_none_when_the_template_does_not_place_the_content_verbatim() {
        let t = ChatTemplate::new("{% for m in messages %}{{ m.content | lower }}{% endfor %}", BTreeMap::new()).unwrap();
        let msgs = [Message::new("user", "hi")];
        let text = t.render(&msgs, true).unwrap();
        assert_eq!(t.content_span(&msgs, &text, true), None);
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_reported() {
        let t = ChatTemplate::new("{{ raise_exception('only user turns') }}", BTreeMap::new()).unwrap();
        let err = t.render(&[Message::new("user", "x")], false).unwrap_err().to_string();
        assert!(err.contains("only user turns"), "{err}");
        assert!(ChatTemplate::new("{% if %}", BTreeMap::new()).is_err());
    }

    #[test]
    fn strftime_now_formats_todays_date_and_is_defined() {
        let t = ChatTemplate::new(
            "{% if strftime_now is defined %}{{ strftime_now('%Y-%m-%d|%d %b %Y') }}{% else %}undefined{% endif %}",
            BTreeMap::new(),
        )
        .unwrap();
        let out = t.render(&[Message::new("user", "x")], false).unwrap();
        let today = chrono::Local::now();
        // the day may turn between the two clock reads: accept either side of midnight
        let want = |d: chrono::DateTime<chrono::Local>| d.format("%Y-%m-%d|%d %b %Y").to_string();
        assert!(out == want(today) || out == want(today - chrono::Duration::seconds(5)), "{out}");
    }

    #[test]
    fn python_string_methods_and_special_tokens() {
        let mut sp = BTreeMap::new();
        sp.insert("bos_token".to_string(), "<s>".to_string());
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{{ m.content.strip().upper() }}|{% endfor %}",
            sp,
        )
        .unwrap();
        assert_eq!(t.render(&[Message::new("user", "  hi ")], false).unwrap(), "<s>HI|");
    }
}

/// The chat template and special-token variables of a tokenizer folder, found where
/// `transformers` looks: `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`
/// (a string, or a list of `{name, template}` of which `default` is used).
pub fn load_from_dir(dir: &std::path::Path) -> Result<(String, BTreeMap<String, String>)> {
    let cfg_path = dir.join("tokenizer_config.json");
    let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| PrepError::Tokenizer(format!("{}: invalid JSON: {e}", cfg_path.display())))?,
        Err(_) => serde_json::Value::Null,
    };
    let mut specials = BTreeMap::new();
    for key in ["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"] {
        let text = match cfg.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(str::to_owned),
            _ => None,
        };
        if let Some(t) = text {
            specials.insert(key.to_owned(), t);
        }
    }
    let jinja = dir.join("chat_template.jinja");
    let source = if jinja.is_file() {
        std::fs::read_to_string(&jinja).map_err(|e| PrepError::Tokenizer(format!("{}: {e}", jinja.display())))?
    } else {
        match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_owned)
                .ok_or_else(|| {
                    PrepError::Tokenizer(format!("{}: chat_template list has no 'default' entry", cfg_path.display()))
                })?,
            _ => {
                return Err(PrepError::Tokenizer(format!(
                    "{} has no chat template (no chat_template.jinja, no chat_template in tokenizer_config.json); \
                     use a chat/instruct tokenizer or add a template",
                    dir.display()
                )))
            }
        }
    };
    Ok((source, specials))
}
