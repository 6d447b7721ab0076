"""The evaluation report of a prediction table, and the error calibration stored beside a checkpoint.

A prediction table has ``path``, ``age`` (true), ``predicted_age`` and ``error`` ('' where the
image was scored), plus ``gender``/``race`` where the data carry them.

Every report carries the age-verification error rates of ``/v1/verify`` (``agecore.metrics``) and
says which calibration drew them: one measured on a validation split, never on the test split it
reports.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agecore import metrics, plots, storage
from agecore.checkpoint import CALIBRATION, attach_calibration, read_calibration
from agecore.faces import NO_FACE
from agecore.images import load_image
from agecore.metrics import AGE_BAND_LABELS

GENDERS = {0: "male", 1: "female"}
RACES = {0: "White", 1: "Black", 2: "Asian", 3: "Indian", 4: "Others"}
QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(table.reset_index().to_json(orient="records", double_precision=4))


def calibration(true: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Quantiles of the signed error (predicted - true) per band of the *predicted* age, and the
    challenge age of each minimum age (``metrics.challenge_ages``).

    Serving knows only the prediction, so the bands are taken on it: "for estimates in 18-24,
    95% of true ages were above estimate - q95".

    >>> cal = calibration(np.array([20.0, 22, 24, 30]), np.array([21.0, 23, 25, 33]))
    >>> cal["bands"]["18-24"]["count"], cal["bands"]["18-24"]["q0.5"], cal["bands"]["25-34"]["count"]
    (2, 1.0, 2)
    """
    err = np.asarray(pred, float) - np.asarray(true, float)
    bands = metrics.estimate_band(pred)
    out: dict[str, Any] = {"quantiles": list(QUANTILES), "bands": {}, "overall": {}}
    for q in QUANTILES:
        out["overall"][f"q{q}"] = round(float(np.quantile(err, q)), 3)
    out["overall"]["count"] = int(err.size)
    for i, label in enumerate(AGE_BAND_LABELS):
        e = err[bands == i]
        if e.size:
            out["bands"][label] = {"count": int(e.size), **{f"q{q}": round(float(np.quantile(e, q)), 3) for q in QUANTILES}}
    out["challenge"] = metrics.challenge_ages(true, pred)
    return out


def _scored(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["error"].fillna("") == ""]


def _calibration_of(table: pd.DataFrame) -> dict[str, Any]:
    scored = _scored(table)
    return calibration(scored["age"].to_numpy(float), scored["predicted_age"].to_numpy(float))


def choose_calibration(
    checkpoint: str | Path,
    data: str,
    split: str | None,
    table: pd.DataFrame,
    validation: Callable[[], pd.DataFrame] | None,
    attach: bool = False,
) -> tuple[dict[str, Any] | None, str]:
    """The calibration that a report on ``table`` (``split`` of ``data``) uses, and a sentence saying which.

    ``split`` is None and ``validation`` None where ``data`` is not a prepared set; ``validation``
    returns the predictions on its validation split and is called only when they are needed. With
    ``attach`` the calibration is measured (on the validation split where there is one, else on
    ``table`` itself) and stored beside the checkpoint. Without it, the stored one is used, as
    ``/v1/verify`` would, unless it was measured on the test split being reported: then, or where
    none is stored, one is measured on the validation split for this report only.
    """
    if attach:
        cal = _measure_and_attach(checkpoint, data, table, validation)
        note = f"measured on {cal['source']} and attached to the checkpoint ({CALIBRATION})"
    elif (stored := read_calibration(checkpoint)) is not None and not (split == "test" and
                                                                      _measured_on(stored, data, "test")):
        cal, note = stored, f"the checkpoint's {CALIBRATION}, measured on {stored.get('source', 'an unrecorded set')}"
    elif validation is not None:
        reason = "the stored one was measured on this test split" if stored else "none is stored with the checkpoint"
        cal = {"data": storage.absolute(data), "split": "val", **_calibration_of(validation())}
        note = f"measured on the validation split of {data} for this report ({reason}; --attach stores one)"
    else:
        return None, "none stored with the checkpoint: estimate +/- twice its validation MAE, as /v1/verify answers"
    return cal, note + (" (the reported images themselves: in-sample)" if _measured_on(cal, data, split) else "")


def _measured_on(cal: dict[str, Any], data: str, split: str | None) -> bool:
    return cal.get("data") == storage.absolute(data) and cal.get("split") == split


