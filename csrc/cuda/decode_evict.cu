// CUDA implementations of tgvkv::decode_evict_layers_, tgvkv::decode_evict_ (its one-layer
// case) and tgvkv::decode_append_ (the per-layer cache append of a decode step, one launch). Kernels and launcher: csrc/include/tgvkv/cuda/decode.cuh. One kernel launch (after a
// memset of its hand-off counters) per group of up to decode::kMaxLayers = 24 layers (one for a
// model of up to 24 layers, two for 32), no host sync, CUDA-graph capturable. Data-dependent
// checks of the CPU op (length in [0, S], n_seen and n_protected >= 0, finite forget count,
// finite attention) are not done on CUDA: length is clamped to [0, S], n_protected <= 0 protects
// nothing, a non-finite forget count evicts nothing and NaN attention picks an unspecified
// (in-bounds) candidate.
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "glue.cuh"
#include "tgvkv/cuda/decode.cuh"

namespace tgvkv {
namespace cuda {
namespace {

// Slots per split of the decode kernels. Fixed (not derived from the device or the batch) so the
// fp32 rounding of the attention, hence the victim, depends on the sample's inputs only.
constexpr int64_t kDecodeSpan = 256;

struct LayerArgs {
  const at::Tensor* k;
  const at::Tensor* v;
  const at::Tensor* pos;
  at::Tensor q;  // contiguous [B, Hq, D]
};

// The decode step of every layer of `layers` (shapes checked, uniform Hq / Hkv / D / Dv / dtype):
// length [L, B] (any strides), keep_fraction [L, B] f64, n_protected [L, B] i64 (contiguous),
// n_seen [B] (contiguous); fills evicted [L, B] (contiguous).
void run_decode(const std::vector<LayerArgs>& layers, const at::Tensor& length,
                const at::Tensor& n_seen, const at::Tensor& kf, const at::Tensor& np,
                double scale, int64_t n_sink, at::Tensor& evicted, const char* op) {
  const int64_t L = static_cast<int64_t>(layers.size());
  const int64_t B = length.size(1);
  if (L == 0 || B == 0) return;
  const at::Tensor& k0 = *layers[0].k;
  const int64_t Hkv = k0.size(1), D = k0.size(3), Hq = layers[0].q.size(1);
  check_batch(B, op);
  // q lives in shared memory as fp32 next to one key row per warp.
  const size_t smem1 = decode::smem_bytes(Hq, D);
  TGVKV_CHECK(smem1 <= 200 * 1024, op, "Hq * D too large for the CUDA kernel (", Hq, " x ", D,
              ")");
  const cudaStream_t st = current_stream();
  for (int64_t l0 = 0; l0 < L; l0 += decode::kMaxLayers) {
    const int n = int(std::min<int64_t>(decode::kMaxLayers, L - l0));
    decode::Params p{};
    p.L = n;
    p.B = int(B);
    p.Hq = int(Hq);
    p.Hkv = int(Hkv);
    p.D = int(D);
    p.Dv = int(layers[0].v->size(3));
    p.scale = float(scale);
    p.n_sink = n_sink;
    p.span = kDecodeSpan;
    p.length = length.data_ptr<int64_t>() + l0 * length.stride(0);
    p.ls0 = length.stride(0);
    p.ls1 = length.stride(1);
    p.n_seen = n_seen.data_ptr<int64_t>();
    p.keep_fraction = kf.data_ptr<double>() + l0 * B;
    p.n_protected = np.data_ptr<int64_t>() + l0 * B;
    p.evicted = evicted.data_ptr<int64_t>() + l0 * B;
    for (int i = 0; i < n; ++i) {
      const LayerArgs& a = layers[l0 + i];
      decode::Layer& ly = p.layers[i];
      ly.k = a.k->data_ptr();
      ly.ks0 = a.k->stride(0); ly.ks1 = a.k->stride(1); ly.ks2 = a.k->stride(2); ly.ks3 = a.k->stride(3);
      ly.v = a.v->data_ptr();
      ly.vs0 = a.v->stride(0); ly.vs1 = a.v->stride(1); ly.vs2 = a.v->stride(2); ly.vs3 = a.v->stride(3);
      ly.pos = a.pos->data_ptr<int64_t>();
      ly.ps0 = a.pos->stride(0);
      ly.ps1 = a.pos->stride(1);
      ly.q = a.q.data_ptr();
      ly.S = a.k->size(2);
    }
    const size_t bytes = decode::plan(p, nullptr);
    at::Tensor ws = at::empty({int64_t(bytes)}, k0.options().dtype(at::kByte));
    decode::plan(p, ws.data_ptr());
    C10_CUDA_CHECK(launch_decode(p, dtype_of(k0), smem1, st));
  }
}

at::Tensor decode_evict_layers_cuda(at::TensorList k_cache, at::TensorList v_cache,
                                    at::TensorList pos, const at::Tensor& length,
                                    at::TensorList queries, const at::Tensor& n_seen,
                                    const at::Tensor& keep_fraction,
                                    const at::Tensor& n_protected, double scale, int64_t n_sink) {
  const char* op = "decode_evict_layers_";
  check_cuda(length, op, "length");
  check_cuda(k_cache, op, "k_cache[l]");
  const op_args::DecodeLayersArgs a = op_args::check_decode_evict_layers_args(
      k_cache, v_cache, pos, length, queries, n_seen, keep_fraction, n_protected, scale, n_sink,
      op);
  // one launch over several layers: every layer with layer 0's head shapes
  for (int64_t l = 1; l < a.L; ++l) {
    checks::check_size(k_cache[l], 1, k_cache[0].size(1), op, "k_cache[l]", "Hkv (from k_cache[0])");
    checks::check_size(k_cache[l], 3, k_cache[0].size(3), op, "k_cache[l]", "D (from k_cache[0])");
    checks::check_size(v_cache[l], 3, v_cache[0].size(3), op, "v_cache[l]", "Dv (from v_cache[0])");
    checks::check_size(queries[l], 1, queries[0].size(1), op, "queries[l]", "Hq (from queries[0])");
  }
  c10::cuda::CUDAGuard guard(length.device());
  at::Tensor evicted = at::empty({a.L, a.B}, length.options());
  std::vector<LayerArgs> layers;
  layers.reserve(static_cast<size_t>(a.L));
  for (int64_t l = 0; l < a.L; ++l)
    layers.push_back(LayerArgs{&k_cache[l], &v_cache[l], &pos[l], queries[l].contiguous()});
  run_decode(layers, length, n_seen.contiguous(), keep_fraction.contiguous(),
             n_protected.contiguous(), scale, n_sink, evicted, op);
  return evicted;
}

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
  c10::cuda::CUDAGuard guard(k.device());
  at::Tensor evicted = at::empty({1, a.B}, pos.options());
  std::vector<LayerArgs> layers{LayerArgs{&k, &v, &pos, q.contiguous()}};
  run_decode(layers, length.unsqueeze(0), n_seen.contiguous(),
             keep_fraction.unsqueeze(0).contiguous(), n_protected.unsqueeze(0).contiguous(), scale,
             n_sink, evicted, op);
  return evicted.squeeze(0);
}

void decode_append_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos,
                        const at::Tensor& length, const at::Tensor& mask, const at::Tensor& k_new,
                        const at::Tensor& v_new, int64_t position) {
  const char* op = "decode_append_";
  check_cuda(k, op, "k");
  const op_args::AppendArgs a =
      op_args::check_decode_append_args(k, v, pos, length, mask, k_new, v_new, position, op);
  check_batch(a.B, op);
  c10::cuda::CUDAGuard guard(k.device());
  append::Params p{};
  p.B = int(a.B);
  p.Hkv = int(a.Hkv);
  p.D = int(a.D);
  p.Dv = int(a.Dv);
  p.S = a.S;
  p.M = a.M;
  p.k = k.data_ptr();
  p.ks0 = k.stride(0); p.ks1 = k.stride(1); p.ks2 = k.stride(2); p.ks3 = k.stride(3);
  p.v = v.data_ptr();
  p.vs0 = v.stride(0); p.vs1 = v.stride(1); p.vs2 = v.stride(2); p.vs3 = v.stride(3);
  p.k_new = k_new.data_ptr();
  p.kn0 = k_new.stride(0); p.kn1 = k_new.stride(1); p.kn3 = k_new.stride(3);
  p.v_new = v_new.data_ptr();
  p.vn0 = v_new.stride(0); p.vn1 = v_new.stride(1); p.vn3 = v_new.stride(3);
  p.pos = pos.data_ptr<int64_t>();
  p.ps0 = pos.stride(0); p.ps1 = pos.stride(1);
  p.length = length.data_ptr<int64_t>();
  p.ls0 = length.stride(0);
  p.mask = mask.data_ptr<bool>();
  p.ms0 = mask.stride(0); p.ms1 = mask.stride(1);
  p.position = position;
  C10_CUDA_CHECK(launch_append(p, int(k.element_size()), current_stream()));
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(tgvkv, CUDA, m) {
  m.impl("decode_evict_", &cuda::decode_evict_cuda);
  m.impl("decode_evict_layers_", &cuda::decode_evict_layers_cuda);
  m.impl("decode_append_", &cuda::decode_append_cuda);
}

}  // namespace tgvkv
