"""``tgvkv-bench ops``: every op and the whole ``evict`` against the plain-PyTorch composition
(:mod:`tgvkv.torch_impl`) in the same run: time, GB/s, peak extra memory, same result."""

from __future__ import annotations

from dataclasses import asdict

import torch

from .. import torch_impl
from .common import UserError, fmt, fmt_bytes, progress_bar, table
from .shapes import PRESETS, Shape, make_inputs
from .timing import copy_bandwidth_gbs, peak_extra_bytes, time_fn, time_interleaved

OP_STAGES = ("score_text_vision", "layer_budgets", "select_keep", "compact_", "evict_from_scores",
             "evict", "decode_evict_")


def _load_tgvkv_ops():
    """Import tgvkv and return torch.ops.tgvkv, or raise UserError when the ops are not built."""
    try:
        import tgvkv  # noqa: F401  (loads _C)
    except Exception as e:
        raise UserError(f"cannot import tgvkv's compiled ops ({type(e).__name__}: {e}); build "
                        "them with: pip install --no-build-isolation .")
    ns = torch.ops.tgvkv
    try:
        ns.evict  # noqa: B018
    except (AttributeError, RuntimeError):
        raise UserError("torch.ops.tgvkv.evict is not registered: tgvkv was installed without its "
                        "compiled extension (pip install --no-build-isolation .)")
    return ns


def _ops_shape(args, default_shape=None):
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise UserError(f"unknown preset {args.preset!r} (choose from "
                            f"{', '.join(PRESETS)})")
        base = PRESETS[args.preset]
    else:
        base = default_shape or PRESETS["tiny"]
    fields = {}
    for f in ("layers", "heads", "kv_heads", "head_dim", "tokens", "vision_tokens", "text_tokens",
              "batch"):
        v = getattr(args, f, None)
        fields[f] = getattr(base, f) if v is None else v
    shape = Shape(**fields)
    try:
        shape.check()
    except ValueError as e:
        raise UserError(str(e))
    return shape


