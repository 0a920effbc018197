"""PyramidKV (Cai et al., 2024): SnapKV's selection with pyramidal layer budgets."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..constants import PAD
from ..policy import check_number
from .snapkv import SnapKV

__all__ = ["PyramidKV"]


@dataclass
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., 2024): SnapKV's selection with pyramidal layer budgets.

    The total budget ``L * keep_ratio * N`` is split arithmetically across layers, largest at
    the bottom: layer ``l`` gets ``min + (max - min) * (L - 1 - l) / (L - 1)`` with
    ``min = total / (beta * L)`` (``beta = 20`` as in the paper) and ``max`` such that the sum
    is the total. As in the reference code (and kvpress), ``max`` is capped at
    ``N - window`` and ``min`` raised to keep the total (without the cap a bottom layer above
    ``N`` was clipped and the total fell short of ``keep_ratio``); when even that cannot hold
    the total (``max < min``) the budgets are uniform. Unlike the reference code and kvpress
    there is no fallback to uniform budgets when ``min < window`` (short prompts). Each layer
    keeps at least ``n_sink + 1`` and at most ``N``.
    """

    beta: float = 20.0

    def validate(self) -> None:
        super().validate()
        check_number(self, "beta", 0.0, math.inf, lo_open=True, hi_open=True)

    def budgets(self, stats, q_pos, modality):
        keep, frac = super().budgets(stats, q_pos, modality)  # uniform (handles no-evict)
        L, B = keep.shape
        if L < 2 or float(self.keep_ratio) >= 1.0:
            return keep, frac
        n_real = (modality != PAD).sum(1).to(keep.device)  # [B]
        evicting = (keep < n_real[None, :]).any(0)  # samples the uniform rule evicts
        total = float(self.keep_ratio) * n_real.double() * L  # [B]
        kmin = total / (self.beta * L)
        kmax = 2 * total / L - kmin
        cap = (n_real - self.window).double()
        capped = kmax >= cap  # the reference code's cap: the bottom layer keeps <= N - window
        kmax = torch.where(capped, cap, kmax)
        kmin = torch.where(capped, 2 * total / L - cap, kmin)
        pyramid = evicting & (kmax >= kmin)  # else the total cannot be held: stay uniform
        l = torch.arange(L, dtype=torch.float64, device=keep.device)[:, None]
        k_l = kmin[None] + (kmax - kmin)[None] * (L - 1 - l) / (L - 1)
        k_l = k_l.round().long().clamp(min=self.n_sink + 1)
        k_l = torch.minimum(k_l, n_real[None].expand_as(k_l))
        keep = torch.where(pyramid[None], k_l, keep)
        return keep, frac
