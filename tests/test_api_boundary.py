"""The API boundary's value rules: indices must be integers (never truncated), and a method's server refuses
non-finite payloads (as the HTTP server does) instead of returning NaN embeddings."""

from __future__ import annotations

import pytest
import torch

import ppfr
from ppfr.ops.freq import freq_decode, freq_encode

SMALL = {"depth": 18, "width": 8}


@pytest.mark.parametrize("bad", [[0.5], [1, 2.0], [True, False], [[0.0, 1.0]]])
def test_float_or_bool_channel_indices_are_refused(bad):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with pytest.raises(TypeError, match="must hold integers"):
        freq_encode(x, bad)



def test_float_channel_indices_are_refused_by_decode():
    f = freq_encode(torch.rand(1, 3, 16, 16) * 2 - 1, [0])
    with pytest.raises(TypeError, match="must hold integers"):
        freq_decode(f, [0.5])


def test_integer_sequences_still_work():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(freq_encode(x, [3, 70]), freq_encode(x, torch.tensor([3, 70])))
    assert freq_encode(x, [[1, 2], [3, 4]]).shape == (2, 2, 16, 16)


@pytest.mark.parametrize("name, opts", [("arcface", {}), ("arcface_fd", {}), ("partialface", {}),
                                        ("duetface", {"roi": "none"}), ("minusface", {"gen_width": 4}),
                                        ("profacec", {})])  # fmt: skip
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_recognize_refuses_non_finite_payloads(name, opts, value):
    m = ppfr.build_method(name, **SMALL, **opts).eval()
    with torch.no_grad():
        p = m.protect(torch.rand(2, 3, 112, 112) * 2 - 1, generator=torch.Generator().manual_seed(0))
        t = next(iter(p.tensors))
        p.tensors[t] = p.tensors[t].clone()
        p.tensors[t][1, 0, 0, 0] = value
        with pytest.raises(ValueError, match="non-finite"):
            m.recognize(p)
