// C++ CPU kernel of the fused log-prob ops (see logprob_math.h for the math).
//
// The row loops (logprob_cpu_rows.h) are written once over a vector of floats and compiled
// three times: 16 lanes with AVX-512 intrinsics (avx512f/bw/dq/vl; exp's 2^n by vscalefps, float16
// by vcvtph2ps), 8 lanes with AVX2 + FMA (+ F16C for float16), and 4 lanes for the baseline x86-64
// (SSE2) or any other architecture (GCC/Clang vector extensions). The best one this CPU runs is
// chosen on first use by its feature bits (never by CPU model), and logprob_cpu_isa() names it;
// logprob_cpu_set_isa() forces a lesser one (tests run every path the machine has). The paths
// other than the baseline need GCC's `#pragma GCC target` on x86-64; other compilers build the
// baseline only.
//
// Rows are split among at::parallel_for's threads in tasks of ~64K elements handed out one at a
// time (an atomic counter), so a thread whose core is shared with other work takes fewer tasks
// instead of holding the others up at the end. Those threads exist only where this file is
// compiled with OpenMP (-fopenmp), as torch is: at::parallel_for is header code, and without
// OpenMP it runs everything on the calling thread (logprob_cpu_threads() says which). A float32 gradient larger than the caches is
// written with non-temporal stores (AVX2, AVX-512), which skip reading each line before writing it.
#include "logprob_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__)
// Vectors pass only between always-inlined functions here, so their calling convention (which
// GCC warns changes with -mavx) never matters.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 8
#define MEMK_X86_PATHS 1
#include <immintrin.h>
#else
#define MEMK_X86_PATHS 0
#endif

namespace memk {
namespace {

// Out-of-range targets seen by the forward's threads.
struct BadTargetsAcc {
  std::atomic<int64_t> count{0}, example{0};
  void note(int64_t t) {
    count.fetch_add(1, std::memory_order_relaxed);
    example.store(t, std::memory_order_relaxed);
  }
};

// ---------------------------------------------------------------------------------------
// N lanes, GCC/Clang vector extensions: 4 for the baseline (one SSE2 or NEON register), 8 for
// AVX2 (isa_avx2::Ops below). No wider than the target's registers: GCC turns compares on wider
// vectors into scalar code.
// ---------------------------------------------------------------------------------------
template <int N>
struct VecTypes;
template <>
struct VecTypes<4> {
  typedef float F __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
  typedef uint32_t U __attribute__((vector_size(16)));
  typedef uint16_t H __attribute__((vector_size(8)));
};
template <>
struct VecTypes<8> {
  typedef float F __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  typedef uint32_t U __attribute__((vector_size(32)));
  typedef uint16_t H __attribute__((vector_size(16)));
};

template <int N>
struct OpsVec {
  static constexpr int W = N;
  static constexpr int kUnroll = 4;      // accumulators per pass
  static constexpr bool kStream = false;  // no non-temporal stores (row_grad's `stream`): plain ones
  using F = typename VecTypes<N>::F;  // floats
  using I = typename VecTypes<N>::I;  // lane masks (-1 or 0), as vector compares give them
  using U = typename VecTypes<N>::U;  // bits
  using H = typename VecTypes<N>::H;  // 16-bit storage

  MEMK_HD static void stream(float* p, F v) { store(p, v); }
  MEMK_HD static void fence() {}

  MEMK_HD static F splat(float c) { return F{} + c; }
  MEMK_HD static U usplat(uint32_t c) { return U{} + c; }

