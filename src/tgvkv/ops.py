"""Typed wrappers over ``torch.ops.tgvkv.*``, their fake (meta) kernels, and the fast modality helpers.

The ops themselves are implemented in C++ (``csrc/cpu``) and CUDA (``csrc/cuda``); their contract
is README.md "API" and their oracle ``tgvkv.reference``. Conventions:

- ``modality`` ``[B, N]`` int8: :data:`PAD` (0), :data:`TEXT` (1), :data:`VISION` (2) per cache slot.
- ``q_pos`` ``[B, T]`` int64: the slot of each guidance-text query row, valid rows first and strictly
  increasing, ``-1`` for unused rows (:func:`guidance_positions`).
- Small tensors (``q_pos``, ``modality``, counts) live on the device of ``k``.

Every wrapper is a thin call of the op (so it works under ``torch.compile(fullgraph=True)``); the
fake kernels below compute output shapes from input shapes only.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .constants import PAD, TEXT, VISION

_ops = torch.ops.tgvkv


# --------------------------------------------------------------------------------------------
# Modality map and guidance positions (vectorised; identical in output to tgvkv.reference)
# --------------------------------------------------------------------------------------------
def modality_map(input_ids: Tensor, vision_token_ids: Sequence[int],
                 attention_mask: Tensor | None = None) -> Tensor:
    """Modality of every prompt slot.

    Parameters
    ----------
    input_ids : Tensor
        ``[B, N]`` integer token ids, image/video placeholders already expanded.
    vision_token_ids : sequence of int
        The model's image/video placeholder ids (read from its config).
    attention_mask : Tensor, optional
        ``[B, N]``; ``0`` (or ``False``) marks padding.

    Returns
    -------
    Tensor
        ``[B, N]`` int8 of :data:`PAD` / :data:`TEXT` / :data:`VISION`, on ``input_ids.device``.

    Raises
    ------
    ValueError
        ``input_ids`` is not 2D, or ``attention_mask`` is not 2D of the same shape.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"tgvkv: input_ids must be [B, N], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and (attention_mask.dim() != 2
                                       or attention_mask.shape != input_ids.shape):
        raise ValueError("tgvkv: a 2D attention_mask of the same shape as input_ids is needed "
                         f"(got {tuple(attention_mask.shape)} vs {tuple(input_ids.shape)})")
    ids = [int(t) for t in vision_token_ids]
    if ids:
        vt = torch.tensor(ids, dtype=input_ids.dtype, device=input_ids.device)
        is_vis = torch.isin(input_ids, vt)
    else:
        is_vis = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    mod = torch.where(is_vis, VISION, TEXT).to(torch.int8)
    if attention_mask is not None:
        mod = mod.masked_fill(attention_mask.to(input_ids.device) == 0, PAD)
    return mod


def guidance_positions(modality: Tensor) -> Tensor:
    """Slots of the guidance-text queries: the non-pad slots after the last vision slot.

    Parameters
    ----------
    modality : Tensor
        ``[B, N]`` int8.

    Returns
    -------
    Tensor
        ``q_pos`` ``[B, T]`` int64 with ``T`` the largest guidance count in the batch (may be 0);
        each row lists its sample's guidance slots ascending, padded with ``-1``. A sample without
        a vision slot has no guidance set (SPEC §5: nothing to ground): its row is all ``-1``.
        (``T`` is data-dependent, so this reads one scalar back from the device.)
    """
    B, N = modality.shape
    dev = modality.device
    if B == 0 or N == 0:
        return torch.full((B, 0), -1, dtype=torch.int64, device=dev)
    idx = torch.arange(N, device=dev)
    last_vis = torch.where(modality == VISION, idx, -1).amax(dim=1)  # [B], -1 if none
    guid = (idx[None, :] > last_vis[:, None]) & (modality != PAD) & (last_vis >= 0)[:, None]
    counts = guid.sum(dim=1)
    T = int(counts.max())
    if T == 0:
        return torch.full((B, 0), -1, dtype=torch.int64, device=dev)
    # stable sort puts the guidance slots first, in ascending slot order
    order = torch.sort((~guid).to(torch.int8), dim=1, stable=True).indices[:, :T]
    valid = torch.arange(T, device=dev)[None, :] < counts[:, None]
    return torch.where(valid, order, -1).to(torch.int64)


