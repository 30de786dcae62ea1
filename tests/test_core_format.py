"""Shard format, manifest and verify: the contract every other part relies on."""

from __future__ import annotations

import os
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from engine.config import apply_overrides, load_config, load_yaml
from engine.errors import BadInputError
from engine.manifest import DatasetInfo, read_manifest, sample_row, shard_rows, skip_row, write_manifest
from engine.shards import Sample, ShardWriter, check_key, read_shard, shard_name, synthetic_key
from engine.verify import main as verify_main
from engine.verify import verify_manifest


def _sample(i: int, size: int = 12) -> Sample:
    rng = np.random.default_rng(i)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (size, size), dtype=np.uint8)
    scribble = np.full((size, size), 255, np.uint8)
    scribble[2:4, 2:9] = mask[2:4, 2:9]
    meta = {"source_id": f"src_{i}", "split": "train", "w": 2.0, "lambda": 0.5, "seed": i, "classes": [0, 1, 2]}
    return Sample(key=synthetic_key(f"src_{i}", 2.0, 0.5, i), image=image, scribble=scribble, mask=mask, meta=meta)


def _write_dataset(root: Path, n_shards: int = 2, per_shard: int = 3) -> Path:
    rows = []
    for s in range(n_shards):
        with ShardWriter(root / shard_name("syn", s)) as writer:
            part = []
            for i in range(s * per_shard, (s + 1) * per_shard):
                sample = _sample(i)
                writer.write(sample)
                part.append(sample_row(sample))
            info = writer.close()
        rows += shard_rows(part, info, root)
    rows.append(skip_row("bad_one", "train", "truncated JPEG"))
    return write_manifest(rows, root / "manifest.parquet", DatasetInfo(["bg", "a", "b"], kind="synthetic"))


def test_round_trip_is_lossless(tmp_path: Path) -> None:
    manifest = _write_dataset(tmp_path)
    got = list(read_shard(tmp_path / "syn-000000.tar"))
    assert [s.key for s in got] == [_sample(i).key for i in range(3)]
    for i, s in enumerate(got):
        ref = _sample(i)
        np.testing.assert_array_equal(s.image, ref.image)
        np.testing.assert_array_equal(s.scribble, ref.scribble)
        np.testing.assert_array_equal(s.mask, ref.mask)
        assert s.meta == ref.meta and s.lam == 0.5
    table, info = read_manifest(manifest)
    assert table.num_rows == 7
    assert info.class_names == ["bg", "a", "b"] and info.kind == "synthetic"
    ok = table.filter(table["status"].to_numpy(zero_copy_only=False) == "ok")
    assert set(ok["shard"].to_pylist()) == {"syn-000000.tar", "syn-000001.tar"}
    assert set(ok["shard_samples"].to_pylist()) == {3}


def test_keys_are_dot_free_and_cannot_escape() -> None:
    key = synthetic_key("2007_000032", 2.0, 0.25, 7)
    assert key == "2007_000032__w2p00__l0p25__s7"
    for bad in ["../evil", "a/b", "a.b", "", "x y"]:
        with pytest.raises(BadInputError):
            check_key(bad)


def test_writer_is_atomic_on_error(tmp_path: Path) -> None:
    path = tmp_path / shard_name("real", 0)
    with pytest.raises(RuntimeError):
        with ShardWriter(path) as writer:
            writer.write(_sample(0))
            raise RuntimeError("crash mid-shard")
    assert os.listdir(tmp_path) == []


