"""One writer per output folder: ``flock`` where the filesystem has it, else owner files.

Two drivers on one folder would delete each other's unfinished shards on resume. The lock
is ``<folder>/.lock`` held with ``flock``: the kernel drops it when its holder dies, so a
killed run never blocks its rerun. Some locations have no ``flock``: local filesystems
without it (Lustre mounted without ``-o flock``, FUSE object stores: ``flock`` raises
``OSError``) and object-store URLs (``s3://``...). There the lock falls back to numbered
owner files, ``.lock.owner.<generation>``: the newest generation is the lock. A driver
claims the folder by creating the next generation only if absent (``link(2)`` locally, a
conditional put, ``If-None-Match: *``, on object stores; ``engine.storage.create_exclusive``)
and then checking it is the newest, so of two drivers that both saw the same stale owner
exactly one gets it (a delete-then-create takeover lets both proceed), and a driver that
read an old generation long ago is refused although the newer holder pruned that number.
Its holder rewrites its heartbeat every ``HEARTBEAT_S`` seconds from a background thread
and, on release, marks its file released (not deleted). Another driver is refused while the newest heartbeat
is fresh and takes over once it is older than ``STALE_S``, or at once when the holder ran
on the same host and its process is gone. The fallback says so on stderr, because it is
weaker than ``flock``: it relies on clocks and on the store showing a rewrite within
``STALE_S``. A holder that finds a newer generation (it stalled past ``STALE_S`` and was
taken over) stops beating and says so on stderr.
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
OWNER_PREFIX = ".lock.owner."
HEARTBEAT_S = 5.0
STALE_S = 60.0


def owner_file(folder: storage.Location, generation: int) -> storage.Location:
    """The owner file of one generation (zero-padded, so names sort like numbers)."""
    return storage.join(folder, f"{OWNER_PREFIX}{generation:09d}")


def generations(folder: storage.Location) -> list[int]:
    """The owner-file generations present in ``folder``, ascending (one listing)."""
    names = (n[len(OWNER_PREFIX):] for n in storage.entries(folder) if n.startswith(OWNER_PREFIX))
    return sorted(int(g) for g in names if g.isdigit())


def _refuse(folder: storage.Location, holder: str) -> BadInputError:
    return BadInputError(str(folder), f"another generate run is writing to this folder{holder}",
                         "wait for it to finish (a rerun resumes), or choose another out_dir")


def _read_owner(path: storage.Location) -> dict[str, Any]:
    """The owner file's record; empty when it is gone or unreadable (then it counts as stale)."""
    try:
        return json.loads(storage.read_text(path))
    except (OSError, ValueError):
        return {}


def _record(me: dict[str, Any], released: bool = False) -> bytes:
    return json.dumps({**me, "heartbeat": time.time(), "released": released}).encode()


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


def _claim(folder: storage.Location, me: dict[str, Any], stale_s: float) -> int:
    """Create the next owner generation, unless the newest one's holder still beats; return
    the generation claimed. Older generations are deleted (best effort: they are inert)."""
    seen = generations(folder)
    if seen:
        other = _read_owner(owner_file(folder, seen[-1]))
        age = time.time() - float(other.get("heartbeat", 0))
        if other and not other.get("released") and age < stale_s and not _dead_here(other):
            raise _refuse(folder, f" (owner {other.get('host')}:{other.get('pid')}, heartbeat {age:.0f} s ago)")
    mine = seen[-1] + 1 if seen else 0
    if not storage.create_exclusive(owner_file(folder, mine), _record(me)):
        raise _refuse(folder, " (another driver claimed it at the same moment)")
    if generations(folder)[-1] != mine:  # read long ago: a later driver has claimed (and pruned) since
        storage.remove(owner_file(folder, mine))
        raise _refuse(folder, " (another driver claimed it at the same moment)")
    for old in seen:
        try:
            storage.remove(owner_file(folder, old))
        except OSError:
            pass
    return mine


@contextmanager
def _owner_files(folder: storage.Location, heartbeat_s: float, stale_s: float) -> Iterator[None]:
    me = {"host": socket.gethostname(), "pid": os.getpid(), "token": os.urandom(8).hex()}
    mine = _claim(folder, me, stale_s)
    path = owner_file(folder, mine)
    stop = threading.Event()

    def still_mine() -> bool:
        return generations(folder)[-1:] == [mine]

    def beat() -> None:
        while not stop.wait(heartbeat_s):
            if not still_mine():
                print(f"lock: {folder} was taken over by another driver (this one stalled past {stale_s:g} s); "
                      "its shards may be redone by the other run", file=sys.stderr)
                return
            write_text(path, _record(me).decode())

    beater = threading.Thread(target=beat, daemon=True, name="lock-heartbeat")
    beater.start()
    try:
        yield
    finally:
        stop.set()
        beater.join()
        if still_mine():
            write_text(path, _record(me, released=True).decode())


@contextmanager
def _fallback(folder: storage.Location, why: str, heartbeat_s: float, stale_s: float) -> Iterator[None]:
    print(f"lock: {folder} {why}; using owner files with a {heartbeat_s:g} s heartbeat ({OWNER_PREFIX}<n>)",
          file=sys.stderr)
    with _owner_files(folder, heartbeat_s, stale_s):
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
