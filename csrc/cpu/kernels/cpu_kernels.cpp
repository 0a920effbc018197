// CPU kernels compiled once per CPU capability, as ATen compiles its native/cpu kernels: the build
// (setup.py, CMakeLists.txt) compiles this file with -DCPU_CAPABILITY=DEFAULT, and on x86-64 also
// with -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 -mavx2 -mfma -mf16c and with
// -DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512 -mavx512f -mavx512bw -mavx512vl -mavx512dq
// -mfma -mf16c; csrc/cpu/ops_cpu.cpp picks one table at runtime (kernels.h).
//
// No ISA intrinsics here: vector code is at::vec::Vectorized<T> (AVX2, AVX-512, NEON, SVE, VSX
// from one source, selected by the CPU_CAPABILITY_* macros), GEMMs go through ATen's own GEMM
// (gemm_nt_f32: MKL / oneDNN / OpenBLAS, whatever torch was built with), threads through
// at::parallel_for, fp16/bf16 through at::vec::convert_to_float.
//
// Everything below is in an anonymous namespace (internal linkage) except the table getter, whose
// name carries the capability: no inline function of this file can be merged by the linker with
// another capability's copy. The inline functions of the headers it includes (tgvkv/cpu_score.h's
// finish_scores, c10, std) can: every capability's object has a copy under the same name, and the
// linker keeps the first, so the build links the DEFAULT object first (setup.py, CMakeLists.txt);
// tests/test_ops_cpu_capabilities.py checks that no such name holds AVX / AVX-512 code.
#ifndef CPU_CAPABILITY
#error "compile with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 (setup.py and CMakeLists.txt do)"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"

#define TGVKV_CAT_(a, b) a##b
#define TGVKV_CAT(a, b) TGVKV_CAT_(a, b)
#define TGVKV_STR_(a) #a
#define TGVKV_STR(a) TGVKV_STR_(a)

