"""The record of a multi-draw experiment's finished seg runs and cells: what outlives the run folders.

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
were recorded. Each generated cell's generator check (``engine.memorization``: are the images
copies of their sources?), which the result reports per draw, is kept the same way under the
cell's ``upstream`` fingerprint. Entries of other configs (a changed arm, another budget) live side by side and
never count for this one: an entry is found by its key *and* its fingerprints, and a rerun of
the same run replaces its entry.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.atomic import write_json
from engine.config import to_dict
from engine.errors import BadInputError
from engine.identity import Identity, drop_keys, file_digest, plain
from experiments.sweep import (RUN_ONLY, SegRun, SweepConfig, cell_name, filters, generate_config_for, label_scorer,
                               plan_seg_runs, seg_config_for, stage_identity)
from seg.models import backbone_weights_file

# A generation's config without where it reads, writes and runs: the cell's plan and sampler decide its images.
GENERATE_RUN_ONLY = {"real_manifest", "model_dir", "out_dir", "ray", "source_cache_shards", "sampler.batch_size",
                     "sampler.device"}

COUNTED_FROM_RECORD = "counted_from_record"  # set on the entries RunRecord.draw_runs returns; never saved

ABOUT = ("Every finished seg run of this experiment and every generated cell's generator check, one entry each "
         "(experiments/run_record.py): an entry whose folder is gone counts from here when its fingerprints ('seg', "
         "'upstream') are what today's config makes.")


def run_key(seed: int, run: SegRun) -> str:
    """A run's place, relative to the experiment's ``out``: ``draw-<seed>/seg/<run name>``."""
    return f"draw-{seed}/seg/{run.name}"


def _upstream(sub: SweepConfig, w: float | None, lambdas: list[float], filtered: bool) -> str:
    """Digest of what made a draw's data for these cells: its ingest (with the draw's subset
    seed), its ControlNet training, each cell's generation settings, the label scorer if used."""
    cells = {}
    for lam in lambdas:
        gen = generate_config_for(sub, Path("."), "", "", w, lam)  # type: ignore[arg-type]
        cells[f"{w:g}/{lam:g}"] = drop_keys(plain(to_dict(gen)), GENERATE_RUN_ONLY)
    return Identity({"ingest": stage_identity(sub.ingest, RUN_ONLY["ingest"], {}).config,
                     "controlnet": stage_identity(sub.controlnet, RUN_ONLY["controlnet"], {}).config,
                     "cells": cells, "label_scorer": label_scorer(sub) if filtered else None}).digest


def fingerprints(sub: SweepConfig, run: SegRun) -> dict[str, str]:
    """The ``seg`` and ``upstream`` fingerprints of one run of a draw's sweep ``sub`` (see the module doc)."""
    seg = seg_config_for(sub, run)
    backbone = backbone_weights_file(seg.model)
    identity = stage_identity(seg, RUN_ONLY["seg"], {"backbone": file_digest(backbone)} if backbone else {})
    return {"seg": identity.digest, "upstream": _upstream(sub, run.w, run.lambdas, filters(sub, run))}


def cell_fingerprint(sub: SweepConfig, w: float, lam: float) -> str:
    """The ``upstream`` fingerprint of one generated cell of a draw (its generator check's record)."""
    return _upstream(sub, w, [lam], False)


def _merged(entries: list[dict[str, Any]], fresh: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``entries`` with each ``fresh`` entry added, replacing the one of the same key and fingerprints."""
    def ident(e: dict[str, Any]) -> tuple[str, ...]:
        return (e["key"], e.get("seg", ""), e["upstream"])

    same = {ident(e) for e in fresh}
    return sorted([e for e in entries if ident(e) not in same] + fresh, key=ident)


@dataclass
class RunRecord:
    """The record file's contents: ``runs`` (one entry a seg run) and ``cells`` (one entry a
    generated cell of a draw: its generator check, ``engine.memorization``, which the result
    reports per draw). Entries are found by their key and fingerprints only."""

    path: str | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    cells: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path | None) -> "RunRecord":
        """The record at ``path``; an empty one when there is no path or no file yet."""
        if path is None or not Path(path).is_file():
            return cls(None if path is None else str(path))
        try:
            data = json.loads(Path(path).read_text())
            return cls(str(path), list(data["runs"]), list(data.get("cells", [])))
        except (ValueError, KeyError, TypeError) as exc:
            raise BadInputError(str(path), f"is not a run record ({exc})",
                                "restore it from git (git checkout -- <file>), or point draws.record at a new file") from None

    def add(self, runs: list[dict[str, Any]], cells: list[dict[str, Any]]) -> None:
        """Add fresh entries (runs counted from their folders, cells checked in them) and save."""
        assert self.path is not None, "a record without a file"
        self.runs, self.cells = _merged(self.runs, runs), _merged(self.cells, cells)
        write_json(Path(self.path), {"about": ABOUT, "runs": self.runs, "cells": self.cells})

    def draw_runs(self, seed: int, sub: SweepConfig) -> dict[str, dict[str, Any]]:
        """Of a draw's planned runs, those recorded with today's fingerprints, by key (each
        marked :data:`COUNTED_FROM_RECORD`)."""
        found = {}
        for run in plan_seg_runs(sub):
            prints, key = fingerprints(sub, run), run_key(seed, run)
            entry = next((e for e in self.runs if e["key"] == key and e["seg"] == prints["seg"]
                          and e["upstream"] == prints["upstream"]), None)
            if entry is not None:
                found[key] = {**copy.deepcopy(entry), COUNTED_FROM_RECORD: True}
        return found

    def draw_cells(self, seed: int, sub: SweepConfig) -> dict[str, dict[str, Any]]:
        """Of a draw's cells, the generator checks recorded with today's fingerprints, by cell name."""
        found = {}
        for w in sub.grid.w:
            for lam in sub.grid.lambdas:
                key, upstream = cell_key(seed, w, lam), cell_fingerprint(sub, w, lam)
                entry = next((e for e in self.cells if e["key"] == key and e["upstream"] == upstream), None)
                if entry is not None:
                    found[cell_name(w, lam)] = entry["memorization"]
        return found


def cell_key(seed: int, w: float, lam: float) -> str:
    """A cell's place, relative to the experiment's ``out``: ``draw-<seed>/synthetic/<cell name>``."""
    return f"draw-{seed}/synthetic/{cell_name(w, lam)}"
