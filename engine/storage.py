"""A location is a local path or a URL: one place that knows the difference.

Every input and output of the engine (real manifests and shards, the model folder,
generation and ingest outputs, seg's ``--shards``) may be a local path, a ``file://`` URL
or any fsspec URL (``s3://``, ``gs://``, ``memory://`` in tests). Local locations keep the
plain ``os``/``pathlib`` code paths (same speed, same atomic rename as before); only URLs go
through fsspec. Helpers that build locations (:func:`join`, :func:`as_location`) return a
:class:`~pathlib.Path` for a local one and a ``str`` for a URL, so callers that hold a
local path keep its ``Path`` methods.

Atomicity. A reader must never see half an output. On a filesystem that is a temporary
sibling renamed over the target (:class:`AtomicOutput`, ``os.replace``); on an object
store it is one whole-object put of a file staged on local disk (an object store shows an
object only once its upload has completed, multipart uploads included). Exclusive creation
(:func:`create_exclusive`, for lock owner files) is ``link(2)`` locally (``O_EXCL`` where the
filesystem has no hard links) and a conditional put (``If-None-Match: *``, fsspec's
``mode="create"``) on object stores.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Union

from engine.errors import BadInputError

Location = Union[str, "os.PathLike[str]"]
TMP_SUFFIX = ".tmp"
CREATE_RETRY_S = (0.2, 0.5, 1.0)  # a conditional put that conflicted with another is tried again after about these
STORE_HINT = ("check the endpoint, credentials and network; for S3 these are AWS_ENDPOINT_URL, AWS_PROFILE or "
              "AWS_ACCESS_KEY_ID, for GCS GOOGLE_APPLICATION_CREDENTIALS. A Ray node has the environment of its "
              "`ray start`: export them before it, or pass them with `ray job submit --runtime-env-json "
              "'{\"env_vars\": {...}}'`")
NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}  # what link(2) says on FUSE object stores
MODEL_CACHE_ENV = "SCRIBBLEGEN_CACHE"  # where URL model folders are copied to (default ~/.cache/scribblegen)


def _scheme(location: Location) -> str:
    text = os.fspath(location)
    return text.split("://", 1)[0].lower() if "://" in text else ""


def is_local(location: Location) -> bool:
    """True for a plain path or a ``file://`` URL: served by ``os`` calls, not fsspec."""
    return _scheme(location) in ("", "file")


def local_path(location: Location) -> Path:
    """The local path of a local location (``file:///a/b`` -> ``/a/b``)."""
    text = os.fspath(location)
    return Path(text[len("file://"):] if _scheme(text) == "file" else text)


def as_location(location: Location) -> Location:
    """A ``Path`` for a local location, the URL string otherwise."""
    return local_path(location) if is_local(location) else os.fspath(location)


def resolve(location: Location) -> Location:
    """An absolute form: local paths resolved against the current directory, URLs as they are."""
    return local_path(location).resolve() if is_local(location) else os.fspath(location)


def fs_and_path(location: Location) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of any location; names the backend to install."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(os.fspath(location))
    except ImportError as exc:
        package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(_scheme(location))
        hint = f"pip install {package}" if package else "install the fsspec backend for this URL scheme"
        raise BadInputError(os.fspath(location), f"no filesystem for {_scheme(location)}:// ({exc})", hint) from None
    except ValueError as exc:  # an unknown protocol
        raise BadInputError(os.fspath(location), str(exc), "use a local path or an fsspec URL (s3://, gs://, file://)") from None
    fs.invalidate_cache(path)  # other processes (actors, other drivers) write here: never answer from a stale listing
    return fs, path


def join(location: Location, *names: str) -> Location:
    """``location/name/...``: a Path for local locations, a URL string otherwise."""
    if is_local(location):
        return local_path(location).joinpath(*names)
    return "/".join([os.fspath(location).rstrip("/"), *names])


def parent(location: Location) -> Location:
    """The folder holding ``location``."""
    if is_local(location):
        return local_path(location).parent
    return os.fspath(location).rstrip("/").rsplit("/", 1)[0]


def name(location: Location) -> str:
    """The last component of ``location`` (a file or folder name)."""
    return os.fspath(location).rstrip("/").rsplit("/", 1)[-1]


def relative(location: Location, root: Location) -> str:
    """``location`` relative to the folder ``root`` (what manifests record, so sets can move)."""
    if is_local(location) and is_local(root):
        return os.path.relpath(local_path(location), local_path(root))
    prefix = os.fspath(root).rstrip("/") + "/"
    text = os.fspath(location)
    return text[len(prefix):] if text.startswith(prefix) else text


