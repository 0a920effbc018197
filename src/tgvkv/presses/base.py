"""What the baselines share: uniform per-layer budgets, one ranking class, many-row attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import torch_impl
from ..constants import PAD
from ..policy import Policy, ops_field, single_class


@dataclass
class Baseline(Policy):
    """Base of the baselines: uniform per-layer budgets (share 1/L) and text and vision slots
    ranked in one class (no text priority). Validated when built.

    Parameters
    ----------
    keep_ratio : kappa in (0, 1], the average kept fraction of the prompt per layer.
    n_sink : the first ``n_sink`` real slots (and the last prompt slot) are never evicted.
    ops : the op implementation (default :mod:`tgvkv.ops`), keyword only.
    """

    keep_ratio: float = 1.0
    n_sink: int = 4
    ops: Any = ops_field()

    def __post_init__(self):
        self.validate()

    def budgets(self, stats, q_pos, modality):
        return self.ops.layer_budgets(torch.ones_like(stats), q_pos, modality,
                                      float(self.keep_ratio), "mass", False, self.n_sink)

    def select(self, scores, keep, q_pos, modality):
        return self.ops.select_keep(scores, keep, q_pos, single_class(modality), self.n_sink)


def rows_attention(q, k, scale, rows, modality):
    """Causal head-averaged fp32 attention of the query rows ``rows`` [R] (same for the batch).

    q [B, Hq, N, D], k [B, Hkv, N, D] -> [B, R, N]; pad columns and non-causal entries are 0.
    Computed one query head at a time so memory stays O(R * N)
    (:func:`tgvkv.torch_impl.head_averaged_attention` with ``per_head=True``).
    """
    allowed = torch_impl.causal_allowed(rows.to(k.device), modality.to(k.device))  # [B, R, N]
    return torch_impl.head_averaged_attention(q[:, :, rows], k,
                                              torch_impl.bias_from_allowed(allowed), scale,
                                              per_head=True)


def real_rank_from_end(modality):
    """[B, N] int64: 0 for the last real slot, 1 for the one before, ...; large for pads."""
    real = (modality != PAD).long()
    from_end = real.flip(-1).cumsum(-1).flip(-1) - 1
    return torch.where(real.bool(), from_end, torch.full_like(from_end, 1 << 40))


def constant_stats(modality, device):
    """``[B, 2]`` ones: the baselines' budgets do not read the statistics."""
    return torch.ones(modality.shape[0], 2, device=device)
