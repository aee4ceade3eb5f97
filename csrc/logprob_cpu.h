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

// The instruction set the kernel runs with: "avx512" (16 lanes), "avx2" (8 lanes, AVX2 + FMA) or
// "baseline" (4 lanes: SSE2 on x86-64, any other CPU); the best this CPU has unless set otherwise.
const char* logprob_cpu_isa();
// The best this CPU runs.
const char* logprob_cpu_best_isa();
// The threads the kernel's loops run on: at::get_num_threads() where this library was compiled with
// OpenMP (torch's parallel_for is header code: without -fopenmp it runs everything on one thread).
int logprob_cpu_threads();
// Run with `name` from now on ("" or "best": the best this CPU has); returns the name now in use,
// or nullptr (and changes nothing) if the name is unknown or this CPU cannot run it.
const char* logprob_cpu_set_isa(const char* name);

// Roofline probes (bench/roofline.py): the kernel's own loads, stores and exp, on the kernel's
// threads. A streaming read of x[0, n) (returns a value only so the reads are not optimized out);
// out[0, n) = value, a streaming write; `repeats` passes of sum exp(x) over x[0, n), which
// should be cache-resident (the exp throughput).
double logprob_cpu_probe_read(const float* x, int64_t n);
void logprob_cpu_probe_write(float* out, int64_t n, float value);
double logprob_cpu_probe_exp(const float* x, int64_t n, int64_t repeats);

}  // namespace memk
