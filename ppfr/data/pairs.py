"""Verification pair lists: LFW's ``pairs.txt`` and the ``fold same path_a path_b`` list, read, written and made.

* LFW ``pairs.txt``: a header ``<folds> <pairs per class>`` (or one count), then per fold that many matched lines
  ``name n1 n2`` followed by as many mismatched lines ``name1 n1 name2 n2``; image ``n`` of ``name`` is
  ``<root>/name/name_%04d.jpg``. For folders that do not follow LFW's file naming, ``n`` is the 1-based position in
  the sorted listing of ``<root>/name`` (the same thing on LFW itself), which is what :func:`write_pairs_lfw` writes.
* fold list: ``fold same path_a path_b`` per line (``same`` 1/0), ``#`` comments, paths relative to the list's
  folder. Folds are the 10 cross-validation folds of the LFW protocol (METHODS.md §7.1).

:func:`make_pairs` draws identity-disjoint folds: every identity belongs to exactly one fold, so a threshold tuned
on nine folds never saw the tenth fold's people.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ppfr.data._common import DataFormatError, read_text

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Fold ids become int64 arrays and one evaluation round each: bounded like labels (a fold of 10**20 was an
# OverflowError). LFW's protocol has 10; identity-disjoint lists from ``ppfr data pairs`` have ``--folds``.
MAX_FOLD = 1 << 24


@dataclass(frozen=True)
class Pair:
    fold: int
    same: bool
    a: Path
    b: Path


def _sorted_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)


def _lfw_root(path: Path, image_root: str | Path | None) -> Path:
    if image_root is not None:
        return Path(image_root)
    base = path.parent
    return base / "lfw" if (base / "lfw").is_dir() else base  # LFW ships pairs.txt beside lfw/


def _lfw_image(root: Path, name: str, n: int, cache: dict[str, list[Path]], where: str) -> Path:
    p = root / name / f"{name}_{n:04d}.jpg"
    if p.is_file():
        return p
    if name not in cache:
        cache[name] = _sorted_images(root / name) if (root / name).is_dir() else []
    imgs = cache[name]
    if not 1 <= n <= len(imgs):
        raise DataFormatError(f"{where}: image {n} of {name!r} not found under {root} ({len(imgs)} images there)")
    return imgs[n - 1]


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def sniff_pairs(lines: Sequence[str]) -> str | None:
    """'lfw', 'folds' or None for the first meaningful lines of a text file."""
    body = [ln.split() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not body:
        return None
    first = body[0]
    if 1 <= len(first) <= 2 and all(_is_int(x) for x in first):
        if len(body) == 1 or len(body[1]) in (3, 4):  # names may be numeric (CelebA ids): decide by shape
            return "lfw"
    if len(first) == 4 and _is_int(first[0]) and first[1] in ("0", "1") and not _is_int(first[3]):
        return "folds"
    return None


def read_pairs(path: str | Path, image_root: str | Path | None = None) -> list[Pair]:
    """Read either pair-list format (detected from the content). Paths are resolved; files must exist.

    Raises:
        DataFormatError: unknown format, malformed line, or a missing image (named with its line).
    """
    path = Path(path)
    lines = read_text(path, "pair list").splitlines()
    kind = sniff_pairs(lines[:5])
    try:
        if kind == "lfw":
            return _read_lfw(path, lines, image_root)
        if kind == "folds":
            return _read_folds(path, lines, image_root)
    except OSError as exc:  # a name too long for the file system, an unreadable identity folder
        raise DataFormatError(f"{path}: cannot resolve its images ({exc.strerror or exc}: {exc.filename})") from None
    raise DataFormatError(f"{path}: not a pair list (expected LFW pairs.txt or 'fold same path_a path_b' lines)")


def _read_lfw(path: Path, lines: list[str], image_root: str | Path | None) -> list[Pair]:
    root = _lfw_root(path, image_root)
    numbered = [(i, ln.split()) for i, ln in enumerate(lines, 1) if ln.strip() and not ln.lstrip().startswith("#")]
    header = [int(x) for x in numbered[0][1]]
    if not all(1 <= x <= MAX_FOLD for x in header):
        raise DataFormatError(f"{path}:{numbered[0][0]}: the header '<folds> <pairs per class>' must hold counts "
                              f"in [1, {MAX_FOLD}], got {' '.join(numbered[0][1])!r}")  # fmt: skip
    body = numbered[1:]
    per_fold = 2 * header[1] if len(header) == 2 else None
    cache: dict[str, list[Path]] = {}
    out = []
    for k, (lineno, f) in enumerate(body):
        where = f"{path}:{lineno}"
        try:
            if len(f) == 3:
                same, a, b = (
                    True,
                    _lfw_image(root, f[0], int(f[1]), cache, where),
                    _lfw_image(root, f[0], int(f[2]), cache, where),
                )
            elif len(f) == 4:
                same, a, b = (
                    False,
                    _lfw_image(root, f[0], int(f[1]), cache, where),
                    _lfw_image(root, f[2], int(f[3]), cache, where),
                )
            else:
                raise DataFormatError(f"{where}: an LFW pair line has 3 or 4 fields, got {len(f)}")
        except ValueError as exc:
            if isinstance(exc, DataFormatError):
                raise
            raise DataFormatError(f"{where}: image numbers must be integers") from None
        fold = k // per_fold if per_fold else k * 10 // len(body)  # no per-fold header: 10 contiguous folds
        out.append(Pair(fold, same, a, b))
    return out


def _read_folds(path: Path, lines: list[str], image_root: str | Path | None) -> list[Pair]:
    root = Path(image_root) if image_root is not None else path.parent
    out = []
    for lineno, ln in enumerate(lines, 1):
        if not ln.strip() or ln.lstrip().startswith("#"):
            continue
        f = ln.split()
        where = f"{path}:{lineno}"
        if len(f) != 4 or not _is_int(f[0]) or f[1] not in ("0", "1"):
            raise DataFormatError(f"{where}: expected 'fold same path_a path_b' with same in {{0, 1}}, got {ln!r}")
        fold = int(f[0])
        if not 0 <= fold < MAX_FOLD:
            raise DataFormatError(f"{where}: fold {fold} outside [0, {MAX_FOLD})")
        a, b = root / f[2], root / f[3]
        for p in (a, b):
            if not p.is_file():
                raise DataFormatError(f"{where}: image not found: {p}")
        out.append(Pair(fold, f[1] == "1", a, b))
    return out


def write_pairs_folds(path: str | Path, pairs: Sequence[Pair]) -> None:
    """Write the ``fold same path_a path_b`` list, paths relative to the list's folder."""
    path = Path(path)
    base = path.resolve().parent
    rel = lambda p: Path(os.path.relpath(Path(p).resolve(), base)).as_posix()  # noqa: E731
    body = "".join(f"{q.fold} {int(q.same)} {rel(q.a)} {rel(q.b)}\n" for q in pairs)
    path.write_text(
        "# fold same path_a path_b  (paths relative to this file's folder; folds are identity-disjoint)\n" + body
    )


