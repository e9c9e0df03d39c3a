"""The privacy-utility chart of ``ppfr study``: verification accuracy against what the strongest attacks recover.

Two panels share the x axis (10-fold verification accuracy, %): the left plots identity-linkage top-1 (%), the
right the best pixel recovery (max SSIM over closed-form inversion and the learned U-Net). Lower is more private on
both. One point per method and training mode; the marker says the mode (scratch, transfer, distill,
transfer+distill) and the unprotected ``arcface`` rows, the reference point, are drawn as large stars.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# why fixed markers: a reader compares the same method across modes by its colour and the mode by its shape
MARKERS = {"scratch": "o", "transfer": "s", "distill": "D", "transfer+distill": "^"}
REFERENCE = "arcface"


def chart_points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The figures the chart plots, one dict per study row: label, method, training, accuracy (%, flip TTA),
    linkage (top-1 %, None where it did not run) and ssim (best of inversion/recovery in [0, 1], or None)."""
    points = []
    for r in rows:
        ver = (r.get("verification") or {}).get("flip") or {}
        if ver.get("accuracy") is None:
            continue
        kinds = (r.get("attack") or {}).get("kinds", {})
        link = (kinds.get("linkage") or {}).get("linkage_top1")
        ssims = [(kinds.get(k) or {}).get("ssim") for k in ("inversion", "recovery")]
        ssims = [s for s in ssims if s is not None]
        points.append({"label": r.get("label", r["method"]), "method": r["method"],
                       "training": r.get("training", "scratch"), "accuracy": 100 * ver["accuracy"],
                       "linkage": None if link is None else 100 * link,
                       "ssim": max(ssims) if ssims else None})  # fmt: skip
    return points


# label boxes in axis fractions at fontsize 7 on a 5.5 x 4.5 inch panel: ~4 pt per character of a ~310 pt wide
# axis, and one 14 pt step (the offset label_steps counts in) of a ~260 pt tall one
CHAR_W, LINE_H = 0.013, 0.054


def label_steps(xs: list[float], ys: list[float], labels: list[str], max_step: int = 8) -> list[int]:
    """Vertical offsets, in label lines, that keep the labels of nearby points from overlapping.

    xs, ys: the points in axis fractions ([0, 1] across each axis); labels: their texts, drawn to the upper right
    of each point. Labels are placed from the lowest point up; each takes the smallest offset (0, then +-1, +-2,
    ..., toward the middle of the axis first) whose box stays inside the axis and overlaps no label placed before
    it (offset 0 when none is free). Returns one int per point."""
    boxes: list[tuple[float, float, float, float]] = []
    steps = [0] * len(xs)
    order = sorted(range(len(xs)), key=lambda i: (ys[i], xs[i]))
    for i in order:
        w = CHAR_W * len(labels[i])
        toward = -1 if ys[i] > 0.5 else 1  # labels of high points fan out downward, of low points upward
        tries = [0] + [k * sign for k in range(1, max_step + 1) for sign in (toward, -toward)]

        def box_at(k: int) -> tuple[float, float, float, float]:
            x0, y0 = xs[i] + 0.01, ys[i] + 0.01 + k * LINE_H
            return (x0, y0, x0 + w, y0 + LINE_H)

        def free(b: tuple[float, float, float, float]) -> bool:
            inside = b[1] >= 0.0 and b[3] <= 1.0
            return inside and not any(b[0] < o[2] and o[0] < b[2] and b[1] < o[3] and o[1] < b[3] for o in boxes)

        k = next((k for k in tries if free(box_at(k))), 0)
        steps[i] = k
        boxes.append(box_at(k))
    return steps


def privacy_utility_chart(rows: list[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Write the two-panel PNG for the study ``rows`` (each with ``method``, ``training``, ``verification.flip.
    accuracy`` in [0, 1] and ``attack.kinds``) to ``path``; returns it. ValueError when no row has an accuracy."""
    points = chart_points(rows)
    if not points:
        raise ValueError("privacy-utility chart: no row has a verification accuracy")
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless: no display on CI or servers
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("ppfr study: privacy_utility.png needs matplotlib (pip install matplotlib==3.11.2, pinned in "
                         "requirements.txt); study.json and the tables were written") from None
    methods = sorted({p["method"] for p in points})
    cmap = plt.get_cmap("tab10")
    colour = {m: cmap(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    panels = (("linkage", "identity linkage top-1 % (lower = more private)"),
              ("ssim", "best inversion / recovery SSIM (lower = more private)"))  # fmt: skip
    for ax, (key, ylabel) in zip(axes, panels):
        if all(p[key] is None for p in points):  # say why the panel is empty rather than draw a blank axis
            ax.text(0.5, 0.5, "no figures (the attack did not run: judge none, or skipped)", ha="center",
                    va="center", transform=ax.transAxes, fontsize=9, color="grey")
        drawn = [p for p in points if p[key] is not None]  # no point where the attack did not run (budget, judge)
        texts = []
        for p in drawn:
            ref = p["method"] == REFERENCE
            star = ref and p["training"] == "scratch"
            ax.scatter(p["accuracy"], p[key], marker="*" if star else MARKERS.get(p["training"], "x"),
                       s=220 if star else 110 if ref else 60, color=colour[p["method"]], edgecolors="black",
                       linewidths=0.6, zorder=3)  # fmt: skip
            texts.append(p["label"] + (" (reference)" if star else ""))
        ax.set_xlabel("verification accuracy % (10-fold, flip)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.margins(x=0.15, y=0.1)  # room for the labels of the outermost points
        if drawn:  # labels after the limits are known: spread the ones that would overlap, with a leader line
            (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
            fx = [(p["accuracy"] - x0) / ((x1 - x0) or 1.0) for p in drawn]
            fy = [(p[key] - y0) / ((y1 - y0) or 1.0) for p in drawn]
            for p, text, k in zip(drawn, texts, label_steps(fx, fy, texts)):
                ax.annotate(text, (p["accuracy"], p[key]), textcoords="offset points", xytext=(5, 4 + 14 * k),
                            fontsize=7, arrowprops=dict(arrowstyle="-", color="grey", lw=0.5) if k else None)
    handles = [plt.Line2D([], [], marker=m, linestyle="", color="grey", markeredgecolor="black", label=mode)
               for mode, m in MARKERS.items() if any(p["training"] == mode for p in points)]  # fmt: skip
    handles.append(plt.Line2D([], [], marker="*", linestyle="", color="grey", markersize=12, markeredgecolor="black",
                              label=f"{REFERENCE} (reference)"))  # fmt: skip
    axes[1].legend(handles=handles, fontsize=8, loc="best")
    fig.suptitle(title or "privacy vs utility")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
