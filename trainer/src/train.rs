//! The training loop: batches in, reduced gradients, AdamW steps out, with validation, a per-step log and a greedy sample at the end (through `decode`).
use crate::checkpoint::{check_same_model, load_optimizer, load_params, Checkpointer, Reader, SaveReport, SaveStatus};
use crate::comm::{wait_all, Comm, GroupKind, Topology};
use crate::config::{invalid_config, Config, InvalidConfig, TrainConfig};
use crate::data::{Batch, TrainData};
use crate::engine::Engine;
use crate::held_out::HeldOut;
use crate::hf;
use crate::memory::PeakMemory;
use crate::metrics::Metrics;
use crate::model::{segment_specs, TpShard};
use crate::optim::learning_rate;
use crate::params::FlatParams;
use crate::preempt::Preemption;
use crate::run_lock::RunLock;
use crate::runlog::{EvalScores, StepLog, StepRecord};
use crate::step_sync::{StepScalars, StepTotals, SyncCounter};
use crate::timing::{lap, reset_phases, take_phases, Phase};
use crate::zero::DistOptimizer;
use anyhow::{bail, Context, Result};
use data_shards::{load_tokenizer, DataCursor};
use launcher::protocol;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};
use tracing::info;

/// The configured device; `cuda` means this rank's node-local GPU.
pub fn device_of(config: &Config, local_rank: usize) -> Result<Device> {
    let device = config.train.device.of_local_rank(local_rank);
    if device.is_cuda() && !tch::Cuda::is_available() {
        return Err(invalid_config(format!(
            "train.device = \"{}\" but no CUDA device is visible; use train.device = \"cpu\"",
            config.train.device
        )));
    }
    Ok(device)
}

/// Builds this rank's part of the model with its initial weights (from `train.seed`).
pub fn build_engine(config: &Config, comm: Arc<Comm>) -> Result<Engine> {
    let topology = comm.topology;
    let device = device_of(config, topology.local_rank)?;
    let tp = TpShard { rank: topology.tensor.rank as i64, size: topology.tensor.size as i64 };
    let segment_multiple = if config.parallel.zero { topology.data.size as i64 } else { 1 };
    let mut params =
        FlatParams::new(segment_specs(&config.model, tp), config.train.dtype.kind(), device, segment_multiple);
    params.init(config.train.seed);
    Ok(Engine::new(params, &config.model, comm, config.train.recompute))
}

/// How a training process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every step ran.
    Finished,
    /// A preemption signal arrived: the state after the current step is saved.
    Preempted,
}

/// Joins the job's ranks, then trains as configured (continuing from a checkpoint when
/// there is one).
pub fn train(config: &Config) -> Result<Outcome> {
    let timeout = Duration::from_secs_f64(config.parallel.collective_timeout_s);
    let comm = Arc::new(Comm::init(config.parallel.tensor as usize, timeout)?);
    let world = comm.topology.world;
    let config = with_resumed_global_batch(config)
        .and_then(|config| config.for_world(world as i64).context(InvalidConfig(format!("for {world} ranks"))));
    config.and_then(|config| train_ranks(&config, comm.clone())).map_err(|error| comm.end_job_on_error(error))
}

/// A run that resumes a checkpoint without setting `train.global_batch` keeps the checkpoint's, so that a job
/// restarted on fewer (or more) data-parallel ranks takes the same steps through more (or less) accumulation.
fn with_resumed_global_batch(config: &Config) -> Result<Config> {
    let mut config = config.clone();
    let c = &config.checkpoint;
    let resumed = match (&c.load, c.resume) {
        (Some(dir), _) => Some(dir.clone()),
        (None, true) => Checkpointer::latest(&config.checkpoint_dir(), false)?,
        (None, false) => None,
    };
    if let Some(dir) = resumed.filter(|_| config.train.global_batch == 0) {
        let manifest = crate::checkpoint::Manifest::read(&dir)?;
        let saved: toml::Table = toml::from_str(&manifest.config)
            .with_context(|| format!("{}: the saved configuration is not TOML", dir.display()))?;
        let global_batch = saved.get("train").and_then(|t| t.get("global_batch")).and_then(toml::Value::as_integer);
        config.train.global_batch = global_batch.unwrap_or(0);
    }
    Ok(config)
}

