"""The record of a multi-draw experiment's finished seg runs: what outlives the run folders.

One draw of the headline takes two hours on 2 cores, five take several sessions, and a
session's run folders need not outlive it. With ``draws.record`` set, the runner writes every
counted run into that JSON file after each draw (meant to be committed beside the result):
its draw, arm, seed, mIoU, the commit(s) it was trained at, its input digests as recorded, and
two fingerprints of what today's config would make of it:

- ``seg``: the run's seg settings (its arm's overrides, scheme, seed) and the pretrained
  backbone's digest: the config part of the identity its folder recorded;
- ``upstream``: the stages of its draw that made its data, as configured: the ingest (with
  the draw's subset seed), the ControlNet training, the generation settings of each cell it
  reads, and the label scorer where it filters.

A run whose folder is gone counts from the record when both fingerprints are today's; its
input digests (the data itself) cannot be rechecked without the folder and are kept as they
were recorded. Entries of other configs (a changed arm, another budget) live side by side and
never count for this one: an entry is found by its key *and* its fingerprints, and a rerun of
the same run replaces its entry.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from engine.atomic import write_json
from engine.config import to_dict
from engine.errors import BadInputError
from engine.identity import Identity, drop_keys, file_digest, plain
from experiments.sweep import (RUN_ONLY, SegRun, SweepConfig, filters, generate_config_for, label_scorer, plan_seg_runs,
                               seg_config_for, stage_identity)
from seg.models import backbone_weights_file

# A generation's config without where it reads, writes and runs: the cell's plan and sampler decide its images.
GENERATE_RUN_ONLY = {"real_manifest", "model_dir", "out_dir", "ray", "source_cache_shards", "sampler.batch_size",
                     "sampler.device"}

COUNTED_FROM_RECORD = "counted_from_record"  # set on the entries recorded_draw returns; never saved

ABOUT = ("Every finished seg run of this experiment, one entry each (experiments/run_record.py): a run whose "
         "folder is gone counts from here when its 'seg' and 'upstream' fingerprints are what today's config makes.")


def run_key(seed: int, run: SegRun) -> str:
    """A run's place, relative to the experiment's ``out``: ``draw-<seed>/seg/<run name>``."""
    return f"draw-{seed}/seg/{run.name}"


def fingerprints(sub: SweepConfig, run: SegRun) -> dict[str, str]:
    """The ``seg`` and ``upstream`` fingerprints of one run of a draw's sweep ``sub`` (see the module doc)."""
    backbone = backbone_weights_file(seg_config_for(sub, run).model)
    seg = stage_identity(seg_config_for(sub, run), RUN_ONLY["seg"], {"backbone": file_digest(backbone)} if backbone else {})
    ingest = stage_identity(sub.ingest, RUN_ONLY["ingest"], {}).config
    controlnet = stage_identity(sub.controlnet, RUN_ONLY["controlnet"], {}).config
    cells = {}
    for lam in run.lambdas:
        gen = generate_config_for(sub, Path("."), "", "", run.w, lam)  # type: ignore[arg-type]
        cells[f"{run.w:g}/{lam:g}"] = drop_keys(plain(to_dict(gen)), GENERATE_RUN_ONLY)
    upstream = {"ingest": ingest, "controlnet": controlnet, "cells": cells,
                "label_scorer": label_scorer(sub) if filters(sub, run) else None}
    return {"seg": seg.digest, "upstream": Identity(upstream).digest}


def load_record(path: str | Path | None) -> list[dict[str, Any]]:
    """The entries of the record at ``path``; none when there is no path or no file yet."""
    if path is None or not Path(path).is_file():
        return []
    try:
        return list(json.loads(Path(path).read_text())["runs"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInputError(str(path), f"is not a run record ({exc})",
                            "restore it from git (git checkout -- <file>), or point draws.record at a new file") from None


def find(entries: list[dict[str, Any]], key: str, prints: dict[str, str]) -> dict[str, Any] | None:
    """The entry of ``key`` made with these fingerprints, or None."""
    return next((e for e in entries if e["key"] == key and e["seg"] == prints["seg"] and e["upstream"] == prints["upstream"]), None)


def merged(entries: list[dict[str, Any]], fresh: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``entries`` with each ``fresh`` entry added, replacing the entry of the same key and fingerprints."""
    same = {(e["key"], e["seg"], e["upstream"]) for e in fresh}
    kept = [e for e in entries if (e["key"], e["seg"], e["upstream"]) not in same]
    return sorted(kept + fresh, key=lambda e: (e["key"], e["seg"], e["upstream"]))


def save_record(path: str | Path, entries: list[dict[str, Any]]) -> None:
    write_json(Path(path), {"about": ABOUT, "runs": entries})


def recorded_draw(seed: int, sub: SweepConfig, entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Of a draw's planned runs, those the record holds with today's fingerprints, by key."""
    found = {}
    for run in plan_seg_runs(sub):
        entry = find(entries, run_key(seed, run), fingerprints(sub, run))
        if entry is not None:
            found[entry["key"]] = {**copy.deepcopy(entry), COUNTED_FROM_RECORD: True}
    return found
