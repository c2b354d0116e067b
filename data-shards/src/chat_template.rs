//! A model's own Hugging Face chat template, rendered with minijinja the way `transformers`' `apply_chat_template` renders it with Jinja2.

mod tojson;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::DataError;

/// The template's name inside its minijinja environment (no extension: no HTML auto-escaping).
const TEMPLATE_NAME: &str = "chat_template";

/// The special tokens of `tokenizer_config.json` that `transformers` passes to the template (its
/// `special_tokens_map`), under these names.
const SPECIAL_TOKENS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"];

/// One message of a conversation, in the OpenAI / TRL form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (a template may accept others, e.g. `tool`).
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into() }
    }
}

/// A chat template with the special tokens it is rendered with.
///
/// Rendering follows `transformers` (`utils/chat_template_utils.py`): Jinja with `trim_blocks` and
/// `lstrip_blocks`, loop controls, `raise_exception(message)`, a `tojson` filter that writes Python's
/// `json.dumps` (no HTML escaping, `ensure_ascii`, `indent`, `separators`, `sort_keys`), Python string and
/// dict methods (`.strip()`, `.startswith()`, `.items()`, ...; minijinja-contrib's pycompat), and the
/// variables `messages`, `add_generation_prompt` and the special tokens (`bos_token`, `eos_token`, ...).
/// `{% generation %}` blocks are rendered as their content. Not provided: `strftime_now`, `tools` and
/// `documents` (a template sees them undefined).
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The file the template came from, for messages.
    source: PathBuf,
    /// `bos_token`, `eos_token`, ... as `tokenizer_config.json` gives them.
    special_tokens: BTreeMap<String, String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("special_tokens", &self.special_tokens)
            .finish()
    }
}

impl ChatTemplate {
    /// The chat template of a Hugging Face model (or tokenizer) directory: `chat_template.jinja`, else
    /// `chat_template.json`'s `chat_template`, else `tokenizer_config.json`'s `chat_template` (a string, or a
    /// list of named templates of which `default` is taken). The special tokens come from
    /// `tokenizer_config.json` (a string or an `{"content": ...}` object each), else `special_tokens_map.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self, DataError> {
        if !dir.is_dir() {
            return Err(DataError::ChatTemplate {
                path: dir.to_path_buf(),
                message: "not a directory; give a Hugging Face model directory".into(),
            });
        }
        let special_tokens = model_special_tokens(dir)?;
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?;
        let jinja_path = dir.join("chat_template.jinja");
        let json_path = dir.join("chat_template.json");
        let (template, source) = if jinja_path.is_file() {
            let text = std::fs::read_to_string(&jinja_path).map_err(|e| DataError::io(&jinja_path, e))?;
            (text, jinja_path)
        } else if let Some(value) =
            read_json(&json_path)?.and_then(|mut v| v.get_mut("chat_template").map(std::mem::take))
        {
            (template_of(value, &json_path)?, json_path)
        } else if let Some(value) = config.and_then(|mut c| c.get_mut("chat_template").map(std::mem::take)) {
            (template_of(value, &config_path)?, config_path)
        } else {
            return Err(DataError::ChatTemplate {
                path: dir.to_path_buf(),
                message: "no chat template: neither chat_template.jinja nor a \"chat_template\" in \
                          chat_template.json or tokenizer_config.json; give the directory of a chat (instruct) model"
                    .into(),
            });
        };
        ChatTemplate::new(&template, special_tokens, &source)
    }

    /// A template from its text; `source` names it in messages, `special_tokens` maps `bos_token`,
    /// `eos_token`, ... to their text.
    pub fn new(template: &str, special_tokens: BTreeMap<String, String>, source: &Path) -> Result<Self, DataError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build().map_err(|e| {
            DataError::ChatTemplate { path: source.to_path_buf(), message: format!("minijinja syntax: {e}") }
        })?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, format!("raise_exception: {message}")))
        });
        env.add_filter("tojson", tojson::tojson);
        env.add_template_owned(TEMPLATE_NAME, without_generation_tags(template)).map_err(|e| {
            DataError::ChatTemplate { path: source.to_path_buf(), message: format!("cannot parse: {}", describe(&e)) }
        })?;
        Ok(ChatTemplate { env, source: source.to_path_buf(), special_tokens })
    }

    /// The conversation as text, as `tokenizer.apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` gives it. `messages` may be [`Message`]s or any serializable maps (e.g.
    /// `serde_json::Value` with `tool_calls`); the template sees them as dicts.
    pub fn render<M: Serialize>(&self, messages: &[M], add_generation_prompt: bool) -> Result<String, DataError> {
        let mut ctx: BTreeMap<&str, Value> =
            self.special_tokens.iter().map(|(k, v)| (k.as_str(), Value::from(v.as_str()))).collect();
        ctx.insert("messages", Value::from(Serde(messages)));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        let template = self.env.get_template(TEMPLATE_NAME).expect("added in ChatTemplate::new");
        template.render(Value::from(Serde(&ctx))).map_err(|e| DataError::ChatTemplate {
            path: self.source.clone(),
            message: format!("rendering failed: {}", describe(&e)),
        })
    }

    /// The text of a special token (`"bos_token"`, `"eos_token"`, ...), if the model names one.
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special_tokens.get(name).map(String::as_str)
    }

    /// `eos_token` of `tokenizer_config.json`: the end of an assistant turn in most chat templates.
    pub fn eos_token(&self) -> Option<&str> {
        self.special_token("eos_token")
    }

    /// `bos_token` of `tokenizer_config.json`.
    pub fn bos_token(&self) -> Option<&str> {
        self.special_token("bos_token")
    }

    /// The file the template was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }
}

