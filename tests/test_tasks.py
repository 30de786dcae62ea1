"""Heavy sweep stages as Ray tasks (experiments/tasks.py): resources, placement, errors.

The cluster here declares two GPUs it does not have (``num_gpus=2``; each stage task takes one): Ray's scheduling and
``ray.get_gpu_ids`` behave exactly as on a GPU node, so the dispatch is tested without one.
"""

import time
from pathlib import Path

import pytest

from engine.errors import BadInputError
from experiments import tasks
from experiments.sweep import _stage_task, last_step


pytestmark = pytest.mark.slow  # a Ray instance and its workers: a minute or more on 2 loaded cores


@pytest.fixture(scope="module")
def gpu_cluster():
    ray = pytest.importorskip("ray")
    here = str(Path(__file__).resolve().parent)  # this module's functions run as the tasks
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": here}})
    yield
    ray.shutdown()


def _where() -> dict:
    return tasks.placement()


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _fail(seconds: float) -> None:
    time.sleep(seconds)
    raise BadInputError("stage input", "is bad", "fix it")


def test_stage_tasks_take_a_gpu_where_the_cluster_has_one_and_the_whole_node_by_default(gpu_cluster):
    import ray

    assert tasks.task_resources(0) == (2.0, 1) and tasks.task_resources(1) == (1.0, 1)
    assert str(tasks.task_resources(0)) == "2 CPU, 1 GPU"
    where = ray.get(tasks.remote(_where, tasks.task_resources(0)).remote())
    assert len(where["gpus"]) == 1 and len(where["node"]) == 12


def _barrier(folder: str, parties: int, timeout: float) -> bool:
    """Arrive, then wait until ``parties`` tasks have: True only if all ran at the same time."""
    Path(folder, f"{time.time_ns()}").touch()
    deadline = time.time() + timeout
    while len(list(Path(folder).iterdir())) < parties:
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_small_tasks_share_a_gpu(gpu_cluster, tmp_path):
    """seg_gpus_per_run 0.25: six runs at once on the cluster's two GPUs, three on each (a share
    of 0.5 would hold four at once, a whole GPU two); its 2 CPUs allow six at 0.25 each."""
    import ray

    share = tasks.task_resources(0.25, 0.25)
    assert share == (0.25, 0.25) and str(share) == "0.25 CPU, 0.25 GPU"
    assert ray.get([tasks.remote(_barrier, share).remote(str(tmp_path), 6, 300.0) for _ in range(6)]) == [True] * 6


def test_more_cpus_than_any_node_holds_is_refused_before_submitting(gpu_cluster):
    with pytest.raises(BadInputError, match="largest node with a GPU of the cluster has 2"):
        tasks.task_resources(3)


def test_a_failing_task_raises_its_own_error_and_cancels_the_rest(gpu_cluster):
    import ray

    slow = tasks.remote(_sleep, tasks.task_resources(1)).remote(600)
    bad = tasks.remote(_fail, tasks.task_resources(1)).remote(0.1)
    with pytest.raises(BadInputError, match="stage input: is bad"):
        tasks.gather({slow: "slow", bad: "bad"})
    with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.RayTaskError)):
        ray.get(slow, timeout=120)  # cancelled, not left running for 10 minutes


def test_gather_polls_while_waiting_and_reports_each_result(gpu_cluster):
    polls, finished = [], []
    one = tasks.task_resources(1)
    refs = {tasks.remote(_sleep, one).remote(2.5): "a", tasks.remote(_where, one).remote(): "b"}
    out = tasks.gather(refs, on_done=lambda name, _: finished.append(name), poll=lambda: polls.append(1))
    assert set(out) == {"a", "b"} and out["a"] is None and sorted(finished) == ["a", "b"] and len(polls) >= 2


def _stage(x: int, info: dict) -> int:
    import torch

    info["threads"] = torch.get_num_threads()
    return 2 * x


def test_a_stage_function_runs_in_a_task_with_its_threads_and_sends_its_info_back(gpu_cluster):
    import ray

    result, info = ray.get(tasks.remote(_stage_task, tasks.task_resources(1)).remote(_stage, 1, (21,)))
    assert result == 42 and info["threads"] == 1 and len(info["placement"]["gpus"]) == 1


def test_last_step_reads_a_training_log(tmp_path):
    log = tmp_path / "loss.jsonl"
    assert last_step(log) == 0
    log.write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.5}\n')
    assert last_step(log) == 20


@pytest.mark.parametrize("checkpoint, start", [("step-00000750", 750), (None, 0)])
def test_a_resumed_controlnet_stage_shows_progress_from_its_checkpoint(tmp_path, monkeypatch, checkpoint, start):
    """The driver's bar starts where the resumed task starts: the log past the newest
    checkpoint (written by the interrupted run) is trimmed before the task is submitted, and
    the whole log where the run was stopped before its first checkpoint (the task starts over:
    a bar starting at the old log's step would count down, at a negative rate)."""
    from contextlib import nullcontext

    import experiments.sweep as sweep
    from engine.config import from_dict

    cfg = from_dict(sweep.SweepConfig, {})
    folder = tmp_path / "controlnet"
    (folder / "checkpoints").mkdir(parents=True)
    if checkpoint:
        (folder / "checkpoints" / checkpoint).mkdir()
    (folder / "loss.jsonl").write_text("".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in (250, 500, 750, 1000, 1070)))
    real = tmp_path / "manifest.parquet"
    real.write_bytes(b"not read: only digested")
    seen = {}

    def gather(refs, poll=None):
        seen["at_submit"] = last_step(folder / "loss.jsonl")
        return {"controlnet": (str(folder / "final"), {})}

    monkeypatch.setattr(sweep, "ray_session", lambda *a: nullcontext())
    monkeypatch.setattr(tasks, "task_resources", lambda cpus, gpu_share=1.0: tasks.Resources(1.0, 0))
    monkeypatch.setattr(tasks, "remote", lambda fn, resources: type("R", (), {"remote": staticmethod(lambda *a: "ref")}))
    monkeypatch.setattr(tasks, "gather", gather)
    info: dict = {}
    sweep.stage_controlnet(cfg, tmp_path, real, info)
    assert info["resumed"] == bool(checkpoint) and seen["at_submit"] == start
