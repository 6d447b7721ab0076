"""Ray Train end to end on CPU: two DDP workers, every mode, a killed worker, early stopping, resume, prediction."""

import json
import os
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from ray._private import state

from agecore.config import ModelConfig, TrainConfig
from agecore.predictor import Predictor
from ray_jobs.train import RUN_NAME, train

pytestmark = pytest.mark.slow

TINY = ModelConfig(backbone="test_resnet", pretrained="none", hidden=32, dropout=0.1)


def run(prepared, out, attach=False, **kw):
    cfg = TrainConfig(**{"epochs": 2, "batch_size": 32, "workers": 2, "lr": 1e-3, "warmup_epochs": 0.2, **kw})
    return train(str(prepared), str(out), TINY, cfg, cpus_per_worker=0.5, attach=attach)


def check_run(out, mode, epochs):
    for name in ("best/model.safetensors", "best/checkpoint.json", "metrics.csv", "curves.png", "config.json"):
        assert (out / name).is_file(), name
    history = pd.read_csv(out / "metrics.csv")
    assert history["epoch"].tolist() == list(range(epochs))
    assert {"train_mae", "val_mae", "val_cs5", "lr", "images_per_s"} <= set(history.columns)
    assert (history["workers"] == 2).all() and (history["nodes"] == 1).all()
    meta = json.loads((out / "best" / "checkpoint.json").read_text())
    assert meta["train"]["mode"] == mode and meta["preprocessing"]["input_size"] == 64
    # the checkpoint predicts from plain images, without Ray, whatever mode trained it
    predictor = Predictor(out / "best")
    ages = predictor.predict([Image.new("RGB", (100, 80), (120, 90, 70)), np.zeros((64, 64, 3), np.uint8)])
    assert ages.shape == (2,) and np.isfinite(ages).all()


def test_partial_run_ends_in_a_checkpoint_that_predicts(prepared_small, tmp_path):
    best = run(prepared_small, tmp_path, mode="partial", attach=True)
    # best/ re-scored from images by the Predictor agrees with training's validation
    assert best["val_mae_predictor"] == pytest.approx(best["val_mae"], abs=0.05)
    assert (tmp_path / "best" / "calibration.json").is_file()
    check_run(tmp_path, "partial", epochs=2)


def test_finetune_run_survives_a_killed_worker(prepared_small, tmp_path):
    """A DDP worker killed (SIGKILL, as a lost machine leaves it) after the first checkpoint: Ray Train
    restarts the group from that checkpoint and the run finishes every epoch exactly once."""
    result: dict = {}

    def target() -> None:
        try:
            result["best"] = run(prepared_small, tmp_path, mode="finetune", epochs=2)
        except BaseException as e:  # surfaced by the assertion below
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not list((tmp_path / RUN_NAME).glob("checkpoint_*")):  # the first epoch is finished and saved
        assert thread.is_alive() and time.monotonic() < deadline, result
        time.sleep(0.2)
    workers = [a for a in state.actors().values()
               if a["State"] == "ALIVE" and a["ActorClassName"].startswith("RayTrainWorker") and a["Pid"]]
    assert len(workers) == 2
    os.kill(workers[0]["Pid"], signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in result, result.get("error")
    assert np.isfinite(result["best"]["val_mae"])
    check_run(tmp_path, "finetune", epochs=2)  # every epoch once: nothing lost, nothing redone twice
    # the run really was restarted: the killed worker is dead and a new group was started
    train_workers = [a for a in state.actors().values() if a["ActorClassName"].startswith("RayTrainWorker")]
    assert workers[0]["ActorID"] in {a["ActorID"] for a in train_workers if a["State"] == "DEAD"}
    assert len(train_workers) >= 4


def test_resume_continues_from_the_last_finished_epoch_and_stops_early(prepared_small, tmp_path):
    run(prepared_small, tmp_path, mode="frozen", epochs=2)
    first = pd.read_csv(tmp_path / "metrics.csv")
    with pytest.raises(FileExistsError, match="--resume"):
        run(prepared_small, tmp_path, mode="frozen", epochs=3)
    # resumed with more epochs and a stricter early stop: a learning rate too small to move the validation
    # MAE by min_delta, so epoch 2 does not improve and the run stops there, not at epoch 5
    cfg = TrainConfig(epochs=6, batch_size=32, workers=2, lr=1e-9, warmup_epochs=0.2, mode="frozen",
                      patience=1, min_delta=0.5)
    train(str(prepared_small), str(tmp_path), TINY, cfg, cpus_per_worker=0.5, resume=True, attach=False)
    check_run(tmp_path, "frozen", epochs=3)
    resumed = pd.read_csv(tmp_path / "metrics.csv")
    pd.testing.assert_frame_equal(resumed.iloc[:2], first, check_exact=False)
