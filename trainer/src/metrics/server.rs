//! The `/metrics` endpoint: an axum router served by hyper over HTTP/1.1 on a thread of its own, in a current-thread tokio runtime.
use super::registry::Scraped;
use crate::config::MetricsConfig;
use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{header, Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::Notify;
use tracing::{info, warn, Instrument, Span};

/// How long a client may take to send a request's headers.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stopping server lets the requests in progress finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// The HTTP endpoint: a thread running a current-thread tokio runtime. Dropping it stops the
/// server (no new connections, the requests in progress may finish) and joins the thread.
pub(super) struct Server {
    pub(super) address: SocketAddr,
    shutdown: Arc<Notify>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves `scraped` on `metrics.address`, port `metrics.port` + `local_rank`.
    pub(super) fn start(config: &MetricsConfig, local_rank: usize, scraped: Arc<Scraped>) -> Result<Server> {
        let ip: IpAddr = config.address.parse().with_context(|| format!("metrics.address = {:?}", config.address))?;
        let port = u16::try_from(u32::from(config.port) + local_rank as u32).ok().with_context(|| {
            format!("metrics.port = {} + local rank {local_rank} is above 65535; lower metrics.port", config.port)
        })?;
        let address = SocketAddr::new(ip, port);
        let listener = std::net::TcpListener::bind(address).map_err(|error| {
            anyhow::anyhow!(
                "cannot serve metrics on {address} (port {port} = metrics.port {} + local rank {local_rank}): {error}; \
                 choose free ports with metrics.port (e.g. --set metrics.port=9500) or turn metrics off with metrics.enabled = false",
                config.port,
            )
        })?;
        listener.set_nonblocking(true).context("cannot make the metrics socket non-blocking")?;
        let shutdown = Arc::new(Notify::new());
        let stop = shutdown.clone();
        let span = Span::current();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || span.in_scope(|| serve(listener, router(scraped), stop)))
            .context("cannot start the metrics thread")?;
        info!("metrics served at http://{address}/metrics");
        Ok(Server { address, shutdown, thread: Some(thread) })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `GET /metrics`: the exposition; `GET /`: where it is; 404 for other paths, 405 for other methods.
fn router(scraped: Arc<Scraped>) -> Router {
    Router::new()
        .route("/metrics", get(exposition))
        .route("/", get(index))
        .fallback(other)
        .method_not_allowed_fallback(other)
        .with_state(scraped)
}

async fn exposition(State(scraped): State<Arc<Scraped>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], scraped.render())
}

async fn index(State(scraped): State<Arc<Scraped>>) -> String {
    format!("trainer rank {}: metrics at /metrics\n", scraped.rank)
}

async fn other(method: Method) -> (StatusCode, &'static str) {
    match method {
        Method::GET => (StatusCode::NOT_FOUND, "not found; metrics are at /metrics\n"),
        _ => (StatusCode::METHOD_NOT_ALLOWED, "only GET\n"),
    }
}

/// Accepts connections until `shutdown` is notified, then gives the requests in progress
/// [`DRAIN_TIMEOUT`] to finish.
fn serve(listener: std::net::TcpListener, router: Router, shutdown: Arc<Notify>) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            warn!("metrics are not served: cannot start the tokio runtime: {error}");
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(error) => {
                warn!("metrics are not served: {error}");
                return;
            }
        };
        // One request per connection, header names written as `Content-Type`, and a client
        // that sends no request is dropped after REQUEST_TIMEOUT.
        let mut http = hyper::server::conn::http1::Builder::new();
        http.keep_alive(false).title_case_headers(true).timer(TokioTimer::new()).header_read_timeout(REQUEST_TIMEOUT);
        let service = TowerToHyperService::new(router);
        let connections = GracefulShutdown::new();
        loop {
            let stream = tokio::select! {
                _ = shutdown.notified() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    // E.g. out of file descriptors: back off instead of spinning.
                    Err(error) => {
                        warn!("metrics server cannot accept a connection: {error}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let connection = connections.watch(http.serve_connection(TokioIo::new(stream), service.clone()));
            let answer = async move {
                if let Err(error) = connection.await {
                    warn!("metrics request failed: {error}");
                }
            };
            tokio::spawn(answer.in_current_span());
        }
        drop(listener);
        // Past the timeout, the runtime's end drops the connections left.
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, connections.shutdown()).await;
    });
}
