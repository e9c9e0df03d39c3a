"""Launch-device selection of the GPU backends, checked without a GPU.

The tensors are FakeTensors on ``cuda:1`` (shape/device metadata only), ``torch.cuda.device`` is replaced by a
recorder of the device made current, and every Triton kernel by a recorder of the device current at its launch.
A launcher that forgot its device guard (e.g. ``with torch.device(x.device)``, which does not change the current
CUDA device) records None and fails here.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ppfr import _backend, _ext

pytest.importorskip("triton")

DEV = torch.device("cuda", 1)


class _CudaDeviceRecorder:
    """Stand-in for torch.cuda.device: tracks the 'current device' that a real guard would set."""

    current: int | None = None

    def __init__(self, device) -> None:
        self.index = device.index if isinstance(device, torch.device) else int(device)

    def __enter__(self) -> None:
        self.prev, _CudaDeviceRecorder.current = _CudaDeviceRecorder.current, self.index

    def __exit__(self, *exc) -> None:
        _CudaDeviceRecorder.current = self.prev


class _KernelRecorder:
    """Stand-in for a Triton kernel: records the current device at each launch."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, _CudaDeviceRecorder.current, grid))

        return launch


def _patch_kernels(monkeypatch, module, log: list) -> None:
    kernels = {id(spec[0]) for spec in module.AOT_SPECS.values()}
    for name, obj in list(vars(module).items()):
        if id(obj) in kernels:
            monkeypatch.setattr(module, name, _KernelRecorder(name, log))


def _f(*shape, dtype=torch.float32, device=DEV):
    return torch.empty(*shape, dtype=dtype, device=device)


def _cases(device=DEV):
    """(module, launcher, positional args builder) for every Triton launcher; tensors on ``device``."""
    b, c, h, w, k = 2, 3, 10, 12, 5

    def f(*shape, dtype=torch.float32):
        return _f(*shape, dtype=dtype, device=device)

    return [
        ("freq", "freq_encode_triton", lambda: (f(b, 3, h, w), f(b, k, h, w), f(b, k, dtype=torch.int64),
                                                f(3, h, dtype=torch.int32), f(8, 3, h), f(3, w, dtype=torch.int32),
                                                f(8, 3, w), f(3, 4))),
        ("freq", "freq_decode_triton", lambda: (f(b, k, h, w), f(b, 3, h, w), f(b, 192, dtype=torch.int64),
                                                f(2, h, dtype=torch.int32), f(8, 2, h), f(2, w, dtype=torch.int32),
                                                f(8, 2, w), f(3, 4))),
        ("freq", "freq_hflip_triton", lambda: (f(b, k, h, w), f(b, k, h, w), f(b, k))),
        ("block_shuffle", "block_shuffle_triton", lambda: (f(b, c, h, w), f(b, c, h, w),
                                                           f(30, c, dtype=torch.int64), 2, 2)),
        ("block_shuffle", "quantize_triton", lambda: (f(b, c, h, w), f(b, c, h * w, dtype=torch.uint8), f(b, c), 8)),
        ("block_shuffle", "dequantize_triton", lambda: (f(b, c, h * w, dtype=torch.uint8), f(b, c), f(b, c, h, w), 8)),
        ("blur", "median_blur_triton", lambda: (f(b, c, h, w), f(b, c, h, w), 3)),
        ("roi_mask", "roi_mask_triton", lambda: (f(b, 6, 4, dtype=torch.float64), f(b, 4, dtype=torch.float64),
                                                 f(b, 1, h, w), f(b, h, dtype=torch.int32))),
        ("feature_mask_fuse", "mask_fuse_fwd_triton", lambda: (f(b, c, h, w), f(b, 4, h, w), f(b, 1, h, w), f(1),
                                                               f(b, c, h, w), f(b, 1, h, w), f(b), 1e-6)),
        ("feature_mask_fuse", "mask_fuse_bwd_triton", lambda: (f(b, c, h, w), f(b, c, h, w), f(b, 1, h, w),
                                                               f(b, 1, h, w), f(b), f(1), f(b, c, h, w),
                                                               f(b, 4, h, w), 4)),
        ("feature_mask_fuse", "residual_fuse_fwd_triton", lambda: (f(b, c, h, w), f(b, c, h, w), f(c, h, w),
                                                                   f(b, c, h, w))),
        ("feature_mask_fuse", "residual_fuse_bwd_triton", lambda: (f(b, c, h, w), f(b, c, h, w), f(b, c, h, w),
                                                                   f(c, h, w), f(b, c, h, w), f(b, c, h, w),
                                                                   f(c, h, w))),
    ]  # fmt: skip


_IDS = [case[1] for case in _cases()]


@pytest.mark.parametrize("case", range(len(_IDS)), ids=_IDS)
@pytest.mark.parametrize("chunked", [False, True], ids=["default-tiles", "multi-chunk"])
def test_triton_launch_runs_on_the_inputs_device(monkeypatch, case, chunked):
    mod_name, launcher, args = _cases()[case]
    module = importlib.import_module(f"ppfr.kernels.{mod_name}")
    if chunked:  # several groups/chunks: launchers that sum partials on the device do it inside the guard
        monkeypatch.setenv("PPFR_TRITON_CHUNK", "4")
        monkeypatch.setenv("PPFR_TRITON_TILE", "4x8")
    log: list = []
    _patch_kernels(monkeypatch, module, log)
    monkeypatch.setattr(torch.cuda, "device", _CudaDeviceRecorder)
    with FakeTensorMode():
        getattr(module, launcher)(*args())
    assert log, f"{launcher} launched no kernel"
    assert [dev for _, dev, _ in log] == [1] * len(log), f"{launcher} launched outside cuda:1: {log}"
    assert _CudaDeviceRecorder.current is None  # the guard was left


