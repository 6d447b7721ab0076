"""``age predict``: one line (or one API answer) per face, the library's own ages, and no Ray."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from agecore.checkpoint import attach_calibration
from agecore.evaluate import calibration
from agecore.metrics import verify_answer
from agecore.plots import VERDICT_COLORS
from agecore.predictor import BatchPredictor, Predictor
from ray_jobs.predict import main
from tests.conftest import subset, tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("predict_ckpt"))
    rng = np.random.default_rng(0)
    true = rng.uniform(1, 90, 500)
    attach_calibration(ckpt, calibration(true, true + rng.normal(0, 4, 500)), "test")
    return ckpt


@pytest.fixture(scope="module")
def photos(faces_root, tmp_path_factory):
    """A photo with two pasted faces, a face crop as it is, and a file that is no image."""
    folder = tmp_path_factory.mktemp("predict_photos")
    names = subset(faces_root, 9)["file_name"].iloc[[3, 6]]
    chips = [Image.open(faces_root / "final_files" / n).convert("RGB") for n in names]
    canvas = Image.new("RGB", (640, 360), (128, 128, 128))
    canvas.paste(chips[0], (40, 80))
    canvas.paste(chips[1], (380, 100))
    canvas.save(folder / "two.jpg", quality=92)
    chips[0].save(folder / "crop.png")
    (folder / "notes.jpg").write_text("not an image\n")
    return folder


def test_json_answers_are_the_librarys_faces_with_their_verdicts(checkpoint, photos, capsys):
    main(["--checkpoint", str(checkpoint), "--json", "--min-age", "21", str(photos / "two.jpg"), str(photos / "crop.png")])
    two, crop = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    library = Predictor(checkpoint).predict_faces(str(photos / "two.jpg"))
    assert [f["age"] for f in two["faces"]] == pytest.approx([round(f["age"], 2) for f in library], abs=1e-6)
    assert [f["box"] for f in two["faces"]] == [f["box"] for f in library] and len(library) == 2
    cal = json.loads((checkpoint / "calibration.json").read_text())
    for face, found in zip(two["faces"], library, strict=True):
        expected = verify_answer(found["age"], 21, cal, 12.0)
        assert face["verdict"] == expected["verdict"] and face["likely_range"] == expected["likely_range"]
    assert two["min_age"] == 21 and two["verdict"] == two["faces"][1]["verdict"]  # the larger face's
    assert [f["aligned"] for f in crop["faces"]] == [False]  # a training-like crop, taken as it is


def test_lines_drawings_and_a_bad_file_reported_on_its_own(checkpoint, photos, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--checkpoint", str(checkpoint), "--draw", str(tmp_path / "drawn"),
              str(photos / "two.jpg"), str(photos / "notes.jpg"), str(photos / "crop.png")])
    assert exited.value.code == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split("  ")[:2] for line in lines] == [
        [str(photos / "two.jpg"), "face 1/2"], [str(photos / "two.jpg"), "face 2/2"], [str(photos / "crop.png"), "face 1/1"]]
    assert lines[2].endswith("(as a face crop)") and "verdict" not in out
    assert f"{photos / 'notes.jpg'}: error: " in err and "1 of 3 photos could not be read" in err
    drawn = np.asarray(Image.open(tmp_path / "drawn" / "two.png").convert("RGB")).astype(int)
    assert drawn.shape == (360, 640, 3)
    for face in Predictor(checkpoint).predict_faces(str(photos / "two.jpg")):  # each box's left edge, mid-height
        x1, y1, _, y2 = (round(v) for v in face["box"])
        assert np.abs(drawn[(y1 + y2) // 2, x1] - VERDICT_COLORS[None]).max() <= 2
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == ["crop.png", "two.png"]


def test_age_predict_starts_no_ray(checkpoint, photos):
    code = ("import sys; from ray_jobs.cli import main; "
            f"main(['predict', '--checkpoint', {str(checkpoint)!r}, {str(photos / 'crop.png')!r}]); "
            "assert 'ray' not in sys.modules, 'ray was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{photos / 'crop.png'}  face 1/1  box 0,0,200,200  age ")


def test_a_missing_detector_is_one_line_and_exit_2_before_the_model_loads(checkpoint, photos, tmp_path):
    import os

    fake = tmp_path / "site" / "facenet_pytorch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("No module named facenet_pytorch")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "ray_jobs.cli", "predict", "--checkpoint", str(tmp_path / "nowhere"),
                           str(photos / "two.jpg")], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        done.stderr.strip()] and 'age predict: error: face detection needs facenet-pytorch' in done.stderr
    crop = subprocess.run([sys.executable, "-m", "ray_jobs.cli", "predict", "--checkpoint", str(checkpoint),
                           "--detect-faces", "false", str(photos / "crop.png")], capture_output=True, text=True,
                          timeout=300, env=env)
    assert crop.returncode == 0 and "(as a face crop)" in crop.stdout, crop.stderr  # crops need no detector


def test_predict_paths_gives_each_path_its_own_age(checkpoint, photos, tmp_path):
    """The ages of a list, a bad file among them, are each image's own: a path<->age mix-up fails here."""
    for i, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200), (230, 230, 230)]):
        Image.new("RGB", (80, 80), colour).save(tmp_path / f"block{i}.png")
    paths = [str(photos / "crop.png"), *(str(tmp_path / f"block{i}.png") for i in range(2)), str(photos / "notes.jpg"),
             *(str(tmp_path / f"block{i}.png") for i in range(2, 4)), str(photos / "two.jpg")]
    predictor = Predictor(checkpoint)
    ages, errors = predictor.predict_paths(paths)
    one_by_one = np.array([np.nan if p.endswith("notes.jpg") else predictor.predict(p) for p in paths])
    np.testing.assert_allclose(ages, one_by_one, atol=1e-3, equal_nan=True)
    assert [bool(e) for e in errors] == [p.endswith("notes.jpg") for p in paths] and errors[3].startswith("not_an_image")
    # the untrained checkpoint still tells these images apart by more than the tolerance: swapped ages show
    assert np.diff(np.sort(ages[np.isfinite(ages)])).min() > 2e-3, ages


