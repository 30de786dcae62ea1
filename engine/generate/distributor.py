"""The Ray side: connect, size the actor pool, hand units to actors, survive actor deaths.

Fault model. An actor is one model replica in one process. When the process dies
(killed, OOM, segfault) Ray restarts it up to ``max_restarts`` times (the model is
reloaded in ``__init__``); tasks are never retried by Ray (``max_task_retries=0``)
because this loop does it: every unit that was queued on the dead actor goes back to
the front of the queue and runs again on any live actor, up to ``unit_retries`` times
(the unit reserved for it as its next one, see :class:`UnitQueue`, goes back untried).
A unit is retried whole: its half-written ``.tmp`` is simply overwritten, so a shard
is written exactly once. After a death the actor gets no new work until a probe call
answers (it is back) or fails for good (it is retired); the run fails only when no
actor is left, when one unit keeps failing, or at once on a :class:`BadInputError`.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from engine import storage
from engine.errors import BadInputError
from engine.generate.config import GenerateConfig
from engine.generate.plan import WorkUnit
from engine.generate.worker import ShardGenerator, ShardResult


class GenerationError(RuntimeError):
    """The run cannot finish (units keep failing or every actor died); rerun resumes."""


PROBE_SECONDS = 3.0  # a live GCS accepts a TCP connection at once; a stale record never will
REPROBE_S = 1.0  # how often an actor that Ray is restarting (its node died) is asked again
RESTART_WAIT_S = 180.0  # how long such an actor may stay unavailable before it is given up


def _last_ray_start() -> str | None:
    """The address Ray recorded at the last ``ray start`` on this machine (``ray_current_cluster``)."""
    from ray._private.utils import read_ray_address

    return read_ray_address()


def cluster_address(address: str | None) -> tuple[str | None, str]:
    """The cluster ``ray.init`` would join and where that address comes from (None: a new private instance)."""
    if address and address != "local":
        return address, "ray.address in the config"
    if address == "local":
        return None, "a private local instance"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "$RAY_ADDRESS"
    recorded = _last_ray_start()
    return (recorded, "Ray's record of the last `ray start` on this machine") if recorded else (None, "a new local instance")


def check_reachable(address: str | None, source: str, timeout: float = PROBE_SECONDS) -> None:
    """Fail in seconds, naming the address, when a ``host:port`` cluster does not answer.

    Without this, ``ray.init`` waits for a dead GCS for many minutes, silently (for
    example after a ``ray start --head`` was killed: its record still names it).
    """
    if not address or "://" in address:  # ray:// clients and bad http:// addresses: Ray's own errors
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return
    except (OSError, ValueError):
        pass
    if source.startswith("Ray's record"):
        hint = "the cluster it names is gone: `ray stop` clears the record, or set ray.address: local"
    elif source == "$RAY_ADDRESS":
        hint = "start that cluster, or unset RAY_ADDRESS to run locally"
    else:
        hint = "start that cluster (`ray start --head`), fix ray.address, or set ray.address: local"
    raise BadInputError(f"Ray cluster {address} (from {source})", f"does not answer within {timeout:g} s", hint)


def connect(address: str | None = None, local_num_cpus: int | None = None) -> str:
    """Join the run's Ray cluster; return ``"existing"`` (already initialised), ``"cluster"`` (joined
    a running one), ``"local"`` or ``"default"`` (started a private one).

    Order: an already initialised Ray (tests, notebooks); ``address`` from the config
    (``"local"`` forces a private instance); else Ray's default (``"default"``):
    ``$RAY_ADDRESS`` (``ray job submit`` sets it for its driver), or the cluster of the
    last ``ray start`` on this machine, or a new private instance with the dashboard off.
    Never Ray's ``"auto"``: it joins *any* Ray instance it finds running on the machine,
    such as another program's private one, whose exit then kills this run's actors.
    """
    import ray

    if ray.is_initialized():
        return "existing"
    local = dict(address="local", num_cpus=local_num_cpus, include_dashboard=False, dashboard_host="127.0.0.1")
    joins, source = cluster_address(address)
    check_reachable(joins, source)
    try:
        if address == "local":
            ray.init(**local)
            return "local"
        if address:
            ray.init(address=address)
            return "cluster"
        ray.init(**{**local, "address": None})
        return "cluster" if joins else "default"
    except (ValueError, ConnectionError) as exc:  # unreachable, or RAY_ADDRESS=http://... (the job API's)
        raise BadInputError(f"Ray address {address or os.environ.get('RAY_ADDRESS')!r}", str(exc)) from None


JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # Ray sets it for the entrypoint of a submitted job


def check_job_paths(outputs: dict[str, str], inputs: dict[str, str]) -> None:
    """Refuse relative paths in a job submitted with ``--working-dir``: its entrypoint runs in
    Ray's temporary copy of the repo, so a relative output would land in a folder Ray deletes
    (the run succeeds and the set is lost) and a relative input is looked for in that copy,
    which holds no ``runs/``. ``outputs`` / ``inputs``: config key -> location."""
    job = json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}")
    in_copy = f"{os.sep}working_dir_files{os.sep}" in os.getcwd()  # an entrypoint may `cd` elsewhere first
    if not (job.get("runtime_env") or {}).get("working_dir") or not in_copy:
        return
    for key, location in {**inputs, **outputs}.items():
        if not storage.is_local(location) or storage.local_path(location).is_absolute():
            continue
        if key in outputs or not storage.exists(location):
            fate = "which Ray deletes" if key in outputs else "where it does not exist"
            raise BadInputError(f"{key}={location}", f"is a relative path in a job submitted with --working-dir: it "
                                f"resolves inside Ray's temporary copy of the repo ({os.getcwd()}), {fate}",
                                f"give an absolute path (--set {key}=/abs/path) or a URL")


def _path_exists(location: str) -> bool:
    """Does this node see ``location``? A path: exists here. A URL: its store answers with this
    node's credentials and endpoint (else a BadInputError naming the node and the cause)."""
    if storage.is_local(location):
        try:
            return storage.exists(location)
        except OSError:  # a path this node cannot stat
            return False
    with storage.reached(location, where=f"Ray node {socket.gethostname()}"):
        return storage.exists(location)


