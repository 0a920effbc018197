"""End to end: ``generate()`` with a Hugging Face VLM at several keep ratios and batch sizes."""

from __future__ import annotations

import contextlib
import os
import random
import statistics
import time

import torch

from ..constants import PAD
from .common import fmt, fmt_bytes, table
from .timing import peak_extra_bytes, sync

GEN_ALIASES = {"tiny": "tiny-llava"}


def _available_bytes(device: str) -> int | None:
    try:
        if device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return int(free)
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None


def load_model(model_path, preset, device, dtype, seed, error, layers=None):
    """(model, name, kind): a local checkpoint or an architecture with random weights
    (``layers``: decoder layers of the preset's language model, full width)."""
    if layers is not None and model_path is not None:
        raise error("--layers applies to --preset models only (not to --model checkpoints)")
    if model_path is not None:  # checked before the (slow) transformers import
        if not os.path.isdir(model_path):
            raise error(f"--model {model_path}: not a directory (expected a local Hugging Face "
                        "checkpoint with config.json)")
        if not os.path.isfile(os.path.join(model_path, "config.json")):
            raise error(f"--model {model_path}: not a model (no config.json in it)")
    from .. import testing as tiny

    if model_path is not None:
        import transformers as tf

        try:
            cfg = tf.AutoConfig.from_pretrained(model_path)
        except Exception as e:
            raise error(f"--model {model_path}: cannot read its config ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})")
        cls = tiny.MODEL_CLASSES.get(getattr(cfg, "model_type", None))
        if cls is None:
            raise error(f"--model {model_path}: model type {cfg.model_type!r} is not supported "
                        f"(supported: {', '.join(sorted(tiny.MODEL_CLASSES))})")
        try:
            model = cls.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa")
        except Exception as e:
            raise error(f"--model {model_path}: cannot load the weights ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})")
        model = model.to(device).eval()
        model.generation_config.pad_token_id = model.generation_config.pad_token_id or 0
        return model, os.path.basename(os.path.normpath(model_path)), "checkpoint"
    name = GEN_ALIASES.get(preset or "tiny", preset or "tiny")
    names = tiny.TINY + tiny.PRESETS
    if name not in names:
        raise error(f"unknown preset {preset!r} for generate (choose from tiny, "
                    f"{', '.join(names)})")
    if name == "tiny-llama":
        raise error("tiny-llama is a text-only model: nothing to evict; pick a VLM preset")
    mcfg = _layers_config(name, layers)
    with torch.device("meta"):
        meta = tiny.MODEL_CLASSES[mcfg.model_type](mcfg)
    need = sum(p.numel() for p in meta.parameters()) * torch.empty((), dtype=dtype).element_size()
    del meta
    avail = _available_bytes(device)
    if avail is not None and need > 0.8 * avail:
        raise error(f"preset {name}: its weights need {need / 2**30:.1f} GiB of {dtype} but only "
                    f"{avail / 2**30:.1f} GiB is free on {device}; use a tiny-* preset (or a GPU)")
    if layers is not None:
        return _build_layers(name, layers, seed, dtype, device), f"{name} ({layers} layers)", \
            "random weights"
    return tiny.build(name, seed=seed, dtype=dtype, device=device), name, "random weights"


def _layers_config(name, layers=None):
    """The config of preset ``name``, with ``layers`` decoder layers when given."""
    from .. import testing as tiny

    cfg = tiny.config(name)
    if layers is not None:
        text = cfg.get_text_config()
        text.num_hidden_layers = layers
        if getattr(text, "layer_types", None):
            text.layer_types = text.layer_types[:1] * layers
    return cfg


def _build_layers(name, layers, seed, dtype, device):
    """tgvkv.testing.build(name) with ``layers`` decoder layers in the language model."""
    from .. import testing as tiny

    return tiny.build(name, seed, dtype, device, cfg=_layers_config(name, layers))


def _prompt(model, b: int, kind: str) -> list:
    """One single-image prompt: text prefix, one image, the question (lengths vary per sample so
    that a batch is padded)."""
    big = kind != "tiny"
    return [24 if big else 8, "image", (40 if big else 16) + 3 * (b % 3)]


