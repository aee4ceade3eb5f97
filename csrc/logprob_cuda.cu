// CUDA kernels of the fused log-prob ops, and their launchers (declared in logprob_cuda.h).
// No torch header: nvcc compiles this file on any machine with the CUDA toolkit.
//
// Forward: one row per group of TPR threads (32, 128 or 256 by row size; a 256-thread block
// holds 256 / TPR rows). Each thread reads 16-byte vectors of the row, keeps an online
// log-sum-exp (one rescale per vector), and the group merges the states by warp shuffles
// (and shared memory across warps). Writes three floats per row: log p(target), and the
// row's max m and log_sum = log sum exp(x - m), kept apart (see logprob_math.h).
// Backward: the same row layout; reads the row once more and writes
// grad = g * (onehot - exp((x - m) - log_sum)) with 16-byte stores. Rows need not be 16-byte aligned
// (any V, any row stride): a scalar head brings each row to alignment, a scalar tail ends it.
#include <cuda_runtime.h>

#include "logprob_cuda.h"

namespace memk {
namespace {

constexpr int kBlock = 256;  // threads per block
constexpr int kUnroll = 4;   // 16-byte loads in flight per thread

template <typename T>
struct Pack {
  static constexpr int N = 16 / static_cast<int>(sizeof(T));  // elements per 16 bytes
  union {
    uint4 raw;
    T e[N];
  };
};

// Elements before the first 16-byte boundary of the row (the row is sizeof(T)-aligned).
template <typename T>
__device__ __forceinline__ int64_t head_count(const T* p, int64_t vocab) {
  const int64_t misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) & 15u);
  const int64_t head = misaligned ? (16 - misaligned) / static_cast<int64_t>(sizeof(T)) : 0;
  return head < vocab ? head : vocab;
}

// Online log-sum-exp of this thread's share of one row.
template <typename T, int TPR>
__device__ __forceinline__ void accumulate_row(const T* __restrict__ x, int64_t vocab, int lane,
                                               LseState<typename Elem<T>::Acc>& st) {
  using A = typename Elem<T>::Acc;
  constexpr int N = Pack<T>::N;
  const int64_t head = head_count(x, vocab);
  if (lane < head) st.add(Elem<T>::load(x[lane]));
  const int64_t n_vec = (vocab - head) / N;
  const uint4* __restrict__ xv = reinterpret_cast<const uint4*>(x + head);
  int64_t i = lane;
  for (; i + (kUnroll - 1) * TPR < n_vec; i += kUnroll * TPR) {
    Pack<T> pk[kUnroll];
    MEMK_UNROLL
    for (int u = 0; u < kUnroll; ++u) pk[u].raw = __ldg(xv + i + u * TPR);
    MEMK_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      A v[N];
      MEMK_UNROLL
      for (int k = 0; k < N; ++k) v[k] = Elem<T>::load(pk[u].e[k]);
      st.add_block(v);
    }
  }
  for (; i < n_vec; i += TPR) {
    Pack<T> pk;
    pk.raw = __ldg(xv + i);
    A v[N];
    MEMK_UNROLL
    for (int k = 0; k < N; ++k) v[k] = Elem<T>::load(pk.e[k]);
    st.add_block(v);
  }
  const int64_t tail = head + n_vec * N;  // fewer than N <= TPR elements remain
  if (tail + lane < vocab) st.add(Elem<T>::load(x[tail + lane]));
}

// Merge the states of the TPR threads of each row; the result is valid in the row's lane 0.
template <typename A, int TPR>
__device__ __forceinline__ LseState<A> reduce_row(LseState<A> st) {
  st = LseState<A>{st.m, st.sum()};  // the Kahan compensation folded in: states travel as (m, s)
  MEMK_UNROLL
  for (int offset = 16; offset > 0; offset >>= 1) {
    LseState<A> other{__shfl_xor_sync(0xffffffffu, st.m, offset), __shfl_xor_sync(0xffffffffu, st.s, offset)};
    st.merge(other);
  }
  if constexpr (TPR > 32) {
    constexpr int kWarps = kBlock / 32;
    __shared__ A warp_m[kWarps];
    __shared__ A warp_s[kWarps];
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
      warp_m[warp] = st.m;
      warp_s[warp] = st.s;
    }
    __syncthreads();
    if (threadIdx.x % TPR == 0) {
      for (int w = warp + 1; w < warp + TPR / 32; ++w) st.merge(LseState<A>{warp_m[w], warp_s[w]});
    }
  }
  return st;
}

