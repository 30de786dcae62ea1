"""The paper's experiments end to end: ingest -> ControlNet -> (w, λ) grid -> FID, judge -> seg -> report.

One code path runs the demo and every sweep: a sweep config (``configs/demo/*.yaml``,
``configs/sweeps/*.yaml``) names the (w, λ) grid to generate, the segmentation studies
to train and where the run folder is; each stage calls the owning job's Python
function with that job's own config object.

Run folder (``out``)::

    real/manifest.parquet ...            ingest (skipped when ``real_manifest`` is given)
    controlnet/final/ ...                ControlNet (skipped when ``model_dir`` is given)
    synthetic/w2p00-l0p50/ ...           one generation per (w, λ) cell, all cells on one Ray actor pool
    fid.json                             FID of every cell against the real images
    judge.json                           scribble agreement of every cell (seg.judge, trained on real val)
    seg/<run>/summary.json ...           one seg training per (scheme, w, λ set, seed)
    <report.dir>/sweep.json, index.md, index.html, *.png

Resume: every stage skips work already done, so rerunning a command continues it. An
output is reused only when its recorded identity (``engine.identity``: the config without
run-only keys, and a digest of every input) equals today's; otherwise the run stops and
names what changed (or, for cached scores and seg runs whose inputs were regenerated,
redoes the work), instead of silently mixing results of two setups. Generation cells and seg runs are
named by their parameters, so sweeps that share a run folder share their common work.

Configs may start from other configs: a mapping with a ``base: file.yaml`` key is that
file (path relative to the including file) with the mapping's other keys merged over
it. Sections use it to take a job's own config (``controlnet: {base:
../controlnet/tiny.yaml}``) and sweeps to extend the demo (``base: ../demo/tiny.yaml``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from engine import storage
from engine.atomic import write_json
from engine.identity import Identity, drop_defaults, drop_keys, file_digest, plain
from engine.config import apply_overrides, find_config, from_dict, load_yaml, to_dict
from engine.errors import BadInputError
from engine.fid import FIDConfig, FIDScorer, manifest_images
from engine.generate import GenerateConfig, PlanConfig
from engine.generate.plan import shard_prefix
from engine.ingest import IngestConfig
from engine.manifest import read_manifest
from engine.memorization import MemorizationConfig, describe, memorization, train_images
from engine.shards import Sample
from engine.data.geometry import fit_sample
from engine.train_controlnet import TrainControlNetConfig, planned_steps
from experiments import tasks
from seg.judge import Agreement, JudgeConfig, chunks, derangement, judge_on_real, manifest_samples, predict, train_judge
from seg.label_scores import score_manifest, scored_copy
from seg.models import backbone_weights_file
from seg.schemes import LAMBDA_SCHEMES, SCHEMES
from seg.train import SegConfig

REPO = Path(__file__).resolve().parents[1]
RECORD = "sweep.json"
COMMIT_FILE = "commit.json"  # beside a seg run's summary: the code it was trained at
FID_FILE = "fid.json"
JUDGE_FILE = "judge.json"
MEMORIZATION_FILE = "memorization.json"
LABEL_SCORES_FILE = "label_scores.json"
JUDGE_SPLIT = "val"  # never a generation source: the judge is an instrument, like FID's feature net


# -- config ----------------------------------------------------------------------------------
@dataclass
class GridConfig:
    """The (w, λ) cells to generate; every cell gets its own synthetic set and FID."""

    w: list[float] = field(default_factory=lambda: [2.0])
    lambdas: list[float] = field(default_factory=lambda: [0.5, 1.0])
    # λ -> images a source for that λ's cells, instead of generate.plan.samples_per_source
    # (the headline makes 16 a scene at λ = 1 for fixed, 4 at each λ < 1 for uniform/adaptive).
    samples_per_source: dict[float, int] = field(default_factory=dict)

    def validate(self) -> None:
        PlanConfig(w=self.w, lambdas=self.lambdas).validate()  # the generator's own checks
        self.w, self.lambdas = [float(v) for v in self.w], [float(v) for v in self.lambdas]
        counts = {}
        for lam, n in self.samples_per_source.items():
            try:
                lam = float(lam)
            except (TypeError, ValueError):
                raise BadInputError(f"grid.samples_per_source key {lam!r}", "is not a number (λ)") from None
            if not any(abs(lam - a) < 5e-3 for a in self.lambdas):
                raise BadInputError(f"grid.samples_per_source[{lam:g}]", f"is not in the grid's λ {self.lambdas}")
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise BadInputError(f"grid.samples_per_source[{lam:g}]", f"must be an integer >= 1, got {n!r}")
            counts[lam] = n
        self.samples_per_source = counts

    def samples_for(self, lam: float, default: int) -> int:
        """Images a source at ``lam``: its own count where the grid names one, else ``default``."""
        return next((n for key, n in self.samples_per_source.items() if abs(key - lam) < 5e-3), default)


@dataclass
class SchemesStudy:
    """(c) fixed vs uniform vs adaptive (and real only) at one w, over the grid's λ set. The
    paper's other schemes (``append``, ``replacement``, ``synth_only``, ``best_k``) may be named
    too; they draw from every λ of the grid."""

    enabled: bool = True
    names: list[str] = field(default_factory=lambda: list(LAMBDA_SCHEMES))
    w: float = 2.0
    fixed_lambda: float = 1.0
    seeds: list[int] = field(default_factory=lambda: [0])


@dataclass
class WStudy:
    """(a) mIoU by guidance scale: scheme ``fixed`` at λ = ``lam`` on each w of the grid."""

    enabled: bool = False
    lam: float = 1.0
    seeds: list[int] = field(default_factory=lambda: [0])
    with_real: bool = True  # also train the real-only baseline (a line on the plot)


@dataclass
class LambdaStudy:
    """(b) mIoU by encode ratio: scheme ``fixed`` at each λ of the grid, at w = ``w``."""

    enabled: bool = False
    w: float = 2.0
    seeds: list[int] = field(default_factory=lambda: [0])
    with_real: bool = True


@dataclass
class Arm:
    """One arm of a controlled comparison: a scheme, its cells' λ at ``ArmsStudy.w`` (none for
    real only), and seg settings of its own (dotted keys, e.g. ``augment.vflip: true``)."""

    scheme: str = "real"
    lambdas: list[float] = field(default_factory=list)
    set: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.scheme not in SCHEMES:
            raise BadInputError(f"arm scheme {self.scheme!r}", f"unknown; choose from {list(SCHEMES)}")
        self.lambdas = [float(v) for v in self.lambdas]
        if (self.scheme == "real") != (not self.lambdas):
            raise BadInputError(f"arm scheme {self.scheme!r} with lambdas {self.lambdas}",
                                "real only takes no λ, every other scheme at least one")
        if self.scheme == "fixed" and len(self.lambdas) != 1:
            raise BadInputError(f"arm scheme 'fixed' with lambdas {self.lambdas}", "fixed takes exactly one λ")


@dataclass
class ArmsStudy:
    """Named arms trained with the same seeds and steps, each against ``baseline`` (paired)."""

    enabled: bool = False
    w: float = 2.0
    seeds: list[int] = field(default_factory=lambda: [0])
    baseline: str = "real"
    arms: dict[str, Arm] = field(default_factory=dict)
    contrasts: list[list[str]] = field(default_factory=list)  # [a, b]: a − b over draws, besides each arm − baseline
    target_points: float = 3.0  # the verdict: the best of lambda_aware beats the baseline by this, interval above 0
    lambda_aware: list[str] = field(default_factory=list)

    def validate(self) -> None:
        # An arm set to null is dropped: a config that extends another (``base:``) runs its own arms only.
        self.arms = {name: arm if isinstance(arm, Arm) else from_dict(Arm, arm, f"studies.arms.arms.{name}")
                     for name, arm in self.arms.items() if arm is not None}
        for name in self.arms:
            if not name.replace("_", "").isalnum():
                raise BadInputError(f"studies.arms.arms.{name}", "arm names are letters, digits and _ (they name run folders)")
        if self.enabled and self.baseline not in self.arms:
            raise BadInputError(f"studies.arms.baseline={self.baseline!r}", f"is not one of the arms {list(self.arms)}")
        named = [("studies.arms.lambda_aware", n) for n in self.lambda_aware]
        for pair in self.contrasts:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise BadInputError(f"studies.arms.contrasts {pair!r}", "each contrast is a pair [a, b] of arm names (a − b)")
            named += [("studies.arms.contrasts", n) for n in pair]
        for where, name in named:
            if self.enabled and name not in self.arms:
                raise BadInputError(f"{where}: {name!r}", f"is not one of the arms {list(self.arms)}")


@dataclass
class StudiesConfig:
    schemes: SchemesStudy = field(default_factory=SchemesStudy)
    w_sweep: WStudy = field(default_factory=WStudy)
    lambda_sweep: LambdaStudy = field(default_factory=LambdaStudy)
    arms: ArmsStudy = field(default_factory=ArmsStudy)


@dataclass
class DrawsConfig:
    """Labelled-subset draws: each seed is the whole pipeline on ``ingest.subset_seed`` = seed,
    in ``<out>/draw-<seed>`` (experiments/draws.py); empty = one run in ``out`` as before."""

    seeds: list[int] = field(default_factory=list)
    confidence: float = 0.95  # of the paired t interval over draws
    # A JSON file (meant to be committed) of every finished seg run: what a later session counts
    # when the run folders are gone (experiments/run_record.py). None: run folders only.
    record: str | None = None

    def validate(self) -> None:
        if len(set(self.seeds)) != len(self.seeds):
            raise BadInputError(f"draws.seeds={self.seeds}", "repeats a seed")
        if not 0.5 < self.confidence < 1.0:
            raise BadInputError(f"draws.confidence={self.confidence}", "must be in (0.5, 1)")


@dataclass
class ReportConfig:
    dir: str = "report"  # relative to out
    title: str = ""
    grid_sources: int = 3  # sources shown in the sample grids
    seed_index: int = 0  # which sample of a source (k-th seed) the grids show


@dataclass
class LabelScoresConfig(JudgeConfig):
    """The label-consistency scorer (:mod:`seg.label_scores`): seg's model (its pretrained
    backbone) trained like the judge, but on the draw's real train images with their
    scribbles only -- what the arms see -- never on a full mask. On when an arm sets
    ``data.min_label_score``; ``holdout`` is unused (there is no mask to score it with)."""

    SECTION = "label_scores"
    enabled: bool = False
    holdout: float = 0.0


@dataclass
class SweepConfig:
    """A whole experiment. Paths inside the job sections are set from ``out``."""

    name: str = "demo"
    out: str = "runs/demo"
    threads: int = 0  # torch threads of the FID and judge tasks (0 = the task's CPUs); ControlNet: controlnet.train.threads
    # ControlNet training, FID and the judge run as Ray tasks (experiments/tasks.py), each
    # asking for this many CPUs (0 = every CPU of the largest node that can host it) and,
    # where the cluster has GPUs, one GPU: the driver only submits and waits.
    stage_cpus: float = 0.0
    # Seg runs are Ray tasks too, as many at once as the cluster holds: each asks for this
    # many CPUs (its torch threads) and, where the cluster has GPUs, this share of one GPU
    # (1: a GPU each; 0.25: four small runs share one, as the tiny segmenter leaves it mostly idle).
    seg_cpus_per_run: float = 1.0
    seg_gpus_per_run: float = 1.0
    real_manifest: str | None = None  # use this real set instead of ingesting
    model_dir: str | None = None  # use this trained model instead of training one
    ingest: IngestConfig = field(default_factory=IngestConfig)
    controlnet: TrainControlNetConfig = field(default_factory=TrainControlNetConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    fid: FIDConfig = field(default_factory=FIDConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    memorization: MemorizationConfig = field(default_factory=MemorizationConfig)
    label_scores: LabelScoresConfig = field(default_factory=LabelScoresConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    studies: StudiesConfig = field(default_factory=StudiesConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    draws: DrawsConfig = field(default_factory=DrawsConfig)

    def validate(self) -> None:
        s = self.studies
        if s.schemes.enabled:
            unknown = sorted(set(s.schemes.names) - set(SCHEMES))
            if unknown:
                raise BadInputError(f"studies.schemes.names {unknown}", f"unknown scheme(s); choose from {list(SCHEMES)}")
        needs = []
        if s.schemes.enabled and set(s.schemes.names) - {"real"}:
            needs.append(("studies.schemes.w", s.schemes.w, self.grid.w))
        if s.schemes.enabled and "fixed" in s.schemes.names:
            needs.append(("studies.schemes.fixed_lambda", s.schemes.fixed_lambda, self.grid.lambdas))
        if s.w_sweep.enabled:
            needs.append(("studies.w_sweep.lam", s.w_sweep.lam, self.grid.lambdas))
        if s.lambda_sweep.enabled:
            needs.append(("studies.lambda_sweep.w", s.lambda_sweep.w, self.grid.w))
        if s.arms.enabled and any(a.lambdas for a in s.arms.arms.values()):
            needs.append(("studies.arms.w", s.arms.w, self.grid.w))
            for name, arm in s.arms.arms.items():
                needs += [(f"studies.arms.arms.{name}.lambdas", lam, self.grid.lambdas) for lam in arm.lambdas]
        for where, value, allowed in needs:
            if not any(abs(value - a) < 5e-3 for a in allowed):
                raise BadInputError(f"{where}={value}", f"is not in the grid {allowed}", "add it to grid.w / grid.lambdas")
        filtered = [(r.name, seg_config_for(self, r).data) for r in plan_seg_runs(self) if filters(self, r)]
        if filtered and not self.label_scores.enabled:
            raise BadInputError(f"seg run(s) {', '.join(n for n, _ in filtered)}",
                                "set data.min_label_score, but label_scores.enabled is false",
                                "set label_scores.enabled: true (the sweep then scores every cell)")
        for name, data in filtered:  # the scorer learns the sweep's train scribbles: an arm must see them all
            if data.real_fraction < 1.0 or data.train_split != self.seg.data.train_split:
                raise BadInputError(f"seg run {name}: data.real_fraction={data.real_fraction}, train_split={data.train_split!r}",
                                    "filters by label score, but the scorer learns from every scribble of the "
                                    f"'{self.seg.data.train_split}' split, more than this run sees",
                                    "draw the subset with ingest.subset instead")
        if self.threads < 0:
            raise BadInputError(f"threads={self.threads}", "must be >= 0 (0 = all cores)")
        if self.stage_cpus < 0:
            raise BadInputError(f"stage_cpus={self.stage_cpus}", "must be >= 0 (0 = a whole node)")
        if not self.seg_cpus_per_run > 0:
            raise BadInputError(f"seg_cpus_per_run={self.seg_cpus_per_run}", "must be > 0")
        if not 0 < self.seg_gpus_per_run <= 1:
            raise BadInputError(f"seg_gpus_per_run={self.seg_gpus_per_run}", "a share of one GPU: must be in (0, 1]")
        if self.report.grid_sources < 0:
            raise BadInputError(f"report.grid_sources={self.report.grid_sources}", "must be >= 0")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: mappings recursively, everything else replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


def resolve_bases(data: Any, here: Path, seen: tuple[Path, ...] = ()) -> Any:
    """Replace every ``{base: file, ...}`` mapping by ``file`` (resolved too) merged with the rest."""
    if not isinstance(data, dict):
        return data
    data = {k: resolve_bases(v, here, seen) for k, v in data.items()}
    if "base" not in data:
        return data
    path = (here / str(data.pop("base"))).resolve()
    if path in seen:
        raise BadInputError(str(path), "includes itself through 'base'")
    base = resolve_bases(load_yaml(path), path.parent, seen + (path,))
    return deep_merge(base, data)


def load_sweep_config(path: str | Path, overrides: list[str] | None = None, overlays: list[str | Path] = ()) -> SweepConfig:
    """Config file (bases resolved) + overlay files merged over it + ``--set`` overrides."""
    path = Path(path)
    data = resolve_bases(load_yaml(path), find_config(path).resolve().parent)
    for overlay in overlays:
        data = deep_merge(data, resolve_bases(load_yaml(overlay), find_config(overlay).resolve().parent))
    apply_overrides(data, overrides or [])
    return from_dict(SweepConfig, data, str(path))


# -- naming and planning ---------------------------------------------------------------------
def cell_name(w: float, lam: float) -> str:
    """Folder of one (w, λ) generation: ``w2p00-l0p50`` (the shard prefix without ``syn-``)."""
    return shard_prefix(w, lam).removeprefix("syn-")


def _fmt(x: float) -> str:
    return f"{x:.2f}".replace(".", "p")


@dataclass
class SegRun:
    """One segmentation training: scheme, the synthetic cells it draws from, seed."""

    scheme: str
    w: float | None  # None: real only
    lambdas: list[float]
    seed: int
    studies: list[str] = field(default_factory=list)
    arm: str | None = None  # an arms study's run: named by its arm, with the arm's own seg settings
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.arm is not None:
            return f"arm-{self.arm}-seed{self.seed}"
        if self.scheme == "real":
            return f"real-seed{self.seed}"
        lams = "_".join(_fmt(x) for x in self.lambdas)
        return f"{self.scheme}-w{_fmt(self.w)}-l{lams}-seed{self.seed}"  # type: ignore[arg-type]

    @property
    def cells(self) -> list[str]:
        return [cell_name(self.w, lam) for lam in self.lambdas] if self.w is not None else []


def plan_seg_runs(cfg: SweepConfig) -> list[SegRun]:
    """Every seg training the enabled studies need, each once (a run may serve several studies)."""
    runs: dict[str, SegRun] = {}

    def add(run: SegRun, study: str) -> None:
        run = runs.setdefault(run.name, run)
        if study not in run.studies:
            run.studies.append(study)

    s, lams = cfg.studies, cfg.grid.lambdas
    if s.schemes.enabled:
        for seed in s.schemes.seeds:
            for name in s.schemes.names:
                chosen = {"real": [], "fixed": [s.schemes.fixed_lambda]}.get(name, lams)
                add(SegRun(name, None if name == "real" else s.schemes.w, list(chosen), seed), "schemes")
    if s.w_sweep.enabled:
        for seed in s.w_sweep.seeds:
            if s.w_sweep.with_real:
                add(SegRun("real", None, [], seed), "w_sweep")
            for w in cfg.grid.w:
                add(SegRun("fixed", w, [s.w_sweep.lam], seed), "w_sweep")
    if s.lambda_sweep.enabled:
        for seed in s.lambda_sweep.seeds:
            if s.lambda_sweep.with_real:
                add(SegRun("real", None, [], seed), "lambda_sweep")
            for lam in lams:
                add(SegRun("fixed", s.lambda_sweep.w, [lam], seed), "lambda_sweep")
    if s.arms.enabled:
        for seed in s.arms.seeds:
            for name, arm in s.arms.arms.items():
                add(SegRun(arm.scheme, s.arms.w if arm.lambdas else None, list(arm.lambdas), seed, arm=name,
                           overrides=dict(arm.set)), "arms")
    return list(runs.values())


def seg_config_for(cfg: SweepConfig, run: SegRun) -> SegConfig:
    """The sweep's seg section with this run's scheme, fixed λ and seed (and an arm's own settings)."""
    seg = copy.deepcopy(cfg.seg)
    if run.overrides:
        data = to_dict(seg)
        apply_overrides(data, [f"{key}={json.dumps(value)}" for key, value in run.overrides.items()])
        seg = from_dict(SegConfig, data, f"seg settings of arm {run.arm!r}")
    seg.scheme.name = run.scheme
    seg.scheme.fixed_lambda = run.lambdas[0] if run.scheme == "fixed" else None
    seg.train.seed = run.seed
    seg.scheme.validate()
    return seg


# -- reuse checks ----------------------------------------------------------------------------
# -- reuse: one rule (engine.identity) ---------------------------------------------------------
# Keys that change how a job runs, not what it computes: left out of a stage's identity. A
# whole section goes by its name: ``log`` (TensorBoard files; engine.tensorboard_log) came after
# runs had recorded identities without it, and those stay reusable.
RUN_ONLY = {
    "ingest": {"out", "overwrite", "workers"},
    "controlnet": {"out", "data.manifest", "train.threads", "train.device", "train.save_every",
                   "train.keep_checkpoints", "train.log_every", "log"},
    "seg": {"data.workers", "train.device", "train.log_every", "train.checkpoint_every", "train.eval_batch_size", "log"},
}


# Keys added to a stage's config after runs were recorded with it (dotted, per config class): left
# out of the identity while at their dataclass default, which is the behaviour from before they
# existed, so those runs stay reusable; any other value enters the identity.
ADDED_LATER: dict[type, set[str]] = {
    IngestConfig: set(),
    TrainControlNetConfig: {"train.learn_null_hint", "train.null_prompt", "data.hint_resize", "data.channel_order",
                            "data.vae_encode", "train.epochs"},
    SegConfig: {  # issue 24, the paper's seg options (docs/paper-fidelity.md)
        "model.aspp_dropout", "model.decoder_dropout", "model.multi_grid", "model.align_corners",
        "augment.scale_mode", "augment.blur", "scheme.synth_share", "train.budget", "train.epochs", "train.eval_every_epochs",
        "scheme.replace_p", "scheme.aug_ratio", "scheme.best_dict", "scheme.best_k", "scheme.replace_from",  # the paper's other schemes
        "data.min_label_score",  # issue 23's label-consistency filter
    },
}


def stage_identity(config: Any, run_only: set[str], inputs: dict[str, str]) -> Identity:
    """The identity a stage records: its config without the run-only keys (and without keys
    added later while at their default, :data:`ADDED_LATER`), and its inputs."""
    data = drop_keys(plain(to_dict(config)), run_only)
    added = ADDED_LATER.get(type(config), set())
    if added:
        data = drop_defaults(data, plain(to_dict(type(config)())), added)
    return Identity(data, inputs)


# -- stages ----------------------------------------------------------------------------------
class Stages:
    """Headers, wall time and counts of every stage, saved in the sweep record as they finish."""

    def __init__(self, record: dict[str, Any], save) -> None:
        self.record, self.save = record, save
        self.total = 0
        self.index = 0

    @contextmanager
    def stage(self, name: str, title: str) -> Iterator[dict[str, Any]]:
        self.index += 1
        print(f"\n==> [{self.index}/{self.total}] {title}", flush=True)
        info: dict[str, Any] = {}
        t0, c0 = time.perf_counter(), time.process_time()
        yield info
        info["seconds"] = round(time.perf_counter() - t0, 3)
        # CPU time of the driver alone (not of Ray tasks and actors, where the heavy work runs).
        info["cpu_seconds"] = round(time.process_time() - c0, 3)
        self.record["stages"][name] = info
        self.save()
        print(f"    {name}: {info['seconds']:.1f} s" + (" (reused)" if info.get("reused") else ""), flush=True)


def stage_ingest(cfg: SweepConfig, out: Path, info: dict[str, Any]) -> storage.Location:
    """Real shards + manifest; an existing ingest of the same config is reused. A given
    ``real_manifest`` may be a path or a URL (``engine.storage``)."""
    if cfg.real_manifest:
        info.update(reused=True, external=cfg.real_manifest)
        read_manifest(cfg.real_manifest)  # fail now, naming the file, if it is not one
        return storage.as_location(cfg.real_manifest)
    from engine.ingest import MANIFEST, run_ingest

    ing = copy.deepcopy(cfg.ingest)
    ing.out = str(out / "real")
    manifest = Path(ing.out) / MANIFEST
    identity = stage_identity(ing, RUN_ONLY["ingest"], {})
    identity.check(ing.out, "real set")
    if manifest.is_file():
        info["reused"] = True
    else:
        ing.overwrite = True  # an interrupted ingest leaves shards but no manifest: redo it
        run_ingest(ing)
    identity.save(ing.out)  # recorded once the set is complete
    table, _ = read_manifest(manifest)
    info["images"] = sum(1 for s in table.column("status").to_pylist() if s == "ok")
    return manifest


def stage_controlnet(cfg: SweepConfig, out: Path, real_manifest: storage.Location,
                     info: dict[str, Any]) -> storage.Location:
    """The trained model folder; a finished training is reused, an interrupted one resumed. A
    given ``model_dir`` may be a path or a URL."""
    if cfg.model_dir:
        info.update(reused=True, external=cfg.model_dir)
        with storage.reached(cfg.model_dir):
            found = storage.is_dir(cfg.model_dir)
        if not found:
            raise BadInputError(cfg.model_dir, "model folder not found")
        return storage.as_location(cfg.model_dir)
    from tqdm import tqdm

    from engine.models import FINAL_DIR
    from engine.train_state import checkpoint_step, latest_checkpoint, trim_log

    cn = copy.deepcopy(cfg.controlnet)
    cn.out = str(out / "controlnet")
    cn.data.manifest = str(real_manifest)
    final = Path(cn.out) / FINAL_DIR
    # Recorded before training starts, so an interrupted run resumes only under the same identity.
    stage_identity(cn, RUN_ONLY["controlnet"], {"real": file_digest(real_manifest)}).claim(cn.out, "ControlNet")
    if final.is_dir():
        info["reused"] = True
        return final
    latest = latest_checkpoint(Path(cn.out) / "checkpoints")
    info["resumed"] = resume = latest is not None
    log_path = Path(cn.out) / "loss.jsonl"
    # As the task will: trimmed to the checkpoint it resumes from, emptied where it starts over
    # (stopped before its first checkpoint); the bar then starts where training does.
    trim_log(log_path, checkpoint_step(latest) if latest is not None else 0)
    with ray_session(cfg.generate.ray.address, cfg.generate.ray.local_num_cpus):
        resources = tasks.task_resources(cfg.stage_cpus)
        cn.train.threads = resources.threads(cn.train.threads)
        print(f"    as a Ray task ({resources})", flush=True)
        steps = planned_steps(cn)
        with tqdm(total=steps, initial=last_step(log_path), desc="train controlnet", dynamic_ncols=True) as bar:
            ref = tasks.remote(tasks.train_controlnet, resources).remote(cn, resume)
            final, info["placement"] = tasks.gather({ref: "controlnet"}, poll=lambda: _show_step(bar, log_path))["controlnet"]
            _show_step(bar, log_path)
    final = Path(final)
    done = last_step(log_path)
    info["steps"] = f"{done}/{steps}" + (" (time box)" if done < steps else "")
    return final


def last_step(log_path: Path) -> int:
    """The last step a training logged in its ``loss.jsonl`` (0 before the first line)."""
    try:
        lines = log_path.read_text().splitlines()
    except FileNotFoundError:
        return 0
    return json.loads(lines[-1])["step"] if lines else 0


def _show_step(bar, log_path: Path) -> None:
    bar.n = last_step(log_path)
    bar.refresh()


def stage_in_task(stage: Callable[..., Any], cfg: SweepConfig, args: tuple, info: dict[str, Any]) -> Any:
    """Run a whole stage function ``stage(*args, info)`` as one Ray task (``stage_cpus``, a GPU
    where there are GPUs, ``threads`` torch threads); its info comes back into ``info``."""
    with ray_session(cfg.generate.ray.address, cfg.generate.ray.local_num_cpus):
        resources = tasks.task_resources(cfg.stage_cpus)
        print(f"    as a Ray task ({resources})", flush=True)
        ref = tasks.remote(_stage_task, resources).remote(stage, resources.threads(cfg.threads), args)
        result, task_info = tasks.gather({ref: stage.__name__})[stage.__name__]
    info.update(task_info)
    return result


def _stage_task(stage: Callable[..., Any], threads: int, args: tuple) -> tuple[Any, dict[str, Any]]:
    info: dict[str, Any] = {}
    with torch_threads(threads):
        result = stage(*args, info)
    info["placement"] = tasks.placement()
    return result, info


@contextmanager
def ray_session(address: str | None, local_num_cpus: int | None) -> Iterator[None]:
    """Connect Ray once for all cells; shut it down after if this process started it."""
    import ray

    from engine.generate.distributor import connect

    started = not ray.is_initialized()
    if started:
        # Actors inherit the driver's environment: keep diffusers' load-time advice out of the log.
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        connect(address, local_num_cpus)
    try:
        yield
    finally:
        if started and ray.is_initialized():
            ray.shutdown()


def generate_config_for(cfg: SweepConfig, out: Path, real_manifest: storage.Location, model_dir: storage.Location,
                        w: float, lam: float) -> GenerateConfig:
    gen = copy.deepcopy(cfg.generate)
    gen.real_manifest, gen.model_dir = str(real_manifest), str(model_dir)
    gen.out_dir = str(out / "synthetic" / cell_name(w, lam))
    gen.plan.w, gen.plan.lambdas = [w], [lam]
    gen.plan.samples_per_source = cfg.grid.samples_for(lam, gen.plan.samples_per_source)
    gen.validate()
    return gen


def stage_generate(cfg: SweepConfig, out: Path, real_manifest: storage.Location, model_dir: storage.Location,
                   info: dict[str, Any]) -> dict[str, Path]:
    """One generation per (w, λ) cell (resumed where it stopped), all cells on ONE actor pool
    (the model is loaded once per replica); cell name -> manifest."""
    from engine.generate import run_generate_sets
    from engine.generate.run import MANIFEST, SUMMARY

    cells = [(w, lam) for w in cfg.grid.w for lam in cfg.grid.lambdas]
    manifests: dict[str, Path] = {}
    todo = []
    for w, lam in cells:
        gen = generate_config_for(cfg, out, real_manifest, model_dir, w, lam)
        done = (Path(gen.out_dir) / SUMMARY).is_file() and (Path(gen.out_dir) / MANIFEST).is_file()
        manifests[cell_name(w, lam)] = Path(gen.out_dir) / MANIFEST
        if not done or not _generation_current(gen):
            todo.append(gen)  # generation resumes it, or refuses a folder made with another identity
    info.update(cells=len(cells), cells_reused=len(cells) - len(todo), images=0, images_this_run=0)
    if todo:
        for gen in todo:
            print(f"    cell w={gen.plan.w[0]:g} λ={gen.plan.lambdas[0]:g} -> {gen.out_dir}", flush=True)
        with ray_session(cfg.generate.ray.address, cfg.generate.ray.local_num_cpus):
            summaries = run_generate_sets(todo)
        info["images_this_run"] = sum(s["samples_this_run"] for s in summaries)
    for m in manifests.values():
        info["images"] += json.loads((m.parent / SUMMARY).read_text())["samples"]
    return manifests


def _generation_current(gen: GenerateConfig) -> bool:
    """A finished cell is reused only if it recorded the identity this config would record."""
    from engine.generate.plan import build_plan
    from engine.generate.run import generation_identity

    recorded = Identity.load(gen.out_dir)
    plan = build_plan(gen.plan, storage.resolve(gen.real_manifest))
    return recorded is not None and recorded.digest == generation_identity(gen, plan, storage.resolve(gen.model_dir)).digest


def stage_fid(cfg: SweepConfig, out: Path, real_manifest: storage.Location, cells: dict[str, Path], info: dict[str, Any]) -> dict[str, Any]:
    """FID of every cell against the real reference; cached per cell in ``fid.json``."""
    from tqdm import tqdm

    path = out / FID_FILE
    setup = {**cfg.fid.describe(), "reference": str(real_manifest), "split": cfg.fid.reference_split,
             "max_reference": cfg.fid.max_reference}
    cache, todo = cell_cache(path, setup, cells, info)
    if todo:
        size = _size_of(todo)
        scorer = FIDScorer(cfg.fid, size)
        t0 = time.perf_counter()
        n_ref = scorer.set_reference(manifest_images(real_manifest, cfg.fid.reference_split, cfg.fid.max_reference))
        ref_seconds = time.perf_counter() - t0
        for name, (manifest, table, identity) in tqdm(todo.items(), desc="fid", unit="cell"):
            t0 = time.perf_counter()
            value, n = scorer.score(manifest_images(manifest))
            cache["cells"][name] = cell_entry(table, identity, time.perf_counter() - t0 + ref_seconds / len(todo),
                                              fid=value, samples=n, reference_samples=n_ref, size=size)
            info["images"] += n
            write_json(path, cache)
    write_json(path, cache)
    return cache


def cell_cache(path: Path, setup: dict[str, Any], cells: dict[str, Path], info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple]]:
    """A per-cell score file (``fid.json``, ``judge.json``) and the cells it must (re)score.

    A cell's score is reused while its recorded identity -- the ``setup`` (what decides the
    numbers) and the digest of the cell's manifest -- is today's; else the cell is redone.
    Todo: name -> (manifest, table, identity digest).
    """
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if cache.get("setup") != plain(setup):
        cache = {"setup": plain(setup), "cells": {}}
    todo = {}
    for name, manifest in cells.items():
        identity = cell_identity(setup, manifest)
        if cache["cells"].get(name, {}).get("identity") != identity:
            todo[name] = (manifest, read_manifest(manifest)[0], identity)
    info.update(cells=len(cells), cells_reused=len(cells) - len(todo), images=0)
    return cache, todo


