"""layer_budgets, select_keep, compact_, evict_from_scores and evict vs the reference.

Selections are compared EXACTLY given the same scores (the op's select_keep is fed the reference
inputs); budgets exactly given the same statistics; compacted K/V bit for bit against a gather of
the kept slots. evict (which computes its own scores) is compared with the reference selection
made from the op's own score_text_vision output, so fp32 near-ties cannot make it flaky.
"""

import math

import pytest
import torch

from conftest import (DEVICES, DTYPES, OPS, assert_compacted, assert_same_kept,
                      assert_scores_close, make_modality, randn, real_slots, ref)

# (n_real per sample, n_guid per sample, n_images, pad)
LAYOUTS = [
    pytest.param([40], [8], 1, "right", id="B1"),
    pytest.param([50, 37], [5, 12], 2, "left", id="B2-left-2img"),
    pytest.param([64, 20, 45], [16, 1, 3], 3, "right", id="B3-3img"),
    pytest.param([30, 33, 12, 25], [4, 0, 2, 7], [2, 1, 1, 0], "mixed", id="B4-mixed-T0-novision"),
    pytest.param([6, 5, 9], [1, 1, 2], 1, "right", id="tiny-N<=6"),
]


def _stats(L, B, seed, zero_I=False):
    g = torch.Generator().manual_seed(seed)
    S = torch.rand(L, B, generator=g) * 3 + 0.01
    I = torch.zeros(L, B) if zero_I else torch.rand(L, B, generator=g) * 0.5 + 0.001
    return torch.stack([S, I], -1).float()