namespace tgvkv {
namespace cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
// Guidance rows per work item: balanced chunks of at most this many rows (a function of the
// sample's valid row count only, never of the thread count: every row's logits then come from the
// same GEMM call whatever the threads).
constexpr int64_t kMaxRows = 48;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Grow-only 64-byte aligned fp32 scratch, its bytes counted in scratch_bytes() (kernels.h) while
// it belongs to the current epoch; one of an older epoch (release_scratch) was counted as freed
// then, and is freed here at its next use.
struct Scratch {
  std::unique_ptr<float[]> p;
  int64_t n = 0;
  int64_t epoch = -1;
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() {
    if (p && epoch == scratch_epoch()) scratch_account(-bytes());
  }
  int64_t bytes() const { return p ? 4 * (n + 16) : 0; }
  // At least m floats; *kept (if given): whether the contents are those of the last get().
  float* get(int64_t m, bool* kept = nullptr) {
    bool same = true;
    if (const int64_t e = scratch_epoch(); e != epoch) {
      p.reset();  // counted as freed by release_scratch already
      n = 0;
      epoch = e;
      same = false;
    }
    if (m > n) {
      const int64_t before = bytes();
      p.reset(new float[static_cast<size_t>(m + 16)]);
      n = m;
      scratch_account(bytes() - before);
      same = false;
    }
    if (kept != nullptr) *kept = same;
    return align64(p.get());
  }
};

template <typename T>
inline void row_to_f32(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(n));
  } else {
    using VT = at::vec::Vectorized<T>;
    int64_t i = 0;
    for (; i + VT::size() <= n; i += VT::size()) {
      auto [a, b] = at::vec::convert_to_float<T>(VT::loadu(src + i));
      a.store(dst + i);
      b.store(dst + i + kW);
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

template <typename T>
inline void strided_to_f32(const T* src, int64_t stride, float* dst, int64_t n) {
  if (stride == 1) {
    row_to_f32(src, dst, n);
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i * stride]);
}

// Keys of one KV head converted to fp32 rows [rows, D], kept between the work items one thread
// runs in a parallel region: the items of a head come in ascending row tiles, each needing the
// keys [0, r1) of its tile, so each converts only the rows the last did not (a 16-bit head was
// converted once per tile: 30 times over at qwen2.5-vl-7b's text-mass pass). Keyed by the head's
// address and layout, and emptied when a parallel region starts (item_scratch): a cache across
// calls could see keys changed in place. The values are those a fresh conversion gives.
struct KeyRows {
  Scratch buf;
  const void* src = nullptr;
  int64_t sn = 0, sd = 0, D = 0, rows = 0;
  template <typename E>
  const float* get(const E* kbh, int64_t sn_, int64_t sd_, int64_t D_, int64_t nk) {
    if (src != kbh || sn != sn_ || sd != sd_ || D != D_) rows = 0;
    src = kbh, sn = sn_, sd = sd_, D = D_;
    bool kept;
    float* kb = buf.get(nk * D, &kept);
    if (!kept) rows = 0;
    for (; rows < nk; ++rows) strided_to_f32(kbh + rows * sn, sd, kb + rows * D, D);
    return kb;
  }
};

// t [D, kKeyBlock] (row stride kKeyBlock) = the transpose of keys [nj, D] (strides sn, sd), zero
// in the columns nj..kKeyBlock-1. Unit dim stride (HF's layouts): at::vec's 32x32 transpose
// (shuffles on AVX-512); the scalar loop it replaces, one strided 2-byte store per element, was
// ~3/4 of score_item's samples in bf16 guidance mode (llava-1.5-7b, 2 threads, Xeon with AMX).
inline void transpose_keys(const c10::BFloat16* k, int64_t sn, int64_t sd, int64_t nj, int64_t D,
                           c10::BFloat16* t) {
  if (sd != 1) {
    for (int64_t j = 0; j < kKeyBlock; ++j)
      for (int64_t d = 0; d < D; ++d)
        t[d * kKeyBlock + j] = j < nj ? k[j * sn + d * sd] : c10::BFloat16(0.0f);
    return;
  }
  // transpose_mxn writes only the nj first columns of a partial block
  if (nj < kKeyBlock) std::memset(t, 0, sizeof(c10::BFloat16) * static_cast<size_t>(D * kKeyBlock));
  for (int64_t j = 0; j < nj; j += 32)
    for (int64_t d = 0; d < D; d += 32)
      at::vec::transpose_mxn<c10::BFloat16>(k + j * sn + d, sn, t + d * kKeyBlock + j, kKeyBlock,
                                            static_cast<int>(std::min<int64_t>(32, nj - j)),
                                            static_cast<int>(std::min<int64_t>(32, D - d)));
}

// bf16 keys of one KV head packed for the bf16 GEMM (gemm_bf16_packed) in blocks of kKeyBlock
// keys, kept between the work items of a thread like KeyRows: block j holds keys
// [j * kKeyBlock, (j + 1) * kKeyBlock) of the head's n_all (zeros past the last), packed by
// ATen from their [D, kKeyBlock] transpose; blocks are packed as the tiles' key ranges first
// reach them, so each is packed once per parallel region.
struct PackedKeys {
  Scratch buf, tmp;  // bf16 storage in fp32 scratch
  const void* src = nullptr;
  int64_t sn = 0, sd = 0, D = 0, n_all = 0, blocks = 0;
  const c10::BFloat16* get(const c10::BFloat16* kbh, int64_t sn_, int64_t sd_, int64_t D_,
                           int64_t n_all_, int64_t nk) {
    const int64_t blk = D_ * kKeyBlock;  // bf16 elements per packed block
    const int64_t nb_all = (n_all_ + kKeyBlock - 1) / kKeyBlock;
    if (src != kbh || sn != sn_ || sd != sd_ || D != D_ || n_all != n_all_) blocks = 0;
    src = kbh, sn = sn_, sd = sd_, D = D_, n_all = n_all_;
    // sized for every block of the head at once: no regrowth (and repacking) within a head
    bool kept;
    auto* out = reinterpret_cast<c10::BFloat16*>(buf.get((nb_all * blk + 1) / 2, &kept));
    if (!kept) blocks = 0;
    auto* t = reinterpret_cast<c10::BFloat16*>(tmp.get((blk + 1) / 2));
    for (const int64_t nb = (nk + kKeyBlock - 1) / kKeyBlock; blocks < nb; ++blocks) {
      const int64_t j0 = blocks * kKeyBlock, nj = std::min(kKeyBlock, n_all - j0);
      transpose_keys(kbh + j0 * sn, sn, sd, nj, D, t);
      pack_keys_bf16(D, t, out + blocks * blk);
    }
    return out;
  }
};

// The work items' scratch of the calling thread, kept across calls (the threads of ATen's pool
// persist; grow-only, at most a few MiB per thread at 7B shapes). A fresh buffer per parallel
// region is, above malloc's mmap threshold, a page fault per 4 KiB on every call: the kernel
// clearing those pages was 12% of the guidance-mode profile (llava-1.5-7b, 2 threads, Zen 5).
struct ItemScratch {
  Scratch qs, ls;
  KeyRows ks;
  PackedKeys pk;
  bool brgemm_used = false;  // gemm_bf16_packed ran since the region started
  // at the end of a parallel region's body: the bf16 GEMM's hardware state released
  void end_region() {
    if (brgemm_used) brgemm_release_bf16();
    brgemm_used = false;
  }
};
// The calling thread's scratch, its key caches emptied (a cache without a source head refills
// from row / block 0 on its next get): call once at the start of a parallel region's body, and
// end_region() at its end.
inline ItemScratch& item_scratch() {
  thread_local ItemScratch s;
  s.ks.src = nullptr;
  s.pk.src = nullptr;
  s.brgemm_used = false;
  return s;
}

// Whether bf16 logits come from the bf16 GEMM (gemm_bf16_packed: oneDNN's brgemm through ATen,
// on AMX tiles or AVX512-BF16 dot products: exact bf16 products summed in fp32; 3.9-5.5x the
// fp32 GEMM's rate on a Xeon with AMX, 1 thread, [40-252, 128] x [128, 640-1100] in 64-key
// blocks) rather than the fp32 GEMM of converted rows: when
// ATen can run it here (bf16_gemm_available) and D is even (pairs of bf16 per 32-bit lane). The
// AVX512 table only: a forced lower capability (TGVKV_CPU_CAPABILITY, the capability tests)
// keeps the fp32 GEMM path of bf16 inputs.
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kMayUseBf16Gemm = true;
#else
constexpr bool kMayUseBf16Gemm = false;
#endif
inline bool use_bf16_gemm(int64_t D) {
  return kMayUseBf16Gemm && D % 2 == 0 && bf16_gemm_available();
}

// Lane reductions in a fixed order (lane 0, 1, ...).
inline float lanes_max(const Vec& v) {
  alignas(64) float t[kW];
  v.store(t);
  float m = t[0];
  for (int64_t i = 1; i < kW; ++i) m = std::max(m, t[i]);
  return m;
}
inline float lanes_sum(const Vec& v) {
  alignas(64) float t[kW];
  v.store(t);
  float s = t[0];
  for (int64_t i = 1; i < kW; ++i) s += t[i];
  return s;
}

// Key mask of each sample of a batch: a lane mask per slot (all bits set at its pad slots, 0
// elsewhere; N padded to a whole vector), for Vec::blendv; of(b) is nullptr for a sample without
// pad (row_exp then loads no mask at all). A pad key's logit is replaced, not added to: pad slots
// may hold anything (NaN included), and NaN + -inf is NaN.
struct KeyMask {
  std::vector<float> pad;
  std::vector<int8_t> has_pad;
  int64_t Np;
  KeyMask(const int8_t* mod, int64_t B, int64_t N)
      : pad(static_cast<size_t>(B * round_up(N, kW)), 0.0f),
        has_pad(static_cast<size_t>(B), 0),
        Np(round_up(N, kW)) {
    const uint32_t ones = ~uint32_t{0};
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < N; ++j)
        if (mod[b * N + j] == kPad) std::memcpy(&pad[b * Np + j], &ones, 4), has_pad[b] = 1;
  }
  const float* of(int64_t b) const { return has_pad[b] ? pad.data() + b * Np : nullptr; }
};