@contextmanager
def reached(location: Location, where: str = "") -> Iterator[None]:
    """A run's first access to ``location`` (on the driver, or ``where`` an actor starts): when
    its store cannot be reached or refuses access (endpoint, credentials, permissions), fail
    with a :class:`BadInputError` naming it. Each backend raises its own types (botocore's
    ``EndpointConnectionError`` after s3fs's retries, ``NoCredentialsError``, google.auth's
    errors), so anything but "not found" counts; a BadInputError (a backend missing there) is
    told ``where`` too. Not for a running unit's reads and writes: there a store's transient
    error must stay retryable."""
    if is_local(location):
        yield
        return
    try:
        yield
    except BadInputError as exc:
        if not where:
            raise
        raise BadInputError(exc.what, f"{exc.problem} (on {where})", exc.hint) from None
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise BadInputError(os.fspath(location), f"its store cannot be reached or refuses access"
                            f"{' from ' + where if where else ''} ({type(exc).__name__}: {exc})", STORE_HINT) from None


def exists(location: Location) -> bool:
    if is_local(location):
        return local_path(location).exists()
    fs, path = fs_and_path(location)
    return fs.exists(path)


def is_file(location: Location) -> bool:
    """A file. A store that cannot answer raises (fsspec's ``isfile`` would say False, and an
    unreachable endpoint would read as "not found")."""
    if is_local(location):
        return local_path(location).is_file()
    fs, path = fs_and_path(location)
    try:
        return fs.info(path)["type"] == "file"
    except FileNotFoundError:
        return False


def is_dir(location: Location) -> bool:
    """A folder; on an object store, a prefix that holds at least one object."""
    if is_local(location):
        return local_path(location).is_dir()
    fs, path = fs_and_path(location)
    return fs.isdir(path)


def size(location: Location) -> int:
    if is_local(location):
        return local_path(location).stat().st_size
    fs, path = fs_and_path(location)
    return int(fs.size(path))


def open_read(location: Location) -> IO[bytes]:
    """A binary file object to read ``location`` from (streamed for URLs)."""
    if is_local(location):
        return open(local_path(location), "rb")
    fs, path = fs_and_path(location)
    return fs.open(path, "rb")


def read_bytes(location: Location) -> bytes:
    with open_read(location) as fh:
        return fh.read()


def read_text(location: Location) -> str:
    return read_bytes(location).decode()


def _bytes_if_present(location: Location) -> bytes | None:
    try:
        return read_bytes(location)
    except FileNotFoundError:
        return None


def remove(location: Location) -> None:
    """Delete a file; a missing one is fine (resume deletes what may not be there)."""
    if is_local(location):
        local_path(location).unlink(missing_ok=True)
        return
    fs, path = fs_and_path(location)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def makedirs(location: Location) -> None:
    """Create a folder (and parents); object stores need none, so nothing is written there."""
    if is_local(location):
        local_path(location).mkdir(parents=True, exist_ok=True)


def entries(folder: Location) -> list[str]:
    """Names of everything directly in ``folder`` (files and subfolders); empty when it does not exist."""
    if is_local(folder):
        try:
            return os.listdir(local_path(folder))
        except FileNotFoundError:
            return []
    fs, path = fs_and_path(folder)
    try:
        return [name(p) for p in fs.ls(path, detail=False, refresh=True)]
    except FileNotFoundError:
        return []


def list_files(folder: Location) -> dict[str, int]:
    """Files directly in ``folder``, name -> size (one listing, not one request per file);
    empty when the folder does not exist."""
    if is_local(folder):
        try:
            with os.scandir(local_path(folder)) as entries:
                return {e.name: e.stat().st_size for e in entries if e.is_file()}
        except FileNotFoundError:
            return {}
    fs, path = fs_and_path(folder)
    try:
        entries = fs.ls(path, detail=True, refresh=True)
    except FileNotFoundError:
        return {}
    return {name(e["name"]): int(e["size"]) for e in entries if e["type"] == "file"}


def find_files(folder: Location, suffix: str) -> list[Location]:
    """Every file under ``folder`` (recursively) whose name ends with ``suffix``, sorted."""
    if is_local(folder):
        return sorted(local_path(folder).rglob(f"*{suffix}"))
    fs, path = fs_and_path(folder)
    base = os.fspath(folder).rstrip("/")
    found = [p for p in fs.find(path) if p.endswith(suffix)]
    return sorted(join(base, relative(p, path.rstrip("/"))) for p in found)


