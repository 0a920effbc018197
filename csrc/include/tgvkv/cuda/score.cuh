// Torch-free CUDA kernels of score_text_vision (and of the scoring stage of evict).
//
// What is computed (SPEC §1-2, reference.score_text_vision): for every layer l and sample b, the
// guidance rows t (slot p_t = q_pos[b, t]) of the causal head-averaged softmax attention
//   A[t, j] = 1/Hq · Σ_h softmax_j(scale · q[b, h, t] · k[b, h / g, j]),  j ≤ p_t, j not pad,
// then the text weights w_t = Σ_{u: p_u ≥ p_t} A[u, p_t] / #{u: p_u ≥ p_t}, the vision scores
// Σ_t w_t A[t, v], the text scores Σ_t A[t, j], and S, I of the text->vision block. Neither N×N
// nor T×N is ever written: the kernels recompute logits instead.
//
// Passes (one launch each, all layers of a group × samples × key chunks in one grid):
//   1. stats_kernel:   per (key split, b, l): online max / sum of exp of every (head, row) over
//                      the split's key chunks -> part [L, B, nsplit, Hq, T] (m, l).
//   2. weights_kernel: per (group of 64 guidance columns, b, l): combines the splits in a fixed
//                      order into fin [L, B, Hq, T] (m, 1/l), then the T×T block of A at the
//                      guidance columns -> w [L, B, T].
//   3. scores_kernel:  per (key chunk of 64 slots, b, l): the chunk's A tile for all rows, summed
//                      over heads in a fixed order, reduced to the chunk's scores and to partial
//                      statistics rowpart [L, B, nchunks, T], chunkpart [L, B, nchunks, 3].
//   4. finalize_kernel: per (b, l): S and I from the partials, summed in a fixed order.
// Every reduction has a fixed order (no float atomics): results are run-to-run identical.
//
// Logits of a 64-row × 64-key tile: fp16/bf16 inputs use tensor cores (WMMA m16n16k16 from the
// raw 16-bit shared-memory tiles, fp32 accumulation: the products are exact, only the summation
// order differs from fp32 FMA); fp32 inputs use CUDA-core fp32 FMA from fp32 tiles (4×4 outputs
// per thread; tf32 would cost precision). Both engines hand every thread the same 4×4 logits. q_pos entries outside [0, N) are treated as unused rows (-1): on CUDA
// they are not detected (that would need a host sync); they can never cause an out-of-bounds
// access.
#pragma once

#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "tgvkv/common.h"
#include "tgvkv/cuda/common.cuh"
#include "tgvkv/cuda/launch.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

