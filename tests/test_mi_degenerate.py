"""budget="mi" when the text->vision block has one guidance row or one vision slot.

The joint p(t, v) = A[t, v] / S of such a block is the product of its marginals exactly, so its
mutual information I is 0, and the "mi" shares (S * I) are all 0: uniform budgets. Computed as a
sum of p log(p / (p_t p_v)) terms, I came out as rounding noise of either sign instead (1e-17
here, 0 there), and the noise decided which layer got the whole budget, differently on the CPU
op, the CUDA kernels and the reference (found by tests/test_ops_fuzz.py at more examples).
"""

import pytest
import torch

from conftest import OPS, ref

from tgvkv import torch_impl

D = 8


def _problem(kind, seed):
    g = torch.Generator().manual_seed(seed)
    B, N, L, Hkv, Hq = 2, 9, 3, 2, 4
    mod = torch.ones(B, N, dtype=torch.int8)
    if kind == "one_vision_slot":  # text, 1 vision slot, then 6 guidance rows
        mod[:, 1] = 2
    else:  # "one_guidance_row": 7 vision slots, then the last slot is the only guidance row
        mod[:, 1:8] = 2
    q_pos = ref.guidance_positions(mod)
    T = q_pos.shape[1]
    qs = [torch.randn(B, Hq, T, D, generator=g) for _ in range(L)]
    ks = [torch.randn(B, Hkv, N, D, generator=g) for _ in range(L)]
    vs = [torch.randn(B, Hkv, N, D, generator=g) for _ in range(L)]
    return qs, ks, vs, q_pos, mod


@pytest.mark.parametrize("kind", ["one_vision_slot", "one_guidance_row"])
def test_mi_is_exactly_zero_and_budgets_match_the_reference(kind):
    for seed in range(40):
        qs, ks, vs, q_pos, mod = _problem(kind, seed)
        for q, k in zip(qs, ks):
            got = OPS.score_text_vision(q, k, q_pos, mod, D ** -0.5, text_score="guidance")[1]
            exp = ref.score_text_vision(q, k, q_pos, mod, D ** -0.5, text_score="guidance")[1]
            assert (got[:, 0] > 0).all() and torch.equal(got[:, 1], torch.zeros(2)), (seed, got)
            assert torch.equal(exp[:, 1], torch.zeros(2)), (seed, exp)
            plain = torch_impl.score_text_vision(q, k, q_pos, mod, D ** -0.5, text_score="guidance")[1]
            assert torch.equal(plain[:, 1], torch.zeros(2)), (seed, plain)  # the bench's baseline
        kc, vc = [k.clone() for k in ks], [v.clone() for v in vs]
        out = OPS.evict(kc, vc, qs, q_pos, mod, D ** -0.5, 0.3, "mi", False, 0,
                        text_score="guidance")
        keep, frac = ref.layer_budgets(
            torch.stack([ref.score_text_vision(q, k, q_pos, mod, D ** -0.5,
                                               text_score="guidance")[1] for q, k in zip(qs, ks)]),
            q_pos, mod, 0.3, "mi", False, 0)
        assert torch.equal(out[1], keep), (seed, out[1], keep)
        # every share 0: the uniform split, the same keep count in every layer
        assert (out[1] == out[1][0]).all() and torch.allclose(out[3], frac), (seed, out[3])
