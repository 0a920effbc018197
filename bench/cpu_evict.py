"""CPU benchmark: every op and ``evict`` of a preset-shaped cache vs plain PyTorch.

Shape (``tgvkv-bench`` preset ``llava-1.5-7b``): L=32 layers, Hq=Hkv=32, D=128, N=640 prompt slots
(24 text, 576 vision, T=40 guidance text), batch 1; fp32 and bf16; every op of the pipeline and
the whole ``evict``, each against the fastest plain-PyTorch composition in the same run
(:mod:`tgvkv.bench`). Writes ``<out>/cpu_evict_llava-1.5-7b.{json,md}``.

Usage::

    python bench/cpu_evict.py [--out bench/results] [--reps 20] [--warmup 2] [--threads N]
                              [--keep-ratio ...] [--preset P] [--text-score all_queries|guidance]
                              [--op OP ...] [--no-memory]

``--op`` / ``--no-memory`` pass through to ``tgvkv-bench ops``: a subset of the ops, and no
peak-memory call (e.g. llava-next-7b in all_queries mode, whose plain-PyTorch calls take a minute
each: ``--op score_text_vision evict --warmup 0 --reps 1 --min-time 0 --no-memory``).

Take the committed measurement on a quiet machine: the markdown records the load average before
and after the run (CPU timings of OpenMP kernels are meaningless when other processes compete for
the cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time

from tgvkv.bench import cli, common, env


def _isa() -> str:
    flags = env.cpu_flags()
    if not flags:
        return "unknown"
    want = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "asimd", "sve")
    have = [w for w in want if w in flags]
    return " ".join(have) + ("" if "avx512f" in flags or "asimd" in flags else " (no AVX-512)")


# environment variables that force a lower code path (a proxy for another CPU, not that CPU)
_FORCING = ("TGVKV_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def _cap_flags(build) -> str:
    flags = {"DEFAULT": "none beyond -O3", "AVX2": "-mavx2 -mfma -mf16c",
             "AVX512": "-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c"}
    return flags.get(build.get("cpu_capability"), "?") + " (-O3 -ffp-contract=off)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls before the timed ones")
    ap.add_argument("--min-time", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keep-ratio", type=float, nargs="+", default=[0.1, 0.05])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--preset", default="llava-1.5-7b")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--text-score", default="all_queries", choices=["all_queries", "guidance"],
                    help="text ranking of score_text_vision / evict (default all_queries)")
    ap.add_argument("--op", nargs="+", default=None, help="these ops only (default: every op)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    me = "python bench/cpu_evict.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    load_before = [round(x, 2) for x in os.getloadavg()]
    sections, commands = [], []
    t0 = time.time()
    for dt in args.dtypes:
        with tempfile.TemporaryDirectory() as tmp:
            js = os.path.join(tmp, "r.json")
            a = ["ops", "--preset", args.preset, "--dtype", dt, "--device", "cpu",
                 "--keep-ratio", *map(str, args.keep_ratio), "--reps", str(args.reps),
                 "--warmup", str(args.warmup), "--min-time", str(args.min_time), "--json", js,
                 "--no-progress", "--text-score", args.text_score]
            if args.threads:
                a += ["--threads", str(args.threads)]
            if args.op:
                a += ["--op", *args.op]
            if args.no_memory:
                a.append("--no-memory")
            rc = cli.main(a)
            if rc != 0:
                return rc
            with open(js) as f:
                rep = json.load(f)
            rep["command"] = "tgvkv-bench " + " ".join(shlex.quote(x) for x in a
                                                     if not x.startswith(tmp))
            sections.append(rep)
            commands.append(rep["command"].replace(" --json", ""))
    load_after = [round(x, 2) for x in os.getloadavg()]
    first = sections[0]
    result = {"schema": "tgvkv-bench-cpu-evict/1", "command": me, "tgvkv_bench_commands": commands,
              "device": first["device"], "versions": first["versions"],
              "forced_env": {v: os.environ[v] for v in _FORCING if os.environ.get(v)},
              "load_avg_before": load_before, "load_avg_after": load_after,
              "wall_s": round(time.time() - t0, 1),
              "runs": [{"dtype": s["ops"]["dtype"], "ops": s["ops"]} for s in sections]}
    base = os.path.join(args.out, f"cpu_evict_{args.preset}{args.tag}")
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=2)

    dev = first["device"]
    sh = first["ops"]["shape"]
    build = first["versions"].get("tgvkv_build") or {}
    lines = [f"# CPU `evict` of a {args.preset}-shaped cache: tgvkv vs plain PyTorch", "",
             f"- device: {dev['cpu']}, {dev['cpu_count']} cores, {dev['torch_threads']} torch "
             f"threads; {dev.get('cpu_id', '?')}; ISA: {_isa()}",
             "- forced by the environment: " + (", ".join(
                 f"{v}={os.environ[v]}" for v in _FORCING if os.environ.get(v)) or "nothing"),
             f"- CPU capability: tgvkv kernels {build.get('cpu_capability', '?')} (compiled: "
             f"{build.get('cpu_capabilities', '?')}), torch "
             f"{dev.get('torch_cpu_capability', '?')}; kernel flags: {_cap_flags(build)}",
             f"- load average (1/5/15 min) before: {load_before}, after: {load_after}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in first["versions"].items()
                                       if k != "tgvkv_build"),
             f"- shape: L={sh['layers']} Hq={sh['heads']} Hkv={sh['kv_heads']} "
             f"D={sh['head_dim']} N={sh['tokens']} (vision {sh['vision_tokens']}, guidance text "
             f"T={sh['text_tokens']}) B={sh['batch']}, budget mass, text_score "
             f"{first['ops'].get('text_score', 'guidance')}",
             f"- command: `{me}`, i.e. " + "; ".join(f"`{c}`" for c in commands),
             f"- copy bandwidth (tensor.copy_, read+write): "
             + ", ".join(f"{s['ops']['dtype']} run {s['ops']['copy_bandwidth_gbs']:.1f} GB/s"
                         for s in sections),
             f"- timing: perf_counter after {args.warmup} warm-up calls, median (min-max) over >= "
             f"{args.reps} calls; in-place ops get their cache restored outside the timed region",
             "- peak = extra memory allocated during one call ("
             f"{first['ops']['memory_method'] or 'not measured: --no-memory'}); "
             "the plain-PyTorch composition returns new compacted tensors, the op compacts in "
             "place", "- speedup = plain-PyTorch median / tgvkv median", ""]
    for s in sections:
        ops = s["ops"]
        lines += [f"## {ops['dtype']}", "",
                  "| op | keep | tgvkv ms (min-max) | torch ms (min-max) | speedup (median) "
                  "| speedup (min) | tgvkv GB/s | % copy BW | peak tgvkv | peak torch | same |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in ops["rows"]:
            t, b = r["tgvkv"], r["torch"]
            lines.append(
                f"| {r['op']} | {r['keep_ratio']:g} | {t['median_ms']:.3f} ({t['min_ms']:.3f}-"
                f"{t['max_ms']:.3f}) | {b['median_ms']:.3f} ({b['min_ms']:.3f}-{b['max_ms']:.3f})"
                f" | {r['speedup']:.2f}x | {b['min_ms'] / t['min_ms']:.2f}x | "
                f"{common.fmt(t['gbs'], '.1f')} | "
                f"{common.fmt(t['pct_copy_bw'], '.0f')} | {common.fmt_bytes(t['peak_extra_bytes'])} | "
                f"{common.fmt_bytes(b['peak_extra_bytes'])} | "
                f"{ {True: 'yes', False: 'NO', None: '-'}[r.get('same_result')]} |")
        for r in ops["rows"]:
            if r.get("gflops"):
                g = r["gflops"]
                lines.append(f"- {r['op']} keep {r['keep_ratio']:g} ({r.get('flop_model', 'guidance')} "
                             f"flop model, see tgvkv.bench.ops._score_gflops): Q·Kᵀ at {g['tgvkv']:.1f} "
                             f"GFLOP/s = {r['pct_matmul']:.0f}% of `torch.matmul` of the same "
                             f"Q·Kᵀ in fp32 in this run ({g['matmul']:.1f} GFLOP/s, "
                             f"{r['matmul_ms']:.1f} ms); plain PyTorch {g['torch']:.1f} GFLOP/s; "
                             f"the plain composition's Q·Kᵀ products alone "
                             f"(`tgvkv.bench.ops._plain_gemm_products`, timed in turn with "
                             f"the op and the plain composition) take "
                             f"{r['gemm_floor_ms']:.1f} ms: a speed-up ceiling of "
                             f"{r['speedup_ceiling']:.2f}x for any implementation that runs them "
                             f"at `torch.matmul`'s rate")
        lines.append("")
    lines += ["## Targets (issue 12: evict and score_text_vision >= 1.5x plain PyTorch, no op "
              "slower than plain PyTorch, score_text_vision >= 80% of torch.matmul's GFLOP/s in "
              "fp32, identical kept slots)", ""]
    for s in sections:
        rows = s["ops"]["rows"]
        for r in rows:
            if r["op"] in ("evict", "score_text_vision"):
                lines.append(f"- {s['ops']['dtype']}, {r['op']}, keep {r['keep_ratio']:g}: "
                             f"{r['speedup']:.2f}x (>= 1.5x "
                             f"{'met' if r['speedup'] >= 1.5 else 'NOT met'})")
            if r.get("pct_matmul") is not None and s["ops"]["dtype"] == "float32":
                lines.append(f"- float32, score_text_vision: {r['pct_matmul']:.0f}% of "
                             f"torch.matmul (>= 80% {'met' if r['pct_matmul'] >= 80 else 'NOT met'})")
            if r.get("speedup_ceiling") is not None:
                lines.append(f"- {s['ops']['dtype']}, score_text_vision: ceiling "
                             f"{r['speedup_ceiling']:.2f}x (plain time / its Q·Kᵀ products alone)")
        slower = [r["op"] for r in rows if r["speedup"] < 1.0]
        timed = f" (of the ops timed: {', '.join(args.op)})" if args.op else ""
        lines.append(f"- {s['ops']['dtype']}: ops slower than plain PyTorch{timed}: "
                     f"{', '.join(slower) if slower else 'none'}; kept slots identical: "
                     f"{'yes' if all(r.get('same_result') is not False for r in rows) else 'NO'}")
    lines.append("")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {base}.json and {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
