//! Prometheus metrics of one rank: the registry the training loop updates and the `/metrics` HTTP endpoint served from its own thread.
//!
//! The training loop only touches atomics (`prometheus` gauges, counters and histograms are
//! lock-free to update); a scrape gathers and encodes them on the server thread, which runs a
//! single-threaded tokio runtime, so a scrape never blocks a step. The communication thread
//! adds the time and size of every collective through [`crate::comm::CollectiveObserver`].
//! Step phases come from the phase clock in [`crate::timing`].
use crate::comm::{CollectiveObserver, Comm, GroupKind, Topology};
use crate::config::{Config, MetricsConfig, TrainDevice};
use crate::timing::{GROUPS, PHASES};
use crate::train::StepRecord;
use anyhow::{Context, Result};
use prometheus::{
    exponential_buckets, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry, TextEncoder,
};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tracing::{info, warn, Instrument, Span};

/// Label values of the collective operations, as `comm.rs` names them.
pub const OPERATIONS: [&str; 5] = ["all_reduce", "reduce_scatter", "all_gather", "broadcast", "barrier"];

/// Peak FLOP/s assumed per CPU thread when `metrics.peak_flops` is unset: about one x86 core's
/// fp32 peak with AVX2 (2 FMA units x 8 lanes x 2 FLOP x 3 GHz).
pub const CPU_PEAK_FLOPS_PER_THREAD: f64 = 1e11;

/// Peak FLOP/s assumed per GPU when `metrics.peak_flops` is unset: H100/H200 SXM dense bf16.
pub const GPU_PEAK_FLOPS: f64 = 989e12;

/// Collective time and bytes by group and operation, updated by the communication thread.
struct Collectives {
    seconds: Vec<prometheus::Counter>,
    bytes: Vec<IntCounter>,
    count: Vec<IntCounter>,
}

impl std::fmt::Debug for Collectives {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Collectives")
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
struct Scraped {
    registry: Registry,
    host_memory: Gauge,
    device_memory: Option<(Gauge, nvml_wrapper::Nvml, u32)>,
    rank: usize,
}

impl Scraped {
    fn refresh_memory(&self) {
        if let Some(bytes) = host_rss_bytes() {
            self.host_memory.set(bytes as f64);
        }
        if let Some((gauge, nvml, index)) = &self.device_memory {
            if let Some(bytes) = device_memory_bytes(nvml, *index) {
                gauge.set(bytes as f64);
            }
        }
    }

    /// The exposition text of every metric (Prometheus text format 0.0.4).
    fn render(&self) -> String {
        self.refresh_memory();
        let mut text = String::new();
        if let Err(error) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut text) {
            warn!("cannot encode metrics: {error}");
        }
        text
    }
}

/// Resident set size of this process, from `/proc/self/statm` (Linux).
fn host_rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

/// GPU memory NVML reports for this process on GPU `index` (or the whole GPU's used memory
/// when per-process accounting is unavailable).
fn device_memory_bytes(nvml: &nvml_wrapper::Nvml, index: u32) -> Option<u64> {
    let device = nvml.device_by_index(index).ok()?;
    let pid = std::process::id();
    let own = device.running_compute_processes().ok().and_then(|processes| {
        processes.into_iter().find(|p| p.pid == pid).and_then(|p| match p.used_gpu_memory {
            nvml_wrapper::enums::device::UsedGpuMemory::Used(bytes) => Some(bytes),
            nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => None,
        })
    });
    own.or_else(|| device.memory_info().ok().map(|m| m.used))
}

/// One rank's metrics. Updating them never blocks; `Drop` stops the HTTP server.
pub struct Metrics {
    loss: Gauge,
    validation_loss: Gauge,
    learning_rate: Gauge,
    grad_norm: Gauge,
    tokens_per_second: Gauge,
    mfu: Gauge,
    step: IntGauge,
    steps: IntCounter,
    tokens: IntCounter,
    skipped_steps: IntCounter,
    step_seconds: Histogram,
    phase_seconds: Vec<Histogram>,
    wait_seconds: Vec<prometheus::Counter>,
    checkpoint_save_seconds: Histogram,
    checkpoint_save_bytes: IntCounter,
    checkpoint_load_seconds: Histogram,
    checkpoint_load_bytes: IntCounter,
    collectives: Arc<Collectives>,
    scraped: Arc<Scraped>,
    /// FLOPs of one step over all ranks, and the peak FLOP/s of all ranks together.
    step_flops: f64,
    world_peak_flops: f64,
    step_tokens: u64,
    server: Option<Server>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("address", &self.address()).finish_non_exhaustive()
    }
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Result<Gauge> {
    let gauge = Gauge::with_opts(Opts::new(name, help))?;
    registry.register(Box::new(gauge.clone()))?;
    Ok(gauge)
}

