"""Measurements of ``tools/gpu_check.sh`` that ``tgvkv-bench`` does not report on its own:

- the device-to-device copy bandwidth of a large buffer (``tgvkv.bench.copy_bandwidth_gbs``: bytes
  read + written per second), the ceiling every GB/s figure is read against;
- the decode-time eviction step per layer in microseconds: ``decode_evict_`` on one layer's cache
  as it is after prefill eviction (``keep_ratio * N`` live slots plus two decoded tokens, so that
  every call evicts one slot, the steady state), timed eagerly over all L layers of a decode step
  (launch overhead included, as the model layer calls it) and as a replayed CUDA graph (kernel
  time), against the plain-PyTorch ``tgvkv.torch_impl.decode_evict_`` in the same run;
- a CUDA-graph capture check of one decode step's evictions (all L layers): capture, replay on
  the restored state, and compare the cache state and the victims with the eager ops, bit for bit;
- the same decode step as the model layer runs it: ONE ``decode_evict_layers_`` call for all L
  layers (``fused_*``: eager and as a CUDA graph, microseconds per layer), checked bit for bit
  against the L per-layer ``decode_evict_`` calls;
- the per-layer cache append of a decode step, ``decode_append_`` (one new token into every
  layer's cache and its live-slot mask), microseconds per layer against the plain-PyTorch
  composition, same resulting state.

    python tools/gpu_extra.py --device cuda --preset llava-next-7b --json extra.json

On a CPU (the dry run) the graph parts are skipped with a reason and timings use perf_counter.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

import torch

import tgvkv  # noqa: F401  (registers torch.ops.tgvkv.*)
from tgvkv import bench, torch_impl
from tgvkv.bench.env import device_info, versions
from tgvkv.bench.timing import time_fn

OPS = torch.ops.tgvkv


def decode_state(shape: bench.Shape, batch: int, keep_ratio: float, dtype, device, seed=0):
    """Per-layer decode state [(k, v, pos, length)], and the step's (q, n_seen, frac, n_prot)."""
    g = torch.Generator().manual_seed(seed)
    L, Hq, Hkv, D, N = shape.layers, shape.heads, shape.kv_heads, shape.head_dim, shape.tokens
    n_keep = max(shape.text_tokens + 6, round(keep_ratio * N))
    S = n_keep + 2 + 8  # capacity: the live slots, two decoded tokens, a little headroom
    states = []
    for _ in range(L):
        k = torch.randn(batch, Hkv, S, D, generator=g).to(dtype)
        v = torch.randn(batch, Hkv, S, D, generator=g).to(dtype)
        pos = torch.full((batch, S), -1, dtype=torch.int64)
        for b in range(batch):  # kept prompt slots (ascending), then the two decoded tokens
            kept = torch.randperm(N - 1, generator=g)[:n_keep - 1].sort().values
            pos[b, :n_keep] = torch.cat([kept, torch.tensor([N - 1])])
            pos[b, n_keep], pos[b, n_keep + 1] = N, N + 1
        states.append([t.to(device) for t in (k, v, pos)])
    # the layers' lengths are rows of one [L, B] tensor, as in the model layer's cache
    length_all = torch.full((L, batch), n_keep + 2, dtype=torch.int64, device=device)
    for l, st in enumerate(states):
        st.append(length_all[l])
    q = torch.randn(batch, Hq, D, generator=g).to(dtype).to(device)
    n_seen = torch.full((batch,), N + 2, dtype=torch.int64, device=device)
    frac = torch.full((batch,), n_keep / N, dtype=torch.float64, device=device)
    n_prot = torch.full((batch,), shape.text_tokens, dtype=torch.int64, device=device)
    return states, (q, n_seen, frac, n_prot), n_keep, length_all


def _stats_us(fn, setup, device, reps, L):
    """Per-layer microseconds of ``fn`` (``setup`` outside the timed region), by the package's own
    timer (CUDA events on the GPU, two warm-up calls)."""
    t = time_fn(fn, device, setup=setup, warmup=2, reps=reps)
    return {"median_us": 1e3 * t.median_ms / L, "min_us": 1e3 * t.min_ms / L,
            "max_us": 1e3 * t.max_ms / L, "reps": t.reps}


