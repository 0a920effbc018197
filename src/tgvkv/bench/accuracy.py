"""Accuracy: the eval harness (:mod:`tgvkv.eval`) as a ``tgvkv-bench`` section."""

from __future__ import annotations

import os

QUICK_ACCURACY = {"policies": ["tgvkv"], "keep_ratios": [1.0, 0.2, 0.05], "limit": 24,
                  "max_new_tokens": 8}
# The subject of the argument-less run (named in its table): the default subject, since it keeps
# the quick accuracy part well under two minutes (4 x 24 generate() calls of at most 8 tokens:
# 2.5 s on a quiet 2-core EPYC Zen 4, the whole argument-less run 13.6 s; 33 s with a training
# run on both cores).
QUICK_SUBJECT = "tiny-llava-grid"
# the keep ratios of `tgvkv-bench accuracy` (the paper's budgets); keep 1.0, the bit-exact
# passthrough check, is one more full pass (--keep-ratio 1.0 0.5 ...) and is tested instead
ACCURACY_KEEP_RATIOS = (0.5, 0.2, 0.1, 0.05)


def run_accuracy(model=None, dataset=None, policies=None, keep_ratios=None, limit=None,
                 max_new_tokens=32, device="cpu", quick=False, progress=True,
                 error=ValueError, text_score="all_queries", subject=None) -> dict:
    """The eval harness (:func:`tgvkv.eval.run`) plus a flat ``rows`` list and its table.

    ``model``: a local checkpoint; else the committed ``subject`` (default
    :data:`tgvkv.eval.DEFAULT_SUBJECT`; :data:`QUICK_SUBJECT` with ``quick``).
    ``dataset``: default the subject's own (:data:`tgvkv.eval.SUBJECTS`), ``easy-vqa`` for a
    ``model`` path. ``quick``: the subset of the argument-less run (:data:`QUICK_ACCURACY`),
    unless overridden.
    """
    try:
        from .. import eval as tgvkv_eval
    except ImportError as e:
        raise error(f"the accuracy harness (tgvkv.eval) cannot be imported: {e}")
    if model is not None and subject is not None:
        raise error("give --model PATH or --subject NAME, not both")
    if quick:
        policies = policies or QUICK_ACCURACY["policies"]
        keep_ratios = keep_ratios or QUICK_ACCURACY["keep_ratios"]
        limit = limit or QUICK_ACCURACY["limit"]
        max_new_tokens = QUICK_ACCURACY["max_new_tokens"]
    keep_ratios = keep_ratios or list(ACCURACY_KEEP_RATIOS)
    if model is None:
        subject = subject or (QUICK_SUBJECT if quick else tgvkv_eval.DEFAULT_SUBJECT)
        if subject not in tgvkv_eval.SUBJECTS:
            raise error(f"unknown subject {subject!r} (choose from "
                        f"{', '.join(tgvkv_eval.SUBJECTS)})")
        if not os.path.isdir(tgvkv_eval.subject_path(subject)):
            raise error(f"the eval subject {subject} ({tgvkv_eval.subject_path(subject)}) is "
                        "not installed; pass --model PATH")
        dataset = dataset or tgvkv_eval.SUBJECTS[subject]
        model = tgvkv_eval.subject_path(subject)
    else:
        dataset = dataset or "easy-vqa"
    for p in policies or []:
        if p not in tgvkv_eval.POLICIES:
            raise error(f"unknown policy {p!r} (choose from {', '.join(tgvkv_eval.POLICIES)})")
    if not os.path.isdir(str(model)):
        raise error(f"--model {model}: not a directory (expected a local Hugging Face checkpoint)")
    try:
        res = tgvkv_eval.run(model=model, dataset=dataset, policies=policies,
                             keep_ratios=keep_ratios, limit=limit, device=device,
                             progress=progress, max_new_tokens=max_new_tokens,
                             text_score=text_score)
    except ImportError as e:
        raise error(f"the accuracy harness needs the eval extra: {e}")
    except (ValueError, OSError, FileNotFoundError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise error(f"accuracy: {msg}")
    rows = [{"policy": "full", "keep_ratio": None, "accuracy": res["full"]["accuracy"],
             "pct_of_full": 100.0, "n_diff_vs_full": 0, "seconds": res["full"].get("seconds")}]
    for pol, per in res["results"].items():
        for kr, r in per.items():
            rows.append({"policy": pol, "keep_ratio": float(kr), "accuracy": r["accuracy"],
                         "pct_of_full": r.get("pct_of_full"),
                         "n_diff_vs_full": r.get("n_diff_vs_full"), "seconds": r.get("seconds")})
    res = dict(res)
    res["rows"] = rows
    res["metric"] = "accuracy"
    res["subject"] = subject
    who = f"subject {subject} ({res['model']})" if subject else res["model"]
    res["table"] = (f"accuracy: {who} on {res['dataset']} ({res['n_samples']} samples, "
                    f"max {max_new_tokens} new tokens)\n" + tgvkv_eval.format_table(res))
    return res

