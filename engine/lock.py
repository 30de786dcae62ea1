"""One writer per output folder: ``flock`` where the filesystem has it, else an owner file.

Two drivers on one folder would delete each other's unfinished shards on resume. The lock
is ``<folder>/.lock`` held with ``flock``: the kernel drops it when its holder dies, so a
killed run never blocks its rerun. Some locations have no ``flock``: local filesystems
without it (Lustre mounted without ``-o flock``, FUSE object stores: ``flock`` raises
``OSError``) and object-store URLs (``s3://``...). There the lock falls back to an owner
file, ``.lock.owner``, created only if absent (``link(2)`` locally, a conditional put,
``If-None-Match: *``, on object stores; ``engine.storage.create_exclusive``), whose holder
rewrites its heartbeat every ``HEARTBEAT_S`` seconds from a background thread. Another
driver is refused while the heartbeat is fresh and takes over once it is older than
``STALE_S``, or at once when the holder ran on the same host and its process is gone. The fallback says so on stderr, because it is weaker: it
relies on clocks and on the store showing a rewrite within ``STALE_S``, and two drivers
that take over the same stale file at the same instant may both proceed (deleting a stale
file cannot be made conditional on every store).
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
from typing import Any, Iterator

from engine import storage
from engine.atomic import write_text
from engine.errors import BadInputError

LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"
HEARTBEAT_S = 5.0
STALE_S = 60.0


def _refuse(folder: storage.Location, holder: str) -> BadInputError:
    return BadInputError(str(folder), f"another generate run is writing to this folder{holder}",
                         "wait for it to finish (a rerun resumes), or choose another out_dir")


def _read_owner(path: storage.Location) -> dict[str, Any]:
    """The owner file's record; empty when it is gone or unreadable (then it counts as stale)."""
    try:
        return json.loads(storage.read_text(path))
    except (OSError, ValueError):
        return {}


def _record(me: dict[str, Any]) -> bytes:
    return json.dumps({**me, "heartbeat": time.time()}).encode()


def _dead_here(owner: dict[str, Any]) -> bool:
    """True when the owner ran on this host and its process is gone (a killed driver's rerun
    need not wait ``STALE_S``)."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _claim(path: storage.Location, folder: storage.Location, me: dict[str, Any], stale_s: float) -> None:
    """Create the owner file, or take over a stale one; refuse while its holder beats."""
    if storage.create_exclusive(path, _record(me)):
        return
    other = _read_owner(path)
    age = time.time() - float(other.get("heartbeat", 0))
    if age < stale_s and not _dead_here(other):
        raise _refuse(folder, f" (owner {other.get('host')}:{other.get('pid')}, heartbeat {age:.0f} s ago)")
    storage.remove(path)  # its holder died without releasing it
    if not storage.create_exclusive(path, _record(me)):
        raise _refuse(folder, " (another driver took over the stale owner file at the same moment)")


@contextmanager
def _owner_file(folder: storage.Location, heartbeat_s: float, stale_s: float) -> Iterator[None]:
    path = storage.join(folder, OWNER_FILE)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "token": os.urandom(8).hex()}
    _claim(path, folder, me, stale_s)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat_s):
            write_text(path, _record(me).decode())

    beater = threading.Thread(target=beat, daemon=True, name="lock-heartbeat")
    beater.start()
    try:
        yield
    finally:
        stop.set()
        beater.join()
        if _read_owner(path).get("token") == me["token"]:
            storage.remove(path)


@contextmanager
def _fallback(folder: storage.Location, why: str, heartbeat_s: float, stale_s: float) -> Iterator[None]:
    print(f"lock: {folder} {why}; using an owner file with a {heartbeat_s:g} s heartbeat ({OWNER_FILE})",
          file=sys.stderr)
    with _owner_file(folder, heartbeat_s, stale_s):
        yield


@contextmanager
def exclusive_folder(folder: storage.Location, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S) -> Iterator[None]:
    """Hold ``folder``'s writer lock while the block runs; refuse if another driver holds it."""
    if not storage.is_local(folder):
        with _fallback(folder, "is an object store (no flock)", heartbeat_s, stale_s):
            yield
        return
    folder = storage.local_path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refuse(folder, "") from None
        except OSError as exc:  # no flock on this filesystem
            with _fallback(folder, f"has no flock ({exc.strerror or exc})", heartbeat_s, stale_s):
                yield
            return
        yield
