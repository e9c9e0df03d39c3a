"""``ppfr study`` end to end on a tiny synthetic image folder: every step runs, the frozen server of PRO-Face C is
the study's own arcface model, the report and JSON hold one row per method, and a rerun reuses finished work."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ppfr.data.synthetic import synthetic_faces
from ppfr.study import StudyConfig, run_study

ROOT = Path(__file__).resolve().parents[1]


def _dataset(tmp: Path, ids: int = 4, per_id: int = 4) -> tuple[Path, Path]:
    faces = synthetic_faces(ids * per_id, seed=1)
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
    with pytest.raises(ValueError, match="nosuch"):
        StudyConfig(data="d", pairs="p", out=str(tmp_path), configs=str(ROOT / "configs"), methods=("nosuch",))


# ------------------------------------------------------------------------------------------- budget planner
def _costs():
    from ppfr.study import RunCost

    return [RunCost("arcface", step_s=0.5, fixed_s=10.0, full_steps=100),
            RunCost("arcface_transfer", step_s=1.5, fixed_s=20.0, full_steps=100),
            RunCost("partialface", step_s=0.8, fixed_s=12.0, full_steps=100, attack_s=30.0)]  # fmt: skip


def test_plan_budget_splits_the_budget_and_grows_with_it():
    from ppfr.study import plan_budget

    plans = [plan_budget(_costs(), m * 60, attack_share=0.4) for m in (3, 4, 6, 10, 30)]
    for p in plans:
        assert p.total_s <= p.budget_s  # training + evaluation + attacks fit
        assert len(set(p.steps.values())) == 1  # one schedule for every run
        # the runs without a measured attack time take an equal share; the measured one its ledger time
        assert p.attack_s["arcface"] == pytest.approx(0.4 * p.budget_s / 3) and p.attack_s["partialface"] == 30.0
        s = p.steps["arcface"]
        assert p.train_s["arcface_transfer"] == pytest.approx(1.5 * s)
        if s < 100:  # the largest fitting schedule: one more step per epoch (0.5 + 1.5 + 0.8 s) would not fit
            assert p.total_s + 2.8 > p.budget_s
    steps = [p.steps["arcface"] for p in plans]
    assert steps == sorted(steps) and steps[0] < steps[-2]  # monotone in the budget, and it matters
    assert steps[-1] == 100  # capped at a whole epoch
    # a finished (resumed) run costs no training
    from dataclasses import replace

    done = plan_budget([replace(c, done=c.label == "arcface_transfer") for c in _costs()], 4 * 60)
    assert done.train_s["arcface_transfer"] == 0.0 and done.steps["arcface"] >= plans[1].steps["arcface"]


def test_a_resumed_plan_keeps_one_schedule_for_new_runs():
    from ppfr.study import keep_first_plan

    assert keep_first_plan({"a": 80, "b": 80}, {"a": 120, "b": 40, "new": 113}) == {"a": 80, "b": 80, "new": 80}
    assert keep_first_plan({}, {"a": 7}) == {"a": 7}


def test_verify_cached_reuses_until_the_model_or_the_pairs_change(tmp_path, monkeypatch):
    import ppfr.study.evaluation as study

    calls: list[str] = []
    monkeypatch.setattr(study, "verify", lambda m, c: calls.append(c.pairs) or {"flip": {"accuracy": len(calls)}})
    pt = tmp_path / "run" / "model.pt"
    pt.parent.mkdir()
    pt.write_bytes(b"one")
    cfg = StudyConfig(data="d", pairs="p1", out=str(tmp_path))
    first = study.verify_cached(None, cfg, pt, "pairs")
    assert study.verify_cached(None, cfg, pt, "pairs") == first and calls == ["p1"]
    pt.write_bytes(b"two")  # a retrained model
    assert study.verify_cached(None, cfg, pt, "pairs")["flip"]["accuracy"] == 2
    assert study.verify_cached(None, dataclasses.replace(cfg, pairs="p2"), pt, "pairs")["flip"]["accuracy"] == 3
    (pt.parent / "verify_pairs.json").write_text("{not json")  # a torn file is recomputed, not trusted
    assert study.cached_verification(cfg, pt, "pairs") is None
    assert study.verify_cached(None, cfg, pt, "pairs")["flip"]["accuracy"] == 4
    assert calls == ["p1", "p1", "p2", "p1"]
    # what the planner asks: evaluated for these pairs (its evaluation then costs nothing), not for others
    assert study.cached_verification(cfg, pt, "pairs") == {"flip": {"accuracy": 4}}
    assert study.cached_verification(dataclasses.replace(cfg, pairs="p3"), pt, "pairs") is None
    assert [t for _, t in study.verify_tags(dataclasses.replace(cfg, holdout_pairs="h"))] == ["pairs", "holdout"]


def test_plan_budget_refuses_a_budget_too_small():
    from ppfr.study import BudgetError, plan_budget

    with pytest.raises(BudgetError, match="too small") as exc:
        plan_budget(_costs(), 60.0)  # fixed 42 s + 30 s measured attack + a share: 1 step per epoch does not fit
    assert "\n" not in str(exc.value) and str(exc.value).startswith("1.00 min is too small")


def test_budget_cli_refuses_a_budget_too_small(tmp_path, capsys):
    from ppfr.study import main

    data, pairs = _dataset(tmp_path)
    rc = main(["--data", str(data), "--pairs", str(pairs), "--out", str(tmp_path / "s"), "--configs",
               str(ROOT / "configs"), "--methods", "arcface", "--judge", "none", "--batch-size", "4",
               "--attack-train-images", "8", "--budget-min", "0.01", "--no-transfer"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("ppfr study: --budget-min 0.01: ")
    assert "too small" in err and "\n" not in err


def test_study_runs_pair_scratch_and_transfer_rows(tmp_path):
    from ppfr.study import study_runs, train_config

    cfg = StudyConfig(data="d", pairs="p", out=str(tmp_path), configs=str(ROOT / "configs"), transfer=True)
    runs = {r.label: r for r in study_runs(cfg)}
    labels = [r.label for r in study_runs(cfg)]
    assert labels.index("arcface_transfer") == labels.index("arcface") + 1  # beside its scratch row
    assert runs["arcface_transfer"].training == "transfer+distill" and runs["arcface"].training == "scratch"
    assert runs["partialface_transfer"].training == "transfer+distill"
    assert runs["minusface_transfer"].training == "transfer+distill"
    assert runs["duetface_transfer"].training == "transfer+distill"  # face-api.js behind the masks
    assert runs["profacec_transfer"].training == "transfer"  # face-api.js as the frozen server, no teacher
    assert labels.index("profacec_transfer") == labels.index("profacec") + 1
    assert "arcface_fd_transfer" not in runs  # no configs/arcface_fd_transfer.yaml: no transfer row
    # PRO-Face C's transfer row keeps face-api.js as its server: the study's ArcFace is not made its server_ckpt
    tcfg = train_config(cfg, runs["profacec_transfer"], tmp_path, tmp_path / "arcface" / "model.pt", 3)
    assert "server_ckpt" not in tcfg.method_options and [s.name for s in tcfg.stages] == ["client"]
    scratch = train_config(cfg, runs["profacec"], tmp_path, tmp_path / "arcface" / "model.pt", 3)
    assert scratch.method_options["server_ckpt"].endswith("model.pt")
    assert [r.label for r in study_runs(dataclasses.replace(cfg, transfer=False))] == list(cfg.methods)


def test_transfer_schedule_config_keeps_the_transfer_recipe(tmp_path):
    from ppfr.study import chart_title, stage_epochs, study_runs, train_config
    from ppfr.study.report import _argv
    from ppfr.train.config import load_config

    cfg = StudyConfig(data="d", pairs="p", out=str(tmp_path), configs=str(ROOT / "configs"), transfer=True,
                      epochs=2, budget_min=30, transfer_schedule="config")  # fmt: skip
    runs = {r.label: r for r in study_runs(cfg)}
    server = tmp_path / "arcface" / "model.pt"
    for label in ("duetface_transfer", "minusface_transfer", "partialface_transfer"):
        own = load_config(ROOT / "configs" / f"{label}.yaml")
        tcfg = train_config(cfg, runs[label], tmp_path, server, 5)
        n = max(len(own.stages), 1)
        assert stage_epochs(tcfg, n) == stage_epochs(own, n), label  # the config's own epochs per stage
        assert tcfg.optim.lr_steps == own.optim.lr_steps and tcfg.max_steps_per_epoch == 5
        # the probe (explicit epochs) and the uniform schedule give every stage the same epochs
        assert stage_epochs(train_config(cfg, runs[label], tmp_path, server, 5, epochs=1), n) == [1] * n
        uni = train_config(dataclasses.replace(cfg, transfer_schedule="uniform"), runs[label], tmp_path, server, 5)
        assert stage_epochs(uni, n) == [2] * n and list(uni.optim.lr_steps) == [1]
    # the scratch rows keep the uniform schedule under either setting
    scratch = train_config(cfg, runs["duetface"], tmp_path, server, 5)
    assert stage_epochs(scratch, 2) == [2, 2] and list(scratch.optim.lr_steps) == [1]
    assert "--transfer-schedule config" in " ".join(_argv(cfg))
    assert chart_title(cfg, 11) == "ppfr study: 11 rows, 2 epoch(s) per stage, transfer rows at their configs' recipes"
    assert chart_title(dataclasses.replace(cfg, transfer_schedule="uniform"), 3).endswith("2 epoch(s) per stage")
    with pytest.raises(ValueError, match="transfer-schedule"):
        StudyConfig(data="d", pairs="p", out=str(tmp_path), configs=str(ROOT / "configs"), transfer_schedule="x")


def test_payload_fingerprint_names_rows_whose_attacks_are_the_same(tmp_path):
    from ppfr.methods import build_method
    from ppfr.study import payload_fingerprint, reuse_attacks

    x = torch.rand(3, 3, 112, 112) * 2 - 1
    torch.manual_seed(0)
    a = build_method("partialface", depth=18, width=16)
    torch.manual_seed(1)
    b = build_method("partialface", depth=18, width=16)  # another server init: the client (DCT ranks) is the same
    assert payload_fingerprint(a, x) == payload_fingerprint(b, x)
    assert payload_fingerprint(a, x) != payload_fingerprint(a, x.flip(-1))
    assert payload_fingerprint(a, x) != payload_fingerprint(build_method("arcface", depth=18, width=16), x)
    torch.manual_seed(0)
    d1 = build_method("duetface", depth=18, width=16, roi="template")
    torch.manual_seed(1)
    d2 = build_method("duetface", depth=18, width=16, roi="template")  # a client with other weights: other payloads
    assert payload_fingerprint(d1, x) != payload_fingerprint(d2, x)
    twin, dest = tmp_path / "partialface", tmp_path / "partialface_transfer"
    twin.mkdir()
    (twin / "result.json").write_text(json.dumps({"label": "partialface", "kinds": {"recovery": {"ssim": 0.5}}}))
    (twin / "grid.png").write_bytes(b"png")
    res = reuse_attacks(twin, dest, "partialface_transfer", "partialface")
    assert res == json.loads((dest / "result.json").read_text())
    assert res["label"] == "partialface_transfer" and res["reused_from"] == "partialface"
    assert res["kinds"] == {"recovery": {"ssim": 0.5}} and (dest / "grid.png").read_bytes() == b"png"


# ------------------------------------------------------------------------------------------- report and chart
def _fake_row(method: str, training: str, acc: float, link: float | None, ssim: float | None) -> dict:
    kinds = {} if link is None else {"linkage": {"linkage_top1": link, "chance": {"linkage_top1": 0.05}},
                                     "recovery": {"ssim": ssim, "reid_acc": 0.6}}  # fmt: skip
    label = method if training == "scratch" else f"{method}_transfer"
    return {"method": method, "label": label, "training": training, "paper": {},
            "verification": {"flip": {"accuracy": acc, "std": 0.01, "auc": 0.9}, "plain": {"accuracy": acc - 0.01}},
            "cost": {"payload_bytes": 1000, "client_ms": 1.0, "server_ms": 2.0},
            "train": {"stages": [{"stage": "train", "loss_first": 9.0, "loss_last": 5.0, "images_per_s": 50.0}],
                      "before": {"accuracy": 0.5}, "seconds": 30.0},
            "attack": {"kinds": kinds}}  # fmt: skip


def test_chart_labels_of_clustered_points_do_not_overlap(tmp_path):
    from ppfr.eval.chart import CHAR_W, LINE_H, label_steps, privacy_utility_chart

    # five rows at nearly one spot (the ~70 % cluster of the study) and one far away
    xs, ys = [0.50, 0.505, 0.51, 0.50, 0.515, 0.9], [0.50, 0.51, 0.50, 0.52, 0.505, 0.1]
    labels = ["arcface", "arcface_fd", "duetface", "profacec", "partialface_transfer", "minusface"]
    steps = label_steps(xs, ys, labels)
    assert steps[-1] == 0 and len(set(steps[:5])) == 5  # the far point keeps its place; the cluster fans out
    boxes = [(x + 0.01, y + 0.01 + k * LINE_H, x + 0.01 + CHAR_W * len(t), y + 0.01 + (k + 1) * LINE_H)
             for x, y, t, k in zip(xs, ys, labels, steps)]  # fmt: skip
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    rows = [_fake_row(m, "scratch", 0.70 + 0.001 * i, 0.5 + 0.002 * i, 0.3) for i, m in enumerate(labels)]
    assert privacy_utility_chart(rows, tmp_path / "c.png").stat().st_size > 10_000


def test_report_has_training_column_chart_and_command(tmp_path):
    from ppfr.eval.chart import chart_points
    from ppfr.study import write_report

    rows = [_fake_row("arcface", "scratch", 0.80, 0.60, 0.95),
            _fake_row("arcface", "transfer+distill", 0.92, 0.70, 0.95),
            _fake_row("partialface", "scratch", 0.66, 0.20, 0.40),
            _fake_row("partialface", "transfer+distill", 0.78, 0.30, 0.45),
            _fake_row("minusface", "scratch", 0.60, None, None)]  # attacks skipped: a row, no point  # fmt: skip
    cfg = StudyConfig(data="d", pairs="p", out=str(tmp_path / "out"), configs=str(ROOT / "configs"), transfer=True,
                      budget_min=30, methods=("arcface", "partialface", "minusface"))  # fmt: skip
    report = tmp_path / "docs" / "results.md"
    write_report(cfg, rows, report, 60.0, None, {"seconds": 60.0, "invocations": 1}, ["minusface: attacks"])
    text = report.read_text()
    assert "| arcface | scratch | 80.00" in text and "| arcface | transfer+distill | 92.00" in text
    assert "| partialface | transfer+distill | 78.00" in text and "| training |" in text
    assert "(privacy_utility.png)" in text and "ppfr study --data d --pairs p" in text and "--budget-min 30" in text
    assert "Skipped for the budget: minusface: attacks" in text
    assert "bit-identical" not in text
    rows[3]["attack"]["reused_from"] = "partialface"
    write_report(cfg, rows, report, 60.0, None, {"seconds": 60.0, "invocations": 1}, [])
    assert "`partialface_transfer` sends bit-identical payloads to `partialface`'s" in report.read_text()
    png = report.parent / "privacy_utility.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    pts = {(p["label"]): p for p in chart_points(rows)}
    assert pts["partialface"]["linkage"] == pytest.approx(20.0) and pts["arcface_transfer"]["accuracy"] == 92.0
    assert pts["minusface"]["linkage"] is None and pts["minusface"]["ssim"] is None


def test_report_gives_each_linkage_form_and_the_strongest(tmp_path):
    from ppfr.study import form_figures, write_report

    row = _fake_row("minusface", "transfer+distill", 0.75, 0.37, 0.3)
    forms = {"adapter": {"linkage_top1": 0.22}, "finetune": {"linkage_top1": 0.25},
             "insider": {"linkage_top1": 0.37}}  # fmt: skip
    row["attack"]["kinds"]["linkage"].update(form="insider", strongest="insider", forms=forms, pair_acc=0.7)
    assert form_figures(row["attack"]["kinds"]["linkage"]) == "22.0 / 25.0 / 37.0"
    assert form_figures({"forms": {"adapter": {"linkage_top1": 0.1}, "insider": {"skipped": "no server"}}}) \
        == "10.0 / – / skipped"
    cfg = StudyConfig(data="d", pairs="p", out=str(tmp_path / "out"), configs=str(ROOT / "configs"))
    write_report(cfg, [row], tmp_path / "r.md", 1.0, None, None, [])
    text = (tmp_path / "r.md").read_text()
    assert "| 37.0 (insider) | 22.0 / 25.0 / 37.0 |" in text and "| 70.0 |" in text
    assert "linkage top-1 37.0 % (7× chance) (by the insider form)" in text


def test_reused_row_reruns_the_insider_with_its_own_recogniser(tmp_path):
    """A transfer row with its scratch row's payload reuses the payload-only attacks, but the insider links with the
    row's own server: it is re-run and the strongest form recomputed."""
    from ppfr.eval.attacks.common import AttackConfig, resolve_target
    from ppfr.eval.attacks.data import FaceSet
    from ppfr.eval.attacks.judge import Judge
    from ppfr.methods import build_method
    from ppfr.study import refresh_insider

    torch.manual_seed(0)
    method = build_method("arcface", depth=18, width=2)
    model_pt = tmp_path / "m" / "model.pt"
    model_pt.parent.mkdir()
    torch.save({"model": method.state_dict(), "method": "arcface",
                "method_options": {"depth": 18, "width": 2}}, model_pt)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    imgs = (torch.rand(12, 3, 112, 112, generator=g) * 255).to(torch.uint8)

    class Src:
        path = "synthetic"

    val = FaceSet(imgs, torch.arange(4).repeat_interleave(3), Src())
    old = {"linkage_top1": 0.9, "skipped": None}
    res = {"label": "arcface_transfer", "kinds": {"linkage": {
        "applies": True, "linkage_top1": 0.9, "form": "adapter", "secrets": "fresh",
        "forms": {"adapter": {"linkage_top1": 0.1}, "insider": old}}}}  # fmt: skip
    (tmp_path / "arcface_transfer").mkdir()
    (tmp_path / "arcface_transfer" / "result.json").write_text(json.dumps(res))
    target = dataclasses.replace(resolve_target(str(model_pt)), label="arcface_transfer")
    acfg = AttackConfig(linkage_topk=1, eval_batch_size=4)
    out = refresh_insider(target, tmp_path, val, val, acfg, Judge("toy", embed=lambda x: x.flatten(1)[:, :8]), None)
    link = out["kinds"]["linkage"]
    new = link["forms"]["insider"]["linkage_top1"]
    assert new != 0.9 and link["forms"]["adapter"] == {"linkage_top1": 0.1}
    assert link["linkage_top1"] == max(new, 0.1) and link["strongest"] == ("insider" if new >= 0.1 else "adapter")
    assert json.loads((tmp_path / "arcface_transfer" / "result.json").read_text())["insider_rerun"] is True


