"""Hand-computed tiny cases for tgvkv.reference itself, so the oracle is checked too.

Every expected number below is derived by hand from shared/SPEC.md (fractions in comments).
"""

import math

import pytest
import torch

from conftest import ref

T_, V_, P_ = ref.TEXT, ref.VISION, ref.PAD


def _mod(codes):
    return torch.tensor([codes], dtype=torch.int8)


# ------------------------------------------------------------------------------------------
# attention rows
# ------------------------------------------------------------------------------------------
def test_text_attention_one_hot_keys():
    """Keys = identity, scale 1: logits = q, so softmax(log w) = w / Σw over visible slots."""
    k = torch.eye(4).view(1, 1, 4, 4)
    q = torch.zeros(1, 2, 2, 4)
    q[0, 0, 0] = torch.tensor([1., 1., 2., 4.]).log()   # head 0, row of slot 1
    q[0, 1, 0] = torch.tensor([4., 2., 1., 1.]).log()   # head 1, row of slot 1
    q[0, 0, 1] = torch.tensor([1., 1., 2., 4.]).log()   # head 0, row of slot 3
    q[0, 1, 1] = torch.tensor([4., 2., 1., 1.]).log()   # head 1, row of slot 3
    q_pos = torch.tensor([[1, 3]])
    A = ref.text_attention(q, k, q_pos, _mod([T_, T_, T_, T_]), 1.0)
    # slot 1 sees {0, 1}: head0 [1/2, 1/2], head1 [2/3, 1/3] -> mean [7/12, 5/12]
    torch.testing.assert_close(A[0, 0], torch.tensor([7 / 12, 5 / 12, 0, 0]))
    # slot 3 sees all: head0 [1,1,2,4]/8, head1 [4,2,1,1]/8 -> [5,3,3,5]/16
    torch.testing.assert_close(A[0, 1], torch.tensor([5., 3., 3., 5.]) / 16)
    # slot 0 is a pad: head0 [0,1,2,4]/7, head1 [0,2,1,1]/4 -> [0, 9/28, 15/56, 23/56]
    A = ref.text_attention(q[:, :, 1:], k, q_pos[:, 1:], _mod([P_, T_, T_, T_]), 1.0)
    torch.testing.assert_close(A[0, 0], torch.tensor([0, 9 / 28, 15 / 56, 23 / 56]))


def test_text_attention_gqa_head_mapping():
    """Hq=4, Hkv=2: query heads 0,1 read KV head 0; heads 2,3 read KV head 1."""
    k = torch.zeros(1, 2, 2, 2)
    k[0, 0] = torch.eye(2)            # KV head 0: logits = q
    k[0, 1] = torch.zeros(2, 2)       # KV head 1: logits 0 -> uniform
    q = torch.zeros(1, 4, 1, 2)
    q[0, 0, 0] = torch.tensor([1., 3.]).log()
    q[0, 1, 0] = torch.tensor([1., 3.]).log()
    q[0, 2, 0] = torch.tensor([100., 0.])
    q[0, 3, 0] = torch.tensor([100., 0.])
    A = ref.text_attention(q, k, torch.tensor([[1]]), _mod([V_, T_]), 1.0)
    # heads 0,1: [1/4, 3/4]; heads 2,3: [1/2, 1/2] -> mean [3/8, 5/8]
    torch.testing.assert_close(A[0, 0], torch.tensor([3 / 8, 5 / 8]))


# ------------------------------------------------------------------------------------------
# scores and statistics
# ------------------------------------------------------------------------------------------
MOD8 = [T_, T_, V_, V_, V_, T_, T_, T_]     # guidance = slots 5, 6, 7
A8 = torch.tensor([[
    [0.1, 0.1, 0.2, 0.3, 0.1, 0.2, 0.0, 0.0],   # row of slot 5
    [0.1, 0.0, 0.1, 0.2, 0.2, 0.4, 0.1, 0.0],   # row of slot 6
    [0.0, 0.1, 0.1, 0.1, 0.3, 0.1, 0.2, 0.5],   # row of slot 7
]])


