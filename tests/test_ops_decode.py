"""decode_evict_ vs the reference over many successive decode steps.

The op may keep live slots in any order (it moves the last live slot into the hole); the reference
shifts the tail. Each step compares the SET of live (pos -> K row, V row) entries bit for bit and
the evicted pos. If the op and the reference pick different victims, the two must be a fp32
near-tie of the head-averaged attention (relative 1e-5, recomputed in float64); the reference then
follows the op's choice so later steps stay comparable.
"""

import math

import pytest
import torch

from conftest import DEVICES, DTYPES, OPS, randn, ref


def _live(k, v, pos, length, b):
    out = {}
    for s in range(int(length[b])):
        p = int(pos[b, s])
        assert p not in out, f"sample {b}: pos {p} stored twice"
        out[p] = (k[b, :, s].cpu(), v[b, :, s].cpu())
    return out


def _attention64(k, q, n, scale, g):
    """Head-averaged softmax attention of q over live slots [0, n) of one sample, float64."""
    Hq = q.shape[0]
    acc = torch.zeros(n, dtype=torch.float64)
    for h in range(Hq):
        logits = (k[h // g, :n].double() @ q[h].double()) * scale
        acc += torch.softmax(logits, 0)
    return acc / Hq


def _run_decode(device, dtype, B, Hq, Hkv, D, steps, seed, n_sink=4, transposed=False):
    g = torch.Generator().manual_seed(seed)
    scale = 1.0 / math.sqrt(D)
    n_prompt = torch.randint(20, 60, (B,), generator=g)
    frac = torch.rand(B, generator=g, dtype=torch.float64) * 0.5 + 0.1
    if B >= 3:
        frac[1] = 1.0   # not evicted (keep_ratio 1 / no vision): never evicts
    if B >= 4:
        frac[3] = 1.7   # r_l < 0: never evicts
    n_prot = torch.randint(1, 8, (B,), generator=g)
    lengths = []
    for b in range(B):  # kept prefix: somewhat above target so most steps evict
        lengths.append(min(int(n_prompt[b]), int(n_prompt[b] * min(1.0, float(frac[b]))) + 6))
    S = max(lengths) + steps + 1
    k = randn((B, Hkv, S, D), dtype, seed + 1, device, transposed)
    v = randn((B, Hkv, S, D), dtype, seed + 2, device, transposed)
    pos = torch.full((B, S), -1, dtype=torch.int64)
    for b in range(B):
        n = lengths[b]
        keep = sorted(set(range(n_sink)) | {int(n_prompt[b]) - 1} |
                      set(torch.randperm(int(n_prompt[b]) - 1, generator=g)[: n].tolist()))
        keep = keep[:n_sink] + keep[-(n - n_sink):] if len(keep) > n else keep
        lengths[b] = len(keep)
        pos[b, : len(keep)] = torch.tensor(keep)
    length = torch.tensor(lengths, dtype=torch.int64)
    n_seen = n_prompt.clone().to(torch.int64)
    # op state (device) and reference state (cpu, ascending pos order)
    ko, vo, po, lo = k.clone(), v.clone(), pos.to(device), length.to(device)
    kr, vr, pr, lr = k.cpu().clone(), v.cpu().clone(), pos.clone(), length.clone()
    n_evicted = 0
    for step in range(steps):
        newk = randn((B, Hkv, D), dtype, 1000 + step, device)
        newv = randn((B, Hkv, D), dtype, 2000 + step, device)
        for b in range(B):  # append the new token to both states
            so, sr = int(lo[b]), int(lr[b])
            ko[b, :, so], vo[b, :, so], po[b, so] = newk[b], newv[b], int(n_seen[b])
            kr[b, :, sr], vr[b, :, sr], pr[b, sr] = newk[b].cpu(), newv[b].cpu(), int(n_seen[b])
        lo += 1
        lr += 1
        n_seen += 1
        q = randn((B, Hq, D), dtype, 3000 + step, device)
        snap = (kr.clone(), vr.clone(), pr.clone(), lr.clone())
        ev_ref = ref.decode_evict_(kr, vr, pr, lr, q.cpu(), n_seen, frac, n_prot, scale, n_sink)
        ev_op = OPS.decode_evict_(ko, vo, po, lo, q, n_seen.to(device), frac.to(device),
                                  n_prot.to(device), scale, n_sink)
        assert ev_op.dtype == torch.int64 and ev_op.shape == (B,)
        ev_op = ev_op.cpu()
        for b in range(B):
            if int(ev_op[b]) == int(ev_ref[b]):
                continue
            # different victims: must be a near-tie among the reference's candidates
            kb, pb, n = snap[0][b], snap[2][b], int(snap[3][b])
            assert int(ev_ref[b]) >= 0 and int(ev_op[b]) >= 0, (
                f"step {step} sample {b}: op evicted {int(ev_op[b])}, reference {int(ev_ref[b])}")
            att = _attention64(kb, q[b].cpu(), n, scale, Hq // Hkv)
            slot = {int(pb[s]): s for s in range(n)}
            cand = set(range(n_sink, n - int(n_prot[b])))
            so, sr = slot.get(int(ev_op[b])), slot[int(ev_ref[b])]
            assert so in cand, f"step {step} sample {b}: op evicted non-candidate pos {int(ev_op[b])}"
            a, r = float(att[so]), float(att[sr])
            assert abs(a - r) <= 1e-5 * max(a, r), (
                f"step {step} sample {b}: op evicted pos {int(ev_op[b])} (att {a}), "
                f"reference pos {int(ev_ref[b])} (att {r})")
            # make the reference follow the op's choice for this sample
            kr[b], vr[b], pr[b], lr[b] = snap[0][b], snap[1][b], snap[2][b], snap[3][b]
            kr[b, :, so:n - 1] = snap[0][b, :, so + 1:n].clone()
            vr[b, :, so:n - 1] = snap[1][b, :, so + 1:n].clone()
            pr[b, so:n - 1] = snap[2][b, so + 1:n].clone()
            lr[b] = n - 1
        n_evicted += int((ev_op >= 0).sum())
        assert torch.equal(lo.cpu(), lr), (step, lo.cpu(), lr)
        for b in range(B):
            got, exp = _live(ko, vo, po, lo, b), _live(kr, vr, pr, lr, b)
            assert set(got) == set(exp), (step, b, sorted(set(got) ^ set(exp)))
            for p in exp:
                assert torch.equal(got[p][0], exp[p][0]), f"step {step} sample {b} pos {p}: K row"
                assert torch.equal(got[p][1], exp[p][1]), f"step {step} sample {b} pos {p}: V row"
            # the n_sink sinks never move
            assert po[b, :n_sink].cpu().tolist() == pos[b, :n_sink].tolist()
    return n_evicted


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,D", [(1, 4, 4, 64), (2, 8, 2, 64), (3, 8, 1, 128),
                                        (4, 16, 2, 64)])
def test_decode_evict_matches_reference(device, dtype, B, Hq, Hkv, D):
    n = _run_decode(device, dtype, B, Hq, Hkv, D, steps=40, seed=B * 10 + Hq)
    assert n > 0  # the scenario must actually evict


@pytest.mark.parametrize("device", DEVICES)
def test_decode_evict_noncontiguous_cache(device):
    """K/V as transposed views of [B, S, H, D] storage (HF's layout before transpose): handled in
    place through the views, or a clear error naming decode_evict_."""
    try:
        n = _run_decode(device, torch.float16, 2, 8, 2, 64, steps=20, seed=77, transposed=True)
    except (RuntimeError, ValueError) as e:
        assert "decode_evict_" in str(e) and "contiguous" in str(e).lower(), str(e)
        return
    assert n > 0


@pytest.mark.parametrize("device", DEVICES)
def test_decode_evict_n_sink_variants(device):
    for n_sink in (0, 1, 2):
        assert _run_decode(device, torch.float32, 2, 4, 2, 64, steps=25, seed=40 + n_sink,
                           n_sink=n_sink) > 0


@pytest.mark.parametrize("device", DEVICES)
def test_decode_evict_no_candidates(device):
    """Everything is sink or protected: nothing can be evicted even though forget > 0."""
    B, H, S, D = 1, 2, 12, 64
    k, v = randn((B, H, S, D), seed=1, device=device), randn((B, H, S, D), seed=2, device=device)
    pos = torch.arange(S).view(1, S).to(device)
    length = torch.tensor([10], device=device)
    k0, v0, p0 = k.clone(), v.clone(), pos.clone()
    ev = OPS.decode_evict_(k, v, pos, length, randn((B, H, D), seed=3, device=device),
                           torch.tensor([100], device=device),
                           torch.tensor([0.05], dtype=torch.float64, device=device),
                           torch.tensor([6], device=device), 0.125, 4)
    assert ev.cpu().tolist() == [-1]
    assert int(length[0]) == 10
    assert torch.equal(k, k0) and torch.equal(v, v0) and torch.equal(pos, p0)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_evict_forget_truncation(device):
    """forget = int(length - n_seen * keep_fraction): 10 - 19*0.5 = 0.5 -> 0 (no eviction);
    10 - 17*0.5 = 1.5 -> 1 (one eviction)."""
    for n_seen, expect in ((19, False), (17, True)):
        B, H, S, D = 1, 2, 12, 64
        k, v = randn((B, H, S, D), seed=1, device=device), randn((B, H, S, D), seed=2, device=device)
        pos = torch.arange(S).view(1, S).to(device)
        length = torch.tensor([10], device=device)
        ev = OPS.decode_evict_(k, v, pos, length, randn((B, 4, D), seed=3, device=device),
                               torch.tensor([n_seen], device=device),
                               torch.tensor([0.5], dtype=torch.float64, device=device),
                               torch.tensor([1], device=device), 0.125, 4)
        assert (int(ev[0]) >= 0) == expect, (n_seen, ev)
        assert int(length[0]) == (9 if expect else 10)