/// Training on the joined ranks; an error on any rank ends the job (see [`Comm::end_job_on_error`]).
fn train_ranks(config: &Config, comm: Arc<Comm>) -> Result<Outcome> {
    let topology = comm.topology;
    let device = device_of(config, topology.local_rank)?;
    check_machine(config, topology, device)?;
    if config.train.threads > 0 {
        tch::set_num_threads(config.train.threads as i32);
    }
    if let Some(dir) = &config.train.export_dir {
        hf::check_replaceable(dir).context(InvalidConfig("train.export_dir".into()))?;
    }
    let leader = topology.rank == 0;
    // Held until training ends: two jobs in one run directory would interleave their logs and
    // prune each other's checkpoints.
    let _lock = leader.then(|| RunLock::acquire(&config.train.run_dir)).transpose()?;
    let metrics = Metrics::start(config, &comm, device)?;
    let memory = PeakMemory::start(device).context("cannot start the memory sampler")?;
    let mut engine = build_engine(config, comm.clone())?;
    let (mut optimizer, first_step, cursor) = starting_state(config, &mut engine, &metrics)?;
    check_schedule(config, first_step)?;
    let mut data = TrainData::open(config, topology.data.rank, topology.data.size, device, cursor)
        .with_context(|| format!("cannot read data.path = {}", config.data.path.display()))?;
    let held_out = HeldOut::open(config, data.tokenizer_path.as_deref())?;
    let mut log = if leader { Some(StepLog::open(config, first_step)?) } else { None };
    let c = &config.checkpoint;
    let mut checkpointer =
        Checkpointer::new(config.checkpoint_dir(), c.keep_last as usize, c.async_save, data.tokenizer_path.clone());
    let t = &config.train;
    let step_tokens = (t.global_batch * t.seq_len) as f64;
    if leader {
        info!(
            world = topology.world,
            tensor_parallel = topology.tensor.size,
            data_parallel = topology.data.size,
            zero = config.parallel.zero,
            params = config.model.num_params(),
            threads = tch::get_num_threads(),
            accumulation = config.accumulation_steps(topology.world as i64),
            "training steps {}..{} of {} tokens",
            first_step + 1,
            t.steps,
            step_tokens
        );
    }

    let preemption = Preemption::install(&t.preempt_signals)?;
    let tp = topology.tensor.size as f64;
    let mut syncs = SyncCounter::start(device)?;
    let (mut preempted, mut skipped_in_a_row) = (false, 0);
    let mut peak_memory: Option<u64> = None;
    for step in first_step..t.steps {
        let start = Instant::now();
        reset_phases(device);
        memory.take(); // the step's window starts: evaluation and checkpoints are not counted
        let (batch, trained) = data.next_batch(t.global_batch)?;
        let trained = match batch.packing {
            Some(_) => comm.sum_scalar(GroupKind::Data, trained as f64)?.max(1.0), // on the host: no device sync
            None => step_tokens,
        };
        lap(Phase::DataWait);
        let overlap = config.parallel.overlap_grad_reduce;
        let loss = forward_backward_step(&engine, &optimizer, &batch, t.micro_batch, trained, overlap)?;
        // Shares of the totals (every tensor-parallel rank holds the same loss), and flags.
        let shares = [loss / tp, optimizer.grad_norm_sq_share(&engine.params)];
        let save = checkpointer.status();
        let scalars = StepScalars::reduce(&comm, &shares, &[preemption.requested(), save.writing, save.failed])?;
        let lr = learning_rate(&config.optim, step, t.steps);
        optimizer.step(&engine.params, lr, config.optim.grad_clip, &scalars.sum(1))?;
        lap(Phase::Optimizer);
        let StepTotals { sums, flags } = scalars.read()?;
        let step_seconds = start.elapsed().as_secs_f64();
        let (loss, grad_norm) = (sums[0], if sums[1] < 0.0 { 0.0 } else { sums[1].sqrt() });
        skipped_in_a_row = if grad_norm.is_finite() { 0 } else { skipped_in_a_row + 1 };
        if skipped_in_a_row > 0 {
            metrics.record_skipped_step();
            tracing::warn!("step {}: gradient norm {grad_norm}, update skipped", step + 1);
            check_divergence(&config.optim, skipped_in_a_row, step + 1)?;
        }
        let peak_memory_bytes = memory.take();
        peak_memory = peak_memory.max(peak_memory_bytes);

        let done = step + 1;
        let last = done == t.steps || t.stop_at_step == Some(done);
        let (val_loss, eval) = match t.eval_every > 0 && (done % t.eval_every == 0 || last) {
            true => evaluate(&engine, &data, config, held_out.as_ref())?,
            false => (None, EvalScores::new()),
        };
        let (phase_seconds, wait_seconds) = take_phases();
        let record = StepRecord {
            step: done,
            loss,
            lr,
            grad_norm,
            tokens_per_s: step_tokens / step_seconds,
            step_seconds,
            mfu: metrics.mfu(step_seconds),
            phase_seconds,
            wait_seconds,
            host_syncs: syncs.count(),
            val_loss,
            eval,
            peak_memory_bytes,
        };
        metrics.record_step(&record);
        if let Some(log) = log.as_mut() {
            log_step(&record, t, last);
            log.write(&record)?;
        }
        preempted = flags[0];
        let saved = checkpointer.settle(&comm, SaveStatus { writing: flags[1], failed: flags[2] })?;
        let must_save = preempted || t.stop_at_step == Some(done) || (last && c.save_final);
        // A periodic save after a skipped update would only prune a good checkpoint for a doubtful one.
        let periodic = c.every > 0 && done % c.every == 0 && skipped_in_a_row == 0;
        let previous = if must_save || periodic {
            checkpointer.save(&comm, &engine.params, &optimizer, config, done, data.cursor())?
        } else {
            None
        };
        report_save(leader, &metrics, saved.or(previous));
        if last || preempted {
            break;
        }
        syncs = syncs.restart();
    }
    report_save(leader, &metrics, checkpointer.finish(&comm)?);
    if let Some(bytes) = peak_memory {
        info!("peak memory of this rank's steps: {:.1} MiB", bytes as f64 / (1u64 << 20) as f64);
    }
    if preempted {
        if leader {
            info!(
                "preempted by a signal: the checkpoint is saved; exiting with status {} (requeue)",
                protocol::PREEMPTED
            );
        }
        return Ok(Outcome::Preempted);
    }

    if let Some(dir) = &t.export_dir {
        crate::export::from_engine(&engine, config, data.tokenizer_path.as_deref(), dir)?;
    }
    if t.sample_tokens > 0 {
        let path =
            data.tokenizer_path.as_ref().context("the dataset names no tokenizer, so no sample can be decoded")?;
        let tokenizer = load_tokenizer(path)?;
        let eos = tokenizer.token_to_id(data_shards::tokenize::DEFAULT_EOS).map(i64::from);
        let text = crate::decode::greedy_text(&engine, &tokenizer, &t.sample_prompt, t.sample_tokens, eos)?;
        if leader {
            info!("sample: {text}");
            println!("{text}");
        }
    }
    wait_all([comm.barrier(GroupKind::World)])?;
    Ok(Outcome::Finished)
}

