// CUDA implementation of tgvkv::layer_budgets: one block per sample scans its modality row and
// calls the torch-free tgvkv::sample_layer_budgets (shared with the CPU: bit-identical keep
// counts). Kernel and launcher: csrc/include/tgvkv/cuda/select.cuh (compiled in select_keep.cu).
#include <torch/library.h>

#include <tuple>

#include "glue.cuh"

namespace tgvkv {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> layer_budgets_cuda(const at::Tensor& stats,
                                                      const at::Tensor& q_pos,
                                                      const at::Tensor& modality,
                                                      double keep_ratio,
                                                      c10::string_view budget, bool redistribute,
                                                      int64_t n_sink) {
  const char* op = "layer_budgets";
  check_cuda(modality, op, "modality");
  const op_args::BudgetArgs a =
      op_args::check_layer_budgets_args(stats, q_pos, modality, keep_ratio, budget, n_sink, op);
  const int64_t B = a.d.B, N = a.d.N, L = a.L;
  const int mode = a.mode;
  checks::check_slot_count(N, op);
  check_layers(L, op);
  c10::cuda::CUDAGuard guard(modality.device());
  const at::Tensor st = stats.contiguous(), qp = q_pos.contiguous(), mod = modality.contiguous();
  at::Tensor keep = at::empty({L, B}, modality.options().dtype(at::kLong));
  at::Tensor frac = at::empty({L, B}, modality.options().dtype(at::kDouble));
  select::Params p{};
  p.L = int(L);
  p.B = int(B);
  p.T = int(q_pos.size(1));
  p.N = N;
  p.n_sink = n_sink;
  p.stats = st.data_ptr<float>();
  p.keep_ratio = keep_ratio;
  p.budget_mode = mode;
  p.redistribute = redistribute;
  p.q_pos = qp.data_ptr<int64_t>();
  p.modality = mod.data_ptr<int8_t>();
  p.keep_out = keep.data_ptr<int64_t>();
  p.keep_fraction = frac.data_ptr<double>();
  C10_CUDA_CHECK(launch_budgets(p, current_stream()));
  return {keep, frac};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(tgvkv, CUDA, m) { m.impl("layer_budgets", &cuda::layer_budgets_cuda); }

}  // namespace tgvkv
