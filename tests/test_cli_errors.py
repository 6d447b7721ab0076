"""User errors end in one or two lines on stderr and exit status 2; bugs keep their traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_jobs.cli import main
from tests.conftest import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _age(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err
    return err


def test_missing_input(capsys, tmp_path):
    err = _age(capsys, "prepare", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert err.startswith("age prepare: error: --data") and "no such file or folder" in err


def test_malformed_labels(capsys, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "labels.csv").write_text("name,years\na.jpg,3\n")
    err = _age(capsys, "prepare", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"))
    assert "labels.csv lacks the column(s)" in err and "file_name,real_age" in err


def test_bad_option_value(capsys, tmp_path):
    err = _age(capsys, "prepare", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--val-fraction", "2")
    assert "val_fraction" in err
    err = _age(capsys, "train", "--prepared", str(tmp_path), "--out", str(tmp_path / "o"), "--epochs", "many")
    assert "--epochs: invalid int value" in err  # argparse's own message, same status


def test_checkpoint_folder_that_is_not_one(capsys, tmp_path):
    err = _age(capsys, "score", "--checkpoint", str(tmp_path), "--input", str(tmp_path), "--out", str(tmp_path / "s"))
    assert f"{tmp_path} is not an agecore checkpoint" in err


def test_checkpoint_of_a_newer_format(capsys, tmp_path):
    import json

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    (ckpt / "checkpoint.json").write_text(json.dumps({**meta, "format": "agecore-checkpoint/99"}))
    err = _age(capsys, "score", "--checkpoint", str(ckpt), "--input", str(tmp_path), "--out", str(tmp_path / "s"))
    assert "format 99, newer than this agecore reads" in err


def test_manifest_naming_a_path_twice_is_refused_by_name_before_any_work(capsys, tmp_path, monkeypatch):
    import ray_jobs.score

    def started(*args, **kwargs):  # another test's Ray may be up: what counts is that this job starts none
        raise AssertionError("Ray was started before the manifest was checked")

    monkeypatch.setattr(ray_jobs.score, "init_ray", started)
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    (tmp_path / "m.csv").write_text("path\na.jpg\nb.jpg\na.jpg\n")
    err = _age(capsys, "score", "--checkpoint", str(ckpt), "--input", str(tmp_path / "m.csv"),
               "--out", str(tmp_path / "s"))
    assert f"names 1 path(s) more than once ({tmp_path / 'a.jpg'})" in err
    assert not (tmp_path / "s").exists()


def test_unknown_stage(capsys):
    err = _age(capsys, "trian")
    assert "unknown stage 'trian'" in err


def test_unreachable_weights_fail_in_seconds_before_any_work(tmp_path):
    # a subprocess, as a user meets it: the whole stderr, the exit status, no Ray started
    (tmp_path / "data").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "ray_jobs.quickstart", str(tmp_path / "data"), str(tmp_path / "run"),
                           "--backbone", "resnet50"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) <= 2 and "no ImageNet weights for 'resnet50'" in lines[-1] and "--pretrained-file" in lines[-1]
    assert not (tmp_path / "run" / "prepared").exists()


def test_bugs_keep_their_traceback(monkeypatch, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    import ray_jobs.score

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(ray_jobs.score, "score", broken)
    with pytest.raises(KeyError):
        main(["score", "--checkpoint", str(ckpt), "--input", str(tmp_path), "--out", str(tmp_path / "s")])


def test_a_rerun_into_an_output_of_another_model_or_calibration_is_refused(capsys, tmp_path, monkeypatch):
    import json

    import ray_jobs.score

    def started(*args, **kwargs):  # the refusal comes before any work
        raise AssertionError("Ray was started before the output was checked")

    monkeypatch.setattr(ray_jobs.score, "init_ray", started)
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "scores"
    out.mkdir()
    (out / ray_jobs.score.RUN_FILE).write_text(json.dumps({"weights": "0123456789ab", "calibration": None,
                                                           "detect_faces": "false"}))
    (tmp_path / "m.csv").write_text("path\na.jpg\n")
    err = _age(capsys, "score", "--checkpoint", str(ckpt), "--input", str(tmp_path / "m.csv"), "--out", str(out),
               "--detect-faces", "false")
    assert f"{out} holds rows of another scorer (weights '0123456789ab' there" in err
