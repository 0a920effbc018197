"""Benchmark engine of ``tgvkv-bench``: the plain-PyTorch baseline, timers, memory probes.

``python -m tgvkv.bench ...`` is the same as the ``tgvkv-bench`` command (see :mod:`tgvkv.cli`).

The plain-PyTorch composition
-----------------------------
Every speed ``tgvkv-bench`` reports is a ratio against the fastest plain-PyTorch composition of the
same computation, measured in the same run. The composition lives here (``torch_*`` functions) and
follows ``shared/SPEC.md`` exactly like :mod:`tgvkv.reference` does, but vectorised the way a good
PyTorch programmer would write it:

- scores: per layer one batched matmul of the guidance rows against the keys in fp32, GQA through a
  ``view`` of the queries as ``[B, Hkv, g*T, D]`` (no ``repeat_interleave`` copy of the keys), one
  additive mask shared by all layers, softmax, head mean, text weights by a ``gather`` of the
  guidance columns, vision scores by one ``bmm``, text scores by a column sum, statistics in fp64;
- budgets: vectorised over layers and samples (``torch.round`` is half-to-even like the SPEC);
- selection: one ``sort`` of a packed int64 key ``(class, fp32 score bits, slot)`` per row (exact:
  non-negative floats order like their bit patterns), dropped slots by ``scatter``, ascending kept
  slots by a ``cumsum`` + ``scatter`` (no second sort);
- compaction: one ``index_select`` of the kept rows of K and V into new, smaller tensors per layer.

There is no Python loop over heads or samples; loops run over layers only. It returns the same
four tensors as ``torch.ops.tgvkv.evict`` plus the new (compacted) K/V tensors. ``tests/test_cli.py``
checks that it keeps exactly the slots :func:`tgvkv.reference.evict` keeps.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

PAD, TEXT, VISION = 0, 1, 2
_INT64_MAX = (1 << 63) - 1


# --------------------------------------------------------------------------------------------
# The plain-PyTorch composition
# --------------------------------------------------------------------------------------------
@dataclass
class GuidanceMasks:
    """Masks shared by every layer of one ``evict`` call (computed once per call).

    bias : [B, 1, T, N] fp32, 0 where guidance row t may attend slot j, -inf elsewhere (rows of
        unused ``q_pos`` entries are all 0 so that softmax stays finite; they are zeroed after).
    row_valid : [B, T] bool. vision, text, real : [B, N] bool. n_valid : [B] int64.
    """

    bias: torch.Tensor
    row_valid: torch.Tensor
    vision: torch.Tensor
    text: torch.Tensor
    real: torch.Tensor
    q_idx: torch.Tensor  # [B, T] int64, q_pos with -1 replaced by 0 (for gathers)
    n_valid: torch.Tensor


def guidance_masks(q_pos: torch.Tensor, modality: torch.Tensor) -> GuidanceMasks:
    B, N = modality.shape
    dev = modality.device
    j = torch.arange(N, device=dev)
    row_valid = q_pos >= 0
    real = modality != PAD
    allowed = (j.view(1, 1, N) <= q_pos.unsqueeze(-1)) & real.unsqueeze(1)
    allowed |= ~row_valid.unsqueeze(-1)
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=dev)
    bias.masked_fill_(~allowed, float("-inf"))
    return GuidanceMasks(bias=bias.unsqueeze(1), row_valid=row_valid, vision=modality == VISION,
                         text=modality == TEXT, real=real, q_idx=q_pos.clamp_min(0),
                         n_valid=row_valid.sum(-1))


def torch_text_attention(q: torch.Tensor, k: torch.Tensor, m: GuidanceMasks,
                         scale: float) -> torch.Tensor:
    """Head-averaged fp32 attention of the guidance rows, ``[B, T, N]`` (unused rows are 0)."""
    B, Hq, T, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    g = Hq // Hkv
    # GQA without copying the keys: the g query heads of a KV head become g*T rows of one matmul
    qf = q.to(torch.float32).reshape(B, Hkv, g * T, D)
    kf = k.to(torch.float32)
    logits = torch.matmul(qf, kf.transpose(-1, -2)).view(B, Hq, T, N)
    logits.mul_(scale).add_(m.bias)
    A = torch.softmax(logits, dim=-1).mean(1)
    return A.mul_(m.row_valid.unsqueeze(-1))


def torch_scores_from_attention(A: torch.Tensor, m: GuidanceMasks, need_mi: bool = True):
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
        I = terms.sum((1, 2))
        stats[:, 1] = torch.where(S > 0, I, torch.zeros_like(I))
    return scores, stats.to(torch.float32)


def torch_score_text_vision(q, k, q_pos, modality, scale, masks: GuidanceMasks | None = None,
                            need_mi: bool = True):
    """Plain-PyTorch ``score_text_vision``: (scores [B, N] fp32, stats [B, 2] fp32)."""
    m = masks if masks is not None else guidance_masks(q_pos, modality)
    return torch_scores_from_attention(torch_text_attention(q, k, m, scale), m, need_mi)


def _sample_facts(q_pos, modality, n_sink):
    real = modality != PAD
    n_real = real.sum(-1)
    evicts = (modality == VISION).any(-1) & (q_pos >= 0).any(-1) & (n_real > n_sink + 1)
    return n_real, evicts


def torch_layer_budgets(stats, q_pos, modality, keep_ratio, budget="mass", redistribute=False,
                        n_sink=4):
    """Plain-PyTorch ``layer_budgets``: (keep [L, B] int64, keep_fraction [L, B] float64)."""
    L, B = stats.shape[0], stats.shape[1]
    n_real, evicts = _sample_facts(q_pos, modality, n_sink)
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


def torch_select_keep(scores, keep, q_pos, modality, n_sink=4):
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


def torch_compact(k: torch.Tensor, v: torch.Tensor, keep_idx: torch.Tensor, width: int):
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


def torch_evict_from_scores(k_cache, v_cache, scores, stats, q_pos, modality, keep_ratio,
                            budget="mass", redistribute=False, n_sink=4):
    """Budgets + selection + gather. Returns (new_k, new_v, keep_idx, n_kept, n_protected,
    keep_fraction); ``new_k[l]``/``new_v[l]`` are ``[B, Hkv, max_b n_kept[l, b], D]``."""
    keep, frac = torch_layer_budgets(stats, q_pos, modality, keep_ratio, budget, redistribute,
                                     n_sink)
    keep_idx, n_prot = torch_select_keep(scores, keep, q_pos, modality, n_sink)
    widths = keep.max(1).values.tolist() if keep.numel() else []  # one host sync for all layers
    new_k, new_v = [], []
    for l, (k, v) in enumerate(zip(k_cache, v_cache)):
        k2, v2 = torch_compact(k, v, keep_idx[l], int(widths[l]))
        new_k.append(k2)
        new_v.append(v2)
    return new_k, new_v, keep_idx, keep, n_prot, frac


def torch_evict(k_cache, v_cache, queries, q_pos, modality, scale, keep_ratio, budget="mass",
                redistribute=False, n_sink=4):
    """The fastest plain-PyTorch composition of ``tgvkv::evict`` (not in place).

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
    sc = [torch_score_text_vision(q, k, q_pos, modality, scale, m, need_mi)
          for q, k in zip(queries, k_cache)]
    scores = torch.stack([s for s, _ in sc])
    stats = torch.stack([s for _, s in sc])
    return torch_evict_from_scores(k_cache, v_cache, scores, stats, q_pos, modality, keep_ratio,
                                   budget, redistribute, n_sink)


