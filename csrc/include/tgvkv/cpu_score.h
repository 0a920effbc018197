// Torch-free parts of the CPU scoring kernel of score_text_vision (and of the scoring stage of
// evict): the work description and the second pass.
//
// The first pass (csrc/cpu/kernels/cpu_kernels.cpp, compiled per CPU capability): per (layer,
// sample, group of KV heads, chunk of guidance rows) work item, for each KV head of the group in
// order, the logits of the rows of its query heads are one GEMM through ATen (MKL / oneDNN /
// OpenBLAS) with the keys as its transposed operand, followed by a masked fp32 softmax
// per row (at::vec) accumulated into the group's partial head sum, query heads in order. The
// groups (at most 8 per layer; a function of Hkv only) have their partial sums added in the
// fixed order 0..G-1, in parallel over rows (deterministic whatever the thread count: every
// row's value depends only on that row, the fixed grouping and the fixed chunking). The second
// pass (finish_scores, below) divides by Hq and reduces A to the text weights, scores and
// statistics with double accumulators, in the reference's order.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "tgvkv/common.h"

namespace tgvkv {
namespace cpu {

enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// p rounded up to a 64-byte boundary (the buffer must have 16 spare floats).
inline float* align64(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
}

// ------------------------------------------------------------------------------------------------
// Work description
// ------------------------------------------------------------------------------------------------
struct ScoreLayer {
  // Guidance row t of sample b, query head h: q + b*q_sb + h*q_sh + row*q_sn (dim stride q_sd,
  // elements), row = t, or row = q_pos[b, t] when q_rows_are_slots (q: the full query states
  // [B, Hq, N, D] of text_score="all_queries", read in place: no [B, Hq, T, D] gather; the
  // text-mass pass, cpu_text_mass.h, reads every row of it).
  const void* q;
  const void* k;  // [B, Hkv, N, D] with strides k_sb, k_sh, k_sn, k_sd (elements)
  DType dtype;
  int64_t Hq, Hkv, D;
  int64_t q_sb, q_sh, q_sn, q_sd;
  bool q_rows_are_slots;
  int64_t k_sb, k_sh, k_sn, k_sd;
  float* scores;  // [B, N] contiguous
  float* stats;   // [B, 2] contiguous
};

struct ScoreBatch {
  const int64_t* q_pos;   // [B, T] contiguous (validated: valid-first, increasing, not pad)
  const int8_t* mod;      // [B, N] contiguous
  const int64_t* n_rows;  // [B] valid guidance rows per sample
  int64_t B, T, N;
  float scale;
  bool want_mi;  // compute I (stats[..., 1]); else 0
};

// Phase 2: A /= Hq, then text weights, scores [N] and stats (S, I) of sample b (reference order,
// double accumulators). colw / cols: [N] double scratch; w: [T] double scratch.
inline void finish_scores(const ScoreLayer& ly, const ScoreBatch& sb, int64_t b, float* A,
                          double* colw, double* cols, double* w) {
  const int64_t N = sb.N, T = sb.T;
  const int64_t Tv = sb.n_rows[b];
  const int64_t* qp = sb.q_pos + b * T;
  const int8_t* mod = sb.mod + b * N;
  float* scores = ly.scores + b * N;
  float* stats = ly.stats + b * 2;
  const float hq = static_cast<float>(ly.Hq);
  for (int64_t t = 0; t < Tv; ++t) {
    float* a = A + t * N;
    const int64_t n = qp[t] + 1;
    for (int64_t j = 0; j < n; ++j) a[j] = a[j] / hq;
  }
  for (int64_t t = 0; t < Tv; ++t) {
    double s = 0.0;
    for (int64_t u = t; u < Tv; ++u) s += static_cast<double>(A[u * N + qp[t]]);
    w[t] = s / static_cast<double>(Tv - t);
  }
  for (int64_t j = 0; j < N; ++j) colw[j] = 0.0, cols[j] = 0.0;
  for (int64_t t = 0; t < Tv; ++t) {
    const float* a = A + t * N;
    const double wt = w[t];
    const int64_t n = qp[t] + 1;  // A[t, j] == 0 for j >= n
    for (int64_t j = 0; j < n; ++j) {
      const double x = static_cast<double>(a[j]);
      const double p = wt * x;
      colw[j] = colw[j] + p;
      cols[j] = cols[j] + x;
    }
  }
  for (int64_t j = 0; j < N; ++j) {
    const int8_t m = mod[j];
    scores[j] = m == kVision ? static_cast<float>(colw[j])
                             : (m == kText ? static_cast<float>(cols[j]) : 0.0f);
  }
  // S: text->vision mass over the valid rows x vision columns.
  double S = 0.0;
  for (int64_t t = 0; t < Tv; ++t) {
    const float* a = A + t * N;
    const int64_t n = qp[t] + 1;
    for (int64_t j = 0; j < n; ++j)
      if (mod[j] == kVision) S += static_cast<double>(a[j]);
  }
  double I = 0.0;
  // one guidance row or one vision slot: the joint p(t, v) is p(t) p(v) exactly and I = 0, not
  // the rounding noise of the sum below (whose sign and size would decide the "mi" budgets)
  int64_t n_vis = 0;
  for (int64_t j = 0; j < N && n_vis < 2; ++j) n_vis += mod[j] == kVision;
  if (sb.want_mi && S > 0.0 && Tv >= 2 && n_vis >= 2) {
    // p = a / S; marginals pr (rows), pc (columns); I = sum p log(p / (pr pc)) over p > 0.
    double* pc = cols;  // reuse
    for (int64_t j = 0; j < N; ++j) pc[j] = 0.0;
    for (int64_t t = 0; t < Tv; ++t) {
      const float* a = A + t * N;
      const int64_t n = qp[t] + 1;
      double pr = 0.0;
      for (int64_t j = 0; j < n; ++j)
        if (mod[j] == kVision) {
          const double p = static_cast<double>(a[j]) / S;
          pr += p;
          pc[j] += p;
        }
      w[t] = pr;  // reuse w as row marginals
    }
    for (int64_t t = 0; t < Tv; ++t) {
      const float* a = A + t * N;
      const int64_t n = qp[t] + 1;
      for (int64_t j = 0; j < n; ++j)
        if (mod[j] == kVision) {
          const double p = static_cast<double>(a[j]) / S;
          if (p > 0.0) I += p * std::log(p / (w[t] * pc[j]));
        }
    }
  }
  // MI is >= 0; a negative value is pure rounding noise of a (mathematically) independent block
  if (I < 0.0) I = 0.0;
  stats[0] = static_cast<float>(S);
  stats[1] = static_cast<float>(I);
}

}  // namespace cpu
}  // namespace tgvkv
