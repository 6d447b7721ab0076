"""The Serve application under serve.run: every route, a 4xx JSON error for each bad input, the web
page in headless Chromium, and a redeploy with another checkpoint under load."""

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from agecore.evaluate import attach_calibration, calibration
from tests.conftest import free_port, jpeg_bytes, subset, tiny_checkpoint

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def serve_checkpoint(tmp_path_factory) -> Path:
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("serve_ckpt"))
    rng = np.random.default_rng(0)
    true = rng.uniform(1, 90, 500)
    attach_calibration(ckpt, calibration(true, true + rng.normal(0, 4, 500)), "test")
    return ckpt


def deploy(checkpoint: Path) -> None:
    """What ``serve deploy`` of the config with ``args.checkpoint`` changed does: same app name, new args."""
    from ray import serve

    from ray_jobs.serve import build_app

    serve.run(build_app({"checkpoint": str(checkpoint), "max_body_mb": 1}), name="age", route_prefix="/")


@pytest.fixture(scope="module")
def service(serve_checkpoint, ray_local):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy(serve_checkpoint)
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


def test_requests_that_arrive_during_a_forward_pass_share_the_next_one(service):
    import asyncio

    from ray import serve

    from ray_jobs.serve import SharedForward

    class SlowModel:
        """A stand-in predictor whose forward pass takes 0.3 s and records its batch sizes."""

        def __init__(self) -> None:
            self.batches: list[int] = []

        def predict_arrays(self, images: np.ndarray) -> np.ndarray:
            self.batches.append(len(images))
            time.sleep(0.3)
            return np.full(len(images), 30.0, np.float32)

    @serve.deployment(ray_actor_options={"num_cpus": 0})  # beside the service's replica on a small machine
    class Batching:
        def __init__(self) -> None:
            self.model = SlowModel()
            self.forward = SharedForward(self.model)

        async def __call__(self, delay: float) -> float:
            await asyncio.sleep(delay)
            return await self.forward(np.zeros((8, 8, 3), np.uint8))

        def batches(self) -> list[int]:
            return self.model.batches

    handle = serve.run(Batching.bind(), name="batching", route_prefix=None)
    try:
        assert handle.remote(0).result() == 30.0  # alone: straight to the model
        # one request starts a pass, four more arrive one by one while it runs
        assert [r.result() for r in [handle.remote(0.04 * i) for i in range(5)]] == [30.0] * 5
        assert handle.batches.remote().result() == [1, 1, 4]  # with no wait Serve made [1, 1, 1, 1, 1, 1]
    finally:
        serve.delete("batching")


def test_config_precision_is_checked_before_any_replica_starts(serve_checkpoint):
    from ray_jobs.serve import age_app

    with pytest.raises(ValueError, match="precision must be fp32 or bf16"):
        age_app({"checkpoint": str(serve_checkpoint), "precision": "fp16"})


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


@pytest.fixture
def browser(tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not installed (scripts/setup.sh installs Debian's chromium and chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: Selenium Manager would otherwise try to download one
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def test_page_shows_the_estimate_for_an_uploaded_face(service, browser, faces_root, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = faces_root / "final_files" / subset(faces_root, 3)["file_name"][1]
    expected = requests.post(f"{service}/v1/age", files={"file": (image.name, image.read_bytes(), "image/jpeg")},
                             timeout=60).json()["age"]
    browser.get(f"{service}/")
    browser.find_element(By.ID, "file").send_keys(str(image))
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    shown = WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.ID, "age"))[0].text
    # the page shows one decimal of the same estimate
    assert 0 < float(shown) < 120 and float(shown) == pytest.approx(expected, abs=0.051)
    assert browser.find_element(By.ID, "verdict").text in ("yes, at least 18", "no, under 18", "uncertain")
    assert "test_resnet" in browser.find_element(By.ID, "model").text
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []

    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image\n")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    result = browser.find_element(By.ID, "result")
    WebDriverWait(browser, 60).until(lambda d: "not_an_image" in result.text)
    assert result.get_attribute("class") == "error" and not browser.find_elements(By.ID, "age")


def test_redeploy_with_another_checkpoint_drops_no_request(service, serve_checkpoint, tmp_path):
    """Two clients post without pause while the app rolls to another checkpoint and back."""
    other = tiny_checkpoint(tmp_path / "other", hidden=8, seed=1, val_mae=5.0, epoch=3)
    first, second = str(serve_checkpoint.resolve()), str(other.resolve())
    answered: list[str] = []  # model.checkpoint of each answer, in order
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    r = session.post(f"{service}/v1/age", data=face(), headers={"content-type": "image/jpeg"},
                                     timeout=30)
                except requests.RequestException as e:
                    failures.append(repr(e))
                    continue
                if r.status_code == 200:
                    answered.append(r.json()["model"]["checkpoint"])
                else:
                    failures.append(f"{r.status_code}: {r.text[:200]}")

    def answers_after(n: int) -> list[str]:
        """The next ``n`` answers from now."""
        start, deadline = len(answered), time.monotonic() + 30
        while len(answered) < start + n and time.monotonic() < deadline:
            time.sleep(0.05)
        return answered[start : start + n]

    clients = [threading.Thread(target=client, daemon=True) for _ in range(2)]
    for t in clients:
        t.start()
    try:
        before = answers_after(10)
        deploy(other)
        after = answers_after(20)
        deploy(serve_checkpoint)  # back, for the other tests of this module
        back = answers_after(20)
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=60)
    assert failures == []
    # serve.run returns once the new replica is up; the old one drains a moment longer
    assert before == [first] * 10 and after[-10:] == [second] * 10 and back[-10:] == [first] * 10
