"""The paper's other schemes (issue 24): ``append`` with ``aug_ratio``, ``best_k``,
``replacement`` and ``synth_only`` then real, each against a transcription of the paper's
dataset indexing (rloss ``dataloaders/datasets/pascal.py``) and learning-rate schedule
(``utils/lr_scheduler.py``); the λ-aware schemes' batches unchanged by them."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

import seg.train as seg_train
from engine.config import from_dict, load_config
from engine.errors import BadInputError
from experiments.sweep import SweepConfig, plan_seg_runs, seg_config_for
from seg.batches import AugmentConfig, MixedBatches
from seg.best import best_keys, load_best_dict, select_best
from seg.budget import plan_budget
from seg.schemes import SchemeConfig, allowed_lambdas, draw_lambdas, lr_progress, synthetic_count
from seg.stream import index_manifests
from seg_fixtures import make_real, make_synthetic

LAMS = (0.5, 1.0)
N_TRAIN = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_schemes")
    return make_real(root, n_train=N_TRAIN, n_val=2), make_synthetic(root, LAMS, n_train=N_TRAIN, seeds=(0, 1))


# -- a transcription of the paper's dataset (pascal.py: __len__ and _make_img_gt_point_pair) ----------------
def paper_epoch(scheme: str, count: int, aug_ratio: int = 1, use_all: bool = False, p: float = 0.0,
                best: dict[int, list[int]] | None = None, gen: torch.Generator | None = None) -> list[tuple[str, int, int]]:
    """(kind, source index, synthetic instance) of every index of one epoch, as the paper's
    VOCSegmentation resolves it (instance -1 for a real sample; instances 0..7 exist with use_all)."""
    length = count if scheme in ("none", "replacement") else aug_ratio * count if scheme == "synth-only" else (1 + aug_ratio) * count
    out = []
    for index in range(length):
        if index < count and scheme != "synth-only":
            if scheme == "replacement" and torch.rand((1,), generator=gen).item() <= p:
                out.append(("synth", index, 0))
            else:
                out.append(("real", index, -1))
        elif use_all:
            out.append(("synth", index % count, int(torch.randint(8, (1,), generator=gen).item())))
        else:
            instance = index // count - (0 if scheme == "synth-only" else 1)
            out.append(("synth", index % count, best[index % count][instance] if best else instance))
    return out


def ranking_of(index) -> dict[str, list[str]]:
    """Source id -> its synthetic keys in the index, in key order (a dictionary the way ``best_k`` reads it)."""
    out: dict[str, list[str]] = {}
    for key in sorted(k for group in index.synthetic.values() for keys in group.allowed.values() for k in keys):
        out.setdefault(key.split("__")[0], []).append(key)
    return out


def paper_lr(epoch: int, i: int, epochs: int, iters: int, start_epoch: int = 0) -> float:
    """The paper's poly factor (LR_Scheduler, mode poly) at iteration ``i`` of ``epoch``."""
    n = (epochs - start_epoch) * iters
    return (1 - ((epoch - start_epoch) * iters + i) / n) ** 0.9


# -- append, --aug-ratio K ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_append_epoch_and_share_are_the_papers(k):
    count, batch = 30, 4
    epoch = paper_epoch("normal", count, aug_ratio=k, use_all=True, gen=torch.Generator().manual_seed(k))
    kinds = Counter(kind for kind, _, _ in epoch)
    assert Counter(src for kind, src, _ in epoch if kind == "synth") == {s: k for s in range(count)}  # K a source
    budget = plan_budget(SchemeConfig(name="append", aug_ratio=k), "paper_epochs", 0, 60, batch, count, {0.5: count, 1.0: count})
    assert budget.steps_per_epoch == math.ceil(len(epoch) / batch) and budget.steps == 60 * budget.steps_per_epoch
    assert budget.synth_fraction == kinds["synth"] / len(epoch) == k / (k + 1)
    rng = np.random.default_rng(0)
    scheme = SchemeConfig(name="append", aug_ratio=k, synth_fraction=budget.synth_fraction)
    drawn = sum(synthetic_count(batch, scheme, rng) for _ in range(4000))
    assert abs(drawn / (4000 * batch) - k / (k + 1)) < 0.01


