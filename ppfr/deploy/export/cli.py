"""``ppfr export CHECKPOINT --format onnx|tensorrt|triton``: deployable graphs of a trained (or untrained) model.

CHECKPOINT is a model spec (:mod:`ppfr.methods.spec`): a ``runs/<name>/model.pt``, a run folder holding one, or
``method:NAME[:key=value,...]`` (untrained defaults, the one fixed seed of every verb). Outputs go to ``--out``
(default: ``export/`` next to the model.pt, ``runs/export/<method>`` for ``method:``):

* ``onnx``      ``<out>/<part>.onnx``, checked for parity against eager PyTorch with ONNX Runtime (unless
                ``--no-verify``)
* ``tensorrt``  the ONNX file plus ``<out>/<part>.engine`` and its ``<part>.engine.json`` sidecar, with a timing
                cache ``<out>/timing.cache`` (needs TensorRT and a CUDA GPU)
* ``triton``    ``<out>`` is a Triton model repository (default ``export/triton`` next to the checkpoint):
                ``<out>/<model>/config.pbtxt`` + ``<out>/<model>/1/model.onnx`` (or ``model.plan`` with
                ``--triton-platform tensorrt_plan``); the intermediate files are temporary

Exit status 0 on success, 1 when the parity check fails, 2 on a usage, export or backend error (the message says
what is missing).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def _default_out(checkpoint: str, fmt: str) -> Path:
    """``export/`` beside the model.pt (a run folder's too), ``runs/export/<method>`` for ``method:``; SpecError
    for a spec that names nothing."""
    from ppfr.methods.spec import parse_model_spec

    src = parse_model_spec(checkpoint)
    base = Path("runs") / "export" / src.name if src.path is None else src.path.parent / "export"
    return base / "triton" if fmt == "triton" else base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ppfr export", description="export a model to ONNX / TensorRT / Triton")
    ap.add_argument("checkpoint", help="runs/<name>/model.pt, a run folder, or method:NAME[:key=value,...] (untrained, "
                                       "fixed seed)")
    ap.add_argument("--format", required=True, choices=["onnx", "tensorrt", "triton"])
    ap.add_argument("--out", default=None, help="output directory (default: export/ next to the checkpoint)")
    ap.add_argument("--part", default="server", choices=["server", "client"],
                    help="server model (payload -> embedding) or the client network (duetface, profacec)")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"])
    ap.add_argument("--fp16", action="store_true", help="TensorRT: allow FP16 kernels (I/O stays float32)")
    ap.add_argument("--min-batch", type=int, default=1)
    ap.add_argument("--opt-batch", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--triton-platform", default="onnxruntime_onnx", choices=["onnxruntime_onnx", "tensorrt_plan"])
    ap.add_argument("--model-name", default=None, help="Triton model name (default: <method>_<part>)")
    ap.add_argument("--instances", type=int, default=1, help="Triton instance_group count")
    ap.add_argument("--max-queue-delay-us", type=int, default=500, help="Triton dynamic batching queue delay")
    ap.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime parity check")
    args = ap.parse_args(argv)
    try:
        out = Path(args.out) if args.out else _default_out(args.checkpoint, args.format)
    except ValueError as exc:  # SpecError: the spec names no model
        print(f"ppfr export: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ppfr-export-") as tmp:
        return _run(args, out, Path(tmp))


def _run(args: argparse.Namespace, out: Path, tmp: Path) -> int:
    from ppfr._backend import BackendUnavailableError
    from ppfr.deploy.export.onnx import ExportError, export_onnx, load_source, verify_parity
    from ppfr.models.checkpoints import CheckpointError

    try:
        if not 1 <= args.min_batch <= args.opt_batch <= args.max_batch:
            raise ValueError(f"need 1 <= --min-batch <= --opt-batch <= --max-batch, got "
                             f"{args.min_batch}, {args.opt_batch}, {args.max_batch}")  # fmt: skip
        if args.format == "tensorrt" or (args.format == "triton" and args.triton_platform == "tensorrt_plan"):
            from ppfr.deploy.export.tensorrt import tensorrt_unavailable_reason

            reason = tensorrt_unavailable_reason(need_gpu=True)  # fail before the (slow) export, not after
            if reason is not None:
                raise BackendUnavailableError(reason)
        method, info = load_source(args.checkpoint)
        onnx_dir = out if args.format != "triton" else tmp
        onnx_path = export_onnx(method, onnx_dir / f"{args.part}.onnx", part=args.part, opset=args.opset,
                                exporter=args.exporter, source=info["label"], source_sha256=info["sha256"])  # fmt: skip
        print(f"wrote {onnx_path} ({method.name} {args.part}, opset {args.opset}, {args.exporter} exporter)")
        if not args.no_verify:
            ok, lines = verify_parity(method, onnx_path, part=args.part)
            print("\n".join(lines[:-1] if not ok else lines))
            if not ok:
                print(f"ppfr export: {lines[-1]}", file=sys.stderr)
                return 1
        model_file = onnx_path
        if args.format == "tensorrt" or (args.format == "triton" and args.triton_platform == "tensorrt_plan"):
            from ppfr.deploy.export.tensorrt import build_engine

            engine_dir = out if args.format == "tensorrt" else onnx_dir
            model_file = build_engine(onnx_path, engine_dir / f"{args.part}.engine", fp16=args.fp16,
                                      min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch,
                                      timing_cache=engine_dir / "timing.cache")  # fmt: skip
            print(f"wrote {model_file} (+ {model_file.name}.json; batch {args.min_batch}..{args.max_batch}, "
                  f"{'fp16' if args.fp16 else 'fp32'})")  # fmt: skip
        if args.format == "triton":
            from ppfr.deploy.export.model_repository import write_triton_model

            model_dir = write_triton_model(
                model_file, out, args.model_name, max_batch_size=args.max_batch,
                preferred_batch_sizes=(args.opt_batch, args.max_batch), max_queue_delay_us=args.max_queue_delay_us,
                instance_count=args.instances,
            )  # fmt: skip
            print(f"wrote Triton model {model_dir} (repository {out})")
    except BackendUnavailableError as exc:
        print(f"ppfr export: {exc}", file=sys.stderr)
        return 2
    except (ExportError, CheckpointError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"ppfr export: {exc}", file=sys.stderr)
        return 2
    return 0
