"""H2O, Heavy-Hitter Oracle (Zhang et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..constants import PAD
from ..policy import check_number
from ..torch_impl import decode_attention, evict_lowest_
from .base import Baseline, constant_stats, real_rank_from_end, rows_attention

__all__ = ["H2O"]


@dataclass
class H2O(Baseline):
    """Heavy-Hitter Oracle (Zhang et al., 2023): accumulated attention + a recent window.

    Prefill: heavy-hitter score = attention column sums over all prompt queries (full causal
    attention, computed one head at a time); half of each layer's budget goes to the most
    recent slots, the rest to the heaviest hitters. Decode: each slot's accumulated score grows
    by the new query's attention; the lowest accumulated score is evicted.
    """

    recent_share: float = 0.5
    _acc: dict = field(init=False, repr=False, compare=False, default_factory=dict)

    def validate(self) -> None:
        super().validate()
        check_number(self, "recent_share", 0.0, 1.0)

    def layer_scores(self, layer_idx, q, k, q_pos, modality, scale):
        N = modality.shape[1]
        rows = torch.arange(N, device=k.device)
        A = rows_attention(q, k, scale, rows, modality)  # [B, N, N]
        real = (modality.to(k.device) != PAD).float()
        s = (A * real[:, :, None]).sum(1)
        return s, constant_stats(modality, k.device)

    def select(self, scores, keep, q_pos, modality):
        L = scores.shape[0]
        from_end = real_rank_from_end(modality).to(scores.device)  # [B, N]
        n_recent = (keep.float() * self.recent_share).floor().long()  # [L, B]
        recent = from_end[None] < n_recent[:, :, None]
        boosted = torch.where(recent, torch.full_like(scores, 1e30), scores)
        keep_idx, n_prot = super().select(boosted, keep, q_pos, modality)
        # accumulated scores follow the compaction: slot s holds prompt position keep_idx[s]
        self._acc = {}
        for l in range(L):
            idx = keep_idx[l].clamp(min=0)
            self._acc[l] = torch.gather(scores[l], 1, idx.to(scores.device))
        return keep_idx, torch.ones_like(n_prot)

    def decode_step(self, layer_idx, k, v, pos, length, q, n_seen, keep_fraction, n_protected,
                    scale):
        B = q.shape[0]
        S = k.shape[2]
        acc = self._acc.get(layer_idx)
        if acc is None:
            acc = torch.zeros(B, S, device=k.device)
        if acc.shape[1] < S:
            acc = torch.cat([acc, acc.new_zeros(B, S - acc.shape[1])], 1)
        acc = acc[:, :S].to(k.device)  # the compacted layer holds at most S slots
        acc = acc + decode_attention(q, k, length, scale, per_head=True)
        old_len = length.clone()
        moved = evict_lowest_(k, v, pos, length, n_seen, keep_fraction, n_protected, self.n_sink,
                              acc)
        for b in range(B):
            j = int(moved[b])
            if j >= 0:
                acc[b, j] = acc[b, int(old_len[b]) - 1]
        self._acc[layer_idx] = acc
