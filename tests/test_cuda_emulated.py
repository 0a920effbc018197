"""The CUDA kernels' logic on a CPU-only machine: tools/cuda_emu compiles the torch-free kernel
headers (csrc/include/tgvkv/cuda/*.cuh) with g++ against fake CUDA headers and runs every block
as fibers switched at every barrier (see tools/cuda_emu/README.md). Each test writes random
inputs to a temporary directory, runs the emulated kernels with the launch configurations of
csrc/cuda/*.cu, and compares with the CPU ops:

- scores within 2e-4 (per class, relative) and stats as tests/test_ops_scores.py does; the
  scores of a layer are bit-identical whether it is scored alone or in a batch of layers;
- budgets, keep_idx, n_kept, n_protected, keep_fraction exact;
- compacted K/V bit-identical over the kept prefix;
- decode: evicted pos, lengths and the live slots (pos, K, V) exact, step after step, for one
  layer (decode_evict_) and for a cache of layers in launch groups (decode_evict_layers_).

It checks the logic (indexing, barriers, tie-breaks, tiling, splits), not the hardware: memory
model, real CUB/WMMA, alignment beyond 16-byte loads, launch limits and speed are not checked.
Skipped only when no C++ compiler (g++ or $CXX) is found.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import OPS, assert_scores_close, assert_stats_close, make_modality, randn, ref

# one xdist worker runs this module (its module/session fixture is built once)
pytestmark = pytest.mark.xdist_group("cuda_emu")


REPO = Path(__file__).resolve().parent.parent
EMU_DIR = REPO / "tools" / "cuda_emu"
DECODE_SPAN = 256  # kDecodeSpan of csrc/cuda/decode_evict.cu (the launch default)
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
RTOL = 2e-4


# ------------------------------------------------------------------------------------------
# Harness
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    """Builds the emulator once per session; returns a runner ``emu(op, meta, **inputs)``.
    ``TGVKV_CUDA_EMU=/path/to/emu`` uses a prebuilt emulator instead (e.g. one built from
    modified kernel headers, to check that the tests catch a change);
    ``TGVKV_CUDA_EMU_SANITIZE=1`` builds it with AddressSanitizer + UBSan (out-of-bounds
    global and shared-memory accesses abort; +15 s of compile time)."""
    out = tmp_path_factory.mktemp("cuda_emu")
    exe = os.environ.get("TGVKV_CUDA_EMU")
    if not exe:
        cxx = os.environ.get("CXX", "g++")
        if shutil.which(cxx) is None:
            pytest.skip(f"no C++ compiler ({cxx}) to build the CUDA kernel emulator")
        sys.path.insert(0, str(EMU_DIR))
        try:
            import build as emu_build
        finally:
            sys.path.remove(str(EMU_DIR))
        try:
            exe = emu_build.build(out, sanitize=os.environ.get("TGVKV_CUDA_EMU_SANITIZE") == "1")
        except subprocess.CalledProcessError as e:
            pytest.fail(f"the CUDA kernel emulator does not compile:\n{e.output[-6000:]}")
    counter = [0]

    def run(op, meta, **inputs):
        counter[0] += 1
        d = out / f"case{counter[0]:03d}_{op}"
        d.mkdir()
        (d / "meta.txt").write_text("".join(f"{k} {_fmt(v)}\n" for k, v in meta.items()))
        for name, t in inputs.items():
            (d / f"{name}.bin").write_bytes(_raw(t))
        r = subprocess.run([str(exe), op, str(d)], capture_output=True, text=True, timeout=600)
        err = r.stderr if len(r.stderr) < 5000 else r.stderr[:3000] + "\n[...]\n" + r.stderr[-1500:]
        assert r.returncode == 0, f"emu {op} failed ({r.returncode}) on {d}:\n{err}"
        return Outputs(d)

    return run


def _fmt(v):
    return repr(float(v)) if isinstance(v, float) else str(int(v))


def _raw(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    return t.numpy().tobytes()


class Outputs:
    def __init__(self, d: Path):
        self.d = d

    def get(self, name, dtype, shape):
        raw = bytearray((self.d / f"{name}.out").read_bytes())
        store = torch.int16 if dtype in (torch.float16, torch.bfloat16) else dtype
        t = torch.frombuffer(raw, dtype=store).reshape(shape).clone()
        return t.view(dtype) if store is not dtype else t


def _bits(t):
    """Exact-comparison view (NaN-safe, -0.0 != 0.0)."""
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _batch(n_real, n_guid, n_images, pad, seed, N=None):
    mod = make_modality(n_real, n_guid, n_images, pad, N=N, seed=seed)
    return mod, ref.guidance_positions(mod)


# ------------------------------------------------------------------------------------------
# score_text_vision (and the scoring stage of evict)
# ------------------------------------------------------------------------------------------
SCORE_CASES = {
    # name: (n_real, n_guid, n_images, pad, Hq, Hkv, D, dtype, L, flags)
    "f32_gqa_right": ([150, 97], [12, 30], 1, "right", 4, 2, 64, torch.float32, 1, {}),
    "bf16_T>64_left_multi_image": ([200, 130], [70, 5], [2, 1], "left", 4, 1, 40, torch.bfloat16, 1, {}),
    "f16_strided_k_mixed": ([180, 120, 60], [9, 3, 0], [2, 1, 0], "mixed", 6, 3, 32, torch.float16, 1,
                            {"kt": 1}),
    "bf16_scalar_loads_D30": ([300], [8], 3, "right", 2, 2, 30, torch.bfloat16, 1, {}),
    "f32_no_vector_loads_3_layers": ([90, 70], [5, 6], [1, 2], "left", 2, 1, 36, torch.float32, 3,
                                     {"novec": 1}),
}


def _score_inputs(n_real, n_guid, n_images, pad, Hq, Hkv, D, dtype, L, seed):
    mod, q_pos = _batch(n_real, n_guid, n_images, pad, seed)
    B, N = mod.shape
    T = q_pos.shape[1]
    qs = [randn((B, Hq, T, D), dtype, seed + 10 + l) for l in range(L)]
    ks = [randn((B, Hkv, N, D), dtype, seed + 50 + l) for l in range(L)]
    return mod, q_pos, qs, ks


def _score_meta(mod, q_pos, qs, ks, dtype, scale, flags):
    B, N = mod.shape
    return dict(L=len(qs), B=B, Hq=qs[0].shape[1], Hkv=ks[0].shape[1], T=q_pos.shape[1],
                D=ks[0].shape[3], N=N, scale=scale, dtype=DTYPE_CODE[dtype], **flags)


def _k_storage(ks, kt):
    # kt: the kernel reads k through a transposed view of [B, N, Hkv, D] storage
    return torch.stack([k.transpose(1, 2).contiguous() if kt else k for k in ks])


@pytest.mark.parametrize("name", list(SCORE_CASES))
def test_score_text_vision(emu, name):
    n_real, n_guid, n_images, pad, Hq, Hkv, D, dtype, L, flags = SCORE_CASES[name]
    mod, q_pos, qs, ks = _score_inputs(n_real, n_guid, n_images, pad, Hq, Hkv, D, dtype, L, seed=3)
    scale = float(torch.tensor(1 / math.sqrt(D), dtype=torch.float32))
    B, N = mod.shape
    out = emu("score", _score_meta(mod, q_pos, qs, ks, dtype, scale, flags),
              q=torch.stack(qs), k=_k_storage(ks, flags.get("kt", 0)), q_pos=q_pos, modality=mod)
    scores = out.get("scores", torch.float32, (L, B, N))
    stats = out.get("stats", torch.float32, (L, B, 2))
    for l in range(L):
        k_view = (ks[l].transpose(1, 2).contiguous().transpose(1, 2) if flags.get("kt") else ks[l])
        es, et = OPS.score_text_vision(qs[l], k_view, q_pos, mod, scale, "guidance")
        assert_scores_close(scores[l], es, mod, rtol=RTOL)
        assert_stats_close(stats[l], et, rtol=RTOL)
        assert torch.equal(scores[l][mod == 0], torch.zeros_like(scores[l][mod == 0]))


def test_mi_of_one_row_or_one_vision_slot_is_exactly_zero(emu):
    """A text->vision block of one guidance row or one vision slot has I = 0 exactly (as the CPU
    op and the reference: tests/test_mi_degenerate.py), not the expansion's rounding noise."""
    D, L, dtype = 16, 3, torch.float32
    mod = torch.ones(2, 40, dtype=torch.int8)
    mod[0, 1] = 2  # one vision slot, 38 guidance rows after it
    mod[1, 1:39] = 2  # 38 vision slots, one guidance row
    q_pos = ref.guidance_positions(mod)
    T = q_pos.shape[1]
    qs = [randn((2, 4, T, D), dtype, 70 + l) for l in range(L)]
    ks = [randn((2, 2, 40, D), dtype, 80 + l) for l in range(L)]
    scale = float(torch.tensor(1 / math.sqrt(D), dtype=torch.float32))
    out = emu("score", _score_meta(mod, q_pos, qs, ks, dtype, scale, {}),
              q=torch.stack(qs), k=torch.stack(ks), q_pos=q_pos, modality=mod)
    stats = out.get("stats", torch.float32, (L, 2, 2))
    assert (stats[..., 0] > 0).all()
    assert torch.equal(stats[..., 1], torch.zeros(L, 2)), stats


