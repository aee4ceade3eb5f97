// CUDA implementations of memk::logprob_fwd_v2 / logprob_bwd_v2 (defined in logprob_binding.cpp):
// check the tensors, pick the current stream, call the torch-free launchers of
// logprob_cuda.cu. Built only where torch has CUDA.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "logprob_binding.h"
#include "logprob_cuda.h"

namespace memk {
namespace {

void check_launch(int error, const char* op) {
  TORCH_CHECK(error == 0, op, ": CUDA kernel launch failed: ", cuda_error_string(error));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_fwd_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                                                std::optional<int64_t> ignore_index,
                                                                bool check_targets) {
  const RowsArgs rows = check_rows(logits, targets, ignore_index, "memk::logprob_fwd_v2");
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto options = logits.options().dtype(acc_dtype(logits));
  at::Tensor logp = at::empty({rows.n_rows}, options);
  at::Tensor row_max = at::empty({rows.n_rows}, options);
  at::Tensor log_sum = at::empty({rows.n_rows}, options);
  if (rows.n_rows == 0) return {logp, row_max, log_sum};
  // bad[0] counts out-of-range targets, bad[1] keeps one; read back (a sync) only if checking.
  at::Tensor bad = check_targets ? at::zeros({2}, targets.options()) : at::Tensor();
  const int error = logprob_forward_cuda(rows, logp.data_ptr(), RowStats{row_max.data_ptr(), log_sum.data_ptr()},
                                         check_targets ? bad.data_ptr<int64_t>() : nullptr,
                                         c10::cuda::getCurrentCUDAStream(logits.device().index()).stream());
  check_launch(error, "memk::logprob_fwd_v2");
  if (check_targets) {
    const at::Tensor host = bad.cpu();
    const int64_t* found = host.data_ptr<int64_t>();
    if (found[0] > 0) raise_bad_targets(found[0], found[1], rows);
  }
  return {logp, row_max, log_sum};
}

at::Tensor logprob_bwd_cuda(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& targets,
                            const at::Tensor& row_max, const at::Tensor& log_sum,
                            std::optional<int64_t> ignore_index) {
  const RowsArgs rows = check_rows(logits, targets, ignore_index, "memk::logprob_bwd_v2");
  check_row_values(grad_logp, logits, "grad_logp", "memk::logprob_bwd_v2");
  check_row_values(row_max, logits, "row_max", "memk::logprob_bwd_v2");
  check_row_values(log_sum, logits, "log_sum", "memk::logprob_bwd_v2");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = at::empty({rows.n_rows, rows.vocab}, logits.options());
  if (rows.n_rows == 0) return grad;
  const int error = logprob_backward_cuda(rows, grad_logp.data_ptr(),
                                          ConstRowStats{row_max.data_ptr(), log_sum.data_ptr()}, grad.data_ptr(),
                                          c10::cuda::getCurrentCUDAStream(logits.device().index()).stream());
  check_launch(error, "memk::logprob_bwd_v2");
  return grad;
}

}  // namespace
}  // namespace memk

TORCH_LIBRARY_IMPL(memk, CUDA, m) {
  m.impl("logprob_fwd_v2", &memk::logprob_fwd_cuda);
  m.impl("logprob_bwd_v2", &memk::logprob_bwd_cuda);
}