def test_scores_from_attention_by_hand():
    scores, stats = ref.scores_from_attention(A8, torch.tensor([[5, 6, 7]]), _mod(MOD8))
    # text weights (causal column means over the guidance rows that see the slot):
    # w5 = (.2+.4+.1)/3 = 7/30, w6 = (.1+.2)/2 = .15, w7 = .5/1 = .5
    w5, w6, w7 = 7 / 30, 0.15, 0.5
    exp = torch.tensor([
        0.1 + 0.1 + 0.0,                      # text: column sums over guidance rows
        0.1 + 0.0 + 0.1,
        w5 * .2 + w6 * .1 + w7 * .1,          # vision: Σ_t w_t A[t, v]  = 0.111667
        w5 * .3 + w6 * .2 + w7 * .1,          # 0.15
        w5 * .1 + w6 * .2 + w7 * .3,          # 0.203333
        0.2 + 0.4 + 0.1,
        0.0 + 0.1 + 0.2,
        0.0 + 0.0 + 0.5,
    ])
    torch.testing.assert_close(scores[0], exp)
    # S = Σ of the vision block = .6 + .5 + .5 = 1.6
    blk = torch.tensor([[.2, .3, .1], [.1, .2, .2], [.1, .1, .3]], dtype=torch.float64)
    p = blk / blk.sum()
    H = lambda x: -(x * x.log()).sum()  # noqa: E731
    mi = H(p.sum(1)) + H(p.sum(0)) - H(p.flatten())   # I = H(rows) + H(cols) - H(joint)
    torch.testing.assert_close(stats[0], torch.tensor([1.6, float(mi)]), rtol=1e-6, atol=1e-7)
    assert float(mi) > 0


def test_mutual_information_zero_for_independent_block():
    """A rank-1 text->vision block (rows proportional) has I = 0."""
    A = torch.zeros(1, 2, 5)
    A[0, 0, 1:3] = torch.tensor([0.1, 0.2])
    A[0, 1, 1:3] = torch.tensor([0.2, 0.4])
    _, stats = ref.scores_from_attention(A, torch.tensor([[3, 4]]), _mod([T_, V_, V_, T_, T_]))
    assert abs(float(stats[0, 0]) - 0.9) < 1e-6 and abs(float(stats[0, 1])) < 1e-6


def test_guidance_positions():
    mod = torch.tensor([[T_, V_, T_, V_, T_, T_, P_],
                        [P_, P_, T_, T_, T_, T_, T_],      # no vision: no guidance
                        [P_, T_, V_, V_, T_, P_, P_],
                        [T_, T_, V_, V_, V_, V_, V_]],     # ends with vision: none
                       dtype=torch.int8)
    assert ref.guidance_positions(mod).tolist() == [[4, 5], [-1, -1], [4, -1], [-1, -1]]


# ------------------------------------------------------------------------------------------
# budgets
# ------------------------------------------------------------------------------------------
def _q20():
    mod = _mod([T_] * 2 + [V_] * 14 + [T_] * 4)
    return mod, ref.guidance_positions(mod)


@pytest.mark.parametrize("kappa,keep,frac", [
    # S = [3, 1] -> π = [.75, .25]; r = 1 - 2κπ; forget = round(r·20), capped at 20-5 = 15
    (0.3, [9, 5], [0.45, 0.15]),     # r = [.55, .85] -> forget [11, 17->15]
    (0.5, [15, 5], [0.75, 0.25]),    # r = [.25, .75] -> forget [5, 15]
    (1.0, [20, 20], [1.0, 1.0]),     # κ = 1: not evicted
])
def test_layer_budgets_by_hand(kappa, keep, frac):
    mod, q_pos = _q20()
    for budget, stats in (("mass", [[[3.0, 0.2]], [[1.0, 0.9]]]),
                          ("mi", [[[1.0, 3.0]], [[1.0, 1.0]]])):     # S·I = [3, 1]
        k, f = ref.layer_budgets(torch.tensor(stats), q_pos, mod, kappa, budget)
        assert k[:, 0].tolist() == keep, budget
        torch.testing.assert_close(f[:, 0], torch.tensor(frac, dtype=torch.float64))


