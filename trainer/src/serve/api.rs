//! The OpenAI API surface of `trainer serve`: request and response bodies (serde), their validation into decoder requests, and OpenAI-style error objects.
use crate::config::InvalidConfig;
use crate::decode::{FinishReason, Limits, Request};
use crate::sampling::SamplingParams;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use data_shards::Message;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// An OpenAI error: `{"error": {"message", "type", "param", "code"}}` with its HTTP status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error` about `param`.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(String::from),
            code: None,
        }
    }

    pub fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), kind, param: None, code: Some(code) }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.status, &self.body())
    }
}

/// A JSON body with its status.
pub fn json_response(status: StatusCode, body: &Value) -> Response {
    (status, [(axum::http::header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// `prompt` of a completion: text, or token ids (a list of one text or one token list too).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<i64>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<i64>>),
}

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling fields both endpoints share (OpenAI's, and vLLM's extra `top_k`, `min_p`,
/// `repetition_penalty`, `stop_token_ids`, `ignore_eos`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    pub model: String,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub stop_token_ids: Option<Vec<i64>>,
    #[serde(default)]
    pub ignore_eos: bool,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<Value>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// vLLM's extension: a whole (not streamed) answer's choice also holds `prompt_token_ids`
    /// and `token_ids`.
    #[serde(default)]
    pub return_token_ids: bool,
}

/// `POST /v1/completions`: its own fields (the shared ones are [`Sampling`]).
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
}

/// `POST /v1/chat/completions`: its own fields (the shared ones are [`Sampling`]).
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub max_completion_tokens: Option<i64>,
}

/// Parses a JSON body into the endpoint's own fields and the shared sampling fields; a syntax
/// error, or a missing or wrong-typed field, is a 400 naming the field.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<(T, Sampling), ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|error| ApiError::invalid(format!("the body is not valid JSON: {error}"), None))?;
    if !value.is_object() {
        return Err(ApiError::invalid("the body must be a JSON object", None));
    }
    Ok((fields(&value)?, fields(&value)?))
}

fn fields<T: serde::de::DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner().to_string();
        // A missing field is reported at the object: name it from the message.
        let missing = inner.strip_prefix("missing field `").and_then(|rest| rest.split('`').next());
        let param = if path == "." { missing.map(String::from) } else { Some(path) };
        let at = param.as_ref().map(|p| format!("{p}: ")).unwrap_or_default();
        ApiError::invalid(format!("{at}{inner}"), param.as_deref())
    })
}

impl Sampling {
    /// The decoder's parameters: `max_tokens` (its default when absent), the model's stop
    /// tokens unless `ignore_eos`; refuses what the server does not support.
    pub fn params(&self, default_max_tokens: i64, eos: &[i64]) -> Result<SamplingParams, ApiError> {
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::invalid(format!("n = {n}: only n = 1 is supported; send {n} requests"), Some("n")));
        }
        if self.logprobs.as_ref().is_some_and(|l| !l.is_null() && *l != Value::Bool(false)) {
            return Err(ApiError::invalid("logprobs are not supported", Some("logprobs")));
        }
        for (name, value) in
            [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)]
        {
            if value.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid(format!("{name} is not supported (use repetition_penalty)"), Some(name)));
            }
        }
        let defaults = SamplingParams::default();
        let mut stop_token_ids = self.stop_token_ids.clone().unwrap_or_default();
        if !self.ignore_eos {
            stop_token_ids.extend(eos);
        }
        let params = SamplingParams {
            max_tokens: self.max_tokens.unwrap_or(default_max_tokens),
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k: self.top_k.unwrap_or(defaults.top_k),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            min_p: self.min_p.unwrap_or(defaults.min_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(defaults.repetition_penalty),
            seed: self.seed,
            stop_token_ids,
            stop: match &self.stop {
                None => Vec::new(),
                Some(Stop::One(stop)) => vec![stop.clone()],
                Some(Stop::Many(stops)) => stops.clone(),
            },
        };
        Ok(params)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.is_some_and(|o| o.include_usage)
    }
}

/// Checks `request` against the model's `limits`: the decoder's refusal becomes a 400 naming
/// the parameter its message starts with (`temperature = -1 must be ...`).
pub fn check(request: &Request, limits: &Limits) -> Result<(), ApiError> {
    limits.check(request).map_err(|error| {
        let message = match error.downcast_ref::<InvalidConfig>() {
            Some(InvalidConfig(message)) => message.clone(),
            None => format!("{error:#}"),
        };
        let param = message.split_once(" = ").map(|(name, _)| name).filter(|name| !name.contains(' '));
        let param = param.or_else(|| message.starts_with("token id").then_some("prompt"));
        let param = param.or_else(|| message.contains("stop string").then_some("stop"));
        ApiError::invalid(message.clone(), param)
    })
}

