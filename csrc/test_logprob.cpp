// C++ tests of the log-prob kernels through their torch-free launchers (CMake target
// test_logprob): the CPU kernel against plain double-precision math, the dtype conversions
// and exp of logprob_math.h against independent computations, and, where built with CUDA
// and a GPU is present, the CUDA kernels against the CPU kernel on the same inputs.
// The CPU kernel's checks run once per instruction-set path this CPU has (baseline, AVX2,
// AVX-512). Ends with the line "N passed, N failed"; exits non-zero on any failure.
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <ATen/Parallel.h>

#include "logprob_cpu.h"
#ifdef MEMK_WITH_CUDA
#include <cuda_runtime.h>

#include "logprob_cuda.h"
#endif

using namespace memk;

namespace {

int n_passed = 0, n_failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++n_passed;
  } else {
    ++n_failed;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

bool close(double got, double want, double atol, double rtol) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

template <typename T>
double value(T v) {
  return static_cast<double>(Elem<T>::load(v));
}

template <typename T>
struct Traits;
template <>
struct Traits<float> {
  static constexpr DType dtype = kFloat32;
  static constexpr const char* name = "float32";
  static constexpr double grad_eps = 2e-5;
};
template <>
struct Traits<double> {
  static constexpr DType dtype = kFloat64;
  static constexpr const char* name = "float64";
  static constexpr double grad_eps = 1e-12;
};
template <>
struct Traits<bf16_t> {
  static constexpr DType dtype = kBFloat16;
  static constexpr const char* name = "bfloat16";
  static constexpr double grad_eps = 8e-3;
};
template <>
struct Traits<f16_t> {
  static constexpr DType dtype = kFloat16;
  static constexpr const char* name = "float16";
  static constexpr double grad_eps = 1e-3;
};

// Inputs of one case: rows of normal logits (plus `offset`), random targets, row 1 ignored (-100).
template <typename T>
struct Case {
  using A = typename Elem<T>::Acc;
  int64_t rows, vocab;
  std::vector<T> x;
  std::vector<int64_t> t;
  std::vector<A> grad_logp;

  Case(int64_t rows_, int64_t vocab_, std::mt19937& rng, double offset = 0.0)
      : rows(rows_), vocab(vocab_), x(rows_ * vocab_), t(rows_) {
    std::normal_distribution<double> normal(0.0, 4.0);
    for (auto& v : x) v = Elem<T>::store(static_cast<A>(normal(rng) + offset));
    for (auto& v : t) v = static_cast<int64_t>(rng() % static_cast<uint32_t>(vocab));
    if (rows > 2) t[1] = -100;
    for (int64_t i = 0; i < rows; ++i) grad_logp.push_back(static_cast<A>(normal(rng) / 4.0));
  }
  RowsArgs args() const { return RowsArgs{x.data(), Traits<T>::dtype, rows, vocab, vocab, t.data(), -100, true}; }
  double ref_max(int64_t i) const {
    double m = -INFINITY;
    for (int64_t j = 0; j < vocab; ++j) m = std::fmax(m, value(x[i * vocab + j]));
    return m;
  }
  // log sum_j exp(x_ij - max_j x_ij), two passes in double.
  double ref_log_sum(int64_t i) const {
    const double m = ref_max(i);
    double s = 0;
    for (int64_t j = 0; j < vocab; ++j) s += std::exp(value(x[i * vocab + j]) - m);
    return std::log(s);
  }
};

// The CPU kernel against double-precision math on the same (rounded) logits. The tolerance
// on log p is relative to log p itself, with no term in the size of the logits: the results
// must not get worse as the logits move away from zero (`offset`).
template <typename T>
void test_cpu_against_double(int64_t rows, int64_t vocab, std::mt19937& rng, double offset = 0.0) {
  using A = typename Elem<T>::Acc;
  const Case<T> c(rows, vocab, rng, offset);
  const std::string where = std::string(logprob_cpu_isa()) + " " + Traits<T>::name + " rows=" + std::to_string(rows) +
                            " V=" + std::to_string(vocab) + " offset=" + std::to_string(offset);
  std::vector<A> logp(rows), row_max(rows), log_sum(rows);
  BadTargets bad{0, 0};
  logprob_forward_cpu(c.args(), logp.data(), RowStats{row_max.data(), log_sum.data()}, &bad);
  check(bad.count == 0, where + ": no bad targets reported");
  const bool f64 = Traits<T>::dtype == kFloat64;
  const double atol = f64 ? 1e-12 : 2e-5, rtol = f64 ? 1e-12 : 1e-5;
  bool fwd_ok = true, grad_ok = true;
  std::vector<T> grad(rows * vocab);
  logprob_backward_cpu(c.args(), c.grad_logp.data(), ConstRowStats{row_max.data(), log_sum.data()}, grad.data());
  for (int64_t i = 0; i < rows; ++i) {
    if (c.t[i] == -100) {
      fwd_ok &= logp[i] == 0 && row_max[i] == 0 && log_sum[i] == 0;
      for (int64_t j = 0; j < vocab; ++j) grad_ok &= value(grad[i * vocab + j]) == 0.0;
      continue;
    }
    const double want_max = c.ref_max(i), want_log_sum = c.ref_log_sum(i);
    fwd_ok &= row_max[i] == want_max;
    fwd_ok &= close(log_sum[i], want_log_sum, atol, rtol);
    fwd_ok &= close(logp[i], (value(c.x[i * vocab + c.t[i]]) - want_max) - want_log_sum, atol, rtol);
    const double g = c.grad_logp[i];
    for (int64_t j = 0; j < vocab; ++j) {
      const double p = std::exp((value(c.x[i * vocab + j]) - want_max) - want_log_sum);
      const double want = g * ((j == c.t[i] ? 1.0 : 0.0) - p);
      grad_ok &= close(value(grad[i * vocab + j]), want, Traits<T>::grad_eps * std::fabs(g), Traits<T>::grad_eps);
    }
  }
  check(fwd_ok, where + ": logp, row max and log-sum match double precision");
  check(grad_ok, where + ": gradient matches double precision");
}

void test_special_rows() {
  const int64_t vocab = 70;
  std::vector<float> x(5 * vocab, 0.5f);
  for (int64_t j = 0; j < vocab; ++j) x[4 * vocab + j] = -INFINITY;
  x[0 * vocab + 13] = NAN;
  x[1 * vocab + 66] = INFINITY;
  x[2 * vocab + 5] = -INFINITY;
  x[3 * vocab + 40] = -INFINITY;
  std::vector<int64_t> t = {1, 2, 5, 7, 3};
  std::vector<float> logp(5), row_max(5), log_sum(5);
  const RowStats stats{row_max.data(), log_sum.data()};
  RowsArgs a{x.data(), kFloat32, 5, vocab, vocab, t.data(), 0, false};
  logprob_forward_cpu(a, logp.data(), stats, nullptr);
  check(std::isnan(logp[0]), "a NaN logit makes the row NaN");
  check(std::isnan(logp[1]), "a +inf logit makes the row NaN");
  check(logp[2] == -INFINITY, "a -inf target logit has log-probability -inf");
  check(close(logp[3], -std::log(69.0), 1e-6, 1e-6), "a -inf logit elsewhere is probability 0");
  check(std::isnan(logp[4]), "a row of -inf is NaN");

  std::vector<int64_t> bad_t = {1, 70, -1, 3, 3};
  std::vector<float> g(5, 1.0f), grad(5 * vocab);
  RowsArgs b{x.data(), kFloat32, 5, vocab, vocab, bad_t.data(), -100, true};
  BadTargets bad{0, 0};
  logprob_forward_cpu(b, logp.data(), stats, &bad);
  check(bad.count == 2 && (bad.example == 70 || bad.example == -1), "out-of-range targets are counted");
  check(std::isnan(logp[1]) && std::isnan(logp[2]), "out-of-range targets give NaN");
  logprob_backward_cpu(b, g.data(), ConstRowStats{row_max.data(), log_sum.data()}, grad.data());
  check(std::isnan(grad[1 * vocab]) && std::isnan(grad[2 * vocab + vocab - 1]), "and NaN gradient rows");
}

void test_conversions_and_exp() {
  bool f16_ok = true, bf16_ok = true;
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t bits = static_cast<uint16_t>(h);
    // float16 decoded independently: sign, exponent and mantissa by ldexp.
    const int e = (h >> 10) & 31, m = h & 1023;
    double want = e == 0 ? std::ldexp(m, -24) : (e == 31 ? (m ? NAN : INFINITY) : std::ldexp(1024 + m, e - 25));
    if (h & 0x8000) want = -want;
    const float f = f16_to_float(bits);
    f16_ok &= std::isnan(want) ? std::isnan(f) : static_cast<double>(f) == want;
    if (!std::isnan(want)) f16_ok &= float_to_f16(f) == bits;  // round trip
    const float b = bf16_to_float(bits);
    if (!std::isnan(b)) bf16_ok &= float_to_bf16(b) == bits;
  }
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-70000.0f, 70000.0f);
  for (int k = 0; k < 100000; ++k) {
    const float f = k % 2 ? u(rng) : u(rng) * 1e-7f;
    // Nearest float16 by search among neighbours of the truncated value: an independent rounding.
    const uint16_t got = float_to_f16(f);
    const double err = std::fabs(static_cast<double>(f16_to_float(got)) - f);
    const double up = std::fabs(static_cast<double>(f16_to_float(static_cast<uint16_t>(got + 1))) - f);
    const double down = (got & 0x7fff) ? std::fabs(static_cast<double>(f16_to_float(static_cast<uint16_t>(got - 1))) - f) : INFINITY;
    if (std::fabs(f) < 65504.0f) f16_ok &= err <= up && err <= down;
    const uint16_t bg = float_to_bf16(f);
    const double berr = std::fabs(static_cast<double>(bf16_to_float(bg)) - f);
    bf16_ok &= berr <= std::fabs(static_cast<double>(bf16_to_float(static_cast<uint16_t>(bg + 1))) - f) &&
               berr <= std::fabs(static_cast<double>(bf16_to_float(static_cast<uint16_t>(bg - 1))) - f);
  }
  check(f16_ok, "float16 <-> float conversions exact, round to nearest");
  check(bf16_ok, "bfloat16 <-> float conversions round to nearest");
  check(std::isnan(float_to_bf16(NAN) ? bf16_to_float(float_to_bf16(NAN)) : 0.0f), "NaN stays NaN in bfloat16");

  double worst = 0;
  for (int k = 0; k <= 200000; ++k) {
    const double x = -87.0 + 87.0 * k / 200000.0;
    worst = std::fmax(worst, std::fabs(fast_exp(static_cast<float>(x)) / std::exp(static_cast<double>(static_cast<float>(x))) - 1));
  }
  check(worst < 1e-6, "fast_exp relative error < 1e-6 on [-87, 0] (got " + std::to_string(worst) + ")");
  check(fast_exp(-INFINITY) == 0.0f && std::isnan(fast_exp(NAN)) && fast_exp(0.0f) == 1.0f, "fast_exp(-inf, NaN, 0)");
}