def cell_identity(setup: dict[str, Any], manifest: storage.Location) -> str:
    """What a cached cell score was computed from: the score's setup and the cell's manifest."""
    return Identity(setup, {"cell": file_digest(manifest)}).digest


def memorization_setup(cfg: SweepConfig, real_manifest: storage.Location) -> dict[str, Any]:
    """What decides a cell's generator check: its settings and the real train set it compares with."""
    return {**asdict(cfg.memorization), "reference": str(real_manifest), "split": "train"}


def cell_entry(table, identity: str, seconds: float, **scores: Any) -> dict[str, Any]:
    """One cell's record in a score file: its (w, λ), the scores, the identity scored, time."""
    row = table.slice(0, 1).to_pylist()[0]
    return {"w": row["w"], "lambda": row["lambda"], **scores, "identity": identity, "seconds": round(seconds, 3)}


def _size_of(todo: dict[str, tuple]) -> int:
    """Side of the synthetic images (all cells share the generator's resolution)."""
    return int(next(iter(todo.values()))[1].column("height")[0].as_py())


def stage_judge(cfg: SweepConfig, out: Path, real_manifest: storage.Location, cells: dict[str, Path], info: dict[str, Any]) -> dict[str, Any]:
    """Scribble agreement of every cell (``seg.judge``); cached per cell in ``judge.json``.

    The judge is trained once on the first ``1 - judge.holdout`` of the real val split
    with its full masks and scored on the rest (the ceiling, ``real``); each synthetic
    sample is then scored against its source's full mask and a mismatched source's.
    Without the masks this needs, the stage records why it was skipped and goes on.
    """
    path = out / JUDGE_FILE
    setup = {**cfg.judge.describe(), "reference": str(real_manifest), "split": JUDGE_SPLIT}
    cache, todo = cell_cache(path, setup, cells, info)
    if not todo:
        return cache
    size = _size_of(todo)
    resize = cfg.generate.sampler.resize
    val = sorted(_masked(real_manifest, lambda r: r["split"] == JUDGE_SPLIT, size, resize), key=lambda s: s.key)
    sources = {name: set(table.column("source_id").to_pylist()) for name, (_, table, _) in todo.items()}
    needed = set().union(*sources.values())
    masks = {s.meta.get("source_id", s.key): s.mask for s in _masked(real_manifest, lambda r: r["source_id"] in needed, size, resize)}
    skip = _judge_skip(len(val), {name: len(ids & set(masks)) for name, ids in sources.items()})
    if skip:
        info["skipped"] = skip
        print(f"    judge skipped: {skip}", flush=True)
        return cache
    k = len(read_manifest(real_manifest)[1].class_names)
    t0 = time.perf_counter()
    judge, cache["real"] = judge_on_real(np.stack([s.image for s in val]), np.stack([s.mask for s in val]), k, cfg.judge)
    train_seconds = time.perf_counter() - t0
    for name, (manifest, table, identity) in todo.items():
        t0 = time.perf_counter()
        scores = score_cell(judge, manifest, masks, k, cfg.judge.batch_size)
        cache["cells"][name] = cell_entry(table, identity, time.perf_counter() - t0 + train_seconds / len(todo), **scores)
        info["images"] += scores["samples"]
        print(f"    judge {name}: mIoU {scores['judge_miou']:.3f} vs mismatched {scores['judge_miou_mismatched']:.3f}",
              flush=True)
        write_json(path, cache)
    return cache


