"""The ScribbleGen model bundle: denoiser + ControlNet + null hint + text + (VAE) + schedule.

Two ways to get one, one way to save/load it:

- :func:`build_tiny` -- the embedded default: a pixel-space (no VAE) ``UNet2DConditionModel``
  and a ``ControlNetModel.from_unet`` copy, with class-token text conditioning
  (:class:`engine.text.ClassTokenEncoder`). Built from a config, trained from scratch.
- :func:`from_stable_diffusion` -- the paper setup: SD 1.5 UNet/VAE/CLIP from a local
  diffusers folder (never downloaded), ControlNet from ``controlnet/`` or from the UNet.

:meth:`ScribbleGenModel.save_pretrained` writes the diffusers folder layout (each part's
config beside its safetensors weights), ``null_hint.safetensors`` and ``scribblegen.json``;
:meth:`ScribbleGenModel.from_pretrained` reads it back through the same per-component
diffusers ``from_pretrained`` calls that load the real SD 1.5 weights. Pickles are never
read (``use_safetensors=True`` everywhere).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from engine.errors import BadInputError
from engine.render import render_scribble
from engine.shards import UNLABELLED

BUNDLE_FILE = "scribblegen.json"
NULL_HINT_FILE = "null_hint.safetensors"
KINDS = ("tiny", "sd15")
# CFG's unconditional branch: the null hint with the real prompt (the paper: only the hint
# is dropped in training) or the null hint with the null prompt (both dropped together).
UNCOND = ("hint", "hint+prompt")
# How a scribble becomes the ControlNet's input: the colour rendering (engine.render, the
# paper's) or one channel per class (1 where the class is drawn): "onehot" leaves unlabelled
# pixels all zeros, "onehot+unlabelled" gives them a channel of their own after the classes
# (the paper's one-hot ablation: 22 channels for VOC, 255 in channel 21).
HINT_ENCODINGS = ("colour", "onehot", "onehot+unlabelled")
# How a colour hint reaches the model's resolution: the fitted scribble rendered (nearest) or
# the scribble rendered at its own size, then resized bicubically (the paper's data.py:187).
HINT_RESIZES = ("nearest", "cubic")
# The channel order the model sees images and colour hints in. "bgr" is the paper's bug: its
# data.py flips channels twice (imread's BGR to RGB, then cvtColor BGR2RGB back to BGR), so its
# ControlNet trained on BGR images and hints over an RGB-pretrained SD, and its generation
# flipped the output back; a model trained so must sample so (the λ < 1 starts are BGR too).
CHANNEL_ORDERS = ("rgb", "bgr")
# What a dropped prompt becomes (train.drop_prompt, sampler.uncond: hint+prompt): the empty
# prompt, or the prompt without its class names (the paper's drop_out_text, cldm.py:342-345).
NULL_PROMPTS = ("empty", "classless")
# How the VAE turns an image into z0: its posterior's mean, or a draw from it (the paper's
# get_first_stage_encoding, ddpm.py:657, in training and for the λ < 1 start alike).
VAE_ENCODINGS = ("mean", "sample")
# Options a bundle records in scribblegen.json only when off these values (older bundles lack them).
BUNDLE_DEFAULTS = {"hint_resize": "nearest", "channel_order": "rgb", "null_prompt": "empty", "vae_encode": "mean"}
NoiseFn = Callable[[tuple[int, ...]], torch.Tensor]  # shape -> standard normal draws (the caller's seeded stream)
FINAL_DIR = "final"  # where a training run puts its finished bundle
PREDICTION_TYPES = ("epsilon", "v_prediction")
CONTROL_INITS = ("zero", "random")


@dataclass
class TinyArch:
    """Architecture of the embedded tiny pixel-space denoiser. The defaults are the shipped
    base's (``configs/base/tiny.yaml``, a test holds them equal), so a from-scratch model
    (``model.pretrained: null``) is the same network as the pretrained one."""

    block_out_channels: tuple[int, ...] = (64, 96, 128)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    cross_attention_dim: int = 32
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    conditioning_channels: int = 16
    text_tokens: int = 8
    # Cosine: λ spans realism to diversity as SD 1.5's scaled_linear does on its latents.
    beta_schedule: str = "squaredcos_cap_v2"
    # What the denoiser predicts. "v_prediction" (Salimans & Ho 2022) behaves like
    # x0-prediction at high noise, where the scribble decides the layout, so a model
    # trained for minutes already places shapes; "epsilon" is SD 1.5's choice.
    prediction_type: str = "v_prediction"
    # ControlNet's zero convolutions (hint embedding output, residual 1x1s) protect a
    # PRETRAINED denoiser from the untrained branch. A from-scratch denoiser has nothing to
    # protect, and a zero start makes the hint's first gradients vanish (the two zero
    # layers block each other), so "random" draws them with PyTorch's default init instead.
    control_init: str = "zero"

    def validate(self) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise BadInputError(
                "model.tiny", f"block_out_channels has {n} entries; down/up_block_types must have {n} too"
            )
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise BadInputError("model.tiny.norm_num_groups", "must divide every block_out_channels entry")
        if self.prediction_type not in PREDICTION_TYPES:
            raise BadInputError(f"model.tiny.prediction_type={self.prediction_type!r}", f"must be one of {PREDICTION_TYPES}")
        if self.control_init not in CONTROL_INITS:
            raise BadInputError(f"model.tiny.control_init={self.control_init!r}", f"must be one of {CONTROL_INITS}")


def _scheduler_config(beta_schedule: str, prediction_type: str) -> dict[str, Any]:
    """DDIM config for the tiny pixel model: x0 clipping keeps pixels in range (clip_sample)."""
    from diffusers import DDIMScheduler

    return dict(
        DDIMScheduler(
            num_train_timesteps=1000, beta_schedule=beta_schedule, clip_sample=True, set_alpha_to_one=True,
            steps_offset=0, prediction_type=prediction_type,
        ).config
    )


class ScribbleGenModel(nn.Module):
    """Everything needed to train and sample ScribbleGen, as one ``nn.Module``.

    ``unet`` is the denoiser, ``controlnet`` the scribble branch, ``null_hint`` the "empty"
    conditioning image (``C x H x W``, ``randn`` at the start; fixed as in the paper, or
    trained with ``train.learn_null_hint``) used for the 10 % dropout and as CFG's
    unconditional branch, ``text`` the text conditioner, ``vae`` the latent autoencoder
    (``None`` for the pixel-space tiny model), ``uncond`` the unconditional pair its
    training taught; it and the paper-fidelity options (:data:`BUNDLE_DEFAULTS`) are saved
    in ``scribblegen.json``.
    """

    def __init__(
        self,
        kind: str,
        unet: nn.Module,
        controlnet: nn.Module,
        text: nn.Module,
        null_hint: torch.Tensor,
        scheduler_config: dict[str, Any],
        class_names: Sequence[str],
        resolution: int,
        vae: nn.Module | None = None,
        model_id: str | None = None,
        uncond: str | None = None,
        resize: str | None = None,
        hint_encoding: str = "colour",
        hint_resize: str = "nearest",
        channel_order: str = "rgb",
        null_prompt: str = "empty",
        vae_encode: str = "mean",
    ) -> None:
        super().__init__()
        for name, value, allowed in (("model kind", kind, KINDS), ("hint encoding", hint_encoding, HINT_ENCODINGS),
                                     ("hint resize", hint_resize, HINT_RESIZES), ("channel order", channel_order, CHANNEL_ORDERS),
                                     ("null prompt", null_prompt, NULL_PROMPTS), ("VAE encoding", vae_encode, VAE_ENCODINGS)):
            if value not in allowed:
                raise BadInputError(f"{name} {value!r}", f"must be one of {allowed}")
        self.kind = kind
        self.hint_encoding = hint_encoding
        self.unet = unet
        self.controlnet = controlnet
        self.text = text
        self.vae = vae
        self.null_hint = nn.Parameter(null_hint.detach().clone().float())
        self.scheduler_config = dict(scheduler_config)
        self.class_names = list(class_names)
        self.resolution = int(resolution)
        self.model_id = model_id or f"{kind}-unsaved"
        # Which (null hint, prompt) pair the training's conditioning dropout taught (one of
        # UNCOND); None = not recorded (a fresh ControlNet, or a bundle older than the field).
        self.uncond = uncond
        self.resize = resize  # how training fitted its images to ``resolution`` (engine.data.geometry)
        # How training fitted its colour hints: "nearest" (the fitted scribble rendered) or
        # "cubic" (rendered, then resized bicubically: the paper's); generation follows it.
        self.hint_resize = hint_resize
        self.channel_order = channel_order  # what the denoiser sees (CHANNEL_ORDERS); inputs and outputs stay RGB
        self.null_prompt = null_prompt  # what a dropped prompt becomes (NULL_PROMPTS)
        self.vae_encode = vae_encode  # z0 from the VAE posterior's mean or a draw (VAE_ENCODINGS)

    # -- geometry ---------------------------------------------------------------------------
    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell (8 for SD's VAE, 1 in pixel space)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor x UNet downsampling)."""
        return self.latent_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.null_hint.device

    @property
    def dtype(self) -> torch.dtype:
        return self.null_hint.dtype

    # -- conversions --------------------------------------------------------------------------
    def hint(self, scribbles: np.ndarray, colours: np.ndarray | None = None) -> torch.Tensor:
        """``B x H x W`` uint8 scribbles -> ``B x C x H x W`` conditioning in [0, 1]: the colour
        rendering (C = 3) or one-hot (C = number of classes). ``colours``: the colour hints
        already rendered at the sources' own size and fitted bicubically (``B x H x W x 3``
        uint8, ``hint_resize: cubic``, :func:`engine.data.geometry.fit_colour_hint`), used
        instead of rendering the fitted ``scribbles``."""
        if self.hint_encoding != "colour":
            return onehot_hint(np.asarray(scribbles), len(self.class_names),
                               unlabelled_channel=self.hint_encoding == "onehot+unlabelled").to(self.device, self.dtype)
        rgb = self._in_channel_order(render_scribble(np.asarray(scribbles)) if colours is None else np.asarray(colours))
        rgb = torch.from_numpy(rgb)
        # .contiguous(): a permuted (channels-last) input drags every conv onto a far slower CPU path.
        return rgb.permute(0, 3, 1, 2).contiguous().to(self.device, self.dtype) / 255.0

    def null_text(self, batch: int) -> torch.Tensor:
        """The dropped prompt's encoding for ``batch`` samples: the null prompt, or with
        ``null_prompt: classless`` the prompt of a scribble without classes."""
        return self.text.encode([[]] * batch) if self.null_prompt == "classless" else self.text.null(batch)

    def null_hints(self, batch: int, size: tuple[int, int]) -> torch.Tensor:
        """The null hint for ``batch`` samples, resized if sampling at another size."""
        hint = self.null_hint[None]
        if tuple(hint.shape[-2:]) != tuple(size):
            hint = nn.functional.interpolate(hint, size=size, mode="bilinear", align_corners=False)
        return hint.expand(batch, -1, -1, -1)

    def encode_images(self, images: np.ndarray, posterior_noise: NoiseFn | None = None) -> torch.Tensor:
        """``B x H x W x 3`` uint8 RGB -> ``z0`` (VAE latent x scaling, or pixels in [-1, 1]). The
        latent is the posterior's mean, or with ``vae_encode: sample`` the draw mean + std·ε,
        ε = ``posterior_noise(shape)``: the caller's seeded stream, so draws replay exactly."""
        x = torch.from_numpy(np.require(self._in_channel_order(images), requirements=["C", "W"]))
        x = x.permute(0, 3, 1, 2).contiguous().to(self.device, self.dtype) / 127.5 - 1.0
        if self.vae is None:
            return x
        with torch.no_grad():
            posterior = self.vae.encode(x).latent_dist
            if self.vae_encode == "mean":
                return posterior.mean * self.vae.config.scaling_factor
            if posterior_noise is None:
                raise BadInputError(f"model {self.model_id}", "encodes with a posterior draw (vae_encode: sample) "
                                    "and needs the noise for it")
            eps = posterior_noise(tuple(posterior.mean.shape)).to(posterior.mean)
            return (posterior.mean + posterior.std * eps) * self.vae.config.scaling_factor

    def decode(self, z: torch.Tensor) -> np.ndarray:
        """Inverse of :meth:`encode_images`: latents/pixels -> ``B x H x W x 3`` uint8."""
        if self.vae is not None:
            z = self.vae.decode(z / self.vae.config.scaling_factor).sample
        x = ((z.float().clamp(-1, 1) + 1) * 127.5).round()
        return self._in_channel_order(x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())

    def _in_channel_order(self, rgb: np.ndarray) -> np.ndarray:
        """``... x 3`` colours between RGB and the model's channel order (a swap is its own inverse)."""
        return np.ascontiguousarray(rgb[..., ::-1]) if self.channel_order == "bgr" else rgb

    def predict(self, z: torch.Tensor, t: torch.Tensor, hint: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The denoiser's output at ``z_t`` (ε or v, as ``scheduler_config['prediction_type']``
        says), with the ControlNet residuals of ``hint`` injected."""
        down, mid = self.controlnet(z, t, encoder_hidden_states=text, controlnet_cond=hint, return_dict=False)
        return self.unet(
            z, t, encoder_hidden_states=text, down_block_additional_residuals=down,
            mid_block_additional_residual=mid, return_dict=False,
        )[0]

    # -- persistence --------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the bundle atomically (temp folder, then rename over ``folder``)."""
        from diffusers import DDIMScheduler
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            self.controlnet.save_pretrained(tmp / "controlnet", safe_serialization=True)
            if self.vae is not None:
                self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            if self.kind == "tiny":
                self.text.save_pretrained(tmp / "text_encoder", safe_serialization=True)
            else:
                self.text.save_pretrained(tmp)
            DDIMScheduler.from_config(self.scheduler_config).save_pretrained(tmp / "scheduler")
            save_file({"null_hint": self.null_hint.detach().float().cpu().contiguous()}, tmp / NULL_HINT_FILE)
            self.model_id = f"{self.kind}-{weights_digest(tmp)}"
            meta = {"kind": self.kind, "class_names": self.class_names, "resolution": self.resolution,
                    "model_id": self.model_id, "hint": self.hint_encoding, "uncond": self.uncond, "resize": self.resize, "format": 1}
            meta.update(self._options_off_default())
            (tmp / BUNDLE_FILE).write_text(json.dumps(meta, indent=2))
            _replace_dir(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    def _options_off_default(self) -> dict[str, str]:
        """The paper-fidelity options the bundle records, only where they differ from the
        behaviour that predates them: a bundle trained with every option at its default keeps
        the bytes of its ``scribblegen.json``, and one without a key reads as the default."""
        return {k: getattr(self, k) for k, default in BUNDLE_DEFAULTS.items() if getattr(self, k) != default}

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype: torch.dtype | None = None) -> "ScribbleGenModel":
        """Load a bundle written by :meth:`save_pretrained` (or a training run's folder holding ``final/``)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / BUNDLE_FILE).is_file() and (folder / FINAL_DIR / BUNDLE_FILE).is_file():
            folder = folder / FINAL_DIR
        meta_path = folder / BUNDLE_FILE
        if not meta_path.is_file():
            raise BadInputError(str(folder), f"not a ScribbleGen model folder (no {BUNDLE_FILE})",
                                f"pass the folder written by jobs/train_controlnet.py (or its {FINAL_DIR}/ subfolder)")
        meta = json.loads(meta_path.read_text())
        kind = meta.get("kind")
        if kind not in KINDS:
            raise BadInputError(str(meta_path), f"unknown model kind {kind!r}")
        with _unreadable_is_bad_input(folder):
            parts = _load_parts(folder, kind, torch_dtype, need_controlnet=True)
            _require(folder, NULL_HINT_FILE)
            null_hint = load_file(folder / NULL_HINT_FILE)["null_hint"]
        model = cls(kind=kind, null_hint=null_hint, class_names=meta["class_names"],
                    resolution=meta["resolution"], model_id=meta.get("model_id"), uncond=meta.get("uncond"),
                    resize=meta.get("resize"), hint_encoding=meta.get("hint", "colour"),
                    **{k: meta.get(k, v) for k, v in BUNDLE_DEFAULTS.items()}, **parts)
        return model.to(torch_dtype) if torch_dtype is not None else model


def weights_digest(folder: Path, length: int = 12) -> str:
    """Content hash of all weight files (first ``length`` hex digits): the short form is the
    model id recorded in every synthetic sample."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        h.update(path.relative_to(folder).as_posix().encode())
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:length]


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` onto ``final``; an old ``final`` is moved aside first, then deleted."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _unreadable_is_bad_input(folder: Path) -> Iterator[None]:
    """diffusers/transformers raise OSError for a part they cannot load (weights present only as
    pickled ``.bin``, truncated files), safetensors its own error: both are the user's input."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as exc:
        raise BadInputError(str(folder), f"cannot load the model: {str(exc).splitlines()[0]}",
                            "weights must be whole .safetensors files (pickled .bin weights are never read)") from None


def _require(folder: Path, part: str, what: str = "") -> None:
    if not (folder / part).exists():
        raise BadInputError(
            str(folder / part), f"missing {what or part}",
            "the model folder must use the diffusers layout: unet/, vae/, text_encoder/, tokenizer/, scheduler/",
        )


def _low_memory_loading() -> dict[str, bool]:
    """diffusers loads with ``low_cpu_mem_usage`` when ``accelerate`` is installed; without it,
    asking for the fallback explicitly keeps its warning (once per component, in every
    actor) out of the logs."""
    import importlib.util

    return {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}


def _load_parts(folder: Path, kind: str, dtype: torch.dtype | None, need_controlnet: bool) -> dict[str, Any]:
    """Load each component with its diffusers/transformers ``from_pretrained`` (local files only)."""
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel

    from engine.text import ClassTokenEncoder, ClipTextConditioner

    opts = dict(local_files_only=True, use_safetensors=True, **_low_memory_loading())
    for part in ("unet", "scheduler") + (("controlnet",) if need_controlnet else ()):
        _require(folder, f"{part}/config.json" if part != "scheduler" else "scheduler/scheduler_config.json", part)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype, **opts)
    controlnet = None
    if (folder / "controlnet" / "config.json").is_file():
        controlnet = ControlNetModel.from_pretrained(folder / "controlnet", torch_dtype=dtype, **opts)
    scheduler_config = dict(DDIMScheduler.from_pretrained(folder / "scheduler", local_files_only=True).config)
    if kind == "tiny":
        _require(folder, "text_encoder/config.json", "text_encoder")
        text = ClassTokenEncoder.from_pretrained(folder / "text_encoder", **opts)
        vae = None
    else:
        from transformers import CLIPTextModel, CLIPTokenizer

        for part in ("vae/config.json", "text_encoder/config.json", "tokenizer"):
            _require(folder, part, part.split("/")[0])
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype, **opts)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True,
                                                     use_safetensors=True, dtype=dtype)
        text = ClipTextConditioner(tokenizer, text_encoder)
    return dict(unet=unet, controlnet=controlnet, text=text, vae=vae, scheduler_config=scheduler_config)


def onehot_hint(scribbles: np.ndarray, num_classes: int, unlabelled_channel: bool = False) -> torch.Tensor:
    """``B x H x W`` class ids -> ``B x K x H x W`` float one-hot, unlabelled (255) pixels all 0;
    with ``unlabelled_channel`` ``B x (K + 1) x H x W``, unlabelled pixels 1 in channel K."""
    ids = torch.from_numpy(np.asarray(scribbles)).long()
    bad = (ids >= num_classes) & (ids != UNLABELLED)
    if bool(bad.any()):
        raise BadInputError("scribble", f"class id {int(ids[bad][0])} >= the model's {num_classes} classes")
    ids = torch.where(ids == UNLABELLED, num_classes, ids)
    channels = num_classes + 1 if unlabelled_channel else num_classes
    return nn.functional.one_hot(ids, num_classes + 1)[..., :channels].permute(0, 3, 1, 2).float().contiguous()


def hint_channels(encoding: str, class_names: Sequence[str]) -> int:
    """Input channels of the ControlNet's hint for ``encoding``."""
    if encoding not in HINT_ENCODINGS:
        raise BadInputError(f"model.hint={encoding!r}", f"must be one of {HINT_ENCODINGS}")
    return {"colour": 3, "onehot": len(class_names), "onehot+unlabelled": len(class_names) + 1}[encoding]


def _controlnet_from_unet(unet: nn.Module, embedding_channels: tuple[int, ...], hint_in: int = 3) -> nn.Module:
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding_channels,
                                     conditioning_channels=hint_in)


def controlnet_zero_layers(controlnet: nn.Module) -> list[nn.Module]:
    """ControlNet's zero-initialised convolutions: the hint embedding's output conv and the
    1x1 convs that turn each down-block / mid-block output into a residual."""
    return [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks,
            controlnet.controlnet_mid_block]


def initial_null_hint(resolution: int, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """The null hint's starting value: ``randn`` as in the paper's code (which keeps it so;
    ``train.learn_null_hint`` trains it from here). Zeros would be the rendering of an
    all-unlabelled scribble, i.e. a real (empty) hint."""
    return torch.randn(channels, resolution, resolution, generator=torch.Generator().manual_seed(seed))


def tiny_denoiser(arch: TinyArch, resolution: int, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A randomly initialised tiny pixel-space UNet and its class-token text encoder (no
    class names yet: see :func:`build_tiny`), deterministic in ``seed``."""
    from diffusers import UNet2DConditionModel

    arch.validate()
    multiple = 2 ** (len(arch.block_out_channels) - 1)
    if resolution % multiple:
        raise BadInputError(f"model.resolution={resolution}", f"must be a multiple of {multiple} for this UNet")
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=resolution, in_channels=3, out_channels=3,
        block_out_channels=tuple(arch.block_out_channels), down_block_types=tuple(arch.down_block_types),
        up_block_types=tuple(arch.up_block_types), layers_per_block=arch.layers_per_block,
        cross_attention_dim=arch.cross_attention_dim, attention_head_dim=arch.attention_head_dim,
        norm_num_groups=arch.norm_num_groups,
    )


def tiny_scheduler_config(arch: TinyArch) -> dict[str, Any]:
    """The DDIM config of a tiny model built from ``arch``."""
    return _scheduler_config(arch.beta_schedule, arch.prediction_type)


def build_tiny(arch: TinyArch, class_names: Sequence[str], resolution: int, seed: int = 0,
               hint: str = "colour") -> ScribbleGenModel:
    """A tiny model trained from nothing: denoiser, text table and ControlNet all randomly
    initialised from ``arch`` (deterministic in ``seed``). The embedded default starts
    from the pretrained base instead (:func:`from_base`); this path remains for tests and
    for studying what pretraining buys."""
    from engine.text import ClassTokenEncoder

    unet = tiny_denoiser(arch, resolution, seed)
    # Pixel space: the hint is already at the UNet's resolution, so the conditioning
    # embedding must not downsample -> a single-entry channel list.
    channels = hint_channels(hint, class_names)
    controlnet = _controlnet_from_unet(unet, (arch.conditioning_channels,), channels)
    if arch.control_init == "random":
        for layer in controlnet_zero_layers(controlnet):
            layer.reset_parameters()
    text = ClassTokenEncoder(list(class_names), dim=arch.cross_attention_dim, max_tokens=arch.text_tokens)
    return ScribbleGenModel("tiny", unet, controlnet, text, initial_null_hint(resolution, seed, channels),
                            tiny_scheduler_config(arch), class_names, resolution, hint_encoding=hint)


# Where the shipped pretrained tiny base lives (jobs/pretrain_base.py made it); configs say
# ``pretrained: builtin`` for it.
BUILTIN = "builtin"
BUILTIN_BASE = Path(__file__).resolve().parent / "assets" / "tiny-base"
BASE_FILE = "base.json"  # provenance of a pretrained base: config, command, steps, digest


def resolve_pretrained(folder: str | Path) -> Path:
    """``builtin`` is the shipped tiny base; anything else is a local folder path."""
    return BUILTIN_BASE if str(folder) == BUILTIN else Path(folder)


def from_base(folder: str | Path, kind: str, class_names: Sequence[str], resolution: int,
              conditioning_channels: Sequence[int], seed: int = 0,
              torch_dtype: torch.dtype | None = None, hint: str = "colour") -> ScribbleGenModel:
    """The paper's starting point: a PRETRAINED denoiser (SD 1.5, or the shipped tiny base)
    loaded with the diffusers ``from_pretrained`` calls, plus a ControlNet copied from its
    UNet with zero convolutions (``ControlNetModel.from_unet``) and a randn null hint.

    ``conditioning_channels`` shapes the hint embedding: SD 1.5's downsamples 512-px hints
    8x to the latent grid (16, 32, 96, 256); the pixel-space tiny base needs none (one entry).
    """
    folder = resolve_pretrained(folder)
    if not folder.is_dir():
        raise BadInputError(str(folder), "pretrained model folder not found",
                            "download SD 1.5 in diffusers layout yourself and pass its local path" if kind == "sd15"
                            else "use model.pretrained=builtin, or a folder written by jobs/pretrain_base.py")
    with _unreadable_is_bad_input(folder):
        parts = _load_parts(folder, kind, torch_dtype, need_controlnet=False)
    if kind == "sd15":
        # SD's latents are not confined to [-1, 1]: never clip the predicted x0 (SD's own config says so too).
        parts["scheduler_config"]["clip_sample"] = False
    else:
        known = list(parts["text"].config.class_names)
        if known != list(class_names):
            raise BadInputError(str(folder), f"the base knows classes {known}, the data has {list(class_names)}",
                                "pretrain a base on this data's classes (jobs/pretrain_base.py), or set model.pretrained: null")
        if resolution % 2 ** (len(parts["unet"].config.block_out_channels) - 1):
            raise BadInputError(f"model.resolution={resolution}", "is not a multiple of the base UNet's downsampling")
    channels = hint_channels(hint, class_names)
    if parts["controlnet"] is None:
        torch.manual_seed(seed)
        parts["controlnet"] = _controlnet_from_unet(parts["unet"], tuple(conditioning_channels), channels)
    return ScribbleGenModel(kind, null_hint=initial_null_hint(resolution, seed, channels), class_names=class_names,
                            resolution=resolution, hint_encoding=hint, **parts)


def from_stable_diffusion(folder: str | Path, class_names: Sequence[str], resolution: int = 512,
                          torch_dtype: torch.dtype | None = None, hint: str = "colour") -> ScribbleGenModel:
    """The paper setup from a local SD 1.5 diffusers folder; ControlNet from ``controlnet/`` or the UNet."""
    return from_base(folder, "sd15", class_names, resolution, (16, 32, 96, 256), torch_dtype=torch_dtype, hint=hint)
