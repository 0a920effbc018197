"""The one fast plain-PyTorch composition of every tgvkv op.

Every speed ``tgvkv-bench`` reports is a ratio against this composition, measured in the same run;
the baselines (:mod:`tgvkv.presses`) and the TGV-KV ablations take their attention rows and their
decode-time eviction step from it. It follows ``docs/method.md`` exactly like :mod:`tgvkv.reference`
does, but vectorised the way a good PyTorch programmer would write it:

- scores: per layer one batched matmul of the guidance rows against the keys in fp32, GQA through a
  ``view`` of the queries as ``[B, Hkv, g*T, D]`` (no ``repeat_interleave`` copy of the keys), one
  additive mask shared by all layers, softmax, head mean, text weights by a ``gather`` of the
  guidance columns, vision scores by one ``bmm``, text scores by a column sum, statistics in fp64;
  ``text_score="all_queries"`` text scores: the guidance rows' column sums plus the mass of the
  other rows, over chunks of 32 query rows, each against its causal keys only
  (:func:`text_column_mass`: half the FLOPs of one N×N product, softmax in cache);
- budgets: vectorised over layers and samples (``torch.round`` is half-to-even like the SPEC);
- selection: one ``sort`` of a packed int64 key ``(class, fp32 score bits, slot)`` per row (exact:
  non-negative floats order like their bit patterns), dropped slots by ``scatter``, ascending kept
  slots by a ``cumsum`` + ``scatter`` (no second sort);
- compaction: one ``index_select`` of the kept rows of K and V into new, smaller tensors per layer;
- decode: one matmul of the new query against the live keys, the lowest candidate by a masked
  ``min`` (ties to the smaller pos), the last live slot moved into it.

There is no Python loop over heads or samples (except the opt-in ``per_head`` memory mode); loops
run over layers only. :func:`evict` returns the same four tensors as ``torch.ops.tgvkv.evict`` plus
the new (compacted) K/V tensors. ``tests/test_cli.py`` checks that it keeps exactly the slots
:func:`tgvkv.reference.evict` keeps. Nothing here needs the compiled extension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .constants import PAD, TEXT, VISION

_INT64_MAX = (1 << 63) - 1


@dataclass
class GuidanceMasks:
    """Masks shared by every layer of one ``evict`` call (computed once per call).

    bias : [B, 1, T, N] fp32, 0 where guidance row t may attend slot j, -inf elsewhere (rows of
        unused ``q_pos`` entries are all 0 so that softmax stays finite; they are zeroed after).
    row_valid : [B, T] bool. vision, text, real : [B, N] bool. n_valid : [B] int64.
    guidance_slot : [B, N] bool, the slots of the valid guidance rows (``text_score="all_queries"``
        leaves them out of its text-mass pass: their share is their own column sums).
    """

    bias: torch.Tensor
    row_valid: torch.Tensor
    vision: torch.Tensor
    text: torch.Tensor
    real: torch.Tensor
    q_idx: torch.Tensor  # [B, T] int64, q_pos with -1 replaced by 0 (for gathers)
    n_valid: torch.Tensor
    guidance_slot: torch.Tensor


def causal_allowed(row_pos: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """``[B, R, N]`` bool: query row ``r`` (at slot ``row_pos[b, r]``) may attend slot ``j``
    (``j <= row_pos[b, r]`` and ``j`` is not a pad slot). ``row_pos`` is ``[B, R]`` or ``[R]``."""
    N = modality.shape[1]
    j = torch.arange(N, device=modality.device)
    real = modality != PAD
    return (j.view(1, 1, N) <= row_pos.unsqueeze(-1)) & real.unsqueeze(1)


def bias_from_allowed(allowed: torch.Tensor) -> torch.Tensor:
    """Additive softmax mask ``[B, 1, R, N]`` fp32 (0 where allowed, -inf elsewhere) of ``allowed``
    ``[B, R, N]``, shared by every query head (and every layer of one call)."""
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
    bias.masked_fill_(~allowed, float("-inf"))
    return bias.unsqueeze(1)


def guidance_masks(q_pos: torch.Tensor, modality: torch.Tensor) -> GuidanceMasks:
    row_valid = q_pos >= 0
    allowed = causal_allowed(q_pos, modality)
    allowed |= ~row_valid.unsqueeze(-1)
    B, N = modality.shape
    idx = torch.where(row_valid, q_pos, N)  # unused entries go to a spare column
    slot = torch.zeros(B, N + 1, dtype=torch.bool, device=modality.device)
    slot = slot.scatter_(1, idx.to(modality.device), True)[:, :N]
    return GuidanceMasks(bias=bias_from_allowed(allowed), row_valid=row_valid,
                         vision=modality == VISION, text=modality == TEXT, real=modality != PAD,
                         q_idx=q_pos.clamp_min(0), n_valid=row_valid.sum(-1),
                         guidance_slot=slot)


def head_averaged_attention(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, scale: float,
                            per_head: bool = False) -> torch.Tensor:
    """Query-head mean of ``softmax(q kᵀ · scale + bias)`` in fp32, ``[B, R, N]``.

    Parameters
    ----------
    q : Tensor
        ``[B, Hq, R, D]`` query rows. k : ``[B, Hkv, N, D]`` keys, ``Hq % Hkv == 0`` (GQA).
    bias : Tensor
        ``[B, 1, R, N]`` fp32, 0 or -inf (:func:`bias_from_allowed`).
    per_head : bool
        False: all heads in one matmul (GQA through a view, no copy of the keys): the fast path.
        True: one query head at a time, so memory stays O(B·R·N) (rows that attend nothing
        give 0 instead of NaN); what the baselines use for their many-row attention.
    """
    B, Hq, R, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    g = Hq // Hkv
    if per_head:
        acc = torch.zeros(B, R, N, dtype=torch.float32, device=k.device)
        for h in range(Hq):
            logits = torch.einsum("brd,bnd->brn", q[:, h].float(), k[:, h // g].float()) * scale
            acc += torch.softmax(logits + bias[:, 0], -1).nan_to_num(0.0)
        return acc / Hq
    # GQA without copying the keys: the g query heads of a KV head become g*R rows of one matmul
    qf = q.to(torch.float32).reshape(B, Hkv, g * R, D)
    kf = k.to(torch.float32)
    logits = torch.matmul(qf, kf.transpose(-1, -2)).view(B, Hq, R, N)
    logits.mul_(scale).add_(bias)
    return torch.softmax(logits, dim=-1).mean(1)


def text_attention(q: torch.Tensor, k: torch.Tensor, m: GuidanceMasks,
                   scale: float) -> torch.Tensor:
    """Head-averaged fp32 attention of the guidance rows, ``[B, T, N]`` (unused rows are 0)."""
    A = head_averaged_attention(q, k, m.bias, scale)
    return A.mul_(m.row_valid.unsqueeze(-1))


def scores_from_attention(A: torch.Tensor, m: GuidanceMasks, need_mi: bool = True):
    """(scores [B, N] fp32, stats [B, 2] fp32) from the guidance rows ``A`` [B, T, N]."""
    B, T, N = A.shape
    # text weights: column t of the guidance block seen by the rows u >= t (causal, so rows u < t
    # hold 0 there): w_t = sum_u A[u, q_pos[t]] / (n_valid - t)
    G = A.gather(2, m.q_idx.unsqueeze(1).expand(B, T, T))  # [B, T(u), T(t)]
    cnt = (m.n_valid.unsqueeze(-1) - torch.arange(T, device=A.device)).clamp_min(1)
    w = (G.sum(1) / cnt).mul_(m.row_valid)  # [B, T]
    vis_score = torch.bmm(w.unsqueeze(1), A).squeeze(1)  # [B, N]
    col = A.sum(1)
    scores = torch.where(m.vision, vis_score, torch.where(m.text, col, torch.zeros_like(col)))
    blk = A.to(torch.float64) * m.vision.unsqueeze(1)  # text->vision block (pad rows are 0)
    S = blk.sum((1, 2))
    stats = torch.zeros(B, 2, dtype=torch.float64, device=A.device)
    stats[:, 0] = S
    if need_mi:
        # I = sum p log(p / (pr pc)) over p > 0, p = blk / S (as the reference writes it)
        p = blk / torch.where(S > 0, S, torch.ones_like(S)).view(B, 1, 1)
        outer = p.sum(2, keepdim=True) * p.sum(1, keepdim=True)
        nz = p > 0
        terms = torch.where(nz, p * torch.log(torch.where(nz, p / outer, torch.ones_like(p))),
                            torch.zeros_like(p))
        I = terms.sum((1, 2)).clamp_min(0)  # >= 0: a negative value is rounding noise
        # one guidance row or one vision slot: I = 0 exactly (p = p_t p_v), not the noise above
        can = (S > 0) & (m.n_valid >= 2) & (m.vision.sum(1) >= 2)
        stats[:, 1] = torch.where(can, I, torch.zeros_like(I))
    return scores, stats.to(torch.float32)


def gather_rows(q: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, N, D], q_pos [B, T] (-1 = unused) -> [B, Hq, T, D] (unused rows: row 0)."""
    B, Hq, _, D = q.shape
    idx = q_pos.to(q.device).clamp(min=0)[:, None, :, None].expand(B, Hq, q_pos.shape[1], D)
    return torch.gather(q, 2, idx)