/// Refuses what this machine cannot run before anything is allocated: threads per rank far
/// beyond its CPUs (more than [`THREADS_PER_CPU`] each), or a rank whose memory (`trainer plan`'s estimate) exceeds what is available: the
/// GPU's free memory, or on CPU the host's available memory shared by this node's ranks.
/// Threads per rank per CPU above which `train.threads` is refused (the launcher's bound on ranks
/// per CPU is the same): beyond it no setting is deliberate.
const THREADS_PER_CPU: i64 = 4;

fn check_machine(config: &Config, topology: Topology, device: Device) -> Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as i64;
    if config.train.threads > THREADS_PER_CPU * cpus {
        return Err(invalid_config(format!(
            "train.threads = {}: this machine has {cpus} CPUs; more threads per rank than CPUs only slow it down \
             (0 = libtorch's default)",
            config.train.threads
        )));
    }
    let layout = crate::plan::Layout::of(config, topology.world as i64)?;
    let needed = crate::plan::plan(config, layout, crate::plan::Target::of(config)).total();
    let (available, what, sharing) = match device {
        Device::Cuda(index) => (crate::cuda::memory_info(index)?.0, format!("cuda:{index} has free"), 1),
        _ => (
            host_available_memory()?,
            "this host has available".to_string(),
            protocol::local_size().unwrap_or(1) as u64,
        ),
    };
    if needed * sharing > available {
        let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
        return Err(invalid_config(format!(
            "(memory): each rank needs about {:.1} GiB ({sharing} on this node; `trainer plan` shows the terms) \
             but {what} {:.1} GiB; use more ranks or tensor parallelism, parallel.zero, train.recompute, or a \
             smaller train.micro_batch",
            gib(needed),
            gib(available)
        )));
    }
    Ok(())
}

