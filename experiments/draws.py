"""One experiment over several labelled draws, and the paired comparison of its arms over them.

A result on one labelled subset says little: another draw of 128 scenes moved real only by
as much as the synthetic gain. With ``draws.seeds`` set, a sweep runs its whole pipeline
once per draw, in ``<out>/draw-<seed>/`` with ``ingest.subset_seed = seed`` (each draw
trains its own ControlNet, generates its own cells and trains every arm with the same seg
seeds), then compares each arm with the baseline **within** each draw and summarises the
paired differences over draws (:func:`collect`):

    <out>/draw-1/ ...            run_sweep's run folder of draw 1 (its own report included)
    <out>/headline.json          every arm's mIoU per draw and seed, paired means and intervals
    <out>/headline.md            the same as a table, an interval and a verdict

A draw's mean over seg seeds is one observation; the interval is a t interval over draws
of (arm − baseline), which covers the variation of subset, ControlNet, generation and seg
seeds together. Rerunning resumes: each draw is a sweep (every stage resumes), and the
summary is rewritten after every draw, so a run stopped between sessions keeps what it has.
A seg run counts only while its recorded identity (config and input digests) is what the
config would make today; anything else is listed as stale, never averaged in. With
``draws.record`` set, every counted run is also written to that (committed) file, and a run
whose folder is gone counts from it (:mod:`experiments.run_record`): folders need not outlive
a session, five draws take several.
"""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
from pathlib import Path
from typing import Any, Sequence

from engine.atomic import write_json
from engine.errors import BadInputError
from engine.identity import Identity, plain
from engine.config import to_dict
from experiments.intervals import t_interval
from experiments.run_record import COUNTED_FROM_RECORD, RunRecord, cell_fingerprint, cell_key, fingerprints, grid_cells, run_key
from experiments.sweep import (COMMIT_FILE, MEMORIZATION_FILE, REPO, SegRun, SweepConfig, cell_identity, cell_name, git,
                               git_commit, memorization_setup, plan_seg_runs, run_inputs, run_sweep, seg_identity)

RESULT_JSON = "headline.json"
RESULT_MD = "headline.md"


def draw_dir(out: str | Path, seed: int) -> Path:
    return Path(out) / f"draw-{seed}"


def draw_config(cfg: SweepConfig, seed: int) -> SweepConfig:
    """The sweep of one draw: the same config on ``ingest.subset_seed = seed``, in its own folder."""
    sub = copy.deepcopy(cfg)
    sub.out = str(draw_dir(cfg.out, seed))
    sub.ingest.subset_seed = seed
    sub.draws.seeds = []
    sub.report.title = f"{cfg.report.title or cfg.name}: draw {seed}"
    return sub


def check_draws_config(cfg: SweepConfig) -> None:
    """Draws each make their own real set and ControlNet, and compare arms: say so if they cannot."""
    if cfg.real_manifest or cfg.model_dir:
        raise BadInputError("real_manifest / model_dir", "are shared by every draw, but each draw must ingest its own subset "
                            "and train its own ControlNet", "remove them (set both to null) when draws.seeds is set")
    if not cfg.studies.arms.enabled:
        raise BadInputError("draws.seeds", "compare arms over draws, but studies.arms is not enabled",
                            "enable studies.arms with a baseline, or leave draws.seeds empty")
    if cfg.ingest.subset >= 1.0:
        raise BadInputError(f"ingest.subset={cfg.ingest.subset}", "keeps every train scene, so every draw would be the same data",
                            "set a fraction below 1, e.g. 1/16")
    if cfg.seg.data.real_fraction < 1.0:
        raise BadInputError(f"seg.data.real_fraction={cfg.seg.data.real_fraction}",
                            "would draw again inside each draw's ingested subset", "set it to 1: the draw is made by ingest")
    if cfg.draws.record:  # checked now, not when the first draw ends hours later
        if not Path(cfg.draws.record).parent.is_dir():
            raise BadInputError(f"draws.record={cfg.draws.record}", "is in a folder that does not exist",
                                "create the folder, or name a file in an existing one")
        RunRecord.load(cfg.draws.record)