# --------------------------------------------------------------------------------------------
# Op wrappers
# --------------------------------------------------------------------------------------------
_INT64 = (-2**63, 2**63 - 1)


def _int_arg(op: str, name: str, x) -> int:
    """A Python integer scalar argument of op (not a bool), in the int64 range of the schema."""
    if isinstance(x, bool) or not hasattr(x, "__index__"):
        raise TypeError(f"tgvkv::{op}: {name} must be an int, got {type(x).__name__} {x!r}")
    x = x.__index__()
    if not _INT64[0] <= x <= _INT64[1]:
        raise ValueError(f"tgvkv::{op}: {name} must fit in int64, got {x}")
    return x


def _float_arg(op: str, name: str, x) -> float:
    """A real scalar argument of op (not a bool or a string); range checks are the op's."""
    if isinstance(x, (bool, str, bytes)):
        raise TypeError(f"tgvkv::{op}: {name} must be a real number, got {type(x).__name__} {x!r}")
    try:
        return float(x)
    except (TypeError, ValueError):
        raise TypeError(f"tgvkv::{op}: {name} must be a real number, got {type(x).__name__} "
                        f"{x!r}") from None


def score_text_vision(q: Tensor, k: Tensor, q_pos: Tensor, modality: Tensor, scale: float,
                      text_score: str = "all_queries") -> tuple[Tensor, Tensor]:
    """Ranking scores and text-vision statistics of one layer (never N×N in memory).

    Parameters
    ----------
    q : Tensor
        fp32/fp16/bf16 post-RoPE queries; what it holds depends on ``text_score``:
        ``"all_queries"`` (default): ``[B, Hq, N, D]``, the query states of every slot (row ``i``
        is slot ``i``; pad rows are ignored); ``"guidance"``: ``[B, Hq, T, D]``, the guidance rows
        only (row ``t`` is slot ``q_pos[b, t]``).
    k : Tensor
        ``[B, Hkv, N, D]`` post-RoPE keys, same dtype as ``q``, ``Hq % Hkv == 0``.
    q_pos : Tensor
        ``[B, T]`` int64. modality : ``[B, N]`` int8.
    scale : float
        Softmax scale (usually ``D ** -0.5``).
    text_score : {"all_queries", "guidance"}
        Rows the text scores sum over (SPEC §1.3): all non-pad query rows ``i >= p`` (the
        released code; costs about ``N²·D/2`` multiply-adds per query head more) or the guidance
        rows only (cheaper; equal for text after the last vision slot).

    Returns
    -------
    scores : Tensor
        ``[B, N]`` fp32: vision slots get ``Σ_t w_t A[t, v]`` (guidance rows), text slots
        ``Σ_i A[i, p]`` over the rows ``text_score`` names, pad 0.
    stats : Tensor
        ``[B, 2]`` fp32: text->vision attention mass ``S`` and its mutual information ``I``
        (guidance rows, the same in both modes; ``I`` is 0 exactly when the sample has one
        guidance row or one vision slot).
    """
    return _ops.score_text_vision(q, k, q_pos, modality,
                                  _float_arg("score_text_vision", "scale", scale), text_score)


def layer_budgets(stats: Tensor, q_pos: Tensor, modality: Tensor, keep_ratio: float,
                  budget: str = "mass", redistribute: bool = False,
                  n_sink: int = 4) -> tuple[Tensor, Tensor]:
    """Per-layer keep counts (SPEC §2).

    Parameters
    ----------
    stats : Tensor
        ``[L, B, 2]`` fp32 ``(S, I)`` of every layer. q_pos : ``[B, T]``. modality : ``[B, N]``.
    keep_ratio : float
        κ in ``(0, 1]``.
    budget : {"mass", "mi"}
        Share ∝ ``S`` or ∝ ``S·I``.
    redistribute : bool
        Hand the excess of layers clamped at ``N_b`` to the others, iteratively.
    n_sink : int
        Sink count (never evicted).

    Returns
    -------
    keep : Tensor
        ``[L, B]`` int64 kept real slots (``N_b`` for samples that are not evicted).
    keep_fraction : Tensor
        ``[L, B]`` float64 ``1 - r_l`` (1.0 for samples that are not evicted).
    """
    op = "layer_budgets"
    return _ops.layer_budgets(stats, q_pos, modality, _float_arg(op, "keep_ratio", keep_ratio),
                              budget, bool(redistribute), _int_arg(op, "n_sink", n_sink))


