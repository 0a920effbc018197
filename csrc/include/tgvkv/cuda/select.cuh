// Torch-free CUDA kernels of layer_budgets and select_keep (and of the selection stage of evict).
//
// select_kernel, one block per (layer, sample), N up to tens of thousands of slots:
//   1. a scan over the modality row finds the real (non-pad) slots, the last sink and the last
//      real slot (the candidates lie strictly between them);
//   2. optionally (evict) the sample's budgets of all layers, with the same torch-free
//      tgvkv::sample_layer_budgets the CPU uses (bit-identical keep counts);
//   3. a radix select (8-bit digits, shared-memory histogram, integer atomics only) finds the
//      forget-th smallest ranking key among the candidates. The key is tgvkv::rank_key (class
//      text > vision, order-preserving fp32 score, slot) with the slot field narrowed to the bits
//      N needs, so keys are unique and the dropped set is exactly {cand : key <= threshold}:
//      the reference's "sort ascending, drop the first `forget`", ties to the earlier slot;
//   4. a stable compaction (cub::BlockScan over the slot order) writes the kept slots ascending,
//      -1 after them, and counts the kept slots at or after the first guidance slot.
// Scores must not be NaN (the ranking of a NaN is unspecified, as in the reference).
//
// budgets_kernel (the layer_budgets op), one block per sample: the same scan, then the budgets.
// A non-finite r_l·N_b (non-finite stats), which the CPU op reports as an error, cannot be
// reported on CUDA without a host sync: that layer then keeps all N_b slots.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "tgvkv/common.h"
#include "tgvkv/cuda/common.cuh"
#include "tgvkv/cuda/launch.cuh"

