"""The policy hooks (tgvkv.policy) against tgvkv.reference, without a model."""

import pytest
import torch

from tgvkv import reference
from tgvkv.policy import TGVKV, Policy, guidance_attention

PAD, TEXT, VISION = 0, 1, 2


def _case(B=2, Hq=4, Hkv=2, N=40, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, N, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    mod = torch.full((B, N), TEXT, dtype=torch.int8)
    mod[0, 6:26] = VISION
    mod[1, :3] = PAD  # left padding
    mod[1, 8:14] = VISION
    mod[1, 17:30] = VISION
    return q, k, mod, reference.guidance_positions(mod)


def test_layer_scores_match_reference():
    q, k, mod, q_pos = _case()
    # default text_score="all_queries": the hook hands the full queries to the op
    scores, stats = TGVKV(keep_ratio=0.2).layer_scores(0, q, k, q_pos, mod, 0.35)
    rs, rst = reference.score_text_vision(q, k, q_pos, mod, 0.35, text_score="all_queries")
    assert torch.allclose(scores, rs, atol=1e-5)
    assert torch.allclose(stats, rst, atol=1e-5, rtol=1e-4)
    gs, gst = TGVKV(keep_ratio=0.2, text_score="guidance").layer_scores(0, q, k, q_pos, mod, 0.35)
    rows = torch.stack([q[b, :, q_pos[b].clamp(min=0)] for b in range(q.shape[0])])
    rs, rst = reference.score_text_vision(rows, k, q_pos, mod, 0.35, text_score="guidance")
    assert torch.allclose(gs, rs, atol=1e-5)
    assert torch.allclose(gst, rst, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(gs, scores, atol=1e-3)  # text before the images ranks differently


def test_text_weighting_off_uses_plain_column_sums():
    q, k, mod, q_pos = _case(seed=1)
    scores, _ = TGVKV(keep_ratio=0.2, text_weighting=False).layer_scores(0, q, k, q_pos, mod, 0.35)
    rows = torch.stack([q[b, :, q_pos[b].clamp(min=0)] for b in range(q.shape[0])])
    A = reference.text_attention(rows, k, q_pos, mod, 0.35)
    colsum = A.sum(1)
    vis = mod == VISION
    assert torch.allclose(scores[vis], colsum[vis], atol=1e-5)
    assert torch.allclose(guidance_attention(rows, k, q_pos, mod, 0.35), A, atol=1e-5)


def test_uniform_budgets_and_text_priority_switches():
    L = 4
    q, k, mod, q_pos = _case(seed=2)
    stats = torch.rand(L, 2, 2)
    stats[0] *= 10
    keep_u, _ = TGVKV(keep_ratio=0.3, uniform_budgets=True).budgets(stats, q_pos, mod)
    keep_m, _ = TGVKV(keep_ratio=0.3).budgets(stats, q_pos, mod)
    assert len(set(keep_u[:, 0].tolist())) == 1 and len(set(keep_m[:, 0].tolist())) > 1
    scores = torch.zeros(L, 2, 40)
    scores[:, :, :] = 0.01
    scores[:, 0, 10] = 5.0  # a vision slot far above every text slot
    keep = torch.full((L, 2), 12, dtype=torch.int64)
    idx_tp, _ = TGVKV(keep_ratio=0.3).select(scores, keep, q_pos, mod)
    idx_np, _ = TGVKV(keep_ratio=0.3, text_priority=False).select(scores, keep, q_pos, mod)
    assert 10 not in idx_tp[0, 0].tolist()  # text outranks vision
    assert 10 in idx_np[0, 0].tolist()


def test_base_policy_needs_layer_scores():
    with pytest.raises(NotImplementedError):
        Policy(keep_ratio=0.5).layer_scores(0, None, None, None, None, 1.0)
    with pytest.raises(ValueError, match="keep_ratio"):
        Policy(keep_ratio=0)
