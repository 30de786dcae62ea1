"""Bad inputs, one test each: a clear error naming the input, or a recorded skip; never a half output.

Every case goes through a CLI entry point's ``main(argv)`` (ingest, verify, generate,
seg.train) and checks the contract of the house: exit status 2 (1 for a failed verify),
one ``error: ...`` line on stderr that names the offending file or value, no traceback,
and no ``.tmp`` file or manifest left behind. Ingest cases run with and without
``--skip-bad``; with it the bad input becomes a ``skipped`` manifest row naming the
problem and the rest of the set verifies.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

import seg.train as seg_train
from engine.generate.config import SamplerConfig
from engine.generate.plan import build_plan
from engine.generate.worker import ShardGenerator
from engine.ingest import main as ingest_main
from engine.manifest import read_manifest, write_manifest
from engine.shards import read_shard
from engine.verify import main as verify_main
from engine.verify import verify_manifest
from gen_fixtures import CLASS_NAMES, make_real_set, standin_factory
from jobs.generate import main as generate_main
from seg_fixtures import make_real, make_synthetic

REPO = Path(__file__).resolve().parents[1]
SIZE = 16


def _error_line(capsys: pytest.CaptureFixture) -> str:
    """The single ``error:`` line a CLI printed; fails on a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _no_leftovers(folder: Path) -> None:
    if folder.exists():
        assert not list(folder.rglob("*.tmp")), sorted(folder.rglob("*.tmp"))


# --------------------------------------------------------------------------- ingest ----------------

def _scribble() -> np.ndarray:
    s = np.full((SIZE, SIZE), 255, np.uint8)
    s[4, 2:12] = 1
    s[12, 2:12] = 0
    return s


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_truncated_jpeg(root: Path) -> None:
    _truncate(root / "images" / "b_bad.jpg")


def _bad_truncated_scribble_png(root: Path) -> None:
    _truncate(root / "scribbles" / "b_bad.png")