#ifdef MEMK_WITH_CUDA
template <typename T>
void test_cuda_against_cpu(int64_t rows, int64_t vocab, int64_t shift, std::mt19937& rng, double offset = 0.0) {
  using A = typename Elem<T>::Acc;
  const Case<T> c(rows + shift, vocab, rng, offset);
  const std::string where = std::string("cuda ") + Traits<T>::name + " rows=" + std::to_string(rows) +
                            " V=" + std::to_string(vocab) + " shift=" + std::to_string(shift) +
                            " offset=" + std::to_string(offset);
  // Rows start `shift` elements into the buffer, so neither rows nor the output are 16-byte aligned.
  RowsArgs a = c.args();
  a.n_rows = rows;
  a.logits = c.x.data() + shift;
  std::vector<A> logp(rows), row_max(rows), log_sum(rows), dlogp(rows), drow_max(rows), dlog_sum(rows);
  std::vector<T> grad(rows * vocab), dgrad(rows * vocab);
  logprob_forward_cpu(a, logp.data(), RowStats{row_max.data(), log_sum.data()}, nullptr);
  logprob_backward_cpu(a, c.grad_logp.data(), ConstRowStats{row_max.data(), log_sum.data()}, grad.data());

  T *dx = nullptr, *dg = nullptr;
  int64_t *dt = nullptr, *dbad = nullptr;
  A *dl = nullptr, *dm = nullptr, *ds = nullptr, *dgl = nullptr;
  cudaMalloc(&dx, c.x.size() * sizeof(T));
  cudaMalloc(&dg, grad.size() * sizeof(T));
  cudaMalloc(&dt, rows * sizeof(int64_t));
  cudaMalloc(&dbad, 2 * sizeof(int64_t));
  cudaMalloc(&dl, rows * sizeof(A));
  cudaMalloc(&dm, rows * sizeof(A));
  cudaMalloc(&ds, rows * sizeof(A));
  cudaMalloc(&dgl, rows * sizeof(A));
  cudaMemcpy(dx, c.x.data(), c.x.size() * sizeof(T), cudaMemcpyHostToDevice);
  cudaMemcpy(dt, c.t.data(), rows * sizeof(int64_t), cudaMemcpyHostToDevice);
  cudaMemcpy(dgl, c.grad_logp.data(), rows * sizeof(A), cudaMemcpyHostToDevice);
  cudaMemset(dbad, 0, 2 * sizeof(int64_t));
  RowsArgs d = a;
  d.logits = dx + shift;
  d.targets = dt;
  int err = logprob_forward_cuda(d, dl, RowStats{dm, ds}, dbad, nullptr);
  err = err ? err : logprob_backward_cuda(d, dgl, ConstRowStats{dm, ds}, dg, nullptr);
  err = err ? err : static_cast<int>(cudaDeviceSynchronize());
  check(err == 0, where + ": launches succeed (" + cuda_error_string(err) + ")");
  cudaMemcpy(dlogp.data(), dl, rows * sizeof(A), cudaMemcpyDeviceToHost);
  cudaMemcpy(drow_max.data(), dm, rows * sizeof(A), cudaMemcpyDeviceToHost);
  cudaMemcpy(dlog_sum.data(), ds, rows * sizeof(A), cudaMemcpyDeviceToHost);
  cudaMemcpy(dgrad.data(), dg, grad.size() * sizeof(T), cudaMemcpyDeviceToHost);
  const bool f64 = Traits<T>::dtype == kFloat64;
  const double atol = f64 ? 1e-12 : 2e-5, rtol = f64 ? 1e-12 : 1e-5;  // no term in the logits' size
  bool fwd_ok = true, grad_ok = true;
  for (int64_t i = 0; i < rows; ++i) {
    fwd_ok &= close(dlogp[i], logp[i], atol, rtol) && drow_max[i] == row_max[i] &&
              close(dlog_sum[i], log_sum[i], atol, rtol);
    for (int64_t j = 0; j < vocab; ++j)
      grad_ok &= close(value(dgrad[i * vocab + j]), value(grad[i * vocab + j]),
                       2 * Traits<T>::grad_eps * std::fabs(c.grad_logp[i]), 2 * Traits<T>::grad_eps);
  }
  check(fwd_ok, where + ": logp, row max and log-sum match the CPU kernel");
  check(grad_ok, where + ": gradient matches the CPU kernel");
  for (void* p : {static_cast<void*>(dx), static_cast<void*>(dg), static_cast<void*>(dt), static_cast<void*>(dbad),
                  static_cast<void*>(dl), static_cast<void*>(dm), static_cast<void*>(ds), static_cast<void*>(dgl)})
    cudaFree(p);
}
#endif

