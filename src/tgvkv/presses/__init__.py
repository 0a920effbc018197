"""Other eviction policies (baselines, ablations) as importable dataclasses, and the name registry
of the accuracy harness (``from tgvkv.presses import SnapKV``; ``make_policy("snapkv", 0.2)``).

Every policy runs on the same wiring (:func:`tgvkv.apply` and the :class:`tgvkv.Policy` hooks:
``layer_scores`` during prefill, ``budgets`` / ``select`` / compaction after it, ``decode_step``
after each generated token), so they differ only in *what* they keep.

=================  ========================================================================
name               what it keeps
=================  ========================================================================
``full``           everything (no patching at all; the reference row)
``tgvkv``          TGV-KV, SPEC defaults (:class:`tgvkv.TGVKV`)
``tgvkv-no-tvb``   TGV-KV with uniform per-layer budgets (``uniform_budgets=True``)
``tgvkv-no-twr``   TGV-KV with unweighted guidance-text attention for vision (``text_weighting=False``)
``tgvkv-no-tpr``   TGV-KV without text priority (``text_priority=False``)
``tgvkv-guidance-text``  TGV-KV with text ranked by the guidance rows only (``text_score="guidance"``)
``random``         uniformly random slots (seeded), uniform budgets; decode: a random candidate
``streamingllm``   the ``n_sink`` attention sinks + the most recent slots; decode: the oldest
``h2o``            heavy hitters (attention column sums over *all* prompt queries) for half of
                   the budget + the most recent half; decode: the lowest accumulated attention
``snapkv``         attention of the last ``window`` prompt queries, average-pooled over
                   ``kernel`` neighbours within the slots before the window (as the SnapKV
                   reference code and kvpress); the window itself is always kept; uniform
                   budgets; no decode-time eviction (SnapKV compresses the prompt only)
``pyramidkv``      SnapKV's scores with pyramidal budgets (linearly decreasing with depth,
                   bottom layer ``beta``-fold... see :class:`PyramidKV`); no decode eviction
=================  ========================================================================

Common to all (the shared wiring): the first ``n_sink`` real slots and the last prompt slot are
never evicted; ``keep_ratio`` is the average kept fraction of the prompt per layer; a sample
without vision tokens or without text after its last image is not evicted (the harness only feeds
image + question prompts, so this never triggers there). Baselines rank text and vision slots in
one class (no text priority). Where a baseline keeps evicting while decoding, the per-layer target
is a constant fraction ``keep_ratio`` of the tokens seen so far, as for TGV-KV.
"""

from __future__ import annotations

from .ablations import ABLATIONS, tgvkv_ablation
from .base import Baseline
from .h2o import H2O
from .pyramidkv import PyramidKV
from .random import RandomPolicy
from .snapkv import SnapKV
from .streamingllm import StreamingLLM

__all__ = ["ABLATIONS", "BASELINES", "POLICIES", "Baseline", "H2O", "PyramidKV", "RandomPolicy",
           "SnapKV", "StreamingLLM", "make_policy", "policy_class", "policy_names",
           "tgvkv_ablation"]

BASELINES = {"random": RandomPolicy, "streamingllm": StreamingLLM, "h2o": H2O,
             "snapkv": SnapKV, "pyramidkv": PyramidKV}

POLICIES = ("full", "tgvkv", "tgvkv-no-tvb", "tgvkv-no-twr", "tgvkv-no-tpr",
            "tgvkv-guidance-text", "random", "streamingllm", "h2o", "snapkv", "pyramidkv")


def policy_names():
    return list(POLICIES)


def policy_class(name: str):
    """The :class:`tgvkv.Policy` subclass of a baseline (``random``, ``streamingllm``, ``h2o``,
    ``snapkv``, ``pyramidkv``), for settings other than :func:`make_policy`'s defaults
    (``window``, ``kernel``, ``beta``, ``n_sink``, ...). The classes are importable by name too."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; one of {', '.join(BASELINES)}")
    return BASELINES[name]


def make_policy(name: str, keep_ratio: float, text_score: str | None = None):
    """The policy object of ``name`` at ``keep_ratio``; ``None`` for ``"full"`` (no patching).
    ``text_score``: that of the TGV-KV rows (default: TGVKV's, "all_queries"; the
    ``tgvkv-guidance-text`` row is always "guidance")."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; one of {', '.join(POLICIES)}")
    if name == "full":
        return None
    if name in ABLATIONS:
        kw = {} if text_score is None else {"text_score": text_score}
        return tgvkv_ablation(name, keep_ratio, **kw)
    return policy_class(name)(keep_ratio=keep_ratio)