TEXT_MASS_CHUNK = 32  # query rows per chunk of text_column_mass (see there)


def text_mass_rows(modality: torch.Tensor, skip_rows: torch.Tensor | None = None):
    """The query rows :func:`text_column_mass` sums: (counted ``[B, N]`` bool, the non-pad rows
    not in ``skip_rows``; n_rows, one past the last row counted in any sample: its chunks stop
    there)."""
    real = modality != PAD
    counted = real if skip_rows is None else real & ~skip_rows.to(real.device)
    rows = counted.any(0).nonzero()
    return counted, int(rows[-1]) + 1 if rows.numel() else 0


def text_column_mass(q: torch.Tensor, k: torch.Tensor, modality: torch.Tensor, scale: float,
                     rows_per_chunk: int = TEXT_MASS_CHUNK,
                     skip_rows: torch.Tensor | None = None) -> torch.Tensor:
    """``text_score="all_queries"``: ``[B, N]`` fp32 column sums of the head-averaged causal
    attention over **all** non-pad query rows (the released code's H2O-style text score).

    q : ``[B, Hq, N, D]`` full query states; k : ``[B, Hkv, N, D]``. The rows go in chunks of
    ``rows_per_chunk``: chunk ``[r0, r1)`` multiplies against the keys ``[0, r1)`` only (what it
    may attend causally: half the FLOPs of the full N×N product), its softmax stays in cache, and
    one ``[B, 1, N, N]`` additive mask serves every chunk. Against the one N×N product per layer
    this is 3x faster at llava-1.5-7b shapes (fp32, 2 threads, Zen 4) and never holds more than
    one chunk's ``[B, Hq, rows_per_chunk, N]`` probabilities. 32 rows was within ~10% of the best
    of 16 / 32 / 64 at each 7B preset (64 was 5-12% faster at llava-1.5-7b, 16 or 32 at
    llava-next-7b; no size won everywhere).

    skip_rows : ``[B, N]`` bool, optional: rows left out of the sum (:func:`score_text_vision`
    skips the guidance rows, whose share it has from their attention already); the chunks stop
    after the last row that counts.
    """
    B, N = modality.shape
    real = modality != PAD
    allowed = causal_allowed(torch.arange(N, device=modality.device), modality)
    allowed |= ~real.unsqueeze(-1)  # pad rows attend anything (finite), zeroed below
    bias = bias_from_allowed(allowed)  # [B, 1, N, N]
    counted, n_rows = text_mass_rows(modality, skip_rows)
    row_w = counted.to(torch.float32).unsqueeze(-1)  # [B, N, 1]: pad (and skipped) rows count 0
    kf = k.to(torch.float32)  # once, not per chunk
    out = torch.zeros(B, N, dtype=torch.float32, device=k.device)
    for r0 in range(0, n_rows, rows_per_chunk):
        r1 = min(n_rows, r0 + rows_per_chunk)
        A = head_averaged_attention(q[:, :, r0:r1], kf[:, :, :r1], bias[:, :, r0:r1, :r1], scale)
        out[:, :r1] += A.mul_(row_w[:, r0:r1]).sum(1)  # [B, R, r1] -> [B, r1]
    return out


