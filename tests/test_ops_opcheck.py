"""torch.library.opcheck on every op (several samples each), a guard that fails when an op in the
torch.ops.tgvkv namespace has no opcheck sample, and torch.compile(fullgraph=True) == eager."""

import math

import pytest
import torch

from conftest import DEVICES, OPS, make_modality, randn, ref

README_OPS = {"score_text_vision", "layer_budgets", "select_keep", "compact_",
              "evict_from_scores", "evict", "decode_evict_", "decode_evict_layers_"}


def _meta(n_real, n_guid, n_images, pad, seed, device):
    mod = make_modality(n_real, n_guid, n_images, pad, seed=seed)
    return ref.guidance_positions(mod).to(device), mod.to(device)


def s_score(device):
    out = []
    for (n_real, n_guid, imgs, pad, Hq, Hkv, dt) in [
            ([20], [4], 1, "right", 4, 4, torch.float32),
            ([25, 18], [5, 0], 2, "left", 8, 2, torch.float16),
            ([16, 30, 9], [2, 7, 1], [1, 2, 0], "mixed", 8, 1, torch.bfloat16)]:
        q_pos, mod = _meta(n_real, n_guid, imgs, pad, 1, device)
        B, N, T = mod.shape[0], mod.shape[1], q_pos.shape[1]
        k = randn((B, Hkv, N, 64), dt, 2, device)
        # text_score="guidance": q holds the guidance rows [B, Hq, T, D]
        out.append(((randn((B, Hq, T, 64), dt, 1, device), k, q_pos, mod, 0.125),
                    {"text_score": "guidance"}))
        # text_score="all_queries" (the default, given explicitly once): q is [B, Hq, N, D]
        out.append(((randn((B, Hq, N, 64), dt, 3, device), k, q_pos, mod, 0.125),
                    {"text_score": "all_queries"} if dt == torch.float16 else {}))
    return out


def s_budgets(device):
    out = []
    for L, (n_real, n_guid, imgs, pad), kw in [
            (3, ([20], [4], 1, "right"), {}),
            (4, ([25, 18], [5, 0], 2, "left"), {"budget": "mi", "redistribute": True}),
            (2, ([16, 30, 9], [2, 7, 1], [1, 2, 0], "mixed"), {"n_sink": 2})]:
        q_pos, mod = _meta(n_real, n_guid, imgs, pad, 2, device)
        stats = (torch.rand(L, mod.shape[0], 2) + 0.1).to(device)
        out.append(((stats, q_pos, mod, 0.2), kw))
    return out


