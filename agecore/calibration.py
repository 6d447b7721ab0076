"""Calibrate a model to your own labelled photos: a correction of its estimates, and the verification
margins re-measured after it, with every reported figure on people left out of the fit.

A model trained on one collection is often off on another (other cameras, scans, ages, people): its
estimates drift by a few years, and the likely ranges measured on its validation crops no longer hold
the share of true ages they were built for. ``fit_calibration`` learns a small monotone correction of
the estimate from labelled photos of the user's own people:

    none        the estimate as it is
    shift       estimate + c                                  (c: median error, least absolute deviation)
    linear      a * estimate + b                              (least absolute deviation)
    log-linear  exp(a * log(1 + estimate) + b) - 1            (linear in log-age: errors grow with age)
    isotonic    any increasing step curve (pool-adjacent-violators on medians), identity slope past its ends

The kind is chosen by person-grouped K-fold cross-validation: the lowest MAE on the people left
out. The chosen correction is then shrunk toward ``none`` by how uncertain it is (``shrinkage``: its
change of the estimates against the grouped-jackknife variance of that change), so that a correction
fitted on few people keeps only part of its change. The likely-range
quantiles and challenge ages (``agecore.evaluate.calibration``) are then measured on the corrected
out-of-fold estimates, with thin estimate bands pooled with their neighbours.

``cross_fit`` reports the whole procedure honestly: it fits it on k-1 groups of people, predicts the
people left out, and pools, so that no figure comes from a person the fit has seen.

    >>> rng = np.random.default_rng(0)
    >>> true = rng.uniform(1, 70, 400); raw = 1.2 * true + 3 + rng.normal(0, 2, 400)
    >>> cal = fit_calibration(true, raw, np.arange(400) // 8)
    >>> cal["correction"]["kind"], round(float(Correction.from_dict(cal["correction"]).apply(np.array([39.0]))[0]), 1)
    ('linear', 30.1)
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from PIL import Image

from agecore import metrics, plots
from agecore.config import MAX_AGE
from agecore.errors import InvalidInput
from agecore.evaluate import calibration as error_quantiles
from agecore.faces import NO_FACE, Face, largest
from agecore.images import ImageError, open_image
from agecore.metrics import AGE_BAND_LABELS, VERIFY_THRESHOLDS

if TYPE_CHECKING:
    from agecore.predictor import Predictor

log = logging.getLogger(__name__)

FORMAT = "agecore-calibration/1"
# simplest first: cross-validation keeps the lowest left-out MAE (choose_correction), the simpler kind on a tie
KINDS = ("none", "shift", "linear", "log-linear", "isotonic")
# Below these, cross-validation cannot tell a correction from noise (docs/calibration.md has the measurement)
MIN_PEOPLE = 10
MIN_PHOTOS = 100
# an estimate band with fewer photos has its quantiles measured with its neighbours' photos too
MIN_BAND_PHOTOS = 20
DEFAULT_FOLDS = 5
# a correction must keep an older-looking face older, or verification would turn upside down
MIN_SLOPE, MAX_SLOPE = 0.1, 10.0


# -- corrections -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Correction:
    """A fitted correction: ``kind`` (one of ``KINDS``), its ``params``, and ``shrink`` in [0, 1], the
    share of the change from the raw estimate that is applied.

    >>> Correction("linear", {"slope": 0.5, "intercept": 2.0}, shrink=0.5).apply(np.array([10.0, 20.0])).tolist()
    [8.5, 16.0]
    """

    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    shrink: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidInput(f"correction kind must be one of {KINDS}, got {self.kind!r}")
        if not 0.0 <= self.shrink <= 1.0:
            raise InvalidInput(f"shrink must be in [0, 1], got {self.shrink}")

    def apply(self, ages: np.ndarray) -> np.ndarray:
        """Corrected ages (float64) for raw estimates ``ages``."""
        ages = np.asarray(ages, dtype=np.float64)
        return ages + self.shrink * (_curve(self.kind, self.params, ages) - ages)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": self.params, "shrink": round(self.shrink, 4)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Correction:
        return cls(data["kind"], dict(data.get("params", {})), float(data.get("shrink", 1.0)))


def _curve(kind: str, p: dict[str, Any], ages: np.ndarray) -> np.ndarray:
    """The unshrunk correction of ``ages``, kept within the ages a label may have."""
    return np.clip(_unclipped(kind, p, ages), 0.0, MAX_AGE)


def _unclipped(kind: str, p: dict[str, Any], ages: np.ndarray) -> np.ndarray:
    if kind == "none":
        return ages.copy()
    if kind == "shift":
        return ages + p["offset"]
    if kind == "linear":
        return p["slope"] * ages + p["intercept"]
    if kind == "log-linear":
        # capped at the oldest label before exp: the same ages after the clip, without an overflow
        log_age = np.minimum(p["slope"] * np.log1p(np.maximum(ages, 0.0)) + p["intercept"], np.log1p(MAX_AGE))
        return np.expm1(log_age)
    x, y = np.asarray(p["x"], float), np.asarray(p["y"], float)
    # past its ends the step curve goes on at slope one: no clamping of ages it never saw
    return np.interp(ages, x, y) + np.minimum(ages - x[0], 0.0) + np.maximum(ages - x[-1], 0.0)


def lad_line(x: np.ndarray, y: np.ndarray, iterations: int = 200) -> tuple[float, float]:
    """Slope and intercept of the least-absolute-deviation line through ``(x, y)`` (iteratively
    reweighted least squares; robust to the few photos whose estimate is far off).

    >>> [round(v, 3) for v in lad_line(np.array([0.0, 1, 2, 3, 4]), np.array([1.0, 3, 5, 7, 100]))]
    [2.0, 1.0]
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    design = np.column_stack([x, np.ones_like(x)])
    beta = np.linalg.lstsq(design, y, rcond=None)[0]
    for _ in range(iterations):
        w = 1.0 / np.sqrt(np.maximum(np.abs(y - design @ beta), 1e-6))
        new = np.linalg.lstsq(design * w[:, None], y * w, rcond=None)[0]
        if np.allclose(new, beta, atol=1e-7):
            break
        beta = new
    return float(beta[0]), float(beta[1])


