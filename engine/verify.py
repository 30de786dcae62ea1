"""Check a manifest against its shards: ``python -m engine.verify MANIFEST``.

Checks: every listed shard exists with the recorded byte size and SHA-256, holds
exactly the keys the manifest lists for it (no missing, no extra, no duplicates), each
with its image, ``scribble.png`` and ``json`` members (a shard written incomplete has a
matching checksum), and no ``.tar`` in the manifest's folder is left out of the manifest. Exit status 0 when the
manifest verifies, 1 otherwise; every problem is printed naming the file. The manifest and
its shards may be local or at a URL (``s3://``, ``gs://``, ``file://``; ``engine.storage``).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass, field

from engine import storage
from engine.errors import BadInputError
from engine.manifest import read_manifest, resolve_shard
from engine.shards import iter_records, missing_members, sha256_file


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_manifest`: counts plus one line per problem."""

    samples: int = 0
    skipped: int = 0
    shards: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_manifest(path: storage.Location, checksums: bool = True) -> VerifyReport:
    """Verify ``path``; never raises for a damaged shard, reports it instead."""
    table, _ = read_manifest(path)
    report = VerifyReport()
    rows = table.select(["key", "shard", "status", "shard_samples", "shard_bytes", "shard_sha256"]).to_pylist()
    by_shard: dict[str, list[dict]] = defaultdict(list)
    seen: set[str] = set()
    for row in rows:
        if row["status"] == "skipped":
            report.skipped += 1
            continue
        report.samples += 1
        if row["key"] in seen:
            report.problems.append(f"key {row['key']} is listed twice")
        seen.add(row["key"])
        by_shard[row["shard"]].append(row)
    report.shards = len(by_shard)
    for shard, shard_rows in sorted(by_shard.items()):
        report.problems.extend(_verify_shard(resolve_shard(path, shard), shard_rows, checksums))
    listed = {str(storage.resolve(resolve_shard(path, s))) for s in by_shard}
    for tar in storage.find_files(storage.parent(storage.resolve(path)), ".tar"):
        if str(storage.resolve(tar)) not in listed:
            report.problems.append(f"{tar}: shard on disk is not in the manifest")
    return report


def _verify_shard(shard: str, rows: list[dict], checksums: bool) -> list[str]:
    if not storage.is_file(shard):
        return [f"{shard}: shard listed in the manifest is missing"]
    expected = rows[0]
    problems = []
    if any(r["shard_samples"] != len(rows) for r in rows):
        problems.append(f"{shard}: manifest says {expected['shard_samples']} samples but lists {len(rows)}")
    size = storage.size(shard)
    if size != expected["shard_bytes"]:
        problems.append(f"{shard}: size {size} bytes, manifest says {expected['shard_bytes']}")
    if checksums and sha256_file(shard) != expected["shard_sha256"]:
        problems.append(f"{shard}: SHA-256 does not match the manifest")
    keys = []
    try:
        for record in iter_records(shard):
            keys.append(record["__key__"])
            missing = missing_members(record)
            if missing:
                problems.append(f"{shard}:{record['__key__']}: sample is missing member(s) {missing}")
    except BadInputError as exc:
        return problems + [str(exc)]
    want = {r["key"] for r in rows}
    got = set(keys)
    if len(keys) != len(got):
        problems.append(f"{shard}: a key occurs more than once")
    if want - got:
        problems.append(f"{shard}: missing key(s) {sorted(want - got)[:5]}")
    if got - want:
        problems.append(f"{shard}: extra key(s) not in manifest {sorted(got - want)[:5]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", help="path of a manifest.parquet")
    parser.add_argument("--no-checksums", action="store_true", help="skip SHA-256 (sizes and keys are still checked)")
    args = parser.parse_args(argv)
    try:
        report = verify_manifest(args.manifest, checksums=not args.no_checksums)
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in report.problems:
        print(f"problem: {line}")
    status = "OK" if report.ok else f"FAILED ({len(report.problems)} problem(s))"
    print(f"{args.manifest}: {report.samples} samples in {report.shards} shards, {report.skipped} skipped: {status}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
