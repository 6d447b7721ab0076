"""The offline bundle (scripts/bundle.sh): it builds under its size limit and runs the pipeline with nothing else.

The run uses a fresh interpreter that sees only what a bare GPU machine has (torch, timm, numpy,
pandas, pyarrow and what they require, linked from this environment) plus what the archive brings,
so a package the bundle forgot fails the run, in the driver or in any Ray process it starts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.isolated import PYTHON, ROOT, isolated_venv

sys.path.insert(0, str(ROOT / "scripts"))
from bundle import HOST_ROOTS  # scripts/bundle.py: the host the bundle is built for

LIMIT_BYTES = 60 * 2**20
FACES = 200
EPOCHS = 1  # what is proven is that every package loads: a second epoch loads nothing new

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def archive(tmp_path_factory, faces_root) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    subprocess.run(["bash", str(ROOT / "scripts" / "bundle.sh"), "build", str(out), "--python", PYTHON,
                    "--faces", str(FACES)], check=True, env={**os.environ, "AGECORE_FACES": str(faces_root)})
    return out / f"agecore-bundle-py{PYTHON.replace('.', '')}.tar.xz"


def test_bundle_builds_under_the_limit_and_runs_alone(archive: Path, tmp_path: Path) -> None:
    assert archive.stat().st_size <= LIMIT_BYTES, f"{archive.stat().st_size / 2**20:.1f} MiB"
    python = isolated_venv(tmp_path / "host", HOST_ROOTS)
    # the proof is only as good as the isolation: the bare host has torch but no Ray and no project
    # (found, not imported: the run imports them, and importing torch costs seconds)
    probe = subprocess.run([str(python), "-c", "import importlib.util as u; "
                            "assert all(u.find_spec(m) for m in ('torch', 'timm', 'pyarrow')), 'a host root is missing'; "
                            "import ray"], capture_output=True, text=True)
    assert "No module named 'ray'" in probe.stderr, probe.stderr

    out, work = tmp_path / "out", tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RAY_ADDRESS")}
    env.update(PATH=os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p),
               PYTHON=str(python), BACKBONE="test_resnet", PRETRAINED="none", IMAGE_SIZE="64", EPOCHS=str(EPOCHS),
               GPU="0", KEEP_WORK=str(work))
    run = subprocess.run(["bash", str(ROOT / "scripts" / "bundle.sh"), "run", str(archive), str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).is_file() for f in files), files
    assert {"summary.md", "run.log", "metrics.csv", "curves.png", "evaluation.md"} <= set(files)
    assert len(pd.read_csv(out / "metrics.csv")) == EPOCHS
    summary = (out / "summary.md").read_text()
    assert f"## Bundle run on CPU: test_resnet, {EPOCHS} epoch" in summary and "test MAE" in summary
    # the four jobs, each reported on the terminal with its time, on the one local Ray the first one started
    said = run.stdout.splitlines()
    assert all(any(re.fullmatch(rf"   {job}: \d+ s", line) for line in said)
               for job in ("prepare", "train", "evaluate", "score")), run.stdout
    assert (out / "run.log").read_text().count("Ray resources:") == 1, "a job started a Ray of its own"
    scores = pd.read_parquet(work / "scores")
    assert len(scores) == FACES and scores["predicted_age"].notna().all()
    assert (work / "train" / "best" / "checkpoint.json").is_file()
