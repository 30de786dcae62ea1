"""Load test: >= 10,000 tiny samples into >= 50 shards, then a seg epoch over them; memory and fds.

Generation goes through the real engine (``run_generate``: plan, Ray actor pool, shard
writer, manifest parts, merge) with the cheapest sampler there is, the test suite's
stand-in (tests/gen_fixtures.py: a seeded noise blend, no model), so that what is
measured is the engine's own cost and footprint, not a network's. Then ``seg.train``
trains the tiny segmentation model for one epoch's worth of steps (samples / batch size)
streaming every shard through its DataLoader workers, uniform λ scheme.

Printed, for each phase: throughput; RSS of the driver and of each actor (generation) or
DataLoader worker (seg) at 25/50/75/100 % of the work and their peaks (psutil, sampled
every 50 ms); open file descriptors (``/proc/<pid>/fd``) of the driver before and after,
and of each actor at 25 % and 100 %. Memory is flat when RSS at 100 % is within a few MB
of RSS at 25 %. No descriptor leaks when the counts do not grow with the work: the
driver's count moves by a few sockets that Ray opens to worker processes, never by one per
shard written or read.

    python benchmarks/load_test.py                          # 10,000 samples, 52 shards, 16x16
    python benchmarks/load_test.py --sources 500 --json runs/load.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the stand-in sampler and the fabricated real set

import gen_fixtures  # noqa: E402
from engine.generate.config import GenerateConfig, PlanConfig, RayConfig, SamplerConfig  # noqa: E402
from engine.generate.run import run_generate  # noqa: E402
from engine.verify import verify_manifest  # noqa: E402

MB = 1024 * 1024
MARKS = (25, 50, 75, 100)


def fds(pid: int | None = None) -> int:
    """Open file descriptors of ``pid`` (default: this process)."""
    return len(os.listdir(f"/proc/{pid or 'self'}/fd"))


def rss_mb(pid: int) -> float:
    """Resident memory of a live process in MB; NaN once it has exited (zombies report 0)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return float("nan")
        return proc.memory_info().rss / MB
    except psutil.Error:
        return float("nan")


