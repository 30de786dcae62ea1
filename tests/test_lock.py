"""The output-folder lock: flock, and the owner-file fallback where the filesystem has no flock."""

import json
import os
import threading
import time
from pathlib import Path

import pytest

import engine.lock as lock
from engine import storage
from engine.atomic import write_text
from engine.errors import BadInputError
from fs_fixtures import fuse_object_store, no_flock


def newest(folder) -> dict:
    """The record of the newest owner generation (the lock)."""
    return json.loads(storage.read_text(lock.owner_file(folder, lock.generations(folder)[-1])))


def stale_owner(folder, generation: int = 0) -> None:
    """The owner file a killed driver on another host leaves behind."""
    storage.makedirs(folder)
    record = {"host": "gone", "pid": 1, "token": "x", "heartbeat": time.time() - 120}
    assert storage.create_exclusive(lock.owner_file(folder, generation), json.dumps(record).encode())


@pytest.fixture(params=["local", "fuse", "memory"])
def folder(request, tmp_path, monkeypatch):
    """A local folder without flock, one without flock and hard links (a FUSE object store),
    or an in-memory object store: all use the owner files."""
    if request.param != "memory":
        (no_flock if request.param == "local" else fuse_object_store)(monkeypatch)
        return tmp_path / "out"
    from fsspec.implementations.memory import MemoryFileSystem

    MemoryFileSystem.store.clear()
    return f"memory://lock-{tmp_path.name}/out"


def test_flock_refuses_a_second_holder(tmp_path):
    with lock.exclusive_folder(tmp_path / "out"):
        with pytest.raises(BadInputError, match="another generate run is writing to this folder"):
            with lock.exclusive_folder(tmp_path / "out"):
                pass
    with lock.exclusive_folder(tmp_path / "out"):  # released: free again
        pass


def test_without_flock_an_owner_file_with_a_heartbeat_refuses_and_says_so(folder, capsys):
    with lock.exclusive_folder(folder, heartbeat_s=0.05, stale_s=5.0):
        assert "no flock" in capsys.readouterr().err
        first = newest(folder)["heartbeat"]
        time.sleep(0.3)
        assert newest(folder)["heartbeat"] > first  # the heartbeat advances
        with pytest.raises(BadInputError, match=r"owner .*heartbeat 0 s ago"):
            with lock.exclusive_folder(folder, stale_s=5.0):
                pass
    assert lock.generations(folder) == [0] and newest(folder)["released"]  # released on exit, not deleted
    with lock.exclusive_folder(folder, stale_s=5.0):  # free again: the next generation
        assert lock.generations(folder) == [1] and not newest(folder)["released"]


def test_a_stale_owner_file_is_taken_over(folder):
    """A holder that died leaves its owner file; once its heartbeat is older than stale_s it is taken over."""
    stale_owner(folder, 3)
    with lock.exclusive_folder(folder, stale_s=60.0):
        assert lock.generations(folder) == [4] and newest(folder)["host"] != "gone"


