"""CUDA kernels against the CPU kernels (same op schemas, registered for the CUDA key).

What must hold (README "API", DESIGN "Deterministic"):
- selection is exact: for the same scores, the CUDA kept indices, protected counts, kept counts and
  keep fractions equal the CPU ones bit for bit, and the compacted K/V rows are bit-identical;
- scores/stats agree within fp32 rounding, and are run-to-run identical on CUDA; a sample's scores
  do not depend on the batch it is in, and evict's fused scoring equals score_text_vision's;
- evict runs without host synchronisation: it can be captured in a CUDA graph and replayed;
- one decode step gives the same victim and cache state as the CPU op (up to exact near-ties).

Skipped with a reason where there is no GPU or the extension was built without CUDA kernels.
"""

from __future__ import annotations

import math

import pytest
import torch

import tgvkv
from conftest import (OPS, PAD, TEXT, VISION, assert_scores_close, assert_stats_close,
                      make_modality, randn, ref)

_HAS_GPU = torch.cuda.is_available()
_HAS_KERNELS = bool(tgvkv.build_info().get("cuda", False))
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _HAS_GPU, reason="CUDA not available (CPU-only machine)"),
    pytest.mark.skipif(_HAS_GPU and not _HAS_KERNELS,
                       reason="tgvkv was built without CUDA kernels (TGVKV_CUDA=0 or CPU torch)"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEV = "cuda"


def _batch(n_real, n_guid, n_images, pad, seed, N=None):
    mod = make_modality(n_real, n_guid, n_images, pad, N=N, seed=seed)
    return mod, ref.guidance_positions(mod)


def _qk(B, Hq, Hkv, T, N, D, dtype, seed, transposed=False):
    q = randn((B, Hq, T, D), dtype, seed, "cpu", transposed=transposed)
    k = randn((B, Hkv, N, D), dtype, seed + 1, "cpu", transposed=transposed)
    return q, k


def _scores_stats_cpu(qs, ks, q_pos, mod, scale):
    out = [OPS.score_text_vision(q, k, q_pos, mod, scale, text_score="guidance") for q, k in zip(qs, ks)]
    return torch.stack([s for s, _ in out]), torch.stack([t for _, t in out])


# ------------------------------------------------------------------------------------------
# score_text_vision
# ------------------------------------------------------------------------------------------
SCORE_CASES = [
    # B, Hq, Hkv, D, n_real, n_guid, n_images, pad
    (1, 4, 4, 64, [300], [12], 1, "right"),
    (2, 8, 2, 128, [700, 520], [20, 9], 2, "left"),
    (3, 6, 3, 80, [257, 140, 200], [5, 1, 17], [1, 3, 2], "mixed"),
    (2, 4, 1, 36, [90, 66], [70, 3], 1, "right"),       # D not a multiple of 8; T > 64 rows
    (1, 2, 2, 256, [1500], [130], 4, "right"),          # several T tiles and key splits
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,D,n_real,n_guid,n_images,pad", SCORE_CASES)
def test_score_text_vision_cpu_vs_cuda(dtype, B, Hq, Hkv, D, n_real, n_guid, n_images, pad):
    mod, q_pos = _batch(n_real, n_guid, n_images, pad, seed=B + D)
    N, T = mod.shape[1], q_pos.shape[1]
    q, k = _qk(B, Hq, Hkv, T, N, D, dtype, seed=D)
    scale = 1.0 / math.sqrt(D)
    s_cpu, t_cpu = OPS.score_text_vision(q, k, q_pos, mod, scale, text_score="guidance")
    s_gpu, t_gpu = OPS.score_text_vision(q.to(DEV), k.to(DEV), q_pos.to(DEV), mod.to(DEV), scale, text_score="guidance")
    assert s_gpu.dtype == torch.float32 and s_gpu.shape == (B, N) and t_gpu.shape == (B, 2)
    assert bool(torch.isfinite(s_gpu).all()) and bool(torch.isfinite(t_gpu).all())
    assert bool((s_gpu.cpu()[mod == PAD] == 0).all()), "pad slots must score 0"
    assert_scores_close(s_gpu, s_cpu, mod, rtol=2e-4)
    assert_stats_close(t_gpu, t_cpu, rtol=2e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_score_text_vision_noncontiguous(dtype):
    mod, q_pos = _batch([200, 150], [10, 6], 2, "left", seed=3)
    B, N, T = 2, mod.shape[1], q_pos.shape[1]
    q, k = _qk(B, 8, 4, T, N, 64, dtype, seed=11, transposed=True)  # HF layout views
    s_cpu, t_cpu = OPS.score_text_vision(q.contiguous(), k.contiguous(), q_pos, mod, 0.125, text_score="guidance")
    s_gpu, t_gpu = OPS.score_text_vision(q.to(DEV), k.to(DEV), q_pos.to(DEV), mod.to(DEV), 0.125, text_score="guidance")
    assert_scores_close(s_gpu, s_cpu, mod, rtol=2e-4)
    assert_stats_close(t_gpu, t_cpu, rtol=2e-4)
    # a strided head dim takes the scalar load path: same values as the contiguous inputs
    kd = torch.empty(B, 4, N, 128, dtype=dtype, device=DEV)[..., ::2]
    kd.copy_(k.to(DEV))
    s2, t2 = OPS.score_text_vision(q.to(DEV), kd, q_pos.to(DEV), mod.to(DEV), 0.125, text_score="guidance")
    assert torch.equal(s2, s_gpu) and torch.equal(t2, t_gpu)


def test_score_text_vision_deterministic_and_batch_invariant():
    mod, q_pos = _batch([900, 640, 777], [14, 7, 30], [2, 1, 3], "right", seed=5)
    B, N, T = mod.shape[0], mod.shape[1], q_pos.shape[1]
    q, k = _qk(B, 8, 2, T, N, 128, torch.bfloat16, seed=21)
    args = (q.to(DEV), k.to(DEV), q_pos.to(DEV), mod.to(DEV), 0.088)
    s1, t1 = OPS.score_text_vision(*args)
    for _ in range(3):  # fixed reduction orders: bit-identical every run
        s2, t2 = OPS.score_text_vision(*args)
        assert torch.equal(s1, s2) and torch.equal(t1, t2)
    # sample 1 alone (right padding: same slots) gets bit-identical scores and stats
    n1 = 640
    m1 = mod[1:2, :n1]
    qp1 = ref.guidance_positions(m1)
    s_one, t_one = OPS.score_text_vision(q[1:2, :, :qp1.shape[1]].to(DEV), k[1:2, :, :n1].to(DEV),
                                         qp1.to(DEV), m1.to(DEV), 0.088, text_score="guidance")
    assert torch.equal(s_one[0], s1[1, :n1]) and torch.equal(t_one[0], t1[1])


def test_score_text_vision_degenerate():
    # no vision (no guidance rows), empty T, prompt ending with vision
    mod = make_modality([40, 30], [5, 0], [0, 2], "right", seed=1)
    q_pos = ref.guidance_positions(mod)
    N, T = mod.shape[1], q_pos.shape[1]
    q, k = _qk(2, 4, 2, T, N, 64, torch.float32, seed=2)
    s_cpu, t_cpu = OPS.score_text_vision(q, k, q_pos, mod, 0.125, text_score="guidance")
    s_gpu, t_gpu = OPS.score_text_vision(q.to(DEV), k.to(DEV), q_pos.to(DEV), mod.to(DEV), 0.125, text_score="guidance")
    assert bool((s_gpu == 0).all()) and bool((t_gpu == 0).all())
    assert torch.equal(s_gpu.cpu(), s_cpu) and torch.equal(t_gpu.cpu(), t_cpu)


# ------------------------------------------------------------------------------------------
# layer_budgets / select_keep / compact_: exact
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget,redistribute", [("mass", False), ("mi", False), ("mass", True),
                                                 ("mi", True)])
@pytest.mark.parametrize("keep_ratio", [0.05, 0.1, 0.37, 1.0])
def test_layer_budgets_cpu_vs_cuda(budget, redistribute, keep_ratio):
    mod, q_pos = _batch([500, 320, 9, 400], [10, 4, 2, 0], [2, 1, 1, 1], "mixed", seed=7)
    L, B = 28, mod.shape[0]
    gen = torch.Generator().manual_seed(4)
    stats = torch.rand(L, B, 2, generator=gen) ** 3
    stats[3, 1] = 0.0  # a layer with no text->vision mass
    exp = OPS.layer_budgets(stats, q_pos, mod, keep_ratio, budget, redistribute, 4)
    got = OPS.layer_budgets(stats.to(DEV), q_pos.to(DEV), mod.to(DEV), keep_ratio, budget,
                            redistribute, 4)
    assert torch.equal(got[0].cpu(), exp[0]) and torch.equal(got[1].cpu(), exp[1])


def _scores_with_ties(L, B, N, seed):
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(L, B, N, generator=gen)
    s = torch.where(torch.rand(L, B, N, generator=gen) < 0.3, (s * 8).floor() / 8, s)  # ties
    s[..., ::17] = 0.0
    s[..., 5::23] = -0.0  # -0.0 ranks equal to +0.0
    return s


@pytest.mark.parametrize("n_sink", [0, 1, 4])
@pytest.mark.parametrize("n_real,n_guid,n_images,pad", [
    ([60, 45, 6], [8, 3, 1], 2, "right"),
    ([3000, 2222], [40, 12], 3, "left"),
    ([8192], [64], 5, "right"),
])
def test_select_keep_cpu_vs_cuda(n_sink, n_real, n_guid, n_images, pad):
    mod, q_pos = _batch(n_real, n_guid, n_images, pad, seed=len(n_real) + n_sink)
    B, N = mod.shape
    L = 5
    scores = _scores_with_ties(L, B, N, seed=N)
    scores[:, mod == PAD] = 0
    gen = torch.Generator().manual_seed(9)
    nb = (mod != PAD).sum(1)
    keep = (torch.rand(L, B, generator=gen) * (nb + 3).float()).long()  # incl. > N_b and 0
    exp = OPS.select_keep(scores, keep, q_pos, mod, n_sink)
    got = OPS.select_keep(scores.to(DEV), keep.to(DEV), q_pos.to(DEV), mod.to(DEV), n_sink)
    assert torch.equal(got[0].cpu(), exp[0]), "kept indices differ"
    assert torch.equal(got[1].cpu(), exp[1]), "n_protected differs"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Hkv,D,Dv,layout", [(2, 64, 64, "contiguous"), (4, 128, 128, "transposed"),
                                             (1, 40, 24, "contiguous"), (2, 64, 64, "strided_d")])
