"""Security: no pickle from untrusted files, servers on localhost, keys cannot escape their folder.

- Weights: every ``torch.load`` in the repo passes ``weights_only=True`` (checked on the
  syntax tree, not by eye); nothing calls ``pickle.load``/``np.load(allow_pickle=True)``;
  a saved model holds only ``.safetensors`` weights; a model folder, seg checkpoint or
  backbone file carrying a booby-trapped pickle is refused *without running it* (the
  pickle would create a marker folder when unpickled; the marker must not appear).
- Ray: the arguments ``connect()`` gives ``ray.init`` (dashboard off and on 127.0.0.1,
  never Ray's ``"auto"``, which joins any Ray instance running on the machine).
- Keys: a real manifest whose source id is ``../x`` (or another path) cannot make
  generation write outside its output folder; it is refused naming the id.
"""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import BadInputError
from engine.manifest import DatasetInfo, read_manifest, sample_row, shard_rows, write_manifest
from engine.shards import Sample, ShardWriter, shard_name
from gen_fixtures import CLASS_NAMES, make_real_set

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("engine", "seg", "jobs", "benchmarks", "tests")
WEIGHT_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".safetensors", ".msgpack", ".h5"}


def _python_files() -> list[Path]:
    return sorted(p for d in CODE_DIRS for p in (REPO / d).rglob("*.py"))


def _calls(tree: ast.AST, module: str, name: str):
    """Calls of ``module.name(...)`` (attribute form) in a syntax tree."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name:
            value = node.func.value
            if isinstance(value, ast.Name) and value.id == module:
                yield node


def _kw(call: ast.Call, key: str):
    return next((k.value for k in call.keywords if k.arg == key), None)


def test_every_torch_load_is_weights_only_and_nothing_unpickles_files() -> None:
    seen, offenders = 0, []
    for path in _python_files():
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree, "torch", "load"):
            seen += 1
            flag = _kw(call, "weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                offenders.append(f"{path.relative_to(REPO)}:{call.lineno}: torch.load without weights_only=True")
        for name in ("load", "loads", "Unpickler"):
            for call in _calls(tree, "pickle", name):
                if path.parts[len(REPO.parts)] != "tests":  # tests round-trip in-memory objects only
                    offenders.append(f"{path.relative_to(REPO)}:{call.lineno}: pickle.{name}")
        for call in _calls(tree, "np", "load"):
            flag = _kw(call, "allow_pickle")
            if isinstance(flag, ast.Constant) and flag.value is True:
                offenders.append(f"{path.relative_to(REPO)}:{call.lineno}: np.load(allow_pickle=True)")
    assert seen >= 3  # seg.train, seg.evaluate, seg.models (sanity: the walk does find them)
    assert not offenders, offenders


class _Trap:
    """Unpickling this creates ``marker`` (a folder): proof that a pickle was run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _trap_file(path: Path, marker: Path) -> Path:
    import pickle

    torch.save({"state_dict": _Trap(marker)}, path, pickle_module=pickle)  # torch's zip container, trapped payload
    return path


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    from engine.models import TinyArch, build_tiny

    arch = TinyArch(block_out_channels=(8, 16, 16), norm_num_groups=4, conditioning_channels=8,
                    cross_attention_dim=8, attention_head_dim=4)
    return build_tiny(arch, CLASS_NAMES, resolution=8).save_pretrained(tmp_path_factory.mktemp("model") / "bundle")


def test_saved_model_holds_only_safetensors_weights(tiny_bundle: Path) -> None:
    weights = sorted(p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    assert weights and all(w.endswith(".safetensors") for w in weights), weights
    assert {"unet/diffusion_pytorch_model.safetensors", "controlnet/diffusion_pytorch_model.safetensors",
            "null_hint.safetensors"} <= set(weights)


@pytest.mark.parametrize("part", ["unet", "controlnet", "text_encoder"])
def test_model_folder_with_pickled_weights_is_refused_unopened(tiny_bundle: Path, tmp_path: Path, part: str) -> None:
    from engine.models import ScribbleGenModel

    folder = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, folder)
    (weights,) = (folder / part).glob("*.safetensors")
    weights.unlink()
    marker = tmp_path / "pickle-was-run"
    _trap_file(weights.with_suffix(".bin"), marker)  # what a .bin-only (pickle) checkpoint looks like
    with pytest.raises(BadInputError, match=f"{folder}: cannot load the model.*safetensors"):
        ScribbleGenModel.from_pretrained(folder)
    assert not marker.exists()


