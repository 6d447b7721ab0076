"""The README's first command, as a new user runs it: `bash scripts/run.sh DATA OUT` with no model hub."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_labels_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_without_a_hub_runs_to_the_end_and_says_which_weights(faces_root, tmp_path):
    data = make_labels_dir(faces_root, tmp_path / "data", 200)
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EPOCHS": "1"}
    done = subprocess.run(["bash", "scripts/run.sh", str(data), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-3000:]
    assert "Traceback" not in said
    assert "setting up .venv" not in said  # set-up that is done is not redone
    lines = said.splitlines()
    assert len(lines) <= 40, said  # a screen, not Ray's logs
    assert lines[0].startswith("weights: ") and "tf_efficientnet_lite0" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert any(line.startswith("epoch 1/1  train MAE") for line in lines)
    assert f"age serve --checkpoint {out}/train/best" in said

    summary = json.loads((out / "summary.json").read_text())
    assert summary["backbone"] == "tf_efficientnet_lite0" and summary["pretrained"] == "file"
    assert summary["evaluated_split"] == "test" and summary["scored"] == summary["splits"]["test"]
    model = json.loads((out / "train" / "best" / "checkpoint.json").read_text())["model"]
    assert model["backbone"] == "tf_efficientnet_lite0" and model["pretrained_file"] == summary["pretrained_file"]
    for artefact in ("eval/report.md", "train/curves.png", "logs/age.log"):
        assert (out / artefact).is_file(), artefact
    assert "Starting execution of Dataset" in (out / "logs" / "age.log").read_text()  # Ray's logs went there
