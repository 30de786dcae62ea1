"""What a set holds, without a script: ``python -m jobs.show MANIFEST``.

Prints the samples per (w, λ, split) (real sets have w = λ = 0), the skipped ones, and the
ranges of the other tags (seeds, image sizes, sampler steps, models, classes, generation
time), then writes a contact sheet: for each (split, w, λ) group a few samples, one per
source first (:func:`pick`; wrapped at ``--columns`` tiles a row), each with its scribble over it as the report draws it
(:func:`engine.render.overlay_scribble`, :class:`engine.plots.TileGrid`). Only the shards
that hold those samples are read. The manifest may be a local path or a URL.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from engine import storage
from engine.errors import BadInputError
from engine.manifest import iter_samples, read_manifest
from engine.plots import TileGrid, fmt_g
from engine.render import overlay_scribble

Group = tuple[str, float, float]  # (split, w, λ)
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
LABEL_IN = 1.3  # room on the left of the sheet for a group's label
TITLE_IN = 0.16  # room above each tile for its source id


@dataclass
class SetSummary:
    """Counts and tag ranges of one manifest's samples."""

    kind: str
    class_names: list[str]
    counts: dict[Group, int]  # ok samples per (split, w, λ)
    skipped: int
    ranges: dict[str, str]  # tag -> its range or values, as text
    class_counts: dict[int, int]  # class id -> samples whose tags list it


def group_order(group: Group) -> tuple[int, str, float, float]:
    return SPLIT_ORDER.get(group[0], len(SPLIT_ORDER)), group[0], group[1], group[2]


def _span(values: list[Any]) -> str:
    lo, hi = min(values), max(values)
    text = str if isinstance(lo, int) else fmt_g
    return text(lo) if lo == hi else f"{text(lo)} … {text(hi)}"


def summarize(manifest: storage.Location) -> tuple[SetSummary, list[dict[str, Any]]]:
    """The summary of ``manifest`` and its ok rows (manifest order)."""
    table, info = read_manifest(manifest)
    rows = table.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        raise BadInputError(str(manifest), f"holds no usable sample ({len(rows)} row(s), all skipped)")
    counts = Counter((r["split"], r["w"], r["lambda"]) for r in ok)
    ranges = {
        "seed": _span([r["seed"] for r in ok]),
        "height x width": ", ".join(f"{h}x{w}" for h, w in sorted({(r["height"], r["width"]) for r in ok})),
        "sampler steps": _span([r["steps"] for r in ok]),
        "model": ", ".join(sorted({r["model"] or "–" for r in ok})),
        "sources": str(len({r["source_id"] for r in ok})),
    }
    seconds = [r["seconds"] for r in ok if r["seconds"]]
    if seconds:
        ranges["seconds per image"] = f"{_span([round(s, 3) for s in seconds])} (mean {sum(seconds) / len(seconds):.3f})"
    classes = Counter(c for r in ok for c in r["classes"])
    summary = SetSummary(info.kind, info.class_names, dict(sorted(counts.items(), key=lambda kv: group_order(kv[0]))),
                         len(rows) - len(ok), ranges, dict(sorted(classes.items())))
    return summary, ok


def summary_text(manifest: storage.Location, s: SetSummary) -> str:
    """The summary as a person reads it in a terminal."""
    lines = [f"{manifest}: {s.kind} set, {sum(s.counts.values())} samples, {s.skipped} skipped", "",
             f"{'split':<6} {'w':>6} {'λ':>6} {'samples':>8}"]
    lines += [f"{split:<6} {fmt_g(w):>6} {fmt_g(lam):>6} {n:>8}" for (split, w, lam), n in s.counts.items()]
    lines += [""] + [f"{tag}: {value}" for tag, value in s.ranges.items()]
    names = s.class_names
    per_class = ", ".join(f"{names[c] if 0 <= c < len(names) else c} {n}" for c, n in s.class_counts.items())
    lines.append(f"samples per class: {per_class or '–'}")
    return "\n".join(lines)


