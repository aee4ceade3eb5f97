// Per-row math of the fused log-prob kernels, shared by the CUDA kernels (logprob_cuda.cu)
// and the C++ CPU kernel (logprob_cpu.cpp). Includes no torch header, so nvcc compiles it
// anywhere and the CPU kernel's row loops can be tested without torch.
//
// One row is V logits x_j and a target t. The kernels compute, in float32 (float64 for
// float64 logits) whatever the storage dtype:
//   m, s        = max_j x_j, sum_j exp(x_j - m)   one read of the row: online (LseState) on the
//                                                 GPU, per L1-sized block on the CPU (logprob_cpu_rows.h)
//   log_sum     = log s                           in [0, log V]
//   logp        = (x_t - m) - log_sum             log p(target)
//   d logp/dx_j = [j == t] - exp((x_j - m) - log_sum)   the backward, from the saved (m, log_sum)
// The log-sum-exp m + log_sum is never formed as one number: that sum rounds to the spacing
// of floats near m (float32: 1e-3 at |m| = 1e4, 8 at 1e8), and near FLT_MAX loses log_sum
// entirely. x - m is exact wherever x and m are within a factor 2 of each other, so
// keeping the two apart makes log p as accurate at any offset of the logits as at zero
// (log_softmax(x + c) = log_softmax(x)).
// Non-finite inputs: NaN or +inf anywhere in a row makes log_sum (and so logp and the row's
// gradient) NaN; -inf is an ordinary logit of probability zero, as in torch.log_softmax.
#pragma once

#include <stdint.h>
#include <string.h>

#include <cfloat>
#include <cmath>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define MEMK_HD __host__ __device__ __forceinline__
#else
#define MEMK_HD inline __attribute__((always_inline))
#endif

// Loop unrolling hint for the device pass (host compilers would warn about the pragma).
#if defined(__CUDA_ARCH__)
#define MEMK_UNROLL _Pragma("unroll")
#else
#define MEMK_UNROLL
#endif

namespace memk {

// Storage dtype of the logits (and of their gradient), as the launchers receive it.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// 16-bit storage types as raw bits: layout-compatible with at::BFloat16 / at::Half and
// __nv_bfloat16 / __half, and nameable without either library.
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

// ---------------------------------------------------------------------------------------
// Bit casts and dtype conversions
// ---------------------------------------------------------------------------------------
MEMK_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

MEMK_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// Branch-free (vectorizable) conversions for the CPU; the GPU uses its conversion units.
MEMK_HD float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

MEMK_HD uint16_t float_to_bf16(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  const uint32_t quiet_nan = (u >> 16) | 0x0040u;                    // keep NaN a NaN
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
#endif
}

MEMK_HD float f16_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  const uint32_t normal = ((exp + 112u) << 23) | (mant << 13);             // rebias 15 -> 127
  const uint32_t inf_nan = 0x7f800000u | (mant << 13);
  const uint32_t subnormal = float_to_bits(static_cast<float>(mant) * 5.9604644775390625e-8f);  // mant * 2^-24
  const uint32_t mag = exp == 0 ? subnormal : (exp == 31 ? inf_nan : normal);
  return bits_to_float(sign | mag);
#endif
}

MEMK_HD uint16_t float_to_f16(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // Below 2^-14 the half is subnormal: adding 0.5 puts its last bit (2^-24) at the float's
  // last bit, so the float adder rounds to nearest even for us.
  const uint32_t subnormal = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;  // rebias 127 -> 15, round
  const uint32_t mag = a > 0x7f800000u   ? 0x7e00u                       // NaN
                       : a >= 0x477ff000u ? 0x7c00u                      // rounds past 65504: inf
                       : a < 0x38800000u  ? subnormal
                                          : normal;
  return static_cast<uint16_t>(sign | mag);
#endif
}

// Storage <-> arithmetic type. Acc<T> is float for every 16- and 32-bit dtype, double for double.
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using Acc = float;
  MEMK_HD static float load(float v) { return v; }
  MEMK_HD static float store(float v) { return v; }
};
template <>
struct Elem<double> {
  using Acc = double;
  MEMK_HD static double load(double v) { return v; }
  MEMK_HD static double store(double v) { return v; }
};
template <>
struct Elem<bf16_t> {
  using Acc = float;
  MEMK_HD static float load(bf16_t v) { return bf16_to_float(v.bits); }
  MEMK_HD static bf16_t store(float v) { return bf16_t{float_to_bf16(v)}; }
};
template <>
struct Elem<f16_t> {
  using Acc = float;
  MEMK_HD static float load(f16_t v) { return f16_to_float(v.bits); }
  MEMK_HD static f16_t store(float v) { return f16_t{float_to_f16(v)}; }
};

