"""Bad input gets a clear RuntimeError/ValueError naming the op and the argument; empty inputs
are handled (or, for B = 0 / N = 0, rejected clearly).

Value checks (q_pos contents, NaN scores) run on CPU only: the CUDA path avoids host syncs.
"""

import math
import re

import pytest
import torch

from conftest import CUDA_SKIP, DEVICES, OPS, make_modality, randn, ref

B, HQ, HKV, N, D, L = 2, 4, 2, 24, 64, 3


def good(device="cpu"):
    mod = make_modality([24, 19], [4, 3], 2, "left", seed=1)
    q_pos = ref.guidance_positions(mod)
    T = q_pos.shape[1]
    return dict(
        q=randn((B, HQ, T, D), seed=1, device=device),
        k=randn((B, HKV, N, D), seed=2, device=device),
        v=randn((B, HKV, N, D), seed=3, device=device),
        q_pos=q_pos.to(device), modality=mod.to(device),
        stats=(torch.rand(L, B, 2) + 0.1).to(device),
        scores=torch.rand(L, B, N).to(device),
        keep=torch.full((L, B), 10, dtype=torch.int64).to(device),
        keep_idx=torch.arange(N).repeat(B, 1).to(device),
    )


def call(name, g, **over):
    """Call op `name` with good args `g`, some replaced by `over`."""
    a = dict(g, **over)
    kc = over.get("k_cache", [a["k"].clone() for _ in range(L)])
    vc = over.get("v_cache", [a["v"].clone() for _ in range(L)])
    qs = over.get("queries", [a["q"] for _ in range(L)])
    kr = over.get("keep_ratio", 0.2)
    bud = over.get("budget", "mass")
    if name == "score_text_vision":
        return OPS.score_text_vision(a["q"], a["k"], a["q_pos"], a["modality"], 0.125, text_score="guidance")
    if name == "layer_budgets":
        return OPS.layer_budgets(a["stats"], a["q_pos"], a["modality"], kr, bud)
    if name == "select_keep":
        return OPS.select_keep(a["scores"], a["keep"], a["q_pos"], a["modality"])
    if name == "compact_":
        return OPS.compact_(a["k"], a["v"], a["keep_idx"])
    if name == "evict_from_scores":
        return OPS.evict_from_scores(kc, vc, a["scores"], a["stats"], a["q_pos"], a["modality"],
                                     kr, bud)
    if name == "evict":
        return OPS.evict(kc, vc, qs, a["q_pos"], a["modality"], 0.125, kr, bud, text_score="guidance")
    raise KeyError(name)


def expect_error(fn, op, arg):
    with pytest.raises((RuntimeError, ValueError)) as ei:
        fn()
    msg = str(ei.value)
    assert op in msg, f"error does not name the op {op!r}: {msg}"
    # `arg` may list acceptable names "a|b" where either argument can be blamed for a mismatch
    alts = "|".join(re.escape(a) for a in arg.split("|"))
    assert re.search(rf"(?<![A-Za-z_])({alts})(?![A-Za-z_])", msg), \
        f"error does not name the argument {arg!r}: {msg}"


def test_good_args_work():
    g = good()
    for name in ("score_text_vision", "layer_budgets", "select_keep", "compact_",
                 "evict_from_scores", "evict"):
        call(name, g)


# ------------------------------------------------------------------------------------------
# keep_ratio and budget
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["layer_budgets", "evict_from_scores", "evict"])
@pytest.mark.parametrize("kr", [0.0, -1.0, 1.5, float("nan"), float("inf")])
def test_bad_keep_ratio(device, name, kr):
    g = good(device)
    expect_error(lambda: call(name, g, keep_ratio=kr), name, "keep_ratio")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["layer_budgets", "evict_from_scores", "evict"])
@pytest.mark.parametrize("budget", ["entropy", "", "MASS"])
def test_unknown_budget(device, name, budget):
    g = good(device)
    expect_error(lambda: call(name, g, budget=budget), name, "budget")


