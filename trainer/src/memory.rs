//! The measured peak of the memory a rank allocates while training, above what the process held before the model existed.
//!
//! On CPU, libtorch allocates tensors with `malloc`, so the measure is glibc's count of bytes in
//! use (`mallinfo2`: every arena's allocated chunks plus mmapped blocks), sampled by a thread of
//! its own every [`SAMPLE_INTERVAL`], minus the count when the meter started (libtorch, MPI and
//! the rest of the process). Bytes in use, not resident pages: `main` keeps freed memory in the
//! process (mallopt), so the resident set only grows and would count the heap's fragmentation
//! and the code pages first touched by the backward pass. A peak shorter than the interval can
//! be missed; tensors large enough to matter take longer than that to fill. A sample walks the
//! allocator's free lists (about 20 us here), so sampling costs about 2% of one core.
use crate::torch_ext;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tch::Device;

/// How often the host sampler reads the allocator's count.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(1);

/// Measures the peak of the rank's allocations on its device, in windows ([`PeakMemory::take`]).
#[derive(Debug)]
pub enum PeakMemory {
    Host(HostSampler),
    /// The CUDA caching allocator's peak of allocated bytes on this device
    /// (`torch.cuda.max_memory_allocated`, through the C++ shim), reset at each window.
    /// Nothing is allocated on the device before the model, so there is no baseline.
    Cuda(usize),
}

impl PeakMemory {
    /// Starts measuring now: what is in use at this moment is the baseline, not counted.
    pub fn start(device: Device) -> std::io::Result<PeakMemory> {
        Ok(match device {
            Device::Cuda(index) if torch_ext::has_cuda() => PeakMemory::Cuda(index),
            _ => PeakMemory::Host(HostSampler::start()?),
        })
    }

    /// The highest use above the baseline since the previous `take` (or the start), in bytes,
    /// and starts a new window; `None` where it cannot be read.
    pub fn take(&self) -> Option<u64> {
        match self {
            PeakMemory::Host(sampler) => Some(sampler.take()),
            PeakMemory::Cuda(device) => {
                let (_, peak) = torch_ext::cuda_memory(*device).ok()?;
                torch_ext::reset_cuda_peak_memory(*device).ok()?;
                Some(peak)
            }
        }
    }
}

/// A thread that samples glibc's in-use count and keeps its maximum.
#[derive(Debug)]
pub struct HostSampler {
    baseline: u64,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Bytes the process has allocated through `malloc` and not freed (every arena and mmapped
/// blocks).
pub fn host_bytes_in_use() -> u64 {
    // SAFETY: mallinfo2 takes no arguments and only reads the allocator's statistics.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd) as u64
}

impl HostSampler {
    fn start() -> std::io::Result<HostSampler> {
        let baseline = host_bytes_in_use();
        let peak = Arc::new(AtomicU64::new(baseline));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new().name("memory".into()).spawn({
            let (peak, stop) = (peak.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(host_bytes_in_use(), Ordering::Relaxed);
                    std::thread::sleep(SAMPLE_INTERVAL);
                }
            }
        })?;
        Ok(HostSampler { baseline, peak, stop, thread: Some(thread) })
    }

    fn take(&self) -> u64 {
        let now = host_bytes_in_use();
        let peak = self.peak.swap(now, Ordering::Relaxed).max(now);
        peak.saturating_sub(self.baseline)
    }
}

impl Drop for HostSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