def put(path, data: bytes) -> None:
    """A plain put, as an unconditional store does it: whole (a uniquely named temp file renamed
    into place locally), and beside the holder's own rewrites (which use another temp name)."""
    if storage.is_local(path):
        tmp = Path(f"{path}.{os.urandom(4).hex()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    fs, where = storage.fs_and_path(path)
    fs.pipe_file(where, data)


def both_read_first(monkeypatch) -> None:
    """Two drivers' first reads of an owner record (the stale owner's) meet at a barrier: both
    have read before either writes."""
    both_read = threading.Barrier(2, timeout=10)
    read = lock._read_owner
    waited = threading.local()

    def read_then_wait(path):
        record = read(path)
        if not getattr(waited, "once", False):
            waited.once = True
            both_read.wait()
        return record

    monkeypatch.setattr(lock, "_read_owner", read_then_wait)


def race_two_drivers(folder) -> None:
    """Two drivers claim ``folder`` at once, the winner holding until the other is done: exactly
    one holds it, the other is refused as a racer."""
    outcomes: list[str] = []
    refused = threading.Event()

    def driver() -> None:
        try:
            with lock.exclusive_folder(folder, heartbeat_s=60.0):
                outcomes.append("held")
                refused.wait(10)  # overlap with the other driver until it is done
        except BadInputError as exc:
            outcomes.append(str(exc))
            refused.set()

    threads = [threading.Thread(target=driver) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes, key=len)[0] == "held" and "claimed it at the same moment" in sorted(outcomes, key=len)[1]


def test_two_drivers_taking_over_the_same_stale_owner_at_once_exactly_one_wins(folder, monkeypatch):
    """Both read the stale record before either writes (a barrier holds them there): a
    delete-then-create takeover lets both proceed; the next generation's conditional create lets one."""
    stale_owner(folder)
    both_read_first(monkeypatch)
    race_two_drivers(folder)
    assert lock.generations(folder) == [1]


def test_a_store_that_ignores_the_create_condition_still_lets_exactly_one_driver_in(folder, monkeypatch):
    """Some stores do not honour the condition (an S3-compatible store without If-None-Match, an
    O_EXCL that a FUSE mount does not make atomic across hosts): both drivers' puts of the next
    generation succeed and the later one overwrites. Each reads the record back: the last writer holds it.
    (Barriers hold both after their last listing and after their put.)"""
    stale_owner(folder)
    both_putting, both_wrote = threading.Barrier(2, timeout=10), threading.Barrier(2, timeout=10)

    def unconditional(path, data):
        both_putting.wait()  # both have read and listed: neither has put yet
        put(path, data)  # the later one overwrites
        both_wrote.wait()
        return True

    monkeypatch.setattr(storage, "create_exclusive", unconditional)
    race_two_drivers(folder)
    assert lock.generations(folder) == [1] and newest(folder)["released"]  # the winner's record, released


class Holder(threading.Thread):
    """A driver that claims ``folder`` in a thread and holds it until released."""

    def __init__(self, folder) -> None:
        super().__init__()
        self.folder, self.held, self.done, self.lost = folder, threading.Event(), threading.Event(), None

    def run(self) -> None:
        with lock.exclusive_folder(self.folder, heartbeat_s=60.0) as lease:
            self.held.set()
            self.done.wait(10)
            self.lost = lease.lost.is_set()

    def start_holding(self) -> None:
        self.start()
        assert self.held.wait(10)

    def release(self) -> None:
        self.done.set()
        if self.ident is not None:
            self.join()


def claim_after_a_stall(folder, monkeypatch, meanwhile) -> None:
    """A driver whose first owner read (the stale owner's) stalls while ``meanwhile`` runs
    (other drivers come and go) is refused when it goes on."""
    read = lock._read_owner

    def stalled_read(path):
        monkeypatch.setattr(lock, "_read_owner", read)
        record = read(path)
        meanwhile()
        return record

    monkeypatch.setattr(lock, "_read_owner", stalled_read)
    with pytest.raises(BadInputError, match="claimed it at the same moment"):
        with lock.exclusive_folder(folder, heartbeat_s=60.0):
            pass


def test_on_a_store_that_ignores_the_condition_a_stalled_claimer_does_not_evict_a_live_holder(folder, monkeypatch):
    """B reads the stale generation 0 and stalls; A claims generation 1 and holds. B's put of
    generation 1 would overwrite A's record (nothing stops it on such a store), so B lists
    again just before putting and withdraws."""
    stale_owner(folder)
    monkeypatch.setattr(storage, "create_exclusive", lambda path, data: put(path, data) or True)
    a = Holder(folder)
    try:
        claim_after_a_stall(folder, monkeypatch, a.start_holding)  # B
        assert lock.generations(folder) == [1] and not newest(folder)["released"]  # A's record, untouched
    finally:
        a.release()
    assert a.lost is False and newest(folder)["released"]


def test_a_driver_that_read_a_stale_owner_long_ago_cannot_claim_a_later_holders_folder(folder, monkeypatch):
    """Driver C reads the stale generation 0 and stalls; meanwhile A takes over (1) and releases, and D
    claims (2). C then goes on to claim generation 1: refused, although D pruned it."""
    stale_owner(folder)
    d = Holder(folder)

    def a_comes_and_goes_then_d_holds() -> None:
        with lock.exclusive_folder(folder, heartbeat_s=60.0):  # A
            pass
        d.start_holding()

    try:
        claim_after_a_stall(folder, monkeypatch, a_comes_and_goes_then_d_holds)  # C
        assert lock.generations(folder) == [2] and not newest(folder)["released"]  # D holds; C left nothing behind
    finally:
        d.release()


def test_a_holder_taken_over_stops_beating_and_says_so(folder, capsys):
    with lock.exclusive_folder(folder, heartbeat_s=0.05, stale_s=5.0):
        storage.create_exclusive(lock.owner_file(folder, 1), b"{}")  # another driver took over
        time.sleep(0.3)
        assert "was taken over by another driver" in capsys.readouterr().err
        last = storage.read_text(lock.owner_file(folder, 0))
        time.sleep(0.3)
        assert storage.read_text(lock.owner_file(folder, 0)) == last  # no more beats
    assert lock.generations(folder)[-1] == 1 and storage.read_text(lock.owner_file(folder, 1)) == "{}"  # left alone


def test_a_holder_whose_record_a_racer_overwrote_stops_beating(folder, capsys):
    """On a store that ignored the create condition a racer's record can replace the holder's
    after its claim: its next heartbeat finds another token there and gives the lock up."""
    with lock.exclusive_folder(folder, heartbeat_s=0.05, stale_s=5.0) as lease:
        racer = {"host": "elsewhere", "pid": 1, "token": "racer", "heartbeat": time.time(), "released": False}
        for _ in range(100):  # a put between the holder's check and its rewrite is undone by that rewrite
            put(lock.owner_file(folder, 0), json.dumps(racer).encode())
            if lease.lost.wait(0.2):
                break
        assert lease.lost.is_set() and "was taken over by another driver" in capsys.readouterr().err
        with pytest.raises(BadInputError, match="took over"):
            lease.check()
    assert newest(folder)["token"] == "racer" and not newest(folder)["released"]  # the racer's record stays


def test_a_lease_taken_over_stops_the_run_at_its_next_check(folder):
    with lock.exclusive_folder(folder, heartbeat_s=0.05, stale_s=5.0) as lease:
        lease.check()  # held: nothing happens
        storage.create_exclusive(lock.owner_file(folder, 1), b"{}")  # another driver took over
        time.sleep(0.3)
        with pytest.raises(BadInputError, match="took over this folder's lock"):
            lease.check()


def test_a_transient_store_error_in_the_heartbeat_does_not_end_it(folder, monkeypatch, capsys):
    """One failed listing (an S3 503) must not kill the heartbeat: the holder keeps its lock."""
    entries, failed = storage.entries, []

    def flaky(where):
        if threading.current_thread().name == "lock-heartbeat" and not failed:  # the first beat's listing
            failed.append(True)
            raise OSError(5, "503 SlowDown (injected)")
        return entries(where)

    monkeypatch.setattr(storage, "entries", flaky)
    with lock.exclusive_folder(folder, heartbeat_s=0.05, stale_s=0.5):
        first = newest(folder)["heartbeat"]
        time.sleep(0.8)  # longer than stale_s: only a live heartbeat keeps the lock
        assert newest(folder)["heartbeat"] > first
        with pytest.raises(BadInputError, match="another generate run"):
            with lock.exclusive_folder(folder, stale_s=0.5):
                pass
    assert "heartbeat of" in capsys.readouterr().err


def test_an_unreadable_owner_record_refuses_instead_of_counting_as_stale(folder, monkeypatch):
    with lock.exclusive_folder(folder, heartbeat_s=60.0):
        def failing(path):
            raise OSError(5, "timeout (injected)")

        monkeypatch.setattr(storage, "read_text", failing)
        with pytest.raises(BadInputError, match="cannot read or write the lock's owner files.*timeout"):
            with lock.exclusive_folder(folder):
                pass
        monkeypatch.undo()
        assert lock.generations(folder) == [0] and not newest(folder)["released"]


@pytest.mark.parametrize("foreign", [".lock.owner.7", ".lock.owner.\u00b2", ".lock.owner.abc", ".lock.owner.000000001.tmp"])
def test_foreign_names_beside_the_owner_files_are_ignored(folder, foreign):
    storage.makedirs(folder)
    put(storage.join(folder, foreign), b"junk")
    with lock.exclusive_folder(folder, heartbeat_s=60.0):
        assert lock.generations(folder) == [0]
        with pytest.raises(BadInputError, match="another generate run"):
            with lock.exclusive_folder(folder):
                pass


def test_a_same_named_host_in_another_pid_namespace_is_not_taken_for_dead(folder, monkeypatch):
    """Containers can share a host name (host networking) but not pids: a record from another
    pid namespace is never 'dead here', so it waits for stale_s."""
    import socket

    storage.makedirs(folder)
    record = {"host": socket.gethostname(), "pidns": "pid:[1]", "pid": 2 ** 22 + 7, "token": "x",
              "heartbeat": time.time(), "released": False}
    assert storage.create_exclusive(lock.owner_file(folder, 0), json.dumps(record).encode())
    with pytest.raises(BadInputError, match="another generate run"):
        with lock.exclusive_folder(folder):
            pass
    record["pidns"] = lock._pid_namespace()  # same namespace, no such process: dead, taken over at once
    storage.remove(lock.owner_file(folder, 0))
    assert storage.create_exclusive(lock.owner_file(folder, 0), json.dumps(record).encode())
    with lock.exclusive_folder(folder, heartbeat_s=60.0):
        assert lock.generations(folder) == [1]


def test_a_half_written_owner_record_is_read_again_before_it_counts_as_stale(folder, monkeypatch):
    """Without hard links an owner file is created empty and then written: a racer that reads
    it in between reads it again after a pause, finds the holder and is refused. A record
    still unreadable after that pause is garbage, and stale."""
    storage.makedirs(folder)
    path = lock.owner_file(folder, 0)
    assert storage.create_exclusive(path, b"")  # created, its record not written yet
    record = {"host": "elsewhere", "pid": 1, "token": "x", "heartbeat": time.time(), "released": False}
    pauses = []

    def settle(seconds):  # the creator finishes its write during the reader's pause
        pauses.append(seconds)
        write_text(path, json.dumps(record))

    monkeypatch.setattr(lock.time, "sleep", settle)
    with pytest.raises(BadInputError, match="another generate run.*elsewhere:1"):
        with lock.exclusive_folder(folder):
            pass
    assert pauses == [lock.SETTLE_S]
    monkeypatch.setattr(lock.time, "sleep", pauses.append)  # nobody finishes it: garbage
    write_text(path, '{"host": "elsewh')
    with lock.exclusive_folder(folder, heartbeat_s=60.0):
        assert lock.generations(folder) == [1] and len(pauses) == 2
