// Torch-free launch interface of the tgvkv CUDA kernels: kernel parameter structs, launch plans
// and the host launchers. Each launcher is defined at the end of its kernel header
// (score.cuh, select.cuh, compact.cuh, decode.cuh), which exactly one translation unit of the
// extension includes (csrc/cuda/<op>.cu; evict.cu composes them through these declarations) and
// which the CUDA emulator (tools/cuda_emu) includes as well: one launch sequence, no copy.
//
// Launchers take raw pointers, sizes and the stream; they never synchronise with the host and
// check every runtime call and launch, returning the first error (cudaSuccess otherwise); the
// .cu glue turns it into an exception (C10_CUDA_CHECK).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "tgvkv/cuda/common.cuh"

namespace tgvkv {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// score_text_vision (csrc/cuda/score_text_vision.cu)
// ---------------------------------------------------------------------------------------------
namespace score {

constexpr int kTQ = 64;        // query rows per tile
constexpr int kNC = 64;        // keys per tile (chunk)
constexpr int kThreads = 256;  // 16 × 16 threads, 4 × 4 outputs each
constexpr int kMaxHeadDim = 256;

struct Params {
  int L, B, Hq, Hkv, T, D;
  int D4, DP;    // fp32 engine: D rounded up to 4, smem row pitch D4 + 4 floats
  int D16, LDH;  // tensor-core engine: D rounded up to 16, smem row pitch D16 + 8 halves
  int64_t N;
  int nchunks, nsplit, chunks_per_split;
  float scale;
  bool vec_q, vec_k;  // 16-byte loads legal for q / k
  View4 q[kMaxLayers];  // [B, Hq, T, D] per layer of the group
  View4 k[kMaxLayers];  // [B, Hkv, N, D]
  const int64_t* q_pos;    // [B, T] contiguous
  const int8_t* modality;  // [B, N] contiguous
  float2* part;       // [L, B, nsplit, Hq, T] running (max, sum)
  float2* fin;        // [L, B, Hq, T] (max, 1/sum)
  float* w;           // [L, B, T]
  double* rowpart;    // [L, B, nchunks, T] Σ_{v in chunk} A[t, v]
  double* chunkpart;  // [L, B, nchunks, 3] (Σ c_v, Σ a log a, Σ c_v log c_v) over the chunk
  float* scores;      // [L, B, N] contiguous
  float* stats;       // [L, B, 2] contiguous
};
static_assert(sizeof(Params) < 4000, "kernel parameters must stay under 4 KB");

// Key chunks per split of pass 1. Fixed (not derived from the device or the batch) so that the
// fp32 rounding of every sample's scores depends on that sample's inputs only: the same sample
// gets bit-identical scores from score_text_vision and from evict, alone or in any batch.
constexpr int kChunksPerSplit = 4;

// Fills the derived sizes of p (from L, B, Hq, T, D, N) and, when ws != nullptr, its workspace
// pointers. Returns the workspace bytes.
inline size_t plan(Params& p, void* ws) {
  p.D4 = (p.D + 3) / 4 * 4;
  p.DP = p.D4 + 4;
  p.D16 = (p.D + 15) / 16 * 16;
  p.LDH = p.D16 + 8;
  p.nchunks = int((p.N + kNC - 1) / kNC);
  p.chunks_per_split = kChunksPerSplit;
  p.nsplit = (p.nchunks + kChunksPerSplit - 1) / kChunksPerSplit;
  const size_t LB = size_t(p.L) * p.B;
  Carver c;
  const size_t o_part = c.take<float2>(LB * p.nsplit * p.Hq * p.T);
  const size_t o_fin = c.take<float2>(LB * p.Hq * p.T);
  const size_t o_w = c.take<float>(LB * p.T);
  const size_t o_row = c.take<double>(LB * p.nchunks * p.T);
  const size_t o_chunk = c.take<double>(LB * p.nchunks * 3);
  if (ws != nullptr) {
    char* base = static_cast<char*>(ws);
    p.part = reinterpret_cast<float2*>(base + o_part);
    p.fin = reinterpret_cast<float2*>(base + o_fin);
    p.w = reinterpret_cast<float*>(base + o_w);
    p.rowpart = reinterpret_cast<double*>(base + o_row);
    p.chunkpart = reinterpret_cast<double*>(base + o_chunk);
  }
  return c.off + 256;
}

}  // namespace score

// Scores [L, B, N] and stats [L, B, 2] of the p.L (<= kMaxLayers) layers of p; p planned with
// score::plan on a workspace of the returned size.
cudaError_t launch_score(const score::Params& p, DType dtype, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// text_score="all_queries": the text slots' attention mass over all query rows (text_mass.cuh;
// launched by score_text_vision.cu and evict.cu right after launch_score, whose text scores it
// overwrites)
// ---------------------------------------------------------------------------------------------
namespace textmass {

constexpr int kTQ = 64;        // query rows per tile (the score engines' tile)
constexpr int kNC = 64;        // keys / text columns per tile
constexpr int kThreads = 256;  // 16 × 16 threads, 4 × 4 outputs each
constexpr int kFinThreads = 256;

struct Params {
  int L, B, Hq, Hkv, D;
  int D4, DP, D16, LDH;  // the engines' tile layout (as score::Params)
  int64_t N;
  int nrt;  // row tiles: ceil(N / kTQ)
  int nct;  // text column tiles: ceil(N / kNC) (text_slots rows hold at most N slots)
  float scale;
  bool vec_q, vec_k;
  View4 q[kMaxLayers];         // [B, Hq, N, D] full query states (row i = slot i)
  View4 k[kMaxLayers];         // [B, Hkv, N, D]
  const int8_t* modality;      // [B, N] contiguous
  const int64_t* text_slots;   // [B, N] contiguous: each sample's text slots ascending, then -1
  float2* rowstat;  // [L, B, Hq, N] workspace: (max, 1/sum of exp) of every (head, row)
  double* part;     // [L, B, nrt, N] workspace: Σ over a row tile's rows and all heads of
                    // P_h[i, text_slots[c]] (column c)
  float* scores;    // [L, B, N] contiguous: text slots overwritten with mass / Hq
};
static_assert(sizeof(Params) < 4000, "kernel parameters must stay under 4 KB");

// Fills the derived sizes of p (from L, B, Hq, D, N) and, when ws != nullptr, its workspace
// pointers. Returns the workspace bytes.
inline size_t plan(Params& p, void* ws) {
  p.D4 = (p.D + 3) / 4 * 4;
  p.DP = p.D4 + 4;
  p.D16 = (p.D + 15) / 16 * 16;
  p.LDH = p.D16 + 8;
  p.nrt = int((p.N + kTQ - 1) / kTQ);
  p.nct = int((p.N + kNC - 1) / kNC);
  const size_t LB = size_t(p.L) * p.B;
  Carver c;
  const size_t o_row = c.take<float2>(LB * p.Hq * p.N);
  const size_t o_part = c.take<double>(LB * p.nrt * p.N);
  if (ws != nullptr) {
    char* base = static_cast<char*>(ws);
    p.rowstat = reinterpret_cast<float2*>(base + o_row);
    p.part = reinterpret_cast<double*>(base + o_part);
  }
  return c.off + 256;
}

}  // namespace textmass

// Overwrites the text slots of p.scores (p.L <= kMaxLayers layers) with their head-averaged
// attention mass over every non-pad query row; p planned with textmass::plan.
cudaError_t launch_text_mass(const textmass::Params& p, DType dtype, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// layer_budgets and select_keep (csrc/cuda/select_keep.cu)
// ---------------------------------------------------------------------------------------------
namespace select {

constexpr int kThreads = 512;
constexpr int kItems = 4;
constexpr int kTile = kThreads * kItems;

struct Params {
  int L, B, T;
  int64_t N, n_sink;
  const float* scores;     // [L, B, N] contiguous
  const int64_t* keep;     // [L, B] keep counts, or nullptr: computed from stats in the block
  const float* stats;      // [L, B, 2] contiguous (used when keep == nullptr, and by budgets)
  double keep_ratio;
  int budget_mode;
  bool redistribute;
  const int64_t* q_pos;    // [B, T] contiguous
  const int8_t* modality;  // [B, N] contiguous
  int64_t* keep_idx;       // [L, B, N]
  int64_t* n_protected;    // [L, B]
  int64_t* n_kept;         // [L, B] or nullptr
  int64_t* keep_out;       // [L, B] or nullptr (budgets_kernel)
  double* keep_fraction;   // [L, B] or nullptr
};

// Dynamic shared memory of the in-block budgets: work [2L] + keep [L] + frac [L].
inline size_t budget_smem_bytes(int L) { return size_t(L) * 4 * 8; }

}  // namespace select

// Budgets only (p.keep_out, p.keep_fraction): grid B.
cudaError_t launch_budgets(const select::Params& p, cudaStream_t stream);
// Selection of every (layer, sample); budgets computed in the block when p.keep == nullptr.
cudaError_t launch_select(const select::Params& p, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// compact_ (csrc/cuda/compact.cu)
// ---------------------------------------------------------------------------------------------
namespace compact {

constexpr int kThreads = 256;
constexpr int kItems = 4;

struct Tensor3 {
  char* ptr;
  int64_t s0, s1, s2;  // byte strides of (b, h, n); the head dim is contiguous
};

struct Params {
  int L, B, H;
  int64_t N;
  int dsplit;        // blocks per (tensor, b, h) row
  int upb_k, upb_v;  // units per block segment of a k / v slot (units per slot / dsplit)
  Tensor3 k[kMaxLayers];  // [B, H, N, Dk] per layer of the group
  Tensor3 v[kMaxLayers];  // [B, H, N, Dv]
  const int64_t* keep_idx;   // [L, B, N] contiguous (group's first layer)
  const int64_t* n_kept_in;  // [L, B] or nullptr: binary search in keep_idx
  int64_t* n_kept_out;       // [L, B] or nullptr
};
static_assert(sizeof(Params) < 4000, "kernel parameters must stay under 4 KB");

// One layer as seen by the compaction: element pointers, element strides, element sizes and
// head dims of k and v (the head dims must be contiguous: stride 1).
struct Layer {
  void* k;
  int64_t ks[3];
  int64_t ek, Dk;
  void* v;
  int64_t vs[3];
  int64_t ev, Dv;
};

// Largest unit (16/8/4/2/1 bytes) that divides every row, pointer and stride of every layer.
inline int unit_bytes(const Layer* layers, int n) {
  for (int ub = 16; ub > 1; ub >>= 1) {
    bool ok = true;
    for (int i = 0; i < n && ok; ++i) {
      const Layer& a = layers[i];
      ok = (a.Dk * a.ek) % ub == 0 && (a.Dv * a.ev) % ub == 0 &&
           reinterpret_cast<uintptr_t>(a.k) % ub == 0 && reinterpret_cast<uintptr_t>(a.v) % ub == 0;
      for (int d = 0; d < 3 && ok; ++d) ok = (a.ks[d] * a.ek) % ub == 0 && (a.vs[d] * a.ev) % ub == 0;
    }
    if (ok) return ub;
  }
  return 1;
}

// Fills p.L, p.k, p.v, p.dsplit, p.upb_k, p.upb_v for n layers of the same shapes (p.B, p.H,
// p.N set by the caller); returns the unit size to launch with.
inline int plan(Params& p, const Layer* layers, int n, int sms) {
  const int ub = unit_bytes(layers, n);
  p.L = n;
  for (int i = 0; i < n; ++i) {
    const Layer& a = layers[i];
    p.k[i] = Tensor3{static_cast<char*>(a.k), a.ks[0] * a.ek, a.ks[1] * a.ek, a.ks[2] * a.ek};
    p.v[i] = Tensor3{static_cast<char*>(a.v), a.vs[0] * a.ev, a.vs[1] * a.ev, a.vs[2] * a.ev};
  }
  const int uk = n > 0 ? int(layers[0].Dk * layers[0].ek / ub) : 0;
  const int uv = n > 0 ? int(layers[0].Dv * layers[0].ev / ub) : 0;
  const int64_t rows = int64_t(n) * p.B * p.H * 2;
  int ds = 1;  // split rows by unit columns while segments stay >= 64 bytes and blocks are few
  while (uk % (2 * ds) == 0 && uv % (2 * ds) == 0 && (uk / (2 * ds)) * ub >= 64 &&
         (uv / (2 * ds)) * ub >= 64 && rows * ds < 2 * int64_t(sms))
    ds *= 2;
  p.dsplit = ds;
  p.upb_k = uk / ds;
  p.upb_v = uv / ds;
  return ub;
}

}  // namespace compact

cudaError_t launch_compact(const compact::Params& p, int unit_bytes, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// decode_evict_ (csrc/cuda/decode_evict.cu)
// ---------------------------------------------------------------------------------------------
namespace decode {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Layers per decode launch (the per-layer views travel in the kernel parameters, < 4 KB): a
// cache of L layers takes ceil(L / kMaxLayers) launches.
constexpr int kMaxLayers = 24;

// Dynamic shared memory of the decode kernel: q as fp32 [Hq, D] + one key row per warp, reused
// by the finishing block for the per-head (max, sum) [2, Hq].
inline size_t smem_bytes(int64_t Hq, int64_t D) {
  const size_t a = size_t(Hq + kWarps) * size_t(D), b = 2 * size_t(Hq);
  return (a > b ? a : b) * sizeof(float);
}

// One layer of a decode launch group: its K/V/pos/q views and where its workspace starts.
struct Layer {
  void* k;                      // [B, Hkv, S, D]
  void* v;                      // [B, Hkv, S, Dv]
  int64_t* pos;                 // [B, S]
  const void* q;                // [B, Hq, D] contiguous
  int64_t ks0, ks1, ks2, ks3;   // element strides of k
  int64_t vs0, vs1, vs2, vs3;   // element strides of v
  int64_t ps0, ps1;             // element strides of pos
  int64_t S;                    // slot capacity
  int64_t lg_off;               // this layer's logits [B, Hq, S] start in Params::logits
  int64_t sp_off;               // its [B, nsplit] entries start in part (x Hq)
  int nsplit;                   // ceil(S / span)
};

struct Params {
  int L, B, Hq, Hkv, D, Dv;  // L: layers of this group (grid z); D: head dim of q / k, Dv: of v
  float scale;
  int64_t n_sink;
  int64_t span;  // slots per split
  int nsplit;    // the most splits of any layer of the group (grid x)
  int64_t* length;  // [L, B] (the group's first layer), element strides ls0, ls1
  int64_t ls0, ls1;
  const int64_t* n_seen;        // [B] contiguous
  const double* keep_fraction;  // [L, B] contiguous (group's first layer)
  const int64_t* n_protected;   // [L, B] contiguous (group's first layer)
  float* logits;     // workspace: per layer [B, Hq, S_l]
  float2* part;      // workspace: per layer [B, nsplit_l, Hq]
  int64_t* theta;    // workspace [L, B]
  int* counter;      // workspace [L, B]: blocks of (l, b) done (zeroed by the launcher)
  int64_t* evicted;  // [L, B] contiguous (group's first layer)
  Layer layers[kMaxLayers];
};
static_assert(sizeof(Params) < 4000, "kernel parameters must stay under 4 KB");

// Workspace layout of a group: fills each layer's lg_off / sp_off / nsplit (from S and span) and,
// when ws != nullptr, the workspace pointers of p. Returns the workspace bytes.
inline size_t plan(Params& p, void* ws) {
  int64_t lg = 0, sp = 0;
  p.nsplit = 0;
  for (int i = 0; i < p.L; ++i) {
    Layer& ly = p.layers[i];
    ly.nsplit = int((ly.S + p.span - 1) / p.span);
    ly.lg_off = lg;
    ly.sp_off = sp;
    lg += int64_t(p.B) * p.Hq * ly.S;
    sp += int64_t(p.B) * ly.nsplit;
    p.nsplit = ly.nsplit > p.nsplit ? ly.nsplit : p.nsplit;
  }
  Carver c;
  const size_t o_lg = c.take<float>(size_t(lg));
  const size_t o_part = c.take<float2>(size_t(sp) * p.Hq);
  const size_t o_theta = c.take<int64_t>(size_t(p.L) * p.B);
  const size_t o_cnt = c.take<int>(size_t(p.L) * p.B);
  if (ws != nullptr) {
    char* base = static_cast<char*>(ws);
    p.logits = reinterpret_cast<float*>(base + o_lg);
    p.part = reinterpret_cast<float2*>(base + o_part);
    p.theta = reinterpret_cast<int64_t*>(base + o_theta);
    p.counter = reinterpret_cast<int*>(base + o_cnt);
  }
  return c.off + 256;
}

}  // namespace decode

// The decode step of the p.L layers of p (planned with decode::plan): a memset of the hand-off
// counters and one kernel launch; smem1: its dynamic shared memory (decode::smem_bytes).
cudaError_t launch_decode(const decode::Params& p, DType dtype, size_t smem1, cudaStream_t stream);

// decode_append_ (the cache append of one decode step of one layer): grid (B), kThreads.
namespace append {

constexpr int kThreads = 128;

struct Params {
  int B, Hkv, D, Dv;
  int64_t S, M;                    // slot capacity, mask width (M <= S)
  void* k;                         // [B, Hkv, S, D], element strides ks*
  int64_t ks0, ks1, ks2, ks3;
  void* v;                         // [B, Hkv, S, Dv]
  int64_t vs0, vs1, vs2, vs3;
  const void* k_new;               // [B, Hkv, 1, D]
  int64_t kn0, kn1, kn3;
  const void* v_new;               // [B, Hkv, 1, Dv]
  int64_t vn0, vn1, vn3;
  int64_t* pos;                    // [B, S]
  int64_t ps0, ps1;
  int64_t* length;                 // [B]
  int64_t ls0;
  bool* mask;                      // [B, M]
  int64_t ms0, ms1;
  int64_t position;
};

}  // namespace append

// One kernel launch; elem_bytes: 4 (fp32) or 2 (fp16 / bf16: copied as raw 16-bit words).
cudaError_t launch_append(const append::Params& p, int elem_bytes, cudaStream_t stream);

}  // namespace cuda
}  // namespace tgvkv
