"""One training in several processes: the torch.distributed setup that ControlNet training
(``engine/train_controlnet.py``) and segmentation (``seg/train.py``) share.

``torchrun --nproc_per_node N`` starts N copies of a job and tells each its place through
the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); :func:`setup_distributed` turns
that into a process group (NCCL between GPUs, gloo between CPU processes) and the rank's
device. Gradients are then averaged by ``torch.nn.parallel.DistributedDataParallel``; the
helpers here only cover what DDP does not: which rows of a global batch a rank trains on,
a value every rank must agree on, and a decision rank 0 makes for all. Outside ``torchrun``
(one process) there is no process group and every helper is a cheap no-op, so the
one-process path stays exactly what it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from engine.errors import BadInputError


def pick_device(name: str) -> torch.device:
    """``train.device`` (auto | cpu | cuda | cuda:N) as a device; refuses CUDA where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"train.device={name}", "CUDA is not available on this machine", "use --set train.device=cpu")
    return torch.device(name)


def setup_distributed(device_cfg: str) -> tuple[int, int, torch.device]:
    """``(rank, world size, device)``; under ``torchrun`` joins the process group first.

    Each rank of a multi-process CUDA run takes the GPU ``cuda:LOCAL_RANK`` (one process per
    GPU, as torchrun lays them out), so a fixed ``cuda:N`` there is refused rather than
    putting every rank on one card.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_cfg)
    if device.type == "cuda" and world > 1 and device.index is not None:
        raise BadInputError(f"train.device={device_cfg}", f"under torchrun each of the {world} ranks uses its own GPU "
                            "(cuda:LOCAL_RANK)", "set train.device=cuda or auto")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else device.index or 0)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # NCCL bound to this rank's GPU up front: otherwise its first barrier guesses the
        # device from the rank and can put every rank's barrier on one card.
        group = {"backend": "nccl", "device_id": device} if device.type == "cuda" else {"backend": "gloo"}
        dist.init_process_group(**group)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


def shutdown_distributed() -> None:
    """Leave the process group (if any), so a job can end or set up again cleanly."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main(rank: int) -> bool:
    """Rank 0 alone writes files, logs and draws progress bars: N writers of one path would race."""
    return rank == 0


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has saved what the others will return)."""
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a (scalar) tensor over all ranks: the global batch's loss from each rank's
    share, so every rank logs, and checks for divergence, the same number."""
    if not dist.is_initialized():
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def decide_on_main(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank. Clock-based decisions (a time box) differ between
    processes by a step now and then; a rank that stopped alone would leave the others
    waiting forever in the next gradient all-reduce."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def check_same_on_all_ranks(value: Any, what: str, fix: str) -> None:
    """Refuse to go on unless every rank holds the same ``value`` (e.g. the step a resumed
    run starts at: ranks that read different checkpoints would silently train apart)."""
    if not dist.is_initialized():
        return
    seen: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, value)
    if any(v != seen[0] for v in seen):
        raise BadInputError(what, f"differs between ranks: {seen}", fix)


@dataclass(frozen=True)
class BatchShare:
    """The rows ``rows`` of a global batch of ``total`` samples that one rank trains on.

    Every rank draws the randomness of the whole global batch (noise, timesteps, dropout,
    flips: small next to a forward pass) from the step's shared generator and keeps only its
    rows, so splitting a batch changes no sample's draws: N ranks do the math of one process
    on the global batch, up to float summation order.
    """

    total: int
    rows: slice

    @property
    def size(self) -> int:
        return self.rows.stop - self.rows.start

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor drawn for the whole global batch."""
        return x[self.rows]


def batch_share(total: int, rank: int = 0, world: int = 1) -> BatchShare:
    """Rank ``rank``'s equal, contiguous share of a global batch of ``total``. Equal shares
    are what make DDP's average of per-rank gradients the gradient of the global mean loss."""
    if total % world:
        raise BadInputError(f"train.batch_size={total}", f"must be divisible by the number of ranks ({world}): "
                            "it is the global batch, split evenly between them",
                            f"use a multiple of {world}, e.g. --set train.batch_size={(total // world + 1) * world}")
    size = total // world
    return BatchShare(total, slice(rank * size, (rank + 1) * size))