def test_budget_study_plans_prints_and_skips_what_does_not_fit(tmp_path, monkeypatch):
    import ppfr.study.run as study

    data, pairs = _dataset(tmp_path)
    real = study.plan_budget
    # the planner's own estimate for partialface made too large to fit: the study must skip it cleanly, not overrun
    monkeypatch.setattr(study, "plan_budget", lambda costs, budget_s, share: dataclasses.replace(
        real(costs, budget_s, share), train_s={"arcface": 1.0, "partialface": 1e6}))  # fmt: skip
    cfg = StudyConfig(data=str(data), pairs=str(pairs), out=str(tmp_path / "study"), configs=str(ROOT / "configs"),
                      methods=("arcface", "partialface"), epochs=1, batch_size=4, attack_steps=1,
                      attack_train_images=8, attack_pairs=None, judge="none", timing_batch=2, budget_min=10,
                      report=str(tmp_path / "docs" / "results.md"))  # fmt: skip
    logs: list[str] = []
    rows = study.run_study(cfg, log=logs.append)
    first_train = logs.index(next(m for m in logs if m.startswith("study: arcface: training")))
    plan_lines = [m for m in logs[:first_train] if "plan:" in m]
    assert len(plan_lines) == 3 and "arcface " in plan_lines[1] and "steps/epoch" in plan_lines[1]  # before training
    steps = json.loads((tmp_path / "study" / "plan.json").read_text())["steps"]["arcface"]
    assert 1 <= steps <= 4  # 16 faces / batch 4: at most a whole epoch
    assert [r["label"] for r in rows] == ["arcface"] and rows[0]["training"] == "scratch"
    assert rows[0]["train"]["max_steps_per_epoch"] == steps
    assert any(m.startswith("study: skipped partialface: training") for m in logs)
    assert any("estimated" in m and "budget 10 min" in m for m in logs if m.startswith("study: done"))
    report = (tmp_path / "docs" / "results.md").read_text()
    assert "Skipped for the budget: partialface: training" in report and "--budget-min 10" in report
    assert (tmp_path / "docs" / "privacy_utility.png").is_file()
    ledger = json.loads((tmp_path / "study" / "elapsed.json").read_text())
    assert ledger["invocations"] == 1 and set(ledger["runs"]["arcface"]) >= {"train_s", "eval_s", "attack_s"}
    assert not (tmp_path / "study" / "probe").exists()  # the probe's runs are removed; probe.json stays
    assert set(json.loads((tmp_path / "study" / "probe.json").read_text())["runs"]) == {"arcface", "partialface"}


