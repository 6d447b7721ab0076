"""Ray Train end to end on CPU: two DDP workers, early stopping, resume, prediction, and a test split
that neither training, early stopping nor calibration reads, which ``age evaluate`` then reports.

Finetune mode, with a DDP worker killed mid-run, is trained on a two-node cluster in tests/test_cluster.py.
"""

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from agecore.checkpoint import read_history, read_meta
from agecore.config import ModelConfig, TrainConfig
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
    with pytest.raises(FileExistsError, match="--resume"):
        run(sealed, tmp_path, mode="partial", epochs=3)
    # resumed with more epochs and a stricter early stop: a learning rate too small to move the validation
    # MAE by min_delta, so epoch 2 does not improve and the run stops there, not at epoch 5. The count of
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
    kept = [meta.parent for meta in (tmp_path / "ray_train").rglob("checkpoint.json")]
    latest = max(kept, key=lambda d: read_meta(d)["epoch"])
    continued = pd.DataFrame(read_history(latest))
    assert continued["epoch"].tolist() == [0, 1, 2]
    pd.testing.assert_frame_equal(continued.iloc[:2], first, check_exact=False, check_dtype=False)

    # `age evaluate` on the prepared folder reports the held-out test split, with the validation calibration
    unseal(sealed, prepared_small)
    report = evaluate(str(tmp_path / "best"), str(sealed), str(tmp_path / "test-eval"))
    counts = json.loads((sealed / "prepare.json").read_text())["counts"]
    assert report["split"] == "test" and report["scored"] == counts["test"]
    # best/ as the resumed run left it: its stored calibration (from val), or none, and then val is measured
    stored = (tmp_path / "best" / "calibration.json").is_file()
    assert (f"{sealed} (val)" if stored else f"validation split of {sealed}") in report["verification"]["calibration"]
