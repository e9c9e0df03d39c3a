"""One reading of a model spec for every verb: ``ppfr attack``, ``export``, ``serve``, ``client`` and ``eval`` turn
the same text into the same method with the same weights.

A spec is

* a ``model.pt`` written by ``ppfr train`` (rebuilt by :func:`ppfr.methods.load_method`: a weights-only read);
* a run folder holding one (``runs/<name>`` means ``runs/<name>/model.pt``);
* ``method:NAME`` or ``method:NAME:key=value,key=value`` -- an untrained method built with its defaults plus these
  options (each value read as a YAML scalar: ``depth=18``, ``roi=none``, ``pretrained=false``). Its weights are
  drawn from torch's CPU generator seeded with :data:`UNTRAINED_SEED` inside ``fork_rng``: every verb and every
  process gets the same weights for the same spec (``ppfr client method:duetface`` protects for
  ``ppfr serve method:duetface``; ``ppfr attack method:duetface`` attacks the weights ``ppfr export`` exports), and
  the caller's random stream is left as it was.

Exported graphs (``.onnx``, ``.engine``, ``.plan``) are not methods: :mod:`ppfr.deploy.runtime` runs them itself,
and here they are refused with a message saying so. Attack-only names (``identity``, ``faceapi``) belong to the
attack layer.

A spec that cannot be read is a :class:`SpecError` (a ``ValueError``: every verb prints it as one line and exits
2); a file that is not a readable ppfr model is :class:`ppfr.models.checkpoints.CheckpointError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ppfr.methods.base import Method, build_method, load_method

METHOD_PREFIX = "method:"
UNTRAINED_SEED = 0  # the one seed of every untrained method: tests and demos compare across verbs and processes
EXPORTED_SUFFIXES = (".onnx", ".engine", ".plan")
SPEC_FORMS = "runs/<name>/model.pt, a run folder holding model.pt, or method:NAME[:key=value,...]"


class SpecError(ValueError):
    """A model spec that cannot be read: unknown method, malformed option, missing file (the message says which)."""


@dataclass(frozen=True)
class ModelSource:
    """What a spec names, before anything is loaded.

    kind: ``checkpoint`` (``path`` is the model.pt) or ``method`` (``name`` and ``options``: an untrained method).
    text: the spec as given.
    """

    kind: str
    text: str
    path: Path | None = None
    name: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def trained(self) -> bool:
        return self.kind == "checkpoint"


def is_method_spec(spec: str | Path) -> bool:
    return isinstance(spec, str) and spec.startswith(METHOD_PREFIX)


def parse_options(text: str, spec: str) -> dict[str, Any]:
    """``key=value,key=value`` -> {key: YAML scalar}; SpecError naming the item that is not ``key=value``."""
    import yaml

    opts: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise SpecError(f"bad option {item!r} in {spec!r}: write method:NAME:key=value,key=value "
                            "(e.g. method:partialface:depth=18,width=8)")  # fmt: skip
        try:
            opts[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            msg = str(exc).splitlines()[0]
            raise SpecError(f"bad value of option {key.strip()!r} in {spec!r}: {msg}") from None
    return opts


def parse_model_spec(spec: str | Path) -> ModelSource:
    """Read a spec without loading anything (see the module docstring); SpecError if it names nothing loadable."""
    text = str(spec)
    if is_method_spec(text):
        name, _, opt_text = text[len(METHOD_PREFIX):].partition(":")
        if not name.strip():
            raise SpecError(f"{text!r} names no method: write method:NAME[:key=value,...]")
        return ModelSource("method", text, name=name.strip(), options=parse_options(opt_text, text))
    if not text:
        raise SpecError(f"empty model spec: pass {SPEC_FORMS}")
    path = Path(text)
    if path.suffix.lower() in EXPORTED_SUFFIXES:
        raise SpecError(f"{text} is an exported graph, not a method: pass {SPEC_FORMS} (ppfr serve runs "
                        "exported graphs)")  # fmt: skip
    if path.is_dir():
        if not (path / "model.pt").is_file():
            raise SpecError(f"{text} is a folder without model.pt: pass {SPEC_FORMS}")
        path = path / "model.pt"
    elif not path.is_file():
        raise SpecError(f"checkpoint not found: {text} (pass {SPEC_FORMS})")
    return ModelSource("checkpoint", text, path=path)


def build_untrained(name: str, options: dict[str, Any]) -> Method:
    """The untrained method of ``method:NAME:options``, in eval mode: weights drawn with :data:`UNTRAINED_SEED`
    from a forked CPU generator (the same weights in every process; the caller's random stream is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(UNTRAINED_SEED)
        return build_method(name, **options).eval()


def load_model(spec: str | Path, map_location: str | torch.device = "cpu") -> tuple[Method, ModelSource]:
    """A spec -> (the method in eval mode on ``map_location``, what the spec named).

    Raises SpecError (unreadable spec, unknown method or option, missing file) or CheckpointError (a file that is
    not a readable ppfr model, including one whose method is not installed here).
    """
    src = parse_model_spec(spec)
    if src.kind == "method":
        try:
            method = build_untrained(src.name, src.options)
        except (ValueError, TypeError) as exc:  # unknown method, unknown option, a value its options refuse
            raise SpecError(f"{src.text}: {exc}") from None
        return method.to(map_location), src
    assert src.path is not None
    return load_method(src.path, map_location=map_location), src