namespace tgvkv {
namespace cuda {
namespace score {



// Fixed-size shared state of a block (the Q/K tiles are dynamic).
struct Shared {
  float As[kTQ][kNC + 1];  // head-averaged A tile (pass 2, 3)
  int64_t qrow[kTQ];       // q row index t of tile row r, -1 beyond T
  int64_t qp[kTQ];         // slot p_t of tile row r, -1 if unused
  int64_t kslot[kNC];      // key slot of tile column c, -1 if none
  int kmod[kNC];           // modality of that slot (0 for none)
  float rm[kTQ], ril[kTQ], ws[kTQ];
  double red[3][kNC];
  int64_t red_i[kThreads / 32];
};

__device__ __forceinline__ bool row_valid(int64_t p, int64_t N) { return p >= 0 && p < N; }

// Max valid q_pos of sample b (block-wide, all threads get it). -1 if none.
__device__ __forceinline__ int64_t block_max_qpos(const int64_t* q_pos_b, int T, int64_t N,
                                                  Shared& sh) {
  int64_t m = -1;
  for (int t = threadIdx.x; t < T; t += blockDim.x) {
    const int64_t p = q_pos_b[t];
    if (row_valid(p, N) && p > m) m = p;
  }
  for (int o = 16; o > 0; o >>= 1) {
    const int64_t v = __shfl_xor_sync(0xffffffffu, m, o);
    m = v > m ? v : m;
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sh.red_i[threadIdx.x >> 5] = m;
  __syncthreads();
  int64_t r = -1;
  for (int i = 0; i < int(blockDim.x >> 5); ++i) r = sh.red_i[i] > r ? sh.red_i[i] : r;
  __syncthreads();
  return r;
}

// Loads R rows of D elements (row i at src + rows[i] * rs, element d at + d * sd; rows[i] < 0
// gives zeros) as fp32 into dst[R][DP], zero-padding columns [D, D4).
template <typename T>
__device__ __forceinline__ void load_tile(float* __restrict__ dst, const T* __restrict__ src,
                                          const int64_t* rows, int64_t rs, int64_t sd, int R,
                                          int D, int D4, int DP, bool vec) {
  if (vec) {
    constexpr int VE = Vec16<T>::kElems;
    const int nv = D / VE;
    for (int idx = threadIdx.x; idx < R * nv; idx += blockDim.x) {
      const int r = idx / nv, c = idx - r * nv;
      float f[VE];
      const int64_t row = rows[r];
      if (row >= 0) {
        Vec16<T>::load(src + row * rs + int64_t(c) * VE, f);
      } else {
#pragma unroll
        for (int i = 0; i < VE; ++i) f[i] = 0.f;
      }
      float4* d = reinterpret_cast<float4*>(dst + r * DP + c * VE);
#pragma unroll
      for (int i = 0; i < VE / 4; ++i) d[i] = make_float4(f[4 * i], f[4 * i + 1], f[4 * i + 2], f[4 * i + 3]);
    }
  } else {
    for (int idx = threadIdx.x; idx < R * D4; idx += blockDim.x) {
      const int r = idx / D4, c = idx - r * D4;
      const int64_t row = rows[r];
      dst[r * DP + c] = (row >= 0 && c < D) ? load_f(src + row * rs + int64_t(c) * sd) : 0.f;
    }
  }
}

// acc[i][j] = Qs[ty + 16 i] · Ks[tx + 16 j] over D4 (fixed order over d).
__device__ __forceinline__ void tile_dot(const float* __restrict__ Qs,
                                         const float* __restrict__ Ks, int DP, int D4, int ty,
                                         int tx, float (&acc)[4][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  const float* qp = Qs + ty * DP;
  const float* kp = Ks + tx * DP;
#pragma unroll 2
  for (int d = 0; d < D4; d += 4) {
    float4 a[4], b[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = *reinterpret_cast<const float4*>(qp + 16 * i * DP + d);
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] = *reinterpret_cast<const float4*>(kp + 16 * j * DP + d);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float s = acc[i][j];
        s = fmaf(a[i].x, b[j].x, s);
        s = fmaf(a[i].y, b[j].y, s);
        s = fmaf(a[i].z, b[j].z, s);
        s = fmaf(a[i].w, b[j].w, s);
        acc[i][j] = s;
      }
  }
}

constexpr int kSP = kNC + 4;  // pitch of the fp32 logits tile written by the tensor cores

// Copies R rows of D 16-bit elements as raw bits into dst[R][LDH], zero-padding [D, D16).
__device__ __forceinline__ void load_tile_raw16(uint16_t* __restrict__ dst,
                                                const uint16_t* __restrict__ src,
                                                const int64_t* rows, int64_t rs, int64_t sd,
                                                int R, int D, int D16, int LDH, bool vec) {
  if (vec) {  // D % 8 == 0, 16-byte aligned rows
    const int nv = D / 8, np = (D16 - D) / 8;
    for (int idx = threadIdx.x; idx < R * nv; idx += blockDim.x) {
      const int r = idx / nv, c = idx - r * nv;
      const int64_t row = rows[r];
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (row >= 0) v = __ldg(reinterpret_cast<const uint4*>(src + row * rs + int64_t(c) * 8));
      *reinterpret_cast<uint4*>(dst + r * LDH + c * 8) = v;
    }
    for (int idx = threadIdx.x; idx < R * np; idx += blockDim.x) {
      const int r = idx / np, c = idx - r * np;
      *reinterpret_cast<uint4*>(dst + r * LDH + D + c * 8) = make_uint4(0u, 0u, 0u, 0u);
    }
  } else {
    for (int idx = threadIdx.x; idx < R * D16; idx += blockDim.x) {
      const int r = idx / D16, c = idx - r * D16;
      const int64_t row = rows[r];
      dst[r * LDH + c] = (row >= 0 && c < D) ? __ldg(src + row * rs + int64_t(c) * sd) : uint16_t(0);
    }
  }
}

// Tile engines: shared-memory layout, tile loads and the 64×64 logits tile of one head.
// Every thread calls every method (dot may contain a barrier).
template <typename T>
struct Engine;

// fp32 inputs: CUDA-core fp32 FMA.
template <>
struct Engine<float> {
  float* Qs;
  float* Ks;
  int D, D4, DP;
  template <typename PP>  // score::Params or textmass::Params (the tile sizes)
  static size_t smem_bytes(const PP& p) { return size_t(kTQ + kNC) * p.DP * sizeof(float); }
  template <typename PP>
  __device__ Engine(unsigned char* smem, const PP& p)
      : Qs(reinterpret_cast<float*>(smem)), Ks(reinterpret_cast<float*>(smem) + kTQ * p.DP),
        D(p.D), D4(p.D4), DP(p.DP) {}
  __device__ void load_q(const float* src, const int64_t* rows, int64_t rs, int64_t sd, bool vec) {
    load_tile(Qs, src, rows, rs, sd, kTQ, D, D4, DP, vec);
  }
  __device__ void load_k(const float* src, const int64_t* rows, int64_t rs, int64_t sd, bool vec) {
    load_tile(Ks, src, rows, rs, sd, kNC, D, D4, DP, vec);
  }
  // Called after a barrier that follows the loads.
  __device__ void dot(int ty, int tx, float (&acc)[4][4]) { tile_dot(Qs, Ks, DP, D4, ty, tx, acc); }
};

template <typename T>
struct WmmaType;
template <>
struct WmmaType<half_t> {
  using type = __half;
};
template <>
struct WmmaType<bf16_t> {
  using type = __nv_bfloat16;
};

// fp16 / bf16 inputs: tensor cores on the raw 16-bit tiles. 8 warps, 2 of the 4×4 16×16 output
// tiles each, written to an fp32 tile that every thread then reads its 4×4 logits from.
template <typename T>
struct Engine16 {
  uint16_t* Qh;
  uint16_t* Kh;
  float* S;
  int D, D16, LDH;
  template <typename PP>  // score::Params or textmass::Params (the tile sizes)
  static size_t smem_bytes(const PP& p) {
    return size_t(kTQ + kNC) * p.LDH * sizeof(uint16_t) + size_t(kTQ) * kSP * sizeof(float);
  }
  template <typename PP>
  __device__ Engine16(unsigned char* smem, const PP& p)
      : Qh(reinterpret_cast<uint16_t*>(smem)),
        Kh(reinterpret_cast<uint16_t*>(smem) + kTQ * p.LDH),
        S(reinterpret_cast<float*>(smem + size_t(kTQ + kNC) * p.LDH * sizeof(uint16_t))),
        D(p.D), D16(p.D16), LDH(p.LDH) {}
  __device__ void load_q(const T* src, const int64_t* rows, int64_t rs, int64_t sd, bool vec) {
    load_tile_raw16(Qh, reinterpret_cast<const uint16_t*>(src), rows, rs, sd, kTQ, D, D16, LDH, vec);
  }
  __device__ void load_k(const T* src, const int64_t* rows, int64_t rs, int64_t sd, bool vec) {
    load_tile_raw16(Kh, reinterpret_cast<const uint16_t*>(src), rows, rs, sd, kNC, D, D16, LDH, vec);
  }
  // Called after a barrier that follows the loads; contains a barrier itself. The previous
  // head's readers of S are past the loop-head barrier before S is written again.
  __device__ void dot(int ty, int tx, float (&acc)[4][4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    // no bf16 tensor cores before sm_80: fp32 FMA over the same 16-bit tiles
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        float s = 0.f;
        for (int d = 0; d < D16; ++d)
          s = fmaf(to_float(T{Qh[(ty + 16 * i) * LDH + d]}), to_float(T{Kh[(tx + 16 * j) * LDH + d]}), s);
        acc[i][j] = s;
      }
#else
    namespace wmma = nvcuda::wmma;
    using WT = typename WmmaType<T>::type;
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int t = warp * 2 + u, mi = t >> 2, nj = t & 3;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      wmma::fill_fragment(c, 0.f);
      for (int kk = 0; kk < D16; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::col_major> b;
        wmma::load_matrix_sync(a, reinterpret_cast<const WT*>(Qh + mi * 16 * LDH + kk), LDH);
        wmma::load_matrix_sync(b, reinterpret_cast<const WT*>(Kh + nj * 16 * LDH + kk), LDH);
        wmma::mma_sync(c, a, b, c);
      }
      wmma::store_matrix_sync(S + mi * 16 * kSP + nj * 16, c, kSP, wmma::mem_row_major);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = S[(ty + 16 * i) * kSP + tx + 16 * j];
#endif
  }
};
template <>
struct Engine<half_t> : Engine16<half_t> {
  using Engine16<half_t>::Engine16;
};
template <>
struct Engine<bf16_t> : Engine16<bf16_t> {
  using Engine16<bf16_t>::Engine16;
};

template <typename T, typename PP>
inline size_t dyn_smem_bytes(const PP& p) {
  return Engine<T>::smem_bytes(p);
}

// Key tile columns: consecutive slots [c0, c0 + kNC) of sample b.
__device__ __forceinline__ void set_chunk_cols(Shared& sh, const int8_t* mod_b, int64_t c0,
                                               int64_t N) {
  if (threadIdx.x < kNC) {
    const int64_t j = c0 + threadIdx.x;
    sh.kslot[threadIdx.x] = j < N ? j : -1;
    sh.kmod[threadIdx.x] = j < N ? int(mod_b[j]) : 0;
  }
}

// Query tile rows [tt*kTQ, tt*kTQ + kTQ) of sample b.
__device__ __forceinline__ void set_rows(Shared& sh, const int64_t* q_pos_b, int tt, int T,
                                         int64_t N) {
  if (threadIdx.x < kTQ) {
    const int t = tt * kTQ + threadIdx.x;
    const int64_t p = t < T ? q_pos_b[t] : -1;
    sh.qrow[threadIdx.x] = t < T ? t : -1;
    sh.qp[threadIdx.x] = row_valid(p, N) ? p : -1;
  }
}

__device__ __forceinline__ bool allowed(const Shared& sh, int r, int c) {
  const int64_t p = sh.qp[r];
  const int64_t s = sh.kslot[c];
  return p >= 0 && s >= 0 && s <= p && sh.kmod[c] != kPad;
}

// --------------------------------------------------------------------------------------------
// Pass 1: running (max, sum) of every (head, row) over the split's key chunks.
// grid (nsplit, B, L), block kThreads.
// --------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) stats_kernel(const Params P) {
  extern __shared__ __align__(128) unsigned char dyn_smem[];
  Engine<T> eng(dyn_smem, P);
  __shared__ Shared sh;
  const int split = blockIdx.x, b = blockIdx.y, l = blockIdx.z;
  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  const int g = P.Hq / P.Hkv;
  const int64_t* q_pos_b = P.q_pos + int64_t(b) * P.T;
  const int8_t* mod_b = P.modality + int64_t(b) * P.N;
  const View4 qv = P.q[l], kv = P.k[l];
  const T* qb = static_cast<const T*>(qv.ptr) + int64_t(b) * qv.s0;
  const T* kb = static_cast<const T*>(kv.ptr) + int64_t(b) * kv.s0;
  float2* part = P.part + ((int64_t(l) * P.B + b) * P.nsplit + split) * int64_t(P.Hq) * P.T;

  for (int64_t i = tid; i < int64_t(P.Hq) * P.T; i += kThreads) part[i] = make_float2(-INFINITY, 0.f);
  const int64_t maxp = block_max_qpos(q_pos_b, P.T, P.N, sh);  // has barriers
  const int ntiles = ceil_div(P.T, kTQ);
  const int c_begin = split * P.chunks_per_split;
  const int c_end = min(P.nchunks, c_begin + P.chunks_per_split);

  for (int c = c_begin; c < c_end; ++c) {
    const int64_t c0 = int64_t(c) * kNC;
    if (c0 > maxp) break;  // block-uniform: later chunks are after every guidance slot
    __syncthreads();
    set_chunk_cols(sh, mod_b, c0, P.N);
    for (int tt = 0; tt < ntiles; ++tt) {
      __syncthreads();
      set_rows(sh, q_pos_b, tt, P.T, P.N);
      if (!__syncthreads_or(tid < kTQ && sh.qp[tid] >= c0)) continue;
      for (int h = 0; h < P.Hq; ++h) {
        __syncthreads();
        if (h % g == 0)
          eng.load_k(kb + int64_t(h / g) * kv.s1, sh.kslot, kv.s2, kv.s3, P.vec_k);
        eng.load_q(qb + int64_t(h) * qv.s1, sh.qrow, qv.s2, qv.s3, P.vec_q);
        __syncthreads();
        float acc[4][4];
        eng.dot(ty, tx, acc);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = ty + 16 * i;
          bool ok[4];
          float m = -INFINITY;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            ok[j] = allowed(sh, r, tx + 16 * j);
            acc[i][j] = __fmul_rn(acc[i][j], P.scale);
            if (ok[j]) m = fmaxf(m, acc[i][j]);
          }
          m = warp_max(m, 16);
          float s = 0.f;
          if (m != -INFINITY) {
#pragma unroll
            for (int j = 0; j < 4; ++j)
              if (ok[j]) s += expf(acc[i][j] - m);
          }
          s = warp_sum(s, 16);
          if (tx == 0 && sh.qp[r] >= 0 && s > 0.f) {
            float2* o = part + int64_t(h) * P.T + sh.qrow[r];
            float2 v = *o;  // only this thread ever touches this entry after the init barrier
            if (v.y > 0.f) {
              const float M = fmaxf(v.x, m);
              v.y = v.y * expf(v.x - M) + s * expf(m - M);
              v.x = M;
            } else {
              v = make_float2(m, s);
            }
            *o = v;
          }
        }
      }
    }
  }
}

// --------------------------------------------------------------------------------------------
// Pass 2: final (max, 1/sum) per (head, row) and the text weights w.
// grid (ceil(T / kNC), B, L), block kThreads. Block x handles guidance columns [x*64, x*64+64).
// --------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) weights_kernel(const Params P) {
  extern __shared__ __align__(128) unsigned char dyn_smem[];
  Engine<T> eng(dyn_smem, P);
  __shared__ Shared sh;
  const int x = blockIdx.x, b = blockIdx.y, l = blockIdx.z;
  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  const int g = P.Hq / P.Hkv;
  const int64_t* q_pos_b = P.q_pos + int64_t(b) * P.T;
  const int8_t* mod_b = P.modality + int64_t(b) * P.N;
  const View4 qv = P.q[l], kv = P.k[l];
  const T* qb = static_cast<const T*>(qv.ptr) + int64_t(b) * qv.s0;
  const T* kb = static_cast<const T*>(kv.ptr) + int64_t(b) * kv.s0;
  const int64_t lb = int64_t(l) * P.B + b;
  const float2* part = P.part + lb * P.nsplit * int64_t(P.Hq) * P.T;
  float2* fin = P.fin + lb * int64_t(P.Hq) * P.T;
  const float hq = float(P.Hq);

