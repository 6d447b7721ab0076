"""Calibration to a user's own photos (agecore.calibration, named calibrations, age calibrate): no Ray needed.

The figures of a calibration must come from people left out of its fit, small sets must be refused,
and a named calibration must travel through the checkpoint into every age the Predictor returns.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from agecore import calibration as calib
from agecore.checkpoint import calibration_names, read_calibration, save_calibration
from agecore.errors import InvalidInput, MissingInput
from tests.conftest import tiny_checkpoint


def synthetic(people: int = 60, photos: int = 8, noise: float = 2.0, seed: int = 0):
    """Ages 1-70 and raw estimates with a known linear bias (1.25 * age + 4), a per-person offset and noise."""
    rng = np.random.default_rng(seed)
    person = np.repeat(np.arange(people), photos)
    true = rng.uniform(1, 70, person.size)
    raw = 1.25 * true + 4 + rng.normal(0, 1, people)[person] + rng.normal(0, noise, person.size)
    return true, raw, person


@pytest.fixture
def checkpoint(tmp_path):
    return tiny_checkpoint(tmp_path / "ckpt")


def test_grouped_folds_put_no_person_on_both_sides():
    groups = np.random.default_rng(1).integers(0, 37, 500).astype(str)
    folds = calib.grouped_folds(groups, 5, seed=3)
    for f in range(5):
        assert not set(groups[folds == f]) & set(groups[folds != f])
    assert np.bincount(folds).min() > 60  # as even in photos as the people allow


def test_cross_fit_never_predicts_a_person_from_their_own_photos(monkeypatch):
    true, raw, person = synthetic(people=20)
    seen = []
    real_fit = calib.fit_calibration

    def spy(t, r, groups, *args, **kwargs):
        seen.append(set(groups))
        return real_fit(t, r, groups, *args, **kwargs)

    monkeypatch.setattr(calib, "fit_calibration", spy)
    fig, fits = calib.cross_fit(true, raw, person)
    for fit, fitted_on in zip(fits, seen, strict=True):
        assert fitted_on.isdisjoint(set(person[calib.grouped_folds(person.astype(str), 5, 1) == fit["fold"]].astype(str)))
    assert sum(f["photos_left_out"] for f in fits) == len(true) and np.isfinite(fig.pred).all()


def test_person_rules():
    assert calib.people_of(["a/002A03.JPG", "b/013A21.jpg"], "prefix:3").tolist() == ["002", "013"]
    assert calib.people_of(["x/anna_2010.jpg"], r"regex:^([a-z]+)_").tolist() == ["anna"]
    with pytest.raises(InvalidInput, match="does not match"):
        calib.people_of(["x/2010.jpg"], r"regex:^([a-z]+)_")
    with pytest.raises(InvalidInput, match="prefix:N"):
        calib.person_rule("first3")


@pytest.mark.parametrize(("photos", "people"), [(calib.MIN_PHOTOS - 1, 40), (400, calib.MIN_PEOPLE - 1)])
def test_small_sets_are_refused(photos, people):
    true = np.linspace(5, 60, photos)
    groups = np.arange(photos) % people
    with pytest.raises(InvalidInput, match=f"at least {calib.MIN_PHOTOS} photos of at least"):
        calib.fit_calibration(true, true + 3, groups)


def test_a_known_linear_bias_is_recovered():
    true, raw, person = synthetic(noise=0.5)
    cal = calib.fit_calibration(true, raw, person)
    c = cal["correction"]
    assert c["kind"] == "linear" and c["shrink"] > 0.99
    # the inverse of 1.25 * age + 4, less a little for the per-person noise in the estimate
    assert np.allclose([c["params"]["slope"], c["params"]["intercept"]], [0.7964, -2.9686], atol=1e-3)
    assert np.allclose([0.8, -3.2], [c["params"]["slope"], c["params"]["intercept"]], atol=[0.01, 0.3])
    fig, _ = calib.cross_fit(true, raw, person)
    assert abs(np.mean(fig.pred - true)) < 0.2 and np.mean(np.abs(fig.pred - true)) < 1.2


def test_no_bias_keeps_the_estimates():
    true, _, person = synthetic()
    raw = true + np.random.default_rng(5).normal(0, 3, true.size)
    assert calib.fit_calibration(true, raw, person)["correction"]["kind"] == "none"


def test_corrections_golden_numbers():
    raw = np.array([10.0, 20, 30, 40])
    assert np.allclose(calib.Correction("shift", {"offset": -2.0}).apply(raw), [8, 18, 28, 38])
    loglin = calib.Correction("log-linear", {"slope": 1.0, "intercept": np.log(0.5)}).apply(raw)
    assert np.allclose(loglin, (raw + 1) / 2 - 1)
    iso = calib.Correction("isotonic", {"x": [10.0, 30.0], "y": [8.0, 25.0]})
    assert np.allclose(iso.apply(np.array([5.0, 20, 30, 50])), [3.0, 16.5, 25.0, 45.0])  # slope one past its ends
    kx, ky = calib.isotonic_median(np.array([1.0, 2, 3, 4, 5]), np.array([5.0, 1, 2, 9, 8]))
    assert kx.tolist() == [2.0, 4.5] and ky.tolist() == [2.0, 8.5]


def test_thin_bands_are_pooled_with_their_neighbours():
    true, raw, _ = synthetic()
    cal = calib.pooled_margins(true, raw)
    assert set(cal["pooled_bands"]) == {label for label, n in _band_counts(raw).items() if n < calib.MIN_BAND_PHOTOS}
    for entry in cal["pooled_bands"].values():
        assert entry["count"] >= calib.MIN_BAND_PHOTOS


def _band_counts(pred):
    from agecore.metrics import AGE_BAND_LABELS, estimate_band

    return pd.Series(np.asarray(AGE_BAND_LABELS)[estimate_band(pred)]).value_counts().to_dict()


def test_a_named_calibration_round_trips_through_checkpoint_and_predictor(checkpoint):
    from agecore.predictor import Predictor

    true, raw, person = synthetic()
    cal = calib.fit_calibration(true, raw, person)
    save_calibration(checkpoint, "family", cal)
    assert calibration_names(checkpoint) == ["family"]
    assert read_calibration(checkpoint, "family") == json.loads(json.dumps({"name": "family", **cal}))
    assert read_calibration(checkpoint) is None  # the model's own calibration.json stays the default
    images = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    plain = Predictor(checkpoint, batch_size=4)
    named = Predictor(checkpoint, batch_size=4, calibration="family")
    expected = calib.Correction.from_dict(cal["correction"]).apply(plain.predict_arrays(images))
    assert np.allclose(named.predict_arrays(images), expected, atol=1e-3)
    assert named.predict(Image.fromarray(images[0])) == pytest.approx(float(expected[0]), abs=1e-3)
    assert named.identity["calibration"] == "family" and plain.identity["calibration"] is None
    assert named.calibration["bands"] == json.loads(json.dumps(cal["bands"]))


def test_an_unknown_name_fails_before_any_work(checkpoint, monkeypatch):
    import agecore.predictor

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(agecore.predictor, "load_checkpoint", no_work)
    with pytest.raises(MissingInput, match="holds none"):
        agecore.predictor.Predictor(checkpoint, calibration="family")
    save_calibration(checkpoint, "family", {"correction": {"kind": "none"}})
    with pytest.raises(MissingInput, match="no calibration named 'famly': it holds family"):
        agecore.predictor.Predictor(checkpoint, calibration="famly")
    with pytest.raises(InvalidInput, match="calibration name"):
        save_calibration(checkpoint, "../escape", {})


def test_score_refuses_an_unknown_calibration_before_starting_ray(checkpoint, tmp_path, monkeypatch):
    import ray_jobs.score

    monkeypatch.setattr(ray_jobs.score, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    with pytest.raises(MissingInput, match="no calibration named"):
        ray_jobs.score.score(str(checkpoint), str(tmp_path), str(tmp_path / "out"), calibration="nope")


def test_age_calibrate_writes_its_report_and_stores_the_calibration(checkpoint, tmp_path, monkeypatch):
    """The job end to end on a tiny checkpoint; face detection is replaced by a face at the training layout."""
    import ray_jobs.calibrate as job
    from agecore.faces import UTKFACE_TEMPLATE
    from agecore.predictor import Predictor

    people = calib.MIN_PEOPLE + 2
    per_person = -(-calib.MIN_PHOTOS // people) + 1
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for p in range(people):
        for k in range(per_person):
            name = f"{p:03d}A{k:02d}.jpg"
            Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(photos / name)
            rows.append({"path": f"photos/{name}", "age": 2 + 5 * k + p % 3})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)

    def fake_detect(paths, detect, no_face_message):
        landmarks = [v * 96 for point in UTKFACE_TEMPLATE for v in point]
        return pd.DataFrame({"path": paths, "faces_found": 1, "box": [[0.0, 0.0, 96.0, 96.0]] * len(paths),
                             "face_score": 0.99, "landmarks": [landmarks] * len(paths),
                             "error": ["no_face: none found" if p.endswith("000A00.jpg") else "" for p in paths]})

    monkeypatch.setattr(job, "detect_photos", fake_detect)
    monkeypatch.setattr(job, "require_mtcnn", lambda: None)
    out = tmp_path / "report"
    report = job.main(["--checkpoint", str(checkpoint), "--data", str(tmp_path / "manifest.csv"), "--name", "mine",
                       "--person-from", "prefix:3", "--out", str(out)])
    assert {"report.md", "report.json", "correction.png", "estimates.csv", "faces.parquet"} <= {f.name for f in out.iterdir()}
    assert report["photos"]["without_face"] == 1 and report["photos"]["used"] == people * per_person - 1
    assert report["grouping"]["people"] == people and "warning" not in report["grouping"]
    assert {r["threshold"] for r in report["after"]["thresholds"]} == {13, 16, 18, 21, 25}
    stored = read_calibration(checkpoint, "mine")
    assert stored["people"] == people and stored["folds"] == 5 and stored["source"] == "age calibrate"
    estimates = pd.read_csv(out / "estimates.csv")
    assert estimates["calibrated_age"].isna().sum() == 1  # the photo without a face: listed, not scored
    assert Predictor(checkpoint, batch_size=4, calibration="mine").identity["calibration"] == "mine"


def test_evaluate_refuses_an_unknown_calibration_before_starting_ray(checkpoint, tmp_path, monkeypatch):
    import ray_jobs.evaluate

    monkeypatch.setattr(ray_jobs.evaluate, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    with pytest.raises(MissingInput, match="no calibration named"):
        ray_jobs.evaluate.evaluate(str(checkpoint), str(tmp_path), str(tmp_path / "out"), calibration="nope")
    save_calibration(checkpoint, "mine", {"correction": {"kind": "none"}})
    with pytest.raises(InvalidInput, match="--attach"):
        ray_jobs.evaluate.evaluate(str(checkpoint), str(tmp_path), str(tmp_path / "out"), attach=True,
                                   calibration="mine")
