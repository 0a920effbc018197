// CUDA implementation of tgvkv::score_text_vision. Kernels and their launchers (which evict.cu
// reuses): csrc/include/tgvkv/cuda/score.cuh and text_mass.cuh (text_score="all_queries"); this
// is the one translation unit that includes them.
#include <torch/library.h>

#include <tuple>

#include "glue.cuh"
#include "tgvkv/cuda/score.cuh"
#include "tgvkv/cuda/text_mass.cuh"

namespace tgvkv {
namespace cuda {

namespace {

std::tuple<at::Tensor, at::Tensor> score_text_vision_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& q_pos,
                                                          const at::Tensor& modality,
                                                          double scale,
                                                          c10::string_view text_score) {
  const char* op = "score_text_vision";
  check_cuda(modality, op, "modality");
  check_cuda(q, op, "q");
  check_cuda(k, op, "k");
  const op_args::ScoreArgs a =
      op_args::check_score_text_vision_args(q, k, q_pos, modality, scale, text_score, op);
  const bool all = a.text_mode == checks::kTextScoreAllQueries;
  const int64_t B = a.d.B, N = a.d.N, T = a.d.T;
  check_head_dim(k, op);
  check_batch(B, op);
  checks::check_slot_count(N, op);
  c10::cuda::CUDAGuard guard(k.device());
  const at::Tensor qp = q_pos.contiguous(), mod = modality.contiguous();
  at::Tensor scores = at::empty({B, N}, k.options().dtype(at::kFloat));
  at::Tensor stats = at::empty({B, 2}, k.options().dtype(at::kFloat));
  score::Params p{};
  p.L = 1;
  p.B = int(B);
  p.Hq = int(q.size(1));
  p.Hkv = int(k.size(1));
  p.T = int(T);
  p.D = int(k.size(3));
  p.N = N;
  p.scale = float(scale);
  const at::Tensor qg = all ? guidance_rows(q, qp) : q;  // the guidance rows [B, Hq, T, D]
  p.q[0] = view4(qg);
  p.k[0] = view4(k);
  const int es = int(k.element_size());
  p.vec_q = vec16_ok(p.q[0], p.D, es);
  p.vec_k = vec16_ok(p.k[0], p.D, es);
  p.q_pos = qp.data_ptr<int64_t>();
  p.modality = mod.data_ptr<int8_t>();
  p.scores = scores.data_ptr<float>();
  p.stats = stats.data_ptr<float>();
  const size_t bytes = score::plan(p, nullptr);
  at::Tensor ws = at::empty({int64_t(bytes)}, k.options().dtype(at::kByte));
  score::plan(p, ws.data_ptr());
  C10_CUDA_CHECK(launch_score(p, dtype_of(k), current_stream()));
  if (all) run_text_mass(at::TensorList(&q, 1), at::TensorList(&k, 1), mod, scale,
                         scores.data_ptr<float>());
  return {scores, stats};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(tgvkv, CUDA, m) { m.impl("score_text_vision", &cuda::score_text_vision_cuda); }

}  // namespace tgvkv
