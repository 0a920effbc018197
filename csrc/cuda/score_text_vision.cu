// CUDA implementation of tgvkv::score_text_vision (and the launcher of the scoring stage that
// evict.cu reuses). Kernels: csrc/include/tgvkv/cuda/score.cuh.
#include <torch/library.h>

#include <tuple>

#include "glue.cuh"
#include "tgvkv/cuda/score.cuh"

namespace tgvkv {
namespace cuda {

namespace {

template <typename T>
void launch_score_t(const score::Params& p, cudaStream_t st) {
  using namespace score;
  const size_t smem = dyn_smem_bytes<T>(p);
  // > 48 KB of dynamic shared memory needs an opt-in (done once per kernel and device).
  C10_CUDA_CHECK(ensure_dynamic_smem(stats_kernel<T>, smem));
  C10_CUDA_CHECK(ensure_dynamic_smem(weights_kernel<T>, smem));
  C10_CUDA_CHECK(ensure_dynamic_smem(scores_kernel<T>, smem));
  const dim3 g1(p.nsplit, p.B, p.L), g2((p.T + kNC - 1) / kNC, p.B, p.L), g3(p.nchunks, p.B, p.L),
      g4(p.B, p.L);
  if (!empty_grid(g1)) {
    stats_kernel<T><<<g1, kThreads, smem, st>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!empty_grid(g2)) {
    weights_kernel<T><<<g2, kThreads, smem, st>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!empty_grid(g3)) {
    scores_kernel<T><<<g3, kThreads, smem, st>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!empty_grid(g4)) {
    finalize_kernel<<<g4, kThreads, 0, st>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void launch_score(const score::Params& p, DType dtype, cudaStream_t st) {
  if (p.L == 0 || p.B == 0) return;
  const size_t LB = size_t(p.L) * p.B;
  if (p.N == 0 || p.T == 0) {  // no guidance row (or no slot): every score and statistic is 0
    if (p.N > 0) C10_CUDA_CHECK(cudaMemsetAsync(p.scores, 0, LB * p.N * sizeof(float), st));
    C10_CUDA_CHECK(cudaMemsetAsync(p.stats, 0, LB * 2 * sizeof(float), st));
    return;
  }
  switch (dtype) {
    case DType::F32: launch_score_t<float>(p, st); break;
    case DType::F16: launch_score_t<half_t>(p, st); break;
    case DType::BF16: launch_score_t<bf16_t>(p, st); break;
  }
}

namespace {

std::tuple<at::Tensor, at::Tensor> score_text_vision_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& q_pos,
                                                          const at::Tensor& modality,
                                                          double scale) {
  const char* op = "score_text_vision";
  check_cuda(modality, op, "modality");
  check_cuda(q, op, "q");
  check_cuda(k, op, "k");
  const op_args::Dims d = op_args::check_score_text_vision_args(q, k, q_pos, modality, scale, op);
  const int64_t B = d.B, N = d.N, T = d.T;
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
  p.q[0] = view4(q);
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
  launch_score(p, dtype_of(k), current_stream());
  return {scores, stats};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(tgvkv, CUDA, m) { m.impl("score_text_vision", &cuda::score_text_vision_cuda); }

}  // namespace tgvkv
