"""Ray Train end to end on CPU: two DDP workers, early stopping, resume, prediction, and a test split
that neither training, early stopping nor calibration reads, which ``age evaluate`` then reports.

Finetune mode, with a DDP worker killed mid-run, is trained on a two-node cluster in tests/test_cluster.py.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from agecore.checkpoint import TRAIN_STATE, read_history, read_meta
from agecore.config import ModelConfig, TrainConfig
from agecore.model import create_model
from agecore.predictor import Predictor
from agecore.training import EarlyStopping
from ray_jobs.evaluate import evaluate
from ray_jobs.train import train

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
    assert {"train_mae", "val_mae", "val_cs5", "lr", "images_per_second"} <= set(history.columns)
    assert (history["workers"] == 2).all() and (history["nodes"] == 1).all()
    meta = json.loads((out / "best" / "checkpoint.json").read_text())
    assert meta["train"]["mode"] == mode and meta["preprocessing"]["input_size"] == 64
    # the checkpoint's metrics are its epoch's; beside them, one history row per epoch up to it
    assert "history" not in meta["metrics"] and meta["metrics"]["epoch"] == meta["epoch"]
    reached = pd.DataFrame(read_history(out / "best"))
    assert reached["epoch"].tolist() == list(range(meta["epoch"] + 1))
    pd.testing.assert_frame_equal(reached, history.iloc[:meta["epoch"] + 1], check_exact=False, check_dtype=False)
    # the checkpoint predicts from plain images, without Ray, whatever mode trained it
    predictor = Predictor(out / "best")
    ages = predictor.predict([Image.new("RGB", (100, 80), (120, 90, 70)), np.zeros((64, 64, 3), np.uint8)])
    assert ages.shape == (2,) and np.isfinite(ages).all()


def latest_checkpoint(out: Path) -> Path:
    """The newest of the checkpoints Ray Train keeps for resuming."""
    kept = [meta.parent for meta in (out / "ray_train").rglob("checkpoint.json")]
    return max(kept, key=lambda d: read_meta(d)["epoch"])


def trained_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's parameters, without batch norm's running statistics (which move at any learning rate)."""
    names = {name for name, _ in create_model(TINY).named_parameters()}
    return {k: v for k, v in load_file(checkpoint / "model.safetensors").items() if k in names}


SEALED = b"not Parquet: the test split was read"


@pytest.fixture(scope="module")
def sealed(prepared_small, tmp_path_factory):
    """A copy of the prepared set whose test shards are unreadable: any job that reads them fails."""
    copy = tmp_path_factory.mktemp("sealed") / "prepared"
    shutil.copytree(prepared_small, copy, ignore=shutil.ignore_patterns("cache"))
    shards = list((copy / "data" / "split=test").glob("*.parquet"))
    assert shards, "the prepared set holds no test split"
    for shard in shards:
        shard.write_bytes(SEALED)
    return copy


def unseal(prepared, original) -> None:
    shutil.rmtree(prepared / "data" / "split=test")
    shutil.copytree(original / "data" / "split=test", prepared / "data" / "split=test")


def check_test_split_unread(prepared, out) -> None:
    """The workers read the feature cache; it holds train and val only, every row of each, and the
    calibration and validation report were measured on val."""
    counts = json.loads((prepared / "prepare.json").read_text())["counts"]
    caches = list((prepared / "cache").iterdir())
    assert len(caches) == 1, caches
    cached = pq.read_table(caches[0], columns=["split"]).column("split").to_pylist()
    assert pd.Series(cached).value_counts().to_dict() == {"train": counts["train"], "val": counts["val"]}
    cal = json.loads((out / "best" / "calibration.json").read_text())
    assert cal["split"] == "val" and cal["overall"]["count"] == counts["val"]
    assert json.loads((out / "val-eval" / "report.json").read_text())["split"] == "val"


