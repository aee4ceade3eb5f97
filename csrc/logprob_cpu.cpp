// C++ CPU kernel of the fused log-prob ops (see logprob_math.h for the math).
//
// Parallel over rows with at::parallel_for. Vectorized by the compiler, not by intrinsics:
// a row is read in chunks of 64 elements spread over 16 independent lanes (a plain loop
// over a lane array, which GCC and Clang turn into SIMD without -ffast-math because no sum
// is reordered), and exp is the branch-free polynomial of logprob_math.h. Each per-dtype
// driver is compiled for AVX-512, AVX2+FMA and the baseline ISA, chosen when the library
// loads (target_clones), so one build runs at full width on any x86-64 machine.
#include "logprob_cpu.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define MEMK_CPU_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define MEMK_CPU_CLONES
#endif

namespace memk {
namespace {

constexpr int kLanes = 16;
constexpr int kChunk = 4 * kLanes;

// Load 64 elements as float; past the end of the row, -inf (exp(-inf - m) adds 0).
template <typename T>
MEMK_HD void load_chunk(const T* __restrict__ x, int64_t n, float (&v)[kChunk]) {
  if (n >= kChunk) {
    for (int k = 0; k < kChunk; ++k) v[k] = Elem<T>::load(x[k]);
  } else {
    for (int k = 0; k < kChunk; ++k) v[k] = k < n ? Elem<T>::load(x[k]) : -HUGE_VALF;
  }
}

// log sum exp of one row in float: per lane an online (max, sum) pair, rescaled once per
// chunk, so one exp per element plus one per lane and chunk.
template <typename T>
MEMK_HD float row_lse_float(const T* __restrict__ x, int64_t vocab) {
  float m[kLanes], s[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    m[l] = -FLT_MAX;
    s[l] = 0.0f;
  }
  for (int64_t j = 0; j < vocab; j += kChunk) {
    float v[kChunk];
    load_chunk(x + j, vocab - j, v);
    float cm[kLanes];
    for (int l = 0; l < kLanes; ++l) cm[l] = max_of(max_of(v[l], v[kLanes + l]), max_of(v[2 * kLanes + l], v[3 * kLanes + l]));
    for (int l = 0; l < kLanes; ++l) {
      const float m_new = max_of(m[l], cm[l]);
      s[l] *= fast_exp(m[l] - m_new);
      m[l] = m_new;
    }
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < kLanes; ++l) s[l] += fast_exp(v[k * kLanes + l] - m[l]);
  }
  LseState<float> st{m[0], s[0]};
  for (int l = 1; l < kLanes; ++l) st.merge(LseState<float>{m[l], s[l]});
  return st.lse();
}

// float64 logits (gradcheck, tests): plain double arithmetic, one element at a time.
MEMK_HD double row_lse_double(const double* __restrict__ x, int64_t vocab) {
  LseState<double> st = LseState<double>::empty();
  for (int64_t j = 0; j < vocab; ++j) st.add(x[j]);
  return st.lse();
}

template <typename T>
MEMK_HD typename Elem<T>::Acc row_lse(const T* __restrict__ x, int64_t vocab) {
  if constexpr (std::is_same<T, double>::value) {
    return row_lse_double(x, vocab);
  } else {
    return row_lse_float(x, vocab);
  }
}

template <typename T>
MEMK_HD void forward_rows(const RowsArgs& a, int64_t begin, int64_t end, typename Elem<T>::Acc* logp,
                          typename Elem<T>::Acc* lse, std::atomic<int64_t>* bad_count,
                          std::atomic<int64_t>* bad_example) {
  using A = typename Elem<T>::Acc;
  const T* logits = static_cast<const T*>(a.logits);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t t = a.targets[i];
    const int kind = classify_target(t, a.vocab, a.ignore_index, a.has_ignore);
    if (kind == kTargetIgnored) {
      logp[i] = A(0);
      lse[i] = A(0);
      continue;
    }
    const T* x = logits + i * a.row_stride;
    const A row = row_lse(x, a.vocab);
    lse[i] = row;
    if (kind == kTargetOutOfRange) {
      bad_count->fetch_add(1, std::memory_order_relaxed);
      bad_example->store(t, std::memory_order_relaxed);
      logp[i] = std::numeric_limits<A>::quiet_NaN();
    } else {
      logp[i] = Elem<T>::load(x[t]) - row;
    }
  }
}