def test_write_many_on_a_thread_pool_writes_the_bytes_of_one_by_one_writes(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    samples = [_sample(i, size=64) for i in range(6)]
    with ShardWriter(tmp_path / "one-000000.tar") as writer:
        for sample in samples:
            writer.write(sample)
        one = writer.close()
    with ShardWriter(tmp_path / "many-000000.tar") as writer, ThreadPoolExecutor(3) as pool:
        writer.write_many(samples[:4], pool.map)
        writer.write_many(samples[4:], pool.map)
        many = writer.close()
    assert many.keys == one.keys == [s.key for s in samples] and many.sha256 == one.sha256
    assert (tmp_path / "one-000000.tar").read_bytes() == (tmp_path / "many-000000.tar").read_bytes()


@pytest.mark.parametrize("batches", [[[0, 1], [1]], [[0, 1, 0]]], ids=["in-a-later-batch", "within-a-batch"])
def test_a_key_written_twice_to_a_shard_is_refused(tmp_path: Path, batches: list[list[int]]) -> None:
    with pytest.raises(BadInputError, match="written twice"):
        with ShardWriter(tmp_path / "x-000000.tar") as writer:
            for batch in batches:
                writer.write_many([_sample(i) for i in batch])
    assert os.listdir(tmp_path) == []


def test_size_mismatch_is_rejected(tmp_path: Path) -> None:
    s = _sample(0)
    s.scribble = s.scribble[:5]
    with ShardWriter(tmp_path / "x-000000.tar") as writer, pytest.raises(BadInputError, match="scribble"):
        writer.write(s)


def test_verify_accepts_good_and_names_each_problem(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = _write_dataset(tmp_path)
    report = verify_manifest(manifest)
    assert report.ok and report.samples == 6 and report.shards == 2 and report.skipped == 1
    assert verify_main([str(manifest)]) == 0

    # corrupt one shard (flip a byte), add an unlisted one, remove another
    data = bytearray((tmp_path / "syn-000000.tar").read_bytes())
    data[600] ^= 0xFF
    (tmp_path / "syn-000000.tar").write_bytes(bytes(data))
    (tmp_path / "syn-000009.tar").write_bytes(b"")
    (tmp_path / "syn-000001.tar").unlink()
    report = verify_manifest(manifest)
    text = "\n".join(report.problems)
    assert "syn-000000.tar: SHA-256 does not match" in text
    assert "syn-000001.tar: shard listed in the manifest is missing" in text
    assert "syn-000009.tar: shard on disk is not in the manifest" in text
    assert verify_main([str(manifest)]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_verify_reports_missing_member_key(tmp_path: Path) -> None:
    manifest = _write_dataset(tmp_path, n_shards=1)
    shard = tmp_path / "syn-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first_key = members[0][0].name.split(".")[0]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if not m.name.startswith(first_key):
                tar.addfile(m, io.BytesIO(data))
    problems = "\n".join(verify_manifest(manifest).problems)
    assert f"missing key(s) ['{first_key}']" in problems


def test_missing_manifest_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="manifest not found"):
        read_manifest(tmp_path / "nope.parquet")
    assert verify_main([str(tmp_path / "nope.parquet")]) == 2


@dataclass
class Inner:
    steps: int = 10
    lr: float = 1e-3


@dataclass
class Cfg:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)


def test_config_overrides_and_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: y\ninner:\n  steps: 20\n")
    cfg = load_config(Cfg, path, ["inner.lr=1", "inner.steps=30"])
    assert cfg.name == "y" and cfg.inner.steps == 30 and cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    with pytest.raises(BadInputError, match="unknown key"):
        load_config(Cfg, path, ["inner.stepz=3"])
    with pytest.raises(BadInputError, match="override must look like"):
        apply_overrides({}, ["novalue"])
    assert load_config(Cfg, path, ["inner.lr=2e-9"]).inner.lr == 2e-9  # PyYAML reads this as a string
    with pytest.raises(BadInputError, match=r"inner.lr='fast': expected a number"):
        load_config(Cfg, path, ["inner.lr=fast"])


def test_a_relative_config_is_read_from_the_working_directory_then_from_the_repo(tmp_path: Path, monkeypatch) -> None:
    """``python /repo/jobs/generate.py`` from another folder finds its default ``configs/...``."""
    monkeypatch.chdir(tmp_path)
    repo_config = Path(__file__).resolve().parents[1] / "configs/generate/tiny.yaml"
    assert load_yaml("configs/generate/tiny.yaml") == load_yaml(repo_config)
    (tmp_path / "configs/generate").mkdir(parents=True)
    (tmp_path / "configs/generate/tiny.yaml").write_text("mine: 1\n")
    assert load_yaml("configs/generate/tiny.yaml") == {"mine": 1}  # the working directory's comes first
    with pytest.raises(BadInputError, match=r"configs/generate/nope.yaml: config file not found.*configs holds one folder per job"):
        load_yaml("configs/generate/nope.yaml")


def test_bad_input_error_survives_pickling() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(BadInputError("a.png", "truncated", "re-export it")))
    assert isinstance(err, BadInputError) and str(err) == "a.png: truncated (re-export it)" and err.hint == "re-export it"


def test_shard_checksum_is_computed_while_writing(tmp_path, monkeypatch):
    """close() returns the SHA-256 of the bytes on disk without reading the file back."""
    import hashlib

    import engine.shards as shards

    monkeypatch.setattr(shards, "sha256_file", lambda *a, **k: pytest.fail("the shard was read back to hash it"))
    with shards.ShardWriter(tmp_path / "s.tar") as writer:
        for i in range(3):
            image = np.full((8, 8, 3), 40 * i, np.uint8)
            writer.write(shards.Sample(f"k{i}", image, np.zeros((8, 8), np.uint8), None, {"i": i}))
        info = writer.close()
    assert info.sha256 == hashlib.sha256((tmp_path / "s.tar").read_bytes()).hexdigest()
    assert info.num_bytes == (tmp_path / "s.tar").stat().st_size
