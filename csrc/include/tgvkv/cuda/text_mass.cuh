// Torch-free CUDA kernels of text_score="all_queries" (SPEC §1.3): the attention mass every text
// slot p receives from ALL query rows,
//   scores[l, b, p] = 1/Hq · Σ_h Σ_{i >= p, i not pad} softmax_j(scale · q[b, h, i] · k[b, h/g, j])[p]
// with the softmax over the keys j <= i that are not pad (the released code's H2O-style column
// sum), never storing N×N. Run right after launch_score (score.cuh), whose text scores of the
// same layers it overwrites; the vision scores and (S, I) stay the guidance rows'.
//
// Passes (one launch each, all layers of a group × samples in one grid):
//   1. rowstat_kernel: per (row tile of 64 slots, b, l) and head: online max / sum of exp of
//      every row over its causal keys (64-key chunks) -> rowstat [L, B, Hq, N] (max, 1/sum).
//   2. mass_kernel:    per (tile of 64 text slots, row tile, b, l): the probabilities of the
//      tile's rows at those text columns, summed over heads in order and over the 64 rows in
//      order -> part [L, B, nrt, N] (double). Row tiles entirely before the text tile skip the
//      dot products (causality).
//   3. mass_finalize_kernel: per text column: Σ over row tiles in order, / Hq -> scores.
// Logits use the tile engines of score.cuh (tensor cores for fp16/bf16, fp32 FMA for fp32).
// Every reduction has a fixed order (no float atomics): results are run-to-run identical.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "tgvkv/common.h"
#include "tgvkv/cuda/common.cuh"
#include "tgvkv/cuda/launch.cuh"
#include "tgvkv/cuda/score.cuh"

namespace tgvkv {
namespace cuda {
namespace textmass {

using score::Engine;

struct Shared {
  float As[kTQ][kNC + 1];  // the tile's probabilities summed over heads (pass 2)
  int64_t qrow[kTQ];       // slot of tile row r, -1 beyond N or at a pad slot
  int64_t kslot[kNC];      // key slot of tile column c, -1 if none
  int kmod[kNC];           // modality of that slot (0 for none)
  float rm[kTQ], ril[kTQ];
};

__device__ __forceinline__ bool allowed(const Shared& sh, int r, int c) {
  const int64_t i = sh.qrow[r], j = sh.kslot[c];
  return i >= 0 && j >= 0 && j <= i && sh.kmod[c] != kPad;
}

// Rows of row tile rt: slots [rt * kTQ, rt * kTQ + kTQ) that exist and are not pad.
__device__ __forceinline__ void set_rows(Shared& sh, const int8_t* mod_b, int rt, int64_t N) {
  if (threadIdx.x < kTQ) {
    const int64_t i = int64_t(rt) * kTQ + threadIdx.x;
    sh.qrow[threadIdx.x] = (i < N && mod_b[i] != kPad) ? i : -1;
  }
}

// --------------------------------------------------------------------------------------------
// Pass 1: (max, 1/sum) of every (head, row). grid (nrt, B, L), block kThreads.
// --------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) rowstat_kernel(const Params P) {
  extern __shared__ __align__(128) unsigned char dyn_smem[];
  Engine<T> eng(dyn_smem, P);
  __shared__ Shared sh;
  const int rt = blockIdx.x, b = blockIdx.y, l = blockIdx.z;
  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  const int g = P.Hq / P.Hkv;
  const int8_t* mod_b = P.modality + int64_t(b) * P.N;
  const View4 qv = P.q[l], kv = P.k[l];
  const T* qb = static_cast<const T*>(qv.ptr) + int64_t(b) * qv.s0;
  const T* kb = static_cast<const T*>(kv.ptr) + int64_t(b) * kv.s0;
  float2* rs = P.rowstat + (int64_t(l) * P.B + b) * P.Hq * P.N;
  const int64_t r_end = int64_t(rt + 1) * kTQ < P.N ? int64_t(rt + 1) * kTQ : P.N;
  const int nchunks = int(ceil_div<int64_t>(r_end, kNC));  // keys [0, r_end): causal
  set_rows(sh, mod_b, rt, P.N);
  for (int h = 0; h < P.Hq; ++h) {
    float m[4], s[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) m[i] = -INFINITY, s[i] = 0.f;
    for (int c = 0; c < nchunks; ++c) {
      __syncthreads();
      if (tid < kNC) {
        const int64_t j = int64_t(c) * kNC + tid;
        sh.kslot[tid] = j < P.N ? j : -1;
        sh.kmod[tid] = j < P.N ? int(mod_b[j]) : 0;
      }
      __syncthreads();
      eng.load_k(kb + int64_t(h / g) * kv.s1, sh.kslot, kv.s2, kv.s3, P.vec_k);
      if (c == 0) eng.load_q(qb + int64_t(h) * qv.s1, sh.qrow, qv.s2, qv.s3, P.vec_q);
      __syncthreads();
      float acc[4][4];
      eng.dot(ty, tx, acc);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = ty + 16 * i;
        bool ok[4];
        float mt = -INFINITY;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          ok[j] = allowed(sh, r, tx + 16 * j);
          acc[i][j] = __fmul_rn(acc[i][j], P.scale);
          if (ok[j]) mt = fmaxf(mt, acc[i][j]);
        }
        mt = warp_max(mt, 16);
        float st = 0.f;
        if (mt != -INFINITY) {
#pragma unroll
          for (int j = 0; j < 4; ++j)
            if (ok[j]) st += expf(acc[i][j] - mt);
        }
        st = warp_sum(st, 16);  // every lane of the 16 holds the row's (mt, st)
        if (st > 0.f) {
          if (s[i] > 0.f) {
            const float M = fmaxf(m[i], mt);
            s[i] = s[i] * expf(m[i] - M) + st * expf(mt - M);
            m[i] = M;
          } else {
            m[i] = mt;
            s[i] = st;
          }
        }
      }
    }
    if (tx == 0) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t row = sh.qrow[ty + 16 * i];
        if (row >= 0)
          rs[int64_t(h) * P.N + row] = s[i] > 0.f ? make_float2(m[i], 1.f / s[i])
                                                  : make_float2(-INFINITY, 0.f);
      }
    }
  }
}

