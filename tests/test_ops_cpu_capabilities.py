"""The CPU kernels under every CPU capability compiled into tgvkv that this machine supports.

The in-process suite runs the capability tgvkv picks (ATen's choice); here each other supported
capability (DEFAULT, AVX2, AVX512, ...) gets the op-vs-reference tests in a pytest subprocess with
TGVKV_CPU_CAPABILITY set, so the lower paths are checked on every CI machine too.
"""

import os
import subprocess
import sys

import pytest
import torch

import tgvkv
from tgvkv.bench.env import cpu_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFO = tgvkv.build_info()
COMPILED = INFO["cpu_capabilities"].split(",")
# the op tests of the scoring, selection and decode kernels against tgvkv.reference
OP_TESTS = [
    "tests/test_ops_scores.py::test_score_text_vision_matches_reference",
    "tests/test_ops_scores.py::test_score_text_vision_noncontiguous",
    "tests/test_ops_scores.py::test_score_text_vision_unused_rows",
    "tests/test_ops_select.py::test_evict_matches_reference",
    "tests/test_ops_select.py::test_evict_unused_query_rows",
    "tests/test_ops_select.py::test_evict_deterministic_across_threads",
    "tests/test_ops_select.py::test_evict_noncontiguous_cache",
    # text_score="all_queries" (its own kernel, text_column_mass): evict vs reference, 3 keeps
    "tests/test_text_score.py::test_evict_all_queries_matches_reference_and_evicts_text",
    "tests/test_text_score.py::test_score_text_vision_both_modes_match_reference",
    # the finiteness check of q (its own kernel, all_finite): every element, every layout
    "tests/test_text_score.py::test_any_non_finite_query_element_is_found",
    # non-finite keys refused at every lane of the row softmax's vectors (their width is the
    # capability's), pad / dead slots read as masked whatever they hold
    "tests/test_ops_nonfinite_keys.py",
    # bf16 around the key blocks of the bf16 GEMM (here: the fp32 GEMM path of bf16 inputs)
    "tests/test_ops_scores.py::test_bf16_scores_are_those_of_the_fp32_values",
    # three of the decode grid (the Python reference of decode is the slow part): fp32, fp16 with
    # 8 query heads per KV head, bf16 with GQA 16/2
    "tests/test_ops_decode.py::test_decode_evict_matches_reference[1-4-4-64-torch.float32-cpu]",
    "tests/test_ops_decode.py::test_decode_evict_matches_reference[3-8-1-128-torch.float16-cpu]",
    "tests/test_ops_decode.py::test_decode_evict_matches_reference[4-16-2-64-torch.bfloat16-cpu]",
    "tests/test_ops_decode.py::test_decode_evict_noncontiguous_cache",
]


def _env(cap):
    env = dict(os.environ)
    env["TGVKV_CPU_CAPABILITY"] = cap
    return env


def _capability_in(env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import tgvkv; print(tgvkv.build_info()['cpu_capability'])"],
        env=env, capture_output=True, text=True, timeout=120)


def test_build_info_reports_cpu_capability():
    assert INFO["cpu_capability"] in COMPILED
    assert "DEFAULT" in COMPILED


def test_unknown_capability_is_a_clear_error():
    r = _capability_in(_env("NOT_A_CAPABILITY"))
    assert r.returncode != 0
    assert "TGVKV_CPU_CAPABILITY=NOT_A_CAPABILITY is not a CPU capability" in r.stderr