template <typename T, int TPR>
__global__ void __launch_bounds__(kBlock)
    logprob_forward_kernel(RowsArgs a, typename Elem<T>::Acc* __restrict__ logp,
                           typename Elem<T>::Acc* __restrict__ row_max, typename Elem<T>::Acc* __restrict__ log_sum,
                           unsigned long long* __restrict__ bad) {
  using A = typename Elem<T>::Acc;
  constexpr int kRows = kBlock / TPR;
  const int lane = threadIdx.x % TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / TPR;
  const bool active = row < a.n_rows;  // no early return: reduce_row may synchronize the block
  const int64_t t = active ? a.targets[row] : 0;
  const int kind = active ? classify_target(t, a.vocab, a.ignore_index, a.has_ignore) : int(kTargetIgnored);
  const T* x = static_cast<const T*>(a.logits) + (active ? row : 0) * a.row_stride;
  LseState<A> st = LseState<A>::empty();
  if (kind != kTargetIgnored) accumulate_row<T, TPR>(x, a.vocab, lane, st);
  st = reduce_row<A, TPR>(st);
  if (!active || lane != 0) return;
  if (kind == kTargetIgnored) {
    logp[row] = A(0);
    row_max[row] = A(0);
    log_sum[row] = A(0);
    return;
  }
  const A ls = st.log_sum();
  row_max[row] = st.m;
  log_sum[row] = ls;
  if (kind == kTargetOutOfRange) {
    logp[row] = A(NAN);
    if (bad) {
      atomicAdd(bad, 1ull);
      atomicExch(bad + 1, static_cast<unsigned long long>(t));
    }
  } else {
    logp[row] = logprob_of(Elem<T>::load(x[t]), st.m, ls);
  }
}

template <typename T, int TPR>
__global__ void __launch_bounds__(kBlock)
    logprob_backward_kernel(RowsArgs a, const typename Elem<T>::Acc* __restrict__ grad_logp,
                            const typename Elem<T>::Acc* __restrict__ row_max,
                            const typename Elem<T>::Acc* __restrict__ log_sum, T* __restrict__ grad) {
  using A = typename Elem<T>::Acc;
  constexpr int N = Pack<T>::N;
  constexpr int kRows = kBlock / TPR;
  const int lane = threadIdx.x % TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / TPR;
  if (row >= a.n_rows) return;
  const int64_t vocab = a.vocab;
  const int64_t t = a.targets[row];
  const int kind = classify_target(t, vocab, a.ignore_index, a.has_ignore);
  T* __restrict__ out = grad + row * vocab;
  if (kind == kTargetIgnored) {
    for (int64_t j = lane; j < vocab; j += TPR) out[j] = Elem<T>::store(A(0));
    return;
  }
  const T* __restrict__ x = static_cast<const T*>(a.logits) + row * a.row_stride;
  const A g = kind == kTargetValid ? grad_logp[row] : A(NAN);  // out-of-range target: a NaN row
  const A m = row_max[row], ls = log_sum[row];
  if ((reinterpret_cast<uintptr_t>(x) & 15u) != (reinterpret_cast<uintptr_t>(out) & 15u)) {
    // Input and output rows aligned differently (a strided view): no common vector path.
    for (int64_t j = lane; j < vocab; j += TPR)
      out[j] = Elem<T>::store(logprob_grad(g, Elem<T>::load(x[j]), m, ls, j == t));
    return;
  }
  const int64_t head = head_count(x, vocab);
  if (lane < head) out[lane] = Elem<T>::store(logprob_grad(g, Elem<T>::load(x[lane]), m, ls, lane == t));
  const int64_t n_vec = (vocab - head) / N;
  const uint4* __restrict__ xv = reinterpret_cast<const uint4*>(x + head);
  uint4* __restrict__ ov = reinterpret_cast<uint4*>(out + head);
  // One 16-byte vector in, one out: grad = g * ([j == t] - exp((x - m) - log_sum)).
  auto grad_vector = [&](const Pack<T>& in, int64_t i) {
    Pack<T> res;
    const int64_t j0 = head + i * N;
    MEMK_UNROLL
    for (int k = 0; k < N; ++k)
      res.e[k] = Elem<T>::store(logprob_grad(g, Elem<T>::load(in.e[k]), m, ls, j0 + k == t));
    ov[i] = res.raw;
  };
  int64_t i = lane;
  for (; i + (kUnroll - 1) * TPR < n_vec; i += kUnroll * TPR) {
    Pack<T> in[kUnroll];
    MEMK_UNROLL
    for (int u = 0; u < kUnroll; ++u) in[u].raw = __ldg(xv + i + u * TPR);
    MEMK_UNROLL
    for (int u = 0; u < kUnroll; ++u) grad_vector(in[u], i + u * TPR);
  }
  for (; i < n_vec; i += TPR) {
    Pack<T> in;
    in.raw = __ldg(xv + i);
    grad_vector(in, i);
  }
  const int64_t tail = head + n_vec * N;
  if (tail + lane < vocab) {
    const int64_t j = tail + lane;
    out[j] = Elem<T>::store(logprob_grad(g, Elem<T>::load(x[j]), m, ls, j == t));
  }
}

