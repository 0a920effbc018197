// Emulated cub::BlockReduce<T, N>::Sum: thread 0 sums the N inputs in thread order (CUB's order
// differs: integer sums are exact either way; a float reduction would agree only to rounding).
#pragma once
#include "cuda_runtime.h"
namespace cub {
template <typename T, int N>
struct BlockReduce {
  struct TempStorage { T v[N]; };
  TempStorage& s;
  explicit BlockReduce(TempStorage& t) : s(t) {}
  T Sum(T x) {
    if (int(blockDim.x) != N) emu::fail("cub::BlockReduce: block size differs from its template N");
    s.v[threadIdx.x] = x;
    __syncthreads();
    T r = T(0);
    if (threadIdx.x == 0)
      for (int t = 0; t < N; ++t) r += s.v[t];
    __syncthreads();
    if (threadIdx.x != 0) std::memset(&r, 0x7f, sizeof(T));  // valid in thread 0 only (as CUB)
    return r;
  }
};
}  // namespace cub
