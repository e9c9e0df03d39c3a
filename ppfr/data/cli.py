"""``ppfr data``: inspect a source, pack a folder into a record format, write identity-disjoint pair lists.

ppfr data inspect PATH [--decode] [--json] [--strict]     exit 2 when ppfr refuses the file (e.g. a hostile
                                                          .bin); --strict: exit 1 when any sample is bad
ppfr data pack SRC OUT --format rec|tfrecord|list|bin [--name NAME]
ppfr data pairs ROOT OUT [--folds 10] [--per-fold 300] [--seed 0] [--format folds|lfw]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_REFUSED = 2


def main(argv: list[str] | None = None) -> int:
    """``ppfr data inspect | pack | pairs``; the exit status of the subcommand."""
    ap = argparse.ArgumentParser(prog="ppfr data", description="inspect, pack and pair face datasets")
    sub = ap.add_subparsers(dest="data_cmd", required=True)

    q = sub.add_parser("inspect", help="identities, images and bad samples of any supported source")
    q.add_argument("path", help="folder, .rec/.idx, .tfrecord, TFace index, .bin, pair list, or 'synthetic'")
    q.add_argument("--data-root", default=None, help="where index paths are resolved (default: the index's folder)")
    q.add_argument("--decode", action="store_true", help="fully decode every image (default: header check)")
    q.add_argument("--list-bad", type=int, default=20, help="how many bad samples to list (default 20)")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.add_argument("--strict", action="store_true", help="exit 1 if any sample is bad")
    q.set_defaults(func=cmd_inspect)

    q = sub.add_parser("pack", help="write a source as RecordIO, TFRecord (+ TFace index), a 2-field index or .bin")
    q.add_argument("src", help="any source (a folder for rec/tfrecord/list; a pair list for bin)")
    q.add_argument("out", help="rec: the .rec path; tfrecord: the DATA_ROOT folder; list: the .txt; bin: the .bin")
    q.add_argument("--format", required=True, choices=["rec", "tfrecord", "list", "bin"])
    q.add_argument("--name", default=None, help="tfrecord dataset name (default <src>_TFR)")
    q.add_argument("--data-root", default=None)
    q.add_argument("--verify", default="header", choices=["none", "header", "decode"])
    q.set_defaults(func=cmd_pack)

    q = sub.add_parser("pairs", help="write identity-disjoint cross-validation pair lists from an image folder")
    q.add_argument("root", help="an image folder root/<identity>/*.jpg")
    q.add_argument("out", help="the pair list to write")
    q.add_argument("--folds", type=int, default=10)
    q.add_argument("--per-fold", type=int, default=300, help="genuine pairs per fold (as many impostor pairs)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--format", default="folds", choices=["folds", "lfw"],
                   help="'fold same path_a path_b' lines, or LFW pairs.txt")  # fmt: skip
    q.set_defaults(func=cmd_pairs)
    args = ap.parse_args(argv)
    return args.func(args)


def _refused(exc: Exception) -> int:
    msg = " ".join(str(exc).splitlines())  # a message quoting the file's bytes still prints as one line
    print(f"ppfr data: refused: {msg}", file=sys.stderr)
    return EXIT_REFUSED


def cmd_inspect(args: argparse.Namespace) -> int:
    from ppfr.data import DataFormatError, open_source, scan
    from ppfr.data.sources import summarize_bad

    try:
        src = open_source(args.path, data_root=args.data_root)
    except DataFormatError as exc:
        return _refused(exc)
    res = scan(src, "decode" if args.decode else "header")
    info = src.info()
    info.update(check="decode" if args.decode else "header", usable=int(res.good.size), bad=len(res.bad),
                bad_reasons=dict(res.reasons()),
                bad_samples=[[src.name(i), r] for i, r in res.bad[: args.list_bad]])  # fmt: skip
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            if k != "bad_samples":
                print(f"{k:>20}: {v}")
        if res.bad:
            print(f"{'':>20}  {summarize_bad(src, res.bad)}")
            for name, reason in info["bad_samples"]:
                print(f"{'':>22}{name}: {reason}")
    return 1 if args.strict and res.bad else 0


def cmd_pack(args: argparse.Namespace) -> int:
    from ppfr.data import DataFormatError, open_source
    from ppfr.data.pack import pack

    try:
        src = open_source(args.src, data_root=args.data_root)
        rep = pack(src, args.out, args.format, name=args.name, verify=args.verify)
    except DataFormatError as exc:
        return _refused(exc)
    except ValueError as exc:
        print(f"ppfr data pack: {exc}", file=sys.stderr)
        return 1
    print(f"ppfr data pack: wrote {rep.written} images from {src.path} ({src.kind}) as {args.format}:")
    for p in rep.outputs:
        print(f"  {p}")
    if rep.skipped:
        print(
            f"  skipped {len(rep.skipped)} bad sample(s), e.g. " + ", ".join(f"{n} ({r})" for n, r in rep.skipped[:3])
        )
    return 0


def cmd_pairs(args: argparse.Namespace) -> int:
    from ppfr.data import DataFormatError, FolderSource
    from ppfr.data.pairs import make_pairs, write_pairs_folds, write_pairs_lfw
    from ppfr.data.sources import scan

    try:
        src = FolderSource(args.root)
    except DataFormatError as exc:
        return _refused(exc)
    res = scan(src, "header")
    identities: dict[str, list[Path]] = {}
    for i in res.good.tolist():
        identities.setdefault(src.identities[int(src.labels[i])], []).append(src.files[i])
    try:
        plist = make_pairs(identities, folds=args.folds, per_fold=args.per_fold, seed=args.seed)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        (write_pairs_lfw if args.format == "lfw" else write_pairs_folds)(out, plist)
    except ValueError as exc:
        print(f"ppfr data pairs: {exc}", file=sys.stderr)
        return 1
    print(f"ppfr data pairs: wrote {len(plist)} pairs ({args.folds} identity-disjoint folds of {args.per_fold} genuine "
          f"+ {args.per_fold} impostor) from {len(identities)} identities to {out}")  # fmt: skip
    if res.bad:
        print(f"  skipped {len(res.bad)} bad image(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
