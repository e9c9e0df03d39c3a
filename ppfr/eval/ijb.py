"""IJB-B / IJB-C style 1:1 template verification (METHODS.md §7.2).

A *template* is a set of images of one subject, grouped into *media* (a photo, or the frames of one video). Each
image is embedded and L2-normalised; within a template the images of one media are averaged, the media features
are summed and the sum is L2-normalised (insightface/TFace ``image2template_feature``). A template pair's score is
the cosine similarity of the two template features; TPR at FPR = 1e-6 .. 1e-1 is read off sklearn's ROC at the
point whose FPR is nearest to the target, with TFace ``IJB_Evaluation.py``'s tie rule (the reversed-ROC first
minimum: among equally near points the highest FPR, then TPR; :func:`ppfr.eval.verification.tpr_at_fpr`).

Listings (whitespace-separated text, ``#`` comments; see docs/eval.md):

* image list, one line per image: ``path template_id media_id`` -- exactly IJB's ``meta/<set>_face_tid_mid.txt``
  (e.g. ``1.jpg 1 69544``); paths are relative to the image root;
* template pairs, one line per pair: ``template_a template_b label`` (label 1 = same subject) -- exactly IJB's
  ``meta/<set>_template_pair_label.txt``;
* optional landmarks, ``path x1 y1 ... x5 y5 [score]`` -- IJB's ``meta/<set>_name_5pts_score.txt``: the image is
  then a loose crop, aligned here by a similarity onto the ArcFace 112x112 template (§1.2) with bilinear sampling
  and black outside, as the reference's ``cv2.warpAffine``. Without landmarks images must be aligned 112x112 crops.

Reference options: ``use_flip_test`` (here ``flip``, off by default as in the reference; ``ppfr eval --ijb-flip``
turns it on): an image's feature is normalise(f(x)) + normalise(f(flip x)) before the re-normalisation;
``use_norm_score=False`` and ``use_detector_score=False`` are what ppfr does (the faceness score is read and
ignored).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ppfr.data._common import CorruptSampleError, DataFormatError
from ppfr.data.sources import _FileListSource
from ppfr.eval.verification import DEFAULT_FPRS, auc_score, roc_curve, tpr_at_fpr


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    if not path.is_file():
        raise DataFormatError(f"listing not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"cannot read {path}: {exc}") from None
    rows = enumerate(text.splitlines(), 1)
    return [(n, ln.split()) for n, ln in rows if ln.strip() and not ln.lstrip().startswith("#")]


def _int(tok: str, path: Path, lineno: int, what: str) -> int:
    try:
        return int(tok)
    except ValueError:
        raise DataFormatError(f"{path}:{lineno}: {what} must be an integer, got {tok!r}") from None


def read_image_list(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``path template media`` per line -> (names, templates (N,) int64, medias (N,) int64)."""
    path = Path(path)
    names, tids, mids = [], [], []
    for n, f in _lines(path):
        if len(f) != 3:
            raise DataFormatError(f"{path}:{n}: an image line is 'path template_id media_id', got {' '.join(f)!r}")
        names.append(f[0])
        tids.append(_int(f[1], path, n, "template_id"))
        mids.append(_int(f[2], path, n, "media_id"))
    if not names:
        raise DataFormatError(f"{path}: no images listed")
    return names, np.asarray(tids, np.int64), np.asarray(mids, np.int64)