def select_keep(scores: Tensor, keep: Tensor, q_pos: Tensor, modality: Tensor,
                n_sink: int = 4) -> tuple[Tensor, Tensor]:
    """Kept slots of every layer, ascending (SPEC §3).

    Parameters
    ----------
    scores : Tensor
        ``[L, B, N]`` fp32 (finite at non-pad slots). keep : ``[L, B]`` int64.
    q_pos : Tensor
        ``[B, T]`` int64. modality : ``[B, N]`` int8. n_sink : int.

    Returns
    -------
    keep_idx : Tensor
        ``[L, B, N]`` int64, kept slots ascending then ``-1``.
    n_protected : Tensor
        ``[L, B]`` int64, kept slots at or after the first guidance slot (at least 1).
    """
    return _ops.select_keep(scores, keep, q_pos, modality,
                            _int_arg("select_keep", "n_sink", n_sink))


def compact_(k: Tensor, v: Tensor, keep_idx: Tensor) -> Tensor:
    """In place: ``k[b, h, s] = k[b, h, keep_idx[b, s]]`` (and ``v``) for the kept entries.

    Parameters
    ----------
    k, v : Tensor
        ``[B, Hkv, N, D]`` and ``[B, Hkv, N, Dv]``, modified in place.
    keep_idx : Tensor
        ``[B, M]`` int64, kept slots strictly increasing, ``-1`` for unused entries.

    Returns
    -------
    Tensor
        ``n_kept`` ``[B]`` int64. Slots at and after ``n_kept[b]`` are unspecified.
    """
    return _ops.compact_(k, v, keep_idx)


def evict_from_scores(k_cache: Sequence[Tensor], v_cache: Sequence[Tensor], scores: Tensor,
                      stats: Tensor, q_pos: Tensor, modality: Tensor, keep_ratio: float,
                      budget: str = "mass", redistribute: bool = False,
                      n_sink: int = 4) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Budgets, selection and in-place compaction of a whole cache from precomputed scores.

    Parameters
    ----------
    k_cache, v_cache : sequence of Tensor
        ``L`` tensors ``[B, Hkv, N, D]`` (or empty lists: indices only), compacted in place.
    scores : Tensor
        ``[L, B, N]`` fp32. stats : ``[L, B, 2]`` fp32. q_pos, modality, keep_ratio, budget,
        redistribute, n_sink : as in :func:`layer_budgets` / :func:`select_keep`.

    Returns
    -------
    keep_idx : ``[L, B, N]`` int64. n_kept : ``[L, B]`` int64. n_protected : ``[L, B]`` int64.
    keep_fraction : ``[L, B]`` float64.
    """
    op = "evict_from_scores"
    return _ops.evict_from_scores(list(k_cache), list(v_cache), scores, stats, q_pos, modality,
                                  _float_arg(op, "keep_ratio", keep_ratio), budget,
                                  bool(redistribute), _int_arg(op, "n_sink", n_sink))


def evict(k_cache: Sequence[Tensor], v_cache: Sequence[Tensor], queries: Sequence[Tensor],
          q_pos: Tensor, modality: Tensor, scale: float, keep_ratio: float,
          budget: str = "mass", redistribute: bool = False, n_sink: int = 4,
          text_score: str = "all_queries") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The whole TGV-KV prefill eviction of a cache of ``L`` layers, **in place**.

    A sample is not evicted (keeps all real slots) when it has no vision slot, no guidance text
    (the prompt ends with a vision token), ``N_b <= n_sink + 1``, or ``keep_ratio == 1``.

    Parameters
    ----------
    k_cache, v_cache : sequence of Tensor
        ``L`` tensors ``[B, Hkv, N, D]``, compacted in place (kept slots first, ascending).
    queries : sequence of Tensor
        ``L`` tensors, the post-RoPE queries of each layer: ``[B, Hq, N, D]`` (every slot) for
        ``text_score="all_queries"`` (default), ``[B, Hq, T, D]`` (guidance rows) for
        ``"guidance"`` (see :func:`score_text_vision`).
    q_pos : Tensor
        ``[B, T]`` int64. modality : ``[B, N]`` int8.
    scale : float
        Softmax scale. keep_ratio : κ in ``(0, 1]``. budget : ``"mass"`` or ``"mi"``.
    redistribute : bool
        See :func:`layer_budgets`. n_sink : int, sink count.
    text_score : {"all_queries", "guidance"}
        See :func:`score_text_vision`.

    Returns
    -------
    keep_idx : ``[L, B, N]`` int64. n_kept : ``[L, B]`` int64. n_protected : ``[L, B]`` int64.
    keep_fraction : ``[L, B]`` float64.
    """
    op = "evict"
    return _ops.evict(list(k_cache), list(v_cache), list(queries), q_pos, modality,
                      _float_arg(op, "scale", scale), _float_arg(op, "keep_ratio", keep_ratio),
                      budget, bool(redistribute), _int_arg(op, "n_sink", n_sink), text_score)