def test_compact_cpu_vs_cuda(dtype, Hkv, D, Dv, layout):
    mod, q_pos = _batch([700, 333], [9, 4], 2, "left", seed=D)
    B, N = mod.shape
    scores = _scores_with_ties(1, B, N, seed=1)
    keep = torch.tensor([[70, 50]])
    keep_idx = OPS.select_keep(scores, keep, q_pos, mod, 4)[0][0]

    def make(d, seed):
        if layout == "transposed":
            return randn((B, Hkv, N, d), dtype, seed, transposed=True)
        if layout == "strided_d":
            return randn((B, Hkv, N, 2 * d), dtype, seed)[..., ::2]
        return randn((B, Hkv, N, d), dtype, seed)

    k, v = make(D, 1), make(Dv, 2)
    kc, vc = k.clone(), v.clone()
    kg, vg = k.to(DEV), v.to(DEV)
    if layout != "contiguous":  # keep the device layout non-contiguous too
        kg = torch.empty_like(k, device=DEV).copy_(k) if layout == "transposed" else \
            torch.empty(B, Hkv, N, 2 * D, dtype=dtype, device=DEV)[..., ::2].copy_(k)
        vg = torch.empty_like(v, device=DEV).copy_(v) if layout == "transposed" else \
            torch.empty(B, Hkv, N, 2 * Dv, dtype=dtype, device=DEV)[..., ::2].copy_(v)
    n_cpu = OPS.compact_(kc, vc, keep_idx)
    n_gpu = OPS.compact_(kg, vg, keep_idx.to(DEV))
    assert torch.equal(n_gpu.cpu(), n_cpu)
    for b in range(B):
        n = int(n_cpu[b])
        assert torch.equal(kg[b, :, :n].cpu(), kc[b, :, :n]), f"sample {b}: K rows differ"
        assert torch.equal(vg[b, :, :n].cpu(), vc[b, :, :n]), f"sample {b}: V rows differ"


