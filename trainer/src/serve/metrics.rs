//! The Prometheus metrics of `trainer serve`: requests by endpoint and status, tokens, latency histograms (time to first token, per output token, end to end), running and waiting requests, KV-cache occupancy.
use crate::metrics::{gauge, histogram, int_counter, int_gauge};
use anyhow::Result;
use prometheus::{
    exponential_buckets, Gauge, Histogram, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use tracing::warn;

/// The serving metrics, registered in a registry of their own.
pub struct ServeMetrics {
    registry: Registry,
    requests: IntCounterVec,
    pub prompt_tokens: IntCounter,
    pub completion_tokens: IntCounter,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub request_latency: Histogram,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub kv_cache_tokens: IntGauge,
    pub kv_cache_usage: Gauge,
}

impl std::fmt::Debug for ServeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServeMetrics")
    }
}

impl ServeMetrics {
    pub fn new() -> Result<ServeMetrics> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("trainer_serve_requests_total", "HTTP requests answered, by endpoint and status code"),
            &["endpoint", "status"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        // 1 ms .. ~65 s, doubling.
        let seconds = exponential_buckets(0.001, 2.0, 17)?;
        let r = &registry;
        Ok(ServeMetrics {
            requests,
            prompt_tokens: int_counter(r, "trainer_serve_prompt_tokens_total", "Prompt tokens of finished requests")?,
            completion_tokens: int_counter(
                r,
                "trainer_serve_completion_tokens_total",
                "Tokens generated for finished requests",
            )?,
            time_to_first_token: histogram(
                r,
                "trainer_serve_time_to_first_token_seconds",
                "From a request's arrival in the queue to its first generated token",
                seconds.clone(),
            )?,
            time_per_output_token: histogram(
                r,
                "trainer_serve_time_per_output_token_seconds",
                "Mean time between a request's generated tokens after the first",
                exponential_buckets(0.0005, 2.0, 14)?,
            )?,
            request_latency: histogram(
                r,
                "trainer_serve_request_latency_seconds",
                "From a request's arrival in the queue to its last token",
                seconds,
            )?,
            running: int_gauge(r, "trainer_serve_requests_running", "Requests in the decoding batch")?,
            waiting: int_gauge(r, "trainer_serve_requests_waiting", "Requests queued for a place in the batch")?,
            kv_cache_tokens: int_gauge(r, "trainer_serve_kv_cache_tokens", "Tokens held in the KV cache")?,
            kv_cache_usage: gauge(
                r,
                "trainer_serve_kv_cache_usage_ratio",
                "Fraction of the KV cache's token capacity (all slots) in use",
            )?,
            registry,
        })
    }

    /// Counts an answered request.
    pub fn answered(&self, endpoint: &str, status: u16) {
        self.requests.with_label_values(&[endpoint, &status.to_string()]).inc();
    }

    /// The exposition text (Prometheus text format 0.0.4).
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(error) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut text) {
            warn!("cannot encode metrics: {error}");
        }
        text
    }
}