def test_append_share_does_not_depend_on_synth_fraction():
    cfg = SchemeConfig(name="append", aug_ratio=4, synth_fraction=0.1)
    assert plan_budget(cfg, "steps", 100, 0, 8, 20, {1.0: 20}).synth_fraction == 0.8


def test_pool_schemes_draw_every_synthetic_sample_alike():
    """The paper's concatenated dataset holds each synthetic image once: a set is drawn by its size."""
    sizes = {0.5: 30, 1.0: 10}
    for name in ("append", "replacement", "synth_only"):
        assert allowed_lambdas(SchemeConfig(name=name), list(sizes), 0.2, sizes) == ([0.5, 1.0], [0.75, 0.25])
    drawn = Counter(draw_lambdas(SchemeConfig(name="append"), list(sizes), 0.0, 20_000, np.random.default_rng(1), sizes))
    assert abs(drawn[0.5] / 20_000 - 0.75) < 0.01


# -- best_k, --aug-scheme best --aug-best-dict ---------------------------------------------------------------
def test_best_k_trains_on_the_samples_the_papers_dictionary_picks():
    count, k = 5, 2
    ranking = {s: [(s + j) % 4 for j in range(4)] for s in range(count)}  # the paper's file: dataset numbers, best first
    epoch = paper_epoch("best", count, aug_ratio=k, best=ranking)
    paper_picked = {(src, inst) for kind, src, inst in epoch if kind == "synth"}
    keys = {f"s{s}": {f"s{s}_d{d}" for d in range(4)} for s in range(count)}
    ours = select_best({f"s{s}": [f"s{s}_d{d}" for d in r] for s, r in ranking.items()}, k, keys, "test")
    assert ours == {f"s{s}_d{d}" for s, d in paper_picked} and len(epoch) - count == len(ours) == k * count


def test_best_k_scores_rank_highest_first(tmp_path):
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"a": {"a_1": 0.2, "a_2": 0.9, "a_3": 0.5}, "b": ["b_2", "b_1"]}))
    assert load_best_dict(path) == {"a": ["a_2", "a_3", "a_1"], "b": ["b_2", "b_1"]}


def test_best_k_keeps_only_the_selected_samples_and_shares_k_over_k_plus_1(data, tmp_path):
    real, synth = data
    path = tmp_path / "best.json"
    path.write_text(json.dumps({src: keys[::-1] for src, keys in ranking_of(index_manifests([real, synth])).items()}))
    chosen = best_keys(path, 2, [real, synth], "train")
    kept = index_manifests([real, synth], keep_synthetic=chosen)
    assert {k for g in kept.synthetic.values() for keys in g.allowed.values() for k in keys} == chosen
    assert len(chosen) == 2 * N_TRAIN
    sizes = {lam: len(g) for lam, g in kept.synthetic.items()}
    budget = plan_budget(SchemeConfig(name="best_k", best_dict=str(path), best_k=2), "steps", 10, 0, 4, N_TRAIN, sizes)
    assert budget.synth_fraction == pytest.approx(2 / 3)


def test_best_k_bad_inputs_are_named(data, tmp_path):
    real, synth = data
    with pytest.raises(BadInputError, match="scheme.best_dict"):
        SchemeConfig(name="best_k").validate()
    with pytest.raises(BadInputError, match="no such file"):
        best_keys(tmp_path / "missing.json", 1, [real, synth], "train")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BadInputError, match="not a readable JSON"):
        best_keys(bad, 1, [real, synth], "train")
    bad.write_text(json.dumps({"train0000": [1, 2]}))
    with pytest.raises(BadInputError, match="list of sample keys"):
        load_best_dict(bad)
    keys = {"a": {"a1", "a2"}, "b": {"b1"}}
    with pytest.raises(BadInputError, match="'b'.*no entry"):
        select_best({"a": ["a1"]}, 1, keys, "w")
    with pytest.raises(BadInputError, match="fewer than scheme.best_k=2"):
        select_best({"a": ["a1", "a2"], "b": ["b1"]}, 2, keys, "w")
    with pytest.raises(BadInputError, match="'a9', which no given manifest holds"):
        select_best({"a": ["a9"], "b": ["b1"]}, 1, keys, "w")