  if (tid < kNC) {  // gathered key columns: the guidance slots themselves
    const int t = x * kNC + tid;
    const int64_t p = t < P.T ? q_pos_b[t] : -1;
    const bool v = row_valid(p, P.N);
    sh.kslot[tid] = v ? p : -1;
    sh.kmod[tid] = v ? int(mod_b[p]) : 0;
  }
  float colacc = 0.f;
  const int ntiles = ceil_div(P.T, kTQ);
  for (int tt = 0; tt < ntiles; ++tt) {
    __syncthreads();
    set_rows(sh, q_pos_b, tt, P.T, P.N);
    float A[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) A[i][j] = 0.f;
    for (int h = 0; h < P.Hq; ++h) {
      __syncthreads();
      if (h % g == 0)
        eng.load_k(kb + int64_t(h / g) * kv.s1, sh.kslot, kv.s2, kv.s3, P.vec_k);
      eng.load_q(qb + int64_t(h) * qv.s1, sh.qrow, qv.s2, qv.s3, P.vec_q);
      if (tid < kTQ) {  // combine the splits in a fixed order
        const int64_t t = sh.qrow[tid];
        float m = -INFINITY, s = 0.f;
        if (t >= 0) {
          const float2* pp = part + int64_t(h) * P.T + t;
          for (int sp = 0; sp < P.nsplit; ++sp) m = fmaxf(m, pp[int64_t(sp) * P.Hq * P.T].x);
          if (m != -INFINITY)
            for (int sp = 0; sp < P.nsplit; ++sp) {
              const float2 v = pp[int64_t(sp) * P.Hq * P.T];
              if (v.y > 0.f) s += v.y * expf(v.x - m);
            }
        }
        const float il = s > 0.f ? 1.f / s : 0.f;
        sh.rm[tid] = m;
        sh.ril[tid] = il;
        if (x == 0 && t >= 0) fin[int64_t(h) * P.T + t] = make_float2(m, il);
      }
      __syncthreads();
      float acc[4][4];
      eng.dot(ty, tx, acc);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = ty + 16 * i;
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (allowed(sh, r, tx + 16 * j)) A[i][j] += expf(__fmul_rn(acc[i][j], P.scale) - sh.rm[r]) * sh.ril[r];
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) sh.As[ty + 16 * i][tx + 16 * j] = A[i][j] / hq;
    __syncthreads();
    if (tid < kNC)
      for (int r = 0; r < kTQ; ++r) colacc += sh.As[r][tid];
  }
  if (tid < kNC) {
    const int t = x * kNC + tid;
    if (t < P.T) {
      const int64_t p = sh.kslot[tid];
      float wv = 0.f;
      if (p >= 0) {
        int cnt = 0;
        for (int u = 0; u < P.T; ++u) {
          const int64_t pu = q_pos_b[u];
          cnt += (row_valid(pu, P.N) && pu >= p) ? 1 : 0;
        }
        wv = colacc / float(cnt);  // cnt >= 1: row t itself
      }
      P.w[lb * P.T + t] = wv;
    }
  }
}

