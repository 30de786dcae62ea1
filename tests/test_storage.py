"""Locations that are paths or URLs (engine/storage.py), on a local folder and on fsspec's
in-memory filesystem (``memory://``, one per process: the worker runs in-process here; the
Ray path against an S3 endpoint is tests/test_storage_s3.py).

Each check runs on both kinds of storage: ingest writes whole shards and the manifest last;
manifests name shards relative to themselves, so a copied set verifies where it lands; seg
streams a set from a URL; generation resumes (skips units whose shard and part are whole,
redoes the rest) and ``run_generate`` merges, summarises and verifies; the output-folder lock
falls back to an owner file with a conditional create and says so.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest

from engine import storage
from engine.errors import BadInputError
from engine.generate.config import GenerateConfig, PlanConfig, RayConfig, SamplerConfig
from engine.generate.plan import build_plan
from engine.generate.run import MANIFEST, resume_scan, run_generate
from engine.generate.worker import ShardGenerator, part_path
from engine.ingest import main as ingest_main
from engine.manifest import read_manifest
from engine.shards import ShardWriter, read_shard, sha256_file
from engine.verify import verify_manifest
from fs_fixtures import fuse_object_store
from gen_fixtures import standin_factory

REPO = Path(__file__).resolve().parents[1]
TINY_INGEST = ["--config", str(REPO / "configs/ingest/tiny.yaml"), "--set", "source.procedural.num_train=9",
               "--set", "source.procedural.num_val=3", "--set", "source.procedural.size=16", "--set", "samples_per_shard=4"]


@pytest.fixture(params=["local", "fuse", "memory"])
def root(request, tmp_path: Path, monkeypatch) -> Iterator[str]:
    """A fresh folder: a local path, one on a simulated FUSE object store (no flock, no hard
    links), or a memory:// URL (removed afterwards)."""
    if request.param != "memory":
        if request.param == "fuse":
            fuse_object_store(monkeypatch)
        yield str(tmp_path / "store")
        return
    url = f"memory://t-{uuid.uuid4().hex[:8]}"
    yield url
    fs, path = storage.fs_and_path(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def copy_tree(src: str, dst: str) -> None:
    """Copy every file under ``src`` to ``dst`` (any two locations), keeping relative names."""
    fs, path = storage.fs_and_path(src)
    for f in fs.find(path):
        rel = storage.relative(f, path.rstrip("/"))
        storage.makedirs(storage.parent(storage.join(dst, rel)))
        with storage.open_read(storage.join(src, rel)) as fh, storage.AtomicOutput(storage.join(dst, rel)) as tmp:
            tmp.write_bytes(fh.read())


def ingest_to(out: str) -> str:
    """The procedural tiny set (9 train + 3 val at 16 px, 4 per shard) ingested to ``out``."""
    assert ingest_main([*TINY_INGEST, "--out", out]) == 0
    return str(storage.join(out, "manifest.parquet"))


def keys_of(manifest: str) -> list[str]:
    return sorted(read_manifest(manifest)[0]["key"].to_pylist())


# ---------------------------------------------------------------------------------- storage ----

def test_paths_and_urls_keep_their_form(tmp_path: Path) -> None:
    assert storage.join(tmp_path, "a", "b.tar") == tmp_path / "a" / "b.tar"  # local: a Path, as before
    assert storage.join("s3://bkt/set/", "parts", "x.parquet") == "s3://bkt/set/parts/x.parquet"
    assert storage.parent("s3://bkt/set/m.parquet") == "s3://bkt/set"
    assert storage.relative("s3://bkt/set/x-000000.tar", "s3://bkt/set") == "x-000000.tar"
    assert storage.is_local(f"file://{tmp_path}") and storage.local_path(f"file://{tmp_path}") == tmp_path
    assert not storage.is_local("memory://x") and storage.resolve("s3://b/k") == "s3://b/k"


def test_a_url_whose_backend_is_missing_names_the_location_and_the_package() -> None:
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed")
    with pytest.raises(BadInputError, match=r"gs://bucket/set/manifest.parquet.*pip install gcsfs"):
        storage.exists("gs://bucket/set/manifest.parquet")
    with pytest.raises(BadInputError, match="nosuch://x"):
        storage.exists("nosuch://x/y")


def test_atomic_output_and_exclusive_create(root: str) -> None:
    target = storage.join(root, "sub", "f.bin")
    storage.makedirs(storage.parent(target))
    with pytest.raises(RuntimeError):
        with storage.AtomicOutput(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert not storage.exists(target) and not tmp.exists()  # nothing visible, no temp left
    with storage.AtomicOutput(target) as tmp:
        tmp.write_bytes(b"whole")
    assert storage.read_text(target) == "whole" and storage.list_files(storage.parent(target)) == {"f.bin": 5}
    assert storage.create_exclusive(storage.join(root, "sub", "once"), b"1")
    assert not storage.create_exclusive(storage.join(root, "sub", "once"), b"2")
    assert storage.read_text(storage.join(root, "sub", "once")) == "1"
    assert sorted(storage.list_files(storage.join(root, "sub"))) == ["f.bin", "once"]  # no temp file left
    storage.remove(storage.join(root, "sub", "once"))
    storage.remove(storage.join(root, "sub", "once"))  # missing is fine
    assert storage.list_files(storage.join(root, "nothing-here")) == {}


def test_a_store_error_is_not_a_missing_file_and_a_drivers_first_access_names_it(monkeypatch, tmp_path) -> None:
    """``is_file`` lets a store's error through (fsspec's ``isfile`` says False); ``reached``
    turns any error but "not found" into a BadInputError naming the URL, and leaves local paths alone."""
    from fsspec.implementations.memory import MemoryFileSystem

    class EndpointConnectionError(Exception):  # a backend's own type, as botocore's is
        pass

    url = f"memory://x-{uuid.uuid4().hex[:8]}/manifest.parquet"
    assert not storage.is_file(url)
    with pytest.raises(BadInputError, match="manifest not found"):
        read_manifest(url)

    def unreachable(self, path, **kwargs):
        raise EndpointConnectionError("Could not connect to the endpoint URL")

    monkeypatch.setattr(MemoryFileSystem, "info", unreachable)
    with pytest.raises(EndpointConnectionError):
        storage.is_file(url)
    with pytest.raises(BadInputError, match=f"^{url}: its store cannot be reached.*EndpointConnectionError.*AWS_ENDPOINT_URL"):
        read_manifest(url)
    with pytest.raises(EndpointConnectionError):
        with storage.reached(tmp_path):
            raise EndpointConnectionError("local paths are not translated")


def test_the_node_probe_names_a_refused_url_and_answers_for_paths(monkeypatch, tmp_path) -> None:
    """The per-node probe (a Ray task, called here in-process): a URL whose store refuses this
    node (a 403 is a PermissionError, an OSError) is a BadInputError naming the node, not "not
    visible"; a local path is a plain yes or no."""
    from fsspec.implementations.memory import MemoryFileSystem

    from engine.generate.distributor import _path_exists

    assert _path_exists(str(tmp_path)) and not _path_exists(str(tmp_path / "absent"))

    def denied(self, path, **kwargs):
        raise PermissionError(13, "Access Denied")

    monkeypatch.setattr(MemoryFileSystem, "exists", denied)
    with pytest.raises(BadInputError, match=r"^memory://b/out: .* refuses access from Ray node .*PermissionError"):
        _path_exists("memory://b/out")
    import fsspec.core

    def no_backend(url, **kwargs):
        raise ImportError("Install gcsfs to access Google Storage")

    monkeypatch.setattr(fsspec.core, "url_to_fs", no_backend)  # this node lacks the backend
    with pytest.raises(BadInputError, match=r"^gs://b/out: no filesystem for gs:// .*\(on Ray node .*\) \(pip install gcsfs\)"):
        _path_exists("gs://b/out")


def _flaky_puts(monkeypatch, answers: list[str]) -> list[str]:
    """Make memory:// conditional puts answer as an object store can, one answer per put:
    ``ok``; ``conflict`` (S3's 409 ConditionalRequestConflict: nothing written); ``lost`` (the
    put landed, its reply was lost and the retry was told the object exists); ``other`` (a
    concurrent put landed first, this one got a 412 the store did not mark as If-None-Match);
    ``denied``. Returns the answers used."""
    from fsspec.implementations.memory import MemoryFileSystem

    put, used = MemoryFileSystem.pipe_file, []

    def answer(self, path, value, **kwargs):
        used.append(kind := answers.pop(0))
        if kind == "ok":
            return put(self, path, value, **kwargs)
        if kind == "lost":
            put(self, path, value, **kwargs)
            raise FileExistsError(path)
        if kind == "other":
            put(self, path, b"another driver's", **kwargs)
            raise OSError(errno.EINVAL, "At least one of the pre-conditions you specified did not hold")
        if kind == "denied":
            raise PermissionError(errno.EACCES, "Access Denied")
        raise OSError(errno.EIO, "ConditionalRequestConflict: a conflicting operation is in progress")

    monkeypatch.setattr(MemoryFileSystem, "pipe_file", answer)
    monkeypatch.setattr(storage, "CREATE_RETRY_S", (0.0, 0.0, 0.0))
    return used


@pytest.mark.parametrize("answers, created, puts", [
    (["lost"], True, 1),  # its own bytes are there: the claim is this call's
    (["conflict", "ok"], True, 2),  # nothing there after a conflict: tried again
    (["conflict", "conflict", "other"], False, 3),  # the concurrent put won
    (["other"], False, 1),
])
def test_a_conditional_put_that_fails_is_settled_by_reading_the_object_back(monkeypatch, answers, created, puts):
    target = f"memory://x-{uuid.uuid4().hex[:8]}/once"
    used = _flaky_puts(monkeypatch, answers)
    assert storage.create_exclusive(target, b"mine") is created
    assert storage.read_text(target) == ("mine" if created else "another driver's") and len(used) == puts


def test_a_conditional_put_that_keeps_conflicting_or_is_denied_raises(monkeypatch):
    target = f"memory://x-{uuid.uuid4().hex[:8]}/once"
    used = _flaky_puts(monkeypatch, ["conflict"] * 4 + ["denied"])
    with pytest.raises(OSError, match="ConditionalRequestConflict"):
        storage.create_exclusive(target, b"mine")
    assert len(used) == 1 + len(storage.CREATE_RETRY_S)
    with pytest.raises(PermissionError):  # credentials: nothing to settle, no retry
        storage.create_exclusive(target, b"mine")
    assert len(used) == 5 and not storage.exists(target)


def test_a_shard_is_invisible_until_whole(root: str) -> None:
    sample = next(read_shard(_one_real_shard(root)))
    target = storage.join(root, "out", "syn-000000.tar")
    writer = ShardWriter(target)
    writer.write(sample)
    assert not storage.exists(target)  # half written: only the local temp file exists
    info = writer.close()
    assert storage.exists(target) and storage.size(target) == info.num_bytes
    assert sha256_file(target) == info.sha256 and [s.key for s in read_shard(target)] == [sample.key]
    with pytest.raises(ValueError):
        with ShardWriter(storage.join(root, "out", "syn-000001.tar")) as w:
            w.write(sample)
            raise ValueError("crash")
    assert sorted(storage.list_files(storage.join(root, "out"))) == ["syn-000000.tar"]


def _one_real_shard(root: str) -> Any:
    manifest = ingest_to(str(storage.join(root, "real")))
    return storage.join(storage.parent(manifest), read_manifest(manifest)[0]["shard"][0].as_py())


# ------------------------------------------------------------------------- sets: ingest, move ----

def test_ingest_writes_a_set_that_verifies_and_moves(root: str, tmp_path: Path) -> None:
    manifest = ingest_to(str(storage.join(root, "real")))
    names = storage.list_files(storage.join(root, "real"))
    assert sorted(names) == ["ingest.yaml", "manifest.parquet", "real-train-000000.tar", "real-train-000001.tar",
                             "real-train-000002.tar", "real-val-000000.tar"]
    shards = set(read_manifest(manifest)[0]["shard"].to_pylist())
    assert all("/" not in s and "://" not in s for s in shards)  # relative to the manifest
    assert verify_manifest(manifest).ok
    assert ingest_main([*TINY_INGEST, "--out", str(storage.join(root, "real"))]) == 2  # not empty: refused
    # the whole set copied elsewhere (memory -> local, local -> memory) still verifies there
    moved = f"memory://moved-{uuid.uuid4().hex[:8]}" if storage.is_local(root) else str(tmp_path / "moved")
    copy_tree(str(storage.join(root, "real")), moved)
    report = verify_manifest(storage.join(moved, "manifest.parquet"))
    assert report.ok and report.samples == 12, report.problems
    storage.remove(storage.join(moved, "real-val-000000.tar"))
    assert any("missing" in p for p in verify_manifest(storage.join(moved, "manifest.parquet")).problems)


def test_seg_streams_a_set_from_its_location(root: str) -> None:
    from seg.stream import index_manifests, one_pass

    manifest = ingest_to(str(storage.join(root, "real")))
    index = index_manifests([manifest])
    assert len(index.real) == 9 and len(index.val) == 3
    table = read_manifest(manifest)[0].to_pylist()
    streamed = sorted(s.key for s in one_pass(index.real, 0, 0, shuffle_buffer=0, split=False))
    assert streamed == sorted(r["key"] for r in table if r["split"] == "train")


# ----------------------------------------------------------------------- generation, resume ----

def generate_cfg(real_manifest: str, out: str) -> GenerateConfig:
    cfg = GenerateConfig(real_manifest=real_manifest, model_dir=str(storage.parent(real_manifest)), out_dir=out,
                         plan=PlanConfig(w=[2.0], lambdas=[0.5, 1.0], samples_per_source=1, samples_per_shard=4, seed=5),
                         sampler=SamplerConfig(batch_size=2), ray=RayConfig(num_actors=1))
    cfg.validate()
    return cfg


def test_generation_resumes_on_the_store_and_run_generate_finishes_it(root: str, tmp_path: Path, monkeypatch) -> None:
    """The worker runs in-process (memory:// is per process): unit 0 finished, unit 1 cut
    between its shard and its part, unit 2 never started; resume keeps only unit 0, the rest
    is redone, and ``run_generate`` (nothing left for Ray) merges a manifest that verifies."""
    monkeypatch.setenv(storage.MODEL_CACHE_ENV, str(tmp_path / "cache"))  # model_dir URLs are copied here
    real = ingest_to(str(storage.join(root, "real")))
    out = str(storage.join(root, "syn"))
    cfg = generate_cfg(real, out)
    plan = build_plan(cfg.plan, real)
    units = plan.units
    assert len(units) == 6
    worker = ShardGenerator(cfg.model_dir, out, plan.class_names, cfg.sampler, factory=standin_factory)
    worker.run(units[0])
    worker.run(units[1])
    storage.remove(part_path(out, units[1].shard))  # killed after the shard, before its part
    done, todo = resume_scan(out, units)
    assert [u.index for u in done] == [0] and len(todo) == 5
    assert not storage.exists(storage.join(out, units[1].shard))  # the unfinished shard is deleted
    for unit in todo:
        worker.run(unit)
    summary = run_generate(cfg, progress=False)  # every unit done: lock, identity, resume, merge
    assert summary["shards_resumed"] == 6 and summary["samples_this_run"] == 0 and summary["samples"] == 18
    manifest = str(storage.join(out, MANIFEST))
    keys = keys_of(manifest)
    assert keys == sorted(k for u in units for k in u.keys) and len(keys) == len(set(keys))
    assert verify_manifest(manifest).ok
    assert json.loads(storage.read_text(storage.join(out, "identity.json")))["config"]["plan"]
    other = replace(cfg, plan=replace(cfg.plan, seed=6))
    with pytest.raises(BadInputError, match="different config"):  # identity.json on the store pins the plan
        run_generate(other, progress=False)

