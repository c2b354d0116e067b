//! One fine-tuning example to tokens and a loss mask: a conversation through the chat template (assistant turns trained), or a prompt/completion pair (the completion trained).

use std::ops::Range;

use tokenizers::Tokenizer;

use crate::chat_template::{ChatTemplate, Message};

/// The roles a conversation may hold.
pub const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// An example's text, its token ids and their loss mask (1 = trained as a target).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaskedExample {
    /// The rendered conversation, or prompt + completion (its xxh3-64 picks the split).
    pub text: String,
    pub tokens: Vec<u32>,
    pub loss_mask: Vec<u8>,
}

/// Turns examples into [`MaskedExample`]s with one tokenizer and (for conversations) one chat template.
pub struct SftEncoder {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    /// The end of an assistant turn or of a completion, as text and id.
    eos_token: String,
    eos_id: u32,
    /// Prompt/completion only: the post-processor's special tokens before and after the text.
    head: Vec<u32>,
    tail: Vec<u32>,
}

impl std::fmt::Debug for SftEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SftEncoder")
            .field("template", &self.template)
            .field("eos_token", &self.eos_token)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

impl SftEncoder {
    /// `tokenizer` with truncation and padding off (see [`crate::load_tokenizer`]); `eos_id` is `eos_token`'s id;
    /// `head`/`tail`: special tokens put around a prompt/completion example (empty for none).
    pub fn new(
        tokenizer: Tokenizer,
        template: Option<ChatTemplate>,
        eos_token: String,
        eos_id: u32,
        head: Vec<u32>,
        tail: Vec<u32>,
    ) -> Self {
        SftEncoder { tokenizer, template, eos_token, eos_id, head, tail }
    }

    /// The conversation rendered with the chat template (no generation prompt) and tokenized as
    /// `apply_chat_template(messages, tokenize=True)` does (no special tokens added by the tokenizer). The mask
    /// is 1 on the tokens that overlap an assistant span: the text that message `i` (an assistant turn) adds
    /// after the rendering of `messages[..i]` with the generation prompt, up to and including the last
    /// end-of-turn token in it (all of it if there is none). Everything else is 0: system and user turns, the
    /// assistant header the generation prompt writes, and what follows the end-of-turn token.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<MaskedExample, String> {
        let template = self.template.as_ref().ok_or("no chat template to render conversations with")?;
        check_messages(messages)?;
        let render = |m: &[Message], prompt: bool| template.render(m, prompt).map_err(|e| e.to_string());
        let full = render(messages, false)?;
        let mut spans = Vec::new();
        for (i, _) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
            let prefix = render(&messages[..i], true)?;
            let upto = if i + 1 == messages.len() { full.clone() } else { render(&messages[..=i], false)? };
            if !upto.starts_with(&prefix) || !full.starts_with(&upto) {
                return Err(format!(
                    "the chat template renders messages[..{i}] with add_generation_prompt=true as text that does not \
                     start the rendering of messages[..={i}] (or that one does not start the whole conversation's), \
                     so the tokens of assistant message {i} cannot be told apart"
                ));
            }
            let added = &upto[prefix.len()..];
            let end = added.rfind(&self.eos_token).map_or(added.len(), |at| at + self.eos_token.len());
            spans.push(prefix.len()..prefix.len() + end);
        }
        let (tokens, loss_mask) = self.tokenize(&full, &spans)?;
        if !loss_mask.contains(&1) {
            return Err("the chat template renders no text for the assistant messages: nothing to train".into());
        }
        Ok(MaskedExample { text: full, tokens, loss_mask })
    }

    /// `prompt + completion` tokenized as one text (no special tokens added by the tokenizer), between the
    /// `head` and `tail` tokens, then the end-of-turn token. The mask is 0 on the head and on the tokens of the
    /// prompt, 1 on the tokens that overlap the completion, on the tail and on the end-of-turn token.
    pub fn encode_prompt_completion(&self, prompt: &str, completion: &str) -> Result<MaskedExample, String> {
        let text = format!("{prompt}{completion}");
        let completion_span = prompt.len()..text.len();
        let (body, body_mask) = self.tokenize(&text, std::slice::from_ref(&completion_span))?;
        if !body_mask.contains(&1) {
            return Err("the completion is empty: nothing to train".into());
        }
        let mut tokens = self.head.clone();
        let mut loss_mask = vec![0u8; self.head.len()];
        tokens.extend_from_slice(&body);
        loss_mask.extend_from_slice(&body_mask);
        tokens.extend_from_slice(&self.tail);
        tokens.push(self.eos_id);
        loss_mask.resize(tokens.len(), 1);
        Ok(MaskedExample { text, tokens, loss_mask })
    }

    /// `text`'s token ids and a mask that is 1 on tokens whose bytes overlap one of `spans` (sorted byte ranges).
    fn tokenize(&self, text: &str, spans: &[Range<usize>]) -> Result<(Vec<u32>, Vec<u8>), String> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| format!("tokenizer failed: {e}"))?;
        // A token overlaps a span if they share a byte (a token without bytes: if it stands inside the span).
        let overlaps = |&(start, end): &(usize, usize), s: &Range<usize>| {
            if start == end {
                s.contains(&start)
            } else {
                start < s.end && end > s.start
            }
        };
        let mask = encoding.get_offsets().iter().map(|o| u8::from(spans.iter().any(|s| overlaps(o, s)))).collect();
        Ok((encoding.get_ids().to_vec(), mask))
    }
}

