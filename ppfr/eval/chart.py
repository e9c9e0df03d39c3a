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
        for p in points:
            if p[key] is None:  # the attack did not run for this row (budget, no judge): no point to draw
                continue
            ref = p["method"] == REFERENCE
            star = ref and p["training"] == "scratch"
            ax.scatter(p["accuracy"], p[key], marker="*" if star else MARKERS.get(p["training"], "x"),
                       s=220 if star else 110 if ref else 60, color=colour[p["method"]], edgecolors="black",
                       linewidths=0.6, zorder=3)  # fmt: skip
            ax.annotate(p["label"] + (" (reference)" if ref and p["training"] == "scratch" else ""),
                        (p["accuracy"], p[key]), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set_xlabel("verification accuracy % (10-fold, flip)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.margins(x=0.15, y=0.1)  # room for the labels of the outermost points
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