  MEMK_HD static F load(const float* p) {
    F v;
    memcpy(&v, p, sizeof v);
    return v;
  }
  MEMK_HD static F load(const bf16_t* p) {
    H h;
    memcpy(&h, p, sizeof h);
    return reinterpret_cast<F>(__builtin_convertvector(h, U) << 16);
  }
  MEMK_HD static F load(const f16_t* p) {  // as f16_to_float, lane by lane
    H h;
    memcpy(&h, p, sizeof h);
    const U u = __builtin_convertvector(h, U);
    const U sign = (u & 0x8000u) << 16;
    const U e = (u >> 10) & 0x1fu;
    const U mant = u & 0x3ffu;
    const U normal = ((e + 112u) << 23) | (mant << 13);  // rebias 15 -> 127
    const U inf_nan = (mant << 13) | 0x7f800000u;
    const U subnormal =
        reinterpret_cast<U>(__builtin_convertvector(reinterpret_cast<I>(mant), F) * 5.9604644775390625e-8f);
    const U mag = select(e == 0u, subnormal, select(e == 31u, inf_nan, normal));
    return reinterpret_cast<F>(sign | mag);
  }

  MEMK_HD static void store(float* p, F v) { memcpy(p, &v, sizeof v); }
  MEMK_HD static void store(bf16_t* p, F v) {  // as float_to_bf16: nearest even, NaN stays NaN
    const U u = reinterpret_cast<U>(v);
    const U rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const U quiet_nan = (u >> 16) | 0x0040u;
    const H h = __builtin_convertvector(select((u & 0x7fffffffu) > 0x7f800000u, quiet_nan, rounded), H);
    memcpy(p, &h, sizeof h);
  }
  MEMK_HD static void store(f16_t* p, F v) {  // as float_to_f16, lane by lane
    const U u = reinterpret_cast<U>(v);
    const U sign = (u >> 16) & 0x8000u;
    const U a = u & 0x7fffffffu;
    const U subnormal = reinterpret_cast<U>(reinterpret_cast<F>(a) + 0.5f) - 0x3f000000u;
    const U normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
    const U mag = select(a > 0x7f800000u, usplat(0x7e00u),          // NaN
                         select(a >= 0x477ff000u, usplat(0x7c00u),  // rounds past 65504: inf
                                select(a < 0x38800000u, subnormal, normal)));
    const H h = __builtin_convertvector(sign | mag, H);
    memcpy(p, &h, sizeof h);
  }

  // Lane-wise mask ? a : b, with bit operations (SSE2 has no blend).
  MEMK_HD static F select(I mask, F a, F b) {
    return reinterpret_cast<F>((mask & reinterpret_cast<I>(a)) | (~mask & reinterpret_cast<I>(b)));
  }
  MEMK_HD static U select(I mask, U a, U b) {
    const U m = reinterpret_cast<U>(mask);
    return (m & a) | (~m & b);
  }

  MEMK_HD static F max(F a, F b) { return select(b > a, b, a); }  // as max_of: a NaN b is dropped

  // exp(x) as logprob_math.h's exp_poly, with its constants: x = n ln2 + r, exp(r) by its Taylor
  // series to r^7, 2^n built in the exponent field from the integer left in the low bits of
  // x / ln2 + 1.5 * 2^23. Exactly 0 below -87.5 (and at -inf), +inf above 88.4, NaN for NaN.
  static constexpr float kExpClampHi = 89.0f;  // n up to 128, whose exponent field is inf's
  MEMK_HD static F exp(F x) {
    const F lo = splat(kExpZeroBelow), hi = splat(kExpClampHi);
    const I below = x < lo;
    const F xc = select(below, lo, select(x > hi, hi, x));  // NaN passes
    const F t = xc * kLog2e + kRoundToInt;
    const F n = t - kRoundToInt;                   // round(x / ln2), in [-126, 128]
    const F r = (xc - n * kLn2Hi) - n * kLn2Lo;  // ln2 in two parts
    F p = splat(kExpTaylor[0]);
    p = p * r + kExpTaylor[1];
    p = p * r + kExpTaylor[2];
    p = p * r + kExpTaylor[3];
    p = p * r + kExpTaylor[4];
    p = p * r + kExpTaylor[5];
    p = p * r + kExpTaylor[6];
    p = p * r + kExpTaylor[7];
    // t's bits are those of 1.5 * 2^23 plus n; shifted by 23 only n + 127 is left: 2^n (inf at 128).
    const F pow2n = reinterpret_cast<F>((reinterpret_cast<U>(t) + 127u) << 23);
    return reinterpret_cast<F>(~below & reinterpret_cast<I>(p * pow2n));
  }