def test_compact_identity_and_all_dropped():
    B, H, N, D = 2, 3, 50, 64
    k, v = randn((B, H, N, D), seed=1, device=DEV), randn((B, H, N, D), seed=2, device=DEV)
    k0, v0 = k.clone(), v.clone()
    idx = torch.stack([torch.arange(N), torch.full((N,), -1)]).to(DEV)
    n = OPS.compact_(k, v, idx)
    assert n.cpu().tolist() == [N, 0]
    assert torch.equal(k, k0) and torch.equal(v, v0)


# ------------------------------------------------------------------------------------------
# evict_from_scores / evict
# ------------------------------------------------------------------------------------------
def _cache(L, B, H, N, D, dtype, seed):
    return ([randn((B, H, N, D), dtype, seed + l) for l in range(L)],
            [randn((B, H, N, D), dtype, seed + 100 + l) for l in range(L)])


def _assert_same_evict(got, exp, kg, vg, kc, vc):
    for name, g, e in zip(("keep_idx", "n_kept", "n_protected", "keep_fraction"), got, exp):
        assert torch.equal(g.cpu(), e), f"{name} differs"
    n_kept = exp[1]
    for l in range(len(kc)):
        for b in range(n_kept.shape[1]):
            n = int(n_kept[l, b])
            assert torch.equal(kg[l][b, :, :n].cpu(), kc[l][b, :, :n]), f"layer {l} sample {b}: K"
            assert torch.equal(vg[l][b, :, :n].cpu(), vc[l][b, :, :n]), f"layer {l} sample {b}: V"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L,keep_ratio,budget,redistribute,n_sink", [
    (3, 0.1, "mass", False, 4), (36, 0.05, "mi", True, 2), (5, 1.0, "mass", False, 4)])
