"""How a checkpoint holds up on what real photos do to a face, and what finding the face costs.

    python benchmarks/robustness.py --checkpoint runs/faces/train/best --prepared runs/faces/prepared \\
        [--n 400] [--photos 200] [--out runs/robustness.json]

On a sample of the prepared set's test split (val where none is held out), one CPU thread:

* clean, then each degradation of the crops (grey, sepia, Gaussian blur of radius 2, a 48 px copy
  scaled back up, JPEG quality 15, Gaussian noise of sigma 12, and a scanned print: contrast faded
  to 70%, film grain and a 4 px halftone screen): MAE, bias and the change against clean (goal: at
  most +0.25 MAE each);
* pasted and found: each crop scaled (its side 45-80% of the photo's shorter side), turned by up to
  20 degrees and pasted at a random place of a 420 x 520 photo over a noisy background, then found
  by ``FaceDetector`` and aligned (the path of ``Predictor.face_crops``): the share found, their MAE
  against the clean MAE of the same crops (goal: within 0.2), and the unaligned square crop around
  the same detections beside it;
* milliseconds a photo for detection, alignment and the age model, wall and CPU time (on a shared
  machine the wall time counts other processes' work too; goal: detection + alignment at most 40 ms).
"""

from __future__ import annotations

import argparse
import io
import json
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from agecore import metrics
from agecore.faces import UTKFACE_TEMPLATE, align, prepared_sample, square_box
from agecore.images import load_image
from agecore.predictor import Predictor
from agecore.prepare import read_prepare_info, split_dir

PHOTO = (420, 520)  # a ~500 px portrait
SEPIA = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(buf).convert("RGB")


def _sepia(img: Image.Image) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(img, float) @ SEPIA.T, 0, 255).astype(np.uint8))


def _noise(img: Image.Image, sigma: float = 12.0) -> Image.Image:
    rng = np.random.default_rng(zlib.crc32(img.tobytes()))  # the same noise for the same crop, run to run
    return Image.fromarray(np.clip(np.asarray(img, float) + rng.normal(0, sigma, (*img.size[::-1], 3)), 0, 255)
                           .astype(np.uint8))


def _low_res(img: Image.Image, side: int = 48) -> Image.Image:
    return img.resize((side, side), Image.Resampling.BICUBIC).resize(img.size, Image.Resampling.BICUBIC)


def _scanned_print(img: Image.Image, fade: float = 0.7, grain: float = 10.0, period: float = 4.0,
                   depth: float = 0.15) -> Image.Image:
    """A print of the crop, scanned: contrast faded towards white, film grain, a halftone screen at 30 degrees."""
    x = 255 - (255 - np.asarray(img, float)) * fade
    rng = np.random.default_rng(zlib.crc32(img.tobytes()))
    noise = rng.normal(0, 1, img.size[::-1])
    for axis in (0, 1, 0, 1):  # [1 2 1] / 4 twice along each axis: grain about 1 px across
        noise = (np.roll(noise, 1, axis) + 2 * noise + np.roll(noise, -1, axis)) / 4
    x = x + grain * (noise / noise.std())[..., None]
    yy, xx = np.mgrid[: img.height, : img.width].astype(float)
    a = np.radians(30)
    screen = np.cos(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / period) * np.cos(
        2 * np.pi * (yy * np.cos(a) - xx * np.sin(a)) / period)
    return Image.fromarray(np.clip(x * (1 + depth * screen[..., None]), 0, 255).astype(np.uint8))


DEGRADATIONS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "grey": lambda im: im.convert("L").convert("RGB"),
    "sepia": _sepia,
    "blur 2": lambda im: im.filter(ImageFilter.GaussianBlur(2)),
    "48 px": _low_res,
    "JPEG 15": lambda im: _jpeg(im, 15),
    "noise 12": _noise,
    "scanned print": _scanned_print,
}


def background(rng: np.random.Generator) -> Image.Image:
    blobs = rng.integers(30, 225, (5, 4, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(blobs).resize(PHOTO, Image.Resampling.BICUBIC), float)
    return Image.fromarray(np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8))


def pasted_photo(crop: np.ndarray, rng: np.random.Generator) -> tuple[Image.Image, tuple[float, float]]:
    """``crop`` scaled, turned and pasted at a random place; the photo and where its centre went."""
    photo = background(rng)
    side = round(rng.uniform(0.45, 0.8) * min(PHOTO))
    chip = Image.fromarray(crop).resize((side, side), Image.Resampling.BICUBIC).convert("RGBA")
    turned = chip.rotate(rng.uniform(-20, 20), Image.Resampling.BICUBIC, expand=True)
    left = int(rng.integers(0, max(1, PHOTO[0] - turned.width)))
    top = int(rng.integers(0, max(1, PHOTO[1] - turned.height)))
    photo.paste(turned, (left, top), turned)
    return photo, (left + turned.width / 2, top + turned.height / 2)


def row(name: str, pred: np.ndarray, true: np.ndarray, clean: float | None) -> dict:
    s = metrics.summary(pred, true)
    return {"rows": name, "n": len(true), "mae": round(s["mae"], 3), "bias": round(s["bias"], 3),
            "vs_clean": None if clean is None else round(s["mae"] - clean, 3)}


