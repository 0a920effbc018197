// Torch glue shared by the CUDA op implementations in csrc/cuda/*.cu (and only by them). It lives
// beside them, not under csrc/include (which stays torch-free): kernels and launch plans are in
// csrc/include/tgvkv/cuda (common.cuh, launch.cuh, <stage>.cuh).
//
// Headers: per-operator ATen (ATen/ops/empty.h), c10 CUDA stream/guard/exception; never
// torch/extension.h nor ATen/cuda/CUDAContext.h (compile time, and cusparse.h is absent from
// the compile-check machine).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "op_args.h"
#include "tgvkv/cuda/common.cuh"
#include "tgvkv/cuda/launch.cuh"

namespace tgvkv {
namespace cuda {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: return DType::F32;
  }
}

inline View4 view4(const at::Tensor& t) {
  return View4{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  checks::check_on(t, c10::DeviceType::CUDA, op, name);
}

inline void check_cuda(at::TensorList ts, const char* op, const char* name) {
  for (const at::Tensor& t : ts) check_cuda(t, op, name);
}

// Grid dims y / z are limited to 65535 (the batch and the layer group use them).
inline void check_batch(int64_t B, const char* op) {
  TGVKV_CHECK(B <= 65535, op, "the CUDA kernels support batch sizes up to 65535, got ", B);
}

// The layer group of one launch indexes at most 4096 layers.
inline void check_layers(int64_t L, const char* op) {
  TGVKV_CHECK(L <= 4096, op, "the CUDA kernels support up to 4096 layers, got ", L);
}

// Head dims the scoring kernels are built for.
inline void check_head_dim(const at::Tensor& k, const char* op) {
  TGVKV_CHECK(k.size(3) <= score::kMaxHeadDim, op, "the CUDA kernels support head dims up to ",
              score::kMaxHeadDim, ", got ", k.size(3));
}

// What one launch over all layers of k_cache / v_cache needs beyond op_args::check_cache_lists
// (already passed, V of K's dtype included): every layer of layer 0's dtype and head shapes.
inline void check_cache_lists_uniform(at::TensorList k_cache, at::TensorList v_cache,
                                      const char* op) {
  for (size_t l = 0; l < k_cache.size(); ++l) {
    const at::Tensor& k = k_cache[l];
    const at::Tensor& v = v_cache[l];
    if (l > 0) {
      checks::check_same_dtype(k, k_cache[0], op, "k_cache[l]", "k_cache[0]");
      checks::check_size(k, 1, k_cache[0].size(1), op, "k_cache[l]", "Hkv (from k_cache[0])");
      checks::check_size(k, 3, k_cache[0].size(3), op, "k_cache[l]", "D (from k_cache[0])");
      checks::check_size(v, 3, v_cache[0].size(3), op, "v_cache[l]", "Dv (from v_cache[0])");
    }
  }
}

}  // namespace cuda
}  // namespace tgvkv