template <typename T>
void cpu_cases(std::mt19937& rng) {
  for (int64_t vocab : {1, 2, 7, 64, 65, 2048, 50257}) test_cpu_against_double<T>(vocab >= 50257 ? 3 : 9, vocab, rng);
}

// log_softmax(x + c) = log_softmax(x): the same tolerances at large offsets (float16 holds
// only the first).
template <typename T>
void shifted_cases(std::mt19937& rng) {
  for (double offset : {1e4, 1e6, 1e8}) {
    if (Traits<T>::dtype == kFloat16 && offset > 6e4) continue;
    for (int64_t vocab : {7, 65, 2048}) test_cpu_against_double<T>(9, vocab, rng, offset);
  }
}

// Logits near the float32 maximum: x - max stays finite (or -inf) and p is exact.
void test_huge_logits() {
  const int64_t vocab = 10;
  std::vector<float> x(2 * vocab, 3e38f);
  x[vocab + 0] = FLT_MAX;
  x[vocab + 1] = -FLT_MAX;
  x[vocab + 2] = 0.0f;
  x[vocab + 3] = FLT_MAX;
  for (int64_t j = 4; j < vocab; ++j) x[vocab + j] = -3e38f;  // x - max overflows to -inf: p = 0
  std::vector<int64_t> t = {3, 0};
  std::vector<float> logp(2), row_max(2), log_sum(2), g = {1.0f, 1.0f}, grad(2 * vocab);
  RowsArgs a{x.data(), kFloat32, 2, vocab, vocab, t.data(), 0, false};
  logprob_forward_cpu(a, logp.data(), RowStats{row_max.data(), log_sum.data()}, nullptr);
  logprob_backward_cpu(a, g.data(), ConstRowStats{row_max.data(), log_sum.data()}, grad.data());
  check(close(logp[0], std::log(0.1), 1e-6, 1e-6),
        "ten logits of 3e38: log p = log(1/10), got " + std::to_string(logp[0]));
  check(close(logp[1], std::log(0.5), 1e-6, 1e-6),
        "two logits of FLT_MAX: log p = log(1/2), got " + std::to_string(logp[1]));
  bool grad_ok = true;
  for (int64_t j = 0; j < vocab; ++j) {
    grad_ok &= close(grad[j], (j == 3 ? 1.0 : 0.0) - 0.1, 1e-6, 1e-6);
    grad_ok &= close(grad[vocab + j], (j == 0 ? 0.5 : 0.0) - (j == 3 ? 0.5 : 0.0), 1e-6, 1e-6);
  }
  check(grad_ok, "gradients of logits near FLT_MAX are onehot - softmax");
}