// Threads per row: a warp for rows up to 16 KB, more for long rows (large V).
template <typename T>
int threads_per_row(int64_t vocab) {
  const int64_t bytes = vocab * static_cast<int64_t>(sizeof(T));
  return bytes <= 16 * 1024 ? 32 : (bytes <= 64 * 1024 ? 128 : 256);
}

template <typename T, int TPR>
void launch_forward(const RowsArgs& a, void* logp, RowStats stats, int64_t* bad, cudaStream_t stream) {
  using A = typename Elem<T>::Acc;
  constexpr int kRows = kBlock / TPR;
  const unsigned blocks = static_cast<unsigned>((a.n_rows + kRows - 1) / kRows);
  logprob_forward_kernel<T, TPR><<<blocks, kBlock, 0, stream>>>(
      a, static_cast<A*>(logp), static_cast<A*>(stats.row_max), static_cast<A*>(stats.log_sum),
      reinterpret_cast<unsigned long long*>(bad));
}

template <typename T, int TPR>
void launch_backward(const RowsArgs& a, const void* grad_logp, ConstRowStats stats, void* grad,
                     cudaStream_t stream) {
  using A = typename Elem<T>::Acc;
  constexpr int kRows = kBlock / TPR;
  const unsigned blocks = static_cast<unsigned>((a.n_rows + kRows - 1) / kRows);
  logprob_backward_kernel<T, TPR><<<blocks, kBlock, 0, stream>>>(
      a, static_cast<const A*>(grad_logp), static_cast<const A*>(stats.row_max), static_cast<const A*>(stats.log_sum),
      static_cast<T*>(grad));
}

template <typename T>
void forward_typed(const RowsArgs& a, void* logp, RowStats stats, int64_t* bad, cudaStream_t stream) {
  switch (threads_per_row<T>(a.vocab)) {
    case 32: launch_forward<T, 32>(a, logp, stats, bad, stream); break;
    case 128: launch_forward<T, 128>(a, logp, stats, bad, stream); break;
    default: launch_forward<T, 256>(a, logp, stats, bad, stream); break;
  }
}

template <typename T>
void backward_typed(const RowsArgs& a, const void* grad_logp, ConstRowStats stats, void* grad, cudaStream_t stream) {
  switch (threads_per_row<T>(a.vocab)) {
    case 32: launch_backward<T, 32>(a, grad_logp, stats, grad, stream); break;
    case 128: launch_backward<T, 128>(a, grad_logp, stats, grad, stream); break;
    default: launch_backward<T, 256>(a, grad_logp, stats, grad, stream); break;
  }
}

}  // namespace

int logprob_forward_cuda(const RowsArgs& a, void* logp, RowStats stats, int64_t* bad, void* stream) {
  if (a.n_rows <= 0) return 0;
  if (a.vocab <= 0 || a.n_rows > static_cast<int64_t>(0x7fffffff) * (kBlock / 256)) return cudaErrorInvalidValue;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kFloat32: forward_typed<float>(a, logp, stats, bad, s); break;
    case kFloat16: forward_typed<f16_t>(a, logp, stats, bad, s); break;
    case kBFloat16: forward_typed<bf16_t>(a, logp, stats, bad, s); break;
    case kFloat64: forward_typed<double>(a, logp, stats, bad, s); break;
    default: return cudaErrorInvalidValue;
  }
  return static_cast<int>(cudaGetLastError());
}

int logprob_backward_cuda(const RowsArgs& a, const void* grad_logp, ConstRowStats stats, void* grad, void* stream) {
  if (a.n_rows <= 0) return 0;
  if (a.vocab <= 0 || a.n_rows > static_cast<int64_t>(0x7fffffff) * (kBlock / 256)) return cudaErrorInvalidValue;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kFloat32: backward_typed<float>(a, grad_logp, stats, grad, s); break;
    case kFloat16: backward_typed<f16_t>(a, grad_logp, stats, grad, s); break;
    case kBFloat16: backward_typed<bf16_t>(a, grad_logp, stats, grad, s); break;
    case kFloat64: backward_typed<double>(a, grad_logp, stats, grad, s); break;
    default: return cudaErrorInvalidValue;
  }
  return static_cast<int>(cudaGetLastError());
}

const char* cuda_error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace memk
