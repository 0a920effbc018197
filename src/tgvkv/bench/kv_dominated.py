"""Decode throughput where the KV cache dominates the step: ``tgvkv-bench generate --kv-dominated``.

The configuration is chosen from a roofline model with numbers measured at startup on this
machine:

- ``R``: the GEMM rate, ``torch.matmul`` of a weight-shaped GEMM (``[256, h] x [h, inter]``, the
  MLP up-projection of the model) at the run's dtype and threads;
- ``BW``: the memory bandwidth, ``tensor.copy_`` of 256 MiB (read + write bytes per second).

Per decode step at batch ``B`` (``P`` = weight parameters of the decoder layers and the LM head,
``e`` = bytes per element):

- weights time ``= max(2·B·P / R, P·e / BW)`` (compute-bound from a few samples on);
- K/V read time ``= (K and V bytes the attention reads) / BW``: ``B · S · 2·Hkv·D·e`` per layer,
  ``S`` = slots attended (padded to the longest sample);
- cache append time: transformers' ``DynamicCache`` (the unpatched model) appends with
  ``torch.cat``, which reads and writes the whole K/V of the layer every step (``2 x`` the K/V
  bytes); tgvkv's cache writes the new slot in place (nothing to add);
- eviction time (patched): ``decode_evict_layers_`` reads K of the live slots once more.

The prompt length is the smallest whole number of images for which the K/V reads alone take at
least ``kv_share`` (0.55) of the unpatched step at the largest batch (``kv_dominated: true`` in the
JSON when the model, cache appends included, says K/V traffic is >= half the step). Only the
language model is full width: the vision tower is the tiny CLIP of :mod:`tgvkv.testing` (its
projector maps to the full hidden size), so the prompt's image tokens cost nothing to encode.

Prefill runs ONCE (batch 1: ~1 minute for 2 layers and 4k tokens on 2 cores, minutes per
sample more for larger batches); the batch-B decode states are B copies of it. Every keep ratio
evicts a copy of the same dense cache with the same prefill scores (the scores do not depend on
the keep ratio), and the unpatched model decodes from a ``DynamicCache`` copy of it. Decode steps
are data-independent in cost, so copies of one sample time the same as B distinct samples; the
batch-B prefill time of the end-to-end throughput is B x the measured batch-1 prefill (marked
``prefill_estimated`` in the JSON), which holds for prefill GEMMs of thousands of rows.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch

from .common import fmt, fmt_bytes, table
from .timing import copy_bandwidth_gbs, time_fn

PAPER_SPEEDUP = 1.526  # +52.6% end-to-end throughput at 5% retention (SPEC §6)
KV_SHARE = 0.55        # K/V reads' share of the unpatched step the prompt length is chosen for


def _load():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def measure_rates(hidden: int, inter: int, dtype, device: str) -> dict:
    """GEMM rate (FLOP/s) of ``[256, hidden] x [hidden, inter]`` and copy bandwidth (B/s)."""
    a = torch.randn(256, hidden, dtype=dtype, device=device)
    w = torch.randn(hidden, inter, dtype=dtype, device=device)
    t = time_fn(lambda: torch.matmul(a, w), device, warmup=2, reps=5)
    rate = 2 * 256 * hidden * inter / (t.min_ms / 1e3)
    bw = copy_bandwidth_gbs(device) * 1e9
    del a, w
    return {"gemm_flops": rate, "gemm_shape": [256, hidden, inter], "gemm_ms_min": t.min_ms,
            "bandwidth_bytes_s": bw, "bandwidth_method": "tensor.copy_ of 256 MiB, read+write"}


def build_model(preset: str, layers: int, dtype, device: str, seed: int = 0):
    """A full-width language model of ``preset`` with ``layers`` decoder layers and the tiny CLIP
    of tgvkv.testing as vision tower (image_size 336: 576 tokens per image)."""
    from .. import testing as tiny

    cfg = tiny.config(preset)
    if cfg.model_type != "llava":
        raise ValueError(f"--kv-dominated builds LLaVA-1.5-style models only, not {preset!r}")
    small = tiny.config("tiny-llava").vision_config
    small.image_size = 336
    cfg.vision_config = small
    cfg.text_config.num_hidden_layers = layers
    return tiny.build(preset, seed, dtype, device, cfg=cfg)


def weight_params(model) -> int:
    """Parameters of the Linear weights a decode step reads: decoder layers + LM head."""
    from ..hf.patch import _language_model

    lm = _language_model(model)
    n = sum(m.weight.numel() for m in lm.layers.modules() if isinstance(m, torch.nn.Linear))
    return n + model.lm_head.weight.numel()


class Roofline:
    def __init__(self, rates, P, elem, L, Hkv, D):
        self.R, self.BW = rates["gemm_flops"], rates["bandwidth_bytes_s"]
        self.P, self.e, self.L, self.Hkv, self.D = P, elem, L, Hkv, D

    def weights_s(self, B):
        return max(2 * B * self.P / self.R, self.P * self.e / self.BW)

    def kv_bytes(self, B, slots):
        """K + V bytes of all layers for B samples of `slots` attended slots each."""
        return self.L * B * slots * 2 * self.Hkv * self.D * self.e

    def step(self, B, slots, append_copies=False, evict_slots=0.0):
        kv = self.kv_bytes(B, slots)
        t_w = self.weights_s(B)
        t_kv = kv / self.BW
        t_app = 2 * kv / self.BW if append_copies else 0.0
        t_ev = self.kv_bytes(B, evict_slots) / 2 / self.BW  # K only
        return {"weight_bytes": self.P * self.e, "weight_flops": 2 * B * self.P,
                "kv_bytes": kv, "weights_s": t_w, "kv_read_s": t_kv, "kv_append_s": t_app,
                "evict_read_s": t_ev, "total_s": t_w + t_kv + t_app + t_ev}


def choose_prompt(roof: Roofline, B: int, text_tokens: int, image_tokens: int,
                  max_tokens: int) -> tuple[int, int]:
    """(images, N): the fewest images with K/V reads >= KV_SHARE of the unpatched step."""
    t_w = roof.weights_s(B)
    per_slot = roof.kv_bytes(B, 1) / roof.BW
    need = KV_SHARE / (1 - KV_SHARE) * t_w / per_slot  # slots attended
    imgs = max(1, math.ceil((need - text_tokens) / image_tokens))
    N = text_tokens + imgs * image_tokens
    while N > max_tokens and imgs > 1:
        imgs -= 1
        N = text_tokens + imgs * image_tokens
    return imgs, N


def _copy_cache_state(state, B):
    """Dense per-layer K/V of the prefill repeated to B samples (new tensors)."""
    return [(k.repeat(B, 1, 1, 1), v.repeat(B, 1, 1, 1)) for k, v in state]


def _decode(model, cache, first_tok, attn_mask, steps, kw):
    """Greedy decode `steps` tokens from a filled cache; returns (step seconds, tokens)."""
    B = first_tok.shape[0]
    tok = first_tok
    N = attn_mask.shape[1]
    mask = torch.ones(B, N + steps + 1, dtype=attn_mask.dtype)
    mask[:, :N] = attn_mask
    times, toks = [], [tok]
    with torch.no_grad():
        for t in range(steps):
            t0 = time.perf_counter()
            out = model(input_ids=tok, attention_mask=mask[:, :N + t + 1], use_cache=True,
                        logits_to_keep=1, **kw)
            tok = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t0)
            toks.append(tok)
    return times, torch.cat(toks, 1)


def run_kv_dominated(preset="llava-1.5-7b", layers=2, keep_ratios=(1.0, 0.5, 0.2, 0.1, 0.05),
                     batches=(1, 8), new_tokens=32, dtype=torch.float32, dtype_name="float32",
                     device="cpu", seed=0, max_tokens=8192, warm_steps=2, progress=True) -> dict:
    """See the module docstring. Returns the ``generate`` section of the report."""
    import transformers.cache_utils as cu

    import tgvkv
    from .. import testing as tiny
    from ..hf import cache_kwargs
    from ..hf.cache import TGVKVCache

    if device != "cpu":
        raise ValueError("--kv-dominated is the CPU roofline configuration (use --device cpu)")
    log = (lambda *a: print(*a, flush=True)) if progress else (lambda *a: None)
    t_start = time.perf_counter()
    model = build_model(preset, layers, dtype, device, seed)
    tc = model.config.text_config
    L, Hkv = tc.num_hidden_layers, tc.num_key_value_heads
    D = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    elem = torch.empty((), dtype=dtype).element_size()
    rates = measure_rates(tc.hidden_size, tc.intermediate_size, dtype, device)
    P = weight_params(model)
    roof = Roofline(rates, P, elem, L, Hkv, D)
    Bmax = max(batches)
    n_img = 576
    prefix, question = 24, 40
    imgs, N = choose_prompt(roof, Bmax, prefix + question, n_img, max_tokens)
    b_compute = math.ceil(P * elem / roof.BW * roof.R / (2 * P))  # batch where GEMMs turn compute-bound
    log(f"kv-dominated: {preset} with {L} layers (full width), GEMM {rates['gemm_flops'] / 1e9:.1f} "
        f"GFLOP/s, copy bandwidth {roof.BW / 1e9:.1f} GB/s, weights {P * elem / 2**30:.2f} GiB "
        f"({P / 1e6:.0f}M params); weights compute-bound from batch {b_compute}; prompt {imgs} "
        f"images x {n_img} + {prefix + question} text = {N} tokens for batch {Bmax}")

    # ---- the one prefill (batch 1), through the patched model, eviction held back ----------
    inputs = tiny.make_inputs(model, [[prefix] + ["image"] * imgs + [question]], seed=seed)
    assert inputs["input_ids"].shape[1] == N, (inputs["input_ids"].shape, N)
    load_prefill = _load()
    with tgvkv.apply(model, tgvkv.TGVKV(keep_ratio=0.05)) as h:
        pc = h.new_cache()
        pc.finalize = lambda: None  # keep the dense cache and the scores
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(**inputs, use_cache=True, logits_to_keep=1, **cache_kwargs(model, pc))
        prefill_s = time.perf_counter() - t0
        del pc.finalize
    first = out.logits[:, -1:].argmax(-1)
    dense = [(layer.keys, layer.values) for layer in pc.layers]
    scores, stats = list(pc._scores), list(pc._stats)
    log(f"prefill (batch 1, {N} tokens): {prefill_s:.1f} s (load {load_prefill})")
    steps = new_tokens - 1  # the first token comes from the prefill

    rows = []
    for B in batches:
        am = inputs["attention_mask"].repeat(B, 1)
        tok0 = first.repeat(B, 1)
        configs = [None] + [float(k) for k in keep_ratios] + [None]
        base_runs = []
        for kr in configs:
            load0 = _load()
            kv = _copy_cache_state(dense, B)
            evict_ms, slots, ev_cost, kept = 0.0, None, None, 1.0
            if kr is None:
                cache = cu.DynamicCache()
                for l, (k, v) in enumerate(kv):
                    cache.update(k, v, l)
                del kv
                times, toks = _decode(model, cache, tok0, am, steps, cache_kwargs(model, cache))
                slots_avg = N + 1 + steps / 2
                model_row = roof.step(B, slots_avg, append_copies=True)
                cache_bytes = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers)
            else:
                policy = tgvkv.TGVKV(keep_ratio=kr)
                with tgvkv.apply(model, policy) as h:
                    cache = h.new_cache()
                    cache.begin_prefill(inputs["input_ids"].repeat(B, 1), am)
                    for l, layer in enumerate(cache.layers):
                        layer.update(*kv[l])
                    del kv
                    cache._scores = [s.repeat(B, 1) for s in scores]
                    cache._stats = [s.repeat(B, 1) for s in stats]
                    h.runtime.last = cache
                    if cache.phase == "prefill":
                        cache.finalize()
                        evict_ms = float(cache.evict_ms)
                        kept = cache.summary().achieved
                    bound0 = [layer.bound if layer.compacted else N for layer in cache.layers]
                    ev_times = []
                    inner = policy.decode_step_layers

                    def timed(*a, _inner=inner, _acc=ev_times):
                        t = time.perf_counter()
                        r = _inner(*a)
                        _acc.append(time.perf_counter() - t)
                        return r

                    policy.decode_step_layers = timed
                    times, toks = _decode(model, cache, tok0, am, steps, cache_kwargs(model, cache))
                    del policy.decode_step_layers
                    bound1 = [layer.bound if layer.compacted else N + steps for layer in cache.layers]
                    cache_bytes = cache.nbytes()
                slots_avg = (sum(bound0) + sum(bound1)) / 2 / L + 0.5
                live = [float(layer.length.float().mean()) for layer in cache.layers
                        if layer.compacted]
                ev_slots = sum(live) / max(len(live), 1) if live and kr < 1.0 else 0.0
                # passthrough (keep 1): the layers stay DynamicLayer-like and append by cat
                model_row = roof.step(B, slots_avg, append_copies=not cache.layers[0].compacted,
                                      evict_slots=ev_slots)
                if ev_times:
                    ev_cost = statistics.median(ev_times[warm_steps:] or ev_times) / L * 1e6
            timed_steps = times[warm_steps:] or times
            step_s = statistics.mean(timed_steps)
            row = {"keep_ratio": kr, "batch": B, "prompt_tokens": N,
                   "decode_ms_per_step": step_s * 1e3, "decode_tok_s": B / step_s,
                   "decode_ms_per_step_median": statistics.median(timed_steps) * 1e3,
                   "decode_steps_timed": len(timed_steps), "evict_ms": evict_ms,
                   "kept_fraction": kept, "cache_bytes": cache_bytes,
                   "slots_attended_avg": slots_avg, "evict_us_per_layer_step": ev_cost,
                   "load_before": load0, "load_after": _load(),
                   "model": {k: v for k, v in model_row.items()},
                   "tokens_first8": toks[0, :8].tolist()}
            if kr is None:
                base_runs.append(row)
            else:
                rows.append(row)
            del cache
            log(f"batch {B} keep {'off' if kr is None else kr}: {row['decode_tok_s']:.2f} tok/s "
                f"({row['decode_ms_per_step']:.1f} ms/step, model {model_row['total_s'] * 1e3:.1f} "
                f"ms), load {row['load_after']}")
        # the unpatched model, measured before and after the keep ratios (load drift)
        base = dict(base_runs[0])
        base["decode_ms_per_step"] = statistics.mean(r["decode_ms_per_step"] for r in base_runs)
        base["decode_tok_s"] = B / (base["decode_ms_per_step"] / 1e3)
        base["unpatched_runs_tok_s"] = [r["decode_tok_s"] for r in base_runs]
        base["load_after"] = base_runs[-1]["load_after"]
        rows.insert(len(rows) - len(keep_ratios), base)
    # ---- ratios, predictions, end to end ------------------------------------------------------
    out_rows = []
    for B in batches:
        base = next(r for r in rows if r["batch"] == B and r["keep_ratio"] is None)
        t_base = base["model"]["total_s"]
        kv_share = (base["model"]["kv_read_s"] + base["model"]["kv_append_s"]) / t_base
        kv_read_share = base["model"]["kv_read_s"] / t_base
        prefill_b = prefill_s * B
        for r in [x for x in rows if x["batch"] == B]:
            m = r["model"]
            r["predicted_step_ms"] = m["total_s"] * 1e3
            r["kv_share_unpatched"] = kv_share
            r["kv_read_share_unpatched"] = kv_read_share
            r["kv_dominated"] = kv_share >= 0.5
            r["prefill_ms"] = prefill_b * 1e3
            r["prefill_estimated"] = B > 1
            dec_total = r["decode_ms_per_step"] / 1e3 * steps
            r["e2e_tok_s"] = B * new_tokens / (prefill_b + r["evict_ms"] / 1e3 + dec_total)
            if r["keep_ratio"] is not None:
                r["decode_speedup_vs_unpatched"] = r["decode_tok_s"] / base["decode_tok_s"]
                r["predicted_speedup"] = t_base / m["total_s"]
                r["achieved_over_predicted"] = (r["decode_speedup_vs_unpatched"]
                                                / r["predicted_speedup"])
            out_rows.append(r)
        for r in out_rows:
            if r["batch"] == B and r["keep_ratio"] is not None:
                r["e2e_speedup_vs_unpatched"] = r["e2e_tok_s"] / base["e2e_tok_s"]
    return {"model": f"{preset} ({L} layers, full width; tiny CLIP vision tower)",
            "model_kind": "random weights", "kv_dominated_config": True, "dtype": dtype_name,
            "new_tokens": new_tokens, "prompt_tokens": N, "images": imgs,
            "image_tokens": n_img, "backend": "tgvkv.ops", "layers": L, "kv_heads": Hkv,
            "head_dim": D, "weight_params": P, "rates": rates, "batch_compute_bound": b_compute,
            "prefill_s_batch1": prefill_s, "load_prefill": load_prefill,
            "paper_e2e_speedup_at_0.05": PAPER_SPEEDUP, "kv_share_target": KV_SHARE,
            "warm_steps_excluded": warm_steps, "wall_s": time.perf_counter() - t_start,
            "rows": out_rows,
            "prompt": f"{prefix} text tokens, {imgs} images (tiny CLIP, 576 tokens each), "
                      f"{question} question tokens; batch B = B copies of the one prefill"}


def kv_table(sec: dict) -> str:
    r0 = sec["rates"]
    title = (f"generate --kv-dominated: {sec['model']}, {sec['dtype']}, prompt "
             f"{sec['prompt_tokens']} tokens, {sec['new_tokens']} new tokens; GEMM "
             f"{r0['gemm_flops'] / 1e9:.1f} GFLOP/s, bandwidth {r0['bandwidth_bytes_s'] / 1e9:.1f} "
             f"GB/s; prefill (batch 1) {sec['prefill_s_batch1']:.1f} s")
    hdr = ["keep", "batch", "decode tok/s", "vs unpatched", "predicted", "achieved/pred",
           "ms/step (model)", "K/V bytes", "weights B / FLOPs", "evict us/layer", "e2e tok/s",
           "e2e vs unpatched", "kept"]
    out = []
    for r in sec["rows"]:
        m = r["model"]
        out.append(["off (unpatched)" if r["keep_ratio"] is None else f"{r['keep_ratio']:g}",
                    str(r["batch"]), fmt(r["decode_tok_s"], ".2f"),
                    fmt(r.get("decode_speedup_vs_unpatched"), ".2f") + "x",
                    fmt(r.get("predicted_speedup"), ".2f") + "x",
                    fmt(r.get("achieved_over_predicted"), ".2f"),
                    f"{r['decode_ms_per_step']:.1f} ({r['predicted_step_ms']:.1f})",
                    fmt_bytes(m["kv_bytes"]),
                    f"{fmt_bytes(m['weight_bytes'])} / {m['weight_flops'] / 1e9:.1f} G",
                    fmt(r.get("evict_us_per_layer_step"), ".0f"), fmt(r["e2e_tok_s"], ".2f"),
                    fmt(r.get("e2e_speedup_vs_unpatched"), ".2f") + "x",
                    fmt(r["kept_fraction"], ".3f")])
    txt = table(hdr, out, title)
    notes = []
    for B in sorted({r["batch"] for r in sec["rows"]}):
        r = next(x for x in sec["rows"] if x["batch"] == B)
        tag = "K/V-dominated" if r["kv_dominated"] else "NOT K/V-dominated"
        notes.append(f"batch {B}: the model puts K/V traffic at {r['kv_share_unpatched']:.0%} of "
                     f"the unpatched step (reads alone {r['kv_read_share_unpatched']:.0%}): {tag}")
    txt += "\n" + "\n".join(notes)
    txt += (f"\npaper: +{(sec['paper_e2e_speedup_at_0.05'] - 1) * 100:.1f}% end-to-end throughput "
            "at 5% retention (7B models on GPU); e2e here = batch x new tokens / (prefill + "
            "eviction + decode), batch > 1 prefill = batch x the measured batch-1 prefill")
    return txt
