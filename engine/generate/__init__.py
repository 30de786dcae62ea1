"""Distributed generation: Ray actors, one model replica each, writing tagged synthetic shards.

Parts (each replaceable on its own, img2dataset style):

- :mod:`engine.generate.plan`: real manifest -> deterministic work units (one shard each);
- :mod:`engine.generate.worker`: :class:`ShardGenerator`, one sampler replica, unit -> shard + manifest part;
- :mod:`engine.generate.distributor`: Ray connection, actor pool, retries after actor deaths;
- :mod:`engine.generate.run`: resume, progress, manifest merge, summary (``run_generate``;
  ``run_generate_sets`` serves several sets, e.g. a sweep's cells, with one actor pool).
"""

from engine.generate.config import GenerateConfig, PlanConfig, RayConfig, SamplerConfig
from engine.generate.plan import Plan, WorkItem, WorkUnit, build_plan
from engine.generate.run import run_generate, run_generate_sets
from engine.generate.worker import Sampler, ShardGenerator, load_sampler

__all__ = [
    "GenerateConfig", "PlanConfig", "RayConfig", "SamplerConfig", "Plan", "WorkItem", "WorkUnit", "build_plan",
    "run_generate", "run_generate_sets", "Sampler", "ShardGenerator", "load_sampler",
]
