"""The main job end to end with the ``--fast`` budget: every stage, the report, then a resume.

Runs ``python -m jobs.demo --fast`` in a subprocess (exactly the README / docs/experiments.md command, Ray
included), checks the report folder, that every manifest verifies and carries its
compute metadata, that each scheme has a seg summary; then runs the same command again
and checks that every stage was reused instead of redone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.manifest import read_manifest
from engine.plots import PLOT_PX
from experiments.sweep import REPO
from engine.verify import verify_manifest

pytestmark = pytest.mark.slow


def _demo(out: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "jobs.demo", "--fast", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(900)
def test_demo_fast_end_to_end_and_resume(tmp_path):
    from PIL import Image

    out = tmp_path / "demo"
    first = _demo(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    titles = ["ingest", "train ControlNet", "generate", "FID", "judge", "memorization", "train 4 segmentation", "report"]
    for n, title in enumerate(titles, 1):
        assert f"==> [{n}/{len(titles)}] {title}" in first.stdout  # a header per stage, in order
    report = out / "report"
    md = (report / "index.md").read_text()
    assert (report / "index.html").is_file()
    for name in ("fid_vs_w.png", "fid_vs_lambda.png", "schemes.png", "cost_by_lambda.png"):
        with Image.open(report / name) as im:
            assert im.size == PLOT_PX
    assert len(list(report.glob("samples_*.png"))) == 2
    record = json.loads((report / "sweep.json").read_text())
    assert record["wall_seconds"] > 0 and set(record["stages"]) == {"ingest", "controlnet", "generate", "fid", "judge", "memorization", "seg",
                                                             "report"}

    manifests = [out / "real" / "manifest.parquet"] + [out / c["manifest"] for c in record["cells"]]
    assert len(manifests) == 5  # real + 2 w x 2 λ
    for m in manifests:
        rep = verify_manifest(m)
        assert rep.ok and rep.samples > 0, (m, rep.problems)
    for m in manifests[1:]:
        _, info = read_manifest(m)
        compute = info.extra["compute"]
        assert compute["samples"] == 6 and set(compute["seconds_per_sample_by_lambda"]) <= {"0.5", "1"}

    for scheme in ("real", "fixed", "uniform", "adaptive"):
        (summary,) = list((out / "seg").glob(f"{scheme}-*seed0/summary.json"))
        data = json.loads(summary.read_text())
        assert data["scheme"] == scheme and 0.0 <= data["miou"] <= 1.0
        assert f"| {scheme} |" in md
    fid = json.loads((out / "fid.json").read_text())
    assert len(fid["cells"]) == 4 and all(c["fid"] >= 0 for c in fid["cells"].values())
    memo = json.loads((out / "memorization.json").read_text())["cells"]
    assert len(memo) == 4 and all(c["samples"] == 6 and c["l1_own"] <= c["l1_other"] for c in memo.values())
    assert "## Memorization" in md

    second = _demo(out)  # everything is done: every stage must be reused
    assert second.returncode == 0, second.stderr[-3000:]
    stages = json.loads((report / "sweep.json").read_text())["stages"]
    assert stages["ingest"]["reused"] and stages["controlnet"]["reused"]
    assert stages["generate"]["cells_reused"] == 4 and stages["generate"]["images_this_run"] == 0
    assert stages["fid"]["cells_reused"] == 4 and stages["seg"]["runs_reused"] == 4
    assert stages["judge"]["cells_reused"] == 4 and stages["memorization"]["cells_reused"] == 4