/// `MemAvailable` of /proc/meminfo, in bytes.
fn host_available_memory() -> Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    let kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .context("/proc/meminfo has no MemAvailable line")?;
    Ok(kib * 1024)
}

/// Ends a run whose last `skipped` steps (up to `step`) all had a non-finite gradient norm, past
/// `optim.max_skipped_steps`, before anything of it is saved.
fn check_divergence(optim: &crate::config::OptimConfig, skipped: i64, step: i64) -> Result<()> {
    if optim.max_skipped_steps > 0 && skipped >= optim.max_skipped_steps {
        bail!(
            "the run has diverged: the gradient norm was not finite in steps {}..{step} (optim.max_skipped_steps = \
             {}), so their updates were skipped and nothing of them was saved; resume from the last checkpoint \
             with a lower optim.lr or more optim.warmup_steps",
            step - skipped + 1,
            optim.max_skipped_steps
        );
    }
    Ok(())
}

/// Refuses a schedule that has nothing to do after resuming at `first_step`.
fn check_schedule(config: &Config, first_step: i64) -> Result<()> {
    let t = &config.train;
    if first_step >= t.steps {
        return Err(invalid_config(format!(
            "train.steps = {}: the checkpoint resumed is at step {first_step}, so nothing is left to train; raise \
             train.steps to continue this run",
            t.steps
        )));
    }
    if let Some(stop) = t.stop_at_step.filter(|&stop| stop <= first_step) {
        return Err(invalid_config(format!(
            "train.stop_at_step = {stop} is not after the step resumed from, {first_step}"
        )));
    }
    Ok(())
}

/// The optimizer, the number of steps already taken and the data position to start from:
/// a checkpoint (`checkpoint.load`, else the newest one when `checkpoint.resume`), else the
/// initial weights (drawn from the seed, or `checkpoint.init_from_hf`).
fn starting_state(config: &Config, engine: &mut Engine, metrics: &Metrics) -> Result<(DistOptimizer, i64, DataCursor)> {
    let comm = engine.comm().clone();
    let c = &config.checkpoint;
    let leader = comm.topology.rank == 0;
    let resume = match (&c.load, c.resume) {
        (Some(dir), _) => Some(dir.clone()),
        (None, true) => Checkpointer::latest(&config.checkpoint_dir(), leader)?,
        (None, false) => match Checkpointer::latest(&config.checkpoint_dir(), false)? {
            Some(newest) => {
                return Err(invalid_config(format!(
                    "checkpoint.resume = false: {} already holds checkpoints (the newest is {}), which starting over \
                     would overwrite; resume, remove them yourself, or choose another train.run_dir or checkpoint.dir",
                    config.checkpoint_dir().display(),
                    newest.display()
                )))
            }
            None => None,
        },
    };
    let Some(dir) = resume else {
        if let Some(hf_dir) = &c.init_from_hf {
            crate::config::check_model_config(hf_dir, &config.model)
                .context(InvalidConfig("checkpoint.init_from_hf".into()))?;
            let weights = hf::HfWeights::open(hf_dir)?;
            engine.params.load_hf(&weights).with_context(|| format!("cannot start from {}", hf_dir.display()))?;
        }
        let optimizer = DistOptimizer::new(comm, &engine.params, &config.optim, config.parallel.zero);
        return Ok((optimizer, 0, DataCursor::default()));
    };
    let started = Instant::now();
    let mut reader = Reader::open(&dir)?;
    check_same_model(&reader, config, leader)?;
    load_params(&mut reader, &engine.params)?;
    let mut optimizer = DistOptimizer::new(comm.clone(), &engine.params, &config.optim, config.parallel.zero);
    load_optimizer(&mut reader, &engine.params, &mut optimizer)?;
    metrics.record_checkpoint_load(started.elapsed().as_secs_f64(), reader.bytes_read());
    let manifest = reader.manifest();
    if leader {
        info!(
            "resumed from {} (step {}, saved by {} ranks with tensor parallel {}) in {:.2}s",
            dir.display(),
            manifest.step,
            manifest.world,
            manifest.tensor_parallel,
            started.elapsed().as_secs_f64()
        );
    }
    Ok((optimizer, manifest.step, manifest.data_cursor))
}

