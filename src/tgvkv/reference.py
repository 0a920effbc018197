"""Slow, obvious, pure-torch reference of every tgvkv op and of the whole TGV-KV policy.

This module is the oracle: tests compare the C++/CUDA kernels and the Hugging Face layer with it.
It follows ``docs/method.md`` literally, with per-sample Python loops and fp32/fp64 arithmetic, and
is kept slow and readable on purpose. Nothing here is used on a fast path.

Conventions shared with the ops (see README, "API"):

- ``modality`` ``[B, N]`` int8: ``PAD = 0``, ``TEXT = 1``, ``VISION = 2`` per cache slot.
- ``q_pos`` ``[B, T]`` int64: the cache slot of each guidance-text query row, valid rows first and
  strictly increasing, ``-1`` for unused rows. :func:`guidance_positions` computes the SPEC's
  guidance set (the non-pad slots after the last vision slot) from the modality map.
- Per-sample "real" tokens are the non-pad slots; ``N_b`` is their count. Sinks are the first
  ``n_sink`` real slots, "last" is the last real slot.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .constants import BUDGET_MODES, PAD, TEXT, TEXT_SCORE_MODES, VISION


# --------------------------------------------------------------------------------------------
# Modality map and guidance positions
# --------------------------------------------------------------------------------------------
def modality_map(input_ids: torch.Tensor, vision_token_ids: Sequence[int],
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Modality of every prompt slot.

    Parameters
    ----------
    input_ids : [B, N] integer tensor, placeholders already expanded by the processor.
    vision_token_ids : the model's image/video placeholder ids (from its config).
    attention_mask : optional [B, N], 0 marks padding.

    Returns
    -------
    [B, N] int8 tensor of PAD / TEXT / VISION.
    """
    mod = torch.full(input_ids.shape, TEXT, dtype=torch.int8, device=input_ids.device)
    for tok in vision_token_ids:
        mod[input_ids == int(tok)] = VISION
    if attention_mask is not None:
        mod[attention_mask == 0] = PAD
    return mod


def guidance_positions(modality: torch.Tensor) -> torch.Tensor:
    """Slots of the guidance-text queries: non-pad slots after the last vision slot.

    Parameters
    ----------
    modality : [B, N] int8.

    Returns
    -------
    q_pos : [B, T] int64 with T = the largest guidance count in the batch (may be 0); each row
        lists its sample's guidance slots ascending, padded with -1. A sample with no vision slot
        has no guidance set (SPEC §5: nothing to ground), so its row is all -1.
    """
    B, N = modality.shape
    rows = []
    for b in range(B):
        m = modality[b].tolist()
        vis = [j for j in range(N) if m[j] == VISION]
        if not vis:
            rows.append([])
            continue
        rows.append([j for j in range(vis[-1] + 1, N) if m[j] != PAD])
    T = max((len(r) for r in rows), default=0)
    out = torch.full((B, T), -1, dtype=torch.int64)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return out.to(modality.device)


def _seq_sum(xs) -> float:
    """Left-to-right float sum (Python 3.12's ``sum`` is compensated; the kernels are not)."""
    acc = 0.0
    for x in xs:
        acc += x
    return acc


def _valid_q(q_pos_b: torch.Tensor) -> list[int]:
    return [int(p) for p in q_pos_b.tolist() if p >= 0]


