"""Privacy attacks on a method's real payload, as plugins: one file per kind, one registry, one scoring path.

Kinds (docs/attack.md):

* ``inversion`` (:mod:`.inversion`) -- closed-form least-squares recovery of the face from a payload that is a
  known linear function of the image (the method declares it: :meth:`ppfr.methods.Method.payload_operator`), with
  the per-image secret (PartialFace's rank) searched by residual, not given.
* ``linkage`` (:mod:`.linkage`) -- FaceLinkGen-style identity linkage in several forms (a model trained so that a
  pretrained teacher's embedding space links protected queries to a clean gallery, the teacher fine-tuned, the
  server's own recogniser); the models are in :mod:`.linkers`, the 1:N / 1:1 scoring in :mod:`.linkage_score`.
* ``recovery`` (:mod:`.recovery`) -- the papers' learned U-Net recovery (METHODS.md §7.4).

Shared pieces, one responsibility per module: :mod:`.common` (the plugin interface, targets, the budget),
:mod:`.data` (faces and their protection), :mod:`.judge` (the independent recogniser), :mod:`.fit` (the training
loop), :mod:`.results` (scoring, result files, the grid); ``ppfr attack`` is :mod:`.cli`. A new kind is one file
with one ``@register_attack`` class.
"""

from __future__ import annotations

import importlib

from ppfr.eval.attacks.common import Attack, AttackConfig, AttackContext, AttackError

_REGISTRY: dict[str, type[Attack]] = {}
# Order in which ``--kind all`` runs the kinds: inversion first (its estimates seed the learned kinds).
BUILTIN_KINDS = ("inversion", "recovery", "linkage")


def register_attack(cls: type[Attack]) -> type[Attack]:
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"attack name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    for mod in BUILTIN_KINDS:
        importlib.import_module(f"ppfr.eval.attacks.{mod}")


def available_attacks() -> list[str]:
    """Registered kinds, builtin ones in ``--kind all`` order."""
    _load_builtin()
    return [k for k in BUILTIN_KINDS if k in _REGISTRY] + sorted(set(_REGISTRY) - set(BUILTIN_KINDS))


def build_attack(name: str) -> Attack:
    _load_builtin()
    if name not in _REGISTRY:
        raise AttackError(f"unknown attack kind {name!r}; available: {', '.join(available_attacks())}, all")
    return _REGISTRY[name]()


__all__ = ["Attack", "AttackConfig", "AttackContext", "AttackError", "available_attacks", "build_attack",
           "register_attack"]  # fmt: skip
