"""SnapKV (Li et al., 2024): votes of an observation window of the last prompt queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..constants import PAD
from ..policy import fail_field, check_int
from .base import Baseline, constant_stats, rows_attention

__all__ = ["SnapKV"]


@dataclass
class SnapKV(Baseline):
    """SnapKV (Li et al., 2024): votes of an observation window of the last prompt queries.

    Score of a slot before the window = head-averaged attention it gets from the last
    ``window`` prompt queries, smoothed by a 1-D average pool of width ``kernel`` (zero-padded
    at the ends) over the slots *before* the window only, as in the SnapKV reference code (its
    default pooling) and kvpress: the window's own columns never leak into the pool. The
    window is always kept (within budget).
    Budgets are uniform across layers; no eviction while decoding.
    """

    window: int = 8
    kernel: int = 5
    decode_evict = False  # SnapKV compresses the prompt only (a class constant, not a field)

    def validate(self) -> None:
        super().validate()
        check_int(self, "window", 1, None, "an int >= 1")  # window 0 would be real[-0:], all slots
        check_int(self, "kernel", 1, None, "an odd int >= 1")
        if self.kernel % 2 == 0:
            fail_field(self, "kernel", "an odd int >= 1", self.kernel)

    def layer_scores(self, layer_idx, q, k, q_pos, modality, scale):
        B, N = modality.shape
        s = torch.zeros(B, N, device=k.device)
        for b in range(B):  # the window is per sample (padding differs)
            real = torch.nonzero(modality[b] != PAD).flatten().to(k.device)
            rows, prefix = real[-self.window:], real[:-self.window]
            if prefix.numel():
                A = rows_attention(q[b:b + 1], k[b:b + 1], scale, rows, modality[b:b + 1])
                col = A.sum(1)[:, prefix]  # [1, P]: votes for the slots before the window
                s[b, prefix] = torch.nn.functional.avg_pool1d(
                    col[:, None], self.kernel, 1, self.kernel // 2)[0, 0]
            s[b, rows] = 1e30  # observation window always kept
        return s, constant_stats(modality, k.device)
