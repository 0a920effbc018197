"""SPEC §5 degenerate cases, one test each (through the ops, checked against the reference and
against hand-derived expectations)."""

import math

import pytest
import torch

from conftest import (DEVICES, OPS, assert_compacted, make_modality, randn, real_slots, ref)

KAPPA = 0.1


def _evict(device, mod, L=3, Hq=4, Hkv=2, D=64, keep_ratio=KAPPA, n_sink=4, seed=0,
           dtype=torch.float32):
    q_pos = ref.guidance_positions(mod)
    B, N = mod.shape
    T = q_pos.shape[1]
    qs = [randn((B, Hq, T, D), dtype, seed + l, device) for l in range(L)]
    kc = [randn((B, Hkv, N, D), dtype, seed + 10 + l, device) for l in range(L)]
    vc = [randn((B, Hkv, N, D), dtype, seed + 20 + l, device) for l in range(L)]
    kc0, vc0 = [t.clone() for t in kc], [t.clone() for t in vc]
    out = OPS.evict(kc, vc, qs, q_pos.to(device), mod.to(device), 1 / math.sqrt(D), keep_ratio,
                    "mass", False, n_sink, text_score="guidance")
    return [o.cpu() for o in out], kc, vc, kc0, vc0, q_pos


def _assert_not_evicted(out, mod, b, kc, vc, kc0, vc0):
    keep_idx, n_kept, n_prot, frac = out
    real = real_slots(mod[b])
    for l in range(keep_idx.shape[0]):
        assert int(n_kept[l, b]) == len(real), (l, b, int(n_kept[l, b]), len(real))
        assert keep_idx[l, b, : len(real)].tolist() == real
        assert bool((keep_idx[l, b, len(real):] == -1).all())
        assert float(frac[l, b]) == 1.0
        assert_compacted(kc[l][b:b + 1], kc0[l][b:b + 1], keep_idx[l, b:b + 1], n_kept[l, b:b + 1])
        assert_compacted(vc[l][b:b + 1], vc0[l][b:b + 1], keep_idx[l, b:b + 1], n_kept[l, b:b + 1])


@pytest.mark.parametrize("device", DEVICES)
def test_no_vision_token_no_eviction(device):
    """Sample 1 is all text: kept whole; sample 0 (with an image) is evicted normally."""
    mod = make_modality([60, 40], [8, 0], [1, 0], "right", seed=1)
    assert not bool((mod[1] == 2).any())
    out, kc, vc, kc0, vc0, q_pos = _evict(device, mod)
    assert bool((q_pos[1] == -1).all())
    _assert_not_evicted(out, mod, 1, kc, vc, kc0, vc0)
    assert bool((out[1][:, 0] < 60).all())  # the other sample did evict
    # the op's own budgets agree
    keep, frac = OPS.layer_budgets(torch.rand(3, 2, 2).to(device), q_pos.to(device),
                                   mod.to(device), KAPPA)
    assert keep[:, 1].cpu().tolist() == [40] * 3 and frac[:, 1].cpu().tolist() == [1.0] * 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("budget", ["mass", "mi"])