// The max of s * x[j] over the keys [0, n) of one row of logits, pad keys (mask: KeyMask::of, or
// nullptr when the sample has none: no mask stream to load) left out: -inf when every key is
// masked, and NaN when a key not masked has a NaN or infinite value (NaN / inf in the keys or
// queries, or a scale that overflows), checked in the same pass (v - v is 0 for a finite v and
// NaN otherwise; a NaN stays in a sum). Lanes past the row's end read as 0 (finiteness) and -inf
// (max).
template <bool kMask>
inline float row_max_t(const float* x, int64_t n, float s, const float* mask) {
  const Vec ninf(kNegInf), vs(s), zero(0.0f);
  Vec vmax = ninf, bad = zero;
  auto step = [&](Vec v, const Vec& m) {
    if constexpr (kMask) v = Vec::blendv(v, zero, m);
    bad = bad + (v - v);
    if constexpr (kMask) v = Vec::blendv(v, ninf, m);
    return v;
  };
  int64_t j = 0;
  for (; j + kW <= n; j += kW)
    vmax = at::vec::maximum(vmax, step(Vec::loadu(x + j) * vs, kMask ? Vec::loadu(mask + j) : zero));
  if (const int64_t rem = n - j; rem > 0)
    vmax = at::vec::maximum(
        vmax, Vec::set(ninf, step(Vec::loadu(x + j, rem) * vs,
                                  kMask ? Vec::loadu(mask + j, rem) : zero), rem));
  if (std::isnan(lanes_sum(bad))) return std::numeric_limits<float>::quiet_NaN();
  return lanes_max(vmax);
}

// exp(s * x[j] - max) of one row of logits over keys [0, n), pad keys taken as -inf (s, mask and
// the finiteness check as row_max_t), written over the logits; returns their sum, 0 when every
// key is masked (x then left as it was), and NaN for a row with a non-finite logit: the callers
// turn that into NaN scores, which the ops refuse (check_finite_scores), never into a row left
// out in silence. s: the scale the GEMM did not apply (1 after the fp32 GEMM, whose alpha is the
// scale: s * x is then x exactly). Two passes, both in cache: the max, then exp and sum.
template <bool kMask>
inline float row_exp_t(float* x, int64_t n, float s, const float* mask) {
  const Vec ninf(kNegInf), vs(s), zero(0.0f);
  const float mx = row_max_t<kMask>(x, n, s, mask);
  if (std::isnan(mx)) return mx;
  if (!(mx > kNegInf)) return 0.0f;
  const Vec vnm(-mx);
  Vec vsum(0.0f);
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    // s * x - max in one rounding (x - max exactly as before when s = 1)
    Vec e = at::vec::fmadd(Vec::loadu(x + j), vs, vnm);
    if constexpr (kMask) e = Vec::blendv(e, ninf, Vec::loadu(mask + j));
    e = e.exp_u20();
    e.store(x + j);
    vsum = vsum + e;
  }
  if (const int64_t rem = n - j; rem > 0) {
    Vec e = at::vec::fmadd(Vec::loadu(x + j, rem), vs, vnm);
    if constexpr (kMask) e = Vec::blendv(e, ninf, Vec::loadu(mask + j, rem));
    e = Vec::set(zero, e.exp_u20(), rem);
    e.store(x + j, static_cast<int>(rem));
    vsum = vsum + e;
  }
  return lanes_sum(vsum);
}
inline float row_exp(float* x, int64_t n, float s, const float* mask) {
  return mask != nullptr ? row_exp_t<true>(x, n, s, mask) : row_exp_t<false>(x, n, s, nullptr);
}

// Masked softmax of one row of logits over keys [0, n) (s and mask as row_exp) accumulated into
// acc[0, n); a row with a non-finite logit (row_exp's NaN) makes acc[0, n) NaN. Returns false
// when no key is allowed (nothing accumulated).
inline bool softmax_accumulate(float* x, int64_t n, float s, const float* mask, float* acc) {
  const float sum = row_exp(x, n, s, mask);
  if (std::isnan(sum)) {
    std::fill(acc, acc + n, std::numeric_limits<float>::quiet_NaN());
    return true;
  }
  if (!(sum > 0.0f)) return false;
  const Vec vinv(1.0f / sum);
  int64_t j = 0;
  for (; j + kW <= n; j += kW)
    at::vec::fmadd(Vec::loadu(x + j), vinv, Vec::loadu(acc + j)).store(acc + j);
  const int64_t rem = n - j;
  if (rem > 0)
    at::vec::fmadd(Vec::loadu(x + j, rem), vinv, Vec::loadu(acc + j, rem))
        .store(acc + j, static_cast<int>(rem));
  return true;
}

