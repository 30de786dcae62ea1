"""A whole generation run: plan, resume, distribute, merge the manifest, summarise.

Output folder::

    <out>/syn-w2p00-l0p50-000000.tar ...   shards (one (w, λ) each)
    <out>/parts/<shard>.parquet            per-shard manifest parts (written by actors)
    <out>/manifest.parquet                 merged manifest, DatasetInfo(kind="synthetic")
    <out>/config.yaml  <out>/identity.json the resolved config; what the shards were made from
    <out>/summary.json                     samples, shards, seconds, images/s, s/sample by λ

Resume: a shard counts as done when its ``.tar`` and its part both exist and the part's
keys and byte size match the file (see :func:`shard_done`); everything else of the plan is (re)done,
``*.tmp`` leftovers and shards without a part are deleted first. ``identity.json``
(``engine.identity``) pins the plan fingerprint, the model's weights and the sampler
settings: rerunning into a folder made with other settings is refused instead of silently
mixing two generations. The folder's writer lock (``engine.lock``: flock, or an owner file
with a heartbeat where the filesystem has no flock or ``out_dir`` is an object-store URL)
is held for the whole run, so a second driver on the same folder is refused too; a killed
driver never blocks its rerun.

Every location (``out_dir``, ``model_dir``, ``real_manifest``) may be a local path or a URL
(``engine.storage``); resume reads one listing of the output folder and of ``parts/``
instead of one lookup per shard, which keeps it fast on object stores.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import replace
from typing import Any, Callable

from tqdm import tqdm

from engine import storage
from engine.atomic import atomic_path, write_json
from engine.config import save_config, to_dict
from engine.errors import BadInputError
from engine.generate.config import GenerateConfig, SamplerConfig
from engine.generate.distributor import Distributor, check_job_paths, check_visible_everywhere, connect, pool_shape
from engine.generate.plan import Plan, WorkUnit, build_plan
from engine.generate.worker import PARTS_DIR, SamplerFactory, ShardResult, load_sampler, part_path
from engine.identity import Identity
from engine.lock import exclusive_folder
from engine.manifest import DatasetInfo, merge_parts, read_manifest, read_table

MANIFEST = "manifest.parquet"
SUMMARY = "summary.json"


# Sampler keys added after sets were recorded, with the default that reproduces those sets.
ADDED_LATER = {"scheduler": "ddim", "hint_resize": "nearest"}


def generation_identity(cfg: GenerateConfig, plan: Plan, model_dir: storage.Location) -> Identity:
    """Everything that decides the pixels of the planned shards (batch size, device and the
    Ray layout do not): the plan, the sampler, the image format and the model's weights.

    A key added later (:data:`ADDED_LATER`: ``scheduler``, the paper-fidelity options) enters
    only off its default: every set made before it existed recorded no such key and was made
    as the default makes it, so its identity stays what it was."""
    return Identity({"plan": plan.fingerprint(), "image_format": cfg.image_format, "sampler": sampler_settings(cfg.sampler)},
                    {"model": model_weights_id(model_dir)})


def sampler_settings(s: SamplerConfig) -> dict[str, Any]:
    """The sampler keys that decide the pixels (not its batch size or device), as identities record them."""
    sampler = {"num_steps": s.num_steps, "spacing": s.spacing, "uncond": s.uncond, "dtype": s.dtype,
               "resolution": s.resolution, "resize": s.resize}
    sampler.update({k: getattr(s, k) for k, default in ADDED_LATER.items() if getattr(s, k) != default})
    return sampler


def model_weights_id(model_dir: storage.Location) -> str:
    """The model id its bundle records (a digest of its weights), or a fresh digest."""
    from engine.models import BUNDLE_FILE, weights_digest

    meta = storage.join(model_dir, BUNDLE_FILE)
    if storage.is_file(meta):
        return json.loads(storage.read_text(meta)).get("model_id")
    return weights_digest(storage.local_copy(model_dir))


def shard_done(out: storage.Location, unit: WorkUnit, tars: dict[str, int], parts: dict[str, int]) -> bool:
    """True when the unit's shard and part exist and agree (keys, byte size).

    ``tars`` and ``parts`` are the listings (name -> size) of ``out`` and ``out/parts``.
    The checksum is not recomputed: a shard becomes visible (rename, or one whole-object
    put) only after it was written whole, and its part is written after that, so a part
    beside a tar of the recorded size means a finished shard. Reading every shard back on
    every resume cost minutes on large sets; ``python -m engine.verify`` checks the checksums.
    """
    part = part_path(out, unit.shard)
    if unit.shard not in tars or storage.name(part) not in parts:
        return False
    try:
        rows = read_table(part, columns=["key", "shard_bytes"]).to_pylist()
    except Exception:  # an unreadable part is simply redone
        return False
    return (
        sorted(r["key"] for r in rows) == sorted(unit.keys)  # batches group by image size: order may differ
        and all(r["shard_bytes"] == tars[unit.shard] for r in rows)
    )


def remove_temp_files(out: storage.Location) -> None:
    """Delete the ``.tmp`` files of shards, parts and the manifest that were cut short (only
    local folders have them: on an object store the temp file is on the writer's disk)."""
    for folder in (out, storage.join(out, PARTS_DIR)):
        for name in storage.list_files(folder):
            if name.endswith(storage.TMP_SUFFIX):
                storage.remove(storage.join(folder, name))


def resume_scan(out: storage.Location, units: list[WorkUnit]) -> tuple[list[WorkUnit], list[WorkUnit]]:
    """Split units into (done, todo); delete leftovers of unfinished shards."""
    remove_temp_files(out)
    tars, parts = storage.list_files(out), storage.list_files(storage.join(out, PARTS_DIR))
    done, todo = [], []
    for unit in units:
        if shard_done(out, unit, tars, parts):
            done.append(unit)
            continue
        part = part_path(out, unit.shard)
        for present, leftover in ((unit.shard in tars, storage.join(out, unit.shard)), (storage.name(part) in parts, part)):
            if present:
                storage.remove(leftover)
        todo.append(unit)
    return done, todo


def summarize(parts: list[storage.Location], stats: dict[str, Any]) -> dict[str, Any]:
    """Totals of the finished set (resumed shards included) plus this run's timings."""
    rows = [r for p in parts for r in read_table(p, columns=["lambda", "seconds"]).to_pylist()]
    by_lam: dict[float, list[float]] = defaultdict(list)
    for row in rows:
        by_lam[row["lambda"]].append(row["seconds"])
    # Sets that shared an actor pool share its wall time: their rate is the pool's.
    new = stats.get("pool_samples_this_run", stats.get("samples_this_run", 0))
    secs = stats.get("generate_seconds", 0.0)
    return {
        "samples": len(rows),
        "shards": len(parts),
        **stats,
        "images_per_s": round(new / secs, 4) if secs > 0 else 0.0,
        "sample_seconds_total": round(sum(r["seconds"] for r in rows), 3),
        "seconds_per_sample_by_lambda": {f"{lam:g}": sum(v) / len(v) for lam, v in sorted(by_lam.items())},
    }


def _shard_stats(parts: list[storage.Location]) -> list[dict[str, Any]]:
    return [read_manifest(p)[1].extra.get("shard_stats", {}) for p in parts]


def run_generate(
    cfg: GenerateConfig,
    factory: SamplerFactory = load_sampler,
    on_result: Callable[[ShardResult], None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate (or finish generating) the set ``cfg`` describes; return the summary.

    ``factory`` builds each actor's sampler (tests pass a stand-in); ``on_result`` is
    called on the driver after every finished shard (tests use it to inject faults).
    """
    return run_generate_sets([cfg], factory, on_result, progress)[0]


def _pool_key(cfg: GenerateConfig) -> dict[str, Any]:
    """What every set served by one actor pool must share (the actors are built from it)."""
    return {"model_dir": str(storage.resolve(cfg.model_dir)), "real_manifest": str(storage.resolve(cfg.real_manifest)),
            "sampler": to_dict(cfg.sampler), "ray": to_dict(cfg.ray), "image_format": cfg.image_format,
            "source_cache_shards": cfg.source_cache_shards}


def run_generate_sets(
    cfgs: list[GenerateConfig],
    factory: SamplerFactory = load_sampler,
    on_result: Callable[[ShardResult], None] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Generate several sets (a sweep's (w, λ) cells) with ONE actor pool; a summary each.

    The sets must share the model, the real manifest, the sampler and the Ray settings
    (they differ in plan and ``out_dir``). Each replica loads the model once; the units of
    every set share one queue, longest first. Each set keeps its own folder, lock,
    identity, manifest and summary, exactly as if it had been generated alone.
    """
    if not cfgs:
        return []
    for cfg in cfgs:
        check_job_paths({"out_dir": cfg.out_dir}, {"model_dir": cfg.model_dir, "real_manifest": cfg.real_manifest})
    key = _pool_key(cfgs[0])
    for cfg in cfgs[1:]:
        if _pool_key(cfg) != key:
            raise BadInputError(f"generate set {cfg.out_dir}", "differs from the others in model, real manifest, "
                                "sampler or Ray settings", "generate it on its own")
    t_start = time.perf_counter()
    model_dir = storage.resolve(cfgs[0].model_dir)
    with storage.reached(model_dir):
        found = storage.is_dir(model_dir)
    if not found:
        raise BadInputError(str(model_dir), "model folder not found", "train one with jobs/train_controlnet.py first")
    outs = [storage.resolve(cfg.out_dir) for cfg in cfgs]
    if len(set(outs)) != len(outs):
        raise BadInputError("generate sets", "two sets share one out_dir", "give every set its own folder")
    real_manifest = storage.resolve(cfgs[0].real_manifest)
    plans = [build_plan(cfg.plan, real_manifest) for cfg in cfgs]
    with ExitStack() as locks:
        todo: list[WorkUnit] = []
        stats: list[dict[str, Any]] = []
        leases = []
        for cfg, plan, out in zip(cfgs, plans, outs):
            with storage.reached(out):
                leases.append(locks.enter_context(exclusive_folder(out)))
            generation_identity(cfg, plan, model_dir).claim(out, "synthetic set")  # refuses other plans / models
            with atomic_path(storage.join(out, "config.yaml")) as tmp:
                save_config(cfg, tmp)
            done, left = resume_scan(out, plan.units)
            todo += [replace(u, out_dir=str(out)) for u in left]
            stats.append({"samples_this_run": sum(len(u.items) for u in left), "shards_resumed": len(done),
                          "generate_seconds": 0.0})
        if todo:
            todo = [replace(u, index=i) for i, u in enumerate(todo)]  # one queue: indices unique across sets
            total = sum(p.num_samples for p in plans)
            visible = [str(o) for o in outs] + [str(model_dir), str(real_manifest)]
            def held(result: ShardResult) -> None:  # a run whose lock was taken over stops at its next shard
                for lease in leases:
                    lease.check()
                if on_result is not None:
                    on_result(result)

            try:
                pool_stats = _distribute(cfgs[0], plans[0].class_names, total, todo, model_dir, outs[0], factory,
                                         held, progress, visible)
            finally:  # a failed run stops its actors mid-unit: leave whole shards only (rerun resumes)
                for out, lease in zip(outs, leases):
                    if not lease.lost.is_set():  # a lost folder's temp files are its new holder's
                        remove_temp_files(out)
            pooled = sum(len(u.items) for u in todo)
            for st in stats:
                st.update(pool_stats, sets_in_pool=len(cfgs), pool_samples_this_run=pooled)
        for lease in leases:  # the manifest is written by the lock's holder only
            lease.check()
        summaries = []
        for cfg, plan, out, st in zip(cfgs, plans, outs, stats):
            st["seconds"] = round(time.perf_counter() - t_start, 3)
            parts = [part_path(out, u.shard) for u in plan.units]
            summary = summarize(parts, st)
            info = DatasetInfo(plan.class_names, "synthetic", {
                "config": to_dict(cfg), "plan": plan.summary(), "compute": summary, "shard_stats": _shard_stats(parts)})
            merge_parts(parts, storage.join(out, MANIFEST), info)
            write_json(storage.join(out, SUMMARY), summary)
            summaries.append(summary)
        return summaries


def _distribute(
    cfg: GenerateConfig,
    class_names: list[str],
    total_samples: int,
    todo: list[WorkUnit],
    model_dir: storage.Location,
    out: storage.Location,
    factory: SamplerFactory,
    on_result: Callable[[ShardResult], None] | None,
    progress: bool,
    visible: list[str] = (),
) -> dict[str, Any]:
    """Run ``todo`` on an actor pool with a progress bar; return the pool's stats. ``visible``:
    paths every node of a multi-node cluster must see (refused otherwise)."""
    connect(cfg.ray.address, cfg.ray.local_num_cpus)
    import ray

    check_visible_everywhere(list(visible))

    shape = pool_shape(cfg, ray.cluster_resources())
    actor_kwargs = dict(
        model_dir=str(model_dir), out_dir=str(out), class_names=class_names, sampler_cfg=cfg.sampler,
        device=shape.device, image_format=cfg.image_format, source_cache_shards=cfg.source_cache_shards,
        num_threads=max(1, int(cfg.ray.num_cpus_per_actor)), factory=factory,
    )
    pool = Distributor(shape, actor_kwargs, todo, cfg.ray.inflight_per_actor, cfg.ray.unit_retries)
    todo_samples = sum(len(u.items) for u in todo)
    try:
        pool.pids(cfg.ray.placement_timeout_s)  # throughput is measured from when every replica has loaded its model
        t0 = time.perf_counter()
        with tqdm(total=total_samples, initial=total_samples - todo_samples, unit="img",
                  desc="generate", disable=not progress, smoothing=0.1) as bar:

            def advance(result: ShardResult) -> None:
                bar.update(result.samples)
                bar.set_postfix(shard=result.shard, refresh=False)
                if on_result is not None:
                    on_result(result)

            pool.run(advance)
        seconds = time.perf_counter() - t0
    finally:
        pool.shutdown()
    return {"generate_seconds": round(seconds, 3), "device": shape.device, "actors": shape.num_actors,
            "actor_deaths": pool.actor_deaths, "unit_failures": pool.unit_failures}
