// Torch-free CPU kernel of score_text_vision (and of the scoring stage of evict).
//
// Per (layer, sample, chunk of guidance rows) work item: for every KV head, the keys the rows can
// see are converted to fp32 and packed transposed into 64-key panels; for every query head of the
// group the logits of the rows are a small GEMM (register-blocked 6 rows x 64 keys, AVX-512 when
// the CPU has it), followed by a masked fp32 softmax per row accumulated into the head sum
// A[t, :] in the fixed order h = 0..Hq-1 (deterministic whatever the thread count or chunking:
// every row's value depends only on that row). A second pass per (layer, sample) divides by Hq
// and reduces A to the text weights, scores and statistics with double accumulators, in the
// reference's order.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "tgvkv/common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define TGVKV_HAVE_AVX512_PATH 1
#define TGVKV_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,bmi,bmi2")))
#else
#define TGVKV_HAVE_AVX512_PATH 0
#endif

namespace tgvkv {
namespace cpu {

enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

constexpr int64_t kKeyPanel = 64;  // keys per packed panel (4 zmm)
constexpr int kRowBlock = 6;       // query rows per register block

inline bool cpu_has_avx512() {
#if TGVKV_HAVE_AVX512_PATH
  static const bool v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("fma");
  return v;
#else
  return false;
#endif
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// p rounded up to a 64-byte boundary (the buffer must have 16 spare floats).
inline float* align64(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
}

template <typename T>
inline float load_as_float(const void* p, int64_t i) {
  return to_float(static_cast<const T*>(p)[i]);
}

inline float load_any(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::kF32: return static_cast<const float*>(p)[i];
    case DType::kF16: return to_float(static_cast<const half_t*>(p)[i]);
    default: return to_float(static_cast<const bf16_t*>(p)[i]);
  }
}

// Packs keys [0, nk) of one (sample, KV head) as fp32 panels.
// k: [N, D] rows of one (b, h) with strides (stride_n, stride_d), element type T.
// panel: [ceil(nk/64), D, 64] fp32, keys past nk zero-filled.
template <typename T>
inline void pack_key_panels(const T* k, int64_t stride_n, int64_t stride_d, int64_t nk, int64_t D,
                            float* panel) {
  const int64_t nb = (nk + kKeyPanel - 1) / kKeyPanel;
  for (int64_t jb = 0; jb < nb; ++jb) {
    float* P = panel + jb * D * kKeyPanel;
    const int64_t j0 = jb * kKeyPanel;
    const int64_t jn = std::min<int64_t>(kKeyPanel, nk - j0);
    for (int64_t jj = 0; jj < jn; ++jj) {
      const T* row = k + (j0 + jj) * stride_n;
      if (stride_d == 1) {
        for (int64_t d = 0; d < D; ++d) P[d * kKeyPanel + jj] = to_float(row[d]);
      } else {
        for (int64_t d = 0; d < D; ++d) P[d * kKeyPanel + jj] = to_float(row[d * stride_d]);
      }
    }
    if (jn < kKeyPanel)
      for (int64_t d = 0; d < D; ++d)
        for (int64_t jj = jn; jj < kKeyPanel; ++jj) P[d * kKeyPanel + jj] = 0.0f;
  }
}

inline void pack_key_panels_any(const void* k, DType dt, int64_t stride_n, int64_t stride_d,
                                int64_t nk, int64_t D, float* panel) {
  switch (dt) {
    case DType::kF32:
      pack_key_panels(static_cast<const float*>(k), stride_n, stride_d, nk, D, panel);
      break;
    case DType::kF16:
      pack_key_panels(static_cast<const half_t*>(k), stride_n, stride_d, nk, D, panel);
      break;
    default:
      pack_key_panels(static_cast<const bf16_t*>(k), stride_n, stride_d, nk, D, panel);
  }
}

// ------------------------------------------------------------------------------------------------
// Logits GEMM: out[r, j] = sum_d a[r, d] * K[j, d], one FMA chain per element over d = 0..D-1
// (so every variant below gives bit-identical results).
// a: [R, D] fp32; panel: [nb, D, 64]; out: [R, ldo] with ldo >= nb*64.
// ------------------------------------------------------------------------------------------------
inline void gemm_panels_generic(const float* a, int64_t R, int64_t D, const float* panel,
                                int64_t nb, float* out, int64_t ldo) {
  for (int64_t jb = 0; jb < nb; ++jb) {
    const float* P = panel + jb * D * kKeyPanel;
    for (int64_t r = 0; r < R; ++r) {
      float acc[kKeyPanel];
      for (int64_t jj = 0; jj < kKeyPanel; ++jj) acc[jj] = 0.0f;
      const float* ar = a + r * D;
      for (int64_t d = 0; d < D; ++d) {
        const float x = ar[d];
        const float* pd = P + d * kKeyPanel;
        for (int64_t jj = 0; jj < kKeyPanel; ++jj) acc[jj] = std::fma(x, pd[jj], acc[jj]);
      }
      std::memcpy(out + r * ldo + jb * kKeyPanel, acc, sizeof(acc));
    }
  }
}

#if TGVKV_HAVE_AVX512_PATH
// pf / npf: cache lines [pf, pf + 64 * npf) to prefetch into L2 while computing (the next KV
// head's keys: the DRAM reads of the next pack overlap this compute-bound GEMM).
template <int MR>
TGVKV_TARGET_AVX512 inline void gemm_block_avx512(const float* a, int64_t D, const float* P,
                                                  float* out, int64_t ldo, const char* pf,
                                                  int64_t npf) {
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (; npf > D; --npf, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
  for (int64_t d = 0; d < D; ++d) {
    if (d < npf) _mm_prefetch(pf + d * 64, _MM_HINT_T1);
    const float* pd = P + d * kKeyPanel;
    const __m512 b0 = _mm512_loadu_ps(pd);
    const __m512 b1 = _mm512_loadu_ps(pd + 16);
    const __m512 b2 = _mm512_loadu_ps(pd + 32);
    const __m512 b3 = _mm512_loadu_ps(pd + 48);
    for (int r = 0; r < MR; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * D + d]);
      acc[r][0] = _mm512_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(x, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(x, b2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(x, b3, acc[r][3]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + r * ldo + c * 16, acc[r][c]);
}

// pf_bytes: a byte range [pf, pf + pf_bytes) to prefetch into L2, spread over the blocks.
TGVKV_TARGET_AVX512 inline void gemm_panels_avx512(const float* a, int64_t R, int64_t D,
                                                   const float* panel, int64_t nb, float* out,
                                                   int64_t ldo, const char* pf = nullptr,
                                                   int64_t pf_bytes = 0) {
  const int64_t nblk = nb * ((R + kRowBlock - 1) / kRowBlock);
  const int64_t lines = pf ? (pf_bytes + 63) / 64 : 0;
  const int64_t per = nblk > 0 ? (lines + nblk - 1) / nblk : 0;
  int64_t done = 0;
  for (int64_t jb = 0; jb < nb; ++jb) {
    const float* P = panel + jb * D * kKeyPanel;
    float* o = out + jb * kKeyPanel;
    for (int64_t r = 0; r < R; r += kRowBlock) {
      const int64_t n = std::min(per, lines - done);
      const char* p = pf + done * 64;
      done += n;
      switch (std::min<int64_t>(kRowBlock, R - r)) {
        case 6: gemm_block_avx512<6>(a + r * D, D, P, o + r * ldo, ldo, p, n); break;
        case 5: gemm_block_avx512<5>(a + r * D, D, P, o + r * ldo, ldo, p, n); break;
        case 4: gemm_block_avx512<4>(a + r * D, D, P, o + r * ldo, ldo, p, n); break;
        case 3: gemm_block_avx512<3>(a + r * D, D, P, o + r * ldo, ldo, p, n); break;
        case 2: gemm_block_avx512<2>(a + r * D, D, P, o + r * ldo, ldo, p, n); break;
        default: gemm_block_avx512<1>(a + r * D, D, P, o + r * ldo, ldo, p, n); break;
      }
    }
  }
}

// 16x16 fp32 transpose in registers: r[i] (row i) -> r[i] (column i).
TGVKV_TARGET_AVX512 inline void transpose16_avx512(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}

// 16 consecutive elements of a row as fp32.
TGVKV_TARGET_AVX512 inline __m512 load16_as_f32(const void* p, DType dt) {
  switch (dt) {
    case DType::kF32: return _mm512_loadu_ps(p);
    case DType::kF16:
      return _mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
    default:
      return _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p))), 16));
  }
}

