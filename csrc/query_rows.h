// The guidance rows of the full query states, shared by the CPU and CUDA glue of
// score_text_vision / evict in text_score="all_queries" mode (the scoring kernels of the vision
// scores and of (S, I) read the guidance rows [B, Hq, T, D]; that mode's q is [B, Hq, N, D]).
// Torch-light (per-operator ATen headers, compiles under nvcc); no host synchronisation.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/gather.h>

namespace tgvkv {

// q [B, Hq, N, D] (any strides), q_pos [B, T] int64 (-1: unused) -> [B, Hq, T, D] contiguous,
// row t = q[:, :, q_pos[b, t]] (unused rows: row 0, ignored by the kernels).
inline at::Tensor guidance_rows(const at::Tensor& q, const at::Tensor& q_pos) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), T = q_pos.size(1);
  const at::Tensor idx = at::clamp_min(q_pos, 0).view({B, 1, T, 1}).expand({B, Hq, T, D});
  return at::gather(q, 2, idx).contiguous();
}

}  // namespace tgvkv
