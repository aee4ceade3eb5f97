// CUDA implementations of memk::logprob_fwd / logprob_bwd (defined in logprob_binding.cpp):
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

std::tuple<at::Tensor, at::Tensor> logprob_fwd_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                                    std::optional<int64_t> ignore_index, bool check_targets) {
  const RowsArgs rows = check_rows(logits, targets, ignore_index, "memk::logprob_fwd");
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto options = logits.options().dtype(acc_dtype(logits));
  at::Tensor logp = at::empty({rows.n_rows}, options);
  at::Tensor lse = at::empty({rows.n_rows}, options);
  if (rows.n_rows == 0) return {logp, lse};
  // bad[0] counts out-of-range targets, bad[1] keeps one; read back (a sync) only if checking.
  at::Tensor bad = check_targets ? at::zeros({2}, targets.options()) : at::Tensor();
  const int error = logprob_forward_cuda(rows, logp.data_ptr(), lse.data_ptr(),
                                         check_targets ? bad.data_ptr<int64_t>() : nullptr,
                                         c10::cuda::getCurrentCUDAStream(logits.device().index()).stream());
  check_launch(error, "memk::logprob_fwd");
  if (check_targets) {
    const at::Tensor host = bad.cpu();
    const int64_t* found = host.data_ptr<int64_t>();
    if (found[0] > 0) raise_bad_targets(found[0], found[1], rows);
  }
  return {logp, lse};
}

at::Tensor logprob_bwd_cuda(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& targets,
                            const at::Tensor& lse, std::optional<int64_t> ignore_index) {
  const RowsArgs rows = check_rows(logits, targets, ignore_index, "memk::logprob_bwd");
  check_row_values(grad_logp, logits, "grad_logp", "memk::logprob_bwd");
  check_row_values(lse, logits, "lse", "memk::logprob_bwd");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = at::empty({rows.n_rows, rows.vocab}, logits.options());
  if (rows.n_rows == 0) return grad;
  const int error = logprob_backward_cuda(rows, grad_logp.data_ptr(), lse.data_ptr(), grad.data_ptr(),
                                          c10::cuda::getCurrentCUDAStream(logits.device().index()).stream());
  check_launch(error, "memk::logprob_bwd");
  return grad;
}

}  // namespace
}  // namespace memk

TORCH_LIBRARY_IMPL(memk, CUDA, m) {
  m.impl("logprob_fwd", &memk::logprob_fwd_cuda);
  m.impl("logprob_bwd", &memk::logprob_bwd_cuda);
}
