import numpy as np
import pandas as pd
import pytest
import torch

from agecore import metrics
from agecore.evaluate import calibration
from agecore.training import EarlyStopping, loss_fn, lr_factor

TRUE = np.array([1.0, 5.0, 12.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 90.0])
PRED = np.array([2.0, 5.0, 15.0, 26.0, 29.0, 40.0, 44.0, 61.0, 80.0, 81.0])


def test_summary_golden_numbers():
    m = metrics.summary(PRED, TRUE)
    err = PRED - TRUE  # 1, 0, 3, 6, -1, 0, -6, 1, 10, -9
    assert m["mae"] == pytest.approx(3.7)
    assert m["rmse"] == pytest.approx(np.sqrt(265 / 10), abs=1e-4)
    assert m["median_ae"] == pytest.approx(2.0)
    assert m["bias"] == pytest.approx(0.5)
    assert (m["cs@1"], m["cs@3"], m["cs@5"], m["cs@10"]) == (0.5, 0.6, 0.6, 1.0)
    assert err.sum() == 5


def test_per_band_golden_numbers():
    table = metrics.per_band(PRED, TRUE)
    assert table.loc["0-2", "mae"] == 1.0 and table.loc["10-17", "mae"] == 3.0
    assert table.loc["65+", "mae"] == pytest.approx(9.5) and table.loc["65+", "bias"] == pytest.approx(0.5)
    assert table.loc["45-54", "bias"] == -6 and table["count"].sum() == 10


def test_per_group_skips_missing():
    table = metrics.per_group(PRED[:3], TRUE[:3], pd.Series(["a", None, "a"]))
    assert table.loc["a", "count"] == 2 and table.loc["a", "mae"] == 2.0


def test_losses_golden():
    pred, y = torch.tensor([1.0, 4.0, 10.0]), torch.tensor([2.0, 4.0, 5.0])
    assert loss_fn("l1")(pred, y).item() == pytest.approx(2.0)
    # smooth L1 with beta 2: 0.5*1/2 = 0.25, 0, 5 - 1 = 4
    assert loss_fn("smooth_l1")(pred, y).item() == pytest.approx((0.25 + 0 + 4) / 3)


def test_calibration_quantiles_are_per_predicted_band():
    cal = calibration(TRUE, PRED)
    assert cal["overall"]["count"] == 10
    assert cal["bands"]["65+"]["count"] == 2 and cal["bands"]["65+"]["q0.5"] == pytest.approx(0.5)


def test_early_stopping_and_schedule():
    es = EarlyStopping(patience=2, min_delta=0.5)
    assert [es.update(v) for v in (10, 9, 8.8, 8.7)] == [True, True, False, False]
    assert es.should_stop and es.best == 8.7 and es.best_epoch == 1
    assert lr_factor(0, 100, 0, "constant") == 1.0
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.01)
