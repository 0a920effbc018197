// Torch-free CUDA kernels of decode_evict_layers_ / decode_evict_ (one decode step of up to
// kMaxLayers layers of a cache per launch set, SPEC §4; decode_evict_ is the one-layer case).
//
// Per layer l and sample b with n = length[l, b] live slots [0, n) (any order; pos[b, s] =
// original position): if keep_fraction[l, b] < 1 and forget = int(n - n_seen[b] *
// keep_fraction[l, b]) > 0 (tgvkv::decode_forget, shared with the CPU), evict the candidate with
// the lowest head-averaged attention of q, ties to the smaller pos. Candidates: slots s >= n_sink
// whose pos is not among the n_protected[l, b] largest pos of the live slots. The hole is filled
// by the last live slot (O(Hkv·D) moved), pos follows, length -= 1; evicted[l, b] = the evicted
// pos, or -1.
//
// One launch for all the layers of a group (after a memset of the hand-off counters), no host
// sync: decode_kernel, grid (nsplit + 1, B, L). Block x < nsplit_l of layer l writes the logits
// [B, Hq, S_l] of its slot span and the span's per-head (max, sum of exp); block x == nsplit_l
// computes the protection threshold theta[l, b] (the n_protected-th largest pos, radix select);
// blocks past a layer's splits exit (nsplit: the most splits of any layer). The last of the
// nsplit_l + 1 blocks of (l, b) to finish (an atomic counter after a memory fence) combines the
// per-head (max, sum) in a fixed order, computes the head-averaged attention of every candidate
// and its argmin (a total order on (attention, pos): the same victim whichever block finishes),
// then moves the last live slot into the victim's place.
// The arithmetic of a (layer, sample) does not depend on the other layers nor on the group, so
// decode_evict_ and decode_evict_layers_ give bit-identical results.
// length is clamped to [0, S_l] for memory safety (a longer length is not detected on CUDA).
#pragma once

#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "tgvkv/common.h"
#include "tgvkv/cuda/common.cuh"
#include "tgvkv/cuda/launch.cuh"

namespace tgvkv {
namespace cuda {
namespace decode {

__device__ __forceinline__ const Layer& layer_of(const Params& P) { return P.layers[blockIdx.z]; }

// Index of (layer of this block, b) in the group's [L, B] arrays.
__device__ __forceinline__ int64_t lb_index(const Params& P, int b) {
  return int64_t(blockIdx.z) * P.B + b;
}

__device__ __forceinline__ int64_t live_length(const Params& P, const Layer& Ly, int b) {
  int64_t n = P.length[int64_t(blockIdx.z) * P.ls0 + int64_t(b) * P.ls1];
  return n < 0 ? 0 : (n > Ly.S ? Ly.S : n);
}

__device__ __forceinline__ bool wants_evict(const Params& P, int b, int64_t n) {
  const double f = P.keep_fraction[lb_index(P, b)];
  if (f >= 1.0) return false;
  bool ok = false;
  const int64_t forget = tgvkv::decode_forget(n, P.n_seen[b], f, &ok);
  // as the CPU op: no candidate range when the protected suffix reaches the sinks
  return ok && forget > 0 &&
         tgvkv::decode_has_candidates(n, P.n_protected[lb_index(P, b)], P.n_sink);
}

__device__ __forceinline__ int64_t pos_at(const Layer& Ly, int b, int64_t s) {
  return Ly.pos[int64_t(b) * Ly.ps0 + s * Ly.ps1];
}

// The n_protected-th largest pos among live slots (protected iff pos >= theta).
__device__ inline void theta_block(const Params& P, const Layer& Ly, int b, int64_t n) {
  __shared__ long long mn_s[kWarps], mx_s[kWarps];
  __shared__ int hist[256];
  __shared__ unsigned long long prefix_s, mask_s;
  __shared__ int remaining_s;
  const int tid = threadIdx.x;
  const int64_t np = P.n_protected[lb_index(P, b)];
  int64_t* theta = P.theta + lb_index(P, b);
  if (np <= 0 || np >= n) {  // nothing / everything protected
    if (tid == 0) *theta = np <= 0 ? INT64_MAX : INT64_MIN;
    return;
  }
  long long mn = INT64_MAX, mx = INT64_MIN;
  for (int64_t s = tid; s < n; s += kThreads) {
    const long long p = pos_at(Ly, b, s);
    mn = p < mn ? p : mn;
    mx = p > mx ? p : mx;
  }
  for (int o = 16; o > 0; o >>= 1) {
    const long long a = __shfl_xor_sync(0xffffffffu, mn, o);
    const long long c = __shfl_xor_sync(0xffffffffu, mx, o);
    mn = a < mn ? a : mn;
    mx = c > mx ? c : mx;
  }
  if ((tid & 31) == 0) {
    mn_s[tid >> 5] = mn;
    mx_s[tid >> 5] = mx;
  }
  if (tid == 0) {
    prefix_s = 0;
    mask_s = 0;
    remaining_s = int(n - np + 1);  // 1-based rank from the smallest
  }
  __syncthreads();
  mn = mn_s[0];
  mx = mx_s[0];
  for (int i = 1; i < kWarps; ++i) {
    mn = mn_s[i] < mn ? mn_s[i] : mn;
    mx = mx_s[i] > mx ? mx_s[i] : mx;
  }
  const uint64_t range = static_cast<uint64_t>(mx) - static_cast<uint64_t>(mn);
  const int bits = range ? 64 - __clzll(range) : 0;
  const int passes = (bits + 7) / 8;
  for (int pass = passes - 1; pass >= 0; --pass) {
    const int shift = 8 * pass;
    hist[tid] = 0;  // kThreads == 256
    __syncthreads();
    const uint64_t prefix = prefix_s, mask = mask_s;
    for (int64_t s = tid; s < n; s += kThreads) {
      const uint64_t k = static_cast<uint64_t>(pos_at(Ly, b, s)) - static_cast<uint64_t>(mn);
      if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1);
    }
    __syncthreads();
    if (tid < 32) {
      int c[8], sum = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        c[i] = hist[tid * 8 + i];
        sum += c[i];
      }
      int incl = sum;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, o);
        if (tid >= o) incl += v;
      }
      const int excl = incl - sum;
      const int r = remaining_s;
      __syncwarp();
      if (excl < r && r <= incl) {
        int acc = excl;
        for (int i = 0; i < 8; ++i) {
          if (acc + c[i] >= r) {
            prefix_s = prefix | (static_cast<uint64_t>(tid * 8 + i) << shift);
            mask_s = mask | (255ull << shift);
            remaining_s = r - acc;
            break;
          }
          acc += c[i];
        }
      }
    }
    __syncthreads();
  }
  if (tid == 0) *theta = static_cast<int64_t>(static_cast<uint64_t>(mn) + prefix_s);
}