  MEMK_HD static float reduce_max(const F& v) {
    float m = v[0];
    for (int k = 1; k < W; ++k) m = max_of(m, v[k]);
    return m;
  }
  MEMK_HD static double sum_double(const F& v) {
    double s = 0.0;
    for (int k = 0; k < W; ++k) s += static_cast<double>(v[k]);
    return s;
  }
};

// ---------------------------------------------------------------------------------------
// The row loops, once per instruction set
// ---------------------------------------------------------------------------------------
namespace isa_baseline {
using Ops = OpsVec<4>;
#include "logprob_cpu_rows.h"
}  // namespace isa_baseline

#if MEMK_X86_PATHS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
namespace isa_avx2 {
// OpsVec<8> in AVX2 registers, with F16C's conversions for float16, and max and exp by intrinsics
// (GCC does not turn compare-and-select into vmaxps/vminps, whose NaN rule it cannot assume).
struct Ops : OpsVec<8> {
  using OpsVec<8>::load;
  using OpsVec<8>::store;
  static constexpr int kUnroll = 2;  // 16 registers: four accumulators and exp's constants spill
  MEMK_HD static __m256 m(F v) { return reinterpret_cast<__m256>(v); }
  static constexpr bool kStream = true;
  MEMK_HD static void stream(float* p, F v) { _mm256_stream_ps(p, m(v)); }  // p 32-byte aligned
  MEMK_HD static void fence() { _mm_sfence(); }
  // vmaxps(b, a) = b > a ? b : a, and a where either is NaN: max_of.
  MEMK_HD static F max(F a, F b) { return reinterpret_cast<F>(_mm256_max_ps(m(b), m(a))); }
  MEMK_HD static F exp(F x) {  // OpsVec::exp's steps and constants, fused multiply-adds
    const __m256 lo = _mm256_set1_ps(kExpZeroBelow);
    const __m256 xc = _mm256_min_ps(_mm256_set1_ps(kExpClampHi), _mm256_max_ps(lo, m(x)));  // NaN passes
    const __m256 t = _mm256_fmadd_ps(xc, _mm256_set1_ps(kLog2e), _mm256_set1_ps(kRoundToInt));
    const __m256 n = _mm256_sub_ps(t, _mm256_set1_ps(kRoundToInt));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
    __m256 p = _mm256_set1_ps(kExpTaylor[0]);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpTaylor[1]));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpTaylor[2]));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpTaylor[3]));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpTaylor[4]));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpTaylor[5]));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpTaylor[6]));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpTaylor[7]));
    const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127)), 23);
    const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
    return reinterpret_cast<F>(_mm256_andnot_ps(_mm256_cmp_ps(m(x), lo, _CMP_LT_OQ), e));  // 0 below lo
  }
  MEMK_HD static F load(const f16_t* p) {
    return reinterpret_cast<F>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  MEMK_HD static void store(f16_t* p, F v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};
#include "logprob_cpu_rows.h"
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
namespace isa_avx512 {
// 16 lanes in AVX-512 registers.
struct Ops {
  static constexpr int W = 16;
  static constexpr int kUnroll = 4;
  static constexpr bool kStream = true;
  using F = __m512;

  MEMK_HD static void stream(float* p, F v) { _mm512_stream_ps(p, v); }  // p 64-byte aligned
  MEMK_HD static void fence() { _mm_sfence(); }

  MEMK_HD static F splat(float c) { return _mm512_set1_ps(c); }
  MEMK_HD static F load(const float* p) { return _mm512_loadu_ps(p); }
  MEMK_HD static F load(const bf16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  MEMK_HD static F load(const f16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

  MEMK_HD static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  MEMK_HD static void store(bf16_t* p, F v) {  // as float_to_bf16: nearest even, NaN stays NaN
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __m512i quiet_nan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x0040));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    const __m512i h = _mm512_mask_blend_epi32(nan, rounded, quiet_nan);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(h));
  }
  MEMK_HD static void store(f16_t* p, F v) {  // round to nearest even, as float_to_f16
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }

  // vmaxps(b, a) = b > a ? b : a, and a where either is NaN: max_of.
  MEMK_HD static F max(F a, F b) { return _mm512_max_ps(b, a); }

  // exp(x) as OpsVec::exp, with its constants, and 2^n applied by vscalefps (which rounds results
  // below 2^-149 to 0, so no select is needed: exactly 0 below -106 and at -inf, +inf above 88.7,
  // NaN for NaN).
  MEMK_HD static F exp(F x) {
    const F xc = _mm512_min_ps(splat(100.0f), _mm512_max_ps(splat(-106.0f), x));  // NaN passes (second operand)
    const F t = _mm512_fmadd_ps(xc, splat(kLog2e), splat(kRoundToInt));
    const F n = _mm512_sub_ps(t, splat(kRoundToInt));  // round(x / ln2)
    F r = _mm512_fnmadd_ps(n, splat(kLn2Hi), xc);
    r = _mm512_fnmadd_ps(n, splat(kLn2Lo), r);
    F p = splat(kExpTaylor[0]);
    p = _mm512_fmadd_ps(p, r, splat(kExpTaylor[1]));
    p = _mm512_fmadd_ps(p, r, splat(kExpTaylor[2]));
    p = _mm512_fmadd_ps(p, r, splat(kExpTaylor[3]));
    p = _mm512_fmadd_ps(p, r, splat(kExpTaylor[4]));
    p = _mm512_fmadd_ps(p, r, splat(kExpTaylor[5]));
    p = _mm512_fmadd_ps(p, r, splat(kExpTaylor[6]));
    p = _mm512_fmadd_ps(p, r, splat(kExpTaylor[7]));
    return _mm512_scalef_ps(p, n);
  }

  MEMK_HD static float reduce_max(F v) { return _mm512_reduce_max_ps(v); }  // no NaN reaches here
  MEMK_HD static double sum_double(F v) {
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
    return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
  }
};
#include "logprob_cpu_rows.h"
}  // namespace isa_avx512
#pragma GCC pop_options
#endif  // MEMK_X86_PATHS

