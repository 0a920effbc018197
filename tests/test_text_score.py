"""text_score (SPEC §1.3): "all_queries" (default, the released code: a text slot's score is its
attention column sum over ALL query rows) and "guidance" (the guidance rows only), in the fused
ops against the reference on text-heavy prompts (a long system prompt before the image, text
between two images, left/right padding, GQA and MHA, fp32/fp16/bf16) where text IS evicted, and through
tgvkv.apply on eager tiny models against the eager-attention oracle."""

import math

import pytest
import torch

from conftest import (OPS, PAD, TEXT, VISION, assert_scores_close, assert_stats_close, randn,
                      ref)
from tgvkv import torch_impl


def _layout(segments, N=None, left=False):
    """One sample's modality codes from ("t", n) / ("v", n) segments, padded to N."""
    codes = []
    for kind, n in segments:
        codes += [TEXT if kind == "t" else VISION] * n
    N = len(codes) if N is None else N
    pad = [PAD] * (N - len(codes))
    return (pad + codes) if left else (codes + pad)


# text-heavy batches: (segments per sample, padding side)
LAYOUTS = {
    "system_prompt": ([[("t", 34), ("v", 20), ("t", 6)],
                       [("t", 20), ("v", 12), ("t", 9)]], "right"),
    "text_between_images": ([[("t", 6), ("v", 14), ("t", 18), ("v", 10), ("t", 5)],
                             [("t", 12), ("v", 8), ("t", 9), ("v", 9), ("t", 7)]], "left"),
    # several row tiles of the CPU text-mass kernel (64 rows with one query head per KV head,
    # 32 with 8 / 2), the last one short
    "long_prompt": ([[("t", 37), ("v", 120), ("t", 11), ("v", 45), ("t", 9)],
                     [("t", 5), ("v", 150), ("t", 20)]], "right"),
}


def _modality(name):
    samples, side = LAYOUTS[name]
    N = max(sum(n for _, n in s) for s in samples)
    return torch.tensor([_layout(s, N, side == "left") for s in samples], dtype=torch.int8)


def _rows(q, q_pos):
    return torch.stack([q[b][:, q_pos[b].clamp(min=0)] for b in range(q.shape[0])])


