"""Accuracy harness: a Hugging Face VLM on a VQA set under each eviction policy and keep ratio.

Protocol (the paper's, SPEC §6, scaled down): batch size 1, greedy decoding, at most
``max_new_tokens`` (32) new tokens, the model's chat template with the image(s) first and the
question after them (so the question is the guidance text TGV-KV grounds on), the answer read
from the generation by :func:`tgvkv.eval.metrics.extract_answer`, lmms-eval metrics.

The full-cache model is run once (policy ``"full"``); every other policy runs at every keep
ratio through ``with tgvkv.apply(model, policy): model.generate(...)``. ``keep_ratio == 1.0``
must reproduce the full-cache predictions exactly (the wiring's passthrough); the harness
counts how many predictions differ from the full run (``n_diff_vs_full``) for every cell.
"""

from __future__ import annotations

import os
import platform
import sys
import time

import torch

from .baselines import POLICIES, make_policy
from .datasets import load_dataset
from .metrics import METRICS, extract_answer

__all__ = ["run", "format_table", "default_model_path", "subject_path", "load_model",
           "DEFAULT_KEEP_RATIOS", "DEFAULT_POLICIES", "SUBJECTS", "DEFAULT_SUBJECT"]

DEFAULT_KEEP_RATIOS = (1.0, 0.5, 0.2, 0.1, 0.05)
DEFAULT_POLICIES = POLICIES


# the committed subjects (tgvkv/data/<name>) and the built-in dataset each was trained for
SUBJECTS = {
    "tiny-llava-easyvqa": "easy-vqa",    # 3 layers, 64 image tokens: the fast test subject
    # 8 layers, 256 image tokens, a system text before the image, questions about one cell of
    # a 2x2 grid: `python scripts/train_tiny_vlm.py --task grid` (90.4% full cache)
    "tiny-llava-grid": "easy-vqa-grid",
}
# the subject of `tgvkv-bench accuracy`: the one shaped like the paper's models
DEFAULT_SUBJECT = "tiny-llava-grid"


def subject_path(name: str = DEFAULT_SUBJECT) -> str:
    """The folder of a committed subject (:data:`SUBJECTS`): ``tgvkv/data/<name>``."""
    if name not in SUBJECTS:
        raise ValueError(f"unknown subject {name!r}; one of {', '.join(SUBJECTS)}")
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                        name)


def default_model_path() -> str:
    """The committed tiny LLaVA trained on easy-VQA (``tgvkv/data/tiny-llava-easyvqa``): the
    default of :func:`run` (``tgvkv-bench accuracy`` defaults to :data:`DEFAULT_SUBJECT`)."""
    return subject_path("tiny-llava-easyvqa")


def load_model(model=None, device="cpu", dtype=None):
    """(model, processor, name) from a local path (default: the tiny model) or a
    ``(model, processor)`` pair. Loading never touches the network (``local_files_only``)."""
    if isinstance(model, (tuple, list)):  # (model, processor) or load_model's own triple
        m, p = model[0], model[1]
        name = model[2] if len(model) > 2 else type(m).__name__
        return m.to(device).eval(), p, name
    path = default_model_path() if model is None else str(model)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if dtype is None:
        dtype = torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    m = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dtype)
    return m.to(device).eval(), processor, path


def _prompt(processor, question: str, n_images: int) -> str:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    tok = getattr(processor, "image_token", "<image>")
    return f"USER: {(tok + chr(10)) * n_images}{question} ASSISTANT:"


def _prepare(processor, samples, device):
    out = []
    for s in samples:
        imgs = s["image"] if isinstance(s["image"], list) else [s["image"]]
        text = _prompt(processor, s["question"], len(imgs))
        inputs = processor(text=[text], images=imgs, return_tensors="pt")
        out.append({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()})
    return out


def _generate(model, processor, inputs, max_new_tokens):
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1)
    new = out[0, inputs["input_ids"].shape[1]:]
    tok = getattr(processor, "tokenizer", processor)
    return tok.decode(new, skip_special_tokens=True)


def _score(preds, samples):
    rows = {name: [] for name in METRICS}
    primary = []
    for p, s in zip(preds, samples):
        a = extract_answer(p)
        for name, fn in METRICS.items():
            rows[name].append(fn(a, s["answers"]))
        primary.append(METRICS[s["metric"]](a, s["answers"]))
    n = max(1, len(samples))
    res = {name: sum(v) / n for name, v in rows.items()}
    res["accuracy"] = sum(primary) / n
    return res