fn int_gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge> {
    let gauge = IntGauge::with_opts(Opts::new(name, help))?;
    registry.register(Box::new(gauge.clone()))?;
    Ok(gauge)
}

fn int_counter(registry: &Registry, name: &str, help: &str) -> Result<IntCounter> {
    let counter = IntCounter::with_opts(Opts::new(name, help))?;
    registry.register(Box::new(counter.clone()))?;
    Ok(counter)
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Result<Histogram> {
    let histogram = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
    registry.register(Box::new(histogram.clone()))?;
    Ok(histogram)
}

/// Children of a metric vector for every combination of groups and operations, in order.
fn by_group_and_operation<B: prometheus::core::MetricVecBuilder>(vec: &prometheus::core::MetricVec<B>) -> Vec<B::M> {
    GROUPS.iter().flat_map(|g| OPERATIONS.iter().map(move |o| vec.with_label_values(&[*g, *o]))).collect()
}

impl Metrics {
    /// The metrics of this rank; also serves them over HTTP when `metrics.enabled`, and
    /// records the collectives of `comm`.
    pub fn start(config: &Config, comm: &Comm) -> Result<Metrics> {
        let mut metrics = Metrics::new(config, &comm.topology)?;
        comm.observe_collectives(metrics.collectives.clone());
        if config.metrics.enabled {
            metrics.server = Some(Server::start(&config.metrics, comm.topology, metrics.scraped.clone())?);
        }
        Ok(metrics)
    }

    /// The metrics of this rank without the HTTP server.
    pub fn new(config: &Config, topology: &Topology) -> Result<Metrics> {
        let run_id = config.metrics.run_id.clone().unwrap_or_else(|| {
            config.train.run_dir.file_name().map_or_else(|| "run".into(), |n| n.to_string_lossy().into_owned())
        });
        let labels = HashMap::from([
            ("rank".to_string(), topology.rank.to_string()),
            ("tp_rank".to_string(), topology.tensor.rank.to_string()),
            ("dp_rank".to_string(), topology.data.rank.to_string()),
            ("run_id".to_string(), run_id),
        ]);
        let r = Registry::new_custom(None, Some(labels))?;
        let time_buckets = exponential_buckets(0.001, 2.0, 19)?; // 1 ms .. 262 s
        let checkpoint_buckets = exponential_buckets(0.1, 2.0, 14)?; // 0.1 s .. 819 s

        let phase_vec = prometheus::HistogramVec::new(
            HistogramOpts::new(
                "trainer_step_phase_seconds",
                "Time of each phase of a training step: data_wait, forward, backward, communication (the training thread blocked on collectives), optimizer",
            )
            .buckets(time_buckets.clone()),
            &["phase"],
        )?;
        r.register(Box::new(phase_vec.clone()))?;
        let phase_seconds = PHASES.iter().map(|p| phase_vec.with_label_values(&[*p])).collect();
        let wait_vec = prometheus::CounterVec::new(
            Opts::new(
                "trainer_collective_wait_seconds_total",
                "Time the training thread was blocked on collectives of each group (the communication not hidden by compute)",
            ),
            &["group"],
        )?;
        r.register(Box::new(wait_vec.clone()))?;
        let wait_seconds = GROUPS.iter().map(|g| wait_vec.with_label_values(&[*g])).collect();

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
            r.register(vec)?;
        }
        let collectives = Arc::new(Collectives {
            seconds: by_group_and_operation(&seconds),
            bytes: by_group_and_operation(&bytes),
            count: by_group_and_operation(&count),
        });

        let memory = GaugeVec::new(
            Opts::new("trainer_memory_used_bytes", "Memory in use: memory=\"host_rss\" (resident set of the process), memory=\"device\" (GPU memory of the process, CUDA only)"),
            &["memory"],
        )?;
        r.register(Box::new(memory.clone()))?;
        let device_memory = match crate::train::device_of(config, topology.local_rank)? {
            tch::Device::Cuda(index) => match nvml_wrapper::Nvml::init() {
                Ok(nvml) => Some((memory.with_label_values(&["device"]), nvml, index as u32)),
                Err(error) => {
                    warn!("device memory is not reported: NVML is not available ({error})");
                    None
                }
            },
            _ => None,
        };
        let scraped = Arc::new(Scraped {
            host_memory: memory.with_label_values(&["host_rss"]),
            device_memory,
            registry: r.clone(),
            rank: topology.rank,
        });

        let is_cpu = config.train.device == TrainDevice::Cpu;
        let peak = config.metrics.peak_flops.unwrap_or(if is_cpu {
            CPU_PEAK_FLOPS_PER_THREAD * tch::get_num_threads().max(1) as f64
        } else {
            GPU_PEAK_FLOPS
        });
        let peak_gauge =
            gauge(&r, "trainer_peak_flops", "Peak FLOP/s of this rank assumed for MFU (metrics.peak_flops)")?;
        peak_gauge.set(peak);
        let restarts =
            int_gauge(&r, "trainer_restarts", "Restarts of the job so far (TRAINER_RESTARTS, set by the launcher)")?;
        restarts.set(match std::env::var("TRAINER_RESTARTS") {
            Ok(value) => value.trim().parse().unwrap_or_else(|_| {
                warn!("TRAINER_RESTARTS = {value:?} is not a number; reporting 0 restarts");
                0
            }),
            Err(_) => 0,
        });
        let validation_loss = gauge(
            &r,
            "trainer_validation_loss",
            "Mean token cross-entropy on the validation windows (NaN before the first evaluation)",
        )?;
        validation_loss.set(f64::NAN);

        let t = &config.train;
        let step_tokens = (t.global_batch * t.seq_len) as u64;
        Ok(Metrics {
            loss: gauge(&r, "trainer_loss", "Mean token cross-entropy of the last training step")?,
            validation_loss,
            learning_rate: gauge(&r, "trainer_learning_rate", "Learning rate of the last step")?,
            grad_norm: gauge(&r, "trainer_grad_norm", "Global gradient norm of the last step, before clipping")?,
            tokens_per_second: gauge(
                &r,
                "trainer_tokens_per_second",
                "Tokens of the last step (all ranks) per second of its step time",
            )?,
            mfu: gauge(
                &r,
                "trainer_mfu_ratio",
                "Model FLOPs utilization of the last step: model FLOP/s per rank over trainer_peak_flops",
            )?,
            step: int_gauge(&r, "trainer_step", "Last completed optimizer step")?,
            steps: int_counter(&r, "trainer_steps_total", "Optimizer steps completed by this process")?,
            tokens: int_counter(
                &r,
                "trainer_tokens_total",
                "Tokens trained on by all ranks together, counted by this process",
            )?,
            skipped_steps: int_counter(&r, "trainer_skipped_steps_total", "Steps whose update was skipped")?,
            step_seconds: histogram(
                &r,
                "trainer_step_seconds",
                "Time of a training step (without validation)",
                time_buckets,
            )?,
            phase_seconds,
            wait_seconds,
            checkpoint_save_seconds: histogram(
                &r,
                "trainer_checkpoint_save_seconds",
                "Time to save a checkpoint",
                checkpoint_buckets.clone(),
            )?,
            checkpoint_save_bytes: int_counter(
                &r,
                "trainer_checkpoint_save_bytes_total",
                "Bytes of checkpoints written by this rank",
            )?,
            checkpoint_load_seconds: histogram(
                &r,
                "trainer_checkpoint_load_seconds",
                "Time to load a checkpoint",
                checkpoint_buckets,
            )?,
            checkpoint_load_bytes: int_counter(
                &r,
                "trainer_checkpoint_load_bytes_total",
                "Bytes of checkpoints read by this rank",
            )?,
            collectives,
            scraped,
            step_flops: config.model.train_flops_per_token(t.seq_len) * step_tokens as f64,
            world_peak_flops: peak * topology.world as f64,
            step_tokens,
            server: None,
        })
    }

    /// Model FLOPs utilization of a step that took `step_seconds`: the model's training FLOPs
    /// over the peak of every rank (`metrics.peak_flops`, or the device's default).
    pub fn mfu(&self, step_seconds: f64) -> f64 {
        self.step_flops / step_seconds.max(f64::MIN_POSITIVE) / self.world_peak_flops
    }

    /// Records a completed step and the time of its phases.
    pub fn record_step(&self, record: &StepRecord) {
        self.loss.set(record.loss);
        self.learning_rate.set(record.lr);
        self.grad_norm.set(record.grad_norm);
        self.tokens_per_second.set(record.tokens_per_s);
        self.mfu.set(record.mfu);
        if let Some(val_loss) = record.val_loss {
            self.validation_loss.set(val_loss);
        }
        self.step.set(record.step);
        self.steps.inc();
        self.tokens.inc_by(self.step_tokens);
        self.step_seconds.observe(record.step_seconds);
        for (histogram, seconds) in self.phase_seconds.iter().zip(record.phase_seconds) {
            histogram.observe(seconds);
        }
        for (counter, seconds) in self.wait_seconds.iter().zip(record.wait_seconds) {
            counter.inc_by(seconds);
        }
    }

    /// Counts a step whose update was skipped (e.g. a non-finite gradient).
    pub fn record_skipped_step(&self) {
        self.skipped_steps.inc();
    }

    /// Records a checkpoint saved by this rank: its duration and the bytes this rank wrote.
    pub fn record_checkpoint_save(&self, seconds: f64, bytes: u64) {
        self.checkpoint_save_seconds.observe(seconds);
        self.checkpoint_save_bytes.inc_by(bytes);
    }

    /// Records a checkpoint loaded by this rank: its duration and the bytes this rank read.
    pub fn record_checkpoint_load(&self, seconds: f64, bytes: u64) {
        self.checkpoint_load_seconds.observe(seconds);
        self.checkpoint_load_bytes.inc_by(bytes);
    }

    /// The exposition text a scrape gets.
    pub fn render(&self) -> String {
        self.scraped.render()
    }

    /// Where `/metrics` is served, when it is.
    pub fn address(&self) -> Option<SocketAddr> {
        self.server.as_ref().map(|s| s.address)
    }
}