def measure_decode(shape, batch, keep_ratio, dtype, device, reps, scale=None):
    L, Hkv, D = shape.layers, shape.kv_heads, shape.head_dim
    scale = scale or D ** -0.5
    states, (q, n_seen, frac, n_prot), n_keep, length_all = decode_state(
        shape, batch, keep_ratio, dtype, device)
    init = [[t.clone() for t in st] for st in states]

    def restore():
        for st, st0 in zip(states, init):
            for t, t0 in zip(st, st0):
                t.copy_(t0)

    def step_tgvkv():
        return [OPS.decode_evict_(*st, q, n_seen, frac, n_prot, scale, 4) for st in states]

    ks, vs, ps = [st[0] for st in states], [st[1] for st in states], [st[2] for st in states]
    qs = [q] * L
    frac_all, prot_all = frac.expand(L, -1).contiguous(), n_prot.expand(L, -1).contiguous()

    def step_fused():
        return [OPS.decode_evict_layers_(ks, vs, ps, length_all, qs, n_seen, frac_all, prot_all,
                                         scale, 4)]

    def step_torch():
        return [torch_impl.decode_evict_(*st, q, n_seen, frac, n_prot, scale, 4)
                for st in states]

    restore()
    ev = torch.stack(step_tgvkv())
    after_tgvkv = [[t.clone() for t in st] for st in states]
    restore()
    ev_f = step_fused()[0]
    same_fused = bool(torch.equal(ev_f, ev)) and all(
        torch.equal(a, b) for sa, sb in zip(after_tgvkv, states) for a, b in zip(sa, sb))
    restore()
    ev_t = torch.stack(step_torch())
    same = bool(torch.equal(ev.cpu(), ev_t.cpu())) and all(
        torch.equal(a, b) for sa, sb in zip(after_tgvkv, states) for a, b in zip(sa, sb))
    row = {"shape": asdict(shape),
           "batch": batch, "keep_ratio": keep_ratio, "layers": L, "live_slots": n_keep + 2,
           "evicted_per_step": int((ev >= 0).sum()), "same_result_as_torch": same,
           "eager_tgvkv": _stats_us(step_tgvkv, restore, device, reps, L),
           "eager_torch": _stats_us(step_torch, restore, device, reps, L)}
    row["eager_speedup"] = row["eager_torch"]["median_us"] / row["eager_tgvkv"]["median_us"]
    row["fused_same_as_per_layer"] = same_fused
    row["fused_eager"] = _stats_us(step_fused, restore, device, reps, L)
    row["fused_graph"] = graph_check(states, init, restore, step_fused, ev, after_tgvkv, device,
                                     reps, L)
    elt = torch.empty((), dtype=dtype).element_size()
    nbytes = batch * (n_keep + 2) * Hkv * D * elt + q.numel() * elt  # live K rows + q, per layer
    row["bytes_per_layer"] = nbytes
    row["graph"] = graph_check(states, init, restore, step_tgvkv, ev, after_tgvkv, device, reps, L)
    us = row["graph"].get("us_per_layer") or row["eager_tgvkv"]["median_us"]
    row["gbs"] = nbytes / (us * 1e-6) / 1e9
    row["append"] = measure_append(states, restore, device, reps, L)
    return row


def measure_append(states, restore, device, reps, L):
    """The model layer's other per-step op: ``decode_append_`` of one new token into each layer's
    cache (and its live-slot mask), per layer in us, against the plain-PyTorch composition
    ``tgvkv.torch_impl.decode_append_`` in the same run; both must leave the same state."""
    B = states[0][0].shape[0]
    g = torch.Generator(device="cpu").manual_seed(5)
    kn = [torch.randn(st[0][:, :, :1].shape, generator=g).to(st[0]) for st in states]
    vn = [torch.randn(st[1][:, :, :1].shape, generator=g).to(st[1]) for st in states]
    masks = [torch.zeros(B, st[0].shape[2], dtype=torch.bool, device=st[0].device)
             for st in states]

    def step(fn):
        return lambda: [fn(*st, m, a, b, 1 << 20) for st, m, a, b in zip(states, masks, kn, vn)]

    restore()
    step(OPS.decode_append_)()
    after = [[t.clone() for t in st] + [m.clone()] for st, m in zip(states, masks)]
    restore()
    step(torch_impl.decode_append_)()
    same = all(torch.equal(a, b) for sa, st, m in zip(after, states, masks)
               for a, b in zip(sa, list(st) + [m]))
    row = {"same_result_as_torch": same,
           "eager_tgvkv": _stats_us(step(OPS.decode_append_), restore, device, reps, L),
           "eager_torch": _stats_us(step(torch_impl.decode_append_), restore, device, reps, L)}
    row["eager_speedup"] = row["eager_torch"]["median_us"] / row["eager_tgvkv"]["median_us"]
    return row