def run_draws(cfg: SweepConfig, config_path: str | Path | None = None, only: Sequence[int] | None = None) -> Path:
    """Run (or resume) every draw in turn, rewriting the record and the summary after each;
    return the summary's markdown. A draw whose folder is gone and whose every run the record
    holds (``draws.record``) is not rerun: a later session picks up where the last one ended.

    ``only`` runs just those of ``draws.seeds`` (a session with time for one draw) while the
    summary still covers every draw as it stands; narrowing ``draws.seeds`` instead would
    rewrite the summary over the narrowed draws alone."""
    check_draws_config(cfg)
    unknown = sorted(set(only or ()) - set(cfg.draws.seeds))
    if unknown:
        raise BadInputError(f"--draws {' '.join(map(str, unknown))}", f"not among the config's draws.seeds {cfg.draws.seeds}",
                            "name seeds from draws.seeds")
    out = Path(cfg.out)
    for i, seed in enumerate(cfg.draws.seeds, 1):
        head = f"\n######## draw {seed} ({i}/{len(cfg.draws.seeds)})"
        if only and seed not in only:
            print(f"{head}: not in --draws, not run (counted as it stands)", flush=True)
            continue
        if in_record_only(cfg, seed):
            print(f"{head}: every run is in {cfg.draws.record} and {draw_dir(out, seed)} is gone: not rerun", flush=True)
        else:
            print(f"{head} -> {draw_dir(out, seed)}", flush=True)
            run_sweep(draw_config(cfg, seed))
        runs, stale = counted_runs(cfg)
        if cfg.draws.record:
            RunRecord.load(cfg.draws.record).add([r for r in runs.values() if not r.get(COUNTED_FROM_RECORD)],
                                                  folder_cells(cfg))
        write_summary(cfg, collect(cfg, config_path, (runs, stale)))
    return out / RESULT_MD


def in_record_only(cfg: SweepConfig, seed: int) -> bool:
    """Is the draw's folder gone while the record holds every run it plans?"""
    sub = draw_config(cfg, seed)
    if not cfg.draws.record or (draw_dir(cfg.out, seed) / "real" / "manifest.parquet").is_file():
        return False
    return len(RunRecord.load(cfg.draws.record).draw_runs(seed, sub)) == len(plan_seg_runs(sub))


def frozen_at(config_path: str | Path) -> dict[str, Any]:
    """The commit that last changed the config file, and whether the file differs from it now:
    a pre-registered protocol names the commit it was frozen in."""
    path = Path(config_path).resolve()
    try:
        rel = str(path.relative_to(REPO))
        return {"config": rel, "frozen_commit": git("log", "-1", "--format=%H", "--", rel) or None,
                "config_changed_since": bool(git("status", "--porcelain", "--", rel))}
    except (ValueError, OSError, subprocess.CalledProcessError):
        return {"config": str(config_path), "frozen_commit": None, "config_changed_since": None}


def write_summary(cfg: SweepConfig, result: dict[str, Any]) -> None:
    from experiments.report import write_headline_views

    write_json(Path(cfg.out) / RESULT_JSON, result)
    write_headline_views(result, Path(cfg.out) / RESULT_JSON)


# -- collecting ------------------------------------------------------------------------------
def draw_memorization(cfg: SweepConfig, seed: int, record: RunRecord | None = None) -> dict[str, dict[str, float]]:
    """Per cell of one draw, its generator check (``memorization.json``): L1 to own source and the
    share whose nearest real image is their own source; from the record (``draws.record``) where
    the draw's folder has none. Empty until the draw's check has run."""
    folder, sub = draw_dir(cfg.out, seed), draw_config(cfg, seed)
    path, real = folder / MEMORIZATION_FILE, folder / "real" / "manifest.parquet"
    cells = json.loads(path.read_text()).get("cells", {}) if path.is_file() and real.is_file() else {}
    if not cells and record is not None:
        return dict(sorted(record.draw_cells(seed, sub).items()))
    setup = memorization_setup(sub, real)

    def current(name: str, check: dict[str, Any]) -> bool:  # checked on the cell's data as it is now
        manifest = folder / "synthetic" / name / "manifest.parquet"
        return manifest.is_file() and check.get("identity") == cell_identity(setup, manifest)

    return {name: {"lambda": c["lambda"], "l1_own": round(c["l1_own"], 2), "nearest_is_own": round(c["nearest_is_own"], 4)}
            for name, c in sorted(cells.items()) if current(name, c)}


