"""decode_append_ (the per-layer cache append of a decode step) against the reference, its
plain-PyTorch composition (tgvkv.torch_impl) and the errors it must raise.

Random K/V (never zeros), every dtype, ragged lengths across samples, the strided views the model
layer passes (length: a row of the [L, B] decode state; mask: [:, 0, 0, :M] of a [B, 1, 1, S]
buffer; k_new / v_new: the transposed projections of transformers), masks shorter than the
capacity, several steps in a row, and the empty batch.
"""

import pytest
import torch

from conftest import DEVICES, DTYPES, OPS, randn, ref
from tgvkv import ops as tops
from tgvkv import torch_impl


def _case(B, H, S, D, Dv, dtype, device, seed, transposed_new=False):
    g = torch.Generator().manual_seed(seed)
    k = randn((B, H, S, D), dtype, seed + 1, device)
    v = randn((B, H, S, Dv), dtype, seed + 2, device)
    pos = torch.randint(0, 10_000, (B, S), generator=g).to(device)
    lengths = torch.randint(0, max(S - 3, 1), (3, B), generator=g)  # row 1 is this layer's
    lengths = lengths.to(device)
    mbuf = torch.randint(0, 2, (B, 1, 1, S), generator=g).bool().to(device)  # stale garbage
    k_new = randn((B, H, 1, D), dtype, seed + 3, device, transposed=transposed_new)
    v_new = randn((B, H, 1, Dv), dtype, seed + 4, device, transposed=transposed_new)
    return k, v, pos, lengths, mbuf, k_new, v_new


def _run(fn, k, v, pos, lengths, mbuf, k_new, v_new, M, position):
    k, v, pos, lengths, mbuf = (t.clone() for t in (k, v, pos, lengths, mbuf))
    fn(k, v, pos, lengths[1], mbuf[:, 0, 0, :M], k_new, v_new, position)
    return k, v, pos, lengths, mbuf


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,S,D,Dv,M", [(1, 1, 8, 16, 16, 8), (3, 4, 40, 64, 64, 29),
                                          (2, 2, 17, 30, 12, 17), (5, 8, 64, 128, 128, 1)])
def test_matches_reference(device, dtype, B, H, S, D, Dv, M):
    args = _case(B, H, S, D, Dv, dtype, device, seed=B * 100 + S, transposed_new=H > 1)
    # M slots of mask: at least every live slot after the append in this test's use
    got = _run(OPS.decode_append_, *args, M=M, position=1234)
    exp = _run(ref.decode_append_, *args, M=M, position=1234)
    plain = _run(torch_impl.decode_append_, *args, M=M, position=1234)
    for g_, e_, p_ in zip(got, exp, plain):
        assert torch.equal(g_, e_)
        assert torch.equal(p_, e_)
    k, v, pos, lengths, mbuf = got
    before = args[3][1]
    assert torch.equal(lengths[1], before + 1)
    assert torch.equal(lengths[0], args[3][0]) and torch.equal(lengths[2], args[3][2])
    for b in range(B):
        n = int(before[b])
        assert torch.equal(k[b, :, n], args[5][b, :, 0]) and torch.equal(v[b, :, n], args[6][b, :, 0])
        assert int(pos[b, n]) == 1234
        assert mbuf[b, 0, 0, :M].tolist() == [s <= n for s in range(M)]
        assert torch.equal(mbuf[b, 0, 0, M:], args[4][b, 0, 0, M:])  # beyond M: untouched
        # every other slot untouched
        others = [s for s in range(S) if s != n]
        assert torch.equal(k[b, :, others], args[0][b, :, others])
        assert torch.equal(pos[b, others], args[2][b, others])


@pytest.mark.parametrize("device", DEVICES)
def test_steps_in_a_row_and_wrapper(device):
    B, H, S, D = 2, 2, 12, 8
    k = randn((B, H, S, D), torch.float32, 1, device)
    v = randn((B, H, S, D), torch.float32, 2, device)
    pos = torch.full((B, S), -1, dtype=torch.int64, device=device)
    length = torch.tensor([0, 5], device=device)
    mask = torch.zeros(B, S, dtype=torch.bool, device=device)
    news = [(randn((B, H, 1, D), torch.float32, 10 + i, device),
             randn((B, H, 1, D), torch.float32, 20 + i, device)) for i in range(6)]
    for i, (kn, vn) in enumerate(news):
        tops.decode_append_(k, v, pos, length, mask, kn, vn, 100 + i)
    assert length.tolist() == [6, 11]
    assert pos[0, :6].tolist() == list(range(100, 106))
    assert pos[1, 5:11].tolist() == list(range(100, 106))
    for i, (kn, vn) in enumerate(news):
        assert torch.equal(k[0, :, i], kn[0, :, 0]) and torch.equal(v[1, :, 5 + i], vn[1, :, 0])
    assert mask.tolist() == [[s < 6 for s in range(S)], [s < 11 for s in range(S)]]


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    k = torch.randn(0, 2, 4, 8, device=device)
    OPS.decode_append_(k, k.clone(), torch.zeros(0, 4, dtype=torch.int64, device=device),
                       torch.zeros(0, dtype=torch.int64, device=device),
                       torch.zeros(0, 4, dtype=torch.bool, device=device),
                       torch.randn(0, 2, 1, 8, device=device), torch.randn(0, 2, 1, 8, device=device),
                       3)


