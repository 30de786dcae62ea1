"""End-to-end ingest: shards + manifest, --subset, --skip-bad, refusal, script entry point."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from engine.data.procedural import make_scene
from engine.ingest import main, parse_fraction
from engine.manifest import read_manifest
from engine.shards import read_shard
from engine.verify import verify_manifest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "ingest" / "tiny.yaml")
SMALL = ["--set", "source.procedural.size=32", "--set", "source.procedural.num_val=6", "--set", "samples_per_shard=10"]


def ingest(out: Path, *args: str, num_train: int = 23) -> int:
    return main(["--config", TINY, "--out", str(out), "--set", f"source.procedural.num_train={num_train}", *SMALL, *args])


def test_procedural_ingest_writes_verified_shards_and_manifest(tmp_path):
    out = tmp_path / "real"
    assert ingest(out) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "ingest.yaml", "manifest.parquet", "real-train-000000.tar", "real-train-000001.tar",
        "real-train-000002.tar", "real-val-000000.tar",
    ]
    report = verify_manifest(out / "manifest.parquet")
    assert report.ok, report.problems
    assert (report.samples, report.shards, report.skipped) == (29, 4, 0)
    table, info = read_manifest(out / "manifest.parquet")
    assert info.class_names[0] == "background" and len(info.class_names) == 7 and info.kind == "real"
    rows = table.to_pylist()
    assert [r["split"] for r in rows].count("val") == 6
    assert all(r["lambda"] == 0.0 and r["status"] == "ok" for r in rows)
    # The shard holds exactly what the generator makes (PNG is lossless).
    sample = next(read_shard(out / "real-train-000001.tar"))
    scene = make_scene(10, seed=0, size=32)
    assert sample.key == "proc-train-000010" and sample.meta["split"] == "train"
    np.testing.assert_array_equal(sample.image, scene.image)
    np.testing.assert_array_equal(sample.scribble, scene.scribble)
    np.testing.assert_array_equal(sample.mask, scene.mask)
    assert sample.meta["classes"] == sorted(set(np.unique(scene.scribble).tolist()) - {255})


def _train_keys(out: Path) -> list[str]:
    table, _ = read_manifest(out / "manifest.parquet")
    return [r["key"] for r in table.to_pylist() if r["split"] == "train"]


def test_subset_count_is_right_deterministic_and_nested(tmp_path):
    assert parse_fraction("1/16") == parse_fraction(0.0625) == parse_fraction("0.0625") == 0.0625
    assert ingest(tmp_path / "a", "--subset", "1/16", num_train=64) == 0
    assert ingest(tmp_path / "b", "--subset", "0.0625", num_train=64) == 0
    assert ingest(tmp_path / "c", "--subset", "1/8", num_train=64) == 0
    a, b, c = (_train_keys(tmp_path / n) for n in "abc")
    assert len(a) == 4 and a == b and len(c) == 8 and set(a) <= set(c)
    table, _ = read_manifest(tmp_path / "a" / "manifest.parquet")
    assert table.column("split").to_pylist().count("val") == 6  # val kept whole
    assert verify_manifest(tmp_path / "a" / "manifest.parquet").ok


def test_bad_subset_and_nonempty_out_are_refused(tmp_path, capsys):
    assert ingest(tmp_path / "x", "--subset", "2") == 2
    assert "subset" in capsys.readouterr().err
    out = tmp_path / "real"
    assert ingest(out) == 0
    assert ingest(out) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert ingest(out, "--overwrite", num_train=5) == 0
    assert verify_manifest(out / "manifest.parquet").samples == 11
    (out / "notes.txt").write_text("mine")
    assert ingest(out, "--overwrite") == 2
    assert (out / "notes.txt").exists()


def _bad_folder(root: Path) -> dict[str, str]:
    """A folder source with one good image per bad kind; returns stem -> expected error bit."""
    rng = np.random.default_rng(0)
    for d in ("images", "scribbles"):
        (root / d).mkdir(parents=True)
    (root / "classes.txt").write_text("background\nthing\n")
    (root / "val.txt").write_text("")
    scribble = np.full((16, 16), 255, np.uint8)
    scribble[4, 2:12] = 1
    scribble[12, 2:12] = 0
    for stem in ("a_good", "b_trunc", "c_size", "d_class", "e_empty", "f_missing", "g_good"):
        img = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "images" / f"{stem}.jpg", quality=90)
        s = scribble.copy()
        if stem == "c_size":
            s = np.full((10, 16), 0, np.uint8)
        elif stem == "d_class":
            s[8, 3] = 7
        elif stem == "e_empty":
            s[:] = 255
        if stem != "f_missing":
            Image.fromarray(s).save(root / "scribbles" / f"{stem}.png")
    data = (root / "images" / "b_trunc.jpg").read_bytes()
    (root / "images" / "b_trunc.jpg").write_bytes(data[: len(data) // 2])
    return {
        "b_trunc": "b_trunc.jpg: cannot read image", "c_size": "c_size.png): scribble is 16x10 but image is 16x16",
        "d_class": "d_class.png): scribble has class id(s) [7] out of range", "e_empty": "e_empty.png): scribble is empty",
        "f_missing": "f_missing.png: label PNG is missing",
    }


def folder_args(src: Path, out: Path) -> list[str]:
    return ["--config", str(REPO / "configs" / "ingest" / "folder.yaml"), "--set", f"source.folder.root={src}",
            "--out", str(out), "--set", "samples_per_shard=1"]


def test_skip_bad_records_skip_rows_naming_each_problem(tmp_path):
    expected = _bad_folder(tmp_path / "src")
    out = tmp_path / "real"
    assert main([*folder_args(tmp_path / "src", out), "--skip-bad"]) == 0
    report = verify_manifest(out / "manifest.parquet")
    assert report.ok and (report.samples, report.skipped) == (2, 5)
    table, _ = read_manifest(out / "manifest.parquet")
    skipped = {r["source_id"]: r["error"] for r in table.to_pylist() if r["status"] == "skipped"}
    assert set(skipped) == set(expected)
    for stem, bit in expected.items():
        assert bit in skipped[stem], (stem, skipped[stem])
    assert not list(out.glob("*.tmp"))


def test_without_skip_bad_the_error_names_the_file_and_nothing_half_written(tmp_path, capsys):
    _bad_folder(tmp_path / "src")
    out = tmp_path / "real"
    assert main(folder_args(tmp_path / "src", out)) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "b_trunc.jpg" in last and "Traceback" not in err
    # The good sample before the bad one is a whole shard; no manifest, no temp file.
    assert sorted(p.name for p in out.iterdir()) == ["real-train-000000.tar"]
    assert [s.key for s in read_shard(out / "real-train-000000.tar")] == ["a_good"]


def test_job_runs_as_script_and_module(tmp_path):
    # As a file (what `ray job submit -- python jobs/ingest.py` runs), from outside the repo.
    out = tmp_path / "real"
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "ingest.py"), "--config", TINY, "--out", str(out),
         "--set", "source.procedural.num_train=4", *SMALL],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "4 train + 6 val samples" in proc.stdout
    assert verify_manifest(out / "manifest.parquet").ok
    helped = subprocess.run([sys.executable, "-m", "jobs.ingest", "--help"], cwd=REPO, capture_output=True, text=True)
    assert helped.returncode == 0 and "--skip-bad" in helped.stdout and "--subset" in helped.stdout


def test_voc_fixture_ingest_tags_synthetic_val_scribbles(tmp_path):
    out = tmp_path / "real"
    argv = ["--config", str(REPO / "configs" / "ingest" / "voc.yaml"), "--out", str(out),
            "--set", f"source.voc.root={REPO / 'tests' / 'fixtures' / 'voc'}"]
    assert main(argv) == 0
    report = verify_manifest(out / "manifest.parquet")
    assert report.ok and report.samples == 4
    samples = {s.key: s for tar in sorted(out.glob("*.tar")) for s in read_shard(tar)}
    assert samples["2007_000068"].meta["scribble_source"] == "synthetic"
    assert "scribble_source" not in samples["2007_000063"].meta
    assert samples["2007_000039"].meta["classes"] == [0, 15] and samples["2007_000039"].mask is not None


def test_workers_give_byte_identical_shards(tmp_path):
    assert ingest(tmp_path / "one", num_train=12) == 0
    assert ingest(tmp_path / "two", "--set", "workers=2", num_train=12) == 0
    for tar in sorted((tmp_path / "one").glob("*.tar")):
        assert tar.read_bytes() == (tmp_path / "two" / tar.name).read_bytes()


def test_test_split_is_held_out_whole_and_seg_draws_the_same_subset(tmp_path):
    """``num_test`` scenes come from their own stream, survive --subset whole, and seg's
    ``real_fraction`` on the full set keeps exactly the scenes ingest's --subset keeps."""
    from engine.data.subset import draw_subset
    from seg.stream import index_manifests

    full, low = tmp_path / "full", tmp_path / "low"
    assert ingest(full, "--set", "source.procedural.num_test=5", num_train=48) == 0
    assert ingest(low, "--set", "source.procedural.num_test=5", "--subset", "1/4", "--set", "subset_seed=3", num_train=48) == 0
    rows = read_manifest(low / "manifest.parquet")[0].to_pylist()
    assert [r["split"] for r in rows].count("test") == 5 and (low / "real-test-000000.tar").is_file()
    test_ids = sorted(r["source_id"] for r in rows if r["split"] == "test")
    assert test_ids == [f"proc-test-{i:06d}" for i in range(5)]
    # A test scene is neither a train nor a val scene of the same index (its own stream).
    assert not np.array_equal(make_scene(0, split="test").image, make_scene(0, split="val").image)
    kept = {r["source_id"] for r in rows if r["split"] == "train"}
    assert len(kept) == 12 and kept == draw_subset([f"proc-train-{i:06d}" for i in range(48)], 0.25, 3)
    index = index_manifests([full / "manifest.parquet"], real_fraction=0.25, subset_seed=3, val_split="test")
    seg_kept = {key for keys in index.real.allowed.values() for key in keys}
    assert seg_kept == kept and len(index.val) == 5
    # Nested and order-free: a smaller share of the same seed lies inside; shuffling the ids changes nothing.
    ids = [f"s{i:03d}" for i in range(100)]
    assert draw_subset(ids, 0.1, 7) <= draw_subset(ids, 0.3, 7) and draw_subset(ids[::-1], 0.3, 7) == draw_subset(ids, 0.3, 7)
    assert draw_subset(ids, 0.3, 7) != draw_subset(ids, 0.3, 8)