def graph_check(states, init, restore, step, ev_eager, after_eager, device, reps, L):
    """Capture one decode step's L evictions; replay on the restored state; compare; time."""
    if not device.startswith("cuda"):
        return {"skipped": "no CUDA device (dry run)"}
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture
            restore()
            step()
        torch.cuda.current_stream().wait_stream(side)
        g_restore, g_step = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(g_restore):
            restore()
        with torch.cuda.graph(g_step):
            restore()
            out = step()
        g_step.replay()
        torch.cuda.synchronize()
        stacked = out[0] if len(out) == 1 and out[0].dim() == 2 else torch.stack(out)
        identical = bool(torch.equal(stacked, ev_eager)) and all(
            torch.equal(a, b) for sa, sb in zip(after_eager, states) for a, b in zip(sa, sb))
        # a second replay from the same restored state gives the same result (no stale state)
        g_step.replay()
        torch.cuda.synchronize()
        stacked = out[0] if len(out) == 1 and out[0].dim() == 2 else torch.stack(out)
        identical = identical and bool(torch.equal(stacked, ev_eager))

        t_restore = time_fn(g_restore.replay, device, warmup=2, reps=reps).median_ms / 1e3
        t_step = time_fn(g_step.replay, device, warmup=2, reps=reps).median_ms / 1e3
        return {"captured": True, "identical_to_eager": identical,
                "us_per_layer": 1e6 * max(0.0, t_step - t_restore) / L,
                "replay_step_us": 1e6 * t_step, "replay_restore_us": 1e6 * t_restore}
    except Exception as e:  # report the failure, keep measuring the rest
        return {"captured": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="copy bandwidth, per-layer decode eviction time, "
                                            "CUDA-graph capture of a decode step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    p.add_argument("--preset", nargs="+", default=["llava-next-7b"], choices=tuple(bench.PRESETS))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--keep-ratio", type=float, nargs="+", default=[0.05, 0.1])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--copy-mib", type=int, default=1024, help="copy buffer size (default 1 GiB)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dev = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if dev.startswith("cuda") else "float32"))
    t0 = time.perf_counter()
    rep = {"schema": "tgvkv-gpu-extra/1",
           "command": " ".join(["tools/gpu_extra.py"] + sys.argv[1:]),
           "versions": versions(), "device": device_info(dev), "dtype": str(dtype)}
    rep["copy_bandwidth_gbs"] = bench.copy_bandwidth_gbs(dev, nbytes=args.copy_mib << 20, reps=20)
    rep["copy_bytes"] = args.copy_mib << 20
    print(f"copy bandwidth ({args.copy_mib} MiB, read + write): "
          f"{rep['copy_bandwidth_gbs']:.1f} GB/s", flush=True)
    rows = []
    for name in args.preset:
        shape = bench.PRESETS[name]
        for B in args.batch:
            for kr in args.keep_ratio:
                r = measure_decode(shape, B, kr, dtype, dev, args.reps)
                r["preset"] = name
                r["pct_copy_bw"] = 100 * r["gbs"] / rep["copy_bandwidth_gbs"]
                rows.append(r)
                gr = r["graph"]
                gtxt = (f"graph {gr['us_per_layer']:.2f} us/layer, "
                        f"identical {gr['identical_to_eager']}"
                        if gr.get("captured") else f"graph: {gr.get('skipped') or gr.get('error')}")
                print(f"decode_evict_ {name} B={B} keep={kr:g} ({r['live_slots']} live slots): "
                      f"eager {r['eager_tgvkv']['median_us']:.1f} us/layer vs torch "
                      f"{r['eager_torch']['median_us']:.1f} ({r['eager_speedup']:.2f}x), "
                      f"{r['evicted_per_step']} evicted/step, same {r['same_result_as_torch']}; "
                      f"{gtxt}; {r['gbs']:.1f} GB/s ({r['pct_copy_bw']:.1f}% of copy)", flush=True)
                fg = r["fused_graph"]
                ftxt = (f"graph {fg['us_per_layer']:.2f} us/layer, identical "
                        f"{fg['identical_to_eager']}" if fg.get("captured")
                        else f"graph: {fg.get('skipped') or fg.get('error')}")
                print(f"decode_evict_layers_ {name} B={B} keep={kr:g} (one call, {shape.layers} "
                      f"layers): eager {r['fused_eager']['median_us']:.1f} us/layer, same as "
                      f"per-layer {r['fused_same_as_per_layer']}; {ftxt}", flush=True)
                ap = r["append"]
                print(f"decode_append_ {name} B={B} keep={kr:g}: eager "
                      f"{ap['eager_tgvkv']['median_us']:.1f} us/layer vs torch "
                      f"{ap['eager_torch']['median_us']:.1f} ({ap['eager_speedup']:.2f}x), same "
                      f"{ap['same_result_as_torch']}", flush=True)
    rep["decode"] = rows
    caps = [r["graph"] for r in rows] + [r["fused_graph"] for r in rows]
    rep["graph_capture"] = (
        {"skipped": caps[0]["skipped"]} if caps and "skipped" in caps[0] else
        {"ok": bool(caps) and all(c.get("captured") and c.get("identical_to_eager") for c in caps),
         "cases": len(caps), "errors": [c["error"] for c in caps if "error" in c]})
    rep["wall_s"] = round(time.perf_counter() - t0, 2)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=2, default=str)
    ok = all(r["same_result_as_torch"] and r["fused_same_as_per_layer"]
             and r["append"]["same_result_as_torch"] for r in rows) and \
        rep["graph_capture"].get("ok", True)
    print(f"gpu_extra: {'ok' if ok else 'MISMATCH or capture failure'} ({rep['wall_s']} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