def stage_memorization(cfg: SweepConfig, out: Path, real_manifest: storage.Location, cells: dict[str, Path],
                       info: dict[str, Any]) -> dict[str, Any]:
    """Are the cells' images new scenes or copies of their sources (:mod:`engine.memorization`)?
    Cached per cell in ``memorization.json``; a real set too large to hold is skipped with the reason."""
    path = out / MEMORIZATION_FILE
    cache, todo = cell_cache(path, memorization_setup(cfg, real_manifest), cells, info)
    if not todo:
        return cache
    size = _size_of(todo)
    sources = sum(1 for sp, st in zip(*(read_manifest(real_manifest)[0].column(c).to_pylist() for c in ("split", "status")))
                  if sp == "train" and st == "ok")
    skip = cfg.memorization.skip_reason(sources, size)
    if skip:
        info["skipped"] = skip
        print(f"    memorization skipped: {skip}", flush=True)
        return cache
    real = train_images(real_manifest, size, cfg.generate.sampler.resize)
    for name, (manifest, table, identity) in todo.items():
        t0 = time.perf_counter()
        scores = memorization(manifest, real)
        cache["cells"][name] = cell_entry(table, identity, time.perf_counter() - t0, **scores)
        info["images"] += scores["samples"]
        print(f"    memorization {name}: {describe(scores)}", flush=True)
        write_json(path, cache)
    return cache


