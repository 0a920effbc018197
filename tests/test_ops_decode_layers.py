"""decode_evict_layers_ (one decode step of a whole cache in one call) against the reference and
against the per-layer decode_evict_ it generalises.

Scenario: L layers with different slot capacities, ragged live lengths across layers and samples,
padding slots after each live range, GQA, one layer that never evicts (keep fraction 1) and one
sample with r_l < 0 (fraction > 1). Every step appends a token to every layer, then
- the fused op and L calls of decode_evict_ on a copy must give bit-identical tensors (same victim,
  same slot moves) and evicted positions;
- the reference, run on the op's state sorted by pos (its layout), must evict the same pos unless
  the two are a fp32 near-tie of the head-averaged attention (relative 1e-5, float64 recompute),
  and leave the same set of live (pos, K, V) entries.
"""

import math

import pytest
import torch

from conftest import DEVICES, DTYPES, OPS, randn, ref
from tgvkv import ops as tops


def _attention64(k, q, n, scale, g):
    Hq = q.shape[0]
    acc = torch.zeros(n, dtype=torch.float64)
    for h in range(Hq):
        acc += torch.softmax((k[h // g, :n].double() @ q[h].double()) * scale, 0)
    return acc / Hq


def _state(L, B, Hq, Hkv, D, dtype, device, seed, steps, n_sink=4):
    g = torch.Generator().manual_seed(seed)
    n_prompt = torch.randint(24, 48, (B,), generator=g)
    frac = torch.rand(L, B, generator=g, dtype=torch.float64) * 0.4 + 0.15
    frac[L - 1] = 1.0            # a layer that never evicts
    if B >= 2:
        frac[0, 1] = 1.6         # r_l < 0 in layer 0, sample 1: never evicts
    n_prot = torch.randint(1, 6, (L, B), generator=g)
    ks, vs, ps, lens = [], [], [], []
    for l in range(L):
        row = [min(int(n_prompt[b]), int(n_prompt[b] * min(1.0, float(frac[l, b]))) + 5)
               for b in range(B)]
        S = max(row) + steps + 3 + 4 * l  # ragged capacities, pad slots after the live ones
        k = randn((B, Hkv, S, D), dtype, seed + 10 * l + 1, device)
        v = randn((B, Hkv, S, D), dtype, seed + 10 * l + 2, device)
        pos = torch.full((B, S), -1, dtype=torch.int64)
        for b in range(B):
            n = row[b]
            rest = torch.randperm(int(n_prompt[b]) - 1 - n_sink, generator=g)[: n - n_sink - 1]
            keep = sorted(set(range(n_sink)) | {int(n_prompt[b]) - 1} |
                          set((rest + n_sink).tolist()))
            pos[b, :len(keep)] = torch.tensor(keep)
            row[b] = len(keep)
        ks.append(k)
        vs.append(v)
        ps.append(pos.to(device))
        lens.append(row)
    length = torch.tensor(lens, dtype=torch.int64, device=device)
    return ks, vs, ps, length, n_prompt.to(torch.int64).to(device), frac.to(device), \
        n_prot.to(device)


def _sorted_cpu(k, v, pos, n):
    """One sample's live slots ordered by pos (the reference's layout)."""
    order = torch.argsort(pos[:n].cpu())
    return k[:, :n].cpu()[:, order], v[:, :n].cpu()[:, order], pos[:n].cpu()[order]


def _check_against_reference(ks, vs, ps, length, qs, n_seen, frac, n_prot, ev, scale, n_sink,
                             snap):
    """The op's step (ks.. after, ev) against the reference run on the sorted pre-step state."""
    L, B = length.shape
    for l in range(L):
        k0, v0, p0, len0 = snap[l]
        Hq, Hkv = qs[l].shape[1], k0.shape[1]
        for b in range(B):
            n = int(len0[b])
            kr, vr, pr = _sorted_cpu(k0[b], v0[b], p0[b], n)
            kr, vr, pr = kr[None].clone(), vr[None].clone(), pr[None].clone()
            lr = torch.tensor([n])
            er = ref.decode_evict_(kr, vr, pr, lr, qs[l][b:b + 1].cpu(), n_seen[b:b + 1].cpu(),
                                   frac[l, b:b + 1].cpu(), n_prot[l, b:b + 1].cpu(), scale, n_sink)
            eo = int(ev[l, b])
            if eo != int(er[0]):
                assert eo >= 0 and int(er[0]) >= 0, (l, b, eo, int(er[0]))
                att = _attention64(kr[0], qs[l][b].cpu(), n, scale, Hq // Hkv)
                # near-tie among the reference's candidates (its layout: ascending pos)
                order = {int(p): s for s, p in enumerate(_sorted_cpu(k0[b], v0[b], p0[b], n)[2])}
                a, r = float(att[order[eo]]), float(att[order[int(er[0])]])
                assert abs(a - r) <= 1e-5 * max(a, r), (l, b, eo, a, int(er[0]), r)
                continue
            m = int(length[l, b])
            assert m == int(lr[0]), (l, b, m, int(lr[0]))
            ko, vo, po = _sorted_cpu(ks[l][b], vs[l][b], ps[l][b], m)
            assert torch.equal(po, pr[0, :m]), (l, b)
            assert torch.equal(ko, kr[0, :, :m]) and torch.equal(vo, vr[0, :, :m]), (l, b)
            # the n_sink sinks never move
            assert ps[l][b, :n_sink].cpu().tolist() == p0[b, :n_sink].tolist()


def _run(device, dtype, L, B, Hq, Hkv, D, steps, seed, n_sink=4):
    scale = 1.0 / math.sqrt(D)
    ks, vs, ps, length, n_seen, frac, n_prot = _state(L, B, Hq, Hkv, D, dtype, device, seed, steps,
                                                      n_sink)
    # the per-layer op's copy of the state
    ks2, vs2, ps2 = [t.clone() for t in ks], [t.clone() for t in vs], [t.clone() for t in ps]
    len2 = length.clone()
    n_ev = 0
    for step in range(steps):
        for l in range(L):  # append one token per layer and sample, on both copies
            nk = randn((B, Hkv, D), dtype, 500 + 7 * step + l, device)
            nv = randn((B, Hkv, D), dtype, 900 + 7 * step + l, device)
            for b in range(B):
                s = int(length[l, b])
                for kk, vv, pp in ((ks, vs, ps), (ks2, vs2, ps2)):
                    kk[l][b, :, s], vv[l][b, :, s], pp[l][b, s] = nk[b], nv[b], int(n_seen[b])
        length += 1
        len2 += 1
        n_seen += 1
        qs = [randn((B, Hq, D), dtype, 3000 + 7 * step + l, device) for l in range(L)]
        snap = [(ks[l].cpu().clone(), vs[l].cpu().clone(), ps[l].cpu().clone(),
                 length[l].cpu().clone()) for l in range(L)]
        ev = tops.decode_evict_layers_(ks, vs, ps, length, qs, n_seen, frac, n_prot, scale,
                                       n_sink)
        assert ev.shape == (L, B) and ev.dtype == torch.int64 and ev.device == length.device
        ev_l = torch.stack([OPS.decode_evict_(ks2[l], vs2[l], ps2[l], len2[l], qs[l], n_seen,
                                              frac[l], n_prot[l], scale, n_sink)
                            for l in range(L)])
        assert torch.equal(ev, ev_l), (step, ev, ev_l)
        assert torch.equal(length, len2)
        for l in range(L):
            assert torch.equal(ks[l], ks2[l]) and torch.equal(vs[l], vs2[l])
            assert torch.equal(ps[l], ps2[l])
        _check_against_reference(ks, vs, ps, length, qs, n_seen, frac, n_prot, ev.cpu(), scale,
                                 n_sink, snap)
        assert (ev[L - 1] == -1).all()  # the never-evicting layer
        if B >= 2:
            assert int(ev[0, 1]) == -1
        n_ev += int((ev >= 0).sum())
    return n_ev


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L,B,Hq,Hkv,D", [(3, 3, 8, 2, 64), (2, 1, 4, 4, 32)])
def test_decode_evict_layers_matches_reference_and_per_layer_op(device, dtype, L, B, Hq, Hkv, D):
    assert _run(device, dtype, L, B, Hq, Hkv, D, steps=6, seed=L * 10 + B) > 0


def test_decode_evict_layers_reference_is_the_per_layer_reference():
    """ref.decode_evict_layers_ is the per-layer reference stacked (rows of [L, B] in place)."""
    ks, vs, ps, length, n_seen, frac, n_prot = _state(2, 2, 4, 2, 32, torch.float32, "cpu", 5, 2)
    qs = [randn((2, 4, 32), torch.float32, 40 + l) for l in range(2)]
    copies = ([t.clone() for t in ks], [t.clone() for t in vs], [t.clone() for t in ps],
              length.clone())
    ev = ref.decode_evict_layers_(*copies[:3], copies[3], qs, n_seen, frac, n_prot, 0.2, 4)
    for l in range(2):
        e = ref.decode_evict_(ks[l], vs[l], ps[l], length[l], qs[l], n_seen, frac[l], n_prot[l],
                              0.2, 4)
        assert torch.equal(ev[l], e)
    assert torch.equal(copies[3], length)
    assert ev.shape == (2, 2) and (ev[0] >= 0).any()


def test_decode_evict_layers_empty_cache():
    ev = OPS.decode_evict_layers_([], [], [], torch.zeros(0, 2, dtype=torch.int64), [],
                                  torch.zeros(2, dtype=torch.int64),
                                  torch.zeros(0, 2, dtype=torch.float64),
                                  torch.zeros(0, 2, dtype=torch.int64), 0.1, 4)
    assert ev.shape == (0, 2)


def _small(L=2, B=2, S=16):
    ks = [randn((B, 2, S, 32), seed=l) for l in range(L)]
    vs = [randn((B, 2, S, 32), seed=9 + l) for l in range(L)]
    ps = [torch.arange(S).repeat(B, 1) for _ in range(L)]
    length = torch.full((L, B), S - 2, dtype=torch.int64)
    qs = [randn((B, 4, 32), seed=20 + l) for l in range(L)]
    return [ks, vs, ps, length, qs, torch.full((B,), 40, dtype=torch.int64),
            torch.full((L, B), 0.2, dtype=torch.float64), torch.full((L, B), 2), 0.1]


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a[2].pop(), "'pos' must have one tensor per layer"),
    (lambda a: a.__setitem__(3, a[3][0]), "'length' must have 2 dims"),
    (lambda a: a.__setitem__(6, a[6].float()), "keep_fraction"),
    (lambda a: a.__setitem__(4, [q[:, :3] for q in a[4]]), "heads"),
    (lambda a: a[2].__setitem__(1, a[2][1][:, :5]), r"pos\[1\]"),
    (lambda a: a[0].__setitem__(1, a[0][0]), r"k_cache\[0\]' and 'k_cache\[1\]'.*share memory"),
    (lambda a: a[1].__setitem__(0, a[0][0]), r"k_cache\[0\]' and 'v_cache\[0\]'.*share memory"),
    (lambda a: a[3].__setitem__((0, 0), 99), r"'length' values must be in \[0, S = 16\]"),
])
def test_decode_evict_layers_errors_name_op_and_argument(mutate, match):
    a = _small()
    mutate(a)
    with pytest.raises((RuntimeError, ValueError), match=match) as e:
        OPS.decode_evict_layers_(*a, 4)
    assert "decode_evict_layers_" in str(e.value)


def test_decode_evict_layers_torch_compile_fullgraph():
    a = _small()
    b = [[t.clone() for t in a[0]], [t.clone() for t in a[1]], [t.clone() for t in a[2]],
         a[3].clone()] + a[4:]

    def step(ks, vs, ps, length, qs, n_seen, frac, n_prot):
        return tops.decode_evict_layers_(ks, vs, ps, length, qs, n_seen, frac, n_prot, 0.1, 4)

    ev_c = torch.compile(step, fullgraph=True, backend="aot_eager")(*a[:8])
    ev_e = step(*b[:8])
    assert torch.equal(ev_c, ev_e) and (ev_e >= 0).all()
    assert torch.equal(a[3], b[3])
    for l in range(2):
        assert torch.equal(a[0][l], b[0][l]) and torch.equal(a[2][l], b[2][l])