// --------------------------------------------------------------------------------------------
// Pass 3: scores of one key chunk and its partial statistics.
// grid (nchunks, B, L), block kThreads.
// --------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) scores_kernel(const Params P) {
  extern __shared__ __align__(128) unsigned char dyn_smem[];
  Engine<T> eng(dyn_smem, P);
  __shared__ Shared sh;
  const int c = blockIdx.x, b = blockIdx.y, l = blockIdx.z;
  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  const int g = P.Hq / P.Hkv;
  const int64_t* q_pos_b = P.q_pos + int64_t(b) * P.T;
  const int8_t* mod_b = P.modality + int64_t(b) * P.N;
  const View4 qv = P.q[l], kv = P.k[l];
  const T* qb = static_cast<const T*>(qv.ptr) + int64_t(b) * qv.s0;
  const T* kb = static_cast<const T*>(kv.ptr) + int64_t(b) * kv.s0;
  const int64_t lb = int64_t(l) * P.B + b;
  const float2* fin = P.fin + lb * int64_t(P.Hq) * P.T;
  const float* wrow = P.w + lb * P.T;
  double* rowpart = P.rowpart + (lb * P.nchunks + c) * P.T;
  const int64_t c0 = int64_t(c) * kNC;
  const float hq = float(P.Hq);

  const int64_t maxp = block_max_qpos(q_pos_b, P.T, P.N, sh);
  set_chunk_cols(sh, mod_b, c0, P.N);
  double txt = 0.0, vis = 0.0, alog = 0.0;  // column accumulators (threads < kNC)
  const int ntiles = c0 > maxp ? 0 : ceil_div(P.T, kTQ);
  if (ntiles == 0)
    for (int t = tid; t < P.T; t += kThreads) rowpart[t] = 0.0;
  for (int tt = 0; tt < ntiles; ++tt) {
    __syncthreads();
    set_rows(sh, q_pos_b, tt, P.T, P.N);
    if (tid < kTQ) sh.ws[tid] = sh.qrow[tid] >= 0 ? wrow[sh.qrow[tid]] : 0.f;
    if (!__syncthreads_or(tid < kTQ && sh.qp[tid] >= c0)) {
      if (tid < kTQ && sh.qrow[tid] >= 0) rowpart[sh.qrow[tid]] = 0.0;
      continue;
    }
    float A[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) A[i][j] = 0.f;
    for (int h = 0; h < P.Hq; ++h) {
      __syncthreads();
      if (h % g == 0)
        eng.load_k(kb + int64_t(h / g) * kv.s1, sh.kslot, kv.s2, kv.s3, P.vec_k);
      eng.load_q(qb + int64_t(h) * qv.s1, sh.qrow, qv.s2, qv.s3, P.vec_q);
      if (tid < kTQ) {
        const int64_t t = sh.qrow[tid];
        const float2 f = t >= 0 ? fin[int64_t(h) * P.T + t] : make_float2(-INFINITY, 0.f);
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
          if (allowed(sh, r, tx + 16 * j)) A[i][j] += expf(__fmul_rn(acc[i][j], P.scale) - sh.rm[r]) * sh.ril[r];
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) sh.As[ty + 16 * i][tx + 16 * j] = A[i][j] / hq;
    __syncthreads();
    if (tid < kNC) {
      const bool isv = sh.kmod[tid] == kVision;
      for (int r = 0; r < kTQ; ++r) {
        const double a = double(sh.As[r][tid]);
        txt += a;
        vis += double(sh.ws[r]) * a;
        if (isv && a > 0.0) alog += a * log(a);
      }
    } else if (tid < kNC + kTQ) {
      const int r = tid - kNC;
      if (sh.qrow[r] >= 0) {
        double rp = 0.0;
        for (int j = 0; j < kNC; ++j)
          if (sh.kmod[j] == kVision) rp += double(sh.As[r][j]);
        rowpart[sh.qrow[r]] = rp;
      }
    }
  }
  __syncthreads();
  if (tid < kNC) {
    const int64_t j = sh.kslot[tid];
    const int mod = sh.kmod[tid];
    if (j >= 0) P.scores[lb * P.N + j] = mod == kVision ? float(vis) : (mod == kText ? float(txt) : 0.f);
    const double cv = mod == kVision ? txt : 0.0;
    sh.red[0][tid] = cv;
    sh.red[1][tid] = mod == kVision ? alog : 0.0;
    sh.red[2][tid] = cv > 0.0 ? cv * log(cv) : 0.0;
  }
  __syncthreads();
  if (tid < 3) {
    double s = 0.0;
    for (int j = 0; j < kNC; ++j) s += sh.red[tid][j];
    P.chunkpart[(lb * P.nchunks + c) * 3 + tid] = s;
  }
}

