"""Evaluation and bulk scoring through a local Ray: one row per input, errors named, resumable."""

import io
import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from agecore.predictor import Predictor
from ray_jobs.evaluate import evaluate
from ray_jobs.score import MIN_BLOCKS_PER_ACTOR, SCHEMA, block_rows, score
from tests.conftest import jpeg_bytes, subset, tiny_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def mixed_folder(faces_root, tmp_path_factory):
    """Good faces and every kind of awkward file a real collection holds."""
    folder = tmp_path_factory.mktemp("mixed")
    for name in subset(faces_root, 40)["file_name"]:
        shutil.copy(faces_root / "final_files" / name, folder / name)
    good = (folder / name).read_bytes()
    (folder / "sub").mkdir()
    (folder / "sub" / "corrupt.jpg").write_bytes(good[:200])
    (folder / "sub" / "empty.jpg").write_bytes(b"")
    (folder / "sub" / "text.jpg").write_text("not an image")
    buf = io.BytesIO()
    Image.new("RGBA", (90, 90), (255, 0, 0, 128)).save(buf, "PNG")
    (folder / "sub" / "alpha.png").write_bytes(buf.getvalue())
    (folder / "cmyk.jpg").write_bytes(jpeg_bytes((80, 80), mode="CMYK", color=(0, 50, 50, 0)))
    (folder / "grey.jpg").write_bytes(jpeg_bytes((80, 80), mode="L"))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (120, 80), (30, 60, 90)).save(buf, "JPEG", exif=exif)
    (folder / "rotated.jpg").write_bytes(buf.getvalue())
    (folder / "notes.txt").write_text("ignored: not an image extension")
    return folder, {"corrupt.jpg": "truncated", "empty.jpg": "empty_file", "text.jpg": "not_an_image"}


def read_scores(out):
    return pq.read_table(out).to_pandas()


def test_score_gives_one_row_per_image_with_errors(checkpoint, mixed_folder, tmp_path, ray_local):
    folder, bad = mixed_folder
    summary = score(str(checkpoint), str(folder), str(tmp_path / "scores"), batch_size=16, detect_faces=False)
    rows = read_scores(tmp_path / "scores")
    images = [p for p in folder.rglob("*") if p.suffix in (".jpg", ".png")]
    assert len(rows) == len(images) == summary["images"] == summary["scored_now"] and rows["path"].is_unique
    assert summary["unusable_now"] == len(bad)
    by_name = rows.set_index(rows["path"].str.rsplit("/", n=1).str[1])
    for name, reason in bad.items():
        assert np.isnan(by_name.loc[name, "predicted_age"]) and by_name.loc[name, "error"].startswith(reason)
    good = rows[~rows["path"].str.rsplit("/", n=1).str[1].isin(bad)]
    assert good["predicted_age"].notna().all() and (good["error"] == "").all()
    # each row holds the age the library gives its own file: a path<->age mix-up in the actors changes them
    ages, errors = Predictor(checkpoint).predict_paths(rows["path"].tolist())
    np.testing.assert_allclose(rows["predicted_age"], ages, atol=1e-3, equal_nan=True)
    assert [bool(e) for e in errors] == (rows["error"] != "").tolist()
    assert np.ptp(ages[np.isfinite(ages)]) > 0.05  # the ages differ, so a mix-up would show