def score_text_vision(q, k, q_pos, modality, scale, masks: GuidanceMasks | None = None,
                            need_mi: bool = True, text_score: str = "all_queries"):
    """Plain-PyTorch ``score_text_vision``: (scores [B, N] fp32, stats [B, 2] fp32).

    ``q`` is ``[B, Hq, N, D]`` (all query states) for ``text_score="all_queries"``, the guidance
    rows ``[B, Hq, T, D]`` for ``"guidance"`` (as the op)."""
    m = masks if masks is not None else guidance_masks(q_pos, modality)
    rows = gather_rows(q, q_pos) if text_score == "all_queries" else q
    scores, stats = scores_from_attention(text_attention(rows, k, m, scale), m, need_mi)
    if text_score == "all_queries":
        # the text slots hold the guidance rows' column sums already (the "guidance" text
        # score); the other rows' mass is added, so no guidance row is multiplied twice
        mass = text_column_mass(q, k, modality, scale, skip_rows=m.guidance_slot)
        scores = torch.where(m.text, scores + mass, scores)
    return scores, stats


def sample_facts(q_pos, modality, n_sink):
    """(n_real [B] int64, evicts [B] bool): real slots, and whether prefill eviction can drop
    anything (a vision slot, guidance text and more than ``n_sink + 1`` real slots)."""
    real = modality != PAD
    n_real = real.sum(-1)
    evicts = (modality == VISION).any(-1) & (q_pos >= 0).any(-1) & (n_real > n_sink + 1)
    return n_real, evicts


