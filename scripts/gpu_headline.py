"""The headline numbers of a GPU run (issue 27), measured first, right after the build.

1. the device, and which ONNX Runtime execution providers exist;
2. a device-to-device copy of 1 GiB: the bandwidth ceiling of this run (GB/s counts bytes read + written);
3. ``freq_encode`` of all 192 channels and of PartialFace's 27 per-sample ranks, B = 64 and 256, per backend
   (cuda, triton, torch): each output is checked against the float64 reference first (the tests' rule: error at
   most 2x the float32 reference's own error + 1e-6 of the output's scale), then timed; time, GB/s (image read +
   coefficients written), share of the copy above and of the datasheet peak;
4. one PartialFace IR-50 training step at batch 128, as the trainer runs it (forward, backward, SGD), with the
   fused kernels (``PPFR_BACKEND=auto``) against the unfused reference path (``ref``) and the PyTorch path
   (``torch``), float32 and bf16 autocast: images/s, the client side (``protect``) alone, peak GPU memory.

    python scripts/gpu_headline.py OUT.json              # needs a CUDA device
    python scripts/gpu_headline.py OUT.json --dry-run    # CPU, tiny sizes: checks this script's logic in CI

OUT.json is rewritten after every measurement, so a run stopped by ``timeout`` (SIGINT or SIGTERM) keeps what it
measured and says where it stopped (``"interrupted"``). Exit status: 0 when every part ran and every checked output
was correct, 1 otherwise, 124 when interrupted. Run from the repository root (configs are read from there).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from ppfr import _backend
from ppfr.methods import build_method
from ppfr.ops.freq import freq_encode, freq_encode_ref
from ppfr.ops.sample_ranks import sample_ranks
from ppfr.train.config import load_config
from ppfr.train.trainer import Trainer, build_head, build_optimizer

ROOT = Path(__file__).resolve().parents[1]
H = W = 112
# HBM datasheet peaks (GB/s), matched against the device name in this order (the most specific name first)
DATASHEET_GBS = (("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0),
                 ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0), ("L40S", 864.0))  # fmt: skip
REL_SLACK_F32 = 1e-6  # tests/_tolerance.py's float32 slack, relative to the output's scale


class Interrupted(Exception):
    """Raised from the SIGINT/SIGTERM handler: ``timeout`` stopped the run."""


def _on_signal(signum, frame):  # noqa: ARG001 - the signal handler signature
    raise Interrupted(signal.Signals(signum).name)


class Headline:
    """The results dict, saved atomically after every measurement."""

    def __init__(self, path: Path, dry_run: bool) -> None:
        self.path = path
        self.dry = dry_run
        self.dev = torch.device("cpu" if dry_run else "cuda")
        self.backends = ("cpp", "torch") if dry_run else ("cuda", "triton", "torch")
        self.r: dict = {"dry_run": dry_run, "complete": False, "interrupted": None, "errors": {}}
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.r, indent=1, default=str))
        os.replace(tmp, self.path)

    def put(self, part: str, key: str, value) -> None:
        self.r.setdefault(part, {})[key] = value
        self.save()
        print(f"[headline] {part} {key}: {json.dumps(value, default=str)[:300]}", flush=True)

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def median_s(self, fn: Callable[[], object], rep_ms: int = 200) -> float:
        """Median seconds per call: Triton's do_bench on a GPU (CUDA events, L2 cleared before every call, so
        inputs come from DRAM); the median of 3 wall-clock calls on the CPU."""
        if self.dev.type == "cuda":
            from triton.testing import do_bench

            return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median") / 1e3
        fn()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[1]

    def images(self, b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, 112, 112) random RGB in [-1, 1], (B,) labels and PartialFace's (B, 27) ranks, on the device."""
        g = torch.Generator().manual_seed(seed)
        x = (torch.rand(b, 3, H, W, generator=g) * 2 - 1).to(self.dev)
        y = torch.randint(0, 1000, (b,), generator=g).to(self.dev)
        ranks = sample_ranks(y, generator=torch.Generator().manual_seed(seed + 1), device=self.dev).channels
        return x, y, ranks

    # -------------------------------------------------------------------------------------------------- parts
    def device(self) -> None:
        d: dict = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "gpu_backends": _backend.gpu_status()}
        try:
            import triton

            d["triton"] = triton.__version__
        except ImportError as exc:
            d["triton"] = repr(exc)
        if self.dev.type == "cuda":
            p = torch.cuda.get_device_properties(0)
            name = torch.cuda.get_device_name(0)
            clk, bus = getattr(p, "memory_clock_rate", None), getattr(p, "memory_bus_width", None)
            d.update(name=name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                     memory_gib=round(p.total_memory / 2**30, 1),
                     datasheet_gb_per_s=next((v for k, v in DATASHEET_GBS if k in name), None),
                     props_gb_per_s=round(2 * clk * 1e3 * bus / 8 / 1e9, 1) if clk and bus else None)  # fmt: skip
        else:
            d["name"] = "cpu (dry run)"
        self.r["device"] = d
        try:
            import onnxruntime as ort

            self.r["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
        except Exception as exc:  # noqa: BLE001 - reported: the image may lack it
            self.r["onnxruntime"] = {"error": repr(exc)[:300]}
        self.save()

    def copy(self) -> None:
        n = (1 << 18) if self.dry else (1 << 28)  # float32 elements: 1 GiB each way on the GPU
        src = torch.rand(n, device=self.dev)
        dst = torch.empty_like(src)
        t = self.median_s(lambda: dst.copy_(src))
        gbs = 2 * n * 4 / t / 1e9
        peak = self.r["device"].get("datasheet_gb_per_s")
        self.r["copy"] = {"bytes": 2 * n * 4, "ms": round(t * 1e3, 4), "gb_per_s": round(gbs, 1),
                          "of_datasheet": round(gbs / peak, 3) if peak else None}  # fmt: skip
        self.save()

    def freq_encode(self) -> None:
        copy_gbs = self.r.get("copy", {}).get("gb_per_s")
        peak = self.r["device"].get("datasheet_gb_per_s")
        for b in (2,) if self.dry else (64, 256):
            x, _, ranks = self.images(b, seed=b)
            for name, ch, k in (("all192", None, 192), ("ranks27", ranks, 27)):
                ref64 = freq_encode_ref(x.double(), ch)
                scale = float(ref64.abs().max())
                base = float((freq_encode_ref(x, ch).double() - ref64).abs().max())  # the reference's own fp32 error
                bound = 2 * base + REL_SLACK_F32 * scale
                for be in self.backends:
                    key = f"B{b}/{name}/{be}"
                    reason = _backend.unavailable_reason(be, self.dev)
                    if reason is not None:
                        self.put("freq_encode", key, {"unavailable": reason})
                        continue
                    try:
                        err = float((freq_encode(x, ch, backend=be).double() - ref64).abs().max())
                        row = {"correct": err <= bound, "max_abs_err": err, "bound": bound}
                        t = self.median_s(lambda x=x, be=be, ch=ch: freq_encode(x, ch, backend=be))
                        gbs = (b * k + b * 3) * H * W * 4 / t / 1e9  # coefficients written + image read
                        row.update(ms=round(t * 1e3, 4), gb_per_s=round(gbs, 1),
                                   of_copy=round(gbs / copy_gbs, 3) if copy_gbs else None,
                                   of_datasheet=round(gbs / peak, 3) if peak else None)  # fmt: skip
                    except Interrupted:
                        raise
                    except Exception as exc:  # noqa: BLE001 - one backend's failure must not hide the others
                        row = {"correct": False, "error": repr(exc)[:400]}
                    self.put("freq_encode", key, row)
                del ref64
            del x, ranks
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()

    def train(self) -> None:
        config = ROOT / "configs" / ("partialface_tiny.yaml" if self.dry else "partialface_ir50.yaml")
        b, warm, steps = (2, 1, 1) if self.dry else (128, 2, 5)
        self.r.setdefault("train_partialface", {}).update(config=config.name, batch=b, timed_steps=steps)
        for amp in ("none", "bf16"):
            for path, env in (("fused", "auto"), ("ref", "ref"), ("torch", "torch")):
                key = f"{'float32' if amp == 'none' else amp}/{path}"
                os.environ["PPFR_BACKEND"] = env  # read by every op at every call (auto only)
                try:
                    self.put("train_partialface", key, self._train_one(config, b, warm, steps, amp))
                except Interrupted:
                    raise
                except Exception as exc:  # noqa: BLE001
                    self.put(
                        "train_partialface", key, {"error": repr(exc)[:400], "trace": traceback.format_exc()[-800:]}
                    )
                finally:
                    os.environ.pop("PPFR_BACKEND", None)
                    if self.dev.type == "cuda":
                        torch.cuda.empty_cache()
        t = self.r["train_partialface"]
        for amp in ("float32", "bf16"):
            fused = t.get(f"{amp}/fused", {}).get("img_per_s")
            for base in ("ref", "torch"):
                other = t.get(f"{amp}/{base}", {}).get("img_per_s")
                t[f"{amp}/speedup_fused_vs_{base}"] = round(fused / other, 3) if fused and other else None
        self.save()

    def _train_one(self, config: Path, b: int, warm: int, steps: int, amp: str) -> dict:
        out_dir = tempfile.mkdtemp(prefix="ppfr_headline_")
        cfg = load_config(
            config, [f"out_dir={out_dir}", f"data.batch_size={b}", f"device={self.dev.type}", f"amp={amp}"]
        )
        trainer = Trainer(cfg, quiet=True)
        torch.manual_seed(0)
        method = build_method(cfg.method, **cfg.method_options).to(self.dev)
        stage = method.stages()[-1].name
        method.set_stage(stage)
        method.train()
        head = build_head(cfg, cfg.data.num_classes, method.options.embedding_size).to(self.dev)
        opt = build_optimizer(method, head, cfg)
        g = torch.Generator().manual_seed(1)
        x = (torch.rand(b, 3, H, W, generator=g) * 2 - 1).to(self.dev)
        y = torch.randint(0, cfg.data.num_classes, (b,), generator=g).to(self.dev)
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for s in range(warm):
            trainer.train_step(method, head, opt, stage, x, y, s)
        self.sync()
        t0 = time.perf_counter()
        for s in range(steps):
            loss = trainer.train_step(method, head, opt, stage, x, y, warm + s)
        self.sync()
        dt = (time.perf_counter() - t0) / steps
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.dev.type == "cuda" else None

        def protect():
            with torch.no_grad(), torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                return method.protect(x, labels=y, generator=torch.Generator().manual_seed(0))

        tp = self.median_s(protect, rep_ms=100)
        return {"img_per_s": round(b / dt, 1), "step_ms": round(dt * 1e3, 2), "protect_ms": round(tp * 1e3, 3),
                "peak_memory_gib": round(peak, 2) if peak is not None else None, "loss": float(loss)}  # fmt: skip

    def run(self) -> int:
        for part in (self.device, self.copy, self.freq_encode, self.train):
            t0 = time.time()
            try:
                part()
            except Interrupted as exc:
                self.r["interrupted"] = f"{exc} during {part.__name__}"
                self.save()
                print(f"[headline] interrupted ({exc}) during {part.__name__}; partial results kept", flush=True)
                return 124
            except Exception as exc:  # noqa: BLE001 - recorded; the next part still runs
                self.r["errors"][part.__name__] = traceback.format_exc()[-1500:]
                print(f"[headline] {part.__name__} failed: {exc!r}", flush=True)
            self.r.setdefault("seconds", {})[part.__name__] = round(time.time() - t0, 1)
            self.save()
        self.r["complete"] = True
        self.save()
        rows = list(self.r.get("freq_encode", {}).values()) + [
            v for v in self.r.get("train_partialface", {}).values() if isinstance(v, dict)
        ]
        bad = any(row.get("correct") is False or "error" in row for row in rows)
        return 1 if bad or self.r["errors"] else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="the JSON file to write (rewritten after every measurement)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the logic, measure nothing")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_headline: torch sees no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        return 3
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    return Headline(args.out, args.dry_run).run()


if __name__ == "__main__":
    sys.exit(main())
