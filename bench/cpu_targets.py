"""Issue 12's done-when on one machine: the matrix of ``bench/cpu_evict.py`` runs, in one table.

Usage::

    python bench/cpu_targets.py --tag epyc_avx2 [--run] [--out bench/results]
                                [--presets P ...] [--threads 1 2] [--suite]

Reads ``<out>/cpu_evict_<preset>_<T>thread_<tag>.json`` for every preset (default llava-1.5-7b,
qwen2.5-vl-7b, llava-next-7b) and thread count (default 1 and 2), and writes
``<out>/cpu_targets_<tag>.md``: for each (preset, threads, dtype) the speed-ups of
``score_text_vision`` and ``evict`` over the fastest plain-PyTorch composition (target >= 1.5x),
fp32 ``score_text_vision``'s GFLOP/s against ``torch.matmul`` of the same Q·Kᵀ (>= 80%), the ops
slower than plain PyTorch (none), whether the kept slots are identical, and the files missing.

``--run`` first runs the missing files (``--rerun``: all of them) one after another, with the
commands of the committed tables (``--keep-ratio 0.05 --reps 7 --min-time 0.3``; llava-next-7b
``--reps 3 --warmup 1 --min-time 0``): about an hour on 2 cores. Nothing else may run meanwhile.
``--suite`` also times the test suite as the README's test command runs it (``python -m pytest
-q -n auto --dist loadgroup tests`` in this checkout, target <= 150 s).

The verdict holds for the machine the files were measured on (each file records its CPU, ISA,
forced environment and load): an AVX2-only CPU for the issue's main criterion, a run under
``TGVKV_CPU_CAPABILITY=AVX2`` on an AVX-512 CPU is a proxy and the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PRESETS = ["llava-1.5-7b", "qwen2.5-vl-7b", "llava-next-7b"]
SPEEDUP, PCT_MATMUL, SUITE_S = 1.5, 80.0, 150.0


def run_args(preset: str, threads: int, tag: str, out: str) -> list[str]:
    """The cpu_evict.py arguments of one file (those of the committed tables)."""
    a = ["--out", out, "--threads", str(threads), "--keep-ratio", "0.05", "--preset", preset,
         "--tag", f"_{threads}thread_{tag}"]
    if preset == "llava-next-7b":  # its plain all_queries calls take about a minute each
        return a + ["--reps", "3", "--warmup", "1", "--min-time", "0"]
    return a + ["--reps", "7", "--min-time", "0.3"]


def path_of(out: str, preset: str, threads: int, tag: str) -> str:
    return os.path.join(out, f"cpu_evict_{preset}_{threads}thread_{tag}.json")


def verdicts(rep: dict) -> list[dict]:
    """One entry per dtype section of a cpu_evict.py JSON: the done-when criteria, checked."""
    out = []
    for run in rep["runs"]:
        rows = run["ops"]["rows"]
        by_op = {}
        for r in rows:
            by_op.setdefault(r["op"], []).append(r)
        score, evict = by_op.get("score_text_vision", []), by_op.get("evict", [])
        v = {"dtype": run["dtype"],
             "score": min((r["speedup"] for r in score), default=None),
             "evict": min((r["speedup"] for r in evict), default=None),
             "pct_matmul": min((r["pct_matmul"] for r in score
                                if r.get("pct_matmul") is not None), default=None),
             "ceiling": min((r["speedup_ceiling"] for r in score
                             if r.get("speedup_ceiling") is not None), default=None),
             "slower": sorted({r["op"] for r in rows if r["speedup"] < 1.0}),
             "same": all(r.get("same_result") is not False for r in rows),
             "text_score": run["ops"].get("text_score")}
        fails = []
        for name in ("score", "evict"):
            if v[name] is None:
                fails.append(f"{name} not timed")
            elif v[name] < SPEEDUP:
                fails.append(f"{name} {v[name]:.2f}x < {SPEEDUP}x")
        if v["dtype"] == "float32" and (v["pct_matmul"] is None or v["pct_matmul"] < PCT_MATMUL):
            fails.append("score GFLOP/s not measured" if v["pct_matmul"] is None else
                         f"score at {v['pct_matmul']:.0f}% of torch.matmul < {PCT_MATMUL:.0f}%")
        if v["slower"]:
            fails.append("slower than plain PyTorch: " + ", ".join(v["slower"]))
        if not v["same"]:
            fails.append("kept slots differ")
        if v["text_score"] not in (None, "all_queries"):
            fails.append(f"text_score={v['text_score']} (the default is all_queries)")
        v["fails"] = fails
        out.append(v)
    return out


def _fmt(x, f):
    return "-" if x is None else format(x, f)


def report(out: str, tag: str, presets: list[str], threads: list[int],
           suite_s: float | None = None) -> tuple[str, bool]:
    """The markdown table and whether every criterion is met (every file present)."""
    lines = [f"# Issue 12 targets: `cpu_evict_*_{tag}` files", ""]
    table = ["| preset | threads | dtype | score | evict | ceiling | fp32 score vs matmul | "
             "slower ops | kept slots | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    missing, machines, ok = [], set(), True
    for p in presets:
        for t in threads:
            f = path_of(out, p, t, tag)
            if not os.path.exists(f):
                missing.append(os.path.relpath(f, ROOT) if f.startswith(ROOT) else f)
                ok = False
                continue
            with open(f) as fh:
                rep = json.load(fh)
            dev = rep["device"]
            forced = ", ".join(f"{k}={v}" for k, v in rep.get("forced_env", {}).items())
            machines.add(f"{dev['cpu']} ({dev.get('cpu_id', '?')}), tgvkv capability "
                         f"{dev.get('torch_cpu_capability', '?')}"
                         + (f", forced: {forced} (a proxy)" if forced else ""))
            for v in verdicts(rep):
                ok = ok and not v["fails"]
                table.append(
                    f"| {p} | {t} | {v['dtype']} | {_fmt(v['score'], '.2f')}x | "
                    f"{_fmt(v['evict'], '.2f')}x | {_fmt(v['ceiling'], '.2f')}x | "
                    f"{_fmt(v['pct_matmul'], '.0f') + '%' if v['dtype'] == 'float32' else '-'} | "
                    f"{', '.join(v['slower']) or 'none'} | {'same' if v['same'] else 'DIFFER'} | "
                    f"{'met' if not v['fails'] else 'NOT met: ' + '; '.join(v['fails'])} |")
    lines += [f"- measured on: {m}" for m in sorted(machines)] or ["- no file found"]
    lines += [f"- targets: `score_text_vision` and `evict` >= {SPEEDUP}x the fastest plain-PyTorch "
              f"composition, fp32 `score_text_vision` >= {PCT_MATMUL:.0f}% of `torch.matmul`'s "
              "GFLOP/s, no op slower than plain PyTorch, kept slots identical; ceiling: the plain "
              "composition's time over that of its own Q·Kᵀ products alone", ""]
    lines += table + [""]
    if missing:
        lines += ["Missing (`python bench/cpu_targets.py --tag " + tag + " --run` takes them):", ""]
        lines += [f"- {m}" for m in missing] + [""]
    if suite_s is not None:
        met = suite_s <= SUITE_S
        ok = ok and met
        lines += [f"Test suite (`python -m pytest -q -n auto --dist loadgroup tests`): "
                  f"{suite_s:.0f} s (<= {SUITE_S:.0f} s {'met' if met else 'NOT met'})", ""]
    lines += [f"**All criteria met: {'yes' if ok else 'no'}**", ""]
    return "\n".join(lines), ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tag", required=True, help="file suffix after _<T>thread_ (e.g. epyc_avx2)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--run", action="store_true", help="run the missing files first")
    ap.add_argument("--rerun", action="store_true", help="run every file first")
    ap.add_argument("--suite", action="store_true", help="also time the test suite")
    args = ap.parse_args(argv)
    if args.run or args.rerun:
        # paths relative to the checkout's root, where it runs: the command the results record
        # is then the one to type there
        out = os.path.relpath(os.path.abspath(args.out), ROOT)
        for p in args.presets:
            for t in args.threads:
                if args.rerun or not os.path.exists(path_of(args.out, p, t, args.tag)):
                    cmd = [sys.executable, "bench/cpu_evict.py", *run_args(p, t, args.tag, out)]
                    print("+", " ".join(cmd), flush=True)
                    rc = subprocess.run(cmd, cwd=ROOT).returncode
                    if rc != 0:
                        return rc
    suite_s = None
    if args.suite:
        t0 = time.time()
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "auto", "--dist",
                             "loadgroup", "tests"], cwd=ROOT).returncode
        suite_s = time.time() - t0
        if rc != 0:
            print(f"the test suite failed (exit {rc})")
            return rc
    text, ok = report(args.out, args.tag, args.presets, args.threads, suite_s)
    dst = os.path.join(args.out, f"cpu_targets_{args.tag}.md")
    with open(dst, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {dst}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
