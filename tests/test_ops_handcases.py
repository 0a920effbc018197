"""The hand-derived cases of test_reference.py, run through the ops (exact expectations), plus
deterministic tie cases of decode_evict_ with its slots in scrambled order."""

import pytest
import torch

from conftest import DEVICES, DTYPES, OPS, ref

T_, V_ = ref.TEXT, ref.VISION


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_evict_two_heads_n8_by_hand(device, dtype):
    """See test_reference.test_evict_two_heads_n8_by_hand for the derivation: vision scores
    [37, 30, 26.5, 39]/576 for slots 2..5; text 4/24, 4/24, 7/24, 8/24; S = 25/24."""
    mod = torch.tensor([[T_, T_, V_, V_, V_, V_, T_, T_]], dtype=torch.int8)
    q_pos = ref.guidance_positions(mod)
    w = {(0, 6): [1, 1, 4, 1, 2, 1, 2], (1, 6): [1, 1, 2, 3, 1, 1, 3],
         (0, 7): [1, 1, 1, 1, 1, 2, 1, 4], (1, 7): [1, 1, 1, 1, 1, 2, 1, 4]}
    q = torch.zeros(1, 2, 2, 8)
    for (h, p), ws in w.items():
        q[0, h, p - 6, : len(ws)] = torch.tensor(ws, dtype=torch.float32).log()
    k = torch.eye(8).view(1, 1, 8, 8)
    q, k = q.to(dtype).to(device), k.to(dtype).to(device)
    scores, stats = OPS.score_text_vision(q, k, q_pos.to(device), mod.to(device), 1.0, text_score="guidance")
    exp = torch.tensor([4 / 24, 4 / 24, 37 / 576, 30 / 576, 26.5 / 576, 39 / 576, 7 / 24, 8 / 24])
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # log-weights rounded to fp16/bf16
    torch.testing.assert_close(scores[0].cpu(), exp, rtol=tol, atol=1e-7)
    assert abs(float(stats[0, 0]) - 25 / 24) < tol * 2
    for kappa, kept in [(0.75, [0, 1, 2, 5, 6, 7]), (0.625, [0, 1, 5, 6, 7]),
                        (0.5, [0, 1, 6, 7]), (1.0, list(range(8)))]:
        kc = [k.clone().contiguous()]
        vc = [(k * 2).contiguous()]
        idx, n_kept, n_prot, frac = OPS.evict(kc, vc, [q], q_pos.to(device), mod.to(device), 1.0,
                                              kappa, "mass", False, 2, text_score="guidance")
        assert idx[0, 0, : len(kept)].cpu().tolist() == kept, kappa
        assert bool((idx[0, 0, len(kept):] == -1).all())
        assert n_kept.cpu().tolist() == [[len(kept)]]
        assert int(n_prot[0, 0]) == 2
        assert float(frac[0, 0]) == pytest.approx(kappa, abs=1e-12)
        assert torch.equal(kc[0][0, 0, : len(kept)].cpu(), torch.eye(8).to(dtype)[kept])


@pytest.mark.parametrize("device", DEVICES)
def test_layer_budgets_redistribute_by_hand(device):
    mod = torch.tensor([[T_] * 2 + [V_] * 30 + [T_] * 8], dtype=torch.int8)
    q_pos = ref.guidance_positions(mod).to(device)
    stats = torch.tensor([[[9.0, 0.0]], [[1.0, 0.0]]]).to(device)
    k, f = OPS.layer_budgets(stats, q_pos, mod.to(device), 0.6)
    assert k[:, 0].cpu().tolist() == [40, 5]
    torch.testing.assert_close(f[:, 0].cpu(), torch.tensor([1.08, 0.12], dtype=torch.float64))
    k, f = OPS.layer_budgets(stats, q_pos, mod.to(device), 0.6, "mass", True)
    assert k[:, 0].cpu().tolist() == [40, 8]
    torch.testing.assert_close(f[:, 0].cpu(), torch.tensor([1.0, 0.2], dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keep,kept,n_prot", [
    (12, list(range(12)), 4), (10, [0, 1, 2, 4, 6, 7, 8, 9, 10, 11], 4),
    (9, [0, 1, 2, 4, 7, 8, 9, 10, 11], 4), (6, [0, 1, 8, 9, 10, 11], 4),
    (4, [0, 1, 9, 11], 2), (3, [0, 1, 11], 1), (0, [0, 1, 11], 1)])
def test_select_keep_by_hand(device, keep, kept, n_prot):
    mod = torch.tensor([[T_, T_] + [V_] * 6 + [T_] * 4], dtype=torch.int8)
    sc = torch.tensor([[[9.0, 9.0, 0.5, 0.1, 0.9, 0.3, 0.3, 0.7, 0.01, 0.02, 0.0, 9.0]]])
    idx, prot = OPS.select_keep(sc.to(device), torch.tensor([[keep]]).to(device),
                                ref.guidance_positions(mod).to(device), mod.to(device), 2)
    assert idx[0, 0, : len(kept)].cpu().tolist() == kept
    assert bool((idx[0, 0, len(kept):] == -1).all())
    assert int(prot[0, 0]) == n_prot


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_evict_ties_go_to_smaller_pos_in_any_slot_order(device, dtype):
    """q = 0: attention is exactly uniform, every candidate ties, so each step must evict the
    smallest candidate pos (not the smallest slot: the non-sink slots are scrambled), never a
    sink slot nor one of the n_protected largest pos; then -1 once no candidate is left."""
    n_sink, n_prot, S = 4, 3, 16
    g = torch.Generator().manual_seed(0)
    pos_list = [0, 1, 2, 3] + (torch.randperm(S - 4, generator=g) * 3 + 10).tolist()
    pos = torch.tensor([pos_list]).to(device)
    k = torch.randn(1, 2, S, 64, generator=g).to(dtype).to(device)
    v = torch.randn(1, 2, S, 64, generator=g).to(dtype).to(device)
    live0 = {p: (k[0, :, s].cpu().clone(), v[0, :, s].cpu().clone())
             for s, p in enumerate(pos_list)}
    length = torch.tensor([S]).to(device)
    q = torch.zeros(1, 4, 64, dtype=dtype, device=device)
    cands = sorted(pos_list[n_sink:])[: S - n_sink - n_prot]
    for step in range(len(cands) + 2):
        ev = OPS.decode_evict_(k, v, pos, length, q, torch.tensor([1000]).to(device),
                               torch.tensor([0.001], dtype=torch.float64).to(device),
                               torch.tensor([n_prot]).to(device), 0.125, n_sink)
        exp = cands[step] if step < len(cands) else -1
        assert int(ev[0]) == exp, (step, int(ev[0]), exp)
        n = int(length[0])
        assert n == S - min(step + 1, len(cands))
        assert pos[0, :n_sink].cpu().tolist() == [0, 1, 2, 3]
        live = pos[0, :n].cpu().tolist()
        assert sorted(live) == sorted(set(pos_list) - set(cands[: step + 1]))
        for s, p in enumerate(live):
            assert torch.equal(k[0, :, s].cpu(), live0[p][0]) and torch.equal(
                v[0, :, s].cpu(), live0[p][1])
