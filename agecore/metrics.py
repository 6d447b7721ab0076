"""Age-regression metrics: MAE, RMSE, CS@k, bias, and the same per age band or group; and the
age-verification verdicts of ``/v1/verify`` with their error rates.

Each metric has one key wherever it is stored (report JSON, CSV columns; split-prefixed in the
per-epoch rows of training, as ``val_mae``, ``val_cs5``): CS@k, the share of estimates within k
years, is ``cs{k}`` (``cs5``); "CS@5" is its label in tables and plots only.

A *calibration* is the dict that ``agecore.evaluate.calibration`` builds (and ``calibration.json``
holds): signed-error quantiles ``q0.05`` ... ``q0.95`` per band of the estimate, and ``overall``;
and ``challenge``: per whole minimum age, the estimate a face must exceed to be accepted
(``challenge_ages``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

# bands of age that every per-band table and the calibration use
AGE_BANDS = (0, 3, 10, 18, 25, 35, 45, 55, 65)
AGE_BAND_LABELS = ("0-2", "3-9", "10-17", "18-24", "25-34", "35-44", "45-54", "55-64", "65+")
CS_THRESHOLDS = (1, 3, 5, 10)
CS_HEADLINE = 5  # CS@5, the share within 5 years, is the one tracked per epoch (``val_cs5``)
# the age thresholds that age-assurance evaluations report (NIST FATE AEV; COPPA 13, 16, 18, 21, Challenge 25)
VERIFY_THRESHOLDS = (13, 16, 18, 21, 25)
# minors this many years under a threshold are the ones an estimator most often lets through
NEAR_THRESHOLD_YEARS = 5
# the likely range [estimate - q0.95, estimate - q0.05] is meant to hold this share of true ages
NOMINAL_COVERAGE = 0.9
# at most this share of the people NEAR_THRESHOLD_YEARS under a minimum age is to be accepted
CHALLENGE_SHARE = 0.05
CHALLENGE_MIN_AGES = range(8, 41)


def age_band(age: np.ndarray | pd.Series) -> np.ndarray:
    """Index into ``AGE_BAND_LABELS`` for each age.

    >>> age_band(np.array([0, 2.9, 3, 17, 18, 64, 65, 110])).tolist()
    [0, 0, 1, 2, 3, 7, 8, 8]
    """
    return np.searchsorted(np.asarray(AGE_BANDS), np.asarray(age, dtype=float), side="right") - 1


def summary(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Headline metrics of predicted against true ages (years).

    >>> m = summary(np.array([20.0, 30.0, 44.0]), np.array([21.0, 30.0, 40.0]))
    >>> m["mae"], m["bias"], m["cs1"], m["cs5"]
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
        out[f"cs{k}"] = float(np.mean(abs_err <= k))
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


def estimate_band(ages: np.ndarray) -> np.ndarray:
    """Index into ``AGE_BAND_LABELS`` of each *estimate*; a regression can go below zero, which is band 0-2.

    >>> estimate_band(np.array([-0.4, 2.0, 70.0])).tolist()
    [0, 0, 8]
    """
    return age_band(np.maximum(np.asarray(ages, dtype=float), 0.0))


def fallback_margin(val_mae: float | None) -> float:
    """The half-width of the likely range when a checkpoint has no calibration: twice its validation MAE
    (5 years where even that is unknown)."""
    return 2.0 * float(val_mae or 5.0)


def _band_quantiles(calibration: dict[str, Any] | None, band: int) -> dict[str, float] | None:
    """The quantiles of one estimate band, else the overall ones, else None."""
    cal = calibration or {}
    return cal.get("bands", {}).get(AGE_BAND_LABELS[band]) or cal.get("overall") or None


def likely_range(
    ages: np.ndarray, calibration: dict[str, Any] | None, margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)`` for each estimate: 90% of the validation faces whose estimate fell in the same band
    had a true age inside it; ``estimate +/- margin`` where no calibration is stored.

    >>> cal = {"bands": {"18-24": {"count": 50, "q0.05": -2.0, "q0.95": 3.0}}}
    >>> low, high = likely_range(np.array([20.0, 40.0]), cal, 4.0)
    >>> low.tolist(), high.tolist()
    ([17.0, 36.0], [22.0, 44.0])
    """
    ages = np.asarray(ages, dtype=float)
    low, high = ages - margin, ages + margin
    bands = estimate_band(ages)
    for band in np.unique(bands):
        q = _band_quantiles(calibration, int(band))
        if q:
            sel = bands == band
            low[sel] = ages[sel] - q["q0.95"]
            high[sel] = ages[sel] - q["q0.05"]
    return low, high


