// CPU implementations of every tgvkv op (ATen glue + TORCH_LIBRARY_IMPL(tgvkv, CPU)).
//
// One translation unit on purpose: each torch-including TU costs minutes on small machines.
// The kernel bodies are torch-free (csrc/include/tgvkv/cpu_*.h); this file validates inputs
// (shapes, dtypes and devices through csrc/op_args.h, shared with the CUDA ops; here the device
// type and the data-dependent invariants: q_pos layout, modality codes, finite scores,
// ascending keep_idx), allocates outputs and runs the kernels with
// at::parallel_for over (layer, sample, head / row chunk). The scoring and decode kernels are
// compiled per CPU capability (csrc/cpu/kernels/); the table in use is chosen here.
#include <ATen/Config.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/amin.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/kernels.h"
#include "op_args.h"
#include "tgvkv/common.h"
#include "tgvkv/cpu_score.h"
#include "tgvkv/cpu_select.h"

namespace tgvkv {
namespace cpu {

#if AT_MKL_ENABLED() && defined(__GNUC__)
// MKL's C service API (mkl_service.h): the calling thread's MKL thread count (0: the global one),
// returning the previous value. Exported by libtorch_cpu when torch links MKL statically; weak, so
// a torch whose MKL lives elsewhere (or nowhere) leaves it null and the GEMM runs as before.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
#endif

namespace {
// MKL runs the GEMMs below on the calling thread alone. Inside at::parallel_for they already run
// on one thread (no nested OpenMP), but MKL still blocks a GEMM by its thread count (torch's
// at::set_num_threads sets the main thread's to the intra-op count; the pool's threads keep
// MKL's default): on MKL's AVX2 code path the logits then differed in the last bit between 2
// threads and 1 or 4 (scores up to 4e-9 apart, Xeon, MKL_ENABLE_INSTRUCTIONS=AVX2), breaking the
// ops' thread-count independence. A count of 1 for the call gives every thread count one
// blocking.
struct BlasOnOneThread {
#if AT_MKL_ENABLED() && defined(__GNUC__)
  const bool on = MKL_Set_Num_Threads_Local != nullptr;
  const int prev = on ? MKL_Set_Num_Threads_Local(1) : 0;
  ~BlasOnOneThread() {
    if (on) MKL_Set_Num_Threads_Local(prev);
  }
#endif
};
}  // namespace

void gemm_nt_f32(int64_t M, int64_t N, int64_t K, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float* c, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  [[maybe_unused]] const BlasOnOneThread one_thread;
  // at::cpu::addmm_out with beta = 0 (c is not read): ATen's CPU matmul kernel (mm_out is this
  // with alpha = 1) without the dispatcher round trip, alpha applied by the BLAS; b's [K, N] view
  // of strides (1, ldb) reaches the BLAS as a transposed operand (sgemm 'T'), not copied
  const auto opt = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor A = at::from_blob(const_cast<float*>(a), {M, K}, {lda, 1}, opt);
  const at::Tensor Bm = at::from_blob(const_cast<float*>(b), {K, N}, {1, ldb}, opt);
  at::Tensor C = at::from_blob(c, {M, N}, {ldc, 1}, opt);
  at::cpu::addmm_out(C, C, A, Bm, /*beta=*/0, /*alpha=*/alpha);
}

namespace {
std::atomic<int64_t> g_scratch{0}, g_scratch_peak{0}, g_scratch_epoch{0};
}  // namespace

void scratch_account(int64_t delta_bytes) {
  const int64_t now = g_scratch.fetch_add(delta_bytes) + delta_bytes;
  int64_t peak = g_scratch_peak.load();
  while (now > peak && !g_scratch_peak.compare_exchange_weak(peak, now)) {
  }
}
int64_t scratch_epoch() { return g_scratch_epoch.load(std::memory_order_relaxed); }
int64_t scratch_bytes() { return g_scratch.load(); }
int64_t scratch_peak_bytes() { return g_scratch_peak.load(); }
void reset_scratch_peak() { g_scratch_peak.store(g_scratch.load()); }
void release_scratch() {
  g_scratch_epoch.fetch_add(1);
  g_scratch.store(0);
  g_scratch_peak.store(0);
}

// could_pack: the CPU (AMX) and torch's build, fixed for the process; userEnabledMkldnn: the
// user's torch.backends.mkldnn.enabled, read at every call (with oneDNN switched off, ATen's pack
// and brgemm raise "No need to pack" / "... only supported ...": the fp32 GEMM runs instead)
bool bf16_gemm_available() {
  static const bool could = at::native::cpublas::could_pack(at::kBFloat16);
  return could && at::globalContext().userEnabledMkldnn();
}

void pack_keys_bf16(int64_t K, const c10::BFloat16* b, c10::BFloat16* out) {
  at::native::cpublas::pack(K, kKeyBlock, kKeyBlock, kKeyBlock, at::kBFloat16, at::kBFloat16, b,
                            out);
}

// (brgemm's is_vnni and brgemm_release's argument, both true by default where they exist, are
// left to their defaults: torch releases without them declare neither)
void gemm_bf16_packed(int64_t M, int64_t K, const c10::BFloat16* a, int64_t lda,
                      const c10::BFloat16* b, float* c, int64_t ldc) {
  at::native::cpublas::brgemm(M, kKeyBlock, K, lda, kKeyBlock, ldc, /*add_C=*/false, a, b, c);
}

void brgemm_release_bf16() { at::native::cpublas::brgemm_release(); }

const char* bf16_gemm_in_use() {
  return kernels().may_use_bf16_gemm && bf16_gemm_available() ? "brgemm" : "fp32";
}

const char* compiled_capabilities() {
#if defined(__x86_64__) || defined(_M_X64)
  return "DEFAULT,AVX2,AVX512";
#else
  return "DEFAULT";
#endif
}

namespace {

// Whether this CPU can run the kernels compiled for capability `cap` (the flags of the build).
bool cpu_supports(const std::string& cap) {
  if (cap == "DEFAULT") return true;
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  if (cap == "AVX2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  if (cap == "AVX512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
  return false;
}

const Kernels* table_of(const std::string& cap) {
#if defined(__x86_64__) || defined(_M_X64)
  if (cap == "AVX512") return kernels_AVX512();
  if (cap == "AVX2") return kernels_AVX2();
#endif
  if (cap == "DEFAULT") return kernels_DEFAULT();
  return nullptr;
}

const Kernels* choose_kernels() {
  const char* env = std::getenv("TGVKV_CPU_CAPABILITY");
  if (env != nullptr && *env != '\0') {
    std::string want(env);
    for (char& ch : want) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    const Kernels* k = table_of(want);
    TORCH_CHECK(k != nullptr, "tgvkv: TGVKV_CPU_CAPABILITY=", env, " is not a CPU capability "
                "compiled into tgvkv (compiled: ", compiled_capabilities(), ")");
    TORCH_CHECK(cpu_supports(want), "tgvkv: TGVKV_CPU_CAPABILITY=", env, " but this CPU does "
                "not support it (compiled: ", compiled_capabilities(), ")");
    return k;
  }
  // ATen's own choice (honours ATEN_CPU_CAPABILITY); anything we did not compile: DEFAULT
  const std::string aten = at::get_cpu_capability();
  for (const char* cap : {"AVX512", "AVX2"})
    if (aten == cap && cpu_supports(cap) && table_of(cap) != nullptr) return table_of(cap);
  return kernels_DEFAULT();
}

}  // namespace

const Kernels& kernels() {
  static const Kernels* k = choose_kernels();
  return *k;
}

}  // namespace cpu

namespace {

using at::Tensor;
using at::TensorList;
using cpu::SampleInfo;
using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

cpu::DType to_dtype(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cpu::DType::kF32;
    case at::kHalf: return cpu::DType::kF16;
    default: return cpu::DType::kBF16;
  }
}

auto par_for() {
  return [](int64_t begin, int64_t end, const auto& fn) {
    if (end <= begin) return;
    at::parallel_for(begin, end, 1, fn);
  };
}

// The device-type check of the CPU ops (the rest of their argument checks: op_args.h).
void check_cpu(const Tensor& t, const char* op, const char* name) {
  checks::check_on(t, c10::DeviceType::CPU, op, name);
}

void check_cpu(TensorList ts, const char* op, const char* name) {
  for (const Tensor& t : ts) check_cpu(t, op, name);
}

// Validates q_pos [B, T] / modality [B, N] (CPU, data-dependent) and returns per-sample facts.
// N: the number of cache slots the op works on.
std::vector<SampleInfo> analyze_samples(const Tensor& q_pos_c, const Tensor& mod_c, const char* op) {
  const int64_t B = mod_c.size(0), N = mod_c.size(1), T = q_pos_c.size(1);
  checks::check_slot_count(N, op);
  const int64_t* qp = q_pos_c.data_ptr<int64_t>();
  const int8_t* mod = mod_c.data_ptr<int8_t>();
  std::vector<SampleInfo> info(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    SampleInfo& si = info[b];
    const int8_t* m = mod + b * N;
    for (int64_t j = 0; j < N; ++j) {
      const int8_t x = m[j];
      TGVKV_CHECK(x == kPad || x == kText || x == kVision, op, "'modality' values must be 0 (pad), ",
                  "1 (text) or 2 (vision), got ", static_cast<int>(x), " at [", b, ", ", j, "]");
      if (x != kPad) {
        ++si.n_real;
        si.last_real = j;
      }
      if (x == kVision) si.has_vision = true;
    }
    const int64_t* q = qp + b * T;
    int64_t prev = -1;
    bool ended = false;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t p = q[t];
      TGVKV_CHECK(p >= -1 && p < N, op, "'q_pos' values must be in [-1, N = ", N, "), got ", p,
                  " at [", b, ", ", t, "]");
      if (p < 0) {
        ended = true;
        continue;
      }
      TGVKV_CHECK(!ended, op, "'q_pos' rows must list valid slots first (then -1), got ", p,
                  " after -1 at [", b, ", ", t, "]");
      TGVKV_CHECK(p > prev, op, "'q_pos' must be strictly increasing, got ", p, " after ", prev,
                  " at [", b, ", ", t, "]");
      TGVKV_CHECK(m[p] != kPad, op, "'q_pos' must not point at a pad slot, got slot ", p,
                  " at [", b, ", ", t, "]");
      prev = p;
      ++si.n_rows;
    }
    si.first_guid = si.n_rows > 0 ? q[0] : -1;
  }
  return info;
}

bool sample_evicts(const SampleInfo& si, int64_t n_sink) {
  return si.has_vision && si.n_rows > 0 && si.n_real > n_sink + 1;
}

// ------------------------------------------------------------------------------------------------
// score_text_vision
// ------------------------------------------------------------------------------------------------
// q: the guidance rows [B, Hq, T, D] (text_score="guidance"), or the full query states
// [B, Hq, N, D] whose rows q_pos[b, t] are the guidance rows (rows_are_slots, "all_queries"),
// any strides.
cpu::ScoreLayer make_layer(const Tensor& q, bool rows_are_slots, const Tensor& k, float* scores,
                           float* stats) {
  cpu::ScoreLayer ly;
  ly.q = q.data_ptr();
  ly.k = k.data_ptr();
  ly.dtype = to_dtype(k);
  ly.Hq = q.size(1);
  ly.Hkv = k.size(1);
  ly.D = k.size(3);
  ly.q_sb = q.stride(0);
  ly.q_sh = q.stride(1);
  ly.q_sn = q.stride(2);
  ly.q_sd = q.stride(3);
  ly.q_rows_are_slots = rows_are_slots;
  ly.k_sb = k.stride(0);
  ly.k_sh = k.stride(1);
  ly.k_sn = k.stride(2);
  ly.k_sd = k.stride(3);
  ly.scores = scores;
  ly.stats = stats;
  return ly;
}

void check_finite_scores(const Tensor& scores_c, const Tensor& mod_c, const char* op,
                         const char* what);

// Whether every element of x is finite, without a temporary of x's size. A [A, R, D] x of unit
// last stride (the query rows of one sample, in any head / row layout, such as HF's transposed
// query states) goes to the kernel table's all_finite: one read. Any other x: the max and min
// of x propagate a NaN and show an inf (amax / amin reduce any strides in place; at::aminmax and
// max() / min() copy a non-contiguous x, and x.sum(at::kFloat) copies a bf16 / fp16 x to fp32:
// 15 MiB per layer at qwen2.5-vl-7b, the whole peak memory of bf16 score_text_vision).
// at::isfinite(x).all() builds temporaries of x's size and costs 30x more.
bool all_finite(const Tensor& x) {
  if (x.numel() == 0) return true;
  const auto st = x.scalar_type();
  if (x.dim() == 3 && x.stride(2) == 1 &&
      (st == at::kFloat || st == at::kHalf || st == at::kBFloat16))
    return cpu::kernels().all_finite(x.data_ptr(), to_dtype(x), x.size(0), x.size(1), x.size(2),
                                     x.stride(0), x.stride(1));
  return at::isfinite(at::amax(x)).item<bool>() && at::isfinite(at::amin(x)).item<bool>();
}

// The valid guidance rows of q [B, Hq, T, D] (rows t < n_rows of sample b) must be finite: a NaN
// row would otherwise drop out of the softmax sums silently and finite statistics come back.
void check_finite_rows(const Tensor& q, const std::vector<SampleInfo>& info, const char* op,
                       const char* name, int64_t layer = -1) {
  for (size_t b = 0; b < info.size(); ++b) {
    if (info[b].n_rows == 0) continue;
    const Tensor rows = q.select(0, static_cast<int64_t>(b)).narrow(1, 0, info[b].n_rows);
    TGVKV_CHECK(all_finite(rows), op, "'", name,
                layer >= 0 ? "[" + std::to_string(layer) + "]" : std::string(),
                "' has NaN or inf in a guidance row of sample ", b, " (rows t < ", info[b].n_rows,
                " are used); the scores would not be defined");
  }
}

// text_score="all_queries": every non-pad row of the full query states q [B, Hq, N, D] is used.
void check_finite_real_rows(const Tensor& q, const Tensor& mod_c, const char* op,
                            const char* name, int64_t layer = -1) {
  const int64_t B = mod_c.size(0), N = mod_c.size(1);
  const int8_t* mod = mod_c.data_ptr<int8_t>();
  for (int64_t b = 0; b < B; ++b) {
    if (all_finite(q.select(0, b))) continue;
    const Tensor fin = at::isfinite(q.select(0, b)).all(2).all(0).contiguous();  // [N]
    const bool* f = fin.data_ptr<bool>();
    for (int64_t j = 0; j < N; ++j)
      TGVKV_CHECK(f[j] || mod[b * N + j] == kPad, op, "'", name,
                  layer >= 0 ? "[" + std::to_string(layer) + "]" : std::string(),
                  "' has NaN or inf in the query row of slot ", j, " of sample ", b,
                  " (text_score=\"all_queries\" uses every non-pad row); the scores would not "
                  "be defined");
  }
}

// Scores [L, B, N] and stats [L, B, 2] of L layers (q/k lists already checked): the queries'
// finiteness, the scoring pass, and for text_score="all_queries" (all) the text-mass pass that
// adds the other rows' mass to the guidance rows' text scores (so it must run after the scoring
// pass). qs[l] as q of make_layer; errors name them q_name[l] (or q_name when named_layers is
// false).
void score_all(TensorList qs, bool all, TensorList ks, const Tensor& q_pos_c, const Tensor& mod_c,
               const std::vector<SampleInfo>& info, double scale, bool want_mi, Tensor& scores,
               Tensor& stats, const char* op, const char* q_name, bool named_layers) {
  const int64_t L = static_cast<int64_t>(ks.size());
  const int64_t B = mod_c.size(0), N = mod_c.size(1), T = q_pos_c.size(1);
  // all_queries: every non-pad row is checked (the guidance rows among them: q_pos never points
  // at a pad slot) and the guidance rows are read in place
  for (int64_t l = 0; l < L; ++l) {
    const int64_t layer = named_layers ? l : -1;
    if (all)
      check_finite_real_rows(qs[l], mod_c, op, q_name, layer);
    else
      check_finite_rows(qs[l], info, op, q_name, layer);
  }
  if (N == 0) {  // no slot to score; the kernel would memset 0 bytes at a null pointer (UBSan)
    stats.zero_();
    return;
  }
  std::vector<int64_t> n_rows(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) n_rows[b] = info[b].n_rows;
  std::vector<cpu::ScoreLayer> layers;
  layers.reserve(static_cast<size_t>(L));
  float* sc = scores.data_ptr<float>();
  float* st = stats.data_ptr<float>();
  for (int64_t l = 0; l < L; ++l)
    layers.push_back(make_layer(qs[l], all, ks[l], sc + l * B * N, st + l * B * 2));
  cpu::ScoreBatch sb;
  sb.q_pos = q_pos_c.data_ptr<int64_t>();
  sb.mod = mod_c.data_ptr<int8_t>();
  sb.n_rows = n_rows.data();
  sb.B = B;
  sb.T = T;
  sb.N = N;
  sb.scale = static_cast<float>(scale);
  sb.want_mi = want_mi;
  cpu::kernels().score_layers(layers.data(), L, sb);
  // text_score="all_queries": the text slots now hold the mass the guidance rows give them; the
  // text-mass pass adds the mass of every other non-pad row of the full query states
  if (all) cpu::kernels().text_column_mass(layers.data(), L, sb);
}

std::tuple<Tensor, Tensor> score_text_vision_cpu(const Tensor& q, const Tensor& k,
                                                 const Tensor& q_pos, const Tensor& modality,
                                                 double scale, c10::string_view text_score) {
  const char* op = "score_text_vision";
  check_cpu(modality, op, "modality");
  check_cpu(k, op, "k");
  const op_args::ScoreArgs a =
      op_args::check_score_text_vision_args(q, k, q_pos, modality, scale, text_score, op);
  const bool all = a.text_mode == checks::kTextScoreAllQueries;
  const int64_t B = a.d.B, N = a.d.N;
  const Tensor q_pos_c = q_pos.contiguous(), mod_c = modality.contiguous();
  const auto info = analyze_samples(q_pos_c, mod_c, op);
  Tensor scores = at::empty({1, B, N}, k.options().dtype(at::kFloat));
  Tensor stats = at::empty({1, B, 2}, k.options().dtype(at::kFloat));
  score_all(TensorList(&q, 1), all, TensorList(&k, 1), q_pos_c, mod_c, info, scale,
            /*want_mi=*/true, scores, stats, op, "q", /*named_layers=*/false);
  check_finite_scores(scores, mod_c, op,
                      "the attention scores of 'q' against 'k' must be finite (NaN or inf in 'k', "
                      "or a scale that overflows the logits?)");
  return {scores.squeeze(0), stats.squeeze(0)};
}

// ------------------------------------------------------------------------------------------------
// layer_budgets
// ------------------------------------------------------------------------------------------------
void budgets_impl(const Tensor& stats_c, const std::vector<SampleInfo>& info, double keep_ratio,
                  int mode, bool redistribute, int64_t n_sink, Tensor& keep, Tensor& frac,
                  const char* op) {
  const int64_t L = stats_c.size(0), B = stats_c.size(1);
  const float* st = stats_c.data_ptr<float>();
  int64_t* kp = keep.data_ptr<int64_t>();
  double* fr = frac.data_ptr<double>();
  std::vector<double> work(static_cast<size_t>(2 * std::max<int64_t>(L, 1)));
  for (int64_t b = 0; b < B; ++b) {
    const SampleInfo& si = info[b];
    const int status = sample_layer_budgets(L, st + b * 2, B * 2, 1, si.n_real, n_sink,
                                            sample_evicts(si, n_sink), keep_ratio, mode,
                                            redistribute, work.data(), kp + b, B, fr + b, B);
    TGVKV_CHECK_VALUE(status == 0, op, "non-finite budget for sample ", b,
                " (the stats contain inf/nan values)");
  }
}

std::tuple<Tensor, Tensor> layer_budgets_cpu(const Tensor& stats, const Tensor& q_pos,
                                             const Tensor& modality, double keep_ratio,
                                             c10::string_view budget, bool redistribute,
                                             int64_t n_sink) {
  const char* op = "layer_budgets";
  check_cpu(modality, op, "modality");
  const op_args::BudgetArgs a =
      op_args::check_layer_budgets_args(stats, q_pos, modality, keep_ratio, budget, n_sink, op);
  const int mode = a.mode;
  const Tensor q_pos_c = q_pos.contiguous(), mod_c = modality.contiguous();
  const auto info = analyze_samples(q_pos_c, mod_c, op);
  const int64_t L = stats.size(0), B = stats.size(1);
  Tensor keep = at::empty({L, B}, modality.options().dtype(at::kLong));
  Tensor frac = at::empty({L, B}, modality.options().dtype(at::kDouble));
  budgets_impl(stats.contiguous(), info, keep_ratio, mode, redistribute, n_sink, keep, frac, op);
  return {keep, frac};
}

// ------------------------------------------------------------------------------------------------
// select_keep
// ------------------------------------------------------------------------------------------------
// `what` names the inputs the scores came from (the ops that compute them say which).
void check_finite_scores(const Tensor& scores_c, const Tensor& mod_c, const char* op,
                         const char* what) {
  const int64_t L = scores_c.size(0), B = scores_c.size(1), N = scores_c.size(2);
  const float* sc = scores_c.data_ptr<float>();
  const int8_t* mod = mod_c.data_ptr<int8_t>();
  for (int64_t l = 0; l < L; ++l)
    for (int64_t b = 0; b < B; ++b) {
      const float* s = sc + (l * B + b) * N;
      const int8_t* m = mod + b * N;
      for (int64_t j = 0; j < N; ++j)
        TGVKV_CHECK(m[j] == kPad || std::isfinite(s[j]), op, what, " at non-pad slots, got ",
                    s[j], " at [", l, ", ", b, ", ", j, "]");
    }
}

// keep_idx [L, B, N] and n_protected [L, B]; also returns the kept counts in n_kept [L, B].
void select_impl(const Tensor& scores_c, const Tensor& keep_c, const Tensor& mod_c,
                 const std::vector<SampleInfo>& info, int64_t n_sink, Tensor& keep_idx,
                 Tensor& n_prot, Tensor* n_kept) {
  const int64_t L = scores_c.size(0), B = scores_c.size(1), N = scores_c.size(2);
  const float* sc = scores_c.data_ptr<float>();
  const int64_t* kp = keep_c.data_ptr<int64_t>();
  const int8_t* mod = mod_c.data_ptr<int8_t>();
  int64_t* ki = keep_idx.data_ptr<int64_t>();
  int64_t* np = n_prot.data_ptr<int64_t>();
  int64_t* nk = n_kept ? n_kept->data_ptr<int64_t>() : nullptr;
  par_for()(0, L * B, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> keys(static_cast<size_t>(N));
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it % B;
      const int64_t cnt = cpu::select_keep_row(sc + it * N, mod + b * N, N, info[b], kp[it],
                                               n_sink, ki + it * N, keys.data(), np + it);
      if (nk) nk[it] = cnt;
    }
  });
}