def test_score_layer_alone_equals_batched(emu):
    """A layer's scores do not depend on the layers launched with it (bit-identical)."""
    dtype, L = torch.bfloat16, 3
    mod, q_pos, qs, ks = _score_inputs([260, 200], [10, 4], 2, "left", 4, 2, 64, dtype, L, seed=21)
    B, N = mod.shape
    meta = _score_meta(mod, q_pos, qs, ks, dtype, 0.125, {})
    allout = emu("score", meta, q=torch.stack(qs), k=torch.stack(ks), q_pos=q_pos, modality=mod)
    one = emu("score", {**meta, "L": 1}, q=qs[1], k=ks[1], q_pos=q_pos, modality=mod)
    s_all = allout.get("scores", torch.float32, (L, B, N))
    t_all = allout.get("stats", torch.float32, (L, B, 2))
    assert torch.equal(_bits(one.get("scores", torch.float32, (1, B, N))[0]), _bits(s_all[1]))
    assert torch.equal(_bits(one.get("stats", torch.float32, (1, B, 2))[0]), _bits(t_all[1]))
    for l in range(L):
        es, et = OPS.score_text_vision(qs[l], ks[l], q_pos, mod, 0.125, "guidance")
        assert_scores_close(s_all[l], es, mod, rtol=RTOL)
        assert_stats_close(t_all[l], et, rtol=RTOL)


