"""What every part of ``tgvkv-bench`` shares: the user-error type, plain-text tables, number
formats, the progress bar."""

from __future__ import annotations

import math
import sys


class UserError(Exception):
    """A mistake in the command line or the environment: one line on stderr, exit code 2."""


def progress_bar(total: int, desc: str, disabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; degrade gracefully anyway
        return None
    return tqdm(total=total, desc=desc, disable=True if disabled else None, file=sys.stderr,
                leave=False, dynamic_ncols=True)


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt(x, spec=".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return "-"
    return format(x, spec)


def table(headers: list[str], rows: list[list[str]], title: str | None = None) -> str:
    """A plain-text table: left-aligned first column, right-aligned others."""
    cols = list(zip(*([headers] + rows))) if rows else [[h] for h in headers]
    widths = [max(len(str(c)) for c in col) for col in cols]
    def line(cells):
        out = []
        for i, (c, w) in enumerate(zip(cells, widths)):
            out.append(str(c).ljust(w) if i == 0 else str(c).rjust(w))
        return "  ".join(out).rstrip()
    sep = "  ".join("-" * w for w in widths)
    body = [line(headers), sep] + [line(r) for r in rows]
    if title:
        body = [title] + body
    return "\n".join(body)