// fp32 16 keys x 16 dims -> out[d * 64 + i] = rows[i * rs + d] (rs: row stride in floats).
// The first transpose stage is done by the loads (128-bit chunks of rows i, i+4, i+8, i+12 inserted
// into one zmm), leaving 32 in-lane shuffles instead of 64 (the pack is shuffle-port bound).
TGVKV_TARGET_AVX512 inline void transpose16_f32_store(const float* rows, int64_t rs, float* out) {
  for (int c = 0; c < 4; ++c) {
    __m512 q[4];
    for (int i = 0; i < 4; ++i) {
      const float* p = rows + i * rs + 4 * c;
      __m512 x = _mm512_castps128_ps512(_mm_loadu_ps(p));
      x = _mm512_insertf32x4(x, _mm_loadu_ps(p + 4 * rs), 1);
      x = _mm512_insertf32x4(x, _mm_loadu_ps(p + 8 * rs), 2);
      x = _mm512_insertf32x4(x, _mm_loadu_ps(p + 12 * rs), 3);
      q[i] = x;  // lane l: row 4l+i, dims 4c..4c+3
    }
    const __m512 t0 = _mm512_unpacklo_ps(q[0], q[1]);
    const __m512 t1 = _mm512_unpackhi_ps(q[0], q[1]);
    const __m512 t2 = _mm512_unpacklo_ps(q[2], q[3]);
    const __m512 t3 = _mm512_unpackhi_ps(q[2], q[3]);
    _mm512_storeu_ps(out + (4 * c + 0) * kKeyPanel, _mm512_shuffle_ps(t0, t2, 0x44));
    _mm512_storeu_ps(out + (4 * c + 1) * kKeyPanel, _mm512_shuffle_ps(t0, t2, 0xEE));
    _mm512_storeu_ps(out + (4 * c + 2) * kKeyPanel, _mm512_shuffle_ps(t1, t3, 0x44));
    _mm512_storeu_ps(out + (4 * c + 3) * kKeyPanel, _mm512_shuffle_ps(t1, t3, 0xEE));
  }
}

