#!/usr/bin/env bash
# shellcheck disable=SC2317  # the step_* functions are called indirectly ("step_$STEP")
# The prepared GPU check of tgvkv: build, CUDA tests, compute-sanitizer, benchmarks, in one run
# that fits a short GPU lease (default budget 540 s), writing everything into OUT.
#
# Usage (from anywhere; it works in the repository root):
#   tools/gpu_check.sh [--dry-run] [--no-build] [--part all|build-test|bench] [--budget S] OUT
#
#   --part all          every step (default); build-test: env, build, tests, memcheck, racecheck;
#                       bench: env, build (only if the CUDA kernels are not importable yet),
#                       extra, ops x2, generate, generate-max-batch. Two parts can run back to back
#                       on one warm machine (the build of the first stays in the tree and in the
#                       python environment).
#   --budget S          wall-clock budget of this invocation in seconds (default 540). Every step
#                       runs under `timeout` with min(its own time box, what is left - 15 s);
#                       a step with under 30 s left is skipped and says so.
#   --dry-run           the same steps on a CPU machine: CPU-only build, the same pytest
#                       selection (its CUDA cases skip), the benchmarks on the tiny preset with
#                       tiny budgets, compute-sanitizer and --max-batch recorded as skipped.
#   --no-build          use the tgvkv that python already imports (skip the build step).
#
# Environment: PYTHON (default python3), GPU_CHECK_WORKERS (pytest-xdist workers for the tests
# when xdist is installed; default 8, 0 = no xdist), GPU_CHECK_SKIP (comma-separated step names to
# skip, e.g. generate-max-batch).
#
# OUT receives at most 8 files (the device tool brings back no more): summary.md, summary.json,
# junit.xml, bench.json (every benchmark report merged), three plots (ops-*.png, generate-*.png)
# and logs.tar.gz (every step's log, the raw JSON reports, env.json, steps.tsv). The summary is
# rewritten after every step, so a run cut short still leaves one; the last thing printed is
# summary.md. Exit status: 0 when no step failed or timed out, 1 otherwise, 2 on a usage error.
set -u
set -o pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
ROOT="$(cd "$(dirname "$SELF")/.." && pwd)"
cd "$ROOT" || exit 2

# ------------------------------------------------------------------------------------------
# Steps (run in a child bash under `timeout`: `gpu_check.sh __step NAME`)
# ------------------------------------------------------------------------------------------
note() { printf '%s\n' "$*" >>"$WORK/notes/$STEP.txt"; }

find_sanitizer() {
  local c d
  c=$(command -v compute-sanitizer 2>/dev/null) && { echo "$c"; return 0; }
  for d in "${CUDA_HOME:-}" "$(dirname "$(command -v nvcc 2>/dev/null || echo /nonexistent/x)")/.." \
           /usr/local/cuda /usr/local/cuda-13.0 /opt/cuda; do
    [ -n "$d" ] || continue
    for c in "$d/bin/compute-sanitizer" "$d/compute-sanitizer/compute-sanitizer"; do
      [ -x "$c" ] && { echo "$c"; return 0; }
    done
  done
  return 1
}

step_env() {
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  nproc: $(nproc)  mode: $MODE"
  echo "python: $PY -> $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw \
      --format=csv 2>&1
    nvidia-smi 2>&1 | head -20
  else
    echo "nvidia-smi: not found"
  fi
  command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -2 || echo "nvcc: not on PATH"
  echo "ninja: $(command -v ninja || echo 'not on PATH')"
  echo "compute-sanitizer: $(find_sanitizer || echo 'not found')"
  free -g 2>/dev/null | head -2
  df -h "$ROOT" 2>/dev/null | tail -1
  "$PY" - "$WORK/env.json" <<'EOF'
import importlib.metadata as md, json, os, platform, sys
import torch
info = {"python": platform.python_version(), "executable": sys.executable,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "nproc": os.cpu_count()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count)
pk = {}
for name in ("transformers", "numpy", "tqdm", "pillow", "matplotlib", "pytest", "hypothesis",
             "pytest-xdist", "pytest-timeout", "easy-vqa", "setuptools", "wheel", "pybind11",
             "ninja", "tgvkv"):
    try:
        pk[name] = md.version(name)
    except md.PackageNotFoundError:
        pk[name] = None
info["packages"] = pk
try:
    import tgvkv
    info["tgvkv_build_before"] = tgvkv.build_info()
except Exception as e:
    info["tgvkv_build_before"] = f"not importable: {type(e).__name__}: {e}"
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
EOF
}