std::tuple<Tensor, Tensor> select_keep_cpu(const Tensor& scores, const Tensor& keep,
                                           const Tensor& q_pos, const Tensor& modality,
                                           int64_t n_sink) {
  const char* op = "select_keep";
  check_cpu(modality, op, "modality");
  const op_args::SelectArgs a =
      op_args::check_select_keep_args(scores, keep, q_pos, modality, n_sink, op);
  const int64_t B = a.d.B, N = a.d.N;
  const Tensor q_pos_c = q_pos.contiguous(), mod_c = modality.contiguous();
  const auto info = analyze_samples(q_pos_c, mod_c, op);
  const Tensor scores_c = scores.contiguous();
  check_finite_scores(scores_c, mod_c, op, "'scores' must be finite");
  const int64_t L = scores.size(0);
  Tensor keep_idx = at::empty({L, B, N}, modality.options().dtype(at::kLong));
  Tensor n_prot = at::empty({L, B}, modality.options().dtype(at::kLong));
  select_impl(scores_c, keep.contiguous(), mod_c, info, n_sink, keep_idx, n_prot, nullptr);
  return {keep_idx, n_prot};
}

// ------------------------------------------------------------------------------------------------
// compact_
// ------------------------------------------------------------------------------------------------
// Validates keep_idx rows (values in [-1, Nslots), valid entries strictly increasing) and
// returns their kept counts.
std::vector<int64_t> check_keep_idx(const Tensor& idx_c, int64_t Nslots, const char* op) {
  const int64_t B = idx_c.size(0), M = idx_c.size(1);
  const int64_t* p = idx_c.data_ptr<int64_t>();
  std::vector<int64_t> cnt(static_cast<size_t>(B), 0);
  for (int64_t b = 0; b < B; ++b) {
    int64_t prev = -1;
    for (int64_t i = 0; i < M; ++i) {
      const int64_t x = p[b * M + i];
      if (x == -1) continue;
      TGVKV_CHECK(x >= 0 && x < Nslots, op, "'keep_idx' values must be -1 or in [0, ", Nslots,
                  "), got ", x, " at [", b, ", ", i, "]");
      TGVKV_CHECK(x > prev, op, "'keep_idx' kept slots must be strictly increasing, got ", x,
                  " after ", prev, " at [", b, ", ", i, "]");
      prev = x;
      ++cnt[b];
    }
  }
  return cnt;
}

