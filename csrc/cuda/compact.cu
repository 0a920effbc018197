// CUDA implementation of tgvkv::compact_. The compaction kernel and its launcher (which evict.cu
// reuses): csrc/include/tgvkv/cuda/compact.cuh; this is the one translation unit that includes it.
#include <torch/library.h>

#include "glue.cuh"
#include "tgvkv/cuda/compact.cuh"

namespace tgvkv {
namespace cuda {

namespace {

at::Tensor compact_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& keep_idx) {
  const char* op = "compact_";
  check_cuda(k, op, "k");
  check_cuda(v, op, "v");
  check_cuda(keep_idx, op, "keep_idx");
  op_args::check_compact_args(k, v, keep_idx, op);
  const int64_t B = k.size(0), H = k.size(1), N = k.size(2);
  checks::check_slot_count(N, op);
  c10::cuda::CUDAGuard guard(k.device());
  const at::Tensor idx = keep_idx.contiguous();
  at::Tensor n_kept = at::empty({B}, keep_idx.options());
  if (B == 0) return n_kept;
  // The kernel needs a contiguous head dim; otherwise compact a contiguous copy and copy back.
  const at::Tensor kw = k.stride(3) == 1 || k.size(3) <= 1 ? k : k.contiguous();
  const at::Tensor vw = v.stride(3) == 1 || v.size(3) <= 1 ? v : v.contiguous();
  compact::Params p{};
  p.B = int(B);
  p.H = int(H > 0 ? H : 1);  // H == 0: one (empty) row per sample still reports n_kept
  p.N = N;
  p.keep_idx = idx.data_ptr<int64_t>();
  p.n_kept_in = nullptr;
  p.n_kept_out = n_kept.data_ptr<int64_t>();
  compact::Layer layer{kw.data_ptr(), {kw.stride(0), kw.stride(1), kw.stride(2)},
                       int64_t(kw.element_size()), H > 0 ? kw.size(3) : 0,
                       vw.data_ptr(), {vw.stride(0), vw.stride(1), vw.stride(2)},
                       int64_t(vw.element_size()), H > 0 ? vw.size(3) : 0};
  const int ub = compact::plan(p, &layer, 1, num_sms(k.get_device()));
  C10_CUDA_CHECK(launch_compact(p, ub, current_stream()));
  if (!kw.is_same(k)) k.copy_(kw);
  if (!vw.is_same(v)) v.copy_(vw);
  return n_kept;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(tgvkv, CUDA, m) { m.impl("compact_", &cuda::compact_cuda); }

}  // namespace tgvkv
