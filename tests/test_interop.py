"""The shards read by other libraries without this project's code, as docs/generation.md shows.

Each reader below is the docs' example; the reference is this project's own reader
(:func:`engine.shards.read_shard`), sample by sample.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.shards import read_shard
from seg_fixtures import make_synthetic


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    manifest = make_synthetic(tmp_path_factory.mktemp("interop"), lambdas=(0.5, 1.0), n_train=5, per_shard=4)
    tars = sorted(str(p) for p in manifest.parent.glob("*.tar"))
    reference = {s.key: s for t in tars for s in read_shard(t)}
    return tars, reference


def test_webdataset_reads_images_labels_and_tags(shards):
    import webdataset as wds

    def labels(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)))

    tars, reference = shards
    ds = wds.WebDataset(tars, shardshuffle=False).decode(wds.handle_extension("scribble.png mask.png", labels), "rgb8")
    seen = []
    for sample in ds:
        ref = reference[sample["__key__"]]
        assert np.array_equal(sample["png"], ref.image)  # uint8 HxWx3
        assert np.array_equal(sample["scribble.png"], ref.scribble)  # class ids, 255 kept
        assert sample["json"] == ref.meta
        seen.append(sample["__key__"])
    assert sorted(seen) == sorted(reference)


def test_hugging_face_datasets_reads_images_labels_and_tags(shards, tmp_path, monkeypatch):
    import datasets  # a test-only dependency (pyproject's test extra)

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tars, reference = shards
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train", cache_dir=str(tmp_path))
    assert len(ds) == len(reference)
    for row in ds:
        ref = reference[row["__key__"]]
        assert np.array_equal(np.asarray(row["png"]), ref.image)
        assert np.array_equal(np.asarray(row["scribble.png"]), ref.scribble)
        assert row["json"]["lambda"] == ref.meta["lambda"] and row["json"]["source_id"] == ref.meta["source_id"]
    assert len(ds.filter(lambda r: r["json"]["lambda"] == 1.0)) == 5