def layer_budgets(stats, q_pos, modality, keep_ratio, budget="mass", redistribute=False,
                        n_sink=4):
    """Plain-PyTorch ``layer_budgets``: (keep [L, B] int64, keep_fraction [L, B] float64)."""
    L, B = stats.shape[0], stats.shape[1]
    n_real, evicts = sample_facts(q_pos, modality, n_sink)
    Nf = n_real.to(torch.float64)
    st = stats.to(torch.float64)
    w = st[..., 0] if budget == "mass" else st[..., 0] * st[..., 1]
    tot = w.sum(0, keepdim=True)
    pi = torch.where(tot > 0, w / torch.where(tot > 0, tot, torch.ones_like(tot)),
                     torch.full_like(w, 1.0 / L))
    r = 1.0 - L * keep_ratio * pi  # [L, B]
    if redistribute:
        target = (1.0 - r) * Nf
        clamped = torch.zeros(L, B, dtype=torch.bool, device=stats.device)
        active = torch.ones(B, dtype=torch.bool, device=stats.device)
        for _ in range(L + 1):  # each round clamps at least one layer of every active sample
            excess = torch.where(~clamped, (target - Nf).clamp_min(0), torch.zeros_like(target)).sum(0)
            newly = ~clamped & (target >= Nf) & active
            active &= newly.any(0)
            if not bool(active.any()):
                break
            clamped |= newly
            target = torch.where(newly, Nf.expand_as(target), target)
            free = ~clamped
            n_free = free.sum(0)
            wsum = torch.where(free, pi, torch.zeros_like(pi)).sum(0)
            active &= (n_free > 0) & (excess > 0)
            share = torch.where(wsum > 0, pi / torch.where(wsum > 0, wsum, torch.ones_like(wsum)),
                                1.0 / n_free.clamp_min(1).to(pi.dtype))
            target = torch.where(free & active, target + excess * share, target)
        r = 1.0 - target / Nf
    n_cand = (n_real - n_sink - 1).clamp_min(0)
    forget = torch.round(r * Nf).clamp_min(0).to(torch.int64)  # half to even, like the SPEC
    keep = n_real - torch.minimum(forget, n_cand)
    no = ~evicts | (keep_ratio >= 1.0)
    keep = torch.where(no, n_real.expand_as(keep), keep)
    frac = torch.where(no, torch.ones_like(r), 1.0 - r)
    return keep, frac


