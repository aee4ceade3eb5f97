// Thin torch layer over the CPU log-prob kernel: defines the memk::logprob_fwd_v2 / logprob_bwd_v2
// operators and their CPU implementations. The CUDA implementations live in
// logprob_binding_cuda.cpp (built only where torch has CUDA); autograd and the fake
// (meta) implementations are registered from Python, in memk/kernels/fused_logprob.py.
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <mutex>
#include <string>

#include "logprob_binding.h"
#include "logprob_cpu.h"

namespace memk {

RowsArgs check_rows(const at::Tensor& logits, const at::Tensor& targets, std::optional<int64_t> ignore_index,
                    const char* op) {
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be 2-D (rows, V), got shape ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) >= 1, op, ": the vocabulary axis of logits is empty (V = 0)");
  TORCH_CHECK_VALUE(logits.stride(1) == 1 || logits.size(1) == 1, op,
                    ": logits must be contiguous along V (stride 1); call .contiguous() first");
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == logits.size(0), op, ": targets must have shape (",
                    logits.size(0), ",) to match logits ", logits.sizes(), ", got ", targets.sizes());
  TORCH_CHECK_VALUE(targets.is_contiguous(), op, ": targets must be contiguous");
  TORCH_CHECK_VALUE(targets.device() == logits.device(), op, ": logits are on ", logits.device(),
                    " but targets on ", targets.device(), "; move both to one device");
  DType dtype;
  switch (logits.scalar_type()) {
    case at::kFloat: dtype = kFloat32; break;
    case at::kHalf: dtype = kFloat16; break;
    case at::kBFloat16: dtype = kBFloat16; break;
    case at::kDouble: dtype = kFloat64; break;
    default:
      TORCH_CHECK_TYPE(false, op, ": logits must be float32, bfloat16, float16 or float64, got ",
                       logits.scalar_type());
  }
  return RowsArgs{logits.data_ptr(), dtype,          logits.size(0), logits.size(1), logits.stride(0),
                  targets.data_ptr<int64_t>(), ignore_index.value_or(0), ignore_index.has_value()};
}

at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_row_values(const at::Tensor& values, const at::Tensor& logits, const char* name, const char* op) {
  TORCH_CHECK_VALUE(values.dim() == 1 && values.size(0) == logits.size(0), op, ": ", name, " must have shape (",
                    logits.size(0), ",), got ", values.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == acc_dtype(logits), op, ": ", name, " must be ", acc_dtype(logits),
                   ", got ", values.scalar_type());
  TORCH_CHECK_VALUE(values.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK_VALUE(values.device() == logits.device(), op, ": ", name, " is on ", values.device(),
                    " but logits on ", logits.device());
}

void raise_bad_targets(int64_t count, int64_t example, const RowsArgs& rows) {
  TORCH_CHECK_VALUE(false, "targets must lie in [0, ", rows.vocab, ")",
                    rows.has_ignore ? " or equal ignore_index=" + std::to_string(rows.ignore_index) : std::string(),
                    ": found ", count, " that do not, e.g. ", example,
                    ". (This check can be turned off with check_targets=False; then such rows give NaN.)");
}

namespace {

// The backward's gradient, of the logits' size, is new memory every call; from the OS, its first
// write page-faults 4 KB at a time (on a 2-core Xeon VM: 40 ms of faults for 128 MB, against 15 ms
// for the write itself). So a gradient of at least kRecycleBytes goes back, when its tensor is
// freed, to a one-slot cache, and the next gradient of that size (the next step's) takes it,
// already mapped: the memory a training loop holds at its peak is unchanged, and between steps one
// buffer waits (released by memk::cpu_release_cached, or replaced by a newer one).
constexpr size_t kRecycleBytes = size_t{8} << 20;

struct RecycledBuffer {
  std::mutex mu;
  void* data = nullptr;
  size_t bytes = 0;
};

RecycledBuffer& recycled() {
  static RecycledBuffer* slot = new RecycledBuffer();  // never destroyed: deleters may run at exit
  return *slot;
}

void give_back(void* data, size_t bytes) {
  void* drop = data;
  {
    std::lock_guard<std::mutex> lock(recycled().mu);
    std::swap(drop, recycled().data);  // keep the newest; free the one it replaces
    recycled().bytes = bytes;
  }
  if (drop) c10::free_cpu(drop);
}

at::Tensor new_gradient(const RowsArgs& rows, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(rows.n_rows) * static_cast<size_t>(rows.vocab) * options.dtype().itemsize();
  if (bytes < kRecycleBytes) return at::empty({rows.n_rows, rows.vocab}, options);
  void* data = nullptr;
  {
    std::lock_guard<std::mutex> lock(recycled().mu);
    if (recycled().data && recycled().bytes == bytes) std::swap(data, recycled().data);
  }
  if (!data) data = c10::alloc_cpu(bytes);
  return at::from_blob(data, {rows.n_rows, rows.vocab}, [bytes](void* p) { give_back(p, bytes); }, options);
}

void cpu_release_cached() { give_back(nullptr, 0); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_fwd_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                               std::optional<int64_t> ignore_index,
                                                               bool check_targets) {
  const RowsArgs rows = check_rows(logits, targets, ignore_index, "memk::logprob_fwd_v2");
  const auto options = logits.options().dtype(acc_dtype(logits));
  at::Tensor logp = at::empty({rows.n_rows}, options);
  at::Tensor row_max = at::empty({rows.n_rows}, options);
  at::Tensor log_sum = at::empty({rows.n_rows}, options);
  BadTargets bad{0, 0};
  if (rows.n_rows > 0)
    logprob_forward_cpu(rows, logp.data_ptr(), RowStats{row_max.data_ptr(), log_sum.data_ptr()}, &bad);
  if (check_targets && bad.count > 0) raise_bad_targets(bad.count, bad.example, rows);
  return {logp, row_max, log_sum};
}

at::Tensor logprob_bwd_cpu(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& targets,
                           const at::Tensor& row_max, const at::Tensor& log_sum, std::optional<int64_t> ignore_index) {
  const RowsArgs rows = check_rows(logits, targets, ignore_index, "memk::logprob_bwd_v2");
  check_row_values(grad_logp, logits, "grad_logp", "memk::logprob_bwd_v2");
  check_row_values(row_max, logits, "row_max", "memk::logprob_bwd_v2");
  check_row_values(log_sum, logits, "log_sum", "memk::logprob_bwd_v2");
  at::Tensor grad = new_gradient(rows, logits.options());
  if (rows.n_rows > 0)
    logprob_backward_cpu(rows, grad_logp.data_ptr(), ConstRowStats{row_max.data_ptr(), log_sum.data_ptr()},
                         grad.data_ptr());
  return grad;
}

std::string cpu_isa(const std::string& request) {
  if (request.empty()) return logprob_cpu_isa();
  const char* now = logprob_cpu_set_isa(request.c_str());
  TORCH_CHECK_VALUE(now != nullptr, "memk::cpu_isa: cannot run the CPU kernel with ", request,
                    " here: choose baseline, avx2 or avx512, up to ", logprob_cpu_best_isa(), " on this CPU");
  return now;
}

const float* probe_buffer(const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(), op,
                    ": needs a contiguous float32 CPU tensor");
  return x.data_ptr<float>();
}

double cpu_probe_read(const at::Tensor& x) { return logprob_cpu_probe_read(probe_buffer(x, "memk::cpu_probe_read"), x.numel()); }

void cpu_probe_write(const at::Tensor& out) {
  probe_buffer(out, "memk::cpu_probe_write");
  logprob_cpu_probe_write(out.data_ptr<float>(), out.numel(), 1.0f);
}

double cpu_probe_exp(const at::Tensor& x, int64_t repeats) {
  return logprob_cpu_probe_exp(probe_buffer(x, "memk::cpu_probe_exp"), x.numel(), repeats);
}

}  // namespace
}  // namespace memk

