"""Online age prediction with Ray Serve: a FastAPI ingress over the shared ``Predictor``.

    serve run serve_config.yaml                                # the checkpoint is in the config's args
    python -m ray_jobs.serve --checkpoint runs/faces/train/best [--port 8000] [--replicas 2]

Routes: ``POST /v1/age`` (one image: multipart field ``file`` or a raw image body; add
``?detect_faces=true`` for an uncropped photo: every face's box and age), ``POST /v1/age/batch``
(multipart, up to ``MAX_FILES`` ``files``), ``POST /v1/verify?min_age=18``, ``GET /healthz``,
``GET /v1/model``, ``GET /docs`` and a small upload page at ``/``. Every refusal answers
``{"error": REASON, "message": TEXT}`` (``REFUSALS``); docs/serving.md describes each route.
Concurrent requests share forward passes through ``@serve.batch``.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime, and
# Serve's class-based ingress does not resolve string annotations such as "Request".
# `@serve.ingress` pickles the app as it stands, so what the routes call is defined above AgeService.
import argparse
import asyncio
import functools
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import serve
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from agecore import __version__, storage
from agecore.checkpoint import read_calibration, read_meta, weights_digest
from agecore.errors import InvalidInput
from agecore.faces import Face
from agecore.images import MAX_PIXELS, MIN_SIDE, ImageError
from agecore.metrics import fallback_margin, likely_range, verify_answer
from agecore.predictor import PRECISIONS, Predictor

log = logging.getLogger("ray.serve")

# Batching: a lone request goes to the model at once, and the requests that arrive while a forward
# pass runs share the next one, up to BATCH_SIZE images (SharedForward).
BATCH_SIZE = 16
MAX_FILES = 32  # files in one /v1/age/batch request
MAX_FIELDS = 8  # non-file form fields: multipart bodies need none
IMAGE_TYPES = ("image/",)
# the autoscaling of ``replicas: auto``: one replica when idle, more while requests queue
AUTOSCALING = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
PAGE = Path(__file__).with_name("page.html").read_text()

# Every refusal the service answers: reason -> (HTTP status, when). docs/serving.md lists the same.
REFUSALS: dict[str, tuple[int, str]] = {
    "empty_file": (422, "an image of zero bytes"),
    "not_an_image": (422, "bytes that are no image format the service reads"),
    "truncated": (422, "an image file cut short"),
    "undecodable": (422, "an image the decoder fails on"),
    "too_small": (422, f"an image with a side under {MIN_SIDE} px"),
    "too_many_pixels": (413, f"an image (or decompression bomb) over {MAX_PIXELS / 1e6:g} megapixels"),
    "body_too_large": (413, "a request body over the body limit (max_body_mb), whatever its headers say"),
    "missing_file": (422, "a multipart body with no file field"),
    "too_many_files": (422, f"several files on a one-image route, or over {MAX_FILES} on /v1/age/batch"),
    "bad_multipart": (400, "a multipart body that cannot be parsed (no boundary, broken parts, too many fields)"),
    "unsupported_media_type": (415, "a body that is neither multipart/form-data nor image/* (or octet-stream)"),
    "invalid_parameter": (422, "a query parameter out of range or of the wrong type"),
    "not_found": (404, "a path the service does not have"),
    "method_not_allowed": (405, "a method the route does not take"),
    "face_detection_unavailable": (501, "detect_faces=true where the face detector is not installed"),
    "no_face": (422, "detect_faces=true on /v1/age/batch: a photo with no face (on that file's line only)"),
    "bad_request": (400, "any other request the framework refuses"),
    "internal_error": (500, "a bug: the request id names it in the replica's log"),
}
_REASON_OF_STATUS = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}


# -- configuration: the application's args, shared by serve_config.yaml and `age serve` -------------

class ServeArgs(BaseModel):
    """``args:`` of the application in serve_config.yaml; ``age serve`` takes the same keys as options.

    ``build_app`` validates a config's args into it, so a bad key or value fails before any replica starts.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: str = Field(description="checkpoint folder or URI (a training or tuning output's best/)")
    precision: str | None = Field(None, description="fp32 or bf16 (default: bf16 where the CPU or GPU runs it "
                                                     "natively: AVX512-BF16, AMX, GPUs; fp32 elsewhere)")
    threads: int | None = Field(None, ge=1, description="torch threads per replica (default: torch's choice)")
    replicas: int | Literal["auto"] = Field("auto", description="a fixed number of replicas, or auto: "
                                            f"{AUTOSCALING['min_replicas']} to {AUTOSCALING['max_replicas']} "
                                            "by load")
    max_body_mb: float = Field(10.0, gt=0, description="largest request body in MiB, counted while reading")

    @field_validator("precision")
    @classmethod
    def _known_precision(cls, value: str | None) -> str | None:
        if value not in (None, *PRECISIONS):
            raise ValueError(f"precision must be fp32 or bf16 (or left out), got {value!r}")
        return value

    @field_validator("replicas", mode="before")
    @classmethod
    def _replica_count(cls, value: Any) -> Any:
        """``--replicas 2`` arrives as text; a count must be at least 1."""
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, int) and value < 1:
            raise ValueError(f"replicas must be at least 1 or 'auto', got {value}")
        return value

    @classmethod
    def parse(cls, args: dict[str, Any]) -> "ServeArgs":
        """``args`` validated; a bad key or value raises ``InvalidInput`` naming it."""
        try:
            return cls.model_validate(args)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'args'}: {err['msg']}" for err in e.errors())
            raise InvalidInput(f"serve args: {problems}") from e

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One ``--key`` per field, with the field's default and description."""
        for name, field in cls.model_fields.items():
            required = field.is_required()
            default = None if required else field.default
            shown = f" (default: {default})" if default is not None else ""
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, required=required, default=default,
                                help=f"{field.description}{shown}")