// --------------------------------------------------------------------------------------------
// Pass 2: per (text tile, row tile): Σ_rows Σ_heads P_h[i, text slot]. grid (nct * nrt, B, L).
// --------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) mass_kernel(const Params P) {
  extern __shared__ __align__(128) unsigned char dyn_smem[];
  Engine<T> eng(dyn_smem, P);
  __shared__ Shared sh;
  const int ct = blockIdx.x / P.nrt, rt = blockIdx.x % P.nrt, b = blockIdx.y, l = blockIdx.z;
  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  const int g = P.Hq / P.Hkv;
  const int8_t* mod_b = P.modality + int64_t(b) * P.N;
  const int64_t* ts_b = P.text_slots + int64_t(b) * P.N;
  const View4 qv = P.q[l], kv = P.k[l];
  const T* qb = static_cast<const T*>(qv.ptr) + int64_t(b) * qv.s0;
  const T* kb = static_cast<const T*>(kv.ptr) + int64_t(b) * kv.s0;
  const int64_t lb = int64_t(l) * P.B + b;
  const float2* rs = P.rowstat + lb * P.Hq * P.N;
  double* part = P.part + (lb * P.nrt + rt) * P.N;
  const int64_t c = int64_t(ct) * kNC + tid;  // this thread's text column (threads < kNC)
  if (tid < kNC) {
    const int64_t j = c < P.N ? ts_b[c] : -1;
    sh.kslot[tid] = j;
    sh.kmod[tid] = j >= 0 ? int(kText) : 0;
  }
  set_rows(sh, mod_b, rt, P.N);
  __syncthreads();
  if (sh.kslot[0] < 0) return;  // block-uniform: no text column in this tile (none after it)
  const int64_t last_row = (int64_t(rt + 1) * kTQ < P.N ? int64_t(rt + 1) * kTQ : P.N) - 1;
  const bool active = sh.kslot[0] <= last_row;  // block-uniform: some row sees some column
  float A[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) A[i][j] = 0.f;
  for (int h = 0; active && h < P.Hq; ++h) {
    __syncthreads();
    if (h % g == 0) eng.load_k(kb + int64_t(h / g) * kv.s1, sh.kslot, kv.s2, kv.s3, P.vec_k);
    eng.load_q(qb + int64_t(h) * qv.s1, sh.qrow, qv.s2, qv.s3, P.vec_q);
    if (tid < kTQ) {
      const int64_t row = sh.qrow[tid];
      const float2 f = row >= 0 ? rs[int64_t(h) * P.N + row] : make_float2(-INFINITY, 0.f);
      sh.rm[tid] = f.x;
      sh.ril[tid] = f.y;
    }
    __syncthreads();
    float acc[4][4];
    eng.dot(ty, tx, acc);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = ty + 16 * i;
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (allowed(sh, r, tx + 16 * j))
          A[i][j] += expf(__fmul_rn(acc[i][j], P.scale) - sh.rm[r]) * sh.ril[r];
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) sh.As[ty + 16 * i][tx + 16 * j] = A[i][j];
  __syncthreads();
  if (tid < kNC && c < P.N) {
    double sum = 0.0;
    for (int r = 0; r < kTQ; ++r) sum += double(sh.As[r][tid]);
    part[c] = sum;
  }
}