def _scores(L, B, N, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:  # many exact ties: exercises the "later slot wins" tie-break
        return torch.randint(0, 4, (L, B, N), generator=g).float() * 0.25
    return torch.rand(L, B, N, generator=g).float()


# ------------------------------------------------------------------------------------------
# layer_budgets
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_real,n_guid,n_images,pad", LAYOUTS)
@pytest.mark.parametrize("keep_ratio", [0.05, 0.1, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("budget,redistribute", [("mass", False), ("mi", False), ("mass", True),
                                                 ("mi", True)])
@pytest.mark.parametrize("L,n_sink", [(1, 4), (6, 4), (5, 2)])
def test_layer_budgets_matches_reference(device, n_real, n_guid, n_images, pad, keep_ratio,
                                         budget, redistribute, L, n_sink):
    mod = make_modality(n_real, n_guid, n_images, pad, seed=L)
    q_pos = ref.guidance_positions(mod)
    stats = _stats(L, len(n_real), seed=L * 13 + len(n_real))
    if redistribute:  # concentrate mass in layer 0 so it clamps at N and has excess to hand out
        stats[0, :, 0] *= 40
    exp_k, exp_f = ref.layer_budgets(stats, q_pos, mod, keep_ratio, budget, redistribute, n_sink)
    got_k, got_f = OPS.layer_budgets(stats.to(device), q_pos.to(device), mod.to(device),
                                     keep_ratio, budget, redistribute, n_sink)
    assert got_k.dtype == torch.int64 and got_f.dtype == torch.float64
    assert got_k.device.type == device
    assert torch.equal(got_k.cpu(), exp_k), (got_k.cpu(), exp_k)
    torch.testing.assert_close(got_f.cpu(), exp_f, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_layer_budgets_round_half_to_even(device):
    """L=2, equal S: pi = 1/2, r = 1 - kappa; r*N lands exactly on .5: round half to even."""
    cases = [(0.25, 10, 8), (0.25, 14, 10), (0.5, 7, 4), (0.5, 9, 4), (0.5, 11, 6)]
    for kappa, N, forget in cases:
        mod = torch.full((1, N), 1, dtype=torch.int8)
        mod[0, 2:N - 2] = 2  # vision in the middle, 2 guidance slots at the end
        q_pos = ref.guidance_positions(mod)
        stats = torch.tensor([[[1.0, 0.3]], [[1.0, 0.3]]])
        keep, frac = OPS.layer_budgets(stats.to(device), q_pos.to(device), mod.to(device),
                                       kappa, "mass", False, 4)
        exp = N - min(forget, N - 5)
        assert keep.cpu().tolist() == [[exp], [exp]], (kappa, N, keep.cpu().tolist(), exp)
        assert frac.cpu().tolist() == [[kappa], [kappa]]


# ------------------------------------------------------------------------------------------
# select_keep
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_real,n_guid,n_images,pad", LAYOUTS)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n_sink", [4, 1, 0])
def test_select_keep_matches_reference(device, n_real, n_guid, n_images, pad, ties, n_sink):
    L = 3
    mod = make_modality(n_real, n_guid, n_images, pad, seed=2)
    q_pos = ref.guidance_positions(mod)
    B, N = mod.shape
    scores = _scores(L, B, N, seed=n_sink + 17 * ties, ties=ties)
    scores[:, mod == 0] = 0
    g = torch.Generator().manual_seed(5)
    keep = torch.zeros(L, B, dtype=torch.int64)
    for b in range(B):  # any keep count from the structural floor to N_b
        nb = n_real[b]
        lo = min(nb, n_sink + 1)
        keep[:, b] = torch.randint(lo, nb + 1, (L,), generator=g)
    keep[0] = torch.tensor(n_real)  # a layer that keeps everything
    exp_i, exp_p = ref.select_keep(scores, keep, q_pos, mod, n_sink)
    got_i, got_p = OPS.select_keep(scores.to(device), keep.to(device), q_pos.to(device),
                                   mod.to(device), n_sink)
    assert got_i.dtype == torch.int64 and got_p.dtype == torch.int64
    assert got_i.shape == (L, B, N) and got_p.shape == (L, B)
    assert_same_kept(got_i, exp_i)
    assert torch.equal(got_p.cpu(), exp_p), (got_p.cpu(), exp_p)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_select_keep_big(device):
    n_real, n_guid = [3000, 2200], [48, 5]
    mod = make_modality(n_real, n_guid, 3, "left", seed=4)
    q_pos = ref.guidance_positions(mod)
    scores = _scores(2, 2, mod.shape[1], seed=8)
    keep = torch.tensor([[150, 2200], [3000, 111]])
    exp_i, exp_p = ref.select_keep(scores, keep, q_pos, mod)
    got_i, got_p = OPS.select_keep(scores.to(device), keep.to(device), q_pos.to(device),
                                   mod.to(device))
    assert_same_kept(got_i, exp_i)
    assert torch.equal(got_p.cpu(), exp_p)


# ------------------------------------------------------------------------------------------
# compact_
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_real,n_guid,n_images,pad", LAYOUTS)
@pytest.mark.parametrize("Hkv,D", [(1, 64), (4, 128)])
def test_compact_matches_gather(device, dtype, n_real, n_guid, n_images, pad, Hkv, D):
    mod = make_modality(n_real, n_guid, n_images, pad, seed=3)
    q_pos = ref.guidance_positions(mod)
    B, N = mod.shape
    scores = _scores(1, B, N, seed=D)
    keep = torch.tensor([[max(min(nb, 5), nb // 3) for nb in n_real]])
    keep_idx = ref.select_keep(scores, keep, q_pos, mod)[0][0]
    k = randn((B, Hkv, N, D), dtype, 21, device)
    v = randn((B, Hkv, N, D), dtype, 22, device)
    k0, v0 = k.clone(), v.clone()
    n_kept = OPS.compact_(k, v, keep_idx.to(device))
    assert n_kept.dtype == torch.int64 and n_kept.shape == (B,)
    assert n_kept.cpu().tolist() == keep[0].tolist()
    assert_compacted(k, k0, keep_idx, n_kept)
    assert_compacted(v, v0, keep_idx, n_kept)


@pytest.mark.parametrize("device", DEVICES)
def test_compact_all_minus_one_and_identity(device):
    """keep_idx all -1 -> n_kept 0; identity indices -> tensors untouched."""
    k = randn((2, 2, 9, 64), torch.float16, 1, device)
    v = randn((2, 2, 9, 64), torch.float16, 2, device)
    k0, v0 = k.clone(), v.clone()
    idx = torch.full((2, 9), -1, dtype=torch.int64)
    idx[1] = torch.arange(9)
    n = OPS.compact_(k, v, idx.to(device))
    assert n.cpu().tolist() == [0, 9]
    assert torch.equal(k[1], k0[1]) and torch.equal(v[1], v0[1])


@pytest.mark.parametrize("device", DEVICES)
def test_compact_noncontiguous(device):
    """A transposed view of [B, N, H, D] storage: compacted correctly in place, or a clear error."""
    k = randn((2, 4, 20, 64), torch.float32, 1, device, transposed=True)
    v = randn((2, 4, 20, 64), torch.float32, 2, device, transposed=True)
    k0, v0 = k.clone(), v.clone()
    idx = torch.full((2, 20), -1, dtype=torch.int64)
    idx[0, :6] = torch.tensor([0, 1, 5, 7, 12, 19])
    idx[1, :3] = torch.tensor([3, 4, 18])
    try:
        n = OPS.compact_(k, v, idx.to(device))
    except (RuntimeError, ValueError) as e:
        assert "compact_" in str(e) and "contiguous" in str(e).lower(), str(e)
        return
    assert_compacted(k, k0, idx, n)
    assert_compacted(v, v0, idx, n)


# ------------------------------------------------------------------------------------------
# evict_from_scores and evict
# ------------------------------------------------------------------------------------------
def _cache(L, B, Hkv, N, D, dtype, device, seed):
    kc = [randn((B, Hkv, N, D), dtype, seed + 2 * l, device) for l in range(L)]
    vc = [randn((B, Hkv, N, D), dtype, seed + 2 * l + 1, device) for l in range(L)]
    return kc, vc


def _check_outputs(got, exp, kc, vc, kc0, vc0, L, B, N, scores=None, mod=None, rel=0.0,
                   frac_rtol=1e-9):
    gi, gn, gp, gf = got
    ei, en, ep, ef = exp
    assert gi.shape == (L, B, N) and gn.shape == (L, B) and gp.shape == (L, B) and gf.shape == (L, B)
    assert gi.dtype == gn.dtype == gp.dtype == torch.int64 and gf.dtype == torch.float64
    assert torch.equal(gn.cpu(), en), (gn.cpu(), en)
    assert_same_kept(gi, ei, scores, mod, rel)
    assert torch.equal(gp.cpu(), ep) or rel > 0, (gp.cpu(), ep)
    torch.testing.assert_close(gf.cpu(), ef, rtol=frac_rtol, atol=1e-12)
    for l in range(L):  # the op's own kept set defines what must have been gathered
        assert_compacted(kc[l], kc0[l], gi[l].cpu(), gn[l].cpu())
        assert_compacted(vc[l], vc0[l], gi[l].cpu(), gn[l].cpu())


EVICT_CASES = [
    pytest.param(2, 4, 4, 64, [40], [8], 1, "right", id="L2-B1-g1"),
    pytest.param(3, 8, 2, 64, [50, 37], [5, 12], 2, "left", id="L3-B2-g4-left"),
    pytest.param(4, 8, 1, 128, [64, 20, 45], [16, 1, 3], 3, "right", id="L4-B3-g8-D128"),
    pytest.param(2, 4, 1, 64, [30, 33, 12, 25], [4, 0, 2, 7], [2, 1, 1, 0], "mixed",
                 id="L2-B4-mixed-T0-novision"),
    pytest.param(3, 4, 2, 64, [100, 90], [64, 30], 1, "right", id="L3-T64"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L,Hq,Hkv,D,n_real,n_guid,n_images,pad", EVICT_CASES)
@pytest.mark.parametrize("keep_ratio,budget,redistribute", [(0.1, "mass", False),
                                                            (0.3, "mi", True)])
def test_evict_from_scores_matches_reference(device, dtype, L, Hq, Hkv, D, n_real, n_guid,
                                             n_images, pad, keep_ratio, budget, redistribute):
    mod = make_modality(n_real, n_guid, n_images, pad, seed=L)
    q_pos = ref.guidance_positions(mod)
    B, N = mod.shape
    scores = _scores(L, B, N, seed=L + B)
    scores[:, mod == 0] = 0
    stats = _stats(L, B, seed=L * B)
    kc, vc = _cache(L, B, Hkv, N, D, dtype, device, seed=100)
    kc0, vc0 = [t.clone() for t in kc], [t.clone() for t in vc]
    kr, vr = [t.clone().cpu() for t in kc], [t.clone().cpu() for t in vc]
    exp = ref.evict_from_scores(kr, vr, scores, stats, q_pos, mod, keep_ratio, budget,
                                redistribute)
    got = OPS.evict_from_scores(kc, vc, scores.to(device), stats.to(device), q_pos.to(device),
                                mod.to(device), keep_ratio, budget, redistribute, 4)
    _check_outputs(got, exp, kc, vc, kc0, vc0, L, B, N)


def _evict_vs_reference(device, dtype, L, Hq, Hkv, D, n_real, n_guid, n_images, pad,
                        keep_ratio, budget="mass", redistribute=False, n_sink=4, seed=0):
    mod = make_modality(n_real, n_guid, n_images, pad, seed=seed + L)
    q_pos = ref.guidance_positions(mod)
    B, N = mod.shape
    T = q_pos.shape[1]
    scale = 1.0 / math.sqrt(D)
    qs = [randn((B, Hq, T, D), dtype, seed + 50 + l, device) for l in range(L)]
    kc, vc = _cache(L, B, Hkv, N, D, dtype, device, seed=seed + 200)
    kc0, vc0 = [t.clone() for t in kc], [t.clone() for t in vc]
    # the op's own scores (checked against the reference in test_ops_scores)
    sc = [OPS.score_text_vision(q, k, q_pos.to(device), mod.to(device), scale, text_score="guidance")
          for q, k in zip(qs, kc)]
    scores = torch.stack([s for s, _ in sc]).cpu()
    stats = torch.stack([t for _, t in sc]).cpu()
    exp = ref.evict_from_scores([t.cpu().clone() for t in kc], [t.cpu().clone() for t in vc],
                                scores, stats, q_pos, mod, keep_ratio, budget, redistribute,
                                n_sink)
    got = OPS.evict(kc, vc, qs, q_pos.to(device), mod.to(device), scale, keep_ratio, budget,
                    redistribute, n_sink, text_score="guidance")
    # exact unless evict's fused scoring differs from score_text_vision in the last ulp at a
    # near-tie (then the differing slots must be near-ties)
    _check_outputs(got, exp, kc, vc, kc0, vc0, L, B, N, scores, mod, rel=1e-5)
    return scores, mod, q_pos, qs, kc0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L,Hq,Hkv,D,n_real,n_guid,n_images,pad", EVICT_CASES)
@pytest.mark.parametrize("keep_ratio,budget,redistribute,n_sink",
                         [(0.05, "mass", False, 4), (0.2, "mi", False, 4), (0.5, "mass", True, 2)])
def test_evict_matches_reference(device, dtype, L, Hq, Hkv, D, n_real, n_guid, n_images, pad,
                                 keep_ratio, budget, redistribute, n_sink):
    _evict_vs_reference(device, dtype, L, Hq, Hkv, D, n_real, n_guid, n_images, pad, keep_ratio,
                        budget, redistribute, n_sink)


@pytest.mark.parametrize("device", DEVICES)
def test_evict_end_to_end_reference_scores(device):
    """Whole-method check against ref.evict (its own reference scores), tolerant to near-ties."""
    L, B, Hq, Hkv, D = 3, 2, 8, 2, 64
    mod = make_modality([60, 48], [9, 6], 2, "left", seed=31)
    q_pos = ref.guidance_positions(mod)
    N, T = mod.shape[1], q_pos.shape[1]
    qs = [randn((B, Hq, T, D), torch.float32, 60 + l, device) for l in range(L)]
    kc, vc = _cache(L, B, Hkv, N, D, torch.float32, device, seed=300)
    kc0, vc0 = [t.clone() for t in kc], [t.clone() for t in vc]
    kr, vr = [t.cpu().clone() for t in kc], [t.cpu().clone() for t in vc]
    exp = ref.evict(kr, vr, [q.cpu() for q in qs], q_pos, mod, 0.125, 0.1, text_score="guidance")
    sc = [ref.score_text_vision(q.cpu(), k.cpu(), q_pos, mod, 0.125, text_score="guidance") for q, k in zip(qs, kc0)]
    scores = torch.stack([s for s, _ in sc])
    got = OPS.evict(kc, vc, qs, q_pos.to(device), mod.to(device), 0.125, 0.1, text_score="guidance")
    # stats from reference vs op kernels differ in the last fp32 bits: so does keep_fraction
    _check_outputs(got, exp, kc, vc, kc0, vc0, L, B, N, scores, mod, rel=1e-4, frac_rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_evict_big(device):
    _evict_vs_reference(device, torch.bfloat16, 2, 8, 2, 128, [2000, 1500], [32, 10], 3,
                        "right", 0.1, seed=7)


@pytest.mark.parametrize("device", DEVICES)
def test_evict_noncontiguous_queries(device):
    """Queries as transposed views (HF layout): correct, or a clear error naming evict."""
    try:
        mod = make_modality([40, 33], [6, 4], 2, "right", seed=1)
        q_pos = ref.guidance_positions(mod)
        B, N, T = 2, mod.shape[1], q_pos.shape[1]
        qs = [randn((B, 4, T, 64), torch.float32, 5 + l, device, transposed=True)
              for l in range(2)]
        kc, vc = _cache(2, B, 2, N, 64, torch.float32, device, seed=9)
        kc0, vc0 = [t.clone() for t in kc], [t.clone() for t in vc]
        sc = [ref.score_text_vision(q.cpu(), k.cpu(), q_pos, mod, 0.125, text_score="guidance") for q, k in zip(qs, kc)]
        scores = torch.stack([s for s, _ in sc])
        exp = ref.evict_from_scores([t.cpu().clone() for t in kc], [t.cpu().clone() for t in vc],
                                    scores, torch.stack([t for _, t in sc]), q_pos, mod, 0.1)
        got = OPS.evict(kc, vc, qs, q_pos.to(device), mod.to(device), 0.125, 0.1, text_score="guidance")
    except (RuntimeError, ValueError) as e:
        assert "evict" in str(e) and "contiguous" in str(e).lower(), str(e)
        return
    _check_outputs(got, exp, kc, vc, kc0, vc0, 2, B, N, scores, mod, rel=1e-4, frac_rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_evict_unused_query_rows(device):
    """q_pos padded with extra -1 columns (garbage query rows): same result as without them."""
    L, B, Hq, Hkv, D = 2, 2, 4, 2, 64
    mod = make_modality([44, 36], [7, 3], 2, "left", seed=12)
    q_pos = ref.guidance_positions(mod)
    N, T = mod.shape[1], q_pos.shape[1]
    qs = [randn((B, Hq, T, D), torch.float32, 70 + l, device) for l in range(L)]
    extra = torch.cat([q_pos, torch.full((B, 4), -1, dtype=torch.int64)], 1)
    qs_x = [torch.cat([q, randn((B, Hq, 4, D), torch.float32, 90 + l, device)], 2)
            for l, q in enumerate(qs)]
    kc, vc = _cache(L, B, Hkv, N, D, torch.float32, device, seed=400)
    kc2, vc2 = [t.clone() for t in kc], [t.clone() for t in vc]
    a = OPS.evict(kc, vc, qs, q_pos.to(device), mod.to(device), 0.125, 0.15, text_score="guidance")
    b = OPS.evict(kc2, vc2, qs_x, extra.to(device), mod.to(device), 0.125, 0.15, text_score="guidance")
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert all(torch.equal(x, y) for x, y in zip(kc + vc, kc2 + vc2))


def test_evict_deterministic_across_threads():
    """Same inputs, same kept indices and scores, whatever the CPU thread count."""
    L, B, Hq, Hkv, D = 3, 3, 8, 2, 64
    mod = make_modality([300, 250, 120], [20, 9, 4], 3, "mixed", seed=13)
    q_pos = ref.guidance_positions(mod)
    N, T = mod.shape[1], q_pos.shape[1]
    qs = [randn((B, Hq, T, D), torch.bfloat16, 80 + l) for l in range(L)]
    base = _cache(L, B, Hkv, N, D, torch.bfloat16, "cpu", seed=500)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3, 4, 1):
            torch.set_num_threads(threads)
            kc, vc = [t.clone() for t in base[0]], [t.clone() for t in base[1]]
            s = [OPS.score_text_vision(q, k, q_pos, mod, 0.125, text_score="guidance") for q, k in zip(qs, kc)]
            out = OPS.evict(kc, vc, qs, q_pos, mod, 0.125, 0.1, text_score="guidance")
            results.append((s, out, kc, vc))
    finally:
        torch.set_num_threads(old)
    s0, out0, kc0, vc0 = results[0]
    for s, out, kc, vc in results[1:]:
        for (a, b), (c, d) in zip(s, s0):
            assert torch.equal(a, c) and torch.equal(b, d), "scores depend on the thread count"
        for x, y in zip(out, out0):
            assert torch.equal(x, y)
        assert all(torch.equal(x, y) for x, y in zip(kc + vc, kc0 + vc0))


@pytest.mark.parametrize("device", DEVICES)
def test_evict_noncontiguous_cache(device):
    """k_cache / v_cache as transposed views of [B, N, H, D] storage: compacted correctly in
    place (through the views), or a clear error naming evict."""
    L, B, Hq, Hkv, D = 2, 2, 4, 2, 64
    mod = make_modality([40, 33], [6, 4], 2, "right", seed=14)
    q_pos = ref.guidance_positions(mod)
    N, T = mod.shape[1], q_pos.shape[1]
    qs = [randn((B, Hq, T, D), torch.float32, 5 + l, device) for l in range(L)]
    kc = [randn((B, Hkv, N, D), torch.float32, 30 + l, device, transposed=True) for l in range(L)]
    vc = [randn((B, Hkv, N, D), torch.float32, 40 + l, device, transposed=True) for l in range(L)]
    kc0, vc0 = [t.clone() for t in kc], [t.clone() for t in vc]
    exp_k, exp_v = [t.clone().contiguous() for t in kc], [t.clone().contiguous() for t in vc]
    try:
        got = OPS.evict(kc, vc, qs, q_pos.to(device), mod.to(device), 0.125, 0.2, text_score="guidance")
    except (RuntimeError, ValueError) as e:
        assert "evict" in str(e) and "contiguous" in str(e).lower(), str(e)
        return
    exp = OPS.evict(exp_k, exp_v, qs, q_pos.to(device), mod.to(device), 0.125, 0.2, text_score="guidance")
    for x, y in zip(got, exp):
        assert torch.equal(x, y)
    for l in range(L):
        assert_compacted(kc[l], kc0[l], got[0][l].cpu(), got[1][l].cpu())
        assert_compacted(vc[l], vc0[l], got[0][l].cpu(), got[1][l].cpu())