def _bad_rgba_scribble(root: Path) -> None:
    rgba = np.dstack([_scribble()] * 3 + [np.full((SIZE, SIZE), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "scribbles" / "b_bad.png")


def _bad_16bit_scribble(root: Path) -> None:
    Image.fromarray(_scribble().astype(np.uint16) * 256).save(root / "scribbles" / "b_bad.png")


def _bad_size_mismatch(root: Path) -> None:
    Image.fromarray(_scribble()[: SIZE - 6]).save(root / "scribbles" / "b_bad.png")


def _bad_class_out_of_range(root: Path) -> None:
    s = _scribble()
    s[8, 3:5] = 7  # classes.txt names 3 classes: ids 0..2
    Image.fromarray(s).save(root / "scribbles" / "b_bad.png")


def _bad_empty_scribble(root: Path) -> None:
    Image.fromarray(np.full((SIZE, SIZE), 255, np.uint8)).save(root / "scribbles" / "b_bad.png")


def _bad_missing_scribble(root: Path) -> None:
    (root / "scribbles" / "b_bad.png").unlink()


BAD_INGEST: dict[str, tuple[Callable[[Path], None], str]] = {
    # case: (how to break b_bad, what the message must say after naming the file)
    "truncated_jpeg": (_bad_truncated_jpeg, "b_bad.jpg: cannot read image"),
    "truncated_scribble_png": (_bad_truncated_scribble_png, "b_bad.png: cannot read label PNG"),
    "rgba_scribble": (_bad_rgba_scribble, "b_bad.png: label PNG has mode RGBA"),
    "16bit_scribble": (_bad_16bit_scribble, "b_bad.png: label PNG has mode I"),
    "size_mismatch": (_bad_size_mismatch, "b_bad.png): scribble is 16x10 but image is 16x16"),
    "class_out_of_range": (_bad_class_out_of_range, "b_bad.png): scribble has class id(s) [7] out of range 0..2"),
    "empty_scribble": (_bad_empty_scribble, "b_bad.png): scribble is empty"),
    "missing_scribble": (_bad_missing_scribble, "b_bad.png: label PNG is missing"),
}


def _folder(root: Path, stems: tuple[str, ...] = ("a_good", "b_bad", "c_good")) -> Path:
    """A folder source of 16x16 JPEG images with grey-mode scribbles, all train."""
    for d in ("images", "scribbles"):
        (root / d).mkdir(parents=True)
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    (root / "val.txt").write_text("")
    for i, stem in enumerate(stems):
        Image.fromarray(_image(i)).save(root / "images" / f"{stem}.jpg", quality=95)
        Image.fromarray(_scribble()).save(root / "scribbles" / f"{stem}.png")
    return root


def _ingest(src: Path, out: Path, *extra: str) -> int:
    return ingest_main(["--config", str(REPO / "configs/ingest/folder.yaml"), "--set", f"source.folder.root={src}",
                        "--out", str(out), "--set", "samples_per_shard=1", *extra])


@pytest.mark.parametrize("case", sorted(BAD_INGEST))
def test_ingest_bad_input_stops_naming_the_file(case: str, tmp_path: Path, capsys) -> None:
    src = _folder(tmp_path / "src")
    breaker, message = BAD_INGEST[case]
    breaker(src)
    out = tmp_path / "real"
    assert _ingest(src, out) == 2
    line = _error_line(capsys)
    assert message in line, line
    # Nothing half written: the good sample before the bad one is a whole shard, no manifest, no .tmp.
    assert sorted(p.name for p in out.iterdir()) == ["real-train-000000.tar"]
    assert [s.key for s in read_shard(out / "real-train-000000.tar")] == ["a_good"]


@pytest.mark.parametrize("case", sorted(BAD_INGEST))
def test_ingest_bad_input_with_skip_bad_is_a_recorded_skip(case: str, tmp_path: Path) -> None:
    src = _folder(tmp_path / "src")
    breaker, message = BAD_INGEST[case]
    breaker(src)
    out = tmp_path / "real"
    assert _ingest(src, out, "--skip-bad") == 0
    report = verify_manifest(out / "manifest.parquet")
    assert report.ok and (report.samples, report.skipped) == (2, 1), report.problems
    rows = read_manifest(out / "manifest.parquet")[0].to_pylist()
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert [r["source_id"] for r in skipped] == ["b_bad"] and message in skipped[0]["error"]
    assert sorted(r["key"] for r in rows if r["status"] == "ok") == ["a_good", "c_good"]
    _no_leftovers(out)


@pytest.mark.parametrize("mode", ["P", "L"])
def test_one_channel_scribbles_palette_or_grey_are_read_as_class_ids(mode: str, tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", ("a_good",))
    img = Image.fromarray(_scribble())
    if mode == "P":  # a palette PNG stores the class id as the palette index (VOC/ScribbleSup style)
        img = img.convert("P")
        img.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    img.save(src / "scribbles" / "a_good.png")
    assert Image.open(src / "scribbles" / "a_good.png").mode == mode
    assert _ingest(src, tmp_path / "real") == 0
    (sample,) = read_shard(tmp_path / "real" / "real-train-000000.tar")
    np.testing.assert_array_equal(sample.scribble, _scribble())


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_non_rgb_images_are_converted_to_rgb(mode: str, tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", ("a_good",))
    (src / "images" / "a_good.jpg").unlink()
    rgb = Image.fromarray(_image(0))
    img = rgb.convert(mode) if mode != "RGBA" else rgb.copy()
    if mode == "RGBA":
        img.putalpha(128)
    img.save(src / "images" / "a_good.png")
    assert _ingest(src, tmp_path / "real") == 0
    (sample,) = read_shard(tmp_path / "real" / "real-train-000000.tar")
    np.testing.assert_array_equal(sample.image, np.asarray(img.convert("RGB")))


# ----------------------------------------------------------------- damaged shards and manifests --

@pytest.fixture
def seg_data(tmp_path: Path) -> tuple[Path, Path]:
    """A real manifest (train + val) and a one-shard synthetic manifest at λ = 0.5."""
    return make_real(tmp_path, n_train=8, n_val=4, per_shard=8, size=SIZE), \
        make_synthetic(tmp_path, (0.5,), n_train=8, per_shard=8, size=SIZE)


def _only_shard(manifest: Path) -> Path:
    (shard,) = sorted(manifest.parent.glob("*.tar"))
    return shard


def _zero_byte(shard: Path) -> None:
    shard.write_bytes(b"")


def _drop_member(shard: Path, suffix: str = ".scribble.png") -> str:
    """Rewrite ``shard`` without the first key's ``suffix`` member; return that key."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    dropped = next(m.name for m, _ in members if m.name.endswith(suffix))
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name != dropped:
                tar.addfile(m, io.BytesIO(data))
    return dropped[: -len(suffix)]


def _missing(shard: Path) -> None:
    shard.unlink()


SEG_FAST = ["--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "augment.crop=16",
            "--set", "model.width=8", "--set", 'model.backbone_weights=""', "--set", "train.checkpoint_every=0", "--set", "train.eval_every=0",
            "--set", "data.workers=2", "--set", "data.shuffle_buffer=4"]


def _seg(real: Path, synth: Path, out: Path, *extra: str) -> int:
    return seg_train.main(["--shards", str(real), str(synth), "--out", str(out), "--set", "scheme.name=uniform",
                           "--set", "scheme.synth_fraction=1.0", *SEG_FAST, *extra])


def test_verify_names_a_zero_byte_shard(seg_data, capsys) -> None:
    _, synth = seg_data
    shard = _only_shard(synth)
    _zero_byte(shard)
    assert verify_main([str(synth)]) == 1
    out = capsys.readouterr().out
    assert f"{shard}: size 0 bytes" in out and f"{shard}: not a readable tar shard" in out


def test_verify_names_a_sample_missing_a_member(seg_data) -> None:
    """Even when the manifest was written from the damaged shard (checksum agrees), verify finds it."""
    _, synth = seg_data
    shard = _only_shard(synth)
    key = _drop_member(shard)
    table, info = read_manifest(synth)
    from engine.shards import sha256_file

    rows = [{**r, "shard_bytes": shard.stat().st_size, "shard_sha256": sha256_file(shard)} for r in table.to_pylist()]
    write_manifest(rows, synth, info)
    problems = "\n".join(verify_manifest(synth).problems)
    assert f"{shard}:{key}: sample is missing member(s) ['scribble.png']" in problems


def test_verify_cli_names_a_missing_shard(seg_data, capsys) -> None:
    _, synth = seg_data
    shard = _only_shard(synth)
    _missing(shard)
    assert verify_main([str(synth)]) == 1
    assert f"{shard}: shard listed in the manifest is missing" in capsys.readouterr().out


def test_seg_train_refuses_a_manifest_pointing_to_a_missing_shard(seg_data, tmp_path, capsys) -> None:
    real, synth = seg_data
    shard = _only_shard(synth)
    _missing(shard)
    assert _seg(real, synth, tmp_path / "run") == 2
    line = _error_line(capsys)
    assert str(shard) in line and "missing" in line and str(synth) in line
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("damage, message", [(_zero_byte, "not a readable tar shard"),
                                             (_drop_member, "sample is missing member(s) ['scribble.png']")])
def test_seg_train_names_a_damaged_shard_met_in_a_loader_worker(seg_data, tmp_path, capsys, damage, message) -> None:
    real, synth = seg_data
    shard = _only_shard(synth)
    damage(shard)
    out = tmp_path / "run"
    assert _seg(real, synth, out, "--set", "data.workers=1") == 2  # one worker process: shut down at once
    line = _error_line(capsys)
    assert str(shard) in line and message in line, line
    assert not (out / "summary.json").exists()
    _no_leftovers(out)


def _gen_argv(real: Path, tmp_path: Path, *extra: str) -> list[str]:
    (tmp_path / "model").mkdir(exist_ok=True)
    return ["--set", f"real_manifest={real}", "--set", f"model_dir={tmp_path / 'model'}",
            "--set", f"out_dir={tmp_path / 'syn'}", "--no-progress", *extra]


def test_generate_refuses_a_real_manifest_pointing_to_a_missing_shard(tmp_path, capsys) -> None:
    real = make_real_set(tmp_path / "real", n_train=6, n_val=2)
    (tmp_path / "real" / "real-000001.tar").unlink()
    assert generate_main(_gen_argv(real, tmp_path)) == 2
    line = _error_line(capsys)
    assert "real-000001.tar" in line and "missing" in line and str(real) in line
    assert not (tmp_path / "syn").exists()  # refused before any output (and before Ray starts)


@pytest.mark.parametrize("damage, message", [(_zero_byte, "not a readable tar shard"),
                                             (_drop_member, "sample is missing member(s) ['scribble.png']")])
def test_generator_names_a_damaged_real_shard_and_leaves_no_tmp(tmp_path, damage, message) -> None:
    """The actor's side (no Ray): the unit fails naming the real shard, its temp shard is removed."""
    from engine.config import load_config
    from engine.errors import BadInputError
    from engine.generate.config import GenerateConfig

    real = make_real_set(tmp_path / "real", n_train=4, n_val=0, per_shard=4)
    cfg = load_config(GenerateConfig, None, ["plan.lambdas=[0.5]", "plan.samples_per_shard=4"])
    unit = build_plan(cfg.plan, real).units[0]
    damage(tmp_path / "real" / "real-000000.tar")
    gen = ShardGenerator(str(tmp_path), str(tmp_path / "syn"), CLASS_NAMES, SamplerConfig(batch_size=2),
                         factory=standin_factory)
    with pytest.raises(BadInputError, match="real-000000.tar") as err:
        gen.run(unit)
    assert message in str(err.value)
    assert not (tmp_path / "syn").exists() or not list((tmp_path / "syn").iterdir())


def test_generate_refuses_a_file_that_is_not_a_manifest(tmp_path, capsys) -> None:
    bogus = tmp_path / "manifest.parquet"
    bogus.write_bytes(b"PAR1 but not really")
    assert generate_main(_gen_argv(bogus, tmp_path)) == 2
    assert f"{bogus}: not a readable Parquet manifest" in _error_line(capsys)
    assert not (tmp_path / "syn").exists()


# ------------------------------------------------------------------------- config values ----------

@pytest.mark.parametrize("override, field", [
    ("plan.lambdas=[0.0]", "plan.lambdas"),       # λ must lie in (0, 1]
    ("plan.lambdas=[-0.5]", "plan.lambdas"),
    ("plan.lambdas=[1.5]", "plan.lambdas"),
    ("plan.w=[-1]", "plan.w"),                    # w >= 0
    ("sampler.spacing=cosine", "sampler.spacing"),  # unknown spacing scheme
    ("sampler.scheduler=euler", "sampler.scheduler"),  # unknown update rule
    ("sampler.num_steps=0", "sampler.num_steps"),
    ("plan.samples_per_shard=0", "plan.samples_per_shard"),
    ("ray.num_cpus_per_actor=0", "ray.num_cpus_per_actor"),
])
def test_generate_config_out_of_range_exits_2_naming_the_field(override, field, tmp_path, capsys) -> None:
    real = make_real_set(tmp_path / "real", n_train=2, n_val=0)
    assert generate_main(_gen_argv(real, tmp_path, "--set", override)) == 2
    assert _error_line(capsys).startswith(f"error: {field}")
    assert not (tmp_path / "syn").exists()


@pytest.mark.parametrize("override, field", [
    ("scheme.name=curriculum", "scheme 'curriculum'"),  # unknown scheme
    ("scheme.fixed_lambda=0", "scheme.fixed_lambda"),    # λ must lie in (0, 1]
    ("scheme.fixed_lambda=1.5", "scheme.fixed_lambda"),
    ("scheme.adaptive.lam_min=-0.1", "scheme.adaptive.lam_min"),
    ("scheme.adaptive.schedule=cosine", "scheme.adaptive.schedule"),
    ("scheme.synth_fraction=1.5", "scheme.synth_fraction"),
    ("data.real_fraction=0", "data.real_fraction"),
    ("optim.lr=-1", "optim.lr"),
    ("loss.name=crf", "loss.name"),
    ("loss.scale=2", "loss.crf_weight / sigma_rgb / sigma_xy / scale"),
])
def test_seg_config_out_of_range_exits_2_naming_the_field(override, field, seg_data, tmp_path, capsys) -> None:
    real, synth = seg_data
    assert _seg(real, synth, tmp_path / "run", "--set", override) == 2
    assert _error_line(capsys).startswith(f"error: {field}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, field", [
    ("subset=0", "subset"),
    ("samples_per_shard=0", "samples_per_shard"),
    ("image_format=gif", "image_format"),
    ("source.kind=hdf5", "source.kind"),
    ("source.folder.val_fraction=1.0", "source.folder.val_fraction"),
])
def test_ingest_config_out_of_range_exits_2_naming_the_field(override, field, tmp_path, capsys) -> None:
    src = _folder(tmp_path / "src", ("a_good",))
    assert _ingest(src, tmp_path / "real", "--set", override) == 2
    assert field in _error_line(capsys)
    assert not (tmp_path / "real").exists()
