// CUDA implementation of tgvkv::decode_evict_ (kernels and launcher: csrc/include/tgvkv/cuda/decode.cuh).
// Three launches, no host sync. Data-dependent checks of the CPU op (length in [0, S], n_seen and
// n_protected >= 0, finite forget count, finite attention) are not done on CUDA: length is clamped
// to [0, S], n_protected <= 0 protects nothing, a non-finite forget count evicts nothing and NaN
// attention picks an unspecified (in-bounds) candidate.
#include <torch/library.h>

#include "glue.cuh"
#include "tgvkv/cuda/decode.cuh"

namespace tgvkv {
namespace cuda {
namespace {

// Slots per split of the decode kernels. Fixed (not derived from the device or the batch) so the
// fp32 rounding of the attention, hence the victim, depends on the sample's inputs only.
constexpr int64_t kDecodeSpan = 256;

at::Tensor decode_evict_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos,
                             const at::Tensor& length, const at::Tensor& q,
                             const at::Tensor& n_seen, const at::Tensor& keep_fraction,
                             const at::Tensor& n_protected, double scale, int64_t n_sink) {
  const char* op = "decode_evict_";
  check_cuda(k, op, "k");
  check_cuda(v, op, "v");
  check_cuda(q, op, "q");
  const op_args::DecodeArgs a = op_args::check_decode_evict_args(
      k, v, pos, length, q, n_seen, keep_fraction, n_protected, scale, n_sink, op);
  const int64_t B = a.B, Hkv = a.Hkv, S = a.S, D = a.D, Hq = a.Hq;
  check_batch(B, op);
  // q lives in shared memory as fp32 next to one key row per warp.
  const size_t smem1 = size_t(Hq + decode::kWarps) * size_t(D) * sizeof(float);
  TGVKV_CHECK(smem1 <= 200 * 1024, op, "Hq * D too large for the CUDA kernel (", Hq, " x ", D,
              ")");
  c10::cuda::CUDAGuard guard(k.device());
  at::Tensor evicted = at::empty({B}, pos.options());
  if (B == 0) return evicted;
  const at::Tensor qc = q.contiguous(), ns = n_seen.contiguous(), kf = keep_fraction.contiguous(),
                   np = n_protected.contiguous();
  decode::Params p{};
  p.B = int(B);
  p.Hq = int(Hq);
  p.Hkv = int(Hkv);
  p.D = int(D);
  p.Dv = int(v.size(3));
  p.S = S;
  p.scale = float(scale);
  p.n_sink = n_sink;
  p.k = k.data_ptr();
  p.ks0 = k.stride(0); p.ks1 = k.stride(1); p.ks2 = k.stride(2); p.ks3 = k.stride(3);
  p.v = v.data_ptr();
  p.vs0 = v.stride(0); p.vs1 = v.stride(1); p.vs2 = v.stride(2); p.vs3 = v.stride(3);
  p.pos = pos.data_ptr<int64_t>();
  p.ps0 = pos.stride(0);
  p.ps1 = pos.stride(1);
  p.length = length.data_ptr<int64_t>();
  p.ls0 = length.stride(0);
  p.q = qc.data_ptr();
  p.n_seen = ns.data_ptr<int64_t>();
  p.keep_fraction = kf.data_ptr<double>();
  p.n_protected = np.data_ptr<int64_t>();
  p.span = kDecodeSpan;
  p.nsplit = int((S + kDecodeSpan - 1) / kDecodeSpan);
  // workspace: logits [B, Hq, S] f32 | part [B, nsplit, Hq] f32x2 | theta [B] | best [B, nsplit] x3
  Carver c;
  const size_t o_lg = c.take<float>(size_t(B) * Hq * S);
  const size_t o_part = c.take<float2>(size_t(B) * p.nsplit * Hq);
  const size_t o_theta = c.take<int64_t>(size_t(B));
  const size_t o_ba = c.take<float>(size_t(B) * p.nsplit);
  const size_t o_bp = c.take<int64_t>(size_t(B) * p.nsplit);
  const size_t o_bs = c.take<int64_t>(size_t(B) * p.nsplit);
  at::Tensor ws = at::empty({int64_t(c.off + 256)}, k.options().dtype(at::kByte));
  char* base = static_cast<char*>(ws.data_ptr());
  p.logits = reinterpret_cast<float*>(base + o_lg);
  p.part = reinterpret_cast<float2*>(base + o_part);
  p.theta = reinterpret_cast<int64_t*>(base + o_theta);
  p.best_att = reinterpret_cast<float*>(base + o_ba);
  p.best_pos = reinterpret_cast<int64_t*>(base + o_bp);
  p.best_slot = reinterpret_cast<int64_t*>(base + o_bs);
  p.evicted = evicted.data_ptr<int64_t>();
  const cudaStream_t st = current_stream();
  C10_CUDA_CHECK(launch_decode(p, dtype_of(k), smem1, st));
  return evicted;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(tgvkv, CUDA, m) { m.impl("decode_evict_", &cuda::decode_evict_cuda); }

}  // namespace tgvkv
