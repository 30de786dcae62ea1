"""Work plan: deterministic units, single (w, λ) per shard, stable seeds, config validation."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from engine.config import load_config
from engine.errors import BadInputError
from engine.generate.config import GenerateConfig, PlanConfig
from engine.generate.plan import Source, build_plan, plan_units, sample_seed, shard_prefix
from engine.manifest import DatasetInfo, read_manifest, write_manifest
from engine.shards import synthetic_key
from gen_fixtures import CLASS_NAMES, make_real_set

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    return make_real_set(tmp_path_factory.mktemp("real"), n_train=6, n_val=2)


def _cfg(**kw) -> PlanConfig:
    cfg = PlanConfig(w=[1.0, 2.0], lambdas=[0.3, 1.0], samples_per_source=2, samples_per_shard=5, seed=7)
    cfg = replace(cfg, **kw)
    cfg.validate()
    return cfg


def test_plan_covers_sources_w_lambda_k_once_with_single_w_lambda_shards(real: Path) -> None:
    plan = build_plan(_cfg(), real)
    assert [s.source_id for s in plan.sources] == [f"tr{i:03d}" for i in range(6)]  # train, status ok only
    assert plan.class_names == CLASS_NAMES
    # 6 sources x 2 w x 2 λ x 2 samples = 48 samples; 12 per (w, λ) -> shards of 5, 5, 2
    assert plan.num_samples == 48 and len(plan.units) == 4 * 3
    assert [len(u.items) for u in plan.units[:3]] == [5, 5, 2]
    keys = [k for u in plan.units for k in u.keys]
    assert len(set(keys)) == 48
    for unit in plan.units:
        prefix = shard_prefix(unit.w, unit.lam)
        assert re.fullmatch(rf"{prefix}-\d{{6}}\.tar", unit.shard)
        for item in unit.items:  # every key encodes this unit's (w, λ) and its own seed
            assert item.key == synthetic_key(item.source_id, unit.w, unit.lam, item.seed)
            assert Path(item.source_shard).is_file()
    assert plan.units[0].shard == "syn-w1p00-l0p30-000000.tar"
    assert plan.units[-1].shard == "syn-w2p00-l1p00-000002.tar"
    names = [u.shard for u in plan.units]
    assert len(set(names)) == len(names) and [u.index for u in plan.units] == list(range(12))
    per_source = {}
    for u in plan.units:
        for it in u.items:
            per_source.setdefault((it.source_id, u.w, u.lam), []).append(it.seed)
    assert all(len(set(s)) == 2 for s in per_source.values()) and len(per_source) == 24


def test_plan_is_deterministic_and_seeds_do_not_depend_on_sharding(real: Path) -> None:
    a, b = build_plan(_cfg(), real), build_plan(_cfg(), real)
    assert a.units == b.units and a.fingerprint() == b.fingerprint()
    seeds = {it.key: it.seed for u in a.units for it in u.items}
    resharded = build_plan(_cfg(samples_per_shard=3), real)
    assert {it.key: it.seed for u in resharded.units for it in u.items} == seeds
    assert resharded.fingerprint() != a.fingerprint()
    fewer = build_plan(_cfg(max_sources=2), real)  # a sample's seed ignores the other sources
    assert all(seeds[it.key] == it.seed for u in fewer.units for it in u.items)
    assert fewer.num_samples == 16
    assert build_plan(_cfg(seed=8), real).fingerprint() != a.fingerprint()
    item = a.units[0].items[0]
    assert item.seed == sample_seed(7, item.source_id, 1.0, 0.3, 0) < 2**31


def test_seed_collisions_are_rehashed_deterministically(monkeypatch) -> None:
    import engine.generate.plan as plan_mod

    calls = []
    real_seed = plan_mod.sample_seed

    def colliding(base, source_id, w, lam, k):  # every k gets the same seed unless salted
        calls.append(source_id)
        return real_seed(base, source_id, w, lam, 0 if "#" not in source_id else k)

    monkeypatch.setattr(plan_mod, "sample_seed", colliding)
    units = plan_units([Source("a", "x.tar")], PlanConfig(w=[2.0], lambdas=[0.5], samples_per_source=3))
    seeds = [it.seed for it in units[0].items]
    assert len(set(seeds)) == 3
    assert units == plan_units([Source("a", "x.tar")], PlanConfig(w=[2.0], lambdas=[0.5], samples_per_source=3))


@pytest.mark.parametrize(
    "override, field",
    [
        ("plan.lambdas=[0.0, 0.5]", "plan.lambdas"),
        ("plan.lambdas=1.5", "plan.lambdas"),
        ("plan.lambdas=[]", "plan.lambdas"),
        ("plan.lambdas=[0.5, 0.501]", "plan.lambdas"),
        ("plan.w=-1", "plan.w"),
        ("plan.w=[two]", "plan.w"),
        ("plan.samples_per_source=0", "plan.samples_per_source"),
        ("plan.samples_per_shard=1.5", "plan.samples_per_shard"),
        ("sampler.spacing=linear", "sampler.spacing"),
        ("sampler.batch_size=0", "sampler.batch_size"),
        ("ray.num_actors=0", "ray.num_actors"),
        ("image_format=bmp", "image_format"),
    ],
)
def test_bad_config_values_are_rejected_naming_the_field(override: str, field: str) -> None:
    with pytest.raises(BadInputError, match=re.escape(field)):
        load_config(GenerateConfig, REPO / "configs/generate/tiny.yaml", [override])


def test_shipped_configs_load_and_scalars_become_lists() -> None:
    for path in sorted((REPO / "configs/generate").glob("*.yaml")):
        load_config(GenerateConfig, path)
    cfg = load_config(GenerateConfig, REPO / "configs/generate/tiny.yaml", ["plan.w=3", "plan.lambdas=1"])
    assert cfg.plan.w == [3.0] and cfg.plan.lambdas == [1.0]


def test_plan_refuses_synthetic_manifest_and_empty_split(real: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no usable sample in split 'test'"):
        build_plan(_cfg(split="test"), real)
    table, info = read_manifest(real)
    fake = write_manifest(table.to_pylist(), tmp_path / "m.parquet", DatasetInfo(info.class_names, "synthetic"))
    with pytest.raises(BadInputError, match="synthetic"):
        build_plan(_cfg(), fake)
    with pytest.raises(BadInputError, match="not found"):
        build_plan(_cfg(), tmp_path / "missing.parquet")


def test_plan_refuses_a_manifest_whose_shard_is_missing(tmp_path: Path) -> None:
    real = make_real_set(tmp_path, n_train=6, n_val=2)
    (tmp_path / "real-000001.tar").unlink()
    with pytest.raises(BadInputError, match="real-000001.tar: shard listed in .* is missing"):
        build_plan(_cfg(), real)