namespace tgvkv {
namespace cuda {
namespace select {


using BlockScanI = cub::BlockScan<int, kThreads>;
using BlockReduceI = cub::BlockReduce<int, kThreads>;

struct Shared {
  union {
    typename BlockScanI::TempStorage scan;
    typename BlockReduceI::TempStorage reduce;
  } cub;
  unsigned long long last_real_p1;  // last real slot + 1 (0: none); atomicMax target
  long long sink_last;
  int has_vision;
  int running;
  int n_guid;
  long long g0;  // first guidance slot (-1: none)
  int hist[256];
  unsigned long long prefix, mask;
  int remaining;
  long long keep_lb;
};

struct SampleInfo {
  int64_t n_real;
  int64_t sink_last;  // slot of the n_sink-th real slot (-1 if n_sink == 0 or fewer real slots)
  int64_t last_real;  // last real slot (-1 if none)
  int64_t g0;         // first q_pos entry >= 0 (-1 if none)
  int n_guid;         // q_pos entries >= 0
  bool has_vision;
  __device__ bool evicts(int64_t n_sink) const { return has_vision && n_guid > 0 && n_real > n_sink + 1; }
};

// Block-wide scan of the modality row and q_pos row of one sample (all threads get the result).
__device__ inline SampleInfo sample_info(const int8_t* mod_b, const int64_t* q_pos_b, int T,
                                         int64_t N, int64_t n_sink, Shared& sh) {
  if (threadIdx.x == 0) {
    sh.sink_last = -1;
    sh.last_real_p1 = 0;
    sh.has_vision = 0;
    sh.running = 0;
    int ng = 0;
    long long g0 = -1;
    for (int t = 0; t < T; ++t) {  // T is small (guidance rows)
      const int64_t p = q_pos_b[t];
      if (p >= 0) {
        if (g0 < 0) g0 = p;
        ++ng;
      }
    }
    sh.n_guid = ng;
    sh.g0 = g0;
  }
  __syncthreads();
  for (int64_t t0 = 0; t0 < N; t0 += kTile) {
    int flag[kItems];
    bool vis = false;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t j = t0 + int64_t(threadIdx.x) * kItems + i;
      const int m = j < N ? int(mod_b[j]) : 0;
      flag[i] = m != kPad;
      vis |= m == kVision;
    }
    int excl[kItems], agg;
    BlockScanI(sh.cub.scan).ExclusiveSum(flag, excl, agg);
    const int base = sh.running;
    long long last = -1;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t j = t0 + int64_t(threadIdx.x) * kItems + i;
      if (!flag[i]) continue;
      if (n_sink > 0 && int64_t(base) + excl[i] == n_sink - 1) sh.sink_last = j;  // one writer
      last = j;
    }
    if (last >= 0) atomicMax(&sh.last_real_p1, static_cast<unsigned long long>(last + 1));
    if (vis) sh.has_vision = 1;
    __syncthreads();
    if (threadIdx.x == 0) sh.running = base + agg;
    __syncthreads();
  }
  SampleInfo info;
  info.n_real = sh.running;
  info.sink_last = sh.sink_last;
  info.last_real = static_cast<int64_t>(sh.last_real_p1) - 1;
  info.has_vision = sh.has_vision != 0;
  info.n_guid = sh.n_guid;
  info.g0 = sh.g0;
  __syncthreads();
  return info;
}

// Budgets of sample b into keep[l*keep_stride], frac[l*frac_stride] (thread 0 only).
__device__ inline void sample_budgets(const Params& P, int b, const SampleInfo& info,
                                      double* work, int64_t* keep, int64_t keep_stride,
                                      double* frac, int64_t frac_stride) {
  (void)tgvkv::sample_layer_budgets(P.L, P.stats + int64_t(b) * 2, int64_t(P.B) * 2, 1,
                                    info.n_real, P.n_sink, info.evicts(P.n_sink), P.keep_ratio,
                                    P.budget_mode, P.redistribute, work, keep, keep_stride, frac,
                                    frac_stride);
}

// layer_budgets: grid (B), block kThreads, dynamic smem budget_smem_bytes(L).
__global__ void __launch_bounds__(kThreads) budgets_kernel(const Params P) {
  extern __shared__ double dyn[];
  __shared__ Shared sh;
  const int b = blockIdx.x;
  const SampleInfo info = sample_info(P.modality + int64_t(b) * P.N,
                                      P.q_pos + int64_t(b) * P.T, P.T, P.N, P.n_sink, sh);
  if (threadIdx.x == 0)
    sample_budgets(P, b, info, dyn, P.keep_out + b, P.B, P.keep_fraction + b, P.B);
}

__device__ __forceinline__ int bit_length(uint64_t x) { return x ? 64 - __clzll(x) : 0; }

// select_keep / evict: grid (L * B), block kThreads; dynamic smem budget_smem_bytes(L) when
// P.keep == nullptr (budgets computed here), else 0.
__global__ void __launch_bounds__(kThreads) select_kernel(const Params P) {
  extern __shared__ double dyn[];
  __shared__ Shared sh;
  const int lb = blockIdx.x;
  const int l = lb / P.B, b = lb - l * P.B;
  const int tid = threadIdx.x;
  const int64_t N = P.N;
  const int8_t* mod_b = P.modality + int64_t(b) * N;
  const float* sc = P.scores + int64_t(lb) * N;
  int64_t* out = P.keep_idx + int64_t(lb) * N;

  const SampleInfo info = sample_info(mod_b, P.q_pos + int64_t(b) * P.T, P.T, N, P.n_sink, sh);
  if (tid == 0) {
    int64_t keep;
    if (P.keep != nullptr) {
      keep = P.keep[lb];
    } else {
      double* work = dyn;
      int64_t* keep_all = reinterpret_cast<int64_t*>(dyn + 2 * P.L);
      double* frac_all = dyn + 3 * P.L;
      sample_budgets(P, b, info, work, keep_all, 1, frac_all, 1);
      keep = keep_all[l];
      if (P.keep_fraction != nullptr) P.keep_fraction[lb] = frac_all[l];
    }
    sh.keep_lb = keep;
  }
  __syncthreads();
  const int64_t n_real = info.n_real;
  const int64_t n_cand = n_real >= P.n_sink + 2 ? n_real - P.n_sink - 1 : 0;
  const int64_t forget = tgvkv::select_forget(n_real, sh.keep_lb, n_cand);  // any int64 keep
  const int64_t lo = info.sink_last, hi = info.last_real;  // candidates: lo < j < hi, real
  const int ib = bit_length(static_cast<uint64_t>(N > 1 ? N - 1 : 1));  // slot bits
  auto key_of = [&](int64_t j, int m) -> uint64_t {
    const uint64_t k = tgvkv::rank_key(m == kText, sc[j], 0);
    return ((k >> 31) << ib) | static_cast<uint64_t>(j);  // 33 + ib bits, unique
  };

  // ---- radix select of the forget-th smallest key (1-based) among the candidates ----
  uint64_t thresh = 0;
  const bool any_drop = forget > 0;
  if (any_drop) {
    const int nbits = 33 + ib;
    const int passes = (nbits + 7) / 8;
    if (tid == 0) {
      sh.prefix = 0;
      sh.mask = 0;
      sh.remaining = int(forget);
    }
    for (int pass = passes - 1; pass >= 0; --pass) {
      const int shift = 8 * pass;
      for (int i = tid; i < 256; i += kThreads) sh.hist[i] = 0;
      __syncthreads();
      const uint64_t prefix = sh.prefix, mask = sh.mask;
      for (int64_t j = tid; j < N; j += kThreads) {  // coalesced; order irrelevant for counts
        const int m = int(mod_b[j]);
        if (m == kPad || j <= lo || j >= hi) continue;
        const uint64_t k = key_of(j, m);
        if ((k & mask) == prefix) atomicAdd(&sh.hist[(k >> shift) & 255u], 1);
      }
      __syncthreads();
      if (tid < 32) {  // warp 0: find the digit holding the remaining-th key
        int c[8], s = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          c[i] = sh.hist[tid * 8 + i];
          s += c[i];
        }
        int incl = s;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int v = __shfl_up_sync(0xffffffffu, incl, o);
          if (tid >= o) incl += v;
        }
        const int excl = incl - s;
        const int r = sh.remaining;
        __syncwarp();
        if (excl < r && r <= incl) {
          int acc = excl;
          for (int i = 0; i < 8; ++i) {
            if (acc + c[i] >= r) {
              sh.prefix = prefix | (static_cast<uint64_t>(tid * 8 + i) << shift);
              sh.mask = mask | (255ull << shift);
              sh.remaining = r - acc;
              break;
            }
            acc += c[i];
          }
        }
      }
      __syncthreads();
    }
    thresh = sh.prefix;
  }

  // ---- stable compaction of the kept slots ----
  if (tid == 0) sh.running = 0;
  __syncthreads();
  int n_after_g0 = 0;
  const int64_t g0 = info.g0;
  for (int64_t t0 = 0; t0 < N; t0 += kTile) {
    int kept[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t j = t0 + int64_t(tid) * kItems + i;
      int k = 0;
      if (j < N) {
        const int m = int(mod_b[j]);
        if (m != kPad) {
          const bool cand = j > lo && j < hi;
          k = !(any_drop && cand && key_of(j, m) <= thresh);
        }
      }
      kept[i] = k;
    }
    int excl[kItems], agg;
    BlockScanI(sh.cub.scan).ExclusiveSum(kept, excl, agg);
    const int base = sh.running;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t j = t0 + int64_t(tid) * kItems + i;
      if (!kept[i]) continue;
      out[base + excl[i]] = j;
      n_after_g0 += (g0 >= 0 && j >= g0) ? 1 : 0;
    }
    __syncthreads();
    if (tid == 0) sh.running = base + agg;
    __syncthreads();
  }
  const int total = sh.running;
  for (int64_t i = total + tid; i < N; i += kThreads) out[i] = -1;
  const int n_prot = BlockReduceI(sh.cub.reduce).Sum(n_after_g0);
  if (tid == 0) {
    P.n_protected[lb] = g0 >= 0 ? (n_prot > 1 ? n_prot : 1) : 1;
    if (P.n_kept != nullptr) P.n_kept[lb] = total;
  }
}

}  // namespace select

// ---------------------------------------------------------------------------------------------
// Launchers (declared in launch.cuh). Defined here, next to the kernels they instantiate: this
// header is included by select_keep.cu only (and by the CUDA emulator).
// ---------------------------------------------------------------------------------------------
cudaError_t launch_budgets(const select::Params& p, cudaStream_t st) {
  if (p.B == 0 || p.L == 0) return cudaSuccess;
  const size_t smem = select::budget_smem_bytes(p.L);
  TGVKV_CUDA_TRY(ensure_dynamic_smem(select::budgets_kernel, smem));
  select::budgets_kernel<<<p.B, select::kThreads, smem, st>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_select(const select::Params& p, cudaStream_t st) {
  const int64_t blocks = int64_t(p.L) * p.B;
  if (blocks == 0) return cudaSuccess;
  const size_t smem = p.keep == nullptr ? select::budget_smem_bytes(p.L) : 0;
  TGVKV_CUDA_TRY(ensure_dynamic_smem(select::select_kernel, smem));
  select::select_kernel<<<unsigned(blocks), select::kThreads, smem, st>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace tgvkv