def decode_evict_(k: Tensor, v: Tensor, pos: Tensor, length: Tensor, q: Tensor, n_seen: Tensor,
                  keep_fraction: Tensor, n_protected: Tensor, scale: float,
                  n_sink: int = 4) -> Tensor:
    """One decode-time eviction step of one layer, in place (SPEC §4).

    Parameters
    ----------
    k, v : Tensor
        ``[B, Hkv, S, D]``, live slots ``[0, length[b])`` (any order), modified in place.
    pos : Tensor
        ``[B, S]`` int64 original position of each slot, modified in place.
    length : Tensor
        ``[B]`` int64 live slot counts, modified in place.
    q : Tensor
        ``[B, Hq, D]`` post-RoPE query of the newest token.
    n_seen : ``[B]`` int64 tokens seen. keep_fraction : ``[B]`` float64. n_protected : ``[B]``
        int64. scale : float. n_sink : int.

    Returns
    -------
    Tensor
        ``[B]`` int64: the evicted ``pos`` per sample, or ``-1``. The evicted slot is refilled
        with the last live slot (O(Hkv·D) bytes moved).
    """
    op = "decode_evict_"
    return _ops.decode_evict_(k, v, pos, length, q, n_seen, keep_fraction, n_protected,
                              _float_arg(op, "scale", scale), _int_arg(op, "n_sink", n_sink))


def decode_evict_layers_(k_cache: Sequence[Tensor], v_cache: Sequence[Tensor],
                         pos: Sequence[Tensor], length: Tensor, queries: Sequence[Tensor],
                         n_seen: Tensor, keep_fraction: Tensor, n_protected: Tensor,
                         scale: float, n_sink: int = 4) -> Tensor:
    """One decode-time eviction step of a whole cache (all L layers), in place: one op call per
    generated token (SPEC §4); layer ``l`` gets exactly :func:`decode_evict_` of its slices.

    Parameters
    ----------
    k_cache, v_cache : L tensors ``[B, Hkv, S_l, D]`` (``S_l`` may differ per layer), live slots
        ``[0, length[l, b])`` in any order, modified in place.
    pos : L tensors ``[B, S_l]`` int64, original position of each slot, modified in place.
    length : ``[L, B]`` int64 live slot counts, modified in place.
    queries : L tensors ``[B, Hq, D]``, post-RoPE query of the newest token per layer.
    n_seen : ``[B]`` int64 tokens seen. keep_fraction : ``[L, B]`` float64.
    n_protected : ``[L, B]`` int64. scale : float. n_sink : int.

    Returns
    -------
    Tensor
        ``[L, B]`` int64: the evicted ``pos`` per layer and sample, or ``-1``.
    """
    return _ops.decode_evict_layers_(list(k_cache), list(v_cache), list(pos), length,
                                     list(queries), n_seen, keep_fraction, n_protected,
                                     float(scale), int(n_sink))


