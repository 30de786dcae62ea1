"""VOC (PNG and XML scribbles) and plain-folder readers, on tiny fixtures."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.data.folder import folder_records
from engine.data.imageio import read_labels
from engine.data.registry import READERS, open_source
from engine.data.sources import SOURCE_KINDS, FolderSource, SourceConfig, VocSource
from engine.data.voc import VOC_CLASSES, read_list, render_xml_scribble
from engine.errors import BadInputError
from engine.shards import UNLABELLED

VOC = Path(__file__).parent / "fixtures" / "voc"


def _by_id(records):
    return {r.source_id: r for r in records}


def test_voc_png_scribbles_are_read_as_palette_indices():
    records, names = open_source(SourceConfig(kind="voc", voc=VocSource(root=str(VOC))))
    assert names == VOC_CLASSES and len(names) == 21
    recs = _by_id(records)
    assert [r.split for r in records] == ["train", "train", "val", "val"]
    image, scribble, mask = recs["2007_000039"].load()
    assert image.shape == (30, 40, 3) and scribble.shape == mask.shape == (30, 40)
    assert Image.open(VOC / "pascal_2012_scribble" / "2007_000039.png").mode == "P"
    assert set(np.unique(scribble)) == {0, 15, UNLABELLED}  # ids, not RGB colours
    assert set(np.unique(mask)) == {0, 15, 255}
    lab = (scribble != UNLABELLED) & (mask != 255)
    assert (scribble[lab] == mask[lab]).all()


def test_voc_val_without_scribble_gets_a_synthetic_one_tagged():
    recs = _by_id(open_source(SourceConfig(kind="voc", voc=VocSource(root=str(VOC))))[0])
    assert recs["2007_000063"].meta == {} and recs["2007_000068"].meta == {"scribble_source": "synthetic"}
    _, scribble, mask = recs["2007_000068"].load()
    assert {0, 12} <= set(np.unique(scribble))
    lab = scribble != UNLABELLED
    assert (scribble[lab] == mask[lab]).all()
    np.testing.assert_array_equal(scribble, recs["2007_000068"].load()[1])  # seeded


def test_voc_xml_polylines_match_the_png_scribbles():
    cfg = SourceConfig(kind="voc", voc=VocSource(root=str(VOC), scribble_format="xml"))
    recs = _by_id(open_source(cfg)[0])
    for sid in ("2007_000032", "2007_000039", "2007_000063"):
        from_xml = recs[sid].load()[1]
        from_png = read_labels(VOC / "pascal_2012_scribble" / f"{sid}.png")
        np.testing.assert_array_equal(from_xml, from_png)
    assert recs["2007_000068"].meta == {"scribble_source": "synthetic"}


def test_voc_xml_unknown_tag_names_the_file(tmp_path):
    bad = tmp_path / "x.xml"
    bad.write_text("<annotation><polygon><tag>unicorn</tag><point><X>1</X><Y>1</Y></point></polygon></annotation>")
    with pytest.raises(BadInputError, match="x.xml.*unicorn"):
        render_xml_scribble(bad, 10, 10)


def test_voc_list_accepts_path_pairs(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n2007_000039\n")
    assert read_list(lst) == ["2007_000032", "2007_000039"]


def test_voc_missing_root_and_missing_train_scribble(tmp_path):
    with pytest.raises(BadInputError, match="JPEGImages"):
        open_source(SourceConfig(kind="voc", voc=VocSource(root=str(tmp_path))))
    root = tmp_path / "voc"
    shutil.copytree(VOC, root)
    (root / "pascal_2012_scribble" / "2007_000032.png").unlink()
    recs = _by_id(open_source(SourceConfig(kind="voc", voc=VocSource(root=str(root))))[0])
    with pytest.raises(BadInputError, match="2007_000032.png.*missing"):
        recs["2007_000032"].load()


def make_folder(root: Path, n: int = 5, classes: bool = True, val: list[str] | None = None) -> None:
    rng = np.random.default_rng(0)
    for d in ("images", "scribbles", "masks"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        stem = f"img {i}" if i == 0 else f"img{i}"  # a space must become '_'
        Image.fromarray(rng.integers(0, 255, (16, 20, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.png")
        scribble = np.full((16, 20), 255, np.uint8)
        scribble[2, 2:10] = 0
        scribble[8, 5:15] = 1 + i % 2
        Image.fromarray(scribble).save(root / "scribbles" / f"{stem}.png")
        if i % 2 == 0:
            Image.fromarray(np.where(scribble == 255, 0, scribble).astype(np.uint8)).save(root / "masks" / f"{stem}.png")
    if classes:
        (root / "classes.txt").write_text("background\ncat\ndog\n")
    if val is not None:
        (root / "val.txt").write_text("\n".join(val) + "\n")


def test_folder_reader_layout_classes_and_val_file(tmp_path):
    make_folder(tmp_path, val=["img3"])
    records, names = folder_records(FolderSource(root=str(tmp_path)))
    assert names == ["background", "cat", "dog"]
    assert [r.source_id for r in records] == ["img_0", "img1", "img2", "img4", "img3"]
    assert [r.split for r in records] == ["train"] * 4 + ["val"]
    image, scribble, mask = records[0].load()
    assert image.shape == (16, 20, 3) and scribble[8, 5] == 1 and mask is not None
    assert records[1].load()[2] is None  # no mask for odd images


def test_folder_reader_infers_classes_and_seeded_val_fraction(tmp_path):
    make_folder(tmp_path, n=10, classes=False)
    recs, names = folder_records(FolderSource(root=str(tmp_path), val_fraction=0.3, seed=1))
    assert names == ["background", "class_1", "class_2"]
    val = [r.source_id for r in recs if r.split == "val"]
    assert len(val) == 3
    assert val == [r.source_id for r in folder_records(FolderSource(root=str(tmp_path), val_fraction=0.3, seed=1))[0] if r.split == "val"]


def test_folder_reader_rejects_rgb_scribble_and_empty_folder(tmp_path):
    with pytest.raises(BadInputError, match="no .jpg/.png images"):
        folder_records(FolderSource(root=str(tmp_path)))
    make_folder(tmp_path, n=2)
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(tmp_path / "scribbles" / "img1.png")
    recs, _ = folder_records(FolderSource(root=str(tmp_path), val_fraction=0.0))
    with pytest.raises(BadInputError, match="img1.png.*mode RGB"):
        recs[1].load()


def test_registry_has_a_reader_for_every_source_kind_and_no_import_cycle():
    """Every configurable kind has exactly one reader; the data layer has no import cycle
    (tools/import_graph.py counts function-local imports too)."""
    from scripts import load_script

    assert set(READERS) == set(SOURCE_KINDS)
    graph = load_script("tools/import_graph.py")
    edges = graph.graph()
    assert graph.cycles(edges) == []
    assert not [(a, b) for (a, b) in graph.package_edges(edges) if a == "engine" and b != "engine"]  # engine imports no seg
