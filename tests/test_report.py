"""The evaluation report's verification section and the choice of its calibration (no Ray needed).

The calibration that draws a report's verification figures must never be measured on the test split
the report shows: these tests give each case a validation table and record whether it was read.
"""

import json

import numpy as np
import pandas as pd
import pytest

from agecore.checkpoint import attach_calibration, read_calibration
from agecore.evaluate import build_report, calibration, choose_calibration
from tests.test_metrics import CAL, V_PRED, V_TRUE


def table(true: np.ndarray, pred: np.ndarray, name: str) -> pd.DataFrame:
    return pd.DataFrame({"path": [f"/nowhere/{name}{i}.jpg" for i in range(len(true))], "age": true,
                         "predicted_age": pred, "error": ""})


@pytest.fixture
def tables():
    rng = np.random.default_rng(0)
    val_true = rng.uniform(1, 80, 40)
    return table(V_TRUE, V_PRED, "test"), table(val_true, val_true + rng.normal(0, 3, 40), "val")


class Validation:
    """Stands for the predictions on a validation split; counts how often they were asked for."""

    def __init__(self, val: pd.DataFrame) -> None:
        self.val, self.calls = val, 0

    def __call__(self) -> pd.DataFrame:
        self.calls += 1
        return self.val


def test_a_report_on_test_uses_the_stored_validation_calibration(tables, tmp_path):
    test, val = tables
    data = str(tmp_path / "prepared")
    attach_calibration(tmp_path, {"overall": {"count": 7}}, f"{data} (val)", data=data, split="val")
    validation = Validation(val)
    cal, note = choose_calibration(tmp_path, data, "test", test, validation)
    assert cal["overall"]["count"] == 7 and validation.calls == 0
    assert "calibration.json" in note and "(val)" in note and "in-sample" not in note


def test_a_calibration_measured_on_the_reported_test_split_is_not_used(tables, tmp_path):
    test, val = tables
    data = str(tmp_path / "prepared")
    attach_calibration(tmp_path, calibration(V_TRUE, V_PRED), f"{data} (test)", data=data, split="test")
    validation = Validation(val)
    cal, note = choose_calibration(tmp_path, data, "test", test, validation)
    assert validation.calls == 1 and cal["overall"]["count"] == len(val) and cal["split"] == "val"
    assert "measured on this test split" in note
    assert read_calibration(tmp_path)["split"] == "test"  # reported around, not overwritten


def test_without_a_stored_calibration_the_validation_split_is_measured_not_stored(tables, tmp_path):
    test, val = tables
    validation = Validation(val)
    cal, note = choose_calibration(tmp_path, str(tmp_path / "p"), "test", test, validation)
    assert validation.calls == 1 and cal["overall"]["count"] == len(val)
    assert "validation split" in note and "--attach" in note
    assert read_calibration(tmp_path) is None


def test_attach_calibrates_on_validation_even_when_test_is_reported(tables, tmp_path):
    test, val = tables
    data = str(tmp_path / "prepared")
    cal, note = choose_calibration(tmp_path, data, "test", test, Validation(val), attach=True)
    stored = read_calibration(tmp_path)
    assert stored["split"] == "val" and stored["data"] == data and stored["overall"]["count"] == len(val)
    assert cal["overall"] == stored["overall"] and "attached" in note and "in-sample" not in note
    # reported on the validation split itself, the same calibration says it is in-sample
    _, note = choose_calibration(tmp_path, data, "val", val, Validation(val))
    assert "in-sample" in note


def test_data_without_splits_fall_back_like_verify_or_calibrate_in_sample(tables, tmp_path):
    test, _ = tables
    cal, note = choose_calibration(tmp_path, str(tmp_path / "m.csv"), None, test, None)
    assert cal is None and "twice" in note
    cal, note = choose_calibration(tmp_path, str(tmp_path / "m.csv"), None, test, None, attach=True)
    assert cal["overall"]["count"] == len(test) and "in-sample" in note
    assert read_calibration(tmp_path)["split"] is None


def test_report_carries_the_split_and_the_verification_figures(tmp_path):
    report = build_report(table(V_TRUE, V_PRED, "t"), tmp_path, split="test", calibration=CAL,
                          calibration_note="measured on the validation split of P")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["split"] == "test" and saved["verification"] == report["verification"]
    v = saved["verification"]
    assert [r["threshold"] for r in v["thresholds"]] == [13, 16, 18, 21, 25]
    at18 = v["thresholds"][2]
    assert (at18["false_positive_rate"], at18["false_negative_rate"], at18["uncertain"]) == (0.2, 0.1667, 0.3636)
    assert v["coverage"]["overall"] == pytest.approx(0.8182) and "margin_years" not in v
    md = (tmp_path / "report.md").read_text()
    assert "Split: test (held out" in md and "Calibration: measured on the validation split of P." in md
    assert "| 18 | 5 | 20.0% | 33.3% (n=3) | 6 | 16.7% | 36.4% (40.0% / 33.3%) |" in md
    assert "| 10-17 | 75.0% | 4 | 75.0% | 4 |" in md


def test_report_without_calibration_uses_twice_the_validation_mae(tmp_path):
    meta = {"model": {"backbone": "b"}, "metrics": {"val_mae": 3.0}}
    report = build_report(table(V_TRUE, V_PRED, "t"), tmp_path, meta)
    assert report["split"] is None and report["verification"]["margin_years"] == 6.0
    # +/- 6 years: 17 estimated 23 ([17, 29]) is no longer accepted at 18, 20 estimated 13 ([7, 19]) no longer rejected
    at18 = report["verification"]["thresholds"][2]
    assert (at18["false_positive_rate"], at18["uncertain_under"], at18["false_negative_rate"]) == (0.0, 0.8, 0.0)
    assert "Data: not a prepared set" in (tmp_path / "report.md").read_text()