def s_select(device):
    out = []
    for L, (n_real, n_guid, imgs, pad), kw in [
            (3, ([20], [4], 1, "right"), {}),
            (2, ([25, 18], [5, 0], 2, "left"), {"n_sink": 1}),
            (1, ([16, 30, 9], [2, 7, 1], [1, 2, 0], "mixed"), {})]:
        q_pos, mod = _meta(n_real, n_guid, imgs, pad, 3, device)
        B, N = mod.shape
        keep = torch.tensor([[max(5, nb // 2) for nb in n_real]] * L).to(device)
        out.append(((torch.rand(L, B, N).to(device), keep, q_pos, mod), kw))
    return out


def s_compact(device):
    out = []
    for B, H, N, dt in [(1, 2, 10, torch.float32), (2, 4, 17, torch.float16),
                        (3, 1, 8, torch.bfloat16)]:
        idx = torch.full((B, N), -1, dtype=torch.int64)
        for b in range(B):
            sel = sorted(torch.randperm(N)[: N // 2 + b].tolist())
            idx[b, : len(sel)] = torch.tensor(sel)
        out.append(((randn((B, H, N, 64), dt, 1, device), randn((B, H, N, 64), dt, 2, device),
                     idx.to(device)), {}))
    return out


def s_efs(device):
    out = []
    for L, (n_real, n_guid, imgs, pad), dt, kw in [
            (2, ([20], [4], 1, "right"), torch.float32, {}),
            (3, ([25, 18], [5, 0], 2, "left"), torch.float16, {"budget": "mi"}),
            (1, ([16, 30, 9], [2, 7, 1], [1, 2, 0], "mixed"), torch.bfloat16,
             {"redistribute": True, "n_sink": 2})]:
        q_pos, mod = _meta(n_real, n_guid, imgs, pad, 4, device)
        B, N = mod.shape
        kc = [randn((B, 2, N, 64), dt, l, device) for l in range(L)]
        vc = [randn((B, 2, N, 64), dt, 9 + l, device) for l in range(L)]
        out.append(((kc, vc, torch.rand(L, B, N).to(device), (torch.rand(L, B, 2) + 0.1).to(device),
                     q_pos, mod, 0.25), kw))
    return out


def s_evict(device):
    out = []
    for L, (n_real, n_guid, imgs, pad), dt, Hq, Hkv, kw in [
            (2, ([20], [4], 1, "right"), torch.float32, 4, 4, {}),
            (3, ([25, 18], [5, 0], 2, "left"), torch.float16, 8, 2, {"budget": "mi"}),
            (1, ([16, 30, 9], [2, 7, 1], [1, 2, 0], "mixed"), torch.bfloat16, 8, 1,
             {"redistribute": True, "n_sink": 2})]:
        q_pos, mod = _meta(n_real, n_guid, imgs, pad, 5, device)
        B, N, T = mod.shape[0], mod.shape[1], q_pos.shape[1]
        kc = [randn((B, Hkv, N, 64), dt, l, device) for l in range(L)]
        vc = [randn((B, Hkv, N, 64), dt, 9 + l, device) for l in range(L)]
        qs = [randn((B, Hq, T, 64), dt, 20 + l, device) for l in range(L)]
        out.append(((kc, vc, qs, q_pos, mod, 0.125, 0.2), {**kw, "text_score": "guidance"}))
        if dt == torch.bfloat16:
            continue  # two all_queries samples are enough (time)
        qa = [randn((B, Hq, N, 64), dt, 40 + l, device) for l in range(L)]  # all query states
        out.append(((kc, vc, qa, q_pos, mod, 0.125, 0.2),
                    {**kw, "text_score": "all_queries"} if dt == torch.float16 else kw))
    return out


def s_decode(device):
    out = []
    for B, Hq, Hkv, S, dt in [(1, 4, 4, 30, torch.float32), (2, 8, 2, 24, torch.float16),
                              (3, 8, 1, 40, torch.bfloat16)]:
        length = torch.tensor([S - 2 - b for b in range(B)])
        pos = torch.arange(S).repeat(B, 1) * 2
        args = (randn((B, Hkv, S, 64), dt, 1, device), randn((B, Hkv, S, 64), dt, 2, device),
                pos.to(device), length.to(device), randn((B, Hq, 64), dt, 3, device),
                (length * 2 + 10).to(device), torch.full((B,), 0.3, dtype=torch.float64).to(device),
                torch.full((B,), 3).to(device), 0.125)
        out.append((args, {"n_sink": 4}))
    return out


def s_decode_layers(device):
    """L layers with ragged capacities and lengths; the last layer never evicts (fraction 1)."""
    out = []
    for L, B, Hq, Hkv, dt in [(2, 1, 4, 4, torch.float32), (3, 2, 8, 2, torch.float16),
                              (1, 3, 8, 1, torch.bfloat16)]:
        caps = [24 + 6 * l for l in range(L)]
        kc = [randn((B, Hkv, S, 64), dt, 1 + l, device) for l, S in enumerate(caps)]
        vc = [randn((B, Hkv, S, 64), dt, 9 + l, device) for l, S in enumerate(caps)]
        pos = [(torch.arange(S).repeat(B, 1) * 2).to(device) for S in caps]
        length = torch.tensor([[S - 2 - b for b in range(B)] for S in caps]).to(device)
        qs = [randn((B, Hq, 64), dt, 20 + l, device) for l in range(L)]
        frac = torch.full((L, B), 0.3, dtype=torch.float64)
        if L > 1:
            frac[-1] = 1.0
        args = (kc, vc, pos, length, qs, (length[0] * 2 + 10).to(device), frac.to(device),
                torch.full((L, B), 3).to(device), 0.125)
        out.append((args, {"n_sink": 4}))
    return out


def s_append(device):
    out = []
    for B, H, S, D, dt in [(1, 2, 8, 16, torch.float32), (3, 4, 20, 64, torch.bfloat16),
                           (2, 1, 9, 30, torch.float16)]:
        k = randn((B, H, S, D), dt, 1, device)
        v = randn((B, H, S, D), dt, 2, device)
        pos = (torch.arange(S).repeat(B, 1) * 3).to(device)
        length = torch.tensor([S - 2 - (b % 3) for b in range(B)]).to(device)
        mask = torch.zeros(B, S - 1, dtype=torch.bool, device=device)
        out.append(((k, v, pos, length, mask, randn((B, H, 1, D), dt, 3, device),
                     randn((B, H, 1, D), dt, 4, device), 99), {}))
    return out


SAMPLES = {
    "score_text_vision": s_score,
    "layer_budgets": s_budgets,
    "select_keep": s_select,
    "compact_": s_compact,
    "evict_from_scores": s_efs,
    "evict": s_evict,
    "decode_evict_": s_decode,
    "decode_evict_layers_": s_decode_layers,
    "decode_append_": s_append,
}


def _registered_ops():
    names = set()
    for full in torch._C._dispatch_get_all_op_names():
        if full.startswith("tgvkv::"):
            names.add(full.split("::", 1)[1].split(".", 1)[0])
    return names


def test_every_op_has_opcheck_samples():
    ops = _registered_ops()
    assert README_OPS <= ops, f"ops of the README contract not registered: {README_OPS - ops}"
    missing = ops - set(SAMPLES)
    assert not missing, f"ops in torch.ops.tgvkv without opcheck samples: {sorted(missing)}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck(device, name):
    op = getattr(OPS, name).default
    for args, kwargs in SAMPLES[name](device):
        torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_schemas_annotate_mutation(device):
    """Mutated tensors are annotated (a!) and never returned; in-place ops end in '_' (or are the
    documented evict / evict_from_scores)."""
    for name in SAMPLES:
        schema = getattr(OPS, name).default._schema
        mutated = [a.name for a in schema.arguments if a.alias_info is not None
                   and a.alias_info.is_write]
        for r in schema.returns:
            assert r.alias_info is None, f"{name} returns an alias of an input"
        expect = {"compact_": {"k", "v"}, "decode_evict_": {"k", "v", "pos", "length"},
                  "decode_evict_layers_": {"k_cache", "v_cache", "pos", "length"},
                  "decode_append_": {"k", "v", "pos", "length", "mask"},
                  "evict": {"k_cache", "v_cache"}, "evict_from_scores": {"k_cache", "v_cache"}}
        assert set(mutated) == expect.get(name, set()), (name, mutated)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend,text_score", [("aot_eager", "guidance"),
                                                ("inductor", "guidance"),
                                                ("aot_eager", "all_queries")])
def test_compile_fullgraph_evict(device, backend, text_score):
    """torch.compile(fullgraph=True) of evict (and its follow-up use of the outputs) == eager."""
    torch._dynamo.reset()
    L, Hq, Hkv, D = 2, 8, 2, 64
    mod = make_modality([40, 31], [6, 4], 2, "left", seed=3)
    q_pos = ref.guidance_positions(mod).to(device)
    mod = mod.to(device)
    B, N, T = mod.shape[0], mod.shape[1], q_pos.shape[1]
    kc = [randn((B, Hkv, N, D), torch.float32, l, device) for l in range(L)]
    vc = [randn((B, Hkv, N, D), torch.float32, 9 + l, device) for l in range(L)]
    R = T if text_score == "guidance" else N  # guidance rows, or every slot's query
    qs = [randn((B, Hq, R, D), torch.float32, 20 + l, device) for l in range(L)]

    def f(kc, vc, qs, q_pos, mod):
        keep_idx, n_kept, n_prot, frac = torch.ops.tgvkv.evict(kc, vc, qs, q_pos, mod,
                                                               1 / math.sqrt(D), 0.2,
                                                               text_score=text_score)
        return keep_idx, n_kept, n_prot, frac, n_kept.sum(1) + 1

    ke, ve = [t.clone() for t in kc], [t.clone() for t in vc]
    exp = f(ke, ve, qs, q_pos, mod)
    kg, vg = [t.clone() for t in kc], [t.clone() for t in vc]
    got = torch.compile(f, fullgraph=True, backend=backend)(kg, vg, qs, q_pos, mod)
    for a, b in zip(got, exp):
        assert torch.equal(a, b)
    for a, b in zip(kg + vg, ke + ve):
        assert torch.equal(a, b), "compiled evict did not compact the cache in place like eager"


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_decode_and_scores(device):
    torch._dynamo.reset()
    args = s_decode(device)[1][0]
    eager = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    comp = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    e = torch.ops.tgvkv.decode_evict_(*eager)
    c = torch.compile(lambda *a: torch.ops.tgvkv.decode_evict_(*a), fullgraph=True,
                      backend="aot_eager")(*comp)
    assert torch.equal(e, c)
    for a, b in zip(eager[:4], comp[:4]):
        assert torch.equal(a, b)
    for sargs, skw in s_score(device)[2:4]:  # guidance, then all_queries
        se = torch.ops.tgvkv.score_text_vision(*sargs, **skw)
        sc = torch.compile(lambda *a: torch.ops.tgvkv.score_text_vision(*a, **skw),
                           fullgraph=True, backend="aot_eager")(*sargs)
        assert torch.equal(se[0], sc[0]) and torch.equal(se[1], sc[1])


@pytest.mark.parametrize("device", DEVICES)
def test_fake_kernels_check_text_score(device):
    """The fake kernels refuse what the ops refuse: an unknown text_score, or q of the other
    mode's shape (guidance rows where all query states are expected and vice versa)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    (q, k, q_pos, mod, scale), _ = s_score(device)[2]  # guidance rows [B, Hq, T, D]
    for mode in (None, FakeTensorMode(allow_non_fake_inputs=True)):
        ctx = mode if mode is not None else torch.no_grad()
        with ctx:
            with pytest.raises((RuntimeError, ValueError), match="text_score"):
                torch.ops.tgvkv.score_text_vision(q, k, q_pos, mod, scale, text_score="rows")
            with pytest.raises(RuntimeError, match="score_text_vision.*'q'"):
                torch.ops.tgvkv.score_text_vision(q, k, q_pos, mod, scale)  # all_queries: N rows
