// The Python module tgvkv._C. Importing it runs the static op registrations of every
// translation unit (TORCH_LIBRARY in ops.cpp, TORCH_LIBRARY_IMPL in cpu/ and cuda/); the module
// itself only exposes build facts. The only file that needs pybind11.
#include <pybind11/pybind11.h>

#include "cpu/kernels.h"

#ifndef TGVKV_VERSION
#define TGVKV_VERSION "unknown"
#endif
#ifndef TGVKV_TORCH_VERSION
#define TGVKV_TORCH_VERSION "unknown"
#endif
#ifndef TGVKV_CUDA_ARCHS
#define TGVKV_CUDA_ARCHS ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "tgvkv compiled kernels (ops are registered under torch.ops.tgvkv)";
  m.def(
      "build_info",
      []() {
        py::dict d;
        d["version"] = TGVKV_VERSION;
        d["torch_version"] = TGVKV_TORCH_VERSION;
#ifdef TGVKV_WITH_CUDA
        d["cuda"] = true;
        d["cuda_archs"] = TGVKV_CUDA_ARCHS;
#else
        d["cuda"] = false;
        d["cuda_archs"] = "";
#endif
        // CPU kernels: the capabilities compiled in and the one in use (TGVKV_CPU_CAPABILITY, else
        // ATen's choice: ATEN_CPU_CAPABILITY / the CPU)
        d["cpu_capabilities"] = tgvkv::cpu::compiled_capabilities();
        d["cpu_capability"] = tgvkv::cpu::kernels().capability;
        // what multiplies bf16 q and keys now: "brgemm" (oneDNN's micro-kernel through ATen: AMX,
        // oneDNN enabled) or "fp32" (ATen's fp32 GEMM of the converted rows)
        d["cpu_bf16_gemm"] = tgvkv::cpu::bf16_gemm_in_use();
        return d;
      },
      "Build facts: version, torch version built against, whether CUDA kernels are present "
      "and for which archs, the CPU capabilities compiled in, the one in use and what "
      "multiplies bf16 inputs on the CPU.");
  m.def(
      "cpu_scratch_bytes",
      []() {
        py::dict d;
        d["held"] = tgvkv::cpu::scratch_bytes();
        d["peak"] = tgvkv::cpu::scratch_peak_bytes();
        return d;
      },
      "Bytes the CPU kernels hold in their own scratch buffers, which torch's allocator "
      "statistics do not see: {'held': now, 'peak': the most since reset_cpu_scratch_peak()}. "
      "Per-thread caches (partial head sums, logit tiles, converted or packed keys) are "
      "grow-only and kept between calls.");
  m.def("reset_cpu_scratch_peak", &tgvkv::cpu::reset_scratch_peak,
        "Sets cpu_scratch_bytes()['peak'] to the bytes held now.");
  m.def("release_cpu_scratch", &tgvkv::cpu::release_scratch,
        "Counts every CPU kernel scratch buffer as freed now ('held' and 'peak' restart from 0) "
        "and frees each at its owner thread's next use, so the next call's peak is all it needs, "
        "caches included (tgvkv-bench ops measures an op's memory so).");
}