// Scaled logits [g * R, *ldl_out] (row stride nk rounded up to 16, in ls; the scale is the GEMM's
// alpha) of the g query heads of KV head hk of sample b, R rows each, against the keys [0, nk):
// row r of each head is q row row_of(r) (ScoreLayer's q strides), gathered to fp32 [g * R, D] in
// qs first (head-major: logits row gi * R + r). The keys are the GEMM's transposed operand (as in
// torch.matmul(q, k.mT)): fp32 keys of unit dim stride are read in place, others converted to
// fp32 rows in ks first; no K^T is written. A K^T staged in 8x8 at::vec blocks cost more than
// the GEMM on AVX-512 (at::vec's 8x8 transpose runs a 16x16 one there: 28% of the guidance-mode
// profile, llava-1.5-7b shapes, Zen 5), while MKL's sgemm runs Q.K^T at the same rate from K rows
// or from a contiguous K^T (74-87 GFLOP/s at 1 thread, [40-48, 128] x [128, 650-2900], default
// and MKL_ENABLE_INSTRUCTIONS=AVX2).
//
// bf16 with use_bf16_gemm: q rows gathered as bf16, keys packed once per head (PackedKeys), the
// logits unscaled in blocks of kKeyBlock keys (the block past nk partly unused), row stride nk
// rounded up to kKeyBlock; the softmax applies the scale (Logits::s).
struct Logits {
  float* p;
  int64_t ld;  // row stride
  float s;     // the scale still to apply (row_exp's s)
};
template <typename E, typename RowOf>
Logits group_logits(const ScoreLayer& ly, float scale, int64_t b, int64_t hk, int64_t R,
                    RowOf row_of, int64_t nk, int64_t n_all, ItemScratch& sc) {
  const int64_t D = ly.D, g = ly.Hq / ly.Hkv, M = g * R;
  const E* qh = static_cast<const E*>(ly.q) + b * ly.q_sb + hk * g * ly.q_sh;
  const E* kbh = static_cast<const E*>(ly.k) + b * ly.k_sb + hk * ly.k_sh;
  const int64_t sn = ly.k_sn, sd = ly.k_sd;
  if constexpr (std::is_same_v<E, c10::BFloat16>) {
    if (use_bf16_gemm(D)) {
      auto* qb = reinterpret_cast<c10::BFloat16*>(sc.qs.get((M * D + 1) / 2));
      for (int64_t gi = 0; gi < g; ++gi)
        for (int64_t r = 0; r < R; ++r) {
          const E* src = qh + gi * ly.q_sh + row_of(r) * ly.q_sn;
          E* dst = qb + (gi * R + r) * D;
          if (ly.q_sd == 1)
            std::memcpy(dst, src, sizeof(E) * static_cast<size_t>(D));
          else
            for (int64_t d = 0; d < D; ++d) dst[d] = src[d * ly.q_sd];
        }
      const c10::BFloat16* kp = sc.pk.get(kbh, sn, sd, D, n_all, nk);
      const int64_t nb = (nk + kKeyBlock - 1) / kKeyBlock, ldl = nb * kKeyBlock;
      float* lg = sc.ls.get(M * ldl);
      for (int64_t j = 0; j < nb; ++j)
        gemm_bf16_packed(M, D, qb, D, kp + j * D * kKeyBlock, lg + j * kKeyBlock, ldl);
      sc.brgemm_used = true;
      return {lg, ldl, scale};
    }
  }
  float* qb = sc.qs.get(M * D);
  for (int64_t gi = 0; gi < g; ++gi)
    for (int64_t r = 0; r < R; ++r)
      strided_to_f32(qh + gi * ly.q_sh + row_of(r) * ly.q_sn, ly.q_sd, qb + (gi * R + r) * D, D);
  const float* kp;
  int64_t ldk;
  if (std::is_same_v<E, float> && sd == 1 && sn >= D) {
    kp = reinterpret_cast<const float*>(kbh);
    ldk = sn;
  } else {
    kp = sc.ks.get(kbh, sn, sd, D, nk);
    ldk = D;
  }
  const int64_t ldl = round_up(nk, 16);
  float* lg = sc.ls.get(M * ldl);
  gemm_nt_f32(M, nk, D, scale, qb, D, kp, ldk, lg, ldl);
  return {lg, ldl, 1.0f};
}

// Rows [t0, t1) of sample b, the g query heads of KV head hk, accumulated into part [Tmax, N].
template <typename E>
void score_head(const ScoreLayer& ly, const ScoreBatch& sb, const float* mask_b, int64_t b,
                int64_t hk, int64_t t0, int64_t t1, float* part, ItemScratch& sc) {
  const int64_t N = sb.N, T = sb.T;
  const int64_t* qp = sb.q_pos + b * T;
  const int64_t R = t1 - t0, g = ly.Hq / ly.Hkv;
  const int64_t nk = qp[t1 - 1] + 1;  // keys visible to the last row of the chunk
  // guidance rows t0..t1 of each head
  auto row_of = [&](int64_t r) { return ly.q_rows_are_slots ? qp[t0 + r] : t0 + r; };
  const Logits lg = group_logits<E>(ly, sb.scale, b, hk, R, row_of, nk, N, sc);
  for (int64_t gi = 0; gi < g; ++gi)
    for (int64_t r = 0; r < R; ++r)
      softmax_accumulate(lg.p + (gi * R + r) * lg.ld, qp[t0 + r] + 1, lg.s, mask_b,
                         part + (t0 + r) * N);
}

