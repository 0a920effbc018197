// Argument checks of every tgvkv op that do not depend on the backend (dims, sizes, dtypes,
// same-device, scalar arguments, list lengths): one function per op, called by both its CPU
// implementation (csrc/cpu/ops_cpu.cpp) and its CUDA one (csrc/cuda/<op>.cu), so each rule and
// its message is written once. A backend adds only its own checks around these:
//   before: the device type of its inputs (checks::check_on with kCPU / kCUDA);
//   after:  CPU the data-dependent values (q_pos layout, modality codes, finite scores,
//           keep_idx order); CUDA the kernels' limits (2^31 slots, 65535 samples, 4096 layers,
//           head dim, shared memory) and what one launch over all layers needs (equal shapes).
//
// Torch-light like checks.h (compiles under nvcc): no torch/extension.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "checks.h"

namespace tgvkv {
namespace op_args {

// Sizes taken from q_pos [B, T] and modality [B, N].
struct Dims {
  int64_t B, N, T;
};

inline Dims check_q_pos_modality(const at::Tensor& q_pos, const at::Tensor& modality,
                                 const char* op) {
  checks::check_q_pos_modality(q_pos, modality, op);
  return Dims{modality.size(0), modality.size(1), q_pos.size(1)};
}

// q and k [B, Hkv, N, D] of one layer against q_pos / modality (sizes in d). q is the guidance
// rows [B, Hq, T, D] (text_mode kTextScoreGuidance) or the full query states [B, Hq, N, D]
// (kTextScoreAllQueries: row i is the query of slot i).
inline void check_layer_qk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& modality,
                           const Dims& d, const char* op, const char* qname, const char* kname,
                           int text_mode = checks::kTextScoreGuidance) {
  const bool all = text_mode == checks::kTextScoreAllQueries;
  checks::check_dim(q, 4, op, qname, all ? "[B, Hq, N, D]" : "[B, Hq, T, D]");
  checks::check_dim(k, 4, op, kname, "[B, Hkv, N, D]");
  checks::check_float_dtype(k, op, kname);
  checks::check_same_dtype(q, k, op, qname, kname);
  checks::check_same_device(q, k, op, qname, kname);
  checks::check_same_device(modality, k, op, "modality", kname);
  checks::check_size(k, 0, d.B, op, kname, "B (from modality)");
  checks::check_size(k, 2, d.N, op, kname, "N (from modality)");
  checks::check_size(q, 0, d.B, op, qname, "B (from modality)");
  if (all) {
    TGVKV_CHECK(q.size(2) == d.N, op, "'", qname, "' dim 2 must be N = ", d.N, " (from "
                "modality): with text_score=\"all_queries\" it holds the full query states "
                "[B, Hq, N, D] (pass text_score=\"guidance\" for guidance rows [B, Hq, T, D]), "
                "got shape ", checks::shape_str(q));
  } else {
    checks::check_size(q, 2, d.T, op, qname, "T (from q_pos)");
  }
  checks::check_size(q, 3, k.size(3), op, qname, "D (from k)");
  TGVKV_CHECK(k.size(1) > 0 && q.size(1) > 0 && q.size(1) % k.size(1) == 0, op, "'", qname,
              "' heads (", q.size(1), ") must be a positive multiple of '", kname, "' heads (",
              k.size(1), ")");
}

// stats [L, B, 2] f32 (L is checked by the caller where another argument fixes it).
inline void check_stats(const at::Tensor& stats, int64_t B, const char* op) {
  checks::check_dim(stats, 3, op, "stats", "[L, B, 2]");
  checks::check_dtype(stats, at::kFloat, op, "stats");
  checks::check_size(stats, 1, B, op, "stats", "B (from modality)");
  checks::check_size(stats, 2, 2, op, "stats", "(S, I)");
}

// scores [L, B, N] f32 without its device (select_keep checks it after 'keep').
inline void check_scores_shape(const at::Tensor& scores, const Dims& d, const char* op) {
  checks::check_dim(scores, 3, op, "scores", "[L, B, N]");
  checks::check_dtype(scores, at::kFloat, op, "scores");
  checks::check_size(scores, 1, d.B, op, "scores", "B (from modality)");
  checks::check_size(scores, 2, d.N, op, "scores", "N (from modality)");
}

// Layouts of a K/V pair in the messages: the cache ops say N slots, decode_evict_ S.
struct KVLayout {
  const char* k;    // "[B, Hkv, N, D]"
  const char* v;    // "[B, Hkv, N, Dv]"
  const char* seq;  // "N (from k)"
};
constexpr KVLayout kCacheKV{"[B, Hkv, N, D]", "[B, Hkv, N, Dv]", "N (from k)"};
constexpr KVLayout kDecodeKV{"[B, Hkv, S, D]", "[B, Hkv, S, Dv]", "S (from k)"};

// k [B, Hkv, N, D] and v [B, Hkv, N, Dv] of one layer: same device, same dtype, same B, Hkv, N
// (the head dims may differ).
inline void check_kv_pair(const at::Tensor& k, const at::Tensor& v, const char* op,
                          const char* kname, const char* vname, const KVLayout& lay = kCacheKV) {
  checks::check_dim(k, 4, op, kname, lay.k);
  checks::check_dim(v, 4, op, vname, lay.v);
  checks::check_same_device(v, k, op, vname, kname);
  checks::check_same_dtype(v, k, op, vname, kname);
  checks::check_size(v, 0, k.size(0), op, vname, "B (from k)");
  checks::check_size(v, 1, k.size(1), op, vname, "Hkv (from k)");
  checks::check_size(v, 2, k.size(2), op, vname, lay.seq);
}

// Every K and V of a cache is compacted in place: none may share memory with itself or another.
inline void check_written_cache(at::TensorList k_cache, at::TensorList v_cache, const char* op) {
  const int64_t L = static_cast<int64_t>(k_cache.size());
  auto name = [](int64_t i, int64_t L) {
    return std::string(i < L ? "k_cache[" : "v_cache[") + std::to_string(i < L ? i : i - L) + "]";
  };
  auto at_ = [&](int64_t i) -> const at::Tensor& { return i < L ? k_cache[i] : v_cache[i - L]; };
  for (int64_t i = 0; i < 2 * L; ++i) {
    checks::check_no_internal_overlap(at_(i), op, i < L ? "k_cache" : "v_cache", i < L ? i : i - L);
    for (int64_t j = i + 1; j < 2 * L; ++j)
      checks::check_no_overlap(at_(i), at_(j), op, name(i, L), name(j, L));
  }
}

// k_cache / v_cache: the same number of layers, L of them or none, each layer a K/V pair of
// float K on modality's device with B and N from modality.
inline void check_cache_lists(at::TensorList k_cache, at::TensorList v_cache, int64_t L,
                              const at::Tensor& modality, const Dims& d, const char* op) {
  TGVKV_CHECK(k_cache.size() == v_cache.size(), op, "'k_cache' and 'v_cache' must have the same ",
              "number of layers, got ", k_cache.size(), " and ", v_cache.size());
  TGVKV_CHECK(k_cache.empty() || static_cast<int64_t>(k_cache.size()) == L, op, "'k_cache' must ",
              "have L = ", L, " layers (or none), got ", k_cache.size());
  for (size_t l = 0; l < k_cache.size(); ++l) {
    check_kv_pair(k_cache[l], v_cache[l], op, "k_cache[l]", "v_cache[l]");
    checks::check_float_dtype(k_cache[l], op, "k_cache[l]");
    checks::check_size(k_cache[l], 0, d.B, op, "k_cache[l]", "B (from modality)");
    checks::check_size(k_cache[l], 2, d.N, op, "k_cache[l]", "N (from modality)");
    checks::check_same_device(k_cache[l], modality, op, "k_cache[l]", "modality");
  }
  check_written_cache(k_cache, v_cache, op);
}

// ------------------------------------------------------------------------------------------------
// One function per op.
// ------------------------------------------------------------------------------------------------
struct ScoreArgs {
  Dims d;
  int text_mode;  // checks::kTextScoreGuidance / kTextScoreAllQueries
};

inline ScoreArgs check_score_text_vision_args(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& q_pos, const at::Tensor& modality,
                                              double scale, c10::string_view text_score,
                                              const char* op) {
  const int text_mode = checks::parse_text_score(text_score, op);
  const Dims d = check_q_pos_modality(q_pos, modality, op);
  check_layer_qk(q, k, modality, d, op, "q", "k", text_mode);
  checks::check_scale(scale, op);
  return ScoreArgs{d, text_mode};
}

struct BudgetArgs {
  Dims d;
  int64_t L;
  int mode;           // kBudgetMass / kBudgetMI
  int text_mode = 0;  // checks::kTextScoreGuidance / kTextScoreAllQueries (evict only)
};

inline BudgetArgs check_layer_budgets_args(const at::Tensor& stats, const at::Tensor& q_pos,
                                           const at::Tensor& modality, double keep_ratio,
                                           c10::string_view budget, int64_t n_sink,
                                           const char* op) {
  const Dims d = check_q_pos_modality(q_pos, modality, op);
  check_stats(stats, d.B, op);
  checks::check_same_device(stats, modality, op, "stats", "modality");
  checks::check_keep_ratio(keep_ratio, op);
  const int mode = checks::parse_budget(budget, op);
  checks::check_n_sink(n_sink, op);
  return BudgetArgs{d, stats.size(0), mode};
}

struct SelectArgs {
  Dims d;
  int64_t L;
};

inline SelectArgs check_select_keep_args(const at::Tensor& scores, const at::Tensor& keep,
                                         const at::Tensor& q_pos, const at::Tensor& modality,
                                         int64_t n_sink, const char* op) {
  const Dims d = check_q_pos_modality(q_pos, modality, op);
  check_scores_shape(scores, d, op);
  checks::check_dim(keep, 2, op, "keep", "[L, B]");
  checks::check_dtype(keep, at::kLong, op, "keep");
  checks::check_size(keep, 0, scores.size(0), op, "keep", "L (from scores)");
  checks::check_size(keep, 1, d.B, op, "keep", "B (from modality)");
  checks::check_same_device(scores, modality, op, "scores", "modality");
  checks::check_same_device(keep, modality, op, "keep", "modality");
  checks::check_n_sink(n_sink, op);
  return SelectArgs{d, scores.size(0)};
}

// k, v [B, Hkv, N, D] float; keep_idx [B, N] int64, one entry per slot.
inline void check_compact_args(const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& keep_idx, const char* op) {
  check_kv_pair(k, v, op, "k", "v");
  checks::check_float_dtype(k, op, "k");
  checks::check_dim(keep_idx, 2, op, "keep_idx", "[B, N]");
  checks::check_dtype(keep_idx, at::kLong, op, "keep_idx");
  checks::check_same_device(keep_idx, k, op, "keep_idx", "k");
  checks::check_size(keep_idx, 0, k.size(0), op, "keep_idx", "B (from k)");
  checks::check_size(keep_idx, 1, k.size(2), op, "keep_idx", "N (from k)");
  checks::check_no_internal_overlap(k, op, "k");
  checks::check_no_internal_overlap(v, op, "v");
  checks::check_no_overlap(k, v, op, "k", "v");
}

// Returns the layer count L (from scores) and the budget mode.
inline BudgetArgs check_evict_from_scores_args(at::TensorList k_cache, at::TensorList v_cache,
                                               const at::Tensor& scores, const at::Tensor& stats,
                                               const at::Tensor& q_pos, const at::Tensor& modality,
                                               double keep_ratio, c10::string_view budget,
                                               int64_t n_sink, const char* op) {
  const Dims d = check_q_pos_modality(q_pos, modality, op);
  check_scores_shape(scores, d, op);
  checks::check_same_device(scores, modality, op, "scores", "modality");
  check_stats(stats, d.B, op);
  checks::check_size(stats, 0, scores.size(0), op, "stats", "L (from scores)");
  checks::check_same_device(stats, modality, op, "stats", "modality");
  checks::check_keep_ratio(keep_ratio, op);
  const int mode = checks::parse_budget(budget, op);
  checks::check_n_sink(n_sink, op);
  const int64_t L = scores.size(0);
  check_cache_lists(k_cache, v_cache, L, modality, d, op);
  return BudgetArgs{d, L, mode};
}

// Returns the layer count L (from k_cache) and the budget mode.
inline BudgetArgs check_evict_args(at::TensorList k_cache, at::TensorList v_cache,
                                   at::TensorList queries, const at::Tensor& q_pos,
                                   const at::Tensor& modality, double scale, double keep_ratio,
                                   c10::string_view budget, int64_t n_sink,
                                   c10::string_view text_score, const char* op) {
  const int text_mode = checks::parse_text_score(text_score, op);
  const Dims d = check_q_pos_modality(q_pos, modality, op);
  const int64_t L = static_cast<int64_t>(k_cache.size());
  TGVKV_CHECK(static_cast<int64_t>(queries.size()) == L, op, "'queries' must have one tensor per ",
              "layer of 'k_cache' (", L, "), got ", queries.size());
  check_cache_lists(k_cache, v_cache, L, modality, d, op);
  for (int64_t l = 0; l < L; ++l)
    check_layer_qk(queries[l], k_cache[l], modality, d, op, "queries[l]", "k_cache[l]",
                   text_mode);
  checks::check_scale(scale, op);
  checks::check_keep_ratio(keep_ratio, op);
  const int mode = checks::parse_budget(budget, op);
  checks::check_n_sink(n_sink, op);
  return BudgetArgs{d, L, mode, text_mode};
}

struct DecodeArgs {
  int64_t B, Hkv, S, D, Hq;
};

inline DecodeArgs check_decode_evict_args(const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& pos, const at::Tensor& length,
                                          const at::Tensor& q, const at::Tensor& n_seen,
                                          const at::Tensor& keep_fraction,
                                          const at::Tensor& n_protected, double scale,
                                          int64_t n_sink, const char* op) {
  check_kv_pair(k, v, op, "k", "v", kDecodeKV);
  checks::check_float_dtype(k, op, "k");
  const int64_t B = k.size(0), Hkv = k.size(1), S = k.size(2), D = k.size(3);
  checks::check_dim(q, 3, op, "q", "[B, Hq, D]");
  checks::check_same_dtype(q, k, op, "q", "k");
  checks::check_same_device(q, k, op, "q", "k");
  checks::check_size(q, 0, B, op, "q", "B (from k)");
  checks::check_size(q, 2, D, op, "q", "D (from k)");
  TGVKV_CHECK(Hkv > 0 && q.size(1) > 0 && q.size(1) % Hkv == 0, op, "'q' heads (", q.size(1),
              ") must be a positive multiple of 'k' heads (", Hkv, ")");
  checks::check_dim(pos, 2, op, "pos", "[B, S]");
  checks::check_dtype(pos, at::kLong, op, "pos");
  checks::check_size(pos, 0, B, op, "pos", "B (from k)");
  checks::check_size(pos, 1, S, op, "pos", "S (from k)");
  struct Vec {
    const at::Tensor* t;
    const char* name;
    at::ScalarType dt;
  };
  for (const Vec& x : {Vec{&length, "length", at::kLong}, Vec{&n_seen, "n_seen", at::kLong},
                       Vec{&keep_fraction, "keep_fraction", at::kDouble},
                       Vec{&n_protected, "n_protected", at::kLong}}) {
    checks::check_dim(*x.t, 1, op, x.name, "[B]");
    checks::check_dtype(*x.t, x.dt, op, x.name);
    checks::check_size(*x.t, 0, B, op, x.name, "B (from k)");
    checks::check_same_device(*x.t, k, op, x.name, "k");
  }
  checks::check_same_device(pos, k, op, "pos", "k");
  checks::check_scale(scale, op);
  checks::check_n_sink(n_sink, op);
  const at::Tensor* written[] = {&k, &v, &pos, &length};
  const char* names[] = {"k", "v", "pos", "length"};
  for (int i = 0; i < 4; ++i) {
    checks::check_no_internal_overlap(*written[i], op, names[i]);
    for (int j = i + 1; j < 4; ++j)
      checks::check_no_overlap(*written[i], *written[j], op, names[i], names[j]);
  }
  return DecodeArgs{B, Hkv, S, D, q.size(1)};
}

// The integer inputs of decode_evict_ that have no meaning below 0 (CPU: reads the values; the
// CUDA op cannot without a host sync and treats n_protected <= 0 as "nothing protected").
// length's upper bound S is checked by the CPU op itself; n_protected > length protects all.
inline void check_decode_evict_values(const at::Tensor& n_seen, const at::Tensor& n_protected,
                                      const char* op) {
  checks::check_values_at_least(n_seen, 0, op, "n_seen", "tokens seen so far");
  checks::check_values_at_least(n_protected, 0, op, "n_protected", "a protected suffix length");
}

// Written tensors of one call (name, tensor): none may overlap itself or another. Sorted by the
// byte range each can touch, so only tensors whose ranges intersect are compared exactly: linear
// in the count for the separate allocations of a cache (a decode step writes 3 L + 1 tensors).
inline void check_written_disjoint(std::vector<std::pair<std::string, const at::Tensor*>>& w,
                                   const char* op) {
  struct Ext {
    uintptr_t lo, hi;
    size_t i;
  };
  std::vector<Ext> ext;
  ext.reserve(w.size());
  for (size_t i = 0; i < w.size(); ++i) {
    const at::Tensor& t = *w[i].second;
    TGVKV_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, "'", w[i].first,
                "' is written in place but several of its elements share one memory location (an "
                "expand()ed or stride-0 view); pass a tensor with its own memory (e.g. .clone())");
    if (t.numel() == 0) continue;
    uintptr_t lo, hi;
    checks::byte_extent(t, &lo, &hi);
    ext.push_back(Ext{lo, hi, i});
  }
  std::sort(ext.begin(), ext.end(), [](const Ext& a, const Ext& b) {
    return a.lo != b.lo ? a.lo < b.lo : a.i < b.i;
  });
  for (size_t a = 0; a < ext.size(); ++a)
    for (size_t b = a + 1; b < ext.size() && ext[b].lo < ext[a].hi; ++b)
      checks::check_no_overlap(*w[ext[a].i].second, *w[ext[b].i].second, op,
                               w[std::min(ext[a].i, ext[b].i)].first,
                               w[std::max(ext[a].i, ext[b].i)].first);
}

