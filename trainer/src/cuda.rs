//! CUDA through the driver API, loaded at run time (cudarc): the libraries' presence, the primary context of a device, and events on libtorch's compute stream (for the NCCL backend and for timing the step's phases on the GPU).
//!
//! libtorch (through tch) launches every kernel on the device's default stream, the legacy
//! null stream of the primary context: that is the compute stream events are recorded on.
use anyhow::Result;
use cudarc::driver::{result as cu, sys as cu_sys};
use std::ffi::CString;
use std::sync::OnceLock;

/// A library loaded at run time.
#[derive(Debug, Clone, Copy)]
pub enum Library {
    Driver,
    Runtime,
    Nccl,
}

/// Checks once per library that it can be loaded (cudarc panics on a missing one), with an
/// error that names the file names searched and the fix.
pub fn require(library: Library) -> Result<()> {
    static CHECKED: [OnceLock<std::result::Result<(), String>>; 3] = [const { OnceLock::new() }; 3];
    let (name, what) = match library {
        Library::Driver => ("cuda", "the NVIDIA driver's libcuda.so.1 (is this a GPU machine?)"),
        Library::Runtime => ("cudart", "the CUDA runtime libcudart (libtorch_cuda loads it)"),
        Library::Nccl => (
            "nccl",
            "NCCL: the torch wheel ships nvidia/nccl/lib/libnccl.so.2, and a libnccl.so link to it must be on the \
             library path (the build puts one on the trainer's rpath; scripts/gpu-check.sh makes one)",
        ),
    };
    let checked = CHECKED[library as usize].get_or_init(|| {
        let candidates = cudarc::get_lib_name_candidates(name);
        if candidates.iter().any(|file| loadable(file)) {
            Ok(())
        } else {
            Err(format!("cannot load {what}; searched LD_LIBRARY_PATH and the rpath for {}", candidates.join(", ")))
        }
    });
    checked.clone().map_err(anyhow::Error::msg)
}

fn loadable(name: &str) -> bool {
    let Ok(name) = CString::new(name) else { return false };
    // SAFETY: dlopen receives a valid C string; a handle it returns is closed right away
    // (the library stays mapped only if something else holds it).
    unsafe {
        let handle = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if handle.is_null() {
            return false;
        }
        libc::dlclose(handle);
    }
    true
}

pub fn error(call: &str, error: cu::DriverError) -> anyhow::Error {
    let name = error.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    anyhow::anyhow!("{call} failed: {name} ({:?})", error.0)
}

/// Makes `device`'s primary context (the one libtorch's runtime uses) current on this thread,
/// once per thread, for the driver API and the runtime (NCCL picks its device with
/// `cudaGetDevice`); the context is retained for the life of the process, as libtorch keeps it.
pub fn make_current(device: usize) -> Result<()> {
    thread_local! {
        static CURRENT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    }
    if CURRENT.get() == Some(device) {
        return Ok(());
    }
    require(Library::Driver)?;
    cu::init().map_err(|e| error("cuInit", e))?;
    let handle = cu::device::get(device as i32).map_err(|e| error("cuDeviceGet", e))?;
    // SAFETY: `handle` is a valid device; retaining its primary context and making it current
    // touch no memory of ours.
    unsafe {
        let context = cu::primary_ctx::retain(handle).map_err(|e| error("cuDevicePrimaryCtxRetain", e))?;
        cu::ctx::set_current(context).map_err(|e| error("cuCtxSetCurrent", e))?;
    }
    require(Library::Runtime)?;
    cudarc::runtime::result::device::set(device as i32)
        .map_err(|e| anyhow::anyhow!("cudaSetDevice({device}) failed: {e:?}"))?;
    CURRENT.set(Some(device));
    Ok(())
}

/// Free and total bytes of `device`'s memory.
pub fn memory_info(device: usize) -> Result<(u64, u64)> {
    make_current(device)?;
    let (free, total) = cu::mem_get_info().map_err(|e| error("cuMemGetInfo", e))?;
    Ok((free as u64, total as u64))
}

/// A CUDA event in the primary context of the device it was made on.
#[derive(Debug)]
pub struct Event(cu_sys::CUevent);

// SAFETY: CUDA event handles may be recorded, queried and waited on from any thread of the
// process; the handle is destroyed once, by Drop.
unsafe impl Send for Event {}
// SAFETY: as above; every operation on the handle is thread-safe in the CUDA driver.
unsafe impl Sync for Event {}