@pytest.mark.parametrize("case", range(len(_IDS)), ids=_IDS)
def test_triton_launch_rejects_tensors_on_two_devices(monkeypatch, case):
    mod_name, launcher, _ = _cases()[case]
    module = importlib.import_module(f"ppfr.kernels.{mod_name}")
    log: list = []
    _patch_kernels(monkeypatch, module, log)
    monkeypatch.setattr(torch.cuda, "device", _CudaDeviceRecorder)
    with FakeTensorMode():
        args = list(_cases(DEV)[case][2]())
        other = list(_cases(torch.device("cuda", 0))[case][2]())
        idx = len(args) - 1 - next(i for i, a in enumerate(reversed(args)) if isinstance(a, torch.Tensor))
        args[idx] = other[idx]  # the last tensor argument (an output or table) on another GPU
        with pytest.raises(ValueError, match="all tensors must be on one device, got cuda:0, cuda:1"):
            getattr(module, launcher)(*args)
    assert not log


def test_device_error_names_the_op(monkeypatch):
    from ppfr.kernels import freq

    monkeypatch.setattr(torch.cuda, "device", _CudaDeviceRecorder)
    with FakeTensorMode():
        f0 = _f(1, 2, 4, 4, device=torch.device("cuda", 0))
        with pytest.raises(ValueError, match=r"freq_hflip: all tensors must be on one device, got cuda:0, cuda:1"):
            freq.freq_hflip_triton(f0, _f(1, 2, 4, 4), _f(1, 2))


def test_cuda_launch_args_pass_the_tensors_device_and_its_current_stream(monkeypatch):
    seen = []

    class _Stream:
        def __init__(self, index):
            seen.append(index)
            self.cuda_stream = 0x1000 + index

    monkeypatch.setattr(torch.cuda, "current_stream", _Stream)
    with FakeTensorMode():
        x, out = _f(1, 3, 8, 8), _f(1, 5, 8, 8)
        assert _ext.cuda_stream_and_device("freq_encode", x, out) == (0x1001, 1)
        assert seen == [1]
        with pytest.raises(ValueError, match="freq_encode: all tensors must be on one device"):
            _ext.cuda_stream_and_device("freq_encode", x, _f(1, 5, 8, 8, device=torch.device("cuda", 0)))
    with pytest.raises(ValueError, match="median_blur: the cuda backend needs CUDA tensors"):
        _ext.cuda_stream_and_device("median_blur", torch.zeros(2))


def test_cuda_module_takes_device_and_fails_cleanly_without_gpu():
    mod, reason = _ext.load("_C_cuda")
    if mod is None:
        pytest.skip(reason)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the driverless error path is not reachable")
    # The binding takes the device index after the stream (default -1: the output's device); without a driver
    # the device query fails and the error names the launcher.
    with pytest.raises(RuntimeError, match="freq_decode_cuda"):
        mod.freq_decode(0, 0, 1, 8, 8, 1, 0, 0, 0, 0, 0, 0, 0, 1)
    with pytest.raises(RuntimeError, match="median_blur_cuda"):
        mod.median_blur(0, 0, 1, 1, 8, 8, 3, 0, 0, device=1)


def test_auto_picks_a_gpu_backend_only_with_a_cuda_device(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.delenv("PPFR_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _backend.resolve("freq_encode", "auto", cuda, ("torch", "triton", "cuda")) == "torch"
    with pytest.raises(_backend.BackendUnavailableError, match="no CUDA device"):
        _backend.resolve("freq_encode", "triton", cuda, ("torch", "triton"))
    assert "no CUDA device" in _backend.gpu_status()["triton"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _backend.resolve("freq_hflip", "auto", cuda, ("torch", "triton")) == "triton"
    # CPU tensors never go to a GPU backend under auto, even with the interpreter on
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.resolve("freq_hflip", "auto", torch.device("cpu"), ("torch", "triton")) == "torch"


def test_float64_is_never_silently_downgraded_on_gpu_backends(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.delenv("PPFR_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    impl = ("torch", "triton", "cuda")
    with pytest.raises(_backend.DtypeUnsupportedError, match="freq_encode: backend 'triton' refuses torch.float64"):
        _backend.resolve("freq_encode", "triton", cuda, impl, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32"):
        _backend.resolve("freq_encode", "cuda", cuda, impl, dtype=torch.float64)
    assert _backend.resolve("freq_encode", "auto", cuda, impl, dtype=torch.float64) == "torch"
    monkeypatch.setenv("PPFR_BACKEND", "triton")  # an override that would downgrade falls back to auto
    assert _backend.resolve("freq_encode", "auto", cuda, impl, dtype=torch.float64) == "torch"
    assert _backend.resolve("freq_encode", "auto", cuda, impl, dtype=torch.float32) == "triton"


@pytest.mark.parametrize("launcher", ["freq_hflip_triton", "residual_fuse_fwd_triton"])
def test_float32_kernels_refuse_float64_tensors(launcher):
    module = importlib.import_module("ppfr.kernels.freq" if "freq" in launcher else "ppfr.kernels.feature_mask_fuse")
    t = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    args = (t, t, torch.ones(1, 2, dtype=torch.float64)) if "freq" in launcher else (t, t, t[0], t)
    with pytest.raises(TypeError, match="computes in float32, got a torch.float64"):
        getattr(module, launcher)(*args)
