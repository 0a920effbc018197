"""The TGV-KV policy: its configuration and the small extension point the model layer calls.

The policy decides *what* is kept; ``tgvkv.ops`` decide *how fast*; ``tgvkv.hf`` decides *where
it plugs in*. The model layer (:mod:`tgvkv.hf`) never looks inside a policy: during prefill it hands
every decoder layer's post-RoPE queries and keys to :meth:`Policy.layer_scores`, after the last layer
it calls :meth:`Policy.evict` once for the whole cache, and after every decode step it calls
:meth:`Policy.decode_step_layers` once for all layers (by default one ``decode_evict_layers_``
call; :meth:`Policy.decode_step` per layer for policies that override it). A baseline (H2O, SnapKV, StreamingLLM, PyramidKV, random, ...)
is a subclass that overrides some of these hooks and reuses the same wiring::

    class Random(tgvkv.Policy):
        def layer_scores(self, layer_idx, q, k, q_pos, modality, scale):
            B, N = modality.shape
            return torch.rand(B, N, device=k.device), torch.ones(B, 2, device=k.device)

    with tgvkv.apply(model, Random(keep_ratio=0.1)):
        model.generate(**inputs)

Hooks (shapes as in the README's API table; ``L`` layers, ``B`` samples, ``N`` padded prompt slots):

- ``guidance(modality) -> q_pos [B, T]``: the query rows that ground the ranking (default: the SPEC's
  guidance text, :func:`tgvkv.ops.guidance_positions`).
- ``layer_scores(layer_idx, q, k, q_pos, modality, scale) -> (scores [B, N] f32, stats [B, 2] f32)``:
  ``q`` is the layer's **full** post-RoPE query states ``[B, Hq, N, D]`` (gather the rows you need;
  ``q_pos`` lists the guidance rows), ``k`` its post-RoPE keys ``[B, Hkv, N, D]``.
- ``budgets(stats [L, B, 2], q_pos, modality) -> (keep [L, B] i64, keep_fraction [L, B] f64)``:
  per-layer keep counts and the decode-time target fraction (1.0: never evict while decoding).
- ``select(scores [L, B, N], keep, q_pos, modality) -> (keep_idx [L, B, N], n_protected [L, B])``:
  kept slots ascending (-1 padded) and the protected suffix length used while decoding.
- ``evict(k_cache, v_cache, scores, stats, q_pos, modality)``: budgets + select + in-place
  compaction of the L layers; returns ``(keep_idx, n_kept, n_protected, keep_fraction)``.
- ``decode_step(layer_idx, k, v, pos, length, q, n_seen, keep_fraction, n_protected, scale)``:
  at most one in-place eviction per sample after a decode step (default: ``decode_evict_``).
- ``decode_step_layers(k_cache, v_cache, pos, length [L, B], queries, n_seen, keep_fraction
  [L, B], n_protected [L, B], scale)``: what the model layer calls once per decode step, after
  the forward; default: one ``decode_evict_layers_`` call for all layers, or ``decode_step`` per
  layer when a subclass overrides that.
- ``evicts(q_pos, modality) -> bool``: whether prefill eviction can change anything for this batch;
  when it returns False the model runs exactly as unpatched (bit for bit).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from . import ops as _default_ops
from . import torch_impl
from .constants import BUDGET_MODES, MAX_N_SINK, TEXT, TEXT_SCORE_MODES, VISION

__all__ = ["Policy", "TGVKV", "guidance_attention"]


def _on(t: torch.Tensor, device) -> torch.Tensor:
    return t if t.device == device else t.to(device)


# ---- field validation (shared by every policy, tgvkv.presses included) -----------------------
# Each check raises a ValueError naming the class, the field, what is expected and the value:
#   TGVKV.n_sink must be an int in [0, 2**31 - 1], got 1180591620717411303424
# bool is refused where a number is expected (True is an int in Python, never a count here).
def fail_field(obj, name: str, expected: str, value) -> None:
    raise ValueError(f"{type(obj).__name__}.{name} must be {expected}, got {value!r}")


def check_bool(obj, name: str) -> None:
    """``obj.<name>`` is a bool (not 0/1, not a string)."""
    value = getattr(obj, name)
    if not isinstance(value, bool):
        fail_field(obj, name, "a bool", value)


def check_int(obj, name: str, lo: int | None = None, hi: int | None = None,
              expected: str | None = None) -> None:
    """``obj.<name>`` is an int (not a bool, not a float) in ``[lo, hi]`` (None: unbounded)."""
    value = getattr(obj, name)
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        fail_field(obj, name, expected or f"an int in {rng}", value)


def check_number(obj, name: str, lo: float, hi: float, lo_open: bool = False,
                 hi_open: bool = False) -> None:
    """``obj.<name>`` is a real number (int or float, not a bool) in the interval; NaN fails."""
    value = getattr(obj, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        x = float(value)
        ok = (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        fail_field(obj, name, f"a number in {rng}", value)


def check_choice(obj, name: str, choices) -> None:
    """``obj.<name>`` is one of the strings ``choices``."""
    value = getattr(obj, name)
    if not isinstance(value, str) or value not in choices:
        fail_field(obj, name, "one of " + ", ".join(repr(c) for c in choices), value)


class Policy:
    """Base class of an eviction policy (see the module docstring for the hooks).

    Parameters
    ----------
    keep_ratio : float in (0, 1]; the fraction kappa of the prompt's KV cache kept after prefill
        (averaged over layers). 1.0 keeps everything and the model runs exactly as unpatched.
    n_sink : first ``n_sink`` real slots of every sample are never evicted (nor is the last one).
    decode_evict : evict during decoding so that each layer keeps a constant fraction (SPEC §4).
    ops : the op implementation the hooks call (default :mod:`tgvkv.ops`, the compiled kernels;
        :mod:`tgvkv.reference` has the same functions, slowly, for tests).

    The configuration is validated once, when the policy is built (:meth:`validate`).
    """

    keep_ratio: float = 1.0
    n_sink: int = 4
    decode_evict: bool = True
    ops: Any = _default_ops

    def __init__(self, keep_ratio: float = 1.0, n_sink: int = 4, decode_evict: bool = True,
                 *, ops: Any = _default_ops):
        self.keep_ratio = keep_ratio
        self.n_sink = n_sink
        self.decode_evict = decode_evict
        self.ops = ops
        self.validate()

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field; a ValueError names the class, the field, the expectation and the
        value. Subclasses extend it with their own fields (call ``super().validate()``)."""
        check_number(self, "keep_ratio", 0.0, 1.0, lo_open=True)
        check_int(self, "n_sink", 0, MAX_N_SINK, "an int in [0, 2**31 - 1]")
        check_bool(self, "decode_evict")

    # ---- hooks --------------------------------------------------------------------------------
    def guidance(self, modality: torch.Tensor) -> torch.Tensor:
        return self.ops.guidance_positions(modality)

    def evicts(self, q_pos: torch.Tensor, modality: torch.Tensor) -> bool:
        """True when prefill eviction can drop something in at least one sample (one host sync)."""
        if float(self.keep_ratio) >= 1.0:
            return False
        _, evicts = torch_impl.sample_facts(_on(q_pos, modality.device), modality, self.n_sink)
        return bool(evicts.any())

    def layer_scores(self, layer_idx, q, k, q_pos, modality, scale):
        raise NotImplementedError

    def budgets(self, stats, q_pos, modality):
        return self.ops.layer_budgets(stats, q_pos, modality, float(self.keep_ratio), "mass",
                                      False, self.n_sink)

    def select(self, scores, keep, q_pos, modality):
        return self.ops.select_keep(scores, keep, q_pos, modality, self.n_sink)

    def evict(self, k_cache, v_cache, scores, stats, q_pos, modality):
        keep, frac = self.budgets(stats, q_pos, modality)
        keep_idx, n_prot = self.select(scores, keep, q_pos, modality)
        n_kept = torch.stack([_on(self.ops.compact_(k, v, _on(keep_idx[l], k.device)), k.device)
                              for l, (k, v) in enumerate(zip(k_cache, v_cache))])
        return keep_idx, n_kept, n_prot, frac

    def decode_step(self, layer_idx, k, v, pos, length, q, n_seen, keep_fraction, n_protected,
                    scale):
        if not self.decode_evict:
            return None
        return self.ops.decode_evict_(k, v, pos, length, q, n_seen, keep_fraction,
                                      n_protected, float(scale), self.n_sink)

    def decode_step_layers(self, k_cache, v_cache, pos, length, queries, n_seen, keep_fraction,
                           n_protected, scale):
        """The decode step of every layer at once, after the model's forward of one token.

        Equivalent to calling :meth:`decode_step` for each layer right after its attention (a
        layer's eviction touches only that layer's cache). Default: one
        ``decode_evict_layers_`` call for the whole cache; a subclass that overrides
        :meth:`decode_step` gets one call of it per layer (``length[l]``, ``keep_fraction[l]``,
        ``n_protected[l]`` are views of the ``[L, B]`` tensors, updated in place).
        """
        fused = getattr(self.ops, "decode_evict_layers_", None)
        if type(self).decode_step is not Policy.decode_step or fused is None:
            return [self.decode_step(l, k, v, p, length[l], q, n_seen, keep_fraction[l],
                                     n_protected[l], scale)
                    for l, (k, v, p, q) in enumerate(zip(k_cache, v_cache, pos, queries))]
        if not self.decode_evict:
            return None
        return fused(k_cache, v_cache, pos, length, queries, n_seen, keep_fraction, n_protected,
                     float(scale), self.n_sink)


