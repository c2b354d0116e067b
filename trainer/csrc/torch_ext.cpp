// libtorch calls the tch crate does not wrap, behind a C interface for trainer/src/torch_ext.rs:
// the fused AdamW kernel, and on CUDA builds the caching allocator's statistics and a count of
// the synchronizing calls libtorch makes (its sync debug mode, counted instead of printed).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#ifdef TRAINER_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace {

thread_local std::string last_error;

// Runs `body`, turning a C++ exception into status 1 and a message for torch_ext_last_error.
template <typename Body>
int guarded(Body&& body) {
  try {
    body();
    return 0;
  } catch (const std::exception& error) {
    last_error = error.what();
    return 1;
  }
}

std::vector<at::Tensor> tensor_list(at::Tensor* const* tensors, size_t count) {
  std::vector<at::Tensor> list;
  list.reserve(count);
  for (size_t i = 0; i < count; ++i) list.push_back(*tensors[i]);
  return list;
}

#ifdef TRAINER_WITH_CUDA
std::atomic<uint64_t> synchronizing_calls{0};

// Counts libtorch's "called a synchronizing CUDA operation" warnings; passes others on.
class SyncCounter : public c10::WarningHandler {
 public:
  explicit SyncCounter(c10::WarningHandler* next) : next_(next) {}
  void process(const c10::Warning& warning) override {
    if (warning.msg().find("synchronizing CUDA operation") != std::string::npos) {
      synchronizing_calls.fetch_add(1, std::memory_order_relaxed);
    } else {
      next_->process(warning);
    }
  }

 private:
  c10::WarningHandler* next_;
};
#endif

}  // namespace

extern "C" {

const char* torch_ext_last_error() { return last_error.c_str(); }

int torch_ext_has_cuda() {
#ifdef TRAINER_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

// torch.optim.AdamW(fused=True)'s kernel over `count` tensors of each list (amsgrad and maximize
// off); `steps` are float tensors holding the step number to use; a `found_inf` equal to 1 skips
// the update.
int torch_ext_fused_adamw(at::Tensor* const* params, at::Tensor* const* grads, at::Tensor* const* exp_avgs,
                          at::Tensor* const* exp_avg_sqs, at::Tensor* const* steps, size_t count, double lr,
                          double beta1, double beta2, double weight_decay, double eps, const at::Tensor* found_inf) {
  return guarded([&] {
    std::optional<at::Tensor> skip;
    if (found_inf != nullptr) skip = *found_inf;
    at::_fused_adamw_(tensor_list(params, count), tensor_list(grads, count), tensor_list(exp_avgs, count),
                      tensor_list(exp_avg_sqs, count), {}, tensor_list(steps, count), lr, beta1, beta2,
                      weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false, std::nullopt, skip);
  });
}

// A copy of the CPU tensor `tensor` in pinned (page-locked) memory, as a new at::Tensor owned by
// the caller (tch frees it); tch's wrapper passes a device argument that libtorch warns about.
int torch_ext_pin_memory(const at::Tensor* tensor, at::Tensor** pinned) {
  return guarded([&] { *pinned = new at::Tensor(tensor->pin_memory()); });
}

// Bytes the caching allocator of `device` has handed out: now, and at most since the last reset.
int torch_ext_cuda_memory(int device, int64_t* allocated, int64_t* peak_allocated) {
#ifdef TRAINER_WITH_CUDA
  return guarded([&] {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    auto& bytes = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
    *allocated = bytes.current;
    *peak_allocated = bytes.peak;
  });
#else
  (void)device, (void)allocated, (void)peak_allocated;
  last_error = "this trainer was built against a libtorch without CUDA";
  return 1;
#endif
}

int torch_ext_cuda_reset_peak_memory(int device) {
#ifdef TRAINER_WITH_CUDA
  return guarded([&] { c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device)); });
#else
  (void)device;
  last_error = "this trainer was built against a libtorch without CUDA";
  return 1;
#endif
}

// From now on, counts the synchronizing CUDA calls libtorch makes on the calling thread.
int torch_ext_count_cuda_syncs() {
#ifdef TRAINER_WITH_CUDA
  return guarded([&] {
    static thread_local SyncCounter counter(c10::WarningUtils::get_warning_handler());
    c10::WarningUtils::set_warning_handler(&counter);
    c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_WARN);
  });
#else
  last_error = "this trainer was built against a libtorch without CUDA";
  return 1;
#endif
}

uint64_t torch_ext_cuda_syncs() {
#ifdef TRAINER_WITH_CUDA
  return synchronizing_calls.load(std::memory_order_relaxed);
#else
  return 0;
#endif
}

}  // extern "C"
