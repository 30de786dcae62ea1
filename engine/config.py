"""YAML configs with dotted CLI overrides, turned into typed dataclasses.

Every job reads one YAML file from ``configs/`` into a dataclass tree; ``--set a.b=v``
overrides any leaf. The same object is passed to local code and to Ray actors, so a
config is the single description of a run (it is also saved beside every output).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from engine.errors import BadInputError

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]  # where a relative config path is looked for after the working directory


def find_config(path: str | Path) -> Path:
    """``path`` itself, or, when it is relative and not in the working directory, the repo's
    file of that name: the jobs run as scripts from any folder and default to ``configs/...``."""
    path = Path(path)
    if path.is_file() or path.is_absolute() or not (REPO / path).is_file():
        return path
    return REPO / path


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing or malformed file is a :class:`BadInputError`."""
    path = find_config(path)
    if not path.is_file():
        raise BadInputError(str(path), "config file not found",
                            f"pass an existing YAML file; {REPO / 'configs'} holds one folder per job")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise BadInputError(str(path), f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise BadInputError(str(path), "top level of a config must be a mapping")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise BadInputError(f"--set {item}", "override must look like key.sub=value")
        dotted, raw = item.split("=", 1)
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise BadInputError(f"--set {item}", f"'{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _float(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise BadInputError(f"{where}={text!r}", "expected a number") from None


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys are an error naming the key."""
    if not isinstance(data, dict):
        raise BadInputError(where, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise BadInputError(where, f"unknown key(s) {unknown}", f"known keys: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        candidates = typing.get_args(tp) if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else (tp,)
        sub = next((c for c in candidates if _is_dataclass_type(c)), None)
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value, f"{where}.{name}")
        elif float in candidates and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif float in candidates and isinstance(value, str):
            value = _float(value, f"{where}.{name}")  # PyYAML reads 1e-3 (no dot) as a string
        elif typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-dict form of a config (for saving beside outputs and shipping to Ray)."""
    return dataclasses.asdict(obj)


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Load ``path`` (or defaults when ``None``), apply overrides, validate, return ``cls``."""
    data = load_yaml(path) if path else {}
    apply_overrides(data, overrides or [])
    return from_dict(cls, data, str(path or "config"))


def add_config_args(parser: argparse.ArgumentParser, default: str | None) -> None:
    """The two flags every job shares: ``--config FILE`` and repeatable ``--set key=value``."""
    parser.add_argument("--config", default=default, help=f"YAML config file (default: {default})")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, dotted path, YAML value; repeatable (e.g. --set train.steps=200)",
    )


def save_config(obj: Any, path: str | Path) -> None:
    """Write the resolved config as YAML next to a run's outputs."""
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
