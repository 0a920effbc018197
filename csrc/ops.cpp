// Every tgvkv op schema, written once. CPU implementations register in csrc/cpu/*.cpp, CUDA ones
// in csrc/cuda/*.cu (TORCH_LIBRARY_IMPL(tgvkv, <key>, m)); fake (meta) kernels live beside the
// Python wrappers in tgvkv/ops.py. Semantics: README.md "API"; oracle: tgvkv/reference.py.
#include <torch/library.h>

TORCH_LIBRARY(tgvkv, m) {
  // Guidance rows of the causal head-averaged fp32 softmax attention (never N×N) reduced to the
  // TWR ranking scores [B, N] f32 and the TVB statistics (S, I) [B, 2] f32 of one layer.
  // k [B, Hkv, N, D]; q depends on text_score (SPEC §1.3):
  //   "all_queries" (default, the released code): q is the full post-RoPE query states
  //     [B, Hq, N, D] (row i = slot i); text slots score Σ_i A[i, p] over every non-pad row
  //     i >= p (each row's softmax normaliser computed in the same pass, never N×N stored);
  //   "guidance": q is the guidance rows [B, Hq, T, D] (row t = slot q_pos[b, t]); text slots
  //     score the column sum over the guidance rows only.
  // Vision scores and (S, I) come from the guidance rows in both modes (bit for bit the same).
  m.def(
      "score_text_vision(Tensor q, Tensor k, Tensor q_pos, Tensor modality, float scale,"
      " str text_score=\"all_queries\") -> (Tensor scores, Tensor stats)");
  // Per-layer keep counts [L, B] i64 and decode-time keep fractions [L, B] f64 from the
  // statistics of all layers [L, B, 2].
  m.def(
      "layer_budgets(Tensor stats, Tensor q_pos, Tensor modality, float keep_ratio,"
      " str budget=\"mass\", bool redistribute=False, int n_sink=4)"
      " -> (Tensor keep, Tensor keep_fraction)");
  // Order-preserving top-k per (layer, sample) on the key (text > vision, score, later slot):
  // kept slots ascending in keep_idx [L, B, N] (-1 after), protected-suffix sizes [L, B].
  m.def(
      "select_keep(Tensor scores, Tensor keep, Tensor q_pos, Tensor modality, int n_sink=4)"
      " -> (Tensor keep_idx, Tensor n_protected)");
  // In-place gather of one layer's K and V [B, Hkv, N, D] to the kept slots keep_idx [B, N];
  // returns the kept counts [B] i64.
  m.def("compact_(Tensor(a!) k, Tensor(b!) v, Tensor keep_idx) -> Tensor n_kept");
  // Budgets + selection + in-place compaction of a whole cache (L layers) from precomputed
  // scores [L, B, N] and stats [L, B, 2].
  m.def(
      "evict_from_scores(Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, Tensor scores,"
      " Tensor stats, Tensor q_pos, Tensor modality, float keep_ratio, str budget=\"mass\","
      " bool redistribute=False, int n_sink=4)"
      " -> (Tensor keep_idx, Tensor n_kept, Tensor n_protected, Tensor keep_fraction)");
  // The whole prefill method: scores of every layer from its queries, budgets, selection, and
  // in-place compaction of k_cache / v_cache. queries[l] as q of score_text_vision:
  // [B, Hq, N, D] full query states for text_score="all_queries" (default), [B, Hq, T, D]
  // guidance rows for "guidance".
  m.def(
      "evict(Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, Tensor[] queries, Tensor q_pos,"
      " Tensor modality, float scale, float keep_ratio, str budget=\"mass\","
      " bool redistribute=False, int n_sink=4, str text_score=\"all_queries\")"
      " -> (Tensor keep_idx, Tensor n_kept, Tensor n_protected, Tensor keep_fraction)");
  // One decode step of one layer: per sample, evict at most one slot (lowest head-averaged
  // attention of q among the candidates) by moving the last live slot into its place.
  m.def(
      "decode_evict_(Tensor(a!) k, Tensor(b!) v, Tensor(c!) pos, Tensor(d!) length, Tensor q,"
      " Tensor n_seen, Tensor keep_fraction, Tensor n_protected, float scale, int n_sink=4)"
      " -> Tensor evicted");
  // One decode step of a whole cache (L layers, one call per generated token): decode_evict_ of
  // every layer l on (k_cache[l], v_cache[l], pos[l], length[l], queries[l], n_seen,
  // keep_fraction[l], n_protected[l]); layers may differ in slot capacity S. Returns the evicted
  // positions [L, B] i64 (-1: none). length [L, B] i64, keep_fraction [L, B] f64, n_protected
  // [L, B] i64, n_seen [B] i64.
  m.def(
      "decode_evict_layers_(Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, Tensor(c!)[] pos,"
      " Tensor(d!) length, Tensor[] queries, Tensor n_seen, Tensor keep_fraction,"
      " Tensor n_protected, float scale, int n_sink=4) -> Tensor evicted");
  // The cache append of one decode step of one layer (before its attention): per sample b, the
  // new token's k_new[b, :, 0] / v_new[b, :, 0] go to slot n = length[b] of k / v, pos[b, n] =
  // position, length[b] = n + 1, and the live-slot mask [B, M] (M <= S) is rewritten as
  // mask[b, s] = s < length[b]. One op instead of six (scatters, increment, compare).
  m.def(
      "decode_append_(Tensor(a!) k, Tensor(b!) v, Tensor(c!) pos, Tensor(d!) length,"
      " Tensor(e!) mask, Tensor k_new, Tensor v_new, int position) -> ()");
}