// Compacts one layer's k and v with keep_idx rows [B, M] (validated).
void compact_layer(const Tensor& k, const Tensor& v, const int64_t* idx, int64_t M) {
  const int64_t B = k.size(0), H = k.size(1);
  if (B == 0 || H == 0 || M == 0) return;
  char* kb = static_cast<char*>(k.data_ptr());
  char* vb = static_cast<char*>(v.data_ptr());
  const int64_t ke = k.element_size(), ve = v.element_size();
  par_for()(0, B * H * 2, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t which = it % 2, bh = it / 2, b = bh / H, h = bh % H;
      const Tensor& t = which == 0 ? k : v;
      char* base = (which == 0 ? kb : vb) + (b * t.stride(0) + h * t.stride(1)) * (which == 0 ? ke : ve);
      cpu::compact_rows(base, t.stride(2), t.stride(3), t.size(3), which == 0 ? ke : ve,
                        idx + b * M, M);
    }
  });
}

Tensor compact_cpu(const Tensor& k, const Tensor& v, const Tensor& keep_idx) {
  const char* op = "compact_";
  check_cpu(k, op, "k");
  op_args::check_compact_args(k, v, keep_idx, op);
  const Tensor idx_c = keep_idx.contiguous();
  const auto cnt = check_keep_idx(idx_c, k.size(2), op);
  compact_layer(k, v, idx_c.data_ptr<int64_t>(), idx_c.size(1));
  Tensor n_kept = at::empty({k.size(0)}, keep_idx.options());
  std::copy(cnt.begin(), cnt.end(), n_kept.data_ptr<int64_t>());
  return n_kept;
}