fn report_save(leader: bool, metrics: &Metrics, report: Option<SaveReport>) {
    let Some(r) = report else { return };
    metrics.record_checkpoint_save(r.seconds, r.rank_bytes);
    if leader {
        let mb = r.bytes as f64 / 1e6;
        info!("checkpoint of step {} published in {} ({mb:.1} MB, {:.2}s)", r.step, r.dir.display(), r.seconds);
    }
}

/// Forward and backward over this rank's micro-batches; on the last one, each segment's
/// gradients start their data-parallel reduction as soon as they are final, overlapping
/// the rest of the backward pass (or, without `overlap`, all of them after it). Returns
/// this rank's share of the step's mean loss, a scalar on the device.
fn forward_backward_step(
    engine: &Engine,
    optimizer: &DistOptimizer,
    batch: &Batch,
    micro_batch: i64,
    trained: f64,
    overlap: bool,
) -> Result<Tensor> {
    engine.params.zero_grads();
    let micro_batches = batch.split(micro_batch);
    let mut finished = Vec::new();
    let mut pending = Vec::new();
    let mut loss = Tensor::zeros([], (Kind::Double, batch.tokens.device()));
    for (i, micro) in micro_batches.iter().enumerate() {
        let mut reduce = |segment: usize| match overlap {
            true => pending.push(optimizer.reduce_segment(&engine.params, segment)),
            false => finished.push(segment),
        };
        let last = i + 1 == micro_batches.len();
        loss += engine.forward_backward(micro, trained, last.then_some(&mut reduce as &mut dyn FnMut(usize)))?;
    }
    pending.extend(finished.into_iter().map(|segment| optimizer.reduce_segment(&engine.params, segment)));
    wait_all(pending.into_iter().collect::<Result<Vec<_>>>()?)?;
    Ok(loss)
}

/// The validation loss, and the scores of the `[eval]` tasks when there are some.
fn evaluate(
    engine: &Engine,
    data: &TrainData,
    config: &Config,
    held_out: Option<&HeldOut>,
) -> Result<(Option<f64>, EvalScores)> {
    let val_loss = validation_loss(engine, data, config)?;
    Ok((Some(val_loss), held_out.map(|h| h.evaluate(engine)).transpose()?.unwrap_or_default()))
}

fn validation_loss(engine: &Engine, data: &TrainData, config: &Config) -> Result<f64> {
    let t = &config.train;
    let (batches, trained) = data.validation_batches(t.eval_sequences, t.micro_batch)?;
    let mut total = 0.0;
    for batch in &batches {
        total += engine.eval_loss_sum(batch)?;
    }
    let total = engine.comm().sum_scalar(GroupKind::Data, total)?;
    Ok(total / engine.comm().sum_scalar(GroupKind::Data, trained as f64)?.max(1.0))
}

/// Logs a step's line every `train.log_every` steps, at the last step and with a validation
/// loss; then a line per evaluated task.
fn log_step(r: &StepRecord, t: &TrainConfig, last: bool) {
    log_step_line(r, t, last);
    for (task, scores) in &r.eval {
        let scores: Vec<String> = scores.iter().map(|(name, value)| format!("{name} {value:.4}")).collect();
        info!("step {} eval {task}: {}", r.step, scores.join(" "));
    }
}

fn log_step_line(r: &StepRecord, t: &TrainConfig, last: bool) {
    if r.step % t.log_every != 0 && !last && r.val_loss.is_none() {
        return;
    }
    let steps = t.steps;
    match r.val_loss {
        Some(val) => info!(
            "step {}/{steps} loss {:.4} val_loss {val:.4} lr {:.3e} grad_norm {:.3} tokens/s {:.0} mfu {:.3}",
            r.step, r.loss, r.lr, r.grad_norm, r.tokens_per_s, r.mfu
        ),
        None => info!(
            "step {}/{steps} loss {:.4} lr {:.3e} grad_norm {:.3} tokens/s {:.0} mfu {:.3}",
            r.step, r.loss, r.lr, r.grad_norm, r.tokens_per_s, r.mfu
        ),
    }
}
