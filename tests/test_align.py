"""Face alignment: the similarity transform, the warp, the template, and faces found again in made-up photos.

The photos are made here: UTKFace chips scaled, rotated and pasted at a known place onto a larger
noisy background, and a plain background with no face at all.
"""

import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from agecore.checkpoint import read_meta
from agecore.config import FaceDetection, Preprocessing
from agecore.faces import (
    UTKFACE_TEMPLATE,
    FaceDetector,
    align,
    measure_template,
    similarity_transform,
    square_box,
    template_from_files,
)
from agecore.predictor import Predictor
from tests.conftest import subset, tiny_checkpoint

TEMPLATE = np.array(UTKFACE_TEMPLATE)


def rotation(degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def background(size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth colour blobs plus grain: busier than a plain canvas, with nothing face-like in it."""
    rng = np.random.default_rng(seed)
    blobs = Image.fromarray(rng.integers(40, 220, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    grain = rng.normal(0, 6, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(blobs, float) + grain, 0, 255).astype(np.uint8))


def paste(chip: Image.Image, canvas: Image.Image, scale: float, degrees: float, centre: tuple[float, float]) -> np.ndarray:
    """Paste ``chip`` scaled, turned by ``degrees`` (counter-clockwise) and centred at ``centre``; returns
    the 2x3 matrix that maps chip pixels to canvas pixels."""
    side = round(chip.width * scale)
    turned = chip.resize((side, side), Image.Resampling.BICUBIC).convert("RGBA").rotate(
        degrees, Image.Resampling.BICUBIC, expand=True)
    left, top = round(centre[0] - turned.width / 2), round(centre[1] - turned.height / 2)
    canvas.paste(turned, (left, top), turned)
    # chip point p -> scale * R(-degrees) (p - chip centre) + centre (image y points down)
    linear = scale * rotation(-degrees)
    c = np.array([chip.width / 2, chip.height / 2])
    actual_centre = np.array([left + turned.width / 2, top + turned.height / 2])
    return np.hstack([linear, (actual_centre - linear @ c)[:, None]])


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(float).mean(2).ravel(), b.astype(float).mean(2).ravel()
    return float(np.corrcoef(a, b)[0, 1])


# -- the transform and the warp: golden numbers ----------------------------------------------------------


def test_similarity_transform_recovers_a_known_similarity():
    src = TEMPLATE * 112
    linear = 1.7 * rotation(30.0)
    dst = src @ linear.T + [200.0, 120.0]
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m, [[1.472243, -0.85, 200.0], [0.85, 1.472243, 120.0]], atol=1e-5)
    np.testing.assert_allclose(np.c_[src, np.ones(5)] @ m.T, dst, atol=1e-9)


def test_similarity_transform_is_the_least_squares_fit_and_never_mirrors():
    rng = np.random.default_rng(0)
    src = TEMPLATE * 100
    dst = src @ (2.0 * rotation(-15.0)).T + [30.0, 40.0] + rng.normal(0, 3, (5, 2))
    # the same fit in closed form with points as complex numbers: w = a z + b
    z, w = src[:, 0] + 1j * src[:, 1], dst[:, 0] + 1j * dst[:, 1]
    a = np.vdot(z - z.mean(), w - w.mean()) / np.vdot(z - z.mean(), z - z.mean())
    b = w.mean() - a * z.mean()
    np.testing.assert_allclose(similarity_transform(src, dst),
                               [[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]], atol=1e-9)
    mirrored = similarity_transform(src, src * [-1, 1])
    assert np.linalg.det(mirrored[:, :2]) > 0  # a mirror image is fitted by a rotation, not reproduced
    with pytest.raises(ValueError, match="N x 2"):
        similarity_transform(src, src[:3])


@pytest.mark.parametrize("scale", [1.3, 3.4])  # 3.4: the large face goes through Image.reduce first
def test_align_puts_the_given_landmarks_on_the_template(scale):
    size = 96
    landmarks = TEMPLATE * size @ (scale * rotation(25.0)).T + [140.0, 90.0]
    photo = Image.new("RGB", (640, 520), (0, 0, 0))
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    pixels = np.asarray(photo).copy()
    for (x, y), colour in zip(landmarks, colours, strict=True):  # a 9 x 9 spot on each landmark
        pixels[round(y) - 4 * round(scale):round(y) + 4 * round(scale) + 1,
               round(x) - 4 * round(scale):round(x) + 4 * round(scale) + 1] = colour
    crop = align(Image.fromarray(pixels), landmarks, UTKFACE_TEMPLATE, size, "bilinear")
    assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
    for (x, y), colour in zip(TEMPLATE * size, colours, strict=True):
        assert np.abs(crop[int(y), int(x)].astype(int) - colour).max() < 60, (x, y, crop[int(y), int(x)])


def test_a_checkpoint_carries_its_face_template(tmp_path):
    template = ((0.31, 0.3), (0.69, 0.3), (0.5, 0.52), (0.33, 0.7), (0.67, 0.7))
    prep = Preprocessing(64, (0.5,) * 3, (0.5,) * 3, face_template=[list(p) for p in template])
    assert prep.face_template == template and hash(prep)
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    with pytest.raises(ValueError, match="face_template"):
        Preprocessing(64, (0.5,) * 3, (0.5,) * 3, face_template=template[:4])
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    assert Predictor(ckpt, "cpu", batch_size=1).prep.face_template is None  # aligned with UTKFACE_TEMPLATE
    from agecore.checkpoint import save_checkpoint
    from agecore.config import ModelConfig
    from agecore.model import create_model

    cfg = ModelConfig(backbone="test_resnet", pretrained="none", hidden=16)
    save_checkpoint(tmp_path / "with", create_model(cfg).eval(), cfg, prep, train_cfg={"tta_flip": True})
    assert read_meta(tmp_path / "with")["preprocessing"]["face_template"] == [list(p) for p in template]
    assert Predictor(tmp_path / "with", "cpu", batch_size=1).prep.face_template == template


# -- with MTCNN ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chips(faces_root, facenet) -> list[Image.Image]:
    return [Image.open(faces_root / "final_files" / n).convert("RGB") for n in subset(faces_root, 24)["file_name"]]


@pytest.fixture(scope="module")
def detector(facenet) -> FaceDetector:
    return FaceDetector()


def test_the_template_measured_on_training_crops_matches_the_stored_one(chips):
    template = measure_template(np.asarray(c.resize((112, 112))) for c in chips)
    assert template is not None and len(template) == 5
    np.testing.assert_allclose(template, UTKFACE_TEMPLATE, atol=0.025)
    assert measure_template([np.zeros((112, 112, 3), np.uint8)] * 3) is None  # too few faces to trust


def test_the_template_of_a_folder_reads_its_files_through_the_shared_decode(faces_root, tmp_path):
    names = subset(faces_root, 24)["file_name"]
    for name in names:
        (tmp_path / name).write_bytes((faces_root / "final_files" / name).read_bytes())
    template = template_from_files(tmp_path, n=len(names))
    assert template is not None
    np.testing.assert_allclose(template, UTKFACE_TEMPLATE, atol=0.025)


def test_a_pasted_chip_is_found_and_aligned_back_like_the_original(chips, detector):
    chip = chips[12]
    photo = background((560, 440), seed=1)
    to_photo = paste(chip, photo, scale=1.4, degrees=20.0, centre=(300.0, 210.0))
    faces = detector.detect(photo)
    assert len(faces) == 1 and faces[0].score > 0.95
    # the landmarks sit where the chip's own landmarks went (the template, give or take a face's own shape)
    expected = np.c_[TEMPLATE * chip.width, np.ones(5)] @ to_photo.T
    assert np.abs(np.asarray(faces[0].landmarks) - expected).max() < 0.06 * chip.width * 1.4
    original = np.asarray(chip.resize((112, 112), Image.Resampling.BICUBIC))
    aligned = align(photo, faces[0].landmarks, UTKFACE_TEMPLATE, 112)
    squared = np.asarray(photo.crop(square_box(faces[0].box, 0.05)).resize((112, 112)))
    assert correlation(aligned, original) > 0.85
    assert correlation(aligned, original) > correlation(squared, original) + 0.2  # the square crop stays turned


def test_detection_runs_on_a_working_copy_and_looks_for_faces_in_proportion(chips):
    photo = background((2400, 1800), seed=2)
    to_photo = paste(chips[5], photo, scale=3.0, degrees=0.0, centre=(900.0, 800.0))
    paste(chips[9], photo, scale=0.35, degrees=0.0, centre=(2000.0, 400.0))  # 70 px: under 10% of 1800
    faces = FaceDetector(FaceDetection(working_size=640)).detect(photo)
    assert len(faces) == 1  # the small face is not looked for
    x1, y1, x2, y2 = faces[0].box  # in pixels of the full photo, not of the working copy
    centre = to_photo @ [chips[5].width / 2, chips[5].height / 2, 1]
    assert abs((x1 + x2) / 2 - centre[0]) < 60 and abs((y1 + y2) / 2 - centre[1]) < 90 and x2 - x1 > 300
    both = FaceDetector(FaceDetection(working_size=2400, min_fraction=0.02)).detect(photo)
    assert len(both) == 2 and both[1].box[0] > 1900


# -- age evaluate --detect-faces, end to end through Ray -----------------------------------------------


@pytest.mark.slow
def test_evaluate_detect_faces_scores_one_face_a_photo_and_reports_photos_without_one(
        chips, faces_root, tmp_path, ray_local):
    from ray_jobs.evaluate import main

    ages = subset(faces_root, 24)["real_age"].tolist()
    data = tmp_path / "photos"
    (data / "final_files").mkdir(parents=True)
    rows = []
    for k, i in enumerate((3, 10, 17)):
        photo = background((520, 400), seed=10 + k)
        paste(chips[i], photo, scale=1.2, degrees=10.0 * (k - 1), centre=(260.0, 200.0))
        photo.save(data / "final_files" / f"face{k}.jpg", quality=92)
        rows.append((f"face{k}.jpg", ages[i]))
    background((520, 400), seed=20).save(data / "final_files" / "empty.jpg", quality=92)
    rows.append(("empty.jpg", 40))
    pd.DataFrame(rows, columns=["file_name", "real_age"]).to_csv(data / "labels.csv", index=False)
    out = tmp_path / "eval"

    report = main(["--checkpoint", str(tiny_checkpoint(tmp_path / "ckpt")), "--data", str(data),
                   "--out", str(out), "--detect-faces"])
    assert report["rows"] == 4 and report["scored"] == 3 and report["unscored_by_reason"] == {"no_face": 1}
    faces = report["faces"]
    assert (faces["photos"], faces["with_face"], faces["without_face"]) == (4, 3, 1)
    assert [p.rsplit("/", 1)[1] for p in faces["without_face_listed"]] == ["empty.jpg"]
    no_face = pd.read_csv(out / "no_face.csv")
    assert no_face["path"].str.endswith("empty.jpg").tolist() == [True] and no_face["age"].tolist() == [40]
    assert "empty.jpg" in (out / "report.md").read_text() and "most confident" in (out / "report.md").read_text()
    table = pd.read_parquet(out / "predictions.parquet")
    assert len(table) == 4 and table["predicted_age"].notna().sum() == 3
    with pytest.raises(ValueError, match="prepared set"):
        from ray_jobs.evaluate import predict_table

        (tmp_path / "prep").mkdir()
        (tmp_path / "prep" / "prepare.json").write_text("{}")
        predict_table(str(tmp_path / "ckpt"), str(tmp_path / "prep"), detect_faces=True)


@pytest.mark.slow
def test_the_template_of_a_prepared_training_split_is_what_training_stores(prepared_small, facenet):
    from agecore.faces import template_from_prepared

    template = template_from_prepared(str(prepared_small), n=60)  # 64 px crops: the smallest that prepare makes here
    assert template is not None
    np.testing.assert_allclose(template, UTKFACE_TEMPLATE, atol=0.03)
