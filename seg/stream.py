"""Streaming shards named by manifests, split across ranks and DataLoader workers.

The manifest is the index: it says which shard holds which key at which λ and split,
so grouping by λ, taking a low-data subset or the validation split never decodes a
sample. Only the keys of a group are kept from its shards (``group.allowed``), decoded
after a bounded shuffle buffer, so memory is independent of the dataset size.

Splitting: when a group has at least as many shards as there are readers (ranks x
workers) whole shards are dealt out (``wds.split_by_node`` / ``wds.split_by_worker`` on
the shard list); with fewer shards the same two filters deal out *samples* instead, so
every reader still gets an equal share and one pass over all readers sees every sample
exactly once. The shard order of a pass is shuffled with a seed shared by all readers,
which keeps the split a partition.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset

from engine.data.subset import draw_subset
from engine.errors import BadInputError
from engine.manifest import LABEL_SCORE, missing_shards, read_manifest, resolve_shard
from engine.shards import Sample, decode_sample, open_shard
from seg.schemes import lam_key


class StreamError(BadInputError):
    """A damaged shard met while streaming, in a form that survives DataLoader workers.

    torch re-raises a worker's exception in the main process as ``type(exc)(text)``,
    ``text`` being the worker's formatted traceback. :class:`BadInputError` needs two
    arguments, so torch would raise a bare ``RuntimeError`` and the CLI would print a
    traceback; this subclass also accepts that one text and keeps its last line, which
    is the original message (``what: problem (hint)``).
    """

    def __init__(self, what: str, problem: str = "", hint: str = "") -> None:
        if not problem:  # rebuilt by torch from a worker's traceback
            last = what.rstrip().splitlines()[-1]
            what, _, problem = last.partition(": ")[2].partition(": ")
        super().__init__(what, problem, hint)


def _bad_tar(exn: Exception) -> bool:
    """webdataset handler: an unreadable or missing shard stops the stream, naming it."""
    url = exn.args[-1] if exn.args and isinstance(exn.args[-1], str) else "shard"
    raise StreamError(url, f"not a readable tar shard: {exn.args[0] if exn.args else exn!r}",
                      "check it with `python -m engine.verify MANIFEST` and re-create it")


def _open_shards(sources: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """webdataset stage: open each shard, a local path or any fsspec URL (``s3://``, ``gs://``;
    webdataset's own opener knows neither), with errors named by :func:`_bad_tar`."""
    for source in sources:
        try:
            stream = open_shard(source["url"])
        except Exception as exn:  # _bad_tar raises it again, naming the shard
            exn.args = exn.args + (source["url"],)
            _bad_tar(exn)
        yield {**source, "stream": stream}


def _tar_samples(sources: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Raw records of the shards named in ``sources`` (``wds.tarfile_to_samples`` with our opener)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    return group_by_keys(tar_file_expander(_open_shards(sources), handler=_bad_tar), handler=_bad_tar)


@dataclass
class ShardGroup:
    """A set of samples to stream: shard URL -> keys to keep from that shard."""

    allowed: dict[str, set[str]] = field(default_factory=dict)

    @property
    def urls(self) -> list[str]:
        return sorted(self.allowed)

    def __len__(self) -> int:
        return sum(len(k) for k in self.allowed.values())

    def add(self, url: str, key: str) -> None:
        self.allowed.setdefault(url, set()).add(key)


@dataclass
class DataIndex:
    """What the manifests offer: real train samples, the val split, synthetic sets by λ
    (and the source ids those synthetic samples were generated from)."""

    class_names: list[str]
    real: ShardGroup
    val: ShardGroup
    synthetic: dict[float, ShardGroup]
    synthetic_sources: set[str] = field(default_factory=set)
    real_sources: set[str] = field(default_factory=set)  # of the real train samples kept
    # λ -> source id -> (shard URL, key) of its kept synthetic sample with the smallest key: the
    # one fixed sample the paper's 'replacement' swaps in for its source (scheme.replace_from: source)
    first_synthetic: dict[float, dict[str, tuple[str, str]]] = field(default_factory=dict)

    def add_synthetic(self, lam: float, source: str, url: str, key: str) -> None:
        self.synthetic.setdefault(lam, ShardGroup()).add(url, key)
        self.synthetic_sources.add(source)
        first = self.first_synthetic.setdefault(lam, {})
        if source not in first or key < first[source][1]:
            first[source] = (url, key)

    @property
    def lambdas(self) -> list[float]:
        return sorted(self.synthetic)


def index_manifests(
    paths: Sequence[str | Path],
    train_split: str = "train",
    val_split: str = "val",
    real_fraction: float = 1.0,
    subset_seed: int = 0,
    synthetic_per_source: int = 0,
    keep_synthetic: set[str] | None = None,
    min_label_score: float = 0.0,
) -> DataIndex:
    """Group the ``ok`` rows of all manifests into real/val/per-λ synthetic groups.

    A row with λ = 0 is real, λ > 0 synthetic. ``real_fraction`` < 1 keeps a fixed random
    subset of the real training sources (the low-data regime) and only the synthetic
    samples generated from those sources, so no label outside the subset leaks in.
    ``synthetic_per_source`` > 0 keeps at most that many synthetic samples per (source, λ):
    the ones with the smallest keys (string order). Generated keys end in a hashed seed
    (``engine.shards.synthetic_key``), so that is a fixed pseudo-random pick, and a smaller
    N keeps a subset of what a larger one keeps. ``keep_synthetic`` (when given) keeps only
    the synthetic samples with these keys (the ``best_k`` scheme's selection, :mod:`seg.best`).
    ``min_label_score`` > 0 keeps only the synthetic samples whose ``label_score`` (the
    agreement with their own scribble, :mod:`seg.label_scores`) reaches it; every manifest
    with synthetic rows must then carry that column.
    """
    if not isinstance(synthetic_per_source, int) or isinstance(synthetic_per_source, bool) or synthetic_per_source < 0:
        raise BadInputError(f"data.synthetic_per_source={synthetic_per_source!r}", "must be an integer >= 0 (0 = all)")
    if not paths:
        raise BadInputError("--shards", "no manifest given", "pass at least the real manifest.parquet")
    class_names: list[str] = []
    rows: list[tuple[str, str, str, str, float]] = []  # url, key, source_id, split, λ
    dropped = 0  # synthetic rows below min_label_score
    for path in paths:
        table, info = read_manifest(path)
        if info.class_names:
            if class_names and info.class_names != class_names:
                raise BadInputError(str(path), f"class names {info.class_names} differ from {class_names} of the other manifests")
            class_names = list(info.class_names)
        cols = table.select(["key", "shard", "source_id", "split", "lambda", "status"]).to_pydict()
        scores = _label_scores(path, table, min_label_score)
        for (key, shard, source, split, lam, status), score in zip(zip(*cols.values()), scores):
            if status != "ok":
                continue
            if lam and score is not None and score < min_label_score:  # NaN (no stroke) is kept
                dropped += 1
                continue
            rows.append((resolve_shard(path, shard), key, source, split, lam_key(lam or 0.0)))
        _check_shards_exist(path, {r[0] for r in rows})
    if not class_names:
        raise BadInputError(", ".join(map(str, paths)), "no manifest records class names", "re-create the real manifest with ingest")
    real_sources = [r[2] for r in rows if r[4] == 0.0 and r[3] == train_split]
    keep = draw_subset(real_sources, real_fraction, subset_seed) if real_fraction < 1.0 else None
    index = DataIndex(class_names=class_names, real=ShardGroup(), val=ShardGroup(), synthetic={})
    cells: dict[tuple[str, float], list[tuple[str, str]]] = {}  # (source, λ) -> (key, shard URL), with synthetic_per_source
    for url, key, source, split, lam in rows:
        if lam == 0.0 and split == val_split:
            index.val.add(url, key)
        elif split != train_split or (keep is not None and source not in keep):
            continue
        elif lam == 0.0:
            index.real.add(url, key)
            index.real_sources.add(source)
        elif keep_synthetic is not None and key not in keep_synthetic:
            continue
        elif synthetic_per_source:
            cells.setdefault((source, lam), []).append((key, url))
        else:
            index.add_synthetic(lam, source, url, key)
    for (source, lam), members in sorted(cells.items()):
        for key, url in sorted(members)[:synthetic_per_source]:
            index.add_synthetic(lam, source, url, key)
    if dropped and not index.synthetic:
        raise BadInputError(f"data.min_label_score={min_label_score}", f"drops every synthetic sample ({dropped})",
                            "lower it: the scored copy's quartiles are in the sweep's label_scores.json")
    return index


def _label_scores(path: str | Path, table, min_label_score: float) -> list[float | None]:
    """Each row's label score (None: not needed, or a real row); refuses a manifest whose
    synthetic rows were not scored when a threshold asks for the scores."""
    if not min_label_score:
        return [None] * table.num_rows
    lams = table.column("lambda").to_pylist()
    if not any(lams):
        return [None] * table.num_rows
    scores = table.column(LABEL_SCORE).to_pylist() if LABEL_SCORE in table.column_names else [None] * table.num_rows
    unscored = sum(1 for lam, v, st in zip(lams, scores, table.column("status").to_pylist()) if lam and st == "ok" and v is None)
    if unscored:
        raise BadInputError(str(path), f"data.min_label_score={min_label_score} needs the {LABEL_SCORE!r} column, and "
                            f"{unscored} synthetic sample(s) have none",
                            "score them: python -m seg.label_scores --checkpoint REAL_RUN/checkpoints/last.pt --manifest ...")
    return scores


def _check_shards_exist(manifest: str | Path, urls: set[str]) -> None:
    """Fail before training, not in a loader worker hours later, when a listed shard (local or URL) is gone."""
    missing = missing_shards(urls)
    if missing:
        raise BadInputError(missing[0], f"shard listed in {manifest} is missing ({len(missing)} missing in all)",
                            "restore it, or re-create the set; `python -m engine.verify MANIFEST` lists all problems")


def _keep(group: ShardGroup):
    def pred(record: dict[str, Any]) -> bool:
        return record["__key__"] in group.allowed.get(record["__url__"], ())

    return pred


def _decoder(with_mask: bool):
    def decode(record: dict[str, Any]) -> Sample:
        try:
            return decode_sample(record, with_mask=with_mask)
        except BadInputError as exc:
            raise StreamError(exc.what, exc.problem, exc.hint) from None

    return decode


def one_pass(
    group: ShardGroup,
    epoch: int,
    seed: int,
    shuffle_buffer: int = 256,
    with_mask: bool = False,
    split: bool = True,
) -> Iterator[Sample]:
    """One pass over ``group`` as seen by this reader (rank x DataLoader worker).

    With ``split`` the readers partition the group (see module doc); without it every
    reader streams all of it (used for training groups smaller than the reader count).
    ``shuffle_buffer`` 0 keeps shard order, for deterministic evaluation.
    """
    if not group.allowed:
        return iter(())
    rank, world, worker, workers = wds.utils.pytorch_worker_info()
    readers = world * workers
    by_shard = split and len(group.allowed) >= readers
    splitters = [wds.split_by_node, wds.split_by_worker]
    stages: list[Any] = [wds.SimpleShardList(group.urls, seed=seed * 100_003 + epoch if shuffle_buffer else None)]
    if by_shard:
        stages += splitters
    stages += [_tar_samples, wds.select(_keep(group))]
    if split and not by_shard:
        stages += splitters
    if shuffle_buffer:
        reader_seed = int(np.random.SeedSequence([seed, epoch, rank, worker]).generate_state(1)[0])
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 64), seed=reader_seed))
    stages.append(wds.map(_decoder(with_mask)))
    return iter(wds.DataPipeline(*stages))