// bf16 16 keys x 32 dims -> out[d * 64 + i] = float(rows[i * rs + d]) (rs in elements): the same
// transpose on 32-bit pairs of dims, then each pair splits into two fp32 (bf16 -> fp32 is exact:
// the 16 bits become the high half).
TGVKV_TARGET_AVX512 inline void transpose16x32_bf16_store(const uint16_t* rows, int64_t rs,
                                                          float* out) {
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int c = 0; c < 4; ++c) {
    __m512i q[4];
    for (int i = 0; i < 4; ++i) {
      const uint16_t* p = rows + i * rs + 8 * c;
      __m512i x = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      x = _mm512_inserti32x4(x, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 4 * rs)), 1);
      x = _mm512_inserti32x4(x, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * rs)), 2);
      x = _mm512_inserti32x4(x, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 12 * rs)), 3);
      q[i] = x;  // lane l: row 4l+i, dim pairs 4c..4c+3
    }
    const __m512 t0 = _mm512_unpacklo_ps(_mm512_castsi512_ps(q[0]), _mm512_castsi512_ps(q[1]));
    const __m512 t1 = _mm512_unpackhi_ps(_mm512_castsi512_ps(q[0]), _mm512_castsi512_ps(q[1]));
    const __m512 t2 = _mm512_unpacklo_ps(_mm512_castsi512_ps(q[2]), _mm512_castsi512_ps(q[3]));
    const __m512 t3 = _mm512_unpackhi_ps(_mm512_castsi512_ps(q[2]), _mm512_castsi512_ps(q[3]));
    __m512i v[4];
    v[0] = _mm512_castps_si512(_mm512_shuffle_ps(t0, t2, 0x44));
    v[1] = _mm512_castps_si512(_mm512_shuffle_ps(t0, t2, 0xEE));
    v[2] = _mm512_castps_si512(_mm512_shuffle_ps(t1, t3, 0x44));
    v[3] = _mm512_castps_si512(_mm512_shuffle_ps(t1, t3, 0xEE));
    for (int e = 0; e < 4; ++e) {
      const int64_t d = 8 * c + 2 * e;
      _mm512_storeu_ps(out + d * kKeyPanel, _mm512_castsi512_ps(_mm512_slli_epi32(v[e], 16)));
      _mm512_storeu_ps(out + (d + 1) * kKeyPanel,
                       _mm512_castsi512_ps(_mm512_and_si512(v[e], hi_mask)));
    }
  }
}

