"""Property tests (hypothesis, small shapes, bounded examples, deadline=None) of the selection
invariants on the ops' outputs, plus exact agreement with the reference."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import OPS, PAD, TEXT, VISION, randn, real_slots, ref


@st.composite
def batches(draw, max_B=3, max_N=40):
    """A padded batch: per sample a list of modality codes (text / vision runs), padding side."""
    B = draw(st.integers(1, max_B))
    rows = []
    for _ in range(B):
        n = draw(st.integers(1, max_N))
        codes = draw(st.lists(st.sampled_from([TEXT, VISION]), min_size=n, max_size=n))
        rows.append(codes)
    N = max(len(r) for r in rows) + draw(st.integers(0, 4))
    left = draw(st.lists(st.booleans(), min_size=B, max_size=B))
    mod = torch.zeros(B, N, dtype=torch.int8)
    for b, r in enumerate(rows):
        if left[b]:
            mod[b, N - len(r):] = torch.tensor(r, dtype=torch.int8)
        else:
            mod[b, : len(r)] = torch.tensor(r, dtype=torch.int8)
    return mod


def _check_invariants(keep_idx, n_kept, n_prot, keep, mod, scores, q_pos, n_sink):
    L, B, N = keep_idx.shape
    for l in range(L):
        for b in range(B):
            real = real_slots(mod[b])
            kept = [i for i in keep_idx[l, b].tolist() if i >= 0]
            assert keep_idx[l, b, : len(kept)].tolist() == kept          # -1 only after
            assert len(kept) == int(keep[l, b]) == int(n_kept[l, b])     # count == budget
            assert kept == sorted(set(kept))                             # strictly ascending
            assert set(kept) <= set(real)                                # pads never kept
            fixed = set(real[:n_sink]) | ({real[-1]} if real else set())
            assert fixed <= set(kept)                                    # sinks + last kept
            dropped = set(real) - set(kept)
            cand_kept = set(kept) - fixed
            # text-first: no text candidate dropped while a vision candidate survives
            if any(int(mod[b, j]) == TEXT for j in dropped):
                assert all(int(mod[b, j]) != VISION for j in cand_kept), (l, b)
            # within a class, every survivor ranks >= every dropped slot (score, later wins)
            for cls in (TEXT, VISION):
                dk = [(float(scores[l, b, j]), j) for j in dropped if int(mod[b, j]) == cls]
                kk = [(float(scores[l, b, j]), j) for j in cand_kept if int(mod[b, j]) == cls]
                if dk and kk:
                    assert max(dk) < min(kk), (l, b, cls)
            g = [p for p in q_pos[b].tolist() if p >= 0]
            exp_prot = max(1, sum(1 for j in kept if g and j >= g[0])) if g else 1
            assert int(n_prot[l, b]) == exp_prot


@given(mod=batches(), L=st.integers(1, 4), kappa=st.sampled_from([0.05, 0.1, 0.2, 0.5, 1.0]),
       budget=st.sampled_from(["mass", "mi"]), redistribute=st.booleans(),
       n_sink=st.integers(0, 5), seed=st.integers(0, 2**16), ties=st.booleans())
@settings(max_examples=60, deadline=None)
def test_selection_invariants_and_reference(mod, L, kappa, budget, redistribute, n_sink, seed,
                                            ties):
    B, N = mod.shape
    q_pos = ref.guidance_positions(mod)
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(L, B, N, generator=g)
    if ties:
        scores = (scores * 3).floor() / 3
    scores[:, mod == PAD] = 0
    stats = torch.rand(L, B, 2, generator=g)
    keep, frac = OPS.layer_budgets(stats, q_pos, mod, kappa, budget, redistribute, n_sink)
    ek, ef = ref.layer_budgets(stats, q_pos, mod, kappa, budget, redistribute, n_sink)
    assert torch.equal(keep, ek)
    torch.testing.assert_close(frac, ef, rtol=1e-9, atol=1e-12)
    keep_idx, n_prot = OPS.select_keep(scores, keep, q_pos, mod, n_sink)
    ei, ep = ref.select_keep(scores, keep, q_pos, mod, n_sink)
    assert torch.equal(keep_idx, ei) and torch.equal(n_prot, ep)
    # through evict_from_scores, with a cache to compact
    kc = [randn((B, 1, N, 8), torch.float16, seed + l) for l in range(L)]
    vc = [randn((B, 1, N, 8), torch.float16, seed + 9 + l) for l in range(L)]
    kc0 = [t.clone() for t in kc]
    out = OPS.evict_from_scores(kc, vc, scores, stats, q_pos, mod, kappa, budget, redistribute,
                                n_sink)
    assert torch.equal(out[0], keep_idx)
    _check_invariants(out[0], out[1], out[2], keep, mod, scores, q_pos, n_sink)
    for l in range(L):
        for b in range(B):
            n = int(out[1][l, b])
            assert torch.equal(kc[l][b, :, :n], kc0[l][b][:, out[0][l, b, :n]])
    # samples that are not evicted keep all their real slots
    for b in range(B):
        real = real_slots(mod[b])
        has_v = any(int(mod[b, j]) == VISION for j in real)
        if kappa == 1.0 or not has_v or not bool((q_pos[b] >= 0).any()) or len(real) <= n_sink + 1:
            assert out[1][:, b].tolist() == [len(real)] * L


@given(mod=batches(max_B=2, max_N=30), seed=st.integers(0, 2**16),
       Hkv=st.sampled_from([1, 2]), g=st.sampled_from([1, 2, 4]))
@settings(max_examples=25, deadline=None)
def test_evict_keep_ratio_one_is_identity_and_idempotent(mod, seed, Hkv, g):
    """κ = 1 keeps every real slot; applied twice, the second pass changes nothing."""
    B, N = mod.shape
    q_pos = ref.guidance_positions(mod)
    T = q_pos.shape[1]
    L = 2
    qs = [randn((B, Hkv * g, T, 16), seed=seed + l) for l in range(L)]
    kc = [randn((B, Hkv, N, 16), seed=seed + 5 + l) for l in range(L)]
    vc = [randn((B, Hkv, N, 16), seed=seed + 7 + l) for l in range(L)]
    kc0 = [t.clone() for t in kc]
    out = OPS.evict(kc, vc, qs, q_pos, mod, 0.25, 1.0, text_score="guidance")
    for b in range(B):
        real = real_slots(mod[b])
        assert out[1][:, b].tolist() == [len(real)] * L
        assert out[0][0, b, : len(real)].tolist() == real
        for l in range(L):
            assert torch.equal(kc[l][b, :, : len(real)], kc0[l][b][:, real])
    # compact again with the (now front-packed) identity: unchanged
    kc1, vc1 = [t.clone() for t in kc], [t.clone() for t in vc]
    mod2 = torch.zeros_like(mod)
    for b in range(B):
        n = len(real_slots(mod[b]))
        mod2[b, :n] = mod[b][mod[b] != PAD]
    q2 = ref.guidance_positions(mod2)
    qs2 = [randn((B, Hkv * g, q2.shape[1], 16), seed=seed + 11 + l) for l in range(L)]
    out2 = OPS.evict(kc, vc, qs2, q2, mod2, 0.25, 1.0, text_score="guidance")
    assert torch.equal(out2[1], out[1])
    for l in range(L):
        for b in range(B):
            n = int(out[1][l, b])
            assert torch.equal(kc[l][b, :, :n], kc1[l][b, :, :n])
            assert torch.equal(vc[l][b, :, :n], vc1[l][b, :, :n])


@given(mod=batches(max_B=2, max_N=30), seed=st.integers(0, 2**16), kappa=st.sampled_from(
    [0.05, 0.2, 0.5]), g=st.sampled_from([1, 4]))
@settings(max_examples=25, deadline=None)
def test_evict_invariants_random(mod, seed, kappa, g):
    """evict end to end on random small batches: invariants hold on the op's own selection."""
    B, N = mod.shape
    q_pos = ref.guidance_positions(mod)
    T, L, Hkv = q_pos.shape[1], 2, 2
    qs = [randn((B, Hkv * g, T, 16), torch.bfloat16, seed + l) for l in range(L)]
    kc = [randn((B, Hkv, N, 16), torch.bfloat16, seed + 5 + l) for l in range(L)]
    vc = [randn((B, Hkv, N, 16), torch.bfloat16, seed + 7 + l) for l in range(L)]
    sc = [OPS.score_text_vision(q, k, q_pos, mod, 0.25, text_score="guidance") for q, k in zip(qs, kc)]
    scores = torch.stack([s for s, _ in sc])
    stats = torch.stack([t for _, t in sc])
    keep, _ = ref.layer_budgets(stats, q_pos, mod, kappa)
    out = OPS.evict(kc, vc, qs, q_pos, mod, 0.25, kappa, text_score="guidance")
    assert torch.equal(out[1], keep)
    _check_invariants(out[0], out[1], out[2], keep, mod, scores, q_pos, 4)