def pick(rows: list[dict[str, Any]], per_group: int, max_groups: int) -> dict[Group, list[dict[str, Any]]]:
    """``per_group`` rows of each of the first ``max_groups`` groups (in :func:`group_order`):
    one per source first, in manifest order, then second ones (a generated set lists a source's
    samples together; a sheet of one source's 16 images would show one scene)."""
    groups: dict[Group, list[tuple[int, int, dict[str, Any]]]] = defaultdict(list)
    seen: Counter[tuple[Group, str]] = Counter()
    for i, r in enumerate(rows):
        group = (r["split"], r["w"], r["lambda"])
        groups[group].append((seen[group, r["source_id"]], i, r))
        seen[group, r["source_id"]] += 1
    chosen = sorted(groups, key=group_order)[:max_groups]
    return {g: [r for *_, r in sorted(groups[g], key=lambda t: t[:2])[:per_group]] for g in chosen}


def contact_sheet(manifest: storage.Location, rows: list[dict[str, Any]], path: Path, per_group: int = 8,
                  max_groups: int = 8, columns: int = 8) -> Path:
    """Write the contact sheet PNG of ``rows`` (ok rows of ``manifest``) to ``path``: each
    group's samples fill rows of ``columns`` tiles, labelled on their first row."""
    chosen = pick(rows, per_group, max_groups)
    keys = {r["key"] for group in chosen.values() for r in group}
    samples = {s.key: s for _, s in iter_samples(manifest, lambda r: r["key"] in keys, with_mask=False)}
    width = min(columns, max(len(g) for g in chosen.values()))
    lines = [(group, group_rows[i:i + width], i == 0) for group, group_rows in chosen.items()
             for i in range(0, len(group_rows), width)]
    grid = TileGrid(len(lines), width, LABEL_IN, TITLE_IN)
    for r, ((split, w, lam), line, first) in enumerate(lines):
        if first:
            grid.row_label(r, f"{split}\nw = {fmt_g(w)}, λ = {fmt_g(lam)}", fontsize=9)
        for c, row in enumerate(line):
            sample = samples[row["key"]]
            grid.show(r, c, overlay_scribble(sample.image, sample.scribble), row["source_id"][-18:], fontsize=7)
    grid.title(f"{storage.name(storage.parent(manifest)) or manifest}: {per_group} samples per (split, w, λ), one per source first")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.show",
        description="Say what a set holds: samples per (w, λ, split), the tags' ranges, and a contact sheet PNG "
                    "(a grid of samples with their scribbles over them).",
        epilog="example: python -m jobs.show runs/demo/synthetic/w2p00-l1p00/manifest.parquet --sheet sheet.png",
    )
    parser.add_argument("manifest", help="a manifest.parquet (path or URL) from ingest or generate")
    parser.add_argument("--sheet", default="contact_sheet.png", help="where to write the contact sheet PNG (default: %(default)s)")
    parser.add_argument("--per-group", type=int, default=8, help="samples per (split, w, λ) row (default: %(default)s)")
    parser.add_argument("--groups", type=int, default=8, help="at most this many (split, w, λ) groups (default: %(default)s)")
    parser.add_argument("--columns", type=int, default=8, help="tiles per row; a larger group wraps (default: %(default)s)")
    parser.add_argument("--no-sheet", action="store_true", help="print the summary only")
    args = parser.parse_args(argv)
    try:
        if min(args.per_group, args.groups, args.columns) < 1:
            raise BadInputError("--per-group/--groups/--columns", "must be >= 1")
        summary, rows = summarize(args.manifest)
        print(summary_text(args.manifest, summary))
        if not args.no_sheet:
            print(f"contact sheet: {contact_sheet(args.manifest, rows, Path(args.sheet), args.per_group, args.groups, args.columns)}")
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