def select_keep(scores, keep, q_pos, modality, n_sink=4):
    """Plain-PyTorch ``select_keep``: (keep_idx [L, B, N] int64, n_protected [L, B] int64)."""
    L, B, N = scores.shape
    dev = scores.device
    j = torch.arange(N, device=dev)
    real = modality != PAD
    rank = real.cumsum(-1) - 1  # index of each real slot among the real ones
    n_real = real.sum(-1, keepdim=True)
    cand = real & (rank >= n_sink) & (rank != n_real - 1)  # [B, N]
    forget = torch.minimum((n_real.squeeze(-1) - keep).clamp_min(0), cand.sum(-1))  # [L, B]
    # one packed key: class (text above vision), fp32 score bits, slot (later wins ties)
    s = torch.where(scores > 0, scores, torch.zeros_like(scores)).contiguous()
    bits = s.view(torch.int32).to(torch.int64)
    key = ((modality == TEXT).to(torch.int64) << 62) | (bits << 31) | j
    key = torch.where(cand, key, torch.full_like(key, _INT64_MAX))
    order = key.sort(-1).indices
    drop = torch.zeros(L, B, N, dtype=torch.bool, device=dev)
    drop.scatter_(-1, order, j.view(1, 1, N) < forget.unsqueeze(-1))
    kept = real & ~drop
    dest = kept.cumsum(-1) - 1
    out = torch.full((L, B, N + 1), -1, dtype=torch.int64, device=dev)
    out.scatter_(-1, torch.where(kept, dest, torch.full_like(dest, N)), j.expand(L, B, N))
    keep_idx = out[..., :N]
    g0 = q_pos[:, 0] if q_pos.shape[1] else torch.full((B,), -1, dtype=torch.int64, device=dev)
    prot = (kept & (j >= g0.view(1, B, 1))).sum(-1).clamp_min(1)
    n_prot = torch.where(g0.view(1, B) >= 0, prot, torch.ones_like(prot))
    return keep_idx, n_prot


def compact(k: torch.Tensor, v: torch.Tensor, keep_idx: torch.Tensor, width: int):
    """Gather the kept slots of one layer into new tensors ``[B, Hkv, width, D]``.

    ``keep_idx`` is ``[B, N]`` (ascending, -1 padded); ``width`` >= the largest kept count.
    One ``index_select`` of D-element rows of the flattened cache per tensor.
    """
    B, H, N, D = k.shape
    idx = keep_idx[:, :width].clamp_min(0)
    base = torch.arange(B * H, device=k.device).view(B, H, 1) * N
    flat = (base + idx.unsqueeze(1)).reshape(-1)
    k2 = k.reshape(B * H * N, D).index_select(0, flat).view(B, H, width, D)
    v2 = v.reshape(B * H * N, D).index_select(0, flat).view(B, H, width, D)
    return k2, v2


def evict_from_scores(k_cache, v_cache, scores, stats, q_pos, modality, keep_ratio,
                            budget="mass", redistribute=False, n_sink=4):
    """Budgets + selection + gather. Returns (new_k, new_v, keep_idx, n_kept, n_protected,
    keep_fraction); ``new_k[l]``/``new_v[l]`` are ``[B, Hkv, max_b n_kept[l, b], D]``."""
    keep, frac = layer_budgets(stats, q_pos, modality, keep_ratio, budget, redistribute,
                                     n_sink)
    keep_idx, n_prot = select_keep(scores, keep, q_pos, modality, n_sink)
    widths = keep.max(1).values.tolist() if keep.numel() else []  # one host sync for all layers
    new_k, new_v = [], []
    for l, (k, v) in enumerate(zip(k_cache, v_cache)):
        k2, v2 = compact(k, v, keep_idx[l], int(widths[l]))
        new_k.append(k2)
        new_v.append(v2)
    return new_k, new_v, keep_idx, keep, n_prot, frac


