"""Generation throughput: the engine against a bare loop calling the same sampler.

CPU (default): the default tiny model (configs/controlnet/tiny.yaml: shipped base + fresh ControlNet) on procedural
sources. Prints images/s of

- bare: one process, ``sampler.sample`` over pre-decoded, pre-fitted sources in the same
  batches the engine uses (no reading, encoding or writing: the compute ceiling);
- engine: ``run_generate`` with Ray actors (read real shards, sample, encode, write shards
  and manifest parts, merge), measured from when every replica has loaded its model;

then the ratio engine(1 actor) / bare with the same thread count (goal >= 0.97) and the
scaling 1 -> 2 actors of one thread each. ``sample_seconds_total`` / ``generate_seconds`` of an
engine run is the share of its wall time spent inside the sampler: the engine's own
overhead, robust to the noise of a shared machine.

``--stub SECONDS``: the same comparison with a stand-in sampler that returns noise images and
paces each batch to SECONDS per image (sleeping, the GIL released, as a GPU wait does), at the
GPU's shapes (512 px, batch 16, 96 sources). No model runs, so any machine measures what the
engine adds around an accelerator of that speed: ``--stub 0.3176`` is an H100's 3.149 img/s.

``--gpu``: the same comparison on one GPU with an SD 1.5-shaped, randomly initialised model
(UNet + ControlNet + VAE + CLIP text encoder at SD 1.5 sizes, a character-level tokenizer
written on the fly, since no weights are ever downloaded), 512 px, 50 DDIM steps,
fp16/bf16, SDPA attention, at λ = 1 and λ = 0.5 (truncate spacing). ``--engine inprocess``
runs the engine's worker without Ray (for a machine without Ray installed).

    python benchmarks/generate.py                      # CPU, ~ a few minutes on 2 cores
    python benchmarks/generate.py --gpu --dtype float16
    python benchmarks/generate.py --stub 0.3176 --repeats 1   # the engine's overhead at H100 speed, ~2 min
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from engine.config import load_config  # noqa: E402
from engine.generate.config import GenerateConfig, PlanConfig, RayConfig, SamplerConfig  # noqa: E402
from engine.generate.plan import build_plan  # noqa: E402
from engine.models import BUNDLE_FILE  # noqa: E402
from engine.sampler import SCHEDULERS  # noqa: E402
from engine.generate.worker import (SamplerFactory, SourceCache, ShardGenerator, batches, fit_sources,  # noqa: E402
                                    load_sampler, present_classes)

REPO = Path(__file__).resolve().parents[1]


def make_sources(root: Path, n: int, size: int) -> Path:
    """``n`` procedural train sources of ``size`` px through the real ingest job."""
    from engine.ingest import DEFAULT_CONFIG, IngestConfig, run_ingest

    overrides = [f"out={root}", f"source.procedural.num_train={n}", "source.procedural.num_val=1",
                 f"source.procedural.size={size}", f"samples_per_shard={max(n, 1)}"]
    return run_ingest(load_config(IngestConfig, REPO / DEFAULT_CONFIG, overrides))


def make_tiny_model(folder: Path, class_names: list[str]) -> Path:
    from engine.train_controlnet import DEFAULT_CONFIG, TrainControlNetConfig, build_model

    cfg = load_config(TrainControlNetConfig, REPO / DEFAULT_CONFIG)
    return build_model(cfg, class_names).save_pretrained(folder)


def _char_tokenizer():
    """A CLIP tokenizer over single characters (CLIP's byte alphabet, no merges): SD 1.5's
    text path at its real shapes (77 tokens, width 768) without downloading a vocabulary."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77), len(vocab)


def make_sd15_model(folder: Path, class_names: list[str], resolution: int = 512) -> Path:
    """SD 1.5-shaped bundle with random weights, saved through the production save_pretrained."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from engine.models import ScribbleGenModel, _controlnet_from_unet
    from engine.text import ClipTextConditioner

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=resolution // 8, cross_attention_dim=768)  # SD 1.5 defaults
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=resolution,
    )
    tokenizer, vocab_size = _char_tokenizer()
    text = ClipTextConditioner(tokenizer, CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=768,
                                                                       intermediate_size=3072, num_hidden_layers=12,
                                                                       num_attention_heads=12, max_position_embeddings=77,
                                                                       bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                                                                       pad_token_id=vocab_size - 1)))
    scheduler = dict(DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   clip_sample=False, set_alpha_to_one=False, steps_offset=1).config)
    controlnet = _controlnet_from_unet(unet, (16, 32, 96, 256))
    model = ScribbleGenModel("sd15", unet, controlnet, text, torch.zeros(3, resolution, resolution), scheduler,
                             class_names, resolution, vae=vae)
    return model.save_pretrained(folder)


class PacedStub:
    """A stand-in sampler at an accelerator's pace: noise images (as a random-init model makes,
    so PNG encoding costs what it did on the GPU), each batch taking ``seconds_per_image`` per
    image at λ = 1 (in proportion to the denoising steps at other λ: 50 DDIM steps, truncate
    spacing), the rest of it asleep with the GIL released.

    ``gil_share`` of that time is instead a fixed amount of pure-Python work, calibrated
    alone, as an eager GPU sampler spends the host's time launching kernels: threads that
    take the GIL beside it (the engine's writer and encoders) then make it slower, as they
    would make a real one."""

    model_id = "paced-stub"
    num_steps = 50

    def __init__(self, seconds_per_image: float, gil_share: float = 0.0, loops_per_s: float = 0.0) -> None:
        self.seconds_per_image = seconds_per_image
        self.gil_share = gil_share
        self.loops_per_s = loops_per_s  # one calibration, in the driver, for the bare loop and every actor

    @staticmethod
    def spin(loops: int) -> None:
        x = 0
        for i in range(loops):
            x += i

    @classmethod
    def calibrate(cls) -> float:
        """Spin loops per second on this machine, alone (best of 5)."""
        loops, best = 2_000_000, float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            cls.spin(loops)
            best = min(best, time.perf_counter() - t0)
        return loops / best

    def steps_for(self, lam: float) -> int:
        return max(1, math.ceil(self.num_steps * lam))

    def sample(self, images, scribbles, class_names, w, lam, seeds, colours=None):  # noqa: ANN001 (the Sampler protocol)
        t0 = time.perf_counter()
        out = np.stack([np.random.default_rng(seed).integers(0, 256, images.shape[1:], dtype=np.uint8) for seed in seeds])
        budget = self.seconds_per_image * self.steps_for(lam) / self.num_steps * len(images)
        asleep = max(0.0, (1 - self.gil_share) * budget - (time.perf_counter() - t0))  # fixed: GPU time
        self.spin(int(self.gil_share * budget * self.loops_per_s))  # fixed work: slower when the GIL is shared
        time.sleep(asleep)
        return out


def sampler_factory(stub: float | None, gil_share: float = 0.0) -> SamplerFactory:
    """The production loader, or a paced stand-in (``--stub``); picklable for Ray actors."""
    if stub is None:
        return load_sampler
    loops_per_s = PacedStub.calibrate() if gil_share > 0 else 0.0

    def load_stub(model_dir: str, device: str, cfg: SamplerConfig) -> PacedStub:
        importlib.import_module("engine.text")  # loading a real model imports it: the first batch must not pay for it
        return PacedStub(stub, gil_share, loops_per_s)

    return load_stub


def bare_images_per_s(cfg: GenerateConfig, device: str, threads: int | None,
                      factory: SamplerFactory = load_sampler) -> tuple[float, dict]:
    """The baseline: same sampler, same batches, one process, nothing but ``sample`` timed."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    sampler = factory(cfg.model_dir, device, cfg.sampler)
    unet = getattr(getattr(sampler, "model", None), "unet", None)
    attention = sorted({type(p).__name__ for p in unet.attn_processors.values()}) if unet is not None else []
    plan = build_plan(cfg.plan, cfg.real_manifest)
    cache, work = SourceCache(cfg.source_cache_shards), []
    for unit in plan.units:  # decode + fit outside the timed region
        sources = fit_sources(cache.get(unit.items), cfg.sampler.resolution, cfg.sampler.resize)
        for batch in batches(unit.items, sources, cfg.sampler.batch_size):
            src = [sources[it.source_id] for it in batch]
            work.append((unit, batch, np.stack([s.image for s in src]), np.stack([s.scribble for s in src])))
    from engine.text import names_for_ids

    n, t0 = 0, time.perf_counter()
    for unit, batch, images, scribbles in work:
        names = [names_for_ids(present_classes(s), plan.class_names) for s in scribbles]  # as the engine does
        sampler.sample(images, scribbles, names, unit.w, unit.lam, [it.seed for it in batch])
        n += len(batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return n / seconds, {"samples": n, "seconds": round(seconds, 3), "attention": attention}


def engine_images_per_s(cfg: GenerateConfig, mode: str, device: str,
                        factory: SamplerFactory = load_sampler) -> tuple[float, dict]:
    """The engine: Ray actors (``mode='ray'``) or its worker in this process (``'inprocess'``)."""
    if mode == "ray":
        from engine.generate.run import run_generate

        summary = run_generate(cfg, factory=factory, progress=False)
        extra = {k: summary[k] for k in ("samples", "generate_seconds", "sample_seconds_total", "seconds", "actors")}
        extra["outside_sampler_s"] = round(summary["generate_seconds"] - summary["sample_seconds_total"] / summary["actors"], 3)
        return summary["images_per_s"], extra
    plan = build_plan(cfg.plan, cfg.real_manifest)
    gen = ShardGenerator(cfg.model_dir, cfg.out_dir, plan.class_names, cfg.sampler, device=device,
                         image_format=cfg.image_format, source_cache_shards=cfg.source_cache_shards, factory=factory)
    t0 = time.perf_counter()
    units = plan.units
    n = sum(gen.run(unit, next_unit=units[i + 1] if i + 1 < len(units) else None).samples
            for i, unit in enumerate(units))  # the driver's prefetch hint, as the actor gets it
    seconds = time.perf_counter() - t0
    return n / seconds, {"samples": n, "seconds": round(seconds, 3)}


def config(args: argparse.Namespace, device: str, real: Path, model: Path, out: Path, lam: float, actors: int,
           cpus: int) -> GenerateConfig:
    cfg = GenerateConfig(
        real_manifest=str(real), model_dir=str(model), out_dir=str(out), image_format=args.image_format,
        plan=PlanConfig(w=[2.0], lambdas=[lam], samples_per_shard=args.batch_size * args.batches_per_shard),
        sampler=SamplerConfig(num_steps=args.steps, spacing="truncate", dtype=args.dtype, batch_size=args.batch_size,
                              resolution=args.resolution, device="cuda" if device.startswith("cuda") else "cpu",
                              compile=args.compile, scheduler=args.scheduler),
        ray=RayConfig(num_actors=actors, num_cpus_per_actor=cpus, local_num_cpus=args.ray_cpus),
    )
    cfg.validate()
    return cfg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="SD 1.5-shaped model at 512 px on one GPU")
    parser.add_argument("--stub", type=float, default=None, metavar="SECONDS",
                        help="a stand-in sampler paced to SECONDS per image, at the GPU's shapes: the engine's "
                             "overhead around an accelerator of that speed, measured on CPU (0.3176: an H100)")
    parser.add_argument("--stub-gil", type=float, default=0.0, metavar="SHARE",
                        help="with --stub: this share of the paced time is pure-Python work holding the GIL, as an "
                             "eager sampler's kernel launches (0.3: a guess); shows what the engine's threads cost it")
    parser.add_argument("--engine", choices=("ray", "inprocess"), default="ray")
    parser.add_argument("--sources", type=int, default=None, help="train sources (CPU 48, GPU 32)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (CPU 10, GPU 50)")
    parser.add_argument("--scheduler", default="ddim", choices=SCHEDULERS,
                        help="sampler.scheduler: the update rule (issue 25's fast solvers against DDIM)")
    parser.add_argument("--batch-size", type=int, default=None, help="(CPU 8, GPU 8)")
    parser.add_argument("--batches-per-shard", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=None, help="(CPU 32, GPU 512)")
    parser.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (CPU float32, GPU float16)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=None, help="(CPU 1.0, GPU 1.0 0.5)")
    parser.add_argument("--image-format", default="png")
    parser.add_argument("--compile", action="store_true", help="sampler.compile: torch.compile + channels_last (GPU)")
    parser.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    parser.add_argument("--actor-cpus", type=int, default=None,
                        help="CPUs of the engine's actor (ray.num_cpus_per_actor: all but one encode PNGs in "
                             "parallel; a CPU actor's torch threads too). Default: --threads on CPU; with --gpu or "
                             "--stub 4 (as configs/generate/paper.yaml), at most this machine's cores"),
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: torch threads of the bare loop = CPUs of the engine's actor (default 1: on a shared, "
                             "loaded machine 2 OpenMP threads on 2 cores can run several times slower than 1)")
    parser.add_argument("--repeats", type=int, default=2, help="alternate bare/engine runs this often; best of each")
    parser.add_argument("--device", default=None, help="override the device (e.g. --gpu --device cpu: a dry run)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the 1 -> 2 actor scaling run (CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="keep the model here: built if missing, reused if present (saves the SD 1.5-shaped "
                             "build, ~1 min, between runs)")
    parser.add_argument("--sources-dir", type=Path, default=None,
                        help="keep the sources here: ingested if missing, reused if present (512-px procedural "
                             "scenes ingest at ~2 img/s)")
    parser.add_argument("--build-only", action="store_true", help="build --model-dir (and --sources-dir) and stop")
    args = parser.parse_args()
    gpu_defaults = dict(sources=32, steps=50, batch_size=8, resolution=512, dtype="float16", lambdas=[1.0, 0.5])
    cpu_defaults = dict(sources=48, steps=10, batch_size=8, resolution=32, dtype="float32", lambdas=[1.0])
    stub_defaults = dict(sources=96, steps=50, batch_size=16, resolution=512, dtype="float32", lambdas=[1.0, 0.5])
    if args.gpu and args.stub is not None:
        parser.error("--stub replaces the GPU model: pass one of --gpu, --stub")
    defaults = gpu_defaults if args.gpu else stub_defaults if args.stub is not None else cpu_defaults
    if not 0.0 <= args.stub_gil < 1.0 or (args.stub_gil and args.stub is None):
        parser.error("--stub-gil takes a share in [0, 1) and needs --stub")
    factory = sampler_factory(args.stub, args.stub_gil)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = args.device or ("cuda" if args.gpu else "cpu")
    results: dict = {"args": vars(args) | {"json": str(args.json)}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-gen-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        real = args.sources_dir / "manifest.parquet" if args.sources_dir else None
        if real is None or not real.is_file():
            real = make_sources(args.sources_dir or root / "real", args.sources, args.resolution)
        from engine.manifest import read_manifest

        table, info = read_manifest(real)
        train = sum(split == "train" for split in table.column("split").to_pylist())
        if train != args.sources:
            raise SystemExit(f"{real} holds {train} train sources, not --sources {args.sources}: "
                             "pass an empty or matching --sources-dir")
        names = info.class_names
        model = args.model_dir or root / "model"
        if not (model / BUNDLE_FILE).is_file():
            (make_sd15_model if args.gpu else make_tiny_model)(model, names)
        print(f"setup (sources + model build/save): {time.perf_counter() - t:.1f} s", flush=True)
        if args.build_only:
            return 0
        # One-time CUDA/cuDNN start-up (one batch), paid before any timed run. A compiled sampler
        # runs a warm-up batch at load, outside the timed region, so it needs none.
        if device.startswith("cuda") and not args.compile:
            warm = config(args, device, real, model, root / "unused", 1.0, 1, 1)
            warm.plan.max_sources = args.batch_size
            bare_images_per_s(warm, device, None)

        def record(name: str, ips: float, extra: dict) -> float:
            results["runs"].append({"run": name, "images_per_s": round(ips, 4), **extra})
            print(f"{name:<34} {ips:9.3f} img/s  {extra}", flush=True)
            return ips

        threads = None if args.gpu else args.threads
        cpus = args.actor_cpus or (min(4, os.cpu_count() or 1) if args.gpu or args.stub is not None else args.threads)
        for lam in args.lambdas:  # bare and engine alternate, best of ``repeats`` each (shared, noisy machines)
            bare = eng = 0.0
            for r in range(args.repeats):
                bare = max(bare, record(f"bare   λ={lam:g} ({threads or device} thr) #{r}", *bare_images_per_s(
                    config(args, device, real, model, root / "unused", lam, 1, cpus), device, threads, factory)))
                eng = max(eng, record(f"engine λ={lam:g} 1 actor x {cpus} cpu #{r}", *engine_images_per_s(
                    config(args, device, real, model, root / f"e1-{lam}-{r}", lam, 1, cpus), args.engine, device, factory)))
            results[f"ratio_engine_over_bare_l{lam:g}"] = round(eng / bare, 4)
            print(f"  ratio engine / bare (λ={lam:g}, best of {args.repeats}): {eng / bare:.3f}  (goal >= 0.97)", flush=True)
        if not args.gpu and args.stub is None and not args.no_scaling and args.engine == "ray":
            lam = args.lambdas[0]
            one = record("engine 1 actor x 1 cpu", *engine_images_per_s(
                config(args, device, real, model, root / "s1", lam, 1, 1), "ray", device))
            two = record("engine 2 actors x 1 cpu", *engine_images_per_s(
                config(args, device, real, model, root / "s2", lam, 2, 1), "ray", device))
            results["scaling_2_over_1_actors"] = round(two / one, 4)
            print(f"  scaling 1 -> 2 actors: {two / one:.2f}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))  # paths as strings
    return 0


if __name__ == "__main__":
    sys.exit(main())