template <typename T>
MEMK_HD void backward_rows(const RowsArgs& a, int64_t begin, int64_t end, const typename Elem<T>::Acc* grad_logp,
                           const typename Elem<T>::Acc* lse, T* __restrict__ grad) {
  using A = typename Elem<T>::Acc;
  const T* logits = static_cast<const T*>(a.logits);
  const int64_t vocab = a.vocab;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t t = a.targets[i];
    const int kind = classify_target(t, vocab, a.ignore_index, a.has_ignore);
    const T* __restrict__ x = logits + i * a.row_stride;
    T* __restrict__ out = grad + i * vocab;
    if (kind == kTargetIgnored) {
      for (int64_t j = 0; j < vocab; ++j) out[j] = Elem<T>::store(A(0));
      continue;
    }
    const A g = kind == kTargetValid ? grad_logp[i] : std::numeric_limits<A>::quiet_NaN();
    const A row = lse[i];
    const A neg_g = -g;
    for (int64_t j = 0; j < vocab; ++j) out[j] = Elem<T>::store(neg_g * fast_exp(Elem<T>::load(x[j]) - row));
    if (kind == kTargetValid) out[t] = Elem<T>::store(logprob_grad(g, Elem<T>::load(x[t]), row, true));
  }
}

// One non-template driver per dtype, so that target_clones compiles the inlined row loops
// once per ISA.
#define MEMK_CPU_DRIVERS(NAME, T)                                                                            \
  MEMK_CPU_CLONES void forward_##NAME(const RowsArgs& a, int64_t begin, int64_t end, Elem<T>::Acc* logp,    \
                                      Elem<T>::Acc* lse, std::atomic<int64_t>* bad_count,                    \
                                      std::atomic<int64_t>* bad_example) {                                   \
    forward_rows<T>(a, begin, end, logp, lse, bad_count, bad_example);                                       \
  }                                                                                                          \
  MEMK_CPU_CLONES void backward_##NAME(const RowsArgs& a, int64_t begin, int64_t end,                       \
                                       const Elem<T>::Acc* grad_logp, const Elem<T>::Acc* lse, T* grad) {    \
    backward_rows<T>(a, begin, end, grad_logp, lse, grad);                                                   \
  }

MEMK_CPU_DRIVERS(f32, float)
MEMK_CPU_DRIVERS(bf16, bf16_t)
MEMK_CPU_DRIVERS(f16, f16_t)
#undef MEMK_CPU_DRIVERS

// float64 is for exactness, not speed: no clones.
void forward_f64(const RowsArgs& a, int64_t begin, int64_t end, double* logp, double* lse,
                 std::atomic<int64_t>* bad_count, std::atomic<int64_t>* bad_example) {
  forward_rows<double>(a, begin, end, logp, lse, bad_count, bad_example);
}
void backward_f64(const RowsArgs& a, int64_t begin, int64_t end, const double* grad_logp, const double* lse,
                  double* grad) {
  backward_rows<double>(a, begin, end, grad_logp, lse, grad);
}

// Rows per task: at least ~16K elements, so that small vocabularies do not pay per-task overhead.
int64_t grain(int64_t vocab) { return vocab >= 16384 ? 1 : 16384 / vocab; }

}  // namespace

void logprob_forward_cpu(const RowsArgs& a, void* logp, void* lse, BadTargets* bad) {
  std::atomic<int64_t> bad_count{0}, bad_example{0};
  at::parallel_for(0, a.n_rows, grain(a.vocab), [&](int64_t begin, int64_t end) {
    switch (a.dtype) {
      case kFloat32:
        forward_f32(a, begin, end, static_cast<float*>(logp), static_cast<float*>(lse), &bad_count, &bad_example);
        break;
      case kBFloat16:
        forward_bf16(a, begin, end, static_cast<float*>(logp), static_cast<float*>(lse), &bad_count, &bad_example);
        break;
      case kFloat16:
        forward_f16(a, begin, end, static_cast<float*>(logp), static_cast<float*>(lse), &bad_count, &bad_example);
        break;
      case kFloat64:
        forward_f64(a, begin, end, static_cast<double*>(logp), static_cast<double*>(lse), &bad_count, &bad_example);
        break;
    }
  });
  if (bad) {
    bad->count = bad_count.load();
    bad->example = bad_example.load();
  }
}

void logprob_backward_cpu(const RowsArgs& a, const void* grad_logp, const void* lse, void* grad_logits) {
  at::parallel_for(0, a.n_rows, grain(a.vocab), [&](int64_t begin, int64_t end) {
    switch (a.dtype) {
      case kFloat32:
        backward_f32(a, begin, end, static_cast<const float*>(grad_logp), static_cast<const float*>(lse),
                     static_cast<float*>(grad_logits));
        break;
      case kBFloat16:
        backward_bf16(a, begin, end, static_cast<const float*>(grad_logp), static_cast<const float*>(lse),
                      static_cast<bf16_t*>(grad_logits));
        break;
      case kFloat16:
        backward_f16(a, begin, end, static_cast<const float*>(grad_logp), static_cast<const float*>(lse),
                     static_cast<f16_t*>(grad_logits));
        break;
      case kFloat64:
        backward_f64(a, begin, end, static_cast<const double*>(grad_logp), static_cast<const double*>(lse),
                     static_cast<double*>(grad_logits));
        break;
    }
  });
}

}  // namespace memk