def torch_decode_evict_(k, v, pos, length, q, n_seen, keep_fraction, n_protected, scale,
                        n_sink=4):
    """Plain-PyTorch ``decode_evict_`` (same semantics as the op: move the last live slot).

    Shapes as in the README: k, v [B, Hkv, S, D]; pos [B, S]; length, n_seen, n_protected [B]
    int64; q [B, Hq, D]; keep_fraction [B] float64. Returns evicted [B] int64 (pos or -1).
    """
    B, Hkv, S, D = k.shape
    Hq = q.shape[1]
    g = Hq // Hkv
    dev = k.device
    s = torch.arange(S, device=dev)
    live = s.view(1, S) < length.view(B, 1)
    logits = torch.matmul(q.to(torch.float32).view(B, Hkv, g, D),
                          k.to(torch.float32).transpose(-1, -2)) * scale  # [B, Hkv, g, S]
    logits.masked_fill_(~live.view(B, 1, 1, S), float("-inf"))
    att = torch.softmax(logits, -1).mean((1, 2))  # [B, S]
    forget = torch.trunc(length.to(torch.float64) - n_seen.to(torch.float64) * keep_fraction)
    # protected: the n_protected live entries of largest pos
    pos_live = torch.where(live, pos, torch.full_like(pos, -1))
    kth = pos_live.sort(-1, descending=True).values.gather(
        1, (n_protected - 1).clamp(0, S - 1).view(B, 1))
    cand = live & (s.view(1, S) >= n_sink) & (pos < kth)
    active = (keep_fraction < 1.0) & (forget > 0) & cand.any(-1)
    a = torch.where(cand, att, torch.full_like(att, float("inf")))
    amin = a.min(-1, keepdim=True).values
    tie_pos = torch.where(cand & (a == amin), pos, torch.full_like(pos, _INT64_MAX))
    slot = tie_pos.argmin(-1)  # ties to the smaller pos
    b = torch.arange(B, device=dev)
    last = (length - 1).clamp_min(0)
    slot = torch.where(active, slot, last)  # inactive samples copy a slot onto itself
    evicted = torch.where(active, pos[b, slot], torch.full_like(length, -1))
    k[b, :, slot] = k[b, :, last]
    v[b, :, slot] = v[b, :, last]
    pos[b, slot] = pos[b, last]
    length.sub_(active.to(length.dtype))
    return evicted