def check_visible_everywhere(paths: list[str], timeout: float = 60.0) -> None:
    """Refuse paths that some node cannot see (a node-local folder on a multi-node cluster),
    and URLs whose store some node cannot reach (its environment lacks the credentials).

    Actors read sources and write shards on whatever node they run; a path that exists on
    the driver's node only would scatter the parts and fail the merge. One zero-CPU task
    per alive node checks each path (an existing file or folder) where it runs. URLs are
    checked on one node too: a node's environment is its ``ray start``'s, not the driver's.
    """
    import ray
    from ray.exceptions import GetTimeoutError, RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        paths = [p for p in paths if not storage.is_local(p)]
    if not paths:
        return
    probe = ray.remote(_path_exists)
    refs = {(n["NodeManagerAddress"], p): probe.options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(p)
        for n in nodes for p in paths}
    try:
        answers = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout)))
    except RayTaskError as exc:  # a node without the store's credentials or endpoint
        cause = task_cause(exc)
        raise cause if isinstance(cause, BadInputError) else exc from None
    except GetTimeoutError:
        _, late = ray.wait(list(refs.values()), num_returns=len(refs), timeout=0)
        for ref in late:
            ray.cancel(ref, force=True)
        host, path = next(key for key, ref in refs.items() if ref in late)
        raise BadInputError(path, f"Ray node {host} did not answer whether it sees this within {timeout:g} s "
                            f"({len(late)} of {len(refs)} checks)", storage.STORE_HINT) from None
    missing = sorted({(host, p) for (host, p), ok in answers.items() if not ok})
    if missing:
        host, path = missing[0]
        raise BadInputError(path, f"is not visible from Ray node {host} ({len(missing)} path/node pair(s) missing "
                            f"on a {len(nodes)}-node cluster)",
                            "put out_dir, the real shards and the model on a filesystem every node mounts, "
                            "or on an object store (s3://, gs://)")


@dataclass
class PoolShape:
    """Where the replicas run: device, how many, and the Ray resources of each."""

    device: str
    num_actors: int
    options: dict[str, Any] = field(default_factory=dict)


def pool_shape(cfg: GenerateConfig, resources: dict[str, float]) -> PoolShape:
    """One GPU actor per GPU when the cluster has GPUs (``device: auto``), else CPU actors."""
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 0))
    device = cfg.sampler.device
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device == "cuda" and not gpus:
        raise BadInputError("sampler.device", "is 'cuda' but the Ray cluster has no GPU", "use 'auto' or 'cpu'")
    num_actors = cfg.ray.num_actors or (gpus if device == "cuda" else 1)
    num_gpus = 1 if device == "cuda" else 0
    if num_actors * num_gpus > gpus or num_actors * cfg.ray.num_cpus_per_actor > cpus:
        raise BadInputError(
            "ray.num_actors",
            f"{num_actors} actor(s) x ({cfg.ray.num_cpus_per_actor} CPU, {num_gpus} GPU) exceed the cluster's "
            f"{cpus:g} CPU / {gpus} GPU",
            "lower ray.num_actors or ray.num_cpus_per_actor",
        )
    options = {
        "num_cpus": cfg.ray.num_cpus_per_actor,
        "num_gpus": num_gpus,
        "max_restarts": cfg.ray.max_restarts,
        "max_task_retries": 0,
    }
    return PoolShape(device, num_actors, options)


