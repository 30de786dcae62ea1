"""(w, λ) sampler semantics: step counts, schedules, CFG, determinism, batching, validation."""

import math

import numpy as np
import pytest
import torch
from cn_fixtures import CLASSES, micro_model, sources, write_sd_stack

from engine.errors import BadInputError
from engine.models import ScribbleGenModel
from engine.sampler import ScribbleSampler


@pytest.fixture(scope="module")
def model():
    return micro_model()


def _count_unet_calls(sampler):
    calls = []
    handle = sampler.model.unet.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    return calls, handle


@pytest.mark.parametrize("lam", [0.02, 0.1, 0.3, 0.55, 1.0])
def test_truncate_runs_ceil_lambda_n_steps_each_one_batched_forward(model, lam):
    sampler = ScribbleSampler(model, num_steps=10, spacing="truncate")
    images, scribbles, names = sources(3)
    calls, handle = _count_unet_calls(sampler)
    try:
        sampler.sample(images, scribbles, names, w=2.0, lam=lam, seeds=[0, 1, 2])
    finally:
        handle.remove()
    expected = math.ceil(round(lam * 10, 9))
    assert sampler.steps_for(lam) == expected == len(calls)
    assert calls == [6] * expected  # both CFG branches in one forward of 2B
    t_noise, ts, _ = sampler.schedule(lam)
    assert ts == [int(t) for t in sampler.scheduler.timesteps[10 - expected:]] and t_noise == ts[0]


def test_lambda_near_zero_returns_source(model):
    sampler = ScribbleSampler(model, num_steps=50, spacing="truncate")
    images, scribbles, names = sources(2)
    assert sampler.steps_for(0.02) == 1
    out = sampler.sample(images, scribbles, names, w=2.0, lam=0.02, seeds=[5, 6])
    diff = np.abs(out.astype(int) - images.astype(int))
    assert diff.mean() < 2.0 and diff.max() <= 8


def test_paper_spacing_steps_and_range(model):
    sampler = ScribbleSampler(model, num_steps=10, spacing="paper")
    for lam in (0.02, 0.35, 1.0):
        t_noise, ts, prevs = sampler.schedule(lam)
        assert sampler.steps_for(lam) == 10 == len(ts)
        assert t_noise == math.floor(999 * lam + 1e-9)
        assert ts[-1] == 1 and ts[0] <= 1000 * lam and ts == sorted(ts, reverse=True)
        assert ts == [int(1000 * lam * i / 10 + 1e-9) + 1 for i in range(9, -1, -1)] and prevs == ts[1:] + [0]
    assert sampler.schedule(1.0)[1][:2] == [901, 801]
    # The worked examples, from the paper's formula by hand: 1000·29/30 = 966.7 -> 967
    # (a fixed stride of 33 would give 958); 330·49/50 = 323.4 -> 324 (stride 6: 295).
    assert ScribbleSampler(model, num_steps=30, spacing="paper").schedule(1.0)[1][0] == 967
    assert ScribbleSampler(model, num_steps=50, spacing="paper").schedule(0.33)[1][0] == 324
    images, scribbles, names = sources(1)
    calls, handle = _count_unet_calls(sampler)
    sampler.sample(images, scribbles, names, w=3.0, lam=0.5, seeds=[0])
    handle.remove()
    assert len(calls) == 10
    with pytest.raises(BadInputError, match="1000"):
        sampler.schedule(0.005)


def test_ddim_update_matches_diffusers_step(model):
    sampler = ScribbleSampler(model, num_steps=10, spacing="truncate")
    g = torch.Generator().manual_seed(0)
    _, ts, prevs = sampler.schedule(1.0)
    for t, t_prev in zip(ts, prevs):
        z, eps = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
        ref = sampler.scheduler.step(eps, t, z).prev_sample
        torch.testing.assert_close(sampler._ddim_step(z, eps, t, t_prev), ref, rtol=1e-5, atol=1e-5)


