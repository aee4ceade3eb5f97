// The CPU kernel's row loops, written once over a vector type and compiled once per instruction
// set: logprob_cpu.cpp includes this file three times, each time inside its own namespace
// (isa_baseline, isa_avx2, isa_avx512), after defining `Ops` there (the vector of floats and its
// loads, stores, max, exp and sums) and under that instruction set's `#pragma GCC target`, so
// that each copy is compiled for its ISA. It is not a header of its own: no include guard, no
// includes (logprob_cpu.cpp includes what it needs first).
//
// One row (float arithmetic; float64 logits take logprob_cpu.cpp's scalar path):
//   forward   blocks of kBlock elements (512 to 2048: in L1); per block a max pass, then a pass
//             summing exp(x - m) over the block again (from L1: the block was just read), m the
//             running max. The running sum is rescaled only when a block raises the max (a few
//             times a row), not per vector as an online log-sum-exp is; so each element costs one
//             exp, one max and one add. Each lane of each of the kUnroll accumulators sums 32
//             terms of a block in float, and the blocks' sums are added in double: the sum is
//             good to a few float roundings at any V (plain float adds over V / 8 terms lost 0.1
//             in log p at V = 2^28).
//   backward  grad = -g * exp((x - m) - log_sum), one exp per element, written once (past a
//             row's first aligned element by non-temporal stores, where the caller asks: a float32
//             gradient larger than the caches); the target's entry is fixed afterwards.
// A partial vector (the end of a row) is copied into a padded float buffer and goes through the
// same vector code (padding -inf: exp gives exactly 0; the max ignores it).

static constexpr int W = Ops::W;                 // floats per vector
static constexpr int kUnroll = Ops::kUnroll;     // independent accumulators (vectors) per pass
static constexpr int kGroup = kUnroll * W;       // elements per step of a pass
static constexpr int64_t kBlock = 32 * kGroup;   // elements per block: 32 terms per accumulator lane
using F = Ops::F;
static constexpr int64_t kPrefetchBytes = 16 << 10;  // how far ahead the passes over memory prefetch
template <typename T>
static constexpr int kGroupLines = std::max(1, kGroup * static_cast<int>(sizeof(T)) / 64);  // cache lines per step

// The first n (< kGroup) elements of x as floats, the rest `fill`.
template <typename T>
MEMK_HD void load_tail(const T* x, int64_t n, float fill, float (&buf)[kGroup]) {
  for (int k = 0; k < kGroup; ++k) buf[k] = k < n ? Elem<T>::load(x[k]) : fill;
}

// max over x[0, n), n <= kBlock, starting from `m` (NaN elements are ignored, as max_of does).
template <typename T>
MEMK_HD float block_max(const T* __restrict__ x, int64_t n, float m) {
  F a[kUnroll];
  for (int u = 0; u < kUnroll; ++u) a[u] = Ops::splat(m);
  const int64_t full = n - n % kGroup;
  for (int64_t j = 0; j < full; j += kGroup)
    for (int u = 0; u < kUnroll; ++u) a[u] = Ops::max(a[u], Ops::load(x + j + u * W));
  if (full < n) {
    float buf[kGroup];
    load_tail(x + full, n - full, -HUGE_VALF, buf);
    for (int u = 0; u < kUnroll; ++u) a[u] = Ops::max(a[u], Ops::load(buf + u * W));
  }
  for (int u = 1; u < kUnroll; ++u) a[0] = Ops::max(a[0], a[u]);
  return Ops::reduce_max(a[0]);
}

// sum over x[0, n) of exp(x - m), n <= kBlock: per-lane float sums, added in double.
template <typename T>
MEMK_HD double block_sum_exp(const T* __restrict__ x, int64_t n, float m) {
  const F mv = Ops::splat(m);
  F s[kUnroll];
  for (int u = 0; u < kUnroll; ++u) s[u] = Ops::splat(0.0f);
  const int64_t full = n - n % kGroup;
  // While this block computes (from L1), the lines kPrefetchBytes ahead are fetched into L2: the
  // memory stream keeps going between one block's max pass and the next's (float32, 16384 rows of
  // 2048 on 2 Xeon cores: 9.7 -> 6.2 ms; prefetching into L1 instead: 9.0). A prefetch is a hint:
  // past the end of the logits it does nothing.
  const char* ahead = reinterpret_cast<const char*>(x) + kPrefetchBytes;
  for (int64_t j = 0; j < full; j += kGroup) {
    for (int l = 0; l < kGroupLines<T>; ++l) __builtin_prefetch(ahead + j * int64_t{sizeof(T)} + 64 * l, 0, 2);
    for (int u = 0; u < kUnroll; ++u) s[u] += Ops::exp(Ops::load(x + j + u * W) - mv);
  }
  if (full < n) {
    float buf[kGroup];
    load_tail(x + full, n - full, -HUGE_VALF, buf);  // exp(-inf - m) = 0
    for (int u = 0; u < kUnroll; ++u) s[u] += Ops::exp(Ops::load(buf + u * W) - mv);
  }
  double total = 0.0;
  for (int u = 0; u < kUnroll; ++u) total += Ops::sum_double(s[u]);
  return total;
}