# ------------------------------------------------------------------------------------------
# dtypes and shapes
# ------------------------------------------------------------------------------------------
def _bad_cases(g):
    """(op, argument, replacement kwargs) for wrong dtype / shape inputs."""
    f64 = torch.float64
    return [
        ("score_text_vision", "q|k", dict(q=g["q"].to(f64), k=g["k"].to(f64))),       # dtype set
        ("score_text_vision", "k|q", dict(k=g["k"].half())),                           # q/k mix
        ("score_text_vision", "q", dict(q=g["q"].to(torch.int32))),
        ("score_text_vision", "k|q", dict(k=g["k"][:1])),                              # B
        ("score_text_vision", "k|q", dict(k=g["k"][..., :32])),                        # D
        ("score_text_vision", "k|q", dict(k=randn((B, 3, N, D), device=g["k"].device))),  # Hq%Hkv
        ("score_text_vision", "q_pos|q", dict(q_pos=g["q_pos"][:, :1])),               # T
        ("score_text_vision", "q_pos", dict(q_pos=g["q_pos"].int())),
        ("score_text_vision", "modality", dict(modality=g["modality"].long())),
        ("score_text_vision", "modality|k", dict(modality=g["modality"][:, :-1])),     # N
        ("score_text_vision", "q", dict(q=g["q"][0])),                               # rank
        ("layer_budgets", "stats", dict(stats=g["stats"][..., :1])),
        ("layer_budgets", "stats", dict(stats=g["stats"].double())),
        ("layer_budgets", "stats|q_pos|modality", dict(stats=g["stats"][:, :1])),                   # B
        ("layer_budgets", "modality", dict(modality=g["modality"].float())),
        ("select_keep", "scores", dict(scores=g["scores"].half())),
        ("select_keep", "scores|modality", dict(scores=g["scores"][:, :, :-1])),              # N
        ("select_keep", "keep|scores", dict(keep=g["keep"][:1])),
        ("select_keep", "keep", dict(keep=g["keep"].float())),
        ("compact_", "v|k", dict(v=g["v"][:, :, :-1])),
        ("compact_", "keep_idx", dict(keep_idx=g["keep_idx"].int())),
        ("evict_from_scores", "v_cache|k_cache", dict(v_cache=[g["v"].clone()] * (L - 1))),   # list len
        ("evict_from_scores", "scores|k_cache|stats", dict(scores=g["scores"][:1])),                # L
        ("evict_from_scores", "stats|k_cache|scores", dict(stats=g["stats"][:1])),
        ("evict_from_scores", "k_cache|v_cache|modality|scores",
         dict(k_cache=[g["k"][:, :, :-1].clone()] * L, v_cache=[g["v"][:, :, :-1].clone()] * L)),
        ("evict", "queries|k_cache", dict(queries=[g["q"]] * (L - 1))),
        ("evict", "k_cache|v_cache|queries",
         dict(k_cache=[randn((B, 3, N, D), device=g["k"].device)] * L,
              v_cache=[randn((B, 3, N, D), device=g["k"].device)] * L)),
        ("evict", "modality|k_cache", dict(modality=g["modality"][:, :-1])),
    ]


_CASE_IDS = [f"{op}-{arg}-{i}" for i, (op, arg, _) in enumerate(_bad_cases(good()))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("i", range(len(_CASE_IDS)), ids=_CASE_IDS)
def test_bad_dtype_or_shape(device, i):
    g = good(device)
    op, arg, over = _bad_cases(g)[i]
    expect_error(lambda: call(op, g, **over), op, arg)


_DEC_B, _DEC_S, _DEC_H = 2, 16, 2
_DEC_CASES = [
    ("v|k", dict(v=(_DEC_B, _DEC_H, _DEC_S - 1, D))),
    ("q|k", dict(q=(_DEC_B, 3, D))),                     # Hq % Hkv
    ("q|k", dict(q_dtype=torch.float16)),
    ("pos", dict(pos=torch.arange(_DEC_S - 1).repeat(_DEC_B, 1))),
    ("pos", dict(pos=torch.arange(_DEC_S).repeat(_DEC_B, 1).int())),
    ("length", dict(length=torch.tensor([10]))),
    ("length", dict(length=torch.tensor([10, _DEC_S + 1]))),   # more live slots than capacity
    ("keep_fraction", dict(keep_fraction=torch.tensor([0.2, 0.2]))),  # f32, not f64
    ("n_seen", dict(n_seen=torch.tensor([40]))),
    ("n_protected", dict(n_protected=torch.tensor([2, 2], dtype=torch.int32))),
]


def _decode_run(**o):
    Bd, S, H = _DEC_B, _DEC_S, _DEC_H
    a = dict(k=randn((Bd, H, S, D), seed=1),
             v=randn(o.pop("v", (Bd, H, S, D)), o.pop("v_dtype", torch.float32), seed=2),
             q=randn(o.pop("q", (Bd, 4, D)), o.pop("q_dtype", torch.float32), seed=3),
             pos=torch.arange(S).repeat(Bd, 1), length=torch.tensor([10, 12]),
             n_seen=torch.tensor([40, 50]),
             keep_fraction=torch.tensor([0.2, 0.2], dtype=torch.float64),
             n_protected=torch.tensor([2, 2]))
    a.update(o)
    return OPS.decode_evict_(a["k"], a["v"], a["pos"], a["length"], a["q"], a["n_seen"],
                             a["keep_fraction"], a["n_protected"], 0.125, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_v_dtype_differs_from_k_is_rejected(device):
    """README: K and V share q's dtype; a V of another dtype is a clear error on every backend."""
    g = good(device)
    idx = torch.full((B, N), -1, dtype=torch.int64)
    idx[:, :5] = torch.tensor([0, 3, 4, 9, 20])
    expect_error(lambda: OPS.compact_(g["k"].clone(), g["v"].half(), idx.to(device)),
                 "compact_", "v")
    kc, vc = [g["k"].clone() for _ in range(L)], [g["v"].half() for _ in range(L)]
    expect_error(lambda: OPS.evict(kc, vc, [g["q"]] * L, g["q_pos"], g["modality"], 0.125, 0.2, text_score="guidance"),
                 "evict", "v_cache[l]")


@pytest.mark.parametrize("device", DEVICES)
def test_keep_idx_narrower_than_n_is_rejected(device):
    """README: keep_idx is [B, N]; a narrower [B, M < N] one is a clear error."""
    g = good(device)
    idx = torch.full((B, N - 4), -1, dtype=torch.int64, device=device)
    idx[:, :3] = torch.tensor([1, 5, 22])
    expect_error(lambda: OPS.compact_(g["k"].clone(), g["v"].clone(), idx), "compact_", "keep_idx")


def test_decode_evict_good_inputs():
    _decode_run()


@pytest.mark.parametrize("i", range(len(_DEC_CASES)),
                         ids=[f"{a.split('|')[0]}-{i}" for i, (a, _) in enumerate(_DEC_CASES)])
def test_decode_evict_bad_inputs(i):
    arg, o = _DEC_CASES[i]
    expect_error(lambda: _decode_run(**o), "decode_evict_", arg)


# ------------------------------------------------------------------------------------------
# values: q_pos contents, NaN / inf scores (CPU: value checks need the data on the host)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["score_text_vision", "layer_budgets", "select_keep",
                                  "evict_from_scores", "evict"])