# --------------------------------------------------------------------------------------------
# Stage 1: attention rows of the guidance queries, scores (TWR) and statistics (TVB)
# --------------------------------------------------------------------------------------------
def text_attention(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, modality: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Head-averaged causal softmax attention of the guidance rows, fp32.

    Parameters
    ----------
    q : [B, Hq, T, D] post-RoPE guidance queries (row t is the query of slot ``q_pos[b, t]``).
    k : [B, Hkv, N, D] post-RoPE keys, ``Hq % Hkv == 0`` (query head h reads KV head h // (Hq/Hkv)).
    q_pos : [B, T] int64. modality : [B, N] int8. scale : softmax scale.

    Returns
    -------
    A : [B, T, N] fp32; rows of unused q_pos entries and columns of pad slots are 0.
    """
    B, Hq, T, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    g = Hq // Hkv
    A = torch.zeros(B, T, N, dtype=torch.float32)
    for b in range(B):
        for t, p in enumerate(q_pos[b].tolist()):
            if p < 0:
                continue
            allowed = torch.tensor([j <= p and int(modality[b, j]) != PAD for j in range(N)])
            acc = torch.zeros(N, dtype=torch.float32)
            for h in range(Hq):
                logits = (k[b, h // g].float().cpu() @ q[b, h, t].float().cpu()) * scale
                logits = logits.masked_fill(~allowed, float("-inf"))
                acc += torch.softmax(logits, dim=0)
            A[b, t] = acc / Hq
    return A


def scores_from_attention(A: torch.Tensor, q_pos: torch.Tensor, modality: torch.Tensor,
                          text_score_rows: torch.Tensor | None = None):
    """Ranking scores and interaction statistics from the guidance rows of attention.

    Parameters
    ----------
    A : [B, T, N] fp32 head-averaged attention of the guidance rows (see :func:`text_attention`).
    q_pos, modality : as above.
    text_score_rows : optional [B, N] fp32 text scores to use instead of the guidance-row column
        sums (the released code's ``text_score="all_queries"``: column sums over all N queries).

    Returns
    -------
    scores : [B, N] fp32: vision slots get the text-weighted score, text slots the column sum,
        pad slots 0.
    stats : [B, 2] fp32: (S, I): text->vision attention mass and its mutual information.
    """
    B, T, N = A.shape
    scores = torch.zeros(B, N, dtype=torch.float32)
    stats = torch.zeros(B, 2, dtype=torch.float32)
    for b in range(B):
        rows = [(t, p) for t, p in enumerate(q_pos[b].tolist()) if p >= 0]
        vis = [j for j in range(N) if int(modality[b, j]) == VISION]
        txt = [j for j in range(N) if int(modality[b, j]) == TEXT]
        # text weights: causal average of each guidance column over the guidance rows that see it
        w = {}
        for t, p in rows:
            seen_by = [u for u, pu in rows if pu >= p]
            w[t] = sum(float(A[b, u, p]) for u in seen_by) / len(seen_by)
        for v in vis:
            scores[b, v] = sum(w[t] * float(A[b, t, v]) for t, _ in rows)
        for j in txt:
            if text_score_rows is not None:
                scores[b, j] = float(text_score_rows[b, j])
            else:
                scores[b, j] = sum(float(A[b, t, j]) for t, _ in rows)
        # statistics, in float64
        blk = torch.tensor([[float(A[b, t, v]) for v in vis] for t, _ in rows],
                           dtype=torch.float64).reshape(len(rows), len(vis))
        S = float(blk.sum())
        I = 0.0
        # one guidance row or one vision slot: p(t, v) = p(t) p(v) exactly, so I = 0 (not the
        # rounding noise of the sum below, whose sign and size would decide the "mi" budgets)
        if S > 0 and len(rows) >= 2 and len(vis) >= 2:
            p = blk / S
            pr = p.sum(1, keepdim=True)
            pc = p.sum(0, keepdim=True)
            nz = p > 0
            I = float((p[nz] * torch.log(p[nz] / (pr.expand_as(p)[nz] * pc.expand_as(p)[nz]))).sum())
            I = max(0.0, I)  # mutual information is >= 0; only rounding noise is negative
        stats[b, 0] = S
        stats[b, 1] = I
    return scores, stats


def all_query_text_scores(q, k, modality, scale):
    """Column sums of the full head-averaged causal attention over every non-pad query row.

    The released code's text score (``text_score="all_queries"``), computed the slow obvious way:
    the whole N×N softmax of every head in float64.

    Parameters
    ----------
    q : [B, Hq, N, D] post-RoPE query states of every slot. k : [B, Hkv, N, D].
    modality : [B, N] int8. scale : softmax scale.

    Returns
    -------
    [B, N] fp32: ``Σ_{i not pad} A[i, j]`` (0 at pad columns; rows of pad slots count nothing).
    """
    B, Hq, N, D = q.shape
    g = Hq // k.shape[1]
    out = torch.zeros(B, N, dtype=torch.float32)
    for b in range(B):
        real = torch.tensor([int(modality[b, j]) != PAD for j in range(N)])
        allowed = torch.tril(torch.ones(N, N, dtype=torch.bool)) & real[None, :]
        acc = torch.zeros(N, N, dtype=torch.float64)
        for h in range(Hq):
            logits = (q[b, h].double().cpu() @ k[b, h // g].double().cpu().T) * scale
            P = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
            acc += torch.where(real[:, None], P, torch.zeros_like(P))  # pad rows: nothing
        out[b] = (acc / Hq).sum(0).float()
    return out


def score_text_vision(q, k, q_pos, modality, scale, text_score="all_queries"):
    """Reference of ``tgvkv::score_text_vision``: returns (scores [B, N] fp32, stats [B, 2] fp32).

    ``text_score="all_queries"`` (default): ``q`` is ``[B, Hq, N, D]``, every slot's query; text
    slots score their column sum over all query rows (:func:`all_query_text_scores`); vision
    scores and stats use the guidance rows ``q[:, :, q_pos]``. ``"guidance"``: ``q`` is the
    guidance rows ``[B, Hq, T, D]`` and text slots score the guidance-row column sums.
    """
    if text_score not in TEXT_SCORE_MODES:
        raise ValueError(f"text_score must be one of {TEXT_SCORE_MODES}, got {text_score!r}")
    if text_score == "guidance":
        return scores_from_attention(text_attention(q, k, q_pos, modality, scale), q_pos, modality)
    rows = torch.stack([q[b][:, q_pos[b].clamp(min=0).to(q.device)] for b in range(q.shape[0])])
    A = text_attention(rows, k, q_pos, modality, scale)
    return scores_from_attention(A, q_pos, modality,
                                 all_query_text_scores(q, k, modality, scale))


# --------------------------------------------------------------------------------------------
# Stage 2: per-layer budgets
# --------------------------------------------------------------------------------------------
def _sample_info(q_pos_b, modality_b, n_sink):
    m = modality_b.tolist()
    n_real = sum(1 for x in m if x != PAD)
    has_vision = any(x == VISION for x in m)
    n_guid = len(_valid_q(q_pos_b))
    evicts = has_vision and n_guid > 0 and n_real > n_sink + 1
    return n_real, evicts


def layer_budgets(stats: torch.Tensor, q_pos: torch.Tensor, modality: torch.Tensor,
                  keep_ratio: float, budget: str = "mass", redistribute: bool = False,
                  n_sink: int = 4):
    """Per-layer keep counts (SPEC §2).

    Parameters
    ----------
    stats : [L, B, 2] fp32 (S, I) of every layer. q_pos : [B, T]. modality : [B, N].
    keep_ratio : kappa in (0, 1]; >= 1 keeps everything.
    budget : "mass" (share ∝ S) or "mi" (share ∝ S·I). redistribute : give the excess of layers
        clamped at N to the others, iteratively. n_sink : sink count.

    Returns
    -------
    keep : [L, B] int64, the number of real slots each layer keeps (N_b when the sample is not
        evicted: no vision, no guidance text, kappa >= 1, or N_b <= n_sink + 1).
    keep_fraction : [L, B] float64, ``1 - r_l`` (the decode-time target fraction); 1.0 for samples
        that are not evicted.
    """
    L, B = stats.shape[0], stats.shape[1]
    keep = torch.zeros(L, B, dtype=torch.int64)
    frac = torch.ones(L, B, dtype=torch.float64)
    for b in range(B):
        N, evicts = _sample_info(q_pos[b], modality[b], n_sink)
        if not evicts or keep_ratio >= 1.0:
            keep[:, b] = N
            continue
        S = [float(stats[l, b, 0]) for l in range(L)]
        w = S if budget == "mass" else [float(stats[l, b, 0]) * float(stats[l, b, 1]) for l in range(L)]
        tot = _seq_sum(w)
        pi = [x / tot for x in w] if tot > 0 else [1.0 / L] * L
        r = [1.0 - L * keep_ratio * p for p in pi]  # forget ratio r_l, may be negative
        if redistribute:
            target = [(1.0 - x) * N for x in r]  # kept tokens before clamping
            clamped = [False] * L
            while True:
                excess = _seq_sum(max(0.0, target[l] - N) for l in range(L) if not clamped[l])
                newly = [l for l in range(L) if not clamped[l] and target[l] >= N]
                if not newly:
                    break
                for l in newly:
                    clamped[l] = True
                    target[l] = float(N)
                free = [l for l in range(L) if not clamped[l]]
                wsum = _seq_sum(pi[l] for l in free)
                if not free or excess <= 0:
                    break
                for l in free:
                    target[l] += excess * (pi[l] / wsum if wsum > 0 else 1.0 / len(free))
            r = [1.0 - t / N for t in target]
        n_cand = max(0, N - n_sink - 1)
        for l in range(L):
            forget = max(0, round(r[l] * N))  # Python round: half to even
            keep[l, b] = N - min(forget, n_cand)
            frac[l, b] = 1.0 - r[l]
    return keep, frac


# --------------------------------------------------------------------------------------------
# Stage 3: selection and compaction
# --------------------------------------------------------------------------------------------
def select_keep(scores: torch.Tensor, keep: torch.Tensor, q_pos: torch.Tensor,
                modality: torch.Tensor, n_sink: int = 4):
    """Kept slots of every layer (SPEC §3), ascending.

    Parameters
    ----------
    scores : [L, B, N] fp32 ranking scores. keep : [L, B] int64 keep counts (from
        :func:`layer_budgets`). q_pos : [B, T]. modality : [B, N]. n_sink : sink count.

    Returns
    -------
    keep_idx : [L, B, N] int64: the kept slots ascending in the first ``keep[l, b]`` entries, -1
        after them.
    n_protected : [L, B] int64: kept slots at or after the first guidance slot (at least 1).
    """
    L, B, N = scores.shape
    keep_idx = torch.full((L, B, N), -1, dtype=torch.int64)
    n_prot = torch.ones(L, B, dtype=torch.int64)
    for l in range(L):
        for b in range(B):
            real = [j for j in range(N) if int(modality[b, j]) != PAD]
            n = len(real)
            fixed = set(real[:n_sink]) | ({real[-1]} if real else set())
            cand = [j for j in real if j not in fixed]
            forget = min(len(cand), max(0, n - int(keep[l, b])))
            # rank ascending: (class, score, position); the lowest `forget` are dropped
            key = lambda j: (1 if int(modality[b, j]) == TEXT else 0, float(scores[l, b, j]), j)
            dropped = set(sorted(cand, key=key)[:forget])
            kept = [j for j in real if j not in dropped]
            keep_idx[l, b, : len(kept)] = torch.tensor(kept, dtype=torch.int64)
            g = _valid_q(q_pos[b])
            if g:
                n_prot[l, b] = max(1, sum(1 for j in kept if j >= g[0]))
    return keep_idx, n_prot


def compact_(k: torch.Tensor, v: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """Reference of ``tgvkv::compact_``: move the kept slots of every sample to the front.

    Parameters
    ----------
    k, v : [B, Hkv, N, D], modified in place. keep_idx : [B, N] int64 (ascending, -1 padded).

    Returns
    -------
    n_kept : [B] int64. Slots at and after ``n_kept[b]`` are left unspecified.
    """
    B = k.shape[0]
    n_kept = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        idx = [int(i) for i in keep_idx[b].tolist() if i >= 0]
        n_kept[b] = len(idx)
        if idx:
            it = torch.tensor(idx, dtype=torch.int64, device=k.device)
            k[b, :, : len(idx)] = k[b, :, it].clone()
            v[b, :, : len(idx)] = v[b, :, it].clone()
    return n_kept


def evict_from_scores(k_cache, v_cache, scores, stats, q_pos, modality, keep_ratio,
                      budget="mass", redistribute=False, n_sink=4):
    """Reference of ``tgvkv::evict_from_scores``: budgets, selection and in-place compaction.

    Returns (keep_idx [L, B, N], n_kept [L, B], n_protected [L, B], keep_fraction [L, B] f64).
    """
    keep, frac = layer_budgets(stats, q_pos, modality, keep_ratio, budget, redistribute, n_sink)
    keep_idx, n_prot = select_keep(scores, keep, q_pos, modality, n_sink)
    n_kept = torch.stack([compact_(k, v, keep_idx[l]) for l, (k, v) in
                          enumerate(zip(k_cache, v_cache))]) if len(k_cache) else keep.clone()
    return keep_idx, n_kept, n_prot, frac


def evict(k_cache, v_cache, queries, q_pos, modality, scale, keep_ratio, budget="mass",
          redistribute=False, n_sink=4, text_score="all_queries"):
    """Reference of ``tgvkv::evict``: the whole method for a cache of L layers.

    Parameters
    ----------
    k_cache, v_cache : L tensors [B, Hkv, N, D], compacted in place.
    queries : L tensors, the post-RoPE queries of each layer: [B, Hq, N, D] (every slot) for
        ``text_score="all_queries"`` (default), [B, Hq, T, D] (guidance rows) for "guidance".
    q_pos : [B, T] int64. modality : [B, N] int8. scale, keep_ratio, budget, redistribute, n_sink:
        as in the stages.

    Returns
    -------
    keep_idx [L, B, N] int64, n_kept [L, B] int64, n_protected [L, B] int64,
    keep_fraction [L, B] float64.
    """
    sc = [score_text_vision(q, k, q_pos, modality, scale, text_score)
          for q, k in zip(queries, k_cache)]
    scores = torch.stack([s for s, _ in sc])
    stats = torch.stack([s for _, s in sc])
    return evict_from_scores(k_cache, v_cache, scores, stats, q_pos, modality, keep_ratio,
                             budget, redistribute, n_sink)


# --------------------------------------------------------------------------------------------
# Stage 4: decode-time eviction
# --------------------------------------------------------------------------------------------
def decode_evict_(k, v, pos, length, q, n_seen, keep_fraction, n_protected, scale, n_sink=4):
    """Reference of ``tgvkv::decode_evict_``: at most one eviction per sample (SPEC §4).

    This reference keeps each sample's live slots in ascending ``pos`` order and shifts the tail
    left over the evicted slot (the released code's behaviour, minus its whole-layer ``cat``). The
    kernel may store live slots in any order; tests compare the set of live (pos, K, V) entries.

    Parameters
    ----------
    k, v : [B, Hkv, S, D], live slots ``[0, length[b])``, modified in place.
    pos : [B, S] int64 original position of each live slot (ascending here), modified in place.
    length : [B] int64 live slot count (modified in place).
    q : [B, Hq, D] post-RoPE query of the newest token.
    n_seen : [B] int64 tokens seen so far (prompt + generated, pads excluded).
    keep_fraction : [B] float64 (1 - r_l). n_protected : [B] int64 (K_l). scale, n_sink.

    Returns
    -------
    evicted : [B] int64, the pos of the evicted entry or -1.
    """
    B, Hkv = k.shape[0], k.shape[1]
    Hq = q.shape[1]
    g = Hq // Hkv
    evicted = torch.full((B,), -1, dtype=torch.int64)
    for b in range(B):
        n = int(length[b])
        f = float(keep_fraction[b])
        if f >= 1.0:
            continue
        forget = int(n - int(n_seen[b]) * f)
        if forget <= 0:
            continue
        lo, hi = n_sink, n - int(n_protected[b])
        if hi <= lo:
            continue
        att = torch.zeros(n, dtype=torch.float32)
        for h in range(Hq):
            logits = (k[b, h // g, :n].float().cpu() @ q[b, h].float().cpu()) * scale
            att += torch.softmax(logits, dim=0)
        att /= Hq
        cand = list(range(lo, hi))
        j = min(cand, key=lambda s: (float(att[s]), int(pos[b, s])))
        evicted[b] = int(pos[b, j])
        k[b, :, j:n - 1] = k[b, :, j + 1:n].clone()
        v[b, :, j:n - 1] = v[b, :, j + 1:n].clone()
        pos[b, j:n - 1] = pos[b, j + 1:n].clone()
        length[b] = n - 1
    return evicted


def decode_evict_layers_(k_cache, v_cache, pos, length, queries, n_seen, keep_fraction,
                         n_protected, scale, n_sink=4):
    """Reference of ``tgvkv::decode_evict_layers_``: :func:`decode_evict_` of every layer ``l``
    on its own tensors and rows ``length[l]``, ``keep_fraction[l]``, ``n_protected[l]`` (the
    layers are independent: no layer reads another's cache).

    Returns
    -------
    evicted : [L, B] int64.
    """
    rows = [decode_evict_(k, v, p, length[l], q, n_seen, keep_fraction[l], n_protected[l],
                          scale, n_sink)
            for l, (k, v, p, q) in enumerate(zip(k_cache, v_cache, pos, queries))]
    if not rows:
        return torch.full(tuple(length.shape), -1, dtype=torch.int64)
    return torch.stack(rows)


def decode_append_(k, v, pos, length, mask, k_new, v_new, position):
    """Reference of ``tgvkv::decode_append_``: per sample ``b`` with ``n = length[b]`` (a free
    slot: ``0 <= n < S``), ``k[b, :, n] = k_new[b, :, 0]``, ``v[b, :, n] = v_new[b, :, 0]``,
    ``pos[b, n] = position``, ``length[b] = n + 1``; then ``mask[b, s] = s < length[b]`` for
    every column ``s`` of ``mask`` ``[B, M]``. In place; returns None."""
    S = k.shape[2]
    for b in range(k.shape[0]):
        n = int(length[b])
        if not 0 <= n < S:
            raise RuntimeError(f"decode_append_: length[{b}] = {n} leaves no free slot in [0, {S})")
        k[b, :, n] = k_new[b, :, 0]
        v[b, :, n] = v_new[b, :, 0]
        pos[b, n] = position
        length[b] = n + 1
        for s in range(mask.shape[1]):
            mask[b, s] = s < n + 1
    return None


# --------------------------------------------------------------------------------------------
# The whole prefill policy from eager attention weights (oracle of the model layer)
# --------------------------------------------------------------------------------------------
def policy_from_attention(attentions: Sequence[torch.Tensor], modality: torch.Tensor,
                          keep_ratio: float, text_score: str = "all_queries", budget: str = "mass",
                          redistribute: bool = False, n_sink: int = 4):
    """Kept slots of every layer from the model's full eager attention weights.

    Parameters
    ----------
    attentions : L tensors [B, Hq, N, N] (``output_attentions=True`` of an eager model).
    modality : [B, N] int8. keep_ratio, budget, redistribute, n_sink : as above.
    text_score : "all_queries" (default, the released code: column sums over all N query rows)
        or "guidance" (column sums over the guidance rows only).

    Returns
    -------
    keep_idx [L, B, N], keep [L, B], n_protected [L, B], keep_fraction [L, B].
    """
    if text_score not in TEXT_SCORE_MODES:
        raise ValueError(f"text_score must be one of {TEXT_SCORE_MODES}, got {text_score!r}")
    q_pos = guidance_positions(modality).cpu()
    modality = modality.cpu()
    sc, st = [], []
    for att in attentions:
        att = att.float().cpu().mean(1)  # [B, N, N] head average
        B, N, _ = att.shape
        T = q_pos.shape[1]
        A = torch.zeros(B, T, N)
        for b in range(B):
            for t, p in enumerate(q_pos[b].tolist()):
                if p >= 0:
                    A[b, t] = att[b, p] * (modality[b] != PAD)
        rows = None
        if text_score == "all_queries":
            real = (modality != PAD).float()
            rows = (att * real[:, :, None]).sum(1)
        s, t_ = scores_from_attention(A, q_pos, modality, rows)
        sc.append(s)
        st.append(t_)
    scores, stats = torch.stack(sc), torch.stack(st)
    keep, frac = layer_budgets(stats, q_pos, modality, keep_ratio, budget, redistribute, n_sink)
    keep_idx, n_prot = select_keep(scores, keep, q_pos, modality, n_sink)
    return keep_idx, keep, n_prot, frac


__all__ = [
    "PAD", "TEXT", "VISION", "modality_map", "guidance_positions", "text_attention",
    "scores_from_attention", "all_query_text_scores", "score_text_vision", "layer_budgets",
    "select_keep", "compact_", "evict_from_scores", "evict", "decode_evict_", "decode_evict_layers_",
    "decode_append_", "policy_from_attention",
]
