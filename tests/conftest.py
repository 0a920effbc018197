"""Shared fixtures and helpers of the tgvkv test suite.

- Sets ``HF_HUB_OFFLINE=1`` (no hub access exists on the test machines).
- The package lives in ``src/tgvkv`` (src layout), so ``python -m pytest tests`` from the
  repository root imports the *installed* tgvkv with its compiled ``_C``, in this process and in
  every subprocess a test starts; nothing here touches ``sys.path``.
- ``DEVICES``: the device grid ("cpu", plus "cuda" skipped with a reason when unavailable).
- Generators of realistic batches (text / several images / guidance text, left or right padding)
  and comparison helpers shared by the ``test_ops_*`` files.
"""

from __future__ import annotations

import contextlib
import io
import os
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import tgvkv  # noqa: E402,F401  (loads the extension: registers torch.ops.tgvkv.*)
from tgvkv import reference as ref  # noqa: E402

try:  # hypothesis is a test dependency; keep its example count bounded on shared CI cores
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "tgvkv", max_examples=25, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.load_profile(os.environ.get("TGVKV_HYPOTHESIS_PROFILE", "tgvkv"))
except ImportError:  # pragma: no cover
    pass

# Under pytest-xdist (the README's test command runs ``-n auto``) each worker gets its share of
# the cores for torch's intra-op threads, so that N workers do not run N x cores threads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

PAD, TEXT, VISION = ref.PAD, ref.TEXT, ref.VISION
HAS_CUDA = torch.cuda.is_available()
CUDA_SKIP = pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available (CPU-only machine)")
DEVICES = ["cpu", pytest.param("cuda", marks=[CUDA_SKIP, pytest.mark.cuda])]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = torch.ops.tgvkv


def pytest_collection_modifyitems(config, items):
    for item in items:  # anything parametrized on cuda gets the cuda marker
        cs = getattr(item, "callspec", None)
        if cs is not None and cs.params.get("device") == "cuda":
            item.add_marker(pytest.mark.cuda)


# ------------------------------------------------------------------------------------------
# Batch generators
# ------------------------------------------------------------------------------------------
def sample_layout(n_real: int, n_guid: int, n_images: int, gen: torch.Generator) -> list[int]:
    """Modality codes of one sample (no pads): text prefix, ``n_images`` vision runs separated by
    text, then ``n_guid`` guidance text slots. ``n_images == 0``: all text."""
    if n_images == 0:
        return [TEXT] * n_real
    body = n_real - n_guid
    assert body >= 2 * n_images - 1, (n_real, n_guid, n_images)
    # split body into prefix (>=0), images (>=1 each), separators (>=1 each)
    n_parts = 2 * n_images  # prefix, img, sep, img, ..., img
    mins = [0] + [1] * (n_parts - 1)
    free = body - sum(mins)
    cuts = sorted(torch.randint(0, free + 1, (n_parts - 1,), generator=gen).tolist())
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [free])]
    sizes = [s + m for s, m in zip(sizes, mins)]
    out = [TEXT] * sizes[0]
    for i in range(n_images):
        out += [VISION] * sizes[1 + 2 * i]
        if i < n_images - 1:
            out += [TEXT] * sizes[2 + 2 * i]
    out += [TEXT] * n_guid
    assert len(out) == n_real
    return out


def make_modality(n_real, n_guid, n_images=1, pad="right", N=None, seed=0):
    """[B, N] int8 modality map. ``n_real``/``n_guid``/``n_images``: per-sample lists (or an int
    for n_images); ``pad``: "right", "left" or "mixed" (alternating per sample)."""
    B = len(n_real)
    gen = torch.Generator().manual_seed(seed)
    imgs = n_images if isinstance(n_images, (list, tuple)) else [n_images] * B
    N = max(n_real, default=0) if N is None else N
    mod = torch.zeros(B, N, dtype=torch.int8)
    for b in range(B):
        codes = torch.tensor(sample_layout(n_real[b], n_guid[b], imgs[b], gen), dtype=torch.int8)
        side = pad if pad != "mixed" else ("left" if b % 2 else "right")
        if side == "right":
            mod[b, : n_real[b]] = codes
        else:
            mod[b, N - n_real[b]:] = codes
    return mod


def randn(shape, dtype=torch.float32, seed=0, device="cpu", transposed=False):
    """Seeded normal data. ``transposed``: a non-contiguous view with the same logical shape
    (made by transposing dims 1 and 2 of a contiguous [B, X, H, D] tensor)."""
    gen = torch.Generator().manual_seed(seed)
    if transposed:
        B, H, X, D = shape
        t = torch.randn(B, X, H, D, generator=gen).to(dtype).to(device).transpose(1, 2)
        assert not t.is_contiguous() or H == 1 or X <= 1
        return t
    return torch.randn(*shape, generator=gen).to(dtype).to(device)


def real_slots(modality_b) -> list[int]:
    return [j for j, m in enumerate(modality_b.tolist()) if m != PAD]


