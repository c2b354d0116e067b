//! What tch does not wrap, through the C++ shim in csrc/torch_ext.cpp: libtorch's fused AdamW kernel, the CUDA caching allocator's peak, and a count of libtorch's synchronizing CUDA calls.
use anyhow::{bail, Result};
use std::ffi::{c_char, c_int, c_void, CStr};
use tch::Tensor;

/// An `at::Tensor*` as the shim takes it (tch's `C_tensor`).
type TensorPtr = *const c_void;

extern "C" {
    fn torch_ext_last_error() -> *const c_char;
    fn torch_ext_has_cuda() -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn torch_ext_fused_adamw(
        params: *const TensorPtr,
        grads: *const TensorPtr,
        exp_avgs: *const TensorPtr,
        exp_avg_sqs: *const TensorPtr,
        steps: *const TensorPtr,
        count: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        found_inf: TensorPtr,
    ) -> c_int;
    fn torch_ext_pin_memory(tensor: TensorPtr, pinned: *mut *mut c_void) -> c_int;
    fn torch_ext_cuda_memory(device: c_int, allocated: *mut i64, peak_allocated: *mut i64) -> c_int;
    fn torch_ext_cuda_reset_peak_memory(device: c_int) -> c_int;
    fn torch_ext_count_cuda_syncs() -> c_int;
    fn torch_ext_cuda_syncs() -> u64;
}

/// Turns the shim's status into a result, with the C++ exception's message on failure.
fn check(status: c_int, call: &str) -> Result<()> {
    if status == 0 {
        return Ok(());
    }
    // SAFETY: the shim returns a pointer to its thread-local, NUL-terminated error string,
    // valid until the next failing call on this thread; it is copied at once.
    let message = unsafe { CStr::from_ptr(torch_ext_last_error()) }.to_string_lossy().into_owned();
    bail!("{call}: {message}")
}

/// Hyperparameters of one AdamW update.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// The tensors of one fused AdamW call, position by position: parameter, gradient, first and
/// second moment, and a float tensor holding the step number (bias corrections).
#[derive(Debug, Default)]
pub struct AdamWGroup {
    pub params: Vec<Tensor>,
    pub grads: Vec<Tensor>,
    pub exp_avgs: Vec<Tensor>,
    pub exp_avg_sqs: Vec<Tensor>,
    pub steps: Vec<Tensor>,
}

/// `torch.optim.AdamW(fused=True)`'s kernel (CPU or CUDA) over `group`; skipped entirely, on
/// the device, when `found_inf` holds 1.
pub fn fused_adamw(group: &AdamWGroup, step: AdamWStep, found_inf: Option<&Tensor>) -> Result<()> {
    let count = group.params.len();
    let lists = [&group.params, &group.grads, &group.exp_avgs, &group.exp_avg_sqs, &group.steps];
    if lists.iter().any(|list| list.len() != count) {
        bail!("fused AdamW needs as many gradients, moments and steps as parameters");
    }
    if count == 0 {
        return Ok(());
    }
    let pointers = lists.map(|list| list.iter().map(|t| t.as_ptr().cast()).collect::<Vec<TensorPtr>>());
    let AdamWStep { lr, beta1, beta2, weight_decay, eps } = step;
    // SAFETY: every pointer is a live at::Tensor owned by `group` or `found_inf`, borrowed for
    // the call; the lists hold `count` entries each; the shim catches every C++ exception.
    let status = unsafe {
        torch_ext_fused_adamw(
            pointers[0].as_ptr(),
            pointers[1].as_ptr(),
            pointers[2].as_ptr(),
            pointers[3].as_ptr(),
            pointers[4].as_ptr(),
            count,
            lr,
            beta1,
            beta2,
            weight_decay,
            eps,
            found_inf.map_or(std::ptr::null(), |t| t.as_ptr().cast()),
        )
    };
    check(status, "fused AdamW")
}

/// A copy of the CPU tensor `tensor` in pinned memory, from which a copy to the GPU need not
/// block the host.
pub fn pin_memory(tensor: &Tensor) -> Result<Tensor> {
    let mut pinned: *mut c_void = std::ptr::null_mut();
    // SAFETY: `tensor` is a live at::Tensor for the call; on success the shim stores a new
    // at::Tensor allocated with `new`, which tch's Tensor owns and frees (as its own are).
    check(unsafe { torch_ext_pin_memory(tensor.as_ptr().cast(), &mut pinned) }, "pinning memory")?;
    // SAFETY: `pinned` is the valid, uniquely owned at::Tensor the shim just made.
    Ok(unsafe { Tensor::from_ptr(pinned.cast()) })
}

/// Whether the shim was built with its CUDA half (libtorch with CUDA and the CUDA headers).
pub fn has_cuda() -> bool {
    // SAFETY: reads a compile-time constant.
    unsafe { torch_ext_has_cuda() != 0 }
}

/// Bytes handed out by the CUDA caching allocator of `device` now and at most since the last
/// reset (`torch.cuda.memory_allocated` / `max_memory_allocated`).
pub fn cuda_memory(device: usize) -> Result<(u64, u64)> {
    let (mut allocated, mut peak) = (0i64, 0i64);
    // SAFETY: both out-pointers are valid for one write each.
    check(unsafe { torch_ext_cuda_memory(device as c_int, &mut allocated, &mut peak) }, "CUDA memory statistics")?;
    Ok((allocated as u64, peak as u64))
}

/// Starts a new peak for [`cuda_memory`].
pub fn reset_cuda_peak_memory(device: usize) -> Result<()> {
    // SAFETY: takes a device index; the shim reports a bad one as an error.
    check(unsafe { torch_ext_cuda_reset_peak_memory(device as c_int) }, "resetting the CUDA memory peak")
}

/// Turns on libtorch's CUDA sync debug mode for the calling thread, counting each synchronizing
/// call (a device-to-host copy, `item()`, a stream synchronize) instead of printing a warning.
pub fn count_cuda_syncs() -> Result<()> {
    // SAFETY: no arguments; installs a thread-local warning handler that lives as long as the thread.
    check(unsafe { torch_ext_count_cuda_syncs() }, "counting CUDA synchronizations")
}

/// Synchronizing CUDA calls counted so far (0 until [`count_cuda_syncs`]).
pub fn cuda_syncs() -> u64 {
    // SAFETY: reads an atomic counter.
    unsafe { torch_ext_cuda_syncs() }
}
