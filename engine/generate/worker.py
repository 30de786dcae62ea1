"""The generation worker: one model replica that turns a work unit into one finished shard.

:class:`ShardGenerator` is a plain class so it runs (and is tested) without Ray; the
distributor wraps it with ``ray.remote`` so that each actor holds one replica, loaded
once in ``__init__`` (again only when Ray restarts a dead actor).

Per unit it: reads the unit's sources from the real shards (raw bytes of recently used
real shards are cached, sources decoded on demand), samples them in batches of
``batch_size`` with the unit's (w, λ), writes the shard with :class:`ShardWriter`
(a local temp file, renamed into place or put as one whole object) and then its manifest
part ``parts/<shard>.parquet`` (atomic). The part is written last: a shard without a part
is unfinished work, and resume redoes it. The output folder, the real shards and the model
folder may be local paths or URLs (``engine.storage``).

The sampler is the expensive part (the accelerator), so everything else runs beside it
in two threads of the actor: a loader thread reads the next unit's sources (the driver
names that unit with each call) and a writer thread encodes, writes and closes the shard
(:class:`WriteBehind`, at most ``write_ahead`` batches queued). The sampler, PIL's encoders
and the tar writes release the GIL, so the threads overlap for real.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import numpy as np

from engine import storage
from engine.errors import BadInputError
from engine.generate.config import SamplerConfig
from engine.generate.plan import WorkItem, WorkUnit
from engine.manifest import DatasetInfo, sample_row, shard_rows, write_manifest
from engine.shards import UNLABELLED, Sample, ShardWriter, decode_sample, iter_records

PARTS_DIR = "parts"


class Sampler(Protocol):
    """What the worker needs from a sampler (``engine.sampler.ScribbleSampler`` is one)."""

    model_id: str

    def sample(
        self,
        images: np.ndarray,
        scribbles: np.ndarray,
        class_names: list[list[str]],
        w: float,
        lam: float,
        seeds: list[int],
        colours: np.ndarray | None = None,
    ) -> np.ndarray: ...

    def steps_for(self, lam: float) -> int: ...


SamplerFactory = Callable[[str, str, SamplerConfig], Sampler]


def resolve_dtype(name: str, device: str) -> Any:
    """``auto`` is float16 on CUDA (the paper's setting) and float32 on CPU."""
    import torch

    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_sampler(model_dir: str, device: str, cfg: SamplerConfig) -> Sampler:
    """The production factory: the saved model folder (a path, or a URL copied to a local
    cache once per node) -> a sampler on ``device``."""
    from engine.models import ScribbleGenModel
    from engine.sampler import ScribbleSampler

    model = ScribbleGenModel.from_pretrained(storage.local_copy(model_dir, where=f"the generation actor on {socket.gethostname()}"))
    if cfg.resolution is not None and cfg.resolution != model.resolution:
        print(f"generate: sampling at {cfg.resolution} px, model trained at {model.resolution} px", file=sys.stderr)
    if cfg.hint_resize != model.hint_resize and model.hint_encoding == "colour":
        raise BadInputError(f"sampler.hint_resize={cfg.hint_resize}", f"model {model.model_id} was trained on "
                            f"{model.hint_resize}-fitted colour hints", f"set sampler.hint_resize={model.hint_resize}")
    if cfg.resolution is not None and model.resize is not None and cfg.resize != model.resize:
        print(f"generate: sources fitted with resize={cfg.resize}, model trained with {model.resize}", file=sys.stderr)
    sampler = ScribbleSampler(model, device, cfg.num_steps, cfg.spacing, resolve_dtype(cfg.dtype, device), cfg.uncond,
                              cfg.scheduler)
    if cfg.compile:
        side = cfg.resolution or model.resolution
        sampler.compile(cfg.batch_size, (side, side))
    return sampler


def part_path(out_dir: storage.Location, shard: str) -> storage.Location:
    """Manifest part of one shard: ``<out>/parts/<shard name without .tar>.parquet``."""
    return storage.join(out_dir, PARTS_DIR, Path(shard).stem + ".parquet")


@dataclass
class ShardResult:
    """What the driver learns when a unit finished: enough for progress and the summary."""

    index: int
    shard: str
    samples: int
    w: float
    lam: float
    steps: int
    seconds: float  # wall time of the unit in the actor, loading and writing included
    sample_seconds: float  # time inside sampler.sample only
    pid: int

    @property
    def images_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def stats(self) -> dict[str, Any]:
        """Per-shard stats stored in its manifest part (and merged into the manifest)."""
        return {
            **asdict(self),
            "images_per_s": round(self.images_per_s, 4),
            "seconds_per_sample": self.sample_seconds / max(self.samples, 1),
        }


class SourceCache:
    """Real sources by id, read from their shards; raw bytes of the last few shards are kept.

    Raw (PNG) bytes are small next to decoded pixels, so caching whole shards raw lets
    consecutive units (which draw from the same real shards) skip the tar read, while
    decoding only the sources a unit actually needs.
    """

    def __init__(self, max_shards: int) -> None:
        self.max_shards = max_shards
        self._shards: OrderedDict[str, dict[str, dict[str, Any]]] = OrderedDict()

    def _records(self, shard: str) -> dict[str, dict[str, Any]]:
        if shard in self._shards:
            self._shards.move_to_end(shard)
        else:
            self._shards[shard] = {r["__key__"]: r for r in iter_records(shard)}
            while len(self._shards) > self.max_shards:
                self._shards.popitem(last=False)
        return self._shards[shard]

    def get(self, items: Sequence[WorkItem]) -> dict[str, Sample]:
        out: dict[str, Sample] = {}
        for item in items:
            if item.source_id in out:
                continue
            record = self._records(item.source_shard).get(item.source_id)
            if record is None:
                raise BadInputError(item.source_shard, f"does not hold source {item.source_id!r} listed in the real manifest")
            out[item.source_id] = decode_sample(record, with_mask=False)
        return out


def fit_sources(sources: dict[str, Sample], size: int | None, resize: str) -> dict[str, Sample]:
    """Sources fitted to ``size`` (square) exactly as the trainer fits its inputs; as-is when None."""
    if size is None:
        return sources
    from engine.data.geometry import fit_to

    out = {}
    for sid, src in sources.items():
        image, scribble = fit_to(src.image, src.scribble, size, resize)
        out[sid] = Sample(src.key, image, scribble, None, src.meta)
    return out


def fit_colour_hints(sources: dict[str, Sample], size: int | None, resize: str) -> dict[str, np.ndarray] | None:
    """The sources' colour hints rendered at their own size and fitted bicubically to ``size``
    (``sampler.hint_resize: cubic``, the paper's); None when sampling at the sources' size,
    where that is the rendering of the scribble itself."""
    if size is None:
        return None
    from engine.data.geometry import fit_colour_hint

    return {sid: fit_colour_hint(src.scribble, size, resize) for sid, src in sources.items()}


def present_classes(scribble: np.ndarray) -> list[int]:
    """Class ids drawn in a uint8 scribble (255 = unlabelled left out): a crop can drop some.
    A histogram, not ``np.unique``'s sort: 4x faster at 512 px, for every source of a unit
    (in the loader thread, while the sampler runs)."""
    if scribble.dtype != np.uint8:  # not a decoded scribble: ids may be anything
        return [int(c) for c in np.unique(scribble) if c != UNLABELLED]
    counts = np.bincount(scribble.ravel(), minlength=UNLABELLED + 1)
    counts[UNLABELLED] = 0
    return np.flatnonzero(counts).tolist()


def batches(items: Sequence[WorkItem], sources: dict[str, Sample], size: int) -> list[list[WorkItem]]:
    """Consecutive batches of ``size`` items whose sources share an image size (arrays stack)."""
    by_shape: dict[tuple[int, ...], list[WorkItem]] = {}
    for item in items:
        by_shape.setdefault(sources[item.source_id].image.shape, []).append(item)
    return [group[i : i + size] for group in by_shape.values() for i in range(0, len(group), size)]


def done_future(fn: Callable[..., Any], *args: Any) -> Future:
    """``fn(*args)`` run now, its result or exception held in a finished Future, raised where
    the result is taken (work done ahead for the next unit must fail that unit, not this one)."""
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:
        future.set_exception(exc)
    return future


class WriteBehind:
    """Jobs run in order on one writer thread while the caller goes on sampling.

    At most ``depth`` jobs are queued or running (each holds a sampled batch, so memory
    stays bounded): ``submit`` waits for the oldest when full. A failed job's exception is
    raised in the caller, at a later ``submit`` or at ``drain``, and every job after it is
    skipped, so a shard missing a batch is never closed and made visible. ``depth`` 0 runs
    each job inline (a serial engine). Leaving the block waits for every job, so nothing
    writes to a shard after its caller discarded it.
    """

    def __init__(self, pool: ThreadPoolExecutor, depth: int) -> None:
        self.pool = pool
        self.depth = depth
        self._pending: deque[Future] = deque()
        self._error: BaseException | None = None

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._error is not None:
            raise RuntimeError(f"skipped: an earlier write of this shard failed ({self._error!r})")
        try:
            return fn(*args)
        except BaseException as exc:
            self._error = exc
            raise

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue ``fn(*args)``; raises the error of an earlier job when it has to wait for it."""
        if self.depth == 0:
            future: Future = Future()
            future.set_result(fn(*args))
            return future
        while len(self._pending) >= self.depth:
            self._pending.popleft().result()
        future = self.pool.submit(self._guarded, fn, *args)
        self._pending.append(future)
        return future

    def drain(self) -> None:
        """Wait for every job; raises the first failure."""
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> "WriteBehind":
        return self

    def __exit__(self, *_: Any) -> None:
        wait(self._pending)


class UnitSources(NamedTuple):
    """A unit's sources, fitted, with the class ids drawn in each: computed once, in the loader
    thread, for both the prompts (main thread) and the tags (writer thread)."""

    samples: dict[str, Sample]
    classes: dict[str, list[int]]
    seconds: float  # the read, decode and fit
    colours: dict[str, np.ndarray] | None = None  # bicubically fitted colour hints (sampler.hint_resize: cubic)


@dataclass
class _Shard:
    """One unit's shard while it is written: what its writer-thread jobs share."""

    unit: WorkUnit
    out_dir: storage.Location
    writer: ShardWriter
    sources: UnitSources
    steps: int
    started: float  # perf_counter when the unit's work began (earlier by a first batch sampled ahead)
    rows: list[dict[str, Any]] = field(default_factory=list)


class ShardGenerator:
    """One model replica; ``run(unit, next_unit)`` writes that unit's shard and manifest part.

    Pipelined so that the sampler (the accelerator) does not wait on I/O: while a unit
    samples, a loader thread reads and fits the sources of the next unit (the driver names
    it), and a writer thread writes batch b (PNG-encoded on ``num_threads - 1`` encoder
    threads when that is more than one) while batch b + 1 samples; after the
    unit's last batch the writer closes the shard and writes its part while the main thread
    samples the next unit's first batch (kept for that unit's run). Only the main thread
    calls the sampler, with the same batches as a serial run, so the bytes are the same.

    ``num_threads`` is the CPUs Ray reserved for the actor: the torch threads of a CPU
    sampler, and (all but one) the threads that PNG-encode a batch. ``first_unit`` (the driver's hint of
    the actor's first unit) starts loading its sources before the model loads.
    """

    def __init__(
        self,
        model_dir: str,
        out_dir: str,
        class_names: list[str],
        sampler_cfg: SamplerConfig,
        device: str = "cpu",
        image_format: str = "png",
        source_cache_shards: int = 4,
        num_threads: int | None = None,
        factory: SamplerFactory = load_sampler,
        write_ahead: int = 2,
        first_unit: WorkUnit | None = None,
    ) -> None:
        self.out_dir = storage.as_location(out_dir)
        self.class_names = class_names
        self.batch_size = sampler_cfg.batch_size
        self.resolution = sampler_cfg.resolution
        self.resize = sampler_cfg.resize
        self.hint_resize = sampler_cfg.hint_resize
        self.scheduler = sampler_cfg.scheduler  # a tag of every sample, beside its steps
        self.image_format = image_format
        self.write_ahead = write_ahead  # batches queued for the writer thread (0: write inline)
        self.cache = SourceCache(source_cache_shards)  # used by the loader thread only
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="source-loader")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        # The actor's spare CPUs encode a batch's images in parallel (PIL releases the GIL): the
        # last batch's encoding is the one write that nothing else overlaps. One CPU stays with
        # the sampler's own thread (a GPU sampler's host thread launches its kernels): more
        # encoders than that slowed a GIL-holding stand-in sampler (docs/performance.md).
        # A unit with no next one to sample ahead (an actor's last) leaves the sampler's CPU
        # free too: its last batch encodes on one thread more, at least two.
        encoders = (num_threads or 1) - 1
        self._encoders = ThreadPoolExecutor(encoders, thread_name_prefix="png-encoder") if encoders > 1 else None
        self._tail_encoders = ThreadPoolExecutor(max(2, encoders + 1), thread_name_prefix="png-tail-encoder")
        self._next: tuple[WorkUnit, Future] | None = None  # the next unit and its sources, loading
        self._ahead: tuple[WorkUnit, Future] | None = None  # the next unit and its first batch, sampled
        self.load_error: BadInputError | None = None
        if first_unit is not None:  # its sources load while the model loads (and compiles)
            self.prefetch(first_unit)
        try:
            self.sampler = factory(model_dir, device, sampler_cfg)
        except BadInputError as exc:  # Ray passes only the text of an __init__ error: pid() raises it whole
            self.load_error = exc
            return
        if num_threads is not None and device == "cpu" and "torch" in sys.modules:  # a torch sampler: pin its threads
            sys.modules["torch"].set_num_threads(num_threads)

    def pid(self) -> int:
        """The actor's process id (the fault-injection test kills it); raises a model-loading error."""
        if self.load_error is not None:
            raise self.load_error
        return os.getpid()

    def prefetch(self, unit: WorkUnit) -> None:
        """Start reading and fitting ``unit``'s sources in the loader thread (one unit ahead)."""
        self._next = (unit, self._loader.submit(self._load, unit))

    def _load(self, unit: WorkUnit) -> UnitSources:
        t0 = time.perf_counter()
        raw = self.cache.get(unit.items)
        samples = fit_sources(raw, self.resolution, self.resize)
        colours = fit_colour_hints(raw, self.resolution, self.resize) if self.hint_resize == "cubic" else None
        classes = {sid: present_classes(src.scribble) for sid, src in samples.items()}
        return UnitSources(samples, classes, time.perf_counter() - t0, colours)

    def _sources(self, unit: WorkUnit) -> UnitSources:
        """The unit's fitted sources: prefetched when the driver named the unit ahead, else
        loaded now (through the loader thread too: the cache has one user)."""
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == unit:
            return ahead[1].result()
        if ahead is not None:
            ahead[1].cancel()
        return self._loader.submit(self._load, unit).result()

    def _sample(self, unit: WorkUnit, batch: list[WorkItem], sources: UnitSources) -> tuple[np.ndarray, float]:
        """One batch through the sampler, checked; and the seconds spent inside it."""
        from engine.text import names_for_ids

        src = [sources.samples[item.source_id] for item in batch]
        images = np.stack([s.image for s in src])
        scribbles = np.stack([s.scribble for s in src])
        names = [names_for_ids(sources.classes[item.source_id], self.class_names)  # as the trainer prompts
                 for item in batch]
        colours = None if sources.colours is None else np.stack([sources.colours[item.source_id] for item in batch])
        t0 = time.perf_counter()
        out = np.asarray(self.sampler.sample(images, scribbles, names, unit.w, unit.lam, [item.seed for item in batch],
                                             colours))
        seconds = time.perf_counter() - t0
        if out.shape != images.shape or out.dtype != np.uint8:
            raise RuntimeError(f"sampler returned {out.shape} {out.dtype}, expected {images.shape} uint8")
        return out, seconds

    def _sample_ahead(self, unit: WorkUnit) -> None:
        """Sample ``unit``'s first batch now, while the writer finishes the current shard; the
        unit's run takes it. Skipped when its sources failed to load (its run raises that)."""
        loading = self._next
        if loading is None or loading[0] != unit or loading[1].exception() is not None:
            return
        sources = loading[1].result()
        first = batches(unit.items, sources.samples, self.batch_size)[0]
        self._ahead = (unit, done_future(self._sample, unit, first, sources))

    def _sampled_ahead(self, unit: WorkUnit) -> tuple[np.ndarray, float] | None:
        """``unit``'s first batch if the previous run sampled it ahead (raises its error)."""
        ahead, self._ahead = self._ahead, None
        return ahead[1].result() if ahead is not None and ahead[0] == unit else None

    def _encoder_map(self, sampler_idle: bool) -> Callable[..., Any]:
        """How a batch's images are encoded: on the tail encoders when the sampler has nothing
        left to do, else on the encoder threads, else in the writer thread itself."""
        if sampler_idle:
            return self._tail_encoders.map
        return self._encoders.map if self._encoders is not None else map

    def _write(self, shard: _Shard, batch: list[WorkItem], images: np.ndarray, timings: dict[str, float],
               map_fn: Callable[..., Any] = map) -> None:
        """Tag, encode (with ``map_fn``) and write one sampled batch (writer thread); its manifest
        rows go to ``shard.rows``."""
        samples = []
        for item, image in zip(batch, images):
            src = shard.sources.samples[item.source_id]
            meta = {
                "source_id": item.source_id,
                "split": "train",
                "w": shard.unit.w,
                "lambda": shard.unit.lam,
                "seed": item.seed,
                "classes": shard.sources.classes[item.source_id],
                "model": self.sampler.model_id,
                "steps": shard.steps,
                "scheduler": self.scheduler,
                "seconds": timings["batch_seconds"] / len(batch),
                "timings": timings,
            }
            samples.append(Sample(item.key, image, src.scribble, None, meta))
        shard.writer.write_many(samples, map_fn)
        shard.rows.extend(sample_row(sample) for sample in samples)

    def _finish(self, shard: _Shard, sample_seconds: float) -> ShardResult:
        """Make the shard visible whole, then write its part (writer thread, after every batch):
        a shard without a part is unfinished work that resume redoes."""
        info = shard.writer.close()
        unit = shard.unit
        result = ShardResult(unit.index, unit.shard, len(shard.rows), unit.w, unit.lam, shard.steps,
                             time.perf_counter() - shard.started, sample_seconds, os.getpid())
        part_info = DatasetInfo(self.class_names, "synthetic", {"shard_stats": result.stats()})
        write_manifest(shard_rows(shard.rows, info, shard.out_dir), part_path(shard.out_dir, unit.shard), part_info)
        return result

    def run(self, unit: WorkUnit, next_unit: WorkUnit | None = None) -> ShardResult:
        """Write ``unit``'s shard and part. ``next_unit`` is the driver's hint of this actor's
        next unit: its sources load while this unit samples, and its first batch samples
        while this shard is finished. A wrong hint costs that work, never correctness."""
        t0 = time.perf_counter()
        out_dir = storage.as_location(unit.out_dir) if unit.out_dir else self.out_dir
        sources = self._sources(unit)
        if next_unit is not None:
            self.prefetch(next_unit)
        ahead = self._sampled_ahead(unit)
        sample_s = 0.0
        with ShardWriter(storage.join(out_dir, unit.shard), self.image_format) as writer, \
                WriteBehind(self._writer, self.write_ahead) as queue:
            shard = _Shard(unit, out_dir, writer, sources, self.sampler.steps_for(unit.lam), t0 - (ahead[1] if ahead else 0.0))
            todo = batches(unit.items, sources.samples, self.batch_size)
            for k, batch in enumerate(todo):
                images, dt = ahead if k == 0 and ahead is not None else self._sample(unit, batch, sources)
                sample_s += dt
                queue.submit(self._write, shard, batch, images,
                             {"batch_seconds": dt, "batch_size": len(batch), "source_load_seconds": sources.seconds},
                             self._encoder_map(sampler_idle=next_unit is None and k == len(todo) - 1))
            finished = queue.submit(self._finish, shard, sample_s)
            if next_unit is not None:
                self._sample_ahead(next_unit)
            queue.drain()
        return finished.result()
