"""Generation on a 2-node Ray cluster (one machine): the second node dies mid-run.

``ray.cluster_utils.Cluster`` starts a head without CPUs (so every actor lands on the
worker node) and one 2-CPU worker node. After the first finished shard the worker node
is removed and a fresh one added: the actors that lived on the dead node are restarted
on the new one by Ray, their units are retried by the distributor, and the set ends
with every planned key exactly once and a manifest that verifies.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from engine.generate import GenerateConfig, PlanConfig, RayConfig, SamplerConfig, build_plan, run_generate
from engine.manifest import read_manifest
from engine.verify import verify_manifest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_fixtures  # noqa: E402
from gen_fixtures import make_real_set, standin_factory  # noqa: E402


@pytest.mark.slow
def test_a_worker_node_killed_mid_run_loses_nothing(tmp_path: Path) -> None:
    import functools

    import ray
    from ray import cloudpickle
    from ray.cluster_utils import Cluster

    cloudpickle.register_pickle_by_value(gen_fixtures)
    real = make_real_set(tmp_path / "real")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=2)]
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cfg = GenerateConfig(
            real_manifest=str(real), model_dir=str(real.parent), out_dir=str(tmp_path / "syn"),
            plan=PlanConfig(w=[2.0], lambdas=[0.5, 1.0], samples_per_source=2, samples_per_shard=2, seed=3),
            sampler=SamplerConfig(batch_size=2),
            ray=RayConfig(num_actors=2, num_cpus_per_actor=1, max_restarts=3, unit_retries=3, placement_timeout_s=120),
        )
        cfg.validate()
        killed: list[str] = []

        def kill_the_worker_node(result) -> None:
            if not killed:
                killed.append(nodes[0].unique_id)
                cluster.remove_node(nodes[0], allow_graceful=False)
                nodes.append(cluster.add_node(num_cpus=2))

        summary = run_generate(cfg, factory=functools.partial(standin_factory, delay=0.05),
                               on_result=kill_the_worker_node, progress=False)
        assert killed and summary["actor_deaths"] >= 1
        manifest = tmp_path / "syn" / "manifest.parquet"
        keys = read_manifest(manifest)[0].column("key").to_pylist()
        plan = build_plan(cfg.plan, real)
        assert len(keys) == len(set(keys)) == plan.num_samples
        assert sorted(keys) == sorted(k for u in plan.units for k in u.keys)
        report = verify_manifest(manifest)
        assert report.ok, report.problems

        # A folder that a node cannot see is refused before any actor starts (here: one no node has).
        from engine.errors import BadInputError
        from engine.generate.distributor import check_visible_everywhere

        check_visible_everywhere([str(tmp_path / "syn"), str(real)])  # shared on this machine: fine
        with pytest.raises(BadInputError, match=r"is not visible from Ray node .* every node mounts"):
            check_visible_everywhere([str(tmp_path / "only-on-the-driver")])
    finally:
        ray.shutdown()
        cluster.shutdown()
