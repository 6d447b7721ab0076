"""A tiny Ray Tune search end to end: every trial recorded, a failing trial contained, the best promoted."""

import time

import numpy as np
import pandas as pd
import pytest
import ray

from agecore.checkpoint import read_calibration, read_meta
from agecore.predictor import Predictor
from ray_jobs.tune import SEARCH_NAME, main

pytestmark = [pytest.mark.slow, pytest.mark.tune]


def test_search_records_every_trial_and_promotes_the_best(prepared_small, tmp_path):
    # dropout 1.5 is invalid: that trial raises inside its worker and must be recorded, not sink the search.
    # It goes first, so that a good trial takes its place at once (two run at a time).
    table = main([
        "--prepared", str(prepared_small), "--out", f"file://{tmp_path}", "--samples", "1", "--mode", "frozen",
        "--backbone", "test_resnet", "--no-pretrained", "--epochs", "1", "--grace", "1",
        "--dropouts", "1.5", "0.0", "0.5", "--lrs", "0.003", "--concurrent", "2", "--cpus-per-worker", "0.5",
        "--storage-path", f"file://{tmp_path}/search-state",  # outputs and Tune's own state on URIs
    ])
    saved = pd.read_csv(tmp_path / "trials.csv")
    assert len(saved) == len(table) == 3
    failed = saved[saved["status"] == "ERROR"]
    assert failed["config/dropout"].tolist() == [1.5] and "dropout" in failed["error"].iloc[0]
    ok = saved[saved["status"] == "OK"]
    assert len(ok) == 2 and ok["best_val_mae"].notna().all()
    # the trials learnt something: after one epoch every good trial beats guessing each face the training mean,
    # which the untrained head, centred on it, scatters around (a weak bar: a random frozen backbone sees
    # little of the age in one epoch; tests/test_training.py holds training to halving its error)
    ages = {s: pd.read_parquet(prepared_small / "data" / f"split={s}", columns=["age"])["age"] for s in ("train", "val")}
    guess = float((ages["val"] - ages["train"].mean()).abs().mean())
    assert (ok["best_val_mae"] < guess).all(), (ok["best_val_mae"].tolist(), guess)
    best_meta = read_meta(tmp_path / "best")
    assert best_meta["metrics"]["val_mae"] == pytest.approx(ok["best_val_mae"].min(), abs=1e-6)
    assert best_meta["model"]["dropout"] == pytest.approx(ok.loc[ok["best_val_mae"].idxmin(), "config/dropout"])
    assert (tmp_path / "tune.png").stat().st_size > 10_000
    assert (tmp_path / "search-state" / SEARCH_NAME).is_dir() and not (tmp_path / SEARCH_NAME).exists()
    assert Predictor(tmp_path / "best").predict_arrays(np.zeros((1, 64, 64, 3), np.uint8)).shape == (1,)
    calibration = read_calibration(tmp_path / "best")  # served as it is, with the margins of /v1/verify
    assert calibration["split"] == "val" and calibration["overall"]["count"] == pd.read_parquet(
        prepared_small / "data" / "split=val").shape[0]
    # Tune stops each trial at its last report; Ray Train must still release the trial's CPUs, or the
    # next trial of a longer search would wait for them forever
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, f"CPUs still held after the search: {ray.available_resources()}"
        time.sleep(2)
