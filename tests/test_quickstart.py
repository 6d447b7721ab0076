"""The README's first command, as a new user runs it: `bash scripts/run.sh DATA OUT` with no model hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


QUIET_JOB = """
import logging, os, sys
from ray._private.worker import print_to_stdstream
from ray_jobs.common import setup_logging
setup_logging(log_file=sys.argv[1])
logging.getLogger("ray_jobs.quickstart").info("a job's own message")
logging.getLogger("ray_jobs.quickstart").warning("a job's own warning")
print("progress of the job", file=sys.stderr)
# as the driver prints a raylet warning, and as the core worker logs to descriptor 2
print_to_stdstream({"lines": ["WARNING: 8 PYTHON worker processes have been started"], "pid": "raylet",
                    "is_err": False}, ignore_prefix=False)
os.write(2, b"core worker: constructor arguments in the object store\\n")
logging.getLogger("ray.data").warning("a library notice")
"""


def test_a_quiet_job_keeps_rays_own_output_in_its_log(tmp_path):
    log = tmp_path / "logs" / "age.log"
    done = subprocess.run([sys.executable, "-c", QUIET_JOB, str(log)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    terminal, kept = done.stdout + done.stderr, log.read_text()
    assert "a job's own warning" in terminal and "progress of the job" in terminal
    assert "a job's own message" not in terminal and "a job's own message" in kept  # INFO: the file alone
    for ray_says in ("8 PYTHON worker processes", "constructor arguments", "a library notice"):
        assert ray_says not in terminal and ray_says in kept, ray_says