/// The special tokens of a Hugging Face model directory that `transformers` gives a chat template (`bos_token`,
/// `eos_token`, `unk_token`, `pad_token`, ...): from `tokenizer_config.json` (a string or an `{"content": ...}`
/// object each), else `special_tokens_map.json`; none if neither file is there.
pub fn model_special_tokens(dir: &Path) -> Result<BTreeMap<String, String>, DataError> {
    let config_path = dir.join("tokenizer_config.json");
    let config = read_json(&config_path)?;
    let map_path = dir.join("special_tokens_map.json");
    let map = read_json(&map_path)?;
    let mut special_tokens = BTreeMap::new();
    for name in SPECIAL_TOKENS {
        let (value, path) = match config.as_ref().and_then(|c| c.get(name)) {
            Some(v) => (Some(v), &config_path),
            None => (map.as_ref().and_then(|m| m.get(name)), &map_path),
        };
        let text = match value {
            None | Some(serde_json::Value::Null) => continue,
            Some(serde_json::Value::String(s)) => s.as_str(),
            Some(other) => other.get("content").and_then(|c| c.as_str()).ok_or_else(|| DataError::ChatTemplate {
                path: path.clone(),
                message: format!("{name} is neither a string nor an object with a string \"content\""),
            })?,
        };
        special_tokens.insert(name.to_string(), text.to_string());
    }
    Ok(special_tokens)
}

/// A JSON file's contents; `None` if it does not exist.
fn read_json(path: &Path) -> Result<Option<serde_json::Value>, DataError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DataError::io(path, e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| DataError::ChatTemplate { path: path.to_path_buf(), message: format!("invalid JSON ({e})") })
}

/// The template text of a `chat_template` field: a string, or `[{"name": ..., "template": ...}]` (`default`).
fn template_of(value: serde_json::Value, path: &Path) -> Result<String, DataError> {
    let err = |message: &str| DataError::ChatTemplate { path: path.to_path_buf(), message: message.into() };
    match value {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Array(list) => list
            .into_iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template").and_then(|s| s.as_str()).map(str::to_owned))
            .ok_or_else(|| err("\"chat_template\" is a list without a template named \"default\"")),
        _ => Err(err("\"chat_template\" is neither a string nor a list of named templates")),
    }
}

/// minijinja's error with its location and the cause, on one line.
fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    s
}

/// The template with `{% generation %}` / `{% endgeneration %}` (a `transformers` extension that marks the
/// assistant's text) turned into `{% if true %}` / `{% endif %}`, so that whitespace control is unchanged.
fn without_generation_tags(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(end) = tag.find("%}") else { break };
        let inner = &tag[2..end];
        let trimmed = inner.trim_start_matches(['-', '+']).trim_end_matches(['-', '+']).trim();
        let replacement = match trimmed {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                out.push_str("{%");
                out.push_str(&inner[..inner.len() - inner.trim_start_matches(['-', '+']).len()]);
                out.push(' ');
                out.push_str(r);
                out.push(' ');
                out.push_str(&inner[inner.trim_end_matches(['-', '+']).len()..]);
                out.push_str("%}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(text: &str) -> ChatTemplate {
        let tokens = BTreeMap::from([("eos_token".to_string(), "</s>".to_string())]);
        ChatTemplate::new(text, tokens, Path::new("test.jinja")).unwrap()
    }

    #[test]
    fn trims_blocks_like_transformers() {
        let t = template("{% for m in messages %}\n  {% if m.role == 'user' %}\nU: {{ m.content.strip() }}\n  {% endif %}\n{% endfor %}{{ eos_token }}\n");
        let got = t.render(&[Message::new("user", "  hi  "), Message::new("assistant", "x")], false).unwrap();
        assert_eq!(got, "U: hi\n</s>");
    }

    #[test]
    fn generation_tags_keep_their_content_and_whitespace_control() {
        let text = "{% for m in messages %}[{%- generation -%}  {{ m.content }}  {%- endgeneration %}]{% endfor %}";
        assert_eq!(
            without_generation_tags(text),
            "{% for m in messages %}[{%- if true -%}  {{ m.content }}  {%- endif %}]{% endfor %}"
        );
        assert_eq!(template(text).render(&[Message::new("assistant", "a")], false).unwrap(), "[a]");
    }

    #[test]
    fn raise_exception_and_syntax_errors_name_the_file() {
        let t = template("{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}");
        let e = t.render(&[Message::new("assistant", "a")], false).unwrap_err().to_string();
        assert!(e.contains("test.jinja") && e.contains("user first"), "{e}");
        let e = ChatTemplate::new("{% for %}", BTreeMap::new(), Path::new("bad.jinja")).unwrap_err().to_string();
        assert!(e.contains("bad.jinja") && e.contains("cannot parse"), "{e}");
    }

    #[test]
    fn tojson_writes_python_json_dumps() {
        let t = template(
            "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ 'é<' | tojson(ensure_ascii=true) }}",
        );
        let got = t.render(&[Message::new("user", "é<\n")], false).unwrap();
        assert_eq!(
            got,
            "{\"role\": \"user\", \"content\": \"é<\\n\"}|{\n  \"role\": \"user\",\n  \"content\": \"é<\\n\"\n}|\"\\u00e9<\""
        );
    }
}
