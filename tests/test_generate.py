"""Generation end to end on a local Ray: shards, tags, manifest, resume, actor deaths.

One Ray session (2 CPUs, no dashboard) is shared by the module. The stand-in sampler
(tests/gen_fixtures.py) keeps these fast and its output exactly predictable.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.errors import BadInputError
from engine.generate.config import GenerateConfig, PlanConfig, RayConfig, SamplerConfig
from engine.generate.plan import build_plan
from engine.generate.run import run_generate
from engine.generate.worker import ShardGenerator, batches, part_path
from engine.manifest import read_manifest
from engine.shards import read_shard
from engine.verify import verify_manifest
from gen_fixtures import CLASS_NAMES, expected_standin, local_ray, make_real_set, standin_factory

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_session():
    with local_ray() as ray:
        yield ray


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    return make_real_set(tmp_path_factory.mktemp("real"), n_train=6, n_val=2)


def _cfg(real: Path, out: Path, **ray_kw) -> GenerateConfig:
    cfg = GenerateConfig(
        real_manifest=str(real),
        model_dir=str(real.parent),  # the stand-in loads nothing; the folder just has to exist
        out_dir=str(out),
        plan=PlanConfig(w=[2.0], lambdas=[0.5, 1.0], samples_per_source=2, samples_per_shard=5, seed=3),
        sampler=SamplerConfig(batch_size=3),
        ray=RayConfig(**{"num_actors": 1, "num_cpus_per_actor": 1, **ray_kw}),
    )
    cfg.validate()
    return cfg


def _keys(manifest: Path) -> list[str]:
    return read_manifest(manifest)[0]["key"].to_pylist()


def test_worker_writes_tagged_shard_and_part_without_ray(real: Path, tmp_path: Path) -> None:
    cfg = _cfg(real, tmp_path)
    cfg.sampler.scheduler = "unipc"  # the tag names the configured update rule (the stand-in has none)
    plan = build_plan(cfg.plan, real)
    gen = ShardGenerator(str(real.parent), str(tmp_path), CLASS_NAMES, cfg.sampler, factory=standin_factory)
    unit = plan.units[0]
    result = gen.run(unit)
    assert (result.samples, result.shard, result.steps) == (5, unit.shard, 5)
    samples = list(read_shard(tmp_path / unit.shard))
    assert [s.key for s in samples] == unit.keys
    sources = {s.key: s for s in read_shard(unit.items[0].source_shard)}
    for sample, item in zip(samples, unit.items):
        src = sources[item.source_id]
        np.testing.assert_array_equal(sample.image, expected_standin(src.image, 0.5, item.seed))
        np.testing.assert_array_equal(sample.scribble, src.scribble)
        assert sample.mask is None  # a synthetic image has no ground-truth mask
        m = sample.meta
        assert (m["source_id"], m["w"], m["lambda"], m["seed"], m["split"]) == (item.source_id, 2.0, 0.5, item.seed, "train")
        assert m["classes"] == src.meta["classes"] and m["model"] == "standin" and m["steps"] == 5
        assert m["scheduler"] == "unipc"
        assert m["seconds"] >= 0 and m["timings"]["batch_size"] in (1, 2, 3)
    table, info = read_manifest(part_path(tmp_path, unit.shard))
    assert table["key"].to_pylist() == unit.keys and info.kind == "synthetic"
    assert info.extra["shard_stats"]["samples"] == 5 and info.extra["shard_stats"]["images_per_s"] > 0


def test_present_classes_are_the_sorted_drawn_ids_without_unlabelled() -> None:
    from engine.generate.worker import present_classes

    rng = np.random.default_rng(0)
    for ids in ([255], [0, 255], [3, 7, 255], [0, 1, 2, 254], list(range(256))):
        scribble = rng.choice(np.array(ids, np.uint8), size=(37, 53))
        expected = [int(c) for c in np.unique(scribble) if c != 255]
        assert present_classes(scribble) == expected and all(type(c) is int for c in present_classes(scribble))


def test_batches_group_by_image_size() -> None:
    from engine.generate.plan import WorkItem
    from engine.shards import Sample

    items = [WorkItem(f"s{i}", "x", i, f"k{i}") for i in range(5)]
    sizes = [8, 8, 4, 8, 8]
    sources = {f"s{i}": Sample(f"s{i}", np.zeros((n, n, 3), np.uint8), np.zeros((n, n), np.uint8)) for i, n in enumerate(sizes)}
    got = [[it.source_id for it in b] for b in batches(items, sources, 3)]
    assert got == [["s0", "s1", "s3"], ["s4"], ["s2"]]


def test_run_generates_every_planned_key_once_and_resumes(ray_session, real: Path, tmp_path: Path) -> None:
    cfg = _cfg(real, tmp_path / "syn", num_actors=2)
    summary = run_generate(cfg, factory=standin_factory, progress=False)
    manifest = tmp_path / "syn/manifest.parquet"
    plan = build_plan(cfg.plan, real)
    assert sorted(_keys(manifest)) == sorted(k for u in plan.units for k in u.keys)
    report = verify_manifest(manifest)
    assert report.ok, report.problems
    assert (report.samples, report.shards) == (24, 6)
    table, info = read_manifest(manifest)
    assert info.kind == "synthetic" and info.class_names == CLASS_NAMES
    assert info.extra["plan"]["samples"] == 24 and info.extra["config"]["plan"]["lambdas"] == [0.5, 1.0]
    assert len(info.extra["shard_stats"]) == 6 and all(s["images_per_s"] > 0 for s in info.extra["shard_stats"])
    assert set(table["model"].to_pylist()) == {"standin"} and set(table["split"].to_pylist()) == {"train"}
    assert summary["samples"] == 24 and summary["samples_this_run"] == 24 and summary["actors"] == 2
    assert set(summary["seconds_per_sample_by_lambda"]) == {"0.5", "1"}
    assert json.loads((tmp_path / "syn/summary.json").read_text()) == summary
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "syn").glob("*.tar")}
    again = run_generate(cfg, factory=standin_factory, progress=False)  # nothing left to do: no actor starts
    assert again["samples_this_run"] == 0 and again["shards_resumed"] == 6
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "syn").glob("*.tar")} == before
    assert verify_manifest(manifest).ok


def test_a_run_whose_lock_is_taken_over_stops_without_a_manifest(ray_session, real: Path, tmp_path: Path,
                                                               monkeypatch) -> None:
    """An owner-file lock can be lost (its holder stalled past stale_s): the run stops at its
    first finished shard and leaves the manifest to the new holder; a rerun resumes."""
    import contextlib

    import engine.generate.run as run_module
    from engine.lock import Lease

    @contextlib.contextmanager
    def lost_lock(folder):
        lease = Lease(folder)
        lease.lost.set()
        yield lease

    monkeypatch.setattr(run_module, "exclusive_folder", lost_lock)
    cfg = _cfg(real, tmp_path / "syn", num_actors=1)
    theirs = tmp_path / "syn" / "syn-000099.tar.tmp"  # the new holder's shard in progress
    distribute = run_module._distribute

    def while_running(*args, **kwargs):
        theirs.write_bytes(b"half a shard")  # after this run's start-up cleaned its own leftovers
        return distribute(*args, **kwargs)

    monkeypatch.setattr(run_module, "_distribute", while_running)
    seen: list = []
    with pytest.raises(BadInputError, match="took over this folder's lock"):
        run_generate(cfg, factory=functools.partial(standin_factory, delay=0.05), on_result=seen.append,
                     progress=False)
    assert seen == []  # stopped at its first finished shard, before reporting it
    assert len(list((tmp_path / "syn/parts").glob("*.parquet"))) < 6  # of 6 planned shards
    assert not (tmp_path / "syn/manifest.parquet").exists()
    assert theirs.read_bytes() == b"half a shard"  # a lost folder's temp files are left to its holder
    theirs.unlink()
    monkeypatch.undo()
    assert run_generate(cfg, factory=standin_factory, progress=False)["samples"] == 24
    assert verify_manifest(tmp_path / "syn/manifest.parquet").ok


def test_resume_redoes_only_unfinished_shards(ray_session, real: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "syn"
    cfg = _cfg(real, out)
    run_generate(cfg, factory=standin_factory, progress=False)
    import engine.shards

    # Resume decides from parts and sizes: it never reads a finished shard back to hash it.
    for where in (engine.shards, "engine.generate.run.sha256_file"):
        args = (where, "sha256_file") if where is engine.shards else (where,)
        monkeypatch.setattr(*args, lambda *a, **k: pytest.fail("a shard was re-hashed"), raising=False)
    shards = sorted(out.glob("*.tar"))
    part_path(out, shards[0].name).unlink()  # a shard without its part (crash between the two)
    with open(shards[1], "ab") as fh:  # a shard whose size/checksum no longer match
        fh.write(b"junk")
    shards[2].unlink()  # a missing shard, its part still there
    (out / "syn-w2p00-l0p50-000009.tar.tmp").write_bytes(b"half")  # a crashed writer's leftover
    (out / "manifest.parquet").unlink()
    summary = run_generate(cfg, factory=standin_factory, progress=False)
    assert summary["shards_resumed"] == 3 and summary["samples_this_run"] == 5 + 5 + 2
    assert not list(out.glob("*.tmp"))
    report = verify_manifest(out / "manifest.parquet")
    assert report.ok and report.samples == 24, report.problems


def test_rerun_with_a_different_plan_is_refused(ray_session, real: Path, tmp_path: Path) -> None:
    cfg = _cfg(real, tmp_path / "syn")
    cfg.plan.max_sources = 1
    run_generate(cfg, factory=standin_factory, progress=False)
    cfg.plan.lambdas = [0.25]
    with pytest.raises(BadInputError, match=r"synthetic set made from a different config or input \(differs in plan\)"):
        run_generate(cfg, factory=standin_factory, progress=False)
    cfg.plan.lambdas = [0.5, 1.0]
    cfg.sampler.uncond = "hint+prompt"  # a sampler setting that changes the pixels is part of the identity too
    with pytest.raises(BadInputError, match=r"differs in sampler.uncond"):
        run_generate(cfg, factory=standin_factory, progress=False)


def test_killed_actor_is_restarted_and_its_units_retried(ray_session, real: Path, tmp_path: Path) -> None:
    cfg = _cfg(real, tmp_path / "syn", max_restarts=2, unit_retries=3)
    cfg.plan.samples_per_shard = 2  # 12 shards, so that work remains after the kill
    killed = []

    def kill_once(result) -> None:  # SIGKILL the actor that just finished a shard (it is busy with the next)
        if not killed:
            killed.append(result.pid)
            os.kill(result.pid, signal.SIGKILL)

    factory = functools.partial(standin_factory, delay=0.05)
    summary = run_generate(cfg, factory=factory, on_result=kill_once, progress=False)
    assert killed and summary["actor_deaths"] == 1 and summary["unit_failures"] >= 1
    manifest = tmp_path / "syn/manifest.parquet"
    keys = _keys(manifest)
    plan = build_plan(cfg.plan, real)
    assert len(keys) == len(set(keys)) == 24
    assert sorted(keys) == sorted(k for u in plan.units for k in u.keys)
    report = verify_manifest(manifest)
    assert report.ok, report.problems
    assert not list((tmp_path / "syn").glob("*.tmp"))


def test_bad_input_inside_an_actor_stops_the_run_naming_the_file(ray_session, real: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from engine.manifest import DatasetInfo, write_manifest

    table, info = read_manifest(real)
    rows = table.to_pylist()
    for row in rows:  # the copy lives elsewhere: point at the real shards absolutely
        row["shard"] = str(real.parent / row["shard"]) if row["shard"] else ""
    rows[0]["source_id"] = "tr999"  # listed in the manifest, absent from its shard
    bad = write_manifest(rows, tmp_path / "real.parquet", DatasetInfo(info.class_names, "real"))
    assert pq.read_table(bad).num_rows == len(rows)
    cfg = _cfg(bad, tmp_path / "syn")
    cfg.plan.max_sources = None
    with pytest.raises(BadInputError, match="does not hold source 'tr999'"):
        run_generate(cfg, factory=standin_factory, progress=False)


def test_job_script_reports_bad_input_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "jobs/generate.py", "--set", f"model_dir={tmp_path}/none", "--set", "plan.lambdas=[0.5]"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "model folder not found" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The embedded tiny model's config, built from scratch (random init: the test's classes are
    not the shipped base's), saved with save_pretrained."""
    from engine.config import load_config
    from engine.train_controlnet import TrainControlNetConfig, build_model

    cfg = load_config(TrainControlNetConfig, REPO / "configs/controlnet/tiny.yaml", ["model.pretrained=null"])
    return build_model(cfg, CLASS_NAMES).save_pretrained(tmp_path_factory.mktemp("model") / "final")