def test_layer_budgets_redistribute_by_hand():
    """N = 40, S = [9, 1], κ = .6: targets L·κ·π·N = [43.2, 4.8]. Without redistribution layer 0
    keeps 40 (r = -.08) and layer 1 forgets round(.88·40) = 35 -> keeps 5. With it, the 3.2
    excess goes to layer 1: target 8 -> r = .8 -> forget 32 -> keeps 8, fractions [1, .2]."""
    mod = _mod([T_] * 2 + [V_] * 30 + [T_] * 8)
    q_pos = ref.guidance_positions(mod)
    stats = torch.tensor([[[9.0, 0.0]], [[1.0, 0.0]]])
    k, f = ref.layer_budgets(stats, q_pos, mod, 0.6)
    assert k[:, 0].tolist() == [40, 5]
    torch.testing.assert_close(f[:, 0], torch.tensor([1.08, 0.12], dtype=torch.float64))
    k, f = ref.layer_budgets(stats, q_pos, mod, 0.6, redistribute=True)
    assert k[:, 0].tolist() == [40, 8]
    torch.testing.assert_close(f[:, 0], torch.tensor([1.0, 0.2], dtype=torch.float64))


def test_layer_budgets_zero_mass_uniform():
    mod, q_pos = _q20()
    k, f = ref.layer_budgets(torch.zeros(4, 1, 2), q_pos, mod, 0.25)
    # π = 1/4: r = 1 - 4·.25·.25 = .75 -> forget 15 -> keep 5 in every layer
    assert k[:, 0].tolist() == [5] * 4
    torch.testing.assert_close(f[:, 0], torch.full((4,), 0.25, dtype=torch.float64))


# ------------------------------------------------------------------------------------------
# selection
# ------------------------------------------------------------------------------------------
MOD12 = [T_, T_] + [V_] * 6 + [T_] * 4     # guidance = slots 8..11
SC12 = [9.0, 9.0, 0.5, 0.1, 0.9, 0.3, 0.3, 0.7, 0.01, 0.02, 0.0, 9.0]


@pytest.mark.parametrize("keep,kept,n_prot", [
    # n_sink = 2: fixed {0, 1, 11}; candidates 2..10, ranked (class, score, later wins ties):
    # vision 3 (.1) < 5 (.3) < 6 (.3, later) < 2 (.5) < 7 (.7) < 4 (.9) < text 10 < 8 < 9
    (12, list(range(12)), 4),
    (10, [0, 1, 2, 4, 6, 7, 8, 9, 10, 11], 4),          # drop 3, 5 (tie 5/6: earlier goes)
    (9, [0, 1, 2, 4, 7, 8, 9, 10, 11], 4),
    (6, [0, 1, 8, 9, 10, 11], 4),                       # all vision goes before any text
    (4, [0, 1, 9, 11], 2),                              # then text by score: 10, 8
    (3, [0, 1, 11], 1),
    (0, [0, 1, 11], 1),                                 # the floor is never dropped
])
def test_select_keep_by_hand(keep, kept, n_prot):
    mod = _mod(MOD12)
    idx, prot = ref.select_keep(torch.tensor([[SC12]]), torch.tensor([[keep]]),
                                ref.guidance_positions(mod), mod, n_sink=2)
    assert idx[0, 0, : len(kept)].tolist() == kept
    assert bool((idx[0, 0, len(kept):] == -1).all())
    assert int(prot[0, 0]) == n_prot


def test_select_keep_padding_and_sinks_are_real_slots():
    """Left padding: sinks are the first n_sink REAL slots; pads never kept."""
    mod = _mod([P_, P_, P_] + MOD12)
    sc = torch.tensor([[[100.0] * 3 + SC12]])
    idx, prot = ref.select_keep(sc, torch.tensor([[6]]), ref.guidance_positions(mod), mod,
                                n_sink=2)
    assert idx[0, 0, :6].tolist() == [3, 4, 11, 12, 13, 14]
    assert int(prot[0, 0]) == 4