def test_zero_interaction_uniform_shares(device, budget):
    """ΣS = 0 (or ΣS·I = 0 for "mi"): uniform shares 1/L: every layer keeps N - round((1-κ)N)."""
    L, N = 4, 100
    mod = make_modality([N, N], [10, 10], 2, "right", seed=2)
    q_pos = ref.guidance_positions(mod)
    stats = torch.rand(L, 2, 2) + 0.1
    if budget == "mass":
        stats[:, 0, 0] = 0.0  # sample 0: no text->vision mass at all
    else:
        stats[:, 0, 1] = 0.0  # sample 0: zero MI everywhere
    for kappa in (0.05, 0.1, 0.3):
        keep, frac = OPS.layer_budgets(stats.to(device), q_pos.to(device), mod.to(device), kappa,
                                       budget)
        forget = min(round((1 - kappa) * N), N - 5)
        assert keep[:, 0].cpu().tolist() == [N - forget] * L, (kappa, keep[:, 0])
        torch.testing.assert_close(frac[:, 0].cpu(), torch.full((L,), kappa, dtype=torch.float64))
        ek, ef = ref.layer_budgets(stats, q_pos, mod, kappa, budget)
        assert torch.equal(keep.cpu(), ek)
    # and through evict_from_scores with crafted stats
    kc = [randn((2, 2, N, 64), seed=l, device=device) for l in range(L)]
    vc = [randn((2, 2, N, 64), seed=9 + l, device=device) for l in range(L)]
    scores = torch.rand(L, 2, N)
    out = OPS.evict_from_scores(kc, vc, scores.to(device), stats.to(device), q_pos.to(device),
                                mod.to(device), 0.1, budget)
    assert out[1][:, 0].cpu().tolist() == [N - min(round(0.9 * N), N - 5)] * L


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pad", ["none", "right", "left"])
def test_keep_ratio_one_untouched(device, dtype, pad):
    """κ = 1: nothing evicted; unpadded / right-padded K/V are bit-identical to the input."""
    n_real = [50, 50] if pad == "none" else [50, 35]
    mod = make_modality(n_real, [7, 5], 2, "right" if pad == "none" else pad, seed=3)
    out, kc, vc, kc0, vc0, _ = _evict(device, mod, keep_ratio=1.0, dtype=dtype)
    for b in range(2):
        _assert_not_evicted(out, mod, b, kc, vc, kc0, vc0)
    if pad in ("none", "right"):
        for l in range(3):
            for b in range(2):
                n = n_real[b]
                assert torch.equal(kc[l][b, :, :n], kc0[l][b, :, :n])
                assert torch.equal(vc[l][b, :, :n], vc0[l][b, :, :n])
        if pad == "none":
            assert all(torch.equal(a, b) for a, b in zip(kc + vc, kc0 + vc0))
    # idempotent: a second κ=1 pass over an unpadded cache changes nothing
    if pad == "none":
        q_pos = ref.guidance_positions(mod)
        qs = [randn((2, 4, q_pos.shape[1], 64), dtype, 5, device) for _ in range(3)]
        out2 = OPS.evict(kc, vc, qs, q_pos.to(device), mod.to(device), 0.125, 1.0, text_score="guidance")
        assert all(torch.equal(a, b) for a, b in zip(kc + vc, kc0 + vc0))
        assert torch.equal(out2[0].cpu(), out[0]) and torch.equal(out2[1].cpu(), out[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_sink", [4, 2])
def test_short_prompt_no_eviction(device, n_sink):
    """N_b <= n_sink + 1: nothing evicted (samples of 1..n_sink+1 real tokens in one batch)."""
    lens = list(range(2, n_sink + 2)) + [n_sink + 12]
    guid = [1] * len(lens)
    mod = make_modality(lens, guid, 1, "mixed", seed=4)
    out, kc, vc, kc0, vc0, q_pos = _evict(device, mod, keep_ratio=0.05, n_sink=n_sink)
    for b in range(len(lens) - 1):
        _assert_not_evicted(out, mod, b, kc, vc, kc0, vc0)
    assert bool((out[1][:, -1] == n_sink + 1).all())  # the long one is cut to the floor


@pytest.mark.parametrize("device", DEVICES)
def test_empty_guidance_no_eviction(device):
    """The prompt ends with a vision token (empty T): that sample is not evicted."""
    mod = make_modality([50, 45], [6, 0], 2, "left", seed=5)
    real1 = real_slots(mod[1])
    assert int(mod[1, real1[-1]]) == 2  # ends with vision
    out, kc, vc, kc0, vc0, q_pos = _evict(device, mod)
    assert bool((q_pos[1] == -1).all())
    _assert_not_evicted(out, mod, 1, kc, vc, kc0, vc0)
    assert bool((out[1][:, 0] < 50).all())
    # the whole batch with empty guidance: T = 0 query rows
    mod0 = make_modality([30, 20], [0, 0], 1, "right", seed=6)
    out0, kc, vc, kc0, vc0, q_pos0 = _evict(device, mod0)
    assert q_pos0.shape[1] == 0
    for b in range(2):
        _assert_not_evicted(out0, mod0, b, kc, vc, kc0, vc0)
    # score_text_vision with T = 0: zero scores and stats
    s, t = OPS.score_text_vision(randn((2, 4, 0, 64), device=device),
                                 randn((2, 2, 30, 64), device=device), q_pos0.to(device),
                                 mod0.to(device), 0.125, text_score="guidance")
    assert s.shape == (2, 30) and t.shape == (2, 2)
    assert bool((s == 0).all()) and bool((t == 0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pad", ["left", "right"])
def test_padding_never_kept_never_counted(device, pad):
    """A sample padded inside a batch keeps exactly what it keeps alone (shifted); pads are
    never in keep_idx and do not count in N_b."""
    L, n = 3, 48
    mod1 = make_modality([n], [6], 2, "right", seed=7)
    q_pos1 = ref.guidance_positions(mod1)
    scores1 = torch.rand(L, 1, n)
    stats1 = torch.rand(L, 1, 2) + 0.05
    kc1 = [randn((1, 2, n, 64), seed=l, device=device) for l in range(L)]
    vc1 = [randn((1, 2, n, 64), seed=5 + l, device=device) for l in range(L)]
    alone = OPS.evict_from_scores([t.clone() for t in kc1], [t.clone() for t in vc1],
                                  scores1.to(device), stats1.to(device), q_pos1.to(device),
                                  mod1.to(device), 0.2)
    P = 13
    N = n + P
    off = P if pad == "left" else 0
    mod = torch.zeros(2, N, dtype=torch.int8)
    mod[0, off:off + n] = mod1[0]
    mod[1] = make_modality([N], [5], 1, "right", seed=8)[0]  # an unpadded neighbour
    q_pos = ref.guidance_positions(mod)
    scores = torch.rand(L, 2, N) * 100  # huge scores on pads: must still never be kept
    scores[:, 0, off:off + n] = scores1[:, 0]
    stats = torch.rand(L, 2, 2) + 0.05
    stats[:, 0] = stats1[:, 0]
    kc = [randn((2, 2, N, 64), seed=50 + l, device=device) for l in range(L)]
    vc = [randn((2, 2, N, 64), seed=60 + l, device=device) for l in range(L)]
    for l in range(L):
        kc[l][0, :, off:off + n] = kc1[l][0]
        vc[l][0, :, off:off + n] = vc1[l][0]
    out = [o.cpu() for o in OPS.evict_from_scores(
        kc, vc, scores.to(device), stats.to(device), q_pos.to(device), mod.to(device), 0.2)]
    alone = [o.cpu() for o in alone]
    for l in range(L):
        m = int(alone[1][l, 0])
        assert int(out[1][l, 0]) == m
        shifted = [i + off for i in alone[0][l, 0, :m].tolist()]
        assert out[0][l, 0, :m].tolist() == shifted
        assert all(int(mod[0, i]) != 0 for i in out[0][l, 0, :m].tolist())
        assert bool((out[0][l, 0, m:] == -1).all())
        assert int(out[2][l, 0]) == int(alone[2][l, 0])
        assert torch.equal(kc[l][0, :, :m].cpu(), kc1[l][0, :, alone[0][l, 0, :m]].cpu())
    torch.testing.assert_close(out[3][:, 0], alone[3][:, 0], rtol=0, atol=0)
    # reference agrees
    exp = ref.evict_from_scores([], [], scores, stats, q_pos, mod, 0.2)
    assert torch.equal(out[0], exp[0]) and torch.equal(out[1], exp[1])
