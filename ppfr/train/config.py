"""Typed, validated training configs. YAML is only a serialisation: it is loaded into frozen dataclasses, unknown
or mistyped keys are errors that name the key (``optim.lr``), and ``key=value`` overrides use dotted paths.

A config file may name a ``base:`` file (relative to itself) whose values it overrides. The configs of configs/ ship
with the package (``ppfr.configs``), so ``ppfr train partialface_tiny`` finds one by name anywhere.
"""

from __future__ import annotations

import dataclasses
import math
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
    # which backbone parameters get no weight decay: "tface" = TFace's rule (METHODS §1.5: parameters whose reference
    # name contains `bn`; the reference names only MobileFaceNet's BatchNorms that way, so IR nets decay everything)
    # or "1d" = every tensor of at most one dimension (norm scales/shifts, biases, PReLU slopes: arcface_torch's rule)
    no_decay: str = "tface"

    def __post_init__(self) -> None:
        if self.no_decay not in ("tface", "1d"):
            raise ConfigError(f"optim.no_decay must be tface or 1d, got {self.no_decay!r}")
        for key in ("lr", "lr_decay", "generator_lr_mult"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"optim.{key} must be positive, got {getattr(self, key)}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum must lie in [0, 1), got {self.momentum}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError("optim.weight_decay and optim.warmup_steps must be >= 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"optim.grad_clip must be null (no clipping) or positive, got {self.grad_clip}")
        if self.head_weight_decay is not None and self.head_weight_decay < 0:
            raise ConfigError(f"optim.head_weight_decay must be null or >= 0, got {self.head_weight_decay}")
        if any(e < 0 for e in self.lr_steps):
            raise ConfigError(f"optim.lr_steps must be epochs >= 0, got {list(self.lr_steps)}")


@dataclass(frozen=True)
class HeadConfig:
    type: str = "arcface"  # arcface | cosface
    s: float = 64.0
    m: float = 0.5

    def __post_init__(self) -> None:
        if self.type not in ("arcface", "cosface"):
            raise ConfigError(f"head.type must be arcface or cosface, got {self.type!r}")
        if not self.s > 0:
            raise ConfigError(f"head.s (the logit scale) must be positive, got {self.s}")
        # ArcFace adds m to the angle (cos(theta + m)), CosFace subtracts it from the cosine: beyond pi/2 resp. 1
        # the target logit is never the largest and training cannot converge
        top = math.pi / 2 if self.type == "arcface" else 1.0
        if not 0 <= self.m < top:
            raise ConfigError(f"head.m (the {self.type} margin) must lie in [0, {top:.4g}), got {self.m}")


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

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ConfigError(f"eval.max_pairs must be None or >= 1, got {self.max_pairs}")
        if self.pairs is not None and Path(self.pairs).is_dir():  # the common slip: the image folder
            raise ConfigError(f"eval.pairs: {self.pairs} is a folder; expected a pair list (LFW pairs.txt or 'fold "
                              "same path_a path_b' lines, e.g. from `ppfr data pairs`) or an insightface .bin")


@dataclass(frozen=True)
class TransferConfig:
    """Pretrained transfer (docs/methods.md "Transfer and distillation"): the method's server backbone becomes
    ``adapter -> pretrained recogniser -> projection``. ``source``: null (off) | ``faceapi`` (the face-api.js weights
    in ``source_dir``, default :func:`ppfr.models.faceapi.faceapi_dir`: ``$PPFR_FACEAPI_DIR``, else the first
    shared/models/faceapi walking up from the working directory, then from the package) | a ppfr model.pt (its IR
    server) | an ``.onnx`` recogniser (N, C, S, S) -> (N, D) (interpreted with PyTorch ops, so it fine-tunes).
    ``adapter``: ``conv`` (the trained adapter in front of the recogniser), ``none`` (a model.pt's IR weights load into
    the method's own IR where shapes match) or ``auto`` (conv, except none for a model.pt into DuetFace / PRO-Face C,
    whose servers also take injected client maps). The recogniser stays frozen for the first ``freeze_epochs`` epochs of each stage that
    trains the server, then trains at ``lr_mult`` x lr. ``projection``: a Linear to ``embedding_size`` where the sizes
    differ (false: they must agree)."""

    source: Optional[str] = None
    source_dir: Optional[str] = None
    adapter: str = "auto"  # auto | conv | none
    adapter_width: int = 32
    freeze_epochs: int = 1
    lr_mult: float = 0.1
    projection: bool = True

    def __post_init__(self) -> None:
        if self.adapter not in ("auto", "conv", "none"):
            raise ConfigError(f"transfer.adapter must be auto, conv or none, got {self.adapter!r}")
        if self.adapter_width < 1 or self.freeze_epochs < 0:
            raise ConfigError("transfer.adapter_width must be positive and transfer.freeze_epochs >= 0")
        if not self.lr_mult >= 0:
            raise ConfigError(f"transfer.lr_mult must be >= 0, got {self.lr_mult}")
        _check_source(self.source, "transfer.source")


