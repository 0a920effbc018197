// Boundary checks shared by the CPU and CUDA glue of every tgvkv op.
//
// Torch-light on purpose (compiles under nvcc and keeps translation units small): only
// ATen/core/Tensor.h and c10's exception macros, no torch/extension.h. Every failure raises
// a RuntimeError (ValueError for bad scalar values) naming the op, the argument, what was
// expected and what was got, e.g.
//   tgvkv::score_text_vision: 'k' must have 4 dims [B, Hkv, N, D], got shape [2, 3, 4]
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <sstream>
#include <string>

namespace tgvkv {
namespace checks {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << "[";
  for (int64_t i = 0; i < t.dim(); ++i) os << (i ? ", " : "") << t.size(i);
  os << "]";
  return os.str();
}

// numpy-style dtype names ("int8", "float32") instead of c10's ("Char", "Float").
inline const char* dtype_name(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    default: return c10::toString(s);
  }
}

// Generic condition with the op name prefixed.
#define TGVKV_CHECK(cond, op, ...) TORCH_CHECK((cond), "tgvkv::", op, ": ", __VA_ARGS__)
#define TGVKV_CHECK_VALUE(cond, op, ...) \
  TORCH_CHECK_VALUE((cond), "tgvkv::", op, ": ", __VA_ARGS__)

inline void check_defined(const at::Tensor& t, const char* op, const char* name) {
  TGVKV_CHECK(t.defined(), op, "'", name, "' is an undefined tensor");
}

// t.dim() == dim; `layout` describes the expected shape, e.g. "[B, Hkv, N, D]".
inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name,
                      const char* layout) {
  check_defined(t, op, name);
  TGVKV_CHECK(t.dim() == dim, op, "'", name, "' must have ", dim, " dims ", layout,
              ", got shape ", shape_str(t));
}

// t.size(d) == expected; `what` names the size, e.g. "B (from q)".
inline void check_size(const at::Tensor& t, int64_t d, int64_t expected, const char* op,
                       const char* name, const char* what) {
  TGVKV_CHECK(t.size(d) == expected, op, "'", name, "' dim ", d, " (", what, ") must be ",
              expected, ", got shape ", shape_str(t));
}

inline void check_dtype(const at::Tensor& t, at::ScalarType expected, const char* op,
                        const char* name) {
  TGVKV_CHECK(t.scalar_type() == expected, op, "'", name, "' must be ", dtype_name(expected), ", got ",
              dtype_name(t.scalar_type()));
}

// float32, float16 or bfloat16 (the K/V/Q dispatch set).
inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TGVKV_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op, "'", name,
              "' must be float32, float16 or bfloat16, got ", dtype_name(s));
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op,
                             const char* name, const char* ref_name) {
  TGVKV_CHECK(t.scalar_type() == ref.scalar_type(), op, "'", name, "' must have the dtype of '",
              ref_name, "' (", dtype_name(ref.scalar_type()), "), got ",
              dtype_name(t.scalar_type()));
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name, const char* ref_name) {
  TGVKV_CHECK(t.device() == ref.device(), op, "'", name, "' must be on the device of '",
              ref_name, "' (", ref.device(), "), got ", t.device());
}

inline void check_device_type(const at::Tensor& t, c10::DeviceType type, const char* op,
                              const char* name) {
  TGVKV_CHECK(t.device().type() == type, op, "'", name, "' must be a ", c10::DeviceTypeName(type),
              " tensor, got ", t.device());
}

// Defined and of the backend's device type (kCPU in csrc/cpu, kCUDA in csrc/cuda).
inline void check_on(const at::Tensor& t, c10::DeviceType type, const char* op, const char* name) {
  check_defined(t, op, name);
  check_device_type(t, type, op, name);
}

// Slot indices are 32-bit inside the kernels.
inline void check_slot_count(int64_t N, const char* op) {
  TGVKV_CHECK(N < (int64_t{1} << 31), op, "at most 2^31 - 1 cache slots are supported, got N = ", N);
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TGVKV_CHECK(t.is_contiguous(), op, "'", name, "' must be contiguous");
}

// The small integer tensors of the API: q_pos [B, T] int64, modality [B, N] int8.
inline void check_q_pos_modality(const at::Tensor& q_pos, const at::Tensor& modality,
                                 const char* op) {
  check_dim(q_pos, 2, op, "q_pos", "[B, T]");
  check_dtype(q_pos, at::kLong, op, "q_pos");
  check_dim(modality, 2, op, "modality", "[B, N]");
  check_dtype(modality, at::kChar, op, "modality");
  check_size(q_pos, 0, modality.size(0), op, "q_pos", "B (from modality)");
  check_same_device(q_pos, modality, op, "q_pos", "modality");
}

// n_sink is compared with slot counts (32-bit in the kernels): bounded so no sum overflows.
constexpr int64_t kMaxNSink = (int64_t{1} << 31) - 1;
inline void check_n_sink(int64_t n_sink, const char* op) {
  TGVKV_CHECK_VALUE(n_sink >= 0 && n_sink <= kMaxNSink, op, "n_sink must be in [0, 2^31 - 1], got ",
                    n_sink);
}