def test_evict_from_scores_cpu_vs_cuda(dtype, L, keep_ratio, budget, redistribute, n_sink):
    mod, q_pos = _batch([800, 512, 30], [12, 5, 0], [3, 1, 1], "mixed", seed=L)
    B, N = mod.shape
    scores = _scores_with_ties(L, B, N, seed=L)
    scores[:, mod == PAD] = 0
    gen = torch.Generator().manual_seed(L)
    stats = torch.rand(L, B, 2, generator=gen) ** 2
    kc, vc = _cache(L, B, 2, N, 64, dtype, seed=L)
    kg, vg = [t.clone().to(DEV) for t in kc], [t.clone().to(DEV) for t in vc]
    exp = OPS.evict_from_scores(kc, vc, scores, stats, q_pos, mod, keep_ratio, budget,
                                redistribute, n_sink)
    got = OPS.evict_from_scores(kg, vg, scores.to(DEV), stats.to(DEV), q_pos.to(DEV),
                                mod.to(DEV), keep_ratio, budget, redistribute, n_sink)
    _assert_same_evict(got, exp, kg, vg, kc, vc)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", [2, 34])  # 34 > kMaxLayers: two launch groups per stage
def test_evict_matches_cpu_selection_of_cuda_scores(dtype, L):
    """evict's fused scoring is bit-identical to score_text_vision on CUDA, so its selection and
    compaction equal the CPU evict_from_scores fed with those scores, exactly."""
    mod, q_pos = _batch([600, 431], [11, 6], [2, 3], "left", seed=L)
    B, N, T = mod.shape[0], mod.shape[1], q_pos.shape[1]
    Hq, Hkv, D = 8, 2, 64
    qs = [randn((B, Hq, T, D), dtype, 500 + l, DEV) for l in range(L)]
    kc, vc = _cache(L, B, Hkv, N, D, dtype, seed=7)
    kg, vg = [t.clone().to(DEV) for t in kc], [t.clone().to(DEV) for t in vc]
    sc = [OPS.score_text_vision(q, k, q_pos.to(DEV), mod.to(DEV), 0.125, text_score="guidance") for q, k in zip(qs, kg)]
    scores = torch.stack([s for s, _ in sc]).cpu()
    stats = torch.stack([t for _, t in sc]).cpu()
    exp = OPS.evict_from_scores(kc, vc, scores, stats, q_pos, mod, 0.1, "mass", False, 4)
    got = OPS.evict(kg, vg, qs, q_pos.to(DEV), mod.to(DEV), 0.125, 0.1, "mass", False, 4, text_score="guidance")
    _assert_same_evict(got, exp, kg, vg, kc, vc)
    # and the CUDA scores agree with the CPU kernel's within fp32 rounding
    s_cpu, t_cpu = _scores_stats_cpu([q.cpu() for q in qs], [k for k in _cache(L, B, Hkv, N, D,
                                     dtype, seed=7)[0]], q_pos, mod, 0.125)
    assert_scores_close(scores, s_cpu, mod, rtol=2e-4)
    assert_stats_close(stats, t_cpu, rtol=2e-4)