class _ForwardClock:
    """Forward pre-hook / hook on the top-level model: start and end of each forward call."""

    def __init__(self, model, device):
        self.device = device
        self.spans: list[tuple[float, float]] = []
        self._t0 = None
        self._h = [model.register_forward_pre_hook(self._pre),
                   model.register_forward_hook(self._post)]

    def _pre(self, *a):
        sync(self.device)
        self._t0 = time.perf_counter()

    def _post(self, *a):
        sync(self.device)
        self.spans.append((self._t0, time.perf_counter()))

    def remove(self):
        for h in self._h:
            h.remove()


def _cache_facts(cache) -> dict:
    out = {"cache_bytes": None, "kept_fraction": None}
    if cache is None:
        return out
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        out["cache_bytes"] = int(cache.nbytes())
    else:
        tot = 0
        for layer in getattr(cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    tot += t.numel() * t.element_size()
        out["cache_bytes"] = tot
    res = getattr(cache, "result", None)
    mod = getattr(cache, "modality", None)
    if res is not None and mod is not None:
        n_kept = res[1].to(torch.float64)
        n_real = (mod != PAD).sum(1).to(n_kept.device, torch.float64)
        out["kept_fraction"] = float(n_kept.sum() / (n_real.sum() * n_kept.shape[0]))
    elif cache is not None:
        out["kept_fraction"] = 1.0
    return out


def _generate_once(model, inputs, new_tokens, device, policy, tgvkv_apply):
    """One timed generate(); returns (ttft_s, prefill_s, decode_step_intervals_s, total_s, cache).

    ``decode_step_intervals_s``: end of each decode forward to the end of the next one (the first
    from the end of the prefill forward), the last from the end of the last forward to the end of
    generate(): every second of the decode phase belongs to exactly one interval."""
    from ..hf import output_cache

    ctx = tgvkv_apply(model, policy) if policy is not None else contextlib.nullcontext()
    with ctx as handle:
        clock = _ForwardClock(model, device)
        try:
            sync(device)
            t0 = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, return_dict_in_generate=True)
            sync(device)
            t1 = time.perf_counter()
        finally:
            clock.remove()
        cache = output_cache(out)
    ends = [e for _, e in clock.spans]
    steps = [b - a for a, b in zip(ends, ends[1:])]
    if steps:
        steps[-1] += t1 - ends[-1]  # generate()'s own tail after the last forward
    else:
        steps = [t1 - ends[0]]
    return (ends[0] - t0, clock.spans[0][1] - clock.spans[0][0], steps, t1 - t0, cache)


