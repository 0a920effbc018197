"""Hostile input: tensors an op writes in place that share memory, integer extremes, output paths
of the command line that cannot be written. Each gets a clear tgvkv error before any work (or,
for legal aliasing such as two halves of one buffer, the reference's answer)."""

import os

import pytest
import torch

import tgvkv

from conftest import OPS, ref, run_cli
from test_ops_errors import HKV, N, B, D, L, call, expect_error, good

from tgvkv import TGVKV
from tgvkv.presses import H2O, PyramidKV, RandomPolicy, SnapKV, StreamingLLM


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
    return run_cli(*args)  # in-process tgvkv-bench (conftest.run_cli)


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


# ------------------------------------------------------------------------------------------
# Integer extremes in tensors: the reference's answer (never a wrapped difference) or an error
# ------------------------------------------------------------------------------------------
I64_MIN, I64_MAX = -2**63, 2**63 - 1


@pytest.mark.parametrize("value", [I64_MIN, -1, 0, N + 1, I64_MAX])
def test_select_keep_keep_extremes_match_the_reference(value):
    g = good()
    keep = torch.full((L, B), value, dtype=torch.int64)
    keep[1, 0] = 7  # one ordinary entry beside the extreme ones
    got = OPS.select_keep(g["scores"], keep, g["q_pos"], g["modality"], 4)
    exp = ref.select_keep(g["scores"], keep, g["q_pos"], g["modality"], 4)
    assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])


@pytest.mark.parametrize("arg,i", [("n_seen", 5), ("n_protected", 7)])
@pytest.mark.parametrize("value", [-1, I64_MIN])
def test_decode_negative_counts_are_errors(arg, i, value):
    a = _decode_args()
    a[i] = a[i].clone()
    a[i][1] = value
    before = [t.clone() for t in a[:4]]
    expect_error(lambda: OPS.decode_evict_(*a, 0.25, 4), "decode_evict_", arg)
    assert all(torch.equal(x, y) for x, y in zip(a[:4], before))  # refused before any write


@pytest.mark.parametrize("arg,i", [("n_seen", 5), ("n_protected", 7), ("length", 3)])
def test_decode_int64_max_counts(arg, i):
    a = _decode_args()
    a[i] = torch.full_like(a[i], I64_MAX)
    if arg == "length":  # beyond S: refused (the reference would index past the cache)
        expect_error(lambda: OPS.decode_evict_(*a, 0.25, 4), "decode_evict_", "length")
        return
    b = [t.clone() for t in a]
    got = OPS.decode_evict_(*a, 0.25, 4)
    exp = ref.decode_evict_(*b, 0.25, 4)
    assert torch.equal(got, exp) and torch.equal(a[3], b[3])


@pytest.mark.parametrize("value", [float("nan"), float("-inf"), -1e308])
def test_decode_non_finite_forget_count_names_keep_fraction(value):
    a = _decode_args()
    a[6] = torch.full_like(a[6], value)
    expect_error(lambda: OPS.decode_evict_(*a, 0.25, 4), "decode_evict_", "keep_fraction")


@pytest.mark.parametrize("value", [I64_MIN, I64_MAX, -2, N])
@pytest.mark.parametrize("where", ["first", "last"])
def test_compact_keep_idx_extremes(value, where):
    g = good()
    idx = g["keep_idx"].clone()
    idx[1, 0 if where == "first" else -1] = value
    k, v = g["k"].clone(), g["v"].clone()
    expect_error(lambda: OPS.compact_(k, v, idx), "compact_", "keep_idx")
    assert torch.equal(k, g["k"]) and torch.equal(v, g["v"])  # refused before any write


@pytest.mark.parametrize("kind", ["duplicate", "descending"])
def test_compact_keep_idx_not_ascending(kind):
    g = good()
    idx = torch.full((B, N), -1, dtype=torch.int64)
    idx[:, :3] = torch.tensor([2, 2, 5] if kind == "duplicate" else [5, 2, 7])
    expect_error(lambda: OPS.compact_(g["k"].clone(), g["v"].clone(), idx), "compact_",
                 "keep_idx")


@pytest.mark.parametrize("name", ["score_text_vision", "layer_budgets", "select_keep",
                                  "evict_from_scores", "evict"])
@pytest.mark.parametrize("value", [I64_MIN, I64_MAX])
def test_q_pos_int64_extremes(name, value):
    g = good()
    q_pos = g["q_pos"].clone()
    q_pos[0, 1] = value
    expect_error(lambda: call(name, g, q_pos=q_pos), name, "q_pos")