def test_model_folder_with_truncated_safetensors_is_a_bad_input(tiny_bundle: Path, tmp_path: Path) -> None:
    from engine.models import ScribbleGenModel

    for name in ("controlnet/diffusion_pytorch_model.safetensors", "null_hint.safetensors"):
        folder = tmp_path / name.replace("/", "_")
        shutil.copytree(tiny_bundle, folder)
        weights = folder / name
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        with pytest.raises(BadInputError, match=f"{folder}: cannot load the model"):
            ScribbleGenModel.from_pretrained(folder)


def test_seg_checkpoint_and_backbone_with_a_pickle_trap_are_refused_unopened(tmp_path: Path, capsys) -> None:
    from seg.evaluate import main as evaluate_main
    from seg.models import ModelConfig, build_model
    from seg_fixtures import make_real

    marker = tmp_path / "pickle-was-run"
    ckpt = _trap_file(tmp_path / "last.pt", marker)
    real = make_real(tmp_path, n_train=2, n_val=2, per_shard=4, size=16)
    assert evaluate_main(["--checkpoint", str(ckpt), "--shards", str(real)]) == 2
    err = capsys.readouterr().err
    assert f"error: {ckpt}: cannot read checkpoint" in err and "Traceback" not in err
    with pytest.raises(BadInputError, match="cannot read backbone weights"):
        build_model(ModelConfig(name="tiny", width=8, backbone_weights=str(_trap_file(tmp_path / "r.pth", marker))), 3)
    assert not marker.exists()


def test_seg_resume_from_a_pickle_trap_is_refused_unopened(tmp_path: Path, capsys) -> None:
    import seg.train as seg_train
    from seg_fixtures import make_real

    marker = tmp_path / "pickle-was-run"
    real = make_real(tmp_path, n_train=4, n_val=2, per_shard=4, size=16)
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    ckpt = _trap_file(out / "checkpoints" / "last.pt", marker)
    argv = ["--shards", str(real), "--out", str(out), "--resume", "--set", "model.width=8", "--set", 'model.backbone_weights=""', "--set", "data.workers=0"]
    assert seg_train.main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {ckpt}: cannot read checkpoint" in err and "Traceback" not in err
    assert not marker.exists()


# ------------------------------------------------------------------------------------ Ray ----------