@pytest.mark.parametrize("images,batch_size,actors", [(400, 64, 2), (5000, 64, 2), (10, 64, 4), (100_000, 256, 16)])
def test_score_blocks_are_small_enough_to_keep_every_actor_busy(images, batch_size, actors):
    # Ray Data gives whole blocks to actors: one block of 400 ResNet50 images left one of two actors idle
    rows = block_rows(images, batch_size, actors)
    assert 1 <= rows <= batch_size
    assert -(-images // rows) >= min(images, actors * MIN_BLOCKS_PER_ACTOR)


def test_interrupted_score_run_is_completed_without_duplicates(checkpoint, mixed_folder, tmp_path, ray_local):
    folder, _ = mixed_folder
    out = tmp_path / "scores"
    first = score(str(checkpoint), str(folder), str(out), batch_size=8, rows_per_part=10, detect_faces=False)
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) >= 3 and first["scored_now"] == first["images"] == len(read_scores(out))
    assert all(pq.read_schema(part).equals(SCHEMA) for part in parts)
    first_rows = read_scores(out)
    kept = set(pq.read_table(parts[0], columns=["path"]).column("path").to_pylist())
    rescored = first_rows[~first_rows["path"].isin(kept)]
    # as if the run had been killed after its first part, while writing its second: that part's file
    # has its final name but no footer; an earlier version's writer left a dot-file
    half = parts[1].read_bytes()[: parts[1].stat().st_size // 2]
    for part in parts[1:]:
        part.unlink()
    parts[1].write_bytes(half)
    (out / ".tmp-part-leftover.parquet").write_bytes(b"half a file")
    again = score(str(checkpoint), str(folder), str(out), batch_size=8, rows_per_part=10, detect_faces=False)
    assert not parts[1].exists() and not (out / ".tmp-part-leftover.parquet").exists()
    rows = read_scores(out)
    assert again["skipped_already_scored"] == len(kept) and again["scored_now"] == len(rescored)
    assert again["unusable_now"] == int((rescored["error"] != "").sum())
    assert len(rows) == len(first_rows) and rows["path"].is_unique
    merged = rows.merge(first_rows, on="path", suffixes=("", "_first"))
    assert np.allclose(merged["predicted_age"], merged["predicted_age_first"], equal_nan=True, atol=1e-4)


def test_evaluate_report_on_a_prepared_split(checkpoint, prepared_small, tmp_path, ray_local):
    report = evaluate(str(checkpoint), str(prepared_small), str(tmp_path), split="val", attach=True)
    n_val = json.loads((prepared_small / "report" / "summary.json").read_text())["splits"]["val"]["count"]
    assert report["scored"] == n_val and report["unscored"] == 0
    for name in ("report.json", "report.md", "scatter.png", "error_by_age.png", "worst.png", "predictions.parquet"):
        assert (tmp_path / name).is_file(), name
    preds = pd.read_parquet(tmp_path / "predictions.parquet")
    assert np.isclose(np.abs(preds["predicted_age"] - preds["age"]).mean(), report["metrics"]["mae"], atol=1e-3)
    assert {r["age_band"] for r in report["per_age_band"]} >= {"0-2", "65+"}
    assert "per_gender" in report and "per_race" in report
    cal = json.loads((checkpoint / "calibration.json").read_text())
    assert cal["overall"]["count"] == n_val


def test_evaluate_on_raw_labelled_folder_counts_bad_rows(checkpoint, faces_root, tmp_path, ray_local):
    rows = subset(faces_root, 30)
    manifest = pd.DataFrame({"path": [str(faces_root / "final_files" / n) for n in rows["file_name"]],
                             "age": rows["real_age"]})
    manifest.loc[len(manifest)] = [str(tmp_path / "missing.jpg"), 30]
    manifest.loc[len(manifest)] = [manifest["path"][0] + "?", "old"]
    manifest.to_csv(tmp_path / "m.csv", index=False)
    report = evaluate(str(checkpoint), str(tmp_path / "m.csv"), str(tmp_path / "eval"), detect_faces=False)
    assert report["rows"] == 32 and report["scored"] == 30
    # predictions.parquet: each scored path with the library's age for that file, and its true age beside it
    preds = pd.read_parquet(tmp_path / "eval" / "predictions.parquet")
    preds = preds[preds["error"] == ""]  # pyarrow-backed: a missing age is NaN, not NA, so not dropna
    ages, _ = Predictor(checkpoint).predict_paths(preds["path"].tolist())
    assert len(preds) == 30 and np.isfinite(ages).all()
    np.testing.assert_allclose(preds["predicted_age"], ages, atol=1e-3)
    truth = dict(zip(manifest["path"][:30], manifest["age"][:30].astype(float), strict=True))
    assert preds["age"].astype(float).tolist() == [truth[p] for p in preds["path"]]
    assert report["unscored_by_reason"] == {"missing_file": 1, "bad_label": 1}