// The finisher of (layer, sample): all partials of its nsplit + 1 blocks are in global memory.
// Reads them with __ldcg (L2, not this SM's L1: other blocks wrote them during this launch).
template <typename T>
__device__ void finish_block(const Params& P, const Layer& Ly, int b, int64_t n, float* dsm) {
  __shared__ float ba[kThreads];
  __shared__ long long bp[kThreads], bs[kThreads];
  const int tid = threadIdx.x;
  const int64_t lb = lb_index(P, b);
  float* m_s = dsm;
  float* l_s = dsm + P.Hq;
  for (int h = tid; h < P.Hq; h += kThreads) {
    const float2* pp = P.part + (Ly.sp_off + int64_t(b) * Ly.nsplit) * P.Hq + h;
    float m = -INFINITY, l = 0.f;
    for (int i = 0; i < Ly.nsplit; ++i) m = fmaxf(m, __ldcg(pp + int64_t(i) * P.Hq).x);
    if (m != -INFINITY)
      for (int i = 0; i < Ly.nsplit; ++i) {
        const float2 v = __ldcg(pp + int64_t(i) * P.Hq);
        if (v.y > 0.f) l += v.y * expf(v.x - m);
      }
    m_s[h] = m;
    l_s[h] = l;
  }
  __syncthreads();
  const int64_t theta = __ldcg(reinterpret_cast<const long long*>(P.theta + lb));
  const float* lg = P.logits + Ly.lg_off + int64_t(b) * P.Hq * Ly.S;
  float best = INFINITY;
  long long bpos = INT64_MAX, bslot = -1;
  for (int64_t s = P.n_sink + tid; s < n; s += kThreads) {
    const long long p = pos_at(Ly, b, s);
    if (p >= theta) continue;  // protected suffix
    float a = 0.f;
    for (int h = 0; h < P.Hq; ++h) a += expf(__ldcg(lg + int64_t(h) * Ly.S + s) - m_s[h]) / l_s[h];
    a = a / float(P.Hq);
    if (bslot < 0 || a < best || (a == best && p < bpos)) {
      best = a;
      bpos = p;
      bslot = s;
    }
  }
  ba[tid] = best;
  bp[tid] = bpos;
  bs[tid] = bslot;
  __syncthreads();
  for (int o = kThreads / 2; o > 0; o >>= 1) {
    if (tid < o && bs[tid + o] >= 0) {
      const float a = ba[tid + o];
      const long long p = bp[tid + o];
      if (bs[tid] < 0 || a < ba[tid] || (a == ba[tid] && p < bp[tid])) {
        ba[tid] = a;
        bp[tid] = p;
        bs[tid] = bs[tid + o];
      }
    }
    __syncthreads();
  }
  const int64_t j = bs[0], last = n - 1;
  if (j < 0) {
    if (tid == 0) P.evicted[lb] = -1;
    return;
  }
  if (j != last) {
    T* k = static_cast<T*>(Ly.k);
    T* v = static_cast<T*>(Ly.v);
    const int64_t HD = int64_t(P.Hkv) * P.D, HDv = int64_t(P.Hkv) * P.Dv;
    for (int64_t e = tid; e < HD; e += kThreads) {
      const int64_t h = e / P.D, d = e - h * P.D;
      const int64_t kb = b * Ly.ks0 + h * Ly.ks1 + d * Ly.ks3;
      k[kb + j * Ly.ks2] = k[kb + last * Ly.ks2];
    }
    for (int64_t e = tid; e < HDv; e += kThreads) {
      const int64_t h = e / P.Dv, d = e - h * P.Dv;
      const int64_t vb = b * Ly.vs0 + h * Ly.vs1 + d * Ly.vs3;
      v[vb + j * Ly.vs2] = v[vb + last * Ly.vs2];
    }
  }
  if (tid == 0) {
    int64_t* pb = Ly.pos + int64_t(b) * Ly.ps0;
    P.evicted[lb] = pb[j * Ly.ps1];
    pb[j * Ly.ps1] = pb[last * Ly.ps1];
    P.length[int64_t(blockIdx.z) * P.ls0 + int64_t(b) * P.ls1] = last;
  }
}

