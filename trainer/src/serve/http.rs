//! The HTTP side of `trainer serve`: axum routes on a current-thread tokio runtime of their own thread; requests are authorized, parsed, tokenized and checked here, then queued for the scheduler, whose events come back as one JSON body or as server-sent events.
use super::api::{self, json_response, ApiError, ChatRequest, CompletionRequest, Endpoint, Head, Prompt};
use super::metrics::ServeMetrics;
use super::scheduler::{Event, Job};
use crate::decode::{Limits, Request};
use crate::inference::encode;
use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{self, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use data_shards::ChatTemplate;
use serde_json::json;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokenizers::Tokenizer;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tracing::{info, warn};

/// What the handlers need once the model has loaded.
#[derive(Debug)]
pub struct Ready {
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    pub limits: Limits,
    /// The stop tokens of every request unless it sets `ignore_eos`.
    pub eos: Vec<i64>,
}

/// The state every handler shares.
#[derive(Debug)]
pub struct Shared {
    /// The name clients give as `model`.
    pub model: String,
    pub api_key: Option<String>,
    /// The largest request body accepted, in bytes.
    pub body_limit: usize,
    /// Set once the model has loaded: until then `/health` answers 503.
    pub ready: OnceLock<Ready>,
    pub queue: SyncSender<Job>,
    pub metrics: Arc<ServeMetrics>,
    pub next_id: AtomicU64,
}

/// Serves `shared` on `listener` from a thread of its own, for the life of the process.
pub fn start(listener: std::net::TcpListener, shared: Arc<Shared>) -> Result<()> {
    let address = listener.local_addr()?;
    listener.set_nonblocking(true).context("cannot make the server socket non-blocking")?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(error) => return warn!("the server cannot listen: {error}"),
                };
                if let Err(error) = axum::serve(listener, router(shared)).await {
                    warn!("the server stopped: {error}");
                }
            })
        })
        .context("cannot start the HTTP thread")?;
    info!("serving the OpenAI API at http://{address}/v1");
    Ok(())
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .fallback(not_found)
        .with_state(shared)
}

async fn health(State(shared): State<Arc<Shared>>) -> StatusCode {
    match shared.ready.get() {
        Some(_) => StatusCode::OK,
        None => StatusCode::SERVICE_UNAVAILABLE,
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], shared.metrics.render())
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "not_found", "no such endpoint: see /v1/models")
}

async fn models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let answer = authorize(&shared, &headers).and_then(|()| ready(&shared)).map(|ready| {
        json_response(
            StatusCode::OK,
            &json!({"object": "list", "data": [{
                "id": shared.model, "object": "model", "created": now(), "owned_by": "llama-trainer",
                "max_model_len": ready.limits.capacity,
            }]}),
        )
    });
    answered(&shared, "/v1/models", answer)
}

async fn completions(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let answer = async {
        authorize(&shared, &headers)?;
        let ready = ready(&shared)?;
        let (request, sampling) = api::parse::<CompletionRequest>(&read(&shared, body).await?)?;
        check_model(&shared, &sampling.model)?;
        let prompt = match request.prompt {
            Prompt::Tokens(ids) => ids,
            Prompt::Text(text) => tokenize(ready, &text, true)?,
            Prompt::Texts(texts) if texts.len() == 1 => tokenize(ready, &texts[0], true)?,
            Prompt::TokenLists(mut lists) if lists.len() == 1 => lists.remove(0),
            Prompt::Texts(_) | Prompt::TokenLists(_) => {
                return Err(ApiError::invalid(
                    "give one prompt per request (a batch of prompts is not supported)",
                    Some("prompt"),
                ));
            }
        };
        let params = sampling.params(16, &ready.eos)?;
        submit(&shared, ready, Endpoint::Completions, &sampling, Request { prompt, params })
    };
    answered(&shared, Endpoint::Completions.path(), answer.await)
}

async fn chat(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let answer = async {
        authorize(&shared, &headers)?;
        let ready = ready(&shared)?;
        let (request, mut sampling) = api::parse::<ChatRequest>(&read(&shared, body).await?)?;
        check_model(&shared, &sampling.model)?;
        let template = ready.template.as_ref().ok_or_else(|| {
            ApiError::invalid("the model has no chat template: use /v1/completions", Some("messages"))
        })?;
        if request.messages.is_empty() {
            return Err(ApiError::invalid("messages is empty: give at least one message", Some("messages")));
        }
        let text = template.render(&request.messages, true).map_err(|error| {
            ApiError::invalid(format!("the chat template refuses the messages: {error}"), Some("messages"))
        })?;
        let prompt = tokenize(ready, &text, false)?;
        sampling.max_tokens = sampling.max_tokens.or(request.max_completion_tokens);
        // Without max_tokens, a chat reply may fill the context.
        let room = (ready.limits.capacity - prompt.len() as i64).max(1);
        let params = sampling.params(room, &ready.eos)?;
        submit(&shared, ready, Endpoint::Chat, &sampling, Request { prompt, params })
    };
    answered(&shared, Endpoint::Chat.path(), answer.await)
}

/// Counts the answer by endpoint and status, and makes it a response.
fn answered(shared: &Shared, endpoint: &str, answer: Result<impl IntoResponse, ApiError>) -> Response {
    let response = match answer {
        Ok(response) => response.into_response(),
        Err(error) => error.into_response(),
    };
    shared.metrics.answered(endpoint, response.status().as_u16());
    response
}

