"""Held-out identities: keep some of ``--data`` out of every run, and check the accuracy ordering on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any



HOLDOUT_PAIRS_PER_FOLD = 150  # genuine and impostor pairs per fold, as celeba112's val_pairs.txt and LFW (300/fold)


class HoldoutError(ValueError):
    """``--holdout-ids`` cannot be carved out of ``--data`` (not an image folder, too few identities or images)."""


def split_holdout(data: str | Path, n: int, folder: Path, seed: int) -> tuple[Path, Path]:
    """Take ``n`` identities of the image folder ``data`` out of training (seeded draw): write ``folder/train.txt``
    (TFace 2-field index of the other identities, labels 0..K-1) and ``folder/pairs.txt`` (10 identity-disjoint
    folds of the held-out identities, ``HOLDOUT_PAIRS_PER_FOLD`` genuine + impostor pairs each, fewer where the
    identities hold fewer). Returns (train index, pairs file). Idempotent for the same arguments (a resumed study
    trains on the same split: the draw is seeded). HoldoutError: ``data`` is not an image folder, or too few identities."""
    import random

    from ppfr.data import DataFormatError
    from ppfr.data.pairs import make_pairs, write_pairs_folds
    from ppfr.data.sources import FolderSource

    try:
        src = FolderSource(data)
    except DataFormatError as exc:
        raise HoldoutError(f"--holdout-ids needs --data to be an image folder: {exc}") from None
    ids = list(src.identities)
    if n > len(ids) - 2:
        raise HoldoutError(f"--holdout-ids {n}: {data} has {len(ids)} identities; at least 2 must stay for training")
    held = set(random.Random(seed).sample(ids, n))
    folder.mkdir(parents=True, exist_ok=True)
    by_id: dict[str, list[Path]] = {}
    for f, y in zip(src.files, src.labels):
        by_id.setdefault(ids[int(y)], []).append(Path(f).resolve())
    keep = [i for i in ids if i not in held]
    label = {name: k for k, name in enumerate(keep)}
    train = folder / "train.txt"
    body = "".join(f"{f}\t{label[i]}\n" for i in keep for f in by_id[i])
    pairs = folder / "pairs.txt"
    held_images = {i: by_id[i] for i in sorted(held)}
    per_fold = HOLDOUT_PAIRS_PER_FOLD
    while True:  # the largest per-fold count (up to 150) the held-out identities can fill
        try:
            drawn = make_pairs(held_images, folds=10, per_fold=per_fold, seed=seed)
            break
        except ValueError:
            if per_fold == 1:
                raise HoldoutError(f"--holdout-ids {n}: the held-out identities hold too few images for 10 folds "
                                 "of pairs") from None
            per_fold = max(1, per_fold * 2 // 3)
    train.write_text(f"# ppfr study: training identities ({len(keep)}; {n} held out)\n" + body)
    write_pairs_folds(pairs, drawn)
    return train, pairs


def ordering_check(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Do the rows keep their accuracy (flip TTA) ordering on the held-out identities? Kendall's tau-a over the
    rows both sets scored, and every swapped pair with its gaps (a swap inside one std of either set is noise)."""
    scored = [(r.get("label", r["method"]), r["verification"]["flip"], r["holdout"]["flip"]) for r in rows
              if r.get("holdout")]  # fmt: skip
    if len(scored) < 2:
        return None
    concordant = discordant = 0
    swaps = []
    for i in range(len(scored)):
        for j in range(i + 1, len(scored)):
            (a, va, ha), (b, vb, hb) = scored[i], scored[j]
            dv, dh = va["accuracy"] - vb["accuracy"], ha["accuracy"] - hb["accuracy"]
            if dv * dh > 0:
                concordant += 1
            elif dv * dh < 0:
                discordant += 1
                hi, lo = (a, b) if dv > 0 else (b, a)
                noise = max(va["std"], vb["std"], ha["std"], hb["std"])
                swaps.append({"above": hi, "below": lo, "gap_pairs": abs(dv), "gap_holdout": abs(dh),
                              "within_std": max(abs(dv), abs(dh)) <= noise})  # fmt: skip
    n_pairs = len(scored) * (len(scored) - 1) // 2
    by_v = [s[0] for s in sorted(scored, key=lambda s: -s[1]["accuracy"])]
    by_h = [s[0] for s in sorted(scored, key=lambda s: -s[2]["accuracy"])]
    return {"kendall_tau": (concordant - discordant) / n_pairs, "swaps": swaps, "order_pairs": by_v,
            "order_holdout": by_h, "kept": not swaps, "kept_beyond_noise": all(s["within_std"] for s in swaps)}