def stage_label_scores(cfg: SweepConfig, out: Path, real_manifest: storage.Location, cells: dict[str, Path],
                       info: dict[str, Any]) -> dict[str, Any]:
    """Every cell's samples scored for agreement with their own scribble (:mod:`seg.label_scores`),
    written as ``label_scored.parquet`` beside the cell's manifest; summaries cached per cell in
    ``label_scores.json``. The scorer is trained on the real train split's scribbles only.

    The copies are derived files: a filtered seg run's identity names the cell and the scorer's
    setup (:func:`run_inputs`), not the copy's bytes, so scoring again never retrains runs.
    """
    path = out / LABEL_SCORES_FILE
    setup = label_scores_setup(cfg, real_manifest)
    cache, todo = cell_cache(path, setup, cells, info)
    todo.update({name: (m, read_manifest(m)[0], Identity(setup, {"cell": file_digest(m)}).digest)
                 for name, m in cells.items() if name not in todo and not scored_manifest(m).is_file()})
    info["cells_reused"] = len(cells) - len(todo)
    if not todo:
        return cache
    size = _size_of(todo)
    real = [fit_sample(s, size, cfg.generate.sampler.resize)
            for s in manifest_samples(real_manifest, lambda r: r["split"] == cfg.seg.data.train_split, with_mask=False)]
    k = len(read_manifest(real_manifest)[1].class_names)
    t0 = time.perf_counter()
    scorer = train_judge(np.stack([s.image for s in real]), np.stack([s.scribble for s in real]), k, cfg.label_scores,
                         cfg.seg.model)
    train_seconds = time.perf_counter() - t0
    note = {"scorer": "scribbles of the real train split", "setup_identity": Identity(setup, {}).digest, "metric": "scribble_miou"}
    for name, (manifest, table, identity) in todo.items():
        t0 = time.perf_counter()
        summary = score_manifest(scorer, manifest, k, note, scored_manifest(manifest), cfg.label_scores.batch_size)
        cache["cells"][name] = cell_entry(table, identity, time.perf_counter() - t0 + train_seconds / len(todo), **summary)
        info["images"] += summary["samples"]
        print(f"    label scores {name}: {summary}", flush=True)
        write_json(path, cache)
    return cache