def _versions(device):
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(device),
            "threads": torch.get_num_threads(), "platform": platform.platform()}
    try:
        import tgvkv

        info["tgvkv"] = getattr(tgvkv, "__version__", "unknown")
        info["tgvkv_ops_backend"] = tgvkv.TGVKV().ops.__name__
    except Exception as e:  # pragma: no cover - reported, not hidden
        info["tgvkv_import_error"] = repr(e)
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(model=None, dataset="easy-vqa", policies=None, keep_ratios=None, limit=None,
        device="cpu", progress=True, max_new_tokens=32, keep_predictions=False,
        text_score="all_queries"):
    """Accuracy of ``policies`` x ``keep_ratios`` on a VQA set.

    Parameters
    ----------
    model : None (the committed tiny easy-VQA LLaVA), a local model folder, or a
        ``(model, processor)`` pair (or the ``(model, processor, name)`` of :func:`load_model`).
    dataset : "easy-vqa" (fixed 255-question test subset: every 38th test question),
        "easy-vqa-full", "easy-vqa-grid" (500 questions on 2x2 grids of test images, for the
        ``tiny-llava-grid`` subject), the path of a JSONL file (format:
        :mod:`tgvkv.eval.datasets`), or a list of sample dicts.
    policies : names from :data:`tgvkv.eval.baselines.POLICIES` (default: all). "full" is always
        run (it is the reference of "% of full").
    keep_ratios : default (1.0, 0.5, 0.2, 0.1, 0.05).
    limit : use only the first ``limit`` samples.
    device : "cpu" or "cuda[:i]". progress : print one line per (policy, keep ratio) to stderr.
    max_new_tokens : generation cap (32, as in the paper's image tasks).
    keep_predictions : include every raw prediction in the result.
    text_score : "all_queries" (default) or "guidance": the text ranking of the TGV-KV rows
        (``tgvkv-guidance-text`` is always "guidance"); recorded in the result.

    Returns
    -------
    dict with ``model``, ``dataset``, ``n_samples``, ``primary_metric``, ``policies``,
    ``keep_ratios``, ``full`` (metrics of the full cache), ``results[policy][str(keep_ratio)]``
    (``accuracy``, every metric, ``pct_of_full``, ``n_diff_vs_full``, ``seconds``), ``env``,
    ``protocol``.
    """
    policies = list(DEFAULT_POLICIES if policies is None else policies)
    if text_score not in ("all_queries", "guidance"):
        raise ValueError(f"text_score must be 'all_queries' or 'guidance', got {text_score!r}")
    for p in policies:
        if p not in POLICIES:
            raise ValueError(f"unknown policy {p!r}; one of {', '.join(POLICIES)}")
    keep_ratios = [float(k) for k in (DEFAULT_KEEP_RATIOS if keep_ratios is None else keep_ratios)]
    for k in keep_ratios:
        if not 0.0 < k <= 1.0:
            raise ValueError(f"keep ratios must be in (0, 1], got {k}")
    if "full" not in policies:
        policies = ["full"] + policies

    m, processor, name = load_model(model, device)
    samples = load_dataset(dataset, limit)
    if not samples:
        raise ValueError(f"dataset {dataset!r} has no samples (limit={limit})")
    inputs = _prepare(processor, samples, device)
    metrics_used = sorted({s["metric"] for s in samples})

    def log(msg):
        if progress:
            print(msg, file=sys.stderr, flush=True)

    def predict(policy):
        preds = []
        if policy is None:
            for x in inputs:
                preds.append(_generate(m, processor, x, max_new_tokens))
            return preds
        import tgvkv

        with tgvkv.apply(m, policy):
            for x in inputs:
                preds.append(_generate(m, processor, x, max_new_tokens))
        return preds

    t = time.time()
    full_preds = predict(None)
    full = _score(full_preds, samples)
    full["seconds"] = round(time.time() - t, 2)
    log(f"[tgvkv.eval] full: accuracy {full['accuracy']:.4f} ({len(samples)} samples, "
        f"{full['seconds']:.1f}s)")
    results = {}
    all_preds = {"full": full_preds}
    for pname in policies:
        if pname == "full":
            continue
        results[pname] = {}
        for kr in keep_ratios:
            t = time.time()
            preds = predict(make_policy(pname, kr, text_score))
            r = _score(preds, samples)
            r["pct_of_full"] = (100.0 * r["accuracy"] / full["accuracy"]
                                if full["accuracy"] > 0 else float("nan"))
            r["n_diff_vs_full"] = sum(a != b for a, b in zip(preds, full_preds))
            r["seconds"] = round(time.time() - t, 2)
            results[pname][str(kr)] = r
            if keep_predictions:
                all_preds[f"{pname}@{kr}"] = preds
            log(f"[tgvkv.eval] {pname} @ {kr}: accuracy {r['accuracy']:.4f} "
                f"({r['pct_of_full']:.1f}% of full, {r['n_diff_vs_full']} predictions differ, "
                f"{r['seconds']:.1f}s)")
    out = {
        "model": name, "dataset": dataset if isinstance(dataset, str) else "custom",
        "n_samples": len(samples),
        "primary_metric": metrics_used[0] if len(metrics_used) == 1 else "mixed:" + ",".join(metrics_used),
        "policies": policies, "keep_ratios": keep_ratios, "text_score": text_score,
        "full": full, "results": results,
        "env": _versions(device),
        "protocol": {"batch_size": 1, "decoding": "greedy", "max_new_tokens": max_new_tokens,
                     "answer_extraction": "tgvkv.eval.metrics.extract_answer"},
    }
    if keep_predictions:
        out["predictions"] = all_preds
        out["sample_ids"] = [s["id"] for s in samples]
    return out


def format_table(result) -> str:
    """Markdown table: one row per policy, one column per keep ratio, cells
    ``accuracy % (% of full-KV accuracy)``."""
    krs = result["keep_ratios"]
    full = result["full"]["accuracy"]
    head = ("| policy | " + " | ".join(f"keep {k:g}" for k in krs) + " |\n"
            "|---|" + "---|" * len(krs) + "\n")
    lines = [f"| full | " + " | ".join(f"{100 * full:.1f} (100%)" for _ in krs) + " |"]
    for p in result["policies"]:
        if p == "full":
            continue
        cells = []
        for k in krs:
            r = result["results"][p][str(float(k))]
            cells.append(f"{100 * r['accuracy']:.1f} ({r['pct_of_full']:.1f}%)")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    foot = (f"\n{result['primary_metric']} (%) on {result['n_samples']} samples of "
            f"{result['dataset']}; in parentheses: % of the full-KV accuracy.")
    return head + "\n".join(lines) + "\n" + foot