# ------------------------------------------------------------------------------------------
# Scalar arguments: float32 range of scale, the wrappers' int64 / type checks
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e300, -1e39, float("inf"), float("nan")])
def test_scale_beyond_float32_is_an_error(scale):
    g = good()
    expect_error(lambda: OPS.score_text_vision(g["q"], g["k"], g["q_pos"], g["modality"], scale,
                                               text_score="guidance"),
                 "score_text_vision", "scale")
    kc = [g["k"].clone() for _ in range(L)]
    vc = [g["v"].clone() for _ in range(L)]
    expect_error(lambda: OPS.evict(kc, vc, [g["q"]] * L, g["q_pos"], g["modality"], scale, 0.2,
                                   text_score="guidance"),
                 "evict", "scale")
    expect_error(lambda: OPS.decode_evict_(*_decode_args(), scale, 4), "decode_evict_", "scale")


@pytest.mark.parametrize("n_sink", [2**63, 2**70, -2**70])
def test_wrappers_refuse_ints_beyond_int64(n_sink):
    g = good()
    with pytest.raises(ValueError, match=r"tgvkv::layer_budgets: n_sink must fit in int64"):
        tgvkv.ops.layer_budgets(g["stats"], g["q_pos"], g["modality"], 0.2, "mass", False, n_sink)
    with pytest.raises(ValueError, match=r"tgvkv::decode_evict_: n_sink"):
        tgvkv.ops.decode_evict_(*_decode_args(), 0.25, n_sink)


def test_wrappers_refuse_wrong_scalar_types():
    g = good()
    with pytest.raises(TypeError, match=r"tgvkv::select_keep: n_sink must be an int"):
        tgvkv.ops.select_keep(g["scores"], g["keep"], g["q_pos"], g["modality"], True)
    with pytest.raises(TypeError, match=r"tgvkv::select_keep: n_sink must be an int"):
        tgvkv.ops.select_keep(g["scores"], g["keep"], g["q_pos"], g["modality"], 4.0)
    with pytest.raises(TypeError, match=r"tgvkv::layer_budgets: keep_ratio must be a real"):
        tgvkv.ops.layer_budgets(g["stats"], g["q_pos"], g["modality"], "0.2")
    with pytest.raises(TypeError, match=r"tgvkv::score_text_vision: scale must be a real"):
        tgvkv.ops.score_text_vision(g["q"], g["k"], g["q_pos"], g["modality"], None)


# ------------------------------------------------------------------------------------------
# Every policy field is validated when the policy is built
# ------------------------------------------------------------------------------------------
_BAD_FIELDS = [
    (TGVKV, "keep_ratio", [0.0, -0.5, 1.5, float("nan"), float("inf"), True, "0.1", None]),
    (TGVKV, "n_sink", [-1, 2**31, 2**70, 4.0, True, "4"]),
    (TGVKV, "budget", ["MASS", "", 0, None]),
    (TGVKV, "text_score", ["rows", 1, None]),
    (TGVKV, "no_vision", [None, 0]),
    (TGVKV, "redistribute", [1, "yes", None]),
    (TGVKV, "decode_evict", [0, "no"]),
    (TGVKV, "text_weighting", [1.0]),
    (TGVKV, "text_priority", [0]),
    (TGVKV, "uniform_budgets", ["False"]),
    (RandomPolicy, "keep_ratio", [2, True]),
    (RandomPolicy, "n_sink", [2**70]),
    (RandomPolicy, "seed", [1.5, True, 2**64, -2**63 - 1]),
    (StreamingLLM, "decode_evict", [1, None]),
    (H2O, "recent_share", [-0.1, 1.1, float("nan"), True]),
    (SnapKV, "window", [0, -3, 8.0, True]),
    (SnapKV, "kernel", [0, 4, 5.0, True]),
    (PyramidKV, "beta", [0.0, -1.0, float("inf"), float("nan"), True, "20"]),
    (PyramidKV, "window", [0]),
]


@pytest.mark.parametrize("cls,name,value", [(c, n, v) for c, n, vs in _BAD_FIELDS for v in vs],
                         ids=lambda x: x.__name__ if isinstance(x, type) else repr(x))
def test_policy_fields_checked_at_construction(cls, name, value):
    with pytest.raises(ValueError) as ei:
        cls(**{"keep_ratio": 0.5, name: value})
    msg = str(ei.value)
    assert f"{cls.__name__}.{name} must be" in msg and repr(value) in msg, msg


@pytest.mark.parametrize("text_score", ["guidance", "all_queries"])
def test_both_text_score_strings_pass_validation(text_score):
    # "all_queries" is a valid value; the model layer may not implement it (NotImplementedError)
    try:
        TGVKV(text_score=text_score)
    except NotImplementedError:
        assert text_score == "all_queries"


def test_valid_policies_build():
    for p in (TGVKV(keep_ratio=1), TGVKV(n_sink=2**31 - 1, budget="mi"), RandomPolicy(seed=-5),
              H2O(keep_ratio=0.3, recent_share=0), SnapKV(window=1, kernel=1),
              PyramidKV(beta=0.5), StreamingLLM(decode_evict=False)):
        p.validate()
