"""The shard format shared by ``engine`` (writer) and ``seg`` (reader).

A shard is a WebDataset tar ``{prefix}-{index:06d}.tar``. Members per key: the RGB image
(``png`` or ``jpg``), ``scribble.png`` (class id per pixel, 255 = unlabelled), optional
``mask.png`` (full mask, evaluation only) and ``json`` (tags: source_id, w, lambda, seed,
split, classes, model, steps, timings).

Keys contain no dots: WebDataset splits a member name into key and extension at the
first dot, so ``{source_id}.w2.0...`` would be read back as key ``{source_id}``. We use
``{source_id}__w2p00__l0p50__s7`` instead (same information, stable, dot-free), and keys
are restricted to ``[A-Za-z0-9_-]`` so that no key can name a path outside its shard.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from engine import storage
from engine.data.imageio import decode_image, encode_image, encode_png
from engine.errors import BadInputError

UNLABELLED = 255
KEY_RE = re.compile(r"^[A-Za-z0-9_\-]{1,200}$")
SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{6})\.tar$")
IMAGE_EXTS = ("png", "jpg")


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe WebDataset key, else raise naming it."""
    if not KEY_RE.match(key):
        raise BadInputError(
            f"sample key {key!r}",
            "keys may only use letters, digits, '_' and '-' (no dots, slashes or spaces)",
            "rename the source id",
        )
    return key


def _num(x: float) -> str:
    return f"{x:.2f}".replace(".", "p").replace("-", "m")


def synthetic_key(source_id: str, w: float, lam: float, seed: int) -> str:
    """Stable key of one synthetic sample, unique per (source, w, λ, seed)."""
    return check_key(f"{source_id}__w{_num(w)}__l{_num(lam)}__s{seed}")


def shard_name(prefix: str, index: int) -> str:
    """File name of shard ``index``: ``{prefix}-{index:06d}.tar``."""
    return f"{prefix}-{index:06d}.tar"


@dataclass
class Sample:
    """One training/evaluation sample, in memory.

    ``meta`` holds the ``json`` member's tags; ``image`` is HxWx3 uint8, ``scribble`` and
    ``mask`` are HxW uint8 class-id maps (255 = unlabelled / void).
    """

    key: str
    image: np.ndarray
    scribble: np.ndarray
    mask: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def lam(self) -> float:
        return float(self.meta.get("lambda", 0.0))


def encode_sample(sample: Sample, image_format: str = "png") -> dict[str, Any]:
    """The WebDataset dict (member name -> bytes) for one sample."""
    check_key(sample.key)
    h, w = sample.scribble.shape
    if sample.image.shape[:2] != (h, w):
        raise BadInputError(
            f"sample {sample.key}",
            f"image is {sample.image.shape[1]}x{sample.image.shape[0]} but scribble is {w}x{h}",
        )
    record: dict[str, Any] = {
        "__key__": sample.key,
        image_format: encode_image(sample.image, image_format),
        "scribble.png": encode_png(sample.scribble),
        "json": json.dumps(sample.meta, sort_keys=True).encode(),
    }
    if sample.mask is not None:
        record["mask.png"] = encode_png(sample.mask)
    return record


def missing_members(record: dict[str, Any]) -> list[str]:
    """Required members a raw record lacks: ``image`` (png or jpg), ``scribble.png``, ``json``."""
    present = {"image": any(e in record for e in IMAGE_EXTS), "scribble.png": "scribble.png" in record, "json": "json" in record}
    return [name for name, ok in present.items() if not ok]


def decode_sample(record: dict[str, Any], with_mask: bool = True) -> Sample:
    """Inverse of :func:`encode_sample` for a raw WebDataset record (bytes values)."""
    key = record["__key__"]
    where = f"{record.get('__url__', 'shard')}:{key}"
    missing = missing_members(record)
    if missing:
        raise BadInputError(where, f"sample is missing member(s) {missing}", "the shard is incomplete; re-create it")
    image_bytes = next(record[e] for e in IMAGE_EXTS if e in record)
    try:
        image = decode_image(image_bytes, "RGB")
        scribble = decode_image(record["scribble.png"], "L")
        mask = decode_image(record["mask.png"], "L") if with_mask and "mask.png" in record else None
        meta = json.loads(record["json"])
    except (OSError, ValueError) as exc:
        raise BadInputError(where, f"cannot decode sample: {exc}") from None
    return Sample(key=key, image=image, scribble=scribble, mask=mask, meta=meta)


