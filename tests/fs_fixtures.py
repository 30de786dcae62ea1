"""Filesystems that lack a feature, simulated in this process (Ray actors do not see it).

- no flock: Lustre mounted without ``-o flock`` (``flock`` raises ENOLCK);
- FUSE object stores (gcsfuse, s3fs-fuse): no flock (ENOSYS) and no hard links (``link``
  raises EPERM), so owner files are created with ``O_EXCL``.
"""

from __future__ import annotations

import errno
import fcntl
import os

import pytest


def _raising(code: int, text: str):
    def refuse(*_a, **_k):
        raise OSError(code, text)

    return refuse


def no_flock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fcntl, "flock", _raising(errno.ENOLCK, "No locks available"))


def fuse_object_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fcntl, "flock", _raising(errno.ENOSYS, "Function not implemented"))
    monkeypatch.setattr(os, "link", _raising(errno.EPERM, "Operation not permitted"))
