// CUDA implementation of tgvkv::select_keep. The budget and selection kernels and their launchers
// (which layer_budgets.cu and evict.cu reuse): csrc/include/tgvkv/cuda/select.cuh; this is the
// one translation unit that includes it.
#include <torch/library.h>

#include <tuple>

#include "glue.cuh"
#include "tgvkv/cuda/select.cuh"

namespace tgvkv {
namespace cuda {

namespace {

std::tuple<at::Tensor, at::Tensor> select_keep_cuda(const at::Tensor& scores,
                                                    const at::Tensor& keep,
                                                    const at::Tensor& q_pos,
                                                    const at::Tensor& modality, int64_t n_sink) {
  const char* op = "select_keep";
  check_cuda(modality, op, "modality");
  const op_args::SelectArgs a =
      op_args::check_select_keep_args(scores, keep, q_pos, modality, n_sink, op);
  const int64_t B = a.d.B, N = a.d.N, L = a.L;
  checks::check_slot_count(N, op);
  TGVKV_CHECK(L * B < (int64_t{1} << 31), op, "L * B too large: ", L * B);
  c10::cuda::CUDAGuard guard(modality.device());
  const at::Tensor sc = scores.contiguous(), kp = keep.contiguous(), qp = q_pos.contiguous(),
                   mod = modality.contiguous();
  at::Tensor keep_idx = at::empty({L, B, N}, modality.options().dtype(at::kLong));
  at::Tensor n_prot = at::empty({L, B}, modality.options().dtype(at::kLong));
  select::Params p{};
  p.L = int(L);
  p.B = int(B);
  p.T = int(q_pos.size(1));
  p.N = N;
  p.n_sink = n_sink;
  p.scores = sc.data_ptr<float>();
  p.keep = kp.data_ptr<int64_t>();
  p.q_pos = qp.data_ptr<int64_t>();
  p.modality = mod.data_ptr<int8_t>();
  p.keep_idx = keep_idx.data_ptr<int64_t>();
  p.n_protected = n_prot.data_ptr<int64_t>();
  C10_CUDA_CHECK(launch_select(p, current_stream()));
  return {keep_idx, n_prot};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(tgvkv, CUDA, m) { m.impl("select_keep", &cuda::select_keep_cuda); }

}  // namespace tgvkv
