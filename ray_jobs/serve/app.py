"""The deployment: ``AgeService`` answers the routes of ``http.app`` with the shared ``Predictor``.

    serve run serve_config.yaml                                # the checkpoint is in the config's args
    age serve --checkpoint runs/faces/train/best [--port 8000] [--replicas 2]
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime, and
# Serve's class-based ingress does not resolve string annotations such as "Request".
import argparse
import asyncio
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from ray import serve

from agecore import storage
from agecore.checkpoint import read_calibration, read_meta
from agecore.config import DETECT_FACES, DETECT_FACES_HELP, ServeConfig
from agecore.errors import InvalidInput
from agecore.faces import NO_FACE, Face, largest
from agecore.images import ImageError
from agecore.predictor import Predictor
from ray_jobs.options import add_config_arguments, config_from_args
from ray_jobs.serve.batching import SharedForward
from ray_jobs.serve.http import app, error, image_error, read_images, service_metrics
from ray_jobs.serve.schema import (
    BATCH_SIZE,
    IMAGE_REFUSALS,
    MAX_FILES,
    AgeAnswer,
    BatchAnswer,
    BatchItem,
    FaceAge,
    FacesAnswer,
    FaceVerdict,
    Health,
    Limits,
    ModelAnswer,
    ModelIdentity,
    VerifyAnswer,
    VerifyFacesAnswer,
    image_body,
)

log = logging.getLogger("ray.serve")
PAGE = Path(__file__).with_name("page.html").read_text()
DetectQuery = Query("auto", description=DETECT_FACES_HELP, pattern=f"^({'|'.join(DETECT_FACES)})$")


def _since(start: float) -> float:
    """Seconds from ``start`` to now, for the answers' ``seconds``."""
    return round(time.perf_counter() - start, 4)


def _largest(faces: list[Face]) -> int:
    """Index of the face with the largest box."""
    return faces.index(largest(faces))


