// Launchers of the CUDA log-prob kernels (logprob_cuda.cu). Raw pointers, a dtype tag and a
// stream as void* (a cudaStream_t): no torch header and no CUDA header, so the torch binding
// and C++ tests include this anywhere. Semantics as the CPU launchers in logprob_cpu.h.
#pragma once

#include "logprob_math.h"

namespace memk {

// Per row: logp = log p(target) and the row's stats (max and log sum exp(x - max), see
// logprob_math.h; 0, 0 and 0 for ignored rows; NaN logp for targets outside [0, V) that are
// not ignored). If bad is not null (2 device int64s, zeroed by the caller), such targets are
// counted in bad[0] and one of them is stored in bad[1]. Returns a cudaError_t as int
// (0 = success); logits rows need not be 16-byte aligned.
int logprob_forward_cuda(const RowsArgs& rows, void* logp, RowStats stats, int64_t* bad, void* stream);

// grad_logits (contiguous rows x V, the logits' dtype)
//   = grad_logp[i] * ([j == t_i] - exp((x_ij - row_max[i]) - log_sum[i])).
int logprob_backward_cuda(const RowsArgs& rows, const void* grad_logp, ConstRowStats stats, void* grad_logits,
                          void* stream);

// cudaGetErrorString, for the binding's error messages.
const char* cuda_error_string(int error);

}  // namespace memk
