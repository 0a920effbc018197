#!/usr/bin/env bash
# Compile-only check of every CUDA source (csrc/cuda/*.cu) with nvcc, for sm_90a.
#
# Works on a machine without a GPU and with a CPU-only torch wheel: only the torch headers are
# needed (-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE stands in for the generated c10 CUDA config header
# that the CPU wheel lacks). Nothing is linked; objects go to a temporary directory.
#
# Environment:
#   PYTHON            python whose torch provides the headers (default: python on PATH)
#   NVCC              nvcc to use (default: $CUDA_HOME/bin/nvcc, else nvcc on PATH)
#   TGVKV_CUDA_STD    C++ standard (default c++17; the torch 2.13 headers warn about two C++20
#                     bit-field initialisers under c++17, those two warnings are silenced)
#   TGVKV_CHECK_ARCH  target flags (default -gencode=arch=compute_90a,code=sm_90a)
#   VERBOSE=1         also print ptxas resource usage (registers, shared memory, spills)
# Exit status: non-zero if any file fails to compile. Prints the time of every file.
set -u
cd "$(dirname "$0")/.." || exit 2

PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ -n "${NVCC:-}" ]; then
  :
elif [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  NVCC="$CUDA_HOME/bin/nvcc"
else
  NVCC=nvcc
fi
command -v "$NVCC" >/dev/null 2>&1 || { echo "check_cuda_compile: nvcc not found" >&2; exit 2; }

INCS=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))") \
  || { echo "check_cuda_compile: cannot import torch with $PY" >&2; exit 2; }
STD="${TGVKV_CUDA_STD:-c++17}"
ARCH="${TGVKV_CHECK_ARCH:--gencode=arch=compute_90a,code=sm_90a}"
EXTRA=()
[ "${VERBOSE:-0}" = "1" ] && EXTRA+=(-Xptxas -v)

shopt -s nullglob
SOURCES=(csrc/cuda/*.cu)
if [ ${#SOURCES[@]} -eq 0 ]; then
  echo "check_cuda_compile: no csrc/cuda/*.cu sources" >&2
  exit 1
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
echo "nvcc: $("$NVCC" --version | tail -1)"
echo "torch headers: $("$PY" -c 'import torch; print(torch.__version__)'), -std=$STD, $ARCH"
fail=0
total_start=$(date +%s.%N)
for f in "${SOURCES[@]}"; do
  obj="$TMP/$(basename "$f").o"
  log="$TMP/$(basename "$f").log"
  start=$(date +%s.%N)
  # shellcheck disable=SC2086
  if "$NVCC" -c "$f" -o "$obj" -std="$STD" -O3 --expt-relaxed-constexpr $ARCH \
      -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DTGVKV_WITH_CUDA $INCS -Icsrc -Icsrc/include \
      -diag-suppress 3306 -Xcompiler -Wno-c++20-extensions ${EXTRA[@]+"${EXTRA[@]}"} >"$log" 2>&1; then
    status=ok
  else
    status=FAILED
    fail=1
  fi
  end=$(date +%s.%N)
  printf '%-34s %-6s %6.1f s\n' "$f" "$status" "$(awk -v a="$start" -v b="$end" 'BEGIN{print b-a}')"
  # failures: the whole log; successes: warnings in our sources, and ptxas usage when VERBOSE=1
  if [ "$status" = FAILED ]; then
    sed 's/^/    /' "$log"
  else
    grep -E '^csrc/.*(warning|error)' "$log" | sed 's/^/    /'
    [ "${VERBOSE:-0}" = "1" ] && grep -E 'Compiling entry|registers|spill' "$log" | sed 's/^/    /'
  fi
done
total_end=$(date +%s.%N)
printf 'total %.1f s: %s\n' "$(awk -v a="$total_start" -v b="$total_end" 'BEGIN{print b-a}')" \
  "$([ $fail -eq 0 ] && echo 'all CUDA sources compile' || echo 'FAILURES')"
exit $fail
