"""The SnapKV / PyramidKV baselines against their reference algorithms, written out in pure torch.

No kvpress needed (``tests/test_kvpress_crosscheck.py`` runs the same comparison against kvpress
itself when it is installed). The references follow the SnapKV and PyramidKV reference code (and
kvpress 0.5.5): SnapKV scores a slot before the observation window by the attention it gets from
the window's queries, average-pooled over the slots *before* the window (zero-padded ends);
PyramidKV splits the budget arithmetically, the bottom layer capped at ``N - window``.

Regression: before, SnapKV max-pooled over all slots (the window's own, large, columns leaked into
the scores of the slots just before it) and PyramidKV clipped a bottom layer above ``N`` without
giving the excess back, so at ``keep_ratio`` above about 0.51 it kept far less than asked.
"""

import math

import pytest
import torch

from tgvkv import reference
from tgvkv.eval import baselines

PAD, TEXT, VISION = 0, 1, 2


def _ref_snapkv(q, k, window, kernel, scale):
    """One unpadded sample: q [Hq, n, D], k [Hkv, n, D] -> prefix scores [n - window]."""
    Hq, n, _ = q.shape
    g = Hq // k.shape[0]
    per_head = []
    for h in range(Hq):
        logits = q[h, -window:] @ k[h // g].T * scale  # [window, n]
        causal = torch.arange(n)[None, :] <= torch.arange(n - window, n)[:, None]
        A = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
        votes = A[:, : n - window].sum(0)[None, None]  # [1, 1, n - window]
        per_head.append(torch.nn.functional.avg_pool1d(votes, kernel, 1, kernel // 2)[0, 0])
    return torch.stack(per_head).mean(0)


def test_snapkv_scores_match_reference():
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, N, D, W, K = 2, 4, 2, 40, 8, 6, 5
    q = torch.randn(B, Hq, N, D, generator=g) * 2
    k = torch.randn(B, Hkv, N, D, generator=g) * 2
    mod = torch.full((B, N), TEXT, dtype=torch.int8)
    mod[:, 5:20] = VISION
    mod[1, :7] = PAD  # left padding: the window and the pool follow the real slots
    policy = baselines.policy_class("snapkv")(keep_ratio=0.5, window=W, kernel=K)
    s, _ = policy.layer_scores(0, q, k, reference.guidance_positions(mod), mod, 0.3)
    for b in range(B):
        real = torch.nonzero(mod[b] != PAD).flatten()
        ref = _ref_snapkv(q[b][:, real], k[b][:, real], W, K, 0.3)
        torch.testing.assert_close(s[b, real[:-W]], ref, rtol=1e-5, atol=1e-7)
        assert bool((s[b, real[-W:]] == 1e30).all())
        assert bool((s[b][mod[b] == PAD] == 0).all())


def test_snapkv_rejects_an_even_kernel():
    with pytest.raises(ValueError, match="kernel"):
        baselines.policy_class("snapkv")(keep_ratio=0.5, kernel=4)


def _ref_pyramid(n, keep_ratio, window, beta, L):
    """kvpress 0.5.5 PyramidKVPress.get_layer_budget (the reference code's pyramid, with the
    same total as SnapKV's uniform budgets); None where kvpress falls back to uniform budgets."""
    budget = n * keep_ratio
    kmin = budget / beta
    kmax = 2 * budget - kmin
    if kmax >= n - window:
        kmax = n - window
        kmin = 2 * budget - kmax
    if not (n >= kmax >= kmin >= window):
        return None
    steps = (kmax - kmin) / (L - 1)
    return [round(kmax - l * steps) for l in range(L)]


@pytest.mark.parametrize("n,keep_ratio,beta,L", [
    (64, 0.5, 20, 4), (64, 0.5, 2, 4), (64, 0.8, 20, 4), (64, 0.8, 20, 3), (400, 0.5, 20, 5),
    (200, 0.5, 4, 6), (75, 0.6, 20, 2)])
def test_pyramidkv_budgets_match_reference(n, keep_ratio, beta, L):
    window = 8
    mod = torch.full((1, n), TEXT, dtype=torch.int8)
    mod[0, 3:n // 2] = VISION
    policy = baselines.policy_class("pyramidkv")(keep_ratio=keep_ratio, n_sink=0, window=window,
                                                 beta=float(beta))
    keep, _ = policy.budgets(torch.ones(L, 1, 2), reference.guidance_positions(mod), mod)
    ref = _ref_pyramid(n, keep_ratio, window, beta, L)
    assert ref is not None  # the cases are chosen where the reference keeps a pyramid
    assert keep[:, 0].tolist() == ref
    assert abs(int(keep.sum()) - L * n * keep_ratio) <= L / 2  # the total is kept


@pytest.mark.parametrize("keep_ratio", [0.55, 0.7, 0.8, 0.95])
def test_pyramidkv_keeps_the_total_at_high_keep_ratios(keep_ratio):
    n, L = 75, 4  # the harness's tiny LLaVA prompt length
    mod = torch.full((1, n), TEXT, dtype=torch.int8)
    mod[0, 5:69] = VISION
    policy = baselines.policy_class("pyramidkv")(keep_ratio=keep_ratio)
    keep, _ = policy.budgets(torch.ones(L, 1, 2), reference.guidance_positions(mod), mod)
    k = keep[:, 0].tolist()
    assert k == sorted(k, reverse=True) and max(k) <= n
    assert abs(sum(k) - L * n * keep_ratio) <= L / 2 + 1e-9, (k, L * n * keep_ratio)
    assert math.isclose(sum(k) / (L * n), keep_ratio, abs_tol=0.01)