def test_evict_cuda_graph_capture():
    """evict has no host sync: capture it once, replay it on new cache contents."""
    mod, q_pos = _batch([400, 300], [9, 5], 2, "right", seed=2)
    B, N, T = mod.shape[0], mod.shape[1], q_pos.shape[1]
    L, Hq, Hkv, D = 4, 8, 2, 64
    dtype = torch.bfloat16
    qp_d, mod_d = q_pos.to(DEV), mod.to(DEV)
    static_q = [torch.zeros(B, Hq, T, D, dtype=dtype, device=DEV) for _ in range(L)]
    static_k = [torch.zeros(B, Hkv, N, D, dtype=dtype, device=DEV) for _ in range(L)]
    static_v = [torch.zeros(B, Hkv, N, D, dtype=dtype, device=DEV) for _ in range(L)]

    def load(seed):
        qs = [randn((B, Hq, T, D), dtype, seed + l, DEV) for l in range(L)]
        ks = [randn((B, Hkv, N, D), dtype, seed + 50 + l, DEV) for l in range(L)]
        vs = [randn((B, Hkv, N, D), dtype, seed + 90 + l, DEV) for l in range(L)]
        for dst, src in zip(static_q + static_k + static_v, qs + ks + vs):
            dst.copy_(src)
        return qs, ks, vs

    def run():
        return OPS.evict(static_k, static_v, static_q, qp_d, mod_d, 0.125, 0.1, "mass", False, 4, text_score="guidance")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (allocator, attributes)
        load(1)
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    load(1)
    with torch.cuda.graph(graph):
        out = run()
    for seed in (100, 200):
        qs, ks, vs = load(seed)
        graph.replay()
        torch.cuda.synchronize()
        exp = OPS.evict([k.clone() for k in ks], [v.clone() for v in vs], qs, qp_d, mod_d, 0.125,
                        0.1, "mass", False, 4, text_score="guidance")
        for g, e in zip(out, exp):
            assert torch.equal(g, e)
        for l in range(L):
            for b in range(B):
                n = int(exp[1][l, b])
                idx = exp[0][l, b, :n]
                assert torch.equal(static_k[l][b, :, :n], ks[l][b][:, idx])
                assert torch.equal(static_v[l][b, :, :n], vs[l][b][:, idx])


