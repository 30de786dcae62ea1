"""One writer per output folder: ``flock`` where the filesystem has it, else owner files.

Two drivers on one folder would delete each other's unfinished shards on resume. The lock
is ``<folder>/.lock`` held with ``flock``: the kernel drops it when its holder dies, so a
killed run never blocks its rerun. Some locations have no ``flock``: local filesystems
without it (Lustre mounted without ``-o flock``, FUSE object stores: ``flock`` raises
``OSError``) and object-store URLs (``s3://``...). There the lock falls back to numbered
owner files, ``.lock.owner.<generation>``: the newest generation is the lock. A driver
claims the folder by creating the next generation only if absent (``link(2)`` locally,
``O_EXCL`` without hard links, a conditional put, ``If-None-Match: *``, on object stores;
``engine.storage.create_exclusive``), after listing once more (nothing newer appeared while
it read), and then checking it is the newest and holds its record. So of two drivers that
both saw the same stale owner exactly one gets it (a delete-then-create takeover lets both
proceed), and a driver that read an old generation long ago is refused although the newer
holder pruned that number; the listing and the read-back also narrow the race where a store
ignores the condition (see docs/reliability.md).
Its holder rewrites its heartbeat every ``HEARTBEAT_S`` seconds from a background thread
and, on release, marks its file released (not deleted). Another driver is refused while the newest heartbeat
is fresh and takes over once it is older than ``STALE_S``, or at once when the holder ran
on the same host and its process is gone. The fallback says so on stderr, because it is
weaker than ``flock``: it relies on clocks and on the store showing a rewrite within
``STALE_S``. A holder that finds a newer generation (it stalled past ``STALE_S`` and was
taken over) stops beating, says so on stderr, and its :class:`Lease` then fails the run at
its next check. A store error in a heartbeat is retried at the next beat; one while reading
the owner record refuses the claim (it must not look like a dead holder).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
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
OWNER_RE = re.compile(r"^\.lock\.owner\.([0-9]{9,})$")  # ASCII digits, zero-padded: foreign names never match
HEARTBEAT_S = 5.0
STALE_S = 60.0
SETTLE_S = 0.5  # how long a half-written owner record gets to finish before it counts as garbage


class Lease:
    """What ``exclusive_folder`` yields: :meth:`check` raises once another driver has taken the
    folder over (only an owner-file lock can be lost: its holder stalled past ``STALE_S``)."""

    def __init__(self, folder: storage.Location) -> None:
        self.folder = folder
        self.lost = threading.Event()

    def check(self) -> None:
        if self.lost.is_set():
            raise BadInputError(str(self.folder), "another driver took over this folder's lock while this run stalled",
                                "this run stops here; the other run finishes the set (or rerun once it is done)")


def owner_file(folder: storage.Location, generation: int) -> storage.Location:
    """The owner file of one generation (zero-padded, so names sort like numbers)."""
    return storage.join(folder, f"{OWNER_PREFIX}{generation:09d}")


def generations(folder: storage.Location) -> list[int]:
    """The owner-file generations present in ``folder``, ascending (one listing)."""
    return sorted(int(m.group(1)) for n in storage.entries(folder) if (m := OWNER_RE.match(n)))


def _refuse(folder: storage.Location, holder: str) -> BadInputError:
    return BadInputError(str(folder), f"another generate run is writing to this folder{holder}",
                         "wait for it to finish (a rerun resumes), or choose another out_dir")


def _raced(folder: storage.Location) -> BadInputError:
    return _refuse(folder, " (another driver claimed it at the same moment)")


def _read_owner(path: storage.Location, settle_s: float = SETTLE_S) -> dict[str, Any]:
    """The owner file's record; empty when it is gone or not a record (then it counts as stale).
    Any other read error raises: a store's transient error must not look like a dead holder.
    A record that does not parse is read once more after ``settle_s``: on a filesystem without
    hard links an owner file is created empty and then written, so a racer may catch it half-written."""
    def parse() -> Any:
        return json.loads(storage.read_text(path))

    try:
        try:
            record = parse()
        except ValueError:
            time.sleep(settle_s)
            record = parse()
    except (FileNotFoundError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _record(me: dict[str, Any], released: bool = False) -> bytes:
    return json.dumps({**me, "heartbeat": time.time(), "released": released}).encode()


def _pid_namespace() -> str | None:
    """This process's pid namespace (Linux): containers that share a host name do not share it."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _dead_here(owner: dict[str, Any]) -> bool:
    """True when the owner ran on this host, in this pid namespace, and its process is gone (a
    killed driver's rerun need not wait ``STALE_S``)."""
    if owner.get("host") != socket.gethostname() or owner.get("pidns") != _pid_namespace():
        return False
    if not isinstance(owner.get("pid"), int):
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
    try:
        seen = generations(folder)
        if seen:
            other = _read_owner(owner_file(folder, seen[-1]))
            age = time.time() - float(other.get("heartbeat", 0))
            if other and not other.get("released") and age < stale_s and not _dead_here(other):
                raise _refuse(folder, f" (owner {other.get('host')}:{other.get('pid')}, heartbeat {age:.0f} s ago)")
        mine = seen[-1] + 1 if seen else 0
        path = owner_file(folder, mine)
        if generations(folder)[-1:] != seen[-1:]:  # claimed while this driver read (or stalled)
            raise _raced(folder)
        if not storage.create_exclusive(path, _record(me)):
            raise _raced(folder)
        # Read long ago: a later driver has claimed (and pruned) since. Or the store ignored the
        # condition (an O_EXCL that FUSE does not make atomic, an S3-compatible store without
        # If-None-Match) and a racer's record overwrote this one: the last writer holds it.
        ours = _read_owner(path).get("token") == me["token"]
        if not ours or generations(folder)[-1] != mine:
            if ours:
                storage.remove(path)
            raise _raced(folder)
    except FileNotFoundError as exc:  # the put found no bucket (a local folder is made before)
        raise BadInputError(str(folder), f"cannot create the lock's owner file: {exc}",
                            "create the bucket first (for S3: `aws s3 mb s3://BUCKET`), or check the URL") from None
    except OSError as exc:
        raise BadInputError(str(folder), f"cannot read or write the lock's owner files: {exc}",
                            "retry; if it persists, check the store's credentials and permissions") from None
    for old in seen:
        try:
            storage.remove(owner_file(folder, old))
        except OSError:
            pass
    return mine