def decode_append_(k: Tensor, v: Tensor, pos: Tensor, length: Tensor, mask: Tensor,
                   k_new: Tensor, v_new: Tensor, position: int) -> None:
    """The cache append of one decode step of one layer, **in place** (before its attention).

    Per sample ``b`` with ``n = length[b]``: ``k[b, :, n] = k_new[b, :, 0]``, ``v[b, :, n] =
    v_new[b, :, 0]``, ``pos[b, n] = position``, ``length[b] = n + 1``; then the live-slot mask
    ``mask[b, s] = s < length[b]`` for every column ``s < M``. One op for what is otherwise six
    (three scatters, an increment, a compare, an arange).

    Parameters
    ----------
    k, v : Tensor
        ``[B, Hkv, S, D]`` / ``[B, Hkv, S, Dv]`` (any strides), live slots ``[0, length[b])``.
    pos : ``[B, S]`` int64. length : ``[B]`` int64 (any stride: e.g. a row of an ``[L, B]``
        tensor). mask : ``[B, M]`` bool, ``M <= S`` (e.g. ``buf[:, 0, 0, :M]`` of a
        ``[B, 1, 1, S]`` attention-mask buffer).
    k_new, v_new : Tensor
        ``[B, Hkv, 1, D]`` / ``[B, Hkv, 1, Dv]`` in ``k``'s dtype: the new token's key / value.
    position : int
        The new token's original (padded) position, stored in ``pos``.

    CPU raises when a sample has no free slot (``length[b]`` outside ``[0, S)``), before
    writing; CUDA cannot read the lengths without a host sync: such a sample is not written.
    """
    _ops.decode_append_(k, v, pos, length, mask, k_new, v_new,
                        _int_arg("decode_append_", "position", position))


# --------------------------------------------------------------------------------------------
# Fake kernels: output shapes from input shapes (torch.compile / meta tensors / opcheck)
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# Fake kernels: output shapes from input shapes, after the checks that need no data (so that a
# torch.compile trace refuses what the real op refuses). The C++ op_args layer is the full set;
# this mirrors its shape, dtype and device rules by named dimensions ("B Hkv N D"): a letter
# bound by one argument must match in the others (lowercase letters are per tensor).
# --------------------------------------------------------------------------------------------
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


class _FakeCheck:
    def __init__(self, op: str):
        self.op, self.dims, self.device = op, {}, None

    def __call__(self, t, name: str, layout: str, dtypes=None, scope=None):
        op = f"tgvkv::{self.op}"
        letters = layout.split()
        if not isinstance(t, Tensor):
            raise RuntimeError(f"{op}: '{name}' must be a tensor, got {type(t).__name__}")
        if t.dim() != len(letters):
            raise RuntimeError(f"{op}: '{name}' must have {len(letters)} dims [{', '.join(letters)}]"
                               f", got shape {list(t.shape)}")
        if dtypes is not None and t.dtype not in dtypes:
            raise RuntimeError(f"{op}: '{name}' must be "
                               f"{' or '.join(str(d).replace('torch.', '') for d in dtypes)}, "
                               f"got {str(t.dtype).replace('torch.', '')}")
        if self.device is None:
            self.device = (name, t.device)
        elif t.device != self.device[1]:
            raise RuntimeError(f"{op}: '{name}' must be on the device of '{self.device[0]}' "
                               f"({self.device[1]}), got {t.device}")
        bound = self.dims if scope is None else scope
        for d, letter in enumerate(letters):
            if letter.isdigit():
                want = (int(letter), "")
            elif letter in bound:
                want = bound[letter]
            elif letter in self.dims:
                want = self.dims[letter]
            else:
                bound[letter] = (t.shape[d], name)
                continue
            if t.shape[d] != want[0]:
                src = f" (from '{want[1]}')" if want[1] else ""
                raise RuntimeError(f"{op}: '{name}' dim {d} ({letter}) must be {want[0]}{src}, "
                                   f"got shape {list(t.shape)}")

    def same_dtype(self, t, ref, name: str, ref_name: str):
        if t.dtype != ref.dtype:
            raise RuntimeError(f"tgvkv::{self.op}: '{name}' must have the dtype of '{ref_name}' "
                               f"({str(ref.dtype).replace('torch.', '')}), got "
                               f"{str(t.dtype).replace('torch.', '')}")

    def kv(self, k, v, k_name="k", v_name="v", slots="S", scope=None):
        """A float K ``[B, Hkv, slots, D]`` and its V ``[B, Hkv, slots, Dv]`` of K's dtype."""
        self(k, k_name, f"B Hkv {slots} D", _FLOAT, scope=scope)
        self(v, v_name, f"B Hkv {slots} Dv", scope=scope)
        self.same_dtype(v, k, v_name, k_name)

    def small(self, q_pos, modality):
        self(modality, "modality", "B N", (torch.int8,))
        self(q_pos, "q_pos", "B T", (torch.int64,))

    def text_score(self, text_score) -> str:
        """Validates ``text_score``; returns the query layout it implies ("B Hq N D" / "B Hq T D")."""
        if text_score not in ("all_queries", "guidance"):
            raise ValueError(f"tgvkv::{self.op}: text_score must be \"all_queries\" or "
                             f"\"guidance\", got {text_score!r}")
        return "B Hq N D" if text_score == "all_queries" else "B Hq T D"

    def cache(self, k_cache, v_cache, queries=None, q_layout="B Hq T D"):
        if len(k_cache) != len(v_cache):
            raise RuntimeError(f"tgvkv::{self.op}: 'k_cache' and 'v_cache' must have the same "
                               f"number of layers, got {len(k_cache)} and {len(v_cache)}")
        for l, (k, v) in enumerate(zip(k_cache, v_cache)):
            layer = {}
            self.kv(k, v, f"k_cache[{l}]", f"v_cache[{l}]", "N", scope=layer)
            if queries is not None:
                self(queries[l], f"queries[{l}]", q_layout, scope=layer)
                self.same_dtype(queries[l], k, f"queries[{l}]", f"k_cache[{l}]")


