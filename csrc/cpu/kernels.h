// The CPU kernels that are compiled once per CPU capability (csrc/cpu/kernels/cpu_kernels.cpp,
// built with -DCPU_CAPABILITY=DEFAULT / AVX2 / AVX512 and the matching compiler flags, as ATen
// builds its own native/cpu kernels) and chosen at runtime, plus the GEMM they call.
//
// The capability in use: TGVKV_CPU_CAPABILITY if set (DEFAULT, AVX2, AVX512; an error if the
// CPU lacks it or it was not compiled), else ATen's own choice (at::get_cpu_capability(), which
// honours ATEN_CPU_CAPABILITY). tgvkv.build_info()["cpu_capability"] reports it.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>

#include "tgvkv/cpu_score.h"
#include "tgvkv/cpu_text_mass.h"

namespace tgvkv {
namespace cpu {

struct Kernels {
  const char* capability;
  // Scores [B, N] and stats [B, 2] of L layers (see cpu_score.h), parallel inside.
  void (*score_layers)(const ScoreLayer* layers, int64_t L, const ScoreBatch& sb);
  // Decode step: softmax over the live slots [0, n) of the g query heads of one KV head.
  // q: [g, D] rows of `dt` (contiguous); k: [S, D] of one (b, kv head), strides (sn, sd);
  // probs: [g, ldp] fp32 out; scratch: >= (g + 1) * D + 64 floats.
  void (*decode_probs)(const void* q, const void* k, DType dt, int64_t sn, int64_t sd, int64_t n,
                       int64_t D, int64_t g, float scale, float* scratch, float* probs,
                       int64_t ldp);
  // text_score="all_queries", after score_layers: adds to the text slots of every layer's
  // scores [B, N] (the guidance rows' mass) the mass of every other non-pad query row
  // (cpu_text_mass.h), parallel inside, deterministic.
  void (*text_column_mass)(const ScoreLayer* layers, int64_t L, const ScoreBatch& tb);
  // Whether every element of x [A, R, D] of `dt` (element strides sa, sr, 1) is finite: one
  // read of x, no temporary, parallel inside.
  bool (*all_finite)(const void* x, DType dt, int64_t A, int64_t R, int64_t D, int64_t sa,
                     int64_t sr);
  // Whether bf16 inputs may take the bf16 GEMM (gemm_bf16_packed; when bf16_gemm_available()
  // and D is even): the AVX512 table only.
  bool may_use_bf16_gemm;
};

// The kernel table in use (chosen once, on first use).
const Kernels& kernels();
// Comma-separated capabilities compiled into this binary (e.g. "DEFAULT,AVX2,AVX512").
const char* compiled_capabilities();

// c[M, N] = alpha * a[M, K] . b[N, K]^T in fp32 through ATen's own GEMM (whatever BLAS torch was
// built with; b is its transposed operand, as in torch.matmul(a, b.mT)). a, b, c: rows of stride
// lda, ldb, ldc (unit stride within a row). Single-threaded inside at::parallel_for; MKL is also
// told to block it for one thread, so its rounding does not follow at::get_num_threads().
// Defined in ops_cpu.cpp.
void gemm_nt_f32(int64_t M, int64_t N, int64_t K, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float* c, int64_t ldc);

// The bf16 GEMM of bf16 inputs: oneDNN's brgemm micro-kernel through ATen
// (at::native::cpublas::brgemm / pack: AMX tiles or AVX512-BF16 dot products, the bf16 products
// exact and summed in fp32), on blocks of kKeyBlock keys. Defined in ops_cpu.cpp.
constexpr int64_t kKeyBlock = 64;  // columns of a packed block (ATen's pack takes 16..64)
// Whether ATen can run it now: on this CPU (at::native::cpublas::could_pack(kBFloat16)) and with
// oneDNN enabled (torch.backends.mkldnn.enabled, read at each call).
bool bf16_gemm_available();
// Packs b [K, kKeyBlock] (row-major bf16, K even) into out [K * kKeyBlock] for gemm_bf16_packed.
void pack_keys_bf16(int64_t K, const c10::BFloat16* b, c10::BFloat16* out);
// c[M, kKeyBlock] (row stride ldc) = a[M, K] (row stride lda) . b, b packed by pack_keys_bf16;
// on the calling thread.
void gemm_bf16_packed(int64_t M, int64_t K, const c10::BFloat16* a, int64_t lda,
                      const c10::BFloat16* b, float* c, int64_t ldc);
// Releases the calling thread's hardware state of gemm_bf16_packed (AMX tile configuration).
void brgemm_release_bf16();

// What multiplies bf16 q and keys in the table in use: "brgemm" (gemm_bf16_packed, for even D)
// or "fp32" (gemm_nt_f32 of converted rows). tgvkv.build_info()["cpu_bf16_gemm"] reports it.
const char* bf16_gemm_in_use();

// Bytes the CPU kernels hold in their own buffers (Scratch in cpu_kernels.cpp: the partial head
// sums, logit tiles, converted or packed keys and text-mass partials; the per-thread caches among
// them are grow-only and kept between calls), which torch's allocator statistics never see:
// scratch_account(delta) on every allocation and free of a buffer of the current epoch;
// scratch_bytes() now, scratch_peak_bytes() the most since reset_scratch_peak() (which sets it to
// now). release_scratch() starts a new epoch: every buffer of an older one counts as freed at once
// (held and peak restart from 0) and is freed by its owner thread at its next use, so the next
// call's peak is all that call needs, caches included (exactly so when no call is in flight;
// results never depend on it). tgvkv._C.cpu_scratch_bytes() /
// reset_cpu_scratch_peak() / release_cpu_scratch() expose them (tgvkv-bench ops adds the peak to
// the op's peak memory). Defined in ops_cpu.cpp.
void scratch_account(int64_t delta_bytes);
int64_t scratch_epoch();
int64_t scratch_bytes();
int64_t scratch_peak_bytes();
void reset_scratch_peak();
void release_scratch();

// Per-capability tables (one definition per compiled capability).
const Kernels* kernels_DEFAULT();
#if defined(__x86_64__) || defined(_M_X64)
const Kernels* kernels_AVX2();
const Kernels* kernels_AVX512();
#endif

}  // namespace cpu
}  // namespace tgvkv
