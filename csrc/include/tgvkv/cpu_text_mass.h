// Torch-free work description of the CPU text-column-mass kernel (text_score="all_queries",
// SPEC §1.3): for every text slot p of a sample,
//   mass[p] = 1/Hq · Σ_h Σ_{i >= p, i not pad} softmax_j(scale · q[h, i] · k[h / g, j])[p],
// the softmax over the keys j <= i that are not pad, i.e. the column sum over ALL query rows of
// the head-averaged causal attention, without storing N×N: per work item (layer, sample, KV head,
// tile of rows) one GEMM gives the logits of the tile's rows, each row's max and sum of exp (its
// logsumexp) come from the same logits, and only the text columns' probabilities are kept.
// The guidance rows' share of the sum is the guidance-mode text score that the scoring pass
// (cpu_score.h) has already written into the text slots: this kernel adds the other rows' share
// to it and skips the guidance rows (their logits are not computed twice; a trailing run of
// guidance and pad rows is left out of the tiles altogether).
// Implemented in csrc/cpu/kernels/cpu_kernels.cpp (per CPU capability), called by ops_cpu.cpp.
#pragma once

#include <cstdint>

#include "tgvkv/cpu_score.h"

namespace tgvkv {
namespace cpu {

struct TextMassLayer {
  const void* q;  // [B, Hq, N, D] full query states, strides q_sb, q_sh, q_sn, q_sd (elements)
  const void* k;  // [B, Hkv, N, D], strides k_sb, k_sh, k_sn, k_sd (elements)
  DType dtype;    // of q and k
  int64_t Hq, Hkv, D;
  int64_t q_sb, q_sh, q_sn, q_sd;
  int64_t k_sb, k_sh, k_sn, k_sd;
  float* scores;  // [B, N] contiguous: in, the guidance rows' text mass; out, all rows'
};

struct TextMassBatch {
  const int8_t* mod;      // [B, N] contiguous
  const int64_t* q_pos;   // [B, T] contiguous guidance rows (as ScoreBatch::q_pos)
  const int64_t* n_rows;  // [B] valid guidance rows per sample
  int64_t T;
  int64_t B, N;
  float scale;
};

}  // namespace cpu
}  // namespace tgvkv
