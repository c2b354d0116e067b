//! The step's phase clock: where a training step's time goes (data wait, forward, backward, communication, optimizer), on the host's clock on CPU and on the GPU's own (CUDA events) on CUDA.
//!
//! [`reset_phases`] at the start of a step, [`lap`] at the end of each phase (the engine laps
//! forward and backward itself), and every wait of the training thread on a collective
//! ([`record_wait`], called by `Pending::wait`) is moved from the phase it happened in to
//! `communication`, so the phases add up to the step time.
//!
//! On CUDA the host only queues work, so its clock says little: each lap records a timing
//! event on the compute stream instead, and a collective's wait is the time the compute
//! stream stood still on it (an event before and after the stream's wait). The events are
//! read by [`take_phases`], after the step's one synchronization.
use crate::cuda::Event;
use crate::topology::GroupKind;
use std::cell::RefCell;
use std::time::{Duration, Instant};
use tch::Device;

/// The parts of a training step, in `trainer_step_phase_seconds{phase=...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the next batch from the loader.
    DataWait,
    /// Forward passes of the step's micro-batches (less collective waits).
    Forward,
    /// Backward passes (less collective waits).
    Backward,
    /// Time the training thread (on CUDA: the compute stream) spends blocked on collectives.
    Communication,
    /// Gradient norm, clipping and the AdamW update (less collective waits).
    Optimizer,
}

/// Label values of [`Phase`], in order.
pub const PHASES: [&str; 5] = ["data_wait", "forward", "backward", "communication", "optimizer"];

/// Seconds spent in each [`Phase`] during one step.
pub type PhaseSeconds = [f64; 5];

/// Label values of the process groups.
pub const GROUPS: [&str; 3] = ["tensor", "data", "world"];

/// Seconds the training thread waited on collectives of each group, in [`GROUPS`] order.
pub type GroupSeconds = [f64; 3];

/// The GPU's side of a step: events at the start and at each lap, and the compute stream's
/// waits on collectives, each with the lap it fell in.
#[derive(Default)]
struct GpuClock {
    device: usize,
    start: Option<Event>,
    laps: Vec<(Phase, Event)>,
    waits: Vec<(usize, GroupKind, Event, Event)>,
}

struct PhaseClock {
    last: Instant,
    waited: f64,
    seconds: PhaseSeconds,
    waited_by_group: GroupSeconds,
    gpu: Option<GpuClock>,
}

thread_local! {
    static CLOCK: RefCell<PhaseClock> = RefCell::new(PhaseClock {
        last: Instant::now(),
        waited: 0.0,
        seconds: [0.0; 5],
        waited_by_group: [0.0; 3],
        gpu: None,
    });
}

/// An event recorded now on the compute stream, or `None` (timing is best effort: a failure
/// to record leaves that stretch untimed instead of failing the step).
fn timing_event(device: usize) -> Option<Event> {
    Event::on_compute_stream(device, true).ok()
}

/// Starts timing a step of a model on `device` on this thread (discards whatever was timed before).
pub fn reset_phases(device: Device) {
    CLOCK.with_borrow_mut(|clock| {
        clock.last = Instant::now();
        clock.waited = 0.0;
        clock.seconds = [0.0; 5];
        clock.waited_by_group = [0.0; 3];
        clock.gpu = match device {
            Device::Cuda(device) => Some(GpuClock { device, start: timing_event(device), ..GpuClock::default() }),
            _ => None,
        };
    });
}

/// Ends a stretch of `phase`: the time since the previous lap goes to `phase`, except the time
/// spent waiting on collectives meanwhile, which goes to [`Phase::Communication`].
pub fn lap(phase: Phase) {
    CLOCK.with_borrow_mut(|clock| {
        let now = Instant::now();
        let elapsed = now.duration_since(clock.last).as_secs_f64();
        let waited = clock.waited.min(elapsed);
        clock.seconds[phase as usize] += elapsed - waited;
        clock.seconds[Phase::Communication as usize] += waited;
        clock.last = now;
        clock.waited = 0.0;
        if let Some(gpu) = clock.gpu.as_mut() {
            if let Some(event) = timing_event(gpu.device) {
                gpu.laps.push((phase, event));
            }
        }
    });
}