def write_pairs_lfw(path: str | Path, pairs: Sequence[Pair]) -> None:
    """Write LFW's ``pairs.txt``; needs equal matched/mismatched counts per fold and images under one root.

    Image numbers are 1-based positions in each identity folder's sorted listing (:func:`read_pairs` resolves them
    from ``root = the images' common grandparent``, which must be given as ``image_root`` if it is not the list's
    folder or its ``lfw/``).
    """
    folds = sorted({q.fold for q in pairs})
    per = None
    lines = []
    for fold in folds:
        same = [q for q in pairs if q.fold == fold and q.same]
        diff = [q for q in pairs if q.fold == fold and not q.same]
        if len(same) != len(diff) or (per is not None and len(same) != per):
            raise ValueError("LFW pairs.txt needs the same number of matched and mismatched pairs in every fold")
        per = len(same)
        for q in same + diff:
            na, nb = _number(q.a), _number(q.b)
            if q.same:
                lines.append(f"{q.a.parent.name}\t{na}\t{nb}")
            else:
                lines.append(f"{q.a.parent.name}\t{na}\t{q.b.parent.name}\t{nb}")
    Path(path).write_text(f"{len(folds)}\t{per}\n" + "\n".join(lines) + "\n")


def _number(p: Path) -> int:
    return _sorted_images(p.parent).index(p) + 1