def test_compact_by_hand():
    k = torch.arange(2 * 1 * 5 * 2, dtype=torch.float32).view(2, 1, 5, 2)
    v = -k.clone()
    k0 = k.clone()
    idx = torch.tensor([[0, 2, 4, -1, -1], [1, -1, -1, -1, -1]])
    n = ref.compact_(k, v, idx)
    assert n.tolist() == [3, 1]
    assert torch.equal(k[0, 0, :3], k0[0, 0, [0, 2, 4]])
    assert torch.equal(k[1, 0, :1], k0[1, 0, [1]])
    assert torch.equal(v[0, 0, :3], -k0[0, 0, [0, 2, 4]])


# ------------------------------------------------------------------------------------------
# the whole method on a 2-head, N = 8 example
# ------------------------------------------------------------------------------------------
def test_evict_two_heads_n8_by_hand():
    """Keys = identity (D = 8, one KV head, two query heads), scale 1, so each head's attention
    row is the chosen weights / their sum. Layout T T V V V V T T, guidance = slots 6, 7.

    row 6: head0 [1,1,4,1,2,1,2]/12, head1 [1,1,2,3,1,1,3]/12 -> mean [2,2,6,4,3,2,5]/24
    row 7: both heads [1,1,1,1,1,2,1,4]/12
    w6 = (5/24 + 1/12)/2 = 7/48, w7 = 4/12 = 1/3
    vision: v2 = 7/48·6/24 + 1/3·1/12 = 37/576, v3 = 30/576, v4 = 26.5/576, v5 = 39/576
    text: slot0 = slot1 = 4/24, slot6 = 7/24, slot7 = 8/24.  S = 15/24 + 10/24 = 25/24.
    One layer (π = 1), n_sink = 2: fixed {0, 1, 7}; candidates 2..6, vision ascending 4, 3, 2, 5.
    """
    mod = _mod([T_, T_, V_, V_, V_, V_, T_, T_])
    q_pos = ref.guidance_positions(mod)
    assert q_pos.tolist() == [[6, 7]]
    big = 0.0  # masked slots (j > p) get any logit; use 0
    w = {(0, 6): [1, 1, 4, 1, 2, 1, 2], (1, 6): [1, 1, 2, 3, 1, 1, 3],
         (0, 7): [1, 1, 1, 1, 1, 2, 1, 4], (1, 7): [1, 1, 1, 1, 1, 2, 1, 4]}
    q = torch.full((1, 2, 2, 8), big)
    for (h, p), ws in w.items():
        q[0, h, p - 6, : len(ws)] = torch.tensor(ws, dtype=torch.float32).log()
    k = torch.eye(8).view(1, 1, 8, 8)
    scores, stats = ref.score_text_vision(q, k, q_pos, mod, 1.0, text_score="guidance")
    exp = torch.tensor([4 / 24, 4 / 24, 37 / 576, 30 / 576, 26.5 / 576, 39 / 576, 7 / 24, 8 / 24])
    torch.testing.assert_close(scores[0], exp, rtol=1e-5, atol=1e-7)
    assert abs(float(stats[0, 0]) - 25 / 24) < 1e-5
    for kappa, kept in [(0.75, [0, 1, 2, 5, 6, 7]),      # forget round(.25·8) = 2: slots 4, 3
                        (0.625, [0, 1, 5, 6, 7]),        # forget 3: 4, 3, 2
                        (0.5, [0, 1, 6, 7]),             # forget 4: all vision, text survives
                        (1.0, list(range(8)))]:
        kc, vc = [k.clone().expand(1, 1, 8, 8).contiguous()], [k.clone() * 2]
        idx, n_kept, n_prot, frac = ref.evict(kc, vc, [q], q_pos, mod, 1.0, kappa, n_sink=2, text_score="guidance")
        assert idx[0, 0, : len(kept)].tolist() == kept, kappa
        assert n_kept.tolist() == [[len(kept)]]
        assert int(n_prot[0, 0]) == 2
        assert torch.equal(kc[0][0, 0, : len(kept)], torch.eye(8)[kept])
        assert abs(float(frac[0, 0]) - kappa) < 1e-12