# ------------------------------------------------------------------------------------------
# decode_evict_
# ------------------------------------------------------------------------------------------
def _attention64(k_b, q_b, n, scale, g):
    Hq = q_b.shape[0]
    att = torch.zeros(n, dtype=torch.float64)
    for h in range(Hq):
        logits = (k_b[h // g, :n].double() @ q_b[h].double()) * scale
        att += torch.softmax(logits, 0)
    return att / Hq


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,D,S", [(2, 8, 2, 64, 96), (3, 4, 4, 128, 700), (1, 32, 8, 80, 300)])
def test_decode_evict_cpu_vs_cuda(dtype, B, Hq, Hkv, D, S):
    gen = torch.Generator().manual_seed(S)
    scale = 1.0 / math.sqrt(D)
    n_sink = 4
    lengths = [int(x) for x in torch.randint(S // 3, S // 2, (B,), generator=gen)]
    k, v = randn((B, Hkv, S, D), dtype, 1), randn((B, Hkv, S, D), dtype, 2)
    pos = torch.zeros(B, S, dtype=torch.int64)
    for b in range(B):  # kept prompt positions, ascending, dense enough that every step evicts
        perm = torch.randperm(3 * lengths[b] // 2, generator=gen)[:lengths[b]]
        pos[b, :lengths[b]] = torch.sort(perm).values
    n_seen = pos.max(1).values + 1
    length = torch.tensor(lengths)
    frac = torch.tensor([0.2 + 0.1 * b for b in range(B)], dtype=torch.float64)
    n_prot = torch.tensor([1 + 3 * b for b in range(B)])
    cpu = [k, v, pos, length]
    gpu = [t.clone().to(DEV) for t in cpu]
    steps = min(40, S - max(lengths) - 1)
    n_evicted = 0
    for step in range(steps):
        newk, newv = randn((B, Hkv, D), dtype, 1000 + step), randn((B, Hkv, D), dtype, 2000 + step)
        for b in range(B):  # append the new token at slot length[b] on both sides
            s = int(cpu[3][b])
            cpu[0][b, :, s], cpu[1][b, :, s], cpu[2][b, s] = newk[b], newv[b], int(n_seen[b])
            gpu[0][b, :, s], gpu[1][b, :, s], gpu[2][b, s] = newk[b].to(DEV), newv[b].to(DEV), \
                int(n_seen[b])
        cpu[3] += 1
        gpu[3] += 1
        n_seen += 1
        q = randn((B, Hq, D), dtype, 3000 + step)
        snap = [t.clone() for t in cpu]
        ev_c = OPS.decode_evict_(*cpu, q, n_seen, frac, n_prot, scale, n_sink)
        ev_g = OPS.decode_evict_(*gpu, q.to(DEV), n_seen.to(DEV), frac.to(DEV), n_prot.to(DEV),
                                 scale, n_sink).cpu()
        for b in range(B):
            if int(ev_g[b]) != int(ev_c[b]):  # only an exact near-tie may differ
                assert int(ev_g[b]) >= 0 and int(ev_c[b]) >= 0, (step, b, ev_g, ev_c)
                n = int(snap[3][b])
                att = _attention64(snap[0][b], q[b], n, scale, Hq // Hkv)
                slot = {int(snap[2][b, s]): s for s in range(n)}
                a, r = float(att[slot[int(ev_g[b])]]), float(att[slot[int(ev_c[b])]])
                assert abs(a - r) <= 1e-5 * max(a, r), (step, b, a, r)
                for i in range(4):  # follow the CPU's choice
                    gpu[i][b].copy_(cpu[i][b].to(DEV))
        n_evicted += int((ev_c >= 0).sum())
        assert torch.equal(gpu[3].cpu(), cpu[3]), step
        for b in range(B):  # same slot layout (both move the last live slot into the hole)
            n = int(cpu[3][b])
            assert torch.equal(gpu[2][b, :n].cpu(), cpu[2][b, :n]), (step, b)
            assert torch.equal(gpu[0][b, :, :n].cpu(), cpu[0][b, :, :n]), (step, b)
            assert torch.equal(gpu[1][b, :, :n].cpu(), cpu[1][b, :, :n]), (step, b)
    assert n_evicted >= steps, "the setup should evict at almost every step"


def test_decode_evict_cuda_graph_capture():
    B, Hq, Hkv, D, S = 2, 8, 2, 64, 64
    k = randn((B, Hkv, S, D), seed=1, device=DEV)
    v = randn((B, Hkv, S, D), seed=2, device=DEV)
    pos = torch.arange(S, device=DEV).repeat(B, 1)
    length = torch.tensor([30, 40], device=DEV)
    q = randn((B, Hq, D), seed=3, device=DEV)
    n_seen = torch.tensor([100, 120], device=DEV)
    frac = torch.tensor([0.1, 0.2], dtype=torch.float64, device=DEV)
    n_prot = torch.tensor([3, 5], device=DEV)
    state0 = [t.clone() for t in (k, v, pos, length)]
    exp_state = [t.clone() for t in state0]
    exp = OPS.decode_evict_(*exp_state, q, n_seen, frac, n_prot, 0.125, 4)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        OPS.decode_evict_(k, v, pos, length, q, n_seen, frac, n_prot, 0.125, 4)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = OPS.decode_evict_(k, v, pos, length, q, n_seen, frac, n_prot, 0.125, 4)
    for t, t0 in zip((k, v, pos, length), state0):
        t.copy_(t0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, exp)
    for t, e in zip((k, v, pos, length), exp_state):
        assert torch.equal(t, e)
