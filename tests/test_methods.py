"""Tests of the method plugins (ppfr/methods) and the models they use (ppfr/models)."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import ppfr
from ppfr.methods import Payload, available_methods, build_method
from ppfr.methods.duetface import CLIENT_CHANNELS, SERVER_CHANNELS
from ppfr.models import ArcFaceHead, CosFaceHead, IRNet, UNet
from ppfr.models.checkpoints import CheckpointError, load_adaface, load_pfld, load_tface_backbone
from ppfr.models.pfld import PFLDInference
from ppfr.ops.freq import freq_encode
from ppfr.ops.sample_ranks import PRUNED, RankSpace, sample_ranks
from tests.conftest import SHARED

SMALL = {"depth": 18}
OPTS = {name: dict(SMALL, **({"gen_width": 8} if name == "minusface" else {})) for name in available_methods()}


def _images(b=2, seed=0):
    return torch.rand(b, 3, 112, 112, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def methods():
    torch.manual_seed(0)
    return {name: build_method(name, **OPTS[name]).eval() for name in available_methods()}


EXPECTED = {
    "arcface": {"image": (3, 112, 112)},
    "arcface_fd": {"dct": (192, 112, 112)},
    "duetface": {"dct": (162, 112, 112), "feat0": (64, 28, 28), "feat1": (128, 14, 14), "feat2": (128, 7, 7),
                 "feat3": (512, 7, 7), "roi": (1, 112, 112)},
    "partialface": {"dct": (27, 112, 112)},
    "minusface": {"image": (3, 112, 112)},
    "profacec": {"image": (3, 112, 112), "aux0": (64, 56, 56), "aux1": (128, 28, 28), "aux2": (256, 14, 14),
                 "aux3": (512, 7, 7)},
}  # fmt: skip


def test_registry_lists_the_six_methods():
    assert available_methods() == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_payload_shapes_dtypes_and_determinism(methods, name):
    m = methods[name]
    x = _images(3)
    with torch.no_grad():
        p1 = m.protect(x, generator=torch.Generator().manual_seed(5))
        p2 = m.protect(x, generator=torch.Generator().manual_seed(5))
        emb = m.recognize(p1)
    assert p1.method == name
    assert {k: tuple(v.shape[1:]) for k, v in p1.tensors.items()} == EXPECTED[name]
    assert all(v.dtype == torch.float32 and v.shape[0] == 3 for v in p1.tensors.values())
    assert all(torch.equal(p1.tensors[k], p2.tensors[k]) for k in p1.tensors)
    assert emb.shape == (3, 512) and torch.isfinite(emb).all()


def test_duetface_server_payload_has_no_client_channels(methods):
    assert not set(CLIENT_CHANNELS) & set(SERVER_CHANNELS) and len(SERVER_CHANNELS) == 162
    assert all(ch % 64 not in (0, 1, 2, 3, 4, 5, 8, 9, 16, 24) for ch in SERVER_CHANNELS)
    x = _images()
    with torch.no_grad():
        p = methods["duetface"].protect(x)
    torch.testing.assert_close(p.tensors["dct"], freq_encode(x, list(SERVER_CHANNELS)), rtol=0, atol=0)


def test_partialface_payload_is_one_rank_of_unpruned_channels(methods):
    x = _images(4)
    with torch.no_grad():
        p = methods["partialface"].protect(x, generator=torch.Generator().manual_seed(3))
    ranks = sample_ranks(batch=4, space=RankSpace.code(), rule="uniform", generator=torch.Generator().manual_seed(3))
    assert not set((ranks.channels % 64).flatten().tolist()) & set(PRUNED)
    assert torch.equal(p.tensors["dct"], freq_encode(x, ranks.channels))


def test_minusface_payload_is_an_image_in_unit_range(methods):
    with torch.no_grad():
        img = methods["minusface"].protect(_images()).tensors["image"]
    assert img.shape == (2, 3, 112, 112) and img.min() >= 0 and img.max() <= 1


def test_recognize_refuses_images_and_foreign_payloads(methods):
    x = _images()
    with pytest.raises(TypeError, match="Payload"):
        methods["partialface"].recognize(x)
    with torch.no_grad():
        p = methods["arcface"].protect(x)
    with pytest.raises(ValueError, match="for method 'arcface'"):
        methods["minusface"].recognize(p)
    with pytest.raises(ValueError, match="must be"):
        methods["partialface"].recognize(Payload("partialface", {"dct": x}))  # an RGB image is not a rank
    with pytest.raises(ValueError, match="values above"):
        methods["minusface"].recognize(Payload("minusface", {"image": x.abs() * 3}))
    with pytest.raises(ValueError, match="RGB images"):
        methods["arcface"].protect(torch.zeros(2, 192, 112, 112))


STAGE_CASES = [
    ("arcface", "train", {"server"}),
    ("arcface_fd", "train", {"server"}),
    ("partialface", "train", {"server"}),
    ("duetface", "client", {"client"}),
    ("duetface", "server", {"server", "interfaces", "mask_weights"}),
    ("minusface", "stage1", {"generator", "recognizer"}),
    ("minusface", "stage2", {"recognizer_p"}),
    ("profacec", "server", {"server"}),
    ("profacec", "client", {"client", "interfaces", "keys"}),
]


@pytest.mark.parametrize("name,stage,trained", STAGE_CASES)
def test_gradients_reach_exactly_the_trained_modules(name, stage, trained):
    torch.manual_seed(0)
    m = build_method(name, **OPTS[name])
    m.set_stage(stage)
    m.train()
    head = ArcFaceHead(512, 10)
    labels = torch.tensor([1, 7])
    out = m.training_step(stage, _images(), labels, head, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    for child_name, child in m.named_children():
        params = list(child.parameters()) if isinstance(child, nn.Module) else []
        if not params:
            continue
        has_grad = [p.grad is not None for p in params]
        if child_name in trained:
            assert all(has_grad), f"{name}/{stage}: {child_name} should train"
            assert any(p.grad.abs().sum() > 0 for p in params) or child_name == "interfaces"
        else:
            assert not any(has_grad), f"{name}/{stage}: {child_name} should be frozen"
            assert not child.training, f"{name}/{stage}: frozen {child_name} must be in eval mode"
    for pname, p in m.named_parameters(recurse=False):
        assert (p.grad is not None) == (pname in trained), pname
    assert head.weight.grad is not None


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_state_dict_round_trip(methods, name):
    m = methods[name]
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)
    fresh = build_method(name, **OPTS[name]).eval()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = _images()
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    with torch.no_grad():
        if name == "duetface" and m.options.interface == "random_per_forward":
            pytest.skip("random interfaces are re-drawn every forward by design")
        torch.testing.assert_close(fresh.embed(x, generator=g()), m.embed(x, generator=g()))


def _celeba_batch(n=4):
    from PIL import Image

    root = SHARED / "data" / "celeba112" / "val"
    if not root.is_dir():
        pytest.skip(f"real faces not found at {root}")
    files = sorted(root.rglob("*.jpg"))[:n]
    imgs = []
    for f in files:
        with Image.open(f) as im:
            t = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
            imgs.append(t.view(im.size[1], im.size[0], 3).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(imgs)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_protect_recognize_on_real_faces(methods, name):
    x = _celeba_batch()
    assert x.shape == (4, 3, 112, 112)
    with torch.no_grad():
        emb = methods[name].embed(x, generator=torch.Generator().manual_seed(0))
    assert emb.shape == (4, 512) and torch.isfinite(emb).all()
    assert (emb[0] - emb[1]).abs().max() > 0  # different faces, different embeddings


def test_options_are_validated():
    with pytest.raises(ValueError, match="unknown option 'dept'"):
        build_method("arcface", dept=18)
    with pytest.raises(ValueError, match="unknown method"):
        build_method("facenet")
    with pytest.raises(ValueError, match="interface"):
        build_method("duetface", interface="sometimes")
    with pytest.raises(ValueError, match="bits"):
        build_method("profacec", bits=3)
    assert ppfr.build_method("arcface", depth=18).options.depth == 18


# ------------------------------------------------------------------------------------------------ models
def test_parameter_counts_match_spec():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(IRNet(50)) - 43.59e6) < 0.01e6  # the ArcFace IR-50 (512 * 7 * 7 -> 512 embedding)
    assert abs(count(UNet(192, 192, 64)) - 34.6e6) < 0.05e6  # METHODS §5.2: ~34.6 M
    assert count(UNet(192, 192, 16)) < count(UNet(192, 192, 64)) / 10  # the reduced-width option


@pytest.mark.parametrize("cin", [3, 27, 30, 162, 192])
def test_ir_input_channels(cin):
    assert IRNet(18, cin)(torch.randn(2, cin, 112, 112)).shape == (2, 512)


def test_arcface_margin_and_safe_branch():
    head = ArcFaceHead(4, 3, s=64, m=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.eye(4)[:, :3])
    emb = torch.tensor([[1.0, 0.0, 0.0, 0.0], [-1.0, 0.2, 0.0, 0.0]])
    logits = head.logits(emb, torch.tensor([0, 0]))
    assert abs(logits[0, 0].item() - 64 * torch.cos(torch.tensor(0.5)).item()) < 1e-4  # theta = 0 -> cos(m)
    cos = torch.nn.functional.normalize(emb[1:2])[0, 0]
    # theta + m > pi: the monotone fallback cos(theta) - m sin(pi - m)
    want = 64 * (cos - 0.5 * torch.sin(torch.tensor(torch.pi - 0.5)))
    assert abs(logits[1, 0] - want) < 1e-4
    assert logits[1, 1].item() == pytest.approx(64 * torch.nn.functional.normalize(emb[1:2])[0, 1].item(), abs=1e-4)
    cf = CosFaceHead(4, 3, s=30, m=0.4)
    with torch.no_grad():
        cf.weight.copy_(torch.eye(4)[:, :3])
    assert cf.logits(emb[:1], torch.tensor([0]))[0, 0].item() == pytest.approx(30 * 0.6, abs=1e-5)


def _sharded_worker(rank, world, port, result_path):
    import torch.distributed as dist

    from ppfr.models.heads import ShardedMarginHead

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    full_w = torch.randn(16, 10) * 0.01
    emb = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(2))
    head = ShardedMarginHead(ArcFaceHead, 16, 10)
    with torch.no_grad():
        head.head.weight.copy_(full_w[:, head.offset : head.offset + head.local_classes])
    local_emb = emb[rank * 4 : (rank + 1) * 4].clone().requires_grad_(True)
    loss, _ = head(local_emb, labels[rank * 4 : (rank + 1) * 4])
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": local_emb.grad, "wgrad": head.head.weight.grad}, f"{result_path}.{rank}")
    dist.destroy_process_group()


def test_sharded_head_two_processes_equals_single(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sharded_worker, args=(2, port, str(tmp_path / "r")), nprocs=2, join=True)
    torch.manual_seed(0)
    full_w = torch.randn(16, 10) * 0.01
    emb = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    labels = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(2))
    head = ArcFaceHead(16, 10)
    with torch.no_grad():
        head.weight.copy_(full_w)
    loss, _ = head(emb, labels)
    loss.backward()
    parts = [torch.load(f"{tmp_path / 'r'}.{r}", weights_only=True) for r in range(2)]
    for r in range(2):
        torch.testing.assert_close(parts[r]["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(parts[r]["grad"], emb.grad[r * 4 : (r + 1) * 4], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([p["wgrad"] for p in parts], 1), head.weight.grad, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------------- checkpoint formats
def test_checkpoint_loaders_on_synthetic_files(tmp_path):
    src = IRNet(18)
    torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, tmp_path / "a.ckpt")
    dst = load_adaface(IRNet(18), tmp_path / "a.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, tmp_path / "Backbone_Epoch_24_checkpoint.pth")
    dst = load_tface_backbone(IRNet(18), tmp_path / "Backbone_Epoch_24_checkpoint.pth")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    pf = PFLDInference()
    torch.save({"pfld_backbone": pf.state_dict(), "auxiliarynet": {}}, tmp_path / "pfld.pth.tar")
    assert torch.equal(load_pfld(PFLDInference(), tmp_path / "pfld.pth.tar").fc.weight, pf.fc.weight)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_tface_backbone(IRNet(34), tmp_path / "Backbone_Epoch_24_checkpoint.pth")
    with pytest.raises(CheckpointError, match="pfld_backbone"):
        load_pfld(PFLDInference(), tmp_path / "a.ckpt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_hostile_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"state_dict": _Evil()}))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(CheckpointError, match="safely"):
            load_tface_backbone(IRNet(18), path)
        assert not (tmp_path / "pwned").exists()
    finally:
        os.chdir(cwd)


def test_profacec_server_stage_only_without_a_pretrained_server(tmp_path):
    """No server_ckpt: the run first trains the server recogniser; with one, only the client stage runs."""
    fresh = build_method("profacec", **OPTS["profacec"])
    assert [s.name for s in fresh.stages()] == ["server", "client"]
    torch.save({"model": {"server." + k: v for k, v in fresh.server.state_dict().items()}}, tmp_path / "server.pt")
    given = build_method("profacec", **dict(OPTS["profacec"], server_ckpt=str(tmp_path / "server.pt")))
    assert [s.name for s in given.stages()] == ["client"]


# ------------------------------------------------------------------------------------ DuetFace ROI
def test_duetface_template_roi_covers_the_face():
    from ppfr.methods.duetface import DuetFaceOptions, template_landmarks, template_roi
    from ppfr.models.faceapi import ARCFACE_TEMPLATE_112
    from ppfr.ops.roi_mask import roi_mask_ref

    assert DuetFaceOptions().roi == "template"  # the default: a fixed hull on the aligned template
    m = template_roi(112, 112)
    assert m.shape == (1, 1, 112, 112) and m.dtype == torch.float32 and set(m.unique().tolist()) == {0.0, 1.0}
    assert m[0, 0, 56, 56] == 1  # the face centre
    assert 0.2 <= m.mean().item() <= 0.8  # measured: 0.43
    for x, y in ARCFACE_TEMPLATE_112:  # the five ArcFace landmarks are inside, the corners outside
        assert m[0, 0, round(y), round(x)] == 1
    assert m[0, 0, 0, 0] == m[0, 0, 0, -1] == m[0, 0, -1, 0] == m[0, 0, -1, -1] == 0
    assert (m != m.flip(-1)).float().mean() < 0.02  # nearly mirror-symmetric, as the template is
    lm = template_landmarks(112)  # the layout's eye centres / nose / mouth corners sit on the ArcFace template
    five = np.stack([lm[60:68].mean(0), lm[68:76].mean(0), lm[54], lm[76], lm[82]])
    assert np.abs(five - ARCFACE_TEMPLATE_112).max() < 2.0
    assert torch.equal(m, roi_mask_ref(torch.from_numpy(lm)[None], 112).float())  # the ppfr.ops.roi_mask hull
    assert template_roi(112, 112) is m  # computed once per size and device
    d = build_method("duetface", depth=18, width=8).eval()
    with torch.no_grad():
        p = d.protect(_images(3))
    assert torch.equal(p.tensors["roi"], m.expand(3, 1, 112, 112))  # the same for every image
    p.tensors["roi"].zero_()
    assert template_roi(112, 112).sum() > 0  # a payload owns its copy: the cache is not aliased
    # the interactive mask is not the near-zero one an untrained PFLD gives: it is non-zero over the face
    with torch.no_grad():
        assert d.roi(_images(1)).mean() > 0.2


def test_duetface_pfld_roi_needs_landmark_ckpt(tmp_path):
    from ppfr.methods.duetface import DuetFaceOptions

    with pytest.raises(ValueError, match="landmark_ckpt"):
        DuetFaceOptions(roi="pfld")
    with pytest.raises(ValueError, match="roi='pfld' needs landmark_ckpt"):
        build_method("duetface", depth=18, roi="pfld")
    with pytest.raises(ValueError, match="landmark_ckpt is only used with roi='pfld'"):
        build_method("duetface", depth=18, landmark_ckpt="pfld.pth")
    with pytest.raises(ValueError, match="roi must be one of template, pfld, none"):
        build_method("duetface", depth=18, roi="hull")
    # the paper setting with a checkpoint: the detector is loaded, frozen and gives a per-image ROI
    pf = PFLDInference()
    torch.save({"pfld_backbone": pf.state_dict()}, tmp_path / "pfld.pth")
    m = build_method("duetface", depth=18, width=8, roi="pfld", landmark_ckpt=str(tmp_path / "pfld.pth")).eval()
    assert torch.equal(m.landmarks.fc.weight, pf.fc.weight) and not m.landmarks.fc.weight.requires_grad
    with torch.no_grad():
        roi = m.protect(_images(2)).tensors["roi"]
    assert roi.shape == (2, 1, 112, 112) and set(roi.unique().tolist()) <= {0.0, 1.0}
    assert build_method("duetface", depth=18, width=8, roi="none").roi(_images(2)).eq(1).all()


# ------------------------------------------------------------------------- PRO-Face C evaluation blurs
def test_profacec_eval_blur_variants_and_flip_default(methods, tmp_path):
    from ppfr.methods import load_method
    from ppfr.methods.profacec import EVAL_BLURS
    from ppfr.ops.blur import gaussian_blur, hybrid_blur, median_blur, pixelate

    m = methods["profacec"]
    x = _images(2)
    assert m.eval_flip is False  # the reference evaluates without flip TTA (METHODS §6.6)
    variants = m.eval_variants()
    assert list(variants) == list(EVAL_BLURS) == ["gaussian", "median", "pixelate", "hybrid"]
    assert variants["hybrid"] is None  # the method as configured (eval_blur=hybrid): the evaluator's main row
    want = {"gaussian": gaussian_blur(x, 31, 5.0), "median": median_blur(x, 13), "pixelate": pixelate(x, 7)}
    for kind, ref in want.items():
        with variants[kind]():
            got = m.protect(x).tensors["image"]
        assert torch.allclose(got, ref.clamp(-1, 1), atol=1e-6), kind
    # outside the context: the test hybrid (n=16, k=13, sigma=5, b=7, per-image layouts), reproducible by seed
    got = m.protect(x, generator=torch.Generator().manual_seed(3)).tensors["image"]
    ref = hybrid_blur(x, generator=torch.Generator().manual_seed(3), train=False)
    assert ref.params.n == 16 and torch.allclose(got, ref.image.clamp(-1, 1), atol=1e-6)
    # the configured blur and the flip default are options; the training blur is unaffected by blur_as
    other = build_method("profacec", **dict(OPTS["profacec"], eval_blur="median", eval_flip=True)).eval()
    assert other.eval_flip is True and other.eval_variants()["median"] is None
    assert torch.allclose(other.protect(x).tensors["image"], median_blur(x, 13).clamp(-1, 1), atol=1e-6)
    with pytest.raises(ValueError, match="eval_blur"):
        build_method("profacec", **dict(OPTS["profacec"], eval_blur="motion"))
    with pytest.raises(ValueError, match="blur kind"):
        with m.blur_as("motion"):
            pass
    # a paper-config model (server_ckpt named at training) rebuilds from its model.pt without the checkpoint file
    opts = dict(OPTS["profacec"], server_ckpt=str(tmp_path / "gone.ckpt"))
    torch.save({"model": m.state_dict(), "method": "profacec", "method_options": opts}, tmp_path / "model.pt")
    assert torch.equal(load_method(tmp_path / "model.pt").server.input_layer[0].weight, m.server.input_layer[0].weight)


def test_profacec_server_ckpt_required_marker():
    with pytest.raises(ValueError, match="server_ckpt is required"):
        build_method("profacec", **dict(OPTS["profacec"], server_ckpt="required"))


def test_ir100_stage_layout():
    with torch.device("meta"):
        net = IRNet(100, 3, 512, 112)
    assert list(net.stage_ends) == [2, 15, 45, 48] and len(net.body) == 49  # [3, 13, 30, 3] units (AdaFace IR-101)


# ------------------------------------------------------------------------------- MinusFace toy task
def test_minusface_toy_task_pixel_space():
    """The reference's TASK toy: U-Net 3 -> 3 g, IR f on X - g(X), one stage alpha L1 + beta ArcFace."""
    m = build_method("minusface", **dict(OPTS["minusface"], task="toy"))
    assert [s.name for s in m.stages()] == ["toy"] and not hasattr(m, "recognizer_p")
    assert m.generator.enc[0][0].in_channels == 3 and m.generator.head.out_channels == 3
    assert m.recognizer.input_layer[0].in_channels == 3
    x = _images(4)
    m.eval()
    with torch.no_grad():
        p = m.protect(x)
        assert torch.allclose(p.tensors["image"], x - m.generator(x)[0])
        assert m.recognize(p).shape == (4, OPTS["minusface"].get("embedding_size", 512))
    m.set_stage("toy")
    m.train()
    head = ArcFaceHead(m.options.embedding_size, 2)
    out = m.training_step("toy", x, torch.tensor([0, 1, 0, 1]), head)
    assert torch.isfinite(out["loss"]) and "l1" in out
    out["loss"].backward()
    assert m.generator.head.weight.grad is not None and m.recognizer.input_layer[0].weight.grad is not None
    with pytest.raises(ValueError, match="task"):
        build_method("minusface", task="pixel")