class _Case:
    """The inputs of one ``tgvkv-bench ops`` run: the synthetic cache, working copies for the
    in-place ops (restored outside timed regions) and, per keep ratio, the shared intermediates
    (scores, budgets, selection: from the op itself) and the decode state."""

    def __init__(self, shape, device, dtype, seed, ops, budget, redistribute, n_sink,
                 text_score="all_queries"):
        self.k0, self.v0, self.qs, self.q_pos, self.mod = make_inputs(shape, dtype, device, seed)
        self.text_score = text_score
        # what score_text_vision / evict read: the guidance rows (qs), or for all_queries the
        # full query states [B, Hq, N, D] whose guidance rows are qs (same vision scores)
        self.q_in = self.qs
        if text_score == "all_queries":
            g = torch.Generator().manual_seed(seed + 7)
            B, Hq, N, D = shape.batch, shape.heads, shape.tokens, shape.head_dim
            rows = self.q_pos[0].cpu()
            self.q_in = []
            for q in self.qs:
                qa = torch.randn(B, Hq, N, D, generator=g).to(dtype)
                if rows.numel():
                    qa[:, :, rows] = q.cpu()
                self.q_in.append(qa.to(device))
        self.shape, self.device, self.dtype, self.ops = shape, device, dtype, ops
        self.budget, self.redistribute, self.n_sink = budget, redistribute, n_sink
        self.scale = shape.head_dim ** -0.5
        self.elt = self.k0[0].element_size()
        self.kw = [x.clone() for x in self.k0]
        self.vw = [x.clone() for x in self.v0]
        self.masks = torch_impl.guidance_masks(self.q_pos, self.mod)
        self.dec = {}

    def restore(self):
        for a, b in zip(self.kw, self.k0):
            a.copy_(b)
        for a, b in zip(self.vw, self.v0):
            a.copy_(b)

    def at_keep_ratio(self, kr, with_decode):
        """Intermediates of keep ratio ``kr`` (and the decode state when it is timed)."""
        ops, q_pos, mod, n_sink = self.ops, self.q_pos, self.mod, self.n_sink
        sc = [ops.score_text_vision(q, k, q_pos, mod, self.scale, self.text_score)
              for q, k in zip(self.q_in, self.k0)]
        self.scores = torch.stack([s for s, _ in sc])
        self.stats = torch.stack([s for _, s in sc])
        self.keep, self.frac = ops.layer_budgets(self.stats, q_pos, mod, kr, self.budget,
                                                 self.redistribute, n_sink)
        self.keep_idx, self.n_prot = ops.select_keep(self.scores, self.keep, q_pos, mod, n_sink)
        self.widths = self.keep.max(1).values.tolist()
        self.dec = {}
        if with_decode:
            self._decode_state()
        self.n_seen = torch.full((self.shape.batch,), self.shape.tokens + 2, dtype=torch.int64,
                                 device=self.device)

    def _decode_state(self):
        """The decode state as the model layer holds it: each layer compacted to its kept slots
        (capacity = largest kept count + 2), then two decode tokens appended (the second decode
        step: the first one that evicts, as every later step does)."""
        sh, dev = self.shape, self.device
        B, Hq, Hkv, N, D = sh.batch, sh.heads, sh.kv_heads, sh.tokens, sh.head_dim
        dec = self.dec
        dec.update(k0=[], v0=[], pos0=[], len0=[])
        for l in range(sh.layers):
            w = int(self.widths[l])
            kc, vc = torch_impl.compact(self.k0[l], self.v0[l], self.keep_idx[l], w)
            kd = torch.zeros(B, Hkv, w + 2, D, dtype=self.dtype, device=dev)
            vd = torch.zeros_like(kd)
            pd = torch.full((B, w + 2), -1, dtype=torch.int64, device=dev)
            for b in range(B):
                n = int(self.keep[l, b])
                kd[b, :, :n], vd[b, :, :n] = kc[b, :, :n], vc[b, :, :n]
                kd[b, :, n:n + 2] = self.k0[l][b, :, -2:]
                vd[b, :, n:n + 2] = self.v0[l][b, :, -2:]
                pd[b, :n] = self.keep_idx[l, b, :n]
                pd[b, n], pd[b, n + 1] = N, N + 1
            dec["k0"].append(kd)
            dec["v0"].append(vd)
            dec["pos0"].append(pd)
            dec["len0"].append((self.keep[l] + 2).clone())
        dec["q"] = [q[:, :, -1].contiguous() if q.shape[2] else
                    torch.randn(B, Hq, D, device=dev).to(q.dtype) for q in self.qs]
        for name in ("k", "v", "pos", "len"):
            dec[name] = [x.clone() for x in dec[name + "0"]]

    def restore_decode(self):
        dec = self.dec
        for l in range(self.shape.layers):
            for name in ("k", "v", "pos", "len"):
                dec[name][l].copy_(dec[name + "0"][l])

    def nbytes(self):
        """Bytes moved per stage (the bytes model of the report)."""
        Hkv, D, elt = self.shape.kv_heads, self.shape.head_dim, self.elt
        bytes_q = sum(q.numel() for q in self.q_in) * elt
        bytes_k = sum(k.numel() for k in self.k0) * elt
        bytes_compact = 2 * 2 * int(self.keep.sum()) * Hkv * D * elt  # read + write kept K, V rows
        bytes_decode = None
        if self.dec:
            bytes_decode = sum(int(x.sum()) for x in self.dec["len0"]) * Hkv * D * elt + \
                sum(q.numel() for q in self.dec["q"]) * elt
        return {"score_text_vision": bytes_q + bytes_k, "layer_budgets": None, "select_keep": None,
                "compact_": bytes_compact,
                "evict_from_scores": bytes_compact + self.scores.numel() * 4,
                "evict": bytes_q + bytes_k + bytes_compact, "decode_evict_": bytes_decode}

    def stages(self, kr):
        """op name -> (tgvkv call, plain-PyTorch call, setup before each call or None)."""
        ops, q_pos, mod, n_sink, scale = self.ops, self.q_pos, self.mod, self.n_sink, self.scale
        budget, redis, L = self.budget, self.redistribute, self.shape.layers
        k0, v0, kw, vw, qs, dec = self.k0, self.v0, self.kw, self.vw, self.q_in, self.dec
        ts = self.text_score
        scores, stats, keep, keep_idx = self.scores, self.stats, self.keep, self.keep_idx
        frac, n_prot, n_seen = self.frac, self.n_prot, self.n_seen

        def decode(impl):
            return lambda: [impl(dec["k"][l], dec["v"][l], dec["pos"][l], dec["len"][l],
                                 dec["q"][l], n_seen, frac[l], n_prot[l], scale, n_sink)
                            for l in range(L)]

        return {
            "score_text_vision": (
                lambda: [ops.score_text_vision(q, k, q_pos, mod, scale, ts) for q, k in zip(qs, k0)],
                lambda: [torch_impl.score_text_vision(q, k, q_pos, mod, scale, self.masks,
                                                      budget == "mi", ts) for q, k in zip(qs, k0)],
                None),
            "layer_budgets": (
                lambda: ops.layer_budgets(stats, q_pos, mod, kr, budget, redis, n_sink),
                lambda: torch_impl.layer_budgets(stats, q_pos, mod, kr, budget, redis, n_sink),
                None),
            "select_keep": (lambda: ops.select_keep(scores, keep, q_pos, mod, n_sink),
                            lambda: torch_impl.select_keep(scores, keep, q_pos, mod, n_sink), None),
            "compact_": (lambda: [ops.compact_(kw[l], vw[l], keep_idx[l]) for l in range(L)],
                         lambda: [torch_impl.compact(k0[l], v0[l], keep_idx[l],
                                                     int(self.widths[l])) for l in range(L)],
                         self.restore),
            "evict_from_scores": (
                lambda: ops.evict_from_scores(kw, vw, scores, stats, q_pos, mod, kr, budget,
                                              redis, n_sink),
                lambda: torch_impl.evict_from_scores(k0, v0, scores, stats, q_pos, mod, kr, budget,
                                                     redis, n_sink),
                self.restore),
            "evict": (
                lambda: ops.evict(kw, vw, qs, q_pos, mod, scale, kr, budget, redis, n_sink, ts),
                lambda: torch_impl.evict(k0, v0, qs, q_pos, mod, scale, kr, budget, redis, n_sink,
                                         ts),
                self.restore),
            "decode_evict_": (decode(ops.decode_evict_), decode(torch_impl.decode_evict_),
                              self.restore_decode),
        }

    def same_key(self, st, out):
        """The output both implementations must agree on exactly (None: not compared)."""
        if st == "evict_from_scores" and len(out) == 6:
            out = tuple(out[2:])
        if st == "compact_" and isinstance(out[0], tuple):  # torch: (k, v) per layer
            out = [(self.keep_idx[l] >= 0).sum(-1) for l in range(self.shape.layers)]
        if st in ("layer_budgets", "select_keep", "evict_from_scores"):
            return out[0]
        if st == "evict":
            return out[0] if isinstance(out, tuple) and len(out) == 4 else out[2]
        if st in ("compact_", "decode_evict_"):
            return torch.stack(list(out))
        return None


