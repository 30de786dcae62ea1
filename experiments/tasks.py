"""Heavy sweep stages as Ray tasks: the driver (a CPU-only head is enough) only submits and waits.

ControlNet training, FID, the judge and every seg run go to the cluster with the resources
they need -- CPUs, and one GPU each where the cluster has GPUs -- so a sweep submitted with
``ray job submit`` to a head without a GPU trains on the GPU nodes instead of silently on
the head's CPU. Locally, the same code runs the tasks on the local Ray instance.

Tasks run with tqdm silenced (interleaved bars from several processes are unreadable); a
stage that wants a bar gives :func:`gather` a ``poll`` that reads the task's own progress
from the files it writes (e.g. the last step of ``loss.jsonl``), so the driver's bar tells
the truth without any channel back from the task.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from engine.errors import BadInputError

POLL_S = 2.0  # how often a waiting driver refreshes its progress bar


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def largest_node_cpus(with_gpu: bool) -> float:
    """CPUs of the largest alive node (of the nodes with a GPU when ``with_gpu``): a task that
    asks for at most this many can always be placed."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cpus = [r.get("CPU", 0.0) for r in nodes if not with_gpu or r.get("GPU", 0) > 0]
    return max(cpus, default=0.0)


class Resources(NamedTuple):
    """What one stage task asks for; resolved once per stage from the live cluster."""

    cpus: float
    gpus: float  # 1, or a share of one GPU that several small tasks split (seg_gpus_per_run)

    def __str__(self) -> str:
        return f"{self.cpus:g} CPU{f', {self.gpus:g} GPU' if self.gpus else ''}"

    def threads(self, configured: int) -> int:
        """Torch threads inside the task: the configured count, else one per CPU it holds."""
        return configured or max(1, int(self.cpus))


def task_resources(cpus: float, gpu_share: float = 1.0) -> Resources:
    """``(num_cpus, num_gpus)`` for a stage task: ``cpus`` (0 = every CPU of the largest node
    that can host it) and, where the cluster has GPUs, ``gpu_share`` of one (1: a GPU of its
    own). Refuses what no node can hold."""
    gpus = gpu_share if cluster_has_gpus() else 0.0
    room = largest_node_cpus(bool(gpus))
    want = cpus or room
    if want > room:
        where = "node with a GPU" if gpus else "node"
        raise BadInputError(f"{want:g} CPUs per task", f"the largest {where} of the cluster has {room:g}",
                            "lower stage_cpus / seg_cpus_per_run")
    return Resources(want, gpus)


def remote(fn: Callable[..., Any], resources: Resources) -> Any:
    """``fn`` as a Ray remote function asking for ``resources`` (no retries: a stage resumes
    from its own checkpoints when the sweep is run again)."""
    import ray

    return ray.remote(fn).options(num_cpus=resources.cpus, num_gpus=resources.gpus, max_retries=0,
                                  runtime_env={"env_vars": {"TQDM_DISABLE": "1"}})


def gather(refs: dict[Any, str], on_done: Callable[[str, Any], None] | None = None,
           poll: Callable[[], None] | None = None) -> dict[str, Any]:
    """Wait for every task (name by ref); return name -> result, calling ``on_done`` as each
    finishes and ``poll`` every :data:`POLL_S` while waiting. The first failure cancels the
    rest and is raised as the task's own ``BadInputError`` where it was one (a clear message,
    not a Ray traceback)."""
    import ray
    from ray.exceptions import RayTaskError

    from engine.generate.distributor import task_cause

    pending, done = dict(refs), {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S if poll else None)
            if poll:
                poll()
            for ref in ready:
                name = pending.pop(ref)
                try:
                    done[name] = ray.get(ref)
                except RayTaskError as exc:
                    cause = task_cause(exc)
                    raise (cause if isinstance(cause, BadInputError) else exc) from None
                if on_done:
                    on_done(name, done[name])
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
    return done


def placement() -> dict[str, Any]:
    """Where the calling task runs (recorded in the sweep record: which node, which GPUs)."""
    import ray

    ctx = ray.get_runtime_context()
    return {"node": ctx.get_node_id()[:12], "gpus": [str(g) for g in ray.get_gpu_ids()]}


def train_controlnet(cn: Any, resume: bool) -> tuple[str, dict[str, Any]]:
    """ControlNet training as a task body: the final bundle folder and where it ran. It lives
    here, not in the sweep module, so the worker imports only the trainer (not the judge's
    and the report's dependencies) before it starts."""
    from engine.train_controlnet import train

    return str(train(cn, resume=resume, progress=False)), placement()