def folder_cells(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Record entries of every cell whose generator check is in its draw's folder."""
    entries = []
    for seed in cfg.draws.seeds:
        sub, checks = draw_config(cfg, seed), draw_memorization(cfg, seed)
        entries += [{"key": cell_key(seed, w, lam), "draw": seed, "upstream": cell_fingerprint(sub, w, lam),
                     "memorization": checks[cell_name(w, lam)]}
                    for w, lam in grid_cells(sub) if cell_name(w, lam) in checks]
    return entries


def _folder_identity(sub: SweepConfig, folder: Path, run: SegRun) -> Identity | None:
    """The identity a run of this draw's folder records today (its inputs: the folder's data);
    None while the folder lacks its real set or one of its cells."""
    real = folder / "real" / "manifest.parquet"
    cells = {c: folder / "synthetic" / c / "manifest.parquet" for c in run.cells}
    if not real.is_file() or not all(m.is_file() for m in cells.values()):
        return None
    return seg_identity(sub, run, run_inputs(sub, run, real, cells)[1])[1]


def _current_runs(cfg: SweepConfig, seed: int) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Each finished seg run of one draw's folder whose identity is today's, as a record entry
    by key (experiments/run_record.py); and the stale ones."""
    folder, sub = draw_dir(cfg.out, seed), draw_config(cfg, seed)
    if not (folder / "real" / "manifest.parquet").is_file():
        return {}, []
    found, stale = {}, []
    for run in plan_seg_runs(sub):
        key, run_dir = run_key(seed, run), folder / "seg" / run.name
        summary = run_dir / "summary.json"
        if not summary.is_file():
            continue
        identity, recorded = _folder_identity(sub, folder, run), Identity.load(run_dir)
        if identity is None or recorded is None or identity.differences(recorded):
            stale.append(key)
            continue
        stamp = run_dir / COMMIT_FILE
        found[key] = {"key": key, "draw": seed, "arm": run.arm, "seed": run.seed,
                      "miou": round(100.0 * json.loads(summary.read_text())["miou"], 4),
                      "commits": [json.loads(stamp.read_text())["commit"] if stamp.is_file() else "unknown"],
                      "inputs": recorded.inputs, **fingerprints(sub, run), "source": "run folder"}
    return found, stale


def counted_runs(cfg: SweepConfig) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every run that counts, by key: from its folder where it has one, else from the record
    (``draws.record``) when that holds it with today's fingerprints; and the stale ones.

    Where a draw's folder exists, it is the draw: a recorded run counts only if it was trained on
    the folder's data (its recorded inputs are the folder's), so a draw made again (another
    session, another machine) never mixes its runs with the record's of an earlier making."""
    record = RunRecord.load(cfg.draws.record)
    runs: dict[str, dict[str, Any]] = {}
    stale: list[str] = []
    for seed in cfg.draws.seeds:
        folder, sub = draw_dir(cfg.out, seed), draw_config(cfg, seed)
        found, old = _current_runs(cfg, seed)
        recorded = record.draw_runs(seed, sub)
        if recorded and (folder / "real" / "manifest.parquet").is_file():
            planned = {run_key(seed, run): run for run in plan_seg_runs(sub)}
            recorded = {k: e for k, e in recorded.items()
                        if (now := _folder_identity(sub, folder, planned[k])) is not None and e["inputs"] == now.inputs}
        runs.update({**{k: e for k, e in recorded.items() if k not in old}, **found})
        stale += old
    return runs, stale


def paired(arm: Sequence[Sequence[float | None] | None], base: Sequence[Sequence[float | None] | None],
           confidence: float, comparisons: int = 1) -> dict[str, Any]:
    """Mean of (arm − base) over the draws where both have every seed, with a t interval.

    Each draw contributes the difference of its seed means (the seeds are shared, so this
    is also the mean of per-seed differences); the interval is ``mean ± t · sd / √n``
    with n − 1 degrees of freedom, None below two draws. With ``comparisons`` m > 1 (the
    verdict takes the best of m arms) a Bonferroni interval at 1 − (1 − confidence) / m is
    added as ``ci_adjusted``: choosing the best arm on test must not borrow the plain one.
    """
    def complete(values: Sequence[float | None] | None) -> bool:
        return bool(values) and all(v is not None for v in values)  # type: ignore[union-attr]

    pairs = [(i, a, b) for i, (a, b) in enumerate(zip(arm, base)) if complete(a) and complete(b)]
    diffs = [statistics.mean(a) - statistics.mean(b) for _, a, b in pairs]  # type: ignore[arg-type]
    n = len(diffs)
    result: dict[str, Any] = {"n_draws": n, "mean": statistics.mean(diffs) if diffs else None, "ci95": None,
                              "per_draw": [round(d, 4) for d in diffs], "draw_index": [i for i, _, _ in pairs]}

    def interval(level: float) -> list[float]:
        return t_interval(result["mean"], statistics.stdev(diffs), n, level)

    if n >= 2:
        result["ci95"] = interval(confidence)
        if comparisons > 1:
            result["adjusted_confidence"] = 1 - (1 - confidence) / comparisons
            result["ci_adjusted"] = interval(result["adjusted_confidence"])
    return result


def collect(cfg: SweepConfig, config_path: str | Path | None = None,
            counted: tuple[dict[str, dict[str, Any]], list[str]] | None = None) -> dict[str, Any]:
    """The headline record of every draw of ``cfg`` (see the module doc), from ``counted``
    (:func:`counted_runs`, computed here when not given)."""
    study = cfg.studies.arms
    runs, stale = counted if counted is not None else counted_runs(cfg)
    by_arm = {(r["draw"], r["arm"], r["seed"]): r["miou"] for r in runs.values()}
    per_draw: dict[str, list[list[float | None] | None]] = {name: [] for name in study.arms}
    commits = {}
    for seed in cfg.draws.seeds:
        trained_at = {c for r in runs.values() if r["draw"] == seed for c in r["commits"]}
        if trained_at:
            commits[str(seed)] = sorted(trained_at)
        for name in study.arms:
            values = [by_arm.get((seed, name, k)) for k in study.seeds]
            per_draw[name].append(None if all(v is None for v in values) else values)
    base = per_draw[study.baseline]
    record = RunRecord.load(cfg.draws.record)
    result: dict[str, Any] = {
        "split": cfg.seg.data.val_split,
        "commit": git_commit(),
        "draw_commits": commits,  # per draw: the commits its counted seg runs were trained at
        **(frozen_at(config_path) if config_path else {"config": cfg.name}),
        "config_digest": Identity(plain(to_dict(cfg)), {}).digest,
        "draws": list(cfg.draws.seeds),
        "seg_seeds": list(study.seeds),
        "baseline": study.baseline,
        "interval": f"t interval over draws of (arm − baseline), each draw the mean of its seg seeds, "
                    f"{100 * cfg.draws.confidence:g} %",
        "arms": {name: {"scheme": arm.scheme, "lambdas": arm.lambdas, "set": arm.set, "per_draw": per_draw[name]}
                 for name, arm in study.arms.items()},
        "paired": {name: paired(per_draw[name], base, cfg.draws.confidence,
                                comparisons=len(study.lambda_aware) if name in study.lambda_aware else 1)
                   for name in study.arms if name != study.baseline},
        "contrasts": {f"{a} - {b}": paired(per_draw[a], per_draw[b], cfg.draws.confidence) for a, b in study.contrasts},
        "target": {"points": study.target_points, "lambda_aware": list(study.lambda_aware)},
        "memorization": {str(seed): draw_memorization(cfg, seed, record) for seed in cfg.draws.seeds},
        "stale": stale,
        "from_record": sorted(k for k, r in runs.items() if r.get(COUNTED_FROM_RECORD)),
    }
    return result