def make_pairs(
    identities: Mapping[str, Sequence[Path]], *, folds: int = 10, per_fold: int = 300, seed: int = 0
) -> list[Pair]:
    """Identity-disjoint folds of ``per_fold`` genuine and ``per_fold`` impostor pairs each.

    Identities are shuffled (seeded) and dealt to folds round-robin; within a fold, genuine pairs are distinct
    image pairs of one identity and impostor pairs join two identities of that fold. No pair repeats.

    Raises:
        ValueError: too few identities or images for the requested counts (the message says how many fit).
    """
    if folds < 2 or per_fold < 1:
        raise ValueError(f"folds must be >= 2 and per_fold >= 1, got folds={folds}, per_fold={per_fold}")
    rng = random.Random(seed)
    names = sorted(n for n, imgs in identities.items() if imgs)
    rng.shuffle(names)
    if len(names) < 2 * folds:
        raise ValueError(f"{len(names)} identities cannot fill {folds} identity-disjoint folds (need >= {2 * folds})")
    out: list[Pair] = []
    for fold in range(folds):
        members = {n: sorted(identities[n]) for n in names[fold::folds]}
        out += [Pair(fold, True, a, b) for a, b in _draw_genuine(members, per_fold, rng, fold)]
        out += [Pair(fold, False, a, b) for a, b in _draw_impostor(members, per_fold, rng, fold)]
    return out


def _draw_genuine(members: dict[str, list[Path]], k: int, rng: random.Random, fold: int) -> list[tuple[Path, Path]]:
    cands = [n for n, imgs in members.items() if len(imgs) >= 2]
    total = sum(len(members[n]) * (len(members[n]) - 1) // 2 for n in cands)
    if total < k:
        raise ValueError(f"fold {fold}: only {total} genuine pairs exist, {k} requested (lower per_fold)")
    if 2 * k > total:  # dense: enumerate and sample, rejection would stall
        allp = [(n, i, j) for n in cands for i in range(len(members[n])) for j in range(i + 1, len(members[n]))]
        picked = rng.sample(allp, k)
    else:
        seen: set[tuple[str, int, int]] = set()
        picked = []
        weights = [len(members[n]) * (len(members[n]) - 1) // 2 for n in cands]  # uniform over all pairs
        while len(picked) < k:
            n = rng.choices(cands, weights)[0]
            i, j = sorted(rng.sample(range(len(members[n])), 2))
            if (n, i, j) not in seen:
                seen.add((n, i, j))
                picked.append((n, i, j))
    return [(members[n][i], members[n][j]) for n, i, j in picked]


def _draw_impostor(members: dict[str, list[Path]], k: int, rng: random.Random, fold: int) -> list[tuple[Path, Path]]:
    names = sorted(members)
    sizes = [len(members[n]) for n in names]
    total = (sum(sizes) ** 2 - sum(s * s for s in sizes)) // 2
    if total < k:
        raise ValueError(f"fold {fold}: only {total} impostor pairs exist, {k} requested (lower per_fold)")
    seen: set[tuple[Path, Path]] = set()
    picked = []
    while len(picked) < k:
        n1, n2 = sorted(rng.sample(names, 2))
        a, b = rng.choice(members[n1]), rng.choice(members[n2])
        if (a, b) not in seen:
            seen.add((a, b))
            picked.append((a, b))
    return picked