// ------------------------------------------------------------------------------------------------
// evict_from_scores / evict
// ------------------------------------------------------------------------------------------------
Tensor4 evict_tail(TensorList k_cache, TensorList v_cache, const Tensor& scores_c,
                   const Tensor& stats_c, const Tensor& mod_c, const std::vector<SampleInfo>& info,
                   double keep_ratio, int mode, bool redistribute, int64_t n_sink, const char* op) {
  const int64_t L = scores_c.size(0), B = scores_c.size(1), N = scores_c.size(2);
  const auto opts = mod_c.options();
  Tensor keep = at::empty({L, B}, opts.dtype(at::kLong));
  Tensor frac = at::empty({L, B}, opts.dtype(at::kDouble));
  budgets_impl(stats_c, info, keep_ratio, mode, redistribute, n_sink, keep, frac, op);
  Tensor keep_idx = at::empty({L, B, N}, opts.dtype(at::kLong));
  Tensor n_prot = at::empty({L, B}, opts.dtype(at::kLong));
  Tensor n_kept = at::empty({L, B}, opts.dtype(at::kLong));
  select_impl(scores_c, keep, mod_c, info, n_sink, keep_idx, n_prot, &n_kept);
  if (!k_cache.empty()) {
    const int64_t* ki = keep_idx.data_ptr<int64_t>();
    // one parallel loop over (layer, sample, head, k|v) rows of work
    std::vector<int64_t> off(k_cache.size() + 1, 0);
    for (size_t l = 0; l < k_cache.size(); ++l)
      off[l + 1] = off[l] + B * k_cache[l].size(1) * 2;
    par_for()(0, off.back(), [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        const int64_t l = std::upper_bound(off.begin(), off.end(), it) - off.begin() - 1;
        const int64_t r = it - off[l];
        const Tensor& k = k_cache[l];
        const int64_t H = k.size(1);
        const int64_t which = r % 2, bh = r / 2, b = bh / H, h = bh % H;
        const Tensor& t = which == 0 ? k : v_cache[l];
        const int64_t e = t.element_size();
        char* base = static_cast<char*>(t.data_ptr()) + (b * t.stride(0) + h * t.stride(1)) * e;
        const int64_t* idx = ki + (l * B + b) * N;
        cpu::compact_rows(base, t.stride(2), t.stride(3), t.size(3), e, idx, n_kept.data_ptr<int64_t>()[l * B + b]);
      }
    });
  }
  return {keep_idx, n_kept, n_prot, frac};
}

