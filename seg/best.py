"""The ``best_k`` scheme's selection: each source's k best synthetic samples, from a dictionary.

The paper (``--aug-scheme best --aug-best-dict FILE``, rloss ``pascal.py``) reads a JSON
file that ranks, for every source image, its synthetic versions best first, and trains on
the first ``--aug-ratio`` of them. Here the file maps a source id to its synthetic sample
keys, best first (``{"2007_000032": ["2007_000032__w2p00__l1p00__s5a1f", ...]}``), or to
scores from which the k highest are taken (``{"2007_000032": {"<key>": 0.91, ...}}``).
Every source with synthetic samples in the manifests needs k listed keys that the
manifests hold, as the paper needs an entry for every image of its split; anything else is
refused before training, naming the source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from engine.errors import BadInputError
from engine.manifest import read_manifest
from seg.schemes import lam_key


def ranked(source: str, entry: Any, where: str) -> list[str]:
    """A source's keys best first, from a list (already ranked) or a key -> score mapping
    (highest score first; ties in key order, so the pick is fixed)."""
    if isinstance(entry, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in entry.values()):
        return [key for key, _ in sorted(entry.items(), key=lambda kv: (-kv[1], kv[0]))]
    if isinstance(entry, list) and all(isinstance(k, str) for k in entry):
        return list(entry)
    raise BadInputError(f"{where}: source {source!r}", "expected a list of sample keys, best first, or a mapping key -> score")


def load_best_dict(path: str | Path) -> dict[str, list[str]]:
    """Source id -> its synthetic keys, best first, read from the JSON file at ``path``."""
    where = f"scheme.best_dict={str(path)!r}"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInputError(where, "no such file", "give the JSON file ranking each source's synthetic samples") from None
    except (OSError, ValueError) as exc:
        raise BadInputError(where, f"not a readable JSON file: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise BadInputError(where, "expected a non-empty JSON object: source id -> its sample keys, best first")
    return {source: ranked(source, entry, where) for source, entry in data.items()}


def synthetic_keys_by_source(manifests: Sequence[str | Path], train_split: str) -> dict[str, set[str]]:
    """Source id -> the keys of its usable synthetic train samples (status ok, λ > 0) in the manifests."""
    out: dict[str, set[str]] = {}
    for path in manifests:
        table, _ = read_manifest(path)
        cols = table.select(["key", "source_id", "split", "lambda", "status"]).to_pydict()
        for key, source, split, lam, status in zip(*cols.values()):
            if status == "ok" and split == train_split and lam_key(lam or 0.0) > 0.0:
                out.setdefault(source, set()).add(key)
    return out


def select_best(best: dict[str, list[str]], k: int, available: dict[str, set[str]], where: str) -> set[str]:
    """The keys of each available source's ``k`` best samples; refuses a source the
    dictionary misses, ranks fewer than ``k`` samples of, or ranks a key the manifests lack."""
    chosen: set[str] = set()
    for source, keys in sorted(available.items()):
        top = best.get(source)
        if top is None:
            raise BadInputError(f"{where}: source {source!r}", "has synthetic samples but no entry in the dictionary",
                                "rank the samples of every source the manifests hold")
        if len(top) < k:
            raise BadInputError(f"{where}: source {source!r}", f"ranks {len(top)} sample(s), fewer than scheme.best_k={k}")
        missing = [key for key in top[:k] if key not in keys]
        if missing:
            raise BadInputError(f"{where}: source {source!r}", f"ranks {missing[0]!r}, which no given manifest holds "
                                "as a synthetic train sample of this source")
        chosen.update(top[:k])
    return chosen


def best_keys(path: str | Path, k: int, manifests: Sequence[str | Path], train_split: str) -> set[str]:
    """The synthetic keys the ``best_k`` scheme trains on (see the module doc)."""
    return select_best(load_best_dict(path), k, synthetic_keys_by_source(manifests, train_split), f"scheme.best_dict={str(path)!r}")