def test_real_tiny_model_through_ray_matches_a_direct_sampler_call(
    ray_session, real: Path, tiny_model: Path, tmp_path: Path
) -> None:
    from engine.generate.worker import fit_sources, load_sampler
    from engine.text import names_for_ids

    cfg = _cfg(real, tmp_path / "syn")
    cfg.model_dir = str(tiny_model)
    cfg.plan.max_sources, cfg.plan.samples_per_source, cfg.plan.samples_per_shard = 2, 1, 2
    cfg.sampler = SamplerConfig(num_steps=4, batch_size=2, resolution=8)  # 16-px sources fitted to 8 px
    summary = run_generate(cfg, progress=False)
    manifest = tmp_path / "syn/manifest.parquet"
    assert verify_manifest(manifest).ok and summary["samples"] == 4
    sampler = load_sampler(str(tiny_model), "cpu", cfg.sampler)
    unit = build_plan(cfg.plan, real).units[1]  # λ = 1: all 4 steps
    got = list(read_shard(tmp_path / "syn" / unit.shard))
    sources = fit_sources({s.key: s for s in read_shard(unit.items[0].source_shard)}, 8, cfg.sampler.resize)
    for sample, item in zip(got, unit.items):
        src = sources[item.source_id]
        names = names_for_ids(np.unique(src.scribble), CLASS_NAMES)
        want = sampler.sample(src.image[None], src.scribble[None], [names], 2.0, unit.lam, [item.seed])[0]
        np.testing.assert_array_equal(sample.image, want)  # same pixels as a bare call, whatever the batching
        np.testing.assert_array_equal(sample.scribble, src.scribble)
        assert sample.meta["model"] == sampler.model_id and sample.meta["steps"] == sampler.steps_for(1.0) == 4
        assert sample.image.shape == (8, 8, 3)