// pack_key_panels with 16x16 register transposes (same output, bit for bit).
TGVKV_TARGET_AVX512 inline void pack_key_panels_avx512(const void* k, DType dt, int64_t stride_n,
                                                       int64_t stride_d, int64_t nk, int64_t D,
                                                       float* panel) {
  if (stride_d != 1) {
    pack_key_panels_any(k, dt, stride_n, stride_d, nk, D, panel);
    return;
  }
  const int64_t es = dt == DType::kF32 ? 4 : 2;
  const char* kb = static_cast<const char*>(k);
  const int64_t nb = (nk + kKeyPanel - 1) / kKeyPanel;
  const int64_t Dfull = D / 16 * 16;
  for (int64_t jb = 0; jb < nb; ++jb) {
    float* P = panel + jb * D * kKeyPanel;
    const int64_t j0 = jb * kKeyPanel;
    const int64_t jn = std::min<int64_t>(kKeyPanel, nk - j0);
    int64_t jj0 = 0;
    for (; jj0 + 16 <= jn; jj0 += 16) {
      const char* rows = kb + (j0 + jj0) * stride_n * es;
      if (dt == DType::kF32) {
        const float* rf = reinterpret_cast<const float*>(rows);
        for (int64_t d0 = 0; d0 < Dfull; d0 += 16)
          transpose16_f32_store(rf + d0, stride_n, P + d0 * kKeyPanel + jj0);
      } else {
        int64_t d0 = 0;
        if (dt == DType::kBF16) {
          const uint16_t* rb = reinterpret_cast<const uint16_t*>(rows);
          for (; d0 + 32 <= Dfull; d0 += 32)
            transpose16x32_bf16_store(rb + d0, stride_n, P + d0 * kKeyPanel + jj0);
        }
        for (; d0 < Dfull; d0 += 16) {
          __m512 r[16];
          for (int i = 0; i < 16; ++i) r[i] = load16_as_f32(rows + (i * stride_n + d0) * es, dt);
          transpose16_avx512(r);
          for (int i = 0; i < 16; ++i) _mm512_storeu_ps(P + (d0 + i) * kKeyPanel + jj0, r[i]);
        }
      }
      for (int64_t i = 0; i < 16; ++i)
        for (int64_t d = Dfull; d < D; ++d)
          P[d * kKeyPanel + jj0 + i] = load_any(rows, dt, i * stride_n + d);
    }
    for (int64_t jj = jj0; jj < jn; ++jj) {
      const char* row = kb + (j0 + jj) * stride_n * es;
      for (int64_t d = 0; d < D; ++d) P[d * kKeyPanel + jj] = load_any(row, dt, d);
    }
    if (jn < kKeyPanel)
      for (int64_t d = 0; d < D; ++d)
        for (int64_t jj = jn; jj < kKeyPanel; ++jj) P[d * kKeyPanel + jj] = 0.0f;
  }
}

