"""Faces in uncropped photos: detection, per-face prediction, bulk scoring and the Serve route.

The photos are made here: real UTKFace chips pasted onto a larger plain canvas, where we know
where each face is, and a plain canvas with no face at all.
"""

import io
import re
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import requests
from PIL import Image

from agecore.config import FaceDetection
from agecore.faces import CROP_PAD, UTKFACE_TEMPLATE, FaceDetector, align
from agecore.predictor import Predictor
from ray_jobs.score import FACES_SCHEMA, score
from tests.conftest import free_port, subset, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("facenet")

CANVAS = (640, 360)


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(faces_root, tmp_path_factory):
    """Photos on disk, and where their faces were pasted: two faces, one face, none, and not an image."""
    chips = [Image.open(faces_root / "final_files" / n).convert("RGB")
             for n in subset(faces_root, 9)["file_name"].iloc[[3, 6, 7]]]
    folder = tmp_path_factory.mktemp("photos")
    pasted = {}

    def paste(name: str, spots: list[tuple[int, int]]) -> None:
        canvas = Image.new("RGB", CANVAS, (128, 128, 128))
        pasted[name] = []
        for chip, (x, y) in zip(chips, spots, strict=False):
            canvas.paste(chip, (x, y))
            pasted[name].append((x, y, x + chip.width, y + chip.height))
        (folder / name).write_bytes(jpeg(canvas))

    paste("two.jpg", [(40, 80), (380, 100)])
    paste("one.jpg", [(220, 60)])
    paste("plain.jpg", [])
    (folder / "text.jpg").write_text("not an image")
    return folder, pasted


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("faces_ckpt"))


# -- library: no Ray ---------------------------------------------------------------------------------


def test_detector_finds_the_pasted_faces_and_none_on_a_plain_photo(photos):
    folder, pasted = photos
    detector = FaceDetector()
    two = Image.open(folder / "two.jpg").convert("RGB")
    faces = detector.detect(two)
    assert len(faces) == 2 and all(f.score >= 0.9 for f in faces)
    # what the answers show: boxes to 0.1 px, scores to 4 places (landmarks stay exact for the warp)
    assert all(v == round(v, 1) for f in faces for v in f.box) and all(f.score == round(f.score, 4) for f in faces)
    assert any(x != round(x, 3) for f in faces for x, _ in f.landmarks)
    for face, where in zip(faces, pasted["two.jpg"], strict=True):  # left to right, as pasted
        assert iou(face.box, where) > 0.5 and len(face.landmarks) == 5
        (lx, ly), (rx, ry) = face.landmarks[:2]  # the eyes: inside the box, left of right, about level
        assert where[0] < lx < rx < where[2] and abs(ly - ry) < 0.05 * (where[2] - where[0])
    assert detector.detect(Image.open(folder / "plain.jpg").convert("RGB")) == []


def test_predict_faces_gives_one_entry_per_face_through_the_shared_path(photos, checkpoint):
    folder, _ = photos
    predictor = Predictor(checkpoint, "cpu")
    predictor.predict([(folder / "one.jpg").read_bytes()])
    assert predictor._face_detector is None  # nothing loaded for those who never ask for faces
    found = predictor.predict_faces((folder / "two.jpg").read_bytes())
    assert [sorted(f) for f in found] == [["age", "aligned", "box", "face_score"]] * 2
    assert all(len(f["box"]) == 4 and np.isfinite(f["age"]) and f["aligned"] for f in found)
    # the same age as aligning the face by hand: detection and alignment only choose the pixels
    photo = Image.open(folder / "two.jpg").convert("RGB")
    face = predictor.face_detector.detect(photo, pad=CROP_PAD)[1]
    crop = align(photo, face.landmarks, UTKFACE_TEMPLATE, predictor.prep.input_size)
    assert predictor.predict([crop])[0] == pytest.approx(found[1]["age"], abs=1e-4)
    assert predictor.predict_faces(Image.open(folder / "plain.jpg")) == []


def test_auto_takes_training_like_crops_as_they_are(faces_root, checkpoint):
    predictor = Predictor(checkpoint, "cpu")
    names = subset(faces_root, 9)["file_name"].iloc[[3, 6, 7]]
    for name in names:
        chip = Image.open(faces_root / "final_files" / name).convert("RGB")
        (found,) = predictor.predict_faces(chip)
        assert found["aligned"] is False and found["box"] == [0.0, 0.0, 200.0, 200.0], name
        assert found["age"] == pytest.approx(predictor.predict(chip), abs=1e-4)  # the crop path itself
        (forced,) = predictor.predict_faces(chip, detect_faces="true")
        assert forced["aligned"] is True and forced["box"] != found["box"]
        # the same face made smaller within a photo is no crop: it is found and aligned
        canvas = Image.new("RGB", (600, 600), (128, 128, 128))
        canvas.paste(chip, (200, 150))
        (inside,) = predictor.predict_faces(canvas)
        assert inside["aligned"] is True and 150 < inside["box"][0] < 300
    (as_crop,) = predictor.predict_faces(Image.new("RGB", (64, 64)), detect_faces="false")
    assert as_crop["face_score"] is None and as_crop["aligned"] is False


def test_a_missing_facenet_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)
    with pytest.raises(ImportError, match=re.escape('--no-deps "facenet-pytorch==2.6.0"')):
        FaceDetector()
    with pytest.raises(ValueError, match="min_score"):
        FaceDetection(min_score=0)