// (max, log sum exp(x - max)) of one row. The max starts at the lowest finite float, so a row
// of -inf keeps it and sums exp(-inf) = 0: log_sum = -inf and log p = NaN, as in torch. A NaN or
// +inf logit makes the sum NaN (exp(NaN - m); +inf: m = inf and exp(inf - inf)).
template <typename T>
MEMK_HD void row_stats(const T* __restrict__ x, int64_t vocab, float* m_out, float* log_sum_out) {
  float m = -FLT_MAX;
  double s = 0.0;
  for (int64_t b = 0; b < vocab; b += kBlock) {
    const int64_t n = vocab - b < kBlock ? vocab - b : kBlock;
    const float m_new = block_max(x + b, n, m);
    if (m_new > m) {  // exact in double; exp(-inf) = 0 where m_new = inf
      if (s != 0.0) s *= std::exp(static_cast<double>(m) - static_cast<double>(m_new));
      m = m_new;
    }
    s += block_sum_exp(x + b, n, m);
  }
  *m_out = m;
  *log_sum_out = static_cast<float>(std::log(s));
}

// out[j] = neg_g * exp((x_j - m) - log_sum) for the whole row (the caller fixes the target's entry).
// stream: float32 out, written with non-temporal stores past its first aligned address (a gradient
// larger than the caches then goes to memory without first being read into them).
template <typename T>
MEMK_HD void row_grad(const T* __restrict__ x, int64_t vocab, float neg_g, float m, float log_sum,
                      T* __restrict__ out, bool stream) {
  const F mv = Ops::splat(m), lv = Ops::splat(log_sum), gv = Ops::splat(neg_g);
  const char* ahead = reinterpret_cast<const char*>(x) + kPrefetchBytes;  // as block_sum_exp
  int64_t j = 0;
  if constexpr (Ops::kStream && std::is_same<T, float>::value) {
    if (stream) {
      const int64_t head = std::min<int64_t>(vocab, (-reinterpret_cast<uintptr_t>(out) % (W * sizeof(float))) / sizeof(float));
      for (; j < head; ++j) out[j] = neg_g * fast_exp((x[j] - m) - log_sum);
      for (; j + W <= vocab; j += W) {
        if ((j * int64_t{sizeof(float)}) % 64 == 0) __builtin_prefetch(ahead + j * int64_t{sizeof(float)}, 0, 2);
        Ops::stream(out + j, Ops::exp((Ops::load(x + j) - mv) - lv) * gv);
      }
    }
  }
  for (; j + 2 * W <= vocab; j += 2 * W) {
    for (int l = 0; l < std::max(1, 2 * W * static_cast<int>(sizeof(T)) / 64); ++l)
      __builtin_prefetch(ahead + j * int64_t{sizeof(T)} + 64 * l, 0, 2);
    const F e0 = Ops::exp((Ops::load(x + j) - mv) - lv);
    const F e1 = Ops::exp((Ops::load(x + j + W) - mv) - lv);
    Ops::store(out + j, e0 * gv);
    Ops::store(out + j + W, e1 * gv);
  }
  if (j < vocab) {
    float buf[kGroup];
    load_tail(x + j, vocab - j, -HUGE_VALF, buf);
    for (int u = 0; u < kUnroll; ++u) Ops::store(buf + u * W, Ops::exp((Ops::load(buf + u * W) - mv) - lv) * gv);
    for (int64_t k = 0; k < vocab - j; ++k) out[j + k] = Elem<T>::store(buf[k]);
  }
}

template <typename T>
MEMK_HD void forward_rows(const RowsArgs& a, int64_t begin, int64_t end, float* logp, float* row_max,
                          float* log_sum, BadTargetsAcc* bad) {
  const T* logits = static_cast<const T*>(a.logits);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t t = a.targets[i];
    const int kind = classify_target(t, a.vocab, a.ignore_index, a.has_ignore);
    if (kind == kTargetIgnored) {
      logp[i] = row_max[i] = log_sum[i] = 0.0f;
      continue;
    }
    const T* x = logits + i * a.row_stride;
    float m, ls;
    row_stats(x, a.vocab, &m, &ls);
    row_max[i] = m;
    log_sum[i] = ls;
    if (kind == kTargetOutOfRange) {
      bad->note(t);
      logp[i] = std::numeric_limits<float>::quiet_NaN();
    } else {
      logp[i] = logprob_of(Elem<T>::load(x[t]), m, ls);
    }
  }
}