# -- replacement, --aug-scheme replacement --replacement-prob p ----------------------------------------------
def test_replacement_tosses_one_coin_per_sample_like_the_paper():
    count, batch, p = 6000, 6, 0.3
    epoch = paper_epoch("replacement", count, p=p, gen=torch.Generator().manual_seed(0))
    assert len(epoch) == count  # the epoch is the real set; some of it swapped
    paper_batches = [sum(kind == "synth" for kind, _, _ in epoch[i : i + batch]) for i in range(0, count, batch)]
    rng = np.random.default_rng(0)
    ours = [synthetic_count(batch, SchemeConfig(name="replacement", replace_p=p), rng) for _ in range(len(paper_batches))]
    for got in (paper_batches, ours):  # binomial(6, 0.3): mean 1.8, variance 1.26 (stochastic rounding's is 0.16)
        assert abs(np.mean(got) - batch * p) < 0.08 and abs(np.var(got) - batch * p * (1 - p)) < 0.15
    budget = plan_budget(SchemeConfig(name="replacement", replace_p=p), "paper_epochs", 0, 2, batch, count, {1.0: count})
    assert budget.steps_per_epoch == count // batch and budget.synth_fraction == p


# -- synth_only then real: --aug-scheme synth-only, then --resume --lr-start 60 --epochs 120 -----------------------
def test_replacement_from_the_source_swaps_in_that_sources_first_sample(data):
    """The paper's ``synth_data[index][0]``: the replaced sample's own source, its first instance
    (smallest key, computed here from the manifest), at the λ drawn."""
    import pyarrow.parquet as pq

    from seg.batches import SourceReplacements
    from seg.stream import decode_record, read_records

    real, synth = data
    index = index_manifests([real, synth])
    rows = pq.read_table(synth, columns=["key", "source_id", "lambda"]).to_pylist()
    first = {(r["source_id"], r["lambda"]): min(x["key"] for x in rows if (x["source_id"], x["lambda"]) == (r["source_id"], r["lambda"]))
             for r in rows}
    replacements = SourceReplacements(index, list(LAMS))
    reals = [decode_record(record) for _, record in read_records(index.real)]
    assert len(reals) == N_TRAIN
    for sample in reals:
        for lam in LAMS:
            swapped = replacements(sample, lam)
            assert swapped.meta["source_id"] == sample.key and swapped.meta["lambda"] == lam
            assert swapped.key == first[(sample.key, lam)]
            assert np.array_equal(swapped.scribble, sample.scribble) and not np.array_equal(swapped.image, sample.image)


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_replacement_from_the_source_draws_only_real_samples_and_swaps_the_coins(data, monkeypatch, p):
    from seg.batches import SourceReplacements

    real, synth = data
    index = index_manifests([real, synth])
    opened, swapped = [], []
    original_stream, original_call = MixedBatches._stream, SourceReplacements.__call__
    monkeypatch.setattr(MixedBatches, "_stream", lambda self, lam: opened.append(lam) or original_stream(self, lam))
    monkeypatch.setattr(SourceReplacements, "__call__",
                        lambda self, sample, lam: swapped.append((sample.key, lam)) or original_call(self, sample, lam))
    scheme = SchemeConfig(name="replacement", replace_p=p, replace_from="source")
    batches = list(MixedBatches(index, scheme, 4, 8, AugmentConfig(crop=24), seed=3))
    assert opened == [0.0]  # no synthetic pool is streamed: every sample starts as a real one
    n_synth = sum(int((b["lam"] > 0).sum()) for b in batches)
    assert len(swapped) == n_synth and {k for k, _ in swapped} <= index.real_sources and {lam for _, lam in swapped} <= set(LAMS)
    assert (n_synth == 32) if p == 1.0 else (0 < n_synth < 32)
    # the pool's replacement is unchanged: it streams the synthetic sets
    opened.clear()
    list(MixedBatches(index, SchemeConfig(name="replacement", replace_p=1.0), 4, 2, AugmentConfig(crop=24)))
    assert 0.0 not in opened and set(opened) <= set(LAMS)


