"""One writer per output folder: ``flock`` where the filesystem has it, else an owner file.

Two drivers on one folder would delete each other's unfinished shards on resume. The lock
is ``<folder>/.lock`` held with ``flock``: the kernel drops it when its holder dies, so a
killed run never blocks its rerun. Some filesystems have no ``flock`` (Lustre mounted
without ``-o flock``, FUSE object stores): ``flock`` then raises ``OSError`` and the lock
falls back to an owner file, ``.lock.owner``, whose holder rewrites its heartbeat every
``HEARTBEAT_S`` seconds from a background thread. Another driver is refused while the
heartbeat is fresh and takes over once it is older than ``STALE_S`` (its holder died).
The fallback says so on stderr, because it is weaker: it relies on clocks and on the
filesystem showing a rewrite within ``STALE_S``.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from engine.atomic import write_json
from engine.errors import BadInputError

LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"
HEARTBEAT_S = 5.0
STALE_S = 60.0


def _refuse(folder: Path, holder: str) -> BadInputError:
    return BadInputError(str(folder), f"another generate run is writing to this folder{holder}",
                         "wait for it to finish (a rerun resumes), or choose another out_dir")


@contextmanager
def _owner_file(folder: Path, heartbeat_s: float, stale_s: float) -> Iterator[None]:
    path = folder / OWNER_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid(), "token": os.urandom(8).hex()}
    if path.is_file():
        try:
            other = json.loads(path.read_text())
        except (OSError, ValueError):
            other = {}
        age = time.time() - float(other.get("heartbeat", 0))
        if age < stale_s:
            raise _refuse(folder, f" (owner {other.get('host')}:{other.get('pid')}, heartbeat {age:.0f} s ago)")
    stop = threading.Event()

    def beat() -> None:
        while True:
            write_json(path, {**me, "heartbeat": time.time()})
            if stop.wait(heartbeat_s):
                return

    beater = threading.Thread(target=beat, daemon=True, name="lock-heartbeat")
    write_json(path, {**me, "heartbeat": time.time()})
    beater.start()
    try:
        yield
    finally:
        stop.set()
        beater.join()
        if path.is_file() and json.loads(path.read_text()).get("token") == me["token"]:
            path.unlink()


@contextmanager
def exclusive_folder(folder: Path, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S) -> Iterator[None]:
    """Hold ``folder``'s writer lock while the block runs; refuse if another driver holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refuse(folder, "") from None
        except OSError as exc:  # no flock on this filesystem
            print(f"lock: {folder} has no flock ({exc.strerror or exc}); using an owner file with a "
                  f"{heartbeat_s:g} s heartbeat ({OWNER_FILE})", file=sys.stderr)
            with _owner_file(folder, heartbeat_s, stale_s):
                yield
            return
        yield