KERNEL_SCRATCH_METHOD = ("tgvkv on CPU: plus its kernels' own scratch, the peak of "
                         "tgvkv._C.cpu_scratch_bytes() in that call, made from released caches")


def _timed(tm, fn, setup, nbytes, copy_bw, device, memory, own_scratch=False):
    """Report of one implementation of one stage: its Timing ``tm``, GB/s and peak extra memory;
    ``own_scratch`` (tgvkv on CPU): the kernels' own scratch added to it."""
    r = tm.as_dict()
    r["gbs"] = nbytes / (tm.median_ms / 1e3) / 1e9 if nbytes else None
    r["pct_copy_bw"] = 100 * r["gbs"] / copy_bw if nbytes and copy_bw else None
    r["peak_extra_bytes"] = None
    method = None
    if memory:
        if setup is not None:
            setup()
        # tgvkv on CPU: its kernels' own buffers (tgvkv._C.cpu_scratch_bytes), which the
        # profiler's allocator events do not see, counted in the same call, made from released
        # caches (release_cpu_scratch) so the caches it builds and keeps count too
        scratch = own_scratch and not device.startswith("cuda")
        if scratch:
            from .. import _C
            _C.release_cpu_scratch()
        r["peak_extra_bytes"], method = peak_extra_bytes(fn, device)
        if scratch:
            r["kernel_scratch_bytes"] = int(_C.cpu_scratch_bytes()["peak"])
            r["peak_extra_bytes"] += r["kernel_scratch_bytes"]
            method = f"{method}; {KERNEL_SCRATCH_METHOD}"
    return r, method


