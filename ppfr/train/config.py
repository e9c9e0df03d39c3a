"""Typed, validated training configs. YAML is only a serialisation: it is loaded into frozen dataclasses, unknown
or mistyped keys are errors that name the key (``optim.lr``), and ``key=value`` overrides use dotted paths.

A config file may name a ``base:`` file (relative to itself) whose values it overrides.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ppfr.data.config import DataConfig


class ConfigError(ValueError):
    """A config that does not validate; the message names the key."""


@dataclass(frozen=True)
class OptimConfig:
    """SGD with step decay by epoch and optional linear warm-up (METHODS §1.5)."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_steps: tuple[int, ...] = (10, 18, 22)  # epochs at which lr *= lr_decay
    lr_decay: float = 0.1
    warmup_steps: int = 0
    generator_lr_mult: float = 0.5  # MinusFace generator group (paper 0.5; 1.0 = the code's effective behaviour)
    head_weight_decay: Optional[float] = None  # None: same as weight_decay
    grad_clip: Optional[float] = None  # max global grad norm

    def __post_init__(self) -> None:
        for key in ("lr", "lr_decay", "generator_lr_mult"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"optim.{key} must be positive, got {getattr(self, key)}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum must lie in [0, 1), got {self.momentum}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError("optim.weight_decay and optim.warmup_steps must be >= 0")


@dataclass(frozen=True)
class HeadConfig:
    type: str = "arcface"  # arcface | cosface
    s: float = 64.0
    m: float = 0.5

    def __post_init__(self) -> None:
        if self.type not in ("arcface", "cosface"):
            raise ConfigError(f"head.type must be arcface or cosface, got {self.type!r}")


@dataclass(frozen=True)
class StageConfig:
    """One training stage: ``epochs`` epochs of the step schedule (``optim.lr_steps`` count these), each ``repeat``
    passes over the data. ``repeat`` is TFace's dataset replication ``NUM_AUG`` (PartialFace r, MinusFace stage-2
    augmentation, METHODS §4.2 / §5.3): its ``AugmentedMultiDataset`` lists every sample r times, so one of its epochs
    is r passes, each with fresh random ranks / shuffles. Here each pass is one shuffled pass of the loader."""

    name: str
    epochs: int = 1
    repeat: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"stages[].epochs must be >= 0, got {self.epochs}")
        if self.repeat < 1:
            raise ConfigError(f"stages[].repeat must be >= 1, got {self.repeat}")


@dataclass(frozen=True)
class EvalConfig:
    pairs: Optional[str] = None  # a pair list (LFW pairs.txt or 'fold same path_a path_b')
    image_root: Optional[str] = None
    batch_size: int = 64
    max_pairs: Optional[int] = None
    before: bool = True  # also evaluate the untrained model (the baseline the acceptance compares against)
    after: bool = True  # evaluate the trained model at the end (off when a caller evaluates it its own way)


@dataclass(frozen=True)
class TrainConfig:
    name: str = "run"
    method: str = "partialface"
    method_options: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    stages: tuple[StageConfig, ...] = ()  # empty: every stage of the method with `epochs` each
    epochs: int = 1
    max_steps_per_epoch: Optional[int] = None
    seed: int = 1337
    out_dir: str = "runs"
    checkpoint_every: int = 100
    keep_last: int = 3
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "none"  # none | bf16 | fp16 (CUDA)
    threads: Optional[int] = None
    # a model.pt (or trainer checkpoint) whose method weights start this run: how a multi-stage method runs its
    # stages as separate jobs (e.g. MinusFace stage 2 from the stage-1 model), not a resume (optimiser, head and
    # schedule start fresh)
    init_from: Optional[str] = None
    tensorboard: bool = False  # also write TensorBoard event files to <run>/tb (needs the tensorboard package)
    progress: str = "auto"  # auto (a bar on a terminal, log lines otherwise) | bar | lines
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.amp not in ("none", "bf16", "fp16"):
            raise ConfigError(f"amp must be none, bf16 or fp16, got {self.amp!r}")
        if self.progress not in ("auto", "bar", "lines"):
            raise ConfigError(f"progress must be auto, bar or lines, got {self.progress!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        for key in ("epochs", "checkpoint_every", "keep_last", "log_every"):
            if getattr(self, key) < (0 if key == "epochs" else 1):
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        check_method_options(self.method, self.method_options)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict:
        return _to_plain(self)


def check_method_options(method: str, options: dict) -> None:
    """Build (without any weights) the method's options dataclass, so a bad method name or option -- an unknown key,
    a bad value, an option that needs another (DuetFace ``roi: pfld`` needs ``landmark_ckpt``) -- is a ConfigError
    naming the key when the config is loaded, not a traceback once training starts."""
    from ppfr.methods.base import make_options, method_class

    try:
        cls = method_class(method)
    except ValueError as exc:
        raise ConfigError(f"method: {exc}") from None
    try:
        make_options(cls.Options, dict(options))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"method_options: {exc}") from None


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__}")
        elem = args[0] if args else Any
        return tuple(_coerce(elem, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value  # Literal and Any: the dataclass validates


def from_dict(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}' (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        raise ConfigError(msg if prefix.rstrip(".") in msg or not prefix else f"{prefix.rstrip('.')}: {msg}") from None


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "method_options" else v
    return out


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping at the top level")
    base = data.pop("base", None)
    if base is not None:
        data = _merge(_read_yaml((path.parent / base).resolve()), data)
    return data


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """``["optim.lr=0.01", "data.root=..."]`` -> values with those dotted keys set (values parsed as YAML)."""
    out = _merge({}, values)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a mapping")
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML config (or the defaults when ``path`` is None), apply overrides, validate."""
    values = _read_yaml(Path(path)) if path is not None else {}
    values = apply_overrides(values, overrides or [])
    return from_dict(TrainConfig, values)