def test_replacement_from_the_source_refuses_sources_without_a_synthetic_sample(data, tmp_path):
    real, _ = data
    partial = make_synthetic(tmp_path, LAMS, n_train=N_TRAIN - 2)
    with pytest.raises(BadInputError, match="real train source 'train0004'.*2 such source.*replace_from: pool"):
        MixedBatches(index_manifests([real, partial]), SchemeConfig(name="replacement", replace_from="source"), 4, 2,
                     AugmentConfig(crop=24))
    MixedBatches(index_manifests([real, partial]), SchemeConfig(name="replacement"), 4, 2, AugmentConfig(crop=24))  # pool: fine
    with pytest.raises(BadInputError, match="no real train samples"):  # nothing to replace
        MixedBatches(index_manifests([partial]), SchemeConfig(name="replacement", replace_from="source", synth_fraction=1.0),
                     4, 2, AugmentConfig(crop=24))


def test_synth_only_phases_and_learning_rate_follow_the_papers_two_runs():
    count, k, batch, epochs = 8, 2, 4, 3
    synth_epoch = paper_epoch("synth-only", count, aug_ratio=k)
    assert {kind for kind, _, _ in synth_epoch} == {"synth"} and len(synth_epoch) == k * count
    iters1, iters2 = len(synth_epoch) // batch, count // batch
    paper = [paper_lr(e, i, epochs, iters1) for e in range(epochs) for i in range(iters1)]
    paper += [paper_lr(e, i, 2 * epochs, iters2, start_epoch=epochs) for e in range(epochs, 2 * epochs) for i in range(iters2)]
    budget = plan_budget(SchemeConfig(name="synth_only", synth_share="paper_epoch"), "paper_epochs", 0, epochs, batch,
                         count, {0.5: count, 1.0: count})
    assert budget.steps == len(paper) == epochs * (iters1 + iters2)
    scheme = SchemeConfig(name="synth_only", synth_fraction=budget.synth_fraction)
    ours = [(1 - lr_progress(scheme, s / budget.steps)) ** 0.9 for s in range(budget.steps)]
    assert ours == pytest.approx(paper, abs=1e-9)
    rng = np.random.default_rng(0)
    counts = [synthetic_count(batch, scheme, rng, s / budget.steps) for s in range(budget.steps)]
    assert counts == [batch] * (epochs * iters1) + [0] * (epochs * iters2)


def test_learning_rate_of_the_other_schemes_is_the_runs_own():
    for name in ("real", "fixed", "uniform", "adaptive", "append", "replacement", "best_k"):
        assert lr_progress(SchemeConfig(name=name), 0.37) == 0.37


# -- bad inputs and the λ-aware schemes unchanged ------------------------------------------------------------
@pytest.mark.parametrize("key, value, match", [("replace_p", 1.5, "probability"), ("aug_ratio", 0, "integer >= 1"),
                                               ("best_k", 2.5, "integer >= 1"), ("aug_ratio", True, "integer >= 1"),
                                               ("replace_from", "own", "choose one of")])
def test_bad_scheme_settings_are_refused(key, value, match):
    with pytest.raises(BadInputError, match=match):
        SchemeConfig(name="append", **{key: value}).validate()


def batch_digest(index, scheme: SchemeConfig) -> str:
    """The λ and scribble of every sample of 6 batches (integers: the same on every platform)."""
    h = hashlib.sha256()
    for batch in MixedBatches(index, scheme, 5, 6, AugmentConfig(crop=24), seed=7, shuffle_buffer=8):
        h.update(batch["lam"].numpy().tobytes() + batch["scribble"].numpy().tobytes())
    return h.hexdigest()[:16]