// KV heads per work item: the heads of a group are scored one after another into one partial
// head sum, so a layer has at most kMaxGroups partial sums to write and add (not Hkv). A function
// of Hkv only, never of the thread count (the grouping fixes the order of every addition).
constexpr int64_t kMaxGroups = 8;
inline int64_t heads_per_group(int64_t Hkv) { return (Hkv + kMaxGroups - 1) / kMaxGroups; }
inline int64_t n_groups(int64_t Hkv) {
  const int64_t hg = heads_per_group(Hkv);
  return (Hkv + hg - 1) / hg;
}

// One work item: rows [t0, t1) of sample b, the query heads of KV heads [hk0, hk1) (in order).
// part: [Tmax, N] partial head sum of (layer, b, group) (rows t0..t1 written here).
template <typename E>
void score_item(const ScoreLayer& ly, const ScoreBatch& sb, const float* mask_b, int64_t b,
                int64_t hk0, int64_t hk1, int64_t t0, int64_t t1, float* part, ItemScratch& sc) {
  const int64_t N = sb.N;
  for (int64_t t = t0; t < t1; ++t) std::memset(part + t * N, 0, sizeof(float) * N);
  for (int64_t hk = hk0; hk < hk1; ++hk)
    score_head<E>(ly, sb, mask_b, b, hk, t0, t1, part, sc);
}

struct Item {
  int64_t l, b, grp, t0, t1;
};

void score_layers_impl(const ScoreLayer* layers, int64_t L, const ScoreBatch& sb) {
  const int64_t B = sb.B, N = sb.N, T = sb.T;
  if (L == 0 || B == 0) return;
  for (int64_t l = 0; l < L; ++l) {
    std::memset(layers[l].scores, 0, sizeof(float) * B * N);
    std::memset(layers[l].stats, 0, sizeof(float) * B * 2);
  }
  if (N == 0 || T == 0) return;
  int64_t Tmax = 0;
  for (int64_t b = 0; b < B; ++b) Tmax = std::max(Tmax, sb.n_rows[b]);
  if (Tmax == 0) return;
  const KeyMask mask(sb.mod, B, N);

  std::vector<int64_t> nchunk(static_cast<size_t>(B)), rows_per(static_cast<size_t>(B));
  int64_t chunks = 0;  // row chunks of all samples: work items per KV-head group of a layer
  for (int64_t b = 0; b < B; ++b) {
    const int64_t Tv = sb.n_rows[b];
    nchunk[b] = (Tv + kMaxRows - 1) / kMaxRows;
    rows_per[b] = nchunk[b] > 0 ? (Tv + nchunk[b] - 1) / nchunk[b] : 0;
    chunks += nchunk[b];
  }
  // Partial head sums [G, Tmax, N] per (layer, sample) (G = n_groups(Hkv) <= kMaxGroups), in
  // waves of layers: as few layers as give every thread kItemsPerThread work items, under ~64 MiB
  // (a single layer may exceed it). The wave only schedules: every partial sum is the same item's
  // whatever the wave, so the results do not depend on it (nor on the thread count that sizes it).
  // One layer per wave where it gives the threads enough items keeps the buffer at one layer's
  // sums (llava-1.5-7b, 2 threads: 0.8 MiB; all 32 layers at once held 26 MiB).
  constexpr int64_t kItemsPerThread = 4;
  const int64_t want_items = kItemsPerThread * at::get_num_threads();
  const int64_t budget = (int64_t{64} << 20) / 4;
  std::vector<int64_t> per_layer(static_cast<size_t>(L)), wave_end;
  for (int64_t l = 0; l < L; ++l) per_layer[l] = B * n_groups(layers[l].Hkv) * Tmax * N;
  int64_t cap = 0;
  for (int64_t l0 = 0; l0 < L;) {
    int64_t l1 = l0, used = 0, n_it = 0;
    while (l1 < L && (l1 == l0 || (n_it < want_items && used + per_layer[l1] <= budget))) {
      used += per_layer[l1];
      n_it += n_groups(layers[l1].Hkv) * chunks;
      ++l1;
    }
    wave_end.push_back(l1);
    cap = std::max(cap, used);
    l0 = l1;
  }
  // Reused across calls of this (caller) thread: a fresh multi-MiB buffer per call costs a page
  // fault per 4 KiB touched (per-layer score_text_vision calls would pay that 32 times).
  thread_local Scratch buf_cache;
  float* const buf = buf_cache.get(cap);

  std::vector<Item> items;
  std::vector<int64_t> off(static_cast<size_t>(L) + 1, 0);
  for (int64_t l0 = 0, w = 0; l0 < L; ++w) {
    const int64_t l1 = wave_end[w];
    items.clear();
    for (int64_t l = l0; l < l1; ++l) {
      off[l + 1 - l0] = off[l - l0] + per_layer[l];
      for (int64_t b = 0; b < B; ++b)
        for (int64_t grp = 0; grp < n_groups(layers[l].Hkv); ++grp)
          for (int64_t c = 0; c < nchunk[b]; ++c) {
            const int64_t t0 = c * rows_per[b];
            const int64_t t1 = std::min(sb.n_rows[b], t0 + rows_per[b]);
            if (t1 > t0) items.push_back({l, b, grp, t0, t1});
          }
    }
    auto part_of = [&](int64_t l, int64_t b, int64_t grp) {
      return buf + off[l - l0] + (b * n_groups(layers[l].Hkv) + grp) * Tmax * N;
    };
    // At least two items when several threads exist, so that the GEMMs always run inside a
    // parallel region, where the BLAS runs single-threaded: their rounding then never depends on
    // the thread count (a lone item outside a region would let MKL split it over threads).
    const int64_t n_items = static_cast<int64_t>(items.size());
    const int64_t n_launch = at::get_num_threads() > 1 ? std::max<int64_t>(n_items, 2) : n_items;
    at::parallel_for(0, n_launch, 1, [&](int64_t begin, int64_t end) {
      ItemScratch& sc = item_scratch();
      for (int64_t i = begin; i < std::min(end, n_items); ++i) {
        const Item& it = items[i];
        const ScoreLayer& ly = layers[it.l];
        const int64_t hg = heads_per_group(ly.Hkv);
        const int64_t hk0 = it.grp * hg, hk1 = std::min(ly.Hkv, hk0 + hg);
        float* part = part_of(it.l, it.b, it.grp);
        const float* mask_b = mask.of(it.b);
        switch (ly.dtype) {
          case DType::kF32:
            score_item<float>(ly, sb, mask_b, it.b, hk0, hk1, it.t0, it.t1, part, sc);
            break;
          case DType::kF16:
            score_item<c10::Half>(ly, sb, mask_b, it.b, hk0, hk1, it.t0, it.t1, part, sc);
            break;
          default:
            score_item<c10::BFloat16>(ly, sb, mask_b, it.b, hk0, hk1, it.t0, it.t1, part, sc);
        }
      }
      sc.end_region();
    });
    // The groups' partial sums added into group 0's in the fixed order 1..G-1, row by row, in
    // parallel over (layer, sample, row): a per-layer call (B = 1) still uses every thread.
    const int64_t n_pairs = (l1 - l0) * B;
    at::parallel_for(0, n_pairs * Tmax, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t pair = r / Tmax, t = r % Tmax;
        const int64_t l = l0 + pair / B, b = pair % B;
        if (t >= sb.n_rows[b]) continue;
        const int64_t G = n_groups(layers[l].Hkv);
        const int64_t n = sb.q_pos[b * T + t] + 1;
        float* a = part_of(l, b, 0) + t * N;
        for (int64_t grp = 1; grp < G; ++grp) {
          const float* p = part_of(l, b, grp) + t * N;
          int64_t j = 0;
          for (; j + kW <= n; j += kW) (Vec::loadu(a + j) + Vec::loadu(p + j)).store(a + j);
          for (; j < n; ++j) a[j] = a[j] + p[j];
        }
      }
    });
    // The second pass (text weights, scores, statistics) of every (layer, sample).
    at::parallel_for(0, n_pairs, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> colw(static_cast<size_t>(N)), cols(static_cast<size_t>(N));
      std::vector<double> w(static_cast<size_t>(Tmax));
      for (int64_t pair = begin; pair < end; ++pair) {
        const int64_t l = l0 + pair / B, b = pair % B;
        finish_scores(layers[l], sb, b, part_of(l, b, 0), colw.data(), cols.data(), w.data());
      }
    });
    l0 = l1;
  }
}

