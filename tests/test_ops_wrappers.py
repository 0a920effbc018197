"""The typed Python wrappers (tgvkv.ops.* and their tgvkv.* re-exports) give the same results as
torch.ops.tgvkv.*; the vectorised modality_map / guidance_positions equal the reference; and
torch.compile(fullgraph=True) over the wrapper tgvkv.ops.evict equals eager."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tgvkv
import tgvkv.ops as tops
from conftest import DEVICES, OPS, make_modality, randn, ref
from test_ops_opcheck import README_OPS, SAMPLES
from test_ops_properties import batches


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(y) for y in x)
    return x


def _flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in _flat(y)]
    return []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(README_OPS))
def test_wrapper_equals_torch_op(device, name):
    assert getattr(tgvkv, name) is getattr(tops, name), f"tgvkv.{name} is not tgvkv.ops.{name}"
    for args, kwargs in SAMPLES[name](device):
        a1, a2 = _clone(args), _clone(args)
        r1 = getattr(OPS, name)(*a1, **kwargs)
        r2 = getattr(tops, name)(*a2, **kwargs)
        for x, y in zip(_flat(r1), _flat(r2)):
            assert torch.equal(x, y), name
        for x, y in zip(_flat(a1), _flat(a2)):  # the same in-place effects
            assert torch.equal(x, y), name


@given(mod=batches(max_B=4, max_N=30))
@settings(max_examples=60, deadline=None)
def test_guidance_positions_equals_reference(mod):
    assert torch.equal(tops.guidance_positions(mod), ref.guidance_positions(mod))
    assert tgvkv.guidance_positions is tops.guidance_positions


@pytest.mark.parametrize("device", DEVICES)
def test_guidance_positions_edge_cases(device):
    cases = [torch.empty(0, 5, dtype=torch.int8), torch.empty(3, 0, dtype=torch.int8),
             torch.zeros(2, 6, dtype=torch.int8),                                  # all pad
             torch.ones(2, 6, dtype=torch.int8),                                   # no vision
             torch.tensor([[1, 2, 2, 2], [0, 1, 2, 2]], dtype=torch.int8),         # ends w/ vision
             make_modality([60, 35, 8], [12, 0, 3], 3, "mixed", seed=3)]
    for mod in cases:
        got = tops.guidance_positions(mod.to(device))
        exp = ref.guidance_positions(mod)
        assert got.dtype == torch.int64 and got.device.type == device
        assert torch.equal(got.cpu(), exp), (mod, got, exp)


@pytest.mark.parametrize("device", DEVICES)
def test_modality_map_equals_reference(device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 40), generator=g)
    ids[0, 5:20] = 32000
    ids[1, 3:9] = 32001
    ids[1, 12:30] = 32000
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, 30:] = 0
    for vt, am in (([32000, 32001], mask), ([32000], None), ([], mask)):
        got = tops.modality_map(ids.to(device), vt, None if am is None else am.to(device))
        exp = ref.modality_map(ids, vt, am)
        assert got.dtype == torch.int8 and torch.equal(got.cpu(), exp)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_wrapper_evict(device):
    torch._dynamo.reset()
    L, Hq, Hkv, D = 2, 4, 2, 64
    mod = make_modality([36, 29], [5, 4], 2, "right", seed=8)
    q_pos = ref.guidance_positions(mod).to(device)
    mod = mod.to(device)
    B, N, T = mod.shape[0], mod.shape[1], q_pos.shape[1]
    kc = [randn((B, Hkv, N, D), torch.bfloat16, l, device) for l in range(L)]
    vc = [randn((B, Hkv, N, D), torch.bfloat16, 9 + l, device) for l in range(L)]
    qs = [randn((B, Hq, T, D), torch.bfloat16, 20 + l, device) for l in range(L)]

    def f(kc, vc, qs):
        return tops.evict(kc, vc, qs, q_pos, mod, 1 / math.sqrt(D), 0.25, "mi", True, 4, text_score="guidance")

    ke, ve = _clone(kc), _clone(vc)
    exp = f(ke, ve, qs)
    kg, vg = _clone(kc), _clone(vc)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(kg, vg, qs)
    for a, b in zip(got, exp):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(kg + vg, ke + ve))
