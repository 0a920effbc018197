"""score_text_vision vs the reference: dtype x device x shape grid, padding, several images,
GQA, T = 0..64, unused q_pos rows, non-contiguous inputs."""

import math

import pytest
import torch

from conftest import (DEVICES, DTYPES, OPS, assert_scores_close, assert_stats_close,
                      make_modality, randn, ref)

# (B, Hq, Hkv, D, n_real per sample, n_guid per sample, n_images, pad)
CASES = [
    pytest.param(1, 4, 4, 64, [40], [8], 1, "right", id="B1-g1-N40-T8"),
    pytest.param(1, 2, 2, 64, [7], [1], 1, "right", id="B1-N7-T1"),
    pytest.param(2, 8, 2, 64, [50, 37], [5, 12], 2, "left", id="B2-g4-left-2img"),
    pytest.param(3, 8, 1, 128, [64, 20, 45], [16, 1, 3], 3, "right", id="B3-g8-D128-3img"),
    pytest.param(4, 4, 1, 64, [30, 33, 12, 25], [4, 0, 2, 7], 2, "mixed", id="B4-mixedpad-T0sample"),
    pytest.param(2, 4, 2, 64, [90, 80], [64, 40], 1, "right", id="B2-T64"),
    pytest.param(2, 4, 4, 64, [30, 30], [0, 0], 1, "left", id="T0-all"),
]
BIG = [
    pytest.param(1, 8, 2, 128, [2500], [24], 4, "right", id="big-N2500-4img"),
    pytest.param(2, 4, 1, 64, [1400, 1100], [40, 9], 2, "left", id="big-B2-N1400"),
]


