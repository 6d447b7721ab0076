"""The prepare job end to end through a local Ray: readers, rejects, splits, pixels, report."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from agecore.config import PrepareConfig
from agecore.images import load_image, read_bytes
from ray_jobs.prepare import prepare
from tests.conftest import make_labels_dir, plant_bad_files


@pytest.fixture(scope="module")
def dirty(faces_root, tmp_path_factory):
    """About 300 real faces with one bad file per reason and bad label rows mixed in."""
    root = make_labels_dir(faces_root, tmp_path_factory.mktemp("dirty") / "data", 300)
    labels = pd.read_csv(root / "labels.csv")
    expected = plant_bad_files(root / "final_files", root / "final_files" / labels["file_name"][0])
    bad_rows = [{"file_name": n, "real_age": 30} for n in expected]
    bad_rows[-1]["real_age"] = 31  # copy_b: same picture as copy_a, another age
    bad_rows += [
        {"file_name": labels["file_name"][1], "real_age": 99},  # duplicate row (the first row is kept)
        {"file_name": labels["file_name"][2] + "x", "real_age": "forty"},  # bad label
        {"file_name": labels["file_name"][3] + "y", "real_age": 150},  # out of range
    ]
    pd.concat([labels, pd.DataFrame(bad_rows)]).to_csv(root / "labels.csv", index=False)
    return root, expected, len(labels)


@pytest.fixture(scope="module")
def prepared(dirty, tmp_path_factory, ray_local):
    root, _, _ = dirty
    out = tmp_path_factory.mktemp("prepared")
    cfg = PrepareConfig(data=str(root), out=str(out), image_size=64, val_fraction=0.2, test_fraction=0.1, seed=1)
    return out, prepare(cfg, "bicubic")


def test_every_bad_item_is_rejected_with_its_reason(dirty, prepared):
    _, expected, n_good = dirty
    out, summary = prepared
    rejects = pd.read_csv(out / "rejects.csv")
    by_name = {p.rsplit("/", 1)[-1]: r for p, r in zip(rejects["path"], rejects["reason"], strict=True)}
    for name, reason in expected.items():
        assert by_name[name] == reason, name
    # the copies were made of the first real face (age 1): it conflicts with them and goes too
    assert by_name[pd.read_csv(dirty[0] / "labels.csv")["file_name"][0]] == "conflicting_duplicate"
    assert rejects["reason"].value_counts().to_dict() == {
        **pd.Series(list(expected.values())).value_counts().to_dict(),
        "conflicting_duplicate": 3, "duplicate_row": 1, "bad_label": 1, "age_out_of_range": 1}
    assert summary["accepted"] == n_good - 1
    assert summary["accepted"] + summary["rejected"] == summary["listed"] == n_good + len(expected) + 3
    assert rejects["detail"].str.len().min() > 0


def test_parquet_holds_exactly_the_preprocessed_pixels_and_splits_are_disjoint(prepared):
    out, summary = prepared
    table = pq.read_table(out / "data").to_pandas()
    assert len(table) == summary["accepted"]
    assert set(table["split"]) == {"train", "val", "test"}
    assert table.groupby("digest")["split"].nunique().max() == 1
    for _, row in table.sample(5, random_state=0).iterrows():
        stored = np.asarray(row["image"], dtype=np.uint8).reshape(64, 64, 3)
        assert np.array_equal(stored, load_image(read_bytes(row["path"]), 64, "bicubic"))
    # the input is sorted by age; the shards must not be, or training batches would each hold one age
    train = pq.read_table(out / "data" / "split=train", columns=["age"]).column("age").to_numpy()
    assert abs(np.corrcoef(np.arange(len(train)), train)[0, 1]) < 0.3
    counts = table["split"].value_counts()
    assert counts["val"] == pytest.approx(0.2 * len(table), abs=6)


def test_report_is_complete(prepared):
    out, summary = prepared
    saved = json.loads((out / "report" / "summary.json").read_text())
    assert saved["splits"]["train"]["count"] + saved["splits"]["val"]["count"] + saved["splits"]["test"]["count"] == \
        summary["accepted"]
    for name in ("age_hist.png", "samples.png"):
        assert (out / "report" / name).stat().st_size > 10_000
    info = json.loads((out / "prepare.json").read_text())
    assert info["image_size"] == 64 and info["config"]["seed"] == 1
    # about 60 validation faces over nine bands: each band under 20 is named as too small to calibrate on
    small = [band for band, n in saved["splits"]["val"]["per_band"].items() if 0 < n < 20]
    assert small and len(saved["warnings"]) == 1  # one line, naming each of them with its count
    named = saved["warnings"][0].split(" in band ")[1].split(":")[0].split(", ")
    assert [band.split(" (")[0] for band in named] == small


def test_strict_fails_on_rejects(dirty, tmp_path, ray_local):
    root, _, _ = dirty
    with pytest.raises(ValueError, match="--strict"):
        prepare(PrepareConfig(data=str(root), out=str(tmp_path), image_size=64, strict=True), "bicubic")


def test_labelled_photos_become_aligned_training_crops(faces_root, tmp_path, facenet):
    """--detect-faces: a chip pasted into a photo comes back as the chip's own framing; no face is a reject."""
    from PIL import Image

    from agecore.faces import UTKFACE_TEMPLATE, FaceDetector, align, largest
    from agecore.prepare import decode_batch
    from tests.conftest import subset

    name = subset(faces_root, 9)["file_name"].iloc[3]
    chip = Image.open(faces_root / "final_files" / name).convert("RGB")
    photo = Image.new("RGB", (640, 480), (128, 128, 128))
    photo.paste(chip.resize((160, 160)), (300, 120))
    photo.save(tmp_path / "photo.jpg", quality=95)
    chip.save(tmp_path / "chip.png")
    Image.new("RGB", (640, 480), (128, 128, 128)).save(tmp_path / "plain.jpg")
    paths = np.array([str(tmp_path / n) for n in ("photo.jpg", "chip.png", "plain.jpg")], dtype=object)
    out = decode_batch({"path": paths}, 64, "bicubic", 40_000_000, 32, detect_faces="auto")
    assert out["error_reason"].tolist() == ["", "", "no_face"]
    as_chip = load_image(chip, 64, "bicubic")
    assert np.array_equal(out["image"][1], as_chip)  # a chip is taken as it is
    # the pasted face is found and aligned onto the chips' layout: close to the chip itself at 64 px
    assert np.abs(out["image"][0].astype(int) - as_chip).mean() < 20
    detector = FaceDetector()
    face = largest(detector.detect(Image.open(paths[0]).convert("RGB"), pad=0.25))
    expected = align(Image.open(paths[0]).convert("RGB"), face.landmarks, UTKFACE_TEMPLATE, 64, "bicubic")
    assert np.array_equal(out["image"][0], expected)
    forced = decode_batch({"path": paths[1:2]}, 64, "bicubic", 40_000_000, 32, detect_faces="true")
    assert not np.array_equal(forced["image"][0], as_chip)  # true aligns even a chip
    with pytest.raises(ValueError, match="detect_faces must be one of"):
        PrepareConfig(data="d", out="o", detect_faces="maybe")