def label_scores_setup(cfg: SweepConfig, real_manifest: storage.Location) -> dict[str, Any]:
    """What decides the label scores: the scorer's training, its model, the real set it learns from."""
    return {**label_scorer(cfg), "reference": file_digest(real_manifest)}


def label_scorer(cfg: SweepConfig) -> dict[str, Any]:
    """The scorer's settings alone (its training, model and split), without the data it learns from."""
    return {**cfg.label_scores.describe(), "model": plain(to_dict(cfg.seg.model)), "split": cfg.seg.data.train_split}


def scored_manifest(manifest: storage.Location) -> Path:
    """Where the label-scores stage writes a cell's scored copy (beside it: same shard paths)."""
    return Path(scored_copy(manifest))


def filters(cfg: SweepConfig, run: SegRun) -> bool:
    """Does this seg run drop synthetic samples by label score?"""
    return bool(seg_config_for(cfg, run).data.min_label_score)


def run_inputs(cfg: SweepConfig, run: SegRun, real_manifest: storage.Location,
               cells: dict[str, Path]) -> tuple[dict[str, Path], dict[str, str]]:
    """The manifest each of a seg run's cells is read from (the scored copy when the run filters
    by label score, else the cell's own) and the input digests its identity records: the real
    manifest's, and per cell its manifest's (with the scorer's setup when filtered)."""
    filtered = filters(cfg, run)
    manifests = {c: scored_manifest(cells[c]) if filtered else cells[c] for c in run.cells}
    setup = label_scores_setup(cfg, real_manifest) if filtered else None
    digests = {"real": file_digest(real_manifest)}
    for c in run.cells:
        cell = file_digest(cells[c])
        digests[c] = Identity(setup, {"cell": cell}).digest if setup is not None else cell
    return manifests, digests