step_build() {
  local pybin
  pybin="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")"
  export PATH="$pybin:$PATH"  # the ninja (and pip) of that python
  export CFLAGS="-g0"
  if [ "$MODE" = gpu ]; then
    if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
      export CUDA_HOME=/usr/local/cuda PATH="/usr/local/cuda/bin:$PATH"
    fi
    export TGVKV_CUDA=1 TGVKV_CUDA_ARCHS=90a TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
  else
    export TGVKV_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}"
    note "dry run: CPU-only build (TGVKV_CUDA=0) in place of TGVKV_CUDA=1 TGVKV_CUDA_ARCHS=90a"
  fi
  echo "TGVKV_CUDA=$TGVKV_CUDA TGVKV_CUDA_ARCHS=${TGVKV_CUDA_ARCHS:-} MAX_JOBS=$MAX_JOBS CFLAGS=$CFLAGS"
  echo "ninja: $(command -v ninja || echo 'NOT FOUND: torch falls back to a serial build')"
  local t0 t1
  t0=$(date +%s)
  # no internet there: no index, no dependencies, no isolated build env (torch is preinstalled)
  if "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . ; then
    t1=$(date +%s)
    note "pip install --no-build-isolation --no-deps --no-index -e . in $((t1 - t0)) s"
  else
    t1=$(date +%s)
    note "pip install -e . FAILED after $((t1 - t0)) s; fallback: setup.py build_ext --inplace"
    t0=$(date +%s)
    "$PY" setup.py build_ext --inplace || { note "build_ext --inplace FAILED"; return 1; }
    t1=$(date +%s)
    note "setup.py build_ext --inplace in $((t1 - t0)) s (import with PYTHONPATH=src)"
  fi
  resolve_import || { note "tgvkv does not import after the build"; return 1; }
  local bi
  bi=$("$PY" -c 'import json, tgvkv; print(json.dumps(tgvkv.build_info()))') || return 1
  note "build_info: $bi"
  if [ "$MODE" = gpu ]; then
    "$PY" -c 'import sys, tgvkv; b = tgvkv.build_info(); sys.exit(0 if b["cuda"] and "90a" in b["cuda_archs"] else 1)' \
      || { note "the build has no sm_90a CUDA kernels"; return 1; }
  fi
}

pytest_args() {  # the selection: the CUDA tests and every op test on the cuda device
  PYTEST_ARGS=(-m pytest tests/test_cuda.py)
  local f
  for f in tests/test_ops_*.py; do PYTEST_ARGS+=("$f"); done
  PYTEST_ARGS+=(-m cuda -p no:cacheprovider --junitxml="$WORK/junit.xml"
                -o junit_suite_name=tgvkv-gpu-check --durations=15)
}

step_tests() {
  pytest_args
  if "$PY" -c 'import pytest_timeout' 2>/dev/null; then
    PYTEST_ARGS+=(--timeout=180)
  fi
  local workers="${GPU_CHECK_WORKERS:-8}"
  if [ "$MODE" = gpu ] && [ "$workers" != 0 ] && "$PY" -c 'import xdist' 2>/dev/null; then
    PYTEST_ARGS+=(-n "$workers" --dist load)
    export OMP_NUM_THREADS=2  # the CPU references of 8 workers share 16 cores
    note "pytest-xdist: $workers workers"
  fi
  [ "$MODE" = dry ] && note "dry run: no GPU, so every selected test skips (its CUDA marker)"
  echo "$PY ${PYTEST_ARGS[*]}"
  "$PY" "${PYTEST_ARGS[@]}"
}

