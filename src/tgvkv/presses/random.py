"""Uniformly random eviction (the floor every policy should beat)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..policy import check_int
from ..torch_impl import evict_lowest_
from .base import Baseline, constant_stats

__all__ = ["RandomPolicy"]


@dataclass
class RandomPolicy(Baseline):
    """Uniformly random eviction (seeded torch generator; reproducible for a fixed call order).

    Prefill: random scores, uniform budgets. Decode: a random candidate, only the newest slot
    protected.
    """

    seed: int = 0
    gen: torch.Generator = field(init=False, repr=False, compare=False)

    def validate(self) -> None:
        super().validate()
        # the range torch.Generator.manual_seed accepts
        check_int(self, "seed", -2**63, 2**64 - 1)

    def __post_init__(self):
        super().__post_init__()
        self.gen = torch.Generator().manual_seed(self.seed)

    def layer_scores(self, layer_idx, q, k, q_pos, modality, scale):
        B, N = modality.shape
        s = torch.rand(B, N, generator=self.gen).to(k.device)
        return s, constant_stats(modality, k.device)

    def decode_step(self, layer_idx, k, v, pos, length, q, n_seen, keep_fraction, n_protected,
                    scale):
        s = torch.rand(pos.shape, generator=self.gen).to(pos.device)
        evict_lowest_(k, v, pos, length, n_seen, keep_fraction, torch.ones_like(n_protected),
                      self.n_sink, s)
