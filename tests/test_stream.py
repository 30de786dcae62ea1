"""Shard streaming: manifest indexing, exact partition over workers and ranks, λ-aware batches."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from engine.errors import BadInputError
from seg.batches import AugmentConfig, MixedBatches, augment
from seg.schemes import AdaptiveConfig, SchemeConfig
from seg.stream import EpochDataset, endless, index_manifests, one_pass
from seg_fixtures import make_real, make_synthetic

LAMS = (0.2, 0.5, 1.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg_stream")
    return make_real(root), make_synthetic(root, LAMS)


def keys_of(loader) -> list[str]:
    return [item[0] for item in loader]


def test_index_groups_by_split_and_lambda_and_ignores_skipped(data):
    index = index_manifests(list(data))
    assert index.class_names == ["background", "red", "green", "blue"]
    assert len(index.real) == 24 and len(index.val) == 8
    assert index.lambdas == [0.2, 0.5, 1.0]
    assert all(len(g) == 24 for g in index.synthetic.values())
    all_keys = set().union(*index.real.allowed.values())
    assert "broken0001" not in all_keys and all(k.startswith("train") for k in all_keys)


def test_low_data_subset_restricts_synthetic_to_same_sources(data):
    index = index_manifests(list(data), real_fraction=0.25, subset_seed=3)
    real_ids = set().union(*index.real.allowed.values())
    assert len(real_ids) == 6 and len(index.val) == 8  # val kept whole
    for group in index.synthetic.values():
        sources = {k.split("__")[0] for k in set().union(*group.allowed.values())}
        assert sources == real_ids
    again = index_manifests(list(data), real_fraction=0.25, subset_seed=3)
    assert set().union(*again.real.allowed.values()) == real_ids  # the subset is fixed


@pytest.mark.parametrize("which", ["real", "val", "lam"])
def test_epoch_exactly_once_across_two_workers(data, which):
    """real: 3 shards (split by shard), val: 1 shard (split by sample), λ: shards mixing λ values."""
    index = index_manifests(list(data))
    group = {"real": index.real, "val": index.val, "lam": index.synthetic[0.5]}[which]
    expected = set().union(*group.allowed.values())
    loader = DataLoader(EpochDataset(group, shuffle_buffer=16, seed=1), batch_size=None, num_workers=2)
    got = keys_of(loader)
    assert len(got) == len(expected) and set(got) == expected


@pytest.mark.parametrize("which", ["real", "val"])
def test_epoch_partitioned_across_ranks(data, which, monkeypatch):
    index = index_manifests(list(data))
    group = index.real if which == "real" else index.val
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append(keys_of(EpochDataset(group, shuffle_buffer=8, seed=5)))
    a, b = map(set, per_rank)
    assert a and b and not a & b
    assert sorted(per_rank[0] + per_rank[1]) == sorted(set().union(*group.allowed.values()))


def test_ranks_times_workers_partition(data, monkeypatch):
    index = index_manifests(list(data))
    got = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        got += keys_of(DataLoader(EpochDataset(index.synthetic[1.0], shuffle_buffer=8), batch_size=None, num_workers=2))
    assert Counter(got) == Counter(set().union(*index.synthetic[1.0].allowed.values()))


def test_shuffle_changes_order_per_epoch_not_content(data):
    index = index_manifests(list(data))
    e0 = [s.key for s in one_pass(index.real, epoch=0, seed=0, shuffle_buffer=32)]
    e1 = [s.key for s in one_pass(index.real, epoch=1, seed=0, shuffle_buffer=32)]
    assert sorted(e0) == sorted(e1) and e0 != e1


def test_lambda_streams_only_yield_their_lambda(data):
    index = index_manifests(list(data))
    for lam in LAMS:
        samples = list(itertools.islice(endless(index.synthetic[lam], seed=0, shuffle_buffer=8), 30))  # > one pass
        assert {s.lam for s in samples} == {lam}
        assert len({s.key for s in samples}) == 24  # a full pass, then the next one


def test_mixed_batches_follow_scheme_and_step_order(data):
    index = index_manifests(list(data))
    scheme = SchemeConfig(name="adaptive", synth_fraction=0.5, adaptive=AdaptiveConfig(schedule="linear", ramp_fraction=1.0))
    ds = MixedBatches(index, scheme, batch_size=8, total_steps=12, augment_cfg=AugmentConfig(crop=24), seed=0, shuffle_buffer=8)
    batches = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert [b["step"] for b in batches] == list(range(12))
    assert batches[0]["image"].shape == (8, 3, 24, 24) and batches[0]["scribble"].dtype == torch.int64
    all_lams = Counter(x for b in batches for x in b["lam"].tolist())
    assert abs(all_lams[0.0] / 96 - 0.5) < 0.15  # synth_fraction 0.5
    for b in batches:  # never above the curriculum's current maximum: 0.2 + 0.8 * progress
        assert b["lam"].max().item() <= 0.2 + 0.8 * b["step"] / 12 + 1e-9
    assert set(batches[0]["lam"].tolist()) == {0.0, 0.2}
    assert 0.5 in {x for b in batches[-3:] for x in b["lam"].tolist()}
    scribbles = torch.cat([b["scribble"].flatten() for b in batches])
    assert set(scribbles.unique().tolist()) <= {0, 1, 2, 3, 255}


def test_mixed_batches_resume_starts_at_step(data):
    index = index_manifests(list(data))
    ds = MixedBatches(index, SchemeConfig(name="real"), 4, 10, AugmentConfig(crop=16), start_step=7, shuffle_buffer=4)
    batches = list(ds)
    assert [b["step"] for b in batches] == [7, 8, 9]
    assert all(b["lam"].eq(0).all() for b in batches)


def test_mixed_batches_errors(data):
    real, synth = data
    only_real = index_manifests([real])
    with pytest.raises(BadInputError, match="synthetic manifest"):
        MixedBatches(only_real, SchemeConfig(name="adaptive"), 4, 10, AugmentConfig())
    with pytest.raises(BadInputError, match="real training samples"):
        MixedBatches(index_manifests([synth]), SchemeConfig(name="uniform"), 4, 10, AugmentConfig())
    with pytest.raises(BadInputError, match="no manifest records class names|manifest not found"):
        index_manifests([real.parent / "missing.parquet"])


def test_augment_keeps_image_and_labels_aligned():
    rng = np.random.default_rng(0)
    labels = np.zeros((40, 40), np.uint8)
    labels[5:25, 10:35] = 1
    labels[28:38, 2:20] = 2
    image = np.zeros((40, 40, 3), np.uint8)
    image[..., 0] = labels * 100
    cfg = AugmentConfig(crop=48, scale_min=0.6, scale_max=1.8, hflip=True)
    for _ in range(10):
        x, (scrib, mask) = augment(image, [labels, labels.copy()], cfg, rng)
        assert x.shape == (3, 48, 48) and torch.equal(scrib, mask)
        red = (x[0] * 0.229 + 0.485) * 255
        valid = scrib != 255
        agree = ((red[valid] / 100).round() == scrib[valid].float()).float().mean()
        assert agree > 0.93
        assert (x[:, ~valid] == 0).all() or valid.all()  # padding: image 0 (mean), labels 255