# --------------------------------------------------------------------------------------------
# Shapes and synthetic caches
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """Cache shape of one benchmark: L layers of [B, Hkv, N, D], T guidance rows, V vision slots."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tokens: int
    vision_tokens: int
    text_tokens: int
    batch: int = 1

    def check(self) -> None:
        for f in ("layers", "heads", "kv_heads", "head_dim", "tokens", "batch"):
            if getattr(self, f) < 1:
                raise ValueError(f"--{f.replace('_', '-')} must be >= 1, got {getattr(self, f)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"--heads ({self.heads}) must be a multiple of --kv-heads ({self.kv_heads})")
        if self.vision_tokens < 0 or self.text_tokens < 0:
            raise ValueError("--vision-tokens and --text-tokens must be >= 0")
        if self.vision_tokens + self.text_tokens > self.tokens:
            raise ValueError(f"--vision-tokens + --text-tokens ({self.vision_tokens} + "
                             f"{self.text_tokens}) must be <= --tokens ({self.tokens})")

    @property
    def prefix(self) -> int:
        return self.tokens - self.vision_tokens - self.text_tokens


# Architecture of the presets (decoder of the VLM) and a typical single-image prompt:
# N = system/user prefix + image tokens + T guidance tokens (question + assistant tag).
PRESETS: dict[str, Shape] = {
    # LLaVA-1.5-7B (Vicuna-7B): 336px CLIP -> 24x24 = 576 image tokens
    "llava-1.5-7b": Shape(32, 32, 32, 128, 640, 576, 40),
    # LLaVA-NeXT-7B (Mistral-7B, GQA 32/8): anyres 672x672 -> 2928 image tokens (5 tiles + newlines)
    "llava-next-7b": Shape(32, 32, 8, 128, 3000, 2928, 40),
    # Qwen2.5-VL-7B (GQA 28/4): a 896x896 image -> (896/28)^2 = 1024 tokens
    "qwen2.5-vl-7b": Shape(28, 28, 4, 128, 1100, 1024, 40),
    # the tiny test architecture
    "tiny": Shape(4, 4, 2, 32, 96, 64, 16, 2),
}
# the op shapes of the argument-less run: small enough for seconds on 2 CPU cores
DEFAULT_OPS_SHAPE = Shape(8, 16, 8, 64, 320, 256, 32, 2)


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0):
    """Random post-RoPE keys/values/guidance queries and the modality map of a synthetic prompt.

    Layout of every sample: ``prefix`` text slots, ``vision_tokens`` vision slots, then
    ``text_tokens`` guidance text slots. Returns (k_cache, v_cache, queries, q_pos, modality).
    """
    shape.check()
    g = torch.Generator().manual_seed(seed)
    L, Hq, Hkv, D = shape.layers, shape.heads, shape.kv_heads, shape.head_dim
    B, N, V, T = shape.batch, shape.tokens, shape.vision_tokens, shape.text_tokens
    P = shape.prefix
    mod = torch.full((B, N), TEXT, dtype=torch.int8)
    mod[:, P:P + V] = VISION
    if V > 0:
        q_pos = torch.arange(P + V, N, dtype=torch.int64).expand(B, T).contiguous()
    else:
        q_pos = torch.full((B, 0), -1, dtype=torch.int64)
    Tq = q_pos.shape[1]

    def rnd(*s):
        return torch.randn(*s, generator=g).to(dtype=dtype).to(device)

    k_cache = [rnd(B, Hkv, N, D) for _ in range(L)]
    v_cache = [rnd(B, Hkv, N, D) for _ in range(L)]
    queries = [rnd(B, Hq, Tq, D) for _ in range(L)]
    return k_cache, v_cache, queries, q_pos.to(device), mod.to(device)


# --------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    reps: int

    def as_dict(self):
        return asdict(self)


def time_fn(fn: Callable[[], object], device: str, setup: Callable[[], object] | None = None,
            warmup: int = 2, reps: int = 10, min_time_s: float = 0.0,
            max_reps: int = 1000) -> Timing:
    """Time ``fn`` after ``warmup`` calls: median/min/max over at least ``reps`` repetitions.

    ``setup`` runs before every call outside the timed region (e.g. restoring a cache that ``fn``
    modifies in place). On CUDA each call is timed with CUDA events; on CPU with perf_counter.
    More repetitions are run (up to ``max_reps``) until ``min_time_s`` of timed work is collected.
    """
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    sync(device)
    times: list[float] = []
    total = 0.0
    while len(times) < reps or (total < min_time_s and len(times) < max_reps):
        if setup is not None:
            setup()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
        times.append(t)
        total += t
    return Timing(statistics.median(times) * 1e3, min(times) * 1e3, max(times) * 1e3, len(times))


class _stderr_silenced:
    """Silence file descriptor 2 (the profiler's C++ side logs start/stop lines there)."""

    def __enter__(self):
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:
            self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
        return False


def peak_extra_bytes(fn: Callable[[], object], device: str) -> tuple[int, str]:
    """Peak of the memory ``fn`` allocates above what was allocated when it started (bytes).

    CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the call.
    CPU: torch has no CPU allocator statistics, so the call runs once under
    ``torch.profiler`` with ``profile_memory=True`` and the running sum of its allocation/free
    events (every tensor allocated through the c10 CPU allocator, including the extension's
    ``at::empty``) is maximised. Scratch memory a kernel takes with ``malloc``/``std::vector``
    is not seen. Returns (bytes, method).
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak), "torch.cuda.max_memory_allocated delta"
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return int(peak), "torch.profiler CPU allocator events (peak of running sum)"


def copy_bandwidth_gbs(device: str, nbytes: int = 256 << 20, reps: int = 10) -> float:
    """Measured ``tensor.copy_`` bandwidth (read + write bytes per second, GB/s = 1e9 B/s)."""
    n = nbytes // 4
    a = torch.empty(n, dtype=torch.float32, device=device).normal_()
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), device, warmup=2, reps=reps)
    return 2 * nbytes / (t.median_ms / 1e3) / 1e9


# --------------------------------------------------------------------------------------------
# Environment facts recorded in every report
# --------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str) -> dict:
    info = {"device": device, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        info["load_avg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device.startswith("cuda"):
        idx = torch.device(device).index or 0
        p = torch.cuda.get_device_properties(idx)
        info["gpu"] = p.name
        info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import transformers

        v["transformers"] = transformers.__version__
    except Exception:
        v["transformers"] = None
    try:
        import tgvkv

        v["tgvkv"] = getattr(tgvkv, "__version__", None)
        bi = getattr(tgvkv, "build_info", None)
        if callable(bi):
            try:
                v["tgvkv_build"] = {k: (x if isinstance(x, (str, int, float, bool, type(None), list))
                                        else str(x)) for k, x in dict(bi()).items()}
            except Exception as e:  # build info is informative only
                v["tgvkv_build"] = f"unavailable: {e}"
    except Exception:
        v["tgvkv"] = None
    return v


# --------------------------------------------------------------------------------------------
# End to end: generate() with a Hugging Face VLM
# --------------------------------------------------------------------------------------------
GEN_ALIASES = {"tiny": "tiny-llava"}


def _available_bytes(device: str) -> int | None:
    try:
        if device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return int(free)
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None


def load_model(model_path, preset, device, dtype, seed, error):
    """(model, name, kind): a local checkpoint or an architecture with random weights."""
    if model_path is not None:  # checked before the (slow) transformers import
        if not os.path.isdir(model_path):
            raise error(f"--model {model_path}: not a directory (expected a local Hugging Face "
                        "checkpoint with config.json)")
        if not os.path.isfile(os.path.join(model_path, "config.json")):
            raise error(f"--model {model_path}: not a model (no config.json in it)")
    from .hf import tiny

    if model_path is not None:
        import transformers as tf

        try:
            cfg = tf.AutoConfig.from_pretrained(model_path)
        except Exception as e:
            raise error(f"--model {model_path}: cannot read its config ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})")
        cls = tiny._CLASSES.get(getattr(cfg, "model_type", None))
        if cls is None:
            raise error(f"--model {model_path}: model type {cfg.model_type!r} is not supported "
                        f"(supported: {', '.join(sorted(tiny._CLASSES))})")
        try:
            model = cls.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa")
        except Exception as e:
            raise error(f"--model {model_path}: cannot load the weights ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})")
        model = model.to(device).eval()
        model.generation_config.pad_token_id = model.generation_config.pad_token_id or 0
        return model, os.path.basename(os.path.normpath(model_path)), "checkpoint"
    name = GEN_ALIASES.get(preset or "tiny", preset or "tiny")
    names = tiny.TINY + tiny.PRESETS
    if name not in names:
        raise error(f"unknown preset {preset!r} for generate (choose from tiny, "
                    f"{', '.join(names)})")
    if name == "tiny-llama":
        raise error("tiny-llama is a text-only model: nothing to evict; pick a VLM preset")
    with torch.device("meta"):
        meta = tiny._CLASSES[tiny.config(name).model_type](tiny.config(name))
    need = sum(p.numel() for p in meta.parameters()) * torch.empty((), dtype=dtype).element_size()
    del meta
    avail = _available_bytes(device)
    if avail is not None and need > 0.8 * avail:
        raise error(f"preset {name}: its weights need {need / 2**30:.1f} GiB of {dtype} but only "
                    f"{avail / 2**30:.1f} GiB is free on {device}; use a tiny-* preset (or a GPU)")
    return tiny.build(name, seed=seed, dtype=dtype, device=device), name, "random weights"


def _prompt(model, b: int, kind: str) -> list:
    """One single-image prompt: text prefix, one image, the question (lengths vary per sample so
    that a batch is padded)."""
    big = kind != "tiny"
    return [24 if big else 8, "image", (40 if big else 16) + 3 * (b % 3)]


class _ForwardClock:
    """Forward pre-hook / hook on the top-level model: start and end of each forward call."""

    def __init__(self, model, device):
        self.device = device
        self.spans: list[tuple[float, float]] = []
        self._t0 = None
        self._h = [model.register_forward_pre_hook(self._pre),
                   model.register_forward_hook(self._post)]

    def _pre(self, *a):
        sync(self.device)
        self._t0 = time.perf_counter()

    def _post(self, *a):
        sync(self.device)
        self.spans.append((self._t0, time.perf_counter()))

    def remove(self):
        for h in self._h:
            h.remove()


def _cache_facts(cache) -> dict:
    out = {"cache_bytes": None, "kept_fraction": None}
    if cache is None:
        return out
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        out["cache_bytes"] = int(cache.nbytes())
    else:
        tot = 0
        for layer in getattr(cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    tot += t.numel() * t.element_size()
        out["cache_bytes"] = tot
    res = getattr(cache, "result", None)
    mod = getattr(cache, "modality", None)
    if res is not None and mod is not None:
        n_kept = res[1].to(torch.float64)
        n_real = (mod != PAD).sum(1).to(n_kept.device, torch.float64)
        out["kept_fraction"] = float(n_kept.sum() / (n_real.sum() * n_kept.shape[0]))
    elif cache is not None:
        out["kept_fraction"] = 1.0
    return out


def _generate_once(model, inputs, new_tokens, device, policy, tgvkv_apply):
    """One timed generate(); returns (ttft_s, prefill_s, decode_s_per_step, total_s, cache)."""
    import contextlib

    ctx = tgvkv_apply(model, policy) if policy is not None else contextlib.nullcontext()
    with ctx as handle:
        clock = _ForwardClock(model, device)
        try:
            sync(device)
            t0 = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, return_dict_in_generate=True)
            sync(device)
            t1 = time.perf_counter()
        finally:
            clock.remove()
        cache = getattr(out, "past_key_values", None)
    spans = clock.spans
    first_end = spans[0][1]
    steps = max(1, len(spans) - 1)
    return (first_end - t0, spans[0][1] - spans[0][0], (t1 - first_end) / steps, t1 - t0, cache)


def run_generate(model_path=None, preset=None, device="cpu", dtype=torch.float32,
                 dtype_name="float32", keep_ratios=(1.0, 0.5, 0.2, 0.1, 0.05), batches=(1,),
                 new_tokens=32, reps=3, seed=0, progress=True, max_batch=False, error=ValueError,
                 progress_factory=None) -> dict:
    """End-to-end generate() at several keep ratios and batch sizes (plus the unpatched model).

    Metrics (median over ``reps`` calls after one warm-up call per configuration):
    ``ttft_ms`` generate() start to the end of the first forward (prompt + eviction);
    ``prefill_ms`` the first forward alone (eviction included: it runs in its hook);
    ``decode_ms_per_step`` / ``decode_tok_s`` from the end of the first forward to the end of
    generate() (generation overheads included), ``batch * (new_tokens - 1)`` tokens;
    ``cache_bytes`` bytes held by the KV cache after generate(); ``peak_bytes`` peak extra memory
    of one generate() call (see :func:`peak_extra_bytes`).
    """
    if new_tokens < 2:
        raise error("--new-tokens must be >= 2 (decode speed needs at least one decode step)")
    model, name, kind = load_model(model_path, preset, device, dtype, seed, error)
    from .hf import apply as tgvkv_apply
    from .hf import tiny
    from .policy import TGVKV, ops_backend

    backend = getattr(ops_backend(), "__name__", str(ops_backend()))
    configs = [None] + [float(k) for k in keep_ratios]
    bar = progress_factory(len(configs) * len(batches), "generate") if progress_factory else None
    rows = []
    prompt_tokens = None
    for B in batches:
        inputs = tiny.make_inputs(model, [_prompt(model, b, "tiny" if name.startswith("tiny") else
                                                  "full") for b in range(B)], seed=seed)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        full_bytes = None
        for kr in configs:
            policy = TGVKV(keep_ratio=kr) if kr is not None else None
            _generate_once(model, inputs, 2, device, policy, tgvkv_apply)  # warm-up
            res = [_generate_once(model, inputs, new_tokens, device, policy, tgvkv_apply)
                   for _ in range(reps)]
            ttft = statistics.median(r[0] for r in res)
            pre = statistics.median(r[1] for r in res)
            dec = statistics.median(r[2] for r in res)
            facts = _cache_facts(res[-1][4])
            del res
            peak, method = peak_extra_bytes(
                lambda: _generate_once(model, inputs, new_tokens, device, policy, tgvkv_apply)[4],
                device)
            if kr is None:
                full_bytes = facts["cache_bytes"]
            rows.append({"keep_ratio": kr, "batch": B, "prompt_tokens": prompt_tokens,
                         "ttft_ms": ttft * 1e3, "prefill_ms": pre * 1e3,
                         "decode_ms_per_step": dec * 1e3, "decode_tok_s": B / dec,
                         "cache_bytes": facts["cache_bytes"], "cache_bytes_full": full_bytes,
                         "kept_fraction": facts["kept_fraction"], "peak_bytes": peak,
                         "peak_method": method})
            if bar is not None:
                bar.set_postfix_str(f"batch {B} keep {kr if kr is not None else 'off'}")
                bar.update(1)
    if bar is not None:
        bar.close()
    base = {r["batch"]: r for r in rows if r["keep_ratio"] is None}
    for r in rows:
        b = base.get(r["batch"])
        r["decode_speedup_vs_unpatched"] = r["decode_tok_s"] / b["decode_tok_s"] if b else None
        r["ttft_ratio_vs_unpatched"] = r["ttft_ms"] / b["ttft_ms"] if b else None
    sec = {"model": name, "model_kind": kind, "dtype": dtype_name, "new_tokens": new_tokens,
           "prompt_tokens": prompt_tokens, "backend": backend, "reps": reps, "rows": rows,
           "prompt": "random text tokens + one random image (tgvkv.hf.tiny.make_inputs); batch "
                     "samples differ in question length (left padding)"}
    if max_batch:
        if not device.startswith("cuda"):
            raise error("--max-batch needs a CUDA device (CPU memory is not bounded the same way)")
        sec["max_batch"] = {
            "unpatched": _max_batch(model, None, new_tokens, device, tgvkv_apply, seed, name),
            f"keep_ratio={min(keep_ratios):g}": _max_batch(
                model, TGVKV(keep_ratio=float(min(keep_ratios))), new_tokens, device, tgvkv_apply,
                seed, name)}
    return sec


def _max_batch(model, policy, new_tokens, device, tgvkv_apply, seed, name, cap=4096):
    """Largest batch whose generate() runs without CUDA OOM (doubling, then bisection)."""
    from .hf import tiny

    def fits(B):
        try:
            inputs = tiny.make_inputs(model, [_prompt(model, b, "tiny" if name.startswith("tiny")
                                                      else "full") for b in range(B)], seed=seed)
            _generate_once(model, inputs, new_tokens, device, policy, tgvkv_apply)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        except RuntimeError as e:  # some kernels report OOM as a plain RuntimeError
            if "out of memory" in str(e).lower():
                return False
            raise
        finally:
            torch.cuda.empty_cache()

    lo, hi = 0, 1
    while hi <= cap and fits(hi):
        lo, hi = hi, hi * 2
    if hi > cap:
        return {"max_batch": lo, "capped_at": cap}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"max_batch": lo}


def generate_table_text(sec: dict, table, fmt, fmt_bytes) -> str:
    title = (f"generate: {sec['model']} ({sec['model_kind']}, {sec['dtype']}), prompt "
             f"{sec['prompt_tokens']} tokens, {sec['new_tokens']} new tokens, ops backend "
             f"{sec['backend']}")
    hdr = ["keep", "batch", "TTFT ms", "prefill ms", "decode ms/step", "decode tok/s",
           "vs unpatched", "kept", "KV cache", "peak extra"]
    out = []
    for r in sec["rows"]:
        out.append(["off (unpatched)" if r["keep_ratio"] is None else f"{r['keep_ratio']:g}",
                    str(r["batch"]), fmt(r["ttft_ms"], ".1f"), fmt(r["prefill_ms"], ".1f"),
                    fmt(r["decode_ms_per_step"], ".2f"), fmt(r["decode_tok_s"], ".1f"),
                    fmt(r["decode_speedup_vs_unpatched"], ".2f") + "x",
                    fmt(r["kept_fraction"], ".3f"), fmt_bytes(r["cache_bytes"]),
                    fmt_bytes(r["peak_bytes"])])
    txt = table(hdr, out, title)
    if sec["model"].startswith("tiny"):
        txt += ("\nnote: a tiny model's decode step is Python/dispatch overhead, not KV-cache "
                "reads, so eviction shows its memory effect here but not a throughput gain; that "
                "needs a cache that dominates the step (long prompts, large batches, full-size "
                "models, GPU)")
    if sec.get("max_batch"):
        txt += "\nlargest batch that fits: " + ", ".join(
            f"{k}: {v['max_batch']}" for k, v in sec["max_batch"].items())
    return txt


# --------------------------------------------------------------------------------------------
# Accuracy: the eval harness (tgvkv.eval)
# --------------------------------------------------------------------------------------------
QUICK_ACCURACY = {"policies": ["tgvkv"], "keep_ratios": [1.0, 0.2, 0.05], "limit": 24,
                  "max_new_tokens": 8}


def run_accuracy(model=None, dataset="easy-vqa", policies=None, keep_ratios=None, limit=None,
                 max_new_tokens=32, device="cpu", quick=False, progress=True,
                 error=ValueError) -> dict:
    """The eval harness (:func:`tgvkv.eval.run`) plus a flat ``rows`` list and its table.

    ``quick``: the subset of the argument-less run (:data:`QUICK_ACCURACY`), unless overridden.
    """
    try:
        from . import eval as tgvkv_eval
    except ImportError as e:
        raise error(f"the accuracy harness (tgvkv.eval) cannot be imported: {e}")
    if quick:
        policies = policies or QUICK_ACCURACY["policies"]
        keep_ratios = keep_ratios or QUICK_ACCURACY["keep_ratios"]
        limit = limit or QUICK_ACCURACY["limit"]
        max_new_tokens = QUICK_ACCURACY["max_new_tokens"]
    for p in policies or []:
        if p not in tgvkv_eval.POLICIES:
            raise error(f"unknown policy {p!r} (choose from {', '.join(tgvkv_eval.POLICIES)})")
    if model is not None and not os.path.isdir(str(model)):
        raise error(f"--model {model}: not a directory (expected a local Hugging Face checkpoint)")
    if model is None and not os.path.isdir(tgvkv_eval.default_model_path()):
        raise error(f"the default eval model ({tgvkv_eval.default_model_path()}) is not "
                    "installed; pass --model PATH")
    try:
        res = tgvkv_eval.run(model=model, dataset=dataset, policies=policies,
                             keep_ratios=keep_ratios, limit=limit, device=device,
                             progress=progress, max_new_tokens=max_new_tokens)
    except ImportError as e:
        raise error(f"the accuracy harness needs the eval extra: {e}")
    except (ValueError, OSError, FileNotFoundError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise error(f"accuracy: {msg}")
    rows = [{"policy": "full", "keep_ratio": None, "accuracy": res["full"]["accuracy"],
             "pct_of_full": 100.0, "n_diff_vs_full": 0, "seconds": res["full"].get("seconds")}]
    for pol, per in res["results"].items():
        for kr, r in per.items():
            rows.append({"policy": pol, "keep_ratio": float(kr), "accuracy": r["accuracy"],
                         "pct_of_full": r.get("pct_of_full"),
                         "n_diff_vs_full": r.get("n_diff_vs_full"), "seconds": r.get("seconds")})
    res = dict(res)
    res["rows"] = rows
    res["metric"] = "accuracy"
    res["table"] = (f"accuracy: {res['model']} on {res['dataset']} ({res['n_samples']} samples, "
                    f"max {max_new_tokens} new tokens)\n" + tgvkv_eval.format_table(res))
    return res


def main() -> int:
    from tgvkv.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