def _stage_row(case, st, kr, fns, nbytes, copy_bw, timing, bar, floor_fn=None):
    """One row of the ops table: both implementations checked once each from the same state,
    then timed. ``floor_fn`` (score_text_vision: the plain side's Q.K^T products alone, see
    :func:`_plain_gemm_products`) is timed in the same interleaved loop, so the speed-up ceiling
    is of the same moments as the speed-up. Returns (row, memory method, floor Timing or None)."""
    t_fn, b_fn, setup = fns
    row = {"op": st, "keep_ratio": kr, "bytes": nbytes}
    keys = []
    for fn in (t_fn, b_fn):
        if setup is not None:
            setup()
        keys.append(case.same_key(st, fn()))
    row["same_result"] = (None if keys[0] is None
                          else bool(torch.equal(keys[0].cpu(), keys[1].cpu())))
    if st == "decode_evict_":
        row["evictions_per_call"] = int((keys[0] >= 0).sum())
    method = None
    # both timed in turn, call by call (time_interleaved): the ratio is of the same moments
    warmup, reps, min_time, memory = timing
    tms = time_interleaved([t_fn, b_fn] + ([floor_fn] if floor_fn else []), case.device,
                           setup=setup, warmup=warmup, reps=reps, min_time_s=min_time)
    for impl, fn, tm in (("tgvkv", t_fn, tms[0]), ("torch", b_fn, tms[1])):
        row[impl], m = _timed(tm, fn, setup, nbytes, copy_bw, case.device, memory,
                              own_scratch=impl == "tgvkv")
        method = method or m  # tgvkv's: the one that names its kernel scratch
        if bar is not None:
            bar.set_postfix_str(f"{st} {impl} k={kr}")
            bar.update(1)
    row["speedup"] = row["torch"]["median_ms"] / row["tgvkv"]["median_ms"]
    pt, pb = row["tgvkv"]["peak_extra_bytes"], row["torch"]["peak_extra_bytes"]
    row["peak_ratio"] = (pt / pb) if (pt is not None and pb) else None
    return row, method, (tms[2] if floor_fn else None)