def evict(k_cache, v_cache, queries, q_pos, modality, scale, keep_ratio, budget="mass",
                redistribute=False, n_sink=4, text_score="all_queries"):
    """The fastest plain-PyTorch composition of ``tgvkv::evict`` (not in place).

    ``queries[l]``: ``[B, Hq, N, D]`` for ``text_score="all_queries"`` (default), the guidance
    rows ``[B, Hq, T, D]`` for ``"guidance"`` (as the op).

    Returns
    -------
    new_k, new_v : L tensors ``[B, Hkv, max_b n_kept, D]`` (the compacted cache, new memory).
    keep_idx [L, B, N] int64, n_kept [L, B] int64, n_protected [L, B] int64,
    keep_fraction [L, B] float64 (the same four tensors as the op).
    """
    if not k_cache:
        B = modality.shape[0]
        e = torch.zeros(0, B, dtype=torch.int64, device=modality.device)
        return [], [], e.unsqueeze(-1), e, e, e.to(torch.float64)
    m = guidance_masks(q_pos, modality)
    need_mi = budget == "mi"
    sc = [score_text_vision(q, k, q_pos, modality, scale, m, need_mi, text_score)
          for q, k in zip(queries, k_cache)]
    scores = torch.stack([s for s, _ in sc])
    stats = torch.stack([s for _, s in sc])
    return evict_from_scores(k_cache, v_cache, scores, stats, q_pos, modality, keep_ratio,
                                   budget, redistribute, n_sink)