def _good(device="cpu"):
    B, H, S, D = 2, 2, 6, 4
    return dict(k=torch.randn(B, H, S, D, device=device), v=torch.randn(B, H, S, D, device=device),
                pos=torch.zeros(B, S, dtype=torch.int64, device=device),
                length=torch.tensor([1, 2], device=device),
                mask=torch.zeros(B, S, dtype=torch.bool, device=device),
                k_new=torch.randn(B, H, 1, D, device=device),
                v_new=torch.randn(B, H, 1, D, device=device), position=7)


def _call(a):
    OPS.decode_append_(a["k"], a["v"], a["pos"], a["length"], a["mask"], a["k_new"], a["v_new"],
                       a["position"])


BAD = {
    "k_new 3 dims": (lambda a: a.update(k_new=a["k_new"][:, :, 0]), r"'k_new' must have 4 dims"),
    "k_new two tokens": (lambda a: a.update(k_new=torch.randn(2, 2, 2, 4)), r"'k_new' dim 2"),
    "v_new heads": (lambda a: a.update(v_new=torch.randn(2, 3, 1, 4)), r"'v_new' dim 1"),
    "k_new dtype": (lambda a: a.update(k_new=a["k_new"].half()), r"'k_new' must have the dtype"),
    "pos dtype": (lambda a: a.update(pos=a["pos"].int()), r"'pos' must be int64"),
    "length 2 dims": (lambda a: a.update(length=a["length"][None]), r"'length' must have 1 dims"),
    "mask dtype": (lambda a: a.update(mask=a["mask"].to(torch.uint8)), r"'mask' must be bool"),
    "mask too wide": (lambda a: a.update(mask=torch.zeros(2, 7, dtype=torch.bool)),
                      r"'mask' covers 7 slots, more than the S = 6"),
    "negative position": (lambda a: a.update(position=-1), r"'position' must be >= 0"),
    "k_new aliases k": (lambda a: a.update(k_new=a["k"][:, :, :1]), r"'k_new' shares memory with 'k'"),
    "mask aliases pos": (lambda a: a.update(mask=a["pos"].view(torch.bool)[:, :6]),
                         r"share memory|dim 1"),
    "int k": (lambda a: a.update(k=a["k"].long(), v=a["v"].long(), k_new=a["k_new"].long(),
                                 v_new=a["v_new"].long()), r"'k' must be"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_arguments(name):
    change, msg = BAD[name]
    a = _good()
    change(a)
    with pytest.raises((RuntimeError, ValueError), match=r"decode_append_.*" + msg):
        _call(a)


@pytest.mark.parametrize("length", [[6, 1], [1, -1], [2**62, 0]])
def test_no_free_slot_raises_before_writing(length):
    """CPU: a sample without a free slot raises (naming the op, the argument and the range)
    before ANY sample is written."""
    a = _good()
    a["length"] = torch.tensor(length)
    before = {n: t.clone() for n, t in a.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(RuntimeError, match=r"decode_append_: 'length' values must be in \[0, S - 1 = 5\]"):
        _call(a)
    for n, t in before.items():
        assert torch.equal(a[n], t), f"{n} was written before the error"


def test_python_wrapper_checks_position_type():
    a = _good()
    with pytest.raises(TypeError, match=r"decode_append_: position must be an int"):
        tops.decode_append_(a["k"], a["v"], a["pos"], a["length"], a["mask"], a["k_new"],
                            a["v_new"], 7.0)


def test_fake_kernel_checks_like_the_op():
    """Under FakeTensorMode (torch.compile tracing) the same shape errors are raised."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        a = {n: (mode.from_tensor(t) if isinstance(t, torch.Tensor) else t)
             for n, t in _good().items()}
        _call(a)  # valid: no error
        a["mask"] = mode.from_tensor(torch.zeros(2, 7, dtype=torch.bool))
        with pytest.raises(RuntimeError, match=r"decode_append_: 'mask' covers 7 slots"):
            _call(a)