def isotonic_median(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Knots ``(x, y)`` of the increasing step curve closest to ``y`` in absolute deviation: pool
    adjacent violators, each block at the median of its ``y`` (and of its ``x``).

    >>> kx, ky = isotonic_median(np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4]))
    >>> kx.tolist(), ky.tolist()
    ([1.0, 2.5, 4.0], [1.0, 2.5, 4.0])
    """
    order = np.argsort(x, kind="stable")
    xs, ys = np.asarray(x, float)[order].tolist(), np.asarray(y, float)[order].tolist()
    # each block: its x values and its y values, the latter kept sorted so that a median is an index
    blocks: list[tuple[list[float], list[float]]] = []
    for xi, yi in zip(xs, ys, strict=True):
        blocks.append(([xi], [yi]))
        while len(blocks) > 1 and _median(blocks[-2][1]) > _median(blocks[-1][1]):
            last = blocks.pop()
            blocks[-1][0].extend(last[0])
            blocks[-1][1][:] = sorted(blocks[-1][1] + last[1])
    return np.array([float(np.median(b[0])) for b in blocks]), np.array([_median(b[1]) for b in blocks])


def _median(ordered: list[float]) -> float:
    n = len(ordered)
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


def fit_correction(kind: str, raw: np.ndarray, true: np.ndarray) -> Correction:
    """The correction of ``kind`` that takes ``raw`` estimates closest to ``true`` ages (absolute deviation)."""
    raw, true = np.asarray(raw, float), np.asarray(true, float)
    if kind == "none":
        return Correction("none")
    if kind == "shift" or np.ptp(raw) == 0:  # a line needs estimates that differ
        return Correction("shift", {"offset": round(float(np.median(true - raw)), 4)})
    if kind in ("linear", "log-linear"):
        to_log = np.log1p if kind == "log-linear" else (lambda v: v)
        slope, intercept = lad_line(to_log(np.maximum(raw, 0.0)), to_log(np.maximum(true, 0.0)))
        return Correction(kind, {"slope": round(float(np.clip(slope, MIN_SLOPE, MAX_SLOPE)), 5),
                                 "intercept": round(intercept, 5)})
    if kind == "isotonic":
        kx, ky = isotonic_median(raw, true)
        return Correction("isotonic", {"x": np.round(kx, 3).tolist(), "y": np.round(ky, 3).tolist()})
    raise InvalidInput(f"correction kind must be one of {KINDS}, got {kind!r}")


# -- photos: the largest face of each, and the model's raw estimate of it -----------------------------


def detect_photos(paths: Sequence[str], detect: Callable[[Image.Image], list[Face]],
                  no_face_message: Callable[[Image.Image], str]) -> pd.DataFrame:
    """One row per photo: ``path``, ``faces_found``, the largest face's ``box``, ``face_score`` and
    ``landmarks`` (ten numbers), and ``error`` ('' where a face was found; ``no_face: ...`` or the
    image's own error otherwise). Detections do not depend on the model: they can be kept and reused."""
    rows = []
    for i, path in enumerate(paths):
        row: dict[str, Any] = {"path": path, "faces_found": 0, "box": None, "face_score": np.nan,
                               "landmarks": None, "error": ""}
        try:
            photo = open_image(path)
            faces = detect(photo)
        except ImageError as e:
            rows.append({**row, "error": f"{e.reason}: {e.detail}"})
            continue
        if not faces:  # in a labelled photo, the largest face is the person the label is about
            row["error"] = f"{NO_FACE}: {no_face_message(photo)}"
        else:
            face = largest(faces)
            row.update(faces_found=len(faces), box=list(face.box), face_score=face.score,
                       landmarks=[v for point in face.landmarks for v in point])
        rows.append(row)
        if (i + 1) % 50 == 0:
            log.info("faces: %d / %d photos", i + 1, len(paths))
    return pd.DataFrame(rows, columns=["path", "faces_found", "box", "face_score", "landmarks", "error"])


def estimate_faces(predictor: Predictor, faces: pd.DataFrame, chunk: int = 64) -> np.ndarray:
    """The predictor's age of each detected face of ``detect_photos`` (NaN where the photo has none),
    through the photo rule of ``Predictor.predict_faces``: a face crop as it is, any other face aligned."""
    ages = np.full(len(faces), np.nan)
    found = np.flatnonzero(faces["error"].fillna("").to_numpy() == "")
    for start in range(0, len(found), chunk):
        rows = found[start:start + chunk]
        crops = [predictor.crops_of(open_image(faces["path"].iat[i]), [_face(faces.iloc[i])])[1][0] for i in rows]
        ages[rows] = predictor.predict_arrays(np.stack(crops))
    return ages


def _face(row: pd.Series) -> Face:
    points = np.asarray(row["landmarks"], float).reshape(5, 2)
    return Face(tuple(float(v) for v in row["box"]), float(row["face_score"]), tuple(map(tuple, points)))


# -- people: who is who, and folds that keep each person on one side -----------------------------


def person_rule(rule: str) -> Callable[[str], str]:
    """The person a file name shows, by ``prefix:N`` (its first N characters) or ``regex:PATTERN``
    (the first group of the pattern, else the whole match, searched in the file name).

    >>> person_rule("prefix:3")("002A03.JPG"), person_rule(r"regex:^(\\w+)_\\d+")("anna_12.jpg")
    ('002', 'anna')
    """
    kind, _, arg = rule.partition(":")
    if kind == "prefix" and arg.isdigit() and int(arg) > 0:
        return lambda name: name[: int(arg)]
    if kind == "regex" and arg:
        try:
            pattern = re.compile(arg)
        except re.error as e:
            raise InvalidInput(f"--person-from {rule}: not a regular expression ({e})") from e
        return lambda name: _match(pattern, name, rule)
    raise InvalidInput(f"--person-from {rule!r}: give prefix:N (the first N characters of the file name) or "
                       "regex:PATTERN (its first group names the person)")


def _match(pattern: re.Pattern[str], name: str, rule: str) -> str:
    m = pattern.search(name)
    if m is None:
        raise InvalidInput(f"--person-from {rule}: the file name {name!r} does not match")
    return m.group(1) if pattern.groups else m.group(0)


def people_of(paths: Sequence[str], rule: str) -> np.ndarray:
    """The person of each path by ``person_rule(rule)`` on its file name."""
    name_to_person = person_rule(rule)
    return np.array([name_to_person(PurePosixPath(str(p).replace("\\", "/")).name) for p in paths], dtype=object)


def grouped_folds(groups: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """The fold (0 .. k-1) of each row: every person in one fold only, folds as even in photos as can be.

    >>> grouped_folds(np.array(["a", "a", "b", "c", "c", "c"]), 2).tolist()
    [1, 1, 1, 0, 0, 0]
    """
    people, inverse, counts = np.unique(np.asarray(groups).astype(str), return_inverse=True, return_counts=True)
    if k < 2 or k > len(people):
        raise InvalidInput(f"{k} folds need between 2 and {len(people)} (the number of people) folds")
    shuffled = np.random.default_rng(seed).permutation(len(people))
    order = shuffled[np.argsort(-counts[shuffled], kind="stable")]  # largest first, ties in seeded order
    load, fold_of = np.zeros(k), np.empty(len(people), dtype=np.int64)
    for person in order:
        fold_of[person] = int(np.argmin(load))
        load[fold_of[person]] += counts[person]
    return fold_of[inverse]


def check_counts(photos: int, people: int, folds: int) -> None:
    """Refuse a set too small for cross-validation to tell a correction from noise."""
    if photos < MIN_PHOTOS or people < max(MIN_PEOPLE, folds):
        raise InvalidInput(
            f"calibration needs at least {MIN_PHOTOS} photos of at least {max(MIN_PEOPLE, folds)} people; got "
            f"{photos} photos of {people} people. Below that, cross-validation cannot tell a correction from "
            "noise (docs/calibration.md): add labelled photos of more people")


# -- choosing the correction -------------------------------------------------------------------------


def out_of_fold(kind: str, raw: np.ndarray, true: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Each row's estimate corrected by a ``kind`` correction fitted on the other folds."""
    out = np.empty(len(raw), dtype=np.float64)
    for f in np.unique(folds):
        left_out = folds == f
        out[left_out] = fit_correction(kind, raw[~left_out], true[~left_out]).apply(raw[left_out])
    return out


def clustered_se(diff: np.ndarray, groups: np.ndarray) -> float:
    """Standard error of the mean of ``diff`` with each person's photos as one cluster: the photos of
    one person share their errors, so they count for less than as many people.

    >>> round(clustered_se(np.array([1.0, 1.0, -1.0, -1.0]), np.array(["a", "a", "b", "b"])), 3)
    0.707
    """
    centred = pd.Series(np.asarray(diff, float) - np.mean(diff)).groupby(np.asarray(groups).astype(str)).sum()
    return float(np.sqrt(np.sum(centred.to_numpy() ** 2)) / len(diff))


def choose_correction(raw: np.ndarray, true: np.ndarray, groups: np.ndarray, folds: np.ndarray,
                      kinds: Sequence[str] = KINDS, within_se: float = 0.0) -> tuple[str, dict[str, Any]]:
    """The kind to fit and the cross-validation table behind the choice: the kind with the lowest
    left-out MAE, or with ``within_se`` the simplest within that many (person-clustered) standard
    errors of it. Small sets are guarded by ``shrinkage`` and the refusal below ``MIN_PEOPLE``."""
    abs_err = {k: np.abs(out_of_fold(k, raw, true, folds) - true) for k in kinds}
    mae = {k: float(e.mean()) for k, e in abs_err.items()}
    best = min(mae, key=mae.__getitem__)
    se = {k: clustered_se(abs_err[k] - abs_err[best], groups) for k in kinds}
    chosen = next(k for k in kinds if mae[k] - mae[best] <= within_se * se[k])
    rule = (f"simplest kind within {within_se:g} person-clustered standard error of the lowest left-out MAE"
            if within_se else "lowest left-out MAE")
    return chosen, {"rule": rule, "left_out_mae": {k: round(v, 4) for k, v in mae.items()},
                    "excess_se": {k: round(v, 4) for k, v in se.items()}}


def shrinkage(kind: str, raw: np.ndarray, true: np.ndarray, folds: np.ndarray) -> float:
    """How much of a ``kind`` correction to keep: ``c^2 / (c^2 + v)``, with ``c^2`` its mean squared
    change of the estimates and ``v`` the grouped-jackknife variance of that change over the folds'
    fits. A change well above its own noise is kept whole; an uncertain one (few people) shrinks."""
    fits = [fit_correction(kind, raw[folds != f], true[folds != f]).apply(raw) for f in np.unique(folds)]
    if kind == "none" or len(fits) < 2:
        return 1.0
    change = fit_correction(kind, raw, true).apply(raw) - raw
    variance = (len(fits) - 1) * np.mean(np.var(np.stack(fits), axis=0))
    size = float(np.mean(change**2))
    return size / (size + variance) if size > 0 else 1.0


def pooled_margins(true: np.ndarray, pred: np.ndarray, min_count: int = MIN_BAND_PHOTOS) -> dict[str, Any]:
    """``agecore.evaluate.calibration`` of ``pred``, with each estimate band of fewer than ``min_count``
    photos measured on it and its neighbouring bands together (``pooled_bands`` says which)."""
    true, pred = np.asarray(true, float), np.asarray(pred, float)
    cal = error_quantiles(true, pred)
    bands, last = metrics.estimate_band(pred), len(AGE_BAND_LABELS) - 1
    pooled: dict[str, Any] = {}
    for label, entry in list(cal["bands"].items()):
        if entry["count"] >= min_count:
            continue
        lo = hi = AGE_BAND_LABELS.index(label)
        while np.sum((bands >= lo) & (bands <= hi)) < min_count and (lo > 0 or hi < last):
            lo, hi = max(lo - 1, 0), min(hi + 1, last)
        near = (bands >= lo) & (bands <= hi)
        cal["bands"][label] = error_quantiles(true[near], pred[near])["overall"]
        pooled[label] = {"photos": entry["count"], "measured_on": f"{AGE_BAND_LABELS[lo]} to {AGE_BAND_LABELS[hi]}",
                         "count": int(near.sum())}
    cal["pooled_bands"] = pooled
    return cal


def fit_calibration(true: np.ndarray, raw: np.ndarray, groups: np.ndarray, folds: int = DEFAULT_FOLDS,
                    seed: int = 0, *, check: bool = True) -> dict[str, Any]:
    """The stored calibration: the chosen correction fitted on every photo given, and the likely-range
    quantiles and challenge ages of its out-of-fold corrected estimates (``check``: refuse small sets)."""
    true, raw, groups = np.asarray(true, float), np.asarray(raw, float), np.asarray(groups).astype(str)
    people = len(np.unique(groups))
    if check:
        check_counts(len(true), people, folds)
    fold = grouped_folds(groups, min(folds, people), seed)
    kind, selection = choose_correction(raw, true, groups, fold)
    shrink = shrinkage(kind, raw, true, fold)
    correction = Correction(kind, fit_correction(kind, raw, true).params, shrink)
    # margins from estimates whose correction never saw their person: those of a new photo
    held_out = raw + shrink * (out_of_fold(kind, raw, true, fold) - raw)
    return {"format": FORMAT, "correction": correction.to_dict(), "selection": selection,
            **pooled_margins(true, held_out), "photos": len(true), "people": people, "folds": int(fold.max() + 1)}


# -- honest figures: the whole procedure, fitted without the people it is measured on -----------------


@dataclass(frozen=True)
class Figures:
    """Estimates and the verdicts drawn from them, for one set of rows."""

    pred: np.ndarray
    low: np.ndarray
    high: np.ndarray
    verdicts: dict[float, np.ndarray]


def figures_of(pred: np.ndarray, cal: dict[str, Any] | None, margin: float) -> Figures:
    low, high = metrics.likely_range(pred, cal, margin)
    return Figures(pred, low, high, metrics.verdicts_by_threshold(pred, cal, margin, VERIFY_THRESHOLDS))


def cross_fit(true: np.ndarray, raw: np.ndarray, groups: np.ndarray, folds: int = DEFAULT_FOLDS, seed: int = 0,
              margin: float = 10.0) -> tuple[Figures, list[dict[str, Any]]]:
    """Each person's corrected estimates and verdicts from ``fit_calibration`` on the other folds' people,
    pooled; and what each fold's fit chose."""
    true, raw, groups = np.asarray(true, float), np.asarray(raw, float), np.asarray(groups).astype(str)
    fold = grouped_folds(groups, folds, seed + 1)  # other folds than the inner selection's
    pred, low, high = np.empty_like(raw), np.empty_like(raw), np.empty_like(raw)
    verdicts = {t: np.empty(len(raw), dtype=object) for t in VERIFY_THRESHOLDS}
    fits = []
    for f in range(folds):
        test = fold == f
        cal = fit_calibration(true[~test], raw[~test], groups[~test], folds, seed, check=False)
        fig = figures_of(Correction.from_dict(cal["correction"]).apply(raw[test]), cal, margin)
        pred[test], low[test], high[test] = fig.pred, fig.low, fig.high
        for t in VERIFY_THRESHOLDS:
            verdicts[t][test] = fig.verdicts[t]
        fits.append({"fold": f, "people_left_out": len(np.unique(groups[test])), "photos_left_out": int(test.sum()),
                     **cal["correction"]})
    return Figures(pred, low, high, verdicts), fits


def summarize(true: np.ndarray, fig: Figures) -> dict[str, Any]:
    """MAE, bias, per-band bias, likely-range coverage and verification rates of one set of figures."""
    band = metrics.per_band(fig.pred, true).reset_index()
    return {"metrics": metrics.summary(fig.pred, true),
            "per_age_band": [_band_row(row) for row in band.to_dict("records")],
            "coverage": metrics.coverage_of_ranges(true, fig.pred, fig.low, fig.high),
            "thresholds": metrics.rates_of_verdicts(true, fig.verdicts)}


def _band_row(row: dict[str, Any]) -> dict[str, Any]:
    def number(v: Any) -> float | None:
        return None if pd.isna(v) else round(float(v), 4)

    return {"age_band": row["age_band"], "mae": number(row["mae"]), "bias": number(row["bias"]),
            "count": int(row["count"])}


def before_after(true: np.ndarray, raw: np.ndarray, groups: np.ndarray, before: dict[str, Any] | None,
                 margin: float, folds: int = DEFAULT_FOLDS, seed: int = 0) -> tuple[dict[str, Any], np.ndarray]:
    """The report's figures without calibration (raw estimates, ``before``'s margins) and with it (cross-fitted),
    and the cross-fitted corrected estimates."""
    after, fits = cross_fit(true, raw, groups, folds, seed, margin)
    return {"before": summarize(true, figures_of(np.asarray(raw, float), before, margin)),
            "after": summarize(true, after), "fold_fits": fits}, after.pred


# -- the report --------------------------------------------------------------------------------------


def calibrate(table: pd.DataFrame, before: dict[str, Any] | None, margin: float, folds: int = DEFAULT_FOLDS,
              seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """The calibration to store and the report's figures, from ``table``: one row per usable photo with
    ``age`` (true), ``raw_age`` (the model's) and ``person``. ``before`` is the checkpoint's own
    calibration (None: ``estimate +/- margin``), which the raw estimates are reported with."""
    true, raw = table["age"].to_numpy(float), table["raw_age"].to_numpy(float)
    groups = table["person"].astype(str).to_numpy()
    cal = fit_calibration(true, raw, groups, folds, seed)
    figures, corrected = before_after(true, raw, groups, before, margin, folds, seed)
    figures["left_out_estimates"] = corrected
    return cal, figures


def write_report(out: Path, report: dict[str, Any], table: pd.DataFrame, cal: dict[str, Any]) -> None:
    """report.json, report.md and correction.png under ``out``."""
    raw, true = table["raw_age"].to_numpy(float), table["age"].to_numpy(float)
    grid = np.linspace(max(0.0, float(raw.min())), float(raw.max()), 200)
    correction = Correction.from_dict(cal["correction"])
    plots.correction_curve(raw, true, grid, correction.apply(grid), out / "correction.png",
                           f"Calibration {report['name']}: {correction.kind} (shrink {correction.shrink:.2f})")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_plain) + "\n")
    (out / "report.md").write_text(report_markdown(report))


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else float(value)


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{share:.1%}"


def _headline_md(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    rows = ["| | MAE | bias | CS@5 | inside the likely range (built for 90%) |", "|---|---:|---:|---:|---:|"]
    for label, fig in (("before (raw estimate, the checkpoint's margins)", before),
                       ("after (calibrated, people left out of the fit)", after)):
        m = fig["metrics"]
        rows.append(f"| {label} | {m['mae']:.2f} | {m['bias']:+.2f} | {m['cs5']:.1%} | "
                    f"{_pct(fig['coverage']['overall'])} |")
    return [*rows, ""]


def _bands_md(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    rows = ["| true age | photos | bias before | bias after | MAE before | MAE after |", "|---|---:|---:|---:|---:|---:|"]
    for b, a in zip(before["per_age_band"], after["per_age_band"], strict=True):
        if b["count"]:
            rows.append(f"| {b['age_band']} | {b['count']} | {b['bias']:+.2f} | {a['bias']:+.2f} | "
                        f"{b['mae']:.2f} | {a['mae']:.2f} |")
    return [*rows, ""]


def _verification_md(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    rows = ["| at least | accepted under it, before / after | of them 5 years under at most, before / after | "
            "rejected at or over it, before / after | uncertain, before / after |", "|---:|---|---|---|---|"]
    for b, a in zip(before["thresholds"], after["thresholds"], strict=True):
        rows.append(f"| {b['threshold']:g} | {_pct(b['false_positive_rate'])} / {_pct(a['false_positive_rate'])} "
                    f"(n={b['under']}) | {_pct(b['false_positive_rate_near'])} / "
                    f"{_pct(a['false_positive_rate_near'])} (n={b['near_under']}) | "
                    f"{_pct(b['false_negative_rate'])} / {_pct(a['false_negative_rate'])} (n={b['over']}) | "
                    f"{_pct(b['uncertain'])} / {_pct(a['uncertain'])} |")
    return [*rows, ""]


def _photos_md(report: dict[str, Any]) -> list[str]:
    p, g = report["photos"], report["grouping"]
    lines = [f"Data: `{report['data']}`. {p['listed']} photos listed; {p['used']} used "
             f"({p['bad_label']} with an unusable label, {p['unusable']} unreadable, {p['without_face']} without a "
             f"face{', listed in `estimates.csv`' if p['listed'] > p['used'] else ''}); largest face of each photo.",
             "", f"People: {g['people']} ({g['rule']}); {report['folds']} person-grouped folds."]
    if g.get("warning"):
        lines += ["", f"**Warning:** {g['warning']}"]
    return [*lines, ""]


def _params_md(correction: dict[str, Any]) -> str:
    params = correction["params"]
    if correction["kind"] == "isotonic":
        return f"{len(params['x'])} steps"
    return ", ".join(f"{k} {v:g}" for k, v in params.items()) or "no parameters"


def report_markdown(report: dict[str, Any]) -> str:
    """report.md: what was fitted, and before/after figures on people left out of each fit."""
    c, sel = report["correction"], report["selection"]
    before, after = report["before"], report["after"]
    cv = ", ".join(f"{k} {v:.2f}" for k, v in sel["left_out_mae"].items())
    parts = [f"# Calibration `{report['name']}`", "", *_photos_md(report),
             f"Correction stored in `{report['stored']}`: **{c['kind']}** ({_params_md(c)}), shrink "
             f"{c['shrink']:.2f}; chosen as the {sel['rule']} (left-out MAE by kind: {cv}).", "",
             "Every figure after calibration comes from people left out of its fit: the whole procedure "
             "(choice, fit, margins) is fitted on the other folds' people, and the folds are pooled.", "",
             *_headline_md(before, after), "## Bias per band of true age", "", *_bands_md(before, after),
             "## Age verification (`/v1/verify`)", "",
             f"Before: {report['before_margins']}. After: the margins re-measured on corrected estimates.", "",
             *_verification_md(before, after)]
    pooled = report.get("pooled_bands") or {}
    if pooled:
        parts += ["Estimate bands with fewer than "
                  f"{MIN_BAND_PHOTOS} photos have their margins measured with their neighbours: "
                  + "; ".join(f"{k} ({v['photos']} photos) on {v['measured_on']} ({v['count']})"
                              for k, v in pooled.items()) + ".", ""]
    return "\n".join([*parts, "![correction](correction.png)", ""])