@pytest.mark.parametrize("kind", ["out_of_range", "negative", "not_increasing", "pad",
                                  "gap_after_minus_one"])
def test_bad_q_pos(name, kind):
    g = good()
    q_pos = g["q_pos"].clone()
    pad_slot = int((g["modality"][1] == 0).nonzero()[0])  # sample 1 is left-padded
    if kind == "out_of_range":
        q_pos[0, -1] = N
    elif kind == "negative":
        q_pos[0, 0] = -2
    elif kind == "not_increasing":
        q_pos[0, 1] = q_pos[0, 0]
    elif kind == "pad":
        q_pos[1, 0] = pad_slot
    else:  # a valid slot after a -1: valid rows must come first
        assert int(q_pos[1, -1]) == -1
        q_pos[1, -1] = N - 1
        q_pos[1, -2] = -1
    expect_error(lambda: call(name, g, q_pos=q_pos), name, "q_pos")


@pytest.mark.parametrize("name", ["select_keep", "evict_from_scores"])
def test_nan_scores_rejected(name):
    g = good()
    s = g["scores"].clone()
    s[1, 0, 12] = float("nan")
    expect_error(lambda: call(name, g, scores=s), name, "scores")


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_inf_scores_rejected_or_ranked(sign):
    """±inf scores: a clear error, or ranked like any other value (+inf highest in its class)."""
    g = good()
    s = g["scores"].clone()
    s[:, 0, 10] = sign * float("inf")
    s[:, 1, 11] = sign * float("inf")
    try:
        got = call("select_keep", g, scores=s)
    except (RuntimeError, ValueError) as e:
        assert "select_keep" in str(e) and "scores" in str(e), str(e)
        return
    exp = ref.select_keep(s, g["keep"], g["q_pos"], g["modality"])
    assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])


# ------------------------------------------------------------------------------------------
# device mix (needs CUDA)
# ------------------------------------------------------------------------------------------
@CUDA_SKIP
@pytest.mark.cuda
@pytest.mark.parametrize("name,arg", [("score_text_vision", "q_pos"), ("score_text_vision", "k"),
                                      ("select_keep", "modality"), ("compact_", "keep_idx"),
                                      ("evict", "modality"), ("layer_budgets", "q_pos")])
def test_device_mix(name, arg):
    g = good("cuda")
    if arg == "k":
        over = {"k": g["k"].cpu()}
    else:
        over = {arg: g[arg].cpu()}
    with pytest.raises((RuntimeError, ValueError)) as ei:
        call(name, g, **over)
    assert name in str(ei.value), str(ei.value)


