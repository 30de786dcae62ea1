"""The output-folder lock: flock, and the owner-file fallback where the filesystem has no flock."""

import errno
import json
import time

import pytest

import engine.lock as lock
from engine.errors import BadInputError


def _no_flock(monkeypatch):
    def refuse(*_a, **_k):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock.fcntl, "flock", refuse)


def test_flock_refuses_a_second_holder(tmp_path):
    with lock.exclusive_folder(tmp_path / "out"):
        with pytest.raises(BadInputError, match="another generate run is writing to this folder"):
            with lock.exclusive_folder(tmp_path / "out"):
                pass
    with lock.exclusive_folder(tmp_path / "out"):  # released: free again
        pass


def test_without_flock_an_owner_file_with_a_heartbeat_takes_over_and_says_so(tmp_path, monkeypatch, capsys):
    _no_flock(monkeypatch)
    out = tmp_path / "out"
    with lock.exclusive_folder(out, heartbeat_s=0.05, stale_s=5.0):
        assert "has no flock" in capsys.readouterr().err
        first = json.loads((out / lock.OWNER_FILE).read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads((out / lock.OWNER_FILE).read_text())["heartbeat"] > first  # the heartbeat advances
        with pytest.raises(BadInputError, match=r"owner .*heartbeat 0 s ago"):
            with lock.exclusive_folder(out, stale_s=5.0):
                pass
    assert not (out / lock.OWNER_FILE).exists()  # released on exit


def test_a_stale_owner_file_is_taken_over(tmp_path, monkeypatch):
    """A holder that died leaves its owner file; once its heartbeat is older than stale_s it is taken over."""
    _no_flock(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    (out / lock.OWNER_FILE).write_text(json.dumps({"host": "gone", "pid": 1, "token": "x", "heartbeat": time.time() - 120}))
    with lock.exclusive_folder(out, stale_s=60.0):
        assert json.loads((out / lock.OWNER_FILE).read_text())["host"] != "gone"