def _judge_skip(val_images: int, sources_with_mask: dict[str, int]) -> str | None:
    """Why the judge cannot run on these data (masks missing), or None."""
    if not val_images:
        return f"the real manifest has no '{JUDGE_SPLIT}' images with full masks (mask.png) to train the judge on"
    few = sorted(name for name, n in sources_with_mask.items() if n < 2)
    if few:
        return f"cell(s) {', '.join(few)} have fewer than 2 generation sources with a full mask in the real manifest"
    return None


def _masked(manifest: storage.Location, keep, size: int, resize: str) -> Iterator[Sample]:
    """The fitted samples of ``manifest`` that ``keep`` accepts and that have a full mask, streamed."""
    return (fit_sample(s, size, resize) for s in manifest_samples(manifest, keep) if s.mask is not None)


def score_cell(judge, manifest: Path, masks: dict[str, np.ndarray], num_classes: int, batch_size: int) -> dict[str, Any]:
    """Agreement of one cell's samples with their sources' masks vs a mismatched source's.

    Sources are paired by :func:`seg.judge.derangement` over the cell's sorted source ids
    that have a mask (samples of the others are not scored); streamed in batches.
    """
    table, _ = read_manifest(manifest)
    sources = sorted(set(table.column("source_id").to_pylist()) & set(masks))
    other = dict(zip(sources, (sources[j] for j in derangement(len(sources)))))
    result = Agreement(num_classes)
    for batch in chunks(manifest_samples(manifest, lambda r: r["source_id"] in other, with_mask=False), batch_size):
        ids = [s.meta["source_id"] for s in batch]
        result.update(predict(judge, np.stack([s.image for s in batch])), np.stack([masks[i] for i in ids]),
                      np.stack([masks[other[i]] for i in ids]))
    return result.compute()


