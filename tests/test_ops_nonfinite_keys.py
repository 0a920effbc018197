"""Non-finite keys on CPU: a NaN or inf in a key the op reads is an error, whatever its position in
the kernels' vectors; a key the op does not read (a pad slot, a dead decode slot) may hold anything.

The row softmax of the CPU kernels works on vectors of 8 or 16 keys. A NaN logit in lane 0 of a
vector used to make the row's maximum NaN, which the kernel took for "every key masked" and left
the row out in silence (finite, wrong scores); an -inf logit passed as a probability of 0; and a
NaN in a pad slot's key turned the pad mask (added -inf) into NaN and dropped every row of its
sample. Each key position is tried, so every lane of every vector is, under each capability (see
test_ops_cpu_capabilities.py).
"""

import pytest
import torch

from conftest import OPS

B, HQ, HKV, N, D, T = 2, 4, 2, 40, 16, 8
NONFINITE = [float("nan"), float("inf"), float("-inf")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MODES = ["all_queries", "guidance"]


def _same_bits(a, b):
    """Equal tensors, NaN included (torch.equal says NaN != NaN)."""
    bits = {4: torch.int32, 2: torch.int16, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(bits), b.view(bits))


def _problem(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mod = torch.ones(B, N, dtype=torch.int8)
    mod[:, 6:N - T] = 2  # text 0..5 (sinks among them), vision, then T guidance rows
    mod[1, :3] = 0  # sample 1 left-padded: slots 0..2 are pad
    q_pos = torch.arange(N - T, N).repeat(B, 1)
    k = torch.randn(B, HKV, N, D, generator=g).to(dtype)
    v = torch.randn(B, HKV, N, D, generator=g).to(dtype)
    q = torch.randn(B, HQ, N, D, generator=g)
    q[..., 5] = q[..., 5].abs() + 0.1  # so an -inf in dim 5 of a key gives -inf logits only
    return q.to(dtype), k, v, q_pos, mod


def _score(q, k, q_pos, mod, mode):
    qq = q if mode == "all_queries" else q[:, :, N - T:]
    return OPS.score_text_vision(qq, k, q_pos, mod, D ** -0.5, text_score=mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_live_key_is_an_error_at_every_position(dtype, mode):
    q, k, _, q_pos, mod = _problem(dtype)
    silent = []
    for value in NONFINITE:
        for j in range(3, N):  # every real slot of sample 1
            for hk in range(HKV):
                kk = k.clone()
                kk[1, hk, j, 5] = value  # logits NaN, +inf or -inf (q[..., 5] > 0)
                try:
                    _score(q, kk, q_pos, mod, mode)
                except RuntimeError as e:
                    assert "score_text_vision" in str(e) and "'k'" in str(e), str(e)
                    continue
                silent.append((value, j, hk))
    assert not silent, f"non-finite keys accepted (value, slot, kv head): {silent}"


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("mode", MODES)
def test_evict_refuses_a_non_finite_key_before_any_write(value, mode):
    q, k, v, q_pos, mod = _problem(torch.float32)
    L = 2
    for j in (3, 8, 16, 32, N - 1):  # lane 0 of AVX2 / AVX-512 vectors, and the last slot
        kc = [k.clone() for _ in range(L)]
        vc = [v.clone() for _ in range(L)]
        kc[1][1, 0, j, 5] = value
        before = [t.clone() for t in kc + vc]
        qs = [q if mode == "all_queries" else q[:, :, N - T:]] * L
        with pytest.raises(RuntimeError, match="evict.*k_cache"):
            OPS.evict(kc, vc, qs, q_pos, mod, D ** -0.5, 0.3, text_score=mode)
        assert all(_same_bits(a, b_) for a, b_ in zip(kc + vc, before)), f"slot {j} written"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pad_keys_may_hold_anything(dtype, mode):
    q, k, v, q_pos, mod = _problem(dtype)
    s0, st0 = _score(q, k, q_pos, mod, mode)
    for value in NONFINITE + [1e4]:
        kk = k.clone()
        kk[1, :, :3] = value  # the pad slots of sample 1
        s, st = _score(q, kk, q_pos, mod, mode)
        assert torch.equal(s, s0) and torch.equal(st, st0), value
    # and evict keeps the same slots
    L = 2
    qs = [q if mode == "all_queries" else q[:, :, N - T:]] * L
    kc0, vc0 = [k.clone() for _ in range(L)], [v.clone() for _ in range(L)]
    kc, vc = [k.clone() for _ in range(L)], [v.clone() for _ in range(L)]
    for t in kc:
        t[1, :, :3] = float("nan")
    out0 = OPS.evict(kc0, vc0, qs, q_pos, mod, D ** -0.5, 0.3, text_score=mode)
    out = OPS.evict(kc, vc, qs, q_pos, mod, D ** -0.5, 0.3, text_score=mode)
    assert all(torch.equal(a, b_) for a, b_ in zip(out, out0))


def _decode(dtype, slot=None, value=None, length=36, S=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, HKV, S, D, generator=g).to(dtype)
    v = torch.randn(B, HKV, S, D, generator=g).to(dtype)
    q = torch.randn(B, HQ, D, generator=g)
    q[..., 3] = q[..., 3].abs() + 0.1  # an -inf in dim 3 of a key: -inf logits only
    q = q.to(dtype)
    if slot is not None:
        k[1, 0, slot, 3] = value
    pos = torch.arange(S).repeat(B, 1)
    return [k, v, pos, torch.full((B,), length, dtype=torch.int64), q,
            torch.full((B,), 100, dtype=torch.int64), torch.full((B,), 0.1, dtype=torch.float64),
            torch.full((B,), 2, dtype=torch.int64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_non_finite_live_key_is_an_error(dtype):
    silent = []
    for value in NONFINITE:
        for slot in range(36):
            a = _decode(dtype, slot, value)
            before = [t.clone() for t in a[:4]]
            try:
                OPS.decode_evict_(*a, D ** -0.5, 4)
            except RuntimeError as e:
                assert "decode_evict_" in str(e) and "'k'" in str(e), str(e)
                assert all(_same_bits(x, y) for x, y in zip(a[:4], before))
                continue
            silent.append((value, slot))
    assert not silent, f"non-finite live keys accepted (value, slot): {silent}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_dead_slots_may_hold_anything(dtype):
    a0 = _decode(dtype)
    got0 = OPS.decode_evict_(*a0, D ** -0.5, 4)
    for value in NONFINITE:
        a = _decode(dtype, 38, value)  # slot 38 >= length 36: not live
        got = OPS.decode_evict_(*a, D ** -0.5, 4)
        assert torch.equal(got, got0) and torch.equal(a[0][:, :, :36], a0[0][:, :, :36])


@pytest.mark.parametrize("value", NONFINITE)
def test_decode_layers_non_finite_live_key_is_an_error(value):
    """decode_evict_layers_ (the same kernel over L layers): refused, nothing written."""
    L = 3
    per = [_decode(torch.float32, seed=s) for s in range(L)]
    per[1][0][1, 0, 16, 3] = value  # layer 1, lane 0 of a vector
    k, v, pos = [a[0] for a in per], [a[1] for a in per], [a[2] for a in per]
    length = torch.stack([a[3] for a in per])
    queries = [a[4] for a in per]
    before = [t.clone() for t in k + v + pos] + [length.clone()]
    with pytest.raises(RuntimeError, match="decode_evict_layers_.*k_cache.*layer 1"):
        OPS.decode_evict_layers_(k, v, pos, length, queries, per[0][5],
                                 torch.stack([a[6] for a in per]),
                                 torch.stack([a[7] for a in per]), D ** -0.5, 4)
    assert all(_same_bits(a, b_) for a, b_ in zip(k + v + pos + [length], before))