/// Counts `waited` as time this thread was blocked on a collective of `group`.
pub fn record_wait(group: GroupKind, waited: Duration) {
    CLOCK.with_borrow_mut(|clock| {
        clock.waited += waited.as_secs_f64();
        clock.waited_by_group[group as usize] += waited.as_secs_f64();
    });
}

/// Makes the compute stream of `device` wait on a collective of `group` through `block` (which
/// queues the wait), timing the stall on the GPU when a step is being timed there.
pub fn gpu_wait<T>(group: GroupKind, device: usize, block: impl FnOnce() -> T) -> T {
    let timed = CLOCK.with_borrow(|clock| clock.gpu.as_ref().is_some_and(|gpu| gpu.device == device));
    if !timed {
        return block();
    }
    let before = timing_event(device);
    let result = block();
    let after = timing_event(device);
    CLOCK.with_borrow_mut(|clock| {
        if let (Some(gpu), Some(before), Some(after)) = (clock.gpu.as_mut(), before, after) {
            gpu.waits.push((gpu.laps.len(), group, before, after));
        }
    });
    result
}

/// Writes phase times as a JSON object keyed by [`PHASES`] (in `metrics.jsonl`).
pub fn serialize_phases<S: serde::Serializer>(phases: &PhaseSeconds, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_map(PHASES.iter().zip(phases))
}

/// Writes wait times as a JSON object keyed by [`GROUPS`] (in `metrics.jsonl`).
pub fn serialize_groups<S: serde::Serializer>(waits: &GroupSeconds, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_map(GROUPS.iter().zip(waits))
}

/// The phase times and the waits by group since [`reset_phases`], resetting them. On CUDA,
/// call it once the work of the last lap has completed (after the step's synchronization):
/// the times are then the GPU's, between the laps' events.
pub fn take_phases() -> (PhaseSeconds, GroupSeconds) {
    CLOCK.with_borrow_mut(|clock| {
        let host = (std::mem::take(&mut clock.seconds), std::mem::take(&mut clock.waited_by_group));
        match clock.gpu.take().map(|gpu| gpu.phases()) {
            Some(Some(gpu)) => gpu,
            Some(None) => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| tracing::warn!("the GPU's phase times could not be read; phases are the host's"));
                host
            }
            None => host,
        }
    })
}

impl GpuClock {
    /// The GPU's times, or `None` when an event is missing or has not completed.
    fn phases(&self) -> Option<(PhaseSeconds, GroupSeconds)> {
        let (mut seconds, mut waited) = ([0.0; 5], [0.0; 3]);
        let mut previous = self.start.as_ref()?;
        for (index, (phase, event)) in self.laps.iter().enumerate() {
            let mut stalled = 0.0;
            for (_, group, before, after) in self.waits.iter().filter(|(lap, ..)| *lap == index) {
                let stall = after.seconds_since(before).ok()?;
                stalled += stall;
                waited[*group as usize] += stall;
            }
            let elapsed = event.seconds_since(previous).ok()?;
            seconds[*phase as usize] += elapsed - stalled.min(elapsed);
            seconds[Phase::Communication as usize] += stalled.min(elapsed);
            previous = event;
        }
        Some((seconds, waited))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_add_up_and_waits_count_as_communication() {
        reset_phases(Device::Cpu);
        std::thread::sleep(Duration::from_millis(20));
        lap(Phase::DataWait);
        std::thread::sleep(Duration::from_millis(30));
        record_wait(GroupKind::Data, Duration::from_millis(10));
        lap(Phase::Forward);
        let (phases, waits) = take_phases();
        assert_eq!(waits, [0.0, 0.01, 0.0]);
        assert!(phases[Phase::DataWait as usize] >= 0.02, "{phases:?}");
        assert!((phases[Phase::Communication as usize] - 0.01).abs() < 1e-9, "{phases:?}");
        assert!(phases[Phase::Forward as usize] >= 0.02 && phases[Phase::Forward as usize] < 0.2, "{phases:?}");
        assert_eq!(take_phases(), ([0.0; 5], [0.0; 3]));
    }
}