# -- answers: the schemas of /openapi.json ----------------------------------------------------------

class ModelIdentity(BaseModel):
    """The model that answered: no server path, a digest of its weights instead."""

    backbone: str
    weights: str = Field(description="first 12 hex digits of the SHA-256 of the checkpoint's weights")
    epoch: int | None
    val_mae: float | None = Field(description="validation MAE in years, as the checkpoint records it")
    test_mae: float | None = Field(description="test MAE in years, where the checkpoint records one")
    input_size: int
    tta_flip: bool
    precision: str
    version: str = Field(description="agecore version of the service")


class Refusal(BaseModel):
    """Every 4xx/5xx answer of the service."""

    error: str = Field(description="the reason: a key of the refusal list in docs/serving.md")
    message: str = Field(description="what was wrong, naming the item (file name, parameter)")


class AgeAnswer(BaseModel):
    age: float = Field(description="estimated age in years")
    likely_range: tuple[float, float] = Field(description="90% of validation faces with an estimate in the same "
                                                          "age band had their true age in this range")
    seconds: float = Field(description="time in the replica, decode to answer")
    model: ModelIdentity


class FaceAge(BaseModel):
    box: tuple[float, float, float, float] = Field(description="x1, y1, x2, y2 in pixels of the photo")
    face_score: float
    age: float
    likely_range: tuple[float, float]


class FacesAnswer(BaseModel):
    faces: list[FaceAge] = Field(description="every face found, left to right; empty when none")
    message: str | None = Field(None, description="why no face was found, when none was")
    seconds: float
    model: ModelIdentity


class BatchItem(BaseModel):
    """One file of a batch: an estimate, or the refusal of that file alone."""

    name: str
    age: float | None = None
    likely_range: tuple[float, float] | None = None
    box: tuple[float, float, float, float] | None = Field(None, description="with detect_faces: the largest face")
    face_score: float | None = None
    seconds: float | None = None
    error: str | None = None
    message: str | None = None


class BatchAnswer(BaseModel):
    results: list[BatchItem] = Field(description="one per file, in the order sent")
    model: ModelIdentity