class Monitor:
    """Peak RSS of the driver and of other processes, sampled in a thread; snapshots on demand.

    ``watch()`` returns the pids to follow on each tick (actors, or DataLoader workers),
    so processes that appear later (a restarted actor, a worker) are followed too.
    """

    def __init__(self, watch: Callable[[], set[int]], period: float = 0.05) -> None:
        self.watch = watch
        self.period = period
        self.peak: dict[int, float] = {}
        self.driver_peak = 0.0
        self.marks: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tick(self) -> None:
        self.driver_peak = max(self.driver_peak, rss_mb(os.getpid()))
        for pid in self.watch():
            value = rss_mb(pid)
            if not math.isnan(value):
                self.peak[pid] = max(self.peak.get(pid, 0.0), value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._tick()
            self._stop.wait(self.period)

    def mark(self, percent: int) -> None:
        """Record RSS of everyone, and fds, at ``percent`` of the work (once per mark)."""
        if percent in self.marks:
            return
        self._tick()
        pids = sorted(self.watch())
        self.marks[percent] = {
            "driver_rss_mb": round(rss_mb(os.getpid()), 1),
            "driver_fds": fds(),
            "rss_mb": {str(p): round(rss_mb(p), 1) for p in pids},
            "fds": {str(p): _fds_or_none(p) for p in pids},
        }

    def __enter__(self) -> "Monitor":
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict[str, Any]:
        return {"driver_peak_rss_mb": round(self.driver_peak, 1),
                "peak_rss_mb": {str(p): round(v, 1) for p, v in sorted(self.peak.items())},
                "at_percent": {str(k): v for k, v in sorted(self.marks.items())}}


def _fds_or_none(pid: int) -> int | None:
    try:
        return fds(pid)
    except OSError:
        return None


def _crossed(done: float, total: float, marks: dict[int, Any]) -> list[int]:
    return [m for m in MARKS if m not in marks and done >= total * m / 100]


def generate_phase(root: Path, sources: int, samples_per_source: int, lambdas: list[float],
                   samples_per_shard: int, size: int, actors: int) -> dict[str, Any]:
    """Real set -> synthetic set through Ray; memory and fds around it."""
    import ray
    from ray import cloudpickle

    real = gen_fixtures.make_real_set(root / "real", n_train=sources, n_val=max(8, sources // 10),
                                      per_shard=256, size=size)
    cfg = GenerateConfig(
        real_manifest=str(real), model_dir=str(root / "real"), out_dir=str(root / "synthetic"),
        plan=PlanConfig(w=[2.0], lambdas=lambdas, samples_per_source=samples_per_source,
                        samples_per_shard=samples_per_shard),
        sampler=SamplerConfig(batch_size=64), ray=RayConfig(num_actors=actors, num_cpus_per_actor=1, max_restarts=0),
    )
    cfg.validate()
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=max(2, actors), include_dashboard=False, log_to_driver=False)
    cloudpickle.register_pickle_by_value(gen_fixtures)  # actors cannot import tests/
    actor_pids: set[int] = set()
    total = cfg.plan.samples_per_source * sources * len(lambdas)
    done = {"samples": 0}
    try:
        fds_before = fds()
        with Monitor(lambda: set(actor_pids)) as mon:
            def on_result(result) -> None:
                actor_pids.add(result.pid)
                done["samples"] += result.samples
                for m in _crossed(done["samples"], total, mon.marks):
                    mon.mark(m)

            t0 = time.perf_counter()
            summary = run_generate(cfg, factory=gen_fixtures.standin_factory, on_result=on_result,
                                   progress=False)
            seconds = time.perf_counter() - t0
        fds_after = fds()
    finally:
        if started:
            ray.shutdown()
    t0 = time.perf_counter()
    report = verify_manifest(root / "synthetic" / "manifest.parquet")
    verify_s = time.perf_counter() - t0
    return {
        "real_manifest": str(real), "synthetic_manifest": str(root / "synthetic" / "manifest.parquet"),
        "samples": summary["samples"], "shards": summary["shards"], "size": size, "actors": actors,
        "seconds": round(seconds, 2), "samples_per_s": round(summary["samples"] / seconds, 1),
        "verify": {"ok": report.ok, "samples": report.samples, "shards": report.shards, "seconds": round(verify_s, 2),
                   "problems": report.problems[:5]},
        "driver_fds_before": fds_before, "driver_fds_after": fds_after,
        "memory": mon.report(),
    }


def seg_phase(root: Path, real: str, synthetic: str, samples: int, batch_size: int, workers: int,
              size: int) -> dict[str, Any]:
    """One epoch's worth of seg.train steps over real + synthetic shards; memory and fds."""
    from engine.config import load_config
    from seg.train import DEFAULT_CONFIG, SegConfig, train

    steps = math.ceil(samples / batch_size)
    out = root / "seg"
    cfg = load_config(SegConfig, DEFAULT_CONFIG, [
        "scheme.name=uniform", "scheme.synth_fraction=1.0", f"train.steps={steps}", f"train.batch_size={batch_size}",
        f"train.log_every={max(1, steps // 40)}", "train.eval_every=0", "train.checkpoint_every=0",
        f"data.workers={workers}", "data.shuffle_buffer=64", f"augment.crop={size}", "augment.scale_min=1.0",
        "augment.scale_max=1.0", "model.width=8", 'model.backbone_weights=""', "train.device=cpu"])
    me = psutil.Process()
    metrics = out / "metrics.jsonl"

    def children() -> set[int]:
        return {c.pid for c in me.children(recursive=True)}

    def progress() -> int:
        try:
            lines = metrics.read_text().splitlines()
        except OSError:
            return 0
        return max((json.loads(x).get("step", 0) for x in lines if x.strip()), default=0)

    fds_before = fds()
    with Monitor(children) as mon:
        stop = threading.Event()

        def follow() -> None:  # marks 25/50/75/100 % as the training log advances
            while not stop.is_set():
                for m in _crossed(progress(), steps, mon.marks):
                    mon.mark(m)
                stop.wait(0.02)

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        t0 = time.perf_counter()
        summary = train(cfg, [real, synthetic], out)
        seconds = time.perf_counter() - t0
        stop.set()
        follower.join()
        mon.mark(100)  # no-op unless the last step was missed (then: after the final evaluation)
    fds_after = fds()
    return {
        "steps": steps, "batch_size": batch_size, "samples_seen": steps * batch_size, "workers": workers,
        "seconds": round(seconds, 2), "samples_per_s": round(steps * batch_size / seconds, 1),
        "lam_counts": summary["lam_counts"], "miou": round(summary["miou"], 4),
        "driver_fds_before": fds_before, "driver_fds_after": fds_after, "memory": mon.report(),
    }


def run_load_test(root: Path, sources: int = 250, samples_per_source: int = 10,
                  lambdas: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0), samples_per_shard: int = 200, size: int = 16,
                  actors: int = 2, batch_size: int = 64, workers: int = 2) -> dict[str, Any]:
    """Both phases under ``root``; returns every figure (also what the slow test asserts on)."""
    gen = generate_phase(root, sources, samples_per_source, list(lambdas), samples_per_shard, size, actors)
    seg = seg_phase(root, gen["real_manifest"], gen["synthetic_manifest"], gen["samples"], batch_size, workers, size)
    return {"generate": gen, "seg": seg}