// grid (nsplit + 1, B, L), block kThreads, dynamic smem max((Hq + kWarps) * D, 2 * Hq) floats.
template <typename T>
__global__ void __launch_bounds__(kThreads) decode_kernel(const Params P) {
  extern __shared__ float dsm[];
  __shared__ int last_s;
  const Layer& Ly = layer_of(P);
  const int b = blockIdx.y, sp = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (sp > Ly.nsplit) return;  // past this layer's splits (block-uniform)
  const int64_t n = live_length(P, Ly, b);
  if (!wants_evict(P, b, n)) {  // block-uniform; one block of (l, b) reports "nothing"
    if (sp == 0 && tid == 0) P.evicted[lb_index(P, b)] = -1;
    return;
  }
  if (sp == Ly.nsplit) {
    theta_block(P, Ly, b, n);
  } else {
    const int D = P.D, g = P.Hq / P.Hkv;
    float* qs = dsm;                         // [Hq][D]
    float* kw = dsm + P.Hq * D + warp * D;   // this warp's key row
    const T* q = static_cast<const T*>(Ly.q) + int64_t(b) * P.Hq * D;
    for (int i = tid; i < P.Hq * D; i += kThreads) qs[i] = load_f(q + i);
    __syncthreads();
    const T* kb = static_cast<const T*>(Ly.k) + int64_t(b) * Ly.ks0;
    float* lg = P.logits + Ly.lg_off + int64_t(b) * P.Hq * Ly.S;
    const int64_t i0 = int64_t(sp) * P.span;
    const int64_t i1 = i0 + P.span < n ? i0 + P.span : n;
    for (int64_t s = i0 + warp; s < i1; s += kWarps) {
      for (int kvh = 0; kvh < P.Hkv; ++kvh) {
        const T* kr = kb + kvh * Ly.ks1 + s * Ly.ks2;
        for (int d = lane; d < D; d += 32) kw[d] = load_f(kr + d * Ly.ks3);
        __syncwarp();
        for (int h = kvh * g; h < (kvh + 1) * g; ++h) {
          float acc = 0.f;
          for (int d = lane; d < D; d += 32) acc = fmaf(qs[h * D + d], kw[d], acc);
          acc = warp_sum(acc);
          if (lane == 0) lg[int64_t(h) * Ly.S + s] = __fmul_rn(acc, P.scale);
        }
        __syncwarp();
      }
    }
    __syncthreads();  // the block's logits are visible to all its threads
    for (int h = tid; h < P.Hq; h += kThreads) {
      const float* row = lg + int64_t(h) * Ly.S;
      float m = -INFINITY, l = 0.f;
      for (int64_t s = i0; s < i1; ++s) m = fmaxf(m, row[s]);
      if (m != -INFINITY)
        for (int64_t s = i0; s < i1; ++s) l += expf(row[s] - m);
      P.part[(Ly.sp_off + int64_t(b) * Ly.nsplit + sp) * P.Hq + h] = make_float2(m, l);
    }
  }
  // hand-off: every thread's writes are made visible device-wide, then one arrival per block;
  // the last of the nsplit_l + 1 blocks of (l, b) finishes
  __threadfence();
  __syncthreads();
  if (tid == 0) last_s = atomicAdd(P.counter + lb_index(P, b), 1) == Ly.nsplit;
  __syncthreads();
  if (!last_s) return;  // block-uniform
  __threadfence();
  finish_block<T>(P, Ly, b, n, dsm);
}

}  // namespace decode

