"""The summary of ``tools/gpu_check.sh``: summary.json, summary.md, junit.xml, bench.json, the plots
and logs.tar.gz in the output folder, from the step table and the files of the work folder.

Run by the script after every step (so that a run cut short still leaves a summary) and once at
the end with ``--final`` (which also prints summary.md). Needs only the standard library.

Output folder (at most 8 files: the device tool brings back no more):
  summary.md, summary.json, junit.xml, bench.json, ops-llava-next-7b.png, ops-qwen2.5-vl-7b.png,
  generate-llava-next-7b.png, logs.tar.gz
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from datetime import datetime, timezone

SCHEMA = "tgvkv-gpu-check/1"
PLOTS = ("ops-llava-next-7b.png", "ops-qwen2.5-vl-7b.png", "generate-llava-next-7b.png")
OPS_REPORTS = ("ops-llava-next-7b", "ops-qwen2.5-vl-7b")


def _load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def read_steps(work):
    steps = []
    try:
        with open(os.path.join(work, "steps.tsv"), newline="") as f:
            for r in csv.DictReader(f, delimiter="\t"):
                steps.append({"name": r["step"], "status": r["status"],
                              "rc": int(r["rc"]) if r["rc"] not in ("", None) else None,
                              "seconds": int(r["seconds"] or 0), "box_s": int(r["box"] or 0),
                              "note": r.get("note") or ""})
    except OSError:
        pass
    for s in steps:
        if s["status"] in ("failed", "timeout"):
            lines = _read(os.path.join(work, "logs", s["name"] + ".log")).rstrip().splitlines()
            s["log_tail"] = lines[-6:]
    return steps


def read_junit(path):
    """Counts (total and per test file), failures with their first message line, skip reasons."""
    if not os.path.exists(path):
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"error": f"junit.xml does not parse: {e}"}
    by_file: dict[str, Counter] = {}
    failures, reasons = [], Counter()
    for tc in root.iter("testcase"):
        cls = tc.get("classname", "")
        fname = cls.split(".")[1] if cls.startswith("tests.") else cls.split(".")[0]
        c = by_file.setdefault(fname + ".py", Counter())
        outcome = "passed"
        for child in tc:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                msg = (child.get("message") or child.text or "").strip().splitlines()
                failures.append({"test": f"{fname}::{tc.get('name')}", "kind": child.tag,
                                 "message": (msg[0] if msg else "")[:300]})
            elif child.tag == "skipped":
                outcome = "skipped"
                reasons[(child.get("message") or "").strip()[:200]] += 1
        c[outcome] += 1
        c["total"] += 1
    tot = Counter()
    for c in by_file.values():
        tot.update(c)
    keys = ("total", "passed", "failed", "errors", "skipped")
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {"total": tot["total"], "passed": tot["passed"], "failed": tot["failed"],
            "errors": tot["errors"], "skipped": tot["skipped"],
            "time_s": float(suite.get("time", 0)) if suite is not None else None,
            "by_file": {f: {k: c[k] for k in keys} for f, c in sorted(by_file.items())},
            "failures": failures[:40], "n_failures_listed": min(40, len(failures)),
            "skip_reasons": dict(reasons.most_common(10))}


def read_sanitizer(work, tool, step):
    log = _read(os.path.join(work, "logs", tool + ".log"))
    out = {"status": step["status"] if step else "not run", "note": step["note"] if step else ""}
    m = re.search(r"ERROR SUMMARY: (\d+) error", log)
    if m:
        out["errors"] = int(m.group(1))
    m = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)",
                  log)
    if m:
        out.update(hazards=int(m.group(1)), errors=int(m.group(2)), warnings=int(m.group(3)))
    summ = [ln.strip("= ").strip() for ln in log.splitlines() if "SUMMARY" in ln]
    if summ:
        out["summary_line"] = summ[-1]
    out["driver"] = [ln for ln in log.splitlines()
                     if ln.startswith(("ok    ", "FAIL  ", "gpu_sanitize_ops: "))]
    return out


def ops_highlights(rep):
    sec = rep.get("ops") or {}
    rows = []
    for r in sec.get("rows", []):
        t, b = r.get("tgvkv", {}), r.get("torch", {})
        rows.append({"op": r.get("op"), "keep_ratio": r.get("keep_ratio"),
                     "tgvkv_ms": t.get("median_ms"), "torch_ms": b.get("median_ms"),
                     "speedup": r.get("speedup"), "gbs": t.get("gbs"),
                     "pct_copy_bw": t.get("pct_copy_bw"), "same_result": r.get("same_result"),
                     "peak_tgvkv": t.get("peak_extra_bytes"),
                     "peak_torch": b.get("peak_extra_bytes")})
    return {"preset": sec.get("preset"), "shape": sec.get("shape"), "dtype": sec.get("dtype"),
            "device": (rep.get("device") or {}).get("gpu") or (rep.get("device") or {}).get("cpu"),
            "copy_bandwidth_gbs": sec.get("copy_bandwidth_gbs"), "rows": rows,
            "command": rep.get("command")}


def gen_highlights(rep):
    sec = rep.get("generate") or {}
    keys = ("keep_ratio", "batch", "ttft_ms", "prefill_ms", "decode_ms_per_step", "decode_tok_s",
            "decode_speedup_vs_unpatched", "kept_fraction", "cache_bytes", "peak_bytes")
    return {"model": sec.get("model"), "dtype": sec.get("dtype"), "prompt_tokens":
            sec.get("prompt_tokens"), "new_tokens": sec.get("new_tokens"),
            "backend": sec.get("backend"), "rows": [{k: r.get(k) for k in keys}
                                                    for r in sec.get("rows", [])],
            "max_batch": sec.get("max_batch"), "command": rep.get("command")}


def extra_highlights(rep):
    keys = ("preset", "batch", "keep_ratio", "live_slots", "evicted_per_step",
            "same_result_as_torch", "eager_speedup", "gbs", "pct_copy_bw")
    rows = []
    for r in rep.get("decode", []):
        d = {k: r.get(k) for k in keys}
        d["eager_us_per_layer"] = (r.get("eager_tgvkv") or {}).get("median_us")
        d["torch_us_per_layer"] = (r.get("eager_torch") or {}).get("median_us")
        g = r.get("graph") or {}
        d["graph_us_per_layer"] = g.get("us_per_layer")
        d["graph"] = ("identical" if g.get("identical_to_eager") else "DIFFERS") \
            if g.get("captured") else (g.get("skipped") or g.get("error"))
        # the model layer's decode step: one decode_evict_layers_ call for all layers
        d["fused_eager_us_per_layer"] = (r.get("fused_eager") or {}).get("median_us")
        d["fused_graph_us_per_layer"] = (r.get("fused_graph") or {}).get("us_per_layer")
        d["fused_same_as_per_layer"] = r.get("fused_same_as_per_layer")
        # the per-layer cache append of the step (decode_append_)
        ap = r.get("append") or {}
        d["append_us_per_layer"] = (ap.get("eager_tgvkv") or {}).get("median_us")
        d["append_torch_us_per_layer"] = (ap.get("eager_torch") or {}).get("median_us")
        d["append_same"] = ap.get("same_result_as_torch")
        rows.append(d)
    return {"copy_bandwidth_gbs": rep.get("copy_bandwidth_gbs"),
            "copy_bytes": rep.get("copy_bytes"),
            "decode": rows, "graph_capture": rep.get("graph_capture")}


def _f(x, spec=".3g"):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, (int, float)):
        return format(x, spec)
    return str(x)


def _bytes(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _table(hdr, rows):
    out = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(out)


def markdown(s):
    env = s.get("env") or {}
    state = " (INTERRUPTED)" if s.get("interrupted") else (
        "" if s["finished"] else " (IN PROGRESS or cut short)")
    L = [f"# tgvkv GPU check: {s['mode']} run, part {s['part']}{state}", ""]
    L.append(f"{s['started_utc']}, wall {s['wall_s']} s of a {s['budget_s']} s budget; "
             f"{env.get('gpu') or 'no GPU'}; python {env.get('python')}, torch {env.get('torch')} "
             f"(CUDA {env.get('torch_cuda')}), transformers "
             f"{(env.get('packages') or {}).get('transformers')}; {env.get('nproc')} CPUs.")
    L.append("")
    L.append(_table(["step", "status", "seconds", "time box s", "note"],
                    [[x["name"], x["status"].upper() if x["status"] in ("failed", "timeout")
                      else x["status"], x["seconds"], x["box_s"], x["note"]]
                     for x in s["steps"]]))
    L.append("")
    L.append(f"Skipped: {', '.join(s['skipped']) or 'none'}. "
             f"Failed or timed out: {', '.join(s['failed']) or 'none'}.")
    for x in s["steps"]:
        if x.get("log_tail"):
            L += ["", f"`{x['name']}` log tail:", "```", *x["log_tail"], "```"]
    t = s.get("tests")
    if t:
        L += ["", "## Tests (tests/test_cuda.py + tests/test_ops_*.py -m cuda)", ""]
        if "error" in t:
            L.append(t["error"])
        else:
            L.append(f"{t['total']} tests: {t['passed']} passed, {t['failed']} failed, "
                     f"{t['errors']} errors, {t['skipped']} skipped ({_f(t['time_s'], '.0f')} s).")
            L.append("")
            L.append(_table(["file", "total", "passed", "failed", "errors", "skipped"],
                            [[f, c["total"], c["passed"], c["failed"], c["errors"], c["skipped"]]
                             for f, c in t["by_file"].items()]))
            if t["failures"]:
                L += ["", "Failures (first 40):", ""]
                L += [f"- `{x['test']}`: {x['message']}" for x in t["failures"]]
            if t["skip_reasons"]:
                L += ["", "Skip reasons: " + "; ".join(f"{k} ({v})"
                                                       for k, v in t["skip_reasons"].items())]
    san = s.get("sanitizer") or {}
    if san:
        L += ["", "## compute-sanitizer (tools/gpu_sanitize_ops.py)", ""]
        for tool, r in san.items():
            L.append(f"- {tool}: {r['status']}; {r.get('summary_line') or r.get('note') or ''}")
            L += [f"  - {d}" for d in r.get("driver", [])]
    b = s.get("bench") or {}
    ex = b.get("extra")
    if ex:
        L += ["", "## Copy bandwidth, decode eviction per layer, CUDA graph "
              "(tools/gpu_extra.py)", ""]
        L.append(f"Device-to-device copy: {_f(ex['copy_bandwidth_gbs'], '.1f')} GB/s "
                 "(read + write, "
                 f"{_bytes(ex['copy_bytes'])} buffer). CUDA-graph capture of a decode step: "
                 f"{ex.get('graph_capture')}.")
        L.append("")
        L.append(_table(["preset", "B", "keep", "live slots", "tgvkv us/layer (eager)",
                         "torch us/layer", "speedup", "graph us/layer", "GB/s", "% copy", "same",
                         "graph", "fused us/layer (eager / graph)", "fused same",
                         "append us/layer (tgvkv / torch)", "append same"],
                        [[r["preset"], r["batch"], _f(r["keep_ratio"], "g"), r["live_slots"],
                          _f(r["eager_us_per_layer"], ".1f"), _f(r["torch_us_per_layer"], ".1f"),
                          _f(r["eager_speedup"], ".2f"), _f(r["graph_us_per_layer"], ".2f"),
                          _f(r["gbs"], ".1f"), _f(r["pct_copy_bw"], ".1f"),
                          _f(r["same_result_as_torch"]), r["graph"],
                          f"{_f(r.get('fused_eager_us_per_layer'), '.1f')} / "
                          f"{_f(r.get('fused_graph_us_per_layer'), '.2f')}",
                          _f(r.get("fused_same_as_per_layer")),
                          f"{_f(r.get('append_us_per_layer'), '.1f')} / "
                          f"{_f(r.get('append_torch_us_per_layer'), '.1f')}",
                          _f(r.get("append_same"))] for r in ex["decode"]]))
    for name, o in (b.get("ops") or {}).items():
        L += ["", f"## {name}: `{o.get('command')}`", ""]
        sh = o.get("shape") or {}
        L.append(f"{o.get('device')}, {o.get('dtype')}, L={sh.get('layers')} Hq={sh.get('heads')} "
                 f"Hkv={sh.get('kv_heads')} D={sh.get('head_dim')} N={sh.get('tokens')} "
                 f"B={sh.get('batch')}; copy bandwidth "
                 f"{_f(o.get('copy_bandwidth_gbs'), '.1f')} GB/s")
        L.append("")
        L.append(_table(["op", "keep", "tgvkv ms", "torch ms", "speedup", "GB/s", "% copy",
                         "peak tgvkv", "peak torch", "same"],
                        [[r["op"], _f(r["keep_ratio"], "g"), _f(r["tgvkv_ms"], ".3f"),
                          _f(r["torch_ms"], ".3f"), _f(r["speedup"], ".2f"), _f(r["gbs"], ".1f"),
                          _f(r["pct_copy_bw"], ".0f"), _bytes(r["peak_tgvkv"]),
                          _bytes(r["peak_torch"]), _f(r["same_result"])] for r in o["rows"]]))
    for key in ("generate", "generate_max_batch"):
        g = b.get(key)
        if not g:
            continue
        L += ["", f"## {key}: `{g.get('command')}`", ""]
        L.append(f"{g.get('model')}, {g.get('dtype')}, prompt {g.get('prompt_tokens')} tokens, "
                 f"{g.get('new_tokens')} new tokens, ops backend {g.get('backend')}")
        L.append("")
        L.append(_table(["keep", "batch", "TTFT ms", "prefill ms", "decode ms/step", "tok/s",
                         "vs unpatched", "kept", "KV cache", "peak extra"],
                        [["off" if r["keep_ratio"] is None else _f(r["keep_ratio"], "g"),
                          r["batch"], _f(r["ttft_ms"], ".1f"), _f(r["prefill_ms"], ".1f"),
                          _f(r["decode_ms_per_step"], ".2f"), _f(r["decode_tok_s"], ".1f"),
                          _f(r["decode_speedup_vs_unpatched"], ".2f"),
                          _f(r["kept_fraction"], ".3f"),
                          _bytes(r["cache_bytes"]), _bytes(r["peak_bytes"])] for r in g["rows"]]))
        if g.get("max_batch"):
            L.append("")
            L.append("Largest batch that fits: " + ", ".join(
                f"{k}: {v}" for k, v in g["max_batch"].items()))
    L += ["", "Files: " + ", ".join(s["files"]) + " (logs.tar.gz: every step's log, the raw "
          "JSON reports, env.json, steps.tsv)."]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", default="gpu")
    p.add_argument("--part", default="all")
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--started", type=float, default=time.time())
    p.add_argument("--final", action="store_true")
    p.add_argument("--interrupted", action="store_true", help="the script got SIGINT/SIGTERM")
    a = p.parse_args(argv)
    work, out = a.work, a.out
    steps = read_steps(work)
    by = {x["name"]: x for x in steps}
    s = {"schema": SCHEMA, "mode": a.mode, "part": a.part, "budget_s": a.budget,
         "started_utc": datetime.fromtimestamp(a.started, timezone.utc).isoformat(
             timespec="seconds"),
         "wall_s": round(time.time() - a.started), "finished": a.final,
         "env": _load_json(os.path.join(work, "env.json")), "steps": steps,
         "skipped": [x["name"] for x in steps if x["status"] == "skipped"],
         "failed": [x["name"] for x in steps if x["status"] in ("failed", "timeout")]}
    s["interrupted"] = a.interrupted
    s["ok"] = a.final and not s["failed"] and not a.interrupted
    junit = os.path.join(work, "junit.xml")
    s["tests"] = read_junit(junit)
    s["sanitizer"] = {t: read_sanitizer(work, t, by.get(t)) for t in ("memcheck", "racecheck")
                      if t in by}
    bench = {"schema": "tgvkv-gpu-check-bench/1"}
    hl = {}
    ex = _load_json(os.path.join(work, "extra.json"))
    if ex:
        bench["extra"] = ex
        hl["extra"] = extra_highlights(ex)
    for name in OPS_REPORTS:
        rep = _load_json(os.path.join(work, name + ".json"))
        if rep:
            bench.setdefault("ops", {})[name] = rep
            hl.setdefault("ops", {})[name] = ops_highlights(rep)
    for key, fname in (("generate", "generate-llava-next-7b.json"),
                       ("generate_max_batch", "generate-max-batch.json")):
        rep = _load_json(os.path.join(work, fname))
        if rep:
            bench[key] = rep
            hl[key] = gen_highlights(rep)
    s["bench"] = hl
    os.makedirs(out, exist_ok=True)
    files = ["summary.md", "summary.json"]
    if os.path.exists(junit):
        shutil.copyfile(junit, os.path.join(out, "junit.xml"))
        files.append("junit.xml")
    if len(bench) > 1:
        with open(os.path.join(out, "bench.json"), "w") as f:
            json.dump(bench, f, indent=2, default=str)
        files.append("bench.json")
    for png in PLOTS:
        if os.path.exists(os.path.join(work, png)):
            shutil.copyfile(os.path.join(work, png), os.path.join(out, png))
            files.append(png)
    files.append("logs.tar.gz")
    s["files"] = files
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(s, f, indent=2, default=str)
    md = markdown(s)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md)
    tmp = work.rstrip("/") + ".logs.tar.gz.part"  # beside the work folder: OUT stays at 8 files
    with tarfile.open(tmp, "w:gz") as tar:
        for name in sorted(os.listdir(work)):
            tar.add(os.path.join(work, name), arcname=os.path.join("gpu_check", name))
    shutil.move(tmp, os.path.join(out, "logs.tar.gz"))
    if a.final:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
