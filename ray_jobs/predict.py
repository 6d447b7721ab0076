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

from agecore.config import PRECISION_HELP, PRECISIONS
from agecore.errors import InvalidInput
from agecore.faces import require_mtcnn
from agecore.images import ImageError
from agecore.predictor import Predictor
from ray_jobs.options import add_calibration_argument, add_detect_faces_argument


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="age predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("photos", nargs="+", help="image files: any photo, or face crops")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or URI (a training run's best/)")
    p.add_argument("--min-age", type=float, default=None, help="also answer: is each person at least this old?")
    add_detect_faces_argument(p)
    p.add_argument("--draw", default=None, metavar="DIR", help="write each photo with its boxes and ages into DIR")
    p.add_argument("--json", action="store_true", help="print the HTTP API's answer for each photo instead")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help=PRECISION_HELP)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    add_calibration_argument(p)
    return p


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
            threads: int | None = None, calibration: str | None = None) -> int:
    """Print the faces of each photo; returns how many photos could not be read."""
    if min_age is not None and not 1 <= min_age <= 100:
        raise InvalidInput(f"--min-age must be in [1, 100], got {min_age:g}")
    if detect_faces != "false":
        require_mtcnn()  # a missing detector is said before the model loads
    predictor = Predictor(checkpoint, threads=threads, precision=precision, calibration=calibration)
    if draw:
        Path(draw).mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in photos:
        try:
            start = time.perf_counter()
            photo = predictor.photo(path)  # decoded once, for the answer and the drawing
            answer = {"path": path, **predictor.answer(photo, min_age, detect_faces),
                      "seconds": round(time.perf_counter() - start, 4)}
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
                     args.precision, args.threads, args.calibration)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    from ray_jobs.cli import run_stage

    run_stage("predict")