// ---------------------------------------------------------------------------------------
// exp, max and the lowest finite value, per arithmetic type
// ---------------------------------------------------------------------------------------
// exp(x) for x <= 88 (the kernels pass x <= 0: a logit minus a running max, or less log_sum too).
// On the GPU the hardware exp2 unit. On the CPU a branch-free polynomial: x = n ln2 + r,
// |r| <= ln2/2, exp(r) by its Taylor series to r^7 (truncation < 1e-8 relative), times 2^n
// built in the exponent field. exp(-inf) = 0 and exp(NaN) = NaN. The constants below are the
// only copy: exp_poly (scalar: the CPU kernel's target entries) and logprob_cpu.cpp's vectors
// of 4, 8 and 16 floats take the same steps with them.
constexpr float kLog2e = 1.4426950408889634f;    // 1 / ln2
constexpr float kRoundToInt = 12582912.0f;       // 1.5 * 2^23: (y + it) - it is y rounded to an integer
constexpr float kLn2Hi = 0.693145751953125f;     // ln2 = kLn2Hi + kLn2Lo; kLn2Hi's few bits keep n * kLn2Hi exact
constexpr float kLn2Lo = 1.428606765330187e-6f;
constexpr float kExpZeroBelow = -87.5f;          // exp(x) is 0 below: 2^n would leave the normal floats
// exp(r) = sum_k r^k / k!, k = 7 down to 0: the coefficients in the order Horner's rule takes them.
// Every path writes the seven steps out: as a loop, GCC allocates registers differently (same arithmetic).
constexpr int kExpTerms = 8;
constexpr float kExpTaylor[kExpTerms] = {1.0f / 5040.0f, 1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f,
                                         1.0f / 6.0f,    0.5f,          1.0f,          1.0f};

template <typename F>
MEMK_HD F splat(float c) {
  return c;
}
MEMK_HD float pow2i(float n) {  // 2^n for integral n in [-126, 127]
  return bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

template <typename F>
MEMK_HD F exp_poly(F x) {
  const F lo = splat<F>(kExpZeroBelow), hi = splat<F>(88.0f), zero = splat<F>(0.0f);
  const F xc = x < lo ? lo : (x > hi ? hi : x);  // NaN passes through
  const F xn = xc == xc ? xc : zero;              // no NaN into the float -> int conversion
  const F n = (xn * kLog2e + kRoundToInt) - kRoundToInt;  // round(x / ln2)
  const F r = (xc - n * kLn2Hi) - n * kLn2Lo;             // ln2 in two parts
  F p = splat<F>(kExpTaylor[0]);
  p = p * r + kExpTaylor[1];
  p = p * r + kExpTaylor[2];
  p = p * r + kExpTaylor[3];
  p = p * r + kExpTaylor[4];
  p = p * r + kExpTaylor[5];
  p = p * r + kExpTaylor[6];
  p = p * r + kExpTaylor[7];
  const F e = p * pow2i(n);
  return x < lo ? zero : (x > hi ? splat<F>(HUGE_VALF) : e);
}

MEMK_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x * kLog2e);
#else
  return exp_poly(x);
#endif
}
MEMK_HD double fast_exp(double x) { return exp(x); }

MEMK_HD float acc_log(float x) { return logf(x); }
MEMK_HD double acc_log(double x) { return log(x); }

// max that ignores a NaN in b (a NaN logit poisons the sum of exps instead, see LseState).
template <typename A>
MEMK_HD A max_of(A a, A b) {
  return b > a ? b : a;
}

template <typename A>
MEMK_HD A lowest() {
  return -FLT_MAX;
}
template <>
MEMK_HD double lowest<double>() {
  return -DBL_MAX;
}

// ---------------------------------------------------------------------------------------
// Online log-sum-exp
// ---------------------------------------------------------------------------------------
// State (m, s) stands for log sum exp = m + log(s) over the elements seen (kept apart; see the
// top of this file). m starts at the
// lowest finite value, not -inf, so that exp(m_old - m_new) is never exp(-inf - -inf) = NaN
// for rows or lanes that have seen only -inf. NaN and +inf propagate: a NaN x makes
// exp(x - m) NaN; +inf makes m = inf and exp(inf - inf) NaN.
// s is a sum of up to V terms (V / threads per row on the GPU): added one by one in float,
// terms far smaller than s are lost (an error growing with V: 0.1 in log p at V = 2^28). So
// the adds are Kahan-compensated: c holds the negated low part lost so far, and the sum is
// s - c (sum()), to a few float roundings whatever V.
template <typename A>
struct LseState {
  A m;
  A s;
  A c = A(0);