def stage_seg(cfg: SweepConfig, out: Path, real_manifest: storage.Location, cells: dict[str, Path], runs: list[SegRun],
              info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every planned seg training, as parallel Ray tasks; finished ones reused, interrupted ones resumed.

    A run made with another config is refused (as for every stage); a run whose inputs
    changed (a cell generated again) is trained again from scratch. The trainings run off
    the driver, as many at once as the cluster's resources allow (``seg_cpus_per_run``
    CPUs each, plus ``seg_gpus_per_run`` of a GPU each where there are GPUs).
    """
    summaries: dict[str, dict[str, Any]] = {}
    info.update(runs=len(runs), runs_reused=0)
    todo = []
    for run in runs:
        inputs, digests = run_inputs(cfg, run, real_manifest, cells)
        seg, identity = seg_identity(cfg, run, digests)
        folder = out / "seg" / run.name
        manifests = [str(real_manifest)] + [str(m) for m in inputs.values()]
        recorded = Identity.load(folder)
        changed = identity.differences(recorded) if recorded is not None else []
        if changed and all(d.startswith("input:") for d in changed):
            shutil.rmtree(folder)  # trained on other synthetic sets: train again
        identity.claim(folder, "seg run")
        summary_file = folder / "summary.json"
        if summary_file.is_file():
            summaries[run.name] = summary = json.loads(summary_file.read_text())
            info["runs_reused"] += 1
            print(f"    seg {run.name} (reused, mIoU {summary['miou']:.4f})", flush=True)
            continue
        todo.append((run.name, seg, manifests, folder))
    if todo:
        with ray_session(cfg.generate.ray.address, cfg.generate.ray.local_num_cpus):
            summaries.update(_train_seg_runs(todo, cfg.seg_cpus_per_run, cfg.seg_gpus_per_run))
    return {r.name: summaries[r.name] for r in runs}


def seg_identity(cfg: SweepConfig, run: SegRun, digests: dict[str, str]) -> tuple[SegConfig, Identity]:
    """A seg run's config and the identity it records: that config and the digests of the real
    manifest (``digests["real"]``), of each cell it draws from (``digests[cell name]``) and of
    the pretrained backbone it starts from (``builtin`` names a file that a release may change)."""
    seg = seg_config_for(cfg, run)
    inputs = {k: digests[k] for k in ["real", *run.cells]}
    backbone = backbone_weights_file(seg.model)
    if backbone is not None:
        inputs["backbone"] = file_digest(backbone)
    return seg, stage_identity(seg, RUN_ONLY["seg"], inputs)


def _train_seg(seg: SegConfig, manifests: list[str], folder: str, commit: str) -> dict[str, Any]:
    """One seg training inside a Ray task (resumed from its checkpoint if there is one); the
    commit it finished at is recorded beside its summary (identities hold config and inputs,
    not code: a reader of results made across sessions sees which code made each)."""
    from seg.train import train

    summary = train(seg, manifests, folder, resume=(Path(folder) / "checkpoints" / "last.pt").is_file())
    write_json(Path(folder) / COMMIT_FILE, {"commit": commit})
    return summary


def _train_seg_runs(todo: list[tuple[str, SegConfig, list[str], Path]], cpus: float, gpu_share: float) -> dict[str, dict[str, Any]]:
    """Submit every run as a task; collect summaries as they finish (a failure cancels the rest)."""
    resources = tasks.task_resources(cpus, gpu_share)
    task = tasks.remote(_train_seg, resources)
    commit = git_commit()
    refs = {task.remote(seg, manifests, str(folder), commit): name for name, seg, manifests, folder in todo}
    print(f"    {len(refs)} seg run(s) as Ray tasks ({resources} each)", flush=True)
    return tasks.gather(refs, on_done=lambda name, summary: print(
        f"    seg {name}: mIoU {summary['miou']:.4f} in {summary['seconds']:.1f} s", flush=True))


def git(*args: str) -> str:
    """``git ARGS`` in the repo, its output stripped (raises OSError / CalledProcessError outside git)."""
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def git_commit() -> str:
    """The repo's HEAD (with ``+dirty`` when tracked files differ); outside git (a copied tree,
    such as a lent device's) ``$SCRIBBLEGEN_COMMIT`` when set, else ``unknown``."""
    try:
        sha = git("rev-parse", "HEAD")
        return sha + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("SCRIBBLEGEN_COMMIT") or "unknown"


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch threads (0 = leave as is), then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rel(path: storage.Location, root: Path) -> str:
    """``path`` as the sweep record names it: relative to the run folder, or a URL as it is."""
    if not storage.is_local(path):
        return os.fspath(path)
    return os.path.relpath(storage.local_path(path).resolve(), root.resolve())


