"""Is this output reusable? One rule: its recorded identity equals the one we would make.

Every stage that writes an output folder (ingest, ControlNet training, a generation, a
segmentation run) and every cached score (FID, judge) records an :class:`Identity`: the
config that decides the result (keys that only change *how* a job runs left out) and a
content digest of every input (manifests, model weights). A rerun computes the identity
it would record and compares:

- no record: nothing to compare with; the stage records its identity and proceeds;
- equal: the output (finished, or resumable from its checkpoints) is reused;
- different: :meth:`Identity.differences` names the config keys and inputs that changed,
  and the caller refuses (an expensive output: the user decides) or redoes the work (a
  cached score).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine import storage
from engine.atomic import write_json
from engine.errors import BadInputError

IDENTITY_FILE = "identity.json"


def plain(data: Any) -> Any:
    """``data`` as plain YAML-able values (tuples -> lists), so saved and fresh compare equal."""
    return yaml.safe_load(yaml.safe_dump(data))


def drop_keys(config: dict[str, Any], dotted: set[str]) -> dict[str, Any]:
    """A copy of ``config`` without the ``dotted`` keys (``train.device`` ...)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key in dotted:
            continue
        inner = {d.split(".", 1)[1] for d in dotted if d.startswith(key + ".")}
        out[key] = drop_keys(value, inner) if isinstance(value, dict) and inner else value
    return out


_MISSING = object()


def _get(config: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return _MISSING
        config = config[part]
    return config


def drop_defaults(config: dict[str, Any], defaults: dict[str, Any], dotted: set[str]) -> dict[str, Any]:
    """A copy of ``config`` without those ``dotted`` keys whose value equals ``defaults``'.

    For keys added to a config after runs were recorded with it: at the default (the old
    behaviour) they leave those runs' identities unchanged; any other value changes them.
    """
    return drop_keys(config, {d for d in dotted if _get(config, d) is not _MISSING and _get(config, d) == _get(defaults, d)})


def file_digest(path: storage.Location) -> str:
    """SHA-256 of a file's bytes (first 16 hex digits): the identity of a manifest (a path or URL)."""
    h = hashlib.sha256()
    with storage.open_read(path) as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:16]


def _dotted_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b)) for k in _dotted_diff(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


@dataclass
class Identity:
    """What decides an output: its ``config`` (plain data) and its ``inputs`` (name -> digest)."""

    config: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.config = plain(self.config)

    @property
    def digest(self) -> str:
        """One short hash of the whole identity (for per-entry records such as score caches)."""
        text = json.dumps({"config": self.config, "inputs": self.inputs}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def differences(self, recorded: "Identity") -> list[str]:
        """Config keys (dotted) and ``input:<name>`` entries in which ``recorded`` differs."""
        keys = _dotted_diff(recorded.config, self.config)
        names = sorted(n for n in set(recorded.inputs) | set(self.inputs) if recorded.inputs.get(n) != self.inputs.get(n))
        return keys + [f"input:{n}" for n in names]

    def save(self, folder: str | Path) -> None:
        storage.makedirs(folder)  # folder: a path or URL (engine.storage)
        write_json(storage.join(folder, IDENTITY_FILE), {"config": self.config, "inputs": self.inputs, "digest": self.digest})

    @classmethod
    def load(cls, folder: str | Path) -> "Identity | None":
        """The identity recorded in ``folder``, or None when there is none."""
        path = storage.join(folder, IDENTITY_FILE)
        if not storage.is_file(path):
            return None
        data = json.loads(storage.read_text(path))
        return cls(data["config"], data.get("inputs", {}))

    def check(self, folder: str | Path, what: str) -> bool:
        """Refuse a ``folder`` recorded with another identity, naming what changed. True when
        its record equals this identity, False when it has none."""
        recorded = Identity.load(folder)
        if recorded is None:
            return False
        diff = self.differences(recorded)
        if diff:
            raise BadInputError(str(folder), f"holds a {what} made from a different config or input "
                                f"(differs in {', '.join(diff[:6])})", "use another output folder, or delete this one to redo it")
        return True

    def claim(self, folder: str | Path, what: str) -> bool:
        """:meth:`check`, then record this identity; True when a matching record was there."""
        same = self.check(folder, what)
        if not same:
            self.save(folder)
        return same
