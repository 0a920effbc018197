#!/usr/bin/env bash
# Compile-only check of the C++ (CPU) sources for aarch64: the DEFAULT CPU capability there is
# at::vec's NEON code, and no ISA-specific code of ours may break that build. Uses Debian's cross
# compiler against this machine's torch headers (the headers are the same on every arch, apart
# from the few generated config headers, which guard their ISA-specific parts by arch macros).
#
#   bash tools/check_aarch64_compile.sh            (~1-2 min on 2 cores)
#   apt-get install -y g++-aarch64-linux-gnu       (the cross compiler; skipped, exit 0, without)
#
# Objects are compiled (-c) but not linked: no aarch64 libtorch is needed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CXX="${CXX_AARCH64:-aarch64-linux-gnu-g++}"
PY="${PYTHON:-python3}"
if ! command -v "$CXX" >/dev/null 2>&1; then
  echo "check_aarch64_compile: $CXX not found (apt-get install -y g++-aarch64-linux-gnu): skipped"
  exit 0
fi
read -r -a TORCH_INC < <("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join('-isystem ' + p for p in c.include_paths()))")
PY_INC="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
ABI="$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")"
OUT="$(mktemp -d "${TMPDIR:-/tmp}/tgvkv-aarch64.XXXXXX")"
trap 'rm -rf "$OUT"' EXIT

COMMON=(-std=c++17 -O1 -g0 -fPIC -fopenmp -ffp-contract=off -fvisibility=hidden
        "-D_GLIBCXX_USE_CXX11_ABI=$ABI" -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
        -I"$ROOT/csrc" -I"$ROOT/csrc/include" "${TORCH_INC[@]}" -isystem "$PY_INC")
# name|source|extra flags
JOBS=("cpu_kernels_DEFAULT|csrc/cpu/kernels/cpu_kernels.cpp|-DCPU_CAPABILITY=DEFAULT"
      "ops_cpu|csrc/cpu/ops_cpu.cpp|"
      "ops|csrc/ops.cpp|"
      "module|csrc/module.cpp|")
echo "check_aarch64_compile: $("$CXX" --version | head -1)"
pids=()
for j in "${JOBS[@]}"; do
  IFS='|' read -r name src extra <<<"$j"
  # shellcheck disable=SC2086
  ( "$CXX" "${COMMON[@]}" $extra -c "$ROOT/$src" -o "$OUT/$name.o" 2>"$OUT/$name.log" \
    && echo "  ok   $src" || { echo "  FAIL $src"; cat "$OUT/$name.log"; exit 1; } ) &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
if [[ $rc -ne 0 ]]; then echo "check_aarch64_compile: FAILED"; exit 1; fi
for o in "$OUT"/*.o; do echo "  $(basename "$o"): $(file -b "$o" | cut -d, -f1-2)"; done
echo "check_aarch64_compile: OK"
