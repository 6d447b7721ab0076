"""The service's HTTP plumbing: the FastAPI app, one refusal shape for every error, Ray Serve metrics,
and request bodies read within the size limit."""

# No `from __future__ import annotations`: FastAPI reads the handler signatures at runtime.
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from agecore import __version__
from agecore.images import ImageError
from ray_jobs.serve.schema import BATCH_SIZE, MAX_FIELDS, MAX_FILES, REASON_OF_STATUS, REFUSALS

log = logging.getLogger("ray.serve")

IMAGE_TYPES = ("image/",)

app = FastAPI(title="Age estimation", version=__version__, description=(
    "Age from face photos, served by Ray Serve. Every refusal answers `{\"error\": REASON, \"message\": TEXT}`; "
    "every answer carries an `X-Request-ID` header (the client's, when it sends one)."))


# -- refusals: one shape for the service's own and the framework's ---------------------------------

def error(reason: str, message: str) -> HTTPException:
    """The refusal ``reason`` (a key of ``REFUSALS``), to raise from a route."""
    return HTTPException(status_code=REFUSALS[reason][0], detail={"error": reason, "message": message})


def image_error(e: ImageError, name: str) -> HTTPException:
    return error(e.reason if e.reason in REFUSALS else "undecodable", f"{name}: {e.detail}")


def _refusal(request: Request, status: int, reason: str, message: str,
             headers: dict[str, str] | None = None) -> JSONResponse:
    request.state.refusal = reason  # for the metrics middleware
    return JSONResponse({"error": reason, "message": message}, status_code=status, headers=headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """The service's refusals and Starlette's own (routing, method) in the service's shape."""
    if isinstance(exc.detail, dict):
        return _refusal(request, exc.status_code, exc.detail["error"], exc.detail["message"], exc.headers)
    reason = REASON_OF_STATUS.get(exc.status_code, "bad_request")
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
            raise error("body_too_large", f"request body over the limit of {limit} bytes")
        yield chunk


async def read_images(request: Request, limit: int, max_files: int) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of each image in the body: multipart file fields, or one raw image body."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise error("body_too_large", f"request body of {length} bytes is over the limit of {limit}")
    ctype = request.headers.get("content-type", "")
    stream = _within(request.stream(), limit)
    if ctype.startswith("multipart/form-data"):
        try:
            form = await MultiPartParser(request.headers, stream, max_files=max_files, max_fields=MAX_FIELDS).parse()
        except MultiPartException as e:
            reason = "too_many_files" if e.message.startswith("Too many files") else "bad_multipart"
            raise error(reason, f"multipart body: {e.message}") from e
        files = [(f.filename or key, await f.read()) for key, f in form.multi_items() if hasattr(f, "read")]
        if not files:
            raise error("missing_file", "multipart body has no file field (use 'file', or 'files' for batches)")
        return files
    if ctype.startswith(IMAGE_TYPES) or ctype == "application/octet-stream":
        return [("body", b"".join([chunk async for chunk in stream]))]
    raise error("unsupported_media_type",
                f"send multipart/form-data with a 'file' field, or a raw image body (image/*), not {ctype!r}")