// ---------------------------------------------------------------------------------------
// float64 logits (gradcheck, tests): plain double arithmetic, one element at a time
// ---------------------------------------------------------------------------------------
void forward_f64(const RowsArgs& a, int64_t begin, int64_t end, double* logp, double* row_max, double* log_sum,
                 BadTargetsAcc* bad) {
  const double* logits = static_cast<const double*>(a.logits);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t t = a.targets[i];
    const int kind = classify_target(t, a.vocab, a.ignore_index, a.has_ignore);
    if (kind == kTargetIgnored) {
      logp[i] = row_max[i] = log_sum[i] = 0.0;
      continue;
    }
    const double* x = logits + i * a.row_stride;
    LseState<double> st = LseState<double>::empty();
    for (int64_t j = 0; j < a.vocab; ++j) st.add(x[j]);
    const double ls = st.log_sum();
    row_max[i] = st.m;
    log_sum[i] = ls;
    if (kind == kTargetOutOfRange) {
      bad->note(t);
      logp[i] = std::numeric_limits<double>::quiet_NaN();
    } else {
      logp[i] = logprob_of(x[t], st.m, ls);
    }
  }
}

void backward_f64(const RowsArgs& a, int64_t begin, int64_t end, const double* grad_logp, const double* row_max,
                  const double* log_sum, double* grad) {
  const double* logits = static_cast<const double*>(a.logits);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t t = a.targets[i];
    const int kind = classify_target(t, a.vocab, a.ignore_index, a.has_ignore);
    double* out = grad + i * a.vocab;
    if (kind == kTargetIgnored) {
      for (int64_t j = 0; j < a.vocab; ++j) out[j] = 0.0;
      continue;
    }
    const double* x = logits + i * a.row_stride;
    const double g = kind == kTargetValid ? grad_logp[i] : std::numeric_limits<double>::quiet_NaN();
    const double m = row_max[i], ls = log_sum[i];
    for (int64_t j = 0; j < a.vocab; ++j) out[j] = -g * std::exp((x[j] - m) - ls);
    if (kind == kTargetValid) out[t] = logprob_grad(g, x[t], m, ls, true);
  }
}

