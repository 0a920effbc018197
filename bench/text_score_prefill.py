"""Prefill cost of TGV-KV eviction (text_score all_queries / guidance) vs the unpatched prefill.

Interleaved repetitions (unpatched, all_queries, guidance, ...) of one prefill forward, timed by
wall clock and by process CPU time (less sensitive to other processes on a shared machine), plus
the time spent inside the policy's hooks (layer_scores: the scoring ops; evict: budgets, selection,
compaction). Usage:

    python bench/text_score_prefill.py --preset llava-1.5-7b --layers 2 --reps 3 --json OUT.json
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch

import tgvkv
from tgvkv import testing as tiny
from tgvkv.bench.generate import _prompt, load_model
from tgvkv.policy import TGVKV


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llava-1.5-7b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--keep-ratio", type=float, default=0.05)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    model, name, _ = load_model(None, a.preset, "cpu", torch.float32, 0, ValueError, a.layers)
    kind = "tiny" if a.preset.startswith("tiny") else "full"
    inp = tiny.make_inputs(model, [_prompt(model, 0, kind)], seed=0)
    hooks = {}

    def timed(fn_name):
        orig = getattr(TGVKV, fn_name)

        def f(self, *args, **kw):
            t = time.perf_counter()
            r = orig(self, *args, **kw)
            hooks[fn_name] = hooks.get(fn_name, 0.0) + time.perf_counter() - t
            return r
        setattr(TGVKV, fn_name, f)
    timed("layer_scores")
    timed("evict")

    def prefill(policy):
        with torch.no_grad():
            if policy is None:
                w, c = time.perf_counter(), time.process_time()
                model(**inp, use_cache=True)
                return time.perf_counter() - w, time.process_time() - c
            with tgvkv.apply(model, policy) as h:
                cache = h.new_cache()
                w, c = time.perf_counter(), time.process_time()
                model(**inp, **tgvkv.hf.cache_kwargs(model, cache), use_cache=True)
                return time.perf_counter() - w, time.process_time() - c

    configs = {"unpatched": None, "all_queries": TGVKV(keep_ratio=a.keep_ratio),
               "guidance": TGVKV(keep_ratio=a.keep_ratio, text_score="guidance")}
    prefill(None)  # warm-up
    res = {k: {"wall_s": [], "cpu_s": [], "hooks_s": []} for k in configs}
    load = [os.getloadavg()]
    for _ in range(a.reps):
        for k, pol in configs.items():
            hooks.clear()
            w, c = prefill(pol)
            res[k]["wall_s"].append(w)
            res[k]["cpu_s"].append(c)
            res[k]["hooks_s"].append(dict(hooks))
    load.append(os.getloadavg())
    base_w = statistics.median(res["unpatched"]["wall_s"])
    base_c = statistics.median(res["unpatched"]["cpu_s"])
    summary = {}
    for k, r in res.items():
        hw = [sum(h.values()) for h in r["hooks_s"]]
        summary[k] = {"wall_median_s": statistics.median(r["wall_s"]),
                      "cpu_median_s": statistics.median(r["cpu_s"]),
                      "wall_ratio": statistics.median(r["wall_s"]) / base_w,
                      "cpu_ratio": statistics.median(r["cpu_s"]) / base_c,
                      "hooks_median_s": statistics.median(hw) if hw else 0.0,
                      "hooks_over_unpatched_wall": (statistics.median(hw) / base_w) if hw else 0.0}
    with open("/proc/cpuinfo") as f:
        cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    out = {"command": "python bench/text_score_prefill.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not None),
           "model": name, "prompt_tokens": int(inp["input_ids"].shape[1]),
           "keep_ratio": a.keep_ratio, "cpu": cpu, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version(),
           "load_avg_start_end": load, "runs": res, "summary": summary}
    print(json.dumps(summary, indent=1))
    print("load", load)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
