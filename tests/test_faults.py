"""Generation killed at many points, then resumed: every planned key exactly once, no corrupt shard.

Kill points (SIGKILL, nothing is caught or cleaned up by the victim):

actor (in-process driver, stand-in sampler, one shared local Ray):
  1. mid-batch, inside ``sampler.sample`` (the unit's ``.tar.tmp`` holds the earlier batches);
  2. after the shard's rename, before its manifest part is written;
  3. while the part's ``.parquet.tmp`` exists (after it is written, before its rename);
  each without Ray restarts (the run fails, re-running it finishes); plus seeded random
  kills of random actors during one run with restarts (it finishes by itself; a restart
  after a kill between shards is tests/test_generate.py's).
driver (``python jobs/generate.py`` in a subprocess with the tiny real model):
  4. after k finished shards (k seeded-random);
  5. while a shard ``.tar.tmp`` exists;
  6. during the manifest merge (the merged ``manifest.parquet.tmp`` is written, not renamed).
  Each is resumed by running the very same command line again.

After the final run: the manifest lists exactly the planned keys, once each;
``verify_manifest`` passes (sizes, SHA-256, keys, members); every sample decodes (the
stand-in's pixels equal the reference); no ``.tmp`` is left anywhere. Between kills,
every visible ``.tar`` is a whole, readable shard and no manifest is half written.

The faults are injected from the test side only: a sampler factory (run inside each
actor) that kills its own process once, at a chosen point, guarded by a marker file so
the restarted actor does not kill itself again. Production code has no fault hooks.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

import gen_fixtures
from engine.errors import BadInputError
from engine.generate.config import GenerateConfig, PlanConfig, RayConfig, SamplerConfig
from engine.generate.distributor import GenerationError
from engine.generate.plan import build_plan
from engine.generate.run import run_generate
from engine.manifest import read_manifest
from engine.shards import iter_records, read_shard
from engine.verify import verify_manifest
from gen_fixtures import StandInSampler, expected_standin, local_ray, make_real_set

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_session():
    with local_ray(sys.modules[__name__]) as ray:  # the fault factories below run inside actors
        yield ray


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    return make_real_set(tmp_path_factory.mktemp("real"), n_train=6, n_val=2)


# ------------------------------------------------------------------ test-side fault injection ----

def _first_time(marker: str) -> bool:
    """True exactly once per marker file, across processes (the restarted actor sees it)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def faulty_factory(model_dir: str, device: str, cfg: SamplerConfig, *, fault: str, marker: str,
                   delay: float = 0.02) -> StandInSampler:
    """The stand-in sampler, plus one SIGKILL of this actor at ``fault`` (once per marker).

    Runs inside the actor process, so the patches below change only that process.
    """
    import engine.generate.worker as worker
    import engine.manifest as manifest

    sampler = StandInSampler(delay)
    if fault == "mid_batch":
        calls = {"n": 0}
        sample = sampler.sample

        def sample_then_die(*args: Any) -> np.ndarray:
            calls["n"] += 1
            if calls["n"] == 2 and _first_time(marker):  # the unit's second batch: its .tar.tmp holds the first
                _die()
            return sample(*args)

        sampler.sample = sample_then_die  # type: ignore[method-assign]
    elif fault == "before_part":
        write_manifest = worker.write_manifest

        def die_before_part(*args: Any, **kw: Any):
            if _first_time(marker):  # the shard is renamed into place, its part not written
                _die()
            return write_manifest(*args, **kw)

        worker.write_manifest = die_before_part
    elif fault == "part_tmp":
        pq = manifest.pq

        class DyingParquet:  # writes parts/<shard>.parquet.tmp, then dies before the rename
            read_table = staticmethod(pq.read_table)

            @staticmethod
            def write_table(table: Any, where: Any, **kw: Any) -> None:
                pq.write_table(table, where, **kw)
                if _first_time(marker):
                    _die()

        manifest.pq = DyingParquet
    else:
        raise ValueError(fault)
    return sampler


