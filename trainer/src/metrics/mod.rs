//! Prometheus metrics of one rank: what the training loop records, and the `/metrics` endpoint ([`server`]) that serves them from a thread of its own.
mod memory;
mod registry;
mod server;

use crate::comm::{Comm, Topology};
use crate::config::Config;
use crate::runlog::{EvalScores, StepRecord, EVAL_SCORES};
use crate::timing::{GROUPS, PHASES};
use anyhow::Result;
use memory::MemoryGauges;
use prometheus::{exponential_buckets, Gauge, Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry};
pub use registry::{gauge, histogram, int_counter, int_gauge};
use registry::{Collectives, Scraped};
use server::Server;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tch::Device;
use tracing::warn;

/// Peak FLOP/s assumed per CPU thread when `metrics.peak_flops` is unset: about one x86 core's
/// fp32 peak with AVX2 (2 FMA units x 8 lanes x 2 FLOP x 3 GHz).
pub const CPU_PEAK_FLOPS_PER_THREAD: f64 = 1e11;

/// Peak FLOP/s assumed per GPU when `metrics.peak_flops` is unset: H100/H200 SXM dense bf16.
pub const GPU_PEAK_FLOPS: f64 = 989e12;

/// One rank's metrics. The training loop only updates atomics (`prometheus` gauges, counters
/// and histograms are lock-free to update); a scrape gathers and encodes them on the server's
/// thread, so a scrape never blocks a step. The communication thread adds the time and size of
/// every collective through [`crate::comm::CollectiveObserver`]; step phases come from the
/// phase clock in [`crate::timing`]. `Drop` stops the HTTP server.
pub struct Metrics {
    loss: Gauge,
    validation_loss: Gauge,
    /// A gauge by task for each of [`EVAL_SCORES`], in its order.
    eval_scores: Vec<prometheus::GaugeVec>,
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

impl Metrics {
    /// The metrics of this rank, training on `device`; also serves them over HTTP when
    /// `metrics.enabled`, and records the collectives of `comm`.
    pub fn start(config: &Config, comm: &Comm, device: Device) -> Result<Metrics> {
        let mut metrics = Metrics::new(config, &comm.topology, device)?;
        comm.observe_collectives(metrics.collectives.clone());
        if config.metrics.enabled {
            let scraped = metrics.scraped.clone();
            metrics.server = Some(Server::start(&config.metrics, comm.topology.local_rank, scraped)?);
        }
        Ok(metrics)
    }

    /// The metrics of this rank, training on `device`, without the HTTP server.
    pub fn new(config: &Config, topology: &Topology, device: Device) -> Result<Metrics> {
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

        let collectives = Arc::new(Collectives::register(&r)?);
        let memory = MemoryGauges::register(&r, device)?;
        let scraped = Arc::new(Scraped { registry: r.clone(), memory, rank: topology.rank });

        let peak = config.metrics.peak_flops.unwrap_or(if device == Device::Cpu {
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
        let eval_scores = EVAL_SCORES
            .iter()
            .map(|(_, name, help)| {
                let vec = prometheus::GaugeVec::new(Opts::new(*name, *help), &["task"])?;
                r.register(Box::new(vec.clone()))?;
                Ok(vec)
            })
            .collect::<Result<_>>()?;

        let t = &config.train;
        let step_tokens = (t.global_batch * t.seq_len) as u64;
        Ok(Metrics {
            loss: gauge(&r, "trainer_loss", "Mean token cross-entropy of the last training step")?,
            validation_loss,
            eval_scores,
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
        self.record_eval(&record.eval);
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

    /// Sets each evaluated task's scores (a series per task and score).
    fn record_eval(&self, eval: &EvalScores) {
        for (task, scores) in eval {
            for ((name, _, _), vec) in EVAL_SCORES.iter().zip(&self.eval_scores) {
                if let Some(&value) = scores.get(*name) {
                    vec.with_label_values(&[task.as_str()]).set(value);
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::{CollectiveObserver, GroupKind};
    use crate::timing::{Phase, PhaseSeconds};
    use std::io::{Read, Write};
    use std::time::Duration;

    const TINY: &str = include_str!("../../../configs/tiny.toml");

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
            eval: EvalScores::new(),
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
        let metrics = Metrics::new(&config(&["metrics.run_id=\"r1\""]), &topology, Device::Cpu).unwrap();
        let mut step = record(7, Some(4.25), [0.1, 0.2, 0.3, 0.05, 0.02]);
        step.mfu = metrics.mfu(step.step_seconds);
        let scores = |pairs: &[(&str, f64)]| pairs.iter().map(|&(k, v)| (k.to_string(), v)).collect();
        step.eval
            .insert("jargon-mc".into(), scores(&[("accuracy", 0.75), ("accuracy_norm", 0.5), ("answer_nll", 2.0)]));
        step.eval.insert("held-out".into(), scores(&[("loss", 3.0), ("perplexity", 20.0), ("bits_per_byte", 1.25)]));
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
            ("trainer_eval_accuracy", &[("task", "jargon-mc")], 0.75),
            ("trainer_eval_accuracy_norm", &[("task", "jargon-mc")], 0.5),
            ("trainer_eval_answer_nll", &[("task", "jargon-mc")], 2.0),
            ("trainer_eval_loss", &[("task", "held-out")], 3.0),
            ("trainer_eval_perplexity", &[("task", "held-out")], 20.0),
            ("trainer_eval_bpb", &[("task", "held-out")], 1.25),
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
        let metrics = Metrics::start(&config, &comm, Device::Cpu).unwrap();
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
    fn other_requests_are_answered_and_a_stalled_client_does_not_hold_up_the_stop() {
        let port = free_port();
        let config = config(&["metrics.enabled=true", &format!("metrics.port={port}")]);
        let metrics = Metrics::start(&config, &Comm::single(), Device::Cpu).unwrap();
        let address = metrics.address().unwrap();
        // Accepted first, so it is being served when the server stops; its request never ends.
        let mut stalled = std::net::TcpStream::connect(address).unwrap();
        write!(stalled, "GET /metrics HTTP/1.1\r\n").unwrap();
        let index = get(address, "/");
        assert!(index.starts_with("HTTP/1.1 200 OK\r\n") && index.ends_with("trainer rank 0: metrics at /metrics\n"));
        let mut post = std::net::TcpStream::connect(address).unwrap();
        write!(post, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").unwrap();
        let mut response = String::new();
        post.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 405") && response.ends_with("only GET\n"), "{response}");
        let stopping = std::time::Instant::now();
        drop(metrics);
        assert!(stopping.elapsed() < Duration::from_secs(5), "the stop took {:?}", stopping.elapsed());
    }

    #[test]
    fn a_port_in_use_is_refused_naming_port_and_key() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let config = config(&["metrics.enabled=true", &format!("metrics.port={port}")]);
        let error = format!("{:#}", Metrics::start(&config, &Comm::single(), Device::Cpu).unwrap_err());
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