def run_generate(model_path=None, preset=None, device="cpu", dtype=torch.float32,
                 dtype_name="float32", keep_ratios=(1.0, 0.5, 0.2, 0.1, 0.05), batches=(1,),
                 new_tokens=32, reps=3, seed=0, progress=True, max_batch=False, error=ValueError,
                 progress_factory=None, text_score="all_queries", layers=None) -> dict:
    """End-to-end generate() at several keep ratios and batch sizes (plus the unpatched model).

    Metrics (``reps`` calls per configuration, interleaved across configurations with the order
    reversed every other rep, after one warm-up call each; medians):
    ``ttft_ms`` generate() start to the end of the first forward (prompt + eviction);
    ``prefill_ms`` the first forward alone (eviction included: it runs in its hook);
    ``decode_ms_per_step`` / ``decode_tok_s`` the median over every decode step of every call of
    the interval from the end of one forward to the end of the next (generation overheads
    included; the last step ends with generate()), ``batch`` tokens per step;
    ``decode_ms_per_step_mean`` the mean over calls of the mean step;
    ``decode_speedup_paired`` the median over reps of (the unpatched call's median step / this
    configuration's median step in the same rep): each ratio compares calls a few hundred ms
    apart, so the slow phases of a shared machine (steps 20-40% slower for seconds at a time,
    seen on the 2-core VMs) cancel instead of landing on one configuration; with
    ``decode_speedup_paired_ci95``, a bootstrap 95% interval of that median (2,000 resamples of
    the reps, seeded): a ratio inside it is what this run can tell apart from noise;
    ``cache_bytes`` bytes held by the KV cache after generate(); ``peak_bytes`` peak extra memory
    of one generate() call (see :func:`peak_extra_bytes`).
    """
    if new_tokens < 2:
        raise error("--new-tokens must be >= 2 (decode speed needs at least one decode step)")
    model, name, kind = load_model(model_path, preset, device, dtype, seed, error, layers)
    from .. import testing as tiny
    from ..hf import apply as tgvkv_apply
    from ..policy import TGVKV

    backend = TGVKV().ops.__name__  # which op implementation the policy calls
    configs = [None] + [float(k) for k in keep_ratios]
    bar = progress_factory(len(configs) * len(batches), "generate") if progress_factory else None
    rows = []
    prompt_tokens = None
    for B in batches:
        inputs = tiny.make_inputs(model, [_prompt(model, b, "tiny" if name.startswith("tiny") else
                                                  "full") for b in range(B)], seed=seed)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        policies = {kr: TGVKV(keep_ratio=kr, text_score=text_score) if kr is not None else None
                    for kr in configs}
        for kr in configs:  # one warm-up call per configuration
            _generate_once(model, inputs, 2, device, policies[kr], tgvkv_apply)
        # Interleaved reps, the order reversed every other rep (off, a, b, b, a, off, off, a, ...):
        # slow drifts of the machine (clock, neighbours on a shared host), a drift within a cycle
        # and the position in it (e.g. right after the unpatched run) hit every configuration
        # alike instead of the one that happened to run during them; the ratios are taken within
        # one run.
        res = {kr: [] for kr in configs}
        for rep in range(reps):
            for kr in (configs if rep % 2 == 0 else configs[::-1]):
                r = _generate_once(model, inputs, new_tokens, device, policies[kr], tgvkv_apply)
                res[kr].append(r[:4] + ((r[4] if len(res[kr]) == reps - 1 else None),))
        full_bytes = None
        rep_medians = {}
        for kr in configs:
            policy = policies[kr]
            rr = res.pop(kr)
            ttft = statistics.median(r[0] for r in rr)
            pre = statistics.median(r[1] for r in rr)
            # pooled median of every decode step of every rep: one preempted step does not move it
            dec = statistics.median(s for r in rr for s in r[2])
            dec_mean = statistics.mean(sum(r[2]) / len(r[2]) for r in rr)
            rep_medians[kr] = [statistics.median(r[2]) for r in rr]
            facts = _cache_facts(rr[-1][4])
            del rr
            peak, method = peak_extra_bytes(
                lambda: _generate_once(model, inputs, new_tokens, device, policy, tgvkv_apply)[4],
                device)
            if kr is None:
                full_bytes = facts["cache_bytes"]
            rows.append({"keep_ratio": kr, "batch": B, "prompt_tokens": prompt_tokens,
                         "ttft_ms": ttft * 1e3, "prefill_ms": pre * 1e3,
                         "decode_ms_per_step": dec * 1e3, "decode_tok_s": B / dec,
                         "decode_ms_per_step_mean": dec_mean * 1e3,
                         "cache_bytes": facts["cache_bytes"], "cache_bytes_full": full_bytes,
                         "kept_fraction": facts["kept_fraction"], "peak_bytes": peak,
                         "peak_method": method,
                         **_paired_speedup(rep_medians.get(None), rep_medians[kr])})
            if bar is not None:
                bar.set_postfix_str(f"batch {B} keep {kr if kr is not None else 'off'}")
                bar.update(1)
    if bar is not None:
        bar.close()
    base = {r["batch"]: r for r in rows if r["keep_ratio"] is None}
    for r in rows:
        b = base.get(r["batch"])
        r["decode_speedup_vs_unpatched"] = r["decode_tok_s"] / b["decode_tok_s"] if b else None
        r["ttft_ratio_vs_unpatched"] = r["ttft_ms"] / b["ttft_ms"] if b else None
    sec = {"model": name, "model_kind": kind, "dtype": dtype_name, "new_tokens": new_tokens,
           "prompt_tokens": prompt_tokens, "backend": backend, "reps": reps,
           "text_score": text_score, "rows": rows,
           "prompt": "random text tokens + one random image (tgvkv.testing.make_inputs); batch "
                     "samples differ in question length (left padding)"}
    if max_batch:
        if not device.startswith("cuda"):
            raise error("--max-batch needs a CUDA device (CPU memory is not bounded the same way)")
        sec["max_batch"] = {
            "unpatched": _max_batch(model, None, new_tokens, device, tgvkv_apply, seed, name),
            f"keep_ratio={min(keep_ratios):g}": _max_batch(
                model, TGVKV(keep_ratio=float(min(keep_ratios)), text_score=text_score),
                new_tokens, device, tgvkv_apply,
                seed, name)}
    return sec


