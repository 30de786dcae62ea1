"""ControlNet training on several processes (torch DDP, gloo on CPU) does the math of one.

The multi-process tests start ``torchrun --standalone --nproc_per_node 2`` on this very file:
run as a script it is one rank of ``python -m jobs.train_controlnet`` that records, through a
Python audit hook, every file operation it makes under the run folder. An audit hook sees
opens, mkdirs, renames and removals whatever code makes them, so "only rank 0 writes" is
checked without any test hook in the trainer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cn_fixtures import write_real_shards
from test_train_controlnet import micro_config

from engine.config import save_config
from engine.distributed import batch_share, check_same_on_all_ranks, decide_on_main, mean_over_ranks
from engine.errors import BadInputError
from engine.models import ScribbleGenModel
from engine.train_controlnet import InMemoryData, _shards_of_split, train

ROOT = Path(__file__).resolve().parents[1]
WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree", "tempfile.mkdtemp"}


# -- helpers without a process group ----------------------------------------------------------
def test_batch_share_splits_evenly_and_refuses_a_remainder():
    shares = [batch_share(8, rank, 4) for rank in range(4)]
    assert [(s.rows.start, s.rows.stop, s.size) for s in shares] == [(0, 2, 2), (2, 4, 2), (4, 6, 2), (6, 8, 2)]
    x = torch.arange(8)
    assert torch.equal(torch.cat([s.keep(x) for s in shares]), x)
    with pytest.raises(BadInputError, match=r"train.batch_size=6: must be divisible by the number of ranks \(4\).*batch_size=8"):
        batch_share(6, 1, 4)


def test_one_process_helpers_are_no_ops():
    assert decide_on_main(True, torch.device("cpu")) is True
    assert mean_over_ranks(torch.tensor(2.5)).item() == 2.5
    check_same_on_all_ranks(3, "x", "y")


def test_a_cuda_rank_binds_its_own_gpu_before_nccl_starts(monkeypatch):
    """Under torchrun each CUDA rank takes cuda:LOCAL_RANK and hands it to NCCL at init (a group
    started before that guesses the device for its barriers). No GPU here: CUDA is faked."""
    import engine.distributed as distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", str(device))))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: bool(calls) and calls[-1][0] == "init")
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    assert distributed.setup_distributed("cuda") == (1, 2, torch.device("cuda", 1))
    assert calls == [("set_device", "cuda:1"), ("init", {"backend": "nccl", "device_id": torch.device("cuda", 1)})]


def test_in_memory_shares_of_a_batch_are_the_batch(tmp_path):
    shards, names = _shards_of_split(str(write_real_shards(tmp_path)), "train")
    data = InMemoryData(shards, "train", 16, "stretch", names)
    for step in (0, 5):  # 5 x 4 samples: past the first epoch of 8
        whole = data.batch(step, batch_share(4), seed=3)
        halves = [data.batch(step, batch_share(4, rank, 2), seed=3) for rank in (0, 1)]
        assert np.array_equal(np.concatenate([h[0] for h in halves]), whole[0])
        assert halves[0][2] + halves[1][2] == whole[2]


# -- two ranks under torchrun -----------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The real shards and an uninterrupted one-process run: 4 steps of a global batch of 4."""
    folder = tmp_path_factory.mktemp("ddp")
    manifest = write_real_shards(folder / "real")
    train(micro_config(manifest, folder / "one"), progress=False)
    return folder, manifest


def _torchrun(folder: Path, manifest: Path, name: str, *args: str, **train_section: object) -> dict[int, list]:
    """``torchrun --nproc_per_node 2 -m jobs.train_controlnet`` on the micro config with
    ``train_section`` overrides (+ CLI ``args``) into ``folder/name``; returns, per rank, the
    file operations it made under that folder."""
    out, config, writes = folder / name, folder / f"{name}.yaml", folder / f"{name}-writes"
    save_config(micro_config(manifest, out, **train_section), config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDP_TEST_OUT": str(out), "DDP_TEST_WRITES": str(writes)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--config", str(config), "--no-progress", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {rank: json.loads((writes / f"rank{rank}.json").read_text()) for rank in (0, 1)}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return ScribbleGenModel.from_pretrained(run).state_dict()


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:  # equal up to float summation order (a batch of 4 vs two of 2, then an all-reduce)
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_ranks_train_like_one_process_and_only_rank_0_writes(runs):
    folder, manifest = runs
    writes = _torchrun(folder, manifest, "two")
    _assert_same_weights(folder / "one", folder / "two")
    one, two = _log(folder / "one"), _log(folder / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # one writer: no line twice
    assert [r["samples"] for r in two] == [4] * 4  # the global batch
    assert [r["dropped"] for r in two] == [r["dropped"] for r in one]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
    assert sorted(p.name for p in (folder / "two" / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert writes[0] and writes[1] == []  # the hook saw rank 0 write; rank 1 wrote nothing


@pytest.mark.slow
def test_two_ranks_stop_together_at_the_time_box_and_resume_exactly(runs):
    folder, manifest = runs
    first = _torchrun(folder, manifest, "boxed", max_minutes=1e-6)  # rank 0 stops both after step 1
    assert [p.name for p in (folder / "boxed" / "checkpoints").iterdir()] == ["step-00000001"]
    assert [r["step"] for r in _log(folder / "boxed")] == [1]
    resumed = _torchrun(folder, manifest, "boxed", "--resume", "--set", "train.max_minutes=0")
    assert [r["step"] for r in _log(folder / "boxed")] == [1, 2, 3, 4]
    _assert_same_weights(folder / "one", folder / "boxed")
    assert first[1] == [] and resumed[1] == []


# -- one rank of the torchrun tests ------------------------------------------------------------
def _record_writes_under(out: Path, record: Path) -> None:
    """Note this process's file operations under ``out``; write them to ``record`` at exit."""
    import atexit

    out_str = os.path.realpath(out)
    seen: list[list[str]] = []

    def under_out(path: object) -> bool:
        if not isinstance(path, (str, os.PathLike)):
            return False
        real = os.path.realpath(path)
        return real == out_str or real.startswith(out_str + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
                flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))
        else:
            path, writing = (args[0] if args else None), event in WRITE_EVENTS
        if writing and under_out(path):
            seen.append([event, os.fspath(path)])

    def dump() -> None:
        record.mkdir(parents=True, exist_ok=True)
        (record / f"rank{os.environ['RANK']}.json").write_text(json.dumps(seen))

    atexit.register(dump)
    sys.addaudithook(hook)


if __name__ == "__main__":
    import runpy

    _record_writes_under(Path(os.environ["DDP_TEST_OUT"]), Path(os.environ["DDP_TEST_WRITES"]))
    runpy.run_module("jobs.train_controlnet", run_name="__main__", alter_sys=True)
