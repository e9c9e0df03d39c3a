"""Tests of PartialFace rank sampling (ppfr/ops/sample_ranks.py) against METHODS.md §4.2."""

from __future__ import annotations

import pytest
import torch

import ppfr
from ppfr.ops.freq import freq_encode_ref
from ppfr.ops.sample_ranks import (
    CODE_PERMS, CODE_SUBSETS, KEPT, LABEL_CHOICES, PRUNED, RankSpace, partialface_batch_ref, sample_ranks,
    sample_ranks_ref,
)  # fmt: skip


def test_code_tables_match_spec():
    assert PRUNED == (0, 1, 2, 3, 8, 9, 10, 16, 17, 24)
    assert all((k // 8) + (k % 8) <= 3 for k in PRUNED) and len(KEPT) == 54
    flat = sorted(k for row in CODE_SUBSETS for k in row)
    assert flat == list(KEPT)  # the six subsets partition the kept channels
    assert LABEL_CHOICES[0] == (0, 1, 2) and LABEL_CHOICES[19] == (3, 4, 5) and len(LABEL_CHOICES) == 20


def test_channel_table_layout():
    table = RankSpace.code().channel_table()
    assert table.shape == (6, 3, 27)
    # subset 0, permutation 1: new position j takes old position P[j]; colour-major
    want = [CODE_SUBSETS[0][p] for p in CODE_PERMS[1]]
    assert table[0, 1, :9].tolist() == want
    assert table[0, 1, 9:18].tolist() == [64 + k for k in want]
    assert table[0, 1, 18:].tolist() == [128 + k for k in want]


@pytest.mark.parametrize("rule", ["label", "uniform"])
def test_vectorised_equals_per_sample_loop(rule):
    labels = torch.randint(0, 1000, (257,))
    a = sample_ranks(labels, rule=rule, generator=torch.Generator().manual_seed(3))
    b = sample_ranks_ref(labels, rule=rule, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.channels, b.channels) and torch.equal(a.subset, b.subset) and torch.equal(a.perm, b.perm)
    assert a.channels.shape == (257, 27) and a.channels.dtype == torch.int64


def test_label_rule_restricts_subsets():
    labels = torch.arange(40).repeat(50)
    r = sample_ranks(labels, generator=torch.Generator().manual_seed(0))
    for y in range(40):
        used = set(r.subset[labels == y].tolist())
        assert used <= set(LABEL_CHOICES[y % 20])
        assert len(used) == 3  # 50 draws: all three allowed subsets appear
    assert set(r.perm.tolist()) == {0, 1, 2}


def test_uniform_rule_and_generated_spaces():
    space = RankSpace.generate(s=6, m=9, n=12, seed=5)
    r = sample_ranks(batch=500, rule="uniform", space=space, generator=torch.Generator().manual_seed(1))
    assert r.channels.shape == (500, 18)
    assert set(r.subset.tolist()) == set(range(9)) and set(r.perm.tolist()) == set(range(12))
    assert not set((r.channels % 64).flatten().tolist()) & set(PRUNED)  # never a pruned frequency
    assert RankSpace.generate(seed=5) == RankSpace.generate(seed=5)  # keyed: reproducible
    assert RankSpace.paper().n == 6 and RankSpace.paper().perms[:3] == CODE_PERMS


def test_determinism_under_seed():
    labels = torch.arange(64)
    a = sample_ranks(labels, generator=torch.Generator().manual_seed(9)).channels
    b = sample_ranks(labels, generator=torch.Generator().manual_seed(9)).channels
    c = sample_ranks(labels, generator=torch.Generator().manual_seed(10)).channels
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_one_pass_encode_equals_reference_batch_path():
    x = torch.rand(5, 3, 16, 16, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 7, 19, 20, 123])
    want = partialface_batch_ref(x, labels, generator=torch.Generator().manual_seed(4))
    ranks = sample_ranks(labels, generator=torch.Generator().manual_seed(4))
    got = ppfr.freq_encode(x, ranks.channels, backend="cpp")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    assert torch.equal(freq_encode_ref(x, ranks.channels), want)  # pure index semantics: bit-exact


def test_errors():
    with pytest.raises(ValueError, match="needs labels"):
        sample_ranks(batch=4)
    with pytest.raises(ValueError, match="rule"):
        sample_ranks(torch.arange(3), rule="zigzag")
    with pytest.raises(ValueError, match="1-D integer"):
        sample_ranks(torch.zeros(3))
    with pytest.raises(ValueError, match="m=6"):
        sample_ranks(torch.arange(3), space=RankSpace.generate(m=5))
    with pytest.raises(ValueError, match="s\\*m"):
        RankSpace.generate(s=10, m=6)
    with pytest.raises(ValueError, match="disjoint"):
        RankSpace(((1, 2), (2, 3)), ((0, 1),))