impl Event {
    /// A new event; `timing` events can measure the time between them ([`Event::seconds_since`]).
    pub fn new(timing: bool) -> Result<Event> {
        let flags = match timing {
            true => cu_sys::CUevent_flags::CU_EVENT_DEFAULT,
            false => cu_sys::CUevent_flags::CU_EVENT_DISABLE_TIMING,
        };
        cu::event::create(flags).map(Event).map_err(|e| error("cuEventCreate", e))
    }

    /// Records the event on `stream`, the null stream or a live stream of the current context.
    fn record_raw(&self, stream: cu_sys::CUstream) -> Result<()> {
        // SAFETY: the event is alive (owned by self); the stream is live (the callers' contract).
        unsafe { cu::event::record(self.0, stream) }.map_err(|e| error("cuEventRecord", e))
    }

    /// Makes `stream` (the null stream or a live stream of the current context) wait on the GPU
    /// until this event has happened.
    fn block_raw(&self, stream: cu_sys::CUstream) -> Result<()> {
        // SAFETY: a live event; the stream is live (the callers' contract).
        unsafe { cu::stream::wait_event(stream, self.0, cu_sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
            .map_err(|e| error("cuStreamWaitEvent", e))
    }

    /// Records the event on `stream`.
    pub fn record(&self, stream: &Stream) -> Result<()> {
        self.record_raw(stream.0)
    }

    /// Makes `stream` wait on the GPU until this event has happened.
    pub fn block(&self, stream: &Stream) -> Result<()> {
        self.block_raw(stream.0)
    }

    /// An event recorded now on `device`'s compute stream.
    pub fn on_compute_stream(device: usize, timing: bool) -> Result<Event> {
        make_current(device)?;
        let event = Event::new(timing)?;
        event.record_raw(cu::stream::null())?;
        Ok(event)
    }

    /// Makes `device`'s compute stream wait (on the GPU, not the host) until this event has happened.
    pub fn block_compute_stream(&self, device: usize) -> Result<()> {
        make_current(device)?;
        self.block_raw(cu::stream::null())
    }

    /// Seconds from `earlier` to this event, both timing events that have completed.
    pub fn seconds_since(&self, earlier: &Event) -> Result<f64> {
        // SAFETY: two live events; the driver reports events that have not completed as an error.
        let ms = unsafe { cu::event::elapsed(earlier.0, self.0) }.map_err(|e| error("cuEventElapsedTime", e))?;
        Ok(f64::from(ms) / 1e3)
    }

    /// Whether the work recorded before the event has completed.
    pub fn completed(&self) -> Result<bool> {
        // SAFETY: a live event.
        match unsafe { cu::event::query(self.0) } {
            Ok(()) => Ok(true),
            Err(cu::DriverError(cu_sys::cudaError_enum::CUDA_ERROR_NOT_READY)) => Ok(false),
            Err(failure) => Err(error("cuEventQuery", failure)),
        }
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the handle is live and dropped once; CUDA releases an event still pending
        // on a stream when it completes.
        let _ = unsafe { cu::event::destroy(self.0) };
    }
}

/// A stream of the current context that does not synchronize implicitly with the compute stream.
#[derive(Debug)]
pub struct Stream(cu_sys::CUstream);

// SAFETY: a stream handle may be used from any thread of the process; it is destroyed once, by Drop.
unsafe impl Send for Stream {}

/// How the GPU schedules a stream's kernels against those of other streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Normal,
    /// The device's highest priority: its kernels go first when several streams have work.
    High,
}

impl Stream {
    /// A new non-blocking stream in the current context.
    pub fn new(priority: Priority) -> Result<Stream> {
        let (least, greatest) =
            cu::stream::get_priority_range().map_err(|e| error("cuCtxGetStreamPriorityRange", e))?;
        let value = match priority {
            Priority::Normal => least,
            Priority::High => greatest,
        };
        cu::stream::create_with_priority(cu::stream::StreamKind::NonBlocking, value)
            .map(Stream)
            .map_err(|e| error("cuStreamCreateWithPriority", e))
    }

    /// The handle, for libraries that queue work on the stream (NCCL).
    pub fn raw(&self) -> cu_sys::CUstream {
        self.0
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: the stream was created by Stream::new and is destroyed once; work still
        // queued on it completes first (the driver defers the release).
        let _ = unsafe { cu::stream::destroy(self.0) };
    }
}
