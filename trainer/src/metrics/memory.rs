//! Memory in use, read at each scrape: the process's resident set (`/proc/self/statm`) and, on CUDA, its GPU memory (NVML, loaded at run time).
use anyhow::Result;
use prometheus::{Gauge, GaugeVec, Opts, Registry};
use tch::Device;
use tracing::warn;

/// `trainer_memory_used_bytes` by `memory` label, and the probes that set it.
pub(super) struct MemoryGauges {
    host_rss: Gauge,
    /// The gauge, NVML and the GPU's index; absent off CUDA or without NVML.
    device: Option<(Gauge, nvml_wrapper::Nvml, u32)>,
}

impl MemoryGauges {
    /// Registers the gauges in `registry`: the host's always, the device's when `device` is a
    /// GPU and NVML can be loaded.
    pub(super) fn register(registry: &Registry, device: Device) -> Result<MemoryGauges> {
        let memory = GaugeVec::new(
            Opts::new("trainer_memory_used_bytes", "Memory in use: memory=\"host_rss\" (resident set of the process), memory=\"device\" (GPU memory of the process, CUDA only)"),
            &["memory"],
        )?;
        registry.register(Box::new(memory.clone()))?;
        let device = match device {
            Device::Cuda(index) => match nvml_wrapper::Nvml::init() {
                Ok(nvml) => Some((memory.with_label_values(&["device"]), nvml, index as u32)),
                Err(error) => {
                    warn!("device memory is not reported: NVML is not available ({error})");
                    None
                }
            },
            _ => None,
        };
        Ok(MemoryGauges { host_rss: memory.with_label_values(&["host_rss"]), device })
    }

    /// Sets the gauges to the memory in use now; a gauge whose probe fails keeps its value.
    pub(super) fn refresh(&self) {
        if let Some(bytes) = host_rss_bytes() {
            self.host_rss.set(bytes as f64);
        }
        if let Some((gauge, nvml, index)) = &self.device {
            if let Some(bytes) = device_memory_bytes(nvml, *index) {
                gauge.set(bytes as f64);
            }
        }
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