class AtomicOutput:
    """A local temporary file that becomes ``location`` whole, or not at all.

    Local: a sibling ``<name>.tmp`` renamed over the target with ``os.replace`` (a crash
    leaves at most the ``.tmp``, which resume deletes). URL: a file in the local temp
    folder, put as one whole object on :meth:`commit` (nothing partial is ever visible
    at the URL). ``fsync`` makes a local commit durable before the rename (shards).
    """

    def __init__(self, location: Location, fsync: bool = False) -> None:
        self.location = as_location(location)
        self.fsync = fsync
        if is_local(location):
            target = local_path(location)
            self.tmp = target.with_name(target.name + TMP_SUFFIX)
        else:
            fd, tmp = tempfile.mkstemp(prefix="scribblegen-", suffix=f"-{name(location)}{TMP_SUFFIX}")
            os.close(fd)
            self.tmp = Path(tmp)

    def commit(self) -> None:
        """Make the finished temp file visible at ``location``."""
        if not is_local(self.location):
            fs, path = fs_and_path(self.location)
            try:
                fs.put_file(str(self.tmp), path)
            finally:
                self.tmp.unlink(missing_ok=True)
            return
        if self.fsync:
            with open(self.tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(self.tmp, self.location)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.discard()  # a no-op after a commit


def create_exclusive(location: Location, data: bytes) -> bool:
    """Write ``data`` to ``location`` only if nothing is there; True when ``data`` is there
    now (written by this call), False when something else is.

    Race-free. Locally ``link(2)`` of a finished temp file, so a reader never sees an empty
    file; on a filesystem without hard links (FUSE object stores) ``O_EXCL``, which a reader
    may see half-written. On object stores a conditional put, whose failures other than
    "exists" are settled by reading the object back: a put retried after its reply was lost
    finds its own bytes there (True), and a conflict with a concurrent put (S3's 409
    ``ConditionalRequestConflict``, or a 412 a store does not mark as If-None-Match) finds
    the other's (False) or nothing, and is tried again.
    """
    if is_local(location):
        return _create_local(local_path(location), data)
    fs, path = fs_and_path(location)
    retries = list(CREATE_RETRY_S)
    while True:
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except (PermissionError, FileNotFoundError):  # credentials, no bucket: nothing to settle
            raise
        except OSError as exc:
            held = _bytes_if_present(location)
            if held is not None or isinstance(exc, FileExistsError):  # gone since: another's, pruned
                return held == data
            if not retries:
                raise
            time.sleep(retries.pop(0) * random.uniform(0.5, 1.5))  # two drivers that conflicted must not meet again


def _create_local(target: Path, data: bytes) -> bool:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        try:
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in NO_HARD_LINKS:
                raise
        with open(target, "xb") as fh:  # no hard links here (FUSE object stores): create-if-absent, then write
            fh.write(data)
        return True
    except FileExistsError:
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)


def local_copy(location: Location, where: str = "") -> Path:
    """A local folder with the contents of ``location`` (a model folder): itself when local,
    else a cached copy under ``$SCRIBBLEGEN_CACHE`` (``~/.cache/scribblegen``).

    Diffusers and safetensors load from local files only. The cache key is the URL plus
    every file's relative name and size, so a changed folder is copied again; the copy is
    made in a temp folder and renamed into place, so a crash never leaves half a model.
    A store that does not answer is named, with ``where`` (see :func:`reached`).
    """
    if is_local(location):
        return local_path(location)
    with reached(location, where):  # the store's first answer; the cache's own disk errors stay what they are
        fs, path = fs_and_path(location)
        found = fs.find(path, detail=True)
    files = sorted((relative(p, path.rstrip("/")), int(info["size"])) for p, info in found.items())
    if not files:
        raise BadInputError(os.fspath(location), "holds no files", "check the URL")
    key = hashlib.sha256(json.dumps([os.fspath(location), files]).encode()).hexdigest()[:16]
    root = Path(os.environ.get(MODEL_CACHE_ENV, Path.home() / ".cache" / "scribblegen")) / "models"
    target = root / f"{name(location)}-{key}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}."))
    try:
        for rel, _ in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{path.rstrip('/')}/{rel}", str(tmp / rel))
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # not a concurrent copy that won the rename
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