def test_batch_predictor_gives_each_face_its_own_age(checkpoint, photos, facenet):
    """Ray Data's callable with detect_faces: each row the age ``predict_faces`` gives its face, in order."""
    paths = [str(photos / "two.jpg"), str(photos / "notes.jpg"), str(photos / "crop.png")]
    rows = BatchPredictor(str(checkpoint), detect_faces=True)({"path": np.array(paths, dtype=object)})
    predictor = Predictor(checkpoint)
    expected = [(p, k, f["age"]) for p in paths if not p.endswith("notes.jpg")
                for k, f in enumerate(predictor.predict_faces(p, "true"))]
    found = rows[rows["face"].notna()]
    assert list(zip(found["path"], found["face"], strict=True)) == [(p, k) for p, k, _ in expected]
    np.testing.assert_allclose(found["predicted_age"], [a for *_, a in expected], atol=1e-3)
    assert len(expected) >= 3 and np.diff(np.sort([a for *_, a in expected])).min() > 2e-3  # distinct ages: a mix-up would show
    assert rows.loc[rows["path"] == paths[1], "error"].iloc[0].startswith("not_an_image")


def test_a_read_only_batch_predicts_without_a_warning(checkpoint):
    """Arrays from Arrow buffers and memory maps are read-only: the same ages, and no torch warning on stderr."""
    predictor = Predictor(checkpoint)
    batch = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    frozen = batch.copy()
    frozen.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ages = predictor.predict_arrays(frozen)
    np.testing.assert_array_equal(ages, predictor.predict_arrays(batch))
