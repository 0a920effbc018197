"""Run every tgvkv op once on small inputs on one device: the program that ``compute-sanitizer``
(memcheck, racecheck) runs in ``tools/gpu_check.sh``.

Inputs are made on the CPU and copied to the device (copies are not kernels), so that under the
sanitizer almost every kernel launched is one of tgvkv's. Each op's result is compared with the
CPU kernel of the same op (selection, counts and compacted rows exactly; scores within fp32
rounding), so a run without the sanitizer is also a quick correctness smoke test.

Two shape sets: ``small`` (one tile everywhere, D=64 vector path and D=36 scalar path) and
``tiles`` (several T tiles and key splits, N=1500, D=128). Exit status 0 when every op ran and
agreed with the CPU, 1 otherwise.

    python tools/gpu_sanitize_ops.py --device cuda --shapes small tiles
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \\
        python tools/gpu_sanitize_ops.py --device cuda
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback

import torch

import tgvkv  # noqa: F401  (registers torch.ops.tgvkv.*)
from tgvkv import reference as ref

OPS = torch.ops.tgvkv
PAD, TEXT, VISION = ref.PAD, ref.TEXT, ref.VISION
ALL_OPS = ("score_text_vision", "layer_budgets", "select_keep", "compact_", "evict_from_scores",
           "evict", "decode_evict_")
# name: (B, Hq, Hkv, D, per-sample real lengths, guidance lengths, L, dtype)
SHAPES = {
    "small": [(2, 4, 2, 64, [160, 121], [9, 4], 3, torch.bfloat16),
              (2, 2, 1, 36, [70, 50], [6, 3], 2, torch.float32)],
    "tiles": [(1, 2, 2, 128, [1500], [70], 2, torch.float16)],
}


def _modality(n_real, n_guid, seed):
    """[B, N] int8, left padding: text prefix, one vision run, guidance text."""
    B, N = len(n_real), max(n_real)
    g = torch.Generator().manual_seed(seed)
    mod = torch.zeros(B, N, dtype=torch.int8)
    for b, (n, t) in enumerate(zip(n_real, n_guid)):
        pre = int(torch.randint(1, 8, (1,), generator=g))
        codes = [TEXT] * pre + [VISION] * (n - pre - t) + [TEXT] * t
        mod[b, N - n:] = torch.tensor(codes, dtype=torch.int8)
    return mod


def _randn(shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _check(name, ok, what=""):
    if not ok:
        raise AssertionError(f"{name}: {what or 'differs from the CPU op'}")


def _close(a, b, rtol=2e-4):
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    scale = float(b.abs().max()) if b.numel() else 0.0
    return a.shape == b.shape and bool(((a - b).abs() <= rtol * scale + 1e-6).all())


def run_shape(cfg, dev, ops, seed):
    B, Hq, Hkv, D, n_real, n_guid, L, dtype = cfg
    mod = _modality(n_real, n_guid, seed)
    q_pos = ref.guidance_positions(mod)
    N, T = mod.shape[1], q_pos.shape[1]
    scale = 1.0 / math.sqrt(D)
    # full query states: the ops' default text_score="all_queries" (its text-mass kernels
    # run too; the guidance rows are gathered by the ops)
    qs = [_randn((B, Hq, N, D), dtype, seed + 10 + l) for l in range(L)]
    ks = [_randn((B, Hkv, N, D), dtype, seed + 20 + l) for l in range(L)]
    vs = [_randn((B, Hkv, N, D), dtype, seed + 30 + l) for l in range(L)]
    d = dict(mod=mod.to(dev), q_pos=q_pos.to(dev))
    times = {}

    def timed(op, fn):
        t0 = time.perf_counter()
        out = fn()
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        times[op] = time.perf_counter() - t0
        return out

    # scores and stats of every layer (CPU reference values from the CPU kernel)
    cpu_sc = [OPS.score_text_vision(q, k, q_pos, mod, scale) for q, k in zip(qs, ks)]
    scores = torch.stack([s for s, _ in cpu_sc])
    stats = torch.stack([t for _, t in cpu_sc])
    if "score_text_vision" in ops:
        s, t = timed("score_text_vision", lambda: OPS.score_text_vision(
            qs[0].to(dev), ks[0].to(dev), d["q_pos"], d["mod"], scale))
        _check("score_text_vision", _close(s, cpu_sc[0][0]) and _close(t, cpu_sc[0][1]),
               "scores/stats differ from the CPU op beyond fp32 rounding")
    keep, frac = OPS.layer_budgets(stats, q_pos, mod, 0.1, "mass", False, 4)
    if "layer_budgets" in ops:
        kg, fg = timed("layer_budgets", lambda: OPS.layer_budgets(
            stats.to(dev), d["q_pos"], d["mod"], 0.1, "mass", False, 4))
        _check("layer_budgets", torch.equal(kg.cpu(), keep) and torch.equal(fg.cpu(), frac))
    keep_idx, n_prot = OPS.select_keep(scores, keep, q_pos, mod, 4)
    if "select_keep" in ops:
        ig, pg = timed("select_keep", lambda: OPS.select_keep(
            scores.to(dev), keep.to(dev), d["q_pos"], d["mod"], 4))
        _check("select_keep", torch.equal(ig.cpu(), keep_idx) and torch.equal(pg.cpu(), n_prot))
    if "compact_" in ops:
        kc, vc = ks[0].clone(), vs[0].clone()
        n_cpu = OPS.compact_(kc, vc, keep_idx[0])
        kg, vg = ks[0].to(dev, copy=True), vs[0].to(dev, copy=True)
        n_gpu = timed("compact_", lambda: OPS.compact_(kg, vg, keep_idx[0].to(dev)))
        _check("compact_", torch.equal(n_gpu.cpu(), n_cpu))
        for b in range(B):
            n = int(n_cpu[b])
            _check("compact_", torch.equal(kg[b, :, :n].cpu(), kc[b, :, :n])
                   and torch.equal(vg[b, :, :n].cpu(), vc[b, :, :n]), "compacted rows differ")
    for op in ("evict_from_scores", "evict"):
        if op not in ops:
            continue
        kc, vc = [k.clone() for k in ks], [v.clone() for v in vs]
        kg = [k.to(dev, copy=True) for k in ks]  # copies, also on the CPU (in place)
        vg = [v.to(dev, copy=True) for v in vs]
        if op == "evict_from_scores":
            exp = OPS.evict_from_scores(kc, vc, scores, stats, q_pos, mod, 0.1, "mass", False, 4)
            got = timed(op, lambda: OPS.evict_from_scores(
                kg, vg, scores.to(dev), stats.to(dev), d["q_pos"], d["mod"], 0.1, "mass",
                False, 4))
        else:  # fused scoring: selection checked against the CPU selection of its own scores
            got = timed(op, lambda: OPS.evict(kg, vg, [q.to(dev) for q in qs], d["q_pos"],
                                              d["mod"], scale, 0.1, "mass", False, 4))
            sc = [OPS.score_text_vision(q.to(dev), k.to(dev), d["q_pos"], d["mod"], scale)
                  for q, k in zip(qs, ks)]
            exp = OPS.evict_from_scores(kc, vc, torch.stack([s for s, _ in sc]).cpu(),
                                        torch.stack([t for _, t in sc]).cpu(), q_pos, mod, 0.1,
                                        "mass", False, 4)
        for g, e in zip(got, exp):
            _check(op, torch.equal(g.cpu(), e))
        for l in range(L):
            for b in range(B):
                n = int(exp[1][l, b])
                _check(op, torch.equal(kg[l][b, :, :n].cpu(), kc[l][b, :, :n])
                       and torch.equal(vg[l][b, :, :n].cpu(), vc[l][b, :, :n]),
                       f"layer {l} sample {b}: compacted rows differ")
    if "decode_evict_" in ops:
        # the state after prefill eviction plus two appended tokens (the second decode step:
        # the first that evicts, as in `tgvkv-bench ops`); pos holds the original slot indices
        S = max(int(x) for x in keep[0]) + 4
        k = torch.zeros(B, Hkv, S, D, dtype=dtype)
        v = torch.zeros_like(k)
        pos = torch.full((B, S), -1, dtype=torch.int64)
        length = keep[0].clone() + 2
        for b in range(B):
            n = int(keep[0, b])
            idx = keep_idx[0, b, :n]
            k[b, :, :n], v[b, :, :n] = ks[0][b][:, idx], vs[0][b][:, idx]
            k[b, :, n:n + 2] = _randn((Hkv, 2, D), dtype, 99 + b)
            v[b, :, n:n + 2] = _randn((Hkv, 2, D), dtype, 88 + b)
            pos[b, :n] = idx
            pos[b, n], pos[b, n + 1] = N, N + 1
        n_seen = torch.tensor([n + 2 for n in n_real])
        q = _randn((B, Hq, D), dtype, 77)
        cpu = [k.clone(), v.clone(), pos.clone(), length.clone()]
        gpu = [t.to(dev, copy=True) for t in (k, v, pos, length)]
        ev_c = OPS.decode_evict_(*cpu, q, n_seen, frac[0], n_prot[0], scale, 4)
        _check("decode_evict_ (setup)", bool((ev_c >= 0).any()), "the state should evict")
        ev_g = timed("decode_evict_", lambda: OPS.decode_evict_(
            *gpu, q.to(dev), n_seen.to(dev), frac[0].to(dev), n_prot[0].to(dev), scale, 4))
        # exact near-ties may pick another victim (tests/test_cuda.py checks those); here the
        # random data has none, so the same victim and the same state are expected
        _check("decode_evict_", torch.equal(ev_g.cpu(), ev_c), f"victims {ev_g.tolist()} vs "
               f"{ev_c.tolist()}")
        for t_g, t_c in zip(gpu, cpu):
            _check("decode_evict_", torch.equal(t_g.cpu(), t_c), "cache state differs")
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ops", nargs="+", choices=ALL_OPS, default=list(ALL_OPS))
    p.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    args = p.parse_args(argv)
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_sanitize_ops: CUDA is not available", file=sys.stderr)
        return 1
    print(f"gpu_sanitize_ops: device {dev}, torch {torch.__version__}, "
          f"tgvkv build {tgvkv.build_info()}", flush=True)
    fails = 0
    for name in args.shapes:
        for i, cfg in enumerate(SHAPES[name]):
            label = (f"{name}[{i}] B={cfg[0]} Hq={cfg[1]} Hkv={cfg[2]} D={cfg[3]} "
                     f"N={max(cfg[4])} L={cfg[6]} {str(cfg[7]).replace('torch.', '')}")
            try:
                times = run_shape(cfg, dev, set(args.ops), seed=17 + i)
                print(f"ok    {label}: " + ", ".join(f"{k} {1e3 * t:.1f} ms"
                                                     for k, t in times.items()), flush=True)
            except Exception as e:  # report every shape, not only the first failure
                fails += 1
                print(f"FAIL  {label}: {type(e).__name__}: {e}", flush=True)
                traceback.print_exc()
    print(f"gpu_sanitize_ops: {'all ops agree with the CPU' if not fails else f'{fails} FAILED'}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