fn authorize(shared: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &shared.api_key else { return Ok(()) };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given == Some(key.as_str()) {
        true => Ok(()),
        false => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "missing or wrong API key: send the server's --api-key as `Authorization: Bearer KEY`",
        )),
    }
}

fn ready(shared: &Shared) -> Result<&Ready, ApiError> {
    shared.ready.get().ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "loading", "the model is still loading; retry")
    })
}

async fn read(shared: &Shared, body: Body) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, shared.body_limit).await.map_err(|_| {
        let message = format!("the request body is larger than {} bytes (--max-body-bytes)", shared.body_limit);
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", "body_too_large", message)
    })
}

fn check_model(shared: &Shared, model: &str) -> Result<(), ApiError> {
    match model == shared.model {
        true => Ok(()),
        false => Err(ApiError {
            param: Some("model".into()),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!("the model {model:?} does not exist: this server serves {:?}", shared.model),
            )
        }),
    }
}

fn tokenize(ready: &Ready, text: &str, special: bool) -> Result<Vec<i64>, ApiError> {
    encode(&ready.tokenizer, text, special).map_err(|error| ApiError::invalid(format!("{error:#}"), Some("prompt")))
}

/// Checks `request`, queues it (429 when the queue is full) and answers with its result.
fn submit(
    shared: &Shared,
    ready: &Ready,
    endpoint: Endpoint,
    sampling: &api::Sampling,
    request: Request,
) -> Result<Response, ApiError> {
    api::check(&request, &ready.limits)?;
    let prompt = sampling.return_token_ids.then(|| request.prompt.clone());
    let number = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (events, receiver) = unbounded_channel();
    let job = Job { id: number as usize, request, events, enqueued: Instant::now() };
    shared.metrics.waiting.inc();
    if let Err(error) = shared.queue.try_send(job) {
        shared.metrics.waiting.dec();
        return Err(match error {
            TrySendError::Full(_) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "queue_full",
                "the server's queue is full (--max-waiting): retry later",
            ),
            TrySendError::Disconnected(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "stopped", "the server is stopping")
            }
        });
    }
    let head = Head { id: endpoint.id(number), created: now(), model: shared.model.clone() };
    Ok(match sampling.stream {
        true => stream(endpoint, head, receiver, sampling.include_usage()).into_response(),
        false => Whole { endpoint, head, receiver, prompt }.into_response(),
    })
}

/// A non-streamed answer: the body is written when the request has finished.
struct Whole {
    endpoint: Endpoint,
    head: Head,
    receiver: UnboundedReceiver<Event>,
    /// The prompt's token ids, when the token ids are asked for.
    prompt: Option<Vec<i64>>,
}

impl IntoResponse for Whole {
    fn into_response(self) -> Response {
        let Whole { endpoint, head, mut receiver, prompt } = self;
        let body = async_stream_once(async move {
            while let Some(event) = receiver.recv().await {
                if let Event::Done { text, token_ids, finish_reason, usage } = event {
                    let ids = prompt.as_deref().map(|prompt| (prompt, token_ids.as_slice()));
                    return endpoint.response(&head, &text, finish_reason, usage, ids).to_string();
                }
            }
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "aborted", "the request was aborted")
                .body()
                .to_string()
        });
        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

/// A body of one chunk that `text` produces.
fn async_stream_once(text: impl std::future::Future<Output = String> + Send + 'static) -> Body {
    Body::from_stream(futures_util::stream::once(async move { Ok::<_, Infallible>(text.await) }))
}

/// Server-sent events: a chunk per piece of text, the last with the finish reason, the usage
/// (with `include_usage`), then `[DONE]`.
fn stream(
    endpoint: Endpoint,
    head: Head,
    receiver: UnboundedReceiver<Event>,
    include_usage: bool,
) -> Sse<impl futures_util::Stream<Item = Result<sse::Event, Infallible>>> {
    let state = (receiver, VecDeque::<String>::new(), true, false);
    let events = futures_util::stream::unfold(state, move |(mut receiver, mut pending, mut first, mut ended)| {
        let head = head.clone();
        async move {
            loop {
                if let Some(data) = pending.pop_front() {
                    return Some((Ok(sse::Event::default().data(data)), (receiver, pending, first, ended)));
                }
                if ended {
                    return None;
                }
                match receiver.recv().await {
                    Some(Event::Text(text)) => {
                        pending.push_back(endpoint.chunk(&head, &text, first, None).to_string());
                        first = false;
                    }
                    Some(Event::Done { finish_reason, usage, .. }) => {
                        pending.push_back(endpoint.chunk(&head, "", first, Some(finish_reason)).to_string());
                        if include_usage {
                            pending.push_back(endpoint.usage_chunk(&head, usage).to_string());
                        }
                        pending.push_back("[DONE]".into());
                        ended = true;
                    }
                    None => return None,
                }
            }
        }
    });
    Sse::new(events)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Binds `host:port` (before the model loads, so that a taken port fails at once).
pub fn bind(host: &str, port: u16) -> Result<std::net::TcpListener> {
    let address: SocketAddr = format!("{host}:{port}")
        .parse()
        .map_err(|e| crate::config::invalid_config(format!("--host {host} --port {port}: {e}")))?;
    std::net::TcpListener::bind(address).map_err(|error| {
        crate::config::invalid_config(format!("cannot listen on {address}: {error}; choose another --port"))
    })
}
