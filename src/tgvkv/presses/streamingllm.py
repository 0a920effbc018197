"""StreamingLLM (Xiao et al., 2024): attention sinks + a window of the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..torch_impl import evict_lowest_
from .base import Baseline, constant_stats

__all__ = ["StreamingLLM"]


@dataclass
class StreamingLLM(Baseline):
    """Attention sinks + a window of the most recent tokens (Xiao et al., 2024).

    Prefill: score = position (the newest slots win), uniform budgets. Decode: the oldest
    candidate goes (``decode_evict=False``: no decode-time eviction).
    """

    decode_evict: bool = True

    def layer_scores(self, layer_idx, q, k, q_pos, modality, scale):
        B, N = modality.shape
        s = torch.arange(N, dtype=torch.float32, device=k.device).expand(B, N).clone()
        return s, constant_stats(modality, k.device)

    def select(self, scores, keep, q_pos, modality):
        keep_idx, n_prot = super().select(scores, keep, q_pos, modality)
        return keep_idx, torch.ones_like(n_prot)  # only the newest token is protected

    def decode_step(self, layer_idx, k, v, pos, length, q, n_seen, keep_fraction, n_protected,
                    scale):
        if not self.decode_evict:
            return None
        evict_lowest_(k, v, pos, length, n_seen, keep_fraction, n_protected, self.n_sink,
                      pos.float())
