"""The Parquet manifest: one row per sample, the index every other part reads.

Columns (docs/design.md): key, shard (path relative to the manifest's folder, or a URL),
source_id, split, w, lambda, seed, height, width, classes (ids present), model, steps,
seconds (generation time of the sample), status ("ok" or "skipped"), error (why a
sample was skipped), and per shard: shard_samples, shard_bytes, shard_sha256.
Dataset-level facts (class names, the config, the kind) go in the Parquet schema
metadata under ``scribblegen``. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from engine.atomic import atomic_path
from engine.errors import BadInputError
from engine.shards import Sample, ShardInfo

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("source_id", pa.string()),
        ("split", pa.string()),
        ("w", pa.float64()),
        ("lambda", pa.float64()),
        ("seed", pa.int64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("classes", pa.list_(pa.int32())),
        ("model", pa.string()),
        ("steps", pa.int32()),
        ("seconds", pa.float64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("shard_samples", pa.int64()),
        ("shard_bytes", pa.int64()),
        ("shard_sha256", pa.string()),
    ]
)
META_KEY = b"scribblegen"


@dataclass
class DatasetInfo:
    """Dataset-level facts stored in the manifest's schema metadata."""

    class_names: list[str]
    kind: str = "real"  # "real" or "synthetic"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps({"class_names": self.class_names, "kind": self.kind, "extra": self.extra}).encode()

    @classmethod
    def from_json(cls, raw: bytes | None) -> "DatasetInfo":
        data = json.loads(raw) if raw else {}
        return cls(class_names=data.get("class_names", []), kind=data.get("kind", "real"), extra=data.get("extra", {}))


def sample_row(sample: Sample, shard: str = "", status: str = "ok", error: str = "") -> dict[str, Any]:
    """Manifest row of one sample (shard totals are filled in by :func:`shard_rows`)."""
    m = sample.meta
    h, w = sample.scribble.shape
    return {
        "key": sample.key,
        "shard": shard,
        "source_id": str(m.get("source_id", sample.key)),
        "split": str(m.get("split", "train")),
        "w": float(m.get("w", 0.0)),
        "lambda": float(m.get("lambda", 0.0)),
        "seed": int(m.get("seed", 0)),
        "height": int(h),
        "width": int(w),
        "classes": [int(c) for c in m.get("classes", [])],
        "model": str(m.get("model", "")),
        "steps": int(m.get("steps", 0)),
        "seconds": float(m.get("seconds", 0.0)),
        "status": status,
        "error": error,
        "shard_samples": 0,
        "shard_bytes": 0,
        "shard_sha256": "",
    }


def skip_row(source_id: str, split: str, error: str) -> dict[str, Any]:
    """Row recording a bad input that ``--skip-bad`` skipped instead of stopping."""
    row = {name: None for name in SCHEMA.names}
    row.update(key=source_id, shard="", source_id=source_id, split=split, status="skipped", error=error, classes=[])
    return row


def shard_rows(rows: list[dict[str, Any]], info: ShardInfo, root: Path) -> list[dict[str, Any]]:
    """Attach a finished shard's relative path, count, size and checksum to its rows."""
    rel = os.path.relpath(info.path, root)
    for row in rows:
        row.update(shard=rel, shard_samples=len(info.keys), shard_bytes=info.num_bytes, shard_sha256=info.sha256)
    return rows


def write_manifest(rows: Iterable[dict[str, Any]], path: str | Path, info: DatasetInfo) -> Path:
    """Write rows to ``path`` atomically with the dataset info in the schema metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(list(rows), schema=SCHEMA).replace_schema_metadata({META_KEY: info.to_json()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_manifest(path: str | Path) -> tuple[pa.Table, DatasetInfo]:
    """Read a manifest; a missing or non-Parquet file raises naming it."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(str(path), "manifest not found", "pass the manifest.parquet written by ingest or generate")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise BadInputError(str(path), f"not a readable Parquet manifest: {exc}") from None
    missing = set(SCHEMA.names) - set(table.column_names)
    if missing:
        raise BadInputError(str(path), f"manifest lacks column(s) {sorted(missing)}")
    meta = (table.schema.metadata or {}).get(META_KEY)
    return table, DatasetInfo.from_json(meta)


def merge_parts(parts: Iterable[str | Path], path: str | Path, info: DatasetInfo) -> Path:
    """Merge per-shard manifest parts (written as shards finish) into one manifest."""
    tables = [pq.read_table(p).select(SCHEMA.names).cast(SCHEMA) for p in sorted(map(str, parts))]
    rows = [r for t in tables for r in t.to_pylist()]
    return write_manifest(rows, path, info)


def resolve_shard(manifest_path: str | Path, shard: str) -> str:
    """Absolute path (or URL) of a shard named in a manifest row."""
    if "://" in shard or os.path.isabs(shard):
        return shard
    return str(Path(manifest_path).resolve().parent / shard)
