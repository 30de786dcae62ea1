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
from functools import lru_cache
from pathlib import Path
from typing import Any

from engine.atomic import write_json
from engine.config import to_dict
from engine.errors import BadInputError
from engine.generate.run import sampler_settings
from engine.identity import Identity, file_digest, plain
from experiments.sweep import (RUN_ONLY, SegRun, SweepConfig, cell_name, filters, generate_config_for, label_scorer,
                               plan_seg_runs, seg_config_for, stage_identity)
from seg.models import backbone_weights_file

COUNTED_FROM_RECORD = "counted_from_record"  # set on the entries RunRecord.draw_runs returns; never saved

ABOUT = ("Every finished seg run of this experiment and every generated cell's generator check, one entry each "
         "(experiments/run_record.py): an entry whose folder is gone counts from here when its fingerprints ('seg', "
         "'upstream') are what today's config makes.")


def run_key(seed: int, run: SegRun) -> str:
    """A run's place, relative to the experiment's ``out``: ``draw-<seed>/seg/<run name>``."""
    return f"draw-{seed}/seg/{run.name}"


def _upstream(sub: SweepConfig, w: float | None, lambdas: list[float], filtered: bool) -> str:
    """Digest of what made a draw's data for these cells: its ingest (with the draw's subset
    seed), its ControlNet training, each cell's generation settings as generation's own identity
    takes them (the plan, the image format, :func:`sampler_settings`: a sampler key added later
    enters only off its default), and the label scorer if used."""
    cells = {}
    for lam in lambdas:
        gen = generate_config_for(sub, Path("."), "", "", w, lam)  # type: ignore[arg-type]
        cells[f"{w:g}/{lam:g}"] = {"plan": plain(to_dict(gen.plan)), "image_format": gen.image_format,
                                   "sampler": sampler_settings(gen.sampler)}
    return Identity({"ingest": stage_identity(sub.ingest, RUN_ONLY["ingest"], {}).config,
                     "controlnet": stage_identity(sub.controlnet, RUN_ONLY["controlnet"], {}).config,
                     "cells": cells, "label_scorer": label_scorer(sub) if filtered else None}).digest


@lru_cache(maxsize=8)
def _weights_digest(path: str, mtime_ns: int) -> str:
    """A weights file's digest, once per file version (ResNet-101's is ~170 MB; every run names it)."""
    return file_digest(path)


def fingerprints(sub: SweepConfig, run: SegRun) -> dict[str, str]:
    """The ``seg`` and ``upstream`` fingerprints of one run of a draw's sweep ``sub`` (see the module doc)."""
    seg = seg_config_for(sub, run)
    backbone = backbone_weights_file(seg.model)
    inputs = {"backbone": _weights_digest(str(backbone), Path(backbone).stat().st_mtime_ns)} if backbone else {}
    return {"seg": stage_identity(seg, RUN_ONLY["seg"], inputs).digest,
            "upstream": _upstream(sub, run.w, run.lambdas, filters(sub, run))}


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
        found: dict[str, dict[str, Any]] = {}
        if not any(e["draw"] == seed for e in self.runs):
            return found
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
        for w, lam in grid_cells(sub):
            key, upstream = cell_key(seed, w, lam), cell_fingerprint(sub, w, lam)
            entry = next((e for e in self.cells if e["key"] == key and e["upstream"] == upstream), None)
            if entry is not None:
                found[cell_name(w, lam)] = entry["memorization"]
        return found


def grid_cells(sub: SweepConfig) -> list[tuple[float, float]]:
    """Every (w, λ) cell of a draw's grid."""
    return [(w, lam) for w in sub.grid.w for lam in sub.grid.lambdas]


def cell_key(seed: int, w: float, lam: float) -> str:
    """A cell's place, relative to the experiment's ``out``: ``draw-<seed>/synthetic/<cell name>``."""
    return f"draw-{seed}/synthetic/{cell_name(w, lam)}"


def main(argv: list[str] | None = None) -> int:
    """``python -m experiments.run_record FROM --into TO``: add the entries of a record made
    elsewhere (a lent device's draw) to ours, instead of copying it over ours."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m experiments.run_record", description=main.__doc__)
    parser.add_argument("source", help="a run record made elsewhere, e.g. the device's $OUT/headline-runs.json")
    parser.add_argument("--into", default="docs/results/headline-runs.json", help="the record to add it to (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        if not Path(args.source).is_file():
            raise BadInputError(args.source, "no such record file")
        other, ours = RunRecord.load(args.source), RunRecord.load(args.into)
        before = len(ours.runs), len(ours.cells)
        ours.add(other.runs, other.cells)
    except BadInputError as exc:
        print(f"error: {exc}")
        return 2
    print(f"{args.into}: {before[0]} -> {len(ours.runs)} runs, {before[1]} -> {len(ours.cells)} cells")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