// ---------------------------------------------------------------------------------------
// Choosing the instruction set
// ---------------------------------------------------------------------------------------
enum Isa : int { kIsaBaseline = 0, kIsaAvx2 = 1, kIsaAvx512 = 2, kIsaCount = 3 };
const char* const kIsaNames[kIsaCount] = {"baseline", "avx2", "avx512"};

struct IsaPath {
  void (*forward)(const RowsArgs&, int64_t, int64_t, float*, float*, float*, BadTargetsAcc*);
  void (*backward)(const RowsArgs&, int64_t, int64_t, const float*, const float*, const float*, void*, bool);
  float (*probe_read)(const float*, int64_t);
  void (*probe_write)(float*, int64_t, float, bool);
  double (*probe_exp)(const float*, int64_t, int64_t);
};

#define MEMK_ISA_PATH(NS) \
  IsaPath { NS::forward, NS::backward, NS::probe_read, NS::probe_write, NS::probe_exp }
#if MEMK_X86_PATHS
const IsaPath kPaths[kIsaCount] = {MEMK_ISA_PATH(isa_baseline), MEMK_ISA_PATH(isa_avx2), MEMK_ISA_PATH(isa_avx512)};
#else
const IsaPath kPaths[kIsaCount] = {MEMK_ISA_PATH(isa_baseline), MEMK_ISA_PATH(isa_baseline),
                                   MEMK_ISA_PATH(isa_baseline)};
#endif
#undef MEMK_ISA_PATH

// The best path this CPU (and its OS: the feature bits include the OS's saving of the registers) runs.
int best_isa() {
#if MEMK_X86_PATHS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return kIsaAvx512;
  if (avx2) return kIsaAvx2;  // every AVX2 CPU has F16C
#endif
  return kIsaBaseline;
}

std::atomic<int>& current_isa() {
  static std::atomic<int> isa{best_isa()};
  return isa;
}

const IsaPath& path() { return kPaths[current_isa().load(std::memory_order_relaxed)]; }

// ---------------------------------------------------------------------------------------
// Threads
// ---------------------------------------------------------------------------------------
// Rows per task: about 64K elements, at least one row.
int64_t rows_per_task(int64_t vocab) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(vocab, 1)); }

// fn(begin, end) over [0, n) in tasks of `chunk`, handed to at::parallel_for's threads one at a time.
template <typename Fn>
void parallel_tasks(int64_t n, int64_t chunk, const Fn& fn) {
  const int64_t tasks = (n + chunk - 1) / chunk;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  if (threads <= 1 || at::in_parallel_region()) {
    fn(int64_t{0}, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t k = next.fetch_add(1, std::memory_order_relaxed); k < tasks;
         k = next.fetch_add(1, std::memory_order_relaxed))
      fn(k * chunk, std::min(n, (k + 1) * chunk));
  });
}

}  // namespace

