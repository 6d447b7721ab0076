"""Age-regression metrics: MAE, RMSE, CS@k, bias, and the same per age band or group."""

from __future__ import annotations

import numpy as np
import pandas as pd

from agecore.datasets import AGE_BAND_LABELS, age_band

CS_THRESHOLDS = (1, 3, 5, 10)


def summary(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Headline metrics of predicted against true ages (years).

    >>> m = summary(np.array([20.0, 30.0, 44.0]), np.array([21.0, 30.0, 40.0]))
    >>> m["mae"], m["bias"], m["cs@1"], m["cs@5"]
    (1.6667, 1.0, 0.6667, 1.0)
    """
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.size == 0:
        raise ValueError(f"need two equal, non-empty arrays; got {pred.shape} and {true.shape}")
    err = pred - true
    abs_err = np.abs(err)
    out = {
        "count": int(err.size),
        "mae": float(abs_err.mean()),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "median_ae": float(np.median(abs_err)),
        "bias": float(err.mean()),
    }
    for k in CS_THRESHOLDS:
        out[f"cs@{k}"] = float(np.mean(abs_err <= k))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def per_group(pred: np.ndarray, true: np.ndarray, groups: np.ndarray | pd.Series) -> pd.DataFrame:
    """MAE, bias and count for each group value (missing values are left out)."""
    df = pd.DataFrame({"group": np.asarray(groups), "err": np.asarray(pred, float) - np.asarray(true, float)})
    df = df.dropna(subset=["group"])
    g = df.groupby("group")["err"]
    return pd.DataFrame({"mae": g.apply(lambda e: e.abs().mean()), "bias": g.mean(), "count": g.size()})


def per_band(pred: np.ndarray, true: np.ndarray) -> pd.DataFrame:
    """``per_group`` over the age bands of the true age, every band listed (count 0 where empty).

    >>> per_band(np.array([5.0, 70.0]), np.array([4.0, 66.0])).loc[["3-9", "65+"], "mae"].tolist()
    [1.0, 4.0]
    """
    bands = np.asarray(AGE_BAND_LABELS)[age_band(true)]
    table = per_group(pred, true, bands).reindex(AGE_BAND_LABELS)
    table["count"] = table["count"].fillna(0).astype(int)
    table.index.name = "age_band"
    return table
