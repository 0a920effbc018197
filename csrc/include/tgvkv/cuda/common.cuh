// Torch-free CUDA helpers shared by the tgvkv kernels (csrc/include/tgvkv/cuda/*.cuh).
//
// Raw pointers, sizes and cudaStream_t only: nothing here knows about torch. Element types are the
// storage structs of tgvkv/common.h (float, half_t, bf16_t); all arithmetic is fp32 (fp64 for the
// statistics), conversions are exact.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <mutex>

#include "tgvkv/common.h"

namespace tgvkv {
namespace cuda {

// Element type tag of the K/V/Q tensors (one dispatch set for every op).
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

inline int dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }

// Layers per launch of the batched (evict) kernels: their pointers and strides travel by value in
// the kernel parameters (< 4 KB), so a cache of L layers takes ceil(L / kMaxLayers) launches per
// stage (one for every model up to 32 layers).
constexpr int kMaxLayers = 32;

// A 4-d tensor view: base pointer and element strides of its four dims. Only the K/V/Q tensors
// use it; the small index tensors are made contiguous by the glue.
struct View4 {
  const void* ptr;
  int64_t s0, s1, s2, s3;
};

// Every launch in tgvkv goes through this: a zero-sized grid is a no-op, not a launch error.
inline bool empty_grid(dim3 g) { return g.x == 0 || g.y == 0 || g.z == 0; }

// In a launcher (returns cudaError_t): return the error of a runtime call or of the launch just
// made (TGVKV_CUDA_TRY(cudaGetLastError())) to the caller, which raises it.
#define TGVKV_CUDA_TRY(expr)                         \
  do {                                               \
    const cudaError_t tgvkv_err_ = (expr);           \
    if (tgvkv_err_ != cudaSuccess) return tgvkv_err_; \
  } while (0)

template <typename I>
__host__ __device__ inline I ceil_div(I a, I b) {
  return (a + b - 1) / b;
}

// Multiprocessor count of a device, cached per device (a host attribute query, no sync).
inline int num_sms(int device) {
  static int cache[64] = {0};
  if (device >= 0 && device < 64 && cache[device] > 0) return cache[device];
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || v <= 0) {
    (void)cudaGetLastError();  // clear the sticky-free error so the next launch check is clean
    v = 108;
  }
  if (device >= 0 && device < 64) cache[device] = v;
  return v;
}

// Raises a kernel's dynamic shared-memory limit to at least `bytes` on the current device, once
// per (kernel, device, size increase): the attribute call is a host-side function setting, made
// during the first (eager, warm-up) call and skipped afterwards (e.g. inside CUDA-graph capture).
// Returns the CUDA status.
inline cudaError_t ensure_dynamic_smem(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  struct Entry {
    const void* fn;
    int dev;
    size_t bytes;
  };
  static Entry table[256];
  static int used = 0;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  for (int i = 0; i < used; ++i)
    if (table[i].fn == kernel && table[i].dev == dev && table[i].bytes >= bytes) return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (e != cudaSuccess) return e;
  for (int i = 0; i < used; ++i)
    if (table[i].fn == kernel && table[i].dev == dev) {
      table[i].bytes = bytes;
      return cudaSuccess;
    }
  if (used < 256) table[used++] = Entry{kernel, dev, bytes};
  return cudaSuccess;
}
template <typename... Args>
inline cudaError_t ensure_dynamic_smem(void (*kernel)(Args...), size_t bytes) {
  return ensure_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
}

// Byte-carving of one workspace allocation into aligned sub-buffers.
struct Carver {
  size_t off = 0;
  template <typename T>
  size_t take(size_t count) {
    off = (off + 255) & ~size_t(255);
    const size_t at = off;
    off += count * sizeof(T);
    return at;
  }
};

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float load_f(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_f(const half_t* p) {
  return half_bits_to_float(__ldg(reinterpret_cast<const unsigned short*>(p)));
}
__device__ __forceinline__ float load_f(const bf16_t* p) {
  return bf16_bits_to_float(__ldg(reinterpret_cast<const unsigned short*>(p)));
}

// 16 bytes of elements -> floats (4 for fp32, 8 for 16-bit types).
template <typename T>
struct Vec16;
template <>
struct Vec16<float> {
  static constexpr int kElems = 4;
  __device__ __forceinline__ static void load(const float* p, float* out) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(p));
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
  }
};
template <typename H>
struct Vec16Half {
  static constexpr int kElems = 8;
  __device__ __forceinline__ static float cvt(uint32_t bits16);
  __device__ __forceinline__ static void load(const H* p, float* out) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = cvt(w[i] & 0xFFFFu);
      out[2 * i + 1] = cvt(w[i] >> 16);
    }
  }
};
template <>
__device__ __forceinline__ float Vec16Half<half_t>::cvt(uint32_t b) {
  return half_bits_to_float(static_cast<uint16_t>(b));
}
template <>
__device__ __forceinline__ float Vec16Half<bf16_t>::cvt(uint32_t b) {
  return bf16_bits_to_float(static_cast<uint16_t>(b));
}
template <>
struct Vec16<half_t> : Vec16Half<half_t> {};
template <>
struct Vec16<bf16_t> : Vec16Half<bf16_t> {};

// Whether 16-byte vector loads of rows of D elements are legal for a view (host side).
inline bool vec16_ok(const View4& v, int64_t D, int esize) {
  const int64_t ve = 16 / esize;
  if (v.s3 != 1 || D % ve != 0) return false;
  if (reinterpret_cast<uintptr_t>(v.ptr) % 16 != 0) return false;
  return (v.s0 * esize) % 16 == 0 && (v.s1 * esize) % 16 == 0 && (v.s2 * esize) % 16 == 0;
}

// Warp reductions with a fixed butterfly order (deterministic).
__device__ __forceinline__ float warp_max(float v, int width = 32) {
  for (int o = width / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o, width));
  return v;
}
__device__ __forceinline__ float warp_sum(float v, int width = 32) {
  for (int o = width / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o, width);
  return v;
}

}  // namespace cuda
}  // namespace tgvkv