def _score_gflops(case, row, floor, warmup, reps, min_time) -> dict:
    """GFLOP/s of score_text_vision against torch.matmul of the same Q.K^T shapes in fp32 (inputs
    converted outside the timed region), timed in this run; ``floor``: the Timing of
    :func:`_plain_gemm_products`, taken in turn with the row's two implementations.

    Flop model: ``guidance``: the guidance rows' Q.K^T, ``2*L*B*Hq*T*N*D``; ``all_queries``: that
    plus the causal half of every row's logits, ``L*B*Hq*N*N*D`` (the text mass needs each row's
    logsumexp over keys ``j <= i``); the matmul ceiling is then the full ``[N, D] x [D, N]`` per
    head (the causal kernel has half its flops to do, at best at the same rate)."""
    shape = case.shape
    B, Hkv, D, N = shape.batch, shape.kv_heads, shape.head_dim, shape.tokens
    L, Hq, T = shape.layers, shape.heads, shape.text_tokens
    flops = 2 * L * B * Hq * T * N * D
    qsrc = case.qs
    mm_flops = flops
    if case.text_score == "all_queries":
        flops += L * B * Hq * N * N * D
        qsrc = case.q_in
        mm_flops = 2 * L * B * Hq * N * N * D
    qf = [q.float().reshape(B, Hkv, -1, D) for q in qsrc]
    kt = [k.float().transpose(-1, -2) for k in case.k0]
    def matmuls():  # one layer's product at a time: all_queries' [Hkv, G*N, N] x L can exceed RAM
        for a, b in zip(qf, kt):
            torch.matmul(a, b)

    mm = time_fn(matmuls, case.device, warmup=warmup, reps=reps, min_time_s=min_time)
    del qf, kt
    g = {impl: flops / (row[impl]["median_ms"] / 1e3) / 1e9 for impl in ("tgvkv", "torch")}
    g["matmul"] = mm_flops / (mm.median_ms / 1e3) / 1e9
    return {"flops": flops, "matmul_flops": mm_flops, "matmul_ms": mm.median_ms, "gflops": g,
            "pct_matmul": 100 * g["tgvkv"] / g["matmul"], "flop_model": case.text_score,
            "gemm_floor_ms": floor.median_ms,
            "speedup_ceiling": row["torch"]["median_ms"] / floor.median_ms}


def _plain_gemm_products(case):
    """A call running the plain composition's own Q.K^T products alone (:mod:`tgvkv.torch_impl`):
    per layer the guidance rows against every key and, for ``all_queries``, each chunk of
    ``TEXT_MASS_CHUNK`` counted rows against its causal keys, with the operands converted to fp32
    and laid out as it multiplies them beforehand (not in the call). An implementation that runs
    these products at ``torch.matmul``'s rate and does nothing else takes as long as this call, so
    no such implementation beats the plain composition by more than (its time) / (this call's):
    the ``speedup_ceiling`` of the report. tgvkv runs the same causal products (its own tiles)."""
    shape, m = case.shape, case.masks
    B, Hkv, D = shape.batch, shape.kv_heads, shape.head_dim
    all_q = case.text_score == "all_queries"
    kf = [k.float() for k in case.k0]
    qg = [(torch_impl.gather_rows(q, case.q_pos) if all_q else q).float().reshape(B, Hkv, -1, D)
          for q in case.q_in]
    chunks = [[] for _ in kf]
    if all_q:
        _, n_rows = torch_impl.text_mass_rows(case.mod, m.guidance_slot)
        R = torch_impl.TEXT_MASS_CHUNK
        for l, q in enumerate(case.q_in):
            for r0 in range(0, n_rows, R):
                r1 = min(n_rows, r0 + R)
                chunks[l].append((q[:, :, r0:r1].float().reshape(B, Hkv, -1, D), r1))

    def gemms():
        for l, k in enumerate(kf):
            torch.matmul(qg[l], k.mT)
            for a, r1 in chunks[l]:
                torch.matmul(a, k[:, :, :r1].mT)

    return gemms