def test_actors_that_cannot_be_placed_stop_the_run_with_a_message(ray_session, real: Path, tmp_path: Path) -> None:
    """Another job holds every CPU: the run stops after the placement timeout, naming what it asked for."""
    import time

    import ray

    @ray.remote(num_cpus=2)
    class Hog:
        def ready(self) -> bool:
            return True

    hog = Hog.remote()
    ray.get(hog.ready.remote())
    try:
        cfg = _cfg(real, tmp_path / "syn")
        cfg.ray.placement_timeout_s = 2.0
        t0 = time.perf_counter()
        with pytest.raises(BadInputError, match=r"1 of 1 generation actors: were not placed and ready within 2 s: "
                                                r"each asks for \{'num_cpus': 1(\.0)?, 'num_gpus': 0\}; the cluster has \{\} free of \{'CPU': 2.0\}"):
            run_generate(cfg, factory=standin_factory, progress=False)
        assert time.perf_counter() - t0 < 60
    finally:
        ray.kill(hog)


def test_expensive_units_run_first(ray_session, real: Path, tmp_path: Path) -> None:
    """One actor, one unit in flight: results arrive in dispatch order, highest λ first."""
    cfg = _cfg(real, tmp_path / "syn", num_actors=1, inflight_per_actor=1)
    seen: list[float] = []
    run_generate(cfg, factory=standin_factory, progress=False, on_result=lambda r: seen.append(r.lam))
    assert seen == sorted(seen, reverse=True) and seen[0] == 1.0 and len(seen) == 6