// ---------------------------------------------------------------------------------------------
// Launcher (declared in launch.cuh). Defined here, next to the kernels it instantiates: this
// header is included by decode_evict.cu only (and by the CUDA emulator).
// ---------------------------------------------------------------------------------------------
namespace decode {

template <typename T>
cudaError_t launch_t(const Params& p, size_t smem1, cudaStream_t st) {
  if (p.B == 0 || p.L == 0) return cudaSuccess;
  TGVKV_CUDA_TRY(cudaMemsetAsync(p.counter, 0, sizeof(int) * size_t(p.L) * p.B, st));
  TGVKV_CUDA_TRY(ensure_dynamic_smem(decode_kernel<T>, smem1));
  decode_kernel<T><<<dim3(p.nsplit + 1, p.B, p.L), kThreads, smem1, st>>>(p);
  return cudaGetLastError();
}

}  // namespace decode

cudaError_t launch_decode(const decode::Params& p, DType dtype, size_t smem1, cudaStream_t st) {
  switch (dtype) {
    case DType::F32: return decode::launch_t<float>(p, smem1, st);
    case DType::F16: return decode::launch_t<half_t>(p, smem1, st);
    case DType::BF16: return decode::launch_t<bf16_t>(p, smem1, st);
  }
  return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------------------------
// decode_append_: block b writes sample b's new token at slot n = length[b] (K, V, pos),
// length[b] = n + 1 and mask[b, s] = s < length[b] for s < M. No data checks on CUDA: a length
// outside [0, S) writes no slot and leaves length as it is (its mask row is still rewritten,
// from the clamped length).
// ---------------------------------------------------------------------------------------------
namespace append {

template <typename E>
__global__ void __launch_bounds__(kThreads) append_kernel(const Params P) {
  const int b = blockIdx.x;
  const int64_t n = P.length[int64_t(b) * P.ls0];
  const bool ok = n >= 0 && n < P.S;
  if (ok) {
    E* k = static_cast<E*>(P.k);
    E* v = static_cast<E*>(P.v);
    const E* kn = static_cast<const E*>(P.k_new);
    const E* vn = static_cast<const E*>(P.v_new);
    for (int64_t i = threadIdx.x; i < int64_t(P.Hkv) * P.D; i += blockDim.x) {
      const int64_t h = i / P.D, d = i % P.D;
      k[b * P.ks0 + h * P.ks1 + n * P.ks2 + d * P.ks3] = kn[b * P.kn0 + h * P.kn1 + d * P.kn3];
    }
    for (int64_t i = threadIdx.x; i < int64_t(P.Hkv) * P.Dv; i += blockDim.x) {
      const int64_t h = i / P.Dv, d = i % P.Dv;
      v[b * P.vs0 + h * P.vs1 + n * P.vs2 + d * P.vs3] = vn[b * P.vn0 + h * P.vn1 + d * P.vn3];
    }
  }
  const int64_t live = ok ? n + 1 : (n < 0 ? 0 : (n > P.S ? P.S : n));
  for (int64_t s = threadIdx.x; s < P.M; s += blockDim.x) P.mask[b * P.ms0 + s * P.ms1] = s < live;
  __syncthreads();  // every thread has read length[b] before it changes
  if (threadIdx.x == 0 && ok) {
    P.pos[b * P.ps0 + n * P.ps1] = P.position;
    P.length[int64_t(b) * P.ls0] = n + 1;
  }
}

}  // namespace append

cudaError_t launch_append(const append::Params& p, int elem_bytes, cudaStream_t st) {
  if (p.B == 0) return cudaSuccess;
  if (elem_bytes == 4) {
    append::append_kernel<uint32_t><<<dim3(p.B), append::kThreads, 0, st>>>(p);
  } else if (elem_bytes == 2) {
    append::append_kernel<uint16_t><<<dim3(p.B), append::kThreads, 0, st>>>(p);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace tgvkv
