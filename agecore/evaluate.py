"""The evaluation report of a prediction table, and the error calibration stored beside a checkpoint.

A prediction table has ``path``, ``age`` (true), ``predicted_age`` and ``error`` ('' where the
image was scored), plus ``gender``/``race`` where the data carry them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agecore import metrics, plots, storage
from agecore.checkpoint import CALIBRATION
from agecore.datasets import AGE_BAND_LABELS, age_band
from agecore.images import decode, read_bytes, resize_square

GENDERS = {0: "male", 1: "female"}
RACES = {0: "White", 1: "Black", 2: "Asian", 3: "Indian", 4: "Others"}
QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(table.reset_index().to_json(orient="records", double_precision=4))


def calibration(true: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Quantiles of the signed error (predicted - true) per band of the *predicted* age.

    Serving knows only the prediction, so the bands are taken on it: "for estimates in 18-24,
    95% of true ages were above estimate - q95".

    >>> cal = calibration(np.array([20.0, 22, 24, 30]), np.array([21.0, 23, 25, 33]))
    >>> cal["bands"]["18-24"]["count"], cal["bands"]["18-24"]["q0.5"], cal["bands"]["25-34"]["count"]
    (2, 1.0, 2)
    """
    err = np.asarray(pred, float) - np.asarray(true, float)
    bands = age_band(pred)
    out: dict[str, Any] = {"quantiles": list(QUANTILES), "bands": {}, "overall": {}}
    for q in QUANTILES:
        out["overall"][f"q{q}"] = round(float(np.quantile(err, q)), 3)
    out["overall"]["count"] = int(err.size)
    for i, label in enumerate(AGE_BAND_LABELS):
        e = err[bands == i]
        if e.size:
            out["bands"][label] = {"count": int(e.size), **{f"q{q}": round(float(np.quantile(e, q)), 3) for q in QUANTILES}}
    return out


def attach_calibration(checkpoint: str | Path, cal: dict[str, Any], source: str) -> str:
    path = storage.join(checkpoint, CALIBRATION)
    storage.write_text(path, json.dumps({"source": source, **cal}, indent=2) + "\n")
    return path


def _thumbnail(path: str, size: int = 128) -> np.ndarray:
    try:
        return resize_square(decode(read_bytes(path)), size)
    except Exception:  # a report must not fail on one image it can no longer read
        return np.full((size, size, 3), 200, np.uint8)


def build_report(table: pd.DataFrame, out: str | Path, meta: dict[str, Any] | None = None, worst: int = 18) -> dict:
    """report.json, report.md, scatter.png, error_by_age.png, worst.png under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scored = table[table["error"].fillna("") == ""]
    failed = table[table["error"].fillna("") != ""]
    if scored.empty:
        raise ValueError(f"no image could be scored ({len(failed)} failed); first error: {failed['error'].iloc[0]}")
    true, pred = scored["age"].to_numpy(float), scored["predicted_age"].to_numpy(float)
    report: dict[str, Any] = {
        "rows": len(table),
        "scored": len(scored),
        "unscored": len(failed),
        "unscored_by_reason": failed["error"].astype(str).str.split(":").str[0].value_counts().to_dict(),
        "metrics": metrics.summary(pred, true),
        "per_age_band": _records(metrics.per_band(pred, true)),
    }
    for col, names in (("gender", GENDERS), ("race", RACES)):
        if col in scored and scored[col].notna().any():
            groups = scored[col].map(lambda v, n=names: n.get(int(v), str(v)) if pd.notna(v) else None)
            report[f"per_{col}"] = _records(metrics.per_group(pred, true, groups))
    if meta:
        report["checkpoint"] = {"backbone": meta["model"]["backbone"], "epoch": meta.get("epoch"),
                                "train_val_mae": meta.get("metrics", {}).get("val_mae")}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plots.predicted_vs_true(true, pred, out / "scatter.png")
    plots.error_by_age(true, pred, out / "error_by_age.png")
    order = np.argsort(-np.abs(pred - true))[:worst]
    rows = scored.iloc[order]
    plots.image_grid([_thumbnail(p) for p in rows["path"]],
                     [f"true {t:g} / pred {p:.1f}" for t, p in zip(rows["age"], rows["predicted_age"], strict=True)],
                     out / "worst.png", "Largest errors")
    (out / "report.md").write_text(_markdown(report))
    return report


def _table_md(rows: list[dict[str, Any]], first: str) -> str:
    lines = [f"| {first} | MAE | bias | count |", "|---|---:|---:|---:|"]
    for r in rows:
        mae = "-" if r["mae"] is None else f"{r['mae']:.2f}"
        bias = "-" if r["bias"] is None else f"{r['bias']:+.2f}"
        lines.append(f"| {r[next(iter(r))]} | {mae} | {bias} | {int(r['count'])} |")
    return "\n".join(lines)


def _markdown(report: dict[str, Any]) -> str:
    m = report["metrics"]
    parts = [
        "# Evaluation report",
        "",
        f"{report['scored']} of {report['rows']} images scored"
        + (f"; {report['unscored']} could not be read: {report['unscored_by_reason']}" if report["unscored"] else "."),
        "",
        "| MAE | RMSE | median AE | bias | CS@1 | CS@3 | CS@5 | CS@10 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {m['mae']:.2f} | {m['rmse']:.2f} | {m['median_ae']:.2f} | {m['bias']:+.2f} | {m['cs@1']:.1%} | "
        f"{m['cs@3']:.1%} | {m['cs@5']:.1%} | {m['cs@10']:.1%} |",
        "",
        "## Per age band (true age)",
        "",
        _table_md(report["per_age_band"], "age band"),
        "",
    ]
    for key, title in (("per_gender", "gender"), ("per_race", "race")):
        if key in report:
            parts += [f"## Per {title}", "", _table_md(report[key], title), ""]
    parts += ["![scatter](scatter.png)", "![error by age](error_by_age.png)", "![worst](worst.png)", ""]
    return "\n".join(parts)