struct DecodeLayersArgs {
  int64_t L, B;
};

// decode_evict_layers_: L layers of k_cache[l] [B, Hkv_l, S_l, D_l], v_cache[l] [B, Hkv_l, S_l,
// Dv_l], pos[l] [B, S_l] i64, queries[l] [B, Hq_l, D_l] (K's dtype, one dtype for all layers);
// length [L, B] i64, n_seen [B] i64, keep_fraction [L, B] f64, n_protected [L, B] i64.
inline DecodeLayersArgs check_decode_evict_layers_args(
    at::TensorList k_cache, at::TensorList v_cache, at::TensorList pos, const at::Tensor& length,
    at::TensorList queries, const at::Tensor& n_seen, const at::Tensor& keep_fraction,
    const at::Tensor& n_protected, double scale, int64_t n_sink, const char* op) {
  const int64_t L = static_cast<int64_t>(k_cache.size());
  auto count = [&](size_t n, const char* name) {
    TGVKV_CHECK(static_cast<int64_t>(n) == L, op, "'", name, "' must have one tensor per layer ",
                "of 'k_cache' (", L, "), got ", n);
  };
  count(v_cache.size(), "v_cache");
  count(pos.size(), "pos");
  count(queries.size(), "queries");
  checks::check_dim(length, 2, op, "length", "[L, B]");
  const int64_t B = length.size(1);
  for (int64_t l = 0; l < L; ++l) {
    const std::string i = "[" + std::to_string(l) + "]";
    const std::string kn = "k_cache" + i, vn = "v_cache" + i, pn = "pos" + i, qn = "queries" + i;
    const at::Tensor &k = k_cache[l], &v = v_cache[l], &p = pos[l], &q = queries[l];
    check_kv_pair(k, v, op, kn.c_str(), vn.c_str(), kDecodeKV);
    checks::check_float_dtype(k, op, kn.c_str());
    if (l > 0) checks::check_same_dtype(k, k_cache[0], op, kn.c_str(), "k_cache[0]");
    checks::check_size(k, 0, B, op, kn.c_str(), "B (from length)");
    checks::check_same_device(k, length, op, kn.c_str(), "length");
    const int64_t Hkv = k.size(1), S = k.size(2), D = k.size(3);
    checks::check_dim(q, 3, op, qn.c_str(), "[B, Hq, D]");
    checks::check_same_dtype(q, k, op, qn.c_str(), kn.c_str());
    checks::check_same_device(q, k, op, qn.c_str(), kn.c_str());
    checks::check_size(q, 0, B, op, qn.c_str(), "B (from length)");
    checks::check_size(q, 2, D, op, qn.c_str(), "D (from k_cache[l])");
    TGVKV_CHECK(Hkv > 0 && q.size(1) > 0 && q.size(1) % Hkv == 0, op, "'", qn, "' heads (",
                q.size(1), ") must be a positive multiple of '", kn, "' heads (", Hkv, ")");
    checks::check_dim(p, 2, op, pn.c_str(), "[B, S]");
    checks::check_dtype(p, at::kLong, op, pn.c_str());
    checks::check_size(p, 0, B, op, pn.c_str(), "B (from length)");
    checks::check_size(p, 1, S, op, pn.c_str(), "S (from k_cache[l])");
    checks::check_same_device(p, k, op, pn.c_str(), kn.c_str());
  }
  checks::check_dtype(length, at::kLong, op, "length");
  checks::check_size(length, 0, L, op, "length", "L (from k_cache)");
  struct Vec {
    const at::Tensor* t;
    const char* name;
    at::ScalarType dt;
    int64_t dim;
  };
  for (const Vec& x : {Vec{&n_seen, "n_seen", at::kLong, 1},
                       Vec{&keep_fraction, "keep_fraction", at::kDouble, 2},
                       Vec{&n_protected, "n_protected", at::kLong, 2}}) {
    checks::check_dim(*x.t, x.dim, op, x.name, x.dim == 1 ? "[B]" : "[L, B]");
    checks::check_dtype(*x.t, x.dt, op, x.name);
    if (x.dim == 2) checks::check_size(*x.t, 0, L, op, x.name, "L (from k_cache)");
    checks::check_size(*x.t, x.dim - 1, B, op, x.name, "B (from length)");
    checks::check_same_device(*x.t, length, op, x.name, "length");
  }
  checks::check_scale(scale, op);
  checks::check_n_sink(n_sink, op);
  std::vector<std::pair<std::string, const at::Tensor*>> w;
  w.reserve(static_cast<size_t>(3 * L + 1));
  for (int64_t l = 0; l < L; ++l) {
    const std::string i = "[" + std::to_string(l) + "]";
    w.emplace_back("k_cache" + i, &k_cache[l]);
    w.emplace_back("v_cache" + i, &v_cache[l]);
    w.emplace_back("pos" + i, &pos[l]);
  }
  w.emplace_back("length", &length);
  check_written_disjoint(w, op);
  return DecodeLayersArgs{L, B};
}

