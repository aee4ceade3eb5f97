// Checks shared by the CPU and CUDA bindings of the memk log-prob ops (logprob_binding.cpp,
// logprob_binding_cuda.cpp): tensors in, RowsArgs for the torch-free launchers out.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "logprob_math.h"

namespace memk {

// Checks logits (rows, V) with stride 1 along V, int64 targets (rows,) on the same device,
// a supported dtype; returns the launcher arguments. `op` names the caller in errors.
RowsArgs check_rows(const at::Tensor& logits, const at::Tensor& targets, std::optional<int64_t> ignore_index,
                    const char* op);

// Checks a per-row float tensor (grad_logp, row_max, log_sum): (rows,), contiguous, of the
// accumulation dtype.
void check_row_values(const at::Tensor& values, const at::Tensor& logits, const char* name, const char* op);

// The per-row outputs' dtype: float32, or float64 for float64 logits.
at::ScalarType acc_dtype(const at::Tensor& logits);

// Throws a ValueError naming the offending target and the valid range.
[[noreturn]] void raise_bad_targets(int64_t count, int64_t example, const RowsArgs& rows);

}  // namespace memk
