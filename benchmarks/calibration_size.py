"""How many people a calibration needs before it helps: fit on n people, measure on people never used.

    python benchmarks/calibration_size.py --estimates runs/calibrate-fgnet/estimates.csv \\
        [--sizes 3 5 8 10 12 15 20] [--held-out 20] [--draws 30] [--out runs/calibration_size.json]

``--estimates`` is the ``estimates.csv`` that ``age calibrate`` writes (``age``, ``person``, ``raw_age``,
one row per photo). Each draw shuffles the people, keeps ``--held-out`` of them aside, and fits
``agecore.calibration.fit_calibration`` (cross-validated choice and shrink, without the size check) on
the first n of the others. Per n: the photos fitted on, the mean change of MAE and of |bias| on the
held-out people against the raw estimates (mean and worst draw), and the share of draws where the
calibration made the held-out MAE worse. Below some n, the cross-validated choice fitted on so few
people sometimes does worse than the raw estimates for new people: the smallest n whose
calibration lowered the held-out MAE in every draw is the floor that
``agecore.calibration.MIN_PEOPLE`` keeps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from agecore.calibration import Correction, fit_calibration


def one_draw(table: pd.DataFrame, people: np.ndarray, n: int, held_out: int) -> dict[str, float]:
    """Fit on the first ``n`` of ``people`` (after the last ``held_out``), measure on the last ``held_out``."""
    test = table["person"].isin(people[-held_out:]).to_numpy()
    fit = table["person"].isin(people[:n]).to_numpy()
    true, raw = table["age"].to_numpy(float), table["raw_age"].to_numpy(float)
    cal = fit_calibration(true[fit], raw[fit], table["person"].to_numpy()[fit], folds=min(5, n), check=False)
    corrected = Correction.from_dict(cal["correction"]).apply(raw[test])
    raw_mae, mae = np.mean(np.abs(raw[test] - true[test])), np.mean(np.abs(corrected - true[test]))
    return {"photos": int(fit.sum()), "mae_change": mae - raw_mae,
            "abs_bias_change": abs(np.mean(corrected - true[test])) - abs(np.mean(raw[test] - true[test])),
            "kind": cal["correction"]["kind"], "shrink": cal["correction"]["shrink"]}


def measure(table: pd.DataFrame, sizes: list[int], held_out: int, draws: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    everyone = np.array(sorted(table["person"].unique()))
    orders = [rng.permutation(everyone) for _ in range(draws)]
    rows = []
    for n in sizes:
        results = pd.DataFrame([one_draw(table, order, n, held_out) for order in orders])
        rows.append({"people": n, "photos_mean": round(results["photos"].mean(), 1),
                     "mae_change_mean": round(results["mae_change"].mean(), 3),
                     "mae_change_worst": round(results["mae_change"].max(), 3),
                     "abs_bias_change_mean": round(results["abs_bias_change"].mean(), 3),
                     "share_worse": round(float((results["mae_change"] > 0).mean()), 3),
                     "kinds": results["kind"].value_counts().to_dict(),
                     "shrink_mean": round(results["shrink"].mean(), 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--estimates", required=True, help="estimates.csv of age calibrate")
    p.add_argument("--sizes", type=int, nargs="+", default=[3, 5, 8, 10, 12, 15, 20])
    p.add_argument("--held-out", type=int, default=20, help="people kept aside in each draw")
    p.add_argument("--draws", type=int, default=30)
    p.add_argument("--out", default=None, help="JSON file for the table")
    args = p.parse_args()
    table = pd.read_csv(args.estimates, dtype={"person": str})
    table = table[table["raw_age"].notna()]  # photos without a face have no estimate
    rows = measure(table, args.sizes, args.held_out, args.draws)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