template <typename T>
MEMK_HD void backward_rows(const RowsArgs& a, int64_t begin, int64_t end, const float* grad_logp,
                           const float* row_max, const float* log_sum, T* __restrict__ grad, bool stream) {
  const T* logits = static_cast<const T*>(a.logits);
  const int64_t vocab = a.vocab;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t t = a.targets[i];
    const int kind = classify_target(t, vocab, a.ignore_index, a.has_ignore);
    T* __restrict__ out = grad + i * vocab;
    if (kind == kTargetIgnored) {
      memset(static_cast<void*>(out), 0, static_cast<size_t>(vocab) * sizeof(T));  // +0.0 in every dtype
      continue;
    }
    const T* __restrict__ x = logits + i * a.row_stride;
    const float g = kind == kTargetValid ? grad_logp[i] : std::numeric_limits<float>::quiet_NaN();
    const float m = row_max[i], ls = log_sum[i];
    row_grad(x, vocab, -g, m, ls, out, stream);
    if (kind == kTargetValid) out[t] = Elem<T>::store(logprob_grad(g, Elem<T>::load(x[t]), m, ls, true));
  }
}

// The entry points of this instruction set (float32, bfloat16 and float16 logits).
void forward(const RowsArgs& a, int64_t begin, int64_t end, float* logp, float* row_max, float* log_sum,
             BadTargetsAcc* bad) {
  switch (a.dtype) {
    case kFloat32: forward_rows<float>(a, begin, end, logp, row_max, log_sum, bad); break;
    case kBFloat16: forward_rows<bf16_t>(a, begin, end, logp, row_max, log_sum, bad); break;
    case kFloat16: forward_rows<f16_t>(a, begin, end, logp, row_max, log_sum, bad); break;
    default: break;
  }
}

void backward(const RowsArgs& a, int64_t begin, int64_t end, const float* grad_logp, const float* row_max,
              const float* log_sum, void* grad, bool stream) {
  switch (a.dtype) {
    case kFloat32: backward_rows(a, begin, end, grad_logp, row_max, log_sum, static_cast<float*>(grad), stream); break;
    case kBFloat16: backward_rows(a, begin, end, grad_logp, row_max, log_sum, static_cast<bf16_t*>(grad), false); break;
    case kFloat16: backward_rows(a, begin, end, grad_logp, row_max, log_sum, static_cast<f16_t*>(grad), false); break;
    default: break;
  }
  if (stream) Ops::fence();  // the non-temporal stores are seen before this task is reported done
}

// Roofline probes (bench/roofline.py): the machine's rates through this ISA's own loads, stores
// and exp. Sum of x[0, n) (a streaming read); out[0, n) = v (a streaming write); sum of exp over
// x[0, n) `repeats` times (x cache-resident: the exp throughput).
float probe_read(const float* __restrict__ x, int64_t n) {
  F s[kUnroll];
  for (int u = 0; u < kUnroll; ++u) s[u] = Ops::splat(0.0f);
  int64_t j = 0;
  for (; j + kGroup <= n; j += kGroup)
    for (int u = 0; u < kUnroll; ++u) s[u] += Ops::load(x + j + u * W);
  double total = 0.0;
  for (int u = 0; u < kUnroll; ++u) total += Ops::sum_double(s[u]);
  for (; j < n; ++j) total += x[j];
  return static_cast<float>(total);
}

void probe_write(float* __restrict__ out, int64_t n, float v, bool stream) {
  const F vv = Ops::splat(v);
  int64_t j = 0;
  if constexpr (Ops::kStream) {
    if (stream) {
      const int64_t head = std::min<int64_t>(n, (-reinterpret_cast<uintptr_t>(out) % (W * sizeof(float))) / sizeof(float));
      for (; j < head; ++j) out[j] = v;
      for (; j + W <= n; j += W) Ops::stream(out + j, vv);
      Ops::fence();
    }
  }
  for (; j + 2 * W <= n; j += 2 * W) {
    Ops::store(out + j, vv);
    Ops::store(out + j + W, vv);
  }
  for (; j < n; ++j) out[j] = v;
}

double probe_exp(const float* __restrict__ x, int64_t n, int64_t repeats) {
  double total = 0.0;
  for (int64_t r = 0; r < repeats; ++r) total += block_sum_exp(x, n, 0.0f);
  return total;
}
