"""A new method, end to end: docs/adding-a-method.md's checklist, followed for a toy method defined in this file,
is all it takes for ``ppfr train``, ``eval``, ``attack``, ``export`` and ``serve`` to run it.

The toy method: the client sends 6 block-DCT channels of the face in one of two secret orders (a linear payload
with a declared operator, so the inversion attack applies); the server is a two-layer conv net with a 16-d
embedding. Faces are synthetic identities written to a temporary folder (no shared data, no downloaded weights:
the attacks' judge is the toy model itself). Every verb runs through ``ppfr.cli.main`` exactly as the ``ppfr``
script runs it; ``ppfr serve`` runs in its own process, which finds the toy method the way an installed plugin is
found: an entry point of the group ``ppfr.methods`` (a ``.dist-info`` folder on its PYTHONPATH) names a module that
registers it. In this process the method is registered for this file's tests only (other tests count the methods).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import ppfr.methods.base
from ppfr.methods import FreqPayloadOperator, Method, MethodOptions, Payload, Stage, TensorSpec, register_method
from ppfr.ops.freq import freq_encode

from tests._faces import write_faces

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "toy-token-0123456789"

pytestmark = pytest.mark.timeout(240)


# ------------------------------------------------------------------------------------------ the toy method
@dataclass(frozen=True)
class ToyOptions(MethodOptions):
    """1. The options: a frozen dataclass (YAML ``method_options`` load into it; unknown keys are errors)."""

    embedding_size: int = 16
    image_size: int = 112
    width: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {self.image_size}")


# The client's secret space: one of two orders of the same 6 channels (64 * colour + 8u + v) per image.
TOY_CHANNELS = torch.tensor([[0, 1, 8, 64, 128, 9], [9, 128, 64, 8, 1, 0]])


class ToyMethod(Method):  # 8. registered with register_method (here by the `registered` fixture below)
    name = "toy"
    Options = ToyOptions

    def __init__(self, options: ToyOptions) -> None:
        super().__init__(options)
        s, w, c = options.image_size, options.width, TOY_CHANNELS.shape[1]
        self.server = nn.Sequential(
            nn.Conv2d(c, w, 8, stride=8), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.Flatten(),
            nn.Linear(w * (s // 16) ** 2, options.embedding_size), nn.BatchNorm1d(options.embedding_size),
        )  # fmt: skip
        # 5. the payload spec: what crosses the wire, per sample (the server, the runners and export read it)
        self.payload_spec = {"dct": TensorSpec((c, s, s), torch.float32)}

    def protect(self, images, labels=None, generator=None) -> Payload:
        """2. The client side: (B, 3, S, S) in [-1, 1] -> Payload; the secret drawn from ``generator``, no host sync."""
        self.check_images(images)
        b = images.shape[0]
        if generator is not None:
            r = torch.randint(0, len(TOY_CHANNELS), (b,), generator=generator, device=generator.device)
        else:
            r = torch.randint(0, len(TOY_CHANNELS), (b,), device=images.device)
        rows = TOY_CHANNELS.to(images.device)[r.to(images.device, non_blocking=True)]
        return Payload(self.name, {"dct": freq_encode(images.float(), rows)})

    def recognize(self, payload: Payload) -> torch.Tensor:
        """3. The server side: this method's Payload only (checked) -> (B, D) raw embeddings."""
        self.check_payload(payload)
        return self.server(payload.tensors["dct"])

    def stages(self) -> tuple[Stage, ...]:
        """4. The training stages (each names the attributes it trains); training_step is the default margin step."""
        return (Stage("train", ("server",), "toy conv net on 6 DCT channels"),)

    def payload_operator(self) -> FreqPayloadOperator:
        """6. The payload is linear in the face: declare it (the inversion attack then applies)."""
        return FreqPayloadOperator("dct", TOY_CHANNELS.clone(), ("A", "B"))


@pytest.fixture(scope="module", autouse=True)
def registered():
    """``register_method(ToyMethod)`` into a copy of the registry, restored after this file's tests."""
    ppfr.methods.available_methods()  # the built-in ones register into the real registry first
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ppfr.methods.base, "_REGISTRY", dict(ppfr.methods.base._REGISTRY))
        register_method(ToyMethod)
        yield


# ------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """train/ (4 identities x 4 faces), val/ (4 x 2, identity-disjoint) and pairs.txt over val (2 folds)."""
    root = tmp_path_factory.mktemp("faces")
    write_faces(root / "train", [f"t{i}" for i in range(4)], 4, seed=1)
    write_faces(root / "val", [f"v{i}" for i in range(4)], 2, seed=2)
    lines = ["# fold same a b"]
    for fold, (a, b) in enumerate((("v0", "v1"), ("v2", "v3"))):
        lines += [f"{fold} 1 val/{a}/0.png val/{a}/1.png", f"{fold} 1 val/{b}/0.png val/{b}/1.png",
                  f"{fold} 0 val/{a}/0.png val/{b}/0.png", f"{fold} 0 val/{a}/1.png val/{b}/1.png"]  # fmt: skip
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    return root


