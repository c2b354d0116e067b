//! Continuous batching for `trainer serve`: one thread owns the decoder; requests wait in a bounded queue, join the batch between decode steps, stream their text back, and leave when finished or when their client is gone. Under tensor parallelism rank 0 decides each step's work and broadcasts it, and every rank applies it alike.
use super::api::Usage;
use super::metrics::ServeMetrics;
use crate::comm::{Comm, GroupKind};
use crate::decode::{Completion, Decoder, FinishReason, Request, StopReason};
use crate::sampling::SamplingParams;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};
use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

/// How long an idle rank 0 waits for a request before telling the other ranks that there is no
/// work (they wait in a collective, which must not reach its timeout).
const HEARTBEAT: Duration = Duration::from_secs(1);

/// A request handed to the scheduler, with the channel its events go to.
#[derive(Debug)]
pub struct Job {
    pub id: usize,
    pub request: Request,
    pub events: UnboundedSender<Event>,
    /// When it entered the queue (latency and time to first token start here).
    pub enqueued: Instant,
}

/// What a request's handler receives: text as it is generated, then the end.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Text(String),
    /// The whole text and the generated token ids (a stop token not included).
    Done {
        text: String,
        token_ids: Vec<i64>,
        finish_reason: FinishReason,
        usage: Usage,
    },
}

/// One iteration's work, the same on every rank: requests that leave (their client is gone),
/// requests that join; then one decode step over all running ones. `stop`: the server ends.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Work {
    leave: Vec<usize>,
    join: Vec<(usize, Vec<i64>, SamplingParams)>,
    stop: bool,
}

/// Applies `work` to `decoder`: leaves, joins (each prefilled), one step; `report` sees the
/// decoder and the requests finished after the joins and again after the step.
fn advance(decoder: &mut Decoder, work: Work, mut report: impl FnMut(&Decoder, Vec<Completion>)) -> Result<()> {
    for id in work.leave {
        decoder.cancel(id);
    }
    let mut finished = Vec::new();
    for (id, prompt, params) in work.join {
        finished.extend(decoder.add(id, Request { prompt, params })?);
    }
    report(decoder, finished);
    if !decoder.is_idle() {
        let finished = decoder.step()?;
        report(decoder, finished);
    }
    Ok(())
}

/// Rank 0: takes jobs from `queue` while the decoder has room, runs the steps, streams the text
/// and records the metrics, until the queue's senders are gone.
pub fn lead(mut decoder: Decoder, queue: Receiver<Job>, comm: &Comm, metrics: &ServeMetrics) -> Result<()> {
    let tokenizer = decoder.tokenizer().context("serving needs the model's tokenizer")?;
    let mut streams = Streams { tokenizer, metrics, running: HashMap::new() };
    let parallel = comm.topology.tensor.size > 1;
    loop {
        let mut work = Work { leave: streams.gone(), ..Work::default() };
        // The leaving requests' slots are free before the joining ones are prefilled.
        let free = decoder.free_slots() + work.leave.len();
        while free > work.join.len() {
            let idle = decoder.is_idle() && work.join.is_empty() && work.leave.is_empty();
            let job = match idle {
                true => match queue.recv_timeout(HEARTBEAT) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        work.stop = true;
                        break;
                    }
                },
                false => match queue.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            metrics.waiting.dec();
            if job.events.is_closed() {
                continue;
            }
            work.join.push((job.id, job.request.prompt.clone(), job.request.params.clone()));
            streams.start(job);
        }
        for id in &work.leave {
            streams.running.remove(id);
        }
        if parallel {
            let bytes = serde_json::to_vec(&work)?;
            comm.broadcast_bytes(GroupKind::Tensor, &bytes, 0)?;
        }
        if work.stop {
            return Ok(());
        }
        advance(&mut decoder, work, |decoder, finished| streams.report(decoder, finished))?;
        metrics.running.set(streams.running.len() as i64);
        let (used, total) = decoder.cache_usage();
        metrics.kv_cache_tokens.set(used);
        metrics.kv_cache_usage.set(used as f64 / total.max(1) as f64);
    }
}