  MEMK_HD static LseState empty() { return LseState{lowest<A>(), A(0)}; }

  MEMK_HD A sum() const { return s - c; }

  // s <- s * scale + term, compensated (scale is exactly 1 while the max stays).
  MEMK_HD void rescale_add(A scale, A term) {
    const A scaled = s * scale;
    const A y = term - c * scale;
    s = scaled + y;
    c = (s - scaled) - y;
  }

  // Add one element (two exps; the vector paths use add_block).
  MEMK_HD void add(A x) {
    const A m_new = max_of(m, x);
    rescale_add(fast_exp(m - m_new), fast_exp(x - m_new));
    m = m_new;
  }

  // Add n elements with one rescale: the block max first, then one exp per element.
  template <int N>
  MEMK_HD void add_block(const A (&x)[N]) {
    A bm = x[0];
MEMK_UNROLL
    for (int k = 1; k < N; ++k) bm = max_of(bm, x[k]);
    const A m_new = max_of(m, bm);
    A block = A(0);
MEMK_UNROLL
    for (int k = 0; k < N; ++k) block += fast_exp(x[k] - m_new);
    rescale_add(fast_exp(m - m_new), block);
    m = m_new;
  }

  MEMK_HD void merge(const LseState& o) {
    const A m_new = max_of(m, o.m);
    s = sum() * fast_exp(m - m_new) + o.sum() * fast_exp(o.m - m_new);
    c = A(0);
    m = m_new;
  }

  // log s: the log-sum-exp less m. s >= 1 once a finite logit is seen (the max adds exp(0)),
  // so log_sum >= 0; -inf for a row of all -inf (then logp = (-inf - m) - -inf = NaN, as torch).
  MEMK_HD A log_sum() const { return acc_log(sum()); }
};

// ---------------------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------------------
enum TargetKind : int { kTargetValid = 0, kTargetIgnored = 1, kTargetOutOfRange = 2 };

// A target equal to ignore_index is ignored even when it lies in [0, V), as in
// torch.nn.functional.cross_entropy; other targets outside [0, V) are errors.
MEMK_HD int classify_target(int64_t t, int64_t vocab, int64_t ignore_index, bool has_ignore) {
  if (has_ignore && t == ignore_index) return kTargetIgnored;
  return (t < 0 || t >= vocab) ? kTargetOutOfRange : kTargetValid;
}

// log p(target) from the logit x_t and the row's (m, log_sum).
template <typename A>
MEMK_HD A logprob_of(A x_t, A m, A log_sum) {
  return (x_t - m) - log_sum;
}

// d(g * logp)/dx_j = g * ([j == t] - p_j), p_j = exp((x_j - m) - log_sum).
template <typename A>
MEMK_HD A logprob_grad(A g, A x, A m, A log_sum, bool is_target) {
  const A p = fast_exp((x - m) - log_sum);
  return is_target ? g * (A(1) - p) : -g * p;
}

// ---------------------------------------------------------------------------------------
// Launcher arguments (raw pointers; shared by the CPU and CUDA launchers)
// ---------------------------------------------------------------------------------------
// Logits are n_rows rows of `vocab` elements, row i at logits + i * row_stride (elements).
// Targets: n_rows int64. Per-row values (logp, row_max, log_sum, grad_logp) are float for
// every dtype but float64, whose are double. grad_logits is contiguous (n_rows, vocab) of the
// logits' dtype.
struct RowsArgs {
  const void* logits;
  DType dtype;
  int64_t n_rows;
  int64_t vocab;
  int64_t row_stride;
  const int64_t* targets;
  int64_t ignore_index;
  bool has_ignore;
};

// What the forward keeps per row for the backward: the row's max m and log_sum = log sum_j
// exp(x_j - m), two arrays of n_rows (float, or double for float64 logits). Kept apart, never
// added: see the top of this file.
struct RowStats {
  void* row_max;
  void* log_sum;
};
struct ConstRowStats {
  const void* row_max;
  const void* log_sum;
};

}  // namespace memk