def endless(group: ShardGroup, seed: int, shuffle_buffer: int = 256) -> Iterator[Sample]:
    """Infinite stream over ``group``, reshuffled every pass.

    Readers split the group when each gets at least one sample; a smaller group is read
    whole by every reader (sampling with repetition is harmless for training and an
    empty reader would otherwise stall the batch).
    """
    _, world, _, workers = wds.utils.pytorch_worker_info()
    split = len(group) >= world * workers
    for epoch in itertools.count():
        yielded = False
        for sample in one_pass(group, epoch, seed, shuffle_buffer, with_mask=False, split=split):
            yielded = True
            yield sample
        if not yielded:
            raise StreamError(", ".join(group.urls[:3]), "no sample of this group could be read from its shards",
                                "the manifest and shards disagree; re-create them or run `python -m engine.verify`")


def read_records(group: ShardGroup, what: str = "samples") -> Iterator[tuple[str, dict[str, Any]]]:
    """(source id, raw record) of every sample in ``group``, read whole in this process (no
    split over readers) and without decoding any image; fails when a listed sample is missing."""
    read = 0
    for record in wds.DataPipeline(wds.SimpleShardList(group.urls), _tar_samples, wds.select(_keep(group))):
        read += 1
        where = f"{record.get('__url__', 'shard')}:{record['__key__']}"
        if "scribble.png" not in record or "json" not in record:
            raise StreamError(where, "sample lacks scribble.png or json", "the shard is incomplete; re-create it")
        try:
            source = json.loads(record["json"]).get("source_id") or record["__key__"]
        except ValueError as exc:
            raise StreamError(where, f"cannot decode the json member: {exc}") from None
        yield source, record
    if read < len(group):
        raise StreamError(", ".join(group.urls[:3]), f"only {read} of the {len(group)} {what} listed were found in their shards",
                          "the manifest and shards disagree; re-create them or run `python -m engine.verify`")


def real_scribbles(group: ShardGroup) -> dict[str, bytes]:
    """Source id -> ``scribble.png`` bytes of every sample in ``group``: the mismatched-scribble
    control keeps them in memory (PNG-compressed scribbles are a few kB each)."""
    return {source: record["scribble.png"] for source, record in read_records(group, "real samples")} if group.allowed else {}


def decode_record(record: dict[str, Any]) -> Sample:
    """A raw record (:func:`read_records`) as a training :class:`Sample` (no mask), errors named as the stream names them."""
    return _decoder(False)(record)


class EpochDataset(IterableDataset):
    """One pass over a group, partitioned over ranks and workers (evaluation, tests).

    Each sample is yielded as ``(key, image, scribble, mask)`` numpy arrays so that the
    default collate is not needed; ``seg.evaluate`` pads them into batches.
    """

    def __init__(self, group: ShardGroup, with_mask: bool = True, shuffle_buffer: int = 0, seed: int = 0, epoch: int = 0) -> None:
        super().__init__()
        self.group = group
        self.with_mask = with_mask
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]:
        for s in one_pass(self.group, self.epoch, self.seed, self.shuffle_buffer, with_mask=self.with_mask):
            yield s.key, s.image, s.scribble, s.mask
