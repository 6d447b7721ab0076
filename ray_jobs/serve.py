"""Online age prediction with Ray Serve: a FastAPI ingress over the shared ``Predictor``.

    serve run serve_config.yaml                      # checkpoint path in the config's args
    python -m ray_jobs.serve --checkpoint runs/train/best [--port 8000]

Routes: ``POST /v1/age`` (one image: multipart field ``file`` or a raw image body; add
``?detect_faces=true`` for an uncropped photo: every face's box and age),
``POST /v1/age/batch`` (multipart, several ``files``), ``POST /v1/verify?min_age=18``,
``GET /healthz``, ``GET /v1/model``, ``GET /docs`` and a small upload page at ``/``.
Concurrent requests share forward passes through ``@serve.batch``.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime, and
# Serve's class-based ingress does not resolve string annotations such as "Request".
import argparse
import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve

from agecore import storage
from agecore.checkpoint import CALIBRATION
from agecore.datasets import AGE_BAND_LABELS, age_band
from agecore.faces import Face
from agecore.images import ImageError
from agecore.predictor import PRECISIONS, Predictor

log = logging.getLogger("ray.serve")

DEFAULT_MAX_BODY_MB = 10.0
# Batching: a lone request goes to the model at once, and the requests that arrive while a forward
# pass runs share the next one, up to BATCH_SIZE images (SharedForward).
BATCH_SIZE = 16
IMAGE_TYPES = ("image/",)
PAGE = Path(__file__).with_name("page.html").read_text()

app = FastAPI(title="Age estimation", version="1", description="Age from face photos, served by Ray Serve.")


def _error(status: int, reason: str, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail={"error": reason, "message": message})


@app.exception_handler(HTTPException)
async def _json_errors(request: Request, exc: HTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, dict) else {"error": "http_error", "message": str(exc.detail)}
    return JSONResponse(status_code=exc.status_code, content=detail)


def _image_error(e: ImageError, name: str) -> HTTPException:
    return _error(413 if e.reason == "too_many_pixels" else 422, e.reason, f"{name}: {e.detail}")


def verify_answer(age: float, min_age: float, calibration: dict[str, Any] | None, fallback_margin: float) -> dict:
    """Is the person at least ``min_age``? 'uncertain' when the estimate is within the measured margin.

    The margin comes from the validation errors of estimates in the same age band: 90% of true
    ages lay within [age - q0.95, age - q0.05].

    >>> verify_answer(30.0, 18, None, 4.0)["verdict"]
    'yes'
    >>> verify_answer(19.0, 18, None, 4.0)["verdict"]
    'uncertain'
    """
    band = AGE_BAND_LABELS[int(age_band(np.array([age]))[0])]
    q = (calibration or {}).get("bands", {}).get(band) or (calibration or {}).get("overall")
    if q:
        low, high = age - q["q0.95"], age - q["q0.05"]
        source = f"validation errors of estimates in band {band} (n={q['count']})"
    else:
        low, high = age - fallback_margin, age + fallback_margin
        source = "no calibration stored with the checkpoint: +/- twice the validation MAE"
    verdict = "yes" if low >= min_age else "no" if high < min_age else "uncertain"
    return {"verdict": verdict, "is_at_least_min_age": {"yes": True, "no": False}.get(verdict),
            "min_age": min_age, "age": round(age, 2), "likely_range": [round(low, 1), round(high, 1)],
            "margin_source": source}


class SharedForward:
    """Ages of single preprocessed images, with one forward pass for the requests of a batch (``@serve.batch``).

    Serve forms the next batch as soon as its wait is over and queues it behind the running one, so
    with no wait every request under load became a batch of its own (Ray 2.60; ResNet50, 2 replicas,
    16 clients: 25 answers/s, and 70 ms of replica CPU an answer, the same as for lone requests). So
    a request that opens a batch lets it wait until the running pass should end (from the average
    time an image has taken), gathering what arrives meanwhile; when none runs, it waits for nothing
    and goes to the model at once.
    """

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.seconds_per_image = 0.0  # of the forward pass: a running average over batches
        self.busy_until = 0.0  # when the running pass should end (perf_counter); 0 when none runs

    async def __call__(self, image: np.ndarray) -> float:
        self._batch.set_batch_wait_timeout_s(max(0.0, self.busy_until - time.perf_counter()))
        return await self._batch(image)

    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=0.0)
    async def _batch(self, images: list[np.ndarray]) -> list[float]:
        start = time.perf_counter()
        self.busy_until = start + len(images) * self.seconds_per_image
        try:
            ages = await asyncio.get_running_loop().run_in_executor(
                None, self.predictor.predict_arrays, np.stack(images))
        finally:
            self.busy_until = 0.0
        per_image = (time.perf_counter() - start) / len(images)
        self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * per_image if self.seconds_per_image else per_image
        return [float(a) for a in ages]


@serve.deployment(
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=32,
)
@serve.ingress(app)
class AgeService:
    def __init__(self, checkpoint: str, max_body_mb: float = DEFAULT_MAX_BODY_MB, threads: int | None = None,
                 precision: str | None = None) -> None:
        self.predictor = Predictor(checkpoint, threads=threads, precision=precision)
        self.max_body = int(max_body_mb * 1024 * 1024)
        cal_path = storage.join(checkpoint, CALIBRATION)
        self.calibration = json.loads(storage.read_text(cal_path)) if storage.exists(cal_path) else None
        val_mae = self.predictor.meta.get("metrics", {}).get("val_mae") or 5.0
        self.fallback_margin = 2 * float(val_mae)
        self.forward = SharedForward(self.predictor)

    def _preprocess(self, data: bytes, name: str = "body") -> np.ndarray:
        if not data:
            raise _error(422, "empty_file", f"{name}: zero bytes")
        try:
            return self.predictor.preprocess(data)
        except ImageError as e:
            raise _image_error(e, name) from e

    async def _face_crops(self, data: bytes, name: str) -> tuple[list[Face], np.ndarray]:
        """Decode and detect off the event loop: MTCNN takes a fifth of a second a photo on a CPU."""
        if not data:
            raise _error(422, "empty_file", f"{name}: zero bytes")
        try:  # the detector loads on the first request that asks for it
            return await asyncio.get_running_loop().run_in_executor(None, self.predictor.face_crops, data)
        except ImageError as e:
            raise _image_error(e, name) from e
        except ImportError as e:
            raise _error(501, "face_detection_unavailable", str(e)) from e

    async def _read_images(self, request: Request, many: bool) -> list[tuple[str, bytes]]:
        length = request.headers.get("content-length")
        if length and int(length) > self.max_body:
            raise _error(413, "body_too_large", f"request body of {length} bytes is over the limit of {self.max_body}")
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form()
            files = [(f.filename or key, await f.read()) for key, f in form.multi_items() if hasattr(f, "read")]
            if not files:
                raise _error(422, "missing_file", "multipart body has no file field (use 'file', or 'files' for batches)")
            if not many and len(files) > 1:
                raise _error(422, "too_many_files", "one image per request here; use /v1/age/batch for several")
        elif ctype.startswith(IMAGE_TYPES) or ctype == "application/octet-stream":
            files = [("body", await request.body())]
        else:
            raise _error(415, "unsupported_media_type",
                         f"send multipart/form-data with a 'file' field, or a raw image body (image/*), not {ctype!r}")
        if sum(len(d) for _, d in files) > self.max_body:
            raise _error(413, "body_too_large", f"request body is over the limit of {self.max_body} bytes")
        return files

    async def _estimate(self, data: bytes, name: str) -> dict[str, Any]:
        start = time.perf_counter()
        age = await self.forward(self._preprocess(data, name))
        return {"age": round(age, 2), "seconds": round(time.perf_counter() - start, 4)}

    async def _estimate_faces(self, data: bytes, name: str) -> dict[str, Any]:
        start = time.perf_counter()
        faces, crops = await self._face_crops(data, name)
        # one array per face through the shared batcher: the faces of a group photo, and other
        # requests, go through the network together
        ages = await asyncio.gather(*(self.forward(crop) for crop in crops))
        answer: dict[str, Any] = {"faces": [
            {"box": [round(v, 1) for v in face.box], "face_score": round(face.score, 4), "age": round(age, 2)}
            for face, age in zip(faces, ages, strict=True)]}
        if not faces:
            answer["message"] = self.predictor.no_face_message()
        return {**answer, "seconds": round(time.perf_counter() - start, 4)}

    # -- routes --------------------------------------------------------------------------------------

    @app.post("/v1/age")
    async def age(
        self,
        request: Request,
        detect_faces: bool = Query(False, description="an uncropped photo: find every face and estimate each"),
    ) -> dict[str, Any]:
        (name, data), = await self._read_images(request, many=False)
        if detect_faces:
            return {**await self._estimate_faces(data, name), "model": self.predictor.identity}
        return {**await self._estimate(data, name), "model": self.predictor.identity}

    @app.post("/v1/age/batch")
    async def age_batch(self, request: Request) -> dict[str, Any]:
        files = await self._read_images(request, many=True)

        async def one(name: str, data: bytes) -> dict[str, Any]:
            try:
                return {"name": name, **await self._estimate(data, name)}
            except HTTPException as e:
                return {"name": name, **e.detail}

        results = await asyncio.gather(*(one(n, d) for n, d in files))
        return {"results": list(results), "model": self.predictor.identity}

    @app.post("/v1/verify")
    async def verify(self, request: Request, min_age: float = Query(18, ge=1, le=100)) -> dict[str, Any]:
        (name, data), = await self._read_images(request, many=False)
        est = await self._estimate(data, name)
        return {**verify_answer(est["age"], min_age, self.calibration, self.fallback_margin),
                "seconds": est["seconds"], "model": self.predictor.identity}

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model(self) -> dict[str, Any]:
        meta = self.predictor.meta
        return {**self.predictor.identity, "preprocessing": meta["preprocessing"],
                "metrics": {k: v for k, v in meta.get("metrics", {}).items() if k != "history"},
                "versions": meta.get("versions"), "calibrated": self.calibration is not None}

    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> str:
        return PAGE


def build_app(args: dict[str, Any]) -> serve.Application:
    """Entry point for ``serve run`` / ``serve deploy`` (``import_path: ray_jobs.serve:build_app``)."""
    return age_app(args)  # Serve calls application builders with exactly one argument


def age_app(args: dict[str, Any], options: dict[str, Any] | None = None) -> serve.Application:
    """The application for ``args`` (the config's ``args:``), with ``AgeService.options(**options)``.

    ``options`` (replicas, ``max_ongoing_requests``, ...) are for callers of ``serve.run`` from Python;
    a config file sets them under ``deployments:`` instead.
    """
    if "checkpoint" not in args:
        raise ValueError("serve_config.yaml: the application needs args: {checkpoint: PATH}")
    checkpoint = storage.absolute(args["checkpoint"])
    if not (Path(checkpoint) / "checkpoint.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not an agecore checkpoint (no checkpoint.json)")
    if args.get("precision") not in (None, *PRECISIONS):
        raise ValueError(f"serve_config.yaml: precision must be fp32 or bf16 (or left out), got {args['precision']!r}")
    deployment = AgeService.options(**options) if options else AgeService
    return deployment.bind(checkpoint, float(args.get("max_body_mb", DEFAULT_MAX_BODY_MB)), args.get("threads"),
                           args.get("precision"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="age serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB)
    args = p.parse_args(argv)
    from ray_jobs.common import init_ray, setup_logging

    setup_logging()
    init_ray()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app({"checkpoint": args.checkpoint, "max_body_mb": args.max_body_mb}), blocking=True)


if __name__ == "__main__":
    main()
