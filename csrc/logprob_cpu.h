// Launchers of the C++ CPU log-prob kernel (logprob_cpu.cpp): raw pointers and a dtype tag,
// no torch types, the same semantics as the CUDA launchers in logprob_cuda.h.
#pragma once

#include "logprob_math.h"

namespace memk {

// Targets a forward pass found outside [0, V) and not equal to ignore_index.
struct BadTargets {
  int64_t count;
  int64_t example;  // one of them, for the error message
};

// logp[i] = log p(target_i) and the row's stats (max and log sum exp(x - max), see
// logprob_math.h) for each row (0, 0 and 0 for ignored rows; NaN logp for out-of-range
// targets, which are also counted in *bad).
void logprob_forward_cpu(const RowsArgs& rows, void* logp, RowStats stats, BadTargets* bad);

// grad_logits[i, j] = grad_logp[i] * ([j == t_i] - exp((x_ij - row_max[i]) - log_sum[i])); zero
// rows where the target is ignored, NaN rows where it is out of range.
void logprob_backward_cpu(const RowsArgs& rows, const void* grad_logp, ConstRowStats stats, void* grad_logits);

}  // namespace memk
