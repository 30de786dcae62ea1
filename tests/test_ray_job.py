"""The real cluster path: `ray start --head`, `ray job submit --working-dir .`, then stop.

Chain: ingest (procedural, 32 px) -> tiny model built from configs/controlnet/tiny.yaml
(save_pretrained, random init) -> `python jobs/generate.py` submitted as a Ray job.

The head runs with ``--block`` under this test's own Popen and is stopped by signalling
that process (it takes its Ray processes down with it), not with ``ray stop``, which
kills every Ray process of the user on the machine. Ports and ``--temp-dir`` are private
so a cluster started by anyone else on the machine is neither joined nor disturbed.
Head and CLI both run with ``RAY_AUTH_MODE=token`` (Ray's token auth), the token made by
``ray get-auth-token --generate`` in ``$HOME/.ray/auth_token`` -- here a private HOME.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from engine.manifest import read_manifest
from engine.shards import read_shard
from engine.verify import verify_manifest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"dashboard port {port} did not open in {timeout} s")


@pytest.mark.slow
def test_ray_job_submit_generates_a_verified_set(tmp_path: Path) -> None:
    from engine.config import load_config
    from engine.train_controlnet import TrainControlNetConfig, build_model

    # Token auth for head and CLI alike (Ray >= 2.5x enables it for clusters once a token
    # exists in ~/.ray; the job CLI only sends it when RAY_AUTH_MODE=token).
    # A private HOME keeps that token (and Ray's other per-user files) inside this test.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token",
           "HOME": str(tmp_path / "home")}
    env.pop("RAY_ADDRESS", None)
    real = tmp_path / "real"
    subprocess.run(
        [sys.executable, "jobs/ingest.py", "--set", f"out={real}", "--set", "source.procedural.num_train=6",
         "--set", "source.procedural.num_val=2", "--set", "source.procedural.size=32"],
        cwd=REPO, env=env, check=True, capture_output=True, timeout=300,
    )
    cfg = load_config(TrainControlNetConfig, REPO / "configs/controlnet/tiny.yaml")
    model = build_model(cfg, read_manifest(real / "manifest.parquet")[1].class_names)
    model.save_pretrained(tmp_path / "controlnet" / "final")
    out = tmp_path / "synthetic"
    args = ["--config", "configs/generate/tiny.yaml", "--set", f"real_manifest={real / 'manifest.parquet'}",
            "--set", f"model_dir={tmp_path / 'controlnet'}", "--set", "plan.max_sources=4",
            "--set", "plan.samples_per_shard=4", "--set", "sampler.num_steps=4", "--set", "ray.num_cpus_per_actor=1"]

    # Ray's local-dev token flow (prints the token: captured, never shown).
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    gcs, dash, client, agent, agent_grpc, metrics, env_agent = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
         "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
         "--runtime-env-agent-port", str(env_agent), "--temp-dir", temp_dir, "--disable-usage-stats"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_for_port(dash, head)
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", ".",
             "--", "python", "jobs/generate.py", "--no-progress", *args, "--set", f"out_dir={out}"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )
        assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-3000:] + job.stderr[-3000:]
        assert "wrote 8 samples in 2 shards" in job.stdout
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)  # --block: ray start stops its own processes on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
    report = verify_manifest(out / "manifest.parquet")
    assert report.ok and report.samples == 8, report.problems
    table, info = read_manifest(out / "manifest.parquet")
    assert info.kind == "synthetic" and sorted(set(table["lambda"].to_pylist())) == [0.5, 1.0]
    assert info.extra["compute"]["device"] == "cpu" and info.extra["compute"]["actors"] == 1

    # The same config as a plain script on a private local Ray gives the same keys and pixels
    # (shard bytes differ: the json tags carry timings).
    local = subprocess.run(
        [sys.executable, "jobs/generate.py", "--no-progress", *args, "--set", f"out_dir={tmp_path / 'local'}",
         "--set", "ray.address=local"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert local.returncode == 0, local.stderr[-3000:]
    for shard in sorted(set(table["shard"].to_pylist())):
        job_samples, local_samples = list(read_shard(out / shard)), list(read_shard(tmp_path / "local" / shard))
        assert [s.key for s in job_samples] == [s.key for s in local_samples]
        for a, b in zip(job_samples, local_samples):
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_array_equal(a.scribble, b.scribble)
