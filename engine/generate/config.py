"""The generate job's config: what to generate (plan), with what (sampler), on what (ray).

One YAML file under ``configs/generate/`` describes a whole generation run; it is saved
beside the output and stored in the manifest, so a synthetic set always says how it
was made. Out-of-range values are rejected here, before any Ray actor starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Real

from engine.errors import BadInputError
from engine.data.geometry import DEFAULT_RESIZE, check_resize
from engine.models import HINT_RESIZES, UNCOND
from engine.sampler import SCHEDULERS, SPACINGS

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
IMAGE_FORMATS = ("png", "jpg")


def _numbers(where: str, values: object) -> list[float]:
    """A YAML scalar or list of numbers as a list of floats (``w: 2`` means ``[2.0]``)."""
    items = values if isinstance(values, (list, tuple)) else [values]
    if not items or not all(isinstance(v, Real) and not isinstance(v, bool) for v in items):
        raise BadInputError(where, f"must be a number or a non-empty list of numbers, got {values!r}")
    return [float(v) for v in items]


def _distinct_at_key_precision(where: str, values: list[float]) -> None:
    """Keys and shard names carry w and λ to 2 decimals, so values must differ there."""
    rounded = [f"{v:.2f}" for v in values]
    if len(set(rounded)) != len(rounded):
        raise BadInputError(
            where, f"values {values} collide when rounded to 2 decimals", "sample keys and shard names use 2 decimals"
        )


@dataclass
class PlanConfig:
    """The work: every train source × every w × every λ × ``samples_per_source`` seeds."""

    w: list[float] = field(default_factory=lambda: [2.0])
    lambdas: list[float] = field(default_factory=lambda: [0.5, 1.0])
    samples_per_source: int = 1
    samples_per_shard: int = 16
    seed: int = 0
    split: str = "train"
    max_sources: int | None = None  # first N sources (sorted by id): quick runs and smoke tests

    def validate(self) -> None:
        self.w = _numbers("plan.w", self.w)
        self.lambdas = _numbers("plan.lambdas", self.lambdas)
        if any(w < 0 for w in self.w):
            raise BadInputError("plan.w", f"guidance scales must be >= 0, got {self.w}")
        if any(not 0 < lam <= 1 for lam in self.lambdas):
            raise BadInputError("plan.lambdas", f"encode ratios must lie in (0, 1], got {self.lambdas}")
        _distinct_at_key_precision("plan.w", self.w)
        _distinct_at_key_precision("plan.lambdas", self.lambdas)
        for name in ("samples_per_source", "samples_per_shard"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BadInputError(f"plan.{name}", f"must be an integer >= 1, got {value!r}")
        if self.max_sources is not None and (not isinstance(self.max_sources, int) or self.max_sources < 1):
            raise BadInputError("plan.max_sources", f"must be null or an integer >= 1, got {self.max_sources!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise BadInputError("plan.seed", f"must be an integer, got {self.seed!r}")


@dataclass
class SamplerConfig:
    """How each actor samples: passed to ``load_sampler`` in every replica."""

    num_steps: int = 50
    spacing: str = "paper"  # paper: linspace(0, 1000·λ, N+1)[:-1] + 1 | truncate: diffusers img2img strength
    scheduler: str = "ddim"  # the update rule: ddim (the paper's) | dpmsolver++ | unipc (diffusers' multistep solvers)
    uncond: str = "hint"  # CFG's unconditional branch: hint (the paper's) | hint+prompt; must match the model's training
    dtype: str = "auto"  # auto: float16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: one GPU actor per GPU when the cluster has GPUs, else CPU actors
    batch_size: int = 8
    # Square side sources are fitted to before sampling (``engine.data.geometry.fit_to``,
    # as the trainer fits): set it to the model's training resolution. null = sample at
    # each source's own size. Synthetic samples are written at this size, each with the
    # fitted scribble it was sampled from.
    resolution: int | None = None
    resize: str = DEFAULT_RESIZE  # stretch (the paper) | crop | pad; as the model was trained (its bundle says)
    # The colour hint at `resolution`: nearest (the fitted scribble rendered) | cubic (rendered
    # at the source's size, resized bicubically: the paper's); must be what the model trained on.
    hint_resize: str = "nearest"
    # torch.compile the ControlNet + UNet (channels_last) in each replica, paid at load with one
    # warm-up step at (batch_size, resolution): worth it on GPUs for long runs, not on CPU.
    compile: bool = False

    def validate(self) -> None:
        if self.resolution is not None and (not isinstance(self.resolution, int) or self.resolution < 8):
            raise BadInputError("sampler.resolution", f"must be null or an integer >= 8, got {self.resolution!r}")
        if self.spacing not in SPACINGS:
            raise BadInputError("sampler.spacing", f"must be one of {SPACINGS}, got {self.spacing!r}")
        if self.scheduler not in SCHEDULERS:
            raise BadInputError("sampler.scheduler", f"must be one of {SCHEDULERS}, got {self.scheduler!r}")
        check_resize(self.resize, "sampler.resize")
        if self.hint_resize not in HINT_RESIZES:
            raise BadInputError("sampler.hint_resize", f"must be one of {HINT_RESIZES}, got {self.hint_resize!r}")
        if self.uncond not in UNCOND:
            raise BadInputError("sampler.uncond", f"must be one of {UNCOND}, got {self.uncond!r}")
        if self.dtype not in DTYPES:
            raise BadInputError("sampler.dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise BadInputError("sampler.device", f"must be one of {DEVICES}, got {self.device!r}")
        for name in ("num_steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BadInputError(f"sampler.{name}", f"must be an integer >= 1, got {value!r}")


@dataclass
class RayConfig:
    """Where and how wide: the actor pool and its fault tolerance."""

    address: str | None = None  # None: $RAY_ADDRESS, else a running cluster, else a local instance; "local": private
    local_num_cpus: int | None = None  # CPUs of a local instance (None: all)
    num_actors: int | None = None  # None: one per GPU, or 1 on CPU
    num_cpus_per_actor: float = 1.0  # also the torch threads of a CPU actor; all but one encode PNGs in parallel
    max_restarts: int = 3  # Ray restarts of a dead actor (model reloaded in __init__)
    unit_retries: int = 3  # re-runs of one shard after its actor died or its task failed
    inflight_per_actor: int = 2  # queued shards per actor, so an actor never waits on the driver
    # Seconds for every actor to be placed and load its model; then the run stops naming the
    # resources it asked for and what the cluster has (instead of waiting forever).
    placement_timeout_s: float = 600.0

    def validate(self) -> None:
        if self.num_actors is not None and (not isinstance(self.num_actors, int) or self.num_actors < 1):
            raise BadInputError("ray.num_actors", f"must be null or an integer >= 1, got {self.num_actors!r}")
        if self.local_num_cpus is not None and (not isinstance(self.local_num_cpus, int) or self.local_num_cpus < 1):
            raise BadInputError("ray.local_num_cpus", f"must be null or an integer >= 1, got {self.local_num_cpus!r}")
        if not self.num_cpus_per_actor > 0:
            raise BadInputError("ray.num_cpus_per_actor", f"must be > 0, got {self.num_cpus_per_actor!r}")
        for name in ("max_restarts", "unit_retries"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise BadInputError(f"ray.{name}", f"must be an integer >= 0, got {value!r}")
        if not self.placement_timeout_s > 0:
            raise BadInputError("ray.placement_timeout_s", f"must be > 0, got {self.placement_timeout_s!r}")
        if not isinstance(self.inflight_per_actor, int) or self.inflight_per_actor < 1:
            raise BadInputError("ray.inflight_per_actor", f"must be an integer >= 1, got {self.inflight_per_actor!r}")


@dataclass
class GenerateConfig:
    """A generation run: real manifest + model folder in, tagged synthetic shards out.

    ``real_manifest``, ``model_dir`` and ``out_dir`` are local paths or URLs (``s3://``,
    ``gs://``, ``file://``: ``engine.storage``). Relative paths are resolved against the
    current directory of the driver. Under ``ray job submit --working-dir`` that is the
    uploaded copy of the repo, so pass absolute paths (or URLs) there
    (``--set out_dir=/data/...``).
    """

    real_manifest: str = "runs/tiny/real/manifest.parquet"
    model_dir: str = "runs/tiny/controlnet/final"
    out_dir: str = "runs/tiny/synthetic/tiny"
    image_format: str = "png"
    source_cache_shards: int = 4  # real shards whose raw bytes an actor keeps in memory
    plan: PlanConfig = field(default_factory=PlanConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> None:
        if self.image_format not in IMAGE_FORMATS:
            raise BadInputError("image_format", f"must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if not isinstance(self.source_cache_shards, int) or self.source_cache_shards < 1:
            raise BadInputError("source_cache_shards", f"must be an integer >= 1, got {self.source_cache_shards!r}")
        for section in (self.plan, self.sampler, self.ray):
            section.validate()
