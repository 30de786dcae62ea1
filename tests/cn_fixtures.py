"""Shared builders for the ControlNet/sampler tests: a micro tiny model, a micro SD stack, real shards."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from engine.models import ScribbleGenModel, TinyArch, build_tiny

CLASSES = ["background", "disc", "square"]
MICRO = TinyArch(
    block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8, attention_head_dim=4,
    norm_num_groups=4, conditioning_channels=8, text_tokens=4,
    beta_schedule="linear", prediction_type="epsilon",  # the micro model's own choice, not TinyArch's defaults
)


def micro_model(resolution: int = 16, seed: int = 0, **arch: object) -> ScribbleGenModel:
    """A tiny-kind model small enough to sample in milliseconds, with a non-trivial null hint
    (``arch`` overrides fields of :data:`MICRO`, e.g. ``prediction_type``)."""
    model = build_tiny(replace(MICRO, **arch), CLASSES, resolution, seed=seed)
    with torch.no_grad():
        model.null_hint.copy_(torch.rand(model.null_hint.shape, generator=torch.Generator().manual_seed(seed)))
        # Non-zero ControlNet output layers, so the hint really changes the prediction.
        for p in model.controlnet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model.eval()


def sources(n: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """``n`` random source images with blocky scribbles (classes 0-2, 255 elsewhere)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    scribbles = np.full((n, size, size), 255, np.uint8)
    names = []
    for i in range(n):
        c = int(rng.integers(1, 3))
        scribbles[i, 2:5, :] = 0
        scribbles[i, 8:11, 4:12] = c
        names.append([CLASSES[c]])
    return images, scribbles, names


def write_sd_stack(folder: Path) -> Path:
    """A randomly initialised SD-1.5-shaped stack (tiny sizes) in the diffusers folder layout."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    ).save_pretrained(folder / "unet")
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1,
    ).save_pretrained(folder / "vae")
    # SD 1.5's own scheduler config (PNDM) -- the loader must turn it into DDIM.
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(folder / "scheduler")
    tok_dir = folder / "tokenizer"
    tok_dir.mkdir()
    letters = list("abcdefghijklmnopqrstuvwxyz,-")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16).save_pretrained(tok_dir)
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).save_pretrained(folder / "text_encoder")
    return folder


def write_real_shards(folder: Path, n: int = 12, size: int = 16) -> Path:
    """A small real dataset (procedural scenes) as shards + manifest, like ingest writes it."""
    from engine.data.procedural import CLASS_NAMES, procedural_records
    from engine.data.record import to_sample
    from engine.manifest import DatasetInfo, sample_row, shard_rows, write_manifest
    from engine.shards import ShardWriter, shard_name

    records = [r for r in procedural_records(n, 2, size=size) if r.split == "train" or r.source_id.endswith("0")]
    rows = []
    for index in range(2):
        part = records[index::2]
        with ShardWriter(folder / shard_name("real", index)) as writer:
            samples = [to_sample(r, len(CLASS_NAMES)) for r in part]
            for s in samples:
                writer.write(s)
            info = writer.close()
        rows += shard_rows([sample_row(s) for s in samples], info, folder)
    return write_manifest(rows, folder / "manifest.parquet", DatasetInfo(CLASS_NAMES))