void logprob_forward_cpu(const RowsArgs& a, void* logp, RowStats stats, BadTargets* bad) {
  BadTargetsAcc acc;
  const IsaPath& p = path();
  parallel_tasks(a.n_rows, rows_per_task(a.vocab), [&](int64_t begin, int64_t end) {
    if (a.dtype == kFloat64) {
      forward_f64(a, begin, end, static_cast<double*>(logp), static_cast<double*>(stats.row_max),
                  static_cast<double*>(stats.log_sum), &acc);
    } else {
      p.forward(a, begin, end, static_cast<float*>(logp), static_cast<float*>(stats.row_max),
                static_cast<float*>(stats.log_sum), &acc);
    }
  });
  if (bad) {
    bad->count = acc.count.load();
    bad->example = acc.example.load();
  }
}

// A float32 gradient at least this large is written with non-temporal stores: it does not fit
// in the caches, and ordinary stores would read each line of it from memory before writing it.
constexpr int64_t kStreamBytes = int64_t{64} << 20;

void logprob_backward_cpu(const RowsArgs& a, const void* grad_logp, ConstRowStats stats, void* grad_logits) {
  const IsaPath& p = path();
  const bool stream = a.dtype == kFloat32 && a.n_rows * a.vocab * int64_t{4} >= kStreamBytes;
  parallel_tasks(a.n_rows, rows_per_task(a.vocab), [&](int64_t begin, int64_t end) {
    if (a.dtype == kFloat64) {
      backward_f64(a, begin, end, static_cast<const double*>(grad_logp), static_cast<const double*>(stats.row_max),
                   static_cast<const double*>(stats.log_sum), static_cast<double*>(grad_logits));
    } else {
      p.backward(a, begin, end, static_cast<const float*>(grad_logp), static_cast<const float*>(stats.row_max),
                 static_cast<const float*>(stats.log_sum), grad_logits, stream);
    }
  });
}

const char* logprob_cpu_isa() { return kIsaNames[current_isa().load()]; }

int logprob_cpu_threads() {
  std::atomic<int> calls{0};  // one call per thread where OpenMP splits the range, else one in all
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { calls.fetch_add(1); });
  return calls.load();
}

const char* logprob_cpu_best_isa() { return kIsaNames[best_isa()]; }

const char* logprob_cpu_set_isa(const char* name) {
  const std::string want = name ? name : "";
  const int best = best_isa();
  if (want.empty() || want == "best") {
    current_isa().store(best);
    return kIsaNames[best];
  }
  for (int k = 0; k < kIsaCount; ++k) {
    if (want != kIsaNames[k]) continue;
    if (k > best) return nullptr;  // this CPU cannot run it
    current_isa().store(k);
    return kIsaNames[k];
  }
  return nullptr;
}

double logprob_cpu_probe_read(const float* x, int64_t n) {
  const IsaPath& p = path();
  std::atomic<int64_t> bits{0};  // the sum is returned only so that the reads cannot be left out
  parallel_tasks(n, int64_t{1} << 16, [&](int64_t begin, int64_t end) {
    const float s = p.probe_read(x + begin, end - begin);
    int32_t b;
    memcpy(&b, &s, sizeof b);
    bits.fetch_xor(b, std::memory_order_relaxed);
  });
  return static_cast<double>(bits.load());
}

void logprob_cpu_probe_write(float* out, int64_t n, float value) {
  const IsaPath& p = path();
  const bool stream = n * int64_t{4} >= kStreamBytes;  // as the backward's
  parallel_tasks(n, int64_t{1} << 16,
                 [&](int64_t begin, int64_t end) { p.probe_write(out + begin, end - begin, value, stream); });
}

double logprob_cpu_probe_exp(const float* x, int64_t n, int64_t repeats) {
  const IsaPath& p = path();
  std::atomic<int64_t> bits{0};
  parallel_tasks(repeats, 64, [&](int64_t begin, int64_t end) {
    const double s = p.probe_exp(x, n, end - begin);
    int64_t b;
    memcpy(&b, &s, sizeof b);
    bits.fetch_xor(b, std::memory_order_relaxed);
  });
  return static_cast<double>(bits.load());
}

}  // namespace memk
