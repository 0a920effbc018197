// Torch-free CPU kernels of select_keep and compact_ (decode_evict_'s softmax is in
// csrc/cpu/kernels/, compiled per CPU capability).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "tgvkv/common.h"
#include "tgvkv/cpu_score.h"

namespace tgvkv {
namespace cpu {

// Per-sample facts every op needs (computed once by the glue, after validation).
struct SampleInfo {
  int64_t n_real = 0;      // non-pad slots (N_b)
  int64_t n_rows = 0;      // valid guidance rows (q_pos >= 0)
  int64_t first_guid = -1; // q_pos[b, 0] or -1
  int64_t last_real = -1;  // last non-pad slot
  bool has_vision = false;
};

// select_keep for one (layer, sample): drops the `forget` lowest-ranked candidates.
// scores: [N] fp32; mod: [N] int8; keep_idx: [N] int64 out (kept slots ascending, -1 after);
// keys: scratch of >= N uint64. Returns the number of kept slots; *n_prot gets the protected
// suffix size (kept slots >= first guidance slot, at least 1).
inline int64_t select_keep_row(const float* scores, const int8_t* mod, int64_t N,
                               const SampleInfo& si, int64_t keep, int64_t n_sink,
                               int64_t* keep_idx, uint64_t* keys, int64_t* n_prot) {
  // candidates: real slots except the first n_sink real ones and the last real one
  int64_t n_cand = 0, seen = 0;
  for (int64_t j = 0; j < N; ++j) {
    if (mod[j] == kPad) continue;
    const bool fixed = seen < n_sink || j == si.last_real;
    ++seen;
    if (!fixed) keys[n_cand++] = rank_key(mod[j] == kText, scores[j], j);
  }
  const int64_t forget = select_forget(si.n_real, keep, n_cand);  // any int64 keep
  uint64_t thr = 0;  // candidates with key <= thr are dropped
  if (forget > 0) {
    std::nth_element(keys, keys + (forget - 1), keys + n_cand);
    thr = keys[forget - 1];
  }
  int64_t out = 0, prot = 0;
  seen = 0;
  for (int64_t j = 0; j < N; ++j) {
    if (mod[j] == kPad) continue;
    const bool fixed = seen < n_sink || j == si.last_real;
    ++seen;
    if (!fixed && forget > 0 && rank_key(mod[j] == kText, scores[j], j) <= thr) continue;
    keep_idx[out++] = j;
    if (si.first_guid >= 0 && j >= si.first_guid) ++prot;
  }
  for (int64_t s = out; s < N; ++s) keep_idx[s] = -1;
  *n_prot = std::max<int64_t>(1, prot);
  return out;
}

// In-place gather of one (sample, head): rows[s] = rows[idx[s]] for the valid (>= 0) entries of
// idx, which are strictly increasing (validated), so a forward copy never reads an overwritten row.
// base: [N, D] of one (b, h) with strides (stride_n, stride_d) in elements of `elem` bytes.
inline void compact_rows(char* base, int64_t stride_n, int64_t stride_d, int64_t D, int64_t elem,
                         const int64_t* idx /* [M] */, int64_t M) {
  int64_t s = 0;
  for (int64_t i = 0; i < M; ++i) {
    const int64_t src = idx[i];
    if (src < 0) continue;
    if (src != s) {
      char* dst_row = base + s * stride_n * elem;
      const char* src_row = base + src * stride_n * elem;
      if (stride_d == 1) {
        std::memmove(dst_row, src_row, static_cast<size_t>(D * elem));
      } else {
        for (int64_t d = 0; d < D; ++d)
          std::memcpy(dst_row + d * stride_d * elem, src_row + d * stride_d * elem,
                      static_cast<size_t>(elem));
      }
    }
    ++s;
  }
}

}  // namespace cpu
}  // namespace tgvkv
