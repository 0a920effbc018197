// Torch-free helpers shared by the CPU (C++) and CUDA (nvcc) kernels of tgvkv.
//
// Everything here is plain C++17 and compiles under nvcc: storage types for fp16/bf16, exact
// conversions to float, the ranking key of select_keep and the per-sample budget computation of
// layer_budgets. The budget and decode-forget arithmetic is written with explicit, non-fusable
// double operations so that CPU and CUDA produce bit-identical keep counts (and both equal the
// Python reference, which evaluates the same expressions in the same order).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define TGVKV_HD __host__ __device__
#else
#define TGVKV_HD
#endif

namespace tgvkv {

// Modality codes of a cache slot (tgvkv.PAD / TEXT / VISION).
constexpr int8_t kPad = 0;
constexpr int8_t kText = 1;
constexpr int8_t kVision = 2;

// Budget modes of layer_budgets.
constexpr int kBudgetMass = 0;  // share ∝ S
constexpr int kBudgetMI = 1;    // share ∝ S·I

// ------------------------------------------------------------------------------------------------
// Bit casts and 16-bit float storage types
// ------------------------------------------------------------------------------------------------
TGVKV_HD inline float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

TGVKV_HD inline uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

// IEEE binary16 storage (same layout as at::Half / __half).
struct alignas(2) half_t {
  uint16_t bits;
};
// bfloat16 storage (same layout as at::BFloat16 / __nv_bfloat16).
struct alignas(2) bf16_t {
  uint16_t bits;
};

// Exact binary16 -> binary32 (normals, subnormals, inf, nan), branch-light.
TGVKV_HD inline float half_bits_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = 0x1.0p-112f;
  const float normalized = bits_to_float((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  const float denormalized = bits_to_float((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result =
      sign | (two_w < denormalized_cutoff ? float_to_bits(denormalized) : float_to_bits(normalized));
  return bits_to_float(result);
}

TGVKV_HD inline float bf16_bits_to_float(uint16_t h) {
  return bits_to_float(static_cast<uint32_t>(h) << 16);
}

TGVKV_HD inline float to_float(float x) { return x; }
TGVKV_HD inline float to_float(half_t x) { return half_bits_to_float(x.bits); }
TGVKV_HD inline float to_float(bf16_t x) { return bf16_bits_to_float(x.bits); }

// ------------------------------------------------------------------------------------------------
// Non-fusable double arithmetic (nvcc contracts a*b+c into FMA by default; the host compiler may
// too when FMA is enabled). The budgets must round exactly like the Python reference.
// ------------------------------------------------------------------------------------------------
TGVKV_HD inline double dmul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  volatile double r = a * b;  // volatile: forbid contraction with a following add
  return r;
#endif
}
TGVKV_HD inline double dadd(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
TGVKV_HD inline double dsub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
TGVKV_HD inline double ddiv(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
// Round half to even (Python's round() on a float), in the default rounding mode.
TGVKV_HD inline double round_half_even(double x) {
#if defined(__CUDA_ARCH__)
  return rint(x);
#else
  return std::nearbyint(x);
#endif
}
TGVKV_HD inline bool is_finite(double x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

// ------------------------------------------------------------------------------------------------
// Ranking key of select_keep: (class text > vision, fp32 score, later slot wins ties), packed into
// one uint64 whose unsigned order is the ranking order (larger = ranked higher = kept first).
// Requires a finite (or at least non-NaN) score and 0 <= slot < 2^31. -0.0 and +0.0 are equal,
// as in the reference's float comparison.
// ------------------------------------------------------------------------------------------------
TGVKV_HD inline uint64_t rank_key(bool is_text, float score, int64_t slot) {
  if (score == 0.0f) score = 0.0f;  // -0 -> +0
  uint32_t u = float_to_bits(score);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // order-preserving float -> uint
  return (static_cast<uint64_t>(is_text ? 1u : 0u) << 63) | (static_cast<uint64_t>(u) << 31) |
         static_cast<uint64_t>(slot);
}
TGVKV_HD inline int64_t rank_key_slot(uint64_t key) {
  return static_cast<int64_t>(key & 0x7FFFFFFFull);
}

// ------------------------------------------------------------------------------------------------
// Budgets of one sample (SPEC §2, reference.layer_budgets), all layers.
//
// stats: S of layer l at stats[l*stride_l], I at stats[l*stride_l + stride_c].
// n_real: N_b (real slots of the sample); n_sink: sink count; evicts: the sample has vision, a
// guidance row and N_b > n_sink + 1 (otherwise everything is kept). keep_ratio in (0, 1].
// work: [2*L] doubles of scratch, only touched when redistribute.
// Outputs keep[l*keep_stride] (int64) and frac[l*frac_stride] (float64).
// Returns 0 on success, 1 if some r_l*N_b is not finite (bad stats: the reference raises).
// ------------------------------------------------------------------------------------------------
TGVKV_HD inline double budget_weight(const float* stats, int64_t l, int64_t stride_l,
                                     int64_t stride_c, int mode) {
  const double S = static_cast<double>(stats[l * stride_l]);
  if (mode == kBudgetMass) return S;
  return dmul(S, static_cast<double>(stats[l * stride_l + stride_c]));
}

// One layer's keep count and keep fraction from its forget ratio r (reference.layer_budgets):
// forget = max(0, round_half_even(r * N)), at most the candidates. Returns 1 if r * N is not finite.
TGVKV_HD inline int emit_layer_keep(double r, double Nd, int64_t n_cand, int64_t n_real,
                                    int64_t* keep, double* frac) {
  const double rn = dmul(r, Nd);
  int64_t forget = 0;
  int status = 0;
  if (!is_finite(rn)) {
    status = 1;
  } else {
    const double f = round_half_even(rn);
    forget = f > 0.0 ? (f >= static_cast<double>(n_cand) ? n_cand : static_cast<int64_t>(f)) : 0;
  }
  *keep = n_real - forget;
  *frac = dsub(1.0, r);
  return status;
}

TGVKV_HD inline int sample_layer_budgets(int64_t L, const float* stats, int64_t stride_l,
                                         int64_t stride_c, int64_t n_real, int64_t n_sink,
                                         bool evicts, double keep_ratio, int mode,
                                         bool redistribute, double* work /* [2*L] */,
                                         int64_t* keep, int64_t keep_stride, double* frac,
                                         int64_t frac_stride) {
  if (!evicts || keep_ratio >= 1.0) {
    for (int64_t l = 0; l < L; ++l) {
      keep[l * keep_stride] = n_real;
      frac[l * frac_stride] = 1.0;
    }
    return 0;
  }
  // tot = sum(w), sequential l = 0..L-1
  double tot = 0.0;
  for (int64_t l = 0; l < L; ++l) tot = dadd(tot, budget_weight(stats, l, stride_l, stride_c, mode));
  const bool uniform = !(tot > 0.0);
  const double Ld = static_cast<double>(L);
  const double Nd = static_cast<double>(n_real);
  const double LK = dmul(Ld, keep_ratio);  // L * keep_ratio, evaluated first as in Python
  auto pi = [&](int64_t l) -> double {
    return uniform ? ddiv(1.0, Ld) : ddiv(budget_weight(stats, l, stride_l, stride_c, mode), tot);
  };
  const int64_t n_cand = n_real - n_sink - 1 > 0 ? n_real - n_sink - 1 : 0;
  int status = 0;

  if (redistribute) {
    double* target = work;       // [L] kept tokens before clamping
    double* clamped = work + L;  // [L] 0.0 / 1.0
    for (int64_t l = 0; l < L; ++l) {
      const double r = dsub(1.0, dmul(LK, pi(l)));
      target[l] = dmul(dsub(1.0, r), Nd);
      clamped[l] = 0.0;
    }
    for (;;) {
      double excess = 0.0;
      bool any_new = false;
      for (int64_t l = 0; l < L; ++l) {
        if (clamped[l] != 0.0) continue;
        const double d = dsub(target[l], Nd);
        excess = dadd(excess, d > 0.0 ? d : 0.0);
        if (target[l] >= Nd) any_new = true;
      }
      if (!any_new) break;
      for (int64_t l = 0; l < L; ++l) {
        if (clamped[l] == 0.0 && target[l] >= Nd) {
          clamped[l] = 1.0;
          target[l] = Nd;
        }
      }
      double wsum = 0.0;
      int64_t n_free = 0;
      for (int64_t l = 0; l < L; ++l) {
        if (clamped[l] != 0.0) continue;
        wsum = dadd(wsum, pi(l));
        ++n_free;
      }
      if (n_free == 0 || !(excess > 0.0)) break;
      for (int64_t l = 0; l < L; ++l) {
        if (clamped[l] != 0.0) continue;
        const double share =
            wsum > 0.0 ? ddiv(pi(l), wsum) : ddiv(1.0, static_cast<double>(n_free));
        target[l] = dadd(target[l], dmul(excess, share));
      }
    }
    for (int64_t l = 0; l < L; ++l) {
      status |= emit_layer_keep(dsub(1.0, ddiv(target[l], Nd)), Nd, n_cand, n_real,
                                keep + l * keep_stride, frac + l * frac_stride);
    }
    return status;
  }

  for (int64_t l = 0; l < L; ++l) {
    status |= emit_layer_keep(dsub(1.0, dmul(LK, pi(l))), Nd, n_cand, n_real,
                              keep + l * keep_stride, frac + l * frac_stride);
  }
  return status;
}

// ------------------------------------------------------------------------------------------------
// Candidates select_keep drops in one (layer, sample): clamp(n_real - keep, 0, n_cand) as the
// reference computes it with Python ints, for every int64 keep (INT64_MIN included: the plain
// difference would overflow). n_real >= 0, 0 <= n_cand <= n_real.
// ------------------------------------------------------------------------------------------------
TGVKV_HD inline int64_t select_forget(int64_t n_real, int64_t keep, int64_t n_cand) {
  if (keep >= n_real) return 0;
  if (keep <= n_real - n_cand) return n_cand;
  return n_real - keep;  // in (0, n_cand): keep in (n_real - n_cand, n_real), both >= 0
}

// Whether decode_evict_ has a candidate range [n_sink, n - n_protected) (reference: hi > lo),
// written so that no int64 n_protected overflows (n in [0, S], n_sink in [0, 2^31 - 1]).
TGVKV_HD inline bool decode_has_candidates(int64_t n, int64_t n_protected, int64_t n_sink) {
  return n_protected < n - n_sink;
}

// ------------------------------------------------------------------------------------------------
// Decode-time forget count (reference.decode_evict_): int(length - n_seen * keep_fraction),
// truncated toward zero. Sets *ok = false when the value is not finite (the reference raises).
// Only meaningful when keep_fraction < 1.
// ------------------------------------------------------------------------------------------------
TGVKV_HD inline int64_t decode_forget(int64_t length, int64_t n_seen, double keep_fraction,
                                      bool* ok) {
  const double x = dsub(static_cast<double>(length),
                        dmul(static_cast<double>(n_seen), keep_fraction));
  if (!is_finite(x)) {
    *ok = false;
    return 0;
  }
  *ok = true;
  if (x >= 9.0e18) return INT64_MAX;
  if (x <= -9.0e18) return INT64_MIN;
  return static_cast<int64_t>(x);  // truncation toward zero, as Python int()
}

}  // namespace tgvkv