class VerifyAnswer(BaseModel):
    verdict: Literal["yes", "no", "uncertain"]
    is_at_least_min_age: bool | None
    min_age: float
    age: float
    likely_range: tuple[float, float]
    challenge_age: float | None = Field(
        description="'yes' needs an estimate above this: 5% of validation faces up to 5 years under min_age exceeded it")
    margin_source: str
    seconds: float
    model: ModelIdentity


class FaceVerdict(BaseModel):
    box: tuple[float, float, float, float]
    face_score: float
    verdict: Literal["yes", "no", "uncertain"]
    is_at_least_min_age: bool | None
    age: float
    likely_range: tuple[float, float]
    challenge_age: float | None = Field(
        description="'yes' needs an estimate above this: 5% of validation faces up to 5 years under min_age exceeded it")
    margin_source: str


class VerifyFacesAnswer(BaseModel):
    min_age: float
    faces: list[FaceVerdict] = Field(description="one verdict per face found, left to right")
    message: str | None = None
    seconds: float
    model: ModelIdentity


class Limits(BaseModel):
    max_body_bytes: int
    max_files: int
    batch_size: int = Field(description="images in one forward pass of a replica")


class ModelAnswer(ModelIdentity):
    preprocessing: dict[str, Any]
    metrics: dict[str, Any]
    versions: dict[str, str] | None
    calibrated: bool
    limits: Limits


class Health(BaseModel):
    status: Literal["ok"]


# -- OpenAPI of the bodies the routes read themselves (bounded, see read_images) ---------------------

_BINARY = {"type": "string", "format": "binary"}