def new_record(cfg: SweepConfig, runs: list[SegRun]) -> dict[str, Any]:
    """The sweep record (``<report dir>/sweep.json``) before any stage ran; the report reads it."""
    return {
        "name": cfg.name, "title": cfg.report.title or cfg.name, "config": to_dict(cfg),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "stages": {},
        "grid": {"w": cfg.grid.w, "lambdas": cfg.grid.lambdas}, "cells": [],
        "seg_runs": [{"name": r.name, **asdict(r), "dir": f"seg/{r.name}"} for r in runs],
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }


def cell_entries(cfg: SweepConfig, manifests: dict[str, Path], out: Path) -> list[dict[str, Any]]:
    """The record's cell list: name, w, λ and manifest path relative to the run folder."""
    return [{"name": cell_name(w, lam), "w": w, "lambda": lam, "manifest": _rel(manifests[cell_name(w, lam)], out)}
            for w in cfg.grid.w for lam in cfg.grid.lambdas]


def run_sweep(cfg: SweepConfig) -> Path:
    """Run (or resume) the whole sweep; return the report's ``index.md``."""
    from experiments.report import build_report

    out = Path(cfg.out)
    report_dir = out / cfg.report.dir
    report_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    runs = plan_seg_runs(cfg)
    record = new_record(cfg, runs)
    save = lambda: write_json(report_dir / RECORD, record)  # noqa: E731
    stages = Stages(record, save)
    stages.total = (4 + bool(cfg.fid.enabled) + bool(cfg.judge.enabled) + bool(cfg.memorization.enabled)
                    + bool(cfg.label_scores.enabled) + bool(runs))
    with stages.stage("ingest", f"ingest real data -> {out / 'real'}") as info:
        real = stage_ingest(cfg, out, info)
    # One Ray connection for every stage that runs on the cluster (a local instance starts once).
    with ray_session(cfg.generate.ray.address, cfg.generate.ray.local_num_cpus):
        with stages.stage("controlnet", f"train ControlNet -> {out / 'controlnet'}") as info:
            model = stage_controlnet(cfg, out, real, info)
        n_cells = len(cfg.grid.w) * len(cfg.grid.lambdas)
        with stages.stage("generate", f"generate {n_cells} (w, λ) cell(s) with Ray -> {out / 'synthetic'}") as info:
            cells = stage_generate(cfg, out, real, model, info)
        record.update(real_manifest=_rel(real, out), model_dir=_rel(model, out), cells=cell_entries(cfg, cells, out))
        if cfg.fid.enabled:
            with stages.stage("fid", f"FID of {n_cells} cell(s) ({cfg.fid.feature} features) -> {out / FID_FILE}") as info:
                stage_in_task(stage_fid, cfg, (cfg, out, real, cells), info)
        if cfg.judge.enabled:
            with stages.stage("judge", f"judge agreement of {n_cells} cell(s) ({cfg.judge.steps} steps on real "
                                       f"{JUDGE_SPLIT}) -> {out / JUDGE_FILE}") as info:
                stage_in_task(stage_judge, cfg, (cfg, out, real, cells), info)
        if cfg.memorization.enabled:
            with stages.stage("memorization", f"memorization check of {n_cells} cell(s) -> {out / MEMORIZATION_FILE}") as info:
                stage_memorization(cfg, out, real, cells, info)
        if cfg.label_scores.enabled:
            with stages.stage("label_scores", f"label scores of {n_cells} cell(s) ({cfg.label_scores.steps}-step scorer on the "
                                              f"real scribbles) -> {out / LABEL_SCORES_FILE}") as info:
                stage_in_task(stage_label_scores, cfg, (cfg, out, real, cells), info)
        if runs:
            with stages.stage("seg", f"train {len(runs)} segmentation model(s) -> {out / 'seg'}") as info:
                stage_seg(cfg, out, real, cells, runs, info)
    with stages.stage("report", f"report -> {report_dir}") as info:
        record["wall_seconds"] = round(time.perf_counter() - t_start, 3)
        save()
        index = build_report(out, cfg.report.dir, progress=True)
    record["wall_seconds"] = round(time.perf_counter() - t_start, 3)
    record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    save()
    build_report(out, cfg.report.dir)  # once more, with the final wall time (fast: figures are cheap)
    return index


# The demo's smoke budget, merged over a config by --fast (experiments.cli).
FAST_OVERLAY = REPO / "configs" / "demo" / "fast.yaml"