# Recorded with the code before the paper's other schemes existed.
BEFORE = {"real": "fee85892a374ea67", "fixed": "4212b4d63e9e88a1", "uniform": "7088b7438aba21c8", "adaptive": "06a73a11a39a8b63"}


@pytest.mark.parametrize("name", list(BEFORE))
def test_lambda_aware_schemes_draw_the_batches_they_drew_before(data, name):
    real, synth = data
    scheme = SchemeConfig(name=name, fixed_lambda=0.5 if name == "fixed" else None)
    assert batch_digest(index_manifests([real, synth]), scheme) == BEFORE[name]


def test_pool_schemes_stream_through_mixed_batches(data):
    real, synth = data
    index = index_manifests([real, synth])
    only = list(MixedBatches(index, SchemeConfig(name="synth_only", synth_fraction=0.5), 4, 6, AugmentConfig(crop=24)))
    assert [bool((b["lam"] > 0).all()) for b in only] == [True] * 3 + [False] * 3
    assert [bool((b["lam"] == 0).all()) for b in only] == [False] * 3 + [True] * 3
    appended = list(MixedBatches(index, SchemeConfig(name="append", synth_fraction=0.75), 4, 4, AugmentConfig(crop=24)))
    assert sum(int((b["lam"] > 0).sum()) for b in appended) == 12


# -- the sweep runs them ---------------------------------------------------------------------------------------
def test_the_sweep_plans_and_configures_the_papers_schemes():
    arms = {"real": {"scheme": "real"},
            "best2": {"scheme": "best_k", "lambdas": [0.5, 1.0], "set": {"scheme.best_dict": "best.json", "scheme.best_k": 2}}}
    sweep = lambda arms: from_dict(SweepConfig, {  # noqa: E731
        "grid": {"w": [2.0], "lambdas": [0.5, 1.0]},
        "studies": {"schemes": {"w": 2.0, "names": ["real", "append", "replacement", "synth_only"]},
                    "arms": {"enabled": True, "w": 2.0, "arms": arms}},
    })
    cfg = sweep(arms)
    runs = {r.name: r for r in plan_seg_runs(cfg)}
    assert {"append-w2p00-l0p50_1p00-seed0", "replacement-w2p00-l0p50_1p00-seed0", "synth_only-w2p00-l0p50_1p00-seed0",
            "arm-best2-seed0"} <= set(runs)
    best = seg_config_for(cfg, runs["arm-best2-seed0"]).scheme
    assert (best.name, best.best_dict, best.best_k) == ("best_k", "best.json", 2)
    with pytest.raises(BadInputError, match="scheme.best_dict"):  # refused when the sweep config loads
        sweep({**arms, "nodict": {"scheme": "best_k", "lambdas": [1.0]}})


def test_synth_only_and_best_k_train_end_to_end(data, tmp_path):
    """A few steps through seg.train: the synthetic phase, the real one with its restarted
    learning rate, and best_k reading its dictionary."""
    real, synth = map(str, data)
    fast = ["train.steps=8", "train.batch_size=2", "augment.crop=24", "data.workers=0", "train.log_every=1",
            "train.eval_every=8", "train.checkpoint_every=8", "model.width=8", "log.tensorboard=false"]
    cfg = load_config(seg_train.SegConfig, None, [*fast, "scheme.name=synth_only", "scheme.synth_fraction=0.5"])
    seg_train.train(cfg, [real, synth], tmp_path / "only")
    entries = [json.loads(x) for x in (tmp_path / "only" / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in entries if "lr" in e]
    assert [e["synth_share"] for e in steps] == [1.0] * 4 + [0.0] * 4
    assert steps[4]["lr"] == steps[0]["lr"] > steps[3]["lr"]  # the real phase starts again from the base rate
    best = tmp_path / "best.json"
    best.write_text(json.dumps(ranking_of(index_manifests([real, synth]))))
    cfg = load_config(seg_train.SegConfig, None, [*fast, "scheme.name=best_k", f"scheme.best_dict={best}", "scheme.best_k=1"])
    summary = seg_train.train(cfg, [real, synth], tmp_path / "best")
    assert sum(summary["synthetic_samples"].values()) == N_TRAIN
