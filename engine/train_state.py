"""Training state on disk: atomic, safetensors-only checkpoints and an EMA of weights.

A checkpoint is a folder ``step-XXXXXXXX/`` holding the trainable parameters, the
optimizer moments and (optionally) the EMA shadow weights as safetensors, plus a small
``state.json``. It is written to a temporary folder and renamed, so a visible checkpoint
is always whole and ``latest_checkpoint`` can trust whatever it finds. Nothing here is
ever read with ``torch.load``/pickle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engine.atomic import write_text
from engine.errors import BadInputError

CKPT_RE = re.compile(r"^step-(\d{8})$")


class EMA:
    """Exponential moving average of named parameters (shadow copies kept in float32)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float) -> None:
        self.params = params
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for k, p in self.params.items():
            p.copy_(self.shadow[k].to(p.dtype))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Flatten an optimizer state dict into safetensors-friendly tensors + JSON groups."""
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{name}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    params: dict[str, torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    ema: EMA | None,
    keep: int = 2,
) -> Path:
    """Write ``ckpt_dir/step-XXXXXXXX`` atomically; keep only the newest ``keep`` checkpoints."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=ckpt_dir))
    try:
        save_file({k: p.detach().cpu().contiguous() for k, p in params.items()}, tmp / "params.safetensors")
        opt_tensors, groups = _optimizer_tensors(opt)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        if ema is not None:
            save_file({k: v.cpu().contiguous() for k, v in ema.shadow.items()}, tmp / "ema.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "param_groups": groups}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and CKPT_RE.match(p.name))


def checkpoint_step(path: str | Path) -> int:
    """The step a checkpoint folder ``step-XXXXXXXX`` holds, from its name."""
    return int(CKPT_RE.match(Path(path).name).group(1))


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def load_checkpoint(
    path: str | Path, params: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer, ema: EMA | None
) -> int:
    """Restore parameters, optimizer and EMA in place from ``path``; return its step."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        saved = load_file(path / "params.safetensors")
    except (OSError, ValueError) as exc:
        raise BadInputError(str(path), f"unreadable checkpoint: {exc}", "delete it to resume from an older one")
    if set(saved) != set(params):
        raise BadInputError(str(path), "checkpoint does not match this model's trainable parameters",
                            "resume with the same config that wrote it")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k].to(p.device, p.dtype))
    _load_optimizer(opt, load_file(path / "optimizer.safetensors"), state["param_groups"])
    if ema is not None and (path / "ema.safetensors").is_file():
        ema.shadow = {k: v.to(params[k].device) for k, v in load_file(path / "ema.safetensors").items()}
    return int(state["step"])


def trim_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be re-run)."""
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        write_text(path, "".join(ln + "\n" for ln in keep))


def resume_run(ckpt_dir: str | Path, log_path: Path, params: dict[str, torch.nn.Parameter],
               opt: torch.optim.Optimizer, ema: EMA | None, resume: bool) -> int:
    """The step a run starts at: the newest checkpoint's when resuming (its loss log trimmed
    to it), else 0 with any old loss log removed."""
    ckpt = latest_checkpoint(ckpt_dir) if resume else None
    if ckpt is not None:
        start = load_checkpoint(ckpt, params, opt, ema)
        trim_log(log_path, start)
        return start
    if log_path.exists():
        log_path.unlink()
    return 0