/// `usage` of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Usage {
        Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// Which endpoint a response belongs to: it decides the object names and the shape of a choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }

    pub fn id(self, number: u64) -> String {
        match self {
            Endpoint::Completions => format!("cmpl-{number}"),
            Endpoint::Chat => format!("chatcmpl-{number}"),
        }
    }

    /// A whole response: one choice holding `text` and, when given, the prompt's and the
    /// output's token ids.
    pub fn response(
        self,
        head: &Head,
        text: &str,
        finish: FinishReason,
        usage: Usage,
        ids: Option<(&[i64], &[i64])>,
    ) -> Value {
        let (object, choice) = match self {
            Endpoint::Completions => {
                ("text_completion", json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": null}))
            }
            Endpoint::Chat => (
                "chat.completion",
                json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                       "logprobs": null}),
            ),
        };
        let mut choice = choice;
        if let Some((prompt, output)) = ids {
            choice["prompt_token_ids"] = json!(prompt);
            choice["token_ids"] = json!(output);
        }
        json!({"id": head.id, "object": object, "created": head.created, "model": head.model,
               "choices": [choice], "usage": usage})
    }

    /// A streamed chunk: `text` added (a chat's first chunk also names the role), and the finish
    /// reason on the last.
    pub fn chunk(self, head: &Head, text: &str, first: bool, finish: Option<FinishReason>) -> Value {
        let (object, choice) = match self {
            Endpoint::Completions => {
                ("text_completion", json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": null}))
            }
            Endpoint::Chat => {
                let delta = match first {
                    true => json!({"role": "assistant", "content": text}),
                    false => json!({"content": text}),
                };
                (
                    "chat.completion.chunk",
                    json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}),
                )
            }
        };
        json!({"id": head.id, "object": object, "created": head.created, "model": head.model, "choices": [choice]})
    }

    /// The last streamed chunk with `stream_options.include_usage`: no choice, the usage.
    pub fn usage_chunk(self, head: &Head, usage: Usage) -> Value {
        let object = match self {
            Endpoint::Completions => "text_completion",
            Endpoint::Chat => "chat.completion.chunk",
        };
        json!({"id": head.id, "object": object, "created": head.created, "model": head.model, "choices": [],
               "usage": usage})
    }
}

/// What every response and chunk of one request repeats.
#[derive(Debug, Clone)]
pub struct Head {
    pub id: String,
    pub created: u64,
    pub model: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_parsed_and_errors_name_them() {
        let (request, sampling): (CompletionRequest, Sampling) =
            parse(br#"{"model": "m", "prompt": "hi", "max_tokens": 5, "stop": "x", "stream": true}"#).unwrap();
        assert!(matches!(request.prompt, Prompt::Text(ref t) if t == "hi"));
        assert!(sampling.stream);
        let params = sampling.params(16, &[7]).unwrap();
        assert_eq!((params.max_tokens, params.stop, params.stop_token_ids), (5, vec!["x".to_string()], vec![7]));
        let error = parse::<CompletionRequest>(b"{not json").unwrap_err();
        assert!(error.message.contains("not valid JSON") && error.param.is_none(), "{error:?}");
        let error = parse::<CompletionRequest>(br#"{"model": "m", "prompt": "a", "max_tokens": "five"}"#).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("max_tokens"), "{error:?}");
        let error = parse::<ChatRequest>(br#"{"model": "m"}"#).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("messages"), "{error:?}");
        let error = parse::<ChatRequest>(br#"{"model": "m", "messages": [{"role": "user"}]}"#).unwrap_err();
        assert!(error.message.contains("content"), "{error:?}");
        let (_, sampling) = parse::<CompletionRequest>(br#"{"model": "m", "prompt": "a", "n": 3}"#).unwrap();
        let error = sampling.params(16, &[]).unwrap_err();
        assert_eq!((error.param.as_deref(), error.status), (Some("n"), StatusCode::BAD_REQUEST));
    }

    #[test]
    fn decoder_refusals_name_the_parameter() {
        let limits = Limits { vocab: 10, capacity: 8, max_seq_len: 8, tokenizer: true };
        let request = |params: SamplingParams| Request { prompt: vec![1, 2, 3], params };
        let error = check(&request(SamplingParams { temperature: -1.0, ..SamplingParams::greedy(2) }), &limits);
        assert_eq!(error.unwrap_err().param.as_deref(), Some("temperature"));
        let error = check(&request(SamplingParams::greedy(6)), &limits).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("max_tokens"));
        assert!(error.message.contains("context of 8 tokens"), "{error:?}");
        assert!(check(&request(SamplingParams::greedy(5)), &limits).is_ok());
    }
}