// exp(x) for x <= 0 (Cephes expf polynomial, ~1 ulp); exactly 0 below -87.33 (fp32 underflow).
TGVKV_TARGET_AVX512 inline __m512 exp_nonpos_avx512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
  const __m512 z = _mm512_mul_ps(r, r);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, z, r);
  y = _mm512_add_ps(y, _mm512_set1_ps(1.0f));
  y = _mm512_scalef_ps(y, fx);
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), y);
}

// Masked softmax of one logits row over keys [0, n) accumulated into acc[0, n).
// allowed: [ceil(n/16)] bit masks (bit jj of word w: key 16w+jj is not a pad slot).
// Returns false when no key is allowed (nothing accumulated).
TGVKV_TARGET_AVX512 inline bool softmax_accumulate_avx512(float* logits, int64_t n,
                                                          const uint16_t* allowed, float scale,
                                                          float* acc) {
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vmax = ninf;
  const int64_t nw = (n + 15) / 16;
  for (int64_t w = 0; w < nw; ++w) {
    const int64_t rem = n - w * 16;
    const __mmask16 tail = rem >= 16 ? static_cast<__mmask16>(0xFFFF)
                                     : static_cast<__mmask16>((1u << rem) - 1u);
    const __mmask16 m = static_cast<__mmask16>(tail & allowed[w]);
    __m512 x = _mm512_mul_ps(_mm512_loadu_ps(logits + w * 16), vscale);
    x = _mm512_mask_mov_ps(ninf, m, x);
    _mm512_storeu_ps(logits + w * 16, x);
    vmax = _mm512_max_ps(vmax, x);
  }
  const float mx = _mm512_reduce_max_ps(vmax);
  if (!(mx > -std::numeric_limits<float>::infinity())) return false;
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t w = 0; w < nw; ++w) {
    const __m512 e = exp_nonpos_avx512(_mm512_sub_ps(_mm512_loadu_ps(logits + w * 16), vm));
    _mm512_storeu_ps(logits + w * 16, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  const float inv = 1.0f / _mm512_reduce_add_ps(vsum);
  const __m512 vinv = _mm512_set1_ps(inv);
  for (int64_t w = 0; w < nw; ++w) {
    const int64_t rem = n - w * 16;
    const __mmask16 tail = rem >= 16 ? static_cast<__mmask16>(0xFFFF)
                                     : static_cast<__mmask16>((1u << rem) - 1u);
    const __m512 p = _mm512_mul_ps(_mm512_loadu_ps(logits + w * 16), vinv);
    const __m512 a = _mm512_maskz_loadu_ps(tail, acc + w * 16);
    _mm512_mask_storeu_ps(acc + w * 16, tail, _mm512_add_ps(a, p));
  }
  return true;
}
#endif  // TGVKV_HAVE_AVX512_PATH

inline bool softmax_accumulate_generic(float* logits, int64_t n, const uint16_t* allowed,
                                       float scale, float* acc) {
  const float ninf = -std::numeric_limits<float>::infinity();
  float mx = ninf;
  for (int64_t j = 0; j < n; ++j) {
    const bool ok = (allowed[j >> 4] >> (j & 15)) & 1u;
    const float x = ok ? logits[j] * scale : ninf;
    logits[j] = x;
    mx = std::max(mx, x);
  }
  if (!(mx > ninf)) return false;
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const float e = logits[j] == ninf ? 0.0f : std::exp(logits[j] - mx);
    logits[j] = e;
    sum += e;
  }
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < n; ++j) acc[j] += logits[j] * inv;
  return true;
}

// ------------------------------------------------------------------------------------------------
// Work description
// ------------------------------------------------------------------------------------------------
struct ScoreLayer {
  const void* q;  // [B, Hq, T, D] contiguous
  const void* k;  // [B, Hkv, N, D] with strides k_sb, k_sh, k_sn, k_sd (elements)
  DType dtype;
  int64_t Hq, Hkv, D;
  int64_t k_sb, k_sh, k_sn, k_sd;
  float* scores;  // [B, N] contiguous
  float* stats;   // [B, 2] contiguous
};

