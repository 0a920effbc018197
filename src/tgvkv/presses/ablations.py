"""The TGV-KV ablations: :class:`tgvkv.TGVKV` with one of its three components switched off."""

from __future__ import annotations

from ..policy import TGVKV

__all__ = ["ABLATIONS", "tgvkv_ablation"]

# name -> the TGVKV switches of that ablation
ABLATIONS = {
    "tgvkv": {},
    "tgvkv-no-tvb": {"uniform_budgets": True},   # uniform per-layer budgets instead of TVB
    "tgvkv-no-twr": {"text_weighting": False},   # unweighted guidance-text attention for vision
    "tgvkv-no-tpr": {"text_priority": False},    # text and vision compete on score alone
    # text ranked by the guidance rows only (cheaper; tgvkv's default before all_queries)
    "tgvkv-guidance-text": {"text_score": "guidance"},
}


def tgvkv_ablation(name: str, keep_ratio: float, **kw) -> TGVKV:
    """``TGVKV(keep_ratio=keep_ratio, **ABLATIONS[name], **kw)`` (the variant's own switches win
    over ``kw``: ``tgvkv-guidance-text`` stays "guidance" whatever ``text_score`` is given)."""
    if name not in ABLATIONS:
        raise ValueError(f"unknown TGV-KV variant {name!r}; one of {', '.join(ABLATIONS)}")
    return TGVKV(keep_ratio=keep_ratio, **{**kw, **ABLATIONS[name]})