def test_bf16_gemm_is_reported_and_used_with_amx():
    """build_info()["cpu_bf16_gemm"]: what multiplies bf16 q and keys. oneDNN's brgemm (through
    ATen) in the AVX512 table only, and there on every CPU with AMX-BF16; a forced lower capability
    takes the fp32 GEMM of the converted rows."""
    got = INFO["cpu_bf16_gemm"]
    assert got in ("brgemm", "fp32")
    if INFO["cpu_capability"] != "AVX512":
        assert got == "fp32"
    elif {"amx_tile", "amx_bf16"} <= cpu_flags():
        assert got == "brgemm"
    r = subprocess.run(
        [sys.executable, "-c", "import tgvkv; print(tgvkv.build_info()['cpu_bf16_gemm'])"],
        env=_env("DEFAULT"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "fp32"


@pytest.mark.parametrize("cap", COMPILED)
def test_ops_match_reference_under_capability(cap):
    if cap == INFO["cpu_capability"]:
        pytest.skip(f"{cap} is the capability in use: the rest of the suite tests it in-process")
    probe = _capability_in(_env(cap))
    if probe.returncode != 0 and "does not support it" in probe.stderr:
        pytest.skip(f"this CPU does not support {cap}")
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip() == cap
    names = list(OP_TESTS)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        "-m", "not slow", *names], cwd=ROOT, env=_env(cap), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, f"under {cap}:\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}"


# the ops' thread-count independence, which rests on the BLAS blocking each GEMM alike whatever
# the thread count (see gemm_nt_f32 in csrc/cpu/ops_cpu.cpp)
THREAD_TESTS = [
    "tests/test_ops_select.py::test_evict_deterministic_across_threads",
    "tests/test_text_score.py::test_all_queries_independent_of_thread_count",
]


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch is not built with MKL")
def test_thread_count_independence_under_mkl_avx2():
    """MKL's AVX2 code path (what AVX2-only CPUs run; forced here by MKL_ENABLE_INSTRUCTIONS,
    which MKL ignores on a CPU without AVX2) blocked a GEMM by the calling thread's MKL thread
    count even inside a parallel region: the scores at 2 and 3 threads then differed from 1 and
    4 threads in the last bits (Xeon)."""
    env = dict(os.environ, MKL_ENABLE_INSTRUCTIONS="AVX2")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        *THREAD_TESTS], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-2000:]}"


def _shared_functions_with_vector_code(path: str) -> dict:
    """{mangled name: [AVX / AVX-512 mnemonics]} of the functions in the shared object at path
    whose name the linker may merge across objects (not in an anonymous namespace, not in a
    capability namespace such as at::vec::AVX512 or tgvkv::cpu::kernels_AVX2, not a local clone
    such as foo.constprop.0 or foo._omp_fn.0) and whose code uses a VEX / EVEX instruction."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    import re

    local = re.compile(r"_GLOBAL__N_|AVX2|AVX512|[.@]")
    found, name = {}, None
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            name = None if local.search(m.group(1)) else m.group(1)
            continue
        parts = line.split("\t")
        if name and len(parts) >= 2 and re.match(r"v[a-z]", parts[1].strip()):
            found.setdefault(name, []).append(parts[1].split()[0])
    return found


@pytest.mark.skipif(len(COMPILED) < 2, reason="one CPU capability compiled in: nothing to merge")
def test_no_capability_code_behind_a_shared_name():
    # The kernel sources are compiled once per capability, and the headers they include
    # (tgvkv/cpu_score.h, c10, std) have inline functions with external linkage: each capability's
    # object has its own copy, and the linker keeps one per name. Only the DEFAULT object's copy is
    # safe for every caller (setup.py and CMakeLists.txt link it first); had it kept the AVX-512 one
    # (tgvkv::cpu::finish_scores, for one, is emitted out of line there), the DEFAULT and AVX2
    # kernels would call AVX-512 code: SIGILL on an AVX2-only CPU, which no forced-capability
    # test here can show. So: no function the linker could have merged holds AVX or AVX-512 code.
    import platform
    import shutil

    if platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None:
        pytest.skip("needs an x86-64 build and binutils' objdump")
    found = _shared_functions_with_vector_code(tgvkv._C.__file__)
    if found and shutil.which("c++filt"):
        names = subprocess.run(["c++filt"], input="\n".join(found), capture_output=True, text=True,
                               timeout=60).stdout.splitlines()
        found = dict(zip(names, found.values()))
    assert not found, ("AVX / AVX-512 code behind names the linker merges across the capability "
                       "objects (link the DEFAULT object first): "
                       + "; ".join(f"{n} ({', '.join(sorted(set(m))[:4])})"
                                   for n, m in sorted(found.items())[:10]))