/// The other ranks of a tensor-parallel group: apply rank 0's work until it stops.
pub fn follow(mut decoder: Decoder, comm: &Comm) -> Result<()> {
    loop {
        let bytes = comm.broadcast_bytes(GroupKind::Tensor, &[], 0)?;
        let work: Work = serde_json::from_slice(&bytes).context("rank 0 sent work this rank cannot read")?;
        if work.stop {
            return Ok(());
        }
        advance(&mut decoder, work, |_, _| {})?;
    }
}

/// A running request's stream: where its events go and what it has been sent.
struct Stream {
    events: UnboundedSender<Event>,
    enqueued: Instant,
    first_token: Option<Instant>,
    prompt_tokens: usize,
    /// Output tokens seen so far.
    seen: usize,
    /// Bytes of the text sent so far.
    sent: usize,
    /// Characters held back at the end of the text: a stop string may be starting there.
    holdback: usize,
}

/// Rank 0's bookkeeping of the running requests.
struct Streams<'a> {
    tokenizer: &'a Tokenizer,
    metrics: &'a ServeMetrics,
    running: HashMap<usize, Stream>,
}

impl Streams<'_> {
    fn start(&mut self, job: Job) {
        let holdback = job.request.params.stop.iter().map(|s| s.chars().count().saturating_sub(1)).max();
        let stream = Stream {
            events: job.events,
            enqueued: job.enqueued,
            first_token: None,
            prompt_tokens: job.request.prompt.len(),
            seen: 0,
            sent: 0,
            holdback: holdback.unwrap_or(0),
        };
        self.running.insert(job.id, stream);
    }

    /// The running requests whose client is gone.
    fn gone(&self) -> Vec<usize> {
        self.running.iter().filter(|(_, s)| s.events.is_closed()).map(|(&id, _)| id).collect()
    }

    /// Sends each running request its new text, and the finished ones their end.
    fn report(&mut self, decoder: &Decoder, finished: Vec<Completion>) {
        let now = Instant::now();
        for (id, output) in decoder.running() {
            let Some(stream) = self.running.get_mut(&id) else { continue };
            if output.len() == stream.seen {
                continue;
            }
            stream.seen = output.len();
            stream.first_token.get_or_insert(now);
            let ids: Vec<u32> = output.iter().map(|&t| t as u32).collect();
            let Ok(text) = self.tokenizer.decode(&ids, true) else { continue };
            // An incomplete UTF-8 sequence decodes to U+FFFD: wait for the rest of it.
            let text = text.trim_end_matches('\u{FFFD}');
            let end = match stream.holdback {
                0 => text.len(),
                n => text.char_indices().rev().nth(n - 1).map_or(0, |(at, _)| at),
            };
            if end > stream.sent && text.is_char_boundary(stream.sent) {
                let _ = stream.events.send(Event::Text(text[stream.sent..end].to_string()));
                stream.sent = end;
            }
        }
        for completion in finished {
            let Some(stream) = self.running.remove(&completion.id) else { continue };
            self.finish(stream, completion, now);
        }
    }

    fn finish(&self, stream: Stream, completion: Completion, now: Instant) {
        let text = completion.text.unwrap_or_default();
        let rest = text.get(stream.sent..).unwrap_or_default();
        if !rest.is_empty() {
            let _ = stream.events.send(Event::Text(rest.to_string()));
        }
        let stop_token = matches!(completion.stop_reason, Some(StopReason::Token(_)));
        let generated = completion.token_ids.len() + usize::from(stop_token);
        // Recorded before the client hears of the end, so that a scrape after the answer counts it.
        let first = stream.first_token.unwrap_or(now);
        let m = self.metrics;
        m.prompt_tokens.inc_by(stream.prompt_tokens as u64);
        m.completion_tokens.inc_by(generated as u64);
        m.time_to_first_token.observe((first - stream.enqueued).as_secs_f64());
        m.request_latency.observe((now - stream.enqueued).as_secs_f64());
        if generated > 1 {
            m.time_per_output_token.observe((now - first).as_secs_f64() / (generated - 1) as f64);
        }
        let usage = Usage::new(stream.prompt_tokens, generated);
        let (token_ids, finish_reason) = (completion.token_ids, completion.finish_reason);
        let _ = stream.events.send(Event::Done { text, token_ids, finish_reason, usage });
    }
}
