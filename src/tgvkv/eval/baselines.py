"""Eviction policies selectable by name for the accuracy harness.

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

import torch

__all__ = ["POLICIES", "make_policy", "policy_class", "policy_names"]

PAD, TEXT, VISION = 0, 1, 2


def _tgvkv():
    import tgvkv
    return tgvkv


def _head_avg_attention(q, k, scale, rows, modality):
    """Causal head-averaged fp32 attention of the query rows ``rows`` [R] (same for the batch).

    q [B, Hq, N, D], k [B, Hkv, N, D] -> [B, R, N]; pad columns and non-causal entries are 0.
    Computed one query head at a time so memory stays O(R * N).
    """
    B, Hq, N, D = q.shape
    g = Hq // k.shape[1]
    allowed = (torch.arange(N, device=k.device)[None, :] <= rows[:, None])  # [R, N]
    allowed = allowed[None] & (modality.to(k.device) != PAD)[:, None, :]  # [B, R, N]
    acc = torch.zeros(B, rows.numel(), N, dtype=torch.float32, device=k.device)
    for h in range(Hq):
        logits = torch.einsum("brd,bnd->brn", q[:, h, rows].float(), k[:, h // g].float()) * scale
        acc += torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return acc / Hq


def _single_class(modality):
    """Text and vision in one ranking class (no text priority)."""
    return torch.where(modality == VISION, torch.full_like(modality, TEXT), modality)


def _real_rank_from_end(modality):
    """[B, N] int64: 0 for the last real slot, 1 for the one before, ...; large for pads."""
    real = (modality != PAD).long()
    from_end = real.flip(-1).cumsum(-1).flip(-1) - 1
    return torch.where(real.bool(), from_end, torch.full_like(from_end, 1 << 40))


def _evict_one_(k, v, pos, length, n_seen, keep_fraction, n_protected, n_sink, slot_score):
    """Decode-time eviction with a caller-given per-slot score (lowest goes; ties: smaller pos).

    Same contract as ``tgvkv.ops.decode_evict_``: live slots ``[0, length[b])`` in any order, the
    first ``n_sink`` slots and the ``n_protected`` entries of largest ``pos`` are never evicted,
    the evicted slot is overwritten by the last live slot. ``slot_score`` [B, S] fp32.
    Returns the slot index chosen per sample (-1: none) so stateful policies can follow the move.
    """
    B = pos.shape[0]
    moved = torch.full((B,), -1, dtype=torch.int64)
    for b in range(B):
        n = int(length[b])
        f = float(keep_fraction[b])
        if f >= 1.0 or int(n - int(n_seen[b]) * f) <= 0:
            continue
        p = pos[b, :n]
        n_prot = int(n_protected[b])
        protected = torch.zeros(n, dtype=torch.bool, device=p.device)
        if n_prot > 0:
            protected[torch.topk(p, min(n_prot, n)).indices] = True
        protected[: min(n_sink, n)] = True
        if bool(protected.all()):
            continue
        s = slot_score[b, :n].float().clone()
        s[protected] = float("inf")
        # lowest score, ties to the smaller pos: lexicographic via a stable sort on pos first
        order = torch.argsort(p, stable=True)
        j = int(order[torch.argmin(s[order])])
        last = n - 1
        if j != last:
            k[b, :, j] = k[b, :, last]
            v[b, :, j] = v[b, :, last]
            pos[b, j] = pos[b, last]
        length[b] = n - 1
        moved[b] = j
    return moved


def _policy_base():
    return _tgvkv().Policy


class _UniformMixin:
    """Uniform per-layer budgets (share 1/L), single ranking class."""

    def budgets(self, stats, q_pos, modality):
        from tgvkv.policy import ops_backend
        return ops_backend().layer_budgets(torch.ones_like(stats), q_pos, modality,
                                           float(self.keep_ratio), "mass", False, self.n_sink)

    def select(self, scores, keep, q_pos, modality):
        from tgvkv.policy import ops_backend
        return ops_backend().select_keep(scores, keep, q_pos, _single_class(modality), self.n_sink)


def _make_classes():
    Policy = _policy_base()

    class RandomPolicy(_UniformMixin, Policy):
        """Uniformly random eviction (seeded torch generator; reproducible for a fixed order)."""

        def __init__(self, keep_ratio=1.0, n_sink=4, seed=0):
            super().__init__(keep_ratio=keep_ratio, n_sink=n_sink, decode_evict=True)
            self.gen = torch.Generator().manual_seed(seed)

        def layer_scores(self, layer_idx, q, k, q_pos, modality, scale):
            B, N = modality.shape
            s = torch.rand(B, N, generator=self.gen).to(k.device)
            return s, torch.ones(B, 2, device=k.device)

        def decode_step(self, layer_idx, k, v, pos, length, q, n_seen, keep_fraction,
                        n_protected, scale):
            s = torch.rand(pos.shape, generator=self.gen).to(pos.device)
            _evict_one_(k, v, pos, length, n_seen, keep_fraction, torch.ones_like(n_protected),
                        self.n_sink, s)

    class StreamingLLM(_UniformMixin, Policy):
        """Attention sinks + a window of the most recent tokens (Xiao et al., 2024)."""

        def layer_scores(self, layer_idx, q, k, q_pos, modality, scale):
            B, N = modality.shape
            s = torch.arange(N, dtype=torch.float32, device=k.device).expand(B, N).clone()
            return s, torch.ones(B, 2, device=k.device)

        def select(self, scores, keep, q_pos, modality):
            keep_idx, n_prot = super().select(scores, keep, q_pos, modality)
            return keep_idx, torch.ones_like(n_prot)  # only the newest token is protected

        def decode_step(self, layer_idx, k, v, pos, length, q, n_seen, keep_fraction,
                        n_protected, scale):
            _evict_one_(k, v, pos, length, n_seen, keep_fraction, n_protected, self.n_sink,
                        pos.float())

    class H2O(_UniformMixin, Policy):
        """Heavy-Hitter Oracle (Zhang et al., 2023): accumulated attention + a recent window.

        Prefill: heavy-hitter score = attention column sums over all prompt queries (full causal
        attention, computed one head at a time); half of each layer's budget goes to the most
        recent slots, the rest to the heaviest hitters. Decode: each slot's accumulated score grows
        by the new query's attention; the lowest accumulated score is evicted.
        """

        def __init__(self, keep_ratio=1.0, n_sink=4, recent_share=0.5):
            super().__init__(keep_ratio=keep_ratio, n_sink=n_sink, decode_evict=True)
            self.recent_share = recent_share
            self._acc = {}

        def layer_scores(self, layer_idx, q, k, q_pos, modality, scale):
            B, N = modality.shape
            rows = torch.arange(N, device=k.device)
            A = _head_avg_attention(q, k, scale, rows, modality)  # [B, N, N]
            real = (modality.to(k.device) != PAD).float()
            s = (A * real[:, :, None]).sum(1)
            return s, torch.ones(B, 2, device=k.device)

        def select(self, scores, keep, q_pos, modality):
            L, B, N = scores.shape
            from_end = _real_rank_from_end(modality).to(scores.device)  # [B, N]
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

        def decode_step(self, layer_idx, k, v, pos, length, q, n_seen, keep_fraction,
                        n_protected, scale):
            B, Hq, D = q.shape
            S = k.shape[2]
            acc = self._acc.get(layer_idx)
            if acc is None:
                acc = torch.zeros(B, S, device=k.device)
            if acc.shape[1] < S:
                acc = torch.cat([acc, acc.new_zeros(B, S - acc.shape[1])], 1)
            acc = acc[:, :S].to(k.device)  # the compacted layer holds at most S slots
            g = Hq // k.shape[1]
            live = torch.arange(S, device=k.device)[None, :] < length[:, None]
            att = torch.zeros(B, S, device=k.device)
            for h in range(Hq):
                lg = torch.einsum("bd,bsd->bs", q[:, h].float(), k[:, h // g].float()) * scale
                att += torch.softmax(lg.masked_fill(~live, float("-inf")), -1).nan_to_num(0.0)
            acc = acc + att / Hq
            old_len = length.clone()
            moved = _evict_one_(k, v, pos, length, n_seen, keep_fraction, n_protected,
                                self.n_sink, acc)
            for b in range(B):
                j = int(moved[b])
                if j >= 0:
                    acc[b, j] = acc[b, int(old_len[b]) - 1]
            self._acc[layer_idx] = acc

    class SnapKV(_UniformMixin, Policy):
        """SnapKV (Li et al., 2024): votes of an observation window of the last prompt queries.

        Score of a slot before the window = head-averaged attention it gets from the last
        ``window`` prompt queries, smoothed by a 1-D average pool of width ``kernel`` (zero-padded
        at the ends) over the slots *before* the window only, as in the SnapKV reference code (its
        default pooling) and kvpress: the window's own columns never leak into the pool. The
        window is always kept (within budget).
        Budgets are uniform across layers; no eviction while decoding.
        """

        def __init__(self, keep_ratio=1.0, n_sink=4, window=8, kernel=5):
            super().__init__(keep_ratio=keep_ratio, n_sink=n_sink, decode_evict=False)
            if not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
                raise ValueError(f"kernel must be an odd int >= 1, got {kernel!r}")
            self.window, self.kernel = window, kernel

        def layer_scores(self, layer_idx, q, k, q_pos, modality, scale):
            B, N = modality.shape
            s = torch.zeros(B, N, device=k.device)
            for b in range(B):  # the window is per sample (padding differs)
                real = torch.nonzero(modality[b] != PAD).flatten().to(k.device)
                rows, prefix = real[-self.window:], real[:-self.window]
                if prefix.numel():
                    A = _head_avg_attention(q[b:b + 1], k[b:b + 1], scale, rows,
                                            modality[b:b + 1])
                    col = A.sum(1)[:, prefix]  # [1, P]: votes for the slots before the window
                    s[b, prefix] = torch.nn.functional.avg_pool1d(
                        col[:, None], self.kernel, 1, self.kernel // 2)[0, 0]
                s[b, rows] = 1e30  # observation window always kept
            return s, torch.ones(B, 2, device=k.device)

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

        def __init__(self, keep_ratio=1.0, n_sink=4, window=8, kernel=5, beta=20.0):
            super().__init__(keep_ratio=keep_ratio, n_sink=n_sink, window=window, kernel=kernel)
            self.beta = beta

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

    return {"random": RandomPolicy, "streamingllm": StreamingLLM, "h2o": H2O,
            "snapkv": SnapKV, "pyramidkv": PyramidKV}


_CLASSES = None

POLICIES = ("full", "tgvkv", "tgvkv-no-tvb", "tgvkv-no-twr", "tgvkv-no-tpr", "random",
            "streamingllm", "h2o", "snapkv", "pyramidkv")


def policy_names():
    return list(POLICIES)


def policy_class(name: str):
    """The :class:`tgvkv.Policy` subclass of a baseline (``random``, ``streamingllm``, ``h2o``,
    ``snapkv``, ``pyramidkv``), for settings other than :func:`make_policy`'s defaults
    (``window``, ``kernel``, ``beta``, ``n_sink``, ...)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _make_classes()
    if name not in _CLASSES:
        raise ValueError(f"unknown baseline {name!r}; one of {', '.join(_CLASSES)}")
    return _CLASSES[name]


def make_policy(name: str, keep_ratio: float):
    """The policy object of ``name`` at ``keep_ratio``; ``None`` for ``"full"`` (no patching)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; one of {', '.join(POLICIES)}")
    if name == "full":
        return None
    tg = _tgvkv()
    if name.startswith("tgvkv"):
        switches = {"tgvkv": {}, "tgvkv-no-tvb": {"uniform_budgets": True},
                    "tgvkv-no-twr": {"text_weighting": False},
                    "tgvkv-no-tpr": {"text_priority": False}}[name]
        return tg.TGVKV(keep_ratio=keep_ratio, **switches)
    return policy_class(name)(keep_ratio=keep_ratio)