def test_several_sets_share_one_actor_pool_and_stay_separate(ray_session, real: Path, tmp_path: Path, monkeypatch) -> None:
    """A sweep's cells: one pool (the model loaded once per replica), one folder, manifest and summary per set."""
    import engine.generate.run as run_mod
    from engine.generate import run_generate_sets

    pools = []
    real_distribute = run_mod._distribute
    monkeypatch.setattr(run_mod, "_distribute", lambda *a, **k: pools.append(1) or real_distribute(*a, **k))
    a, b = _cfg(real, tmp_path / "a"), _cfg(real, tmp_path / "b")
    a.plan.lambdas, b.plan.lambdas = [0.5], [1.0]
    summaries = run_generate_sets([a, b], factory=standin_factory, progress=False)
    assert pools == [1] and [s["samples"] for s in summaries] == [12, 12]
    assert all(s["sets_in_pool"] == 2 and s["pool_samples_this_run"] == 24 for s in summaries)
    for cfg, lam in ((a, 0.5), (b, 1.0)):
        out = Path(cfg.out_dir)
        report = verify_manifest(out / "manifest.parquet")
        assert report.ok and report.samples == 12, report.problems
        assert set(read_manifest(out / "manifest.parquet")[0]["lambda"].to_pylist()) == {lam}
        assert sorted(_keys(out / "manifest.parquet")) == sorted(k for u in build_plan(cfg.plan, real).units for k in u.keys)
    b.sampler.num_steps = 7  # sets that do not share the actors' settings are refused before any work
    with pytest.raises(BadInputError, match="differs from the others"):
        run_generate_sets([a, b], factory=standin_factory, progress=False)


