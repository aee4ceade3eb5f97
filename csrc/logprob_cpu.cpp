// C++ CPU kernel of the fused log-prob ops (see logprob_math.h for the math).
//
// Parallel over rows with at::parallel_for. Vectorized without intrinsics: a row is read as
// vectors of 8 floats (GCC/Clang vector extensions, which the compiler maps onto AVX2
// or SSE registers), each lane keeping its own online log-sum-exp, and exp is the
// branch-free polynomial of logprob_math.h applied to whole vectors. Each per-dtype
// driver is compiled for AVX-512 (x86-64-v4), AVX2+FMA (x86-64-v3) and the baseline ISA, chosen when
// the library loads (GCC target_clones), so one build runs at full width on any x86-64 machine.
#include "logprob_cpu.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>

// Dispatch is on ISA level (feature bits), never on CPU model: "arch=haswell" would be
// skipped on AMD machines with AVX2.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define MEMK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define MEMK_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MEMK_CPU_CLONES
#endif

namespace memk {
namespace {

using cpu::f32x8;
using cpu::u16x8;
using cpu::u32x8;

constexpr int kLanes = 8;           // floats per vector
constexpr int kChunk = 4 * kLanes;  // elements per rescale of the running sums

MEMK_HD f32x8 vmax(f32x8 a, f32x8 b) { return b > a ? b : a; }  // as max_of: a NaN b is dropped

// 8 consecutive elements of a row <-> a vector of floats (unaligned loads and stores).
template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  MEMK_HD static f32x8 load(const float* p) {
    f32x8 v;
    memcpy(&v, p, sizeof v);
    return v;
  }
  MEMK_HD static void store(float* p, f32x8 v) { memcpy(p, &v, sizeof v); }
};
template <>
struct Lanes<bf16_t> {
  MEMK_HD static f32x8 load(const bf16_t* p) {
    u16x8 h;
    memcpy(&h, p, sizeof h);
    return reinterpret_cast<f32x8>(__builtin_convertvector(h, u32x8) << 16);
  }
  MEMK_HD static void store(bf16_t* p, f32x8 v) {  // as float_to_bf16: nearest even, NaN stays NaN
    const u32x8 u = reinterpret_cast<u32x8>(v);
    const u32x8 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const u32x8 quiet_nan = (u >> 16) | 0x0040u;
    const u16x8 h = __builtin_convertvector((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded, u16x8);
    memcpy(p, &h, sizeof h);
  }
};
template <>
struct Lanes<f16_t> {  // through the scalar conversions (float16 on the CPU is rare)
  MEMK_HD static f32x8 load(const f16_t* p) {
    float f[kLanes];
    for (int k = 0; k < kLanes; ++k) f[k] = f16_to_float(p[k].bits);
    return Lanes<float>::load(f);
  }
  MEMK_HD static void store(f16_t* p, f32x8 v) {
    float f[kLanes];
    Lanes<float>::store(f, v);
    for (int k = 0; k < kLanes; ++k) p[k].bits = float_to_f16(f[k]);
  }
};

// One chunk of 4 vectors into the per-lane online state (m, s, c): one rescale, then one exp
// per element. The chunk's sum is added to s with Kahan compensation (c, see LseState): a lane
// sums V / 8 terms, and plain float adds lose the small ones against a large s (at V = 2^28,
// log p was off by 0.1 and more).
MEMK_HD void add_chunk(f32x8& m, f32x8& s, f32x8& c, f32x8 v0, f32x8 v1, f32x8 v2, f32x8 v3) {
  const f32x8 m_new = vmax(m, vmax(vmax(v0, v1), vmax(v2, v3)));
  const f32x8 scale = exp_poly(m - m_new);  // exactly 1 while the max stays
  const f32x8 chunk = (exp_poly(v0 - m_new) + exp_poly(v1 - m_new)) + (exp_poly(v2 - m_new) + exp_poly(v3 - m_new));
  const f32x8 scaled = s * scale;
  const f32x8 y = chunk - c * scale;
  s = scaled + y;
  c = (s - scaled) - y;
  m = m_new;
}

// (max, sum of exp(x - max)) of one row in float, 8 lanes at a time; the last partial chunk
// is padded with -inf (exp(-inf - m) adds 0). The lanes' states merge at the end.
template <typename T>
MEMK_HD LseState<float> row_state_float(const T* __restrict__ x, int64_t vocab) {
  using L = Lanes<T>;
  f32x8 m = splat<f32x8>(-FLT_MAX), s = splat<f32x8>(0.0f), c = splat<f32x8>(0.0f);
  int64_t j = 0;
  for (; j + kChunk <= vocab; j += kChunk)
    add_chunk(m, s, c, L::load(x + j), L::load(x + j + kLanes), L::load(x + j + 2 * kLanes),
              L::load(x + j + 3 * kLanes));
  if (j < vocab) {
    float tail[kChunk];
    for (int k = 0; k < kChunk; ++k) tail[k] = j + k < vocab ? Elem<T>::load(x[j + k]) : -HUGE_VALF;
    using F = Lanes<float>;
    add_chunk(m, s, c, F::load(tail), F::load(tail + kLanes), F::load(tail + 2 * kLanes), F::load(tail + 3 * kLanes));
  }
  s = s - c;  // the compensation folded in (c is the negated low part lost so far)
  LseState<float> st{m[0], s[0]};
  for (int l = 1; l < kLanes; ++l) st.merge(LseState<float>{m[l], s[l]});
  return st;
}

// grad row = -g * exp((x - m) - log_sum), 8 lanes at a time (the target's entry is fixed by
// the caller).
template <typename T>
MEMK_HD void row_grad_float(const T* __restrict__ x, int64_t vocab, float neg_g, float m, float log_sum,
                            T* __restrict__ out) {
  using L = Lanes<T>;
  int64_t j = 0;
  for (; j + kLanes <= vocab; j += kLanes) L::store(out + j, exp_poly((L::load(x + j) - m) - log_sum) * neg_g);
  for (; j < vocab; ++j) out[j] = Elem<T>::store(neg_g * fast_exp((Elem<T>::load(x[j]) - m) - log_sum));
}

// float64 logits (gradcheck, tests): plain double arithmetic, one element at a time.
MEMK_HD LseState<double> row_state_double(const double* __restrict__ x, int64_t vocab) {
  LseState<double> st = LseState<double>::empty();
  for (int64_t j = 0; j < vocab; ++j) st.add(x[j]);
  return st;
}

template <typename T>
MEMK_HD LseState<typename Elem<T>::Acc> row_state(const T* __restrict__ x, int64_t vocab) {
  if constexpr (std::is_same<T, double>::value) {
    return row_state_double(x, vocab);
  } else {
    return row_state_float(x, vocab);
  }
}

template <typename T>
MEMK_HD void forward_rows(const RowsArgs& a, int64_t begin, int64_t end, typename Elem<T>::Acc* logp,
                          typename Elem<T>::Acc* row_max, typename Elem<T>::Acc* log_sum,
                          std::atomic<int64_t>* bad_count, std::atomic<int64_t>* bad_example) {
  using A = typename Elem<T>::Acc;
  const T* logits = static_cast<const T*>(a.logits);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t t = a.targets[i];
    const int kind = classify_target(t, a.vocab, a.ignore_index, a.has_ignore);
    if (kind == kTargetIgnored) {
      logp[i] = A(0);
      row_max[i] = A(0);
      log_sum[i] = A(0);
      continue;
    }
    const T* x = logits + i * a.row_stride;
    const LseState<A> st = row_state(x, a.vocab);
    const A ls = st.log_sum();
    row_max[i] = st.m;
    log_sum[i] = ls;
    if (kind == kTargetOutOfRange) {
      bad_count->fetch_add(1, std::memory_order_relaxed);
      bad_example->store(t, std::memory_order_relaxed);
      logp[i] = std::numeric_limits<A>::quiet_NaN();
    } else {
      logp[i] = logprob_of(Elem<T>::load(x[t]), st.m, ls);
    }
  }
}

template <typename T>
MEMK_HD void backward_rows(const RowsArgs& a, int64_t begin, int64_t end, const typename Elem<T>::Acc* grad_logp,
                           const typename Elem<T>::Acc* row_max, const typename Elem<T>::Acc* log_sum,
                           T* __restrict__ grad) {
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
    const A m = row_max[i], ls = log_sum[i];
    if constexpr (std::is_same<A, double>::value) {
      for (int64_t j = 0; j < vocab; ++j) out[j] = Elem<T>::store(-g * fast_exp((Elem<T>::load(x[j]) - m) - ls));
    } else {
      row_grad_float(x, vocab, -g, m, ls, out);
    }
    if (kind == kTargetValid) out[t] = Elem<T>::store(logprob_grad(g, Elem<T>::load(x[t]), m, ls, true));
  }
}