def test_partial_run_predicts_then_resumes_and_stops_early(sealed, prepared_small, tmp_path):
    best = run(sealed, tmp_path, mode="partial", attach=True)
    # best/ re-scored from images by the Predictor agrees with training's validation
    assert best["val_mae_predictor"] == pytest.approx(best["val_mae"], abs=0.05)
    assert (tmp_path / "best" / "calibration.json").is_file()
    check_run(tmp_path, "partial", epochs=2)
    check_test_split_unread(sealed, tmp_path)

    first = pd.read_csv(tmp_path / "metrics.csv")
    # what the resumed run must start from: the last epoch's weights and optimiser state, read now because
    # Ray Train keeps only the two best checkpoints and the resumed run may delete this one
    saved = latest_checkpoint(tmp_path)
    assert read_meta(saved)["epoch"] == 1
    saved_weights, saved_state = trained_weights(saved), torch.load(saved / TRAIN_STATE, weights_only=True)
    with pytest.raises(FileExistsError, match="--resume"):
        run(sealed, tmp_path, mode="partial", epochs=3)
    # resumed with more epochs and a stricter early stop: min_delta is more than one epoch moves this tiny model's
    # validation MAE, so epoch 2 does not improve and the run stops there, not at epoch 5. The count of
    # epochs without improvement carries over from the first run, whose epoch 1 may or may not have improved
    # (by that run's min_delta): patience is set one above that count, so epoch 2 is the last either way.
    first_stopper = EarlyStopping(patience=TrainConfig().patience, min_delta=TrainConfig().min_delta)
    for val_mae in first["val_mae"]:
        first_stopper.update(val_mae)
    carried = first_stopper.bad_epochs
    cfg = TrainConfig(epochs=6, batch_size=32, workers=2, lr=1e-9, warmup_epochs=0.2, mode="partial",
                      patience=1 + carried, min_delta=0.5)
    train(str(sealed), str(tmp_path), TINY, cfg, cpus_per_worker=0.5, resume=True, attach=False)
    check_run(tmp_path, "partial", epochs=3)
    resumed = pd.read_csv(tmp_path / "metrics.csv")
    pd.testing.assert_frame_equal(resumed.iloc[:2], first, check_exact=False)
    # the latest checkpoint's history continues the first run's: its rows, then the resumed epoch
    latest = latest_checkpoint(tmp_path)
    continued = pd.DataFrame(read_history(latest))
    assert continued["epoch"].tolist() == [0, 1, 2]
    pd.testing.assert_frame_equal(continued.iloc[:2], first, check_exact=False, check_dtype=False)
    # the resumed epoch starts from epoch 1's weights, so it ends nearer them than the first run's initial network
    # (the one the driver seeds) is; a resume that restored the history but not the weights starts from that
    # network again and ends about as far away. Not equality: the resumed run keeps the first run's schedule,
    # whose learning rate (metrics.csv) is far above the --lr of 1e-9 asked for
    torch.manual_seed(TrainConfig().seed)
    initial = {k: v for k, v in create_model(TINY).state_dict().items() if k in saved_weights}
    resumed_weights = trained_weights(latest)
    assert resumed_weights.keys() == saved_weights.keys() == initial.keys()
    moved, trained = (torch.cat([(a[k] - b[k]).flatten() for k in saved_weights]).norm().item()
                      for a, b in ((resumed_weights, saved_weights), (saved_weights, initial)))
    assert moved < 0.5 * trained, (moved, trained)
    # the optimiser and schedule count on from epoch 1's steps rather than from zero
    per_epoch = saved_state["schedule"]["updates"] // 2  # the steps of one epoch on one worker's shard
    state = torch.load(latest / TRAIN_STATE, weights_only=True)
    assert per_epoch > 0 and saved_state["schedule"]["updates"] == 2 * per_epoch
    assert {float(s["step"]) for s in saved_state["optimizer"]["state"].values()} == {2.0 * per_epoch}
    assert state["schedule"]["updates"] == 3 * per_epoch
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {3.0 * per_epoch}
    # best/ is the epoch of the lowest validation MAE of all three
    best_epoch = read_meta(tmp_path / "best")["epoch"]
    assert resumed["val_mae"].iloc[best_epoch] == resumed["val_mae"].min()
    assert read_meta(tmp_path / "best")["metrics"]["val_mae"] == pytest.approx(resumed["val_mae"].min(), abs=1e-6)

    # `age evaluate` on the prepared folder reports the held-out test split, with the validation calibration
    unseal(sealed, prepared_small)
    report = evaluate(str(tmp_path / "best"), str(sealed), str(tmp_path / "test-eval"))
    counts = json.loads((sealed / "prepare.json").read_text())["counts"]
    assert report["split"] == "test" and report["scored"] == counts["test"]
    # best/ as the resumed run left it: its stored calibration (from val), or none, and then val is measured
    stored = (tmp_path / "best" / "calibration.json").is_file()
    assert (f"{sealed} (val)" if stored else f"validation split of {sealed}") in report["verification"]["calibration"]
