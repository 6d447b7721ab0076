"""What ``detect_faces=auto`` decides, what it costs, and what it does to the error.

    python benchmarks/crop_rule.py --checkpoint runs/faces/train/best \\
        --chips runs/faces/prepared --photos ../shared/data/fgnet-dev/manifest.csv [--limit N] [--tta|--no-tta]

``auto`` takes an image whose largest face is framed like the training crops as it is, and sends any
other image through face detection and alignment (``agecore.faces.is_face_crop``). On the prepared
set's held-out test chips and on a labelled photo manifest, one CPU thread, it reports:

* the share of each that ``auto`` takes the right way (chips as crops, photos through detection);
* MAE of ``auto`` beside the crop path on the chips (``detect_faces=false``), and beside
  detection on the photos (``detect_faces=true``); the goal is within 0.05 years of each;
* milliseconds an image for the rule (the padded detection and the decision) and for the model.

A chip or a photo where no face is found is counted and left out of the MAE of every path.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from agecore.faces import largest
from agecore.predictor import Predictor
from agecore.prepare import split_dir


def chips_of(prepared: str, limit: int | None) -> pd.DataFrame:
    """``path, age`` of the prepared set's test split (the original image files)."""
    table = pd.read_parquet(split_dir(prepared, "test"), columns=["path", "age"])
    return table.iloc[:limit] if limit else table


def photos_of(manifest: str, limit: int | None) -> pd.DataFrame:
    table = pd.read_csv(manifest)
    table["path"] = [str(Path(manifest).parent / p) for p in table["path"]]
    return table.iloc[:limit] if limit else table


def run(predictor: Predictor, table: pd.DataFrame, other: str) -> dict[str, float]:
    """``auto`` against ``other`` (false: the crop path; true: detection) on every image of ``table``."""
    auto, alt, as_crop, rule_s, model_s = [], [], [], 0.0, 0.0
    for path in table["path"]:
        photo = predictor.photo(path)
        start = time.perf_counter()
        faces, crops = predictor.face_crops(photo, "auto")
        rule_s += time.perf_counter() - start
        as_crop.append(bool(faces) and not largest(faces).aligned)
        if not faces:
            auto.append(np.nan)
            alt.append(np.nan)
            continue
        start = time.perf_counter()
        ages = predictor.predict_arrays(crops)
        model_s += time.perf_counter() - start
        auto.append(float(ages[faces.index(largest(faces))]))
        alt.append(predictor.predict(photo) if other == "false" else _largest_age(predictor, photo))
    auto, alt, true = np.array(auto), np.array(alt), table["age"].to_numpy(float)
    ok = ~np.isnan(auto) & ~np.isnan(alt)
    n = len(table)
    return {"images": n, "no_face": int(np.isnan(auto).sum()), "as_crop": float(np.mean(as_crop)),
            "mae_auto": float(np.abs(auto[ok] - true[ok]).mean()), f"mae_{other}": float(np.abs(alt[ok] - true[ok]).mean()),
            "rule_ms": 1000 * rule_s / n, "model_ms": 1000 * model_s / max(1, ok.sum())}


def _largest_age(predictor: Predictor, photo: Image.Image) -> float:
    """The age of the largest face that detection and alignment find, NaN where none."""
    faces, crops = predictor.face_crops(photo, "true")
    return float(predictor.predict_arrays(crops)[faces.index(largest(faces))]) if faces else np.nan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--chips", required=True, help="a prepared set (its test split is read)")
    p.add_argument("--photos", required=True, help="a manifest path,age of uncropped photos")
    p.add_argument("--limit", type=int, default=None, help="the first N of each (default: all)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average each face with its mirror image, or not (default: as the checkpoint was validated)")
    args = p.parse_args()
    torch.set_num_threads(1)
    predictor = Predictor(args.checkpoint, threads=1, tta_flip=args.tta)
    print(f"{args.checkpoint}: flip TTA {'on' if predictor.tta_flip else 'off'}, {predictor.precision}, one thread")
    chips = run(predictor, chips_of(args.chips, args.limit), "false")
    photos = run(predictor, photos_of(args.photos, args.limit), "true")
    print("| images | n | no face | taken the right way | MAE auto | MAE other path | rule ms | model ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| test chips (other: crop path) | {chips['images']} | {chips['no_face']} | {chips['as_crop']:.1%} | "
          f"{chips['mae_auto']:.3f} | {chips['mae_false']:.3f} | {chips['rule_ms']:.0f} | {chips['model_ms']:.0f} |")
    print(f"| photos (other: detection) | {photos['images']} | {photos['no_face']} | {1 - photos['as_crop']:.1%} | "
          f"{photos['mae_auto']:.3f} | {photos['mae_true']:.3f} | {photos['rule_ms']:.0f} | {photos['model_ms']:.0f} |")


if __name__ == "__main__":
    main()