// One non-template driver per dtype, so that target_clones compiles the inlined row loops
// once per ISA.
#define MEMK_CPU_DRIVERS(NAME, T)                                                                            \
  MEMK_CPU_CLONES void forward_##NAME(const RowsArgs& a, int64_t begin, int64_t end, Elem<T>::Acc* logp,    \
                                      Elem<T>::Acc* row_max, Elem<T>::Acc* log_sum,                          \
                                      std::atomic<int64_t>* bad_count, std::atomic<int64_t>* bad_example) {  \
    forward_rows<T>(a, begin, end, logp, row_max, log_sum, bad_count, bad_example);                          \
  }                                                                                                          \
  MEMK_CPU_CLONES void backward_##NAME(const RowsArgs& a, int64_t begin, int64_t end,                       \
                                       const Elem<T>::Acc* grad_logp, const Elem<T>::Acc* row_max,           \
                                       const Elem<T>::Acc* log_sum, T* grad) {                               \
    backward_rows<T>(a, begin, end, grad_logp, row_max, log_sum, grad);                                      \
  }

MEMK_CPU_DRIVERS(f32, float)
MEMK_CPU_DRIVERS(bf16, bf16_t)
MEMK_CPU_DRIVERS(f16, f16_t)
#undef MEMK_CPU_DRIVERS

