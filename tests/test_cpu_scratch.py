"""The CPU kernels' own scratch memory (``tgvkv._C.cpu_scratch_bytes``): counted, bounded by one
layer's partial sums in a multi-layer call, released without disturbing calls in flight."""

from __future__ import annotations

import threading

import torch

from conftest import OPS, make_modality, randn
from tgvkv import _C, reference as ref


def _llava_like(L, dtype, seed=0):
    """L layers of [1, 8, 640, 128] keys / values and 40 guidance rows of 8 heads (8 KV-head
    groups, one 40-row chunk: 8 work items per layer)."""
    mod = make_modality([640], [40], 1, seed=seed)
    q_pos = ref.guidance_positions(mod)
    ks = [randn((1, 8, 640, 128), dtype, seed + i) for i in range(L)]
    vs = [randn((1, 8, 640, 128), dtype, seed + 100 + i) for i in range(L)]
    qs = [randn((1, 8, 40, 128), dtype, seed + 200 + i) for i in range(L)]
    return ks, vs, qs, q_pos, mod


def test_scratch_is_counted_kept_and_released():
    ks, vs, qs, q_pos, mod = _llava_like(3, torch.float32)
    _C.release_cpu_scratch()
    assert _C.cpu_scratch_bytes() == {"held": 0, "peak": 0}
    OPS.evict(ks, vs, qs, q_pos, mod, 0.088, 0.1, text_score="guidance")
    first = _C.cpu_scratch_bytes()
    # at least one layer's partial head sums [groups, rows, N] (8 x 40 x 640 fp32)
    assert first["held"] >= 8 * 40 * 640 * 4
    assert first["peak"] >= first["held"]
    # the caches are kept: a second call of the same shapes allocates nothing more
    _C.reset_cpu_scratch_peak()
    OPS.evict(ks, vs, qs, q_pos, mod, 0.088, 0.1, text_score="guidance")
    assert _C.cpu_scratch_bytes() == {"held": first["held"], "peak": first["held"]}
    # released: counted as freed at once, and the next call needs as much again
    _C.release_cpu_scratch()
    assert _C.cpu_scratch_bytes() == {"held": 0, "peak": 0}
    OPS.evict(ks, vs, qs, q_pos, mod, 0.088, 0.1, text_score="guidance")
    assert _C.cpu_scratch_bytes() == first


def test_multi_layer_call_holds_one_layer_of_partial_sums():
    """A 16-layer evict whose layers each give the threads enough work items (8 per layer, 2
    threads) holds one layer's partial head sums at a time, not all 16 layers' (13 MiB here)."""
    ks, vs, qs, q_pos, mod = _llava_like(16, torch.float32)
    one_layer = 8 * 40 * 640 * 4
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _C.release_cpu_scratch()
        OPS.evict(ks, vs, qs, q_pos, mod, 0.088, 0.1, text_score="guidance")
        peak = _C.cpu_scratch_bytes()["peak"]
    finally:
        torch.set_num_threads(threads)
    # one layer's sums plus each thread's logit tile and gathered rows (~0.12 MiB per thread)
    assert one_layer <= peak <= 1.5 * one_layer, peak


def test_release_while_calls_run_changes_no_result():
    """release_cpu_scratch() from another thread while calls run: each buffer is freed by its own
    thread at its next use and the key caches refill, so every result is the one of a quiet run
    (fp16 keys: converted rows; bf16: packed blocks on AMX, else converted rows)."""
    mod = make_modality([300, 270], [20, 9], 2, "left", seed=4)
    q_pos = ref.guidance_positions(mod)
    N = mod.shape[1]
    for dtype in (torch.float16, torch.bfloat16):
        q = randn((2, 8, N, 64), dtype, 1)
        k = randn((2, 2, N, 64), dtype, 2, transposed=True)
        want = OPS.score_text_vision(q, k, q_pos, mod, 0.125)
        stop = threading.Event()

        def release():
            while not stop.is_set():
                _C.release_cpu_scratch()

        t = threading.Thread(target=release)
        t.start()
        try:
            got = [OPS.score_text_vision(q, k, q_pos, mod, 0.125) for _ in range(20)]
        finally:
            stop.set()
            t.join()
        for s, st in got:
            assert torch.equal(s, want[0]) and torch.equal(st, want[1]), dtype