def run_ops(shape, preset, device, dtype, dtype_name, keep_ratios, budget="mass",
            redistribute=False, stages=OP_STAGES, warmup=2, reps=20, min_time=0.5,
            memory=True, seed=0, progress=True, n_sink=4, text_score="all_queries") -> dict:
    """Time the ops and their plain-PyTorch compositions; returns the ``ops`` section.
    ``text_score``: of score_text_vision and evict ("all_queries": they read every query row)."""
    ops = _load_tgvkv_ops()
    case = _Case(shape, device, dtype, seed, ops, budget, redistribute, n_sink, text_score)
    copy_bw = copy_bandwidth_gbs(device)
    rows = []
    mem_method = None
    bar = progress_bar(len(keep_ratios) * len(stages) * 2, "ops", not progress)
    for kr in keep_ratios:
        case.at_keep_ratio(kr, "decode_evict_" in stages)
        table_, nbytes = case.stages(kr), case.nbytes()
        for st in stages:
            score = st == "score_text_vision"
            row, m, floor = _stage_row(case, st, kr, table_[st], nbytes[st], copy_bw,
                                       (warmup, reps, min_time, memory), bar,
                                       _plain_gemm_products(case) if score else None)
            if score:
                # achieved GFLOP/s vs torch.matmul of the same Q.K^T (see _score_gflops)
                row.update(_score_gflops(case, row, floor, warmup, reps, min_time))
            mem_method = m or mem_method
            rows.append(row)
    if bar is not None:
        bar.close()
    return {"shape": asdict(shape), "preset": preset, "dtype": dtype_name, "budget": budget,
            "redistribute": redistribute, "text_score": text_score, "copy_bandwidth_gbs": copy_bw,
            "memory_method": mem_method,
            "bytes_model": "score: read Q and K; compact: read + write the kept K and V rows; "
                           "evict: both; decode (second decode step after prefill eviction, "
                           "one eviction per layer): read the live K rows and q",
            "rows": rows}


def ops_table(sec: dict) -> str:
    sh = sec["shape"]
    title = (f"ops: L={sh['layers']} Hq={sh['heads']} Hkv={sh['kv_heads']} D={sh['head_dim']} "
             f"N={sh['tokens']} (vision {sh['vision_tokens']}, T={sh['text_tokens']}) "
             f"B={sh['batch']} {sec['dtype']} text_score={sec.get('text_score', 'guidance')}"
             + (f" [{sec['preset']}]" if sec.get("preset") else "")
             + f"; copy bandwidth {sec['copy_bandwidth_gbs']:.1f} GB/s")
    hdr = ["op", "keep", "tgvkv ms (min-max)", "torch ms (min-max)", "speedup", "GB/s",
           "% copy", "peak tgvkv", "peak torch", "same"]
    out = []
    for r in sec["rows"]:
        t, b = r["tgvkv"], r["torch"]
        out.append([r["op"], fmt(r["keep_ratio"], "g"),
                    f"{t['median_ms']:.3f} ({t['min_ms']:.3f}-{t['max_ms']:.3f})",
                    f"{b['median_ms']:.3f} ({b['min_ms']:.3f}-{b['max_ms']:.3f})",
                    f"{r['speedup']:.2f}x", fmt(t["gbs"], ".1f"), fmt(t["pct_copy_bw"], ".0f"),
                    fmt_bytes(t["peak_extra_bytes"]), fmt_bytes(b["peak_extra_bytes"]),
                    {True: "yes", False: "NO", None: "-"}[r.get("same_result")]])
    note = ("speedup = plain-PyTorch median / tgvkv median (same run, timed in turn call by "
            "call); GB/s of tgvkv by the bytes model: " + sec["bytes_model"] + "; peak = extra "
            "memory allocated during the call (" + (sec.get("memory_method") or "not measured")
            + "); same = both implementations "
            "give the identical kept slots / counts / evicted positions from the same state")
    for r in sec["rows"]:
        if r.get("gflops"):
            g = r["gflops"]
            note += (f"\n{r['op']} keep {fmt(r['keep_ratio'], 'g')} ({r.get('flop_model', 'guidance')}"
                     f" flop model): Q.K^T at {g['tgvkv']:.1f} "
                     f"GFLOP/s = {r['pct_matmul']:.0f}% of torch.matmul of the same Q.K^T in fp32 "
                     f"({g['matmul']:.1f} GFLOP/s, {r['matmul_ms']:.1f} ms; plain PyTorch "
                     f"composition {g['torch']:.1f} GFLOP/s); the plain composition's Q.K^T "
                     f"products alone take {r['gemm_floor_ms']:.1f} ms: a speed-up ceiling of "
                     f"{r['speedup_ceiling']:.2f}x for any implementation running them at "
                     f"torch.matmul's rate")
    return table(hdr, out, title) + "\n" + note