Tensor4 evict_from_scores_cpu(TensorList k_cache, TensorList v_cache, const Tensor& scores,
                              const Tensor& stats, const Tensor& q_pos, const Tensor& modality,
                              double keep_ratio, c10::string_view budget, bool redistribute,
                              int64_t n_sink) {
  const char* op = "evict_from_scores";
  check_cpu(modality, op, "modality");
  check_cpu(k_cache, op, "k_cache[l]");
  const op_args::BudgetArgs a = op_args::check_evict_from_scores_args(
      k_cache, v_cache, scores, stats, q_pos, modality, keep_ratio, budget, n_sink, op);
  const int mode = a.mode;
  const Tensor q_pos_c = q_pos.contiguous(), mod_c = modality.contiguous();
  const auto info = analyze_samples(q_pos_c, mod_c, op);
  const Tensor scores_c = scores.contiguous();
  check_finite_scores(scores_c, mod_c, op, "'scores' must be finite");
  return evict_tail(k_cache, v_cache, scores_c, stats.contiguous(), mod_c, info, keep_ratio, mode,
                    redistribute, n_sink, op);
}

Tensor4 evict_cpu(TensorList k_cache, TensorList v_cache, TensorList queries, const Tensor& q_pos,
                  const Tensor& modality, double scale, double keep_ratio,
                  c10::string_view budget, bool redistribute, int64_t n_sink,
                  c10::string_view text_score) {
  const char* op = "evict";
  check_cpu(modality, op, "modality");
  check_cpu(k_cache, op, "k_cache[l]");
  const op_args::BudgetArgs a = op_args::check_evict_args(
      k_cache, v_cache, queries, q_pos, modality, scale, keep_ratio, budget, n_sink, text_score,
      op);
  const bool all = a.text_mode == checks::kTextScoreAllQueries;
  const int64_t B = a.d.B, N = a.d.N, L = a.L;
  const int mode = a.mode;
  const Tensor q_pos_c = q_pos.contiguous(), mod_c = modality.contiguous();
  const auto info = analyze_samples(q_pos_c, mod_c, op);
  Tensor scores = at::empty({L, B, N}, modality.options().dtype(at::kFloat));
  Tensor stats = at::empty({L, B, 2}, modality.options().dtype(at::kFloat));
  // Scoring is skipped entirely when nothing can be evicted (keep_ratio == 1 or no sample evicts).
  bool any = keep_ratio < 1.0;
  if (any) {
    any = false;
    for (const auto& si : info) any = any || sample_evicts(si, n_sink);
  }
  if (any) {
    score_all(queries, all, k_cache, q_pos_c, mod_c, info, scale, /*want_mi=*/mode == kBudgetMI,
              scores, stats, op, "queries", /*named_layers=*/true);
    check_finite_scores(scores, mod_c, op,
                        "the attention scores of 'queries' against 'k_cache' must be finite "
                        "(NaN or inf in 'k_cache'?)");
  } else {
    scores.zero_();
    stats.zero_();
  }
  return evict_tail(k_cache, v_cache, scores, stats, mod_c, info, keep_ratio, mode, redistribute,
                    n_sink, op);
}

