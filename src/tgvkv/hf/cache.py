"""A transformers ``Cache`` that holds a TGV-KV-compacted KV cache.

Life of a :class:`TGVKVCache` in ``generate()``:

1. Prefill: it behaves exactly like ``DynamicCache`` (dense ``[B, Hkv, N, D]`` per layer, pads
   included) while the attention wrapper hands each layer's scores/statistics to it.
2. After the prefill forward (or lazily at the first decode update), :meth:`TGVKVCache.finalize`
   calls the policy once for the whole cache (budgets, selection, in-place compaction), then narrows
   each layer to its largest kept length over the batch and reallocates (``clone``), so the evicted
   memory is really freed. Layers are ragged across layers and across samples.
3. Decode: each new token is written at slot ``length[b]`` of its sample; live slots are
   ``[0, length[l, b])`` in any order (``pos`` records each slot's original padded position).
   The attention wrapper attends with a per-layer/per-sample boolean mask
   ``slot < length[l, b]`` (causality is trivial for a single new query), then runs the decode-time
   eviction in place.

Positions: ``get_seq_length()`` and ``get_mask_sizes()`` report the *virtual* length, i.e. what an
unpatched cache would hold (padded prompt length N + generated tokens), so ``cache_position``,
``position_ids``, the rope deltas of Qwen-VL M-RoPE and the 2D attention mask of ``generate`` go on
from the original N exactly as without eviction. The mask the model builds from these sizes is
ignored by the attention wrapper after compaction (it uses the cache's own per-layer mask).

When the policy cannot evict anything for a batch (``keep_ratio == 1``, no vision tokens, no
guidance text...), the cache stays in *passthrough* mode and the model runs bit for bit as unpatched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ..constants import PAD
from ..policy import Policy
from .modality import modality_map

log = logging.getLogger("tgvkv")

_REBOUND_EVERY = 16  # decode steps between host syncs that tighten the live-length upper bound


def _append_op(ops):
    """The decode-step cache append: ``ops.decode_append_`` of the policy's op module when it has
    one (tgvkv.ops: the fused op), else the plain-PyTorch composition."""
    from .. import torch_impl

    return getattr(ops, "decode_append_", None) or torch_impl.decode_append_


class TGVKVLayer(DynamicLayer):
    """One decoder layer's cache: dense during prefill, compacted and ragged afterwards."""

    is_croppable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.n_virtual = 0  # tokens an unpatched cache would hold (pads included)
        self.compacted = False
        self.length: torch.Tensor | None = None  # [B] int64 live slots
        self.pos: torch.Tensor | None = None  # [B, Cap] int64 original (padded) position per slot
        self.keep_fraction: torch.Tensor | None = None  # [B] float64 decode target fraction
        self.n_protected: torch.Tensor | None = None  # [B] int64 protected suffix length
        self.bound = 0  # host-side upper bound of length.max()
        # [B, 1, 1, bound] bool, live slots this step; None: all `bound` slots of every sample
        self.mask: torch.Tensor | None = None
        self._views: dict = {}
        self._host_lengths = False  # CPU cache: lengths readable without a device sync

    # ---- transformers layer API -------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        q_len = key_states.shape[-2]
        if not self.compacted:
            self.n_virtual += q_len
            return super().update(key_states, value_states, *args, **kwargs)
        if q_len != 1:
            raise NotImplementedError(
                "tgvkv: after eviction the cache accepts one new token per step (greedy/sampling "
                f"decode); got {q_len} tokens (chunked prefill, assisted or speculative decoding, "
                "or a second prompt on the same cache are not supported)")
        S = self.bound + 1
        if S > self.keys.shape[2]:
            self._grow(S)
        # one op: the new token to slot length[b] of each sample (K, V, pos), length += 1 and the
        # live-slot mask over the first `bound` slots (no host sync, nothing allocated); the views
        # of the step are reused while the bound stays (_view)
        self.bound = S
        kd = self.keys.dtype
        if key_states.dtype != kd:
            key_states, value_states = key_states.to(kd), value_states.to(self.values.dtype)
        self._append(self.keys, self.values, self.pos, self.length, self._view("append", S),
                     key_states, value_states, self.n_virtual)
        self.n_virtual += 1
        if self._host_lengths:
            # CPU: the lengths are host memory, reading them costs no sync: attend over exactly
            # the longest sample's slots, and without a mask when every sample has that many (a
            # masked SDPA costs ~2x an unmasked one at small shapes)
            if self.length.shape[0] == 1:
                lo = S = max(1, int(self.length))
            else:
                lo, S = (int(x) for x in self.length.aminmax())
                S = max(1, S)
            self.bound = S
            k, v, m = self._view("attend", S)
            self.mask = None if lo == S else m
        else:
            if self.n_virtual % _REBOUND_EVERY == 0:  # decode evictions shrink lengths: re-tighten
                self.bound = S = max(1, int(self.length.max()))
            k, v, self.mask = self._view("attend", S)
        return k, v

    def _view(self, kind: str, S: int):
        """The views of a decode step over the first ``S`` slots, made once per (kind, S) and
        reused while S stays (a layer at its decode-time fraction appends one slot and evicts one
        per step): a view costs ~5 us here (torch 2.13, CPU), several per layer and step.
        ``"append"``: the [B, S] mask view decode_append_ writes; ``"attend"``: (K [B, H, S, D],
        V, mask [B, 1, 1, S]) of the attention."""
        hit = self._views.get(kind)
        if hit is not None and hit[0] == S:
            return hit[1]
        if kind == "append":
            v = self._mask2d.narrow(1, 0, S)
        else:
            v = (self.keys.narrow(2, 0, S), self.values.narrow(2, 0, S),
                 self._mask_buf.narrow(3, 0, S))
        self._views[kind] = (S, v)
        return v

    def get_seq_length(self) -> int:
        return self.n_virtual

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        if not isinstance(query_length, int):  # some versions pass cache_position
            query_length = int(query_length.shape[0])
        return self.n_virtual + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.__init__()

    def crop(self, tokens_to_remove: int) -> None:
        if self.compacted:
            raise NotImplementedError("tgvkv: crop() of an evicted cache is not supported")
        super().crop(tokens_to_remove)
        self.n_virtual = self.keys.shape[-2] if self.keys is not None else 0

    def _select_batch(self, idx: torch.Tensor) -> None:
        self.keys = self.keys[idx]
        self.values = self.values[idx]
        if self.compacted:
            for name in ("length", "pos", "keep_fraction", "n_protected"):
                setattr(self, name, getattr(self, name)[idx])
            self._alloc_step_buffers()

    def reorder_cache(self, beam_idx):
        if self.keys is not None and self.keys.numel():
            self._select_batch(beam_idx.to(self.keys.device))

    def batch_select_indices(self, indices):
        if self.keys is not None and self.keys.numel():
            self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int):
        if self.keys is not None and self.keys.numel():
            idx = torch.arange(self.keys.shape[0], device=self.keys.device).repeat_interleave(repeats)
            self._select_batch(idx)

    # ---- compaction ---------------------------------------------------------------------------
    def _grow(self, need: int) -> None:
        cap = self.keys.shape[2]
        new_cap = max(need, cap + max(16, cap // 4))
        B, H, _, D = self.keys.shape
        # zeros, not empty: masked-out slots still enter SDPA's (0 * value) products, and garbage
        # NaN/inf there would poison the output
        k = self.keys.new_zeros(B, H, new_cap, D)
        v = self.values.new_zeros(B, H, new_cap, self.values.shape[-1])
        p = self.pos.new_full((B, new_cap), -1)
        k[:, :, :cap] = self.keys
        v[:, :, :cap] = self.values
        p[:, :cap] = self.pos
        self.keys, self.values, self.pos = k, v, p
        self._alloc_step_buffers()

    def _alloc_step_buffers(self) -> None:
        """The mask buffer [B, 1, 1, cap] of the decode steps (reallocated only when the capacity
        grows)."""
        B, _, cap, _ = self.keys.shape
        dev = self.keys.device
        self._mask_buf = torch.zeros(B, 1, 1, cap, dtype=torch.bool, device=dev)
        self._mask2d = self._mask_buf[:, 0, 0]  # [B, cap] view: what decode_append_ writes
        self._views = {}  # see _view(); the buffers were (re)allocated: no view of old ones

    def _compact_to(self, keep_idx_l, n_kept_l, n_kept_host, keep_fraction_l, n_protected_l,
                    ops=None):
        S = max(1, max(n_kept_host))
        dev = self.keys.device
        # narrow + clone: the dense prompt-length buffers are released
        self.keys = self.keys[:, :, :S].clone()
        self.values = self.values[:, :, :S].clone()
        self.pos = keep_idx_l[:, :S].to(dev, torch.int64).clone()
        self.length = n_kept_l.to(dev, torch.int64).clone()
        self.keep_fraction = keep_fraction_l.to(dev, torch.float64).clone()
        self.n_protected = n_protected_l.to(dev, torch.int64).clone()
        self.bound = S
        self.compacted = True
        self._append = _append_op(ops)
        self._host_lengths = dev.type == "cpu"
        self._alloc_step_buffers()


@dataclass(frozen=True)
class EvictionSummary:
    """What the prefill eviction of one ``generate()`` call did (``handle.summary()``).

    Attributes
    ----------
    evicted : False when the call ran unpatched (passthrough: ``keep_ratio == 1``, no vision
        token, no guidance text...); the counts then describe the full cache.
    kept, total : per layer, live slots after eviction / real prompt slots, summed over the batch.
    bytes_before, bytes_after : K and V bytes of all layers before and after compaction (the
        allocated tensors; after = the narrowed, reallocated buffers). Passthrough: both are the
        cache's bytes when ``summary()`` is called.
    evict_ms : wall time of the eviction (budgets, selection, compaction, reallocation). On CUDA
        it ends with the one host sync of the prefill, so it includes the kernels' time.
    keep_ratio : the ratio asked for; ``achieved`` = sum(kept) / sum(total).
    text_score : the policy's ``text_score`` ("all_queries" / "guidance"; None for a policy
        without one): which query rows ranked the text slots.
    """

    evicted: bool
    kept: tuple
    total: tuple
    bytes_before: int
    bytes_after: int
    evict_ms: float
    keep_ratio: float
    text_score: str | None = None

    @property
    def achieved(self) -> float:
        tot = sum(self.total)
        return sum(self.kept) / tot if tot else 1.0

    def __str__(self) -> str:
        head = (f"tgvkv: {'evicted' if self.evicted else 'no eviction (passthrough)'}: kept "
                f"{sum(self.kept)}/{sum(self.total)} slots over {len(self.kept)} layers (keep "
                f"ratio asked {self.keep_ratio:g}, achieved {self.achieved:.4f}); K/V "
                f"{_mib(self.bytes_before)} -> {_mib(self.bytes_after)}; eviction "
                f"{self.evict_ms:.2f} ms"
                + (f"; text score: {self.text_score}" if self.text_score else ""))
        rows = [f"  layer {l:>3}: kept {k:>7} / {t:<7} ({k / t if t else 1.0:.3f})"
                for l, (k, t) in enumerate(zip(self.kept, self.total))]
        return "\n".join([head] + rows)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


class TGVKVCache(DynamicCache):
    """KV cache driven by a :class:`tgvkv.Policy`; pass it as ``cache`` (``past_key_values``
    before transformers 5.24; ``tgvkv.apply`` does so inside ``generate``). One cache serves one
    prompt (one prefill, then decode steps).

    Parameters
    ----------
    num_layers : decoder layers of the language model.
    policy : the eviction policy.
    vision_ids : image/video placeholder ids from the model config.

    Attributes after prefill (for inspection and tests)
    ---------------------------------------------------
    modality [B, N] int8, q_pos [B, T], result = (keep_idx [L, B, N], n_kept [L, B],
    n_protected [L, B], keep_fraction [L, B]) or None when nothing was evicted (passthrough).
    """

    def __init__(self, num_layers: int, policy: Policy, vision_ids=(), runtime=None):
        Cache.__init__(self, layers=[TGVKVLayer() for _ in range(num_layers)])
        self.policy = policy
        self.vision_ids = tuple(vision_ids)
        self.runtime = runtime
        self.phase = "empty"  # empty -> prefill -> (done | passthrough)
        self.passthrough = True
        self.modality = None
        self.q_pos = None
        self.n_seen = None  # [B] int64 real tokens seen (prompt + generated)
        self.result = None
        self.bytes_before = None  # K/V bytes of the dense prefill cache
        self.evict_ms = None
        self._bytes_after = None
        self._scores: list = [None] * num_layers
        self._stats: list = [None] * num_layers
        # decode: [L, B] state whose rows are the layers' length / keep_fraction / n_protected
        self.length = self.keep_fraction = self.n_protected = None
        self._queries: list = [None] * num_layers  # this step's query [B, Hq, D] per layer
        self._scales: list = [None] * num_layers

    # ---- prefill ------------------------------------------------------------------------------
    def begin_prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if self.phase != "empty":
            raise NotImplementedError("tgvkv: a TGVKVCache serves one prompt; make a new cache "
                                      "(tgvkv.apply does so for every generate() call)")
        mod = modality_map(input_ids, self.vision_ids, attention_mask)
        self.modality = mod
        self.q_pos = self.policy.guidance(mod).to(mod.device)
        self.n_seen = (mod != PAD).sum(1).to(torch.int64)
        self.passthrough = not self.policy.evicts(self.q_pos, mod)
        self.phase = "passthrough" if self.passthrough else "prefill"

    def record_layer(self, layer_idx: int, scores: torch.Tensor, stats: torch.Tensor) -> None:
        self._scores[layer_idx] = scores
        self._stats[layer_idx] = stats

    def finalize(self) -> None:
        """Budgets + selection + compaction for all layers at once (after the prefill forward)."""
        if self.phase != "prefill":
            return
        missing = [l for l, s in enumerate(self._scores) if s is None]
        if missing:
            raise RuntimeError(f"tgvkv: no scores were recorded for layers {missing} during prefill "
                               "(was the model's attention implementation changed after patching?)")
        t0 = time.perf_counter()
        self.bytes_before = self.nbytes()
        dev = self.layers[0].keys.device
        scores = torch.stack([s.to(dev) for s in self._scores])
        stats = torch.stack([s.to(dev) for s in self._stats])
        self._scores = [None] * len(self._scores)
        self._stats = [None] * len(self._stats)
        k_cache = [layer.keys for layer in self.layers]
        v_cache = [layer.values for layer in self.layers]
        keep_idx, n_kept, n_prot, frac = self.policy.evict(
            k_cache, v_cache, scores, stats, self.q_pos.to(dev), self.modality.to(dev))
        n_kept_host = n_kept.tolist()  # the one host sync of the prefill
        for l, layer in enumerate(self.layers):
            layer._compact_to(keep_idx[l], n_kept[l], n_kept_host[l], frac[l], n_prot[l],
                              getattr(self.policy, "ops", None))
        self.result = (keep_idx, n_kept, n_prot, frac)
        self.n_seen = self.n_seen.to(dev)
        self._bind_decode_state()
        self.phase = "done"
        self.evict_ms = (time.perf_counter() - t0) * 1e3
        self._bytes_after = self.nbytes()
        if log.isEnabledFor(logging.INFO):
            log.info("%s", self.summary())

    # ---- decode -------------------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.phase == "passthrough":  # as DynamicCache (no offloading here): straight on
            return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)
        if self.phase == "empty":
            raise RuntimeError(
                "tgvkv: a TGVKVCache must be fed through the top-level forward/generate of a model "
                "patched with tgvkv.apply/tgvkv.patch (the prefill call builds the modality map); "
                "it was updated before any such call")
        if self.phase == "prefill" and self.layers[layer_idx].n_virtual > 0:
            self.finalize()  # lazily, when no post-forward hook ran
        if self.phase == "done":  # decode after compaction: straight to the layer
            if layer_idx == 0:
                self.n_seen += key_states.shape[-2]
            return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _bind_decode_state(self) -> None:
        """Stack the layers' length / keep_fraction / n_protected into [L, B] tensors (what the
        one decode-step op takes) and make each layer's attribute a view of its row, so the op's
        in-place updates and the layers' own (append, mask) are the same memory."""
        for name in ("length", "keep_fraction", "n_protected"):
            rows = [getattr(layer, name) for layer in self.layers]
            stacked = torch.stack(rows)
            setattr(self, name, stacked)
            for l, layer in enumerate(self.layers):
                setattr(layer, name, stacked[l])

    def capture_query(self, layer_idx: int, q: torch.Tensor, scale: float) -> None:
        """Called by the attention function of a decode step: the layer's query [B, Hq, D] (a
        view, no copy); after the last layer, the decode-time eviction of every layer runs."""
        self._queries[layer_idx] = q
        self._scales[layer_idx] = float(scale)
        if layer_idx == len(self.layers) - 1:
            self.decode_step()

    def decode_step(self) -> None:
        """One decode-time eviction for all layers (policy.decode_step_layers: by default one
        decode_evict_layers_ call), after every layer attended with the cache of this step.
        Equivalent to evicting each layer right after its own attention: a layer's eviction
        touches only its own cache, and the next step reads it only after this one."""
        qs, scales = self._queries, self._scales
        missing = [l for l, q in enumerate(qs) if q is None]
        if missing:
            raise RuntimeError(f"tgvkv: layers {missing} did not attend in this decode step (was "
                               "the model's attention implementation changed after patching?)")
        self._queries = [None] * len(qs)
        layers = self.layers
        k = [layer.keys for layer in layers]
        v = [layer.values for layer in layers]
        pos = [layer.pos for layer in layers]
        if scales.count(scales[0]) != len(scales):  # layers with their own scaling: one by one
            for l, layer in enumerate(layers):
                self.policy.decode_step_layers(k[l:l + 1], v[l:l + 1], pos[l:l + 1],
                                               self.length[l:l + 1], qs[l:l + 1], self.n_seen,
                                               self.keep_fraction[l:l + 1],
                                               self.n_protected[l:l + 1], scales[l])
            return
        self.policy.decode_step_layers(k, v, pos, self.length, qs, self.n_seen,
                                       self.keep_fraction, self.n_protected, scales[0])

    def _batch_state(self, idx):
        for name in ("modality", "q_pos", "n_seen"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[idx.to(t.device)])
        if self.length is not None:  # the layers reindexed their rows: stack them again
            self._bind_decode_state()

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self._batch_state(beam_idx)

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self._batch_state(indices)

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.modality is not None:
            idx = torch.arange(self.modality.shape[0]).repeat_interleave(repeats)
            self._batch_state(idx)

    # ---- inspection -----------------------------------------------------------------------------
    def summary(self) -> EvictionSummary:
        """Kept / total slots per layer, K/V bytes before and after, eviction time (see
        :class:`EvictionSummary`). Reflects the prefill eviction (decode-time evictions keep each
        layer at its fraction afterwards)."""
        if self.modality is None:
            raise RuntimeError("tgvkv: summary() of a cache that has seen no prompt")
        total = int((self.modality != PAD).sum())
        ts = getattr(self.policy, "text_score", None)
        if self.result is None:  # passthrough: nothing was evicted
            n = self.nbytes()
            L = len(self.layers)
            return EvictionSummary(False, (total,) * L, (total,) * L, n, n, 0.0,
                                   float(self.policy.keep_ratio), ts)
        kept = tuple(int(x) for x in self.result[1].sum(1).tolist())
        return EvictionSummary(True, kept, (total,) * len(kept), int(self.bytes_before),
                               self._bytes_after, float(self.evict_ms),
                               float(self.policy.keep_ratio), ts)

    def nbytes(self) -> int:
        """Bytes held by the K and V tensors of all layers (allocated capacity)."""
        tot = 0
        for layer in self.layers:
            if layer.keys is not None:
                tot += layer.keys.numel() * layer.keys.element_size()
                tot += layer.values.numel() * layer.values.element_size()
        return tot

    def kept_positions(self, layer_idx: int, batch_idx: int) -> list[int]:
        """Original (padded) positions live in a layer's cache for one sample, ascending."""
        layer = self.layers[layer_idx]
        if not layer.compacted:
            return [j for j in range(layer.n_virtual)
                    if self.modality is None or j >= self.modality.shape[1]
                    or int(self.modality[batch_idx, j]) != PAD]
        n = int(layer.length[batch_idx])
        return sorted(int(p) for p in layer.pos[batch_idx, :n].tolist())
