"""(w, λ) sampling: classifier-free guidance scale w and encode ratio λ over DDIM or a multistep solver.

``eps = eps(z, ∅) + w · (eps(z, c) − eps(z, ∅))`` where ∅ is the null hint with
the real prompt (``uncond="hint"``, the paper's) or with the null prompt (``"hint+prompt"``);
a model is only sampled with the pair its training dropout taught it (recorded in its
bundle). Both branches run in ONE batched forward (the batch is doubled). w = 1
skips the unconditional half and w = 0 the conditional half (same formula, half the work).

λ ∈ (0, 1] picks how much of the diffusion is re-run from the real image's ``z0``:

- ``truncate`` (diffusers img2img ``strength``): of the N DDIM timesteps of
  ``DDIMScheduler.set_timesteps(N)``, run the last ⌈λ·N⌉, after noising ``z0`` to the
  first of them. A sample at λ costs about λ of a full one.
- ``paper`` (the paper's ControlNet/cldm code): noise ``z0`` to t = ⌊999·λ⌋ and run all N
  DDIM steps at the paper's ``linspace(0, 1000·λ, N+1)[:-1]`` cast to integers, + 1,
  which needs 1000·λ ≥ N. Cost does not shrink with λ.

``scheduler`` picks the update rule; guidance, noising and λ stay the same:

- ``ddim`` (the paper's): η = 0, written out below, byte for byte the sampler before the
  solvers existed.
- ``dpmsolver++`` / ``unipc``: diffusers' ``DPMSolverMultistepScheduler`` (DPM-Solver++(2M))
  and ``UniPCMultistepScheduler`` (UniPC-bh2, order 2) on the model's noise schedule, run over
  our timesteps. ``paper`` spacing gives them N steps from t = ⌊999·λ⌋ itself (where the
  source was noised) down over [0, 999·λ], ``truncate`` the same timesteps as DDIM; their last
  step lands on σ = 0 (x̂0).

Determinism: the only randomness is the initial noise, drawn per sample from a CPU
``torch.Generator`` seeded with ``seeds[i]``, so sample i is the same alone or in any
batch, on any device (DDIM with η = 0 and the solvers are deterministic after that).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from engine.errors import BadInputError
from engine.models import PREDICTION_TYPES, UNCOND, ScribbleGenModel

SPACINGS = ("truncate", "paper")
SCHEDULERS = ("ddim", "dpmsolver++", "unipc")

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]  # (z_t, t) -> the guided ε at z_t


def multistep_solver(name: str, config: Mapping[str, Any], model_id: str) -> Any:
    """diffusers' multistep solver ``name`` on the noise schedule of the DDIM ``config``.

    It is fed the guided ε (a v-model's outputs are converted before guidance, as for DDIM),
    hence ``prediction_type="epsilon"``, and ends on σ = 0 with a first-order step
    (``final_sigmas_type="zero"``, diffusers' default). DDIM's x̂0 clipping to ±1
    (``clip_sample``, the pixel-space tiny models) has no switch of its own there; their
    dynamic thresholding with ``sample_max_value = 1`` is exactly it, since the percentile s
    is clamped to [1, 1]: x̂0 is clamped to ±1 and divided by 1.
    """
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    if config["clip_sample"] and config["clip_sample_range"] != 1.0:
        raise BadInputError(f"model {model_id}", f"clip_sample_range {config['clip_sample_range']} has no "
                            f"equivalent in {name} (only ±1 clipping does)", "use sampler.scheduler=ddim")
    solvers = {"dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
               "unipc": (UniPCMultistepScheduler, {})}
    cls, extra = solvers[name]
    return cls.from_config(config, prediction_type="epsilon", final_sigmas_type="zero",
                           thresholding=bool(config["clip_sample"]), sample_max_value=1.0, **extra)


def set_custom_timesteps(solver: Any, timesteps: list[int]) -> None:
    """Point ``solver`` at ``timesteps`` (then σ = 0) with a fresh history: a multistep solver
    remembers its last outputs, so every ``sample()`` call starts it again.

    ``DPMSolverMultistepScheduler.set_timesteps`` takes custom timesteps; UniPC's (diffusers
    0.42) does not, so it gets the two tensors that call computes: σ_t = √((1 − ᾱ_t) / ᾱ_t)
    at each timestep, then 0 (a test pins the two equal).
    """
    if "timesteps" in inspect.signature(solver.set_timesteps).parameters:
        solver.set_timesteps(timesteps=timesteps)
        return
    solver.set_timesteps(len(timesteps))  # resets the history and the step index
    alphas = solver.alphas_cumprod[torch.tensor(timesteps)]
    solver.timesteps = torch.tensor(timesteps, dtype=torch.int64)
    solver.sigmas = torch.cat([((1 - alphas) / alphas) ** 0.5, torch.zeros(1)])


def fuse_attention_projections(module: torch.nn.Module) -> None:
    """One matmul for q, k, v (self-attention) and for k, v (cross-attention) in every
    attention layer, what ``UNet2DConditionModel.fuse_qkv_projections`` does; written for any
    module because diffusers' ControlNet version fuses no layer of the classic ``Attention``."""
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    for layer in module.modules():
        if isinstance(layer, Attention):
            layer.fuse_projections(fuse=True)
    module.set_attn_processor(FusedAttnProcessor2_0())


class ScribbleSampler:
    """Batched (w, λ) sampler over a :class:`ScribbleGenModel`; the Ray generator's workhorse."""

    def __init__(
        self,
        model: ScribbleGenModel,
        device: str | torch.device = "cpu",
        num_steps: int = 50,
        spacing: str = "paper",
        dtype: torch.dtype = torch.float32,
        uncond: str = "hint",
        scheduler: str = "ddim",
    ) -> None:
        from diffusers import DDIMScheduler

        for name, value, allowed in (("spacing", spacing, SPACINGS), ("scheduler", scheduler, SCHEDULERS),
                                     ("uncond", uncond, UNCOND)):
            if value not in allowed:
                raise BadInputError(f"{name} {value!r}", f"must be one of {allowed}")
        if model.uncond is not None and model.uncond != uncond:
            raise BadInputError(
                f"sampler.uncond={uncond}", f"model {model.model_id} was trained with the unconditional pair "
                f"{model.uncond!r} and never saw {uncond!r}", f"set sampler.uncond={model.uncond}",
            )
        if model.scheduler_config.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
            raise BadInputError(f"model {model.model_id}", f"prediction_type "
                                f"{model.scheduler_config['prediction_type']!r} is not supported (one of {PREDICTION_TYPES})")
        if int(num_steps) < 1:
            raise BadInputError(f"num_steps={num_steps}", "must be >= 1")
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)
        self.dtype = dtype
        self.num_steps = int(num_steps)
        self.spacing = spacing
        self.uncond = uncond
        self.scheduler = DDIMScheduler.from_config(model.scheduler_config)
        self.scheduler.set_timesteps(self.num_steps)
        self.alphas = self.scheduler.alphas_cumprod.double()
        self.model_id = model.model_id
        # None: DDIM, written out in _ddim_step. Else the solver each sample() call resets.
        self.solver = None if scheduler == "ddim" else multistep_solver(scheduler, self.scheduler.config, self.model_id)

    def compile(self, batch_size: int, size: tuple[int, int]) -> None:
        """``torch.compile`` the ControlNet and UNet (channels_last weights, fused attention
        projections) and the VAE's encoder and decoder, then run one guided step and one decode
        at the shapes of a full CFG batch, so a replica pays the compile while it loads and not
        inside its first unit. The inductor settings are diffusers' advice for UNets (1x1 convs
        as matmuls). Pays off on GPUs over long runs; numerics change within the dtype's
        rounding, so the generation identity ignores it."""
        import torch._inductor.config as inductor

        inductor.conv_1x1_as_mm = True
        for module in (self.model.controlnet, self.model.unet):
            fuse_attention_projections(module)
            module.to(memory_format=torch.channels_last)
            module.compile()
        if self.model.vae is not None:  # encode/decode are methods: compile the submodules they call
            self.model.vae.to(memory_format=torch.channels_last)
            self.model.vae.encoder.compile()
            self.model.vae.decoder.compile()
        images = np.zeros((batch_size, *size, 3), np.uint8)
        scribbles = np.zeros((batch_size, *size), np.uint8)
        with torch.no_grad():
            z0 = self.model.encode_images(images)
            text = self.model.text.encode([[]] * batch_size).to(self.dtype)
            self._guided_eps(z0, int(self.scheduler.timesteps[0]), self.model.hint(scribbles),
                             self.model.null_hints(batch_size, size), text, text, 2.0)
            self.model.decode(z0)

    # -- schedule -------------------------------------------------------------------------
    def _check(self, w: float, lam: float) -> None:
        if not (isinstance(lam, (int, float)) and 0.0 < lam <= 1.0):
            raise BadInputError(f"lambda={lam}", "encode ratio must be in (0, 1]")
        if not (isinstance(w, (int, float)) and w >= 0.0 and math.isfinite(w)):
            raise BadInputError(f"w={w}", "guidance scale must be a finite number >= 0")

    def schedule(self, lam: float) -> tuple[int, list[int], list[int]]:
        """``(t_noise, timesteps, prev_timesteps)`` for encode ratio ``lam`` (descending t); a
        solver's last step lands on σ = 0 whatever its last ``prev_timesteps`` says."""
        self._check(1.0, lam)
        n = self.num_steps
        if self.spacing == "truncate":
            k = min(n, math.ceil(round(lam * n, 9)))
            ts = [int(t) for t in self.scheduler.timesteps[n - k:]]
            step = self.scheduler.config.num_train_timesteps // n
            return ts[0], ts, [t - step for t in ts]
        t_noise = math.floor(999 * lam + 1e-9)
        # DDIM: the paper's dataset_generation, linspace(0, 1000·λ, N+1)[:-1] as integers, + 1
        # (its first step is below t_noise). A solver: N steps from t_noise itself over
        # [0, t_noise], N distinct integers when t_noise >= N.
        scale = 1000 if self.solver is None else 999
        span = math.floor(scale * lam + 1e-9)
        if span < n:
            raise BadInputError(
                f"lambda={lam} with num_steps={n}", f"paper spacing needs {scale}·λ >= N (got {span} < {n})",
                f"use lambda >= {n / scale:.4g}, fewer steps, or spacing=truncate",
            )
        if self.solver is None:
            ts = (np.linspace(0, 1000 * lam, n + 1)[:-1].astype(np.int64) + 1).tolist()[::-1]
        else:
            ts = np.linspace(t_noise, 0, n + 1)[:-1].round().astype(np.int64).tolist()
        return t_noise, ts, ts[1:] + [0]

    def steps_for(self, lam: float) -> int:
        """Denoiser evaluations (steps of any scheduler) one sample at ``lam`` costs."""
        return len(self.schedule(lam)[1])

    # -- sampling ---------------------------------------------------------------------------
    def _alpha(self, t: int) -> torch.Tensor:
        return self.alphas[t] if t >= 0 else self.scheduler.final_alpha_cumprod.double()

    def _ddim_step(self, z: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        """Deterministic DDIM update (η = 0), same maths and x0 clipping as ``DDIMScheduler.step``.

        Written out because ``DDIMScheduler.step`` assumes ``t_prev = t − 1000 // N``,
        which the paper spacing does not satisfy; for truncate spacing the two agree
        (tests pin that).
        """
        a, a_prev = self._alpha(t), self._alpha(t_prev)
        z64, eps64 = z.double(), eps.double()
        x0 = (z64 - (1 - a).sqrt() * eps64) / a.sqrt()
        cfg = self.scheduler.config
        if cfg.clip_sample:
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps64).to(z.dtype)

    def _draws(self, shape: tuple[int, ...], gens: Sequence[torch.Generator]) -> torch.Tensor:
        """One ``shape`` draw per sample, each from its own generator (the next in its stream)."""
        return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(self.device, self.dtype)

    def _as_eps(self, out: torch.Tensor, z: torch.Tensor, t: int) -> torch.Tensor:
        """The denoiser's output as ε. A v-prediction ``v = √ᾱ ε − √(1−ᾱ) x0`` gives
        ``ε = √ᾱ v + √(1−ᾱ) z``: affine in ``v`` for a fixed ``z``, so guiding the converted ε
        is the same as guiding v, and docs/design.md's ε formula holds for either model."""
        if self.scheduler.config.prediction_type == "epsilon":
            return out
        a = self._alpha(t).to(out.device, out.dtype)
        return a.sqrt() * out + (1 - a).sqrt() * z

    def _guided_eps(self, z: torch.Tensor, t: int, hint: torch.Tensor, null_hint: torch.Tensor,
                    text: torch.Tensor, null_text: torch.Tensor, w: float) -> torch.Tensor:
        tt = torch.full((z.shape[0],), t, device=self.device, dtype=torch.long)
        if w == 1.0:
            return self._as_eps(self.model.predict(z, tt, hint, text), z, t)
        if w == 0.0:
            return self._as_eps(self.model.predict(z, tt, null_hint, null_text), z, t)
        zz = torch.cat([z, z])
        both = self.model.predict(zz, torch.cat([tt, tt]), torch.cat([null_hint, hint]), torch.cat([null_text, text]))
        eps_null, eps_cond = self._as_eps(both, zz, t).chunk(2)
        return eps_null + w * (eps_cond - eps_null)

    @torch.no_grad()
    def sample(
        self,
        images: np.ndarray,
        scribbles: np.ndarray,
        class_names: Sequence[Sequence[str]],
        w: float,
        lam: float,
        seeds: Sequence[int],
        colours: np.ndarray | None = None,
    ) -> np.ndarray:
        """Synthetic images ``B x H x W x 3`` uint8 for sources (images, scribbles) at (w, λ).
        ``colours``: the sources' colour hints fitted bicubically, for a model trained with
        ``hint_resize: cubic`` (:func:`engine.data.geometry.fit_colour_hint`)."""
        self._check(w, lam)
        images, scribbles = np.asarray(images), np.asarray(scribbles)
        b = len(seeds)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise BadInputError("images", f"expected B x H x W x 3 uint8, got {images.shape} {images.dtype}")
        if (scribbles.shape != images.shape[:3] or len(class_names) != b or images.shape[0] != b
                or (colours is not None and np.shape(colours) != images.shape)):
            raise BadInputError(
                "sample() inputs", f"{images.shape[0]} images, scribbles {scribbles.shape}, "
                f"{len(class_names)} class-name lists and {b} seeds (and colour hints, if any) must agree",
            )
        h, wd = images.shape[1:3]
        m = self.model.size_multiple
        if h % m or wd % m:
            raise BadInputError(f"image size {wd}x{h}", f"sides must be multiples of {m} for this model")
        t_noise, ts, prevs = self.schedule(lam)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        z0 = self.model.encode_images(images, lambda shape: self._draws(shape[1:], gens))  # vae_encode: sample
        noise = self._draws(tuple(z0.shape[1:]), gens)
        z = self.scheduler.add_noise(z0, noise, torch.tensor([t_noise] * b, dtype=torch.long))
        hint = self.model.hint(scribbles, colours)
        null_hint = self.model.null_hints(b, (h, wd))
        text = self.model.text.encode(class_names).to(self.dtype)
        null_text = text if self.uncond == "hint" else self.model.null_text(b).to(self.dtype)

        def eps(z_t: torch.Tensor, t: int) -> torch.Tensor:
            return self._guided_eps(z_t, t, hint, null_hint, text, null_text, float(w))

        return self.model.decode(self.denoise(z, ts, prevs, eps))

    def denoise(self, z: torch.Tensor, ts: list[int], prevs: list[int], eps: EpsFn) -> torch.Tensor:
        """``z`` at ``ts[0]`` run down ``ts`` with the guided ``eps``: DDIM written out, or the
        solver, in float32 whatever the model's dtype. diffusers' DPM-Solver upcasts to float32
        itself, UniPC computes in its input's dtype, and x̂0 = (z − √(1−ᾱ) ε) / √ᾱ divides by
        √ᾱ_999 ≈ 5e-5 on the cosine schedule: float16 would lose it or overflow."""
        if self.solver is None:
            for t, t_prev in zip(ts, prevs):
                z = self._ddim_step(z, eps(z, t), t, t_prev)
            return z
        set_custom_timesteps(self.solver, ts)
        x = z.float()
        for t in ts:
            x = self.solver.step(eps(x.to(self.dtype), t).float(), t, x).prev_sample
        return x.to(self.dtype)
