// Semantic emulation of the WMMA m16n16k16 API used by the tensor-core engine of score.cuh.
// A fragment holds the whole 16x16 tile; lane 0 of the warp does all the work (loads, products,
// the store) and the other lanes' fragments stay unused, so 32x redundant work is avoided. Code
// that reads or writes fragment elements directly (frag.x[i], num_elements) is therefore not
// supported: it does not compile here (no num_elements). The products of 16-bit inputs are exact
// in fp32; the accumulation order (k ascending, fma) is one valid order: the hardware's order is
// unspecified, so results agree with a GPU to rounding, not bit for bit.
#pragma once
#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"
#include "tgvkv/common.h"
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only m16n16k16 is emulated");
  float tile[16 * 16];
};
inline float emu_cvt(const __nv_bfloat16& v) { return tgvkv::bf16_bits_to_float(v.x); }
inline float emu_cvt(const __half& v) { return tgvkv::half_bits_to_float(v.x); }
inline bool emu_lane0() { return threadIdx.x % 32 == 0; }

template <typename T>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  if (!emu_lane0()) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.tile[r * 16 + c] = emu_cvt(p[r * ldm + c]);
}
template <typename T>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm) {
  if (!emu_lane0()) return;
  for (int k = 0; k < 16; ++k)  // element (k, n) at p[n * ldm + k]
    for (int n = 0; n < 16; ++n) f.tile[k * 16 + n] = emu_cvt(p[n * ldm + k]);
}
template <typename T>
inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, T v) {
  if (!emu_lane0()) return;
  for (auto& e : f.tile) e = float(v);
}
template <typename T>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, T, row_major>& a,
                     const fragment<matrix_b, 16, 16, 16, T, col_major>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  if (!emu_lane0()) return;
  float out[256];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float s = c.tile[m * 16 + n];
      for (int k = 0; k < 16; ++k) s = std::fma(a.tile[m * 16 + k], b.tile[k * 16 + n], s);
      out[m * 16 + n] = s;
    }
  std::memcpy(d.tile, out, sizeof(out));
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  if (emu_lane0()) {
    if (layout != mem_row_major) emu::fail("wmma store: only mem_row_major is emulated");
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) p[r * ldm + c] = f.tile[r * 16 + c];
  }
  __syncwarp();  // a warp-collective: all lanes return after the tile is in memory
}
}  // namespace wmma
}  // namespace nvcuda
