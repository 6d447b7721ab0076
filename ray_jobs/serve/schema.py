"""The HTTP contract of the service: refusals, answer schemas and the OpenAPI of the image bodies.

Nothing here runs a model or imports Ray: this module is what a client's code generator reads.
"""

# No `from __future__ import annotations`: pydantic and FastAPI read these annotations at runtime.
from typing import Any, Literal

from pydantic import BaseModel, Field

from agecore.config import MAX_PIXELS, MIN_SIDE
from agecore.faces import INSTALL_HINT, NO_FACE
from agecore.metrics import CHALLENGE_SHARE, NEAR_THRESHOLD_YEARS, NOMINAL_COVERAGE

MAX_FILES = 32  # files in one /v1/age/batch request
MAX_FIELDS = 8  # non-file form fields: multipart bodies need none
BATCH_SIZE = 16  # images in one forward pass of a replica's shared batcher

# Every refusal the service answers: reason -> (HTTP status, when). docs/serving.md lists the same.
REFUSALS: dict[str, tuple[int, str]] = {
    "empty_file": (422, "an image of zero bytes"),
    "not_an_image": (422, "bytes that are no image format the service reads"),
    "truncated": (422, "an image file cut short"),
    "unsupported_format": (415, "a HEIC/HEIF photo where pillow-heif (the heic extra) is not installed"),
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
    "face_detection_unavailable": (501, f"detect_faces auto or true where the face detector is not installed ({INSTALL_HINT})"),
    NO_FACE: (422, "a photo with no face, on /v1/age/batch (on that file's line only)"),
    "bad_request": (400, "any other request the framework refuses"),
    "internal_error": (500, "a bug: the request id names it in the replica's log"),
}
REASON_OF_STATUS = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}

RANGE_HELP = (f"{NOMINAL_COVERAGE:.0%} of validation faces with an estimate in the same age band had their true age "
              "in this range")
CHALLENGE_HELP = (f"'yes' needs an estimate above this: {CHALLENGE_SHARE:.0%} of validation faces up to "
                  f"{NEAR_THRESHOLD_YEARS} years under min_age exceeded it")

Box = tuple[float, float, float, float]
Verdict = Literal["yes", "no", "uncertain"]


class ModelIdentity(BaseModel):
    """The model that answered: no server path, a digest of its weights instead."""

    backbone: str
    weights: str = Field(description="first 12 hex digits of the SHA-256 of the checkpoint's weights")
    epoch: int | None
    val_mae: float | None = Field(description="validation MAE in years, as the checkpoint records it")
    input_size: int
    tta_flip: bool
    precision: str
    version: str = Field(description="agecore version of the service")
    calibration: str | None = Field(description="the named calibration that answered (age calibrate), or null: the "
                                                "model's own estimates, with the checkpoint's calibration.json")


class Refusal(BaseModel):
    """Every 4xx/5xx answer of the service."""

    error: str = Field(description="the reason: a key of the refusal list in docs/serving.md")
    message: str = Field(description="what was wrong, naming the item (file name, parameter)")


class AgeAnswer(BaseModel):
    """detect_faces=false: the image is one face crop."""

    age: float = Field(description="estimated age in years")
    likely_range: tuple[float, float] = Field(description=RANGE_HELP)
    seconds: float = Field(description="time in the replica, decode to answer")
    model: ModelIdentity


class FaceAge(BaseModel):
    box: Box = Field(description="x1, y1, x2, y2 in pixels of the photo, to 0.1 px (the whole image for a face crop)")
    face_score: float
    aligned: bool = Field(description="false where the image was a face crop, taken as it is")
    age: float
    likely_range: tuple[float, float] = Field(description=RANGE_HELP)


class FacesAnswer(BaseModel):
    """detect_faces=auto or true: every face of the photo; ``age`` is the largest face's."""

    age: float | None = Field(description="the largest face's estimate; null when no face was found")
    likely_range: tuple[float, float] | None
    faces: list[FaceAge] = Field(description="every face found, left to right; empty when none")
    message: str | None = Field(None, description="why no face was found, when none was")
    seconds: float
    model: ModelIdentity


class BatchItem(BaseModel):
    """One file of a batch: an estimate, or the refusal of that file alone."""

    name: str
    age: float | None = None
    likely_range: tuple[float, float] | None = None
    box: Box | None = Field(None, description="with detect_faces auto or true: the largest face")
    face_score: float | None = None
    aligned: bool | None = None
    seconds: float | None = None
    error: str | None = None
    message: str | None = None


class BatchAnswer(BaseModel):
    results: list[BatchItem] = Field(description="one per file, in the order sent")
    model: ModelIdentity


class VerifyAnswer(BaseModel):
    """detect_faces=false: the verdict on one face crop."""

    verdict: Verdict
    is_at_least_min_age: bool | None
    min_age: float
    age: float
    likely_range: tuple[float, float]
    challenge_age: float | None = Field(description=CHALLENGE_HELP)
    margin_source: str
    seconds: float
    model: ModelIdentity


class FaceVerdict(BaseModel):
    box: Box
    face_score: float
    aligned: bool
    verdict: Verdict
    is_at_least_min_age: bool | None
    age: float
    likely_range: tuple[float, float]
    challenge_age: float | None = Field(description=CHALLENGE_HELP)
    margin_source: str


class VerifyFacesAnswer(BaseModel):
    """detect_faces=auto or true: one verdict per face; ``verdict`` is the largest face's."""

    min_age: float
    verdict: Verdict | None = Field(description="the largest face's verdict; null when no face was found")
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


# -- OpenAPI of the bodies the routes read themselves (bounded: http.read_images) ---------

_BINARY = {"type": "string", "format": "binary"}


def image_body(many: bool) -> dict[str, Any]:
    """``openapi_extra`` for a route's body: multipart ``file`` (``files`` for a batch), or a raw image."""
    if many:
        field = {"files": {"type": "array", "items": _BINARY, "maxItems": MAX_FILES}}
        return {"requestBody": {"required": True, "content": {"multipart/form-data": {
            "schema": {"type": "object", "properties": field, "required": ["files"]}}}}}
    form = {"type": "object", "properties": {"file": _BINARY}, "required": ["file"]}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": form}, "image/*": {"schema": _BINARY},
        "application/octet-stream": {"schema": _BINARY}}}}


def refusals(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route: each status with the refusal shape and the reasons it carries."""
    statuses = tuple(sorted({*statuses, 500}))
    return {s: {"model": Refusal, "description": ", ".join(r for r, (st, _) in REFUSALS.items() if st == s)}
            for s in statuses}


IMAGE_REFUSALS = refusals(400, 413, 415, 422, 501)
