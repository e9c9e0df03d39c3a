"""Write packs from any source: insightface RecordIO, TFace TFRecord (+ 4-field index), a TFace 2-field index,
or a verification ``.bin`` from a pair list. Bad samples are skipped and counted, never packed."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ppfr.data import binset, recordio, tfrecord
from ppfr.data.sources import FolderSource, IndexListSource, PairSource, Source, Verify, check_sample

PackFormat = Literal["rec", "tfrecord", "list", "bin"]
PACK_FORMATS = ("rec", "tfrecord", "list", "bin")


@dataclass
class PackReport:
    """What was written: the files, how many samples, and the skipped ones as (name, reason)."""

    outputs: list[Path]
    written: int
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _good(source: Source, order: np.ndarray, verify: Verify, report: PackReport) -> list[int]:
    keep = []
    for i in order.tolist():
        reason = check_sample(source, i, verify) if verify != "none" else None
        if reason is None:
            keep.append(i)
        else:
            report.skipped.append((source.name(i), reason))
    return keep


def pack(source: Source, out: str | Path, fmt: PackFormat, *, name: str | None = None, verify: Verify = "header",
         shard_size: int = tfrecord.SHARD_SIZE) -> PackReport:  # fmt: skip
    """Write ``source`` as ``fmt``.

    * ``rec``: ``out`` is the ``.rec`` path (the ``.idx`` goes beside it); insightface layout, records in label
      order (stable), so identity records can describe contiguous key ranges.
    * ``tfrecord``: ``out`` is TFace's DATA_ROOT: ``out/<name>/<name>-%05d.tfrecord`` shards of ``shard_size``
      records and the 4-field index ``out/<name>.txt``; records in source order, each an Example with ``image``
      and ``label``. ``name`` defaults to ``<source name>_TFR`` (TFace takes the TFRecord path only for names
      containing "TFR").
    * ``list``: ``out`` is the 2-field index ``path<TAB>label``, paths relative to its folder (file sources only).
    * ``bin``: ``out`` is the ``.bin``; the source must be a pair list (two images per pair, in pair order).
    """
    out = Path(out)
    if fmt not in PACK_FORMATS:
        raise ValueError(f"format must be one of {PACK_FORMATS}, got {fmt!r}")
    report = PackReport([], 0)
    if fmt == "bin":
        if not isinstance(source, PairSource):
            raise ValueError(f"format 'bin' packs a pair list (LFW pairs.txt or fold list), not a {source.kind} source")
        bad = {
            i: r for i in np.unique(source.pairs[:, 2:]).tolist() if (r := check_sample(source, i, verify)) is not None
        }
        images, issame = [], []
        for _fold, same, a, b in source.pairs.tolist():
            if a in bad or b in bad:
                report.skipped += [(source.name(k), bad[k]) for k in (a, b) if k in bad]
                continue
            images += [source.read(a), source.read(b)]
            issame.append(bool(same))
        out.parent.mkdir(parents=True, exist_ok=True)
        binset.write_bin(out, images, issame)
        report.outputs, report.written = [out], len(images)
        return report
    if fmt == "rec":
        keep = _good(source, np.argsort(source.labels, kind="stable"), verify, report)
        out.parent.mkdir(parents=True, exist_ok=True)
        idx = out.with_suffix(".idx")
        recordio.write_face_pack(out, idx, [source.read(i) for i in keep], [int(source.labels[i]) for i in keep])
        report.outputs, report.written = [out, idx], len(keep)
        return report
    keep = _good(source, np.arange(len(source)), verify, report)
    if fmt == "list":
        if not isinstance(source, (FolderSource, IndexListSource)):
            raise ValueError(f"format 'list' indexes image files; a {source.kind} source has none (pack 'rec' instead)")
        out.parent.mkdir(parents=True, exist_ok=True)
        base = out.resolve().parent
        lines = [
            f"{Path(os.path.relpath(source.files[i].resolve(), base)).as_posix()}\t{int(source.labels[i])}\n"
            for i in keep
        ]
        out.write_text("".join(lines))
        report.outputs, report.written = [out], len(keep)
        return report
    # tfrecord
    name = name or f"{source.path.stem or 'data'}_TFR"
    (out / name).mkdir(parents=True, exist_ok=True)
    index_lines = []
    for start in range(0, len(keep), shard_size):
        shard = start // shard_size
        path = tfrecord.shard_path(out, name, shard)
        with tfrecord.TFRecordWriter(path) as w:
            for i in keep[start : start + shard_size]:
                lab = int(source.labels[i])
                off = w.write(tfrecord.encode_example(source.read(i), lab))
                index_lines.append(f"{name}\t{shard}\t{off}\t{lab}\n")
        report.outputs.append(path)
    index = out / f"{name}.txt"
    index.write_text("".join(index_lines))
    report.outputs.append(index)
    report.written = len(keep)
    return report