// Decode: probs[gi, s] = softmax_s(scale * q[gi] . k[s]) over the live slots [0, n).
template <typename T>
void decode_probs_t(const T* q, const T* k, int64_t sn, int64_t sd, int64_t n, int64_t D,
                    int64_t g, float scale, float* scratch, float* probs, int64_t ldp) {
  float* qf = align64(scratch);
  float* kf = qf + round_up(g * D, 16);
  for (int64_t gi = 0; gi < g; ++gi) row_to_f32(q + gi * D, qf + gi * D, D);
  for (int64_t s = 0; s < n; ++s) {
    const float* kr;
    if (std::is_same_v<T, float> && sd == 1) {
      kr = reinterpret_cast<const float*>(k + s * sn);
    } else {
      strided_to_f32(k + s * sn, sd, kf, D);
      kr = kf;
    }
    for (int64_t gi = 0; gi < g; ++gi) {
      const float* qr = qf + gi * D;
      Vec acc(0.0f);
      int64_t d = 0;
      for (; d + kW <= D; d += kW) acc = at::vec::fmadd(Vec::loadu(qr + d), Vec::loadu(kr + d), acc);
      float dot = lanes_sum(acc);
      for (; d < D; ++d) dot += qr[d] * kr[d];
      probs[gi * ldp + s] = dot * scale;
    }
  }
  for (int64_t gi = 0; gi < g; ++gi) {
    float* p = probs + gi * ldp;
    // a non-finite logit makes the whole row NaN, which the op refuses: an -inf logit would
    // otherwise pass as a probability of 0
    const float mx = row_max_t<false>(p, n, 1.0f, nullptr);
    if (std::isnan(mx)) {
      std::fill(p, p + n, std::numeric_limits<float>::quiet_NaN());
      continue;
    }
    const Vec vm(mx);
    Vec vsum(0.0f);
    int64_t s = 0;
    for (; s + kW <= n; s += kW) {
      const Vec e = (Vec::loadu(p + s) - vm).exp();
      e.store(p + s);
      vsum = vsum + e;
    }
    float sum = lanes_sum(vsum);
    for (; s < n; ++s) {
      p[s] = std::exp(p[s] - mx);
      sum += p[s];
    }
    const float inv = 1.0f / sum;
    const Vec vinv(inv);
    for (s = 0; s + kW <= n; s += kW) (Vec::loadu(p + s) * vinv).store(p + s);
    for (; s < n; ++s) p[s] *= inv;
  }
}

