// Emulated cub::BlockScan<T, N>::ExclusiveSum over I items per thread (blocked arrangement:
// thread t holds items [t*I, t*I + I)); block aggregate returned to every thread, as CUB.
#pragma once
#include "cuda_runtime.h"
namespace cub {
template <typename T, int N>
struct BlockScan {
  struct TempStorage { T v[N]; };
  TempStorage& s;
  explicit BlockScan(TempStorage& t) : s(t) {}
  template <int I>
  void ExclusiveSum(T (&in)[I], T (&out)[I], T& agg) {
    if (int(blockDim.x) != N) emu::fail("cub::BlockScan: block size differs from its template N");
    T local = T(0);
    for (int i = 0; i < I; ++i) local += in[i];
    s.v[threadIdx.x] = local;
    __syncthreads();
    T pre = T(0), tot = T(0);
    for (int t = 0; t < N; ++t) {
      if (t < int(threadIdx.x)) pre += s.v[t];
      tot += s.v[t];
    }
    __syncthreads();  // TempStorage may be reused after the call (as CUB)
    for (int i = 0; i < I; ++i) {
      out[i] = pre;
      pre += in[i];
    }
    agg = tot;
  }
};
}  // namespace cub