def test_relative_paths_in_a_job_submitted_with_a_working_dir_are_refused(tmp_path, monkeypatch) -> None:
    """``ray job submit --working-dir .`` runs the job in Ray's temporary copy of the repo: a
    relative out_dir wrote the set there and the job said it succeeded; a relative model_dir
    said "model folder not found". Both now name the key and the fix; absolute paths and URLs pass."""
    from engine.generate.distributor import JOB_CONFIG_ENV, check_job_paths

    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_x"  # where Ray runs the entrypoint
    (copy / "model").mkdir(parents=True)
    monkeypatch.chdir(copy)
    check_job_paths({"out_dir": "runs/syn"}, {"model_dir": "model"})  # not a submitted job: as before
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))
    monkeypatch.chdir(tmp_path)
    check_job_paths({"out_dir": "runs/syn"}, {})  # the entrypoint changed directory first: its choice
    monkeypatch.chdir(copy)
    with pytest.raises(BadInputError, match=r"^out_dir=runs/syn: is a relative path in a job submitted with "
                                            r"--working-dir.*which Ray deletes \(give an absolute path"):
        check_job_paths({"out_dir": "runs/syn"}, {})
    with pytest.raises(BadInputError, match=r"^model_dir=runs/model: .*where it does not exist"):
        check_job_paths({"out_dir": str(tmp_path / "syn")}, {"model_dir": "runs/model"})
    check_job_paths({"out_dir": "s3://b/syn"}, {"model_dir": "model"})  # a URL, and an input the copy holds
    with pytest.raises(BadInputError, match="out_dir=rel"):
        run_generate(GenerateConfig(real_manifest=str(tmp_path / "m.parquet"), model_dir=str(tmp_path / "model"),
                                    out_dir="rel"), progress=False)