// ------------------------------------------------------------------------------------------------
// decode_evict_layers_ / decode_evict_
// ------------------------------------------------------------------------------------------------
// One layer of a decode step: k/v [B, Hkv, S, D(v)], pos [B, S], q [B, Hq, D] (contiguous).
struct DecodeLayer {
  const Tensor* k;
  const Tensor* v;
  const Tensor* pos;
  Tensor q;
};

// Element (l, b) of an [L, B] tensor through its strides (length is mutated in place).
template <typename T>
T& at2(const Tensor& t, int64_t l, int64_t b) {
  return t.data_ptr<T>()[l * t.stride(0) + b * t.stride(1)];
}

// SPEC §4 for every (layer, sample): evicted [L, B] (the evicted pos or -1). `names` are the
// argument names of the messages (k_cache[l] / length of the layers op, k / length of the
// per-layer one). One parallel region over the active (layer, sample) pairs; each pair computes
// its g-head softmaxes KV head by KV head (every key row read once), reduces them in head order,
// picks the victim and moves the last live slot into its place (O(Hkv·D) bytes).
Tensor decode_evict_impl(const std::vector<DecodeLayer>& layers, const Tensor& length,
                         const Tensor& n_seen, const Tensor& keep_fraction,
                         const Tensor& n_protected, double scale, int64_t n_sink, int64_t B,
                         bool single, const char* op) {
  const int64_t L = static_cast<int64_t>(layers.size());
  op_args::check_decode_evict_values(n_seen, single ? n_protected.squeeze(0) : n_protected, op);
  // active (l, b) pairs and their live lengths (serial: cheap, and it raises on bad lengths)
  std::vector<int64_t> items, lens(static_cast<size_t>(L * B), 0);
  int64_t work_max = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t S = layers[l].k->size(2);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = at2<int64_t>(length, l, b);
      if (single) {
        TGVKV_CHECK(n >= 0 && n <= S, op, "'length' values must be in [0, S = ", S, "], got ", n,
                    " at [", b, "]");
      } else {
        TGVKV_CHECK(n >= 0 && n <= S, op, "'length' values must be in [0, S = ", S,
                    "] (S of k_cache[", l, "]), got ", n, " at [", l, ", ", b, "]");
      }
      lens[l * B + b] = n;
      const double f = at2<double>(keep_fraction, l, b);
      if (f >= 1.0) continue;
      bool ok = true;
      const int64_t forget =
          decode_forget(n, n_seen.data_ptr<int64_t>()[b * n_seen.stride(0)], f, &ok);
      if (single) {
        TGVKV_CHECK(ok, op, "non-finite forget count for sample ", b, " (keep_fraction = ", f, ")");
      } else {
        TGVKV_CHECK(ok, op, "non-finite forget count for layer ", l, ", sample ", b,
                    " (keep_fraction = ", f, ")");
      }
      if (forget <= 0) continue;
      if (!decode_has_candidates(n, at2<int64_t>(n_protected, l, b), n_sink)) continue;
      items.push_back(l * B + b);
      work_max = std::max(work_max, layers[l].q.size(1) * n + layers[l].q.size(1) * 2 *
                                        layers[l].k->size(3) + n + 128);
    }
  }
  Tensor evicted = at::full({L, B}, -1, length.options());
  if (items.empty()) return evicted;
  int64_t* ev = evicted.data_ptr<int64_t>();
  const cpu::Kernels& kern = cpu::kernels();
  const float sc = static_cast<float>(scale);
  // Grain: (layer, sample) pairs per task so that a task holds >= kDecodeGrainMacs multiply-adds
  // of the logits: a decode step of a heavily evicted cache (tens of slots per layer) is a few
  // microseconds of work, less than waking the thread pool costs (and on a loaded machine a
  // parallel region waits for a descheduled thread for milliseconds).
  constexpr int64_t kDecodeGrainMacs = int64_t{1} << 20;
  int64_t macs = 0;
  for (const int64_t it : items)
    macs += layers[it / B].q.size(1) * layers[it / B].k->size(3) * lens[it];
  const int64_t per_item = std::max<int64_t>(1, macs / static_cast<int64_t>(items.size()));
  const int64_t grain = std::max<int64_t>(1, kDecodeGrainMacs / per_item);
  // Phase 1 (parallel): each pair's victim slot, nothing written yet. NaN/inf in q or in a live
  // key makes the sample's attention NaN (no victim would be defined): such a pair is recorded and
  // the op raises before anything is written.
  const int64_t n_items = static_cast<int64_t>(items.size());
  std::vector<int64_t> victim(static_cast<size_t>(n_items), -1);
  std::atomic<int64_t> first_bad{n_items};
  at::parallel_for(0, n_items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(static_cast<size_t>(work_max));
    std::vector<int64_t> tmp;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t l = items[it] / B, b = items[it] % B;
      const DecodeLayer& ly = layers[l];
      const Tensor &k = *ly.k, &v = *ly.v, &pos = *ly.pos;
      const int64_t Hkv = k.size(1), D = k.size(3), Hq = ly.q.size(1), g = Hq / Hkv;
      const int64_t nb = lens[l * B + b];
      const cpu::DType dt = to_dtype(k);
      const int64_t es = k.element_size();
      float* probs = buf.data();            // [Hq, nb]
      float* att = probs + Hq * nb;         // [nb]
      float* scratch = att + nb;            // (g + 1) * D + 64
      for (int64_t hk = 0; hk < Hkv; ++hk) {
        const char* kbh =
            static_cast<const char*>(k.data_ptr()) + (b * k.stride(0) + hk * k.stride(1)) * es;
        const char* qh = static_cast<const char*>(ly.q.data_ptr()) + (b * Hq + hk * g) * D * es;
        kern.decode_probs(qh, kbh, dt, k.stride(2), k.stride(3), nb, D, g, sc, scratch,
                          probs + hk * g * nb, nb);
      }
      bool finite = true;
      for (int64_t i = 0; i < Hq * nb && finite; ++i) finite = std::isfinite(probs[i]);
      if (!finite) {
        int64_t cur = first_bad.load();
        while (it < cur && !first_bad.compare_exchange_weak(cur, it)) {
        }
        continue;
      }
      for (int64_t s = 0; s < nb; ++s) att[s] = 0.0f;
      for (int64_t hq = 0; hq < Hq; ++hq) {
        const float* pr = probs + hq * nb;
        for (int64_t s = 0; s < nb; ++s) att[s] += pr[s];
      }
      const float hqf = static_cast<float>(Hq);
      for (int64_t s = 0; s < nb; ++s) att[s] = att[s] / hqf;
      // protected: the n_protected live entries of largest pos (threshold = n_prot-th largest)
      int64_t* pb = pos.data_ptr<int64_t>() + b * pos.stride(0);
      const int64_t ps = pos.stride(1);
      const int64_t np = at2<int64_t>(n_protected, l, b);
      int64_t thr = std::numeric_limits<int64_t>::max();
      if (np > 0) {
        tmp.resize(static_cast<size_t>(nb));
        for (int64_t s = 0; s < nb; ++s) tmp[s] = pb[s * ps];
        std::nth_element(tmp.begin(), tmp.begin() + (np - 1), tmp.begin() + nb,
                         std::greater<int64_t>());
        thr = tmp[np - 1];
      }
      int64_t best = -1;
      for (int64_t s = n_sink; s < nb; ++s) {
        const int64_t p = pb[s * ps];
        if (np > 0 && p >= thr) continue;
        if (best < 0 || att[s] < att[best] || (att[s] == att[best] && p < pb[best * ps])) best = s;
      }
      victim[it] = best;
    }
  });
  if (first_bad.load() < n_items) {
    const int64_t l = items[first_bad.load()] / B, b = items[first_bad.load()] % B;
    const std::string where = single ? "sample " + std::to_string(b)
                                     : "layer " + std::to_string(l) + ", sample " + std::to_string(b);
    TGVKV_CHECK(false, op, "the attention of '", single ? "q" : "queries", "' against '",
                single ? "k" : "k_cache", "' must be finite (NaN or inf in the query or in a live "
                "slot of the keys, or a scale that overflows the logits?) for ", where);
  }
  // Phase 2 (parallel): move each victim's slot to the last live one.
  at::parallel_for(0, n_items, std::max<int64_t>(grain, 16), [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t best = victim[it];
      if (best < 0) continue;
      const int64_t l = items[it] / B, b = items[it] % B;
      const DecodeLayer& ly = layers[l];
      const Tensor &k = *ly.k, &v = *ly.v, &pos = *ly.pos;
      const int64_t Hkv = k.size(1);
      const int64_t nb = lens[l * B + b];
      int64_t* pb = pos.data_ptr<int64_t>() + b * pos.stride(0);
      const int64_t ps = pos.stride(1);
      ev[l * B + b] = pb[best * ps];
      const int64_t last = nb - 1;
      if (best != last) {
        for (int which = 0; which < 2; ++which) {
          const Tensor& t = which == 0 ? k : v;
          const int64_t e = t.element_size();
          char* base = static_cast<char*>(t.data_ptr());
          for (int64_t h = 0; h < Hkv; ++h) {
            char* bh = base + (b * t.stride(0) + h * t.stride(1)) * e;
            char* dst = bh + best * t.stride(2) * e;
            const char* src = bh + last * t.stride(2) * e;
            const int64_t Dt = t.size(3), sd = t.stride(3);
            if (sd == 1) {
              std::memcpy(dst, src, static_cast<size_t>(Dt * e));
            } else {
              for (int64_t d = 0; d < Dt; ++d)
                std::memcpy(dst + d * sd * e, src + d * sd * e, static_cast<size_t>(e));
            }
          }
        }
        pb[best * ps] = pb[last * ps];
      }
      at2<int64_t>(length, l, b) = nb - 1;
    }
  });
  return evicted;
}

