"""An independent face-recognition judge: face-api.js's FaceRecognitionNet (a port of dlib's ResNet-29 metric net).

ppfr uses it as a third-party recogniser that none of the methods was trained against, e.g. "is an attacker's
reconstruction still recognised as the same person?". This module is ppfr's own loader and PyTorch
implementation; it reads face-api.js's published weight format (``face_recognition_model-weights_manifest.json``
+ the shard files it names) and never executes anything from the files.

Network (dlib ``dnn_face_recognition_ex.cpp``'s ``anet_type``, as face-api.js lays it out):

* input 150x150 RGB in [0, 255]; ``(x - [122.782, 117.001, 104.298]) / 256``;
* ``conv32_down``: 7x7 stride-2 conv without padding (TF "valid") + per-channel affine ("scale") + ReLU, then a
  3x3 stride-2 max pool without padding: 150 -> 72 -> 35;
* residual stages 32 (x3), 64 (down + x3), 128 (down + x2), 256 (down + x2), 256 (down): a block is
  conv3x3 + scale + ReLU -> conv3x3 + scale, added to the input, ReLU. Stride-1 convs pad 1 (TF "same"). A *down*
  block's first conv has stride 2 and no padding; its shortcut is a 2x2/2 average pool of the input, zero-padded
  in channels when the width doubles; where the two branches disagree in size (8 -> 3 vs 4, 4 -> 1 vs 2) the conv
  branch is zero-padded at the bottom and right, as face-api.js (and dlib's ``add_prev``) do. 35 -> 17 -> 8 -> 4 -> 2;
* global average pool -> ``fc`` (256 x 128, no bias) -> the 128-d descriptor. dlib compares descriptors by
  Euclidean distance (same person below ~0.6).

Judge input geometry. dlib's descriptor expects a *face chip*: ``get_face_chip_details(shape, 150, 0.25)`` maps the
detected landmarks by a least-squares similarity onto dlib's mean-face template, each template point ``m`` (in
[0, 1] face-box units) landing at chip pixel ``150 * (0.25 + m) / 1.5``. ppfr's images are ArcFace-aligned 112x112
crops, i.e. the 5 landmarks already sit on the ArcFace template. So ONE fixed similarity maps every ppfr crop to
the chip: the least-squares similarity from the ArcFace template (left eye, right eye, nose tip, left and right
mouth corner) to the same five points of dlib's 68-point mean face (eye centres = mean of points 36-41 / 42-47,
nose tip = point 30, mouth corners = points 48 / 54), placed in chip pixels with padding 0.25. Both templates use
pixel-centre-at-integer coordinates (OpenCV / dlib), which :func:`chip_sampling_grid` converts to
``grid_sample``'s ``align_corners=False`` convention. Chip pixels that fall outside the 112x112 crop are filled
by replicating the crop's border (measured better than black on celeba112, see docs/eval.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ppfr.models.checkpoints import CheckpointError

MANIFEST_NAME = "face_recognition_model-weights_manifest.json"
FACEAPI_DIR_ENV = "PPFR_FACEAPI_DIR"
SHARED_FACEAPI = Path("shared") / "models" / "faceapi"  # where the shared reference data keeps the weights
# What every option that takes the folder says about its default (``--judge-dir``, ``transfer.source_dir``, ...).
FACEAPI_DIR_HELP = (f"face-api.js weights folder (default: ${FACEAPI_DIR_ENV}, else the first {SHARED_FACEAPI} found "
                    "walking up from the current directory, then from the ppfr package)")
MEAN_RGB = (122.782, 117.001, 104.298)  # dlib's training-set mean, in [0, 255] RGB
CHIP_SIZE = 150
CHIP_PADDING = 0.25  # dlib's compute_face_descriptor / face_recognition default

# ArcFace / insightface 5-point template for 112x112 crops (pixel coordinates, x right, y down):
# left eye, right eye, nose tip, left mouth corner, right mouth corner (left/right as seen in the image).
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)

# The points of dlib's 68-landmark mean face (``get_face_chip_details``, dlib/image_transforms/interpolation.h;
# face-box units in [0, 1]) that correspond to the ArcFace landmarks. Index = iBUG-68 landmark number.
_DLIB_MEAN_FACE_68 = {
    30: (0.490127, 0.515625),  # nose tip
    36: (0.121737, 0.216423), 37: (0.187122, 0.178758), 38: (0.265825, 0.179852),  # eye on the image's left
    39: (0.334606, 0.231733), 40: (0.260918, 0.245099), 41: (0.182743, 0.244077),
    42: (0.645647, 0.231733), 43: (0.714428, 0.179852), 44: (0.793132, 0.178758),  # eye on the image's right
    45: (0.858516, 0.216423), 46: (0.79751, 0.244077), 47: (0.719335, 0.245099),
    48: (0.254149, 0.780233),  # mouth corner, image left
    54: (0.726104, 0.780233),  # mouth corner, image right
}  # fmt: skip


def dlib_template_5pts() -> np.ndarray:
    """(5, 2) dlib mean-face points in face-box units, in ArcFace landmark order (eyes, nose tip, mouth corners)."""
    p = {k: np.asarray(v) for k, v in _DLIB_MEAN_FACE_68.items()}
    left_eye = np.mean([p[i] for i in range(36, 42)], axis=0)
    right_eye = np.mean([p[i] for i in range(42, 48)], axis=0)
    return np.stack([left_eye, right_eye, p[30], p[48], p[54]])


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) with dst ~ A @ [src; 1].

    Umeyama's closed form. src, dst: (N, 2) with N >= 2 points. Returns A (2, 3) float64.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"similarity_transform needs two (N>=2, 2) point sets, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    fix = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])  # forbid reflections
    rot = u @ fix @ vt
    var_s = (s0**2).sum() / len(src)
    if var_s <= 0:
        raise ValueError("similarity_transform: the source points coincide")
    scale = float(np.trace(np.diag(sig) @ fix) / var_s)
    return np.concatenate([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]], axis=1)


def arcface_to_chip(size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> np.ndarray:
    """(2, 3) similarity mapping ArcFace-112 pixel coordinates to dlib face-chip pixel coordinates."""
    chip_pts = size * (padding + dlib_template_5pts()) / (1 + 2 * padding)
    return similarity_transform(ARCFACE_TEMPLATE_112, chip_pts)


def chip_sampling_grid(in_size: int = 112, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> torch.Tensor:
    """``grid_sample`` grid (1, size, size, 2) that pulls the dlib chip out of an ArcFace-aligned crop.

    Every chip pixel centre (u, v) is mapped back through the inverse similarity to crop pixel coordinates, then to
    ``align_corners=False`` normalised coordinates: pixel centre i of an n-pixel axis sits at (2 i + 1) / n - 1.
    """
    a = arcface_to_chip(size, padding)
    inv = np.linalg.inv(np.vstack([a, [0.0, 0.0, 1.0]]))[:2]
    v, u = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
    xs = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2]
    ys = inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]
    grid = np.stack([(2 * xs + 1) / in_size - 1, (2 * ys + 1) / in_size - 1], axis=-1)
    return torch.from_numpy(grid).float()[None]


# ------------------------------------------------------------------------------------------------ network
class _ConvScale(nn.Module):
    """conv (with bias) -> per-channel affine (dlib's ``affine`` = a frozen batch norm) -> optional ReLU."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, relu: bool) -> None:
        super().__init__()
        # TF "valid" for the stride-2 convs (no padding), "same" (= k // 2 for odd k at stride 1) otherwise
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=0 if stride == 2 else k // 2, bias=True)
        self.scale_weight = nn.Parameter(torch.ones(cout))
        self.scale_bias = nn.Parameter(torch.zeros(cout))
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x) * self.scale_weight[:, None, None] + self.scale_bias[:, None, None]
        return F.relu(y) if self.relu else y


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.conv1 = _ConvScale(cin, cout, 3, 2 if down else 1, relu=True)
        self.conv2 = _ConvScale(cout, cout, 3, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        if not self.down:
            return F.relu(out + x)
        skip = F.avg_pool2d(x, 2, 2)  # floor: 35 -> 17, 17 -> 8, 8 -> 4, 4 -> 2
        if skip.shape[1] != out.shape[1]:  # width doubled: the shortcut carries zeros in the new channels
            skip = F.pad(skip, (0, 0, 0, 0, 0, out.shape[1] - skip.shape[1]))
        dh, dw = skip.shape[2] - out.shape[2], skip.shape[3] - out.shape[3]
        if dh or dw:  # the unpadded stride-2 conv came out smaller (8 -> 3, 4 -> 1): zero rows/cols bottom-right
            out = F.pad(out, (0, dw, 0, dh))
        return F.relu(out + skip)


# (manifest prefix, in channels, out channels, is a down block)
_BLOCKS = (
    ("conv32_1", 32, 32, False), ("conv32_2", 32, 32, False), ("conv32_3", 32, 32, False),
    ("conv64_down", 32, 64, True), ("conv64_1", 64, 64, False), ("conv64_2", 64, 64, False),
    ("conv64_3", 64, 64, False),
    ("conv128_down", 64, 128, True), ("conv128_1", 128, 128, False), ("conv128_2", 128, 128, False),
    ("conv256_down", 128, 256, True), ("conv256_1", 256, 256, False), ("conv256_2", 256, 256, False),
    ("conv256_down_out", 256, 256, True),
)  # fmt: skip
#: The blocks that end the four stages the injecting methods hook (DuetFace masks, PRO-Face C compensation), the
#: counterpart of IRNet's ``stage_ends``; ``conv256_down_out`` (256 @ 2x2) follows them, before the pooling.
STAGE_ENDS = ("conv32_3", "conv64_3", "conv128_2", "conv256_2")
#: (channels, side) of those stage outputs for the 150 x 150 chip: 32 @ 35, 64 @ 17, 128 @ 8, 256 @ 4.
STAGE_SHAPES = ((32, 35), (64, 17), (128, 8), (256, 4))


class FaceApiJudge(nn.Module):
    """face-api.js FaceRecognitionNet with ppfr's input convention.

    ``embed(images)`` takes ppfr's standard images (B, 3, 112, 112) float RGB in [-1, 1] (ArcFace-aligned) and
    returns raw 128-d descriptors (B, 128), not normalised (norms ~1.3-1.65 on celeba112; see docs/eval.md).
    ``forward(chips)`` is the bare network on dlib face chips (B, 3, 150, 150) RGB in [0, 255].
    Build with :func:`load_faceapi_judge`; a freshly constructed judge has placeholder weights.
    """

    def __init__(self, in_size: int = 112) -> None:
        super().__init__()
        self.in_size = in_size
        self.conv32_down = _ConvScale(3, 32, 7, 2, relu=True)
        self.blocks = nn.ModuleDict({name: _Residual(cin, cout, down) for name, cin, cout, down in _BLOCKS})
        self.fc = nn.Parameter(torch.zeros(256, 128))  # (in, out): descriptor = pooled @ fc, no bias
        self.register_buffer("mean_rgb", torch.tensor(MEAN_RGB).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("grid", chip_sampling_grid(in_size), persistent=False)

    def forward(self, chips: torch.Tensor, inject=None) -> torch.Tensor:
        """chips (B, 3, 150, 150) RGB in [0, 255] -> (B, 128) raw descriptors. ``inject(stage, h) -> h`` runs after
        each block of :data:`STAGE_ENDS` (stage 0..3, shapes :data:`STAGE_SHAPES`), as :meth:`IRNet.forward`'s."""
        if chips.dim() != 4 or chips.shape[1] != 3:
            raise ValueError(f"FaceApiJudge.forward expects chips (B, 3, 150, 150) in [0, 255], "
                             f"got {tuple(chips.shape)}")  # fmt: skip
        x = (chips.float() - self.mean_rgb) / 256.0
        x = F.max_pool2d(self.conv32_down(x), 3, 2)
        stage = 0
        for name, block in self.blocks.items():
            x = block(x)
            if inject is not None and stage < len(STAGE_ENDS) and name == STAGE_ENDS[stage]:
                x = inject(stage, x)
                stage += 1
        return x.mean(dim=(2, 3)) @ self.fc

    def warp(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, in_size, in_size) RGB in [-1, 1] -> dlib chips (B, 3, 150, 150) RGB in [0, 255] (bilinear)."""
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (self.in_size, self.in_size):
            raise ValueError(f"FaceApiJudge expects ArcFace-aligned RGB images (B, 3, {self.in_size}, {self.in_size}) "
                             f"in [-1, 1], got {tuple(images.shape)}")  # fmt: skip
        if not images.is_floating_point():
            raise TypeError(f"FaceApiJudge expects floating images in [-1, 1], got {images.dtype}")
        x = (images.float() + 1.0) * 127.5
        grid = self.grid.to(x.device).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def embed(self, images: torch.Tensor, inject=None) -> torch.Tensor:
        """(B, 3, 112, 112) RGB in [-1, 1] -> raw descriptors (B, 128); ``inject`` as in :meth:`forward`."""
        return self(self.warp(images), inject)


# ------------------------------------------------------------------------------------------------ weights
_DTYPES = {"float32": np.float32, "int32": np.int32}
_QUANT_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "float16": np.float16}


def _manifest_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise CheckpointError(f"face-api.js weights not found: {p} (expected a directory holding {MANIFEST_NAME})")
    if (p / MANIFEST_NAME).is_file():
        return p / MANIFEST_NAME
    raise CheckpointError(f"{p} has no {MANIFEST_NAME} (face-api.js FaceRecognitionNet weights)")


def read_manifest(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a tfjs weights manifest and its shards into ``{name: float32 tensor}`` (dequantised).

    path: the manifest file, or the directory holding ``face_recognition_model-weights_manifest.json``. The
    manifest is a JSON list of weight groups ``{"paths": [shard files, concatenated in order], "weights": [{"name",
    "shape", "dtype", "quantization"?: {"dtype": "uint8"|"uint16"|"float16", "scale", "min"}}]}``; a quantised
    value is ``q * scale + min`` (float16: stored as is). Raises CheckpointError naming the problem on a missing or
    unreadable file, a malformed manifest, a shard of the wrong length, or a non-finite value.
    """
    mpath = _manifest_path(path)
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read manifest {mpath}: {type(exc).__name__}: {exc}") from None
    if not isinstance(manifest, list) or not manifest:
        raise CheckpointError(f"{mpath}: expected a non-empty JSON list of weight groups")
    root = mpath.parent.resolve()
    out: dict[str, torch.Tensor] = {}
    for gi, group in enumerate(manifest):
        where = f"{mpath} group {gi}"
        if not isinstance(group, dict) or not all(isinstance(group.get(k), list) for k in ("paths", "weights")):
            raise CheckpointError(f"{where}: expected {{'paths': [...], 'weights': [...]}}")
        blobs = []
        for rel in group["paths"]:
            if not isinstance(rel, str) or not rel:
                raise CheckpointError(f"{where}: shard path {rel!r} is not a file name")
            shard = (root / rel).resolve()
            if root not in shard.parents:  # a manifest must not reach outside its own directory
                raise CheckpointError(f"{where}: shard {rel!r} lies outside {root}")
            try:
                blobs.append(shard.read_bytes())
            except OSError as exc:
                raise CheckpointError(f"{where}: cannot read shard {rel!r}: {exc.strerror or exc}") from None
        data = b"".join(blobs)
        offset = 0
        for w in group["weights"]:
            name, shape, dtype = (w.get("name"), w.get("shape"), w.get("dtype")) if isinstance(w, dict) else (None,) * 3
            shape_ok = isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)
            if not isinstance(name, str) or not shape_ok:
                raise CheckpointError(f"{where}: malformed weight entry {w!r}")
            if name in out:
                raise CheckpointError(f"{where}: weight {name!r} appears twice")
            if dtype not in _DTYPES:
                raise CheckpointError(f"{where}: weight {name!r} has unsupported dtype {dtype!r}")
            q = w.get("quantization")
            if q is not None:
                qd = q.get("dtype") if isinstance(q, dict) else None
                if qd not in _QUANT_DTYPES:
                    raise CheckpointError(f"{where}: weight {name!r} has unsupported quantization {q!r}")
                store = np.dtype(_QUANT_DTYPES[qd])
            else:
                store = np.dtype(_DTYPES[dtype])
            n = math.prod(shape)
            nbytes = n * store.itemsize
            if offset + nbytes > len(data):
                raise CheckpointError(f"{where}: shard data ends at byte {len(data)} inside weight {name!r} "
                                      f"(needs bytes {offset}..{offset + nbytes}): truncated or corrupt")  # fmt: skip
            arr = np.frombuffer(data, dtype=store.newbyteorder("<"), count=n, offset=offset).astype(np.float64)
            offset += nbytes
            if q is not None and q["dtype"] != "float16":
                try:
                    scale, vmin = float(q["scale"]), float(q["min"])
                except (KeyError, TypeError, ValueError):
                    raise CheckpointError(f"{where}: weight {name!r} quantization lacks numeric scale/min") from None
                arr = arr * scale + vmin
            if not np.isfinite(arr).all():
                raise CheckpointError(f"{where}: weight {name!r} holds non-finite values: corrupt")
            out[name] = torch.from_numpy(arr.astype(np.float32).reshape(shape))
        if offset != len(data):
            raise CheckpointError(f"{where}: {len(data) - offset} bytes left over after the last weight: the shards "
                                  "do not match the manifest")  # fmt: skip
    return out


def _state_from_manifest(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map manifest names (TF layouts: conv filters HWIO) to FaceApiJudge's state dict (conv weights OIHW)."""
    state: dict[str, torch.Tensor] = {}

    def conv_scale(prefix: str, module: str) -> None:
        for src, dst, tf_filter in (("conv/filters", "conv.weight", True), ("conv/bias", "conv.bias", False),
                                    ("scale/weights", "scale_weight", False), ("scale/biases", "scale_bias", False)):  # fmt: skip
            key = f"{prefix}/{src}"
            if key in weights:
                t = weights[key]
                state[f"{module}.{dst}"] = t.permute(3, 2, 0, 1).contiguous() if tf_filter and t.dim() == 4 else t

    conv_scale("conv32_down", "conv32_down")
    for name, *_ in _BLOCKS:
        conv_scale(f"{name}/conv1", f"blocks.{name}.conv1")
        conv_scale(f"{name}/conv2", f"blocks.{name}.conv2")
    if "fc" in weights:
        state["fc"] = weights["fc"]
    return state


def _expected_manifest_names() -> set[str]:
    names = {"fc"}
    for prefix in ["conv32_down"] + [f"{b}/conv{i}" for b, *_ in _BLOCKS for i in (1, 2)]:
        names |= {f"{prefix}/conv/filters", f"{prefix}/conv/bias", f"{prefix}/scale/weights", f"{prefix}/scale/biases"}
    return names


def faceapi_dir(explicit: str | Path | None = None) -> Path:
    """The face-api.js weights folder: ``explicit`` if given, else ``$PPFR_FACEAPI_DIR``, else the first
    ``shared/models/faceapi`` in the current directory or a folder above it, else the same from the installed
    package's location (so any working directory inside or beside the checkout finds the shared data).

    An explicit or environment value is used as given: if it is not a folder, CheckpointError says so rather than
    quietly reading other weights. When nothing is found, CheckpointError lists what was tried.
    """
    import os

    if explicit:
        if not Path(explicit).is_dir():
            raise CheckpointError(f"face-api.js weights folder {str(explicit)!r} not found")
        return Path(explicit)
    env = os.environ.get(FACEAPI_DIR_ENV)
    if env:
        if not Path(env).is_dir():
            raise CheckpointError(f"face-api.js weights folder {env!r} (${FACEAPI_DIR_ENV}) not found")
        return Path(env)
    starts = [Path.cwd().resolve(), Path(__file__).resolve().parent]
    for start in starts:
        for d in (start, *start.parents):
            if (d / SHARED_FACEAPI).is_dir():
                return d / SHARED_FACEAPI
    # no hint here: each caller names its own option (--judge-dir, transfer.source_dir, ...)
    raise CheckpointError(f"face-api.js weights not found: ${FACEAPI_DIR_ENV} is not set, and no {SHARED_FACEAPI} "
                          f"is in {starts[0]}, {starts[1]} or a folder above either")  # fmt: skip


def load_faceapi_judge(path_dir: str | Path, device: str | torch.device = "cpu") -> FaceApiJudge:
    """Build the judge from a face-api.js ``face_recognition_model`` directory (or its manifest file).

    Returns the FaceApiJudge in eval mode with gradients off. Raises CheckpointError on missing/corrupt files or
    weights that do not fit the network (the message names the weights).
    """
    weights = read_manifest(path_dir)
    expected = _expected_manifest_names()
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path_dir}: not FaceRecognitionNet weights (missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]})")  # fmt: skip
    judge = FaceApiJudge()
    state = _state_from_manifest(weights)
    own = judge.state_dict()
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{path_dir}: weight shapes do not fit FaceRecognitionNet: {bad[:4]}")
    judge.load_state_dict(state, strict=True)
    judge.requires_grad_(False)
    return judge.to(device).eval()
