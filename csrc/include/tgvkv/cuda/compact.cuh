// Torch-free CUDA kernel of compact_ (and of the compaction stage of evict).
//
// In place, per (layer, sample, KV head): k[b, h, s] = k[b, h, keep_idx[b, s]] for s < n_kept
// (same for v). The copy moves opaque units of UB bytes (16 when the head dim, base pointers and
// strides allow it: 16-byte, coalesced accesses), so one kernel serves every dtype.
//
// Why one block per row, chunk by chunk, is race-free without a second buffer: keep_idx is
// ascending with keep_idx[s] >= s. Number the units of the row e = s * upb + u (destination slot
// s, unit u). Chunk c handles e in [c*CH, (c+1)*CH): every thread first loads all of its sources
// into registers, then __syncthreads, then stores. A unit (x, u) stored in chunk c has
// e_w = x*upb + u < (c+1)*CH. Any later read of that location comes from a destination s' with
// keep_idx[s'] = x, so its e = s'*upb + u <= x*upb + u = e_w: it belongs to chunk <= c and was
// read before chunk c's barrier. Stores of chunk c+1 happen after chunk c+1's barrier, i.e. after
// every thread finished its chunk-c loads. Disjoint unit columns of a row never interact, so a
// row may also be split by unit columns across blocks (dsplit) for parallelism.
//
// keep_idx rows must be ascending with -1 after the kept entries (what select_keep writes). On
// CUDA this is not verified (it would need a host sync): n_kept is found by binary search for the
// first negative entry, and source indices outside [0, N) are skipped (no memory access).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "tgvkv/cuda/common.cuh"
#include "tgvkv/cuda/launch.cuh"

namespace tgvkv {
namespace cuda {
namespace compact {


template <int UB>
struct Unit;
template <>
struct Unit<16> { using type = uint4; };
template <>
struct Unit<8> { using type = uint2; };
template <>
struct Unit<4> { using type = uint32_t; };
template <>
struct Unit<2> { using type = uint16_t; };
template <>
struct Unit<1> { using type = uint8_t; };

// grid (2 * B * H * dsplit, L): x = ((which * B + b) * H + h) * dsplit + ds, which 0 = k, 1 = v.
// block kThreads.
template <int UB>
__global__ void __launch_bounds__(kThreads) compact_kernel(const Params P) {
  using U = typename Unit<UB>::type;
  __shared__ int64_t n_sh;
  const int l = blockIdx.y;
  const int64_t x = blockIdx.x;
  const int ds = int(x % P.dsplit);
  const int64_t r = x / P.dsplit;
  const int h = int(r % P.H);
  const int64_t wb = r / P.H;
  const int b = int(wb % P.B);
  const int which = int(wb / P.B);
  const int64_t lb = int64_t(l) * P.B + b;
  const int64_t* idx = P.keep_idx + lb * P.N;
  if (threadIdx.x == 0) {
    int64_t n;
    if (P.n_kept_in != nullptr) {
      n = P.n_kept_in[lb];
    } else {  // first negative entry
      int64_t lo = 0, hi = P.N;
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (idx[mid] >= 0) lo = mid + 1; else hi = mid;
      }
      n = lo;
    }
    n = n < 0 ? 0 : (n > P.N ? P.N : n);
    n_sh = n;
    if (P.n_kept_out != nullptr && which == 0 && h == 0 && ds == 0) P.n_kept_out[lb] = n;
  }
  __syncthreads();
  const int64_t n = n_sh;
  const Tensor3 X = which == 0 ? P.k[l] : P.v[l];
  const int64_t upb = which == 0 ? P.upb_k : P.upb_v;
  char* base = X.ptr + b * X.s0 + h * X.s1 + int64_t(ds) * upb * UB;
  const int64_t E = n * upb;
  constexpr int64_t CH = int64_t(kThreads) * kItems;
  for (int64_t e0 = 0; e0 < E; e0 += CH) {
    U reg[kItems];
    int64_t dst[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t e = e0 + int64_t(i) * kThreads + threadIdx.x;
      dst[i] = -1;
      if (e < E) {
        const int64_t s = e / upb;
        const int64_t u = e - s * upb;
        const int64_t src = idx[s];
        if (src != s && src >= 0 && src < P.N) {
          reg[i] = *reinterpret_cast<const U*>(base + src * X.s2 + u * UB);
          dst[i] = e;
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (dst[i] < 0) continue;
      const int64_t s = dst[i] / upb;
      const int64_t u = dst[i] - s * upb;
      *reinterpret_cast<U*>(base + s * X.s2 + u * UB) = reg[i];
    }
  }
}

}  // namespace compact

// ---------------------------------------------------------------------------------------------
// Launcher (declared in launch.cuh). Defined here, next to the kernel it instantiates: this
// header is included by compact.cu only (and by the CUDA emulator).
// ---------------------------------------------------------------------------------------------
cudaError_t launch_compact(const compact::Params& p, int unit_bytes, cudaStream_t st) {
  using namespace compact;
  const dim3 grid(unsigned(int64_t(2) * p.B * p.H * p.dsplit), unsigned(p.L));
  if (empty_grid(grid)) return cudaSuccess;
  switch (unit_bytes) {
    case 16: compact_kernel<16><<<grid, kThreads, 0, st>>>(p); break;
    case 8: compact_kernel<8><<<grid, kThreads, 0, st>>>(p); break;
    case 4: compact_kernel<4><<<grid, kThreads, 0, st>>>(p); break;
    case 2: compact_kernel<2><<<grid, kThreads, 0, st>>>(p); break;
    default: compact_kernel<1><<<grid, kThreads, 0, st>>>(p); break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace tgvkv