@pytest.mark.parametrize("heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_score_text_vision_both_modes_match_reference(layout, dtype, heads):
    mod = _modality(layout)
    q_pos = ref.guidance_positions(mod)
    B, N = mod.shape
    (Hq, Hkv), D = heads, 32
    q = randn((B, Hq, N, D), dtype, 1)
    k = randn((B, Hkv, N, D), dtype, 2)
    scale = 1 / math.sqrt(D)
    rtol = 1e-4 if dtype == torch.float32 else 1e-3
    got_a, st_a = OPS.score_text_vision(q, k, q_pos, mod, scale)  # default: all_queries
    exp_a, est_a = ref.score_text_vision(q, k, q_pos, mod, scale, "all_queries")
    assert_scores_close(got_a, exp_a, mod, rtol)
    assert_stats_close(st_a, est_a, rtol)
    assert bool((got_a[mod == PAD] == 0).all())
    rows = _rows(q, q_pos)
    got_g, st_g = OPS.score_text_vision(rows, k, q_pos, mod, scale, "guidance")
    exp_g, est_g = ref.score_text_vision(rows, k, q_pos, mod, scale, "guidance")
    assert_scores_close(got_g, exp_g, mod, rtol)
    # vision scores and (S, I) come from the guidance rows in both modes, bit for bit
    vis = mod == VISION
    assert torch.equal(got_a[vis], got_g[vis]) and torch.equal(st_a, st_g)
    # text after the last vision slot: equal in both modes; text before it: not
    after = torch.zeros_like(vis)
    for b in range(B):
        after[b, int(q_pos[b, 0]):] = True
    txt = mod == TEXT
    torch.testing.assert_close(got_a[txt & after], got_g[txt & after], rtol=rtol, atol=1e-6)
    assert float((got_a[txt & ~after] - got_g[txt & ~after]).abs().max()) > 0.1
    # the plain-PyTorch composition (benchmark baseline) computes the same thing
    ti, tst = torch_impl.score_text_vision(q, k, q_pos, mod, scale)
    assert_scores_close(ti, exp_a, mod, rtol)


@pytest.mark.parametrize("rows_per_chunk", [1, 7, 32, 10_000])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_plain_text_column_mass_chunks_match_reference(layout, rows_per_chunk):
    """The baseline's row chunks (each against its causal keys [0, r1) only) give the reference's
    text scores at any chunk size: one row, a size that divides nothing, and one chunk."""
    mod = _modality(layout)
    q_pos = ref.guidance_positions(mod)
    B, N = mod.shape
    q = randn((B, 6, N, 16), torch.float32, 3)  # GQA 6/3
    k = randn((B, 3, N, 16), torch.float32, 4)
    exp, _ = ref.score_text_vision(q, k, q_pos, mod, 0.25, "all_queries")
    got = torch_impl.text_column_mass(q, k, mod, 0.25, rows_per_chunk=rows_per_chunk)
    txt = mod == TEXT
    torch.testing.assert_close(got[txt], exp[txt], rtol=1e-5, atol=1e-6)
    assert bool((got[mod == PAD] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_all_queries_any_guidance_rows_counted_once(dtype):
    """The fused path (op and plain composition) takes the guidance rows' share of a text score
    from their attention and the other rows' share from the text-mass pass: with guidance rows
    that are not the trailing text (rows in the middle, a vision row, rows followed by more
    text, a sample with none) every real row still counts exactly once, as in the reference."""
    mod = _modality("system_prompt")
    B, N = mod.shape
    q_pos = torch.full((B, 5), -1, dtype=torch.int64)
    v0 = int((mod[0] == VISION).nonzero()[0])
    q_pos[0, :4] = torch.tensor([3, 17, v0 + 2, N - 3])  # middle text, a vision row, near the end
    # sample 1: no guidance rows at all
    Hq, Hkv, D = 6, 2, 32
    q = randn((B, Hq, N, D), dtype, 41)
    k = randn((B, Hkv, N, D), dtype, 42)
    rtol = 1e-4 if dtype == torch.float32 else 1e-3
    exp, est = ref.score_text_vision(q, k, q_pos, mod, 0.2, "all_queries")
    got, st = OPS.score_text_vision(q, k, q_pos, mod, 0.2)
    assert_scores_close(got, exp, mod, rtol)
    assert_stats_close(st, est, rtol)
    ti, _ = torch_impl.score_text_vision(q, k, q_pos, mod, 0.2)
    assert_scores_close(ti, exp, mod, rtol)
    # the text scores really are all rows' mass: sample 1's equal the plain column mass
    full = torch_impl.text_column_mass(q, k, mod, 0.2)
    txt = mod[1] == TEXT
    torch.testing.assert_close(got[1][txt], full[1][txt], rtol=rtol, atol=1e-6)


def test_evict_all_queries_matches_reference_and_evicts_text():
    mod = _modality("text_between_images")
    q_pos = ref.guidance_positions(mod)
    B, N = mod.shape
    L, Hq, Hkv, D = 3, 4, 2, 32
    qs = [randn((B, Hq, N, D), torch.float32, 10 + l) for l in range(L)]
    kc = [randn((B, Hkv, N, D), torch.float32, 20 + l) for l in range(L)]
    vc = [randn((B, Hkv, N, D), torch.float32, 30 + l) for l in range(L)]
    rows = [_rows(q, q_pos) for q in qs]
    modes_differ = False
    for keep_ratio in (0.2, 0.1, 0.05):
        kr, vr = [k.clone() for k in kc], [v.clone() for v in vc]
        exp = ref.evict(kr, vr, qs, q_pos, mod, 0.25, keep_ratio)  # default all_queries
        kg, vg = [k.clone() for k in kc], [v.clone() for v in vc]
        got = OPS.evict(kg, vg, qs, q_pos, mod, 0.25, keep_ratio)
        for a, e in zip(got[:3], exp[:3]):  # keep_idx, n_kept, n_protected
            assert torch.equal(a.cpu(), e.cpu()), keep_ratio
        torch.testing.assert_close(got[3], exp[3], rtol=1e-5, atol=1e-6)  # keep_fraction
        for l in range(L):  # compaction as the reference's
            for b in range(B):
                n = int(got[1][l, b])
                assert torch.equal(kg[l][b, :, :n], kr[l][b, :, :n])
                assert torch.equal(vg[l][b, :, :n], vr[l][b, :, :n])
        # plain PyTorch (the benchmark baseline): the same kept slots
        ti = torch_impl.evict(kc, vc, qs, q_pos, mod, 0.25, keep_ratio)
        assert torch.equal(ti[2], got[0])
        # text is really evicted (else the text ranking would not matter)
        keep_idx = got[0]
        assert any(bool(((mod[b] == TEXT) & ~torch.isin(torch.arange(N), keep_idx[l, b])).any())
                   for l in range(L) for b in range(B)), keep_ratio
        g = OPS.evict([k.clone() for k in kc], [v.clone() for v in vc], rows, q_pos, mod, 0.25,
                      keep_ratio, text_score="guidance")
        modes_differ |= not torch.equal(g[0], keep_idx)
    assert modes_differ, "the guidance-only ranking kept the same slots at every keep ratio"


def test_all_queries_independent_of_thread_count():
    mod = _modality("system_prompt")
    q_pos = ref.guidance_positions(mod)
    B, N = mod.shape
    q = randn((B, 8, N, 64), torch.bfloat16, 3)
    k = randn((B, 1, N, 64), torch.bfloat16, 4)
    n0 = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            outs.append(OPS.score_text_vision(q, k, q_pos, mod, 0.125))
    finally:
        torch.set_num_threads(n0)
    for s, t in outs[1:]:
        assert torch.equal(s, outs[0][0]) and torch.equal(t, outs[0][1])


def test_all_queries_strided_q_and_pad_rows_ignored():
    """q as a transposed view (HF's [B, N, H, D] storage) gives the same scores; garbage (even
    NaN) in the query rows of pad slots changes nothing; NaN in a real row is refused."""
    mod = _modality("text_between_images")
    q_pos = ref.guidance_positions(mod)
    B, N = mod.shape
    q = randn((B, 4, N, 32), torch.float32, 5, transposed=True)
    k = randn((B, 2, N, 32), torch.float32, 6)
    s0, t0 = OPS.score_text_vision(q.contiguous(), k, q_pos, mod, 0.2)
    s1, t1 = OPS.score_text_vision(q, k, q_pos, mod, 0.2)
    assert torch.equal(s0, s1) and torch.equal(t0, t1)
    q2 = q.contiguous().clone()
    q2[:, :, :][(mod == PAD)[:, None, :].expand(B, 4, N)] = float("nan")
    s2, t2 = OPS.score_text_vision(q2, k, q_pos, mod, 0.2)
    assert torch.equal(s0, s2) and torch.equal(t0, t2)
    q3 = q.contiguous().clone()
    real_nonguid = int((mod[0] == TEXT).nonzero()[0])
    q3[0, 1, real_nonguid, 3] = float("nan")
    with pytest.raises(RuntimeError, match=r"score_text_vision.*'q'.*NaN or inf.*all_queries"):
        OPS.score_text_vision(q3, k, q_pos, mod, 0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "guidance_rows"])
def test_any_non_finite_query_element_is_found(dtype, layout):
    """The finiteness check of q reads every element of every used row, in any layout: a NaN,
    +inf or -inf at the first, a middle or the last element of a row (head_dim 40: the last
    ones lie past the last whole vector of every ISA) is an error naming q; pad rows are not
    read; the same q without it scores."""
    mod = _modality("system_prompt")
    q_pos = ref.guidance_positions(mod)
    B, N = mod.shape
    Hq, Hkv, D = 4, 2, 40
    q = randn((B, Hq, N, D), dtype, 21, transposed=layout == "transposed")
    k = randn((B, Hkv, N, D), dtype, 22)
    mode = "guidance" if layout == "guidance_rows" else "all_queries"
    if mode == "guidance":
        q = _rows(q, q_pos)
    rows = {0: 0, 1: 1}  # (sample: row) of q; all_queries: sample 0's last real row
    if mode == "all_queries":
        rows[0] = max(j for j in range(N) if int(mod[0, j]) != PAD)
        pad_row = min(j for j in range(N) if int(mod[1, j]) == PAD)
        qp = q.clone()
        qp[1, :, pad_row] = float("nan")  # a pad row is never read
        s_pad, _ = OPS.score_text_vision(qp, k, q_pos, mod, 0.2, mode)
        s_ref, _ = OPS.score_text_vision(q, k, q_pos, mod, 0.2, mode)
        assert torch.equal(s_pad, s_ref)
    for b, row in rows.items():
        for h, d in ((0, 0), (Hq - 1, D // 2), (1, D - 1)):
            for value in (float("nan"), float("inf"), float("-inf")):
                bad = q.clone()  # clone keeps the strides of a transposed view
                bad[b, h, row, d] = value
                assert bad.stride() == q.stride()
                with pytest.raises(RuntimeError, match=r"score_text_vision.*'q'.*NaN or inf"):
                    OPS.score_text_vision(bad, k, q_pos, mod, 0.2, mode)
    OPS.score_text_vision(q, k, q_pos, mod, 0.2, mode)


@pytest.mark.parametrize("text_score", ["all_queries", "guidance"])
def test_huge_finite_queries_are_not_reported_as_non_finite(text_score):
    """The finiteness check of q (min and max per sample) is exact: huge finite queries whose sum
    overflows fp32 give no false 'NaN or inf' error, and the reference's scores."""
    mod = _modality("system_prompt")
    q_pos = ref.guidance_positions(mod)
    B, N = mod.shape
    q = randn((B, 8, N, 32), torch.float32, 11)
    k = randn((B, 2, N, 32), torch.float32, 12)
    q[0, :, :, 0] = 1e37  # sample 0's sum: 8 heads x N rows x 1e37 > the fp32 maximum
    if text_score == "guidance":
        q = _rows(q, q_pos)
    assert float(q[0].sum()) == float("inf")
    got, st = OPS.score_text_vision(q, k, q_pos, mod, 0.2, text_score)
    exp, est = ref.score_text_vision(q, k, q_pos, mod, 0.2, text_score)
    assert_scores_close(got, exp, mod, 1e-4)
    assert_stats_close(st, est, 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("text_score", ["all_queries", "guidance"])
def test_score_text_vision_allocates_nothing_of_q_size(dtype, text_score):
    """No temporary of the query block's size (a gather of the guidance rows, an fp32 copy of a
    half-precision q for the finiteness check): the op's extra memory is its outputs."""
    from tgvkv.bench.timing import peak_extra_bytes
    mod = _modality("system_prompt")
    q_pos = ref.guidance_positions(mod)
    B, N = mod.shape
    # 32 heads: an fp32 copy of q would be >= 1 MiB; all_queries reads HF's transposed layout
    q = randn((B, 32, N, 128), dtype, 51, transposed=True)
    k = randn((B, 4, N, 128), dtype, 52)
    if text_score == "guidance":
        q = _rows(q, q_pos)
    else:
        assert not q.is_contiguous() and q.numel() * 4 >= (1 << 20)
    peak, _ = peak_extra_bytes(lambda: OPS.score_text_vision(q, k, q_pos, mod, 0.1, text_score),
                               "cpu")
    assert peak <= 16 * 1024, peak


def test_text_score_errors_name_op_argument_and_expectation():
    mod = _modality("system_prompt")
    q_pos = ref.guidance_positions(mod)
    B, N = mod.shape
    q = randn((B, 4, N, 32), torch.float32, 7)
    k = randn((B, 2, N, 32), torch.float32, 8)
    with pytest.raises(ValueError, match=r"score_text_vision: text_score must be \"all_queries\" "
                                         r"or \"guidance\", got \"rows\""):
        OPS.score_text_vision(q, k, q_pos, mod, 0.2, "rows")
    with pytest.raises(ValueError, match=r"tgvkv::evict: text_score must be"):
        OPS.evict([k.clone()], [k.clone()], [q], q_pos, mod, 0.2, 0.1, text_score="all")
    rows = _rows(q, q_pos)  # guidance rows where all query states are expected
    with pytest.raises(RuntimeError, match=r"score_text_vision: 'q' dim 2 must be N = \d+ .*"
                                           r"all_queries.*\[B, Hq, N, D\]"):
        OPS.score_text_vision(rows, k, q_pos, mod, 0.2)
    with pytest.raises(RuntimeError, match=r"evict: 'queries\[l\]' dim 2 must be N"):
        OPS.evict([k.clone()], [k.clone()], [rows], q_pos, mod, 0.2, 0.1)
    with pytest.raises(RuntimeError, match=r"'q' dim 2 \(T \(from q_pos\)\)"):
        OPS.score_text_vision(q, k, q_pos, mod, 0.2, "guidance")
    from tgvkv import TGVKV
    with pytest.raises(ValueError, match="text_score"):
        TGVKV(text_score="rows")
    assert TGVKV().text_score == "all_queries"


def test_bench_records_text_score_and_agrees_with_plain_pytorch(monkeypatch):
    import tgvkv.bench.ops as bench_ops
    from tgvkv.bench.cli import build_parser
    from tgvkv.bench.ops import ops_table, run_ops
    from tgvkv.bench.shapes import PRESETS

    monkeypatch.setattr(bench_ops, "copy_bandwidth_gbs", lambda device: 1.0)  # (seconds)
    import dataclasses

    shape = dataclasses.replace(PRESETS["tiny"], layers=1, batch=1)
    for ts in ("all_queries", "guidance"):
        sec = run_ops(shape, None, "cpu", torch.float32, "float32", [0.1],
                      stages=("score_text_vision", "evict"), warmup=0, reps=1, min_time=0.0,
                      memory=False, progress=False, text_score=ts)
        assert sec["text_score"] == ts and f"text_score={ts}" in ops_table(sec)
        ev = [r for r in sec["rows"] if r["op"] == "evict"][0]
        assert ev["same_result"] is True  # op and plain PyTorch keep the same slots
    a = build_parser().parse_args(["generate", "--preset", "llava-1.5-7b", "--layers", "2"])
    assert a.layers == 2 and a.text_score == "all_queries"
    a = build_parser().parse_args(["accuracy", "--text-score", "guidance"])
    assert a.text_score == "guidance"
