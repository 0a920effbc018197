"""``tgvkv-bench``: microbenchmarks of the ops, end-to-end generation and accuracy, in one command.

Usage::

    tgvkv-bench                       # the whole story on built-in defaults (< 2 min on 2 CPU cores)
    tgvkv-bench ops --preset llava-1.5-7b --dtype bfloat16 --keep-ratio 0.1 0.05
    tgvkv-bench ops --layers 32 --heads 32 --kv-heads 8 --head-dim 128 --tokens 3000 \\
                    --vision-tokens 2928 --text-tokens 40 --batch 1
    tgvkv-bench generate --preset tiny --keep-ratio 1.0 0.5 0.1 --batch 1 4
    tgvkv-bench generate --model /path/to/llava-1.5-7b-hf --device cuda
    tgvkv-bench generate --kv-dominated --json bench/results/cpu_generate_kv_dominated.json
    tgvkv-bench accuracy
    ... --json report.json --plot report.png

Every speed is also given as a ratio against the fastest plain-PyTorch composition of the same
computation measured in the same run (:mod:`tgvkv.torch_impl`). Timings are taken after warm-up and
summarised as median / min / max over many repetitions (CUDA events on GPU, perf_counter on CPU);
``ops`` times an op and its baseline in turn, call by call (:func:`tgvkv.bench.timing.time_interleaved`).

JSON report (``--json FILE``), schema ``tgvkv-bench/1``::

    {
      "schema": "tgvkv-bench/1",
      "command": "tgvkv-bench ops --preset tiny",     # the exact command line (shell-quoted)
      "argv": [...], "started_utc": "...", "wall_s": 12.3,
      "versions": {"tgvkv", "tgvkv_build", "torch", "transformers", "python"},
      "device": {"device", "cpu", "cpu_id", "cpu_count", "torch_threads", "load_avg_1_5_15",
                 "gpu", "gpu_memory_gib", "cuda" (CUDA only)},
      "ops": {                                         # present when ops were timed
        "shape": {"layers", "heads", "kv_heads", "head_dim", "tokens", "vision_tokens",
                  "text_tokens", "batch"}, "preset": str|null, "dtype": str,
        "budget": str, "redistribute": bool, "copy_bandwidth_gbs": float,
        "memory_method": str, "bytes_model": str,
        "rows": [{"op": str, "keep_ratio": float,
                  "tgvkv": {"median_ms", "min_ms", "max_ms", "reps", "gbs", "pct_copy_bw",
                            "peak_extra_bytes",        # CPU: kernel_scratch_bytes included
                            "kernel_scratch_bytes"},   # CPU, with memory: its kernels' own buffers
                  "torch": {... same keys ...},
                  "speedup": float,                    # torch median / tgvkv median
                  "peak_ratio": float|null,            # tgvkv peak / torch peak
                  "same_result": bool|null,            # both gave identical kept slots/counts
                  "evictions_per_call": int,           # decode_evict_ rows only
                  "bytes": int|null,
                  # score_text_vision rows only (tgvkv.bench.ops._score_gflops):
                  "flops", "matmul_flops", "matmul_ms", "gflops": {"tgvkv", "torch", "matmul"},
                  "pct_matmul", "flop_model",
                  "gemm_floor_ms": float,              # the plain side's Q.K^T products alone,
                                                       # timed in turn with both implementations
                  "speedup_ceiling": float}]},         # torch median / gemm_floor_ms
      "generate": {                                    # present when generation was timed
        "model": str, "dtype": str, "new_tokens": int, "prompt_tokens": int,
        "backend": str,                                # which op implementation the policy used
        "rows": [{"keep_ratio": float|null (null: unpatched model), "batch": int,
                  "prefill_ms", "ttft_ms", "decode_tok_s", "decode_ms_per_step",
                  "cache_bytes", "cache_bytes_full", "kept_fraction", "peak_bytes",
                  "peak_method", "decode_speedup_vs_unpatched", "ttft_ratio_vs_unpatched",
                  "decode_speedup_paired": float|null,   # median over reps of per-rep ratios
                  "decode_speedup_paired_ci95": [lo, hi]|null}],  # its bootstrap 95% interval
        "max_batch": {...} (CUDA only)},
      "accuracy": {...the result of tgvkv.eval.run()..., "table": str,
                   "rows": [{"policy", "keep_ratio" (null: full cache), "accuracy",
                             "pct_of_full", "n_diff_vs_full", "seconds"}]}
                  (or {"skipped": reason} in the default run),
      "load_avg_end": [1, 5, 15 min]                   # load average when the run ended
    }
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone

from .common import UserError, progress_bar
from .env import device_info, versions
from .ops import OP_STAGES
from .plot import check_plot_deps, write_plot

DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_KEEP_RATIOS_GEN = (1.0, 0.5, 0.2, 0.1, 0.05)


def _keep_ratio(s: str) -> float:
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"keep ratio must be a number in (0, 1], got {s!r}")
    if not (0.0 < x <= 1.0) or math.isnan(x):
        raise argparse.ArgumentTypeError(f"keep ratio must be in (0, 1], got {s}")
    return x


def _int_at_least(lo: int, what: str):
    """An argparse type: an int >= ``lo``, with ``what`` in the error message."""
    def parse(s: str) -> int:
        try:
            x = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        if x < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s}")
        return x
    return parse


_pos_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump for user mistakes
        raise UserError(f"{self.prog}: {message}")


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common")
    g.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    g.add_argument("--dtype", choices=DTYPES, default=None,
                   help="K/V/Q dtype (default: float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--json", metavar="FILE", help="write the report as JSON (schema: see --help)")
    g.add_argument("--plot", metavar="FILE.png",
                   help="plot speed / memory (/ accuracy) vs keep ratio (needs matplotlib: "
                        "pip install 'tgvkv[plot]')")
    g.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    g.add_argument("--threads", type=_pos_int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _text_score_arg(g) -> None:
    g.add_argument("--text-score", choices=("all_queries", "guidance"), default="all_queries",
                   help="text ranking (SPEC 1.3): all_queries = column sums over every query row "
                        "(the released code, default); guidance = over the guidance rows only")


def _ops_args(p: argparse.ArgumentParser, default_reps: int = 20) -> None:
    g = p.add_argument_group("op shapes (a preset, or any field overridden)")
    g.add_argument("--preset", default=None,
                   help="llava-1.5-7b | llava-next-7b | qwen2.5-vl-7b | tiny "
                        "(L/Hq/Hkv/D/N/vision/T/B of a single-image prompt)")
    for name, hlp in (("layers", "L"), ("heads", "query heads Hq"), ("kv-heads", "KV heads Hkv"),
                      ("head-dim", "D"), ("tokens", "prompt slots N"),
                      ("vision-tokens", "vision slots"), ("text-tokens", "guidance text T"),
                      ("batch", "B")):
        g.add_argument(f"--{name}", type=_nonneg_int if "tokens" in name else _pos_int,
                       default=None, help=hlp)
    g.add_argument("--keep-ratio", type=_keep_ratio, nargs="+", default=None,
                   help="keep ratio(s) kappa in (0, 1] (default 0.1)")
    g.add_argument("--budget", choices=("mass", "mi"), default="mass")
    g.add_argument("--redistribute", action="store_true")
    _text_score_arg(g)
    g.add_argument("--op", choices=OP_STAGES + ("all",), nargs="+", default=["all"],
                   help="which ops to time (default all)")
    g.add_argument("--warmup", type=_nonneg_int, default=2, help="untimed calls first (default 2)")
    g.add_argument("--reps", type=_pos_int, default=default_reps,
                   help=f"timed repetitions, at least (default {default_reps})")
    g.add_argument("--min-time", type=float, default=0.5,
                   help="keep repeating until this many seconds were timed (default 0.5)")
    g.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")


def _gen_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--model", metavar="PATH", default=None,
                   help="a local Hugging Face VLM checkpoint (directory with config.json)")
    g.add_argument("--preset", default=None,
                   help="architecture built from its config with random weights "
                        "(default: tiny; on CUDA the full-size presets work too)")
    g.add_argument("--keep-ratio", type=_keep_ratio, nargs="+", default=None,
                   help="keep ratios (default 1.0 0.5 0.2 0.1 0.05; the unpatched model is "
                        "always measured too)")
    g.add_argument("--batch", type=_pos_int, nargs="+", default=[1], help="batch sizes (default 1)")
    g.add_argument("--new-tokens", type=_pos_int, default=32, help="tokens generated (default 32)")
    g.add_argument("--reps", type=_pos_int, default=3, help="timed generate() calls (default 3)")
    g.add_argument("--max-batch", action="store_true",
                   help="CUDA: search the largest batch that fits with and without eviction")
    g.add_argument("--layers", type=_pos_int, default=None,
                   help="decoder layers of the preset's language model (full width; default: "
                        "the preset's own count, 2 with --kv-dominated)")
    g.add_argument("--kv-dominated", action="store_true",
                   help="CPU: the configuration where K/V reads dominate the decode step, chosen "
                        "from a roofline model of the measured GEMM rate and bandwidth (preset "
                        "llava-1.5-7b, --layers 2, batches 1 and 8, prompt length from the model; "
                        "one prefill, every keep ratio decoded from copies of its state); see "
                        "tgvkv.bench.kv_dominated")
    _text_score_arg(g)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tgvkv-bench",
                description="Benchmarks of tgvkv (TGV-KV KV-cache eviction): op speed and memory "
                            "against the fastest plain-PyTorch composition, end-to-end generation "
                            "with a Hugging Face VLM, and accuracy. Without a command: a complete "
                            "run on small built-in defaults (< 2 minutes on a 2-core CPU).",
                epilog=__doc__.split("JSON report", 1)[1].join(["JSON report", ""]),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="store_true", help="print versions and exit")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    po = sub.add_parser("ops", help="time every op and the whole evict vs plain PyTorch",
                        description="Time each tgvkv op and the whole evict on a preset or given "
                                    "shapes, against the plain-PyTorch composition in the same run.")
    _ops_args(po)
    _common(po)
    pg = sub.add_parser("generate", help="end-to-end generate() with a VLM at several keep ratios",
                        description="Prefill time, time to first token, decode tokens/s, cache "
                                    "bytes and peak memory of model.generate() with TGV-KV.")
    _gen_args(pg)
    _common(pg)
    pa = sub.add_parser("accuracy", help="the accuracy harness (a committed subject on its dataset)",
                        description="Runs tgvkv.eval (accuracy of eviction policies vs keep ratio "
                                    "on a VQA set) and prints its table. Default: the committed "
                                    "subject tgvkv.eval.DEFAULT_SUBJECT on its own dataset, every "
                                    "policy, keep 0.5 0.2 0.1 0.05.")
    ga = pa.add_argument_group("accuracy")
    ga.add_argument("--model", metavar="PATH", default=None,
                    help="local VLM checkpoint (default: the committed subject of --subject)")
    ga.add_argument("--subject", default=None, choices=("tiny-llava-grid", "tiny-llava-easyvqa"),
                    help="a committed subject (default tgvkv.eval.DEFAULT_SUBJECT, "
                         "tiny-llava-grid: 8 layers, 256 image tokens, a question about one "
                         "cell of a 2x2 grid; tiny-llava-easyvqa: 3 layers, 64 image tokens)")
    ga.add_argument("--dataset", default=None,
                    help="easy-vqa | easy-vqa-full | easy-vqa-grid | a JSONL file (default: the "
                         "subject's own: easy-vqa for tiny-llava-easyvqa and --model, "
                         "easy-vqa-grid for tiny-llava-grid)")
    ga.add_argument("--policy", nargs="+", default=None,
                    help="eviction policies (default: all of tgvkv.eval.POLICIES)")
    ga.add_argument("--keep-ratio", type=_keep_ratio, nargs="+", default=None,
                    help="keep ratios (default 0.5 0.2 0.1 0.05; add 1.0 for the passthrough "
                         "check: every policy must then give the full-cache predictions)")
    ga.add_argument("--limit", type=_pos_int, default=None, help="first N samples only")
    ga.add_argument("--max-new-tokens", type=_pos_int, default=32)
    ga.add_argument("--quick", action="store_true",
                    help="the small subset of the default run (tgvkv policy, 24 samples)")
    _text_score_arg(ga)
    _common(pa)
    pd = sub.add_parser("all", help="the default run (what no command does)")
    pd.add_argument("--skip", choices=("ops", "generate", "accuracy"), nargs="+", default=[])
    _common(pd)
    return p


def _resolve_device(arg: str | None) -> str:
    import torch

    if arg is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    d = arg.strip().lower()
    if d == "cpu":
        return "cpu"
    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {arg}: CUDA is not available on this machine "
                            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        try:
            dev = torch.device(d)
        except RuntimeError:
            raise UserError(f"--device {arg}: not a device (use cpu, cuda or cuda:N)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {arg}: only {torch.cuda.device_count()} CUDA device(s)")
        return d
    raise UserError(f"--device {arg}: unknown device (use cpu, cuda or cuda:N)")


def _resolve_dtype(arg: str | None, device: str):
    import torch

    name = arg or ("bfloat16" if device.startswith("cuda") else "float32")
    return getattr(torch, name), name


def run_generate_section(args, device, dtype, dtype_name, progress=True, keep_ratios=None,
                         batches=None, new_tokens=None, reps=None) -> dict:
    from .generate import run_generate

    return run_generate(
        model_path=getattr(args, "model", None), preset=getattr(args, "preset", None),
        device=device, dtype=dtype, dtype_name=dtype_name,
        keep_ratios=keep_ratios or getattr(args, "keep_ratio", None) or list(DEFAULT_KEEP_RATIOS_GEN),
        batches=batches or getattr(args, "batch", None) or [1],
        new_tokens=new_tokens or getattr(args, "new_tokens", 32),
        reps=reps or getattr(args, "reps", 3), seed=args.seed, progress=progress,
        max_batch=getattr(args, "max_batch", False), error=UserError,
        text_score=getattr(args, "text_score", "all_queries"),
        layers=getattr(args, "layers", None) if getattr(args, "command", None) == "generate"
        else None,
        progress_factory=(lambda n, d: progress_bar(n, d, not progress)))


def run_accuracy_section(args, device, progress=True, quick=False) -> dict:
    from .accuracy import run_accuracy

    return run_accuracy(
        model=getattr(args, "model", None), dataset=getattr(args, "dataset", None),
        subject=getattr(args, "subject", None),
        policies=getattr(args, "policy", None), keep_ratios=getattr(args, "keep_ratio", None),
        limit=getattr(args, "limit", None), max_new_tokens=getattr(args, "max_new_tokens", 32),
        device=device, quick=quick or getattr(args, "quick", False), progress=progress,
        error=UserError, text_score=getattr(args, "text_score", "all_queries"))


def _command_line(argv) -> str:
    return " ".join(["tgvkv-bench"] + [shlex.quote(a) for a in argv])


def _run_command(cmd, args, report, device, dtype, dtype_name, progress) -> list[str]:
    """Run one sub-command into ``report``; returns the tables to print at the end."""
    from .generate import generate_table
    from .ops import _ops_shape, ops_table, run_ops

    if cmd == "ops":
        shape = _ops_shape(args)
        stages = OP_STAGES if "all" in args.op else tuple(s for s in OP_STAGES if s in args.op)
        report["ops"] = run_ops(shape, args.preset, device, dtype, dtype_name,
                                args.keep_ratio or [0.1], args.budget, args.redistribute, stages,
                                args.warmup, args.reps, args.min_time, not args.no_memory,
                                args.seed, progress, text_score=args.text_score)
        return [ops_table(report["ops"])]
    if cmd == "generate":
        if args.model is not None and args.preset is not None:
            raise UserError("give --model PATH or --preset NAME, not both")
        if args.kv_dominated:
            from .kv_dominated import kv_table, run_kv_dominated

            if args.model is not None:
                raise UserError("--kv-dominated builds its model from a preset; drop --model")
            if device != "cpu":
                raise UserError("--kv-dominated is the CPU roofline configuration (--device cpu)")
            try:
                report["generate"] = run_kv_dominated(
                    preset=args.preset or "llava-1.5-7b", layers=args.layers or 2,
                    keep_ratios=args.keep_ratio or list(DEFAULT_KEEP_RATIOS_GEN),
                    batches=args.batch if args.batch != [1] else [1, 8],
                    new_tokens=args.new_tokens, dtype=dtype, dtype_name=dtype_name,
                    device=device, seed=args.seed, progress=progress)
            except ValueError as e:
                raise UserError(str(e)) from None
            return [kv_table(report["generate"])]
        report["generate"] = run_generate_section(args, device, dtype, dtype_name, progress)
        return [generate_table(report["generate"])]
    if cmd == "accuracy":
        if args.model is not None and not os.path.isdir(args.model):
            raise UserError(f"--model {args.model}: not a directory (expected a local checkpoint)")
        report["accuracy"] = run_accuracy_section(args, device, progress)
        return [report["accuracy"].get("table", "")]
    _default_run(args, report, device, dtype, dtype_name, progress)
    return []


def _default_run(args, report, device, dtype, dtype_name, progress) -> None:
    """The argument-less run: small ops shapes, the tiny model, a tiny accuracy subset (of the
    subject :data:`tgvkv.bench.accuracy.QUICK_SUBJECT`, named in its table); each table is printed
    as soon as its section is done."""
    from .generate import generate_table
    from .ops import ops_table, run_ops
    from .shapes import DEFAULT_OPS_SHAPE

    skip = set(getattr(args, "skip", []))
    if "ops" not in skip:
        report["ops"] = run_ops(DEFAULT_OPS_SHAPE, None, device, dtype, dtype_name, [0.1], "mass",
                                False, OP_STAGES, 1, 5, 0.1, True, args.seed, progress)
        print(ops_table(report["ops"]) + "\n", flush=True)
    if "generate" not in skip:
        report["generate"] = run_generate_section(
            args, device, dtype, dtype_name, progress, keep_ratios=[1.0, 0.5, 0.2, 0.1],
            batches=[1, 4], new_tokens=16, reps=3)
        print(generate_table(report["generate"]) + "\n", flush=True)
    if "accuracy" not in skip:
        try:
            report["accuracy"] = run_accuracy_section(args, device, progress, quick=True)
            text = report["accuracy"].get("table", "")
        except UserError as e:  # optional in the default run: say why it was skipped
            report["accuracy"] = {"skipped": str(e)}
            text = f"accuracy: skipped ({e})"
        print(text + "\n", flush=True)


def _finish(report, texts, args, device) -> None:
    """Print the tables and the run's facts; write --json / --plot."""
    for t in texts:
        print(t + "\n")
    dev = report["device"]
    print(f"device: {dev.get('gpu') or dev['cpu']} ({dev['device']}, {dev['torch_threads']} "
          f"threads, load {dev.get('load_avg_1_5_15')}); versions: "
          + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if k != "tgvkv_build")
          + f"; wall {report['wall_s']} s")
    print(f"command: {report['command']}")
    load = dev.get("load_avg_1_5_15")
    if load and dev.get("cpu_count") and load[0] > 0.5 * dev["cpu_count"] and device == "cpu":
        print(f"note: the 1-minute load average ({load[0]}) is high for {dev['cpu_count']} CPU "
              "cores: other processes compete for them and CPU timings are unreliable",
              file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(report, args.plot)
        print(f"wrote {args.plot}")


def _check_output_path(flag: str, path: str) -> None:
    """Before any work: ``path`` can be written (a regular file, or a new one in an existing,
    writable directory), so that a long run does not end in a traceback."""
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a directory, expected a file name")
    if os.path.exists(path) and not os.path.isfile(path):
        raise UserError(f"{flag} {path}: not a regular file")
    if not os.path.isdir(d):
        raise UserError(f"{flag} {path}: directory {d} does not exist")
    try:  # the real test (permissions, read-only or full file systems): write a probe file
        with tempfile.NamedTemporaryFile(dir=d, prefix=".tgvkv-bench-probe-") as f:
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {d} ({e.strerror or e})") from None
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path}: the file is not writable")


def _run(argv: list[str]) -> int:
    parser = build_parser()
    orig_argv = list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["all"] + argv  # no command: the default run
    args = parser.parse_args(argv)
    if args.version:
        print(json.dumps(versions(), indent=2))
        return 0
    cmd = args.command or "all"
    check_plot_deps(args.plot)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            _check_output_path(flag, path)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    dtype, dtype_name = _resolve_dtype(args.dtype, device)
    progress = not args.no_progress
    t0 = time.perf_counter()
    report = {"schema": "tgvkv-bench/1", "command": _command_line(orig_argv), "argv": orig_argv,
              "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": versions(), "device": device_info(device)}
    texts = _run_command(cmd, args, report, device, dtype, dtype_name, progress)
    report["wall_s"] = round(time.perf_counter() - t0, 2)
    try:
        report["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    _finish(report, texts, args, device)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tgvkv-bench``; returns the exit code (0 ok, 2 user error, 1 failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except UserError as e:
        msg = str(e)
        if not msg.startswith("tgvkv-bench"):
            msg = "tgvkv-bench: error: " + msg
        print(msg, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tgvkv-bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
