"""Pretrained transfer and teacher distillation (ppfr.models.transfer, ppfr.train.transfer, ``transfer:`` /
``distill:`` in the trainer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest

from ppfr.methods import Payload, build_method, load_method
from ppfr.models.faceapi import FaceApiJudge
from ppfr.models.ir import IRNet
from ppfr.models.transfer import PayloadAdapter, TransferredServer
from ppfr.train.config import ConfigError, TransferConfig, load_config
from ppfr.train.trainer import Trainer, build_head, build_optimizer
from ppfr.train.transfer import Distiller, apply_transfer

from tests.conftest import SHARED

FACEAPI = SHARED / "models" / "faceapi"
needs_faceapi = pytest.mark.skipif(not FACEAPI.is_dir(),
                                   reason="face-api.js weights not found at ../shared/models/faceapi")
TINY = {"depth": 18, "width": 8, "embedding_size": 32}


def _faces(b: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, 112, 112, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _dct_payload(b: int = 2) -> Payload:
    """A PartialFace-shaped payload (B, 27, 112, 112) of DCT-scale values (recognize only: no first-call encode)."""
    dct = torch.randn(b, 27, 112, 112, generator=torch.Generator().manual_seed(1)) * 20
    return Payload("partialface", {"dct": dct})


@pytest.fixture(scope="module")
def source_pt(tmp_path_factory) -> str:
    """A ppfr model.pt (an arcface IR-18, width 8, 32-d; untrained but a fixed recogniser) as a transfer source."""
    m = build_method("arcface", **TINY)
    path = tmp_path_factory.mktemp("src") / "model.pt"
    torch.save({"model": m.state_dict(), "method": "arcface", "method_options": dict(TINY)}, path)
    return str(path)


def _cfg(tmp_path, **over):
    base = [f"out_dir={tmp_path}", "name=t", "method=arcface",
            "method_options={depth: 18, width: 8, embedding_size: 32}",
            "data.num_samples=16", "data.num_classes=4", "data.batch_size=8", "max_steps_per_epoch=2", "log_every=1",
            "optim.warmup_steps=0", "eval.before=false", "eval.after=false", "data.num_workers=0"]
    return load_config(None, base + [f"{k}={v}" for k, v in over.items()])


def test_adapter_is_identity_for_rgb_and_maps_declared_ranges():
    x = _faces()
    a = PayloadAdapter(3, 112, 3, 112, -1.0, 1.0)
    assert torch.equal(a(x), x)
    unit = PayloadAdapter(3, 112, 3, 112, 0.0, 1.0)  # MinusFace's X_p in [0, 1] -> [-1, 1]
    assert torch.allclose(unit(x * 0.5 + 0.5), x, atol=1e-6)
    dct = PayloadAdapter(27, 112, 3, 112).train()  # unbounded: BatchNorm, a 1x1 conv 27 -> 3, and the residual
    assert dct(torch.randn(2, 27, 112, 112) * 50).shape == (2, 3, 112, 112)
    with pytest.raises(ValueError, match="expects"):
        a(torch.zeros(1, 4, 112, 112))


@needs_faceapi
def test_faceapi_transfer_replaces_server_and_starts_as_the_recogniser():
    from ppfr.models.faceapi import load_faceapi_judge

    m = build_method("arcface", depth=18, width=8)  # 512-d: face-api.js's 128-d descriptor through a projection
    plan = apply_transfer(m, TransferConfig(source="faceapi", source_dir=str(FACEAPI)))
    assert isinstance(m.server, TransferredServer) and isinstance(m.server.recognizer, FaceApiJudge)
    assert plan.record["server"]["recognizer"] == {"kind": "faceapi", "in_size": 112}
    x = _faces(3)
    with torch.no_grad():
        e = m.eval().embed(x)
        t = load_faceapi_judge(FACEAPI).embed(x)
    assert e.shape == (3, 512)
    cos = lambda z: F.normalize(z) @ F.normalize(z).T  # noqa: E731
    assert torch.allclose(cos(e), cos(t), atol=1e-5)  # identity adapter + semi-orthogonal projection: face-api itself
    p = build_method("partialface", **TINY)  # 27 DCT channels -> adapter -> face-api.js -> 32
    apply_transfer(p, TransferConfig(source="faceapi", source_dir=str(FACEAPI)))
    assert p.eval().recognize(_dct_payload()).shape == (2, 32)


def test_model_pt_transfer_and_weights_where_shapes_match(source_pt):
    src = load_method(source_pt)
    m = build_method("partialface", **TINY)
    apply_transfer(m, TransferConfig(source=source_pt))
    assert isinstance(m.server, TransferredServer) and isinstance(m.server.recognizer, IRNet)
    assert torch.equal(m.server.recognizer.body[0].res_layer[1].weight, src.server.body[0].res_layer[1].weight)
    assert m.eval().recognize(_dct_payload()).shape == (2, 32)
    d = build_method("duetface", **TINY)  # its server takes the client masks: adapter auto = weights only
    plan = apply_transfer(d, TransferConfig(source=source_pt))
    assert plan.server is None and 0 < plan.record["loaded"] < plan.record["of"]  # all but the 162-channel stem
    assert torch.equal(d.server.body[3].res_layer[1].weight, src.server.body[3].res_layer[1].weight)
    # adapter: conv puts the source's whole IR net behind an adapter; the masks go into its stages
    d = build_method("duetface", **TINY)
    apply_transfer(d, TransferConfig(source=source_pt, adapter="conv"))
    assert isinstance(d.server, TransferredServer) and d.server.adapter.in_channels == 162
    assert [(i.cout, i.size) for i in d.interfaces] == list(src.server.stage_shapes()) == [(8, 56), (16, 28),
                                                                                           (32, 14), (64, 7)]
    assert d.eval().embed(_faces(2)).shape == (2, 32)


class _Unnamed(torch.nn.Module):
    """A method-like module whose server reads two payload tensors and names neither as its input."""

    name = "unnamed"

    def __init__(self) -> None:
        super().__init__()
        from ppfr.methods.base import TensorSpec

        self.server = IRNet(18, 3, 32, base_width=8)
        self.payload_spec = {"a": TensorSpec((3, 112, 112)), "b": TensorSpec((1, 112, 112))}


def test_adapter_refuses_a_server_input_it_cannot_name(source_pt):
    with pytest.raises(ValueError, match="names none of them as its input"):
        apply_transfer(_Unnamed(), TransferConfig(source=source_pt, adapter="conv"))


def test_faceapi_stage_hooks_see_the_stage_shapes():
    from ppfr.models.faceapi import STAGE_SHAPES

    judge = FaceApiJudge().eval()  # placeholder weights (zeros) made random: the hooks must change the output
    torch.manual_seed(0)
    for p in judge.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = _faces(2)
    seen = []

    def hook(stage, h):
        seen.append((stage, tuple(h.shape[1:])))
        return h

    with torch.no_grad():
        assert torch.equal(judge.embed(x, hook), judge.embed(x))  # an identity hook changes nothing
        doubled = judge.embed(x, lambda s, h: h * 2 if s == 3 else h)
    assert seen == [(i, (c, s, s)) for i, (c, s) in enumerate(STAGE_SHAPES)]
    assert not torch.allclose(doubled, judge.embed(x))


@needs_faceapi
def test_faceapi_transfer_into_the_injecting_methods_and_round_trip(tmp_path):
    """DuetFace and PRO-Face C take face-api.js as their server: the injected parts are rebuilt for its stages
    (32 @ 35, 64 @ 17, 128 @ 8, 256 @ 4), DuetFace's scale fusion starts as the plain recogniser, PRO-Face C's
    server is frozen with the client stage alone, and model.pt rebuilds both."""
    from ppfr.models.faceapi import STAGE_SHAPES

    x = _faces(2)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    d = build_method("duetface", **TINY, fusion="scale")
    plan = apply_transfer(d, TransferConfig(source="faceapi", source_dir=str(FACEAPI)))
    assert plan.server is d.server and plan.record["server"]["payload"]["channels"] == 162
    assert [(i.cout, i.size) for i in d.interfaces] == list(STAGE_SHAPES)
    d.eval()
    with torch.no_grad():
        p = d.protect(x, generator=g())
        plain = d.server(p.tensors["dct"])  # no injection at all
        assert torch.allclose(d.recognize(p), plain, atol=1e-6)  # w = 0: h * (1 + 0 * mask) = h
        d.mask_weights.fill_(0.5)
        assert not torch.allclose(d.recognize(p), plain, atol=1e-4)  # the masks reach face-api.js's stages
    pf = build_method("profacec", **TINY, server_bgr=False)
    apply_transfer(pf, TransferConfig(source="faceapi", source_dir=str(FACEAPI)))
    assert [s.name for s in pf.stages()] == ["client"] and pf.transferred_server
    assert not any(p.requires_grad for p in pf.server.parameters())
    assert [tuple(pf.payload_spec[f"aux{i}"].shape) for i in range(4)] == [(c, s, s) for c, s in STAGE_SHAPES]
    assert pf.shuffle_perm.shape == (18 * 18, 32)  # 35 x 35 in 2 x 2 blocks, the edge blocks partial
    pf.set_stage("client")
    pf.train()
    assert not pf.server.training and pf.client.training
    for m, opts in ((d, {**TINY, "fusion": "scale"}), (pf, {**TINY, "server_bgr": False})):
        path = tmp_path / f"{m.name}.pt"
        torch.save({"model": m.state_dict(), "method": m.name, "method_options": opts,
                    "transfer": {"adapter": "conv", "server": m.server.spec}}, path)  # fmt: skip
        loaded = load_method(path).eval()
        m.eval()
        with torch.no_grad():
            assert torch.allclose(loaded.embed(x, generator=g()), m.embed(x, generator=g()), atol=1e-5)


def test_freeze_schedule_and_pretrained_lr_group(source_pt, tmp_path):
    m = build_method("arcface", **TINY)
    plan = apply_transfer(m, TransferConfig(source=source_pt, freeze_epochs=1, lr_mult=0.25))
    stage = m.set_stage("train")
    m.train()
    cfg = _cfg(tmp_path)
    cfg = cfg.__class__(**{**cfg.__dict__, "transfer": TransferConfig(source=source_pt, lr_mult=0.25)})
    opt = build_optimizer(m, build_head(cfg, 4, 32), cfg, plan.pretrained_ids())
    pre = [g for g in opt.param_groups if g["name"].startswith("pre_")]
    assert pre and all(g["lr_mult"] == 0.25 for g in pre)
    assert sum(len(g["params"]) for g in pre) == len(plan.pretrained)
    assert plan.apply_epoch(m, stage.trainable, 0) is True
    assert not any(p.requires_grad for p in m.server.recognizer.parameters())
    assert all(p.requires_grad for p in m.server.adapter.parameters())
    m.train()
    assert not m.server.recognizer.training and m.server.adapter.training  # frozen BN statistics stay put
    before = m.server.recognizer.body[0].res_layer[1].weight.clone()
    head = build_head(cfg, 4, 32)
    m.training_step("train", _faces(8), torch.arange(8) % 4, head)["loss"].backward()
    opt.step()
    assert torch.equal(m.server.recognizer.body[0].res_layer[1].weight, before)
    assert plan.apply_epoch(m, stage.trainable, 1) is False
    assert all(p.requires_grad for p in m.server.recognizer.parameters()) and m.server.recognizer.training
    assert plan.apply_epoch(m, ("client",), 0) is None  # a stage that does not train the server: left alone


def test_distillation_loss_decreases(source_pt):
    dist = Distiller(source_pt, weight=1.0, cache=True)
    student = build_method("arcface", depth=18, width=8, embedding_size=16).train()
    dist.watch(student.server)
    proj = dist.new_projection(16)
    assert isinstance(proj, torch.nn.Linear) and proj.out_features == 32
    opt = torch.optim.Adam([*student.parameters(), *proj.parameters()], lr=1e-2)
    g = torch.Generator().manual_seed(0)  # 8 distinct "faces": a colour each plus texture, the teacher tells apart
    x = (torch.rand(8, 3, 1, 1, generator=g) * 2 - 1) * 0.7 + torch.rand(8, 3, 112, 112, generator=g) * 0.3
    losses = []
    for _ in range(6):
        dist.begin_step()
        student.recognize(student.protect(x))
        loss = dist.loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses  # measured: 0.90 -> 0.32
    assert dist.misses == 8 and dist.hits == 40  # teacher computed once per image, then cached
    assert torch.allclose(dist.teacher_embeddings(x), load_method(source_pt).embed(x, generator=torch.Generator()))
    with torch.no_grad():  # no gradient through the server: nothing captured, no term
        dist.begin_step()
        student.recognize(student.protect(x))
    assert dist.loss(x) is None


def test_trainer_transfer_distill_and_model_pt_round_trip(source_pt, tmp_path):
    cfg = _cfg(tmp_path, **{"transfer.source": source_pt, "transfer.freeze_epochs": 1, "epochs": 2,
                            "distill.teacher": source_pt, "distill.weight": 0.5})
    tr = Trainer(cfg, quiet=True)
    summary = tr.fit()
    assert summary["stages"][0]["loss_last"] is not None
    rows = (tmp_path / "t" / "distill.csv").read_text().splitlines()
    assert rows[0].startswith("stage,epoch,step,global_step,loss,distill") and len(rows) == 5
    # the distillation projection starts as the left inverse of the transfer projection (teacher = source): ~0
    assert float(rows[1].split(",")[5]) < 1e-3
    loaded = load_method(tmp_path / "t" / "model.pt")
    assert isinstance(loaded.server, TransferredServer)
    x = _faces()
    tr.method.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.embed(x), tr.method.embed(x), atol=1e-5)


def test_bad_sources_are_one_line_config_errors(tmp_path, source_pt):
    for value, want in (("nowhere/model.pt", "no such file"), ("model.onnx", "no such file")):
        with pytest.raises(ConfigError, match=f"transfer.source={value}: {want}") as exc:
            _cfg(tmp_path, **{"transfer.source": value})
        assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="distill.teacher=x.onnx: no such file"):
        _cfg(tmp_path, **{"distill.teacher": "x.onnx"})
    with pytest.raises(ConfigError, match="transfer.adapter"):
        _cfg(tmp_path, **{"transfer.adapter": "mlp"})
    cfg = _cfg(tmp_path, **{"transfer.source": "faceapi", "transfer.adapter": "none", "method": "profacec"})
    with pytest.raises(ConfigError, match="needs transfer.adapter=conv") as exc:  # found once the method is built
        Trainer(cfg, quiet=True).fit()
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------------------------------ the teacher store
def _distill_rows(run) -> list[list[str]]:
    return [r.split(",") for r in (run / "distill.csv").read_text().splitlines()[1:]]


def test_teacher_store_embeds_the_set_once_and_training_only_hits_it(source_pt, tmp_path, monkeypatch):
    from ppfr.train.teacher_store import store_dir

    from tests._faces import write_faces

    monkeypatch.setenv("PPFR_CACHE_DIR", str(tmp_path / "cache"))
    write_faces(tmp_path / "faces", [f"p{i}" for i in range(4)], 5, seed=3)  # 20 images, batches of 8
    over = {"data.source": str(tmp_path / "faces"), "distill.teacher": source_pt, "distill.weight": 0.5,
            "epochs": 2, "max_steps_per_epoch": 3}
    logs: list[str] = []
    tr = Trainer(_cfg(tmp_path / "a", **over), quiet=True)
    tr.log = logs.append
    tr.fit()
    stores = list(store_dir().glob("*.pt"))
    assert len(stores) == 1 and any("40 images embedded" in m for m in logs)
    # every (image, flip) the random flips of two epochs drew was in the store: the teacher never ran in a step
    rows = _distill_rows(tmp_path / "a" / "t")
    assert rows and all(r[7] == "0" for r in rows) and int(rows[-1][6]) == 2 * 20  # 2 epochs of 8 + 8 + 4

    logs.clear()
    tr2 = Trainer(_cfg(tmp_path / "b", **over), quiet=True)
    tr2.log = logs.append
    tr2.fit()
    assert any("40 teacher embeddings loaded from the store" in m for m in logs)
    assert _distill_rows(tmp_path / "b" / "t") == rows  # the same targets, bit for bit: the same losses

    stores[0].write_bytes(stores[0].read_bytes()[:-50])  # truncated: refused, said, rebuilt
    logs.clear()
    tr3 = Trainer(_cfg(tmp_path / "c", **over), quiet=True)
    tr3.log = logs.append
    tr3.fit()
    assert any("ignoring the teacher store" in m for m in logs) and any("40 images embedded" in m for m in logs)
    assert _distill_rows(tmp_path / "c" / "t") == rows


def test_teacher_store_is_skipped_without_a_cache_or_a_dataset(source_pt, tmp_path, monkeypatch):
    from ppfr.train.teacher_store import store_dir

    monkeypatch.setenv("PPFR_CACHE_DIR", str(tmp_path / "cache"))
    Trainer(_cfg(tmp_path, **{"distill.teacher": source_pt}), quiet=True).fit()  # data.source=synthetic
    assert not store_dir().exists()
    with pytest.raises(ConfigError, match="distill.precompute"):
        _cfg(tmp_path, **{"distill.teacher": source_pt, "distill.precompute": "often"})