struct AppendArgs {
  int64_t B, Hkv, S, D, Dv, M;
};

// decode_append_: k [B, Hkv, S, D], v [B, Hkv, S, Dv] (float, one dtype), pos [B, S] i64,
// length [B] i64, mask [B, M] bool (M <= S), k_new [B, Hkv, 1, D] / v_new [B, Hkv, 1, Dv] in
// k's dtype; position >= 0. The written tensors (k, v, pos, length, mask) must not overlap.
inline AppendArgs check_decode_append_args(const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& pos, const at::Tensor& length,
                                           const at::Tensor& mask, const at::Tensor& k_new,
                                           const at::Tensor& v_new, int64_t position,
                                           const char* op) {
  check_kv_pair(k, v, op, "k", "v", kDecodeKV);
  checks::check_float_dtype(k, op, "k");
  const int64_t B = k.size(0), Hkv = k.size(1), S = k.size(2), D = k.size(3), Dv = v.size(3);
  struct New {
    const at::Tensor* t;
    const char* name;
    const char* layout;
    int64_t d;
  };
  for (const New& x : {New{&k_new, "k_new", "[B, Hkv, 1, D]", D},
                       New{&v_new, "v_new", "[B, Hkv, 1, Dv]", Dv}}) {
    checks::check_dim(*x.t, 4, op, x.name, x.layout);
    checks::check_same_dtype(*x.t, k, op, x.name, "k");
    checks::check_same_device(*x.t, k, op, x.name, "k");
    checks::check_size(*x.t, 0, B, op, x.name, "B (from k)");
    checks::check_size(*x.t, 1, Hkv, op, x.name, "Hkv (from k)");
    checks::check_size(*x.t, 2, 1, op, x.name, "1 (one new token per step)");
    checks::check_size(*x.t, 3, x.d, op, x.name, x.d == D ? "D (from k)" : "Dv (from v)");
  }
  checks::check_dim(pos, 2, op, "pos", "[B, S]");
  checks::check_dtype(pos, at::kLong, op, "pos");
  checks::check_size(pos, 0, B, op, "pos", "B (from k)");
  checks::check_size(pos, 1, S, op, "pos", "S (from k)");
  checks::check_same_device(pos, k, op, "pos", "k");
  checks::check_dim(length, 1, op, "length", "[B]");
  checks::check_dtype(length, at::kLong, op, "length");
  checks::check_size(length, 0, B, op, "length", "B (from k)");
  checks::check_same_device(length, k, op, "length", "k");
  checks::check_dim(mask, 2, op, "mask", "[B, M]");
  checks::check_dtype(mask, at::kBool, op, "mask");
  checks::check_size(mask, 0, B, op, "mask", "B (from k)");
  TGVKV_CHECK(mask.size(1) <= S, op, "'mask' covers ", mask.size(1), " slots, more than the ",
              "S = ", S, " slots of 'k'");
  checks::check_same_device(mask, k, op, "mask", "k");
  TGVKV_CHECK_VALUE(position >= 0, op, "'position' must be >= 0 (the new token's position), got ",
                    position);
  std::vector<std::pair<std::string, const at::Tensor*>> w{
      {"k", &k}, {"v", &v}, {"pos", &pos}, {"length", &length}, {"mask", &mask}};
  check_written_disjoint(w, op);
  for (const New& x : {New{&k_new, "k_new", nullptr, 0}, New{&v_new, "v_new", nullptr, 0}})
    for (const auto& dst : w)
      TGVKV_CHECK(!checks::may_share_memory(*x.t, *dst.second), op, "'", x.name, "' shares memory ",
                  "with '", dst.first, "', which is written in place; pass a separate tensor");
  return AppendArgs{B, Hkv, S, D, Dv, mask.size(1)};
}

}  // namespace op_args
}  // namespace tgvkv