def challenge_ages(
    true: np.ndarray, pred: np.ndarray, min_ages: range = CHALLENGE_MIN_AGES, share: float = CHALLENGE_SHARE
) -> dict[str, Any]:
    """Per whole minimum age T: the estimate that at most ``share`` of the faces aged T-5 to T-1 exceed.

    Estimates regress towards the mean, so minors just under a threshold are over-estimated more
    often than the error quantiles of their estimate band show; a likely range alone lets about a
    fifth of 13-17-year-olds through at 18. ``/v1/verify`` accepts a face only where its estimate
    is above the challenge age of the threshold as well (the "Challenge 25" of age-assurance
    practice, measured). The rank is the conformal one, ``ceil((n + 1) (1 - share))``: None where
    fewer than ``1 / share - 1`` faces of the group were seen.

    >>> true = np.array([13.0] * 19 + [30.0]); pred = np.linspace(10.0, 28.0, 20)
    >>> c = challenge_ages(true, pred, range(18, 19))["by_min_age"]["18"]
    >>> c["count"], c["estimate"]
    (19, 27.05)
    """
    true, pred = np.asarray(true, dtype=float), np.asarray(pred, dtype=float)
    table = {}
    for t in min_ages:
        near = np.sort(pred[(true < t) & (true >= t - NEAR_THRESHOLD_YEARS)])
        rank = int(np.ceil((len(near) + 1) * (1 - share)))
        table[str(t)] = {"count": len(near), "estimate": round(float(near[rank - 1]), 2) if rank <= len(near) else None}
    return {"share": share, "years_under": NEAR_THRESHOLD_YEARS, "by_min_age": table}


def challenge_age(calibration: dict[str, Any] | None, min_age: float) -> float | None:
    """The estimate a face must exceed to be accepted at ``min_age`` (the next whole age's), or None where unknown."""
    entry = (calibration or {}).get("challenge", {}).get("by_min_age", {}).get(str(int(np.ceil(min_age))))
    return entry["estimate"] if entry else None


def verdicts(
    low: np.ndarray, high: np.ndarray, min_age: float, ages: np.ndarray | None = None, challenge: float | None = None
) -> np.ndarray:
    """'yes' where the whole likely range is at or over ``min_age`` (and the estimate over ``challenge``,
    where given), 'no' where all of the range is under, 'uncertain' otherwise.

    >>> verdicts(np.array([18.0, 10.0, 15.0]), np.array([25.0, 17.9, 20.0]), 18).tolist()
    ['yes', 'no', 'uncertain']
    >>> verdicts(np.array([18.0, 19.0]), np.array([25.0, 30.0]), 18, np.array([21.0, 24.0]), challenge=22.0).tolist()
    ['uncertain', 'yes']
    """
    low, high = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    accept = low >= min_age
    if challenge is not None:
        accept &= np.asarray(ages, dtype=float) > challenge
    return np.where(accept, "yes", np.where(high < min_age, "no", "uncertain"))


def verify_answer(age: float, min_age: float, calibration: dict[str, Any] | None, margin: float) -> dict[str, Any]:
    """Is the person at least ``min_age``? The answer of ``/v1/verify`` for one estimate.

    'uncertain' when the likely range (``likely_range``) reaches both sides of ``min_age``.

    >>> verify_answer(30.0, 18, None, 4.0)["verdict"]
    'yes'
    >>> verify_answer(19.0, 18, None, 4.0)["verdict"]
    'uncertain'
    """
    low, high = likely_range(np.array([age]), calibration, margin)
    challenge = challenge_age(calibration, min_age)
    verdict = str(verdicts(low, high, min_age, np.array([age]), challenge)[0])
    band = int(estimate_band(np.array([age]))[0])
    q = _band_quantiles(calibration, band)
    if q:
        source = f"validation errors of estimates in band {AGE_BAND_LABELS[band]} (n={q['count']})"
    else:
        source = "no calibration stored with the checkpoint: +/- twice the validation MAE"
    if challenge is not None:
        source += (f"; accepted only above {challenge:g}, which {CHALLENGE_SHARE:.0%} of validation faces aged "
                   f"{int(np.ceil(min_age)) - NEAR_THRESHOLD_YEARS}-{int(np.ceil(min_age)) - 1} exceeded")
    return {"verdict": verdict, "is_at_least_min_age": {"yes": True, "no": False}.get(verdict),
            "min_age": min_age, "age": round(age, 2), "likely_range": [round(float(low[0]), 1), round(float(high[0]), 1)],
            "challenge_age": challenge, "margin_source": source}


