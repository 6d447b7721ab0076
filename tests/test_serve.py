"""The Serve application under serve.run: every route, a 4xx JSON error for each bad input, the web
page in headless Chromium, and a redeploy with another checkpoint under load."""

import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from agecore.checkpoint import attach_calibration, weights_digest
from agecore.evaluate import calibration
from agecore.metrics import fallback_margin, verify_answer
from agecore.predictor import Predictor
from tests.conftest import free_port, jpeg_bytes, missing, subset, tiny_checkpoint

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
STRICT_CHALLENGE = 15.0  # years over min_age an estimate must be to get 'yes' (serve_checkpoint's calibration)
# HTTP answers round ages to 0.01; beyond that they must be the library's to 1e-3
HTTP_TOL = 0.005 + 1e-3


@pytest.fixture(scope="module")
def serve_checkpoint(tmp_path_factory) -> Path:
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("serve_ckpt"))
    rng = np.random.default_rng(0)
    true = rng.uniform(1, 90, 500)
    cal = calibration(true, true + rng.normal(0, 4, 500))
    # a strict, hand-made challenge table: with errors of sd 4 the measured one never decides a verdict
    # (a range that clears min_age puts the estimate over it too), and tests must see it decide one
    cal["challenge"]["by_min_age"] = {str(t): {"count": 40, "estimate": t + STRICT_CHALLENGE} for t in range(8, 41)}
    attach_calibration(ckpt, cal, "test")
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


def test_age_serve_says_where_it_listens_and_keeps_rays_own_logs_in_its_file(serve_checkpoint, tmp_path):
    """The command a user types: a few lines on the terminal once the service answers, Ray's and
    Serve's own output in --log-file, and Ctrl-C stops it with status 130."""
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    log_file = tmp_path / "logs" / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "ray_jobs.cli", "serve", "--checkpoint", str(serve_checkpoint),
                             "--port", str(port), "--metrics-port", str(metrics_port), "--log-file", str(log_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x.rstrip("\n")) for x in proc.stderr], daemon=True).start()
        said = []
        while not (said and said[-1].startswith("  Ctrl-C")):
            said.append(lines.get(timeout=120))  # the lines come once the service answers
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json() == {"status": "ok"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.5)  # the reader thread takes the last line
    rest = []
    while not lines.empty():
        rest.append(lines.get())
    assert said[0] == f"serving {serve_checkpoint} (test_resnet, validation MAE 6.00) at http://127.0.0.1:{port}/"
    assert said[1] == f"  the page: http://127.0.0.1:{port}/   the API's docs: http://127.0.0.1:{port}/docs"
    assert said[2].startswith(f"  logs: {log_file}; ")
    assert said[3] == "  Ctrl-C stops it" and len(said) == 4 and rest == ["age serve: interrupted"], (said, rest)
    assert out == ""
    log = log_file.read_text()
    assert "Started a local Ray instance" in log and "Application 'age' is ready" in log