def _run(device, dtype, B, Hq, Hkv, D, n_real, n_guid, n_images, pad, seed=0,
         transposed=False, extra_T=0):
    mod = make_modality(n_real, n_guid, n_images, pad, seed=seed)
    q_pos = ref.guidance_positions(mod)
    if extra_T:  # unused trailing rows (-1) in q_pos, with garbage query rows
        q_pos = torch.cat([q_pos, torch.full((B, extra_T), -1, dtype=torch.int64)], 1)
    T, N = q_pos.shape[1], mod.shape[1]
    q = randn((B, Hq, T, D), dtype, seed + 1, device, transposed)
    k = randn((B, Hkv, N, D), dtype, seed + 2, device, transposed)
    scale = 1.0 / math.sqrt(D)
    exp_s, exp_t = ref.score_text_vision(q.cpu(), k.cpu(), q_pos, mod, scale, text_score="guidance")
    got_s, got_t = OPS.score_text_vision(q, k, q_pos.to(device), mod.to(device), scale, text_score="guidance")
    assert got_s.dtype == torch.float32 and got_t.dtype == torch.float32
    assert got_s.shape == (B, N) and got_t.shape == (B, 2)
    assert got_s.device.type == device and got_t.device.type == device
    rtol = 1e-4 if dtype == torch.float32 else 1e-3
    assert_scores_close(got_s, exp_s, mod, rtol)
    assert_stats_close(got_t, exp_t, rtol)
    # pads are neither scored nor counted
    assert bool((got_s.cpu()[mod == 0] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,D,n_real,n_guid,n_images,pad", CASES)
def test_score_text_vision_matches_reference(device, dtype, B, Hq, Hkv, D, n_real, n_guid,
                                             n_images, pad):
    _run(device, dtype, B, Hq, Hkv, D, n_real, n_guid, n_images, pad, seed=B * 7 + Hq)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,D,n_real,n_guid,n_images,pad", BIG)
def test_score_text_vision_big(device, dtype, B, Hq, Hkv, D, n_real, n_guid, n_images, pad):
    _run(device, dtype, B, Hq, Hkv, D, n_real, n_guid, n_images, pad, seed=3)


@pytest.mark.parametrize("device", DEVICES)
def test_score_text_vision_unused_rows(device):
    """q_pos padded with extra -1 columns: those query rows are garbage and must be ignored."""
    _run(device, torch.float32, 2, 4, 2, 64, [40, 30], [6, 3], 2, "right", seed=5, extra_T=5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_score_text_vision_noncontiguous(device, dtype):
    """Transposed views ([B, N, H, D] storage, as HF produces): correct, or a clear error."""
    try:
        _run(device, dtype, 2, 8, 2, 64, [45, 38], [7, 4], 2, "left", seed=9, transposed=True)
    except (RuntimeError, ValueError) as e:
        msg = str(e)
        assert "score_text_vision" in msg and "contiguous" in msg.lower(), msg


@pytest.mark.parametrize("device", DEVICES)
def test_score_text_vision_padding_invariance(device):
    """The same sample, unpadded, left-padded and right-padded: same scores (shifted), same stats."""
    mod1 = make_modality([50], [9], 2, "right", seed=11)
    n = 50
    q_pos1 = ref.guidance_positions(mod1)
    q = randn((1, 4, q_pos1.shape[1], 64), torch.float32, 12, device)
    k = randn((1, 2, n, 64), torch.float32, 13, device)
    s1, t1 = OPS.score_text_vision(q, k, q_pos1.to(device), mod1.to(device), 0.125, text_score="guidance")
    for pad, off in (("right", 0), ("left", 7)):
        N = n + 7
        mod = torch.zeros(1, N, dtype=torch.int8)
        mod[0, off:off + n] = mod1[0]
        kk = randn((1, 2, N, 64), torch.float32, 99, device)  # garbage in pad slots
        kk[:, :, off:off + n] = k
        q_pos = ref.guidance_positions(mod)
        s, t = OPS.score_text_vision(q, kk, q_pos.to(device), mod.to(device), 0.125, text_score="guidance")
        assert_scores_close(s[:, off:off + n], s1, mod1, 1e-5)
        assert_stats_close(t, t1, 1e-5)
        assert bool((s.cpu()[mod == 0] == 0).all()), pad


@pytest.mark.parametrize("text_score", ["guidance", "all_queries"])
@pytest.mark.parametrize("D", [40, 128, 33])
@pytest.mark.parametrize("N", [6, 63, 64, 65, 130])
def test_bf16_scores_are_those_of_the_fp32_values(N, D, text_score):
    """bf16 q and keys score as their fp32 values do, whatever multiplies them on this machine
    (``build_info()["cpu_bf16_gemm"]``: oneDNN's brgemm on blocks of 64 keys, or the fp32 GEMM
    of the converted rows): the bf16 products are exact in fp32 and summed in fp32 either way, so
    only the order of the sums differs. N around the 64-key blocks, D even and odd (odd: the fp32
    GEMM), left pad, and q and keys with unit (HF layouts) or strided head dim."""
    mod = make_modality([N, N - 2], [3, 2], 1, "left", seed=N)
    q_pos = ref.guidance_positions(mod)
    rows = q_pos.shape[1] if text_score == "guidance" else N
    q = randn((2, 6, rows, D), torch.bfloat16, 7, transposed=True)
    if D == 40:  # head dim of stride > 1
        q = randn((2, 6, D, rows), torch.bfloat16, 7).transpose(2, 3)
    k = randn((2, 2, N, D), torch.bfloat16, 8, transposed=True)
    if D == 40:  # keys of head-dim stride > 1 too (transposed for packing element by element)
        k = randn((2, 2, D, N), torch.bfloat16, 8).transpose(2, 3)
    scale = 1.0 / math.sqrt(D)
    s16, t16 = OPS.score_text_vision(q, k, q_pos, mod, scale, text_score=text_score)
    s32, t32 = OPS.score_text_vision(q.float(), k.float(), q_pos, mod, scale, text_score=text_score)
    torch.testing.assert_close(s16, s32, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(t16, t32, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("text_score", ["guidance", "all_queries"])
def test_bf16_scores_with_onednn_switched_off(text_score):
    """``torch.backends.mkldnn.enabled = False`` (the user's switch for oneDNN, whose brgemm and
    pack ATen's bf16 GEMM is) sends bf16 to the fp32 GEMM of the converted rows, read at each
    call: the op works and scores as with oneDNN on, and ``build_info()`` says ``"fp32"`` while it
    is off (on an AMX CPU ATen's pack raised "No need to pack" before)."""
    import tgvkv

    mod = make_modality([130, 120], [3, 2], 1, "left", seed=5)
    q_pos = ref.guidance_positions(mod)
    N = mod.shape[1]
    rows = q_pos.shape[1] if text_score == "guidance" else N
    q = randn((2, 6, rows, 64), torch.bfloat16, 7, transposed=True)
    k = randn((2, 2, N, 64), torch.bfloat16, 8, transposed=True)
    on = OPS.score_text_vision(q, k, q_pos, mod, 0.125, text_score=text_score)
    used = tgvkv.build_info()["cpu_bf16_gemm"]
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # (mkldnn.flags() also sets TF32 flags, and warns)
    try:
        off = OPS.score_text_vision(q, k, q_pos, mod, 0.125, text_score=text_score)
        assert tgvkv.build_info()["cpu_bf16_gemm"] == "fp32"
    finally:
        torch.backends.mkldnn.enabled = was
    assert tgvkv.build_info()["cpu_bf16_gemm"] == used
    torch.testing.assert_close(off[0], on[0], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(off[1], on[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_concurrent_calls_from_python_threads(dtype):
    """Calls from several Python threads at once (a server's request threads) give the results of
    the same calls made one at a time: the kernels' per-thread scratch, key caches and the bf16
    GEMM's per-thread hardware state (AMX tiles, released at the end of each parallel region) are
    never shared between calls."""
    import threading

    mod = make_modality([300, 280], [20, 9], 2, "left", seed=3)
    q_pos = ref.guidance_positions(mod)
    B, N = mod.shape
    qs = [randn((B, 8, N, 64), dtype, i) for i in range(3)]
    ks = [randn((B, 2, N, 64), dtype, 10 + i) for i in range(3)]
    want = [OPS.score_text_vision(q, k, q_pos, mod, 0.125) for q, k in zip(qs, ks)]
    bad, errors = [], []

    def run(t):
        try:
            for rep in range(4):
                for i in range(3):
                    j = (i + t) % 3  # each thread its own order
                    s, st = OPS.score_text_vision(qs[j], ks[j], q_pos, mod, 0.125)
                    if not (torch.equal(s, want[j][0]) and torch.equal(st, want[j][1])):
                        bad.append((t, rep, j))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not bad, bad