/// The HTTP endpoint: a thread running a single-threaded tokio runtime.
struct Server {
    address: SocketAddr,
    shutdown: Arc<Notify>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(config: &MetricsConfig, topology: Topology, scraped: Arc<Scraped>) -> Result<Server> {
        let ip: IpAddr = config.address.parse().with_context(|| format!("metrics.address = {:?}", config.address))?;
        let port = u16::try_from(u32::from(config.port) + topology.local_rank as u32).ok().with_context(|| {
            format!(
                "metrics.port = {} + local rank {} is above 65535; lower metrics.port",
                config.port, topology.local_rank
            )
        })?;
        let address = SocketAddr::new(ip, port);
        let listener = std::net::TcpListener::bind(address).map_err(|error| {
            anyhow::anyhow!(
                "cannot serve metrics on {address} (port {port} = metrics.port {} + local rank {}): {error}; \
                 choose free ports with metrics.port (e.g. --set metrics.port=9500) or turn metrics off with metrics.enabled = false",
                config.port,
                topology.local_rank
            )
        })?;
        listener.set_nonblocking(true).context("cannot make the metrics socket non-blocking")?;
        let shutdown = Arc::new(Notify::new());
        let stop = shutdown.clone();
        let span = Span::current();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || span.in_scope(|| serve(listener, scraped, stop)))
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

fn serve(listener: std::net::TcpListener, scraped: Arc<Scraped>, shutdown: Arc<Notify>) {
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
        loop {
            tokio::select! {
                _ = shutdown.notified() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let scraped = scraped.clone();
                        let answer = async move {
                            match tokio::time::timeout(Duration::from_secs(10), answer(stream, &scraped)).await {
                                Ok(Ok(())) => {}
                                Ok(Err(error)) => warn!("metrics request failed: {error}"),
                                Err(_) => warn!("metrics request timed out"),
                            }
                        };
                        tokio::spawn(answer.in_current_span());
                    }
                    // E.g. out of file descriptors: back off instead of spinning.
                    Err(error) => {
                        warn!("metrics server cannot accept a connection: {error}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    });
}

/// Answers one HTTP/1.x request and closes the connection.
async fn answer(mut stream: tokio::net::TcpStream, scraped: &Scraped) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let mut buffer = [0u8; 2048];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buffer[..n]);
        if request.len() > 64 * 1024 {
            return respond(&mut stream, "431 Request Header Fields Too Large", "text/plain", "").await;
        }
    }
    let line = String::from_utf8_lossy(request.split(|&b| b == b'\r').next().unwrap_or_default()).into_owned();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => {
            let text = scraped.render();
            respond(&mut stream, "200 OK", "text/plain; version=0.0.4; charset=utf-8", &text).await
        }
        ("GET", "/") => {
            let text = format!("trainer rank {}: metrics at /metrics\n", scraped.rank);
            respond(&mut stream, "200 OK", "text/plain; charset=utf-8", &text).await
        }
        ("GET", _) => respond(&mut stream, "404 Not Found", "text/plain", "not found; metrics are at /metrics\n").await,
        _ => respond(&mut stream, "405 Method Not Allowed", "text/plain", "only GET\n").await,
    }
}