struct ScoreBatch {
  const int64_t* q_pos;   // [B, T] contiguous (validated: valid-first, increasing, not pad)
  const int8_t* mod;      // [B, N] contiguous
  const int64_t* n_rows;  // [B] valid guidance rows per sample
  int64_t B, T, N;
  float scale;
  bool want_mi;  // compute I (stats[..., 1]); else 0
};

// Per-sample allowed-key bit masks: [B, ceil(N/16)] (bit = slot is not a pad slot).
inline std::vector<uint16_t> allowed_masks(const int8_t* mod /* [B, N] */, int64_t B, int64_t N) {
  const int64_t nw = (N + 15) / 16;
  std::vector<uint16_t> m(static_cast<size_t>(B * nw), 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < N; ++j)
      if (mod[b * N + j] != kPad) m[b * nw + (j >> 4)] |= static_cast<uint16_t>(1u << (j & 15));
  return m;
}

// Phase 1: head-summed softmax rows [t0, t1) of sample b into A (rows of length N, zeroed here).
// Scratch: panel >= round_up(N,64)*D, qbuf >= (t1-t0)*D, logits >= (t1-t0)*round_up(N,64).
inline void score_rows(const ScoreLayer& ly, const ScoreBatch& sb, const uint16_t* allowed_b,
                       int64_t b, int64_t t0, int64_t t1, float* A /* [T, N] of (l, b) */,
                       float* panel, float* qbuf, float* logits, bool avx512) {
  const int64_t N = sb.N, T = sb.T, D = ly.D;
  const int64_t* qp = sb.q_pos + b * T;
  for (int64_t t = t0; t < t1; ++t) std::memset(A + t * N, 0, sizeof(float) * N);
  if (t1 <= t0) return;
  const int64_t R = t1 - t0;
  const int64_t nk = qp[t1 - 1] + 1;  // keys visible to the last row of the chunk
  const int64_t nb = (nk + kKeyPanel - 1) / kKeyPanel;
  const int64_t ldo = nb * kKeyPanel;
  const int64_t g = ly.Hq / ly.Hkv;
  const int64_t es = ly.dtype == DType::kF32 ? 4 : 2;
  for (int64_t h = 0; h < ly.Hkv; ++h) {
    const char* kbh = static_cast<const char*>(ly.k) + (b * ly.k_sb + h * ly.k_sh) * es;
#if TGVKV_HAVE_AVX512_PATH
    if (avx512)
      pack_key_panels_avx512(kbh, ly.dtype, ly.k_sn, ly.k_sd, nk, D, panel);
    else
#endif
      pack_key_panels_any(kbh, ly.dtype, ly.k_sn, ly.k_sd, nk, D, panel);
    for (int64_t gi = 0; gi < g; ++gi) {
      const int64_t hq = h * g + gi;
      const int64_t qoff = ((b * ly.Hq + hq) * T + t0) * D;
      switch (ly.dtype) {  // one dtype dispatch per head, not per element
        case DType::kF32:
          std::memcpy(qbuf, static_cast<const float*>(ly.q) + qoff, sizeof(float) * R * D);
          break;
        case DType::kF16:
          for (int64_t i = 0; i < R * D; ++i)
            qbuf[i] = load_as_float<half_t>(ly.q, qoff + i);
          break;
        default:
          for (int64_t i = 0; i < R * D; ++i)
            qbuf[i] = load_as_float<bf16_t>(ly.q, qoff + i);
      }
#if TGVKV_HAVE_AVX512_PATH
      if (avx512) {
        // While the first query head of the group computes, prefetch the next KV head's keys
        // (only when they are one dense block: k_sd == 1, k_sn == D).
        const bool pf = gi == 0 && h + 1 < ly.Hkv && ly.k_sd == 1 && ly.k_sn == D;
        gemm_panels_avx512(qbuf, R, D, panel, nb, logits, ldo, pf ? kbh + ly.k_sh * es : nullptr,
                           pf ? nk * D * es : 0);
        for (int64_t r = 0; r < R; ++r)
          softmax_accumulate_avx512(logits + r * ldo, qp[t0 + r] + 1, allowed_b, sb.scale,
                                    A + (t0 + r) * N);
        continue;
      }
#endif
      (void)avx512;
      gemm_panels_generic(qbuf, R, D, panel, nb, logits, ldo);
      for (int64_t r = 0; r < R; ++r)
        softmax_accumulate_generic(logits + r * ldo, qp[t0 + r] + 1, allowed_b, sb.scale,
                                   A + (t0 + r) * N);
    }
  }
}

