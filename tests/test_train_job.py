"""Ray Train end to end on CPU: two DDP workers, every mode, early stopping, resume, prediction."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from agecore.config import ModelConfig, TrainConfig
from agecore.predictor import Predictor
from ray_jobs.train import train

pytestmark = pytest.mark.slow

TINY = ModelConfig(backbone="test_resnet", pretrained="none", hidden=32, dropout=0.1)


def run(prepared, out, attach=False, **kw):
    cfg = TrainConfig(**{"epochs": 2, "batch_size": 32, "workers": 2, "lr": 1e-3, "warmup_epochs": 0.2, **kw})
    return train(str(prepared), str(out), TINY, cfg, cpus_per_worker=0.5, attach=attach)


@pytest.mark.parametrize("mode", ["frozen", "partial", "finetune"])
def test_two_worker_run_ends_in_a_checkpoint_that_predicts(prepared_small, tmp_path, mode):
    best = run(prepared_small, tmp_path, mode=mode, attach=mode == "partial")
    assert np.isfinite(best["val_mae"])
    if mode == "partial":  # best/ re-scored from images by the Predictor agrees with training's validation
        assert best["val_mae_predictor"] == pytest.approx(best["val_mae"], abs=0.05)
        assert (tmp_path / "best" / "calibration.json").is_file()
    for name in ("best/model.safetensors", "best/checkpoint.json", "metrics.csv", "curves.png", "config.json"):
        assert (tmp_path / name).is_file(), name
    history = pd.read_csv(tmp_path / "metrics.csv")
    assert history["epoch"].tolist() == [0, 1]
    assert {"train_mae", "val_mae", "val_cs5", "lr", "images_per_s"} <= set(history.columns)
    assert (history["workers"] == 2).all() and (history["nodes"] == 1).all()
    meta = json.loads((tmp_path / "best" / "checkpoint.json").read_text())
    assert meta["train"]["mode"] == mode and meta["preprocessing"]["input_size"] == 64
    # the checkpoint predicts from plain images, without Ray, whatever mode trained it
    predictor = Predictor(tmp_path / "best")
    ages = predictor.predict([Image.new("RGB", (100, 80), (120, 90, 70)), np.zeros((64, 64, 3), np.uint8)])
    assert ages.shape == (2,) and np.isfinite(ages).all()


def test_early_stopping_ends_before_the_last_epoch(prepared_small, tmp_path):
    # a learning rate too small to move the validation MAE by min_delta: epoch 0 sets the best, epoch 1 does not improve
    run(prepared_small, tmp_path, mode="frozen", epochs=6, patience=1, min_delta=0.5, lr=1e-9)
    assert len(pd.read_csv(tmp_path / "metrics.csv")) == 2


def test_resume_continues_from_the_last_finished_epoch(prepared_small, tmp_path):
    run(prepared_small, tmp_path, mode="frozen", epochs=2)
    first = pd.read_csv(tmp_path / "metrics.csv")
    with pytest.raises(FileExistsError, match="--resume"):
        run(prepared_small, tmp_path, mode="frozen", epochs=3)
    cfg = TrainConfig(epochs=3, batch_size=32, workers=2, lr=1e-3, warmup_epochs=0.2, mode="frozen")
    train(str(prepared_small), str(tmp_path), TINY, cfg, cpus_per_worker=0.5, resume=True, attach=False)
    resumed = pd.read_csv(tmp_path / "metrics.csv")
    assert resumed["epoch"].tolist() == [0, 1, 2]
    pd.testing.assert_frame_equal(resumed.iloc[:2], first, check_exact=False)