def task_cause(exc: BaseException) -> BaseException:
    """The user exception inside a Ray task error (Ray wraps it, keeping it as ``cause``)."""
    return getattr(exc, "cause", None) or exc


class UnitQueue:
    """The units not yet sent to an actor: a shared queue, plus one unit reserved per actor.

    An actor is told its first unit when it is created (it reads its sources while its model
    loads) and its next unit (the one reserved for it) with every unit it runs, so it loads
    that unit's sources and samples its first batch before the unit arrives. A
    reservation is only a hint: it is taken by its actor first, but an idle actor takes
    another's once the shared queue is empty (work stealing at the tail), and a dead
    actor's goes back to the front of the queue.
    """

    def __init__(self, units: list[WorkUnit], num_actors: int) -> None:
        self.pending: deque[WorkUnit] = deque(units)
        self.reserved: list[WorkUnit | None] = [None] * num_actors

    def __bool__(self) -> bool:
        return bool(self.pending) or any(u is not None for u in self.reserved)

    def take(self, actor: int, steal: bool = True) -> WorkUnit | None:
        """The unit ``actor`` runs next: its reservation, else the queue's head, else (``steal``)
        another's reservation."""
        unit, self.reserved[actor] = self.reserved[actor], None
        if unit is None and self.pending:
            unit = self.pending.popleft()
        return unit if unit is not None or not steal else self._steal()

    def _steal(self) -> WorkUnit | None:
        for other, unit in enumerate(self.reserved):
            if unit is not None:
                self.reserved[other] = None
                return unit
        return None

    def reserve(self, actor: int) -> WorkUnit | None:
        """Reserve the queue's head for ``actor`` (after ``take``): the hint sent with its unit."""
        if self.pending and self.reserved[actor] is None:
            self.reserved[actor] = self.pending.popleft()
        return self.reserved[actor]

    def dispatch(self, load: list[int], inflight: int, ready: list[bool]) -> list[tuple[int, WorkUnit, WorkUnit | None]]:
        """What to send now, as ``(actor, unit, next-unit hint)``; ``load`` (units in flight per
        actor) is updated in place. One unit per ready actor per pass, up to ``inflight`` each,
        so no actor queues a second unit while another has none; an actor steals another's
        reservation only when it has nothing in flight (the tail), never its first unit."""
        sent: list[tuple[int, WorkUnit, WorkUnit | None]] = []
        progress = True
        while progress:
            progress = False
            for actor, free in enumerate(ready):
                if not free or load[actor] >= inflight:
                    continue
                unit = self.take(actor, steal=load[actor] == 0)
                if unit is None:
                    continue
                load[actor] += 1
                sent.append((actor, unit, self.reserve(actor)))
                progress = True
        return sent

    def push_front(self, unit: WorkUnit) -> None:
        """A unit to run again (its attempt failed) goes first."""
        self.pending.appendleft(unit)

    def release(self, actor: int) -> None:
        """``actor`` died: its reservation goes back to the front of the queue."""
        unit, self.reserved[actor] = self.reserved[actor], None
        if unit is not None:
            self.push_front(unit)