sanitize() {  # $1: memcheck | racecheck
  local tool="$1" san
  if [ "$MODE" = dry ]; then
    if [ "$tool" = memcheck ]; then
      if "$PY" tools/gpu_sanitize_ops.py --device cpu; then
        note "skipped: dry run (no GPU); the driver tools/gpu_sanitize_ops.py ran on the cpu: ok"
      else
        note "dry run: the driver tools/gpu_sanitize_ops.py FAILED on the cpu"
        return 1
      fi
    else
      note "skipped: dry run (no GPU)"
    fi
    return 99  # recorded as skipped
  fi
  san=$(find_sanitizer) || { note "compute-sanitizer not found"; return 1; }
  local extra=()
  [ "$tool" = memcheck ] && extra=(--leak-check no)
  # caching off: every tensor is its own cudaMalloc, so out-of-bounds accesses are not hidden
  # inside the allocator's blocks; API errors that torch provokes on purpose are not reported
  echo "$san --tool $tool ${extra[*]} --report-api-errors no --error-exitcode 3 --print-limit 20"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool "$tool" ${extra[@]+"${extra[@]}"} \
    --report-api-errors no --error-exitcode 3 --print-limit 20 \
    "$PY" tools/gpu_sanitize_ops.py --device cuda --shapes small tiles
}

step_memcheck() { sanitize memcheck; }
step_racecheck() { sanitize racecheck; }

step_extra() {
  if [ "$MODE" = gpu ]; then
    "$PY" tools/gpu_extra.py --device cuda --preset llava-next-7b qwen2.5-vl-7b --batch 1 16 \
      --keep-ratio 0.05 0.1 --reps 50 --json "$WORK/extra.json"
  else
    note "dry run: --preset tiny on the cpu, tiny budgets"
    "$PY" tools/gpu_extra.py --device cpu --preset tiny --batch 1 2 --keep-ratio 0.1 --reps 3 \
      --copy-mib 16 --json "$WORK/extra.json"
  fi
}

plot_arg() {  # $1: file name in WORK; sets PLOT (empty, with a note, without matplotlib)
  PLOT=()
  if "$PY" -c 'import matplotlib' 2>/dev/null; then
    PLOT=(--plot "$WORK/$1")
  else
    note "no plot: matplotlib is not installed"
  fi
}

bench_ops() {  # $1: preset
  local name="ops-$1"
  plot_arg "$name.png"
  if [ "$MODE" = gpu ]; then
    "$PY" -m tgvkv.bench ops --preset "$1" --device cuda --dtype bfloat16 --keep-ratio 0.1 0.05 \
      --warmup 3 --reps 20 --min-time 0.3 --no-progress \
      --json "$WORK/$name.json" ${PLOT[@]+"${PLOT[@]}"}
  else
    # the CPU cost of the dry run stays small: one keep ratio; the second preset's stand-in
    # times only the whole evict and the decode step, without the memory probe
    local some=(--keep-ratio 0.1)
    [ "$1" = qwen2.5-vl-7b ] && some=(--keep-ratio 0.05 --op evict decode_evict_ --no-memory)
    note "dry run: --preset tiny on the cpu in place of $1, tiny budgets (${some[*]})"
    "$PY" -m tgvkv.bench ops --preset tiny --device cpu --dtype float32 "${some[@]}" \
      --warmup 1 --reps 2 --min-time 0 --no-progress \
      --json "$WORK/$name.json" ${PLOT[@]+"${PLOT[@]}"}
  fi
}


step_generate() {
  plot_arg generate-llava-next-7b.png
  if [ "$MODE" = gpu ]; then
    "$PY" -m tgvkv.bench generate --preset llava-next-7b --device cuda --dtype bfloat16 \
      --keep-ratio 1.0 0.05 --batch 1 --new-tokens 32 --reps 3 --no-progress \
      --json "$WORK/generate-llava-next-7b.json" ${PLOT[@]+"${PLOT[@]}"}
  else
    note "dry run: --preset tiny (tiny-llava) on the cpu in place of llava-next-7b"
    "$PY" -m tgvkv.bench generate --preset tiny --device cpu --dtype float32 \
      --keep-ratio 1.0 0.05 --batch 1 --new-tokens 4 --reps 1 --no-progress \
      --json "$WORK/generate-llava-next-7b.json" ${PLOT[@]+"${PLOT[@]}"}
  fi
}