def decode_attention(q: torch.Tensor, k: torch.Tensor, length: torch.Tensor, scale: float,
                     per_head: bool = False) -> torch.Tensor:
    """Head-averaged fp32 attention ``[B, S]`` of one new query ``q`` ``[B, Hq, D]`` over the live
    slots ``[0, length[b])`` of ``k`` ``[B, Hkv, S, D]`` (0 at dead slots). ``per_head``: one query
    head at a time (as in :func:`head_averaged_attention`)."""
    B, Hkv, S, D = k.shape
    Hq = q.shape[1]
    g = Hq // Hkv
    live = torch.arange(S, device=k.device).view(1, S) < length.view(B, 1)
    if per_head:
        att = torch.zeros(B, S, device=k.device)
        for h in range(Hq):
            lg = torch.einsum("bd,bsd->bs", q[:, h].float(), k[:, h // g].float()) * scale
            att += torch.softmax(lg.masked_fill(~live, float("-inf")), -1).nan_to_num(0.0)
        return att / Hq
    logits = torch.matmul(q.to(torch.float32).view(B, Hkv, g, D),
                          k.to(torch.float32).transpose(-1, -2)) * scale  # [B, Hkv, g, S]
    logits.masked_fill_(~live.view(B, 1, 1, S), float("-inf"))
    return torch.softmax(logits, -1).mean((1, 2))


def _lowest_candidate(pos, length, n_seen, keep_fraction, n_protected, n_sink, slot_score):
    """(active [B] bool, slot [B] int64) of one decode-time eviction: the live candidate (not
    among the first ``n_sink`` slots, nor among the ``n_protected`` entries of largest ``pos``)
    with the lowest ``slot_score`` (ties to the smaller pos), where
    ``int(length - n_seen * keep_fraction) > 0``. Inactive samples get ``slot = length - 1``."""
    B, S = pos.shape
    s = torch.arange(S, device=pos.device)
    live = s.view(1, S) < length.view(B, 1)
    forget = torch.trunc(length.to(torch.float64) - n_seen.to(torch.float64) * keep_fraction)
    # protected: the n_protected live entries of largest pos
    pos_live = torch.where(live, pos, torch.full_like(pos, -1))
    kth = pos_live.sort(-1, descending=True).values.gather(
        1, (n_protected - 1).clamp(0, S - 1).view(B, 1))
    cand = live & (s.view(1, S) >= n_sink) & (pos < kth)
    active = (keep_fraction < 1.0) & (forget > 0) & cand.any(-1)
    a = torch.where(cand, slot_score.float(), torch.full_like(slot_score, float("inf"),
                                                             dtype=torch.float32))
    amin = a.min(-1, keepdim=True).values
    tie_pos = torch.where(cand & (a == amin), pos, torch.full_like(pos, _INT64_MAX))
    slot = tie_pos.argmin(-1)  # ties to the smaller pos
    last = (length - 1).clamp_min(0)
    return active, torch.where(active, slot, last)


def _move_last_into_(k, v, pos, length, active, slot):
    """Evict ``slot`` of the active samples: the last live slot moves into it (O(Hkv·D) bytes);
    inactive samples copy their last slot onto itself."""
    b = torch.arange(pos.shape[0], device=pos.device)
    last = (length - 1).clamp_min(0)
    k[b, :, slot] = k[b, :, last]
    v[b, :, slot] = v[b, :, last]
    pos[b, slot] = pos[b, last]
    length.sub_(active.to(length.dtype))


def evict_lowest_(k, v, pos, length, n_seen, keep_fraction, n_protected, n_sink, slot_score):
    """Decode-time eviction, in place, with a caller-given per-slot score ``[B, S]`` (lowest goes;
    ties: smaller pos). Same contract as ``tgvkv.ops.decode_evict_``: live slots ``[0, length[b])``
    in any order, the first ``n_sink`` slots and the ``n_protected`` entries of largest ``pos``
    are never evicted, the evicted slot is overwritten by the last live slot.

    Returns the slot chosen per sample (``-1``: none), so stateful policies can follow the move.
    """
    active, slot = _lowest_candidate(pos, length, n_seen, keep_fraction, n_protected, n_sink,
                                     slot_score)
    _move_last_into_(k, v, pos, length, active, slot)
    return torch.where(active, slot, torch.full_like(slot, -1))


def decode_evict_(k, v, pos, length, q, n_seen, keep_fraction, n_protected, scale, n_sink=4):
    """Plain-PyTorch ``decode_evict_`` (same semantics as the op: move the last live slot).

    Shapes as in the README: k, v [B, Hkv, S, D]; pos [B, S]; length, n_seen, n_protected [B]
    int64; q [B, Hq, D]; keep_fraction [B] float64. Returns evicted [B] int64 (pos or -1).
    """
    att = decode_attention(q, k, length, scale)  # [B, S]
    active, slot = _lowest_candidate(pos, length, n_seen, keep_fraction, n_protected, n_sink, att)
    b = torch.arange(pos.shape[0], device=pos.device)
    evicted = torch.where(active, pos[b, slot], torch.full_like(length, -1))
    _move_last_into_(k, v, pos, length, active, slot)
    return evicted



def decode_evict_layers_(k_cache, v_cache, pos, length, queries, n_seen, keep_fraction,
                         n_protected, scale, n_sink=4):
    """Plain-PyTorch ``decode_evict_layers_``: :func:`decode_evict_` per layer (rows of the
    ``[L, B]`` tensors are views, updated in place)."""
    rows = [decode_evict_(k, v, p, length[l], q, n_seen, keep_fraction[l], n_protected[l], scale,
                          n_sink)
            for l, (k, v, p, q) in enumerate(zip(k_cache, v_cache, pos, queries))]
    return torch.stack(rows) if rows else length.new_full(tuple(length.shape), -1)


def decode_append_(k, v, pos, length, mask, k_new, v_new, position):
    """Plain-PyTorch ``decode_append_``: the new token scattered to slot ``length[b]`` of each
    sample (no host sync), the count incremented and the mask recomputed (six ATen ops). A
    ``length`` without a free slot is not detected (scatter_ raises on an index >= S)."""
    B, H, _, D = k.shape
    idx = length.view(B, 1, 1, 1)
    k.scatter_(2, idx.expand(B, H, 1, D), k_new)
    v.scatter_(2, idx.expand(B, H, 1, v.shape[3]), v_new)
    pos.scatter_(1, length.view(B, 1), position)
    length += 1
    M = mask.shape[1]
    torch.lt(torch.arange(M, device=mask.device), length.view(B, 1), out=mask)
    return None


__all__ = [
    "GuidanceMasks", "guidance_masks", "causal_allowed", "bias_from_allowed",
    "head_averaged_attention", "text_attention", "scores_from_attention", "score_text_vision",
    "gather_rows", "text_column_mass",
    "sample_facts", "layer_budgets", "select_keep", "compact", "evict_from_scores", "evict",
    "decode_attention", "evict_lowest_", "decode_evict_", "decode_evict_layers_", "decode_append_",
]