# ------------------------------------------------------------------------------------ held-out identities
def test_split_holdout_keeps_held_identities_out_of_training(tmp_path):
    from ppfr.data.pairs import read_pairs
    from ppfr.data.sources import open_source
    from ppfr.study import split_holdout

    data, _ = _dataset(tmp_path, ids=24, per_id=4)
    train, pairs = split_holdout(data, 20, tmp_path / "h", seed=3)
    src = open_source(train)
    trained = {Path(f).parent.name for f in src.files}
    held = {Path(p).parent.name for q in read_pairs(pairs) for p in (q.a, q.b)}
    assert len(trained) == 4 and len(held) == 20 and not trained & held
    assert sorted(set(src.labels.tolist())) == [0, 1, 2, 3] and len(src) == 16  # contiguous labels, every image
    folds = {q.fold for q in read_pairs(pairs)}
    assert folds == set(range(10))
    for f in folds:  # identity-disjoint folds: no identity appears in two folds
        ids_f = {Path(p).parent.name for q in read_pairs(pairs) if q.fold == f for p in (q.a, q.b)}
        others = {Path(p).parent.name for q in read_pairs(pairs) if q.fold != f for p in (q.a, q.b)}
        assert not ids_f & others
    before = (train.read_text(), pairs.read_text())
    assert split_holdout(data, 20, tmp_path / "h", seed=3) and (train.read_text(), pairs.read_text()) == before
    assert split_holdout(data, 20, tmp_path / "h2", seed=4)[0].read_text() != before[0]  # the seed draws the split


