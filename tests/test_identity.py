"""The one reuse rule: recorded identity (config + input digests) equal, or refuse / redo."""

import json

import pytest

from engine.errors import BadInputError
from engine.identity import IDENTITY_FILE, Identity, drop_keys, file_digest


def test_equal_identities_are_reusable_and_differences_are_named(tmp_path):
    manifest = tmp_path / "m.parquet"
    manifest.write_bytes(b"rows")
    a = Identity({"train": {"steps": 10, "lr": 1e-3}, "model": {"kind": "tiny"}}, {"real": file_digest(manifest)})
    assert a.claim(tmp_path / "out", "ControlNet") is False  # nothing recorded yet: records it
    assert json.loads((tmp_path / "out" / IDENTITY_FILE).read_text())["digest"] == a.digest
    same = Identity({"model": {"kind": "tiny"}, "train": {"lr": 1e-3, "steps": 10}}, {"real": file_digest(manifest)})
    assert same.digest == a.digest and same.claim(tmp_path / "out", "ControlNet") is True
    manifest.write_bytes(b"other rows")  # the input changed on disk
    changed = Identity({"train": {"steps": 20, "lr": 1e-3}, "model": {"kind": "tiny"}}, {"real": file_digest(manifest)})
    assert changed.differences(Identity.load(tmp_path / "out")) == ["train.steps", "input:real"]
    with pytest.raises(BadInputError, match=r"differs in train.steps, input:real"):
        changed.claim(tmp_path / "out", "ControlNet")


def test_run_only_keys_are_left_out_and_tuples_equal_lists():
    cfg = {"train": {"steps": 10, "device": "cuda", "log_every": 5}, "out": "runs/x", "sizes": (1, 2)}
    kept = drop_keys(cfg, {"train.device", "train.log_every", "out"})
    assert kept == {"train": {"steps": 10}, "sizes": (1, 2)}
    assert Identity(kept).digest == Identity({"train": {"steps": 10}, "sizes": [1, 2]}).digest


def test_a_manifest_at_a_url_has_the_digest_of_its_bytes(tmp_path):
    """A sweep's real manifest may live on an object store: the same bytes, the same identity."""
    import hashlib

    import fsspec

    data = b"manifest bytes " * 100_000  # > one 1 MiB read block
    local = tmp_path / "m.parquet"
    local.write_bytes(data)
    url = f"memory://identity-{tmp_path.name}/m.parquet"
    with fsspec.open(url, "wb") as fh:
        fh.write(data)
    assert file_digest(url) == file_digest(local) == hashlib.sha256(data).hexdigest()[:16]


def test_keys_added_later_leave_old_identities_unchanged_at_their_default(monkeypatch):
    """A key added to a stage's config after runs were recorded: at its default the identity is
    the one recorded without the key; at any other value it differs."""
    import experiments.sweep as sweep
    from engine.config import to_dict
    from engine.identity import drop_defaults, drop_keys, plain
    from seg.train import SegConfig

    cfg = SegConfig()
    before = Identity(drop_keys(drop_keys(plain(to_dict(cfg)), sweep.RUN_ONLY["seg"]), {"augment.vflip"}), {"real": "a"})
    monkeypatch.setitem(sweep.ADDED_LATER, SegConfig, {"augment.vflip", "no.such.key"})
    assert sweep.stage_identity(cfg, sweep.RUN_ONLY["seg"], {"real": "a"}).digest == before.digest
    cfg.augment.vflip = not cfg.augment.vflip
    assert sweep.stage_identity(cfg, sweep.RUN_ONLY["seg"], {"real": "a"}).digest != before.digest
    assert drop_defaults({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}, {"a.b", "a.c"}) == {"a": {"c": 2}}
