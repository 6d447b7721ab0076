"""Outputs and checkpoints on URIs. ``file://`` URIs take the same pyarrow path as ``s3://`` ones."""

import json

import numpy as np
import pytest

from agecore import storage
from agecore.checkpoint import attach_calibration, load_checkpoint, read_meta
from agecore.predictor import Predictor
from tests.conftest import tiny_checkpoint


def test_output_dir_uploads_to_a_uri_only_when_the_block_succeeds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URI taken for a local path would leave a "file:" folder here
    uri = f"file://{tmp_path}/runs/out"
    with storage.output_dir(uri) as local:
        (local / "report").mkdir()
        (local / "report" / "summary.json").write_text('{"mae": 5.0}')
        assert not (tmp_path / "runs" / "out").exists()  # staged, not yet uploaded
    assert json.loads((tmp_path / "runs" / "out" / "report" / "summary.json").read_text()) == {"mae": 5.0}
    assert json.loads(storage.read_text(storage.join(uri, "report", "summary.json"))) == {"mae": 5.0}

    with pytest.raises(RuntimeError), storage.output_dir(f"file://{tmp_path}/runs/failed") as local:
        (local / "half.json").write_text("{}")
        raise RuntimeError("the step failed")
    assert not (tmp_path / "runs" / "failed").exists()
    assert not (tmp_path / "file:").exists()


def test_checkpoint_loads_and_serves_from_a_uri(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "best")
    uri = f"file://{ckpt}"
    assert read_meta(uri) == read_meta(ckpt)
    model, _ = load_checkpoint(uri)
    reference, _ = load_checkpoint(ckpt)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert np.array_equal(a.numpy(), b.numpy()), name
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    assert np.allclose(Predictor(uri).predict_arrays(images), Predictor(ckpt).predict_arrays(images))
    path = attach_calibration(uri, {"overall": [-3.0, 3.0]}, source="test")
    assert path.startswith("file://")
    assert json.loads((ckpt / "calibration.json").read_text())["overall"] == [-3.0, 3.0]


def test_missing_uri_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an agecore checkpoint"):
        read_meta(f"file://{tmp_path}/nothing")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_checkpoint(f"file://{tmp_path}/nothing")


def test_inputs_behind_a_file_uri_read_as_local_ones(tmp_path):
    """Readers take a URI through pyarrow, ``file://`` included, and give the same rows as the plain path."""
    from PIL import Image

    from agecore.datasets import list_images, read_records
    from agecore.images import read_bytes

    (tmp_path / "final_files" / "sub").mkdir(parents=True)
    for name in ("a.jpg", "sub/b.png"):
        Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "final_files" / name)
    (tmp_path / "final_files" / "notes.txt").write_text("not an image")
    (tmp_path / "labels.csv").write_text("file_name,real_age\na.jpg,31\nsub/b.png,007\n")
    uri = f"file://{tmp_path}"

    assert list_images(f"{uri}/final_files") == [f"file://{p}" for p in list_images(str(tmp_path / "final_files"))]
    assert len(list_images(f"{uri}/final_files")) == 2
    records, fmt = read_records(uri)
    local, _ = read_records(str(tmp_path))
    assert fmt == "labels-csv"
    assert records["age"].tolist() == local["age"].tolist() == ["31", "007"]  # labels stay text, as written
    assert records["path"].tolist() == [f"{uri}/final_files/a.jpg", f"{uri}/final_files/sub/b.png"]
    assert read_bytes(records["path"][0]) == (tmp_path / "final_files" / "a.jpg").read_bytes()
    with pytest.raises(Exception, match="missing_file"):
        read_bytes(f"{uri}/final_files/gone.jpg")