@serve.deployment  # its options come from ServeConfig.deployment_options (age_app)
@serve.ingress(app)
class AgeService:
    def __init__(self, config: ServeConfig) -> None:
        self.predictor = Predictor(config.checkpoint, threads=config.threads, precision=config.precision,
                                   calibration=config.calibration)
        self.max_body = config.max_body_bytes
        if self.predictor.calibration is None:
            log.warning("%s has no calibration: likely ranges are the estimate +/- twice its validation MAE and "
                        "no challenge age applies (age evaluate --attach measures one)", config.checkpoint)
        self.metrics = service_metrics()
        self.forward = SharedForward(self.predictor, on_batch=self.metrics.batch_size.observe)
        self.identity = ModelIdentity(**self.predictor.identity)

    def _range(self, age: float) -> list[float]:
        return self.predictor.describe(age)["likely_range"]

    async def _images(self, request: Request, route: str, many: bool) -> list[tuple[str, bytes]]:
        files = await read_images(request, self.max_body, MAX_FILES if many else 1)
        self.metrics.images.observe(len(files), tags={"route": route})
        return files

    def _preprocess(self, data: bytes, name: str) -> np.ndarray:
        if not data:
            raise error("empty_file", f"{name}: zero bytes")
        try:
            return self.predictor.preprocess(data)
        except ImageError as e:
            raise image_error(e, name) from e

    async def _face_crops(self, data: bytes, name: str, route: str, detect: str) -> tuple[list[Face], np.ndarray]:
        """Decode and detect off the event loop: MTCNN takes a tenth of a second a photo on a CPU."""
        if not data:
            raise error("empty_file", f"{name}: zero bytes")
        try:  # the detector loads on the first request that asks for it
            faces, crops = await asyncio.get_running_loop().run_in_executor(
                None, self.predictor.face_crops, data, detect)
        except ImageError as e:
            raise image_error(e, name) from e
        except ImportError as e:
            raise error("face_detection_unavailable", str(e)) from e
        self.metrics.faces.observe(len(faces), tags={"route": route})
        return faces, crops

    async def _age(self, data: bytes, name: str) -> float:
        return await self.forward(self._preprocess(data, name))

    async def _face_ages(self, data: bytes, name: str, route: str, detect: str) -> tuple[list[Face], list[float]]:
        faces, crops = await self._face_crops(data, name, route, detect)
        # one array per face through the shared batcher: the faces of a group photo, and other
        # requests, go through the network together
        return faces, list(await asyncio.gather(*(self.forward(crop) for crop in crops)))

    def _no_face(self, faces: list[Face]) -> str | None:
        return None if faces else self.predictor.no_face_message()

    # -- routes --------------------------------------------------------------------------------------

    @app.post("/v1/age", response_model=AgeAnswer | FacesAnswer, responses=IMAGE_REFUSALS,
              openapi_extra=image_body(many=False), summary="Age of every face of a photo, or of one face crop")
    async def age(self, request: Request, detect_faces: str = DetectQuery) -> AgeAnswer | FacesAnswer:
        start = time.perf_counter()
        (name, data), = await self._images(request, "/v1/age", many=False)
        if detect_faces == "false":
            age = await self._age(data, name)
            return AgeAnswer(age=round(age, 2), likely_range=self._range(age), seconds=_since(start),
                             model=self.identity)
        faces, ages = await self._face_ages(data, name, "/v1/age", detect_faces)
        answers = [FaceAge(box=f.box, face_score=f.score, aligned=f.aligned, age=round(a, 2),
                           likely_range=self._range(a)) for f, a in zip(faces, ages, strict=True)]
        main = answers[_largest(faces)] if faces else None
        return FacesAnswer(age=main and main.age, likely_range=main and main.likely_range, faces=answers,
                           message=self._no_face(faces), seconds=_since(start), model=self.identity)

    @app.post("/v1/age/batch", response_model=BatchAnswer, responses=IMAGE_REFUSALS,
              openapi_extra=image_body(many=True), summary=f"Ages of up to {MAX_FILES} images")
    async def age_batch(self, request: Request, detect_faces: str = DetectQuery) -> BatchAnswer:
        files = await self._images(request, "/v1/age/batch", many=True)
        results = await asyncio.gather(*(self._batch_item(n, d, detect_faces) for n, d in files))
        return BatchAnswer(results=list(results), model=self.identity)

    async def _batch_item(self, name: str, data: bytes, detect_faces: str) -> BatchItem:
        """One file's answer (with faces: its largest face's); a bad file is refused on its own line."""
        start = time.perf_counter()
        try:
            if detect_faces == "false":
                age = await self._age(data, name)
                return BatchItem(name=name, age=round(age, 2), likely_range=self._range(age), seconds=_since(start))
            faces, ages = await self._face_ages(data, name, "/v1/age/batch", detect_faces)
            if not faces:
                raise error(NO_FACE, f"{name}: {self._no_face(faces)}")
            i = _largest(faces)
            return BatchItem(name=name, age=round(ages[i], 2), likely_range=self._range(ages[i]), box=faces[i].box,
                             face_score=faces[i].score, aligned=faces[i].aligned, seconds=_since(start))
        except HTTPException as e:
            self.metrics.refusals.inc(tags={"route": "/v1/age/batch", "reason": e.detail["error"]})
            return BatchItem(name=name, seconds=_since(start), **e.detail)

    @app.post("/v1/verify", response_model=VerifyAnswer | VerifyFacesAnswer, responses=IMAGE_REFUSALS,
              openapi_extra=image_body(many=False), summary="Is the person at least min_age?")
    async def verify(
        self,
        request: Request,
        min_age: float = Query(18, ge=1, le=100, description="the age to check against, in years"),
        detect_faces: str = DetectQuery,
    ) -> VerifyAnswer | VerifyFacesAnswer:
        start = time.perf_counter()
        (name, data), = await self._images(request, "/v1/verify", many=False)
        if detect_faces == "false":
            age = await self._age(data, name)
            return VerifyAnswer(**self._verdict(age, min_age), min_age=min_age, seconds=_since(start),
                                model=self.identity)
        faces, ages = await self._face_ages(data, name, "/v1/verify", detect_faces)
        verdicts = [FaceVerdict(box=f.box, face_score=f.score, aligned=f.aligned, **self._verdict(a, min_age))
                    for f, a in zip(faces, ages, strict=True)]
        return VerifyFacesAnswer(min_age=min_age, verdict=verdicts[_largest(faces)].verdict if faces else None,
                                 faces=verdicts, message=self._no_face(faces), seconds=_since(start),
                                 model=self.identity)

    def _verdict(self, age: float, min_age: float) -> dict[str, Any]:
        return self.predictor.describe(age, min_age)

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        return Health(status="ok")

    @app.get("/v1/model", response_model=ModelAnswer, summary="The model, its metrics and the service's limits")
    async def model(self) -> ModelAnswer:
        meta = self.predictor.meta
        return ModelAnswer(**self.identity.model_dump(), preprocessing=meta["preprocessing"],
                           metrics=meta.get("metrics", {}),
                           versions=meta.get("versions"), calibrated=self.predictor.calibration is not None,
                           limits=Limits(max_body_bytes=self.max_body, max_files=MAX_FILES, batch_size=BATCH_SIZE))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> str:
        return PAGE