def read_template_pairs(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``template_a template_b label`` per line -> (pairs (P, 2) int64, labels (P,) bool)."""
    path = Path(path)
    pairs, labels = [], []
    for n, f in _lines(path):
        if len(f) != 3:
            raise DataFormatError(f"{path}:{n}: a pair line is 'template_a template_b label', got {' '.join(f)!r}")
        lab = _int(f[2], path, n, "label")
        if lab not in (0, 1):
            raise DataFormatError(f"{path}:{n}: label must be 0 or 1, got {lab}")
        pairs.append((_int(f[0], path, n, "template_a"), _int(f[1], path, n, "template_b")))
        labels.append(bool(lab))
    if not pairs:
        raise DataFormatError(f"{path}: no template pairs listed")
    return np.asarray(pairs, np.int64).reshape(-1, 2), np.asarray(labels, bool)


def read_landmarks(path: str | Path) -> dict[str, np.ndarray]:
    """``path x1 y1 ... x5 y5 [score]`` per line -> {path: (5, 2) float64 landmarks in source pixels}."""
    path = Path(path)
    out: dict[str, np.ndarray] = {}
    for n, f in _lines(path):
        if len(f) not in (11, 12):
            raise DataFormatError(f"{path}:{n}: a landmark line is 'path x1 y1 ... x5 y5 [score]', got {len(f)} fields")
        try:
            out[f[0]] = np.asarray([float(v) for v in f[1:11]]).reshape(5, 2)
        except ValueError:
            raise DataFormatError(f"{path}:{n}: landmark coordinates must be numbers") from None
    return out


@dataclass
class TemplateListing:
    """files (N,) image paths, templates/medias (N,) int64, landmarks (N, 5, 2) or None (aligned crops),
    pairs (P, 2) template ids, labels (P,) bool."""

    files: list[Path]
    templates: np.ndarray
    medias: np.ndarray
    pairs: np.ndarray
    labels: np.ndarray
    landmarks: np.ndarray | None = None
    name: str = "templates"


def open_listing(images: str | Path, pairs: str | Path, image_root: str | Path | None = None,
                 landmarks: str | Path | None = None, name: str | None = None) -> TemplateListing:  # fmt: skip
    """Read an image list + template-pair list (+ optional landmarks); image paths are relative to ``image_root``
    (default: the image list's folder). Raises DataFormatError on malformed lines or a pair naming an unknown
    template."""
    images, pairs = Path(images), Path(pairs)
    names, tids, mids = read_image_list(images)
    tpairs, labels = read_template_pairs(pairs)
    unknown = np.setdiff1d(tpairs.ravel(), tids)
    if unknown.size:
        raise DataFormatError(f"{pairs}: template(s) {unknown[:5].tolist()} have no images in {images}")
    root = Path(image_root) if image_root is not None else images.parent
    lmk = None
    if landmarks is not None:
        table = read_landmarks(landmarks)
        missing = [n for n in names if n not in table]
        if missing:
            raise DataFormatError(f"{landmarks}: no landmarks for {len(missing)} image(s), e.g. {missing[:3]}")
        lmk = np.stack([table[n] for n in names])
    return TemplateListing([root / n for n in names], tids, mids, tpairs, labels, lmk, name or images.stem)


def open_ijb_dir(root: str | Path, name: str | None = None) -> TemplateListing:
    """A template-verification folder in one of two layouts.

    * IJB release layout: ``meta/<name>_face_tid_mid.txt``, ``meta/<name>_template_pair_label.txt``, optional
      ``meta/<name>_name_5pts_score.txt`` and the images in ``loose_crop/`` (``name`` e.g. ``ijbc``; found
      automatically when ``meta/`` holds exactly one set).
    * ppfr layout: ``templates.txt`` (image list) and ``template_pairs.txt``, images (aligned 112x112 crops)
      relative to ``root``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataFormatError(f"template folder not found: {root}")
    meta = root / "meta"
    if meta.is_dir():
        if name is None:
            found = sorted(p.name[: -len("_face_tid_mid.txt")] for p in meta.glob("*_face_tid_mid.txt"))
            if len(found) != 1:
                raise DataFormatError(f"{meta}: expected one *_face_tid_mid.txt, found {found or 'none'}; "
                                      "pass the set name (--ijb-name)")  # fmt: skip
            name = found[0]
        lm = meta / f"{name}_name_5pts_score.txt"
        img_root = root / "loose_crop" if (root / "loose_crop").is_dir() else root / "images"
        return open_listing(meta / f"{name}_face_tid_mid.txt", meta / f"{name}_template_pair_label.txt", img_root,
                            lm if lm.is_file() else None, name)  # fmt: skip
    if (root / "templates.txt").is_file():
        return open_listing(root / "templates.txt", root / "template_pairs.txt", root, None, root.name)
    raise DataFormatError(f"{root}: neither an IJB folder (meta/<set>_face_tid_mid.txt) nor a ppfr one (templates.txt)")


# ----------------------------------------------------------------------------------------- aggregation
def template_features(img_feats: np.ndarray, templates: np.ndarray,
                      medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Media-weighted template features (the reference's ``image2template_feature``).

    img_feats (N, D) image features (already normalised as the protocol wants), templates/medias (N,) ids.
    Returns (template ids (T,) sorted, features (T, D) float64): per template, the mean over the images of each
    media, summed over its media, then L2-normalised (an all-zero sum stays zero).
    """
    img_feats = np.asarray(img_feats, np.float64)
    templates, medias = np.asarray(templates), np.asarray(medias)
    if img_feats.ndim != 2 or templates.shape != (len(img_feats),) or medias.shape != templates.shape:
        raise ValueError(f"template_features: feats (N, D) with templates/medias (N,), got {img_feats.shape}, "
                         f"{templates.shape}, {medias.shape}")  # fmt: skip
    tm, inv = np.unique(np.stack([templates, medias], 1), axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    media_sum = np.zeros((len(tm), img_feats.shape[1]))
    np.add.at(media_sum, inv, img_feats)
    media_mean = media_sum / np.bincount(inv, minlength=len(tm))[:, None]
    tids, tinv = np.unique(tm[:, 0], return_inverse=True)
    feats = np.zeros((len(tids), img_feats.shape[1]))
    np.add.at(feats, tinv.reshape(-1), media_mean)
    norm = np.linalg.norm(feats, axis=1, keepdims=True)
    return tids, feats / np.maximum(norm, 1e-12)


def template_scores(tids: np.ndarray, feats: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine score (P,) of each template pair (P, 2) given sorted template ids (T,) and features (T, D)."""
    pos = np.searchsorted(tids, pairs)
    if (pos >= len(tids)).any() or (tids[np.minimum(pos, len(tids) - 1)] != pairs).any():
        raise ValueError("template_scores: a pair names a template without features")
    return (feats[pos[:, 0]] * feats[pos[:, 1]]).sum(1)


# ------------------------------------------------------------------------------------------- features
class _ListSource(_FileListSource):
    kind = "templates"

    def __init__(self, files: list[Path], where: Path) -> None:
        self.files, self.path = list(files), where
        self.labels = np.arange(len(self.files), dtype=np.int64)


def align_to_arcface(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> torch.Tensor:
    """(H, W, 3) uint8 RGB + (5, 2) landmarks -> (3, size, size) float32 in [-1, 1] on the ArcFace template."""
    from ppfr.models.faceapi import ARCFACE_TEMPLATE_112, similarity_transform

    h, w = image.shape[:2]
    a = similarity_transform(landmarks, ARCFACE_TEMPLATE_112 * (size / 112.0))  # source px -> aligned px
    inv = np.linalg.inv(np.vstack([a, [0.0, 0.0, 1.0]]))[:2]
    v, u = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
    xs = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2]
    ys = inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]
    grid = torch.from_numpy(np.stack([(2 * xs + 1) / w - 1, (2 * ys + 1) / h - 1], -1)).float()[None]
    # np.array copies: decoders may hand out read-only arrays, which torch.from_numpy warns about
    src = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None]
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    return out / 127.5 - 1.0


def _batches(listing: TemplateListing, batch_size: int, num_workers: int):
    """Yield (images (B, 3, 112, 112) in [-1, 1], indices (B,)) over the readable images of the listing."""
    if listing.landmarks is None:
        from ppfr.data.config import DataConfig
        from ppfr.data.loader import make_loader

        src = _ListSource(listing.files, Path(listing.name))
        loader = make_loader(DataConfig(source=listing.name, backend="torch", batch_size=batch_size, train=False,
                                        num_workers=num_workers, world_size=1, rank=0), source=src)  # fmt: skip
        yield from loader
        return
    from ppfr.data.image import decode

    imgs, idx = [], []
    for i, p in enumerate(listing.files):
        try:
            img = decode(p.read_bytes())
        except (OSError, CorruptSampleError):
            continue  # counted by the caller as unreadable
        imgs.append(align_to_arcface(img, listing.landmarks[i]))
        idx.append(i)
        if len(imgs) == batch_size:
            yield torch.stack(imgs), torch.tensor(idx)
            imgs, idx = [], []
    if imgs:
        yield torch.stack(imgs), torch.tensor(idx)


@torch.no_grad()
def image_features(embed: Callable[[torch.Tensor], torch.Tensor], listing: TemplateListing, *, batch_size: int = 64,
                   flip: bool = False, num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per-image features (N, D) float32, L2-normalised, and ok (N,) bool (False: unreadable, zero row).

    As the reference: f(x) normalised; with ``flip`` normalise(f(x)) + normalise(f(flip x)) re-normalised.
    """
    feats: np.ndarray | None = None
    ok = np.zeros(len(listing.files), dtype=bool)
    for images, idx in _batches(listing, batch_size, num_workers):
        e = F.normalize(embed(images).float(), dim=1)
        if flip:
            e = F.normalize(e + F.normalize(embed(images.flip(-1)).float(), dim=1), dim=1)
        if feats is None:
            feats = np.zeros((len(listing.files), e.shape[1]), np.float32)
        feats[idx.numpy()] = e.cpu().numpy()
        ok[idx.numpy()] = True
    if feats is None:
        raise DataFormatError(f"{listing.name}: none of the {len(listing.files)} images could be read")
    return feats, ok


@dataclass
class IJBResult:
    """scores (P,) cosine per template pair, labels (P,) bool, tpr_at_fpr {fpr: tpr}, auc, ROC points."""

    scores: np.ndarray
    labels: np.ndarray
    tpr_at_fpr: dict[float, float]
    auc: float
    images: int
    unreadable: int
    templates: int
    roc: tuple[np.ndarray, np.ndarray] = field(repr=False, default=(np.zeros(0), np.zeros(0)))

    def __str__(self) -> str:
        t = ", ".join(f"{k:.0e}: {v * 100:.2f}" for k, v in self.tpr_at_fpr.items())
        return f"TPR (%) @ FPR {t}; AUC {self.auc:.4f} ({len(self.scores)} template pairs, {self.templates} templates)"


def evaluate_templates(embed: Callable[[torch.Tensor], torch.Tensor], listing: TemplateListing, *,
                       batch_size: int = 64, flip: bool = False, num_workers: int = 0,
                       fprs: Sequence[float] = DEFAULT_FPRS) -> IJBResult:  # fmt: skip
    """Embed the listing's images, aggregate templates, score the template pairs, TPR@FPR (§7.2).

    Unreadable images are left out of their template (a template left empty scores 0 against everything).
    Raises ValueError when the pair list lacks genuine or impostor pairs (no ROC exists then).
    """
    if listing.labels.all() or not listing.labels.any():
        raise ValueError(f"{listing.name}: the template pairs need both genuine (1) and impostor (0) labels for a ROC")
    feats, ok = image_features(embed, listing, batch_size=batch_size, flip=flip, num_workers=num_workers)
    tids, tfeats = template_features(feats[ok], listing.templates[ok], listing.medias[ok])
    all_t = np.unique(listing.templates)
    if len(tids) != len(all_t):  # templates whose every image failed: zero features, so their pairs score 0
        full = np.zeros((len(all_t), tfeats.shape[1]))
        full[np.searchsorted(all_t, tids)] = tfeats
        tids, tfeats = all_t, full
    scores = template_scores(tids, tfeats, listing.pairs)
    fpr, tpr, _ = roc_curve(scores, listing.labels)
    y = listing.labels
    return IJBResult(scores, y, tpr_at_fpr(scores, y, fprs), auc_score(scores, y), len(listing.files),
                     int((~ok).sum()), len(tids), (fpr, tpr))  # fmt: skip


__all__ = [
    "IJBResult", "TemplateListing", "align_to_arcface", "evaluate_templates", "image_features", "open_ijb_dir",
    "open_listing", "read_image_list", "read_landmarks", "read_template_pairs", "roc_curve", "template_features",
    "template_scores", "tpr_at_fpr",
]  # fmt: skip