def _measure_and_attach(
    checkpoint: str | Path, data: str, table: pd.DataFrame, validation: Callable[[], pd.DataFrame] | None
) -> dict[str, Any]:
    """Calibrate on the validation split, or on ``table`` where ``data`` has none, and store it."""
    split = None if validation is None else "val"
    source = f"{data} ({split})" if split else f"{data} (every image)"
    cal = _calibration_of(table if validation is None else validation())
    attach_calibration(checkpoint, cal, source, data=data, split=split)
    return {"source": source, "data": storage.absolute(data), "split": split, **cal}


def _thumbnail(path: str, size: int = 128) -> np.ndarray:
    try:
        return load_image(path, size)
    except Exception:  # a report must not fail on one image it can no longer read
        return np.full((size, size, 3), 200, np.uint8)


def verification(
    true: np.ndarray, pred: np.ndarray, cal: dict[str, Any] | None, margin: float, note: str
) -> dict[str, Any]:
    """The report's age-verification section: error rates per threshold and the likely range's coverage."""
    return {"calibration": note, **({} if cal else {"margin_years": margin}),
            "thresholds": metrics.verification_rates(true, pred, cal, margin),
            "coverage": metrics.range_coverage(true, pred, cal, margin)}


def build_report(
    table: pd.DataFrame,
    out: str | Path,
    meta: dict[str, Any] | None = None,
    worst: int = 18,
    *,
    split: str | None = None,
    calibration: dict[str, Any] | None = None,
    calibration_note: str = "none given: estimate +/- twice the validation MAE, as /v1/verify answers without one",
) -> dict:
    """report.json, report.md, scatter.png, error_by_age.png, worst.png under ``out``.

    ``split`` names the prepared split that ``table`` holds (None: data that are not a prepared set);
    ``calibration`` (as ``choose_calibration`` returns it, with its note) draws the verification figures.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scored = _scored(table)
    failed = table[table["error"].fillna("") != ""]
    if scored.empty:
        raise ValueError(f"no image could be scored ({len(failed)} failed); first error: {failed['error'].iloc[0]}")
    true, pred = scored["age"].to_numpy(float), scored["predicted_age"].to_numpy(float)
    margin = metrics.fallback_margin((meta or {}).get("metrics", {}).get("val_mae"))
    report: dict[str, Any] = {
        "split": split,
        "rows": len(table),
        "scored": len(scored),
        "unscored": len(failed),
        "unscored_by_reason": failed["error"].astype(str).str.split(":").str[0].value_counts().to_dict(),
        "metrics": metrics.summary(pred, true),
        "per_age_band": _records(metrics.per_band(pred, true)),
        "verification": verification(true, pred, calibration, margin, calibration_note),
    }
    for col, names in (("gender", GENDERS), ("race", RACES)):
        if col in scored and scored[col].notna().any():
            groups = scored[col].map(lambda v, n=names: n.get(int(v), str(v)) if pd.notna(v) else None)
            report[f"per_{col}"] = _records(metrics.per_group(pred, true, groups))
    if "faces_found" in table:  # photos through face detection (evaluate --detect-faces)
        report["faces"] = face_summary(table, out)
    if meta:
        report["checkpoint"] = {"backbone": meta["model"]["backbone"], "epoch": meta.get("epoch"),
                                "val_mae": meta.get("metrics", {}).get("val_mae")}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _plots(scored, true, pred, out, worst)
    (out / "report.md").write_text(_markdown(report))
    return report


def _plots(scored: pd.DataFrame, true: np.ndarray, pred: np.ndarray, out: Path, worst: int) -> None:
    """scatter.png, error_by_age.png, and worst.png: the ``worst`` largest errors with their faces."""
    plots.predicted_vs_true(true, pred, out / "scatter.png")
    plots.error_by_age(true, pred, out / "error_by_age.png")
    rows = scored.iloc[np.argsort(-np.abs(pred - true))[:worst]]
    plots.image_grid([_thumbnail(p) for p in rows["path"]],
                     [f"true {t:g} / pred {p:.1f}" for t, p in zip(rows["age"], rows["predicted_age"], strict=True)],
                     out / "worst.png", "Largest errors")


NO_FACE_CSV = "no_face.csv"


def face_summary(table: pd.DataFrame, out: Path, listed: int = 50) -> dict[str, Any]:
    """How many photos had a face, and which had none (all of them in ``no_face.csv``, never dropped).

    ``table`` has one row per photo with ``faces_found``: the most confident face is the one scored.
    """
    no_face = table[table["error"].fillna("").str.startswith(f"{NO_FACE}:")]
    no_face[["path", "age", "error"]].to_csv(out / NO_FACE_CSV, index=False)
    return {
        "rule": "one face per photo: the most confident detection, aligned like the training crops",
        "photos": len(table),
        "with_face": int((table["faces_found"] > 0).sum()),
        "with_several_faces": int((table["faces_found"] > 1).sum()),
        "without_face": len(no_face),
        "without_face_listed": no_face["path"].head(listed).tolist(),
        "without_face_csv": NO_FACE_CSV,
    }


def _faces_md(faces: dict[str, Any]) -> list[str]:
    lines = ["## Faces", "", f"{faces['rule']}. {faces['with_face']} of {faces['photos']} photos had a face "
             f"({faces['with_several_faces']} several); {faces['without_face']} had none"
             + (f" (all in `{faces['without_face_csv']}`):" if faces["without_face"] else "."), ""]
    lines += [f"- {path}" for path in faces["without_face_listed"]]
    if faces["without_face"] > len(faces["without_face_listed"]):
        lines.append(f"- ... and {faces['without_face'] - len(faces['without_face_listed'])} more")
    return [*lines, ""]


def _table_md(rows: list[dict[str, Any]], first: str) -> str:
    lines = [f"| {first} | MAE | bias | count |", "|---|---:|---:|---:|"]
    for r in rows:
        mae = "-" if r["mae"] is None else f"{r['mae']:.2f}"
        bias = "-" if r["bias"] is None else f"{r['bias']:+.2f}"
        lines.append(f"| {r[next(iter(r))]} | {mae} | {bias} | {int(r['count'])} |")
    return "\n".join(lines)


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{share:.1%}"


def _verification_md(v: dict[str, Any]) -> list[str]:
    lines = [
        "## Age verification (`/v1/verify`)", "",
        f"Calibration: {v['calibration']}.", "",
        "False positive rate: share of people under the threshold whom the verifier accepts; false negative "
        "rate: share of those at or over it whom it rejects; uncertain: share it sends to another check.", "",
        f"| threshold | under | false positive rate | the same, {metrics.NEAR_THRESHOLD_YEARS} years under at most "
        "(13-17 at 18) | at or over | false negative rate | uncertain (under / over) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in v["thresholds"]:
        lines.append(f"| {r['threshold']:g} | {r['under']} | {_pct(r['false_positive_rate'])} | "
                     f"{_pct(r['false_positive_rate_near'])} (n={r['near_under']}) | {r['over']} | "
                     f"{_pct(r['false_negative_rate'])} | {_pct(r['uncertain'])} "
                     f"({_pct(r['uncertain_under'])} / {_pct(r['uncertain_over'])}) |")
    c = v["coverage"]
    lines += ["", f"Share of true ages inside the likely range: {_pct(c['overall'])} (built for "
              f"{c['nominal']:.0%}).", "",
              "| age band | estimate in the band | count | true age in the band | count |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['age_band']} | {_pct(r['by_estimate'])} | {r['count_by_estimate']} | "
              f"{_pct(r['by_true_age'])} | {r['count_by_true_age']} |" for r in c["per_band"]]
    return [*lines, ""]


def _markdown(report: dict[str, Any]) -> str:
    m = report["metrics"]
    split = report.get("split")
    parts = [
        "# Evaluation report",
        "",
        (f"Split: {split}" + (" (held out: never read by training, early stopping, tuning or calibration)."
                              if split == "test" else ".") if split
         else "Data: not a prepared set (every labelled image given)."),
        "",
        f"{report['scored']} of {report['rows']} images scored"
        + (f"; {report['unscored']} could not be read: {report['unscored_by_reason']}" if report["unscored"] else "."),
        "",
        "| MAE | RMSE | median AE | bias | CS@1 | CS@3 | CS@5 | CS@10 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {m['mae']:.2f} | {m['rmse']:.2f} | {m['median_ae']:.2f} | {m['bias']:+.2f} | {m['cs1']:.1%} | "
        f"{m['cs3']:.1%} | {m['cs5']:.1%} | {m['cs10']:.1%} |",
        "",
        "## Per age band (true age)",
        "",
        _table_md(report["per_age_band"], "age band"),
        "",
    ]
    for key, title in (("per_gender", "gender"), ("per_race", "race")):
        if key in report:
            parts += [f"## Per {title}", "", _table_md(report[key], title), ""]
    if "faces" in report:
        parts += _faces_md(report["faces"])
    parts += _verification_md(report["verification"])
    parts += ["![scatter](scatter.png)", "![error by age](error_by_age.png)", "![worst](worst.png)", ""]
    return "\n".join(parts)