def _share(mask: np.ndarray, among: np.ndarray) -> float | None:
    """Share of ``among`` where ``mask`` holds, or None when ``among`` is empty."""
    n = int(among.sum())
    return round(float((mask & among).sum() / n), 4) if n else None


def verification_rates(
    true: np.ndarray,
    pred: np.ndarray,
    calibration: dict[str, Any] | None,
    margin: float,
    thresholds: tuple[float, ...] = VERIFY_THRESHOLDS,
) -> list[dict[str, Any]]:
    """Age-verification error rates per threshold, as NIST FATE AEV publishes them, for ``/v1/verify``'s verdicts.

    ``false_positive_rate``: share of people under the threshold that the verifier accepts ('yes');
    ``false_negative_rate``: share of those at or over it that it rejects ('no'); ``uncertain``: share of
    everyone it sends to another check, also given among those under (``uncertain_under``) and at or over
    (``uncertain_over``). ``false_positive_rate_near`` is the first rate for the ``NEAR_THRESHOLD_YEARS``
    just under the threshold (13-17 at 18). Shares are None where their group is empty.

    >>> r = verification_rates(np.array([10.0, 17, 30]), np.array([20.0, 17, 30]), None, 1.0, (18,))[0]
    >>> r["false_positive_rate"], r["false_negative_rate"], r["uncertain"]
    (0.5, 0.0, 0.3333)
    """
    return rates_of_verdicts(true, verdicts_by_threshold(pred, calibration, margin, thresholds))


def verdicts_by_threshold(
    pred: np.ndarray, calibration: dict[str, Any] | None, margin: float, thresholds: tuple[float, ...]
) -> dict[float, np.ndarray]:
    """``/v1/verify``'s verdict on each estimate at each threshold (``verdicts`` with the likely range and
    challenge age of ``calibration``)."""
    pred = np.asarray(pred, dtype=float)
    low, high = likely_range(pred, calibration, margin)
    return {t: verdicts(low, high, t, pred, challenge_age(calibration, t)) for t in thresholds}


def rates_of_verdicts(true: np.ndarray, verdicts_at: dict[float, np.ndarray]) -> list[dict[str, Any]]:
    """The rows of ``verification_rates`` from verdicts already drawn, one array per threshold.

    Verdicts drawn under several calibrations (one per cross-validation fold) pool into one table here.
    """
    true = np.asarray(true, dtype=float)
    rows = []
    for t, verdict in verdicts_at.items():
        under, over = true < t, true >= t
        near = under & (true >= t - NEAR_THRESHOLD_YEARS)
        yes, no, unsure = verdict == "yes", verdict == "no", verdict == "uncertain"
        rows.append({
            "threshold": t, "under": int(under.sum()), "over": int(over.sum()),
            "false_positive_rate": _share(yes, under), "false_negative_rate": _share(no, over),
            "uncertain": _share(unsure, np.ones_like(under)),
            "uncertain_under": _share(unsure, under), "uncertain_over": _share(unsure, over),
            "near_under": int(near.sum()), "false_positive_rate_near": _share(yes, near),
        })
    return rows


def range_coverage(
    true: np.ndarray, pred: np.ndarray, calibration: dict[str, Any] | None, margin: float
) -> dict[str, Any]:
    """Share of true ages inside the likely range (``NOMINAL_COVERAGE`` is what it is built for), overall
    and per age band, both of the estimate (the band whose quantiles drew the range) and of the true age.

    >>> c = range_coverage(np.array([20.0, 30, 70]), np.array([21.0, 36, 69]), None, 4.0)
    >>> c["overall"], c["per_band"][3]["by_estimate"], c["per_band"][4]["by_true_age"]
    (0.6667, 1.0, 0.0)
    """
    low, high = likely_range(np.asarray(pred, dtype=float), calibration, margin)
    return coverage_of_ranges(true, pred, low, high)


def coverage_of_ranges(true: np.ndarray, pred: np.ndarray, low: np.ndarray, high: np.ndarray) -> dict[str, Any]:
    """``range_coverage`` of likely ranges already drawn (``low``, ``high``), as for pooled folds."""
    true, pred = np.asarray(true, dtype=float), np.asarray(pred, dtype=float)
    inside = (low <= true) & (true <= high)
    by_estimate, by_true = estimate_band(pred), age_band(true)
    rows = []
    for i, label in enumerate(AGE_BAND_LABELS):
        rows.append({"age_band": label, "by_estimate": _share(inside, by_estimate == i),
                     "count_by_estimate": int((by_estimate == i).sum()),
                     "by_true_age": _share(inside, by_true == i), "count_by_true_age": int((by_true == i).sum())})
    return {"nominal": NOMINAL_COVERAGE, "overall": _share(inside, np.ones_like(inside)), "per_band": rows}
