"""``--plot FILE.png``: speed / memory (/ accuracy) against keep ratio (needs matplotlib)."""

from __future__ import annotations

import os

from .common import UserError
from .ops import OP_STAGES


def check_plot_deps(path: str | None) -> None:
    if path is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib, which is not installed: "
                        "pip install 'tgvkv[plot]' (or pip install matplotlib)")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise UserError(f"--plot {path}: directory {d} does not exist")


def _keep_ratio_axis(ax, keep_ratios) -> None:
    """A log x axis labelled at the measured keep ratios only (0.05, 0.1, ...)."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ticks = sorted(set(keep_ratios))
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{k:g}" for k in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("keep ratio")


def _plot_gen_speed(ax, gen) -> None:
    """Decode tokens/s vs keep ratio, one line per batch size."""
    for i, b in enumerate(sorted({r["batch"] for r in gen["rows"]})):
        rs = sorted([r for r in gen["rows"] if r["batch"] == b and r["keep_ratio"]],
                    key=lambda r: r["keep_ratio"])
        c = f"C{i}"
        ax.plot([r["keep_ratio"] for r in rs], [r["decode_tok_s"] for r in rs], "o-",
                color=c, label=f"decode, batch {b}")
        base = [r for r in gen["rows"] if r["batch"] == b and r["keep_ratio"] is None]
        if base:
            ax.axhline(base[0]["decode_tok_s"], ls="--", color=c, alpha=0.6,
                       label=f"unpatched, batch {b}")
    _keep_ratio_axis(ax, [r["keep_ratio"] for r in gen["rows"] if r["keep_ratio"]])
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"generate: {gen.get('model')}")
    ax.legend(fontsize=8)


def _plot_gen_mem(ax, gen) -> None:
    """KV cache and peak extra memory vs keep ratio."""
    for i, b in enumerate(sorted({r["batch"] for r in gen["rows"]})):
        rs = sorted([r for r in gen["rows"] if r["batch"] == b and r["keep_ratio"]],
                    key=lambda r: r["keep_ratio"])
        c = f"C{i}"
        ax.plot([r["keep_ratio"] for r in rs], [r["cache_bytes"] / 2**20 for r in rs],
                "o-", color=c, label=f"KV cache after generate(), batch {b}")
        if rs and rs[0].get("peak_bytes") is not None:
            ax.plot([r["keep_ratio"] for r in rs],
                    [(r["peak_bytes"] or 0) / 2**20 for r in rs], "s:", color=c,
                    label=f"peak extra memory of generate(), batch {b}")
    _keep_ratio_axis(ax, [r["keep_ratio"] for r in gen["rows"] if r["keep_ratio"]])
    ax.set_ylabel("MiB")
    ax.set_title("memory vs keep ratio")
    ax.legend(fontsize=8)


def _plot_ops(ax, ops) -> None:
    """Speed-up of every op against plain PyTorch, per keep ratio."""
    names = sorted({r["op"] for r in ops["rows"]}, key=OP_STAGES.index)
    krs = sorted({r["keep_ratio"] for r in ops["rows"]})
    width = 0.8 / max(1, len(krs))
    for i, kr in enumerate(krs):
        ys = []
        for n in names:
            m = [r for r in ops["rows"] if r["op"] == n and r["keep_ratio"] == kr]
            ys.append(m[0]["speedup"] if m else 0)
        ax.bar([j + i * width for j in range(len(names))], ys, width,
               label=f"keep {kr:g}")
    ax.axhline(1.0, color="gray", ls="--")
    ax.set_xticks([j + width * (len(krs) - 1) / 2 for j in range(len(names))])
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speedup vs plain PyTorch")
    sh = ops["shape"]
    ax.set_title(f"ops, N={sh['tokens']} L={sh['layers']} {ops['dtype']}")
    ax.legend(fontsize=8)


def _plot_acc(ax, acc) -> None:
    """Accuracy vs keep ratio, one line per policy."""
    full = [r for r in acc["rows"] if r["keep_ratio"] is None]
    for pol in sorted({r["policy"] for r in acc["rows"] if r["keep_ratio"] is not None}):
        rs = sorted([r for r in acc["rows"] if r["policy"] == pol
                     and r["keep_ratio"] is not None], key=lambda r: r["keep_ratio"])
        # TGV-KV's own rows solid (the default one thicker), its variants dotted, the rest dashed
        style = "o-" if pol == "tgvkv" else "o:" if pol.startswith("tgvkv") else "s--"
        ax.plot([r["keep_ratio"] for r in rs], [100 * r["accuracy"] for r in rs], style,
                label=pol, lw=2.4 if pol == "tgvkv" else 1.2)
    if full:
        ax.axhline(100 * full[0]["accuracy"], ls="-", color="gray", alpha=0.6, label="full KV")
    _keep_ratio_axis(ax, [r["keep_ratio"] for r in acc["rows"] if r["keep_ratio"] is not None])
    ax.set_ylabel("accuracy (%)")
    who = f"{acc['subject']}, " if acc.get("subject") else ""
    ax.set_title(f"accuracy: {who}{acc.get('dataset')} ({acc.get('n_samples')} samples)",
                 fontsize=10)
    ax.legend(fontsize=7)


def write_plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = report.get("generate")
    ops = report.get("ops")
    acc = report.get("accuracy")
    panels = []
    if gen and gen.get("rows"):
        panels += [(_plot_gen_speed, gen), (_plot_gen_mem, gen)]
    if ops and ops.get("rows"):
        panels += [(_plot_ops, ops)]
    if acc and acc.get("rows"):
        panels += [(_plot_acc, acc)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.2 * max(1, len(panels)), 4.2),
                             squeeze=False)
    for ax, (draw, sec) in zip(axes[0], panels):
        draw(ax, sec)
    if not panels:
        axes[0][0].text(0.5, 0.5, "nothing to plot", ha="center")
    dev = report["device"]
    fig.suptitle(f"tgvkv-bench on {dev.get('gpu') or dev.get('cpu')} "
                 f"({dev['device']}), torch {report['versions']['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
