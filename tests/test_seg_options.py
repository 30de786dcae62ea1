"""The pre-registered experiment's seg options: classical augmentation (augment.rotate, vflip,
color_jitter, classical_on), data.synthetic_per_source and data.mismatched_scribbles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import seg.batches as batches
import seg.train as seg_train
from engine.config import load_config
from engine.errors import BadInputError
from engine.shards import UNLABELLED
from seg.batches import AugmentConfig, MismatchedScribbles, MixedBatches, augment, color_jitter, to_tensor
from seg.schemes import SchemeConfig
from seg.stream import index_manifests, one_pass, real_scribbles
from seg_fixtures import make_real, make_scene, make_synthetic, synthetic

LAMS = (0.2, 0.5)
SEEDS = (3, 10, 7, 25, 1)  # key order (string): s1, s10, s25, s3, s7 -- not the numeric order
N_TRAIN = 12
CLASSICAL = dict(rotate=40.0, vflip=True, color_jitter=0.4)
IDENTITY = dict(crop=32, scale_min=1.0, scale_max=1.0, hflip=False)  # scale-crop-flip that changes nothing at 32 px


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg_options")
    real = make_real(root, n_train=N_TRAIN, n_val=4)
    synth = make_synthetic(root, LAMS, n_train=N_TRAIN, seeds=SEEDS)
    extra = make_synthetic(root, (0.5,), n_train=N_TRAIN, seeds=(2, 4), folder="synthetic2")  # a second cell at λ 0.5
    return real, synth, extra


def legacy_augment(image, labels, cfg, rng):
    """seg.batches.augment as it was before the classical options (verbatim): the reference for 'off'."""
    x = to_tensor(image)
    ys = [torch.from_numpy(np.ascontiguousarray(y)) for y in labels]
    h, w = x.shape[1:]
    s = rng.uniform(cfg.scale_min, cfg.scale_max)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    if size != (h, w):
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
        ys = [F.interpolate(y[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(torch.uint8) for y in ys]
    ph, pw = max(0, cfg.crop - size[0]), max(0, cfg.crop - size[1])
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), value=0.0)
        ys = [F.pad(y, (0, pw, 0, ph), value=UNLABELLED) for y in ys]
    top = int(rng.integers(0, x.shape[1] - cfg.crop + 1))
    left = int(rng.integers(0, x.shape[2] - cfg.crop + 1))
    x = x[:, top : top + cfg.crop, left : left + cfg.crop]
    ys = [y[top : top + cfg.crop, left : left + cfg.crop] for y in ys]
    if cfg.hflip and rng.random() < 0.5:
        x, ys = x.flip(-1), [y.flip(-1) for y in ys]
    return x.contiguous(), [y.contiguous() for y in ys]


def block_scene(size: int = 48, block: int = 8, seed: int = 0):
    """Labels 0..3 in square blocks; the red channel encodes the label (40 + 60 * id)."""
    rng = np.random.default_rng(seed)
    labels = np.kron(rng.integers(0, 4, (size // block, size // block)), np.ones((block, block))).astype(np.uint8)
    image = np.stack([40 + 60 * labels, 90 + 0 * labels, 200 - 40 * labels], -1).astype(np.uint8)
    return image, labels


def decoded_ids(x: torch.Tensor) -> torch.Tensor:
    red = (x[0] * 0.229 + 0.485) * 255
    return ((red - 40) / 60).round().clamp(0, 3)


def interior(labels: torch.Tensor) -> torch.Tensor:
    """Labelled pixels whose 3x3 neighbourhood holds the same label (away from blended edges)."""
    y = labels.float()[None, None]
    hi = F.max_pool2d(y, 3, 1, 1)[0, 0]
    lo = -F.max_pool2d(-y, 3, 1, 1)[0, 0]
    return (hi == lo) & (labels != UNLABELLED)


def batches_of(ds) -> list[dict]:
    return list(ds)


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("image", "scribble", "roi", "lam"))


# -- options off: nothing changes ---------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [AugmentConfig(crop=24), AugmentConfig(crop=56, scale_min=0.5, scale_max=2.0),
                                 AugmentConfig(crop=32, hflip=False, rotate=0.0, vflip=False, color_jitter=0.0, classical_on="all")])
def test_off_is_the_old_recipe_output_and_rng_draws(cfg):
    image, labels = block_scene()
    for seed in range(5):
        new_rng, old_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        x, ys = augment(image, [labels, np.ones_like(labels)], cfg, new_rng)
        x0, ys0 = legacy_augment(image, [labels, np.ones_like(labels)], cfg, old_rng)
        assert torch.equal(x, x0) and all(torch.equal(a, b) for a, b in zip(ys, ys0))
        assert new_rng.bit_generator.state == old_rng.bit_generator.state  # the same draws, so later samples match too


def test_classical_false_skips_the_classical_ops_and_their_draws():
    image, labels = block_scene()
    on, plain = AugmentConfig(crop=40, **CLASSICAL), AugmentConfig(crop=40)
    new_rng, old_rng = np.random.default_rng(1), np.random.default_rng(1)
    for _ in range(5):
        x, ys = augment(image, [labels], on, new_rng, classical=False)
        x0, ys0 = legacy_augment(image, [labels], plain, old_rng)
        assert torch.equal(x, x0) and torch.equal(ys[0], ys0[0])
    assert new_rng.bit_generator.state == old_rng.bit_generator.state


def test_mixed_batches_with_options_off_equal_the_old_pipeline(data, monkeypatch):
    real, synth, _ = data
    index = index_manifests([real, synth])
    assert index_manifests([real, synth], synthetic_per_source=0).synthetic.keys() == index.synthetic.keys()
    scheme = SchemeConfig(name="uniform", synth_fraction=0.5)
    explicit = AugmentConfig(crop=24, rotate=0.0, vflip=False, color_jitter=0.0, classical_on="all")
    now = batches_of(MixedBatches(index, scheme, 6, 8, explicit, seed=3, shuffle_buffer=8, mismatched_scribbles=False))
    monkeypatch.setattr(batches, "augment", lambda image, labels, cfg, rng, classical=True: legacy_augment(image, labels, cfg, rng))
    before = batches_of(MixedBatches(index, scheme, 6, 8, AugmentConfig(crop=24), seed=3, shuffle_buffer=8))
    assert same_batches(now, before)


# -- classical augmentation -----------------------------------------------------------------------------
def test_rotate_and_vflip_keep_labels_on_their_pixels_and_mark_rotated_in_pixels():
    image, labels = block_scene(48)
    cfg = AugmentConfig(crop=40, scale_min=1.0, scale_max=1.3, hflip=True, rotate=45.0, vflip=True)  # no padding
    rng = np.random.default_rng(0)
    outside_seen = 0
    for _ in range(20):
        x, (scrib, inside) = augment(image, [labels, np.ones_like(labels)], cfg, rng)
        assert x.shape == (3, 40, 40) and scrib.shape == inside.shape == (40, 40)
        # Every source pixel is labelled, so 255 can only come from outside the image: both maps agree.
        assert torch.equal(scrib == UNLABELLED, inside == UNLABELLED)
        assert set(inside.unique().tolist()) <= {1, UNLABELLED}
        core = interior(scrib)
        assert core.sum() > 200
        agree = (decoded_ids(x)[core] == scrib[core].float()).float().mean().item()
        assert agree > 0.99, agree
        # The same check on a misaligned pairing fails: the test can tell.
        flipped = scrib.flip(-2)
        core_f = interior(flipped)
        assert (decoded_ids(x)[core_f] == flipped[core_f].float()).float().mean().item() < 0.8
        # Pixels rotated in from outside: unlabelled, outside the roi, the mean colour (0 once normalised).
        out = interior(torch.where(inside == UNLABELLED, 1, 0).to(torch.uint8)) & (inside == UNLABELLED)
        outside_seen += int(out.sum())
        if out.any():
            assert x[:, out].abs().max().item() < 0.02
    assert outside_seen > 100  # the 45° rotations did bring pixels in from outside


def test_vflip_alone_flips_image_and_labels_together():
    image, labels = block_scene(32)
    cfg = AugmentConfig(**IDENTITY, vflip=True)
    rng = np.random.default_rng(0)
    flips = 0
    for _ in range(16):
        x, (scrib,) = augment(image, [labels], cfg, rng)
        flipped = torch.equal(scrib, torch.from_numpy(labels).flip(0))
        assert flipped or torch.equal(scrib, torch.from_numpy(labels))
        assert torch.equal(x, to_tensor(image).flip(-2) if flipped else to_tensor(image))
        flips += flipped
    assert 0 < flips < 16


def test_color_jitter_changes_colours_never_labels():
    image, labels = block_scene(32)
    rng = np.random.default_rng(0)
    cfg = AugmentConfig(**IDENTITY, color_jitter=0.5)
    plain = to_tensor(image)
    changes = []
    for _ in range(10):
        x, (scrib, inside) = augment(image, [labels, np.ones_like(labels)], cfg, rng)
        assert torch.equal(scrib, torch.from_numpy(labels)) and bool((inside == 1).all())
        changes.append((x - plain).abs().mean().item())
    assert min(changes) > 0.01 and len({round(c, 6) for c in changes}) == 10
    # Small strength, small change; no strength, no change (and no draw).
    weak = color_jitter(image, 0.02, np.random.default_rng(1)).astype(int)
    assert 0 < np.abs(weak - image).max() <= 16
    assert torch.equal(augment(image, [labels], AugmentConfig(**IDENTITY), np.random.default_rng(2))[0], plain)


@pytest.mark.parametrize("strength", [0.5, 0.1])
def test_color_jitter_turns_the_hue_both_ways_within_half_the_strength(strength):
    """On a pure red image brightness, contrast and saturation keep the hue, so the hue seen is the shift."""
    from PIL import Image

    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 200
    rng = np.random.default_rng(0)
    shifts = []
    for _ in range(40):
        hue = np.asarray(Image.fromarray(color_jitter(red, strength, rng)).convert("HSV"))[..., 0].astype(int)
        assert (hue == hue[0, 0]).all()
        shifts.append((hue[0, 0] + 128) % 256 - 128)  # signed, in 1/256 of a turn
    limit = strength / 2 * 256 + 2
    assert max(abs(x) for x in shifts) <= limit and max(shifts) > limit / 3 and min(shifts) < -limit / 3


def test_rotation_with_mixed_batches_puts_rotated_in_pixels_outside_the_roi(data):
    real, synth, _ = data
    index = index_manifests([real, synth])
    cfg = AugmentConfig(**IDENTITY, rotate=60.0)  # 32-px scenes, 32-px crops: no padding, only rotation leaves the image
    got = batches_of(MixedBatches(index, SchemeConfig(name="real"), 8, 4, cfg, shuffle_buffer=4))
    roi = torch.cat([b["roi"] for b in got])
    scrib = torch.cat([b["scribble"] for b in got])
    assert (~roi).sum() > 100 and bool((scrib[~roi] == UNLABELLED).all())


def test_classical_on_real_leaves_synthetic_samples_as_they_were(data):
    real, synth, _ = data
    index = index_manifests([real, synth])
    all_synth = SchemeConfig(name="uniform", synth_fraction=1.0)

    def run(**aug):
        return batches_of(MixedBatches(index, all_synth, 6, 6, AugmentConfig(crop=24, **aug), seed=1, shuffle_buffer=8))

    plain = run()
    assert same_batches(run(**CLASSICAL, classical_on="real"), plain)
    assert not same_batches(run(**CLASSICAL, classical_on="all"), plain)
    real_only = SchemeConfig(name="real")
    assert not same_batches(
        batches_of(MixedBatches(index, real_only, 6, 6, AugmentConfig(crop=24, **CLASSICAL), seed=1, shuffle_buffer=8)),
        batches_of(MixedBatches(index, real_only, 6, 6, AugmentConfig(crop=24), seed=1, shuffle_buffer=8)))


# -- synthetic_per_source -------------------------------------------------------------------------------
def keys_by_source(group) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for keys in group.allowed.values():
        for key in keys:
            out.setdefault(key.split("__")[0], []).append(key)
    return {s: sorted(k) for s, k in out.items()}


def seeds_of(keys) -> set[int]:
    return {int(k.rsplit("__s", 1)[1]) for k in keys}


def test_synthetic_per_source_keeps_the_n_smallest_keys_per_source_and_lambda(data):
    real, synth, extra = data
    everything = index_manifests([real, synth, extra])
    assert [len(everything.synthetic[lam]) for lam in LAMS] == [N_TRAIN * 5, N_TRAIN * 7]
    capped = index_manifests([real, synth, extra], synthetic_per_source=3)
    assert [len(capped.synthetic[lam]) for lam in LAMS] == [N_TRAIN * 3, N_TRAIN * 3]
    for lam in LAMS:
        full, kept = keys_by_source(everything.synthetic[lam]), keys_by_source(capped.synthetic[lam])
        assert set(kept) == set(full) and len(kept) == N_TRAIN
        for source, keys in kept.items():
            assert keys == full[source][:3]
            assert seeds_of(keys) == ({1, 10, 25} if lam == 0.2 else {1, 10, 2})  # string order, across manifests
    assert capped.real.allowed == everything.real.allowed and capped.val.allowed == everything.val.allowed
    more = index_manifests([real, synth], synthetic_per_source=99)  # more than a cell holds: all of it
    assert all(len(g) == N_TRAIN * 5 for g in more.synthetic.values())
    small = index_manifests([real, synth], real_fraction=0.5, synthetic_per_source=1)
    kept_sources = {k for keys in small.real.allowed.values() for k in keys}
    for group in small.synthetic.values():
        by_source = keys_by_source(group)
        assert set(by_source) == kept_sources and all(seeds_of(k) == {1} for k in by_source.values())
    assert small.synthetic_sources == kept_sources


# -- mismatched scribbles -------------------------------------------------------------------------------
def test_mismatched_pairs_every_synthetic_sample_with_its_derangement_partner(data):
    real, synth, _ = data
    index = index_manifests([real, synth], real_fraction=0.5, subset_seed=1)
    ids = sorted(k for keys in index.real.allowed.values() for k in keys)
    scribbles = {i: make_scene(int(i[-4:]), "train").scribble for i in ids}
    assert all(not np.array_equal(scribbles[a], scribbles[b]) for a in ids for b in ids if a != b)  # they can be told apart
    pairing = MismatchedScribbles(real_scribbles(index.real))
    assert pairing.partner == {ids[i]: ids[i - 1] for i in range(len(ids))}  # seg.judge.derangement: i -> i - 1
    seen = set()
    for sample in one_pass(index.synthetic[0.5], epoch=0, seed=0, shuffle_buffer=0, split=False):
        source = sample.meta["source_id"]
        got = pairing(sample)
        assert np.array_equal(got, scribbles[pairing.partner[source]]) and not np.array_equal(got, scribbles[source])
        seen.add(source)
    assert seen == set(ids)


def test_mismatched_resizes_the_partner_scribble_to_the_image():
    a, b = make_scene(0, "train", 32), make_scene(1, "train", 32)
    from engine.data.imageio import encode_png

    pairing = MismatchedScribbles({"train0000": encode_png(a.scribble), "train0001": encode_png(b.scribble)})
    big = synthetic(make_scene(1, "train", 64), 0.5)
    got = pairing(big)
    assert got.shape == (64, 64) and np.array_equal(got, np.kron(a.scribble, np.ones((2, 2), np.uint8)))


def test_mismatched_batches_change_synthetic_scribbles_only(data):
    real, synth, _ = data
    index = index_manifests([real, synth])
    own = {make_scene(i, "train").meta["source_id"]: make_scene(i, "train").scribble for i in range(N_TRAIN)}
    images = {}  # image bytes -> (source, synthetic?)
    for i in range(N_TRAIN):
        scene = make_scene(i, "train")
        images[to_tensor(scene.image).numpy().tobytes()] = (scene.key, False)
        for seed in SEEDS:
            images[to_tensor(synthetic(scene, 0.5, seed).image).numpy().tobytes()] = (scene.key, True)
    scheme = SchemeConfig(name="fixed", fixed_lambda=0.5, synth_fraction=0.5)
    ds = MixedBatches(index, scheme, 8, 6, AugmentConfig(**IDENTITY), shuffle_buffer=8, mismatched_scribbles=True)
    ids = sorted(own)
    partner = {ids[i]: ids[i - 1] for i in range(len(ids))}
    counts = {True: 0, False: 0}
    for batch in ds:
        for x, y, lam in zip(batch["image"], batch["scribble"], batch["lam"].tolist()):
            source, is_synth = images[x.numpy().tobytes()]
            assert is_synth == (lam > 0)
            expected = own[partner[source]] if is_synth else own[source]
            assert np.array_equal(y.numpy(), expected)
            counts[is_synth] += 1
    assert counts[True] > 5 and counts[False] > 5


# -- bad values -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("augment.rotate=-5", "augment.rotate"),
    ("augment.rotate=200", "augment.rotate"),
    ("augment.vflip=maybe", "augment.vflip"),
    ("augment.color_jitter=1.5", "augment.color_jitter"),
    ("augment.color_jitter=-0.1", "augment.color_jitter"),
    ("augment.classical_on=synthetic", "augment.classical_on"),
    ("data.synthetic_per_source=-1", "data.synthetic_per_source"),
    ("data.synthetic_per_source=2.5", "data.synthetic_per_source"),
    ("data.mismatched_scribbles=sometimes", "data.mismatched_scribbles"),
])
def test_bad_option_values_are_named(override, message):
    with pytest.raises(BadInputError, match=message.replace(".", r"\.")):
        load_config(seg_train.SegConfig, None, [override])


def test_mismatched_without_a_real_scribble_for_a_source_is_named(data, tmp_path):
    real, synth, _ = data
    more = make_synthetic(tmp_path, (0.5,), n_train=N_TRAIN + 2)  # two sources the real set does not have
    index = index_manifests([real, more])
    with pytest.raises(BadInputError, match="train0012"):
        MixedBatches(index, SchemeConfig(name="uniform"), 4, 4, AugmentConfig(), mismatched_scribbles=True)
    lone = index_manifests([make_real(tmp_path / "one", n_train=1, n_val=2), synth], real_fraction=1.0)
    with pytest.raises(BadInputError, match="needs >= 2 real train sources"):
        MixedBatches(lone, SchemeConfig(name="uniform"), 4, 4, AugmentConfig(), mismatched_scribbles=True)
    with pytest.raises(BadInputError, match="synthetic_per_source"):
        index_manifests([real, synth], synthetic_per_source=-2)


# -- end to end: the options reach the run and its summary ------------------------------------------------
@pytest.mark.slow
def test_train_with_all_options_records_them(data, tmp_path, capsys):
    real, synth, _ = data
    out = tmp_path / "run"
    argv = ["--shards", str(real), str(synth), "--scheme", "uniform", "--out", str(out),
            "--set", "train.steps=4", "--set", "train.batch_size=4", "--set", "augment.crop=32", "--set", "data.workers=0",
            "--set", "train.checkpoint_every=0", "--set", "model.width=8", "--set", "model.backbone_weights=\"\"", "--set", "loss.name=pce",
            "--set", "augment.rotate=30", "--set", "augment.vflip=true", "--set", "augment.color_jitter=0.3",
            "--set", "data.synthetic_per_source=2", "--set", "data.mismatched_scribbles=true"]
    assert seg_train.main(argv) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["synthetic_samples"] == {"0.2": N_TRAIN * 2, "0.5": N_TRAIN * 2}
    assert summary["synthetic_per_source"] == 2 and summary["mismatched_scribbles"] is True
    assert summary["classical_augment"] == {"rotate": 30.0, "vflip": True, "color_jitter": 0.3, "classical_on": "real"}