def _paired_speedup(base, mine, resamples=2000, seed=0) -> dict:
    """Median over reps of base[i] / mine[i] (per-rep median decode steps of the unpatched model
    and of a configuration) and its bootstrap 95% interval; see :func:`run_generate`."""
    if not base or not mine:
        return {"decode_speedup_paired": None, "decode_speedup_paired_ci95": None}
    ratios = [b / m for b, m in zip(base, mine)]
    rng = random.Random(seed)
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios)))
                  for _ in range(resamples))
    return {"decode_speedup_paired": statistics.median(ratios),
            "decode_speedup_paired_ci95": [boot[int(0.025 * resamples)],
                                           boot[int(0.975 * resamples) - 1]]}


def _max_batch(model, policy, new_tokens, device, tgvkv_apply, seed, name, cap=4096):
    """Largest batch whose generate() runs without CUDA OOM (doubling, then bisection)."""
    from .. import testing as tiny

    def fits(B):
        try:
            inputs = tiny.make_inputs(model, [_prompt(model, b, "tiny" if name.startswith("tiny")
                                                      else "full") for b in range(B)], seed=seed)
            _generate_once(model, inputs, new_tokens, device, policy, tgvkv_apply)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        except RuntimeError as e:  # some kernels report OOM as a plain RuntimeError
            if "out of memory" in str(e).lower():
                return False
            raise
        finally:
            torch.cuda.empty_cache()

    lo, hi = 0, 1
    while hi <= cap and fits(hi):
        lo, hi = hi, hi * 2
    if hi > cap:
        return {"max_batch": lo, "capped_at": cap}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"max_batch": lo}


def _fmt_paired(r) -> str:
    p, ci = r.get("decode_speedup_paired"), r.get("decode_speedup_paired_ci95")
    if p is None or r["keep_ratio"] is None:
        return "-"
    return f"{p:.2f}x ({ci[0]:.2f}-{ci[1]:.2f})"


def generate_table(sec: dict) -> str:
    title = (f"generate: {sec['model']} ({sec['model_kind']}, {sec['dtype']}), prompt "
             f"{sec['prompt_tokens']} tokens, {sec['new_tokens']} new tokens, ops backend "
             f"{sec['backend']}, text_score {sec.get('text_score', 'guidance')}")
    hdr = ["keep", "batch", "TTFT ms", "prefill ms", "decode ms/step", "decode tok/s",
           "vs unpatched", "paired (95% CI)", "kept", "KV cache", "peak extra"]
    out = []
    for r in sec["rows"]:
        out.append(["off (unpatched)" if r["keep_ratio"] is None else f"{r['keep_ratio']:g}",
                    str(r["batch"]), fmt(r["ttft_ms"], ".1f"), fmt(r["prefill_ms"], ".1f"),
                    fmt(r["decode_ms_per_step"], ".2f"), fmt(r["decode_tok_s"], ".1f"),
                    fmt(r["decode_speedup_vs_unpatched"], ".2f") + "x", _fmt_paired(r),
                    fmt(r["kept_fraction"], ".3f"), fmt_bytes(r["cache_bytes"]),
                    fmt_bytes(r["peak_bytes"])])
    txt = table(hdr, out, title)
    if sec["model"].startswith("tiny"):
        txt += ("\nnote: a tiny model's decode step is Python/dispatch overhead, not KV-cache "
                "reads, so eviction shows its memory effect here but not a throughput gain; that "
                "needs a cache that dominates the step (long prompts, large batches, full-size "
                "models, GPU)")
    if sec.get("max_batch"):
        txt += "\nlargest batch that fits: " + ", ".join(
            f"{k}: {v['max_batch']}" for k, v in sec["max_batch"].items())
    return txt