# ------------------------------------------------------------------------------------------
# text_score="all_queries": the text slots' mass over all query rows (text_mass.cuh)
# ------------------------------------------------------------------------------------------
TEXT_MASS_CASES = {
    # name: (n_real, n_guid, n_images, pad, Hq, Hkv, D, dtype, L, flags)
    "f32_gqa_left_2img": ([150, 97], [12, 20], 2, "left", 4, 2, 64, torch.float32, 1, {}),
    # two layers in one launch group (layer index in the grid), small
    "f32_2_layers": ([70], [6], 1, "right", 2, 1, 32, torch.float32, 2, {}),
    "bf16_strided_k_right": ([140, 70], [9, 3], [2, 1], "right", 4, 1, 40, torch.bfloat16, 1,
                             {"kt": 1}),
    "f16_scalar_loads_D30": ([130], [8], 2, "right", 2, 2, 30, torch.float16, 1, {"novec": 1}),
}


@pytest.mark.parametrize("name", list(TEXT_MASS_CASES))
def test_text_mass_all_queries(emu, name):
    """The emulated all-query text mass equals the CPU op's text scores (text_score="all_queries");
    the other slots are left as they were; the kept slots then equal the CPU op's."""
    n_real, n_guid, n_images, pad, Hq, Hkv, D, dtype, L, flags = TEXT_MASS_CASES[name]
    mod, q_pos = _batch(n_real, n_guid, n_images, pad, seed=5)
    B, N = mod.shape
    qs = [randn((B, Hq, N, D), dtype, 30 + l) for l in range(L)]
    ks = [randn((B, Hkv, N, D), dtype, 60 + l) for l in range(L)]
    scale = float(torch.tensor(1 / math.sqrt(D), dtype=torch.float32))
    sentinel = torch.full((L, B, N), -7.0)
    meta = dict(L=L, B=B, Hq=Hq, Hkv=Hkv, D=D, N=N, scale=scale, dtype=DTYPE_CODE[dtype], **flags)
    out = emu("textmass", meta, q=torch.stack(qs), k=_k_storage(ks, flags.get("kt", 0)),
              modality=mod, scores=sentinel)
    got = out.get("scores", torch.float32, (L, B, N))
    txt = mod == 1
    assert torch.equal(got[:, ~txt], sentinel[:, ~txt]), "non-text slots were written"
    exp = torch.stack([OPS.score_text_vision(qs[l], ks[l], q_pos, mod, scale, "all_queries")[0]
                       for l in range(L)])
    for l in range(L):
        assert_scores_close(torch.where(txt, got[l], exp[l]), exp[l], mod, rtol=RTOL)
    # text really ranks differently from the guidance-only sums (the test is not vacuous)
    rows = torch.stack([qs[0][b][:, q_pos[b].clamp(min=0)] for b in range(B)])
    guid = OPS.score_text_vision(rows, ks[0], q_pos, mod, scale, "guidance")[0]
    assert (guid[txt] - exp[0][txt]).abs().max() > 1e-2
    emu_scores = torch.where(txt, got, exp)
    keep = torch.tensor([[max(6, int(nt) // 2) for nt in txt.sum(1)]] * L)  # text is evicted
    e_idx, _ = OPS.select_keep(exp, keep, q_pos, mod)
    g_idx, _ = OPS.select_keep(emu_scores, keep, q_pos, mod)
    assert torch.equal(e_idx, g_idx)


# ------------------------------------------------------------------------------------------
# layer_budgets, select_keep, evict_from_scores (no cache)
# ------------------------------------------------------------------------------------------
SELECT_CASES = {
    # name: (n_real, n_guid, n_images, pad, L, n_sink, keep_ratio, budget, redistribute, N)
    "small_3_samples_sink4": ([60, 45, 6], [8, 3, 1], 2, "right", 3, 4, 0.1, "mass", False, None),
    "mi_redistribute_sink0_no_guidance": ([900, 700], [12, 0], 2, "left", 4, 0, 0.05, "mi", True, None),
    "two_tiles_sink1": ([2500], [30], 3, "right", 2, 1, 0.3, "mass", False, None),
    "keep_all_no_vision_sink2": ([40, 30], [5, 4], [0, 1], "mixed", 3, 2, 1.0, "mass", False, None),
    "many_ties_sink3_padded": ([300, 150, 20], [6, 2, 3], [2, 1, 1], "mixed", 2, 3, 0.2, "mi", True, 320),
    "three_tiles_slow": ([5000, 4700], [20, 9], 4, "mixed", 2, 4, 0.02, "mass", False, None),
}
SLOW = {"three_tiles_slow", "bf16_D128_N2500_slow"}


def _cases(table):
    return [pytest.param(k, marks=pytest.mark.slow) if k in SLOW else k for k in table]


def _select_inputs(mod, L, seed):
    B, N = mod.shape
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(L, B, N, generator=g)
    s = torch.where(torch.rand(L, B, N, generator=g) < 0.4, (s * 4).floor() / 4, s)  # ties
    s[..., 3::19] = -0.0
    s[..., 5::23] = 0.0
    s[:, mod == 0] = 0
    nb = (mod != 0).sum(1)
    keep = (torch.rand(L, B, generator=g) * (nb + 3).float()).long()  # 0 .. above N_b
    stats = torch.rand(L, B, 2, generator=g) ** 2
    if L > 2:
        stats[1, 0] = 0
    return s, keep, stats


@pytest.mark.parametrize("name", _cases(SELECT_CASES))
def test_budgets_and_selection(emu, name):
    n_real, n_guid, n_images, pad, L, n_sink, kr, budget, redis, N = SELECT_CASES[name]
    mod, q_pos = _batch(n_real, n_guid, n_images, pad, seed=len(name), N=N)
    B, N = mod.shape
    scores, keep, stats = _select_inputs(mod, L, seed=len(name) + 1)
    meta = dict(L=L, B=B, T=q_pos.shape[1], N=N, n_sink=n_sink, keep_ratio=float(kr),
                mode=0 if budget == "mass" else 1, redistribute=int(redis))
    io = dict(q_pos=q_pos, modality=mod)

    sel = emu("select", meta, scores=scores, keep=keep, **io)
    e_idx, e_np = OPS.select_keep(scores, keep, q_pos, mod, n_sink)
    assert torch.equal(sel.get("keep_idx", torch.int64, (L, B, N)), e_idx)
    assert torch.equal(sel.get("n_protected", torch.int64, (L, B)), e_np)

    bud = emu("budgets", meta, stats=stats, **io)
    e_keep, e_frac = OPS.layer_budgets(stats, q_pos, mod, kr, budget, redis, n_sink)
    assert torch.equal(bud.get("keep", torch.int64, (L, B)), e_keep)
    assert torch.equal(bud.get("keep_fraction", torch.float64, (L, B)), e_frac)

    # evict_from_scores without a cache: budgets computed inside the selection blocks
    ev = emu("evict", {**meta, "from_scores": 1, "cache": 0}, scores=scores, stats=stats, **io)
    e = OPS.evict_from_scores([], [], scores, stats, q_pos, mod, kr, budget, redis, n_sink)
    assert torch.equal(ev.get("keep_idx", torch.int64, (L, B, N)), e[0])
    assert torch.equal(ev.get("n_kept", torch.int64, (L, B)), e[1])
    assert torch.equal(ev.get("n_protected", torch.int64, (L, B)), e[2])
    assert torch.equal(ev.get("keep_fraction", torch.float64, (L, B)), e[3])


def test_select_keep_int64_extremes(emu):
    """keep at INT64_MIN / -1 / above N_b / INT64_MAX: the reference's clamp, no wrapped
    n_real - keep (issue 17)."""
    mod, q_pos = _batch([40, 31], [6, 4], 2, "left", seed=5)
    B, N = mod.shape
    L = 4
    scores, _, _ = _select_inputs(mod, L, seed=6)
    keep = torch.tensor([[-2**63, 2**63 - 1], [-1, 10], [2**63 - 1, -2**63], [N + 5, 0]])
    meta = dict(L=L, B=B, T=q_pos.shape[1], N=N, n_sink=4, keep_ratio=0.5, mode=0,
                redistribute=0)
    sel = emu("select", meta, scores=scores, keep=keep, q_pos=q_pos, modality=mod)
    e_idx, e_np = ref.select_keep(scores, keep, q_pos, mod, 4)
    assert torch.equal(sel.get("keep_idx", torch.int64, (L, B, N)), e_idx)
    assert torch.equal(sel.get("n_protected", torch.int64, (L, B)), e_np)


def test_decode_n_protected_extremes(emu):
    """n_protected = INT64_MIN evicts as n_protected = 0 would (the CUDA op cannot refuse it
    without a host sync; the CPU op raises), INT64_MAX protects everything: no wrapped
    n - n_protected (issue 17)."""
    B, Hq, Hkv, D, S = 4, 2, 1, 16, 24
    k, v = randn((B, Hkv, S, D), torch.float32, 1), randn((B, Hkv, S, D), torch.float32, 2)
    pos = torch.arange(S).repeat(B, 1)
    length = torch.full((B,), 20)
    q = randn((B, Hq, D), torch.float32, 3)
    n_seen = torch.full((B,), 100)
    frac = torch.full((B,), 0.1, dtype=torch.float64)
    n_prot = torch.tensor([-2**63, 2**63 - 1, 0, 2**63 - 1])
    out = emu("decode", dict(B=B, Hq=Hq, Hkv=Hkv, D=D, Dv=D, S=S, scale=0.25, n_sink=4, span=8,
                             dtype=DTYPE_CODE[torch.float32]),
              k=k, v=v, pos=pos, length=length, q=q, n_seen=n_seen, keep_fraction=frac,
              n_protected=n_prot)
    as_cpu = torch.tensor([0, 2**63 - 1, 0, 2**63 - 1])
    ev_cpu = OPS.decode_evict_(k.clone(), v.clone(), pos.clone(), length.clone(), q, n_seen,
                               frac, as_cpu, 0.25, 4)
    ev = out.get("evicted", torch.int64, (B,))
    assert torch.equal(ev, ev_cpu) and int(ev[0]) >= 0 and int(ev[1]) == -1, (ev, ev_cpu)


# ------------------------------------------------------------------------------------------
# compact_
# ------------------------------------------------------------------------------------------
COMPACT_CASES = {
    # name: (B, H, N, Dk, Dv, dtype, sms, kt): unit bytes 16/8/4/2, row splits (small sms)
    "f32_D64_split_rows": (3, 2, 700, 64, 64, torch.float32, 4, 0),
    "bf16_Dk40_Dv24": (2, 3, 300, 40, 24, torch.bfloat16, 132, 0),
    "bf16_2byte_units_D3_D5": (2, 1, 90, 3, 5, torch.bfloat16, 132, 0),
    "f16_8byte_units_strided": (2, 2, 200, 4, 12, torch.float16, 132, 1),
    "f32_4byte_units_D5": (2, 2, 150, 5, 7, torch.float32, 132, 0),
    "bf16_D128_one_sm": (1, 2, 1300, 128, 128, torch.bfloat16, 1, 0),
    "bf16_D128_N2500_slow": (2, 4, 2500, 128, 128, torch.bfloat16, 8, 0),
}


def _random_keep_idx(B, N, gen, L=1):
    idx = torch.full((L, B, N), -1, dtype=torch.int64)
    for l in range(L):
        for b in range(B):
            n = int(torch.randint(0, N + 1, (1,), generator=gen))
            sel = torch.sort(torch.randperm(N, generator=gen)[:n]).values
            if b == 0 and l == 0:
                sel = torch.arange(min(N, 7))  # identity prefix only
            if b == 1 and l == 0:
                sel = torch.empty(0, dtype=torch.int64)  # nothing kept
            idx[l, b, : len(sel)] = sel
    return idx


@pytest.mark.parametrize("name", _cases(COMPACT_CASES))
def test_compact(emu, name):
    B, H, N, Dk, Dv, dtype, sms, kt = COMPACT_CASES[name]
    gen = torch.Generator().manual_seed(len(name))
    k = randn((B, H, N, Dk), dtype, 1, transposed=bool(kt))
    v = randn((B, H, N, Dv), dtype, 2, transposed=bool(kt))
    idx = _random_keep_idx(B, N, gen)[0]
    store = (lambda x: x.transpose(1, 2).contiguous()) if kt else (lambda x: x.contiguous())
    out = emu("compact", dict(L=1, B=B, H=H, N=N, Dk=Dk, Dv=Dv, dtype=DTYPE_CODE[dtype], sms=sms,
                              kt=kt), k=store(k), v=store(v), keep_idx=idx)
    shape = (lambda D: (B, N, H, D)) if kt else (lambda D: (B, H, N, D))
    unstore = (lambda x: x.transpose(1, 2)) if kt else (lambda x: x)
    ko = unstore(out.get("k", dtype, shape(Dk)))
    vo = unstore(out.get("v", dtype, shape(Dv)))
    kc, vc = k.clone(), v.clone()
    e_n = OPS.compact_(kc, vc, idx)
    assert torch.equal(out.get("n_kept", torch.int64, (1, B))[0], e_n)
    for b in range(B):
        n = int(e_n[b])
        assert torch.equal(_bits(ko[b, :, :n]), _bits(kc[b, :, :n])), f"k of sample {b}"
        assert torch.equal(_bits(vo[b, :, :n]), _bits(vc[b, :, :n])), f"v of sample {b}"


# ------------------------------------------------------------------------------------------
# evict: scoring -> budgets + selection -> compaction of every layer
# ------------------------------------------------------------------------------------------
EVICT_CASES = {
    # name: (n_real, n_guid, n_images, pad, L, Hq, Hkv, D, Dv, dtype, keep_ratio, budget, redis, n_sink)
    "bf16_gqa_left_3_layers": ([220, 160], [9, 4], [2, 1], "left", 3, 4, 2, 32, 16, torch.bfloat16,
                               0.3, "mass", False, 4),
    "f32_right_mi_redistribute": ([130, 100, 12], [6, 20, 3], 1, "right", 2, 2, 1, 24, 24,
                                  torch.float32, 0.15, "mi", True, 1),
    "f16_keep_ratio_1": ([80, 50], [4, 3], 1, "mixed", 2, 2, 2, 16, 8, torch.float16, 1.0, "mass",
                         False, 0),
    "f32_33_layers_two_launch_groups": ([70], [5], 1, "right", 33, 2, 1, 8, 4, torch.float32,
                                        0.4, "mass", False, 4),
    "bf16_large_slow": pytest.param(([700, 520], [40, 12], [3, 2], "left", 2, 8, 2, 128, 128,
                                     torch.bfloat16, 0.1, "mi", False, 4), marks=pytest.mark.slow),
}


@pytest.mark.parametrize("case", [pytest.param(v, id=k) if not hasattr(v, "values") else
                                  pytest.param(*v.values, marks=v.marks, id=k)
                                  for k, v in EVICT_CASES.items()])
def test_evict_pipeline(emu, case):
    n_real, n_guid, n_images, pad, L, Hq, Hkv, D, Dv, dtype, kr, budget, redis, n_sink = case
    mod, q_pos, qs, ks = _score_inputs(n_real, n_guid, n_images, pad, Hq, Hkv, D, dtype, L, seed=7)
    B, N = mod.shape
    vs = [randn((B, Hkv, N, Dv), dtype, 90 + l) for l in range(L)]
    scale = float(torch.tensor(1 / math.sqrt(D), dtype=torch.float32))
    meta = {**_score_meta(mod, q_pos, qs, ks, dtype, scale, {}), "Dk": D, "Dv": Dv, "n_sink": n_sink,
            "keep_ratio": float(kr), "mode": 0 if budget == "mass" else 1, "redistribute": int(redis)}
    out = emu("evict", meta, q=torch.stack(qs), k=torch.stack(ks), v=torch.stack(vs), q_pos=q_pos,
              modality=mod)
    scores = out.get("scores", torch.float32, (L, B, N))
    stats = out.get("stats", torch.float32, (L, B, 2))
    if kr < 1.0:
        for l in range(L):
            es, et = OPS.score_text_vision(qs[l], ks[l], q_pos, mod, scale, "guidance")
            assert_scores_close(scores[l], es, mod, rtol=RTOL)
            assert_stats_close(stats[l], et, rtol=RTOL)
    else:
        assert not bool(scores.any()) and not bool(stats.any())
    # the rest is exact given the emulated scores: the CPU op from the same scores and stats
    kc, vc = [k.clone() for k in ks], [v.clone() for v in vs]
    e_idx, e_nk, e_np, e_fr = OPS.evict_from_scores(kc, vc, scores, stats, q_pos, mod, kr, budget,
                                                    redis, n_sink)
    assert torch.equal(out.get("keep_idx", torch.int64, (L, B, N)), e_idx)
    assert torch.equal(out.get("n_kept", torch.int64, (L, B)), e_nk)
    assert torch.equal(out.get("n_protected", torch.int64, (L, B)), e_np)
    assert torch.equal(out.get("keep_fraction", torch.float64, (L, B)), e_fr)
    ko = out.get("k", dtype, (L, B, Hkv, N, D))
    vo = out.get("v", dtype, (L, B, Hkv, N, Dv))
    for l in range(L):
        for b in range(B):
            n = int(e_nk[l, b])
            assert torch.equal(_bits(ko[l, b, :, :n]), _bits(kc[l][b, :, :n])), f"k layer {l} sample {b}"
            assert torch.equal(_bits(vo[l, b, :, :n]), _bits(vc[l][b, :, :n])), f"v layer {l} sample {b}"
    assert bool((e_nk < (mod != 0).sum(1)).any()) or kr == 1.0  # something was evicted


# ------------------------------------------------------------------------------------------
# decode_evict_, step after step
# ------------------------------------------------------------------------------------------
DECODE_CASES = {
    # name: (B, Hq, Hkv, D, S, dtype, steps, span, n_sink)
    "f32_gqa_span16": (2, 4, 2, 32, 60, torch.float32, 8, 16, 4),
    "bf16_span32_sink0": (4, 8, 2, 48, 80, torch.bfloat16, 5, 32, 0),
    "f16_default_span_two_splits": (2, 2, 1, 16, 300, torch.float16, 3, DECODE_SPAN, 2),
}


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_evict(emu, name):
    B, Hq, Hkv, D, S, dtype, steps, span, n_sink = DECODE_CASES[name]
    g = torch.Generator().manual_seed(len(name))
    scale = float(torch.tensor(1 / math.sqrt(D), dtype=torch.float32))
    lengths = [int(x) for x in torch.randint(S // 3, S // 2, (B,), generator=g)]
    n_prot = torch.tensor([1 + 3 * b for b in range(B)])
    if B > 3:  # the protected suffix reaches the sinks after the first append: no candidate
        lengths[3] = n_sink + int(n_prot[3]) - 1
    k, v = randn((B, Hkv, S, D), dtype, 1), randn((B, Hkv, S, D), dtype, 2)
    pos = torch.zeros(B, S, dtype=torch.int64)
    for b in range(B):
        perm = torch.randperm(3 * lengths[b] // 2, generator=g)[: lengths[b]]
        pos[b, : lengths[b]] = torch.sort(perm).values
    # Queries lean towards u; the keys of the sinks, of the new tokens (protected while among the
    # newest) and of two candidate slots (an exact tie) point away from it: they get the lowest
    # attention, so a wrong sink / protected-suffix rule or tie-break picks a different victim.
    u = torch.randn(D, generator=g)
    low = (-1.5 * u).to(dtype)
    k[:, :, :n_sink] = low
    for b in range(B):
        k[b, :, [n_sink + 2, lengths[b] // 2]] = low
    n_seen = pos.max(1).values + 1
    length = torch.tensor(lengths)
    frac = torch.tensor([0.2 + 0.1 * b for b in range(B)], dtype=torch.float64)
    if B > 2:
        n_prot[0] = 0
        frac[2] = 1.0  # never evicts
    cpu = [k, v, pos, length]
    emu_state = [t.clone() for t in cpu]
    n_evicted = 0
    for step in range(steps):
        new_k = (low.float() + 0.3 * randn((B, Hkv, D), torch.float32, 1000 + step)).to(dtype)
        new_v = randn((B, Hkv, D), dtype, 2000 + step)
        for st in (cpu, emu_state):  # append the new token
            for b in range(B):
                s = int(st[3][b])
                st[0][b, :, s], st[1][b, :, s], st[2][b, s] = new_k[b], new_v[b], int(n_seen[b])
            st[3] += 1
        n_seen += 1
        q = (randn((B, Hq, D), torch.float32, 3000 + step) + u).to(dtype)
        ev_cpu = OPS.decode_evict_(*cpu, q, n_seen, frac, n_prot, scale, n_sink)
        out = emu("decode", dict(B=B, Hq=Hq, Hkv=Hkv, D=D, Dv=D, S=S, scale=scale, n_sink=n_sink,
                                 span=span, dtype=DTYPE_CODE[dtype]),
                  k=emu_state[0], v=emu_state[1], pos=emu_state[2], length=emu_state[3], q=q,
                  n_seen=n_seen, keep_fraction=frac, n_protected=n_prot)
        ko, vo = out.get("k", dtype, (B, Hkv, S, D)), out.get("v", dtype, (B, Hkv, S, D))
        po, lo = out.get("pos", torch.int64, (B, S)), out.get("length", torch.int64, (B,))
        ev = out.get("evicted", torch.int64, (B,))
        assert torch.equal(ev, ev_cpu), f"step {step}: evicted {ev.tolist()} vs CPU {ev_cpu.tolist()}"
        assert torch.equal(lo, cpu[3]), f"step {step}: lengths"
        for b in range(B):
            n = int(lo[b])
            assert torch.equal(po[b, :n], cpu[2][b, :n]), f"step {step} sample {b}: pos"
            assert torch.equal(_bits(ko[b, :, :n]), _bits(cpu[0][b, :, :n])), f"step {step} sample {b}: k"
            assert torch.equal(_bits(vo[b, :, :n]), _bits(cpu[1][b, :, :n])), f"step {step} sample {b}: v"
        emu_state = [ko, vo, po, lo]
        n_evicted += int((ev_cpu >= 0).sum())
    assert n_evicted > 0


# ------------------------------------------------------------------------------------------
# decode_evict_layers_: one launch set for all layers, against the CPU op
# ------------------------------------------------------------------------------------------
def test_decode_evict_layers(emu):
    """L = 25 layers (two launch groups of decode::kMaxLayers = 24) of ragged capacities and
    lengths, a batch of 2, GQA, fp16; one layer never evicts. One step (the emulator spends
    ~40 ms per block), exact; the splits of long layers are covered by test_decode_evict."""
    L, B, Hq, Hkv, D, dtype, span, n_sink = 25, 2, 4, 2, 16, torch.float16, 16, 2
    g = torch.Generator().manual_seed(7)
    scale = float(torch.tensor(1 / math.sqrt(D), dtype=torch.float32))
    caps = [10 + 2 * (l % 4) for l in range(L)]
    u = torch.randn(D, generator=g)
    low = (-1.5 * u).to(dtype)
    ks, vs, ps, lens = [], [], [], []
    for l, S in enumerate(caps):
        k = randn((B, Hkv, S, D), dtype, 10 + l)
        k[:, :, :n_sink] = low  # sinks point away from q: a wrong sink rule picks them
        ks.append(k)
        vs.append(randn((B, Hkv, S, D), dtype, 50 + l))
        row = [S // 2 + 1 + b for b in range(B)]
        pos = torch.zeros(B, S, dtype=torch.int64)
        for b in range(B):
            pos[b, :row[b]] = torch.sort(torch.randperm(2 * row[b], generator=g)[:row[b]]).values
        ps.append(pos)
        lens.append(row)
    length = torch.tensor(lens)
    n_seen = torch.stack([p.max(1).values for p in ps]).max(0).values + 1
    frac = torch.full((L, B), 0.3, dtype=torch.float64)
    frac[5] = 1.0
    n_prot = torch.randint(1, 4, (L, B), generator=g)
    cpu = [ks, vs, ps, length]
    for step in range(1):
        for l in range(L):
            for b in range(B):
                s = int(length[l, b])
                ks[l][b, :, s] = randn((Hkv, D), dtype, 900 + 31 * step + l)
                ps[l][b, s] = int(n_seen[b])
        length += 1
        n_seen += 1
        qs = [(randn((B, Hq, D), torch.float32, 3000 + 31 * step + l) + u).to(dtype)
              for l in range(L)]
        emu_in = dict(k=torch.cat([k.flatten() for k in ks]), v=torch.cat([v.flatten() for v in vs]),
                      pos=torch.cat([p.flatten() for p in ps]), length=length.clone(),
                      q=torch.stack(qs), n_seen=n_seen, keep_fraction=frac, n_protected=n_prot)
        meta = dict(L=L, B=B, Hq=Hq, Hkv=Hkv, D=D, Dv=D, scale=scale, n_sink=n_sink, span=span,
                    dtype=DTYPE_CODE[dtype], **{f"S{l}": S for l, S in enumerate(caps)})
        out = emu("decode", meta, **emu_in)
        ev_cpu = OPS.decode_evict_layers_(ks, vs, ps, length, qs, n_seen, frac, n_prot, scale,
                                          n_sink)
        ev = out.get("evicted", torch.int64, (L, B))
        assert torch.equal(ev, ev_cpu), f"step {step}: {ev.tolist()} vs CPU {ev_cpu.tolist()}"
        assert (ev[5] == -1).all() and (ev >= 0).sum() > L
        assert torch.equal(out.get("length", torch.int64, (L, B)), length)
        ko = out.get("k", dtype, (sum(caps) * B * Hkv * D,))
        vo = out.get("v", dtype, (sum(caps) * B * Hkv * D,))
        po = out.get("pos", torch.int64, (sum(caps) * B,))
        assert torch.equal(po, torch.cat([p.flatten() for p in ps])), f"step {step}: pos"
        assert torch.equal(_bits(ko), _bits(torch.cat([k.flatten() for k in ks]))), "k"
        assert torch.equal(_bits(vo), _bits(torch.cat([v.flatten() for v in vs]))), "v"


# ------------------------------------------------------------------------------------------
# The emulator runs the extension's own launchers (no copy that could drift)
# ------------------------------------------------------------------------------------------
def _launches(text):
    return {re.sub(r"\s+", " ", m.group(0)).strip()
            for m in re.finditer(r"[\w:<>]+<<<[^;]*?>>>", text)}


def test_emulator_runs_the_extensions_launchers():
    """Every kernel launch is in a launcher of csrc/include/tgvkv/cuda (declared in launch.cuh),
    none in the torch glue (csrc/cuda/*.cu) or in the emulator's driver: the driver calls every
    launcher, and the emulator build rewrites every launch of the staged headers."""
    in_cu = set()
    for cu in sorted((REPO / "csrc" / "cuda").glob("*.cu")):
        in_cu |= _launches(cu.read_text())
    assert not in_cu, f"kernel launches outside the launchers (move them to csrc/include): {in_cu}"
    headers = sorted((REPO / "csrc" / "include" / "tgvkv" / "cuda").glob("*.cuh"))
    in_headers = set()
    for h in headers:
        in_headers |= _launches(h.read_text())
    assert in_headers, "no launch found in csrc/include/tgvkv/cuda/*.cuh"
    emu_src = (EMU_DIR / "emu.cpp").read_text()
    assert not _launches(emu_src) and "emu::launch(" not in emu_src, \
        "the emulator's driver launches kernels itself instead of calling the launchers"
    declared = set(re.findall(r"^cudaError_t (launch_\w+)\(", (REPO / "csrc" / "include" / "tgvkv" /
                                                             "cuda" / "launch.cuh").read_text(), re.M))
    assert declared, "no launcher declared in launch.cuh"
    called = set(re.findall(r"\b(launch_\w+)\(", emu_src))
    assert declared <= called, f"launchers the emulator never runs: {sorted(declared - called)}"
    import importlib.util

    spec = importlib.util.spec_from_file_location("tgvkv_cuda_emu_build", EMU_DIR / "build.py")
    emu_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emu_build)
    rewritten = sum(emu_build.rewrite_launches(h.read_text())[1] for h in headers)
    assert rewritten == sum(h.read_text().count("<<<") for h in headers) > 0


# ------------------------------------------------------------------------------------------
# decode_append_
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_append(emu, dtype):
    """The append kernel writes what the CPU op writes (bit for bit); a sample without a free
    slot (length outside [0, S): not detectable on CUDA without a host sync) is left unwritten,
    its mask row rewritten from the clamped length."""
    B, H, S, D, Dv, M = 5, 3, 19, 40, 24, 17
    k = randn((B, H, S, D), dtype, 1)
    v = randn((B, H, S, Dv), dtype, 2)
    kn = randn((B, H, 1, D), dtype, 3)
    vn = randn((B, H, 1, Dv), dtype, 4)
    pos = torch.arange(B * S, dtype=torch.int64).reshape(B, S)
    length = torch.tensor([0, 7, S - 1, S, -2])  # samples 3 and 4: no free slot
    mask = torch.tensor([[(b + s) % 3 == 0 for s in range(M)] for b in range(B)])
    out = emu("append", dict(B=B, Hkv=H, S=S, D=D, Dv=Dv, M=M, position=4321,
                             dtype=DTYPE_CODE[dtype]),
              k=k, v=v, k_new=kn, v_new=vn, pos=pos, length=length,
              mask=mask.to(torch.uint8))
    ok = slice(0, 3)
    exp = [t.clone() for t in (k, v, pos, length, mask)]
    OPS.decode_append_(exp[0][ok], exp[1][ok], exp[2][ok], exp[3][ok], exp[4][ok], kn[ok], vn[ok],
                       4321)
    exp[4][3] = torch.arange(M) < S   # clamped length S
    exp[4][4] = False                 # clamped length 0
    assert torch.equal(_bits(out.get("k", dtype, (B, H, S, D))), _bits(exp[0]))
    assert torch.equal(_bits(out.get("v", dtype, (B, H, S, Dv))), _bits(exp[1]))
    assert torch.equal(out.get("pos", torch.int64, (B, S)), exp[2])
    assert out.get("length", torch.int64, (B,)).tolist() == [1, 8, S, S, -2]
    assert torch.equal(out.get("mask", torch.uint8, (B, M)).bool(), exp[4])