# ------------------------------------------------------------------------------------------
# empty tensors
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_empty_T(device):
    """T = 0 (every prompt ends with vision): valid input, nothing evicted."""
    mod = make_modality([20, 15], [0, 0], 1, "right", seed=2).to(device)
    q_pos = torch.empty(2, 0, dtype=torch.int64, device=device)
    q = randn((2, 4, 0, D), device=device)
    k = randn((2, 2, 20, D), device=device)
    s, t = OPS.score_text_vision(q, k, q_pos, mod, 0.125, text_score="guidance")
    assert s.shape == (2, 20) and bool((s == 0).all()) and bool((t == 0).all())
    kc, vc = [k.clone()], [k.clone() + 1]
    out = OPS.evict(kc, vc, [q], q_pos, mod, 0.125, 0.1, text_score="guidance")
    assert out[1].cpu().tolist() == [[20, 15]]


def _empty_ok_or_clear(fn, op, check):
    try:
        out = fn()
    except (RuntimeError, ValueError) as e:
        assert op in str(e), f"unclear error for empty input: {e}"
        return
    check(out)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    mod = torch.empty(0, 10, dtype=torch.int8, device=device)
    q_pos = torch.empty(0, 3, dtype=torch.int64, device=device)
    q, k = randn((0, 4, 3, D), device=device), randn((0, 2, 10, D), device=device)
    _empty_ok_or_clear(lambda: OPS.score_text_vision(q, k, q_pos, mod, 0.125, text_score="guidance"),
                       "score_text_vision",
                       lambda o: (o[0].shape == (0, 10) and o[1].shape == (0, 2)) or
                       pytest.fail(f"bad shapes {o[0].shape} {o[1].shape}"))
    _empty_ok_or_clear(lambda: OPS.evict([k.clone()], [k.clone()], [q], q_pos, mod, 0.125, 0.1, text_score="guidance"),
                       "evict", lambda o: o[0].shape == (1, 0, 10) or pytest.fail(str(o[0].shape)))
    _empty_ok_or_clear(lambda: OPS.layer_budgets(torch.empty(2, 0, 2, device=device), q_pos,
                                                 mod, 0.1), "layer_budgets",
                       lambda o: o[0].shape == (2, 0) or pytest.fail(str(o[0].shape)))
    _empty_ok_or_clear(lambda: OPS.decode_evict_(
        randn((0, 2, 5, D), device=device), randn((0, 2, 5, D), device=device),
        torch.empty(0, 5, dtype=torch.int64, device=device),
        torch.empty(0, dtype=torch.int64, device=device), randn((0, 4, D), device=device),
        torch.empty(0, dtype=torch.int64, device=device),
        torch.empty(0, dtype=torch.float64, device=device),
        torch.empty(0, dtype=torch.int64, device=device), 0.125, 4), "decode_evict_",
        lambda o: o.shape == (0,) or pytest.fail(str(o.shape)))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_sequence(device):
    mod = torch.empty(2, 0, dtype=torch.int8, device=device)
    q_pos = torch.empty(2, 0, dtype=torch.int64, device=device)
    q, k = randn((2, 4, 0, D), device=device), randn((2, 2, 0, D), device=device)
    _empty_ok_or_clear(lambda: OPS.score_text_vision(q, k, q_pos, mod, 0.125, text_score="guidance"),
                       "score_text_vision",
                       lambda o: (o[0].shape == (2, 0) and bool((o[1] == 0).all())) or
                       pytest.fail(str(o)))
    _empty_ok_or_clear(lambda: OPS.evict([k.clone()], [k.clone()], [q], q_pos, mod, 0.125, 0.1, text_score="guidance"),
                       "evict",
                       lambda o: (o[0].shape == (1, 2, 0) and o[1].cpu().tolist() == [[0, 0]])
                       or pytest.fail(str(o)))
    _empty_ok_or_clear(lambda: OPS.compact_(k.clone(), k.clone(),
                                            torch.empty(2, 0, dtype=torch.int64, device=device)),
                       "compact_", lambda o: o.cpu().tolist() == [0, 0] or pytest.fail(str(o)))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_layer_list(device):
    """L = 0 (no layers): empty outputs or a clear error, never a crash."""
    g = good(device)
    _empty_ok_or_clear(lambda: OPS.evict([], [], [], g["q_pos"], g["modality"], 0.125, 0.1, text_score="guidance"),
                       "evict", lambda o: o[0].shape == (0, B, N) or pytest.fail(str(o[0].shape)))


def test_decode_v_dtype_differs_is_rejected():
    """A V of another dtype than K/q is a clear error."""
    S = _DEC_S
    k = randn((_DEC_B, _DEC_H, S, D), seed=1)
    expect_error(lambda: OPS.decode_evict_(
        k, k.half(), torch.arange(S).repeat(_DEC_B, 1), torch.tensor([10, 12]),
        randn((_DEC_B, 4, D), seed=3), torch.tensor([40, 50]),
        torch.tensor([0.2, 0.2], dtype=torch.float64), torch.tensor([2, 2]), 0.125, 4),
        "decode_evict_", "v")


