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

#include "tgvkv/cpu_score.h"

// Work description: the scoring pass's ScoreLayer (q: the full query states [B, Hq, N, D], any
// strides; scores: in, the guidance rows' text mass; out, all rows') and ScoreBatch (modality,
// guidance rows, scale), both in cpu_score.h.