def test_w1_equals_plain_conditional_sampling(model):
    sampler = ScribbleSampler(model, num_steps=5)
    images, scribbles, names = sources(2)
    calls, handle = _count_unet_calls(sampler)
    plain = sampler.sample(images, scribbles, names, w=1.0, lam=1.0, seeds=[3, 4])
    handle.remove()
    assert calls == [2] * 5  # no unconditional branch at w = 1
    # The full CFG formula evaluated at w = 1 (batched branches) gives the same images.
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    hint, nh = model.hint(scribbles), model.null_hints(2, (16, 16))
    text, nt = model.text.encode(names), model.text.null(2)
    with torch.no_grad():
        full = sampler._guided_eps(z, 500, hint, nh, text, nt, 1.0 + 1e-12)
        cond = sampler._guided_eps(z, 500, hint, nh, text, nt, 1.0)
    torch.testing.assert_close(full, cond, rtol=1e-4, atol=1e-5)
    near = sampler.sample(images, scribbles, names, w=1.0 + 1e-7, lam=1.0, seeds=[3, 4])
    assert np.abs(near.astype(int) - plain.astype(int)).max() <= 1


def test_guidance_changes_output(model):
    sampler = ScribbleSampler(model, num_steps=5)
    images, scribbles, names = sources(1)
    a = sampler.sample(images, scribbles, names, w=1.0, lam=1.0, seeds=[0])
    b = sampler.sample(images, scribbles, names, w=3.0, lam=1.0, seeds=[0])
    assert (a != b).any()


def test_seed_determinism_and_batch_equals_single(model):
    sampler = ScribbleSampler(model, num_steps=5)
    images, scribbles, names = sources(4)
    seeds = [11, 12, 13, 14]
    batch = sampler.sample(images, scribbles, names, w=2.0, lam=0.6, seeds=seeds)
    again = sampler.sample(images, scribbles, names, w=2.0, lam=0.6, seeds=seeds)
    assert np.array_equal(batch, again)
    for i in range(4):
        single = sampler.sample(images[i:i + 1], scribbles[i:i + 1], names[i:i + 1], w=2.0, lam=0.6, seeds=[seeds[i]])
        assert np.abs(single[0].astype(int) - batch[i].astype(int)).max() <= 1
        assert (single[0] == batch[i]).mean() > 0.99
    other = sampler.sample(images, scribbles, names, w=2.0, lam=0.6, seeds=[1, 2, 3, 4])
    assert (other != batch).any()


def test_save_load_gives_identical_samples(model, tmp_path):
    images, scribbles, names = sources(2)
    ref = ScribbleSampler(model, num_steps=4).sample(images, scribbles, names, w=2.0, lam=0.8, seeds=[7, 8])
    model.save_pretrained(tmp_path / "m")
    sampler = ScribbleSampler(ScribbleGenModel.from_pretrained(tmp_path / "m"), num_steps=4)
    assert sampler.model_id == model.model_id
    assert np.array_equal(sampler.sample(images, scribbles, names, w=2.0, lam=0.8, seeds=[7, 8]), ref)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"lam": 0.0}, "lambda"), ({"lam": 1.5}, "lambda"), ({"w": -1.0}, "w="), ({"w": float("nan")}, "w="),
     ({"seeds": [1]}, "agree")],
)
def test_bad_arguments(model, kwargs, match):
    sampler = ScribbleSampler(model, num_steps=3)
    images, scribbles, names = sources(2)
    args = {"w": 2.0, "lam": 0.5, "seeds": [1, 2], **kwargs}
    with pytest.raises(BadInputError, match=match):
        sampler.sample(images, scribbles, names, **args)


def test_bad_sizes_and_options(model):
    with pytest.raises(BadInputError, match="spacing"):
        ScribbleSampler(model, spacing="cosine")
    sampler = ScribbleSampler(model, num_steps=3)
    images, scribbles, names = sources(1, size=15)
    with pytest.raises(BadInputError, match="multiples of 2"):
        sampler.sample(images, scribbles, names, w=2.0, lam=0.5, seeds=[0])


@pytest.fixture(scope="module")
def v_model():
    return micro_model(prediction_type="v_prediction")