// --------------------------------------------------------------------------------------------
// Pass 3: scores[text slot] = Σ_{row tiles, in order} part / Hq. grid (ceil(N / 256), B, L).
// --------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kFinThreads) mass_finalize_kernel(const Params P) {
  const int b = blockIdx.y, l = blockIdx.z;
  const int64_t c = int64_t(blockIdx.x) * kFinThreads + threadIdx.x;
  if (c >= P.N) return;
  const int64_t lb = int64_t(l) * P.B + b;
  const int64_t j = P.text_slots[int64_t(b) * P.N + c];
  if (j < 0) return;
  const double* part = P.part + lb * P.nrt * P.N + c;  // every row tile wrote column c
  double sum = 0.0;
  for (int rt = 0; rt < P.nrt; ++rt) sum += part[int64_t(rt) * P.N];
  P.scores[lb * P.N + j] = float(sum / double(P.Hq));
}

template <typename T>
cudaError_t launch_t(const Params& p, cudaStream_t st) {
  const size_t smem = score::dyn_smem_bytes<T>(p);
  TGVKV_CUDA_TRY(ensure_dynamic_smem(rowstat_kernel<T>, smem));
  TGVKV_CUDA_TRY(ensure_dynamic_smem(mass_kernel<T>, smem));
  const dim3 g1(p.nrt, p.B, p.L), g2(unsigned(p.nct) * unsigned(p.nrt), p.B, p.L),
      g3(unsigned((p.N + kFinThreads - 1) / kFinThreads), p.B, p.L);
  if (!empty_grid(g1)) {
    rowstat_kernel<T><<<g1, kThreads, smem, st>>>(p);
    TGVKV_CUDA_TRY(cudaGetLastError());
  }
  if (!empty_grid(g2)) {
    mass_kernel<T><<<g2, kThreads, smem, st>>>(p);
    TGVKV_CUDA_TRY(cudaGetLastError());
  }
  if (!empty_grid(g3)) {
    mass_finalize_kernel<<<g3, kFinThreads, 0, st>>>(p);
    TGVKV_CUDA_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

}  // namespace textmass

cudaError_t launch_text_mass(const textmass::Params& p, DType dtype, cudaStream_t st) {
  if (p.L == 0 || p.B == 0 || p.N == 0) return cudaSuccess;
  switch (dtype) {
    case DType::F32: return textmass::launch_t<float>(p, st);
    case DType::F16: return textmass::launch_t<half_t>(p, st);
    case DType::BF16: return textmass::launch_t<bf16_t>(p, st);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace tgvkv
