"""The roofline model of ``tgvkv-bench generate --kv-dominated`` (no model is run here)."""

import pytest

from tgvkv.bench.kv_dominated import KV_SHARE, Roofline, choose_prompt

# 2 layers of LLaVA-1.5-7B + its LM head (fp32), 50 GFLOP/s, 20 GB/s
RATES = {"gemm_flops": 50e9, "bandwidth_bytes_s": 20e9}
P = 2 * 202_375_168 + 32064 * 4096


def test_weights_time_is_memory_bound_at_batch_1_and_compute_bound_at_8():
    r = Roofline(RATES, P, 4, 2, 32, 128)
    assert r.weights_s(1) == pytest.approx(P * 4 / 20e9)       # bytes / bandwidth
    assert r.weights_s(8) == pytest.approx(2 * 8 * P / 50e9)    # FLOPs / GEMM rate
    # K + V of one slot of one sample, fp32, 2 layers of 32 heads x 128: 2 x 32 KiB
    assert r.kv_bytes(1, 1) == 2 * 2 * 32 * 128 * 4


def test_step_terms_add_up_and_eviction_reads_only_keys():
    r = Roofline(RATES, P, 4, 2, 32, 128)
    s = r.step(8, 4000, append_copies=True)
    assert s["kv_append_s"] == pytest.approx(2 * s["kv_read_s"])  # cat: read + write all K/V
    assert s["total_s"] == pytest.approx(s["weights_s"] + 3 * s["kv_read_s"])
    e = r.step(8, 200, evict_slots=200)
    assert e["evict_read_s"] == pytest.approx(e["kv_read_s"] / 2)
    assert s["weight_flops"] == 2 * 8 * P and s["weight_bytes"] == 4 * P


def test_prompt_length_makes_kv_reads_the_chosen_share():
    r = Roofline(RATES, P, 4, 2, 32, 128)
    imgs, N = choose_prompt(r, 8, 64, 576, 100_000)
    assert N == 64 + 576 * imgs

    def share(n):
        s = r.step(8, n)
        return s["kv_read_s"] / s["total_s"]

    assert share(N) >= KV_SHARE > share(N - 576)  # the fewest whole images that reach it
    # the cap wins over the model (and the table then says "NOT K/V-dominated")
    assert choose_prompt(r, 8, 64, 576, 2000) == (3, 64 + 3 * 576)