// The names carry a version: torch.compile's on-disk caches (AOTAutograd, FX graphs) know a C++
// operator by its name alone, so a graph compiled against an older schema would be reused and
// fail (or an older memk would reuse ours). Bump the suffix whenever a schema changes.
// v2: the forward returns the row max and log-sum separately (v1 returned their sum, the lse).
TORCH_LIBRARY(memk, m) {
  // (log p(target), row max m, log sum exp(x - m)) per row of 2-D logits; the last two are
  // what the backward needs, kept apart so that no precision is lost to the size of m.
  m.def("logprob_fwd_v2(Tensor logits, Tensor targets, int? ignore_index, bool check_targets) "
        "-> (Tensor, Tensor, Tensor)");
  // d(sum_i grad_logp[i] * logp[i]) / d logits, from the forward's row_max and log_sum.
  m.def("logprob_bwd_v2(Tensor grad_logp, Tensor logits, Tensor targets, Tensor row_max, Tensor log_sum, "
        "int? ignore_index) -> Tensor");
  // The CPU kernel's instruction set ("avx512", "avx2", "baseline"); a non-empty request sets it
  // (tests run every path this CPU has; "best" goes back to the default).
  m.def("cpu_isa(str request) -> str", &memk::cpu_isa);
  // The threads the CPU kernel's loops run on (1 where the library was built without OpenMP).
  m.def("cpu_threads() -> int", []() -> int64_t { return memk::logprob_cpu_threads(); });
  // The roofline's probes (bench/roofline.py): a streaming read, a streaming write (of 1.0) and
  // `repeats` passes of sum exp(x) over a cache-resident x, through the kernel's own code.
  m.def("cpu_probe_read(Tensor x) -> float");
  m.def("cpu_probe_write(Tensor(a!) out) -> ()");
  m.def("cpu_probe_exp(Tensor x, int repeats) -> float");
  // Frees the gradient buffer the CPU backward keeps for the next call (logprob_binding.cpp).
  m.def("cpu_release_cached() -> ()", &memk::cpu_release_cached);
}

TORCH_LIBRARY_IMPL(memk, CPU, m) {
  m.impl("logprob_fwd_v2", &memk::logprob_fwd_cpu);
  m.impl("logprob_bwd_v2", &memk::logprob_bwd_cpu);
  m.impl("cpu_probe_read", &memk::cpu_probe_read);
  m.impl("cpu_probe_write", &memk::cpu_probe_write);
  m.impl("cpu_probe_exp", &memk::cpu_probe_exp);
}