def _config(root: Path, out: Path) -> Path:
    """7. The config YAML: ``method:`` names the registered method, ``method_options`` fill its Options."""
    path = root / "toy.yaml"
    path.write_text(f"""\
name: toy
method: toy
method_options: {{width: 8}}
data: {{source: {root / "train"}, backend: torch, batch_size: 8, num_workers: 0}}
epochs: 2
optim: {{lr: 0.05, warmup_steps: 0}}
checkpoint_every: 100
log_every: 100
progress: lines
eval: {{pairs: {root / "pairs.txt"}, before: true, after: true}}
out_dir: {out}
""")
    return path


@pytest.fixture(scope="module")
def model_pt(faces, tmp_path_factory) -> Path:
    """``ppfr train`` on the toy config: runs/toy/model.pt."""
    from ppfr.cli import main

    out = tmp_path_factory.mktemp("runs")
    assert main(["train", str(_config(faces, out))]) == 0
    path = out / "toy" / "model.pt"
    assert path.is_file()
    return path


# ------------------------------------------------------------------------------------------ the verbs
def test_train_and_eval(model_pt, faces, tmp_path, capsys):
    from ppfr.cli import main
    from ppfr.methods import load_method

    m = load_method(model_pt)
    assert type(m).__name__ == "ToyMethod" and m.options.width == 8
    log = (model_pt.parent / "metrics.csv").read_text().splitlines()
    assert log[0].startswith("stage,") and {ln.split(",")[0] for ln in log[1:]} == {"train"}
    assert main(["eval", str(model_pt), "--data", str(faces / "pairs.txt"), "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["model"]["method"] == "toy"
    assert 0.0 <= metrics["verification"]["accuracy"] <= 1.0 and metrics["verification"]["pairs"] == 8


def test_attack_every_kind(model_pt, faces, tmp_path):
    from ppfr.cli import main

    out = tmp_path / "attack"
    rc = main(["attack", str(model_pt), "--kind", "inversion,linkage,recovery", "--linkage-form", "adapter,insider",
               "--data", str(faces / "train"), "--val", str(faces / "pairs.txt"), "--judge", str(model_pt),
               "--out", str(out), "--steps", "2", "--batch-size", "4", "--width", "2", "--stem-width", "4",
               "--linkage-steps", "2", "--linkage-batch-size", "4", "--linkage-topk", "2", "--inversion-patch", "8"])  # fmt: skip
    assert rc == 0
    r = json.loads((out / "toy" / "result.json").read_text())
    assert r["method"] == "toy" and r["payload"] == {"dct": [6, 112, 112]}
    kinds = r["kinds"]
    assert all(kinds[k]["applies"] for k in ("inversion", "linkage", "recovery")), kinds
    assert kinds["inversion"]["secret_space"] == 2 and 0 <= kinds["inversion"]["key_recovery"] <= 1
    assert {"adapter", "insider"} <= set(kinds["linkage"]["forms"])
    assert 0 < kinds["recovery"]["ssim"] < 1


def test_export_onnx_with_parity(model_pt, tmp_path, capsys):
    from ppfr.cli import main

    assert main(["export", str(model_pt), "--format", "onnx", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "server.onnx").is_file() and "parity vs eager" in out, out
    # the client part is the fixed transform of protect(): nothing to export, said in one line
    assert main(["export", str(model_pt), "--format", "onnx", "--part", "client", "--out", str(tmp_path)]) == 2


def test_serve_enrol_identify(model_pt, faces, tmp_path, capsys):
    """``ppfr serve`` in its own process (the method found through its entry point), ``ppfr client`` here."""
    from ppfr.cli import main

    plugins = tmp_path / "plugins"
    dist = plugins / "ppfr_toy_method-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ppfr-toy-method\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[ppfr.methods]\ntoy = toy_plugin\n")
    (plugins / "toy_plugin.py").write_text(
        f"from ppfr.methods import register_method\nfrom {__name__} import ToyMethod\n\nregister_method(ToyMethod)\n"
    )
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    path = os.pathsep.join([str(plugins), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ppfr.cli", "serve", str(model_pt), "--backend", "eager",
                             "--http", "stdlib", "--port", "0", "--gallery", str(tmp_path / "gallery"),
                             "--token-file", str(token), "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert "toy on eager" in line and "listening on http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.rsplit(" ", 1)[1].strip()
        client = [str(model_pt), "--server", url, "--token-file", str(token), "--seed", "0"]
        face = str(faces / "val" / "v0" / "0.png")
        assert main(["client", *client, "enrol", "alice", face]) == 0
        assert main(["client", *client, "enrol", "bob", str(faces / "val" / "v1" / "0.png")]) == 0
        capsys.readouterr()
        assert main(["client", *client, "identify", face]) == 0
        out = capsys.readouterr().out
        assert json.loads(out)["candidates"][0]["name"] == "alice", out
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopped" in stdout, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