@contextmanager
def _owner_files(folder: storage.Location, heartbeat_s: float, stale_s: float) -> Iterator[Lease]:
    me = {"host": socket.gethostname(), "pidns": _pid_namespace(), "pid": os.getpid(), "token": os.urandom(8).hex()}
    mine = _claim(folder, me, stale_s)
    path = owner_file(folder, mine)
    lease = Lease(folder)
    stop = threading.Event()

    def still_mine() -> bool:
        return generations(folder)[-1:] == [mine] and _read_owner(path).get("token") == me["token"]

    def beat() -> None:
        while not stop.wait(heartbeat_s):
            try:
                if not still_mine():
                    lease.lost.set()
                    print(f"lock: {folder} was taken over by another driver (this one stalled past {stale_s:g} s); "
                          "this run stops at its next finished shard", file=sys.stderr)
                    return
                write_text(path, _record(me).decode())
            except Exception as exc:  # a transient store error: the next beat tries again
                print(f"lock: heartbeat of {path} failed ({exc!r}); retrying in {heartbeat_s:g} s", file=sys.stderr)

    beater = threading.Thread(target=beat, daemon=True, name="lock-heartbeat")
    beater.start()
    try:
        yield lease
    finally:
        stop.set()
        beater.join()
        try:
            if still_mine():
                write_text(path, _record(me, released=True).decode())
        except Exception as exc:  # never hide the run's own error; the file goes stale in STALE_S
            print(f"lock: could not mark {path} released ({exc!r}); it is free after {stale_s:g} s", file=sys.stderr)


@contextmanager
def _fallback(folder: storage.Location, why: str, heartbeat_s: float, stale_s: float) -> Iterator[Lease]:
    print(f"lock: {folder} {why}; using owner files with a {heartbeat_s:g} s heartbeat ({OWNER_PREFIX}<n>)",
          file=sys.stderr)
    with _owner_files(folder, heartbeat_s, stale_s) as lease:
        yield lease


@contextmanager
def exclusive_folder(folder: storage.Location, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S) -> Iterator[Lease]:
    """Hold ``folder``'s writer lock while the block runs; refuse if another driver holds it.
    The :class:`Lease` yielded tells a long run whether it still holds the lock."""
    if not storage.is_local(folder):
        with _fallback(folder, "is an object store (no flock)", heartbeat_s, stale_s) as lease:
            yield lease
        return
    folder = storage.local_path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refuse(folder, "") from None
        except OSError as exc:  # no flock on this filesystem
            with _fallback(folder, f"has no flock ({exc.strerror or exc})", heartbeat_s, stale_s) as lease:
                yield lease
            return
        yield Lease(folder)  # the kernel holds a flock until this process dies: never lost