step_generate_max_batch() {
  if [ "$MODE" = dry ]; then
    note "skipped: dry run (--max-batch needs CUDA)"
    return 99
  fi
  # the search (doubling, then bisection, for the unpatched model and keep 0.05) has no bound
  # of its own: it gets what is left of the budget; few new tokens and one rep keep probes short
  "$PY" -m tgvkv.bench generate --preset llava-next-7b --device cuda --dtype bfloat16 \
    --keep-ratio 0.05 --batch 1 --new-tokens 8 --reps 1 --max-batch --no-progress \
    --json "$WORK/generate-max-batch.json"
}

resolve_import() {  # an in-place build (no pip install) imports with PYTHONPATH=src
  "$PY" -c 'import tgvkv' >/dev/null 2>&1 && return 0
  if compgen -G "$ROOT/src/tgvkv/_C*.so" >/dev/null; then
    export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -c 'import tgvkv' >/dev/null 2>&1 && return 0
  fi
  return 1
}

if [ "${1:-}" = __step ]; then
  STEP="$2"
  case "$STEP" in
    env|build|tests|memcheck|racecheck|extra|generate) "step_$STEP" ;;
    ops-*) bench_ops "${STEP#ops-}" ;;
    generate-max-batch) step_generate_max_batch ;;
    *) echo "gpu_check: unknown step $STEP" >&2; exit 2 ;;
  esac
  exit $?
fi

# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------
usage() { sed -n '2,/^set -u/p' "$SELF" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

MODE=gpu PART=all BUDGET=540 BUILD=1 OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) MODE=dry ;;
    --no-build) BUILD=0 ;;
    --part) PART="${2:-}"; shift ;;
    --part=*) PART="${1#--part=}" ;;
    --budget) BUDGET="${2:-}"; shift ;;
    --budget=*) BUDGET="${1#--budget=}" ;;
    -h|--help) usage ;;
    -*) echo "gpu_check: unknown option $1" >&2; usage ;;
    *) [ -z "$OUT" ] || { echo "gpu_check: one output folder only" >&2; usage; }; OUT="$1" ;;
  esac
  shift
done
[ -n "$OUT" ] || { echo "gpu_check: give the output folder" >&2; usage; }
case "$PART" in all|build-test|bench) ;; *) echo "gpu_check: --part all|build-test|bench" >&2; exit 2 ;; esac
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check: --budget takes whole seconds" >&2; exit 2 ;; esac

PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || { echo "gpu_check: $PY not found" >&2; exit 2; }
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || exit 2
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/logs" "$WORK/notes"
printf 'step\tstatus\trc\tseconds\tbox\tnote\n' >"$WORK/steps.tsv"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
RESERVE=15 MIN_STEP=30
[ "$MODE" = dry ] && MIN_STEP=5
export MODE PY ROOT WORK OUT PART
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
resolve_import || true  # a build from an earlier call on this machine may be in place
FAILED=0 INTERRUPTED=0 STEP_PID=""
on_signal() {
  INTERRUPTED=1 FAILED=1
  [ -n "$STEP_PID" ] && kill -INT "$STEP_PID" 2>/dev/null
}
trap on_signal INT TERM

report() {
  "$PY" "$ROOT/tools/gpu_check_report.py" --work "$WORK" --out "$OUT" --mode "$MODE" \
    --part "$PART" --budget "$BUDGET" --started "$START" "$@"
}

