//! The registry's parts: constructors of registered gauges, counters and histograms, the collective observer, and the exposition text a scrape gets.
use super::memory::MemoryGauges;
use crate::comm::{CollectiveObserver, GroupKind};
use crate::timing::GROUPS;
use anyhow::Result;
use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry, TextEncoder};
use std::time::Duration;
use tracing::warn;

/// Label values of the collective operations, as `comm/` names them.
pub(super) const OPERATIONS: [&str; 5] = ["all_reduce", "reduce_scatter", "all_gather", "broadcast", "barrier"];

pub fn gauge(registry: &Registry, name: &str, help: &str) -> Result<Gauge> {
    let gauge = Gauge::with_opts(Opts::new(name, help))?;
    registry.register(Box::new(gauge.clone()))?;
    Ok(gauge)
}

pub fn int_gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge> {
    let gauge = IntGauge::with_opts(Opts::new(name, help))?;
    registry.register(Box::new(gauge.clone()))?;
    Ok(gauge)
}

pub fn int_counter(registry: &Registry, name: &str, help: &str) -> Result<IntCounter> {
    let counter = IntCounter::with_opts(Opts::new(name, help))?;
    registry.register(Box::new(counter.clone()))?;
    Ok(counter)
}

pub fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Result<Histogram> {
    let histogram = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
    registry.register(Box::new(histogram.clone()))?;
    Ok(histogram)
}

/// Children of a metric vector for every combination of groups and operations, in order.
fn by_group_and_operation<B: prometheus::core::MetricVecBuilder>(vec: &prometheus::core::MetricVec<B>) -> Vec<B::M> {
    GROUPS.iter().flat_map(|g| OPERATIONS.iter().map(move |o| vec.with_label_values(&[*g, *o]))).collect()
}

/// Collective time and bytes by group and operation, updated by the communication thread.
pub(super) struct Collectives {
    seconds: Vec<prometheus::Counter>,
    bytes: Vec<IntCounter>,
    count: Vec<IntCounter>,
}

impl std::fmt::Debug for Collectives {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Collectives")
    }
}

impl Collectives {
    /// Registers the collective counters in `registry`, labelled by group and operation.
    pub(super) fn register(registry: &Registry) -> Result<Collectives> {
        let labels = &["group", "operation"];
        let seconds = prometheus::CounterVec::new(
            Opts::new(
                "trainer_collective_seconds_total",
                "Time of collectives on the communication thread (overlapped with compute or not)",
            ),
            labels,
        )?;
        let bytes = prometheus::IntCounterVec::new(
            Opts::new("trainer_collective_bytes_total", "Bytes of the buffers of collectives (all_reduce, broadcast: the tensor; reduce_scatter: the input; all_gather: the output)"),
            labels,
        )?;
        let count =
            prometheus::IntCounterVec::new(Opts::new("trainer_collectives_total", "Collectives completed"), labels)?;
        for vec in [
            Box::new(seconds.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(bytes.clone()),
            Box::new(count.clone()),
        ] {
            registry.register(vec)?;
        }
        Ok(Collectives {
            seconds: by_group_and_operation(&seconds),
            bytes: by_group_and_operation(&bytes),
            count: by_group_and_operation(&count),
        })
    }
}

impl CollectiveObserver for Collectives {
    fn record(&self, group: GroupKind, operation: &'static str, elapsed: Duration, bytes: u64) {
        let group = match group {
            GroupKind::Tensor => 0,
            GroupKind::Data => 1,
            GroupKind::World => 2,
        };
        let Some(op) = OPERATIONS.iter().position(|&o| o == operation) else { return };
        let i = group * OPERATIONS.len() + op;
        self.seconds[i].inc_by(elapsed.as_secs_f64());
        self.bytes[i].inc_by(bytes);
        self.count[i].inc();
    }
}

/// What the server thread reads: the registry and the memory gauges it refreshes per scrape.
pub(super) struct Scraped {
    pub(super) registry: Registry,
    pub(super) memory: MemoryGauges,
    pub(super) rank: usize,
}

impl Scraped {
    /// The exposition text of every metric (Prometheus text format 0.0.4).
    pub(super) fn render(&self) -> String {
        self.memory.refresh();
        let mut text = String::new();
        if let Err(error) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut text) {
            warn!("cannot encode metrics: {error}");
        }
        text
    }
}