// ---- tensors an op writes in place ---------------------------------------------------------
// As built-in in-place ops do, refuse a written tensor whose elements share memory (an expand()ed
// or stride-0 view) and two written tensors that share memory (K and V the same tensor, the same
// tensor in two layers): the result would depend on the order of the writes.
inline void check_no_internal_overlap(const at::Tensor& t, const char* op, const char* name,
                                      int64_t index = -1) {
  TGVKV_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, "'", name,
              index >= 0 ? "[" + std::to_string(index) + "]" : std::string(),
              "' is written in place but several of its elements share one memory location (an "
              "expand()ed or stride-0 view); pass a tensor with its own memory (e.g. .clone())");
}

// Byte range [lo, hi) a strided tensor can touch (strides >= 0; empty tensors touch nothing).
inline void byte_extent(const at::Tensor& t, uintptr_t* lo, uintptr_t* hi) {
  const uintptr_t base = reinterpret_cast<uintptr_t>(t.data_ptr());
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * std::abs(t.stride(d));
  *lo = base;
  *hi = base + static_cast<uintptr_t>((last + 1) * t.element_size());
}

inline bool may_share_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  switch (at::get_overlap_status(a, b)) {
    case at::MemOverlapStatus::Full:
    case at::MemOverlapStatus::Partial: return true;
    case at::MemOverlapStatus::No: return false;
    case at::MemOverlapStatus::TooHard: break;  // non-dense views: compare their byte ranges
  }
  if (!a.storage().is_alias_of(b.storage())) return false;
  uintptr_t alo, ahi, blo, bhi;
  byte_extent(a, &alo, &ahi);
  byte_extent(b, &blo, &bhi);
  return alo < bhi && blo < ahi;
}

inline void check_no_overlap(const at::Tensor& a, const at::Tensor& b, const char* op,
                             const std::string& aname, const std::string& bname) {
  TGVKV_CHECK(!may_share_memory(a, b), op, "'", aname, "' and '", bname, "' are both written in ",
              "place but share memory; pass separate tensors");
}

// Every value of a 1-D int64 CPU tensor t [B] (any stride) is >= lo: the data-dependent range
// check of the CPU ops (the CUDA ops do not read values back: a host sync).
// Every value of an int64 tensor of 1 or 2 dims ([B] or [L, B], any strides) is >= lo.
inline void check_values_at_least(const at::Tensor& t, int64_t lo, const char* op,
                                  const char* name, const char* why) {
  const int64_t* p = t.data_ptr<int64_t>();
  const bool two = t.dim() == 2;
  const int64_t R = two ? t.size(0) : 1, C = two ? t.size(1) : t.size(0);
  const int64_t sr = two ? t.stride(0) : 0, sc = two ? t.stride(1) : t.stride(0);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < C; ++i) {
      const int64_t x = p[r * sr + i * sc];
      TGVKV_CHECK_VALUE(x >= lo, op, "'", name, "' values must be >= ", lo, " (", why, "), got ",
                        x, " at [", two ? std::to_string(r) + ", " : std::string(), i, "]");
    }
}

inline void check_keep_ratio(double keep_ratio, const char* op) {
  TGVKV_CHECK_VALUE(keep_ratio > 0.0 && keep_ratio <= 1.0, op,
                    "keep_ratio must be in (0, 1], got ", keep_ratio);
}

// Returns kBudgetMass (0) or kBudgetMI (1).
inline int parse_budget(c10::string_view budget, const char* op) {
  if (budget == "mass") return 0;
  if (budget == "mi") return 1;
  TGVKV_CHECK_VALUE(false, op, "budget must be \"mass\" or \"mi\", got \"", std::string(budget.data(), budget.size()),
                    "\"");
  return -1;
}

// text_score of score_text_vision / evict (SPEC §1.3): which query rows the text scores sum over.
constexpr int kTextScoreGuidance = 0;    // the guidance rows only; q holds those rows [B, Hq, T, D]
constexpr int kTextScoreAllQueries = 1;  // all N rows (the released code); q is [B, Hq, N, D]

// Returns kTextScoreGuidance or kTextScoreAllQueries.
inline int parse_text_score(c10::string_view text_score, const char* op) {
  if (text_score == "guidance") return kTextScoreGuidance;
  if (text_score == "all_queries") return kTextScoreAllQueries;
  TGVKV_CHECK_VALUE(false, op, "text_score must be \"all_queries\" or \"guidance\", got \"",
                    std::string(text_score.data(), text_score.size()), "\"");
  return -1;
}

// The kernels compute in fp32: a finite double beyond FLT_MAX would become inf there (and the
// double -> float conversion of such a value is undefined behaviour).
inline void check_scale(double scale, const char* op) {
  TGVKV_CHECK_VALUE(std::isfinite(scale) && std::fabs(scale) <= 3.4028234663852886e38, op,
                    "scale must be finite and representable in float32 (|scale| <= 3.4028235e38), "
                    "got ", scale);
}

}  // namespace checks
}  // namespace tgvkv