// --------------------------------------------------------------------------------------------
// Pass 4: S and I per (b, l): I = (Σ a log a + S log S - Σ_t r_t log r_t - Σ_v c_v log c_v) / S
// (the mutual information of p = A / S with its marginals, expanded). grid (B, L), kThreads.
// --------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads) finalize_kernel(const Params P) {
  __shared__ double red[kThreads];
  __shared__ int cnt[2][kThreads];  // valid guidance rows, vision slots
  const int b = blockIdx.x, l = blockIdx.y;
  const int64_t lb = int64_t(l) * P.B + b;
  const double* rowpart = P.rowpart + lb * P.nchunks * P.T;
  const double* chunkpart = P.chunkpart + lb * P.nchunks * 3;
  const int64_t* q_pos_b = P.q_pos + int64_t(b) * P.T;
  const int8_t* mod_b = P.modality + int64_t(b) * P.N;
  double rl = 0.0;
  int nrow = 0, nvis = 0;
  for (int t = threadIdx.x; t < P.T; t += kThreads) {
    double r = 0.0;
    for (int c = 0; c < P.nchunks; ++c) r += rowpart[int64_t(c) * P.T + t];
    if (r > 0.0) rl += r * log(r);
    nrow += row_valid(q_pos_b[t], P.N) ? 1 : 0;
  }
  for (int64_t j = threadIdx.x; j < P.N; j += kThreads) nvis += mod_b[j] == kVision ? 1 : 0;
  red[threadIdx.x] = rl;
  cnt[0][threadIdx.x] = nrow;
  cnt[1][threadIdx.x] = nvis;
  __syncthreads();
  for (int o = kThreads / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) {
      red[threadIdx.x] += red[threadIdx.x + o];
      cnt[0][threadIdx.x] += cnt[0][threadIdx.x + o];
      cnt[1][threadIdx.x] += cnt[1][threadIdx.x + o];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    double S = 0.0, AL = 0.0, CL = 0.0;
    for (int c = 0; c < P.nchunks; ++c) {
      S += chunkpart[c * 3 + 0];
      AL += chunkpart[c * 3 + 1];
      CL += chunkpart[c * 3 + 2];
    }
    // one guidance row or one vision slot: p(t, v) = p(t) p(v) exactly, so I = 0 (not rounding
    // noise; as the CPU op and the reference)
    const bool can = cnt[0][0] >= 2 && cnt[1][0] >= 2;
    double I = S > 0.0 && can ? (AL + S * log(S) - red[0] - CL) / S : 0.0;
    if (I < 0.0) I = 0.0;  // MI >= 0: a negative value is rounding noise (as the CPU op)
    P.stats[lb * 2 + 0] = float(S);
    P.stats[lb * 2 + 1] = float(I);
  }
}

}  // namespace score