def test_policy_from_attention_matches_rows():
    """The eager-attention policy reads the guidance rows of the full attention matrix."""
    N = 8
    mod = _mod([T_, T_, V_, V_, V_, V_, T_, T_])
    att = torch.zeros(1, 2, N, N)
    for i in range(N):
        att[0, :, i, : i + 1] = 1.0 / (i + 1)    # uniform causal rows
    att[0, 0, 6, :7] = torch.tensor([1, 1, 4, 1, 2, 1, 2]) / 12
    att[0, 1, 6, :7] = torch.tensor([1, 1, 2, 3, 1, 1, 3]) / 12
    att[0, :, 7] = torch.tensor([1, 1, 1, 1, 1, 2, 1, 4]) / 12
    idx, keep, prot, frac = ref.policy_from_attention([att], mod, 0.625, n_sink=2)
    assert idx[0, 0, :5].tolist() == [0, 1, 5, 6, 7]
    # all_queries text scores sum over every row (released behaviour); vision is unchanged
    idx2, *_ = ref.policy_from_attention([att], mod, 0.625, text_score="all_queries", n_sink=2)
    assert idx2[0, 0, :5].tolist() == [0, 1, 5, 6, 7]
    with pytest.raises(ValueError, match="text_score"):
        ref.policy_from_attention([att], mod, 0.5, text_score="bogus")


# ------------------------------------------------------------------------------------------
# decode-time eviction
# ------------------------------------------------------------------------------------------
def _decode_state(weights):
    S = 8
    k = torch.eye(S).view(1, 1, S, S).clone()
    v = (torch.arange(S, dtype=torch.float32) * 10).view(1, 1, S, 1).expand(1, 1, S, S).clone()
    pos = torch.tensor([[0, 1, 2, 3, 10, 11, 12, -1]])
    q = torch.zeros(1, 1, S)
    q[0, 0, : len(weights)] = torch.tensor(weights, dtype=torch.float32).log()
    return k, v, pos, torch.tensor([7]), q


@pytest.mark.parametrize("weights,n_prot,frac,evicted,pos_after", [
    # 7 live slots, pos [0,1,2,3,10,11,12], n_sink 4; forget = int(7 - 20·f)
    ([5, 5, 5, 5, 3, 1, 2], 1, 0.3, 11, [0, 1, 2, 3, 10, 12]),   # lowest candidate: pos 11
    ([5, 5, 5, 5, 3, 1, 2], 2, 0.3, 10, [0, 1, 2, 3, 11, 12]),   # 11 protected: only 10 left
    ([5, 5, 5, 5, 1, 1, 2], 1, 0.3, 10, [0, 1, 2, 3, 11, 12]),   # tie -> smaller pos
    ([5, 5, 5, 5, 3, 1, 2], 1, 0.35, -1, [0, 1, 2, 3, 10, 11, 12]),  # forget = 0
    ([5, 5, 5, 5, 3, 1, 2], 3, 0.3, -1, [0, 1, 2, 3, 10, 11, 12]),   # no candidate
    ([5, 5, 5, 5, 3, 1, 2], 1, 1.0, -1, [0, 1, 2, 3, 10, 11, 12]),   # not evicted
    ([0.1, 5, 5, 5, 3, 1, 2], 1, 0.3, 11, [0, 1, 2, 3, 10, 12]),  # sinks never candidates
])
def test_decode_evict_by_hand(weights, n_prot, frac, evicted, pos_after):
    k, v, pos, length, q = _decode_state(weights)
    ev = ref.decode_evict_(k, v, pos, length, q, torch.tensor([20]),
                           torch.tensor([frac], dtype=torch.float64), torch.tensor([n_prot]),
                           1.0, 4)
    assert ev.tolist() == [evicted]
    n = len(pos_after)
    assert int(length[0]) == n
    assert pos[0, :n].tolist() == pos_after
    slot_of = {p: s for s, p in enumerate([0, 1, 2, 3, 10, 11, 12])}
    for s, p in enumerate(pos_after):  # K/V rows moved with their pos
        assert torch.equal(k[0, 0, s], torch.eye(8)[slot_of[p]])
        assert float(v[0, 0, s, 0]) == 10 * slot_of[p]
