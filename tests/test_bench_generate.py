"""benchmarks/generate.py's paced stand-in (``--stub``): what it returns, and that the
benchmark runs with it end to end (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from scripts import REPO, load_script


def test_the_paced_stub_returns_seeded_noise_of_the_input_shape_and_counts_steps_like_truncate():
    bench = load_script("benchmarks/generate.py")
    stub = bench.sampler_factory(0.0)("unused", "cpu", None)
    images = np.zeros((3, 16, 24, 3), np.uint8)
    out = stub.sample(images, images[..., 0], [[]] * 3, 2.0, 1.0, [5, 6, 5])
    assert out.shape == images.shape and out.dtype == np.uint8
    assert np.array_equal(out[0], out[2]) and not np.array_equal(out[0], out[1])  # one image per seed
    assert [stub.steps_for(lam) for lam in (1.0, 0.5, 0.01)] == [50, 25, 1]
    assert bench.sampler_factory(None) is bench.load_sampler
    gil = bench.sampler_factory(0.0, gil_share=0.5)("unused", "cpu", None)  # Python work in place of some sleep
    assert gil.loops_per_s > 0 and np.array_equal(gil.sample(images, images[..., 0], [[]] * 3, 2.0, 1.0, [5, 6, 5]), out)


def test_stub_gil_needs_the_stub_and_a_share_below_one():
    for args in (["--stub-gil", "0.3"], ["--stub", "0.1", "--stub-gil", "1.5"]):
        done = subprocess.run([sys.executable, "benchmarks/generate.py", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and "--stub-gil takes a share in [0, 1) and needs --stub" in done.stderr


def test_the_benchmark_runs_with_the_stub(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "benchmarks/generate.py", "--stub", "0.001", "--engine", "inprocess", "--sources", "4",
           "--resolution", "32", "--batch-size", "2", "--repeats", "1", "--lambdas", "1.0", "0.5", "--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert [r["samples"] for r in results["runs"]] == [4, 4, 4, 4]  # bare and engine, at λ = 1 and 0.5
    assert results["ratio_engine_over_bare_l1"] > 0 and results["ratio_engine_over_bare_l0.5"] > 0


def test_the_scheduler_reaches_the_sampler_config(tmp_path):
    """--scheduler: the GPU targets of issue 25 time a fast solver through the same engine."""
    import argparse

    bench = load_script("benchmarks/generate.py")
    args = argparse.Namespace(image_format="png", batch_size=2, batches_per_shard=1, steps=10, dtype="float32",
                              resolution=32, compile=False, scheduler="dpmsolver++", ray_cpus=None)
    cfg = bench.config(args, "cpu", tmp_path / "real.parquet", tmp_path / "model", tmp_path / "out", 1.0, 1, 1)
    assert (cfg.sampler.scheduler, cfg.sampler.num_steps) == ("dpmsolver++", 10)
    done = subprocess.run([sys.executable, "benchmarks/generate.py", "--scheduler", "euler"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "invalid choice: 'euler'" in done.stderr