def growth(memory: dict[str, Any]) -> dict[str, float]:
    """RSS at 100 % minus RSS at 25 %, per process present at both marks (MB)."""
    at = memory["at_percent"]
    first, last = at["25"], at["100"]
    out = {"driver": round(last["driver_rss_mb"] - first["driver_rss_mb"], 1)}
    for pid, value in first["rss_mb"].items():
        if pid in last["rss_mb"] and not math.isnan(last["rss_mb"][pid]):
            out[pid] = round(last["rss_mb"][pid] - value, 1)
    return out


def format_report(res: dict[str, Any]) -> str:
    g, s = res["generate"], res["seg"]
    lines = [
        f"generate: {g['samples']} samples ({g['size']}x{g['size']}) in {g['shards']} shards, {g['actors']} actors: "
        f"{g['seconds']} s, {g['samples_per_s']} samples/s; verify {'OK' if g['verify']['ok'] else 'FAILED'} "
        f"({g['verify']['seconds']} s)",
        f"  driver fds before/after: {g['driver_fds_before']} / {g['driver_fds_after']}; "
        f"driver peak RSS {g['memory']['driver_peak_rss_mb']} MB; actor peak RSS (MB) {g['memory']['peak_rss_mb']}",
    ]
    for pct, m in g["memory"]["at_percent"].items():
        lines.append(f"  at {pct:>3} %: driver {m['driver_rss_mb']} MB, {m['driver_fds']} fds; "
                     f"actors RSS {m['rss_mb']} MB, fds {m['fds']}")
    lines.append(f"  RSS growth 25 % -> 100 % (MB): {growth(g['memory'])}")
    lines += [
        f"seg epoch: {s['steps']} steps x {s['batch_size']} = {s['samples_seen']} samples, {s['workers']} loader workers: "
        f"{s['seconds']} s, {s['samples_per_s']} samples/s; λ counts {s['lam_counts']}",
        f"  driver fds before/after: {s['driver_fds_before']} / {s['driver_fds_after']}; "
        f"driver peak RSS {s['memory']['driver_peak_rss_mb']} MB; worker peak RSS (MB) {s['memory']['peak_rss_mb']}",
    ]
    for pct, m in s["memory"]["at_percent"].items():
        lines.append(f"  at {pct:>3} %: driver {m['driver_rss_mb']} MB, {m['driver_fds']} fds; workers RSS {m['rss_mb']} MB")
    lines.append(f"  driver RSS growth 25 % -> 100 %: {growth(s['memory'])['driver']} MB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=int, default=250, help="real train sources (default 250)")
    parser.add_argument("--samples-per-source", type=int, default=10)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--samples-per-shard", type=int, default=200)
    parser.add_argument("--size", type=int, default=16, help="image side in pixels")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64, help="seg batch size")
    parser.add_argument("--workers", type=int, default=2, help="seg DataLoader workers")
    parser.add_argument("--root", help="work folder (default: a temporary folder, deleted after)")
    parser.add_argument("--json", help="also write all figures to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="scribblegen-load-") as tmp:
        root = Path(args.root) if args.root else Path(tmp)
        res = run_load_test(root, args.sources, args.samples_per_source, tuple(args.lambdas), args.samples_per_shard,
                            args.size, args.actors, args.batch_size, args.workers)
    print(format_report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if res["generate"]["verify"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