# ------------------------------------------------------------------------------- checks ----------

def _cfg(real: Path, out: Path, **ray_kw: Any) -> GenerateConfig:
    cfg = GenerateConfig(
        real_manifest=str(real), model_dir=str(real.parent), out_dir=str(out),
        plan=PlanConfig(w=[2.0], lambdas=[0.5, 1.0], samples_per_source=2, samples_per_shard=5, seed=3),
        sampler=SamplerConfig(batch_size=2),
        ray=RayConfig(**{"num_actors": 1, "num_cpus_per_actor": 1, "max_restarts": 2, "unit_retries": 3, **ray_kw}),
    )
    cfg.validate()
    return cfg


def assert_whole_tars(out: Path) -> None:
    """Mid-crash state: every visible .tar is a complete, readable shard; no half manifest."""
    for tar in out.glob("*.tar"):
        for record in iter_records(tar):
            assert {"png", "scribble.png", "json"} <= set(record), (tar, sorted(record))
    if (out / "manifest.parquet").exists():
        read_manifest(out / "manifest.parquet")


def assert_complete(out: Path, planned: list[str], sources: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every planned key exactly once, a verified manifest, decodable shards, no temp file."""
    manifest = out / "manifest.parquet"
    table, _ = read_manifest(manifest)
    keys = table["key"].to_pylist()
    assert len(keys) == len(set(keys)), "a key is listed twice"
    assert sorted(keys) == sorted(planned)
    report = verify_manifest(manifest)
    assert report.ok, report.problems
    assert report.samples == len(planned)
    decoded = 0
    for tar in sorted(out.glob("*.tar")):
        for sample in read_shard(tar):
            decoded += 1
            if sources is not None:  # the stand-in's output is exact: no pixel was damaged or mixed up
                src = sources[sample.meta["source_id"]]
                np.testing.assert_array_equal(sample.image, expected_standin(src.image, sample.lam, sample.meta["seed"]))
    assert decoded == len(planned)
    leftovers = sorted(p.name for p in out.rglob("*.tmp"))
    assert not leftovers, leftovers
    return {"samples": report.samples, "shards": report.shards}


def _sources(real: Path) -> dict[str, Any]:
    return {s.key: s for tar in sorted(real.parent.glob("*.tar")) for s in read_shard(tar)}


def _planned(cfg: GenerateConfig) -> list[str]:
    return [k for u in build_plan(cfg.plan, Path(cfg.real_manifest)).units for k in u.keys]


# ---------------------------------------------------------------------------- actor kills --------

FAULTS = ("mid_batch", "before_part", "part_tmp")


@pytest.mark.parametrize("fault", FAULTS)
def test_actor_killed_without_restarts_fails_the_run_and_a_rerun_resumes(
    ray_session, real: Path, tmp_path: Path, fault: str
) -> None:
    out = tmp_path / "syn"
    cfg = _cfg(real, out, max_restarts=0, unit_retries=0)
    factory = functools.partial(faulty_factory, fault=fault, marker=str(tmp_path / "killed"))
    with pytest.raises(GenerationError, match="failed 1 times"):
        run_generate(cfg, factory=factory, progress=False)
    assert (tmp_path / "killed").exists(), "the fault did not fire"
    # The failed run removed its temp files; what is visible is whole (a shard may lack its part).
    assert not sorted(out.rglob("*.tmp")) and not (out / "manifest.parquet").exists()
    assert_whole_tars(out)
    orphans = [t for t in out.glob("*.tar") if not (out / "parts" / f"{t.stem}.parquet").exists()]
    assert len(orphans) == (fault != "mid_batch")  # killed after the rename, before the part was in place
    finished = len(list((out / "parts").glob("*.parquet")))
    summary = run_generate(cfg, factory=factory, progress=False)  # the same call again: resume
    assert summary["shards_resumed"] == finished and summary["actor_deaths"] == 0
    assert_complete(out, _planned(cfg), _sources(real))


def test_random_actor_kills_during_one_run(ray_session, real: Path, tmp_path: Path) -> None:
    """Seeded chaos: after 3 randomly chosen finished shards, SIGKILL a randomly chosen actor
    (busy with its next units); Ray restarts it, its units are redone, the run finishes."""
    out = tmp_path / "syn"
    cfg = _cfg(real, out, num_actors=2, max_restarts=20, unit_retries=10)
    cfg.plan.samples_per_shard = 2  # 12 shards
    rng = random.Random(1234)
    kill_after = set(rng.sample(range(1, 10), 3))  # which finished shards (1-based) trigger a kill
    pids: set[int] = set()
    results: list[int] = []
    kills: list[int] = []

    def chaos(result) -> None:
        pids.add(result.pid)
        results.append(result.pid)
        if len(results) in kill_after:
            victim = rng.choice(sorted(pids))
            pids.discard(victim)
            os.kill(victim, signal.SIGKILL)
            kills.append(victim)

    factory = functools.partial(gen_fixtures.standin_factory, delay=0.05)
    summary = run_generate(cfg, factory=factory, on_result=chaos, progress=False)
    assert len(kills) == 3 and summary["actor_deaths"] >= 2 and summary["unit_failures"] >= 2
    assert_complete(out, _planned(cfg), _sources(real))
    print(f"\nchaos: killed after shards {sorted(kill_after)}: {summary['actor_deaths']} actor deaths, "
          f"{summary['unit_failures']} unit attempts lost, all {len(_planned(cfg))} samples once")


def test_bad_input_in_an_actor_stops_the_run_without_half_outputs(ray_session, tmp_path: Path) -> None:
    """A damaged real shard met by one actor: the run stops with that error; no manifest, no .tmp."""
    real = make_real_set(tmp_path / "real", n_train=8, n_val=0, per_shard=4)
    (tmp_path / "real" / "real-000001.tar").write_bytes(b"")  # sources tr004..tr007
    out = tmp_path / "syn"
    cfg = _cfg(real, out, num_actors=2)
    cfg.plan.samples_per_shard = 2
    factory = functools.partial(gen_fixtures.standin_factory, delay=0.05)
    with pytest.raises(BadInputError, match="real-000001.tar: not a readable tar shard"):
        run_generate(cfg, factory=factory, progress=False)
    assert not (out / "manifest.parquet").exists()
    assert not sorted(out.rglob("*.tmp")), sorted(out.rglob("*.tmp"))
    assert_whole_tars(out)


def test_a_second_driver_on_the_same_folder_is_refused(real: Path, tmp_path: Path) -> None:
    """Two drivers would delete each other's unfinished shards; the lock dies with its holder
    (the driver-kill test below reruns right after SIGKILL)."""
    from engine.lock import exclusive_folder

    out = tmp_path / "syn"
    cfg = _cfg(real, out)
    with exclusive_folder(out):  # the first driver, still running
        with pytest.raises(BadInputError, match="another generate run is writing to this folder"):
            run_generate(cfg, factory=gen_fixtures.standin_factory, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the refused run touched nothing


@pytest.mark.parametrize("broken", ["empty_folder", "pickled_weights"])
def test_generate_cli_names_a_model_folder_the_actors_cannot_load(
    ray_session, real: Path, tiny_model: Path, tmp_path: Path, capsys, broken: str
) -> None:
    """The model is loaded inside each actor; its BadInputError still reaches the CLI: exit 2, one line."""
    import shutil

    import torch

    from jobs.generate import main

    model = tmp_path / "model"
    if broken == "empty_folder":
        model.mkdir()
        message = "not a ScribbleGen model folder"
    else:
        shutil.copytree(tiny_model, model)
        (model / "unet/diffusion_pytorch_model.safetensors").unlink()
        torch.save({}, model / "unet/diffusion_pytorch_model.bin")
        message = "cannot load the model"
    argv = ["--set", f"real_manifest={real}", "--set", f"model_dir={model}", "--set", f"out_dir={tmp_path / 'syn'}",
            "--set", "ray.num_actors=1", "--set", "ray.num_cpus_per_actor=1", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"error: {model}: {message}" in err
    assert not list((tmp_path / "syn").glob("*.tar")) and not (tmp_path / "syn" / "manifest.parquet").exists()


# ---------------------------------------------------------------------------- driver kills -------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The embedded tiny model at a very small size, saved with save_pretrained (random init)."""
    from engine.config import load_config
    from engine.train_controlnet import TrainControlNetConfig, build_model

    cfg = load_config(TrainControlNetConfig, REPO / "configs/controlnet/tiny.yaml", [
        "model.pretrained=null", "model.resolution=8", "model.tiny.block_out_channels=[8,16,16]", "model.tiny.norm_num_groups=4",
        "model.tiny.conditioning_channels=8", "model.tiny.cross_attention_dim=8", "model.tiny.attention_head_dim=4"])
    return build_model(cfg, gen_fixtures.CLASS_NAMES).save_pretrained(tmp_path_factory.mktemp("model") / "final")


# The driver of the merge-kill run: the same job, with the merged manifest's Parquet write
# followed by a SIGKILL of the driver itself (after manifest.parquet.tmp, before the rename).
DIE_IN_MERGE = """
import os, runpy, signal, sys
sys.path.insert(0, os.getcwd())
import engine.manifest as manifest
pq = manifest.pq
class DyingParquet:
    read_table = staticmethod(pq.read_table)
    @staticmethod
    def write_table(table, where, **kw):
        pq.write_table(table, where, **kw)
        if os.path.basename(str(where)) == "manifest.parquet.tmp":  # parts are <shard>.parquet.tmp
            os.kill(os.getpid(), signal.SIGKILL)
manifest.pq = DyingParquet
sys.argv = ["jobs/generate.py", *sys.argv[1:]]
runpy.run_path("jobs/generate.py", run_name="__main__")
"""


class Driver:
    """``python jobs/generate.py ARGS`` in its own session; kill it and wait for its process tree."""

    def __init__(self, args: list[str], log: Path, prefix: list[str] | None = None) -> None:
        cmd = [sys.executable, *(prefix or ["jobs/generate.py"]), *args]
        self.log = open(log, "a")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.tree: list[psutil.Process] = []

    def _snapshot(self) -> None:
        try:
            self.tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass

    def wait_for(self, cond, timeout: float = 300.0) -> bool:
        """Poll ``cond()`` every 10 ms until true (returns True) or the driver exits (False)."""
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                return False
            self._snapshot()
            if cond():
                return True
            time.sleep(0.01)
        raise TimeoutError("the kill condition never came")

    def kill(self) -> float:
        """SIGKILL the driver only; wait until its actors are gone; return that wait in seconds."""
        self._snapshot()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return self.reap()

    def reap(self, timeout: float = 60.0) -> float:
        """Wait for the driver's actor processes to exit; kill (by pid) whatever Ray left behind."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            alive = [p for p in self.tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            if not any("ShardGenerator" in _name(p) for p in alive):
                break
            time.sleep(0.1)
        waited = time.monotonic() - t0
        for p in self.tree:  # e.g. Ray's dashboard/runtime-env agents, which outlive their raylet a while
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.log.close()
        return waited

    def finish(self, timeout: float = 600.0) -> int:
        rc = self.proc.wait(timeout)
        self._snapshot()
        self.reap(timeout=5)
        return rc


def _name(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return ""


@pytest.mark.slow
def test_driver_killed_at_three_points_then_the_same_command_resumes(
    ray_session, real: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """``ray_session`` keeps this process's own Ray instance running meanwhile: each driver must
    start a private one, not join it (Ray's ``address="auto"`` would, and die with it)."""
    out = tmp_path / "syn"
    args = ["--set", f"real_manifest={real}", "--set", f"model_dir={tiny_model}", "--set", f"out_dir={out}",
            "--set", "plan.samples_per_source=2", "--set", "plan.samples_per_shard=2",
            "--set", "sampler.num_steps=12", "--set", "sampler.resolution=8", "--set", "sampler.batch_size=1",
            "--set", "ray.local_num_cpus=2", "--set", "ray.num_actors=2", "--set", "ray.num_cpus_per_actor=1",
            "--no-progress"]
    cfg = GenerateConfig(real_manifest=str(real), out_dir=str(out),
                         plan=PlanConfig(samples_per_source=2, samples_per_shard=2))
    planned = _planned(cfg)
    n_shards = len(planned) // 2
    rng = random.Random(7)
    k = rng.randint(1, n_shards // 2)
    log = tmp_path / "driver.log"
    parts = lambda: list((out / "parts").glob("*.parquet")) if (out / "parts").is_dir() else []  # noqa: E731

    # 4. after k finished shards
    d = Driver(args, log)
    assert d.wait_for(lambda: len(parts()) >= k), log.read_text()[-3000:]
    quiet_1 = d.kill()
    assert_whole_tars(out)
    assert not (out / "manifest.parquet").exists()
    done_1 = len(parts())

    # 5. while a shard .tmp exists (after a seeded-random extra delay)
    started = time.time()

    def fresh_tmp() -> bool:  # a .tmp this run is writing (the first kill's leftovers are deleted on resume)
        if log.read_text().count("Started a local Ray instance") < 2:
            return False  # this driver's own Ray is not up yet: a .tmp now could only be a straggler's
        for tmp in out.glob("*.tar.tmp"):
            try:
                if tmp.stat().st_mtime >= started:
                    return True
            except FileNotFoundError:
                pass
        return False

    d = Driver(args, log)
    assert d.wait_for(fresh_tmp, 300), log.read_text()[-3000:]
    time.sleep(rng.uniform(0.0, 0.5))
    tmp_seen = [p.name for p in out.glob("*.tar.tmp")]
    quiet_2 = d.kill()
    assert_whole_tars(out)
    done_2 = len(parts())

    # 6. during the manifest merge (the rest of the shards are generated first)
    d = Driver(args, log, prefix=["-c", DIE_IN_MERGE])
    rc = d.finish()
    assert rc == -signal.SIGKILL, log.read_text()[-3000:]
    assert (out / "manifest.parquet.tmp").exists() and not (out / "manifest.parquet").exists()
    assert len(parts()) == n_shards

    # The same command again: nothing left to generate (no Ray needed), the manifest is merged.
    d = Driver(args, log)
    assert d.finish() == 0, log.read_text()[-3000:]
    assert_complete(out, planned)
    summary = __import__("json").loads((out / "summary.json").read_text())
    assert summary["shards_resumed"] == n_shards and summary["samples_this_run"] == 0
    text = log.read_text()
    # Drivers 1 and 2 each started their own Ray; driver 3 does only when the killed drivers'
    # straggling actors (alive ~2 s after their driver) left it shards to generate.
    assert text.count("Started a local Ray instance") >= 2 and "Connecting to existing Ray cluster" not in text
    models = set(read_manifest(out / "manifest.parquet")[0]["model"].to_pylist())
    assert len(models) == 1  # one model id in every shard, whichever run wrote it
    print(f"\ndriver kills: k={k} -> {done_1} shards kept; .tmp at kill {tmp_seen} -> {done_2} kept; "
          f"merge kill left manifest.parquet.tmp; actors gone {quiet_1:.1f} s / {quiet_2:.1f} s after the driver died")