# ------------------------------------------------------------------------------------------
# Comparison helpers
# ------------------------------------------------------------------------------------------
def assert_scores_close(got, exp, modality, rtol):
    """Scores [.., B, N]: per modality class, relative to the class's largest magnitude (vision
    scores are ~1/N of text scores, so one absolute tolerance would hide vision errors)."""
    got, exp = got.detach().float().cpu(), exp.detach().float().cpu()
    assert got.shape == exp.shape, (got.shape, exp.shape)
    mod = modality.cpu().expand(got.shape)
    for cls in (PAD, TEXT, VISION):
        sel = mod == cls
        if not bool(sel.any()):
            continue
        g, e = got[sel], exp[sel]
        atol = rtol * float(e.abs().max()) + 1e-30
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol, msg=lambda m: f"class {cls}: {m}")


def assert_stats_close(got, exp, rtol):
    """Stats [.., 2] = (S, I). I is a difference of nearly equal terms (Σ a log a minus the
    marginals), so it gets an absolute floor proportional to S·(1+|log S|)."""
    got, exp = got.detach().float().cpu(), exp.detach().float().cpu()
    assert got.shape == exp.shape, (got.shape, exp.shape)
    torch.testing.assert_close(got[..., 0], exp[..., 0], rtol=rtol, atol=1e-30)
    S = exp[..., 0].abs()
    floor = 1e-5 * float((S * (1 + S.clamp_min(1e-30).log().abs())).max()) if S.numel() else 0.0
    torch.testing.assert_close(got[..., 1], exp[..., 1], rtol=max(rtol, 1e-4), atol=floor + 1e-7)


def assert_same_kept(got_idx, exp_idx, scores=None, modality=None, rel=0.0):
    """keep_idx [L, B, N] equal; with ``rel > 0``, slots that differ must be near-ties (same class,
    scores within ``rel`` relative) of each other: used only where the op's scores and the
    expected selection's scores come from different kernels."""
    got_idx, exp_idx = got_idx.cpu(), exp_idx.cpu()
    assert got_idx.shape == exp_idx.shape, (got_idx.shape, exp_idx.shape)
    if rel == 0.0 or torch.equal(got_idx, exp_idx):
        assert torch.equal(got_idx, exp_idx), _first_diff(got_idx, exp_idx)
        return
    L, B, N = got_idx.shape
    for l in range(L):
        for b in range(B):
            g = [i for i in got_idx[l, b].tolist() if i >= 0]
            e = [i for i in exp_idx[l, b].tolist() if i >= 0]
            assert g == sorted(g) and len(g) == len(e), (l, b, g, e)
            only_g, only_e = set(g) - set(e), set(e) - set(g)
            for x in only_g:
                for y in only_e:
                    sx, sy = float(scores[l, b, x]), float(scores[l, b, y])
                    same_cls = int(modality[b, x]) == int(modality[b, y])
                    near = abs(sx - sy) <= rel * max(abs(sx), abs(sy)) + 1e-30
                    assert same_cls and near, (
                        f"layer {l} sample {b}: op kept {x} (score {sx}), expected {y} (score {sy})")


def _first_diff(a, b):
    d = (a != b).nonzero()
    if d.numel() == 0:
        return "equal"
    i = tuple(d[0].tolist())
    return f"first difference at {i}: got {a[i].item()} expected {b[i].item()} ({d.shape[0]} diffs)"


def gather_kept(x, keep_idx_lb):
    """Reference compaction result [B, H, n_kept_max, D] (list per sample) for checks."""
    out = []
    for b in range(x.shape[0]):
        idx = [i for i in keep_idx_lb[b].tolist() if i >= 0]
        out.append(x[b][:, idx].cpu())
    return out


def assert_compacted(after, before, keep_idx_lb, n_kept_b):
    """after[b, :, :n] bit-identical to before[b, :, kept] (slots beyond n are unspecified)."""
    for b in range(before.shape[0]):
        idx = [i for i in keep_idx_lb[b].tolist() if i >= 0]
        n = int(n_kept_b[b])
        assert n == len(idx), (b, n, len(idx))
        exp = before[b][:, idx].cpu()
        got = after[b][:, :n].cpu()
        assert torch.equal(got, exp), f"sample {b}: compacted rows differ from gather of kept slots"


# ------------------------------------------------------------------------------------------
# The command line, in-process
# ------------------------------------------------------------------------------------------
class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_cli(*args, env_extra=None):
    """Run ``tgvkv-bench ARGS`` in this process (``tgvkv.bench.cli.main``, what the console
    script calls), capturing stdout/stderr and the exit code: a fresh interpreter per command
    line would cost an import of torch each. An unexpected exception becomes exit code 1 with
    its traceback on stderr, as in a real run. ``test_cli.test_console_script_in_a_fresh_interpreter``
    runs the installed entry points for real."""
    from tgvkv.bench import cli as bench_cli

    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        stack.enter_context(_environ({"HF_HUB_OFFLINE": "1", **(env_extra or {})}))
        try:
            rc = bench_cli.main([str(a) for a in args])
        except SystemExit as e:  # argparse: --help, --version, usage errors
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        except Exception:  # noqa: BLE001 - reported like the interpreter would
            traceback.print_exc(file=err)
            rc = 1
        finally:
            torch.set_num_threads(threads)
    return _Result(rc, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _environ(values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