def test_routes_answer(service):
    assert requests.get(f"{service}/healthz", timeout=30).json() == {"status": "ok"}
    one = requests.post(f"{service}/v1/age?detect_faces=false", files={"file": ("a.jpg", face(), "image/jpeg")}, timeout=60).json()
    assert 0 < one["age"] < 130 and one["model"]["backbone"] == "test_resnet" and one["seconds"] >= 0
    raw = requests.post(f"{service}/v1/age?detect_faces=false", data=face(), headers={"content-type": "image/jpeg"}, timeout=60).json()
    assert raw["age"] == pytest.approx(one["age"], abs=1e-3)
    batch = requests.post(f"{service}/v1/age/batch?detect_faces=false", timeout=60, files=[
        ("files", ("a.jpg", face(), "image/jpeg")), ("files", ("bad.jpg", b"nope", "image/jpeg"))]).json()
    assert batch["results"][0]["age"] == pytest.approx(one["age"], abs=1e-3)
    assert batch["results"][1]["error"] == "not_an_image"
    verify = requests.post(f"{service}/v1/verify?min_age=18&detect_faces=false", files={"file": ("a.jpg", face(), "image/jpeg")},
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

    from ray_jobs.serve.batching import SharedForward

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
    from ray_jobs.serve import build_app

    with pytest.raises(ValueError, match="precision must be one of"):
        build_app({"checkpoint": str(serve_checkpoint), "precision": "fp16"})


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
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        missing(f"{CHROMIUM} and {CHROMEDRIVER} are not installed: apt-get install chromium chromium-driver "
                "(scripts/setup.sh --dev does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: Selenium Manager would otherwise try to download one
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def test_page_draws_every_face_of_a_photo_and_takes_a_selfie(service, browser, faces_root, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "two.jpg"
    photo.write_bytes(two_face_photo(faces_root))
    expected = requests.post(f"{service}/v1/verify?min_age=18", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")},
                             timeout=60).json()
    browser.get(f"{service}/")
    browser.find_element(By.ID, "file").send_keys(str(photo))
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    shown = WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "li.face .face-age"))
    # one line per face, each one decimal of the API's estimate for that face
    assert [float(e.text) for e in shown] == pytest.approx([f["age"] for f in expected["faces"]], abs=0.051)
    assert len(shown) == 2 and float(browser.find_element(By.ID, "age").text) == pytest.approx(
        expected["faces"][1]["age"], abs=0.051)  # the headline is the larger face
    canvas = browser.find_element(By.ID, "photo")
    assert canvas.is_displayed() and canvas.get_attribute("width") == "640"  # the photo, drawn with its boxes
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

    # Chromium's fake camera shows a test pattern, no face: the page says so, with the rule it was held to
    browser.find_element(By.ID, "camera-button").click()
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.getElementById('video').videoWidth > 0"))
    browser.find_element(By.ID, "snap").click()
    WebDriverWait(browser, 60).until(lambda d: "No face found" in result.text)
    assert "no face with score >=" in result.text and canvas.is_displayed()


def test_redeploy_with_another_checkpoint_drops_no_request(service, serve_checkpoint, tmp_path):
    """Two clients post without pause while the app rolls to another checkpoint and back."""
    other = tiny_checkpoint(tmp_path / "other", hidden=8, seed=1, val_mae=5.0, epoch=3)
    first, second = weights_digest(serve_checkpoint), weights_digest(other)
    answered: list[str] = []  # model.weights of each answer, in order
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    r = session.post(f"{service}/v1/age?detect_faces=false", data=face(), headers={"content-type": "image/jpeg"},
                                     timeout=30)
                except requests.RequestException as e:
                    failures.append(repr(e))
                    continue
                if r.status_code == 200:
                    answered.append(r.json()["model"]["weights"])
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


# -- the API as a client meets it: one refusal shape, bounded reads, schema, metrics ---------------

MULTIPART_NO_BOUNDARY = {"data": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}
BROKEN_MULTIPART = {"data": b"--b\r\nContent-Disposition: form-data\r\n\r\nx", "headers": {
    "content-type": "multipart/form-data; boundary=b"}}


def _parts(n: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(n)]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "error"),
    [
        ("post", "/v1/verify?min_age=abc", {"data": b"x", "headers": {"content-type": "image/jpeg"}}, 422,
         "invalid_parameter"),
        ("post", "/v1/verify?min_age=101", {"data": b"x", "headers": {"content-type": "image/jpeg"}}, 422,
         "invalid_parameter"),
        ("post", "/v1/age?detect_faces=maybe", {"data": b"x", "headers": {"content-type": "image/jpeg"}}, 422,
         "invalid_parameter"),
        ("post", "/v1/age", MULTIPART_NO_BOUNDARY, 400, "bad_multipart"),
        ("post", "/v1/age", BROKEN_MULTIPART, 400, "bad_multipart"),
        ("post", "/v1/age/batch", {"files": _parts(2000)}, 422, "too_many_files"),
        ("post", "/v1/age/batch", {"files": _parts(33)}, 422, "too_many_files"),
        ("post", "/v1/age", {"files": _parts(2)}, 422, "too_many_files"),
        ("get", "/v2/nothing", {}, 404, "not_found"),
        ("get", "/v1/age", {}, 405, "method_not_allowed"),
        ("delete", "/healthz", {}, 405, "method_not_allowed"),
    ],
)
def test_framework_refusals_have_the_service_shape(service, method, path, kwargs, status, error):
    from ray_jobs.serve.schema import REFUSALS

    r = requests.request(method, f"{service}{path}", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error", "message"} and r.json()["error"] == error and r.json()["message"]
    assert REFUSALS[error][0] == status and r.headers["x-request-id"]


def test_request_id_is_echoed_and_answers_name_the_model_without_a_path(service, serve_checkpoint):
    from agecore import __version__
    from ray_jobs.serve.schema import MAX_FILES, ModelIdentity

    r = requests.post(f"{service}/v1/age?detect_faces=false", data=face(), headers={"content-type": "image/jpeg",
                                                                  "X-Request-ID": "client-42"}, timeout=60)
    assert r.headers["x-request-id"] == "client-42"
    assert requests.get(f"{service}/healthz", timeout=30).headers["x-request-id"]  # made up when not sent
    answer = r.json()
    assert set(answer["model"]) == set(ModelIdentity.model_fields)
    assert answer["model"]["weights"] == weights_digest(serve_checkpoint) and answer["model"]["version"] == __version__
    assert str(serve_checkpoint.parent) not in r.text
    low, high = answer["likely_range"]
    assert low < answer["age"] < high  # the calibration of the fixture: errors of sd 4 years
    model = requests.get(f"{service}/v1/model", timeout=30).json()
    assert model["limits"] == {"max_body_bytes": 1024 * 1024, "max_files": MAX_FILES, "batch_size": 16}
    assert str(serve_checkpoint.parent) not in str(model)


def _replica_pid(app: str) -> int:
    from ray._private import state

    (pid,) = [a["Pid"] for a in state.actors().values()
              if a["State"] == "ALIVE" and a["ActorClassName"].startswith(f"ServeReplica:{app}")]
    return pid


def _peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024


def test_a_chunked_body_over_the_limit_is_cut_off_while_reading(service):
    """200 MB sent chunked, with no Content-Length: refused, and the replica never holds the body.

    Serve's proxy queues what the client sends and the replica fetches the queue in batches, so the
    replica's peak grows by a part of what arrived before its first read (measured: 47 MB of 100),
    not by the body.
    """
    import contextlib
    import http.client
    from urllib.parse import urlparse

    pid = _replica_pid("age")
    before = _peak_rss_mb(pid)

    def body():
        for _ in range(200):
            yield b"\0" * (1024 * 1024)

    url = urlparse(service)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    # the service may answer and close while the client still sends: the point of the test
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        conn.request("POST", "/v1/age", body=body(), headers={"content-type": "image/jpeg"}, encode_chunked=True)
    r = conn.getresponse()
    answer = r.read()
    conn.close()
    assert r.status == 413 and b'"body_too_large"' in answer
    assert _peak_rss_mb(pid) - before < 100
    assert requests.get(f"{service}/healthz", timeout=30).status_code == 200


def two_face_photo(faces_root: Path) -> bytes:
    """A 640x480 photo with two people's UTKFace chips pasted on grey, the larger on the right."""
    small, large = (Image.open(faces_root / "final_files" / name).convert("RGB")
                    for name in subset(faces_root, 9)["file_name"].iloc[[3, 6]])
    canvas = Image.new("RGB", (640, 480), (128, 128, 128))
    canvas.paste(small.resize((small.width // 2, small.height // 2)), (40, 80))
    canvas.paste(large, (330, 100))
    buf = io.BytesIO()
    canvas.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_detect_faces_on_batch_and_verify(service, faces_root):
    photo, plain = two_face_photo(faces_root), jpeg_bytes((640, 480), color=(128, 128, 128))
    batch = requests.post(f"{service}/v1/age/batch?detect_faces=true", timeout=120, files=[
        ("files", ("two.jpg", photo, "image/jpeg")), ("files", ("plain.jpg", plain, "image/jpeg"))])
    assert batch.status_code == 200, batch.text
    two, none = batch.json()["results"]
    assert two["box"][0] > 300 and 0 < two["age"] < 130 and two["error"] is None and two["aligned"] is True
    assert none["error"] == "no_face" and none["age"] is None
    verify = requests.post(f"{service}/v1/verify?detect_faces=true&min_age=21", timeout=120,
                           files={"file": ("two.jpg", photo, "image/jpeg")}).json()
    assert len(verify["faces"]) == 2 and verify["min_age"] == 21
    assert all(f["verdict"] in ("yes", "no", "uncertain") and f["likely_range"][0] <= f["age"] for f in verify["faces"])
    assert verify["verdict"] == verify["faces"][1]["verdict"]  # the larger face's


def test_auto_takes_a_face_crop_as_it_is_and_a_photo_through_detection(service, faces_root):
    chip = (faces_root / "final_files" / subset(faces_root, 9)["file_name"][6]).read_bytes()
    post = lambda data, detect: requests.post(f"{service}/v1/age?detect_faces={detect}", data=data,  # noqa: E731
                                              headers={"content-type": "image/jpeg"}, timeout=120).json()
    auto, crop = post(chip, "auto"), post(chip, "false")
    assert [f["aligned"] for f in auto["faces"]] == [False] and auto["faces"][0]["box"][2:] == [200.0, 200.0]
    assert auto["age"] == pytest.approx(crop["age"], abs=1e-3)  # the crop path, pixel for pixel
    photo = two_face_photo(faces_root)
    auto, detected = post(photo, "auto"), post(photo, "true")
    assert [f["aligned"] for f in auto["faces"]] == [True, True]
    assert [f["age"] for f in auto["faces"]] == pytest.approx([f["age"] for f in detected["faces"]], abs=1e-3)
    assert auto["age"] == auto["faces"][1]["age"]  # the larger face's
    assert post(jpeg_bytes((640, 480), color=(128, 128, 128)), "auto")["faces"] == []  # never the whole frame


def test_a_client_generated_from_the_schema_reads_an_estimate(service, tmp_path, monkeypatch):
    import shutil
    import subprocess
    import sys

    generator = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
    if generator is None:
        missing("openapi-python-client is not installed: pip install -e '.[dev]'")
    (tmp_path / "openapi.json").write_bytes(requests.get(f"{service}/openapi.json", timeout=30).content)
    # raw image bodies (image/*) are plain binary to the generator
    (tmp_path / "config.yaml").write_text("content_type_overrides:\n  image/*: application/octet-stream\n")
    subprocess.run([generator, "generate", "--path", "openapi.json", "--config", "config.yaml", "--meta", "none",
                    "--output-path", "age_client"], cwd=tmp_path, check=True, capture_output=True, timeout=120)
    monkeypatch.syspath_prepend(str(tmp_path))
    from age_client import Client
    from age_client.api.default import age_v1_age_post, verify_v1_verify_post
    from age_client.models import AgeAnswer, AgeV1AgePostFilesBody, Refusal, VerifyAnswer
    from age_client.types import File

    client = Client(base_url=service, timeout=60)
    crop = {"client": client, "detect_faces": "false"}  # a colour block is no face: the crop path
    form = age_v1_age_post.sync(**crop, body=AgeV1AgePostFilesBody(file=File(io.BytesIO(face()), "a.jpg", "image/jpeg")))
    raw = age_v1_age_post.sync(**crop, body=File(io.BytesIO(face()), "a.jpg", "image/jpeg"))
    assert isinstance(form, AgeAnswer) and isinstance(raw, AgeAnswer)
    assert 0 < form.age < 130 and raw.age == pytest.approx(form.age, abs=1e-3) and form.model.backbone == "test_resnet"
    refused = age_v1_age_post.sync(client=client, body=File(io.BytesIO(b"nope"), "a.jpg"))
    assert isinstance(refused, Refusal) and refused.error == "not_an_image"
    verdict = verify_v1_verify_post.sync(**crop, body=File(io.BytesIO(face()), "a.jpg"), min_age=30)
    assert isinstance(verdict, VerifyAnswer) and verdict.min_age == 30


def test_metrics_are_scraped_from_the_metrics_port(service):
    """Last of the module: every earlier test's requests are counted; Ray exports every few seconds."""
    import ray

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    wanted = ("ray_age_requests_total", "ray_age_refusals_total", "ray_age_request_seconds_bucket",
              "ray_age_images_per_request_bucket", "ray_age_forward_batch_size_bucket",
              "ray_serve_num_http_requests_total")  # faces_per_image: only once a detect_faces request came
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(name in text for name in wanted) and 'reason="not_found"' in text:
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert missing == [], missing
    assert 'route="/v1/age"' in text and 'reason="body_too_large"' in text and 'reason="too_many_files"' in text


def test_readme_curl_examples_answer_as_documented(service, faces_root, tmp_path, monkeypatch):
    """The README's curl lines, run as written against the service (its port in place of 8000)."""
    import json
    import re
    import subprocess

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [line for block in re.findall(r"^```bash\n(.*?)^```", readme, flags=re.S | re.M)
             for line in block.splitlines() if line.startswith("curl ")]
    assert len(lines) >= 2, "the README has no curl example"
    (tmp_path / "photo.jpg").write_bytes(two_face_photo(faces_root))
    monkeypatch.chdir(tmp_path)
    for line in lines:
        command = line.split(" #")[0].replace("http://127.0.0.1:8000", service)
        done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (line, done.stderr)
        answer = json.loads(done.stdout)
        assert "error" not in answer, (line, answer)
        assert len(answer["faces"]) == 2, (line, answer)  # the photo's two faces, found by default
        if "/v1/verify" in line:
            assert answer["verdict"] == answer["faces"][1]["verdict"] in ("yes", "no", "uncertain")
        else:
            assert answer["age"] == answer["faces"][1]["age"] and len(answer["likely_range"]) == 2, (line, answer)


HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64  # the head of a phone's HEIC photo


@pytest.mark.parametrize(
    ("module", "source", "status", "error"),
    [
        ("facenet_pytorch", 'raise ImportError("No module named facenet_pytorch")\n', 501, "face_detection_unavailable"),
        ("facenet_pytorch", "class MTCNN:\n    def __init__(self, *args, **kwargs):\n        raise RuntimeError('broken')\n",
         500, "internal_error"),
        ("pillow_heif", 'raise ImportError("No module named pillow_heif")\n', 415, "unsupported_format"),
    ],
    ids=["detector-missing", "detector-broken", "heif-missing"],
)
def test_a_missing_or_broken_package_answers_in_the_refusal_shape(service, serve_checkpoint, faces_root, tmp_path,
                                                                   module, source, status, error):
    """A replica without facenet_pytorch answers 501 naming the install, a bug in it 500, and one without
    pillow-heif refuses a HEIC photo with 415 naming the extra; face crops still answer."""
    import os

    from ray import serve

    from agecore.config import ServeConfig
    from ray_jobs.serve import AgeService

    fake = tmp_path / "site" / module
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(source)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))}
    app = AgeService.options(ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": env}}).bind(
        ServeConfig(checkpoint=str(serve_checkpoint)))
    serve.run(app, name="no_package", route_prefix="/no-package")
    try:
        url = f"{service}/no-package/v1/age"
        body = HEIC if module == "pillow_heif" else two_face_photo(faces_root)
        r = requests.post(url, data=body, headers={"content-type": "image/jpeg"}, timeout=120)
        assert r.status_code == status and r.json()["error"] == error, r.text
        if error == "internal_error":
            assert r.headers["x-request-id"] in r.json()["message"] or "X-Request-ID" in r.json()["message"]
        else:
            assert "pip install" in r.json()["message"]
        crop = requests.post(f"{url}?detect_faces=false", data=face(), headers={"content-type": "image/jpeg"}, timeout=60)
        assert crop.status_code == 200 and crop.json()["age"] > -50  # the crop path needs neither package
    finally:
        serve.delete("no_package")


# -- answers pinned to the library's: same checkpoint, same images, same numbers -------------------

# colours the untrained serve_checkpoint gives ages 0.1 years or more apart
BLOCKS = [jpeg_bytes((96, 96), color=c) for c in [(0, 0, 0), (0, 255, 255), (255, 0, 0), (0, 255, 0), (255, 0, 255)]]


def _verify(service: str, data: bytes, min_age: float, detect: str = "auto") -> dict:
    r = requests.post(f"{service}/v1/verify?min_age={min_age:g}&detect_faces={detect}", data=data,
                      headers={"content-type": "image/jpeg"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_every_route_answers_the_librarys_ages(service, serve_checkpoint, faces_root, facenet):
    """/v1/age, /v1/age/batch and /v1/verify give each image and each face what ``predict_faces`` gives it."""
    predictor = Predictor(serve_checkpoint)
    crops = [predictor.predict_faces(b, "false")[0]["age"] for b in BLOCKS]
    # the untrained checkpoint tells the blocks apart by more than the tolerance: a mix-up of ages shows
    assert np.diff(np.sort(crops)).min() > 2 * HTTP_TOL, crops
    for data, age in zip(BLOCKS, crops, strict=True):
        one = requests.post(f"{service}/v1/age?detect_faces=false", data=data, headers={"content-type": "image/jpeg"},
                            timeout=60).json()
        assert one["age"] == pytest.approx(age, abs=HTTP_TOL)
    batch = requests.post(f"{service}/v1/age/batch?detect_faces=false", timeout=60,
                          files=[("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(BLOCKS)]).json()
    assert [r["name"] for r in batch["results"]] == [f"{i}.jpg" for i in range(len(BLOCKS))]
    assert [r["age"] for r in batch["results"]] == pytest.approx(crops, abs=HTTP_TOL)

    photo = two_face_photo(faces_root)
    faces = predictor.predict_faces(photo)  # detect_faces=auto, as every route by default
    assert len(faces) == 2 and abs(faces[0]["age"] - faces[1]["age"]) > 2 * HTTP_TOL
    answer = requests.post(f"{service}/v1/age", data=photo, headers={"content-type": "image/jpeg"}, timeout=120).json()
    assert [f["age"] for f in answer["faces"]] == pytest.approx([f["age"] for f in faces], abs=HTTP_TOL)
    np.testing.assert_allclose([f["box"] for f in answer["faces"]], [f["box"] for f in faces], atol=0.01)
    batch = requests.post(f"{service}/v1/age/batch", timeout=120, files=[
        ("files", ("two.jpg", photo, "image/jpeg"))]).json()
    assert batch["results"][0]["age"] == pytest.approx(faces[1]["age"], abs=HTTP_TOL)  # the larger face's
    cal = json.loads((serve_checkpoint / "calibration.json").read_text())
    margin = fallback_margin(6.0)  # serve_checkpoint's val_mae
    verdicts = _verify(service, photo, 21)["faces"]
    for face, found in zip(verdicts, faces, strict=True):
        expected = verify_answer(found["age"], 21, cal, margin)
        assert face["age"] == pytest.approx(found["age"], abs=HTTP_TOL)
        assert face["verdict"] == expected["verdict"] and face["challenge_age"] == expected["challenge_age"]
        assert face["likely_range"] == pytest.approx(expected["likely_range"], abs=0.11)


def test_verdicts_over_http_are_the_librarys_and_the_challenge_age_decides(service, serve_checkpoint):
    """Each verdict equals ``verify_answer`` on the same estimate and calibration; the three outcomes pinned."""
    cal = json.loads((serve_checkpoint / "calibration.json").read_text())
    margin = fallback_margin(6.0)
    age = Predictor(serve_checkpoint).predict(face())
    low = verify_answer(age, 18, cal, margin)["likely_range"][0]
    # min_age 1 has no challenge age; floor(low) - 1 is cleared by the range, but the estimate is under its
    # challenge age (min_age + STRICT_CHALLENGE); nobody's range reaches 100
    cases = {1.0: "yes", float(np.floor(low) - 1): "uncertain", 100.0: "no"}
    assert age < np.floor(low) - 1 + STRICT_CHALLENGE
    for min_age, verdict in cases.items():
        answer = _verify(service, face(), min_age, detect="false")
        expected = verify_answer(age, min_age, cal, margin)
        assert answer["verdict"] == expected["verdict"] == verdict, (min_age, answer, expected)
        assert answer["is_at_least_min_age"] == expected["is_at_least_min_age"]
        assert answer["challenge_age"] == expected["challenge_age"] and answer["age"] == pytest.approx(age, abs=HTTP_TOL)


# -- every refusal of REFUSALS is sent by some test ------------------------------------------------


def _undecodable_png() -> bytes:
    """A PNG whose header is fine and whose pixel data is garbage: it opens, and fails to decode."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    start = data.find(b"IDAT") + 8
    data[start:start + 12] = b"\xff" * 12
    return bytes(data)


@pytest.mark.parametrize(("data", "error"), [(jpeg_bytes((20, 20)), "too_small"), (_undecodable_png(), "undecodable")],
                         ids=["too_small", "undecodable"])
def test_images_no_model_can_use_are_refused_by_reason(service, data, error):
    for route in ("/v1/age", "/v1/verify"):  # detect_faces=auto: decoding fails before any detector is asked
        r = requests.post(f"{service}{route}", data=data, headers={"content-type": "image/png"}, timeout=60)
        assert r.status_code == 422 and r.json()["error"] == error, r.text


def test_any_other_framework_refusal_is_a_bad_request():
    """A status the service has no reason for (a 400 of Starlette's own, say) keeps the refusal shape."""
    import asyncio

    from starlette.exceptions import HTTPException
    from starlette.requests import Request

    from ray_jobs.serve.http import _http_error

    request = Request({"type": "http", "method": "POST", "path": "/v1/age", "headers": [], "query_string": b""})
    answer = asyncio.run(_http_error(request, HTTPException(400, "bad header")))
    assert answer.status_code == 400 and json.loads(answer.body) == {
        "error": "bad_request", "message": "POST /v1/age: bad header"}


def test_every_refusal_reason_is_triggered_by_a_test_of_this_module():
    """A reason added to REFUSALS needs a test here that sends it: each reason must be a literal of this file
    outside this test, as the expected ``error`` of some request."""
    import ast

    from ray_jobs.serve.schema import REFUSALS

    tree = ast.parse(Path(__file__).read_text())
    this = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_every_refusal"))
    literals = {n.value for top in tree.body if top is not this for n in ast.walk(top)
                if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert sorted(set(REFUSALS) - literals) == []


def test_a_named_calibration_answers_through_serve(service, serve_checkpoint, tmp_path):
    """``calibration: NAME`` (a serve_config.yaml key): the library's corrected ages, its ranges, its name."""
    import shutil

    from ray import serve

    from agecore import calibration as calib
    from agecore.checkpoint import save_calibration
    from agecore.predictor import Predictor
    from ray_jobs.serve import build_app
    from tests.test_calibration import synthetic

    ckpt = Path(shutil.copytree(serve_checkpoint, tmp_path / "ckpt"))
    save_calibration(ckpt, "kiosk", calib.fit_calibration(*synthetic()))
    with pytest.raises(FileNotFoundError, match="no calibration named 'kiosks': it holds kiosk"):
        build_app({"checkpoint": str(ckpt), "calibration": "kiosks"})  # before any replica starts
    serve.run(build_app({"checkpoint": str(ckpt), "calibration": "kiosk"}), name="kiosk", route_prefix="/kiosk")
    try:
        r = requests.post(f"{service}/kiosk/v1/age?detect_faces=false", data=face(),
                          headers={"content-type": "image/jpeg"}, timeout=60).json()
        library = Predictor(ckpt, calibration="kiosk")
        image = np.asarray(Image.open(io.BytesIO(face())).convert("RGB"))
        expected = library.predict(image)
        assert r["model"]["calibration"] == "kiosk" and r["age"] == pytest.approx(expected, abs=0.006)
        assert r["likely_range"] == library.describe(expected)["likely_range"]
        raw = Predictor(ckpt).predict(image)
        assert abs(expected - raw) > 1.0  # the correction moved the estimate: the test can tell them apart
    finally:
        serve.delete("kiosk")
