"""Timers and memory probes of ``tgvkv-bench``.

Time GPU work with CUDA events after warm-up, CPU work with ``perf_counter``; summarise as median /
min / max over many repetitions. Peak extra memory: CUDA allocator statistics, or on CPU the
running sum of the profiler's allocator events.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


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


def _time_call(fn: Callable[[], object], setup: Callable[[], object] | None, cuda: bool) -> float:
    """Seconds of one call of ``fn`` (``setup`` first, untimed)."""
    if setup is not None:
        setup()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _summary(times: list[float]) -> Timing:
    return Timing(statistics.median(times) * 1e3, min(times) * 1e3, max(times) * 1e3, len(times))


def time_fn(fn: Callable[[], object], device: str, setup: Callable[[], object] | None = None,
            warmup: int = 2, reps: int = 10, min_time_s: float = 0.0,
            max_reps: int = 1000) -> Timing:
    """Time ``fn`` after ``warmup`` calls: median/min/max over at least ``reps`` repetitions.

    ``setup`` runs before every call outside the timed region (e.g. restoring a cache that ``fn``
    modifies in place). On CUDA each call is timed with CUDA events; on CPU with perf_counter.
    More repetitions are run (up to ``max_reps``) until ``min_time_s`` of timed work is collected.
    """
    return time_interleaved([fn], device, setup, warmup, reps, min_time_s, max_reps)[0]


def time_interleaved(fns: list[Callable[[], object]], device: str,
                     setup: Callable[[], object] | None = None, warmup: int = 2, reps: int = 10,
                     min_time_s: float = 0.0, max_reps: int = 1000) -> list[Timing]:
    """Time several implementations of the same work call by call in turn, one Timing each.

    Rep ``i`` calls every fn once, in the list's order on even reps and reversed on odd ones
    (a, b, b, a, a, b, ...), as ``tgvkv-bench generate`` does: a slow phase of the machine
    (clock, neighbours on a shared host) then falls on every implementation alike, and none
    always runs right after the same other one, so the ratio of their medians is not the ratio
    of two different moments. ``warmup`` calls of each first; then at least ``reps`` reps, and
    more until the slowest fn has ``min_time_s`` of timed work (at most ``max_reps``): every fn
    gets the same number of calls. ``setup`` before every call, untimed. With one fn this is
    :func:`time_fn`.
    """
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        for fn in fns:
            if setup is not None:
                setup()
            fn()
    sync(device)
    times: list[list[float]] = [[] for _ in fns]
    rep = 0
    while rep < reps or (max(sum(t) for t in times) < min_time_s and rep < max_reps):
        order = range(len(fns)) if rep % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            times[i].append(_time_call(fns[i], setup, cuda))
        rep += 1
    return [_summary(t) for t in times]


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