def _image_body(many: bool) -> dict[str, Any]:
    """``openapi_extra`` for a route's body: multipart ``file`` (``files`` for a batch), or a raw image."""
    if many:
        field = {"files": {"type": "array", "items": _BINARY, "maxItems": MAX_FILES}}
        return {"requestBody": {"required": True, "content": {"multipart/form-data": {
            "schema": {"type": "object", "properties": field, "required": ["files"]}}}}}
    form = {"type": "object", "properties": {"file": _BINARY}, "required": ["file"]}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": form}, "image/*": {"schema": _BINARY},
        "application/octet-stream": {"schema": _BINARY}}}}


def _refusals(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route: each status with the refusal shape and the reasons it carries."""
    statuses = tuple(sorted({*statuses, 500}))
    return {s: {"model": Refusal, "description": ", ".join(r for r, (st, _) in REFUSALS.items() if st == s)}
            for s in statuses}


_IMAGE_REFUSALS = _refusals(400, 413, 415, 422)
app = FastAPI(title="Age estimation", version=__version__, description=(
    "Age from face photos, served by Ray Serve. Every refusal answers `{\"error\": REASON, \"message\": TEXT}`; "
    "every answer carries an `X-Request-ID` header (the client's, when it sends one)."))


# -- refusals: one shape for the service's own and the framework's ---------------------------------

def _error(reason: str, message: str) -> HTTPException:
    return HTTPException(status_code=REFUSALS[reason][0], detail={"error": reason, "message": message})


def _refusal(request: Request, status: int, reason: str, message: str,
             headers: dict[str, str] | None = None) -> JSONResponse:
    request.state.refusal = reason  # for the metrics middleware
    return JSONResponse({"error": reason, "message": message}, status_code=status, headers=headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """The service's refusals and Starlette's own (routing, method) in the service's shape."""
    if isinstance(exc.detail, dict):
        return _refusal(request, exc.status_code, exc.detail["error"], exc.detail["message"], exc.headers)
    reason = _REASON_OF_STATUS.get(exc.status_code, "bad_request")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return _refusal(request, exc.status_code, reason, message, exc.headers)


@app.exception_handler(RequestValidationError)
async def _invalid_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or e['loc'][0]}={e.get('input')!r}: {e['msg']}"
                         for e in exc.errors())
    return _refusal(request, 422, "invalid_parameter", problems)


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error in %s %s", request.method, request.url.path)
    # this handler runs outside the metrics middleware (Starlette's ServerErrorMiddleware): count here
    service_metrics().requests.inc(tags={"route": _route(request), "status": "500"})
    service_metrics().refusals.inc(tags={"route": _route(request), "reason": "internal_error"})
    return _refusal(request, 500, "internal_error", f"{type(exc).__name__} in the service; "
                    "the X-Request-ID header of this answer names it in the replica's log")


# -- metrics: Ray Serve's, exported with Ray's on each node's metrics port -------------------------

@dataclass(frozen=True)
class ServiceMetrics:
    requests: Counter
    refusals: Counter
    latency: Histogram
    images: Histogram
    faces: Histogram
    batch_size: Histogram


@functools.cache
def service_metrics() -> ServiceMetrics:
    """Created on first use, in the replica: Serve adds its deployment, replica and application tags."""
    return ServiceMetrics(
        requests=Counter("age_requests", "HTTP requests answered, by route and status",
                         tag_keys=("route", "status")),
        refusals=Counter("age_refusals", "refused requests (and refused files of a batch), by route and reason",
                         tag_keys=("route", "reason")),
        latency=Histogram("age_request_seconds", "time from request to answer in the replica",
                          boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
                          tag_keys=("route",)),
        images=Histogram("age_images_per_request", "images in a request", boundaries=[1, 2, 4, 8, 16, MAX_FILES],
                         tag_keys=("route",)),
        # boundaries must be positive: le=0.5 counts the photos with no face, le=1.5 those with one
        faces=Histogram("age_faces_per_image", "faces found in a photo with detect_faces",
                        boundaries=[0.5, 1.5, 2.5, 4.5, 8.5, 16.5], tag_keys=("route",)),
        batch_size=Histogram("age_forward_batch_size", "images in one forward pass of the shared batcher",
                             boundaries=[1, 2, 4, 8, BATCH_SIZE]),
    )


def _route(request: Request) -> str:
    """The route's template (not the raw path, whose values would each make a series)."""
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched")


@app.middleware("http")
async def _count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    start = time.perf_counter()
    response = await call_next(request)
    route, metrics = _route(request), service_metrics()
    metrics.requests.inc(tags={"route": route, "status": str(response.status_code)})
    metrics.latency.observe(time.perf_counter() - start, tags={"route": route})
    if reason := getattr(request.state, "refusal", None):
        metrics.refusals.inc(tags={"route": route, "reason": reason})
    return response


# -- reading bodies within the limit ---------------------------------------------------------------

async def _within(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """The chunks of ``stream``, refused once their total passes ``limit``: a chunked body is cut off too."""
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise _error("body_too_large", f"request body over the limit of {limit} bytes")
        yield chunk


async def read_images(request: Request, limit: int, max_files: int) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of each image in the body: multipart file fields, or one raw image body."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _error("body_too_large", f"request body of {length} bytes is over the limit of {limit}")
    ctype = request.headers.get("content-type", "")
    stream = _within(request.stream(), limit)
    if ctype.startswith("multipart/form-data"):
        try:
            form = await MultiPartParser(request.headers, stream, max_files=max_files, max_fields=MAX_FIELDS).parse()
        except MultiPartException as e:
            reason = "too_many_files" if e.message.startswith("Too many files") else "bad_multipart"
            raise _error(reason, f"multipart body: {e.message}") from e
        files = [(f.filename or key, await f.read()) for key, f in form.multi_items() if hasattr(f, "read")]
        if not files:
            raise _error("missing_file", "multipart body has no file field (use 'file', or 'files' for batches)")
        return files
    if ctype.startswith(IMAGE_TYPES) or ctype == "application/octet-stream":
        return [("body", b"".join([chunk async for chunk in stream]))]
    raise _error("unsupported_media_type",
                 f"send multipart/form-data with a 'file' field, or a raw image body (image/*), not {ctype!r}")


def _image_error(e: ImageError, name: str) -> HTTPException:
    return _error(e.reason if e.reason in REFUSALS else "undecodable", f"{name}: {e.detail}")


def _since(start: float) -> float:
    """Seconds from ``start`` to now, for the answers' ``seconds``."""
    return round(time.perf_counter() - start, 4)


def _largest(faces: list[Face]) -> int:
    """Index of the face with the largest box."""
    return max(range(len(faces)), key=lambda i: (faces[i].box[2] - faces[i].box[0]) * (faces[i].box[3] - faces[i].box[1]))


class SharedForward:
    """Ages of single preprocessed images, with one forward pass for the requests of a batch (``@serve.batch``).

    Serve forms the next batch as soon as its wait is over and queues it behind the running one, so
    with no wait every request under load would be a batch of its own. So a request that opens a
    batch lets it wait until the running pass should end (from the average time an image has
    taken), gathering what arrives meanwhile; when none runs, it waits for nothing and goes to the
    model at once. ``on_batch`` is told each batch's size (the service's metrics).
    """

    def __init__(self, predictor: Predictor, on_batch: Callable[[int], None] | None = None) -> None:
        self.predictor = predictor
        self.on_batch = on_batch
        self.seconds_per_image = 0.0  # of the forward pass: a running average over batches
        self.busy_until = 0.0  # when the running pass should end (perf_counter); 0 when none runs

    async def __call__(self, image: np.ndarray) -> float:
        self._batch.set_batch_wait_timeout_s(max(0.0, self.busy_until - time.perf_counter()))
        return await self._batch(image)

    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=0.0)
    async def _batch(self, images: list[np.ndarray]) -> list[float]:
        if self.on_batch:
            self.on_batch(len(images))
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
    def __init__(self, checkpoint: str, max_body_mb: float = 10.0, threads: int | None = None,
                 precision: str | None = None) -> None:
        self.predictor = Predictor(checkpoint, threads=threads, precision=precision)
        self.max_body = int(max_body_mb * 1024 * 1024)
        self.calibration = read_calibration(checkpoint)
        self.margin = fallback_margin(self.predictor.meta.get("metrics", {}).get("val_mae"))
        self.metrics = service_metrics()
        self.forward = SharedForward(self.predictor, on_batch=self.metrics.batch_size.observe)
        self.identity = self._identity(checkpoint)

    def _identity(self, checkpoint: str) -> ModelIdentity:
        meta, p = self.predictor.meta, self.predictor
        metrics = meta.get("metrics", {})
        return ModelIdentity(backbone=meta["model"]["backbone"], weights=weights_digest(checkpoint),
                             epoch=meta.get("epoch"), val_mae=metrics.get("val_mae"),
                             test_mae=metrics.get("test_mae"), input_size=p.prep.input_size, tta_flip=p.tta_flip,
                             precision=p.precision, version=__version__)

    def _range(self, age: float) -> tuple[float, float]:
        low, high = likely_range(np.array([age]), self.calibration, self.margin)
        return round(float(low[0]), 1), round(float(high[0]), 1)

    async def _images(self, request: Request, route: str, many: bool) -> list[tuple[str, bytes]]:
        files = await read_images(request, self.max_body, MAX_FILES if many else 1)
        self.metrics.images.observe(len(files), tags={"route": route})
        return files

    def _preprocess(self, data: bytes, name: str) -> np.ndarray:
        if not data:
            raise _error("empty_file", f"{name}: zero bytes")
        try:
            return self.predictor.preprocess(data)
        except ImageError as e:
            raise _image_error(e, name) from e

    async def _face_crops(self, data: bytes, name: str, route: str) -> tuple[list[Face], np.ndarray]:
        """Decode and detect off the event loop: MTCNN takes a fifth of a second a photo on a CPU."""
        if not data:
            raise _error("empty_file", f"{name}: zero bytes")
        try:  # the detector loads on the first request that asks for it
            faces, crops = await asyncio.get_running_loop().run_in_executor(None, self.predictor.face_crops, data)
        except ImageError as e:
            raise _image_error(e, name) from e
        except ImportError as e:
            raise _error("face_detection_unavailable", str(e)) from e
        self.metrics.faces.observe(len(faces), tags={"route": route})
        return faces, crops

    async def _age(self, data: bytes, name: str) -> float:
        return await self.forward(self._preprocess(data, name))

    async def _face_ages(self, data: bytes, name: str, route: str) -> tuple[list[Face], list[float]]:
        faces, crops = await self._face_crops(data, name, route)
        # one array per face through the shared batcher: the faces of a group photo, and other
        # requests, go through the network together
        return faces, list(await asyncio.gather(*(self.forward(crop) for crop in crops)))

    def _no_face(self, faces: list[Face]) -> str | None:
        return None if faces else self.predictor.no_face_message()

    # -- routes --------------------------------------------------------------------------------------

    @app.post("/v1/age", response_model=AgeAnswer | FacesAnswer, responses=_IMAGE_REFUSALS | _refusals(501),
              openapi_extra=_image_body(many=False), summary="Age of one face, or of every face of a photo")
    async def age(
        self,
        request: Request,
        detect_faces: bool = Query(False, description="an uncropped photo: find every face and estimate each"),
    ) -> AgeAnswer | FacesAnswer:
        start = time.perf_counter()
        (name, data), = await self._images(request, "/v1/age", many=False)
        if detect_faces:
            faces, ages = await self._face_ages(data, name, "/v1/age")
            return FacesAnswer(faces=[FaceAge(box=f.box, face_score=f.score, age=round(a, 2), likely_range=self._range(a))
                                      for f, a in zip(faces, ages, strict=True)],
                               message=self._no_face(faces), seconds=_since(start), model=self.identity)
        age = await self._age(data, name)
        return AgeAnswer(age=round(age, 2), likely_range=self._range(age), seconds=_since(start), model=self.identity)

    @app.post("/v1/age/batch", response_model=BatchAnswer, responses=_IMAGE_REFUSALS,
              openapi_extra=_image_body(many=True), summary=f"Ages of up to {MAX_FILES} images")
    async def age_batch(
        self,
        request: Request,
        detect_faces: bool = Query(False, description="uncropped photos: the age of each photo's largest face"),
    ) -> BatchAnswer:
        files = await self._images(request, "/v1/age/batch", many=True)
        results = await asyncio.gather(*(self._batch_item(n, d, detect_faces) for n, d in files))
        return BatchAnswer(results=list(results), model=self.identity)

    async def _batch_item(self, name: str, data: bytes, detect_faces: bool) -> BatchItem:
        """One file's answer; a bad file is refused on its own line and the others still answer."""
        start = time.perf_counter()
        try:
            if not detect_faces:
                age = await self._age(data, name)
                return BatchItem(name=name, age=round(age, 2), likely_range=self._range(age), seconds=_since(start))
            faces, ages = await self._face_ages(data, name, "/v1/age/batch")
            if not faces:
                return BatchItem(name=name, error="no_face", message=f"{name}: {self._no_face(faces)}",
                                 seconds=_since(start))
            i = _largest(faces)
            return BatchItem(name=name, age=round(ages[i], 2), likely_range=self._range(ages[i]), box=faces[i].box,
                             face_score=faces[i].score, seconds=_since(start))
        except HTTPException as e:
            self.metrics.refusals.inc(tags={"route": "/v1/age/batch", "reason": e.detail["error"]})
            return BatchItem(name=name, **e.detail)

    @app.post("/v1/verify", response_model=VerifyAnswer | VerifyFacesAnswer, responses=_IMAGE_REFUSALS | _refusals(501),
              openapi_extra=_image_body(many=False), summary="Is the person at least min_age?")
    async def verify(
        self,
        request: Request,
        min_age: float = Query(18, ge=1, le=100, description="the age to check against, in years"),
        detect_faces: bool = Query(False, description="an uncropped photo: one verdict per face"),
    ) -> VerifyAnswer | VerifyFacesAnswer:
        start = time.perf_counter()
        (name, data), = await self._images(request, "/v1/verify", many=False)
        if detect_faces:
            faces, ages = await self._face_ages(data, name, "/v1/verify")
            verdicts = [FaceVerdict(box=f.box, face_score=f.score, **self._verdict(a, min_age))
                        for f, a in zip(faces, ages, strict=True)]
            return VerifyFacesAnswer(min_age=min_age, faces=verdicts, message=self._no_face(faces),
                                     seconds=_since(start), model=self.identity)
        age = await self._age(data, name)
        return VerifyAnswer(**self._verdict(age, min_age), min_age=min_age, seconds=_since(start),
                            model=self.identity)

    def _verdict(self, age: float, min_age: float) -> dict[str, Any]:
        answer = verify_answer(age, min_age, self.calibration, self.margin)
        return {k: v for k, v in answer.items() if k != "min_age"}

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        return Health(status="ok")

    @app.get("/v1/model", response_model=ModelAnswer, summary="The model, its metrics and the service's limits")
    async def model(self) -> ModelAnswer:
        meta = self.predictor.meta
        return ModelAnswer(**self.identity.model_dump(), preprocessing=meta["preprocessing"],
                           metrics=meta.get("metrics", {}),
                           versions=meta.get("versions"), calibrated=self.calibration is not None,
                           limits=Limits(max_body_bytes=self.max_body, max_files=MAX_FILES, batch_size=BATCH_SIZE))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> str:
        return PAGE


def build_app(args: dict[str, Any]) -> serve.Application:
    """Entry point for ``serve run`` / ``serve deploy`` (``import_path: ray_jobs.serve:build_app``)."""
    return age_app(ServeArgs.parse(args))  # Serve calls application builders with exactly one argument


def age_app(args: ServeArgs | dict[str, Any], options: dict[str, Any] | None = None) -> serve.Application:
    """The application for ``args`` (the config's ``args:``), with ``AgeService.options(**options)``.

    The checkpoint is checked here, before any replica starts. ``options`` (``max_ongoing_requests``,
    ...) are for callers of ``serve.run`` from Python; a config file sets them under ``deployments:``.
    """
    args = args if isinstance(args, ServeArgs) else ServeArgs.parse(args)
    checkpoint = storage.absolute(args.checkpoint)
    read_meta(checkpoint)  # raises MissingInput / InvalidInput for a folder that is not a checkpoint
    scaling = ({"autoscaling_config": AUTOSCALING} if args.replicas == "auto"
               else {"num_replicas": args.replicas, "autoscaling_config": None})
    deployment = AgeService.options(**{**scaling, **(options or {})})
    return deployment.bind(checkpoint, args.max_body_mb, args.threads, args.precision)


def check_port_free(host: str, port: int, option: str) -> None:
    """Refuse a port that something already listens on, before Ray starts (Serve would retry it forever)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise InvalidInput(f"{option} {port}: {host}:{port} is in use ({e.strerror}); stop what listens "
                               f"there or choose another with {option}") from e


def main(argv: list[str] | None = None) -> None:
    """``age serve``: check the args, the checkpoint and the ports, then serve until interrupted."""
    p = argparse.ArgumentParser(prog="age serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    ServeArgs.add_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: local only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--metrics-port", type=int, default=8080,
                   help="Prometheus metrics of a local Ray (with RAY_ADDRESS: the cluster's own)")
    ns = vars(p.parse_args(argv))
    host, port, metrics_port = ns.pop("host"), ns.pop("port"), ns.pop("metrics_port")
    app_args = ServeArgs.parse({k: v for k, v in ns.items() if v is not None})
    application = age_app(app_args)
    check_port_free(host, port, "--port")
    if not os.environ.get("RAY_ADDRESS"):  # a local Ray: its metrics port must be free too
        check_port_free("0.0.0.0", metrics_port, "--metrics-port")
    from ray_jobs.common import init_ray, setup_logging

    setup_logging()
    init_ray(metrics_port=metrics_port)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application, name="age", route_prefix="/", blocking=True)  # as serve_config.yaml names it


if __name__ == "__main__":
    from ray_jobs.cli import run_stage

    run_stage("serve")