Tensor decode_evict_layers_cpu(TensorList k_cache, TensorList v_cache, TensorList pos,
                               const Tensor& length, TensorList queries, const Tensor& n_seen,
                               const Tensor& keep_fraction, const Tensor& n_protected,
                               double scale, int64_t n_sink) {
  const char* op = "decode_evict_layers_";
  check_cpu(length, op, "length");
  check_cpu(k_cache, op, "k_cache[l]");
  const op_args::DecodeLayersArgs a = op_args::check_decode_evict_layers_args(
      k_cache, v_cache, pos, length, queries, n_seen, keep_fraction, n_protected, scale, n_sink,
      op);
  std::vector<DecodeLayer> layers;
  layers.reserve(static_cast<size_t>(a.L));
  for (int64_t l = 0; l < a.L; ++l)
    layers.push_back(DecodeLayer{&k_cache[l], &v_cache[l], &pos[l], queries[l].contiguous()});
  return decode_evict_impl(layers, length, n_seen, keep_fraction, n_protected, scale, n_sink, a.B,
                           /*single=*/false, op);
}

// The per-layer op: the one-layer case of decode_evict_layers_ ([B] vectors seen as [1, B]).
Tensor decode_evict_cpu(const Tensor& k, const Tensor& v, const Tensor& pos, const Tensor& length,
                        const Tensor& q, const Tensor& n_seen, const Tensor& keep_fraction,
                        const Tensor& n_protected, double scale, int64_t n_sink) {
  const char* op = "decode_evict_";
  check_cpu(k, op, "k");
  const op_args::DecodeArgs a = op_args::check_decode_evict_args(
      k, v, pos, length, q, n_seen, keep_fraction, n_protected, scale, n_sink, op);
  std::vector<DecodeLayer> layers{DecodeLayer{&k, &v, &pos, q.contiguous()}};
  return decode_evict_impl(layers, length.unsqueeze(0), n_seen, keep_fraction.unsqueeze(0),
                           n_protected.unsqueeze(0), scale, n_sink, a.B, /*single=*/true, op)
      .squeeze(0);
}

