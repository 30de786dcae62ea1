"""The work plan: which synthetic samples exist, in which shard, with which seed.

Input: the real manifest (train split, status ok). Output: work units, one per output
shard. Every unit has a single (w, λ), because guidance scale and encode ratio are
per-batch arguments of the sampler and because the seg side samples by λ: a shard is
then a λ-homogeneous block it can pick or skip whole.

Naming: ``syn-w{w}-l{λ}-{index:06d}.tar`` with w, λ to 2 decimals and ``.`` -> ``p``
(``syn-w2p00-l0p50-000003.tar``); the index counts shards within one (w, λ), so adding
a λ to a config leaves the names of the existing ones unchanged.

Seeds: ``seed = H(base seed, source_id, w, λ, k)`` for the k-th sample of a source,
H = the first 31 bits of SHA-256. A sample's seed (and so its key and pixels) depends
on nothing else: not on the number of actors, the shard size, or the other sources.
The same config therefore always yields the same shards with the same keys.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from engine.errors import BadInputError
from engine.generate.config import PlanConfig
from engine.manifest import missing_shards, read_manifest, resolve_shard
from engine.shards import shard_name, synthetic_key

SEED_BITS = 31  # seeds stay valid for torch/numpy generators and int32 columns


@dataclass(frozen=True)
class Source:
    """One real sample the plan draws from, and the real shard (absolute path) holding it."""

    source_id: str
    shard: str


@dataclass(frozen=True)
class WorkItem:
    """One synthetic sample to make."""

    source_id: str
    source_shard: str
    seed: int
    key: str


@dataclass(frozen=True)
class WorkUnit:
    """One output shard: its file name (relative to the output folder), w, λ and items.

    ``out_dir`` names the folder when one actor pool serves several sets (a sweep's
    cells); empty means the actor's own output folder.
    """

    index: int
    shard: str
    w: float
    lam: float
    items: tuple[WorkItem, ...]
    out_dir: str = ""

    @property
    def keys(self) -> list[str]:
        return [item.key for item in self.items]


@dataclass
class Plan:
    """All units of a run plus the facts the manifest records about the plan."""

    units: list[WorkUnit]
    sources: list[Source]
    class_names: list[str]
    cfg: PlanConfig

    @property
    def num_samples(self) -> int:
        return sum(len(u.items) for u in self.units)

    def fingerprint(self) -> str:
        """Hash of every shard name and key: equal fingerprints mean the same outputs are planned."""
        h = hashlib.sha256()
        for unit in self.units:
            h.update(json.dumps([unit.shard, unit.keys]).encode())
        return h.hexdigest()

    def summary(self) -> dict[str, Any]:
        return {
            "sources": len(self.sources),
            "w": self.cfg.w,
            "lambdas": self.cfg.lambdas,
            "samples_per_source": self.cfg.samples_per_source,
            "samples_per_shard": self.cfg.samples_per_shard,
            "seed": self.cfg.seed,
            "split": self.cfg.split,
            "samples": self.num_samples,
            "shards": len(self.units),
            "fingerprint": self.fingerprint(),
        }


def shard_prefix(w: float, lam: float) -> str:
    """``syn-w2p00-l0p50``: the prefix of every shard with this (w, λ)."""
    return f"syn-w{w:.2f}-l{lam:.2f}".replace(".", "p")


def sample_seed(base: int, source_id: str, w: float, lam: float, k: int) -> int:
    """Stable seed of the k-th sample of ``source_id`` at (w, λ); see the module docstring."""
    text = f"{base}|{source_id}|{w:.2f}|{lam:.2f}|{k}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") >> (32 - SEED_BITS)


def _seeds(base: int, source_id: str, w: float, lam: float, count: int) -> list[int]:
    """``count`` distinct seeds (a 31-bit collision is re-hashed, deterministically)."""
    seeds: list[int] = []
    for k in range(count):
        seed, salt = sample_seed(base, source_id, w, lam, k), 0
        while seed in seeds:
            salt += 1
            seed = sample_seed(base, f"{source_id}#{salt}", w, lam, k)
        seeds.append(seed)
    return seeds


def plan_units(sources: list[Source], cfg: PlanConfig) -> list[WorkUnit]:
    """Cut sources × w × λ × k into single-(w, λ) units of at most ``samples_per_shard``."""
    units: list[WorkUnit] = []
    for w in cfg.w:
        for lam in cfg.lambdas:
            items = [
                WorkItem(src.source_id, src.shard, seed, synthetic_key(src.source_id, w, lam, seed))
                for src in sources
                for seed in _seeds(cfg.seed, src.source_id, w, lam, cfg.samples_per_source)
            ]
            prefix = shard_prefix(w, lam)
            size = cfg.samples_per_shard
            for i in range(0, len(items), size):
                units.append(WorkUnit(len(units), shard_name(prefix, i // size), w, lam, tuple(items[i : i + size])))
    return units


def read_sources(real_manifest: str | Path, split: str) -> tuple[list[Source], list[str]]:
    """The ``split`` sources (status ok) of a real manifest, sorted by id, and its class names."""
    table, info = read_manifest(real_manifest)
    if info.kind != "real":
        raise BadInputError(str(real_manifest), f"is a {info.kind!r} manifest", "generate from the manifest written by ingest")
    ok = table.filter(pc.and_(pc.equal(table["split"], split), pc.equal(table["status"], "ok")))
    rows = ok.select(["source_id", "shard"]).to_pylist()
    if not rows:
        splits = sorted(set(table["split"].to_pylist()))
        raise BadInputError(str(real_manifest), f"has no usable sample in split {split!r}", f"splits present: {splits}")
    dupes = [s for s, n in Counter(r["source_id"] for r in rows).items() if n > 1]
    if dupes:
        raise BadInputError(str(real_manifest), f"source id(s) listed twice: {sorted(dupes)[:5]}")
    sources = [Source(r["source_id"], resolve_shard(real_manifest, r["shard"])) for r in rows]
    missing = missing_shards(s.shard for s in sources)
    if missing:  # found here, before any actor starts, rather than as a failed unit
        raise BadInputError(missing[0], f"shard listed in {real_manifest} is missing ({len(missing)} missing in all)",
                            "restore it or re-run ingest; `python -m engine.verify MANIFEST` lists all problems")
    return sorted(sources, key=lambda s: s.source_id), list(info.class_names)


def build_plan(cfg: PlanConfig, real_manifest: str | Path) -> Plan:
    """The deterministic plan of a run (see the module docstring)."""
    sources, class_names = read_sources(real_manifest, cfg.split)
    if cfg.max_sources is not None:
        sources = sources[: cfg.max_sources]
    return Plan(plan_units(sources, cfg), sources, class_names, cfg)
