"""``tgvkv-bench``: microbenchmarks of the ops, end-to-end generation and accuracy, in one command.

Usage::

    tgvkv-bench                       # the whole story on built-in defaults (< 2 min on 2 CPU cores)
    tgvkv-bench ops --preset llava-1.5-7b --dtype bfloat16 --keep-ratio 0.1 0.05
    tgvkv-bench ops --layers 32 --heads 32 --kv-heads 8 --head-dim 128 --tokens 3000 \\
                    --vision-tokens 2928 --text-tokens 40 --batch 1
    tgvkv-bench generate --preset tiny --keep-ratio 1.0 0.5 0.1 --batch 1 4
    tgvkv-bench generate --model /path/to/llava-1.5-7b-hf --device cuda
    tgvkv-bench accuracy
    ... --json report.json --plot report.png

Every speed is also given as a ratio against the fastest plain-PyTorch composition of the same
computation measured in the same run (:mod:`tgvkv.bench`). Timings are taken after warm-up and
summarised as median / min / max over many repetitions (CUDA events on GPU, perf_counter on CPU).

JSON report (``--json FILE``), schema ``tgvkv-bench/1``::

    {
      "schema": "tgvkv-bench/1",
      "command": "tgvkv-bench ops --preset tiny",     # the exact command line (shell-quoted)
      "argv": [...], "started_utc": "...", "wall_s": 12.3,
      "versions": {"tgvkv", "tgvkv_build", "torch", "transformers", "python"},
      "device": {"device", "cpu", "cpu_count", "torch_threads", "load_avg_1_5_15",
                 "gpu", "gpu_memory_gib", "cuda" (CUDA only)},
      "ops": {                                         # present when ops were timed
        "shape": {"layers", "heads", "kv_heads", "head_dim", "tokens", "vision_tokens",
                  "text_tokens", "batch"}, "preset": str|null, "dtype": str,
        "budget": str, "redistribute": bool, "copy_bandwidth_gbs": float,
        "memory_method": str, "bytes_model": str,
        "rows": [{"op": str, "keep_ratio": float,
                  "tgvkv": {"median_ms", "min_ms", "max_ms", "reps", "gbs", "pct_copy_bw",
                            "peak_extra_bytes"},
                  "torch": {... same keys ...},
                  "speedup": float,                    # torch median / tgvkv median
                  "peak_ratio": float|null,            # tgvkv peak / torch peak
                  "same_result": bool|null,            # both gave identical kept slots/counts
                  "evictions_per_call": int,           # decode_evict_ rows only
                  "bytes": int|null}]},
      "generate": {                                    # present when generation was timed
        "model": str, "dtype": str, "new_tokens": int, "prompt_tokens": int,
        "backend": str,                                # which op implementation the policy used
        "rows": [{"keep_ratio": float|null (null: unpatched model), "batch": int,
                  "prefill_ms", "ttft_ms", "decode_tok_s", "decode_ms_per_step",
                  "cache_bytes", "cache_bytes_full", "kept_fraction", "peak_bytes",
                  "peak_method", "decode_speedup_vs_unpatched", "ttft_ratio_vs_unpatched"}],
        "max_batch": {...} (CUDA only)},
      "accuracy": {...the result of tgvkv.eval.run()..., "table": str,
                   "rows": [{"policy", "keep_ratio" (null: full cache), "accuracy",
                             "pct_of_full", "n_diff_vs_full", "seconds"}]}
                  (or {"skipped": reason} in the default run),
      "load_avg_end": [1, 5, 15 min]                   # load average when the run ended
    }
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from datetime import datetime, timezone

DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_KEEP_RATIOS_GEN = (1.0, 0.5, 0.2, 0.1, 0.05)
OP_STAGES = ("score_text_vision", "layer_budgets", "select_keep", "compact_", "evict_from_scores",
             "evict", "decode_evict_")


class UserError(Exception):
    """A mistake in the command line or the environment: one line on stderr, exit code 2."""


# --------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------
def _keep_ratio(s: str) -> float:
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"keep ratio must be a number in (0, 1], got {s!r}")
    if not (0.0 < x <= 1.0) or math.isnan(x):
        raise argparse.ArgumentTypeError(f"keep ratio must be in (0, 1], got {s}")
    return x


def _pos_int(s: str) -> int:
    try:
        x = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    if x < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s}")
    return x


def _nonneg_int(s: str) -> int:
    try:
        x = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    if x < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s}")
    return x


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump for user mistakes
        raise UserError(f"{self.prog}: {message}")


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common")
    g.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    g.add_argument("--dtype", choices=DTYPES, default=None,
                   help="K/V/Q dtype (default: float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--json", metavar="FILE", help="write the report as JSON (schema: see --help)")
    g.add_argument("--plot", metavar="FILE.png",
                   help="plot speed / memory (/ accuracy) vs keep ratio (needs matplotlib: "
                        "pip install 'tgvkv[plot]')")
    g.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    g.add_argument("--threads", type=_pos_int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _ops_args(p: argparse.ArgumentParser, default_reps: int = 20) -> None:
    g = p.add_argument_group("op shapes (a preset, or any field overridden)")
    g.add_argument("--preset", default=None,
                   help="llava-1.5-7b | llava-next-7b | qwen2.5-vl-7b | tiny "
                        "(L/Hq/Hkv/D/N/vision/T/B of a single-image prompt)")
    for name, hlp in (("layers", "L"), ("heads", "query heads Hq"), ("kv-heads", "KV heads Hkv"),
                      ("head-dim", "D"), ("tokens", "prompt slots N"),
                      ("vision-tokens", "vision slots"), ("text-tokens", "guidance text T"),
                      ("batch", "B")):
        g.add_argument(f"--{name}", type=_nonneg_int if "tokens" in name else _pos_int,
                       default=None, help=hlp)
    g.add_argument("--keep-ratio", type=_keep_ratio, nargs="+", default=None,
                   help="keep ratio(s) kappa in (0, 1] (default 0.1)")
    g.add_argument("--budget", choices=("mass", "mi"), default="mass")
    g.add_argument("--redistribute", action="store_true")
    g.add_argument("--op", choices=OP_STAGES + ("all",), nargs="+", default=["all"],
                   help="which ops to time (default all)")
    g.add_argument("--warmup", type=_nonneg_int, default=2, help="untimed calls first (default 2)")
    g.add_argument("--reps", type=_pos_int, default=default_reps,
                   help=f"timed repetitions, at least (default {default_reps})")
    g.add_argument("--min-time", type=float, default=0.5,
                   help="keep repeating until this many seconds were timed (default 0.5)")
    g.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")


def _gen_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--model", metavar="PATH", default=None,
                   help="a local Hugging Face VLM checkpoint (directory with config.json)")
    g.add_argument("--preset", default=None,
                   help="architecture built from its config with random weights "
                        "(default: tiny; on CUDA the full-size presets work too)")
    g.add_argument("--keep-ratio", type=_keep_ratio, nargs="+", default=None,
                   help="keep ratios (default 1.0 0.5 0.2 0.1 0.05; the unpatched model is "
                        "always measured too)")
    g.add_argument("--batch", type=_pos_int, nargs="+", default=[1], help="batch sizes (default 1)")
    g.add_argument("--new-tokens", type=_pos_int, default=32, help="tokens generated (default 32)")
    g.add_argument("--reps", type=_pos_int, default=3, help="timed generate() calls (default 3)")
    g.add_argument("--max-batch", action="store_true",
                   help="CUDA: search the largest batch that fits with and without eviction")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tgvkv-bench",
                description="Benchmarks of tgvkv (TGV-KV KV-cache eviction): op speed and memory "
                            "against the fastest plain-PyTorch composition, end-to-end generation "
                            "with a Hugging Face VLM, and accuracy. Without a command: a complete "
                            "run on small built-in defaults (< 2 minutes on a 2-core CPU).",
                epilog=__doc__.split("JSON report", 1)[1].join(["JSON report", ""]),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="store_true", help="print versions and exit")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    po = sub.add_parser("ops", help="time every op and the whole evict vs plain PyTorch",
                        description="Time each tgvkv op and the whole evict on a preset or given "
                                    "shapes, against the plain-PyTorch composition in the same run.")
    _ops_args(po)
    _common(po)
    pg = sub.add_parser("generate", help="end-to-end generate() with a VLM at several keep ratios",
                        description="Prefill time, time to first token, decode tokens/s, cache "
                                    "bytes and peak memory of model.generate() with TGV-KV.")
    _gen_args(pg)
    _common(pg)
    pa = sub.add_parser("accuracy", help="the accuracy harness (tiny VLM on easy-vqa)",
                        description="Runs tgvkv.eval (accuracy of eviction policies vs keep ratio "
                                    "on a VQA set) and prints its table.")
    ga = pa.add_argument_group("accuracy")
    ga.add_argument("--model", metavar="PATH", default=None,
                    help="local VLM checkpoint (default: the committed tiny easy-VQA LLaVA)")
    ga.add_argument("--dataset", default="easy-vqa",
                    help="easy-vqa | easy-vqa-full | a JSONL file (default easy-vqa)")
    ga.add_argument("--policy", nargs="+", default=None,
                    help="eviction policies (default: all of tgvkv.eval.POLICIES)")
    ga.add_argument("--keep-ratio", type=_keep_ratio, nargs="+", default=None,
                    help="keep ratios (default 1.0 0.5 0.2 0.1 0.05)")
    ga.add_argument("--limit", type=_pos_int, default=None, help="first N samples only")
    ga.add_argument("--max-new-tokens", type=_pos_int, default=32)
    ga.add_argument("--quick", action="store_true",
                    help="the small subset of the default run (tgvkv policy, 24 samples)")
    _common(pa)
    pd = sub.add_parser("all", help="the default run (what no command does)")
    pd.add_argument("--skip", choices=("ops", "generate", "accuracy"), nargs="+", default=[])
    _common(pd)
    return p


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _resolve_device(arg: str | None) -> str:
    import torch

    if arg is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    d = arg.strip().lower()
    if d == "cpu":
        return "cpu"
    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {arg}: CUDA is not available on this machine "
                            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        try:
            dev = torch.device(d)
        except RuntimeError:
            raise UserError(f"--device {arg}: not a device (use cpu, cuda or cuda:N)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {arg}: only {torch.cuda.device_count()} CUDA device(s)")
        return d
    raise UserError(f"--device {arg}: unknown device (use cpu, cuda or cuda:N)")


def _resolve_dtype(arg: str | None, device: str):
    import torch

    name = arg or ("bfloat16" if device.startswith("cuda") else "float32")
    return getattr(torch, name), name


def _progress(total: int, desc: str, disabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; degrade gracefully anyway
        return None
    return tqdm(total=total, desc=desc, disable=True if disabled else None, file=sys.stderr,
                leave=False, dynamic_ncols=True)


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _fmt(x, spec=".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return "-"
    return format(x, spec)


def table(headers: list[str], rows: list[list[str]], title: str | None = None) -> str:
    """A plain-text table: left-aligned first column, right-aligned others."""
    cols = list(zip(*([headers] + rows))) if rows else [[h] for h in headers]
    widths = [max(len(str(c)) for c in col) for col in cols]
    def line(cells):
        out = []
        for i, (c, w) in enumerate(zip(cells, widths)):
            out.append(str(c).ljust(w) if i == 0 else str(c).rjust(w))
        return "  ".join(out).rstrip()
    sep = "  ".join("-" * w for w in widths)
    body = [line(headers), sep] + [line(r) for r in rows]
    if title:
        body = [title] + body
    return "\n".join(body)


def _load_tgvkv_ops():
    """Import tgvkv and return torch.ops.tgvkv, or raise UserError when the ops are not built."""
    import torch

    try:
        import tgvkv  # noqa: F401  (loads _C)
    except Exception as e:
        raise UserError(f"cannot import tgvkv's compiled ops ({type(e).__name__}: {e}); build "
                        "them with: pip install --no-build-isolation .")
    ns = torch.ops.tgvkv
    try:
        ns.evict  # noqa: B018
    except (AttributeError, RuntimeError):
        raise UserError("torch.ops.tgvkv.evict is not registered: tgvkv was installed without its "
                        "compiled extension (pip install --no-build-isolation .)")
    return ns


# --------------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------------
def _ops_shape(args, default_shape=None):
    from . import bench

    if args.preset is not None:
        if args.preset not in bench.PRESETS:
            raise UserError(f"unknown preset {args.preset!r} (choose from "
                            f"{', '.join(bench.PRESETS)})")
        base = bench.PRESETS[args.preset]
    else:
        base = default_shape or bench.PRESETS["tiny"]
    fields = {}
    for f in ("layers", "heads", "kv_heads", "head_dim", "tokens", "vision_tokens", "text_tokens",
              "batch"):
        v = getattr(args, f, None)
        fields[f] = getattr(base, f) if v is None else v
    shape = bench.Shape(**fields)
    try:
        shape.check()
    except ValueError as e:
        raise UserError(str(e))
    return shape


def run_ops(shape, preset, device, dtype, dtype_name, keep_ratios, budget="mass",
            redistribute=False, stages=OP_STAGES, warmup=2, reps=20, min_time=0.5,
            memory=True, seed=0, progress=True, n_sink=4) -> dict:
    """Time the ops and their plain-PyTorch compositions; returns the ``ops`` section."""
    import torch

    from . import bench

    ops = _load_tgvkv_ops()
    k0, v0, qs, q_pos, mod = bench.make_inputs(shape, dtype, device, seed)
    L, B, N, D = shape.layers, shape.batch, shape.tokens, shape.head_dim
    Hq, Hkv = shape.heads, shape.kv_heads
    scale = D ** -0.5
    elt = k0[0].element_size()
    kw = [x.clone() for x in k0]  # working copies (in-place ops), restored outside timed regions
    vw = [x.clone() for x in v0]

    def restore():
        for a, b in zip(kw, k0):
            a.copy_(b)
        for a, b in zip(vw, v0):
            a.copy_(b)

    copy_bw = bench.copy_bandwidth_gbs(device)
    masks = bench.guidance_masks(q_pos, mod)
    rows = []
    mem_method = None
    tasks = [(kr, st) for kr in keep_ratios for st in stages]
    bar = _progress(len(tasks) * 2, "ops", not progress)
    for kr in keep_ratios:
        # shared intermediate inputs of the stage benchmarks (from the op itself)
        sc = [ops.score_text_vision(q, k, q_pos, mod, scale) for q, k in zip(qs, k0)]
        scores = torch.stack([s for s, _ in sc])
        stats = torch.stack([s for _, s in sc])
        keep, frac = ops.layer_budgets(stats, q_pos, mod, kr, budget, redistribute, n_sink)
        keep_idx, n_prot = ops.select_keep(scores, keep, q_pos, mod, n_sink)
        n_kept_total = int(keep.sum())
        widths = keep.max(1).values.tolist()
        bytes_q = sum(q.numel() for q in qs) * elt
        bytes_k = sum(k.numel() for k in k0) * elt
        bytes_compact = 2 * 2 * n_kept_total * Hkv * D * elt  # read + write of kept K and V rows
        bytes_scores = scores.numel() * 4

        # decode state (built only when timed), as the model layer holds it: each layer compacted
        # to its kept slots (capacity = largest kept count + 2), then two decode tokens appended
        # (the second decode step: the first one that evicts, as every later step does)
        dec = {}
        if "decode_evict_" in stages:
            dec.update(k0=[], v0=[], pos0=[], len0=[])
            for l in range(L):
                w = int(widths[l])
                kc, vc = bench.torch_compact(k0[l], v0[l], keep_idx[l], w)
                kd = torch.zeros(B, Hkv, w + 2, D, dtype=dtype, device=device)
                vd = torch.zeros_like(kd)
                pd = torch.full((B, w + 2), -1, dtype=torch.int64, device=device)
                for b in range(B):
                    n = int(keep[l, b])
                    kd[b, :, :n], vd[b, :, :n] = kc[b, :, :n], vc[b, :, :n]
                    kd[b, :, n:n + 2], vd[b, :, n:n + 2] = k0[l][b, :, -2:], v0[l][b, :, -2:]
                    pd[b, :n] = keep_idx[l, b, :n]
                    pd[b, n], pd[b, n + 1] = N, N + 1
                dec["k0"].append(kd)
                dec["v0"].append(vd)
                dec["pos0"].append(pd)
                dec["len0"].append((keep[l] + 2).clone())
            dec["q"] = [q[:, :, -1].contiguous() if q.shape[2] else
                        torch.randn(B, Hq, D, device=device).to(q.dtype) for q in qs]
            dec["k"] = [x.clone() for x in dec["k0"]]
            dec["v"] = [x.clone() for x in dec["v0"]]
            dec["pos"] = [x.clone() for x in dec["pos0"]]
            dec["len"] = [x.clone() for x in dec["len0"]]
            bytes_decode = sum(int(x.sum()) for x in dec["len0"]) * Hkv * D * elt + \
                sum(q.numel() for q in dec["q"]) * elt
        else:
            bytes_decode = None
        n_seen = torch.full((B,), N + 2, dtype=torch.int64, device=device)

        def restore_decode():
            for l in range(L):
                dec["k"][l].copy_(dec["k0"][l])
                dec["v"][l].copy_(dec["v0"][l])
                dec["pos"][l].copy_(dec["pos0"][l])
                dec["len"][l].copy_(dec["len0"][l])

        def t_score():
            return [ops.score_text_vision(q, k, q_pos, mod, scale) for q, k in zip(qs, k0)]

        def b_score():
            return [bench.torch_score_text_vision(q, k, q_pos, mod, scale, masks, budget == "mi")
                    for q, k in zip(qs, k0)]

        def t_compact():
            return [ops.compact_(kw[l], vw[l], keep_idx[l]) for l in range(L)]

        def b_compact():
            return [bench.torch_compact(k0[l], v0[l], keep_idx[l], int(widths[l]))
                    for l in range(L)]

        def t_decode():
            return [ops.decode_evict_(dec["k"][l], dec["v"][l], dec["pos"][l], dec["len"][l],
                                      dec["q"][l], n_seen, frac[l], n_prot[l], scale, n_sink)
                    for l in range(L)]

        def b_decode():
            return [bench.torch_decode_evict_(dec["k"][l], dec["v"][l], dec["pos"][l],
                                              dec["len"][l], dec["q"][l], n_seen, frac[l],
                                              n_prot[l], scale, n_sink) for l in range(L)]

        table_ = {
            "score_text_vision": (t_score, b_score, None, bytes_q + bytes_k),
            "layer_budgets": (lambda: ops.layer_budgets(stats, q_pos, mod, kr, budget,
                                                        redistribute, n_sink),
                              lambda: bench.torch_layer_budgets(stats, q_pos, mod, kr, budget,
                                                                redistribute, n_sink),
                              None, None),
            "select_keep": (lambda: ops.select_keep(scores, keep, q_pos, mod, n_sink),
                            lambda: bench.torch_select_keep(scores, keep, q_pos, mod, n_sink),
                            None, None),
            "compact_": (t_compact, b_compact, restore, bytes_compact),
            "evict_from_scores": (
                lambda: ops.evict_from_scores(kw, vw, scores, stats, q_pos, mod, kr, budget,
                                              redistribute, n_sink),
                lambda: bench.torch_evict_from_scores(k0, v0, scores, stats, q_pos, mod, kr,
                                                      budget, redistribute, n_sink),
                restore, bytes_compact + bytes_scores),
            "evict": (
                lambda: ops.evict(kw, vw, qs, q_pos, mod, scale, kr, budget, redistribute, n_sink),
                lambda: bench.torch_evict(k0, v0, qs, q_pos, mod, scale, kr, budget,
                                          redistribute, n_sink),
                restore, bytes_q + bytes_k + bytes_compact),
            "decode_evict_": (t_decode, b_decode, restore_decode, bytes_decode),
        }
        def _key(st, out):  # the output both implementations must agree on exactly
            if st == "layer_budgets":
                return out[0]
            if st == "select_keep":
                return out[0]
            if st in ("evict_from_scores",):
                return out[0]
            if st == "evict":
                return out[0] if isinstance(out, tuple) and len(out) == 4 else out[2]
            if st == "compact_":
                return torch.stack(list(out))
            if st == "decode_evict_":
                return torch.stack(list(out))
            return None

        for st in stages:
            t_fn, b_fn, setup, nbytes = table_[st]
            row = {"op": st, "keep_ratio": kr, "bytes": nbytes}
            # self-check: both implementations, once each from the same state, same result
            keys = []
            for fn in (t_fn, b_fn):
                if setup is not None:
                    setup()
                out = fn()
                if st == "evict_from_scores" and len(out) == 6:
                    out = tuple(out[2:])
                if st == "compact_" and isinstance(out[0], tuple):  # torch: (k, v) per layer
                    out = [(keep_idx[l] >= 0).sum(-1) for l in range(L)]
                keys.append(_key(st, out))
            if keys[0] is None:
                row["same_result"] = None
            else:
                row["same_result"] = bool(torch.equal(keys[0].cpu(), keys[1].cpu()))
            if st == "decode_evict_":
                row["evictions_per_call"] = int((keys[0] >= 0).sum())
            for impl, fn in (("tgvkv", t_fn), ("torch", b_fn)):
                tm = bench.time_fn(fn, device, setup=setup, warmup=warmup, reps=reps,
                                   min_time_s=min_time)
                r = tm.as_dict()
                r["gbs"] = nbytes / (tm.median_ms / 1e3) / 1e9 if nbytes else None
                r["pct_copy_bw"] = 100 * r["gbs"] / copy_bw if nbytes and copy_bw else None
                r["peak_extra_bytes"] = None
                if memory:
                    if setup is not None:
                        setup()
                    r["peak_extra_bytes"], mem_method = bench.peak_extra_bytes(fn, device)
                row[impl] = r
                if bar is not None:
                    bar.set_postfix_str(f"{st} {impl} k={kr}")
                    bar.update(1)
            row["speedup"] = row["torch"]["median_ms"] / row["tgvkv"]["median_ms"]
            if st == "score_text_vision":  # achieved GFLOP/s vs torch.matmul of the same Q.K^T
                row.update(_score_gflops(qs, k0, shape, device, row, warmup, reps, min_time))
            pt, pb = row["tgvkv"]["peak_extra_bytes"], row["torch"]["peak_extra_bytes"]
            row["peak_ratio"] = (pt / pb) if (pt is not None and pb) else None
            rows.append(row)
    if bar is not None:
        bar.close()
    from dataclasses import asdict

    return {"shape": asdict(shape), "preset": preset, "dtype": dtype_name, "budget": budget,
            "redistribute": redistribute, "copy_bandwidth_gbs": copy_bw,
            "memory_method": mem_method,
            "bytes_model": "score: read Q and K; compact: read + write the kept K and V rows; "
                           "evict: both; decode (second decode step after prefill eviction, "
                           "one eviction per layer): read the live K rows and q",
            "rows": rows}


def _score_gflops(qs, k0, shape, device, row, warmup, reps, min_time) -> dict:
    """GFLOP/s of score_text_vision (its Q.K^T: 2*L*B*Hq*T*N*D flops) and of torch.matmul of the
    same Q.K^T shapes in fp32 (inputs converted outside the timed region), timed in this run."""
    import torch

    from . import bench

    B, Hkv, D = shape.batch, shape.kv_heads, shape.head_dim
    flops = 2 * shape.layers * B * shape.heads * shape.text_tokens * shape.tokens * D
    qf = [q.float().reshape(B, Hkv, -1, D) for q in qs]
    kt = [k.float().transpose(-1, -2) for k in k0]
    mm = bench.time_fn(lambda: [torch.matmul(a, b) for a, b in zip(qf, kt)], device,
                       warmup=warmup, reps=reps, min_time_s=min_time)
    g = {impl: flops / (row[impl]["median_ms"] / 1e3) / 1e9 for impl in ("tgvkv", "torch")}
    g["matmul"] = flops / (mm.median_ms / 1e3) / 1e9
    return {"flops": flops, "matmul_ms": mm.median_ms, "gflops": g,
            "pct_matmul": 100 * g["tgvkv"] / g["matmul"]}


def ops_table(sec: dict) -> str:
    sh = sec["shape"]
    title = (f"ops: L={sh['layers']} Hq={sh['heads']} Hkv={sh['kv_heads']} D={sh['head_dim']} "
             f"N={sh['tokens']} (vision {sh['vision_tokens']}, T={sh['text_tokens']}) "
             f"B={sh['batch']} {sec['dtype']}"
             + (f" [{sec['preset']}]" if sec.get("preset") else "")
             + f"; copy bandwidth {sec['copy_bandwidth_gbs']:.1f} GB/s")
    hdr = ["op", "keep", "tgvkv ms (min-max)", "torch ms (min-max)", "speedup", "GB/s",
           "% copy", "peak tgvkv", "peak torch", "same"]
    out = []
    for r in sec["rows"]:
        t, b = r["tgvkv"], r["torch"]
        out.append([r["op"], _fmt(r["keep_ratio"], "g"),
                    f"{t['median_ms']:.3f} ({t['min_ms']:.3f}-{t['max_ms']:.3f})",
                    f"{b['median_ms']:.3f} ({b['min_ms']:.3f}-{b['max_ms']:.3f})",
                    f"{r['speedup']:.2f}x", _fmt(t["gbs"], ".1f"), _fmt(t["pct_copy_bw"], ".0f"),
                    _fmt_bytes(t["peak_extra_bytes"]), _fmt_bytes(b["peak_extra_bytes"]),
                    {True: "yes", False: "NO", None: "-"}[r.get("same_result")]])
    note = ("speedup = plain-PyTorch median / tgvkv median (same run); GB/s of tgvkv by the bytes "
            "model: " + sec["bytes_model"] + "; peak = extra memory allocated during the call ("
            + (sec.get("memory_method") or "not measured") + "); same = both implementations "
            "give the identical kept slots / counts / evicted positions from the same state")
    for r in sec["rows"]:
        if r.get("gflops"):
            g = r["gflops"]
            note += (f"\n{r['op']} keep {_fmt(r['keep_ratio'], 'g')}: Q.K^T at {g['tgvkv']:.1f} "
                     f"GFLOP/s = {r['pct_matmul']:.0f}% of torch.matmul of the same Q.K^T in fp32 "
                     f"({g['matmul']:.1f} GFLOP/s, {r['matmul_ms']:.1f} ms; plain PyTorch "
                     f"composition {g['torch']:.1f} GFLOP/s)")
    return table(hdr, out, title) + "\n" + note


# --------------------------------------------------------------------------------------------
# generate / accuracy (the model layer and the eval harness are optional at import time)
# --------------------------------------------------------------------------------------------
def run_generate_section(args, device, dtype, dtype_name, progress=True, keep_ratios=None,
                         batches=None, new_tokens=None, reps=None) -> dict:
    from . import bench

    return bench.run_generate(
        model_path=getattr(args, "model", None), preset=getattr(args, "preset", None),
        device=device, dtype=dtype, dtype_name=dtype_name,
        keep_ratios=keep_ratios or getattr(args, "keep_ratio", None) or list(DEFAULT_KEEP_RATIOS_GEN),
        batches=batches or getattr(args, "batch", None) or [1],
        new_tokens=new_tokens or getattr(args, "new_tokens", 32),
        reps=reps or getattr(args, "reps", 3), seed=args.seed, progress=progress,
        max_batch=getattr(args, "max_batch", False), error=UserError,
        progress_factory=(lambda n, d: _progress(n, d, not progress)))


def generate_table(sec: dict) -> str:
    from . import bench

    return bench.generate_table_text(sec, table, _fmt, _fmt_bytes)


def run_accuracy_section(args, device, progress=True, quick=False) -> dict:
    from . import bench

    return bench.run_accuracy(
        model=getattr(args, "model", None), dataset=getattr(args, "dataset", "easy-vqa"),
        policies=getattr(args, "policy", None), keep_ratios=getattr(args, "keep_ratio", None),
        limit=getattr(args, "limit", None), max_new_tokens=getattr(args, "max_new_tokens", 32),
        device=device, quick=quick or getattr(args, "quick", False), progress=progress,
        error=UserError)


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------
def _check_plot_deps(path: str | None) -> None:
    if path is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib, which is not installed: "
                        "pip install 'tgvkv[plot]' (or pip install matplotlib)")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise UserError(f"--plot {path}: directory {d} does not exist")


def write_plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    gen = report.get("generate")
    ops = report.get("ops")
    acc = report.get("accuracy")
    if gen and gen.get("rows"):
        panels += ["gen_speed", "gen_mem"]
    if ops and ops.get("rows"):
        panels += ["ops"]
    if acc and acc.get("rows"):
        panels += ["acc"]
    if not panels:
        panels = ["empty"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], panels):
        if kind == "gen_speed":
            for i, b in enumerate(sorted({r["batch"] for r in gen["rows"]})):
                rs = sorted([r for r in gen["rows"] if r["batch"] == b and r["keep_ratio"]],
                            key=lambda r: r["keep_ratio"])
                c = f"C{i}"
                ax.plot([r["keep_ratio"] for r in rs], [r["decode_tok_s"] for r in rs], "o-",
                        color=c, label=f"decode, batch {b}")
                base = [r for r in gen["rows"] if r["batch"] == b and r["keep_ratio"] is None]
                if base:
                    ax.axhline(base[0]["decode_tok_s"], ls="--", color=c, alpha=0.6,
                               label=f"unpatched, batch {b}")
            ax.set_xscale("log")
            ax.set_xlabel("keep ratio")
            ax.set_ylabel("decode tokens/s")
            ax.set_title(f"generate: {gen.get('model')}")
            ax.legend(fontsize=8)
        elif kind == "gen_mem":
            for i, b in enumerate(sorted({r["batch"] for r in gen["rows"]})):
                rs = sorted([r for r in gen["rows"] if r["batch"] == b and r["keep_ratio"]],
                            key=lambda r: r["keep_ratio"])
                c = f"C{i}"
                ax.plot([r["keep_ratio"] for r in rs], [r["cache_bytes"] / 2**20 for r in rs],
                        "o-", color=c, label=f"KV cache after generate(), batch {b}")
                if rs and rs[0].get("peak_bytes") is not None:
                    ax.plot([r["keep_ratio"] for r in rs],
                            [(r["peak_bytes"] or 0) / 2**20 for r in rs], "s:", color=c,
                            label=f"peak extra memory of generate(), batch {b}")
            ax.set_xscale("log")
            ax.set_xlabel("keep ratio")
            ax.set_ylabel("MiB")
            ax.set_title("memory vs keep ratio")
            ax.legend(fontsize=8)
        elif kind == "ops":
            names = sorted({r["op"] for r in ops["rows"]}, key=OP_STAGES.index)
            krs = sorted({r["keep_ratio"] for r in ops["rows"]})
            width = 0.8 / max(1, len(krs))
            for i, kr in enumerate(krs):
                ys = []
                for n in names:
                    m = [r for r in ops["rows"] if r["op"] == n and r["keep_ratio"] == kr]
                    ys.append(m[0]["speedup"] if m else 0)
                ax.bar([j + i * width for j in range(len(names))], ys, width,
                       label=f"keep {kr:g}")
            ax.axhline(1.0, color="gray", ls="--")
            ax.set_xticks([j + width * (len(krs) - 1) / 2 for j in range(len(names))])
            ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel("speedup vs plain PyTorch")
            sh = ops["shape"]
            ax.set_title(f"ops, N={sh['tokens']} L={sh['layers']} {ops['dtype']}")
            ax.legend(fontsize=8)
        elif kind == "acc":
            full = [r for r in acc["rows"] if r["keep_ratio"] is None]
            for pol in sorted({r["policy"] for r in acc["rows"] if r["keep_ratio"] is not None}):
                rs = sorted([r for r in acc["rows"] if r["policy"] == pol
                             and r["keep_ratio"] is not None], key=lambda r: r["keep_ratio"])
                ax.plot([r["keep_ratio"] for r in rs], [100 * r["accuracy"] for r in rs], "o-",
                        label=pol)
            if full:
                ax.axhline(100 * full[0]["accuracy"], ls="--", color="gray", label="full KV")
            ax.set_xscale("log")
            ax.set_xlabel("keep ratio")
            ax.set_ylabel("accuracy (%)")
            ax.set_title(f"accuracy, {acc.get('dataset')} ({acc.get('n_samples')} samples)")
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "nothing to plot", ha="center")
    dev = report["device"]
    fig.suptitle(f"tgvkv-bench on {dev.get('gpu') or dev.get('cpu')} "
                 f"({dev['device']}), torch {report['versions']['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def _command_line(argv) -> str:
    return " ".join(["tgvkv-bench"] + [shlex.quote(a) for a in argv])


def _run(argv: list[str]) -> int:
    parser = build_parser()
    orig_argv = list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["all"] + argv  # no command: the default run
    args = parser.parse_args(argv)
    if args.version:
        from . import bench

        print(json.dumps(bench.versions(), indent=2))
        return 0
    cmd = args.command or "all"
    _check_plot_deps(args.plot)
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(d):
            raise UserError(f"--json {args.json}: directory {d} does not exist")

    import torch

    from . import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    dtype, dtype_name = _resolve_dtype(args.dtype, device)
    progress = not args.no_progress
    t0 = time.perf_counter()
    report = {"schema": "tgvkv-bench/1", "command": _command_line(orig_argv), "argv": orig_argv,
              "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": bench.versions(), "device": bench.device_info(device)}
    texts = []

    if cmd == "ops":
        shape = _ops_shape(args)
        stages = OP_STAGES if "all" in args.op else tuple(s for s in OP_STAGES if s in args.op)
        report["ops"] = run_ops(shape, args.preset, device, dtype, dtype_name,
                                args.keep_ratio or [0.1], args.budget, args.redistribute, stages,
                                args.warmup, args.reps, args.min_time, not args.no_memory,
                                args.seed, progress)
        texts.append(ops_table(report["ops"]))
    elif cmd == "generate":
        if args.model is not None and args.preset is not None:
            raise UserError("give --model PATH or --preset NAME, not both")
        report["generate"] = run_generate_section(args, device, dtype, dtype_name, progress)
        texts.append(generate_table(report["generate"]))
    elif cmd == "accuracy":
        if args.model is not None and not os.path.isdir(args.model):
            raise UserError(f"--model {args.model}: not a directory (expected a local checkpoint)")
        report["accuracy"] = run_accuracy_section(args, device, progress)
        texts.append(report["accuracy"].get("table", ""))
    else:  # the default run: small ops shapes, the tiny model, a tiny accuracy subset
        skip = set(getattr(args, "skip", []))
        if "ops" not in skip:
            shape = bench.DEFAULT_OPS_SHAPE
            report["ops"] = run_ops(shape, None, device, dtype, dtype_name, [0.1], "mass", False,
                                    OP_STAGES, 1, 5, 0.1, True, args.seed, progress)
            texts.append(ops_table(report["ops"]))
            print(texts[-1] + "\n", flush=True)
        if "generate" not in skip:
            report["generate"] = run_generate_section(
                args, device, dtype, dtype_name, progress, keep_ratios=[1.0, 0.5, 0.2, 0.1],
                batches=[1, 4], new_tokens=16, reps=3)
            texts.append(generate_table(report["generate"]))
            print(texts[-1] + "\n", flush=True)
        if "accuracy" not in skip:
            try:
                report["accuracy"] = run_accuracy_section(args, device, progress, quick=True)
                texts.append(report["accuracy"].get("table", ""))
            except UserError as e:  # optional in the default run: say why it was skipped
                report["accuracy"] = {"skipped": str(e)}
                texts.append(f"accuracy: skipped ({e})")
            print(texts[-1] + "\n", flush=True)
        texts = []
    report["wall_s"] = round(time.perf_counter() - t0, 2)
    try:
        report["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    for t in texts:
        print(t + "\n")
    dev = report["device"]
    print(f"device: {dev.get('gpu') or dev['cpu']} ({dev['device']}, {dev['torch_threads']} "
          f"threads, load {dev.get('load_avg_1_5_15')}); versions: "
          + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if k != "tgvkv_build")
          + f"; wall {report['wall_s']} s")
    print(f"command: {report['command']}")
    load = dev.get("load_avg_1_5_15")
    if load and dev.get("cpu_count") and load[0] > 0.5 * dev["cpu_count"] and device == "cpu":
        print(f"note: the 1-minute load average ({load[0]}) is high for {dev['cpu_count']} CPU "
              "cores: other processes compete for them and CPU timings are unreliable",
              file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tgvkv-bench``; returns the exit code (0 ok, 2 user error, 1 failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except UserError as e:
        msg = str(e)
        if not msg.startswith("tgvkv-bench"):
            msg = "tgvkv-bench: error: " + msg
        print(msg, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tgvkv-bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
