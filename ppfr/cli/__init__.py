"""``ppfr <verb>``: a table of verbs, each imported only when it runs.

Each verb is a module with ``main(argv) -> int`` that owns its argparse (so ``ppfr <verb> -h`` is that module's
complete help, and ``python -m <module>`` runs the same verb). This package imports none of them up front:
``ppfr info`` never pays for the serving stack, and no library module imports the CLI to register itself.

A verb whose optional room is not installed exits 2 with one line naming the extra, e.g.
``pip install 'ppfr[serve]'`` (the module -> extra table is :mod:`ppfr._extras`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple

from ppfr import __version__, _extras


class Verb(NamedTuple):
    module: str  # the module whose ``main(argv) -> int`` runs the verb
    help: str


VERBS: dict[str, Verb] = {
    "info": Verb("ppfr.info", "versions, devices, installed extras, and which backend of which op works here"),
    "demo": Verb("ppfr.cli.demo", "run the frequency-domain client transforms on a batch of faces"),
    "data": Verb("ppfr.data.cli", "inspect, pack and pair face datasets"),
    "train": Verb("ppfr.train.trainer", "train a method from a YAML config (see configs/)"),
    "eval": Verb("ppfr.eval.cli", "verification / template evaluation of a trained model or the face-api judge"),
    "attack": Verb("ppfr.eval.attacks.cli", "privacy attacks on a method's payload: inversion, linkage, recovery"),
    "study": Verb("ppfr.study", "train, evaluate and attack every method on one dataset; write a report"),
    "export": Verb("ppfr.deploy.export.cli", "export a model to ONNX / TensorRT / Triton"),
    "serve": Verb("ppfr.deploy.server.launch", "serve a method over HTTP: enrol / verify / identify protected payloads"),
    "client": Verb("ppfr.deploy.client", "protect faces locally and enrol/verify/identify them on a ppfr server"),
    "gallery": Verb("ppfr.deploy.gallery", "gallery maintenance: import a gallery.npz into sqlite / qdrant"),
}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    """The top level, for ``ppfr``, ``ppfr -h`` and an unknown verb (a known verb never goes through it)."""
    ap = argparse.ArgumentParser(prog="ppfr", description="privacy-preserving face recognition toolkit",
                                 epilog="ppfr VERB -h prints the verb's own options.")  # fmt: skip
    ap.add_argument("--version", action="version", version=f"ppfr {__version__}")
    sub = ap.add_subparsers(dest="verb", required=True)
    for name, verb in VERBS.items():
        sub.add_parser(name, help=verb.help, add_help=False)
    return ap


def missing_extra(verb: str, exc: ModuleNotFoundError) -> int | None:
    """2 after one line naming the extra that installs ``exc``'s module, or None when no extra does (a bug)."""
    extra = _extras.extra_for(exc.name)
    if extra is None:
        return None
    print(f"ppfr {verb}: needs {exc.name}, which is not installed: pip install 'ppfr[{extra}]'", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in VERBS:
        _parser().parse_args(argv)  # prints the help, the version or the error, and exits
        return 2
    name, rest = argv[0], argv[1:]
    try:  # importing the verb and running it: a lazily imported optional module may be missing in either
        return importlib.import_module(VERBS[name].module).main(rest)
    except ModuleNotFoundError as exc:
        rc = missing_extra(name, exc)
        if rc is None:
            raise
        return rc