def open_shard(location: storage.Location) -> IO[bytes]:
    """A shard's bytes from a local path or a URL (seg streams through this)."""
    return storage.open_read(location)


def sha256_file(path: storage.Location, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open_shard(path) as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class ShardInfo:
    """What the manifest records per shard once it is complete on disk."""

    path: storage.Location
    keys: list[str]
    num_bytes: int
    sha256: str
    seconds: float


class _HashingFile:
    """A write-only binary file that hashes what passes through it: the shard's SHA-256 is
    known when the tar is closed, without reading the file back."""

    def __init__(self, fh: Any) -> None:
        self._fh, self.sha256 = fh, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self._fh.write(data)

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class ShardWriter:
    """Write exactly one shard atomically: a local temp file, visible at ``path`` only when whole.

    On a filesystem the temp file is ``<name>.tmp`` beside the shard, fsynced and renamed on
    close; for a URL it is staged on local disk and put as one whole object on close
    (``engine.storage.AtomicOutput``). A visible ``.tar`` is therefore always whole; a crash
    leaves only a ``.tmp`` that resume deletes. Used as a context manager; an exception
    discards the temp file. The checksum is computed while writing (no second pass).
    """

    def __init__(self, path: storage.Location, image_format: str = "png") -> None:
        import webdataset as wds

        self.path = storage.as_location(path)
        self.image_format = image_format
        storage.makedirs(storage.parent(path))
        self._out = storage.AtomicOutput(path, fsync=True)
        self.tmp = self._out.tmp  # streamed into, made visible on close
        self._fh = _HashingFile(open(self.tmp, "wb"))
        self._tar = wds.TarWriter(self._fh, encoder=False, mtime=0.0)
        self.keys: list[str] = []
        self._seen: set[str] = set()
        self._t0 = time.perf_counter()

    def write(self, sample: Sample) -> None:
        self.write_many([sample])

    def write_many(self, samples: Sequence[Sample], map_fn: Callable[..., Iterable[dict[str, Any]]] = map) -> None:
        """Encode ``samples`` with ``map_fn`` (a thread pool's ``map`` encodes them in parallel:
        PIL releases the GIL while compressing) and append them in order, so the bytes are
        those of a serial write."""
        for sample in samples:
            if sample.key in self._seen:
                raise BadInputError(f"sample key {sample.key}", "written twice to the same shard")
            self._seen.add(sample.key)
        for sample, record in zip(samples, map_fn(encode_sample, samples, [self.image_format] * len(samples))):
            self._tar.write(record)
            self.keys.append(sample.key)

    def close(self) -> ShardInfo:
        """Finish the tar and make it visible whole; return its checksum and size."""
        self._tar.close()  # also closes the file object
        num_bytes = self.tmp.stat().st_size
        self._out.commit()
        return ShardInfo(
            path=self.path,
            keys=list(self.keys),
            num_bytes=num_bytes,
            sha256=self._fh.sha256.hexdigest(),
            seconds=time.perf_counter() - self._t0,
        )

    def abort(self) -> None:
        try:
            self._tar.close()
        finally:
            self._out.discard()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()


def iter_records(path: storage.Location) -> Iterator[dict[str, Any]]:
    """Raw WebDataset records (member name -> bytes) of one shard (path or URL), in order.

    Uses webdataset's own tar grouping, so the engine reads exactly what ``seg``'s
    streaming pipeline reads. A truncated or non-tar file raises naming the shard.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    path = str(path)
    try:
        with open_shard(path) as stream:
            yield from group_by_keys(tar_file_expander([{"stream": stream, "url": path}]))
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise BadInputError(path, f"not a readable tar shard: {exc}", "delete it and re-run to rewrite it") from None


def read_shard(path: storage.Location, with_mask: bool = True) -> Iterator[Sample]:
    """Decoded samples of one shard (path or URL)."""
    for record in iter_records(path):
        yield decode_sample(record, with_mask=with_mask)