async fn respond(
    stream: &mut tokio::net::TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timing::{Phase, PhaseSeconds};
    use std::io::{Read, Write};

    const TINY: &str = include_str!("../../configs/tiny.toml");

    fn config(overrides: &[&str]) -> Config {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Config::parse(TINY, &overrides).unwrap()
    }

    fn record(step: i64, val_loss: Option<f64>, phase_seconds: PhaseSeconds) -> StepRecord {
        let wait_seconds = [0.0, phase_seconds[Phase::Communication as usize], 0.0];
        StepRecord {
            step,
            loss: 4.5,
            lr: 1e-3,
            grad_norm: 0.75,
            tokens_per_s: 2048.0,
            step_seconds: 0.5,
            mfu: 0.25,
            phase_seconds,
            wait_seconds,
            host_syncs: 1,
            val_loss,
            peak_memory_bytes: Some(1 << 20),
        }
    }

    fn get(address: SocketAddr, path: &str) -> String {
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// The value of the sample `name` whose labels include `labels`, from exposition text.
    fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            let found: Vec<(&str, &str)> = rest
                .trim_end_matches('}')
                .split(',')
                .filter_map(|pair| pair.split_once('=').map(|(k, v)| (k, v.trim_matches('"'))))
                .collect();
            (metric == name && labels.iter().all(|l| found.contains(l))).then(|| value.parse().unwrap())
        })
    }

    #[test]
    fn exposition_has_every_metric_with_rank_labels() {
        let topology = Topology::new(3, 4, 1, 2);
        let metrics = Metrics::new(&config(&["metrics.run_id=\"r1\""]), &topology).unwrap();
        let mut step = record(7, Some(4.25), [0.1, 0.2, 0.3, 0.05, 0.02]);
        step.mfu = metrics.mfu(step.step_seconds);
        metrics.record_step(&step);
        metrics.record_checkpoint_save(1.5, 1000);
        metrics.record_checkpoint_load(0.5, 2000);
        metrics.record_skipped_step();
        metrics.collectives.record(GroupKind::Data, "reduce_scatter", Duration::from_millis(5), 4096);
        let text = metrics.render();
        let rank = [("rank", "3"), ("tp_rank", "1"), ("dp_rank", "1"), ("run_id", "r1")];
        let with = |extra: &[(&'static str, &'static str)]| [&rank[..], extra].concat();
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);
        let cases: &[Case] = &[
            ("trainer_loss", &[], 4.5),
            ("trainer_validation_loss", &[], 4.25),
            ("trainer_learning_rate", &[], 1e-3),
            ("trainer_grad_norm", &[], 0.75),
            ("trainer_tokens_per_second", &[], 2048.0),
            ("trainer_step", &[], 7.0),
            ("trainer_steps_total", &[], 1.0),
            ("trainer_tokens_total", &[], 2048.0),
            ("trainer_skipped_steps_total", &[], 1.0),
            ("trainer_restarts", &[], 0.0),
            ("trainer_step_seconds_count", &[], 1.0),
            ("trainer_step_seconds_sum", &[], 0.5),
            ("trainer_step_phase_seconds_sum", &[("phase", "backward")], 0.3),
            ("trainer_step_phase_seconds_count", &[("phase", "data_wait")], 1.0),
            ("trainer_collective_wait_seconds_total", &[("group", "data")], 0.05),
            ("trainer_collective_wait_seconds_total", &[("group", "tensor")], 0.0),
            ("trainer_checkpoint_save_seconds_sum", &[], 1.5),
            ("trainer_checkpoint_save_bytes_total", &[], 1000.0),
            ("trainer_checkpoint_load_seconds_count", &[], 1.0),
            ("trainer_checkpoint_load_bytes_total", &[], 2000.0),
            ("trainer_collective_bytes_total", &[("group", "data"), ("operation", "reduce_scatter")], 4096.0),
            ("trainer_collectives_total", &[("group", "data"), ("operation", "reduce_scatter")], 1.0),
            ("trainer_collective_seconds_total", &[("group", "data"), ("operation", "reduce_scatter")], 0.005),
            ("trainer_collectives_total", &[("group", "world"), ("operation", "barrier")], 0.0),
        ];
        for &(name, extra, want) in cases {
            let got = sample(&text, name, &with(extra));
            assert_eq!(got, Some(want), "{name} {extra:?} in\n{text}");
        }
        assert!(sample(&text, "trainer_memory_used_bytes", &with(&[("memory", "host_rss")])).unwrap() > 1e6);
        // MFU: model FLOPs of the step / step time / (4 ranks x peak of one rank).
        let c = config(&[]);
        let flops = c.model.train_flops_per_token(128) * (16 * 128) as f64;
        let peak = CPU_PEAK_FLOPS_PER_THREAD * tch::get_num_threads().max(1) as f64;
        assert_eq!(sample(&text, "trainer_peak_flops", &rank), Some(peak));
        let mfu = sample(&text, "trainer_mfu_ratio", &rank).unwrap();
        assert!((mfu - flops / 0.5 / (4.0 * peak)).abs() < 1e-12, "{mfu}");
    }

    #[test]
    fn serves_metrics_over_http_and_stops() {
        let port = free_port();
        let config = config(&["metrics.enabled=true", &format!("metrics.port={port}")]);
        let comm = Comm::single();
        let metrics = Metrics::start(&config, &comm).unwrap();
        metrics.record_step(&record(1, None, [0.0; 5]));
        let address = metrics.address().unwrap();
        assert_eq!(address.port(), port);
        let response = get(address, "/metrics");
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.contains("Content-Type: text/plain; version=0.0.4"), "{response}");
        let body = response.split_once("\r\n\r\n").unwrap().1;
        assert_eq!(sample(body, "trainer_steps_total", &[("rank", "0"), ("run_id", "tiny")]), Some(1.0), "{body}");
        assert!(get(address, "/nope").starts_with("HTTP/1.1 404"));
        drop(metrics);
        assert!(std::net::TcpStream::connect(address).is_err(), "the server must stop with its Metrics");
    }

    #[test]
    fn a_port_in_use_is_refused_naming_port_and_key() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let config = config(&["metrics.enabled=true", &format!("metrics.port={port}")]);
        let error = format!("{:#}", Metrics::start(&config, &Comm::single()).unwrap_err());
        assert!(error.contains(&format!("127.0.0.1:{port}")) && error.contains("metrics.port"), "{error}");
    }

    #[test]
    fn bad_metrics_config_is_refused() {
        let error = |overrides: &[&str]| {
            format!(
                "{:#}",
                Config::parse(TINY, &overrides.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap_err()
            )
        };
        assert!(error(&["metrics.address=\"localhost:1\""]).contains("metrics.address = \"localhost:1\""));
        assert!(error(&["metrics.port=0"]).contains("metrics.port = 0 must be > 0"));
        assert!(error(&["metrics.port=70000"]).contains("key `metrics.port`"));
        assert!(error(&["metrics.peak_flops=-1.0"]).contains("metrics.peak_flops = -1 must be a positive number"));
    }
}
