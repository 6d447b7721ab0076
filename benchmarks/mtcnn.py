"""MTCNN as ``agecore.mtcnn.Cascade`` runs it, against facenet-pytorch's own ``detect_face``.

    python benchmarks/mtcnn.py [--photos ../shared/data/fgnet-dev/manifest.csv] [--limit N]

Both get the same input, the working copy ``FaceDetector.detect`` makes of each photo (400 px on its
longer side, padded as the crop-or-photo rule pads it), the same nets and the same settings, on one
CPU thread. It prints the milliseconds a photo of each (median and mean), the faces each found, and
the largest difference between their boxes and landmarks (pixels of the working copy).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from agecore.faces import CROP_PAD, FaceDetector, require_mtcnn

DEFAULT_PHOTOS = Path(__file__).resolve().parents[1].parent / "shared/data/fgnet-dev/manifest.csv"


def timed(detect, inputs: list) -> tuple[list, list[float]]:
    """Each input's result and milliseconds, after one untimed call."""
    detect(*inputs[0])
    results, ms = [], []
    for args in inputs:
        start = time.perf_counter()
        results.append(detect(*args))
        ms.append((time.perf_counter() - start) * 1e3)
    return results, ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="a manifest with a path column")
    p.add_argument("--limit", type=int, default=None, help="the first N photos (default: all)")
    args = p.parse_args()
    from facenet_pytorch.models.utils.detect_face import detect_face

    torch.set_num_threads(1)
    detector = FaceDetector()
    paths = pd.read_csv(args.photos, usecols=["path"])["path"].iloc[:args.limit]
    inputs = []
    for path in paths:
        with Image.open(args.photos.parent / path) as image:
            work = detector.working_copy(image.convert("RGB"), pad=CROP_PAD)
        inputs.append((work.pixels, work.min_face))

    nets = require_mtcnn()()  # a module of its own: the cascade turns its nets channels-last

    def reference(pixels: np.ndarray, min_face: float) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            boxes, points = detect_face(pixels, min_face, nets.pnet, nets.rnet, nets.onet, nets.thresholds,
                                        nets.factor, "cpu")
        return np.asarray(boxes[0], np.float64).reshape(-1, 5), np.asarray(points[0], np.float64).reshape(-1, 5, 2)

    ours, ours_ms = timed(detector.cascade.detect, inputs)
    theirs, theirs_ms = timed(reference, inputs)
    found = [sum(len(b) for b, _ in results) for results in (theirs, ours)]
    same_count = sum(len(a[0]) == len(b[0]) for a, b in zip(theirs, ours, strict=True))
    gap = 0.0
    for (tb, tp), (ob, op) in zip(theirs, ours, strict=True):
        if len(tb) and len(tb) == len(ob):
            t, o = np.lexsort(tb[:, :2].T[::-1]), np.lexsort(ob[:, :2].T[::-1])
            gap = max(gap, float(np.abs(tb[t] - ob[o]).max()), float(np.abs(tp[t] - op[o]).max()))
    print(f"{len(inputs)} photos of {args.photos}, one thread")
    print("| detection | ms a photo, median | mean | faces found |")
    print("|---|---:|---:|---:|")
    for name, ms, n in [("facenet-pytorch `detect_face`", theirs_ms, found[0]),
                        ("`agecore.mtcnn.Cascade`", ours_ms, found[1])]:
        print(f"| {name} | {statistics.median(ms):.1f} | {statistics.fmean(ms):.1f} | {n} |")
    print(f"the same number of faces in {same_count} of {len(inputs)} photos; largest difference of a box "
          f"coordinate, score or landmark: {gap:.5f}")


if __name__ == "__main__":
    main()