// ---------------------------------------------------------------------------------------------
// Launcher (declared in launch.cuh). Defined here, next to the kernels it instantiates: this
// header is included by score_text_vision.cu only (and by the CUDA emulator).
// ---------------------------------------------------------------------------------------------
namespace score {

template <typename T>
cudaError_t launch_t(const Params& p, cudaStream_t st) {
  const size_t smem = dyn_smem_bytes<T>(p);
  // > 48 KB of dynamic shared memory needs an opt-in (done once per kernel and device).
  TGVKV_CUDA_TRY(ensure_dynamic_smem(stats_kernel<T>, smem));
  TGVKV_CUDA_TRY(ensure_dynamic_smem(weights_kernel<T>, smem));
  TGVKV_CUDA_TRY(ensure_dynamic_smem(scores_kernel<T>, smem));
  const dim3 g1(p.nsplit, p.B, p.L), g2((p.T + kNC - 1) / kNC, p.B, p.L), g3(p.nchunks, p.B, p.L),
      g4(p.B, p.L);
  if (!empty_grid(g1)) {
    stats_kernel<T><<<g1, kThreads, smem, st>>>(p);
    TGVKV_CUDA_TRY(cudaGetLastError());
  }
  if (!empty_grid(g2)) {
    weights_kernel<T><<<g2, kThreads, smem, st>>>(p);
    TGVKV_CUDA_TRY(cudaGetLastError());
  }
  if (!empty_grid(g3)) {
    scores_kernel<T><<<g3, kThreads, smem, st>>>(p);
    TGVKV_CUDA_TRY(cudaGetLastError());
  }
  if (!empty_grid(g4)) {
    finalize_kernel<<<g4, kThreads, 0, st>>>(p);
    TGVKV_CUDA_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

}  // namespace score

cudaError_t launch_score(const score::Params& p, DType dtype, cudaStream_t st) {
  if (p.L == 0 || p.B == 0) return cudaSuccess;
  const size_t LB = size_t(p.L) * p.B;
  if (p.N == 0 || p.T == 0) {  // no guidance row (or no slot): every score and statistic is 0
    if (p.N > 0) TGVKV_CUDA_TRY(cudaMemsetAsync(p.scores, 0, LB * p.N * sizeof(float), st));
    return cudaMemsetAsync(p.stats, 0, LB * 2 * sizeof(float), st);
  }
  switch (dtype) {
    case DType::F32: return score::launch_t<float>(p, st);
    case DType::F16: return score::launch_t<half_t>(p, st);
    case DType::BF16: return score::launch_t<bf16_t>(p, st);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace tgvkv