/// A conversation needs messages, known roles and an assistant turn.
fn check_messages(messages: &[Message]) -> Result<(), String> {
    if messages.is_empty() {
        return Err("the conversation has no messages".into());
    }
    if let Some((i, m)) = messages.iter().enumerate().find(|(_, m)| !ROLES.contains(&m.role.as_str())) {
        return Err(format!("messages[{i}] has role {:?}; the roles are {}", m.role, ROLES.join(", ")));
    }
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err("the conversation has no assistant message: nothing to train".into());
    }
    Ok(())
}

/// The messages of a chat JSONL line: `{"messages": [{"role": str, "content": str}, ...]}` (other fields ignored).
pub fn parse_chat_line(value: serde_json::Value) -> Result<Vec<Message>, String> {
    let serde_json::Value::Object(mut obj) = value else { return Err("expected a JSON object".into()) };
    let messages = match obj.remove("messages") {
        Some(serde_json::Value::Array(list)) => list,
        Some(other) => return Err(format!("\"messages\" is not a list (found {})", kind(&other))),
        None => {
            return Err("no field \"messages\" (chat lines are {\"messages\": [{\"role\", \"content\"}, ...]})".into())
        }
    };
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let serde_json::Value::Object(mut m) = m else {
                return Err(format!("messages[{i}] is not an object"));
            };
            let mut field = |name: &str| match m.remove(name) {
                Some(serde_json::Value::String(s)) => Ok(s),
                Some(other) => Err(format!("messages[{i}].{name} is not a string (found {})", kind(&other))),
                None => Err(format!("messages[{i}] has no {name:?}")),
            };
            Ok(Message { role: field("role")?, content: field("content")? })
        })
        .collect()
}

/// The prompt and completion of a prompt/completion JSONL line: `{"prompt": str, "completion": str}`.
pub fn parse_prompt_completion_line(value: serde_json::Value) -> Result<(String, String), String> {
    let serde_json::Value::Object(mut obj) = value else { return Err("expected a JSON object".into()) };
    let mut field = |name: &str| match obj.remove(name) {
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(other) => Err(format!(
            "{name:?} is not a string (found {}); conversations go in chat lines with --format chat",
            kind(&other)
        )),
        None => {
            Err(format!("no field {name:?} (prompt/completion lines are {{\"prompt\": str, \"completion\": str}})"))
        }
    };
    Ok((field("prompt")?, field("completion")?))
}

/// What kind of JSON value this is, for messages.
fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