void decode_probs_impl(const void* q, const void* k, DType dt, int64_t sn, int64_t sd, int64_t n,
                       int64_t D, int64_t g, float scale, float* scratch, float* probs,
                       int64_t ldp) {
  switch (dt) {
    case DType::kF32:
      decode_probs_t(static_cast<const float*>(q), static_cast<const float*>(k), sn, sd, n, D, g,
                     scale, scratch, probs, ldp);
      break;
    case DType::kF16:
      decode_probs_t(static_cast<const c10::Half*>(q), static_cast<const c10::Half*>(k), sn, sd,
                     n, D, g, scale, scratch, probs, ldp);
      break;
    default:
      decode_probs_t(static_cast<const c10::BFloat16*>(q), static_cast<const c10::BFloat16*>(k),
                     sn, sd, n, D, g, scale, scratch, probs, ldp);
  }
}

// ------------------------------------------------------------------------------------------------
// text_score="all_queries": the mass every text column receives from ALL query rows
// (cpu_text_mass.h). Separate from score_item / score_layers_impl on purpose: it runs after them
// and adds the non-guidance rows' mass to the guidance rows' mass they wrote into the text slots.
// ------------------------------------------------------------------------------------------------
// GEMM rows per work item: g query heads x R rows with R = min(64, max(8, 256 / g)): a function
// of the head shape only, never of the thread count, so every row's logits come from the same GEMM
// call (and every partial sum from the same work item) whatever the threads. Each call re-packs
// the keys [0, r1) of its tile, so GQA heads take ~256 GEMM rows (qwen2.5-vl-7b, g = 7: 252 rows,
// 8% faster than 63 at 1 thread, Zen 4); R <= 64 bounds the causal triangle each tile computes
// and discards (MHA: 64 rows; 128 was no faster at llava-1.5-7b shapes).
constexpr int64_t kMassRows = 256, kMassMaxR = 64;

struct MassItem {
  int64_t l, b, hk, r0, r1;  // rows [r0, r1) of sample b, the g query heads of KV head hk
  int64_t off;               // offset of its partial text masses [ntext_b] in the buffer
};

// One item: part[c] = Σ_{g heads} Σ_{rows i in [r0, r1), not pad, i >= txt[c]} P_h[i, txt[c]].
// skip_b [N]: the rows that neither score nor count here (pad rows; guidance rows, whose mass
// the scoring pass gave already).
template <typename E>
void text_mass_item(const ScoreLayer& ly, const ScoreBatch& tb, const float* mask_b,
                    const int8_t* skip_b, const int64_t* txt, int64_t ntxt, const MassItem& it,
                    float* part, ItemScratch& sc) {
  const int64_t g = ly.Hq / ly.Hkv, R = it.r1 - it.r0;
  const int64_t nk = it.r1;  // keys visible to the last row of the tile
  std::memset(part, 0, sizeof(float) * static_cast<size_t>(ntxt));
  // rows r0..r1 of each head
  const Logits lg = group_logits<E>(ly, tb.scale, it.b, it.hk, R,
                                    [&](int64_t r) { return it.r0 + r; }, nk, tb.N, sc);
  for (int64_t gi = 0; gi < g; ++gi)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = it.r0 + r;
      if (skip_b[i] || txt[0] > i) continue;
      // the row's exps over its keys [0, i] (pad keys masked) and their sum: the
      // text columns below read their numerators from the same exps that make the denominator
      float* x = lg.p + (gi * R + r) * lg.ld;
      const float sum = row_exp(x, i + 1, lg.s, mask_b);
      if (std::isnan(sum)) {  // a non-finite logit: NaN text scores, which the ops refuse
        for (int64_t c = 0; c < ntxt && txt[c] <= i; ++c)
          part[c] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      if (!(sum > 0.0f)) continue;
      const float inv = 1.0f / sum;
      // only the text columns p <= i are kept (txt ascending; text slots are never pad)
      for (int64_t c = 0; c < ntxt && txt[c] <= i; ++c) part[c] += x[txt[c]] * inv;
    }
}