def test_v_prediction_update_matches_diffusers_step(v_model):
    """A v-model's output, converted to ε and stepped by our DDIM, is diffusers' v-prediction step."""
    sampler = ScribbleSampler(v_model, num_steps=10, spacing="truncate")
    assert sampler.scheduler.config.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(1)
    _, ts, prevs = sampler.schedule(1.0)
    for t, t_prev in zip(ts, prevs):
        z, v = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
        ref = sampler.scheduler.step(v, t, z).prev_sample
        ours = sampler._ddim_step(z, sampler._as_eps(v, z, t), t, t_prev)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_v_prediction_guidance_is_guidance_on_v(v_model):
    """CFG on the converted ε equals converting the CFG combination of the two v outputs."""
    sampler = ScribbleSampler(v_model, num_steps=5, spacing="truncate")
    images, scribbles, names = sources(2)
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    hint, nh = v_model.hint(scribbles), v_model.null_hints(2, (16, 16))
    text, nt = v_model.text.encode(names), v_model.text.null(2)
    tt = torch.full((2,), 700)
    with torch.no_grad():
        guided = sampler._guided_eps(z, 700, hint, nh, text, nt, 2.5)
        v_c, v_n = v_model.predict(z, tt, hint, text), v_model.predict(z, tt, nh, nt)
    torch.testing.assert_close(guided, sampler._as_eps(v_n + 2.5 * (v_c - v_n), z, 700), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(guided, v_n + 2.5 * (v_c - v_n), atol=1e-3)  # the conversion is not a no-op
    near = sampler.sample(images, scribbles, names, w=1.0, lam=0.02, seeds=[0, 1])
    assert np.abs(near.astype(int) - images.astype(int)).mean() < 2.0  # λ → 0 still returns the source


def _unet_texts(sampler):
    """The encoder_hidden_states of every UNet call (the prompts each CFG branch saw)."""
    seen = []
    handle = sampler.model.unet.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("uncond, same_prompt", [("hint", True), ("hint+prompt", False)])
def test_uncond_branch_keeps_or_drops_the_prompt(model, uncond, same_prompt):
    sampler = ScribbleSampler(model, num_steps=2, spacing="truncate", uncond=uncond)
    images, scribbles, names = sources(2)
    seen, handle = _unet_texts(sampler)
    try:
        sampler.sample(images, scribbles, names, w=2.0, lam=1.0, seeds=[0, 1])
    finally:
        handle.remove()
    null_half, cond_half = seen[0].chunk(2)
    assert torch.equal(cond_half, model.text.encode(names))
    assert torch.equal(null_half, cond_half) is same_prompt
    if not same_prompt:
        assert torch.equal(null_half, model.text.null(2))


def test_uncond_pair_the_model_never_saw_is_refused(model, tmp_path):
    model.uncond = "hint"
    try:
        model.save_pretrained(tmp_path / "m")
    finally:
        model.uncond = None
    loaded = ScribbleGenModel.from_pretrained(tmp_path / "m")
    assert loaded.uncond == "hint"
    ScribbleSampler(loaded, num_steps=2, uncond="hint")
    with pytest.raises(BadInputError, match=r"sampler.uncond=hint\+prompt: .* trained with the unconditional pair 'hint'.*set sampler.uncond=hint"):
        ScribbleSampler(loaded, num_steps=2, uncond="hint+prompt")
    with pytest.raises(BadInputError, match="uncond 'prompt'"):
        ScribbleSampler(model, uncond="prompt")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tiny", "sd15"])
def test_compiled_sampler_matches_the_eager_one_and_compiles_at_load(kind, tmp_path):
    """sampler.compile: fused attention projections, channels_last + torch.compile of the
    ControlNet, the UNet and (SD 1.5) the VAE's encoder and decoder, warmed up at load; same
    pixels within one grey level (float32 kernels fused differently)."""
    from engine.models import from_stable_diffusion

    stack = write_sd_stack(tmp_path / "sd") if kind == "sd15" else None

    def model() -> ScribbleGenModel:
        return micro_model() if stack is None else from_stable_diffusion(stack, CLASSES, resolution=32).eval()

    size = 16 if kind == "tiny" else 32
    images, scribbles, names = sources(4, size)
    eager = ScribbleSampler(model(), num_steps=4, spacing="truncate")
    compiled = ScribbleSampler(model(), num_steps=4, spacing="truncate")
    compiled.compile(4, (size, size))
    unet, vae = compiled.model.unet, compiled.model.vae
    assert unet._compiled_call_impl is not None and compiled.model.controlnet._compiled_call_impl is not None
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    processors = {type(p).__name__ for m in (unet, compiled.model.controlnet) for p in m.attn_processors.values()}
    assert processors == {"FusedAttnProcessor2_0"}
    if kind == "sd15":
        assert vae.encoder._compiled_call_impl is not None and vae.decoder._compiled_call_impl is not None
    ref = eager.sample(images, scribbles, names, 2.0, 1.0, [0, 1, 2, 3])
    out = compiled.sample(images, scribbles, names, 2.0, 1.0, [0, 1, 2, 3])
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