def build_app(args: dict[str, Any]) -> serve.Application:
    """Entry point for ``serve run`` / ``serve deploy`` (``import_path: ray_jobs.serve:build_app``)."""
    return age_app(parse_args(args))  # Serve calls application builders with exactly one argument


def parse_args(args: dict[str, Any]) -> ServeConfig:
    """A config's ``args:`` as a ``ServeConfig``; an unknown key or a bad value raises ``InvalidInput``."""
    try:
        return ServeConfig.from_dict(dict(args))
    except TypeError as e:  # a required key left out, or a value of the wrong type
        raise InvalidInput(f"serve args: {e}") from e


def age_app(config: ServeConfig) -> serve.Application:
    """The application for ``config``: the checkpoint is checked here, before any replica starts."""
    checkpoint = storage.absolute(config.checkpoint)
    read_meta(checkpoint)  # raises MissingInput / InvalidInput for a folder that is not a checkpoint
    read_calibration(checkpoint, config.calibration)  # and a calibration name it does not hold
    config = ServeConfig.from_dict({**config.to_dict(), "checkpoint": checkpoint})
    return AgeService.options(**config.deployment_options()).bind(config)


def check_port_free(host: str, port: int, option: str) -> None:
    """Refuse a port that something already listens on, before Ray starts (Serve would retry it forever)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise InvalidInput(f"{option} {port}: {host}:{port} is in use ({e.strerror}); stop what listens "
                               f"there or choose another with {option}") from e


def build_parser() -> argparse.ArgumentParser:
    from ray_jobs.serve import __doc__ as routes

    p = argparse.ArgumentParser(prog="age serve", description=routes,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, ServeConfig)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, local only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    p.add_argument("--metrics-port", type=int, default=8080,
                   help="Prometheus metrics of a local Ray (with RAY_ADDRESS: the cluster's own; default: %(default)s)")
    p.add_argument("--log-file", default="runs/serve/age.log",
                   help="where Ray's and Serve's own output goes (default: %(default)s); each replica's "
                        "request log stays in Ray's session logs, logs/serve/")
    p.add_argument("--verbose", action="store_true", help="show Ray's and Serve's own logs on the terminal as well")
    return p


def ready_message(config: ServeConfig, args: argparse.Namespace) -> str:
    """What ``age serve`` says once the service answers: the model, where to reach it, where its logs are."""
    from ray_jobs.common import LOCAL_RAY_LOGS

    meta = read_meta(storage.absolute(config.checkpoint))
    val_mae = meta.get("metrics", {}).get("val_mae")
    model = meta["model"]["backbone"] + (f", validation MAE {val_mae:.2f}" if val_mae is not None else "")
    url = f"http://{args.host}:{args.port}"
    return (f"serving {config.checkpoint} ({model}) at {url}/\n"
            f"  the page: {url}/   the API's docs: {url}/docs\n"
            f"  logs: {args.log_file}; each request: Ray's session logs, logs/serve/ "
            f"(a local Ray's: {LOCAL_RAY_LOGS}/serve/)\n"
            "  Ctrl-C stops it")


def main(argv: list[str] | None = None) -> None:
    """``age serve``: check the config, the checkpoint and the ports, then serve until interrupted.

    The terminal gets where the service listens once it is ready; Ray's and Serve's own output goes
    to ``--log-file`` (to the terminal as well with ``--verbose``).
    """
    args = build_parser().parse_args(argv)
    config = config_from_args(ServeConfig, args)
    application = age_app(config)
    check_port_free(args.host, args.port, "--port")
    if not os.environ.get("RAY_ADDRESS"):  # a local Ray: its metrics port must be free too
        check_port_free("0.0.0.0", args.metrics_port, "--metrics-port")
    from ray_jobs.common import init_ray, setup_logging

    setup_logging(args.verbose, log_file=args.log_file)  # the terminal: the lines below
    init_ray(quiet=not args.verbose, metrics_port=args.metrics_port)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application, name="age", route_prefix="/")  # as serve_config.yaml names it
    print(ready_message(config, args), file=sys.stderr, flush=True)
    while True:  # Serve's replicas run in Ray's processes; this one waits for Ctrl-C (run_stage: exit 130)
        time.sleep(3600)