@torch.library.register_fake("tgvkv::score_text_vision")
def _score_text_vision_fake(q, k, q_pos, modality, scale, text_score="all_queries"):
    c = _FakeCheck("score_text_vision")
    q_layout = c.text_score(text_score)
    c.small(q_pos, modality)
    c(k, "k", "B Hkv N D", _FLOAT)
    c(q, "q", q_layout)
    c.same_dtype(q, k, "q", "k")
    B, N = k.shape[0], k.shape[2]
    return (k.new_empty((B, N), dtype=torch.float32), k.new_empty((B, 2), dtype=torch.float32))


@torch.library.register_fake("tgvkv::layer_budgets")
def _layer_budgets_fake(stats, q_pos, modality, keep_ratio, budget="mass", redistribute=False,
                        n_sink=4):
    c = _FakeCheck("layer_budgets")
    c.small(q_pos, modality)
    c(stats, "stats", "L B 2", (torch.float32,))
    L, B = stats.shape[0], stats.shape[1]
    return (modality.new_empty((L, B), dtype=torch.int64),
            modality.new_empty((L, B), dtype=torch.float64))


@torch.library.register_fake("tgvkv::select_keep")
def _select_keep_fake(scores, keep, q_pos, modality, n_sink=4):
    c = _FakeCheck("select_keep")
    c.small(q_pos, modality)
    c(scores, "scores", "L B N", (torch.float32,))
    c(keep, "keep", "L B", (torch.int64,))
    L, B, N = scores.shape
    return (modality.new_empty((L, B, N), dtype=torch.int64),
            modality.new_empty((L, B), dtype=torch.int64))


@torch.library.register_fake("tgvkv::compact_")
def _compact_fake(k, v, keep_idx):
    c = _FakeCheck("compact_")
    c.kv(k, v, slots="N")
    c(keep_idx, "keep_idx", "B N", (torch.int64,))
    return keep_idx.new_empty((k.shape[0],), dtype=torch.int64)


def _evict_outputs(L, modality):
    B, N = modality.shape
    return (modality.new_empty((L, B, N), dtype=torch.int64),
            modality.new_empty((L, B), dtype=torch.int64),
            modality.new_empty((L, B), dtype=torch.int64),
            modality.new_empty((L, B), dtype=torch.float64))


@torch.library.register_fake("tgvkv::evict_from_scores")
def _evict_from_scores_fake(k_cache, v_cache, scores, stats, q_pos, modality, keep_ratio,
                            budget="mass", redistribute=False, n_sink=4):
    c = _FakeCheck("evict_from_scores")
    c.small(q_pos, modality)
    c(scores, "scores", "L B N", (torch.float32,))
    c(stats, "stats", "L B 2", (torch.float32,))
    if k_cache and len(k_cache) != scores.shape[0]:
        raise RuntimeError(f"tgvkv::evict_from_scores: 'k_cache' must have L = {scores.shape[0]} "
                           f"layers (or none), got {len(k_cache)}")
    c.cache(k_cache, v_cache)
    return _evict_outputs(scores.shape[0], modality)