void text_column_mass_impl(const ScoreLayer* layers, int64_t L, const ScoreBatch& tb) {
  const int64_t B = tb.B, N = tb.N;
  if (L == 0 || B == 0 || N == 0) return;
  const KeyMask mask(tb.mod, B, N);
  std::vector<int8_t> skip(static_cast<size_t>(B * N), 0);
  std::vector<std::vector<int64_t>> txt(static_cast<size_t>(B));
  // rows [txt[b][0], row_end[b]) go into tiles: past row_end every row is pad or guidance
  std::vector<int64_t> row_end(static_cast<size_t>(B), N);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < N; ++j) {
      const int8_t m = tb.mod[b * N + j];
      if (m == kPad) skip[b * N + j] = 1;
      if (m == kText) txt[b].push_back(j);
    }
    for (int64_t t = 0; t < tb.n_rows[b]; ++t) skip[b * N + tb.q_pos[b * tb.T + t]] = 1;
    while (row_end[b] > 0 && skip[b * N + row_end[b] - 1]) --row_end[b];
  }
  // items in a fixed order: layer, sample, KV head, row tile (rows from the first text slot on)
  std::vector<MassItem> items;
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t g = layers[l].Hq / layers[l].Hkv;
    const int64_t R = std::min(kMassMaxR, std::max<int64_t>(8, kMassRows / g));
    for (int64_t b = 0; b < B; ++b) {
      const int64_t nt = static_cast<int64_t>(txt[b].size());
      if (nt == 0) continue;
      for (int64_t hk = 0; hk < layers[l].Hkv; ++hk)
        for (int64_t r0 = txt[b][0]; r0 < row_end[b]; r0 += R) {
          items.push_back({l, b, hk, r0, std::min(row_end[b], r0 + R), total});
          total += nt;
        }
    }
  }
  Scratch part_buf;  // each item zeroes its own partial masses
  float* const part = part_buf.get(std::max<int64_t>(total, 1));
  // >= 2 items with several threads: the GEMMs then always run single-threaded inside the
  // parallel region (thread-count independent rounding; see score_layers_impl)
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t n_launch = at::get_num_threads() > 1 ? std::max<int64_t>(n_items, 2) : n_items;
  at::parallel_for(0, n_launch, 1, [&](int64_t begin, int64_t end) {
    ItemScratch& sc = item_scratch();
    for (int64_t i = begin; i < std::min(end, n_items); ++i) {
      const MassItem& it = items[i];
      const ScoreLayer& ly = layers[it.l];
      const std::vector<int64_t>& tx = txt[it.b];
      const int64_t nt = static_cast<int64_t>(tx.size());
      const float* mask_b = mask.of(it.b);
      const int8_t* skip_b = skip.data() + it.b * N;
      float* pp = part + it.off;
      switch (ly.dtype) {
        case DType::kF32:
          text_mass_item<float>(ly, tb, mask_b, skip_b, tx.data(), nt, it, pp, sc);
          break;
        case DType::kF16:
          text_mass_item<c10::Half>(ly, tb, mask_b, skip_b, tx.data(), nt, it, pp, sc);
          break;
        default:
          text_mass_item<c10::BFloat16>(ly, tb, mask_b, skip_b, tx.data(), nt, it, pp, sc);
      }
    }
    sc.end_region();
  });
  // the items of each (layer, sample) summed in their fixed order, in double, then / Hq, plus
  // the guidance rows' mass already in the text slots
  std::vector<double> acc;
  int64_t i = 0;
  for (int64_t l = 0; l < L; ++l)
    for (int64_t b = 0; b < B; ++b) {
      const std::vector<int64_t>& tx = txt[b];
      const int64_t nt = static_cast<int64_t>(tx.size());
      if (nt == 0) continue;
      acc.assign(static_cast<size_t>(nt), 0.0);
      for (; i < n_items && items[i].l == l && items[i].b == b; ++i) {
        const float* pp = part + items[i].off;
        for (int64_t c = 0; c < nt; ++c) acc[c] += static_cast<double>(pp[c]);
      }
      float* sc = layers[l].scores + b * N;
      const double hq = static_cast<double>(layers[l].Hq);
      for (int64_t c = 0; c < nt; ++c)
        sc[tx[c]] = static_cast<float>(acc[c] / hq + static_cast<double>(sc[tx[c]]));
    }
}

// ------------------------------------------------------------------------------------------------
// all_finite: x - x is 0 for a finite x and NaN for an inf or a NaN, and a NaN stays in a sum, so
// one pass of subtract-and-add per vector (16-bit rows widened to fp32 first) reads x once: a
// memory-bound scan. (amax + amin read x twice, and ATen's 16-bit reductions ran at half the
// fp32 rate: 11% of bf16 score_text_vision's profile at qwen2.5-vl-7b, all_queries, Xeon.)
// ------------------------------------------------------------------------------------------------
template <typename E>
inline void nan_if_not_finite(const E* x, int64_t n, Vec& acc) {
  int64_t j = 0;
  if constexpr (std::is_same_v<E, float>) {
    for (; j + kW <= n; j += kW) {
      const Vec v = Vec::loadu(x + j);
      acc = acc + (v - v);
    }
  } else {
    using VT = at::vec::Vectorized<E>;
    for (; j + VT::size() <= n; j += VT::size()) {
      auto [a, b] = at::vec::convert_to_float<E>(VT::loadu(x + j));
      acc = acc + (a - a) + (b - b);
    }
  }
  float tail = 0.0f;
  for (; j < n; ++j) {
    const float v = static_cast<float>(x[j]);
    tail += v - v;
  }
  acc = acc + Vec(tail);
}

// Row by row (D elements each) in grains of ~64 Ki elements, whatever the layout.
template <typename E>
bool all_finite_t(const E* x, int64_t A, int64_t R, int64_t D, int64_t sa, int64_t sr) {
  std::atomic<bool> ok{true};
  at::parallel_for(0, A * R, std::max<int64_t>(1, 65536 / D), [&](int64_t r0, int64_t r1) {
    Vec acc(0.0f);
    for (int64_t a = r0 / R, r = r0 % R, i = r0; i < r1; ++i) {  // row i = (a, r)
      nan_if_not_finite(x + a * sa + r * sr, D, acc);
      if (++r == R) r = 0, ++a;
    }
    if (std::isnan(lanes_sum(acc))) ok = false;
  });
  return ok;
}

bool all_finite_impl(const void* x, DType dt, int64_t A, int64_t R, int64_t D, int64_t sa,
                     int64_t sr) {
  if (A <= 0 || R <= 0 || D <= 0) return true;
  switch (dt) {
    case DType::kF32:
      return all_finite_t(static_cast<const float*>(x), A, R, D, sa, sr);
    case DType::kF16:
      return all_finite_t(static_cast<const c10::Half*>(x), A, R, D, sa, sr);
    default:
      return all_finite_t(static_cast<const c10::BFloat16*>(x), A, R, D, sa, sr);
  }
}

const Kernels kTable{TGVKV_STR(CPU_CAPABILITY), &score_layers_impl, &decode_probs_impl,
                     &text_column_mass_impl, &all_finite_impl, kMayUseBf16Gemm};

}  // namespace

const Kernels* TGVKV_CAT(kernels_, CPU_CAPABILITY)() { return &kTable; }

}  // namespace cpu
}  // namespace tgvkv