// Phase 2: A /= Hq, then text weights, scores [N] and stats (S, I) of sample b (reference order,
// double accumulators). colw / cols: [N] double scratch; w: [T] double scratch.
inline void finish_scores(const ScoreLayer& ly, const ScoreBatch& sb, int64_t b, float* A,
                          double* colw, double* cols, double* w) {
  const int64_t N = sb.N, T = sb.T;
  const int64_t Tv = sb.n_rows[b];
  const int64_t* qp = sb.q_pos + b * T;
  const int8_t* mod = sb.mod + b * N;
  float* scores = ly.scores + b * N;
  float* stats = ly.stats + b * 2;
  const float hq = static_cast<float>(ly.Hq);
  for (int64_t t = 0; t < Tv; ++t) {
    float* a = A + t * N;
    const int64_t n = qp[t] + 1;
    for (int64_t j = 0; j < n; ++j) a[j] = a[j] / hq;
  }
  for (int64_t t = 0; t < Tv; ++t) {
    double s = 0.0;
    for (int64_t u = t; u < Tv; ++u) s += static_cast<double>(A[u * N + qp[t]]);
    w[t] = s / static_cast<double>(Tv - t);
  }
  for (int64_t j = 0; j < N; ++j) colw[j] = 0.0, cols[j] = 0.0;
  for (int64_t t = 0; t < Tv; ++t) {
    const float* a = A + t * N;
    const double wt = w[t];
    const int64_t n = qp[t] + 1;  // A[t, j] == 0 for j >= n
    for (int64_t j = 0; j < n; ++j) {
      const double x = static_cast<double>(a[j]);
      const double p = wt * x;
      colw[j] = colw[j] + p;
      cols[j] = cols[j] + x;
    }
  }
  for (int64_t j = 0; j < N; ++j) {
    const int8_t m = mod[j];
    scores[j] = m == kVision ? static_cast<float>(colw[j])
                             : (m == kText ? static_cast<float>(cols[j]) : 0.0f);
  }
  // S: text->vision mass over the valid rows x vision columns.
  double S = 0.0;
  for (int64_t t = 0; t < Tv; ++t) {
    const float* a = A + t * N;
    const int64_t n = qp[t] + 1;
    for (int64_t j = 0; j < n; ++j)
      if (mod[j] == kVision) S += static_cast<double>(a[j]);
  }
  double I = 0.0;
  if (sb.want_mi && S > 0.0) {
    // p = a / S; marginals pr (rows), pc (columns); I = sum p log(p / (pr pc)) over p > 0.
    double* pc = cols;  // reuse
    for (int64_t j = 0; j < N; ++j) pc[j] = 0.0;
    for (int64_t t = 0; t < Tv; ++t) {
      const float* a = A + t * N;
      const int64_t n = qp[t] + 1;
      double pr = 0.0;
      for (int64_t j = 0; j < n; ++j)
        if (mod[j] == kVision) {
          const double p = static_cast<double>(a[j]) / S;
          pr += p;
          pc[j] += p;
        }
      w[t] = pr;  // reuse w as row marginals
    }
    for (int64_t t = 0; t < Tv; ++t) {
      const float* a = A + t * N;
      const int64_t n = qp[t] + 1;
      for (int64_t j = 0; j < n; ++j)
        if (mod[j] == kVision) {
          const double p = static_cast<double>(a[j]) / S;
          if (p > 0.0) I += p * std::log(p / (w[t] * pc[j]));
        }
    }
  }
  // MI is >= 0; a negative value is pure rounding noise of a (mathematically) independent block
  if (I < 0.0) I = 0.0;
  stats[0] = static_cast<float>(S);
  stats[1] = static_cast<float>(I);
}

