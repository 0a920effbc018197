"""The ``tgvkv-bench`` command line and its plain-PyTorch baseline.

- The baseline (:mod:`tgvkv.torch_impl`) keeps exactly the slots the reference keeps, so
  that every speed ratio the CLI reports compares like with like.
- The CLI, driven in-process (one test runs the installed entry points in a fresh interpreter)
  on tiny shapes: help text, exit codes, one-line errors without a
  traceback, the JSON schema, the plot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import run_cli
from tgvkv import torch_impl
from tgvkv import reference as ref

PAD, TEXT, VISION = ref.PAD, ref.TEXT, ref.VISION


def _have_ops() -> bool:
    try:
        torch.ops.tgvkv.evict  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


needs_ops = pytest.mark.skipif(not _have_ops(), reason="tgvkv's compiled ops are not built")


cli = run_cli  # in-process tgvkv-bench (conftest.run_cli)


def cli_subprocess(*argv, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([*argv], capture_output=True, text=True, timeout=timeout, env=env)


def assert_user_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    err = p.stderr.strip()
    assert "Traceback" not in p.stderr, p.stderr
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)


# --------------------------------------------------------------------------------------------
# The plain-PyTorch composition equals the reference
# --------------------------------------------------------------------------------------------
def _random_case(seed, B, Hq, Hkv, N, D, L, dtype, pad=True):
    g = torch.Generator().manual_seed(seed)
    mod = torch.full((B, N), TEXT, dtype=torch.int8)
    for b in range(B):
        P = int(torch.randint(0, 4, (1,), generator=g))
        V = int(torch.randint(0, N // 2, (1,), generator=g))
        mod[b, P:P + V] = VISION
        if int(torch.randint(0, 3, (1,), generator=g)) == 0 and P + V + 3 < N:  # second image
            mod[b, P + V + 2: P + V + 3 + int(torch.randint(0, 3, (1,), generator=g))] = VISION
        if pad:
            lp = int(torch.randint(0, 3, (1,), generator=g))
            rp = int(torch.randint(0, 3, (1,), generator=g))
            mod[b, :lp] = PAD
            if rp:
                mod[b, N - rp:] = PAD
    q_pos = ref.guidance_positions(mod)
    T = q_pos.shape[1]
    k = [torch.randn(B, Hkv, N, D, generator=g).to(dtype) for _ in range(L)]
    v = [torch.randn(B, Hkv, N, D, generator=g).to(dtype) for _ in range(L)]
    q = [torch.randn(B, Hq, T, D, generator=g).to(dtype) for _ in range(L)]
    return k, v, q, q_pos, mod


CONFIGS = [(0.3, "mass", False), (0.1, "mi", False), (0.5, "mass", True), (0.05, "mi", True),
           (1.0, "mass", False)]


@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize("kr,budget,redistribute", CONFIGS)
def test_torch_composition_keeps_the_reference_slots(seed, kr, budget, redistribute):
    B, Hkv = 1 + seed % 3, 1 + seed % 2
    Hq = Hkv * (1 + seed % 3)
    N, L = 12 + seed % 20, 1 + seed % 4
    dtype = (torch.float32, torch.bfloat16)[seed % 2]
    k, v, q, q_pos, mod = _random_case(seed, B, Hq, Hkv, N, 8, L, dtype)
    if budget == "mi" and bool((((mod == VISION).sum(1) < 2) | ((q_pos >= 0).sum(1) < 2)).any()):
        # a rank-1 text->vision block has I = 0 exactly; the reference's I is then rounding
        # noise and so is its "mi" budget: no implementation can match noise
        pytest.skip("mutual information is rounding noise for a rank-1 text->vision block")
    kr_, vr_ = [x.clone() for x in k], [x.clone() for x in v]
    exp = ref.evict(kr_, vr_, q, q_pos, mod, 8 ** -0.5, kr, budget, redistribute, text_score="guidance")
    new_k, new_v, *got = torch_impl.evict(k, v, q, q_pos, mod, 8 ** -0.5, kr, budget,
                                           redistribute, text_score="guidance")
    for name, e, g_ in zip(("keep_idx", "n_kept", "n_protected"), exp[:3], got[:3]):
        assert torch.equal(e, g_), (name, e, g_)
    torch.testing.assert_close(got[3], exp[3], rtol=1e-6, atol=1e-9)
    for l in range(L):
        for b in range(B):
            n = int(exp[1][l, b])
            assert torch.equal(kr_[l][b, :, :n], new_k[l][b, :, :n])
            assert torch.equal(vr_[l][b, :, :n], new_v[l][b, :, :n])


def test_torch_composition_stages_match_reference():
    k, v, q, q_pos, mod = _random_case(3, 3, 4, 2, 30, 16, 2, torch.float32)
    for ql, kl in zip(q, k):
        s_exp, st_exp = ref.score_text_vision(ql, kl, q_pos, mod, 0.25, text_score="guidance")
        s_got, st_got = torch_impl.score_text_vision(ql, kl, q_pos, mod, 0.25, text_score="guidance")
        torch.testing.assert_close(s_got, s_exp, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(st_got, st_exp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(30))
def test_torch_decode_evict_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B, Hkv = 3, 1 + seed % 2
    Hq, S, D = Hkv * (1 + seed % 3), 20, 8
    k, v = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    length = torch.randint(3, S + 1, (B,), generator=g)
    pos = torch.arange(S).expand(B, S).clone()
    q = torch.randn(B, Hq, D, generator=g)
    n_seen = length + torch.randint(0, 10, (B,), generator=g)
    frac = torch.rand(B, generator=g, dtype=torch.float64)
    if seed % 5 == 0:
        frac[0] = 1.0
    nprot = torch.randint(1, 6, (B,), generator=g)
    a = [x.clone() for x in (k, v, pos, length)]
    b = [x.clone() for x in (k, v, pos, length)]
    e_exp = ref.decode_evict_(*a, q, n_seen, frac, nprot, D ** -0.5)
    e_got = torch_impl.decode_evict_(*b, q, n_seen, frac, nprot, D ** -0.5)
    assert torch.equal(e_exp, e_got) and torch.equal(a[3], b[3])
    for i in range(B):  # same live (pos, K, V) entries, any slot order
        n = int(a[3][i])
        o1, o2 = a[2][i, :n].argsort(), b[2][i, :n].argsort()
        assert torch.equal(a[2][i, :n][o1], b[2][i, :n][o2])
        assert torch.equal(a[0][i][:, o1], b[0][i][:, o2])
        assert torch.equal(a[1][i][:, o1], b[1][i][:, o2])


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def test_help_lists_commands_and_schema():
    p = cli("--help")
    assert p.returncode == 0, p.stderr
    for word in ("ops", "generate", "accuracy", "--json", "tgvkv-bench/1", "speedup"):
        assert word in p.stdout, word
    p = cli("ops", "--help")
    assert p.returncode == 0
    for word in ("--preset", "llava-1.5-7b", "--kv-heads", "--keep-ratio", "--dtype", "--device"):
        assert word in p.stdout, word


@pytest.mark.parametrize("args,needles", [
    (("ops", "--preset", "llava-99b"), ("unknown preset", "llava-99b", "llava-1.5-7b")),
    (("ops", "--keep-ratio", "0"), ("keep ratio", "(0, 1]")),
    (("ops", "--keep-ratio", "1.5"), ("keep ratio", "(0, 1]")),
    (("ops", "--keep-ratio", "abc"), ("keep ratio",)),
    (("generate", "--keep-ratio", "-0.1"), ("keep ratio",)),
    (("ops", "--heads", "6", "--kv-heads", "4"), ("multiple of",)),
    (("ops", "--tokens", "10", "--vision-tokens", "8", "--text-tokens", "8"), ("<= --tokens",)),
    (("ops", "--device", "tpu"), ("unknown device",)),
    (("ops", "--dtype", "float64"), ("invalid choice",)),
    (("frobnicate",), ("invalid choice",)),
    (("generate", "--preset", "gpt-5"), ("unknown preset", "gpt-5")),
    (("generate", "--model", "/nonexistent/model/dir"), ("not a directory",)),
    (("accuracy", "--model", "/nonexistent/model/dir"), ("not a directory",)),
    (("accuracy", "--policy", "bogus"), ("unknown policy", "bogus", "tgvkv")),
    (("generate", "--model", "x", "--preset", "tiny"), ("not both",)),
])
def test_user_errors_are_one_line(args, needles):
    assert_user_error(cli(*args), *needles)


def test_not_a_model_directory(tmp_path):
    (tmp_path / "weights.txt").write_text("hello")
    assert_user_error(cli("generate", "--model", tmp_path), "not a model", "config.json")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda():
    assert_user_error(cli("ops", "--preset", "tiny", "--device", "cuda"), "CUDA is not available")


def test_json_to_missing_directory(tmp_path):
    assert_user_error(cli("ops", "--json", tmp_path / "no" / "r.json"), "does not exist")


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    p = cli("ops", "--preset", "tiny", "--plot", tmp_path / "x.png")
    assert_user_error(p, "matplotlib", "pip install")


def _check_common(rep, argv):
    assert rep["schema"] == "tgvkv-bench/1"
    assert rep["argv"] == [str(a) for a in argv]
    assert rep["command"].startswith("tgvkv-bench ")
    for k in ("python", "torch", "transformers", "tgvkv"):
        assert k in rep["versions"], k
    assert rep["device"]["device"] == "cpu"
    assert rep["device"]["cpu"]
    assert rep["device"]["cpu_id"].startswith("family ")
    assert rep["wall_s"] >= 0


@needs_ops
def test_ops_json_schema(tmp_path):
    out = tmp_path / "ops.json"
    argv = ["ops", "--preset", "tiny", "--keep-ratio", "0.2", "0.5", "--reps", "2", "--warmup",
            "1", "--min-time", "0", "--device", "cpu", "--json", out]
    p = cli(*argv)
    assert p.returncode == 0, p.stderr
    assert "speedup" in p.stdout and "evict" in p.stdout and "command: tgvkv-bench ops" in p.stdout
    rep = json.loads(out.read_text())
    _check_common(rep, argv)
    sec = rep["ops"]
    assert sec["shape"] == {"layers": 4, "heads": 4, "kv_heads": 2, "head_dim": 32, "tokens": 96,
                            "vision_tokens": 64, "text_tokens": 16, "batch": 2}
    assert sec["preset"] == "tiny" and sec["dtype"] == "float32" and sec["copy_bandwidth_gbs"] > 0
    ops = {(r["op"], r["keep_ratio"]) for r in sec["rows"]}
    for op in ("score_text_vision", "layer_budgets", "select_keep", "compact_",
               "evict_from_scores", "evict", "decode_evict_"):
        assert (op, 0.2) in ops and (op, 0.5) in ops, op
    for r in sec["rows"]:
        for impl in ("tgvkv", "torch"):
            t = r[impl]
            assert 0 < t["min_ms"] <= t["median_ms"] <= t["max_ms"] and t["reps"] >= 2
            assert t["peak_extra_bytes"] is None or t["peak_extra_bytes"] >= 0
        # the CPU kernels' own scratch, which the profiler's allocator events miss, is counted
        scratch = r["tgvkv"].get("kernel_scratch_bytes")
        if r["tgvkv"]["peak_extra_bytes"] is not None:
            assert scratch is not None and 0 <= scratch <= r["tgvkv"]["peak_extra_bytes"]
            if r["op"] in ("score_text_vision", "evict"):  # partial head sums at least
                assert scratch >= 4 * 16 * 96, r["op"]
        assert r["speedup"] > 0
        if r["op"] == "evict":
            assert r["bytes"] > 0 and r["tgvkv"]["gbs"] > 0
        if r["op"] == "score_text_vision":  # GFLOP/s against torch.matmul, all_queries model
            L, B, Hq, N, T, D = 4, 2, 4, 96, 16, 32
            assert r["flop_model"] == "all_queries"
            assert r["flops"] == 2 * L * B * Hq * T * N * D + L * B * Hq * N * N * D
            assert r["matmul_flops"] == 2 * L * B * Hq * N * N * D
            g = r["gflops"]
            assert g["tgvkv"] == pytest.approx(r["flops"] / r["tgvkv"]["median_ms"] / 1e6)
            assert g["matmul"] > 0 and r["pct_matmul"] == pytest.approx(
                100 * g["tgvkv"] / g["matmul"])
            assert r["gemm_floor_ms"] > 0 and r["speedup_ceiling"] == pytest.approx(
                r["torch"]["median_ms"] / r["gemm_floor_ms"])
    assert "flop model): Q.K^T at" in p.stdout


@needs_ops
def test_ops_custom_shape_and_op_subset(tmp_path):
    out = tmp_path / "o.json"
    argv = ["ops", "--layers", "2", "--heads", "4", "--kv-heads", "1", "--head-dim", "16",
            "--tokens", "40", "--vision-tokens", "30", "--text-tokens", "6", "--batch", "1",
            "--op", "evict", "--reps", "2", "--min-time", "0", "--no-memory", "--dtype",
            "bfloat16", "--json", out]
    p = cli(*argv)
    assert p.returncode == 0, p.stderr
    sec = json.loads(out.read_text())["ops"]
    assert [r["op"] for r in sec["rows"]] == ["evict"]
    assert sec["dtype"] == "bfloat16" and sec["preset"] is None
    assert sec["rows"][0]["tgvkv"]["peak_extra_bytes"] is None


def test_generate_json_schema_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "gen.json", tmp_path / "gen.png"
    argv = ["generate", "--keep-ratio", "1.0", "0.2", "--new-tokens", "3", "--reps", "1",
            "--json", out, "--plot", png]
    p = cli(*argv)
    assert p.returncode == 0, p.stderr
    rep = json.loads(out.read_text())
    _check_common(rep, argv)
    sec = rep["generate"]
    assert sec["model"] == "tiny-llava" and sec["new_tokens"] == 3
    assert [r["keep_ratio"] for r in sec["rows"]] == [None, 1.0, 0.2]
    full = sec["rows"][0]["cache_bytes"]
    for r in sec["rows"]:
        assert r["ttft_ms"] > 0 and r["decode_tok_s"] > 0 and r["batch"] == 1
        assert r["cache_bytes"] > 0
    assert sec["rows"][1]["cache_bytes"] == full  # keep ratio 1: nothing evicted
    assert sec["rows"][2]["cache_bytes"] < full  # 0.2: a smaller cache
    assert 0.1 < sec["rows"][2]["kept_fraction"] < 0.35
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    # one rep: the paired ratio is that rep's ratio, its interval a point; unpatched: exactly 1
    assert sec["rows"][0]["decode_speedup_paired"] == 1.0
    for r in sec["rows"]:
        lo, hi = r["decode_speedup_paired_ci95"]
        assert 0 < lo == r["decode_speedup_paired"] == hi


def test_paired_speedup_median_and_interval():
    from tgvkv.bench.generate import _paired_speedup

    got = _paired_speedup([2.0, 4.0, 3.0], [1.0, 2.0, 1.5])
    assert got == {"decode_speedup_paired": 2.0, "decode_speedup_paired_ci95": [2.0, 2.0]}
    # per-rep ratios 0.9 .. 1.1 in steps of 0.01: median 1.0, an interval around it, seeded
    base = [1.0] * 21
    mine = [1.0 / (0.9 + 0.01 * i) for i in range(21)]
    a, b = _paired_speedup(base, mine), _paired_speedup(base, mine)
    assert a == b and abs(a["decode_speedup_paired"] - 1.0) < 1e-12
    lo, hi = a["decode_speedup_paired_ci95"]
    assert 0.93 < lo < 1.0 < hi < 1.07
    assert _paired_speedup(None, [1.0])["decode_speedup_paired"] is None


@pytest.mark.parametrize("text_score", ["all_queries", "guidance"])
def test_gemm_floor_runs_the_plain_compositions_products(monkeypatch, text_score):
    """The speed-up ceiling's floor times exactly the Q.K^T products the plain score_text_vision
    runs (same operand shapes, same count), and nothing else through torch.matmul."""
    from tgvkv.bench import ops as bench_ops
    from tgvkv.bench.shapes import Shape

    # 2 samples, guidance rows not the last slots in one of them (pad at the end)
    case = bench_ops._Case(Shape(2, 4, 2, 16, 70, 40, 12, 2), "cpu", torch.float32, 0, None,
                           "mass", False, 4, text_score)
    case.mod[1, -5:] = PAD
    case.q_pos[1, -5:] = -1
    case.masks = torch_impl.guidance_masks(case.q_pos, case.mod)
    shapes = []
    real_matmul = torch.matmul

    def spy(a, b, *args, **kw):
        shapes.append((tuple(a.shape), tuple(b.shape)))
        return real_matmul(a, b, *args, **kw)

    monkeypatch.setattr(torch, "matmul", spy)
    for q, k in zip(case.q_in, case.k0):
        torch_impl.score_text_vision(q, k, case.q_pos, case.mod, case.scale, case.masks, False,
                                     text_score)
    plain = sorted(shapes)
    shapes.clear()
    bench_ops._plain_gemm_products(case)()
    assert plain and sorted(shapes) == plain
    n_chunks = -(-58 // torch_impl.TEXT_MASS_CHUNK)  # rows 0..57 count (guidance rows 58..69)
    assert len(plain) == 2 * (1 + (n_chunks if text_score == "all_queries" else 0))


@needs_ops
def test_gemm_floor_timed_in_turn_with_the_op_and_its_baseline(monkeypatch):
    """The ceiling's floor is the third fn of score_text_vision's own interleaved loop (the same
    moments as the speed-up), and no other op times it."""
    from tgvkv.bench import ops as bench_ops
    from tgvkv.bench.shapes import Shape

    loops = []
    real = bench_ops.time_interleaved

    def spy(fns, *args, **kw):
        out = real(fns, *args, **kw)
        loops.append((len(fns), out))
        return out

    monkeypatch.setattr(bench_ops, "time_interleaved", spy)
    sec = bench_ops.run_ops(Shape(2, 4, 2, 16, 70, 40, 12, 1), None, "cpu", torch.float32,
                            "float32", [0.3], stages=("score_text_vision", "evict"), warmup=0,
                            reps=2, min_time=0, memory=False, progress=False)
    assert [n for n, _ in loops] == [3, 2]
    score = sec["rows"][0]
    assert score["op"] == "score_text_vision"
    t, b, f = loops[0][1]
    assert f.reps == t.reps == b.reps == 2
    assert score["gemm_floor_ms"] == f.median_ms
    assert score["speedup_ceiling"] == pytest.approx(b.median_ms / f.median_ms)
    assert "gemm_floor_ms" not in sec["rows"][1]


def test_time_interleaved_alternates_and_times_each():
    """ops' timer: each fn called in turn (order reversed every other rep), setup before every
    call, reps until the slowest fn has min_time_s of timed work; each Timing is its own fn's
    calls."""
    import time as _time

    from tgvkv.bench.timing import time_interleaved

    calls = []

    def fn(name, sleep):
        def f():
            calls.append(name)
            _time.sleep(sleep)
        return f

    setups = []
    ta, tb = time_interleaved([fn("a", 0.0), fn("b", 0.004)], "cpu",
                              setup=lambda: setups.append(len(calls)), warmup=1, reps=4)
    assert calls == ["a", "b"] + ["a", "b", "b", "a"] * 2
    assert setups == list(range(len(calls)))  # once before every call, warm-up included
    assert ta.reps == tb.reps == 4
    assert tb.min_ms >= 4.0 > ta.median_ms  # b's sleep is b's alone
    calls.clear()
    ta, tb = time_interleaved([fn("a", 0.0), fn("b", 0.002)], "cpu", warmup=0, reps=1,
                              min_time_s=0.02)
    # until b (the slower) had 20 ms: at most 10 calls of 2 ms, as many of a
    assert ta.reps == tb.reps == len(calls) // 2
    assert 2 <= tb.reps <= 10 and tb.reps * tb.max_ms >= 20.0


def test_version():
    p = cli("--version")
    assert p.returncode == 0
    v = json.loads(p.stdout)
    assert v["torch"] == torch.__version__


def test_console_script_in_a_fresh_interpreter():
    """The installed entry points, as a user runs them: ``python -m tgvkv.bench`` and the
    ``tgvkv-bench`` console script (exit codes and output of a fresh process)."""
    p = cli_subprocess(sys.executable, "-m", "tgvkv.bench", "--version")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["torch"] == torch.__version__
    exe = shutil.which("tgvkv-bench", path=os.path.dirname(sys.executable)) or \
        shutil.which("tgvkv-bench")
    if exe is None:
        pytest.fail("the tgvkv-bench console script is not installed next to this python")
    p = cli_subprocess(exe, "ops", "--keep-ratio", "0")
    assert_user_error(p, "keep ratio", "(0, 1]")


def test_accuracy_json_rows(tmp_path):
    """The default subject (tgvkv.eval.DEFAULT_SUBJECT, committed with the package): keep 1.0
    gives the full-cache predictions, every row is in the JSON."""
    pytest.importorskip("tgvkv.eval")
    pytest.importorskip("easy_vqa")
    out = tmp_path / "acc.json"
    argv = ["accuracy", "--policy", "tgvkv", "--keep-ratio", "1.0", "0.5", "--limit", "4",
            "--max-new-tokens", "4", "--json", out]
    p = cli(*argv)
    assert p.returncode == 0, p.stderr
    assert "| tgvkv |" in p.stdout
    acc = json.loads(out.read_text())["accuracy"]
    assert acc["n_samples"] == 4
    rows = {(r["policy"], r["keep_ratio"]): r for r in acc["rows"]}
    assert set(rows) == {("full", None), ("tgvkv", 1.0), ("tgvkv", 0.5)}
    assert rows[("tgvkv", 1.0)]["n_diff_vs_full"] == 0  # keep ratio 1: the unpatched model
    assert 0.0 <= rows[("tgvkv", 0.5)]["accuracy"] <= 1.0
