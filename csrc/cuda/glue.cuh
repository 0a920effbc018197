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
  checks::check_defined(t, op, name);
  checks::check_device_type(t, c10::DeviceType::CUDA, op, name);
}

// Grid dims y / z are limited to 65535 (the batch and the layer group use them).
inline void check_batch(int64_t B, const char* op) {
  TGVKV_CHECK(B <= 65535, op, "the CUDA kernels support batch sizes up to 65535, got ", B);
}

// q [B, Hq, T, D] and k [B, Hkv, N, D] of one layer against q_pos [B, T] / modality [B, N].
inline void check_qk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_pos,
                     const at::Tensor& modality, const char* op, const char* qn, const char* kn) {
  check_cuda(q, op, qn);
  check_cuda(k, op, kn);
  checks::check_dim(q, 4, op, qn, "[B, Hq, T, D]");
  checks::check_dim(k, 4, op, kn, "[B, Hkv, N, D]");
  checks::check_float_dtype(k, op, kn);
  checks::check_same_dtype(q, k, op, qn, kn);
  checks::check_same_device(q, k, op, qn, kn);
  checks::check_same_device(modality, k, op, "modality", kn);
  const int64_t B = modality.size(0);
  checks::check_size(q, 0, B, op, qn, "B (from modality)");
  checks::check_size(k, 0, B, op, kn, "B (from modality)");
  checks::check_size(q, 2, q_pos.size(1), op, qn, "T (from q_pos)");
  checks::check_size(k, 2, modality.size(1), op, kn, "N (from modality)");
  checks::check_size(q, 3, k.size(3), op, qn, "D (from k)");
  TGVKV_CHECK(k.size(1) >= 1 && q.size(1) >= k.size(1) && q.size(1) % k.size(1) == 0, op, "'", qn,
              "' heads (", q.size(1), ") must be a positive multiple of the '", kn, "' heads (",
              k.size(1), ")");
  TGVKV_CHECK(k.size(3) <= score::kMaxHeadDim, op, "the CUDA kernels support head dims up to ",
              score::kMaxHeadDim, ", got ", k.size(3));
}

}  // namespace cuda
}  // namespace tgvkv