// Rows whose max comes late: every block raises it (the running sum is rescaled each time), or
// it is the last element (in the partial last vector).
void test_rising_rows() {
  const int64_t vocab = 5000;
  std::vector<float> x(3 * vocab);
  for (int64_t j = 0; j < vocab; ++j) {
    x[j] = -30.0f + 60.0f * static_cast<float>(j) / (vocab - 1);
    x[vocab + j] = 0.0f;
    x[2 * vocab + j] = 0.01f * x[j];
  }
  x[2 * vocab - 1] = 25.0f;
  std::vector<int64_t> t = {vocab - 1, vocab - 1, 1234};
  std::vector<float> logp(3), row_max(3), log_sum(3);
  RowsArgs a{x.data(), kFloat32, 3, vocab, vocab, t.data(), 0, false};
  logprob_forward_cpu(a, logp.data(), RowStats{row_max.data(), log_sum.data()}, nullptr);
  bool ok = true;
  for (int64_t i = 0; i < 3; ++i) {
    double m = -INFINITY, s = 0;
    for (int64_t j = 0; j < vocab; ++j) m = std::fmax(m, x[i * vocab + j]);
    for (int64_t j = 0; j < vocab; ++j) s += std::exp(x[i * vocab + j] - m);
    ok &= row_max[i] == m && close(log_sum[i], std::log(s), 2e-5, 1e-5) &&
          close(logp[i], (x[i * vocab + t[i]] - m) - std::log(s), 2e-5, 1e-5);
  }
  check(ok, std::string("rows whose max comes late (") + logprob_cpu_isa() + ")");
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  test_conversions_and_exp();
  // The CPU kernel's every instruction-set path this CPU runs (logprob_cpu_set_isa), the best last.
  const std::string best = logprob_cpu_best_isa();
  for (const char* isa : {"baseline", "avx2", "avx512"}) {
    if (logprob_cpu_set_isa(isa) == nullptr) {
      std::printf("CPU path %s: not run here (this CPU runs up to %s)\n", isa, best.c_str());
      continue;
    }
    const int failed_before = n_failed;
    test_special_rows();
    test_huge_logits();
    test_rising_rows();
    cpu_cases<float>(rng);
    cpu_cases<bf16_t>(rng);
    cpu_cases<f16_t>(rng);
    shifted_cases<float>(rng);
    shifted_cases<bf16_t>(rng);
    shifted_cases<f16_t>(rng);
    std::printf("CPU path %s: %s\n", isa, n_failed == failed_before ? "passed" : "FAILED");
  }
  check(logprob_cpu_set_isa("sse9") == nullptr, "an unknown path is refused");
#ifdef _OPENMP
  at::set_num_threads(2);  // built with OpenMP (CMakeLists.txt), the kernel's loops run on torch's threads
  check(logprob_cpu_threads() == 2, "the kernel runs on 2 threads when torch has 2");
#endif
  check(logprob_cpu_set_isa("") != nullptr && best == logprob_cpu_isa(), "\"\" goes back to the best path");
  cpu_cases<double>(rng);
  shifted_cases<double>(rng);
#ifdef MEMK_WITH_CUDA
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("CUDA kernels built, but no GPU here: CUDA comparisons skipped\n");
  } else {
    for (int64_t vocab : {2, 7, 2048, 33000, 50257}) {
      for (int64_t shift : {0, 1}) {
        const int64_t rows = vocab >= 33000 ? 5 : 300;
        test_cuda_against_cpu<float>(rows, vocab, shift, rng);
        test_cuda_against_cpu<bf16_t>(rows, vocab, shift, rng);
        test_cuda_against_cpu<f16_t>(rows, vocab, shift, rng);
        test_cuda_against_cpu<double>(rows, vocab, shift, rng);
      }
    }
    for (double offset : {1e4, 1e6, 1e8}) {
      for (int64_t vocab : {7, 2048, 50257}) {
        const int64_t rows = vocab >= 33000 ? 5 : 300;
        test_cuda_against_cpu<float>(rows, vocab, 1, rng, offset);
        test_cuda_against_cpu<bf16_t>(rows, vocab, 1, rng, offset);
      }
    }
  }
#endif
  std::printf("%d passed, %d failed\n", n_passed, n_failed);
  return n_failed == 0 ? 0 : 1;
}
