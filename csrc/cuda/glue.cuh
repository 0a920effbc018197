// Torch glue shared by the CUDA op implementations in csrc/cuda/*.cu (and only by them). It lives
// beside them, not under csrc/include (which stays torch-free): kernels and launch plans are in
// csrc/include/tgvkv/cuda (common.cuh, launch.cuh, <stage>.cuh).
//
// Headers: per-operator ATen (ATen/ops/empty.h), c10 CUDA stream/guard/exception; never
// torch/extension.h nor ATen/cuda/CUDAContext.h (compile time, and cusparse.h is absent from
// the compile-check machine).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/where.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "op_args.h"
#include "query_rows.h"
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

// [B, N] int64: each sample's text slots ascending, then -1 (no host sync).
inline at::Tensor text_slots(const at::Tensor& mod) {
  const at::Tensor idx = at::argsort(mod.ne(kText).to(at::kByte), /*stable=*/true, /*dim=*/1);
  return at::where(mod.gather(1, idx).eq(kText), idx, -1);
}

// text_score="all_queries": overwrites the text slots of scores [L, B, N] (contiguous f32) with
// their attention mass over every query row, from the full query states qs[l] [B, Hq, N, D] and
// ks[l] [B, Hkv, N, D] (checked: same dtype, head shapes), in groups of kMaxLayers layers.
inline void run_text_mass(at::TensorList qs, at::TensorList ks, const at::Tensor& mod,
                          double scale, float* scores) {
  const int64_t L = static_cast<int64_t>(ks.size()), B = mod.size(0), N = mod.size(1);
  if (L == 0 || B == 0 || N == 0) return;
  const at::Tensor ts = text_slots(mod);
  textmass::Params p{};
  p.B = int(B);
  p.Hq = int(qs[0].size(1));
  p.Hkv = int(ks[0].size(1));
  p.D = int(ks[0].size(3));
  p.N = N;
  p.scale = float(scale);
  p.modality = mod.data_ptr<int8_t>();
  p.text_slots = ts.data_ptr<int64_t>();
  p.L = int(std::min<int64_t>(kMaxLayers, L));
  const size_t bytes = textmass::plan(p, nullptr);  // the largest group's workspace
  at::Tensor ws = at::empty({int64_t(bytes)}, mod.options().dtype(at::kByte));
  const int es = int(ks[0].element_size());
  const DType dt = dtype_of(ks[0]);
  for (int64_t l0 = 0; l0 < L; l0 += kMaxLayers) {
    p.L = int(std::min<int64_t>(kMaxLayers, L - l0));
    textmass::plan(p, ws.data_ptr());
    p.vec_q = p.vec_k = true;
    for (int i = 0; i < p.L; ++i) {
      p.q[i] = view4(qs[l0 + i]);
      p.k[i] = view4(ks[l0 + i]);
      p.vec_q = p.vec_q && vec16_ok(p.q[i], p.D, es);
      p.vec_k = p.vec_k && vec16_ok(p.k[i], p.D, es);
    }
    p.scores = scores + l0 * B * N;
    C10_CUDA_CHECK(launch_text_mass(p, dt, current_stream()));  // stream-ordered workspace reuse
  }
}

}  // namespace cuda
}  // namespace tgvkv
