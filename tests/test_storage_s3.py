"""Storage against a real S3-compatible endpoint run locally: moto's server (``moto[server]``)
on a free port, reached by s3fs through ``AWS_ENDPOINT_URL`` with dummy credentials.

Ray actors are other processes, so this is where the multi-process paths are tested: actors
read the real set and the model from S3 and write shards there; a driver (``python
jobs/generate.py``) whose out_dir is on S3 is SIGKILLed mid-run and the same command
resumes it, ending with every planned key exactly once and a manifest that verifies.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

import test_faults  # noqa: E402  (the driver-kill helpers and the tiny model fixture)
from engine import storage  # noqa: E402
from engine.generate.config import GenerateConfig, PlanConfig  # noqa: E402
from engine.generate.plan import build_plan  # noqa: E402
from engine.generate.run import MANIFEST, run_generate  # noqa: E402
from engine.lock import exclusive_folder, generations, owner_file  # noqa: E402
from engine.errors import BadInputError  # noqa: E402
from engine.manifest import read_manifest  # noqa: E402
from engine.verify import verify_manifest  # noqa: E402
from gen_fixtures import local_ray, make_real_set, standin_factory  # noqa: E402
from test_storage import copy_tree, generate_cfg, ingest_to, keys_of  # noqa: E402

BUCKET = "scribblegen-test"
REPO = Path(__file__).resolve().parents[1]
tiny_model = test_faults.tiny_model  # the same fixture: the embedded tiny model, random init, 8 px


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[str]:
    """``s3://BUCKET`` on a moto server; the environment points s3fs (and subprocesses, and
    Ray workers, which inherit it) at it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", storage.MODEL_CACHE_ENV: str(tmp_path_factory.mktemp("model-cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs, _ = storage.fs_and_path(f"s3://{BUCKET}")
    fs.mkdir(BUCKET)
    try:
        yield f"s3://{BUCKET}"
    finally:
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def tmp_objects(url: str) -> list[str]:
    fs, path = storage.fs_and_path(url)
    return [p for p in fs.find(path) if p.endswith(storage.TMP_SUFFIX)]


def released(out: str) -> bool:
    """The lock's newest owner file is marked released (the fallback keeps it: generations only grow)."""
    return json.loads(storage.read_text(owner_file(out, generations(out)[-1])))["released"]


def test_ingest_verify_and_stream_on_s3(s3: str) -> None:
    from seg.stream import index_manifests, one_pass

    manifest = ingest_to(f"{s3}/ingest/real")
    assert verify_manifest(manifest).ok
    index = index_manifests([manifest])
    assert len(list(one_pass(index.val, 0, 0, shuffle_buffer=0, split=False))) == 3
    assert not tmp_objects(s3)


def test_the_s3_lock_is_a_conditional_owner_file(s3: str, capsys) -> None:
    out = f"{s3}/locked"
    with exclusive_folder(out):
        assert "is an object store (no flock)" in capsys.readouterr().err
        with pytest.raises(BadInputError, match="another generate run"):
            with exclusive_folder(out):
                pass
    assert released(out)
    with pytest.raises(BadInputError, match=r"^s3://no-such-bucket/out: cannot create the lock's owner file.*aws s3 mb"):
        with exclusive_folder("s3://no-such-bucket/out"):
            pass


def test_an_s3_409_conflict_on_the_owner_file_is_settled_and_the_lock_taken(s3: str, monkeypatch) -> None:
    """AWS answers a conditional put that races another with 409 ConditionalRequestConflict, a
    code s3fs does not map (an OSError). The first put of each owner file gets that 409, raised
    through s3fs's own error path; nothing is there, so it is tried again and the lock is held."""
    import s3fs.core
    from botocore.exceptions import ClientError

    wrapped, conflicts = s3fs.core._error_wrapper, []

    async def first_put_conflicts(func, *, args=(), kwargs=None, retries):
        if getattr(func, "__name__", "") == "put_object" and (kwargs or {}).get("IfNoneMatch") == "*" \
                and kwargs["Key"] not in conflicts:
            conflicts.append(kwargs["Key"])

            async def conflict(**_):
                raise ClientError({"Error": {"Code": "ConditionalRequestConflict", "Message": "conflicting operation"},
                                   "ResponseMetadata": {"HTTPStatusCode": 409}}, "PutObject")

            func = conflict
        return await wrapped(func, args=args, kwargs=kwargs, retries=retries)

    monkeypatch.setattr(s3fs.core, "_error_wrapper", first_put_conflicts)
    out = f"{s3}/conflicted"
    with exclusive_folder(out, heartbeat_s=60.0):
        assert generations(out) == [0] and len(conflicts) == 1
        with pytest.raises(BadInputError, match="another generate run"):
            with exclusive_folder(out):
                pass
    assert released(out) and len(conflicts) == 1  # the refused driver never put: it read a live holder


