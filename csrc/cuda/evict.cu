// CUDA implementations of tgvkv::evict_from_scores and tgvkv::evict: the composition of the
// stages over a whole cache with no host synchronisation (CUDA-graph capturable):
//   scoring      4 launches per group of <= kMaxLayers layers (score_text_vision.cu's launcher;
//                a sample's scores are bit-identical to score_text_vision's);
//   budgets +
//   selection    1 launch over all (layer, sample) pairs (select_keep.cu's launcher, budgets
//                computed in the block with the shared tgvkv::sample_layer_budgets);
//   compaction   1 launch per group of <= kMaxLayers layers (compact.cu's launcher).
// The per-layer K/V/Q pointers and strides travel by value in the kernel parameters.
//
// Data-dependent checks of the CPU op (q_pos layout and range, modality codes, finite scores)
// would need a host sync and are not done on CUDA: out-of-range q_pos entries are ignored as
// unused rows (never an out-of-bounds access); NaN scores give an unspecified (but in-bounds)
// selection; non-finite stats keep every slot of that sample.
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "glue.cuh"

namespace tgvkv {
namespace cuda {
namespace {

using at::Tensor;
using at::TensorList;
using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// Budgets + selection + compaction from scores [L, B, N] and stats [L, B, 2] (contiguous f32).
Tensor4 evict_tail(TensorList k_cache, TensorList v_cache, const Tensor& scores,
                   const Tensor& stats, const Tensor& qp, const Tensor& mod, double keep_ratio,
                   int mode, bool redistribute, int64_t n_sink) {
  const int64_t L = scores.size(0), B = scores.size(1), N = scores.size(2);
  const auto opts = mod.options();
  Tensor keep_idx = at::empty({L, B, N}, opts.dtype(at::kLong));
  Tensor n_kept = at::empty({L, B}, opts.dtype(at::kLong));
  Tensor n_prot = at::empty({L, B}, opts.dtype(at::kLong));
  Tensor frac = at::empty({L, B}, opts.dtype(at::kDouble));
  const cudaStream_t st = current_stream();
  select::Params sp{};
  sp.L = int(L);
  sp.B = int(B);
  sp.T = int(qp.size(1));
  sp.N = N;
  sp.n_sink = n_sink;
  sp.scores = scores.data_ptr<float>();
  sp.keep = nullptr;  // budgets in the block
  sp.stats = stats.data_ptr<float>();
  sp.keep_ratio = keep_ratio;
  sp.budget_mode = mode;
  sp.redistribute = redistribute;
  sp.q_pos = qp.data_ptr<int64_t>();
  sp.modality = mod.data_ptr<int8_t>();
  sp.keep_idx = keep_idx.data_ptr<int64_t>();
  sp.n_protected = n_prot.data_ptr<int64_t>();
  sp.n_kept = n_kept.data_ptr<int64_t>();
  sp.keep_fraction = frac.data_ptr<double>();
  C10_CUDA_CHECK(launch_select(sp, st));

  if (!k_cache.empty() && B > 0) {
    const int sms = num_sms(mod.get_device());
    // Layers whose head dim is strided are compacted through a contiguous copy (rare).
    std::vector<Tensor> kw(k_cache.begin(), k_cache.end()), vw(v_cache.begin(), v_cache.end());
    for (int64_t l = 0; l < L; ++l) {
      if (kw[l].stride(3) != 1 && kw[l].size(3) > 1) kw[l] = kw[l].contiguous();
      if (vw[l].stride(3) != 1 && vw[l].size(3) > 1) vw[l] = vw[l].contiguous();
    }
    const int64_t H = k_cache[0].size(1);
    for (int64_t l0 = 0; l0 < L; l0 += kMaxLayers) {
      const int n = int(std::min<int64_t>(kMaxLayers, L - l0));
      compact::Params cp{};
      cp.B = int(B);
      cp.H = int(H > 0 ? H : 1);
      cp.N = N;
      cp.keep_idx = sp.keep_idx + l0 * B * N;
      cp.n_kept_in = sp.n_kept + l0 * B;
      cp.n_kept_out = nullptr;
      compact::Layer layers[kMaxLayers];
      for (int i = 0; i < n; ++i) {
        const Tensor& k = kw[l0 + i];
        const Tensor& v = vw[l0 + i];
        layers[i] = compact::Layer{k.data_ptr(), {k.stride(0), k.stride(1), k.stride(2)},
                                   int64_t(k.element_size()), H > 0 ? k.size(3) : 0,
                                   v.data_ptr(), {v.stride(0), v.stride(1), v.stride(2)},
                                   int64_t(v.element_size()), H > 0 ? v.size(3) : 0};
      }
      const int ub = compact::plan(cp, layers, n, sms);
      C10_CUDA_CHECK(launch_compact(cp, ub, st));
    }
    for (int64_t l = 0; l < L; ++l) {
      if (!kw[l].is_same(k_cache[l])) k_cache[l].copy_(kw[l]);
      if (!vw[l].is_same(v_cache[l])) v_cache[l].copy_(vw[l]);
    }
  }
  return {keep_idx, n_kept, n_prot, frac};
}

// Device types of both ops, before op_args' checks.
void check_devices(const Tensor& modality, TensorList k_cache, TensorList v_cache,
                   const char* op) {
  check_cuda(modality, op, "modality");
  check_cuda(k_cache, op, "k_cache[l]");
  check_cuda(v_cache, op, "v_cache[l]");
}

// The CUDA limits of both ops, after op_args' checks.
void check_limits(TensorList k_cache, TensorList v_cache, const op_args::BudgetArgs& a,
                  const char* op) {
  checks::check_slot_count(a.d.N, op);
  check_batch(a.d.B, op);
  check_layers(a.L, op);
  check_cache_lists_uniform(k_cache, v_cache, op);
}

Tensor4 evict_from_scores_cuda(TensorList k_cache, TensorList v_cache, const Tensor& scores,
                               const Tensor& stats, const Tensor& q_pos, const Tensor& modality,
                               double keep_ratio, c10::string_view budget, bool redistribute,
                               int64_t n_sink) {
  const char* op = "evict_from_scores";
  check_devices(modality, k_cache, v_cache, op);
  const op_args::BudgetArgs a = op_args::check_evict_from_scores_args(
      k_cache, v_cache, scores, stats, q_pos, modality, keep_ratio, budget, n_sink, op);
  check_limits(k_cache, v_cache, a, op);
  const int mode = a.mode;
  c10::cuda::CUDAGuard guard(modality.device());
  return evict_tail(k_cache, v_cache, scores.contiguous(), stats.contiguous(), q_pos.contiguous(),
                    modality.contiguous(), keep_ratio, mode, redistribute, n_sink);
}

Tensor4 evict_cuda(TensorList k_cache, TensorList v_cache, TensorList queries, const Tensor& q_pos,
                   const Tensor& modality, double scale, double keep_ratio,
                   c10::string_view budget, bool redistribute, int64_t n_sink,
                   c10::string_view text_score) {
  const char* op = "evict";
  check_devices(modality, k_cache, v_cache, op);
  check_cuda(queries, op, "queries[l]");
  const op_args::BudgetArgs a = op_args::check_evict_args(
      k_cache, v_cache, queries, q_pos, modality, scale, keep_ratio, budget, n_sink, text_score,
      op);
  const bool all = a.text_mode == checks::kTextScoreAllQueries;
  check_limits(k_cache, v_cache, a, op);
  for (int64_t l = 0; l < a.L; ++l) {
    check_head_dim(k_cache[l], op);
    if (l > 0) checks::check_size(queries[l], 1, queries[0].size(1), op, "queries[l]",
                                  "Hq (from queries[0])");
  }
  const int64_t B = a.d.B, N = a.d.N, T = a.d.T, L = a.L;
  const int mode = a.mode;
  c10::cuda::CUDAGuard guard(modality.device());
  const Tensor qp = q_pos.contiguous(), mod = modality.contiguous();
  Tensor scores = at::empty({L, B, N}, mod.options().dtype(at::kFloat));
  Tensor stats = at::empty({L, B, 2}, mod.options().dtype(at::kFloat));
  const cudaStream_t st = current_stream();
  if (L > 0 && B > 0) {
    if (keep_ratio >= 1.0) {  // nothing is evicted: the scores are not needed (as on CPU)
      if (N > 0) C10_CUDA_CHECK(cudaMemsetAsync(scores.data_ptr(), 0, size_t(L * B * N) * 4, st));
      C10_CUDA_CHECK(cudaMemsetAsync(stats.data_ptr(), 0, size_t(L * B * 2) * 4, st));
    } else {
      score::Params p{};
      p.B = int(B);
      p.Hq = int(queries[0].size(1));
      p.Hkv = int(k_cache[0].size(1));
      p.T = int(T);
      p.D = int(k_cache[0].size(3));
      p.N = N;
      p.scale = float(scale);
      p.q_pos = qp.data_ptr<int64_t>();
      p.modality = mod.data_ptr<int8_t>();
      p.L = int(std::min<int64_t>(kMaxLayers, L));
      const size_t bytes = score::plan(p, nullptr);  // the largest group's workspace
      Tensor ws = at::empty({int64_t(bytes)}, mod.options().dtype(at::kByte));
      const int es = int(k_cache[0].element_size());
      const DType dt = dtype_of(k_cache[0]);
      // all_queries: the guidance rows [B, Hq, T, D] of the full query states for launch_score
      std::vector<Tensor> qg;
      if (all)
        for (int64_t l = 0; l < L; ++l) qg.push_back(guidance_rows(queries[l], qp));
      for (int64_t l0 = 0; l0 < L; l0 += kMaxLayers) {
        p.L = int(std::min<int64_t>(kMaxLayers, L - l0));
        score::plan(p, ws.data_ptr());
        p.vec_q = p.vec_k = true;
        for (int i = 0; i < p.L; ++i) {
          p.q[i] = view4(all ? qg[l0 + i] : queries[l0 + i]);
          p.k[i] = view4(k_cache[l0 + i]);
          p.vec_q = p.vec_q && vec16_ok(p.q[i], p.D, es);
          p.vec_k = p.vec_k && vec16_ok(p.k[i], p.D, es);
        }
        p.scores = scores.data_ptr<float>() + l0 * B * N;
        p.stats = stats.data_ptr<float>() + l0 * B * 2;
        // stream-ordered: the next group may reuse the workspace
        C10_CUDA_CHECK(launch_score(p, dt, st));
      }
      if (all) run_text_mass(queries, k_cache, mod, scale, scores.data_ptr<float>());
    }
  }
  return evict_tail(k_cache, v_cache, scores, stats, qp, mod, keep_ratio, mode, redistribute,
                    n_sink);
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(tgvkv, CUDA, m) {
  m.impl("evict_from_scores", &cuda::evict_from_scores_cuda);
  m.impl("evict", &cuda::evict_cuda);
}

}  // namespace tgvkv
