"""``age predict PHOTO...``: the age of every face in a few photos, printed here, without starting Ray.

    age predict --checkpoint runs/faces/train/best photo.jpg group.png
    age predict --checkpoint runs/faces/train/best selfie.jpg --min-age 18 --draw runs/drawn
    age predict --checkpoint runs/faces/train/best selfie.jpg --json

Each face gets a line: the file, the face's box (x1,y1,x2,y2 in pixels), its age, its likely range
and, with ``--min-age``, the verdict of ``/v1/verify``. ``--json`` prints the answers of the HTTP API
instead, one JSON object a photo. A photo the decoder refuses is reported on its own line and the
others still answer; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from agecore.checkpoint import read_calibration
from agecore.config import DETECT_FACES, PRECISION_HELP, PRECISIONS
from agecore.errors import InvalidInput
from agecore.faces import require_mtcnn
from agecore.images import ImageError
from agecore.metrics import fallback_margin, likely_range, verify_answer
from agecore.predictor import Predictor


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="age predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("photos", nargs="+", help="image files: any photo, or face crops")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or URI (a training run's best/)")
    p.add_argument("--min-age", type=float, default=None, help="also answer: is each person at least this old?")
    p.add_argument("--detect-faces", choices=DETECT_FACES, default="auto", help=(
        "auto: a face crop framed like the training crops is used as it is, any other photo has its faces found "
        "and aligned; true: always find faces; false: each image is a face crop (default: %(default)s)"))
    p.add_argument("--draw", default=None, metavar="DIR", help="write each photo with its boxes and ages into DIR")
    p.add_argument("--json", action="store_true", help="print the HTTP API's answer for each photo instead")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help=PRECISION_HELP)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return p


class Answerer:
    """What ``/v1/age`` and ``/v1/verify`` answer for one photo, from the library alone."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.calibration = read_calibration(predictor.checkpoint)
        self.margin = fallback_margin(predictor.meta.get("metrics", {}).get("val_mae"))

    def face(self, found: dict[str, Any], min_age: float | None) -> dict[str, Any]:
        if min_age is not None:
            verdict = verify_answer(found["age"], min_age, self.calibration, self.margin)
            return {**found, **{k: v for k, v in verdict.items() if k != "min_age"}}
        low, high = likely_range(np.array([found["age"]]), self.calibration, self.margin)
        return {**found, "age": round(found["age"], 2), "likely_range": [round(float(low[0]), 1), round(float(high[0]), 1)]}

    def photo(self, path: str, min_age: float | None, detect_faces: str) -> tuple[dict[str, Any], Image.Image]:
        """The answer for the photo at ``path``, and the photo (decoded once, for drawing)."""
        start = time.perf_counter()
        photo = self.predictor.photo(path)
        faces = [self.face(f, min_age) for f in self.predictor.predict_faces(photo, detect_faces)]
        main = max(faces, key=lambda f: (f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]), default=None)
        answer: dict[str, Any] = {"path": path}
        if min_age is not None:
            answer.update(min_age=min_age, verdict=main and main["verdict"])
        else:
            answer.update(age=main and main["age"], likely_range=main and main["likely_range"])
        message = None if faces else self.predictor.no_face_message(photo)
        return {**answer, "faces": faces, "message": message, "seconds": round(time.perf_counter() - start, 4)}, photo


def face_line(path: str, i: int, count: int, face: dict[str, Any]) -> str:
    """One face as a line a person reads."""
    box = ",".join(f"{v:.0f}" for v in face["box"])
    low, high = face["likely_range"]
    line = f"{path}  face {i}/{count}  box {box}  age {face['age']:.1f}  likely {low:g}-{high:g}"
    if "verdict" in face:
        line += f"  verdict {face['verdict']}"
    return line + ("" if face["aligned"] else "  (as a face crop)")


def predict(photos: list[str], checkpoint: str, min_age: float | None = None, detect_faces: str = "auto",
            draw: str | None = None, as_json: bool = False, precision: str | None = None,
            threads: int | None = None) -> int:
    """Print the faces of each photo; returns how many photos could not be read."""
    if min_age is not None and not 1 <= min_age <= 100:
        raise InvalidInput(f"--min-age must be in [1, 100], got {min_age:g}")
    if detect_faces != "false":
        require_mtcnn()  # a missing detector is said before the model loads
    answerer = Answerer(Predictor(checkpoint, threads=threads, precision=precision))
    if draw:
        Path(draw).mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in photos:
        try:
            answer, photo = answerer.photo(path, min_age, detect_faces)
        except ImageError as e:
            failed += 1
            print(f"{path}: error: {e}", file=sys.stderr)
            continue
        if as_json:
            print(json.dumps(answer))
        else:
            faces = answer["faces"]
            print("\n".join(face_line(path, i, len(faces), f) for i, f in enumerate(faces, start=1))
                  or f"{path}  {answer['message']}")
        if draw:
            from agecore import plots

            plots.annotate_faces(photo, answer["faces"], Path(draw) / f"{Path(path).stem}.png")
    if failed:
        print(f"{failed} of {len(photos)} photos could not be read", file=sys.stderr)
    return failed


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    failed = predict(args.photos, args.checkpoint, args.min_age, args.detect_faces, args.draw, args.json,
                     args.precision, args.threads)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    from ray_jobs.cli import run_stage

    run_stage("predict")