// float64 is for exactness, not speed: no clones.
void forward_f64(const RowsArgs& a, int64_t begin, int64_t end, double* logp, double* row_max, double* log_sum,
                 std::atomic<int64_t>* bad_count, std::atomic<int64_t>* bad_example) {
  forward_rows<double>(a, begin, end, logp, row_max, log_sum, bad_count, bad_example);
}
void backward_f64(const RowsArgs& a, int64_t begin, int64_t end, const double* grad_logp, const double* row_max,
                  const double* log_sum, double* grad) {
  backward_rows<double>(a, begin, end, grad_logp, row_max, log_sum, grad);
}

// Rows per task: at least ~16K elements, so that small vocabularies do not pay per-task overhead.
int64_t grain(int64_t vocab) { return vocab >= 16384 ? 1 : 16384 / vocab; }

}  // namespace

void logprob_forward_cpu(const RowsArgs& a, void* logp, RowStats stats, BadTargets* bad) {
  std::atomic<int64_t> bad_count{0}, bad_example{0};
  at::parallel_for(0, a.n_rows, grain(a.vocab), [&](int64_t begin, int64_t end) {
    float* lp = static_cast<float*>(logp);
    float* mx = static_cast<float*>(stats.row_max);
    float* ls = static_cast<float*>(stats.log_sum);
    switch (a.dtype) {
      case kFloat32: forward_f32(a, begin, end, lp, mx, ls, &bad_count, &bad_example); break;
      case kBFloat16: forward_bf16(a, begin, end, lp, mx, ls, &bad_count, &bad_example); break;
      case kFloat16: forward_f16(a, begin, end, lp, mx, ls, &bad_count, &bad_example); break;
      case kFloat64:
        forward_f64(a, begin, end, static_cast<double*>(logp), static_cast<double*>(stats.row_max),
                    static_cast<double*>(stats.log_sum), &bad_count, &bad_example);
        break;
    }
  });
  if (bad) {
    bad->count = bad_count.load();
    bad->example = bad_example.load();
  }
}

void logprob_backward_cpu(const RowsArgs& a, const void* grad_logp, ConstRowStats stats, void* grad_logits) {
  at::parallel_for(0, a.n_rows, grain(a.vocab), [&](int64_t begin, int64_t end) {
    const float* g = static_cast<const float*>(grad_logp);
    const float* mx = static_cast<const float*>(stats.row_max);
    const float* ls = static_cast<const float*>(stats.log_sum);
    switch (a.dtype) {
      case kFloat32: backward_f32(a, begin, end, g, mx, ls, static_cast<float*>(grad_logits)); break;
      case kBFloat16: backward_bf16(a, begin, end, g, mx, ls, static_cast<bf16_t*>(grad_logits)); break;
      case kFloat16: backward_f16(a, begin, end, g, mx, ls, static_cast<f16_t*>(grad_logits)); break;
      case kFloat64:
        backward_f64(a, begin, end, static_cast<const double*>(grad_logp), static_cast<const double*>(stats.row_max),
                     static_cast<const double*>(stats.log_sum), static_cast<double*>(grad_logits));
        break;
    }
  });
}

}  // namespace memk
