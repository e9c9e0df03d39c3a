"""``ppfr study`` end to end on a tiny synthetic image folder: every step runs, the frozen server of PRO-Face C is
the study's own arcface model, the report and JSON hold one row per method, and a rerun reuses finished work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ppfr.cli import _synthetic_faces
from ppfr.study import StudyConfig, run_study

ROOT = Path(__file__).resolve().parents[1]


def _dataset(tmp: Path, ids: int = 4, per_id: int = 4) -> tuple[Path, Path]:
    faces = _synthetic_faces(ids * per_id, seed=1)
    root = tmp / "faces"
    for i in range(ids):
        (root / f"id{i}").mkdir(parents=True)
        for j in range(per_id):
            arr = ((faces[i * per_id + j] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
            Image.fromarray(arr.numpy()).save(root / f"id{i}" / f"{j}.png")
    rows = []
    for fold in range(10):  # one genuine and one impostor pair per fold
        a, b = fold % ids, (fold + 1) % ids
        rows.append(f"{fold} 1 id{a}/0.png id{a}/{1 + fold % 3}.png")
        rows.append(f"{fold} 0 id{a}/{fold % 4}.png id{b}/{(fold + 1) % 4}.png")
    pairs = root / "pairs.txt"
    pairs.write_text("\n".join(rows) + "\n")
    return root, pairs


def test_study_end_to_end_and_resume(tmp_path):
    data, pairs = _dataset(tmp_path)
    cfg = StudyConfig(data=str(data), pairs=str(pairs), out=str(tmp_path / "study"), configs=str(ROOT / "configs"),
                      methods=("arcface", "profacec"), epochs=1, max_steps_per_epoch=1, batch_size=4, attack_steps=1,
                      attack_train_images=8, attack_pairs=None, judge="none", timing_batch=2,
                      report=str(tmp_path / "docs" / "results.md"))  # fmt: skip
    logs: list[str] = []
    rows = run_study(cfg, log=logs.append)
    assert [r["method"] for r in rows] == ["arcface", "profacec"]
    for r in rows:
        assert 0.0 <= r["verification"]["flip"]["accuracy"] <= 1.0 and "before" in r["train"]
        kinds = r["attack"]["kinds"]
        assert r["cost"]["payload_bytes"] > 0 and np.isfinite(kinds["recovery"]["ssim"])
        assert set(kinds) == {"inversion", "recovery", "linkage"}  # every kind, recorded even where it cannot run
        assert kinds["inversion"]["applies"] is False  # neither payload is linear in the image
        assert "teacher" in kinds["linkage"]["skipped"]  # judge none: linkage has no teacher
    # PRO-Face C's frozen server is the study's arcface backbone
    pro = torch.load(tmp_path / "study" / "runs" / "profacec" / "model.pt", weights_only=True)
    arc = torch.load(tmp_path / "study" / "runs" / "arcface" / "model.pt", weights_only=True)
    assert pro["method_options"]["server_ckpt"].endswith(str(Path("arcface") / "model.pt"))
    server = {k[len("server."):]: v for k, v in pro["model"].items() if k.startswith("server.")}
    backbone = {k[len("server."):]: v for k, v in arc["model"].items() if k.startswith("server.")}
    assert server.keys() == backbone.keys() and all(torch.equal(server[k], backbone[k]) for k in server)
    report = (tmp_path / "docs" / "results.md").read_text()
    assert "| arcface |" in report and "| profacec |" in report and "ppfr study --data" in report
    assert "Measured privacy ordering" in report and "| n/a |" in report
    assert len(json.loads((tmp_path / "study" / "study.json").read_text())) == 2
    # a rerun reuses the trained models and finished attacks
    logs.clear()
    run_study(cfg, log=logs.append)
    assert sum("reusing" in m for m in logs) == 2 and not any("training" in m for m in logs)
    assert not any("recovery:" in m for m in logs)  # finished attack kinds are not run again


def test_study_refuses_unknown_method(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="nosuch"):
        StudyConfig(data="d", pairs="p", out=str(tmp_path), configs=str(ROOT / "configs"), methods=("nosuch",))