def ops_field():
    """The ``ops`` field of a policy dataclass: keyword-only, left out of repr and ==."""
    return field(default=_default_ops, kw_only=True, repr=False, compare=False)


def single_class(modality: torch.Tensor) -> torch.Tensor:
    """Text and vision in one ranking class (no text priority): vision slots relabelled text."""
    return torch.where(modality == VISION, torch.full_like(modality, TEXT), modality)


def gather_rows(q: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, N, D], q_pos [B, T] (-1 = unused) -> [B, Hq, T, D] (unused rows: row 0)."""
    B, Hq, _, D = q.shape
    idx = _on(q_pos, q.device).clamp(min=0)[:, None, :, None].expand(B, Hq, q_pos.shape[1], D)
    return torch.gather(q, 2, idx)


def guidance_attention(q_rows, k, q_pos, modality, scale):
    """Head-averaged causal fp32 attention of the guidance rows, [B, T, N]
    (:func:`tgvkv.torch_impl.text_attention`, T x N).

    Used by the ablations that need raw rows (``text_weighting=False``); the default path never
    materialises them.
    """
    q_pos, modality = _on(q_pos, k.device), _on(modality, k.device)
    return torch_impl.text_attention(q_rows, k, torch_impl.guidance_masks(q_pos, modality), scale)


@dataclass
class TGVKV(Policy):
    """TGV-KV (text-grounded KV eviction) configuration; defaults follow ``docs/method.md``.

    Parameters
    ----------
    keep_ratio : kappa in (0, 1]: the average fraction of the prompt's KV cache kept per layer.
    budget : "mass" (released behaviour: share ∝ text→vision attention mass S_l) or "mi"
        (experimental, not in the paper: share ∝ S_l · I_l, I the mutual information).
    redistribute : hand the excess of layers clamped at N to the other layers (off: released).
    n_sink : the first ``n_sink`` real positions (and the last prompt position) are never evicted.
    decode_evict : keep evicting one token per layer per decode step (SPEC §4).
    text_score : "all_queries" (default, the released code, SPEC §1.3): a text slot's score is
        its attention column sum over all N query rows, computed by the fused op from the layer's
        full queries (each row's softmax normaliser in the same pass, never N×N in memory; about
        ``N²·D/2`` more multiply-adds per query head). "guidance": the column sum over the
        guidance rows only (cheaper; identical for text after the last vision slot, different
        for text before it).
    no_vision : "keep": a sample without vision tokens (or without guidance text after the last
        vision token) is not evicted at all (SPEC §5). Only "keep" is implemented.
    text_weighting : TWR ablation switch. False: vision scores are plain column sums over the
        guidance queries instead of the text-weighted sums.
    text_priority : TPR ablation switch. False: text and vision compete on score alone.
    uniform_budgets : TVB ablation switch. True: every layer gets the same share 1/L.
    ops : keyword only; the op module the hooks call (default :mod:`tgvkv.ops`).
    """

    keep_ratio: float = 0.05
    budget: str = "mass"
    redistribute: bool = False
    n_sink: int = 4
    decode_evict: bool = True
    text_score: str = "all_queries"
    no_vision: str = "keep"
    text_weighting: bool = True
    text_priority: bool = True
    uniform_budgets: bool = False
    ops: Any = ops_field()

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        super().validate()
        check_choice(self, "budget", BUDGET_MODES)
        check_choice(self, "text_score", TEXT_SCORE_MODES)
        if not isinstance(self.no_vision, str):
            fail_field(self, "no_vision", "'keep'", self.no_vision)
        for name in ("redistribute", "text_weighting", "text_priority", "uniform_budgets"):
            check_bool(self, name)
        if self.no_vision != "keep":
            raise NotImplementedError(f"no_vision={self.no_vision!r}: only 'keep' (no eviction for "
                                      "samples without vision tokens) is implemented")

    def replace(self, **changes) -> "TGVKV":
        return dataclasses.replace(self, **changes)

    # ---- hooks --------------------------------------------------------------------------------
    @property
    def _fast(self) -> bool:
        return self.text_weighting and self.text_priority and not self.uniform_budgets

    def layer_scores(self, layer_idx, q, k, q_pos, modality, scale):
        q_pos_d, mod_d = _on(q_pos, k.device), _on(modality, k.device)
        rows = gather_rows(q, q_pos_d) if (self.text_score == "guidance"
                                           or not self.text_weighting) else None
        if self.text_score == "all_queries":  # the op reads every row of q (and gathers T itself)
            scores, stats = self.ops.score_text_vision(q, k, q_pos_d, mod_d, float(scale),
                                                       "all_queries")
        else:
            scores, stats = self.ops.score_text_vision(rows, k, q_pos_d, mod_d, float(scale),
                                                       "guidance")
        scores, stats = _on(scores, k.device), _on(stats, k.device)
        if not self.text_weighting:
            colsum = guidance_attention(rows, k, q_pos_d, mod_d, float(scale)).sum(1)
            scores = torch.where(mod_d == VISION, colsum, scores)
        return scores, stats

    def budgets(self, stats, q_pos, modality):
        if self.uniform_budgets:
            stats = torch.ones_like(stats)
        return self.ops.layer_budgets(stats, q_pos, modality, float(self.keep_ratio),
                                      self.budget, self.redistribute, self.n_sink)

    def select(self, scores, keep, q_pos, modality):
        if not self.text_priority:  # one class for every real slot: rank on score alone
            modality = single_class(modality)
        return self.ops.select_keep(scores, keep, q_pos, modality, self.n_sink)

    def evict(self, k_cache, v_cache, scores, stats, q_pos, modality):
        if not self._fast:
            return super().evict(k_cache, v_cache, scores, stats, q_pos, modality)
        return self.ops.evict_from_scores(
            k_cache, v_cache, scores, stats, q_pos, modality, float(self.keep_ratio), self.budget,
            self.redistribute, self.n_sink)