// ------------------------------------------------------------------------------------------------
// decode_append_
// ------------------------------------------------------------------------------------------------
// Copy row [b, h, 0, :] of src into row [b, h, slot, :] of dst (same dtype, any strides).
void copy_row(const Tensor& src, const Tensor& dst, int64_t b, int64_t h, int64_t slot) {
  const int64_t e = dst.element_size(), n = dst.size(3);
  const char* s = static_cast<const char*>(src.data_ptr()) + (b * src.stride(0) + h * src.stride(1)) * e;
  char* d = static_cast<char*>(dst.data_ptr()) +
            (b * dst.stride(0) + h * dst.stride(1) + slot * dst.stride(2)) * e;
  const int64_t ss = src.stride(3), ds = dst.stride(3);
  if (ss == 1 && ds == 1) {
    std::memcpy(d, s, static_cast<size_t>(n * e));
  } else {
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(d + i * ds * e, s + i * ss * e, static_cast<size_t>(e));
  }
}

void decode_append_cpu(const Tensor& k, const Tensor& v, const Tensor& pos, const Tensor& length,
                       const Tensor& mask, const Tensor& k_new, const Tensor& v_new,
                       int64_t position) {
  const char* op = "decode_append_";
  check_cpu(k, op, "k");
  const op_args::AppendArgs a = op_args::check_decode_append_args(k, v, pos, length, mask, k_new,
                                                                  v_new, position, op);
  int64_t* len = length.data_ptr<int64_t>();
  const int64_t ls = length.stride(0);
  // every sample needs a free slot: checked before anything is written
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t n = len[b * ls];
    TGVKV_CHECK(n >= 0 && n < a.S, op, "'length' values must be in [0, S - 1 = ", a.S - 1,
                "] (a free slot for the new token: grow k / v first when the cache is full), got ",
                n, " at [", b, "]");
  }
  int64_t* pb = pos.data_ptr<int64_t>();
  bool* mb = mask.data_ptr<bool>();
  const int64_t ms0 = mask.stride(0), ms1 = mask.stride(1);
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t n = len[b * ls];
    for (int64_t h = 0; h < a.Hkv; ++h) {
      copy_row(k_new, k, b, h, n);
      copy_row(v_new, v, b, h, n);
    }
    pb[b * pos.stride(0) + n * pos.stride(1)] = position;
    len[b * ls] = n + 1;
    bool* mrow = mb + b * ms0;
    for (int64_t s = 0; s < a.M; ++s) mrow[s * ms1] = s <= n;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(tgvkv, CPU, m) {
  m.impl("score_text_vision", &score_text_vision_cpu);
  m.impl("layer_budgets", &layer_budgets_cpu);
  m.impl("select_keep", &select_keep_cpu);
  m.impl("compact_", &compact_cpu);
  m.impl("evict_from_scores", &evict_from_scores_cpu);
  m.impl("evict", &evict_cpu);
  m.impl("decode_evict_", &decode_evict_cpu);
  m.impl("decode_evict_layers_", &decode_evict_layers_cpu);
  m.impl("decode_append_", &decode_append_cpu);
}

}  // namespace tgvkv
