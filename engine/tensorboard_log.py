"""TensorBoard event files beside a trainer's jsonl log, to watch a run while it trains.

Every trainer (base pretraining, ControlNet, seg, seg's backbone pretraining) keeps its
record in a jsonl file (``loss.jsonl`` / ``metrics.jsonl``): that is what reports, resume
and tests read. The same records also go to event files in ``<out>/tensorboard`` so that a
person can follow the curves live (``tensorboard --logdir runs/...``). They are a view,
never an input: nothing reads them back and no stage identity includes the ``log``
section (``experiments.sweep.RUN_ONLY``). Optional twice over: ``log.tensorboard: false``
turns them off, and without the ``tensorboard`` package a run says so in one line and
trains on (``pip install -e ".[tensorboard]"``).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from engine.errors import BadInputError

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

TENSORBOARD_DIR = "tensorboard"  # inside a run's out folder
INSTALL_HINT = 'pip install -e ".[tensorboard]"'


@dataclass
class LogConfig:
    """What a run shows besides its jsonl log; run-only (it never changes what is computed)."""

    tensorboard: bool = True  # event files in <out>/tensorboard, when the tensorboard package is installed

    def validate(self) -> None:
        if not isinstance(self.tensorboard, bool):
            raise BadInputError(f"log.tensorboard={self.tensorboard!r}", "must be true or false")


@contextmanager
def tensorboard_writer(cfg: LogConfig, out: str | Path, start_step: int = 0,
                       enabled: bool = True) -> Iterator[SummaryWriter | None]:
    """A ``SummaryWriter`` on ``<out>/tensorboard``, closed (flushed) on exit; None when
    ``log.tensorboard`` is off, when not ``enabled`` (a rank other than 0) or when the
    package is missing (one line on stderr says how to add it).

    ``purge_step = start_step + 1``: a run that starts at ``start_step`` (its checkpoint's;
    its jsonl keeps the lines up to that step) makes TensorBoard hide every event that an
    earlier, interrupted run wrote after it, so each step shows once after a resume.
    """
    if not (cfg.tensorboard and enabled):
        yield None
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print(f"tensorboard is not installed, so no event files in {Path(out) / TENSORBOARD_DIR} "
              f"({INSTALL_HINT} adds it; --set log.tensorboard=false hides this line)", file=sys.stderr)
        yield None
        return
    writer = SummaryWriter(str(Path(out) / TENSORBOARD_DIR), purge_step=start_step + 1, flush_secs=30)
    try:
        yield writer
    finally:
        writer.close()


def add_record(writer: SummaryWriter | None, record: Mapping[str, Any], prefix: str) -> None:
    """Write the numbers of one jsonl ``record`` as scalars ``<prefix>/<name>`` at its ``step``
    (a nested mapping's as ``<prefix>/<key>/<name>``; text, lists and booleans are left out).
    No writer: nothing to do, so every trainer calls this unconditionally."""
    if writer is None:
        return
    for name, value in _numbers(record, prefix):
        writer.add_scalar(name, value, record["step"])


def _numbers(record: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, float]]:
    for key, value in record.items():
        if isinstance(value, Mapping):
            yield from _numbers(value, f"{prefix}/{key}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            yield f"{prefix}/{key}", value
