"""The Serve application under serve.run: every route, and a 4xx JSON error for each bad input."""

import io
import socket

import numpy as np
import pytest
import requests
from PIL import Image

from agecore.checkpoint import save_checkpoint
from agecore.config import ModelConfig, Preprocessing
from agecore.evaluate import attach_calibration, calibration
from agecore.model import create_model
from tests.conftest import jpeg_bytes

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory, ray_local):
    from ray import serve

    from ray_jobs.serve import build_app

    cfg = ModelConfig(backbone="test_resnet", pretrained="none", hidden=16)
    ckpt = tmp_path_factory.mktemp("serve_ckpt")
    save_checkpoint(ckpt, create_model(cfg).eval(), cfg, Preprocessing(64, (0.5,) * 3, (0.5,) * 3),
                    metrics={"val_mae": 6.0}, train_cfg={"tta_flip": True})
    rng = np.random.default_rng(0)
    true = rng.uniform(1, 90, 500)
    attach_calibration(ckpt, calibration(true, true + rng.normal(0, 4, 500)), "test")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"checkpoint": str(ckpt), "max_body_mb": 1}), name="age", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def face() -> bytes:
    return jpeg_bytes((120, 120), color=(180, 140, 120))


def test_routes_answer(service):
    assert requests.get(f"{service}/healthz", timeout=30).json() == {"status": "ok"}
    one = requests.post(f"{service}/v1/age", files={"file": ("a.jpg", face(), "image/jpeg")}, timeout=60).json()
    assert 0 < one["age"] < 130 and one["model"]["backbone"] == "test_resnet" and one["seconds"] >= 0
    raw = requests.post(f"{service}/v1/age", data=face(), headers={"content-type": "image/jpeg"}, timeout=60).json()
    assert raw["age"] == pytest.approx(one["age"], abs=1e-3)
    batch = requests.post(f"{service}/v1/age/batch", timeout=60, files=[
        ("files", ("a.jpg", face(), "image/jpeg")), ("files", ("bad.jpg", b"nope", "image/jpeg"))]).json()
    assert batch["results"][0]["age"] == pytest.approx(one["age"], abs=1e-3)
    assert batch["results"][1]["error"] == "not_an_image"
    verify = requests.post(f"{service}/v1/verify?min_age=18", files={"file": ("a.jpg", face(), "image/jpeg")},
                           timeout=60).json()
    assert verify["verdict"] in ("yes", "no", "uncertain") and verify["likely_range"][0] <= verify["age"]
    assert "band" in verify["margin_source"]
    model = requests.get(f"{service}/v1/model", timeout=30).json()
    assert model["calibrated"] and model["metrics"]["val_mae"] == 6.0
    assert "<form" in requests.get(f"{service}/", timeout=30).text
    assert requests.get(f"{service}/openapi.json", timeout=30).json()["paths"]["/v1/verify"]


@pytest.mark.parametrize(
    ("kwargs", "status", "error"),
    [
        ({"files": {"file": ("a.jpg", b"not an image", "image/jpeg")}}, 422, "not_an_image"),
        ({"files": {"file": ("a.jpg", jpeg_bytes((120, 120))[:300], "image/jpeg")}}, 422, "truncated"),
        ({"files": {"file": ("a.jpg", b"", "image/jpeg")}}, 422, "empty_file"),
        ({"data": b"x" * (2 * 1024 * 1024), "headers": {"content-type": "image/jpeg"}}, 413, "body_too_large"),
        ({"data": b"{}", "headers": {"content-type": "application/json"}}, 415, "unsupported_media_type"),
        ({"files": {"other": (None, "text")}}, 422, "missing_file"),
    ],
)
def test_bad_input_gets_a_4xx_json_error_and_the_service_stays_healthy(service, kwargs, status, error):
    r = requests.post(f"{service}/v1/age", timeout=60, **kwargs)
    assert r.status_code == status and r.json()["error"] == error and r.json()["message"]
    assert requests.get(f"{service}/healthz", timeout=30).status_code == 200


def test_decompression_bomb_and_bad_min_age(service):
    buf = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buf, "PNG", optimize=True)
    r = requests.post(f"{service}/v1/age", files={"file": ("bomb.png", buf.getvalue(), "image/png")}, timeout=60)
    assert r.status_code == 413 and r.json()["error"] == "too_many_pixels"
    r = requests.post(f"{service}/v1/verify?min_age=500", files={"file": ("a.jpg", face(), "image/jpeg")}, timeout=60)
    assert r.status_code == 422
