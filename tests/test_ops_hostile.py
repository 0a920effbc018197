"""Hostile input: tensors an op writes in place that share memory, integer extremes, output paths
of the command line that cannot be written. Each gets a clear tgvkv error before any work (or,
for legal aliasing such as two halves of one buffer, the reference's answer)."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import OPS, ref
from test_ops_errors import HKV, N, B, D, L, call, expect_error, good

from tgvkv import TGVKV


# ------------------------------------------------------------------------------------------
# Tensors written in place must not share memory
# ------------------------------------------------------------------------------------------
def test_compact_k_is_v():
    g = good()
    expect_error(lambda: OPS.compact_(g["k"], g["k"], g["keep_idx"]), "compact_", "k")


def test_compact_expanded_cache():
    g = good()
    k = g["k"][:1].expand(B, HKV, N, D)  # both samples are the same memory
    expect_error(lambda: OPS.compact_(k, g["v"], g["keep_idx"]), "compact_", "k")


def test_compact_overlapping_views():
    g = good()
    buf = torch.randn(B, HKV, N + 1, D)
    k, v = buf[:, :, :N], buf[:, :, 1:]  # shifted by one slot: partial overlap
    expect_error(lambda: OPS.compact_(k, v, g["keep_idx"]), "compact_", "k")


def test_compact_disjoint_halves_of_one_buffer_are_fine():
    g = good()
    keep_idx = g["keep_idx"].clone()
    keep_idx[:, 7:] = -1
    keep_idx[:, :7] = torch.tensor([0, 2, 3, 9, 11, 15, 23])
    kv = torch.randn(2, B, HKV, N, D)
    k_ref, v_ref = kv[0].clone(), kv[1].clone()
    n_ref = ref.compact_(k_ref, v_ref, keep_idx)
    n = OPS.compact_(kv[0], kv[1], keep_idx)
    assert torch.equal(n, n_ref)
    assert torch.equal(kv[0][:, :, :7], k_ref[:, :, :7]) and torch.equal(kv[1][:, :, :7],
                                                                          v_ref[:, :, :7])


@pytest.mark.parametrize("name", ["evict", "evict_from_scores"])
def test_evict_same_tensor_in_two_layers(name):
    g = good()
    k = g["k"].clone()
    kc = [k, k.clone(), k]
    expect_error(lambda: call(name, g, k_cache=kc), name, "k_cache[0]")


@pytest.mark.parametrize("name", ["evict", "evict_from_scores"])
def test_evict_k_is_v(name):
    g = good()
    kc = [g["k"].clone() for _ in range(L)]
    vc = [kc[0], g["v"].clone(), g["v"].clone()]
    expect_error(lambda: call(name, g, k_cache=kc, v_cache=vc), name, "v_cache[0]")


@pytest.mark.parametrize("name", ["evict", "evict_from_scores"])
def test_evict_expanded_layer(name):
    g = good()
    kc = [g["k"].clone() for _ in range(L)]
    kc[1] = g["k"][:, :1].expand(B, HKV, N, D)
    expect_error(lambda: call(name, g, k_cache=kc), name, "k_cache[1]")


def _decode_args():
    B_, H, S, Dh = 2, 2, 12, 16
    k, v = torch.randn(B_, H, S, Dh), torch.randn(B_, H, S, Dh)
    pos = torch.arange(S).repeat(B_, 1)
    length = torch.full((B_,), 10, dtype=torch.int64)
    q = torch.randn(B_, 2 * H, Dh)
    n_seen = torch.full((B_,), 40, dtype=torch.int64)
    frac = torch.full((B_,), 0.1, dtype=torch.float64)
    n_prot = torch.full((B_,), 2, dtype=torch.int64)
    return [k, v, pos, length, q, n_seen, frac, n_prot]


def test_decode_k_is_v():
    a = _decode_args()
    a[1] = a[0]
    expect_error(lambda: OPS.decode_evict_(*a, 0.25, 4), "decode_evict_", "k")


def test_decode_expanded_pos():
    a = _decode_args()
    a[2] = a[2][:1].expand(2, -1)
    expect_error(lambda: OPS.decode_evict_(*a, 0.25, 4), "decode_evict_", "pos")


# ------------------------------------------------------------------------------------------
# Integer extremes
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_sink", [2**31, 2**62, 2**63 - 1])
def test_n_sink_extremes_in_the_ops(n_sink):
    g = good()
    expect_error(lambda: OPS.layer_budgets(g["stats"], g["q_pos"], g["modality"], 0.2, "mass",
                                           False, n_sink), "layer_budgets", "n_sink")
    expect_error(lambda: OPS.select_keep(g["scores"], g["keep"], g["q_pos"], g["modality"],
                                         n_sink), "select_keep", "n_sink")
    kc = [g["k"].clone() for _ in range(L)]
    vc = [g["v"].clone() for _ in range(L)]
    expect_error(lambda: OPS.evict(kc, vc, [g["q"]] * L, g["q_pos"], g["modality"], 0.125, 0.2,
                                   "mass", False, n_sink, text_score="guidance"), "evict", "n_sink")
    expect_error(lambda: OPS.decode_evict_(*_decode_args(), 0.25, n_sink), "decode_evict_",
                 "n_sink")


def test_n_sink_at_the_bound_is_accepted():
    g = good()  # every slot is a sink: nothing is evicted, as the reference says
    keep, _ = OPS.layer_budgets(g["stats"], g["q_pos"], g["modality"], 0.2, "mass", False,
                                2**31 - 1)
    keep_ref, _ = ref.layer_budgets(g["stats"], g["q_pos"], g["modality"], 0.2, "mass", False,
                                    2**31 - 1)
    assert torch.equal(keep, keep_ref)


@pytest.mark.parametrize("n_sink", [2**31, 2**70, -1, 4.0, True])
def test_policy_n_sink_checked_at_construction(n_sink):
    with pytest.raises(ValueError, match="n_sink"):
        TGVKV(n_sink=n_sink)


# ------------------------------------------------------------------------------------------
# The command line refuses an output path it cannot write, before doing any work
# ------------------------------------------------------------------------------------------
def _cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "tgvkv.bench", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_cli_output_is_a_directory(flag, tmp_path):
    p = _cli("ops", "--preset", "tiny", flag, tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "is a directory" in p.stderr and flag in p.stderr
    assert "score_text_vision" not in p.stdout  # no benchmark ran


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_cli_output_is_not_a_regular_file():
    p = _cli("ops", "--preset", "tiny", "--json", "/dev/full")
    assert p.returncode == 2 and "not a regular file" in p.stderr, p.stderr


def test_cli_output_parent_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    p = _cli("ops", "--preset", "tiny", "--json", f / "r.json")
    assert p.returncode == 2 and "does not exist" in p.stderr, p.stderr


# ------------------------------------------------------------------------------------------
# Fake (meta) kernels check shapes, dtypes and devices like the real op
# ------------------------------------------------------------------------------------------
def _meta(g):
    return {k: v.to("meta") for k, v in g.items()}


@pytest.mark.parametrize("name", ["score_text_vision", "layer_budgets", "select_keep", "compact_",
                                  "evict_from_scores", "evict"])
def test_fake_kernels_accept_good_args(name):
    call(name, _meta(good()))  # the meta kernels compute shapes only


@pytest.mark.parametrize("name,over,arg", [
    ("score_text_vision", {"k": torch.empty(B, HKV, N + 1, D)}, "k"),
    ("score_text_vision", {"q": torch.empty(B, 4, 3, D, dtype=torch.float16)}, "q"),
    ("layer_budgets", {"stats": torch.empty(L, B, 3)}, "stats"),
    ("select_keep", {"keep": torch.empty(L, B + 1, dtype=torch.int64)}, "keep"),
    ("compact_", {"keep_idx": torch.empty(B, N - 1, dtype=torch.int64)}, "keep_idx"),
    ("compact_", {"v": torch.empty(B, HKV + 1, N, D)}, "v"),
    ("evict_from_scores", {"scores": torch.empty(L, B, N, dtype=torch.float64)}, "scores"),
    ("evict", {"queries": [torch.empty(B, 4, 1, D)] * L}, "queries[0]"),
])
def test_fake_kernels_refuse_what_the_op_refuses(name, over, arg):
    g = good()
    with pytest.raises(RuntimeError) as real:
        call(name, g, **over)
    assert name in str(real.value)
    meta_over = {k: ([t.to("meta") for t in v] if isinstance(v, list) else v.to("meta"))
                 for k, v in over.items()}
    expect_error(lambda: call(name, _meta(g), **meta_over), name, arg)


@pytest.mark.parametrize("name,arg", [("score_text_vision", "k"), ("compact_", "k"),
                                      ("select_keep", "scores"), ("layer_budgets", "stats")])
def test_one_input_on_meta_is_an_error(name, arg):
    g = good()
    g[arg] = g[arg].to("meta")  # the others stay on the cpu
    with pytest.raises(RuntimeError, match="device"):
        call(name, g)


def test_fake_kernels_under_torch_compile_refuse_bad_shapes():
    g = good()
    bad_idx = torch.arange(N - 1).repeat(B, 1)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(k, v, idx):
        return torch.ops.tgvkv.compact_(k, v, idx)

    with pytest.raises(Exception, match="keep_idx"):
        f(g["k"].clone(), g["v"].clone(), bad_idx)


# ------------------------------------------------------------------------------------------
# Non-finite input (CPU: the CUDA ops cannot raise on data without a host sync)
# ------------------------------------------------------------------------------------------
def test_nan_in_one_guidance_row():
    g = good()
    q = g["q"].clone()
    q[1, 2, 0, 5] = float("nan")  # sample 1, head 2, its first guidance row
    expect_error(lambda: call("score_text_vision", g, q=q), "score_text_vision", "q")
    expect_error(lambda: call("evict", g, queries=[g["q"], q, g["q"]]), "evict", "queries")


def test_all_nan_queries_in_evict():
    g = good()
    q = torch.full_like(g["q"], float("nan"))
    expect_error(lambda: call("evict", g, queries=[q] * L), "evict", "queries")


def test_inf_in_k_cache_names_k_cache():
    g = good()
    kc = [g["k"].clone() for _ in range(L)]
    real = int(torch.nonzero(g["modality"][0] != 0)[3])
    kc[2][0, 1, real, 0] = float("inf")
    with pytest.raises(RuntimeError) as ei:
        call("evict", g, k_cache=kc)
    msg = str(ei.value)
    assert "evict" in msg and "k_cache" in msg and "'scores' must" not in msg, msg
