"""Prompt building and the two text conditioners (tiny class tokens, CLIP for SD 1.5).

Both conditioners expose the same two calls, so the trainer and sampler never branch on
the model kind:

- ``encode(names_batch)`` -> ``B x L x D`` embeddings for prompts built from class names;
- ``null(batch)`` -> the "dropped prompt" embedding (CFG's unconditional text branch).

The tiny conditioner needs no tokenizer files: every class name is one learned token,
plus a prompt-prefix token and a null/pad token. It is a diffusers ``ModelMixin`` so it
saves and loads (config + safetensors) exactly like the UNet and ControlNet do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from engine.errors import BadInputError
from engine.shards import UNLABELLED

PROMPT = "a high-quality, detailed, and professional image"


def prompt_for(names: Sequence[str]) -> str:
    """The paper's prompt: the fixed phrase, then `` of <class names>`` when there are any."""
    return f"{PROMPT} of {', '.join(names)}" if names else PROMPT


def names_for_ids(class_ids: Sequence[int], class_names: Sequence[str]) -> list[str]:
    """Prompt class names of a sample: its present ids, background (0) and 255 left out."""
    out = []
    for c in sorted(set(int(c) for c in class_ids)):
        if c in (0, UNLABELLED):
            continue
        if c >= len(class_names):
            raise BadInputError(f"class id {c}", f"out of range for {len(class_names)} class names")
        out.append(class_names[c])
    return out


class ClassTokenEncoder(ModelMixin, ConfigMixin):
    """Tiny text encoder: one learned embedding per class name, a prefix and a null token.

    A prompt for classes ``{a, b}`` is ``[PREFIX, a, b, NULL, NULL, ...]`` (length
    ``max_tokens``); the dropped prompt is all ``NULL``. Class order is canonical (sorted
    ids), so the same set always gives the same tokens.
    """

    @register_to_config
    def __init__(self, class_names: list[str], dim: int = 32, max_tokens: int = 8) -> None:
        super().__init__()
        self.index = {name: i for i, name in enumerate(class_names)}
        self.prefix_id = len(class_names)
        self.null_id = len(class_names) + 1
        self.embed = nn.Embedding(len(class_names) + 2, dim)
        nn.init.normal_(self.embed.weight, std=1.0)

    def token_ids(self, names_batch: Sequence[Sequence[str]]) -> torch.Tensor:
        """``B x max_tokens`` token ids; unknown names raise naming them."""
        rows = []
        for names in names_batch:
            unknown = [n for n in names if n not in self.index]
            if unknown:
                raise BadInputError(f"class name(s) {unknown}", f"not known to this model (knows {list(self.index)})")
            ids = [self.prefix_id] + sorted({self.index[n] for n in names})
            ids = ids[: self.config.max_tokens]
            rows.append(ids + [self.null_id] * (self.config.max_tokens - len(ids)))
        return torch.tensor(rows, dtype=torch.long, device=self.embed.weight.device)

    def encode(self, names_batch: Sequence[Sequence[str]]) -> torch.Tensor:
        return self.embed(self.token_ids(names_batch))

    def null(self, batch: int) -> torch.Tensor:
        ids = torch.full((batch, self.config.max_tokens), self.null_id, device=self.embed.weight.device)
        return self.embed(ids)


class ClipTextConditioner(nn.Module):
    """SD 1.5 text branch: CLIP tokenizer + text encoder on the paper's prompt (kept frozen)."""

    def __init__(self, tokenizer, text_encoder) -> None:  # transformers objects
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder

    def _embed(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        )
        ids = tok.input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0]

    def encode(self, names_batch: Sequence[Sequence[str]]) -> torch.Tensor:
        return self._embed([prompt_for(list(n)) for n in names_batch])

    def null(self, batch: int) -> torch.Tensor:
        """The dropped prompt is the empty string, as in the paper's (ControlNet) code."""
        return self._embed([""]).expand(batch, -1, -1)

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