def test_split_holdout_refusals(tmp_path):
    from ppfr.study import HoldoutError, split_holdout

    data, pairs = _dataset(tmp_path, ids=4, per_id=4)
    with pytest.raises(HoldoutError, match="identities"):
        split_holdout(data, 20, tmp_path / "h", seed=0)
    with pytest.raises(HoldoutError, match="image folder"):
        split_holdout(pairs, 20, tmp_path / "h", seed=0)
    with pytest.raises(ValueError, match="holdout-ids"):
        StudyConfig(data="d", pairs="p", out=str(tmp_path), configs=str(ROOT / "configs"), holdout_ids=5)


def _row(label: str, acc: float, held: float, std: float = 0.01) -> dict:
    return {"method": label, "label": label, "verification": {"flip": {"accuracy": acc, "std": std}},
            "holdout": {"flip": {"accuracy": held, "std": std}}}  # fmt: skip


def test_ordering_check_counts_swaps_and_noise():
    from ppfr.study import ordering_check

    kept = ordering_check([_row("a", 0.9, 0.8), _row("b", 0.7, 0.6), _row("c", 0.6, 0.55)])
    assert kept["kept"] and kept["kendall_tau"] == 1.0 and kept["order_holdout"] == ["a", "b", "c"]
    noisy = ordering_check([_row("a", 0.9, 0.8), _row("b", 0.7, 0.60), _row("c", 0.695, 0.605)])
    assert not noisy["kept"] and noisy["kept_beyond_noise"] and noisy["kendall_tau"] == pytest.approx(1 / 3)
    assert noisy["swaps"] == [{"above": "b", "below": "c", "gap_pairs": pytest.approx(0.005),
                               "gap_holdout": pytest.approx(0.005), "within_std": True}]  # fmt: skip
    changed = ordering_check([_row("a", 0.9, 0.5), _row("b", 0.6, 0.8)])
    assert not changed["kept_beyond_noise"] and changed["kendall_tau"] == -1.0
    assert ordering_check([_row("a", 0.9, 0.5)]) is None