class Distributor:
    """A pool of :class:`ShardGenerator` actors and the retry loop that feeds it."""

    def __init__(self, shape: PoolShape, actor_kwargs: dict[str, Any], units: list[WorkUnit], inflight: int = 2,
                 unit_retries: int = 3) -> None:
        import ray

        remote_cls = ray.remote(ShardGenerator)
        self.shape = shape
        self.inflight = inflight
        self.unit_retries = unit_retries
        self.max_probes = int(shape.options.get("max_restarts", 0)) + 1
        # Longest first: the expensive units (high λ: more steps with truncate spacing, larger
        # shards) start early, so the run does not end waiting on one slow unit at the tail.
        self.queue = UnitQueue(sorted(units, key=lambda u: (-u.lam, -len(u.items), u.index)), shape.num_actors)
        # Each actor is told its first unit when it starts, so its sources load while its model loads.
        # (An actor that Ray restarts gets the same hint again: one wasted read, never a wrong shard.)
        self.actors = [remote_cls.options(**shape.options).remote(**actor_kwargs, first_unit=self.queue.reserve(i))
                       for i in range(shape.num_actors)]
        self.actor_deaths = 0  # process deaths seen (each one consumed a Ray restart)
        self.unit_failures = 0  # unit attempts that failed (actor death or task error)

    def pids(self, timeout: float | None = None) -> list[int]:
        """Wait until every replica is placed and has loaded its model; their process ids.

        After ``timeout`` seconds with actors still unplaced (or loading), stop with a
        message that names what each actor asks for and what the cluster has free.
        """
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        refs = [a.pid.remote() for a in self.actors]
        _, waiting = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if waiting:
            for actor in self.actors:
                ray.kill(actor)
            asks = {k: v for k, v in self.shape.options.items() if k in ("num_cpus", "num_gpus", "resources")}
            free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
            total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
            raise BadInputError(
                f"{len(waiting)} of {len(refs)} generation actors",
                f"were not placed and ready within {timeout:g} s: each asks for {asks}; the cluster has {free} free "
                f"of {total}", "lower ray.num_actors or the per-actor resources, add nodes, or raise ray.placement_timeout_s",
            )
        try:
            return ray.get(refs)
        except RayTaskError as exc:  # the model folder is bad: say so, like any bad input
            cause = task_cause(exc)
            if isinstance(cause, BadInputError):
                raise cause from None
            raise GenerationError(f"a generation actor failed to start: {exc}") from None
        except RayActorError as exc:
            raise GenerationError(f"a generation actor failed to start: {exc}") from None

    def run(self, on_result: Callable[[ShardResult], None] | None = None) -> list[ShardResult]:
        """Run every unit once, successfully, on some actor; return the results as they came."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

        queue = self.queue
        attempts: Counter[int] = Counter()
        tasks: dict[Any, tuple[int, WorkUnit | None]] = {}  # ref -> (actor, unit); unit None = probe
        load = [0] * len(self.actors)
        state = ["ok"] * len(self.actors)  # ok | probing | dead
        probes = [0] * len(self.actors)
        results: list[ShardResult] = []
        # An actor whose node died is "temporarily unavailable" while Ray restarts it on
        # another node: it is probed again every REPROBE_S until it answers, for up to
        # RESTART_WAIT_S, without using up its restarts.
        reprobe_at: dict[int, float] = {}
        unavailable_since: dict[int, float] = {}

        def probe(i: int, count: bool = True) -> None:
            state[i] = "probing"
            probes[i] += count
            tasks[self.actors[i].pid.remote()] = (i, None)

        def retry(unit: WorkUnit, why: BaseException) -> None:
            self.unit_failures += 1
            attempts[unit.index] += 1
            if attempts[unit.index] > self.unit_retries:
                raise GenerationError(
                    f"shard {unit.shard} failed {attempts[unit.index]} times, last: {why}"
                    " (if actors run out of memory, lower sampler.batch_size)"
                )
            queue.push_front(unit)

        while queue or any(u is not None for _, u in tasks.values()):
            for i in [i for i, t in reprobe_at.items() if time.monotonic() >= t]:
                del reprobe_at[i]
                probe(i, count=False)
            for i, unit, hint in queue.dispatch(load, self.inflight, [st == "ok" for st in state]):
                tasks[self.actors[i].run.remote(unit, hint)] = (i, unit)
            if not tasks and not reprobe_at:
                raise GenerationError(f"all {len(self.actors)} generation actors died; rerun to resume")
            ready, _ = ray.wait(list(tasks), num_returns=1, timeout=REPROBE_S if reprobe_at else None)
            if not ready:
                continue
            ref = ready[0]
            i, unit = tasks.pop(ref)
            if unit is None:  # a probe of a restarted actor
                try:
                    ray.get(ref)
                    state[i] = "ok"
                    unavailable_since.pop(i, None)
                except RayActorError as exc:
                    waited = time.monotonic() - unavailable_since.setdefault(i, time.monotonic())
                    if isinstance(exc, ActorUnavailableError) and waited < RESTART_WAIT_S:
                        reprobe_at[i] = time.monotonic() + REPROBE_S  # being restarted elsewhere: ask again soon
                    elif isinstance(exc, ActorDiedError) or probes[i] >= self.max_probes:
                        state[i] = "dead"
                        print(f"generate: actor {i} is gone for good: {str(exc).splitlines()[0]}", file=sys.stderr)
                    else:
                        probe(i)
                except RayTaskError as exc:  # restarted, but could not load the model there (its node's store access)
                    state[i] = "dead"
                    print(f"generate: actor {i} is gone for good: it restarted but {task_cause(exc)}", file=sys.stderr)
                continue
            load[i] -= 1
            try:
                result = ray.get(ref)
            except RayTaskError as exc:  # the task raised; the actor is alive
                cause = task_cause(exc)
                if isinstance(cause, BadInputError):
                    raise cause from None
                retry(unit, cause)
                continue
            except ray.exceptions.RayError as exc:  # the actor process died (or is restarting)
                if state[i] == "ok":
                    self.actor_deaths += 1
                    probe(i)
                    queue.release(i)
                retry(unit, exc)
                continue
            results.append(result)
            if on_result is not None:
                on_result(result)
        return results

    def shutdown(self, timeout: float = 30.0) -> None:
        """Kill the replicas now and wait until they are gone (a driver that keeps running
        must not keep their memory, and a unit cut short must not write after this)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        gone = [actor.pid.remote() for actor in self.actors]  # each fails once its actor is dead
        ray.wait(gone, num_returns=len(gone), timeout=timeout)