@torch.library.register_fake("tgvkv::evict")
def _evict_fake(k_cache, v_cache, queries, q_pos, modality, scale, keep_ratio, budget="mass",
                redistribute=False, n_sink=4, text_score="all_queries"):
    c = _FakeCheck("evict")
    q_layout = c.text_score(text_score)
    c.small(q_pos, modality)
    if len(queries) != len(k_cache):
        raise RuntimeError(f"tgvkv::evict: 'queries' must have one tensor per layer of 'k_cache' "
                           f"({len(k_cache)}), got {len(queries)}")
    c.cache(k_cache, v_cache, queries, q_layout)
    return _evict_outputs(len(k_cache), modality)


@torch.library.register_fake("tgvkv::decode_evict_")
def _decode_evict_fake(k, v, pos, length, q, n_seen, keep_fraction, n_protected, scale,
                       n_sink=4):
    c = _FakeCheck("decode_evict_")
    c.kv(k, v)
    c(q, "q", "B Hq D")
    c.same_dtype(q, k, "q", "k")
    c(pos, "pos", "B S", (torch.int64,))
    for t, name, dt in ((length, "length", torch.int64), (n_seen, "n_seen", torch.int64),
                        (keep_fraction, "keep_fraction", torch.float64),
                        (n_protected, "n_protected", torch.int64)):
        c(t, name, "B", (dt,))
    return k.new_empty((k.shape[0],), dtype=torch.int64)


@torch.library.register_fake("tgvkv::decode_evict_layers_")
def _decode_evict_layers_fake(k_cache, v_cache, pos, length, queries, n_seen, keep_fraction,
                              n_protected, scale, n_sink=4):
    op = "tgvkv::decode_evict_layers_"
    L = len(k_cache)
    for name, lst in (("v_cache", v_cache), ("pos", pos), ("queries", queries)):
        if len(lst) != L:
            raise RuntimeError(f"{op}: '{name}' must have one tensor per layer of 'k_cache' "
                               f"({L}), got {len(lst)}")
    c = _FakeCheck("decode_evict_layers_")
    c(length, "length", "L B", (torch.int64,))
    c(n_seen, "n_seen", "B", (torch.int64,))
    c(keep_fraction, "keep_fraction", "L B", (torch.float64,))
    c(n_protected, "n_protected", "L B", (torch.int64,))
    for l in range(L):
        layer = {}  # Hkv, S, D, Dv, Hq are per layer; B and L come from length
        c.kv(k_cache[l], v_cache[l], f"k_cache[{l}]", f"v_cache[{l}]", scope=layer)
        c.same_dtype(k_cache[l], k_cache[0], f"k_cache[{l}]", "k_cache[0]")
        c(queries[l], f"queries[{l}]", "B Hq D", scope=layer)
        c.same_dtype(queries[l], k_cache[l], f"queries[{l}]", f"k_cache[{l}]")
        c(pos[l], f"pos[{l}]", "B S", (torch.int64,), scope=layer)
        if queries[l].shape[1] % max(k_cache[l].shape[1], 1) or k_cache[l].shape[1] == 0:
            raise RuntimeError(f"{op}: 'queries[{l}]' heads ({queries[l].shape[1]}) must be a "
                               f"positive multiple of 'k_cache[{l}]' heads ({k_cache[l].shape[1]})")
    return length.new_empty(tuple(length.shape), dtype=torch.int64)


@torch.library.register_fake("tgvkv::decode_append_")
def _decode_append_fake(k, v, pos, length, mask, k_new, v_new, position):
    c = _FakeCheck("decode_append_")
    c.kv(k, v)
    c(k_new, "k_new", "B Hkv 1 D")
    c.same_dtype(k_new, k, "k_new", "k")
    c(v_new, "v_new", "B Hkv 1 Dv")
    c.same_dtype(v_new, k, "v_new", "k")
    c(pos, "pos", "B S", (torch.int64,))
    c(length, "length", "B", (torch.int64,))
    c(mask, "mask", "B M", (torch.bool,))
    if mask.shape[1] > k.shape[2]:
        raise RuntimeError(f"tgvkv::decode_append_: 'mask' covers {mask.shape[1]} slots, more "
                           f"than the S = {k.shape[2]} slots of 'k'")
    if position < 0:
        raise ValueError(f"tgvkv::decode_append_: 'position' must be >= 0 (the new token's "
                         f"position), got {position}")
    return None


__all__ = [
    "PAD", "TEXT", "VISION", "modality_map", "guidance_positions", "score_text_vision",
    "layer_budgets", "select_keep", "compact_", "evict_from_scores", "evict", "decode_evict_",
    "decode_evict_layers_", "decode_append_",
]