// Scores and stats of L layers of one batch. PF: parallel_for(begin, end, fn(begin, end)).
// Bounded memory: layers are processed in waves whose head-sum buffers stay under ~64 MiB.
template <typename PF>
void score_layers(const ScoreLayer* layers, int64_t L, const ScoreBatch& sb, int64_t n_threads,
                  PF&& parallel_for) {
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
  int64_t Dmax = 0;
  for (int64_t l = 0; l < L; ++l) Dmax = std::max(Dmax, layers[l].D);
  const bool avx512 = cpu_has_avx512();
  const std::vector<uint16_t> allowed = allowed_masks(sb.mod, B, N);
  const int64_t nw = (N + 15) / 16;
  const int64_t Npad = round_up(N, kKeyPanel);

  const int64_t per_layer = B * Tmax * N;  // floats of head sums per layer
  const int64_t budget = (int64_t{64} << 20) / 4;
  const int64_t W = std::max<int64_t>(1, std::min<int64_t>(L, budget / std::max<int64_t>(1, per_layer)));
  // Row chunks per (layer, sample): enough items to feed the threads, >= 6 rows per chunk.
  std::vector<float> Abuf_v(static_cast<size_t>(W * per_layer + 16));
  float* const Abuf = align64(Abuf_v.data());

  for (int64_t l0 = 0; l0 < L; l0 += W) {
    const int64_t Wn = std::min(W, L - l0);
    const int64_t pairs = Wn * B;
    int64_t chunks = std::max<int64_t>(1, (n_threads + pairs - 1) / pairs);
    chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, Tmax / kRowBlock));
    const int64_t rows_per = (Tmax + chunks - 1) / chunks;
    parallel_for(0, pairs * chunks, [&](int64_t begin, int64_t end) {
      // 64-byte aligned scratch: every panel row / logits block is then whole cache lines (no
      // split loads / stores in the pack and the GEMM).
      std::vector<float> panel_v(static_cast<size_t>(Npad * Dmax + 16));
      std::vector<float> qbuf_v(static_cast<size_t>(rows_per * Dmax + 16));
      std::vector<float> logits_v(static_cast<size_t>(rows_per * Npad + 16));
      float* const panel = align64(panel_v.data());
      float* const qbuf = align64(qbuf_v.data());
      float* const logits = align64(logits_v.data());
      for (int64_t it = begin; it < end; ++it) {
        const int64_t pair = it / chunks, c = it % chunks;
        const int64_t li = pair / B, b = pair % B;
        const int64_t Tv = sb.n_rows[b];
        const int64_t t0 = std::min(Tv, c * rows_per), t1 = std::min(Tv, (c + 1) * rows_per);
        if (t1 <= t0) continue;
        score_rows(layers[l0 + li], sb, allowed.data() + b * nw, b, t0, t1,
                   Abuf + (li * B + b) * Tmax * N, panel, qbuf, logits, avx512);
      }
    });
    parallel_for(0, pairs, [&](int64_t begin, int64_t end) {
      std::vector<double> colw(static_cast<size_t>(N)), cols(static_cast<size_t>(N));
      std::vector<double> w(static_cast<size_t>(Tmax));
      for (int64_t pair = begin; pair < end; ++pair) {
        const int64_t li = pair / B, b = pair % B;
        finish_scores(layers[l0 + li], sb, b, Abuf + (li * B + b) * Tmax * N, colw.data(),
                      cols.data(), w.data());
      }
    });
  }
}

}  // namespace cpu
}  // namespace tgvkv