record() {  # name status rc seconds box
  local n=""
  [ -f "$WORK/notes/$1.txt" ] && n=$(tr '\t\n' '  ' <"$WORK/notes/$1.txt" | sed 's/ *$//')
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$n" >>"$WORK/steps.tsv"
  printf '== %-20s %-8s %4ss (box %ss) %s\n' "$1" "$2" "$4" "$5" "$n"
  report >/dev/null 2>"$WORK/logs/report.err" || echo "   (report failed: $(tail -1 "$WORK/logs/report.err"))"
}

run_step() {  # name box
  local name="$1" box="$2" left t rc status t0 t1
  case ",${GPU_CHECK_SKIP:-}," in
    *",$name,"*) echo "skipped: GPU_CHECK_SKIP" >"$WORK/notes/$name.txt"
                 record "$name" skipped "" 0 "$box"; return ;;
  esac
  if [ "$INTERRUPTED" = 1 ]; then
    echo "skipped: the check was interrupted" >"$WORK/notes/$name.txt"
    record "$name" skipped "" 0 "$box"
    return
  fi
  left=$((DEADLINE - $(date +%s) - RESERVE))
  if [ "$left" -lt "$MIN_STEP" ]; then
    echo "skipped: no time left in the ${BUDGET} s budget" >"$WORK/notes/$name.txt"
    record "$name" skipped "" 0 "$box"
    return
  fi
  t=$box
  [ "$left" -lt "$t" ] && t=$left
  t0=$(date +%s)
  # SIGINT first (pytest then writes its JUnit file and summary), SIGKILL 20 s later; in the
  # background so that a signal to this script reaches the step (timeout has its own group)
  timeout -k 20 -s INT "$t" bash "$SELF" __step "$name" >"$WORK/logs/$name.log" 2>&1 &
  STEP_PID=$!
  wait "$STEP_PID"
  rc=$?
  while kill -0 "$STEP_PID" 2>/dev/null; do wait "$STEP_PID"; rc=$?; done
  STEP_PID=""
  [ "$INTERRUPTED" = 1 ] && { rc=130; echo "interrupted" >>"$WORK/notes/$name.txt"; }
  t1=$(date +%s)
  case $rc in
    0) status=ok ;;
    99) status=skipped ;;
    124|137) status=timeout; echo "timed out after $t s" >>"$WORK/notes/$name.txt" ;;
    *) status=failed ;;
  esac
  if [ "$status" = failed ] || [ "$status" = timeout ]; then
    FAILED=1
    tail -n 8 "$WORK/logs/$name.log" | sed 's/^/   | /'
  fi
  record "$name" "$status" "$rc" "$((t1 - t0))" "$t"
}

built_already() {  # tgvkv imports (gpu: with its sm_90a CUDA kernels)
  [ "$MODE" = dry ] && { "$PY" -c 'import tgvkv' 2>/dev/null; return; }
  "$PY" -c 'import sys, tgvkv; b = tgvkv.build_info(); sys.exit(0 if b["cuda"] and "90a" in b["cuda_archs"] else 1)' 2>/dev/null
}

skip_step() {  # name reason
  echo "$2" >"$WORK/notes/$1.txt"
  record "$1" skipped "" 0 0
}

echo "gpu_check: mode $MODE, part $PART, budget $BUDGET s, output $OUT, python $PY"
run_step env 60
if [ "$BUILD" = 0 ]; then
  skip_step build "skipped: --no-build (the installed tgvkv)"
elif [ "$PART" = bench ] && built_already; then
  skip_step build "skipped: already built by an earlier call ($("$PY" -c 'import tgvkv; print(tgvkv.build_info())' 2>&1))"
else
  run_step build 330
fi
resolve_import || true
if [ "$PART" != bench ]; then
  run_step tests 240
  run_step memcheck 90
  run_step racecheck 90
fi
if [ "$PART" != build-test ]; then
  run_step extra 90
  run_step ops-llava-next-7b 120
  run_step ops-qwen2.5-vl-7b 120
  run_step generate 180
  run_step generate-max-batch 420
fi
if [ "$INTERRUPTED" = 1 ]; then report --final --interrupted || FAILED=1; else report --final || FAILED=1; fi
exit $FAILED