class _FakeRay:
    """Records ``ray.init`` calls instead of starting anything."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs) -> None:
        self.calls.append(kwargs)


@pytest.mark.parametrize("address, local_cpus", [(None, None), (None, 2), ("local", None)])
def test_private_ray_instances_keep_the_dashboard_off_and_on_localhost(monkeypatch, address, local_cpus) -> None:
    import ray

    from engine.generate.distributor import connect

    fake = _FakeRay()
    monkeypatch.setattr(ray, "is_initialized", fake.is_initialized)
    monkeypatch.setattr(ray, "init", fake.init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("engine.generate.distributor._last_ray_start", lambda: None)  # this machine's record aside
    connect(address, local_cpus)
    (kwargs,) = fake.calls
    assert kwargs["include_dashboard"] is False and kwargs["dashboard_host"] == "127.0.0.1"
    assert kwargs["num_cpus"] == local_cpus
    # Never "auto": Ray then joins any Ray instance found running on this machine (another
    # user's or program's), instead of $RAY_ADDRESS / the last `ray start` / a private one.
    assert kwargs["address"] == (None if address is None else "local")


def test_an_explicit_cluster_address_is_passed_through_untouched(monkeypatch) -> None:
    import ray

    from engine.generate.distributor import connect

    fake = _FakeRay()
    monkeypatch.setattr(ray, "is_initialized", fake.is_initialized)
    monkeypatch.setattr(ray, "init", fake.init)
    monkeypatch.setattr("engine.generate.distributor.check_reachable", lambda address, source: None)  # no cluster here
    assert connect("10.0.0.5:6379") == "cluster"
    assert fake.calls == [{"address": "10.0.0.5:6379"}]


def test_a_cluster_joined_through_ray_address_counts_as_joined(monkeypatch) -> None:
    """``ray job submit`` sets $RAY_ADDRESS: the driver joins that cluster (whose nodes have their
    own environment, so URLs are probed on them), and says so."""
    import ray

    from engine.generate.distributor import connect

    fake = _FakeRay()
    monkeypatch.setattr(ray, "is_initialized", fake.is_initialized)
    monkeypatch.setattr(ray, "init", fake.init)
    monkeypatch.setattr("engine.generate.distributor.check_reachable", lambda address, source: None)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert connect(None) == "cluster"
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr("engine.generate.distributor._last_ray_start", lambda: None)
    assert connect(None) == "default"


def test_ray_start_commands_bind_the_dashboard_to_localhost() -> None:
    """Every ``ray start --head`` the repo runs (argument lists) or documents (command lines in
    the README and configs) passes ``--dashboard-host 127.0.0.1``."""
    commands = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.List):
                words = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
                if "start" in words and "--head" in words:
                    commands.append((path, words))
    for path in [REPO / "README.md", *(REPO / "configs").rglob("*.yaml")]:
        for line in path.read_text().splitlines() if path.is_file() else []:
            words = line.strip().lstrip("$# ").split()
            if words[:2] == ["ray", "start"] and "--head" in words:
                commands.append((path, words))
    assert commands  # tests/test_ray_job.py starts one
    for path, words in commands:
        assert "--dashboard-host" in words and words[words.index("--dashboard-host") + 1] == "127.0.0.1", path


# --------------------------------------------------------------------------------- key escape -----

def _real_with_source_id(root: Path, source_id: str) -> Path:
    """A valid real set, then a manifest whose one source id is rewritten to ``source_id``."""
    manifest = make_real_set(root, n_train=2, n_val=0)
    table, info = read_manifest(manifest)
    rows = table.to_pylist()
    rows[0]["source_id"] = rows[0]["key"] = source_id
    return write_manifest(rows, manifest, info)


@pytest.mark.parametrize("source_id", ["../x", "../../etc/evil", "/tmp/abs", "a/b", "x.tar"])
def test_malicious_source_id_in_a_manifest_cannot_escape_the_output_folder(tmp_path: Path, capsys, source_id) -> None:
    from jobs.generate import main

    real = _real_with_source_id(tmp_path / "real", source_id)
    (tmp_path / "model").mkdir()
    out = tmp_path / "work" / "syn"
    before = sorted(p for p in tmp_path.rglob("*"))
    rc = main(["--set", f"real_manifest={real}", "--set", f"model_dir={tmp_path / 'model'}",
               "--set", f"out_dir={out}", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"error: sample key '{source_id}__w2p00" in err and "Traceback" not in err
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written anywhere, in or out of out_dir


def test_shard_writer_refuses_an_escaping_key_before_touching_the_tar(tmp_path: Path) -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    scribble = np.zeros((4, 4), np.uint8)
    with pytest.raises(BadInputError, match="sample key"):
        with ShardWriter(tmp_path / "out" / shard_name("syn", 0)) as writer:
            writer.write(Sample("../../escape", image, scribble))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out"]  # the temp shard was removed, nothing else


def test_seg_never_reads_a_key_as_a_path(tmp_path: Path) -> None:
    """Manifests name keys; seg only filters tar members by them, so an odd key is just absent."""
    from seg.stream import index_manifests

    image = np.zeros((8, 8, 3), np.uint8)
    scribble = np.zeros((8, 8), np.uint8)
    meta = {"source_id": "ok", "split": "train", "classes": [0]}
    with ShardWriter(tmp_path / shard_name("real", 0)) as writer:
        writer.write(Sample("ok", image, scribble, scribble, meta))
        info = writer.close()
    row = sample_row(Sample("ok", image, scribble, scribble, meta))
    bad = {**row, "key": "../../../etc/passwd"}
    manifest = write_manifest(shard_rows([row, bad], info, tmp_path), tmp_path / "manifest.parquet",
                              DatasetInfo(["bg"], "real"))
    index = index_manifests([manifest])
    (url,) = index.real.urls
    assert index.real.allowed[url] == {"ok", "../../../etc/passwd"}
    from seg.stream import one_pass

    assert [s.key for s in one_pass(index.real, 0, 0, shuffle_buffer=0, split=False)] == ["ok"]


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("where", ["record", "env", "config"])
def test_a_stale_cluster_address_fails_in_seconds_naming_it_and_the_fix(monkeypatch, where) -> None:
    """A killed `ray start --head` leaves its record behind; ray.init would wait on it for minutes."""
    import time

    import ray

    from engine.generate.distributor import connect

    fake = _FakeRay()
    monkeypatch.setattr(ray, "is_initialized", fake.is_initialized)
    monkeypatch.setattr(ray, "init", fake.init)
    dead = f"127.0.0.1:{_closed_port()}"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("engine.generate.distributor._last_ray_start", lambda: dead if where == "record" else None)
    if where == "env":
        monkeypatch.setenv("RAY_ADDRESS", dead)
    t0 = time.perf_counter()
    with pytest.raises(BadInputError) as err:
        connect(dead if where == "config" else None)
    assert time.perf_counter() - t0 < 10 and not fake.calls
    message = str(err.value)
    assert dead in message and "does not answer" in message
    assert {"record": "ray stop", "env": "unset RAY_ADDRESS", "config": "ray.address: local"}[where] in message


def test_a_live_cluster_address_passes_the_probe() -> None:
    import socket

    from engine.generate.distributor import check_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_reachable(f"127.0.0.1:{server.getsockname()[1]}", "ray.address in the config")  # no error