# -- through Ray ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_score_with_detect_faces_writes_a_row_per_face_and_resumes(photos, checkpoint, tmp_path, ray_local):
    folder, pasted = photos
    out = tmp_path / "faces"
    summary = score(str(checkpoint), str(folder), str(out), batch_size=2, rows_per_part=2, detect_faces=True)
    rows = pq.read_table(out).to_pandas()
    assert summary["faces_found_now"] == 3 and summary["images_without_face_now"] == 1
    assert summary["unusable_now"] == 1 and summary["scored_now"] == 4
    by_name = {name: group for name, group in rows.groupby(rows["path"].str.rsplit("/", n=1).str[1])}
    assert sorted(by_name) == ["one.jpg", "plain.jpg", "text.jpg", "two.jpg"]
    two = by_name["two.jpg"].sort_values("face")
    assert two["face"].tolist() == [0, 1] and two["predicted_age"].notna().all() and (two["error"] == "").all()
    for box, where in zip(two["box"], pasted["two.jpg"], strict=True):
        assert iou(box, where) > 0.5
    plain, text = by_name["plain.jpg"].iloc[0], by_name["text.jpg"].iloc[0]
    assert plain["error"].startswith("no_face: ") and pd.isna(plain["face"]) and np.isnan(plain["predicted_age"])
    assert text["error"].startswith("not_an_image") and np.isnan(text["predicted_age"])
    for part in out.glob("part-*.parquet"):  # a path in a part is the whole photo
        assert pq.read_schema(part).equals(FACES_SCHEMA)
        in_part = pq.read_table(part).to_pandas()
        for path, group in in_part.groupby("path"):
            assert len(group) == len(rows[rows["path"] == path])
    again = score(str(checkpoint), str(folder), str(out), detect_faces=True)
    assert again["skipped_already_scored"] == 4 and again["scored_now"] == 0
    with pytest.raises(ValueError, match="holds rows of faces, and this run writes other columns"):
        score(str(checkpoint), str(folder), str(out), detect_faces=False)


@pytest.mark.slow
def test_score_by_default_takes_crops_as_they_are_and_finds_the_faces_of_photos(
        photos, checkpoint, faces_root, tmp_path, ray_local):
    folder, _ = photos
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("two.jpg", "plain.jpg"):
        (mixed / name).write_bytes((folder / name).read_bytes())
    chip = faces_root / "final_files" / subset(faces_root, 9)["file_name"].iloc[3]
    (mixed / "crop.jpg").write_bytes(chip.read_bytes())
    summary = score(str(checkpoint), str(mixed), str(tmp_path / "scores"), batch_size=2)
    rows = pq.read_table(tmp_path / "scores").to_pandas().sort_values(["path", "face"])
    assert summary["faces_found_now"] == 3 and summary["images_without_face_now"] == 1
    predictor = Predictor(checkpoint, "cpu")
    for path, group in rows[rows["error"] == ""].groupby("path"):
        library = predictor.predict_faces(path)  # the same rule, face for face
        assert group["aligned"].tolist() == [f["aligned"] for f in library]
        np.testing.assert_allclose(group["predicted_age"], [f["age"] for f in library], atol=1e-3)
    crop = rows[rows["path"].str.endswith("crop.jpg")].iloc[0]
    assert not crop["aligned"] and list(crop["box"]) == [0.0, 0.0, 200.0, 200.0]
    assert rows[rows["path"].str.endswith("two.jpg")]["aligned"].tolist() == [True, True]


@pytest.mark.slow
def test_serve_detect_faces(photos, checkpoint, ray_local):
    from ray import serve

    from ray_jobs.serve import build_app

    folder, pasted = photos
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"checkpoint": str(checkpoint)}), name="age_faces", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/age"
    try:
        two = (folder / "two.jpg").read_bytes()
        r = requests.post(f"{url}?detect_faces=true", files={"file": ("two.jpg", two, "image/jpeg")}, timeout=120)
        assert r.status_code == 200, r.text
        found = r.json()["faces"]
        assert len(found) == 2 and r.json()["model"]["backbone"] == "test_resnet"
        for face, where in zip(found, pasted["two.jpg"], strict=True):
            assert iou(face["box"], where) > 0.5 and face["face_score"] >= 0.9 and 0 < face["age"] < 130
        plain = requests.post(f"{url}?detect_faces=true", data=(folder / "plain.jpg").read_bytes(),
                              headers={"content-type": "image/jpeg"}, timeout=60)
        assert plain.status_code == 200 and plain.json()["faces"] == [] and "no face" in plain.json()["message"]
        bad = requests.post(f"{url}?detect_faces=true", files={"file": ("a.jpg", b"nope", "image/jpeg")}, timeout=60)
        assert bad.status_code == 422 and bad.json()["error"] == "not_an_image"
        default = requests.post(url, files={"file": ("two.jpg", two, "image/jpeg")}, timeout=60).json()
        assert [f["age"] for f in default["faces"]] == [f["age"] for f in found]  # auto: a photo's faces
        whole = requests.post(f"{url}?detect_faces=false", files={"file": ("two.jpg", two, "image/jpeg")}, timeout=60)
        assert "faces" not in whole.json() and 0 < whole.json()["age"] < 130  # false: the image as one crop
    finally:
        serve.shutdown()