def test_study_with_held_out_identities_reports_the_ordering(tmp_path):
    data, pairs = _dataset(tmp_path, ids=24, per_id=4)
    cfg = StudyConfig(data=str(data), pairs=str(pairs), out=str(tmp_path / "study"), configs=str(ROOT / "configs"),
                      methods=("arcface", "partialface"), epochs=1, max_steps_per_epoch=1, batch_size=4,
                      attack_steps=1, attack_train_images=8, attack_pairs=None, attack_kinds="recovery",
                      judge="none", timing_batch=2, holdout_ids=20,
                      report=str(tmp_path / "docs" / "results.md"))  # fmt: skip
    logs: list[str] = []
    rows = run_study(cfg, log=logs.append)
    assert all(0.0 <= r["holdout"]["flip"]["accuracy"] <= 1.0 for r in rows)
    summary = json.loads((tmp_path / "study" / "runs" / "arcface" / "summary.json").read_text())
    assert summary["stages"]
    check = json.loads((tmp_path / "study" / "ordering.json").read_text())
    assert set(check["order_holdout"]) == {"arcface", "partialface"}
    report = (tmp_path / "docs" / "results.md").read_text()
    assert "Ordering on identities nobody trained on" in report and "--holdout-ids 20" in report
    assert f"--data {data}" in report  # the command the user typed, not the generated index
    assert any("ordering on the held-out identities" in m for m in logs)
