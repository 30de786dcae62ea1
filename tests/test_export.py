"""jobs.export: a set as files in the folder and VOC layouts, read back by ingest."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from engine.data.imageio import decode_image, encode_image, read_labels, read_rgb
from engine.errors import BadInputError
from engine.export import Filters, run_export, main as export_main
from engine.ingest import main as ingest_main
from engine.manifest import DatasetInfo, read_manifest, sample_row, shard_rows, write_manifest
from engine.shards import ShardWriter, read_shard
from engine.manifest import resolve_shard
from seg_fixtures import CLASS_NAMES, make_real, make_scene, make_synthetic
from test_readers import make_folder


def samples_of(manifest: Path) -> dict[str, tuple]:
    """key -> (split, image, scribble, mask, source_id, classes) of every ok sample."""
    table, _ = read_manifest(manifest)
    out = {}
    for shard in sorted({s for s, st in zip(table.column("shard").to_pylist(), table.column("status").to_pylist()) if st == "ok"}):
        for s in read_shard(resolve_shard(manifest, shard)):
            out[s.key] = (s.meta["split"], s.image, s.scribble, s.mask, s.meta["source_id"], s.meta["classes"])
    return out


def assert_same_samples(a: dict[str, tuple], b: dict[str, tuple]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        for x, y in zip(a[key], b[key]):
            if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
                assert x is not None and y is not None and np.array_equal(x, y), key
            else:
                assert x == y, key


def ingest_folder(root: Path, out: Path) -> Path:
    assert ingest_main(["--config", "configs/ingest/folder.yaml", "--set", f"source.folder.root={root}",
                        "--out", str(out)]) == 0
    return out / "manifest.parquet"


def test_folder_to_ingest_to_export_to_ingest_gives_the_same_pixels_labels_and_tags(tmp_path):
    make_folder(tmp_path / "src", n=6, val=["img3"])
    (tmp_path / "src" / "test.txt").write_text("img4\n")  # the held-out split survives the round trip
    first = ingest_folder(tmp_path / "src", tmp_path / "first")
    assert export_main(["--manifest", str(first), "--out", str(tmp_path / "exp"), "--layout", "folder", "--no-progress"]) == 0
    second = ingest_folder(tmp_path / "exp", tmp_path / "second")
    a, b = samples_of(first), samples_of(second)
    assert {k: v[0] for k, v in a.items()} == {"img_0": "train", "img1": "train", "img2": "train", "img3": "val",
                                                "img4": "test", "img5": "train"}
    assert_same_samples(a, b)
    assert read_manifest(second)[1].class_names == read_manifest(first)[1].class_names == ["background", "cat", "dog"]
    # label files are palette PNGs in VOC colours: class 1 is VOC's (128, 0, 0)
    scribble = Image.open(tmp_path / "exp" / "scribbles" / "img1.png")
    assert scribble.mode == "P" and scribble.getpalette()[3:6] == [128, 0, 0]
    assert sorted(p.name for p in (tmp_path / "exp" / "masks").iterdir()) == ["img2.png", "img4.png", "img_0.png"]


def test_synthetic_export_filters_by_tags_and_names_files_by_source_w_lambda_seed(tmp_path):
    manifest = make_synthetic(tmp_path, lambdas=(0.2, 0.5, 1.0), n_train=4)
    result = run_export(manifest, tmp_path / "exp", "folder", Filters(lambdas=[0.5, 1.0], source_ids=["train0001", "train0002"]),
                        progress=False)
    assert (result.exported, result.written) == (4, 4)
    rows = list(csv.DictReader(open(tmp_path / "exp" / "tags.csv")))
    assert sorted(r["image"] for r in rows) == [f"images/train000{i}__w2p00__l{l}__s0.png" for i in (1, 2) for l in ("0p50", "1p00")]
    assert {(r["source_id"], float(r["lambda"]), float(r["w"]), int(r["seed"])) for r in rows} == {
        (f"train000{i}", lam, 2.0, 0) for i in (1, 2) for lam in (0.5, 1.0)}
    originals = {s.key: s for s in read_shard(resolve_shard(manifest, "synth-000000.tar"))}
    for r in rows:
        key = r["key"]
        assert np.array_equal(read_rgb(tmp_path / "exp" / r["image"]), originals[key].image)
        assert np.array_equal(read_labels(tmp_path / "exp" / r["scribble"]), originals[key].scribble)
        assert r["classes"] == " ".join(map(str, originals[key].meta["classes"]))
    with pytest.raises(BadInputError, match="no sample matches"):
        run_export(manifest, tmp_path / "none", "folder", Filters(w=[7.0]), progress=False)


def test_voc_layout_reads_back_through_the_voc_reader(tmp_path):
    manifest = make_real(tmp_path, n_train=5, n_val=3, per_shard=4)
    run_export(manifest, tmp_path / "voc", "voc", progress=False)
    voc = tmp_path / "voc"
    assert (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split() == [f"train{i:04d}" for i in range(5)]
    assert (voc / "ImageSets" / "SegmentationAug" / "val.txt").read_text().split() == [f"val{i:04d}" for i in range(3)]
    back = tmp_path / "back"
    assert ingest_main(["--config", "configs/ingest/voc.yaml", "--set", f"source.voc.root={voc}", "--out", str(back)]) == 0
    a, b = samples_of(manifest), samples_of(back / "manifest.parquet")
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key][0] == b[key][0] and np.array_equal(a[key][2], b[key][2])  # split and scribble exact
        assert np.array_equal(a[key][3], b[key][3])  # mask exact
        jpeg = a[key][1]
        for _ in range(2):  # exported as JPEG, then stored as JPEG by the VOC ingest (image_format: jpg)
            jpeg = decode_image(encode_image(jpeg, "jpg"), "RGB")
        assert np.array_equal(b[key][1], jpeg)
    assert (voc / "JPEGImages" / "train0000.jpg").read_bytes()[:2] == b"\xff\xd8"


def test_rerun_resumes_and_a_different_request_is_refused(tmp_path):
    manifest = make_real(tmp_path, n_train=6, n_val=2, per_shard=4)
    out = tmp_path / "exp"
    first = run_export(manifest, out, "folder", progress=False)
    (out / "images" / "train0003.png").unlink()  # as if the first call had died before this image
    (out / "tags.csv").unlink()
    again = run_export(manifest, out, "folder", progress=False)
    assert (first.written, again.written, again.exported) == (8, 1, 8)
    assert json.loads((out / "export.json").read_text())["complete"] is True
    assert len((out / "tags.csv").read_text().splitlines()) == 1 + 8
    assert not list(out.rglob("*.tmp"))
    with pytest.raises(BadInputError, match="holds another export"):
        run_export(manifest, out, "voc", progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert export_main(["--manifest", str(manifest), "--out", str(tmp_path / "busy"), "--layout", "folder"]) == 2


@pytest.mark.parametrize("key", ["..", "../escaped", "a/b", "/tmp/abs", "nul\x00byte", "."])
def test_a_key_that_would_escape_out_is_refused_before_anything_is_written(tmp_path, capsys, key):
    real = make_scene(0, "train")
    folder = tmp_path / "set"
    with ShardWriter(folder / "real-000000.tar") as writer:
        writer.write(real)
        info = writer.close()
    row = shard_rows([sample_row(real)], info, folder)[0]
    row.update(key=key, source_id=key)
    manifest = write_manifest([row], folder / "manifest.parquet", DatasetInfo(CLASS_NAMES))
    out = tmp_path / "out" / "inner"
    assert export_main(["--manifest", str(manifest), "--out", str(out), "--layout", "folder"]) == 2
    assert "cannot be a file name" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped").exists()
    assert not Path("/tmp/abs.png").exists()


def test_export_from_and_to_urls(tmp_path):
    manifest = make_real(tmp_path, n_train=3, n_val=1, per_shard=2)
    fs = fsspec.filesystem("memory")
    fs.put(str(manifest.parent), "/set", recursive=True)
    result = run_export("memory://set/manifest.parquet", "memory://exp", "folder", progress=False)
    assert result.exported == 4
    assert sorted(fs.ls("/exp/images", detail=False)) == [f"/exp/images/{k}.png" for k in
                                                          ("train0000", "train0001", "train0002", "val0000")]
    local = samples_of(manifest)
    with fs.open("/exp/scribbles/train0001.png", "rb") as fh:
        assert np.array_equal(np.asarray(Image.open(fh)), local["train0001"][2])
    fs.rm("/exp", recursive=True)
    fs.rm("/set", recursive=True)