def degradation_rows(predictor: Predictor, images: np.ndarray, ages: np.ndarray) -> list[dict]:
    size, interp = predictor.prep.input_size, predictor.prep.interpolation
    clean = predictor.predict_arrays(images)
    rows = [row("clean", clean, ages, None)]
    for name, fn in DEGRADATIONS.items():
        degraded = np.stack([load_image(fn(Image.fromarray(im)), size, interp) for im in images])
        rows.append(row(name, predictor.predict_arrays(degraded), ages, rows[0]["mae"]))
    return rows


def pasted_rows(predictor: Predictor, images: np.ndarray, ages: np.ndarray, photos: int, seed: int) -> tuple[list, dict]:
    """Pasted-and-found accuracy (aligned, and square crops around the same faces) and the timings."""
    rng = np.random.default_rng(seed)
    detector, size = predictor.face_detector, predictor.prep.input_size
    template = predictor.prep.face_template or UTKFACE_TEMPLATE
    found, aligned, squared = [], [], []
    ms: dict[str, list[float]] = {f"{k} {c}": [] for k in ("detect", "align", "age model") for c in ("wall", "cpu")}

    def timed(name: str, fn: Callable[[], object]) -> object:
        """``fn()``, its wall and CPU time recorded: on a shared machine the wall time counts others' work too."""
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        ms[f"{name} wall"].append(time.perf_counter() - wall)
        ms[f"{name} cpu"].append(time.process_time() - cpu)
        return out

    for i in range(min(photos, len(images))):
        photo, centre = pasted_photo(images[i], rng)
        faces = timed("detect", lambda photo=photo: detector.detect(photo))
        # the pasted face: the most confident detection whose box holds the pasted centre
        hits = [f for f in faces if f.box[0] < centre[0] < f.box[2] and f.box[1] < centre[1] < f.box[3]]
        if not hits:
            continue
        face = max(hits, key=lambda f: f.score)
        crop = timed("align", lambda photo=photo, face=face: align(photo, face.landmarks, template, size,
                                                                   predictor.prep.interpolation))
        aligned.append(float(timed("age model", lambda crop=crop: predictor.predict_arrays(crop[None]))[0]))
        square = load_image(photo.crop(square_box(face.box, 0.05)), size, predictor.prep.interpolation)
        squared.append(float(predictor.predict_arrays(square[None])[0]))
        found.append(i)
    n = min(photos, len(images))
    idx = np.array(found, dtype=int)
    rows = []
    if len(idx):
        rows.append(row("clean, the crops found", predictor.predict_arrays(images[idx]), ages[idx], None))
        rows.append(row("pasted + found + aligned", np.array(aligned), ages[idx], rows[0]["mae"]))
        rows.append(row("pasted + found, square crop", np.array(squared), ages[idx], rows[0]["mae"]))
    timing = {k: round(1000 * float(np.median(v)), 1) if v else None for k, v in ms.items()}
    timing.update(found=len(idx), photos=n, found_rate=round(len(idx) / max(n, 1), 3))
    return rows, timing


def _markdown(rows: list[dict]) -> str:
    lines = ["| rows | n | MAE | bias | vs clean |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        vs = "" if r["vs_clean"] is None else f"{r['vs_clean']:+.2f}"
        lines.append(f"| {r['rows']} | {r['n']} | {r['mae']:.2f} | {r['bias']:+.2f} | {vs} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prepared", required=True)
    p.add_argument("--split", default=None, help="default: test where held out, else val")
    p.add_argument("--n", type=int, default=400, help="crops for the degradation rows")
    p.add_argument("--photos", type=int, default=200, help="pasted photos (from the same crops)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the figures")
    args = p.parse_args()
    torch.set_num_threads(1)
    split = args.split or ("test" if read_prepare_info(args.prepared)["counts"].get("test") else "val")
    images, ages = prepared_sample(split_dir(args.prepared, split), args.n)
    predictor = Predictor(args.checkpoint, "cpu", threads=1)
    degraded = degradation_rows(predictor, images, ages)
    pasted, timing = pasted_rows(predictor, images, ages, args.photos, args.seed)
    template = "checkpoint's" if predictor.prep.face_template else "UTKFace default"
    print(f"{args.checkpoint} on {len(ages)} crops of split {split}; face template: {template}\n")
    print(_markdown(degraded + pasted))
    print(f"\nfound {timing['found']} of {timing['photos']} pasted faces ({timing['found_rate']:.1%}); "
          f"median ms a {PHOTO[0]}x{PHOTO[1]} photo, one thread, wall (CPU): "
          + ", ".join(f"{k} {timing[k + ' wall']} ({timing[k + ' cpu']})" for k in ("detect", "align", "age model"))
          + " (goal: detect + align <= 40)")
    if args.out:
        Path(args.out).write_text(json.dumps({"checkpoint": args.checkpoint, "split": split, "rows": degraded + pasted,
                                              "timing_ms": timing}, indent=2) + "\n")


if __name__ == "__main__":
    main()