@pytest.mark.parametrize("job", ["generate", "seg", "ingest"])
def test_a_store_that_does_not_answer_is_named_in_one_line(job: str, tiny_model: Path, tmp_path: Path) -> None:
    """A wrong endpoint is the commonest store mistake: each job stops with exit 2 and one line
    naming the URL, the cause and what to check (before: botocore's traceback, or for a manifest
    "not found", since fsspec's isfile answers False to any error)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing answers there
    url = "s3://nowhere/set"
    real = make_real_set(tmp_path / "real")
    argv = {
        "generate": ["jobs/generate.py", "--no-progress", "--set", f"real_manifest={real}", "--set",
                     f"model_dir={tiny_model}", "--set", f"out_dir={url}"],
        "seg": ["-m", "seg.train", "--shards", f"{url}/manifest.parquet", "--out", str(tmp_path / "seg")],
        "ingest": ["-m", "jobs.ingest", "--out", url],
    }[job]
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {url}") and "cannot be reached or refuses access (EndpointConnectionError" in last
    assert "AWS_ENDPOINT_URL" in last


def test_a_ray_node_without_the_stores_endpoint_is_named_before_any_actor_starts(monkeypatch, tmp_path) -> None:
    """A node's environment is its ``ray start``'s: a joined cluster whose node cannot reach the
    store (here: the workers' endpoint is a closed port) stops the run at the visibility probe,
    naming the URL, the node and the cause, not as an actor traceback or as "not visible"."""
    from engine.generate.distributor import check_visible_everywhere

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)  # before ray.init: the workers inherit it
    with local_ray():
        with pytest.raises(BadInputError, match=r"^s3://nowhere/out: Ray node .* did not answer whether it sees this "
                                                r"within 0.001 s \(1 of 1 checks\)"):
            check_visible_everywhere(["s3://nowhere/out"], timeout=0.001)  # a task cannot even start that fast
        with pytest.raises(BadInputError, match=rf"^s3://nowhere/out: its store cannot be reached or refuses access "
                                                rf"from Ray node {socket.gethostname()} \(EndpointConnectionError.*ray start"):
            check_visible_everywhere(["s3://nowhere/out", str(tmp_path)])  # one node: only the URL is probed


def test_ray_actors_read_and_write_s3(s3: str, tmp_path: Path) -> None:
    """Real set, model folder and out_dir all on S3; actors (other processes) write the shards."""
    real_local = make_real_set(tmp_path / "real", n_train=6, n_val=2)
    copy_tree(str(real_local.parent), f"{s3}/gen/real")
    real = f"{s3}/gen/real/manifest.parquet"
    cfg = generate_cfg(real, f"{s3}/gen/syn")
    with local_ray(sys.modules[__name__]):
        summary = run_generate(cfg, factory=standin_factory, progress=False)
    assert summary["samples"] == 12 and summary["shards_resumed"] == 0
    manifest = f"{s3}/gen/syn/{MANIFEST}"
    assert keys_of(manifest) == sorted(k for u in build_plan(cfg.plan, real).units for k in u.keys)
    assert verify_manifest(manifest).ok and not tmp_objects(s3)


@pytest.mark.slow
def test_driver_killed_with_shards_on_s3_then_the_same_command_resumes(s3: str, tiny_model: Path, tmp_path: Path) -> None:
    """SIGKILL ``python jobs/generate.py`` (out_dir, real set and model on S3) after k finished
    shards; the same command finishes the set: every planned key once, verify passes, no temp object."""
    real_local = make_real_set(tmp_path / "real", n_train=6, n_val=2)
    copy_tree(str(real_local.parent), f"{s3}/kill/real")
    copy_tree(str(tiny_model), f"{s3}/kill/model")
    real, out = f"{s3}/kill/real/manifest.parquet", f"{s3}/kill/syn"
    args = ["--set", f"real_manifest={real}", "--set", f"model_dir={s3}/kill/model", "--set", f"out_dir={out}",
            "--set", "plan.samples_per_source=2", "--set", "plan.samples_per_shard=2",
            "--set", "sampler.num_steps=12", "--set", "sampler.resolution=8", "--set", "sampler.batch_size=1",
            "--set", "ray.address=local", "--set", "ray.local_num_cpus=2", "--set", "ray.num_actors=2",
            "--set", "ray.num_cpus_per_actor=1", "--no-progress"]
    cfg = GenerateConfig(real_manifest=real, out_dir=out, plan=PlanConfig(samples_per_source=2, samples_per_shard=2))
    planned = [k for u in build_plan(cfg.plan, real).units for k in u.keys]
    n_shards = len(planned) // 2
    k = random.Random(7).randint(1, n_shards // 2)
    log = tmp_path / "driver.log"

    def parts() -> int:
        return len([n for n in storage.list_files(f"{out}/parts") if n.endswith(".parquet")])

    driver = test_faults.Driver(args, log)
    assert driver.wait_for(lambda: parts() >= k), log.read_text()[-3000:]
    driver.kill()
    kept = parts()
    assert not storage.exists(f"{out}/{MANIFEST}")  # the manifest comes last
    assert not tmp_objects(out)  # nothing partial is ever visible on the store
    assert test_faults.Driver(args, log).finish() == 0, log.read_text()[-3000:]
    keys = read_manifest(f"{out}/{MANIFEST}")[0]["key"].to_pylist()
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(planned)
    report = verify_manifest(f"{out}/{MANIFEST}")
    assert report.ok and report.samples == len(planned), report.problems
    assert released(out) and generations(out) == [1]  # the killed driver's owner file was taken over, then released
    print(f"\nS3 driver kill after {kept} of {n_shards} shards; the rerun finished the set")


@pytest.mark.slow
def test_a_sweep_reads_its_real_set_and_model_from_s3(s3: str, tiny_model: Path, tmp_path: Path) -> None:
    """``jobs.sweep`` with ``real_manifest`` and ``model_dir`` at URLs: the cells are generated from
    them, the record names them as given, and the report draws its source images from the bucket."""
    real_local = make_real_set(tmp_path / "real", n_train=6, n_val=2)
    copy_tree(str(real_local.parent), f"{s3}/sweep/real")
    copy_tree(str(tiny_model), f"{s3}/sweep/model")
    real, model, out = f"{s3}/sweep/real/manifest.parquet", f"{s3}/sweep/model", tmp_path / "sweep"
    sets = [f"real_manifest={real}", f"model_dir={model}", f"out={out}", "grid.w=[2.0]", "grid.lambdas=[1.0]",
            "studies.w_sweep.enabled=false", "fid.enabled=false", "judge.enabled=false", "generate.sampler.resolution=8",
            "generate.ray.address=local", "generate.ray.local_num_cpus=2", "generate.ray.num_actors=1"]
    cmd = [sys.executable, "-m", "jobs.sweep", "--config", "configs/sweeps/w.yaml", "--fast"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(cmd + [a for s in sets for a in ("--set", s)], cwd=test_faults.REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((out / "report-w" / "sweep.json").read_text())
    assert (record["real_manifest"], record["model_dir"]) == (real, model)
    (cell,) = record["cells"]
    manifest = out / cell["manifest"]
    assert verify_manifest(manifest).ok
    sources = {r["source_id"] for r in read_manifest(manifest)[0].to_pylist()}
    planned = {r["source_id"] for r in read_manifest(real)[0].to_pylist() if r["split"] == "train" and r["status"] == "ok"}
    assert sources and sources <= planned
    assert list((out / "report-w").glob("samples_*.png"))  # drawn beside their sources, read from the bucket