def _check_source(source: Optional[str], key: str) -> None:
    """A transfer source or teacher (faceapi | a model.pt | an .onnx | null) that can be used, else ConfigError naming ``key``."""
    from ppfr.models.transfer import TransferError
    from ppfr.train.transfer import check_source

    try:
        check_source(source, key)
    except TransferError as exc:
        raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class DistillConfig:
    """Teacher distillation: ``weight * (1 - cos(u - mean u, t - mean t))`` (batch-centred cosine) between the server
    embedding u (through a learned projection where sizes differ) and the teacher's embedding t of the clean image,
    added to the stage's loss. ``teacher``: null (off)
    | ``faceapi`` (weights in ``teacher_dir``) | a ppfr model.pt | an ``.onnx`` of 112 x 112 RGB. ``cache``: keep teacher embeddings per image.
    ``precompute`` (with ``cache``): embed the whole training set, as is and mirrored, once before the first step
    and keep it on disk for later runs on the same data (:mod:`ppfr.train.teacher_store`)."""

    teacher: Optional[str] = None
    teacher_dir: Optional[str] = None
    weight: float = 1.0
    cache: bool = True
    precompute: bool = True

    def __post_init__(self) -> None:
        if not self.weight >= 0:
            raise ConfigError(f"distill.weight must be >= 0, got {self.weight}")
        _check_source(self.teacher, "distill.teacher")


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
    # BatchNorm statistics under data parallelism: "per_rank" (each GPU normalises its own slice of the batch, as
    # TFace's plain BatchNorm does) or "global" (over the global batch of all ranks, a SyncBatchNorm that also runs on
    # CPU: multi-process training then equals one process on the same global batch). One process: no difference.
    batchnorm: str = "per_rank"
    threads: Optional[int] = None
    # a model.pt (or trainer checkpoint) whose method weights start this run: how a multi-stage method runs its
    # stages as separate jobs (e.g. MinusFace stage 2 from the stage-1 model), not a resume (optimiser, head and
    # schedule start fresh)
    init_from: Optional[str] = None
    tensorboard: bool = False  # also write TensorBoard event files to <run>/tb (needs the tensorboard package)
    progress: str = "auto"  # auto (a bar on a terminal, log lines otherwise) | bar | lines
    eval: EvalConfig = field(default_factory=EvalConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        if self.amp not in ("none", "bf16", "fp16"):
            raise ConfigError(f"amp must be none, bf16 or fp16, got {self.amp!r}")
        if self.progress not in ("auto", "bar", "lines"):
            raise ConfigError(f"progress must be auto, bar or lines, got {self.progress!r}")
        if self.batchnorm not in ("per_rank", "global"):
            raise ConfigError(f"batchnorm must be per_rank or global, got {self.batchnorm!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        for key in ("epochs", "checkpoint_every", "keep_last", "log_every"):
            if getattr(self, key) < (0 if key == "epochs" else 1):
                want = ">= 0" if key == "epochs" else "positive"
                raise ConfigError(f"{key} must be {want}, got {getattr(self, key)}")
        for key in ("max_steps_per_epoch", "threads"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key} must be null (no cap / the default) or >= 1, got {getattr(self, key)}")
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
        if cls is DataConfig and prefix:  # DataConfig names its keys DataConfig.<key>; here they are <prefix><key>
            msg = msg.replace("DataConfig.", prefix)
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
        raise ConfigError(f"{path}: not valid YAML ({_one_line(exc)})") from None
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
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key.strip()!r}: value {raw!r} is not valid YAML ({_one_line(exc)})") from None
    return out


def _one_line(exc: Exception) -> str:
    """A (multi-line, caret-drawing) YAML error as one line."""
    return " ".join(str(exc).split())


def shipped_configs() -> dict[str, Path]:
    """{name: path} of the configs that ship with ppfr (configs/ of the source tree, ``ppfr.configs`` installed)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("ppfr.configs")
    except ImportError:
        spec = None
    dirs = [Path(d) for d in (spec.submodule_search_locations or [])] if spec else []
    dirs.append(Path(__file__).resolve().parents[2] / "configs")  # a source tree run without installing
    for d in dirs:
        if d.is_dir():
            return {p.stem: p for p in sorted(d.glob("*.yaml"))}
    return {}


def find_config(path: str | Path) -> Path:
    """``path`` if it exists, else the shipped config it names (``partialface_tiny``, ``partialface_tiny.yaml`` or
    the README's ``configs/partialface_tiny.yaml`` run outside a clone).

    Raises:
        ConfigError: neither; the message lists the shipped configs.
    """
    path = Path(path)
    if path.exists():
        return path
    shipped = shipped_configs()
    if len(path.parts) == 1 or path.parent.name == "configs":
        stem = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
        if stem in shipped:
            return shipped[stem]
    names = ", ".join(n for n in shipped if not n.endswith("base")) or "none found"
    raise ConfigError(f"no config {str(path)!r}: pass a YAML file or the name of a config that ships with ppfr: "
                      f"{names}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML config (a path or a shipped config's name, see :func:`find_config`; the defaults when ``path``
    is None), apply overrides, validate."""
    values = _read_yaml(find_config(path)) if path is not None else {}
    values = apply_overrides(values, overrides or [])
    return from_dict(TrainConfig, values)


# ------------------------------------------------------------------------------------------------ run folders
#: Keys a ``--resume`` may change on the command line: they decide how a run is executed, logged or checked, not
#: what it computes (the parameters a resumed run ends with). A key ending in ``.`` covers its whole section.
#: ``name`` and ``out_dir`` only locate the run folder. Everything else is fixed by the run's saved config.yaml.
RESUME_SAFE_KEYS: tuple[str, ...] = (
    "name", "out_dir", "threads", "progress", "log_every", "tensorboard", "device", "checkpoint_every", "keep_last",
    "data.num_workers", "data.prefetch", "eval.",
)  # fmt: skip


def resume_safe(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_SAFE_KEYS)


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in values.items():
        if isinstance(v, dict) and k != "method_options":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """The config of an existing run folder (its saved ``config.yaml``), for ``--resume``.

    ``overrides`` may change only :data:`RESUME_SAFE_KEYS`; any other change is a ConfigError naming the keys (a
    resumed run must compute what the run started computing). ``name`` and ``out_dir`` are set from the folder, so
    a moved run folder resumes in place."""
    run_dir = Path(run_dir)
    saved_path = run_dir / "config.yaml"
    saved = _read_yaml(saved_path)
    saved_cfg = from_dict(TrainConfig, saved)
    cfg = from_dict(TrainConfig, apply_overrides(saved, overrides or []))
    old, new = _flat(saved_cfg.to_dict()), _flat(cfg.to_dict())
    changed = [k for k in new if new[k] != old.get(k) and not resume_safe(k)]
    if changed:
        what = ", ".join(f"{k}={_show(old.get(k))} -> {_show(new[k])}" for k in changed)
        raise ConfigError(f"--resume: {saved_path} fixes the experiment; refusing to change {what} (a resume may "
                          f"change only {', '.join(RESUME_SAFE_KEYS)}). Train a new run (another name=) instead")
    return dataclasses.replace(cfg, name=run_dir.name, out_dir=str(run_dir.parent))


def _show(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def config_help() -> str:
    """Every config key with its default, generated from the dataclasses (``ppfr train -h``)."""
    lines: list[str] = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, f"{prefix}{f.name}.")
                continue
            key = f"{prefix}{f.name}"
            lines.append(f"  {key} = {_show(_to_plain(v))}{'  *' if resume_safe(key) else ''}")

    walk(TrainConfig(), "")
    return "\n".join(lines)
