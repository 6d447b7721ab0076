"""Checkpoint -> age predictions: the one inference path of evaluation, bulk scoring and serving.

Images come as a path or URI, encoded bytes, a PIL image or an HxWx3 ``uint8`` array.
``predict_faces`` takes any photo: a face crop framed like the training crops is used as it is, and
any other photo has its faces found and aligned first (``detect_faces="auto"``). ``predict`` is the
fast path for face crops alone: one age (a ``float``) for one image, an array for a list.

    >>> from agecore import Predictor
    >>> predictor = Predictor("runs/faces/train/best")  # doctest: +SKIP
    >>> predictor.predict_faces("group.jpg")  # doctest: +SKIP
    [{'box': [48.1, 60.2, 208.9, 266.0], 'face_score': 0.9995, 'aligned': True, 'age': 27.3}, ...]
    >>> predictor.predict(["face.jpg", Image.open("other.png")])  # doctest: +SKIP
    array([31.4, 52.0], dtype=float32)
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import pandas as pd
import torch
from PIL import Image

from agecore import __version__
from agecore.checkpoint import load_checkpoint, preprocessing, read_calibration, weights_digest
from agecore.config import PRECISIONS, DetectFaces, FaceDetection, detect_mode
from agecore.faces import (
    CROP_PAD,
    NO_FACE,
    UTKFACE_TEMPLATE,
    Face,
    FaceDetector,
    box_area,
    crops_of,
)
from agecore.images import ImageError, ImageLike, load_image, normalize, open_image
from agecore.metrics import fallback_margin, likely_range, verify_answer
from agecore.model import freeze_graph, native_bf16

if TYPE_CHECKING:
    from agecore.calibration import Correction

log = logging.getLogger(__name__)

# How many images go through the network at once when the caller does not say. On CPUs the best
# size depends on the network (depthwise layers are memory-bound and like small chunks that stay in
# cache; ResNet50 likes larger ones), so the predictor times these at load, as cudnn.benchmark
# does for convolution algorithms. GPUs want large batches.
CPU_CHUNK_CANDIDATES = (4, 16)
GPU_CHUNK = 256


def _is_single(images: object) -> bool:
    """One image, as opposed to a list, tuple or NxHxWx3 array of them."""
    if isinstance(images, np.ndarray):
        return images.ndim == 3
    return not isinstance(images, (list, tuple))


class Predictor:
    """Loads a checkpoint once; preprocesses exactly as training did (from what the checkpoint stores).

    ``tta_flip`` averages the prediction of the image and its mirror image (by default, as the
    checkpoint was validated, which its likely-range margins were measured with). On CPU the network
    is frozen to TorchScript (``freeze_graph``), which runs faster than eager (docs/benchmarks.md).
    ``precision="bf16"`` autocasts, and is the default where the device runs bf16 natively
    (``native_bf16``); ``"fp32"`` turns it off.
    ``faces`` configures the face detector of ``predict_faces``, which loads on first use only.
    ``batch_size`` is how many images one forward pass takes; by default the faster of
    ``CPU_CHUNK_CANDIDATES`` timed at load on CPUs, ``GPU_CHUNK`` on GPUs.

    ``calibration`` names a calibration stored in the checkpoint (``age calibrate``): its correction
    applies to every age returned, and ``self.calibration`` is then its dict, whose margins draw the
    likely ranges (``agecore.metrics.likely_range``); without it, ``self.calibration`` is the
    checkpoint's ``calibration.json`` (None where there is none) and ages are the model's own.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        device: str | None = None,
        *,
        tta_flip: bool | None = None,
        precision: str | None = None,
        batch_size: int | None = None,
        threads: int | None = None,
        freeze: bool = True,
        faces: FaceDetection | None = None,
        calibration: str | None = None,
    ) -> None:
        # an unknown calibration name fails here, before the model is loaded or timed
        self.calibration_name = calibration
        self.calibration = read_calibration(checkpoint, calibration)
        self.correction = _correction(self.calibration) if calibration else None
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, self.meta = load_checkpoint(checkpoint, self.device)
        self.prep = preprocessing(self.meta)
        self.tta_flip = self.meta["train"].get("tta_flip", False) if tta_flip is None else tta_flip
        self.precision = precision or ("bf16" if native_bf16(self.device) else "fp32")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        model = model.to(memory_format=torch.channels_last)
        self.frozen = freeze and self.device.type == "cpu"
        if self.frozen:
            model = freeze_graph(model, self.prep.input_size, bf16=self.precision == "bf16")
        self.model = model
        if batch_size is None:
            batch_size = self._fastest_chunk(CPU_CHUNK_CANDIDATES) if self.device.type == "cpu" else GPU_CHUNK
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.checkpoint = str(checkpoint)
        self.face_config = faces or FaceDetection()
        self._face_detector: FaceDetector | None = None
        self._face_lock = threading.Lock()

    @torch.inference_mode()
    def _fastest_chunk(self, candidates: Sequence[int]) -> int:
        """The largest chunk size of ``candidates`` within 5% of the most images/s, timed on random input.

        Each size runs twice before it is timed: a frozen graph is slow on the first calls with a
        new input shape, and the warmed shapes are the
        ones inference then uses. Then the sizes are timed in turn, twice, and each keeps its best
        time, so that a burst of other work on the machine does not decide for one of them.
        """
        size = self.prep.input_size
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(max(candidates), 3, size, size, generator=generator)
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        for n in candidates:
            for _ in range(2):
                self._network(x[:n])
        seconds_per_image = dict.fromkeys(candidates, float("inf"))
        for _ in range(2):
            for n in candidates:
                start = time.perf_counter()
                self._network(x[:n])
                seconds_per_image[n] = min(seconds_per_image[n], (time.perf_counter() - start) / n)
        fastest = min(seconds_per_image.values())
        # the largest within 5% of the fastest: Serve's batches then go through in one pass, not several
        best = max(n for n, t in seconds_per_image.items() if t <= 1.05 * fastest)
        log.info("forward pass chunk %d chosen (ms an image: %s)", best,
                 ", ".join(f"{n}: {t * 1000:.1f}" for n, t in seconds_per_image.items()))
        return best

    @functools.cached_property
    def identity(self) -> dict[str, Any]:
        """What a client needs to know about the model that answered: no path, a digest of its weights instead."""
        return {
            "backbone": self.meta["model"]["backbone"],
            "weights": weights_digest(self.checkpoint),
            "epoch": self.meta.get("epoch"),
            "val_mae": self.meta.get("metrics", {}).get("val_mae"),
            "input_size": self.prep.input_size,
            "tta_flip": self.tta_flip,
            "precision": self.precision,
            "version": __version__,
            "calibration": self.calibration_name,
        }

    # -- preprocessing: the shared path in agecore.images -----------------------------------------

    @staticmethod
    def photo(image: ImageLike) -> Image.Image:
        """A path or URI, encoded bytes (validated, EXIF orientation applied), a PIL image or an HWC
        uint8 array -> RGB image (``agecore.images.open_image``): the whole photo, for face detection."""
        return open_image(image)

    def preprocess(self, image: ImageLike) -> np.ndarray:
        """Any ``photo`` input -> the model's square uint8 input (``agecore.images.load_image``)."""
        return load_image(image, self.prep.input_size, self.prep.interpolation)

    # -- faces in uncropped photos -------------------------------------------------------------------

    @property
    def face_detector(self) -> FaceDetector:
        """MTCNN, loaded on first use: nothing to install or load for those who never detect faces."""
        if self._face_detector is None:
            with self._face_lock:  # a Serve replica may ask from several threads at once
                if self._face_detector is None:
                    self._face_detector = FaceDetector(self.face_config, str(self.device))
        return self._face_detector

    def face_crops(self, image: ImageLike, detect_faces: DetectFaces = "auto") -> tuple[list[Face], np.ndarray]:
        """The faces of a photo (left to right) and their crops as model input, ``(faces, N x S x S x 3)``.

        With ``detect_faces="auto"``, an image whose largest face is framed like the training crops
        (``agecore.faces.is_face_crop``) is one face, taken as it is (``aligned`` False, its box the
        whole image). Otherwise, and always with ``"true"``, each face is warped by its five landmarks
        onto the training crops' landmark layout (the checkpoint's ``face_template``, else
        ``UTKFACE_TEMPLATE``) straight at the input size. Every crop then goes through the same
        ``normalize`` as any other input.
        """
        if detect_faces not in ("auto", "true"):
            raise ValueError(f"face_crops detects faces: detect_faces must be 'auto' or 'true', got {detect_faces!r}")
        photo = self.photo(image)
        faces = self.face_detector.detect(photo, pad=CROP_PAD)
        return self.crops_of(photo, faces, detect_faces)

    def crops_of(self, photo: Image.Image, faces: Sequence[Face],
                 detect_faces: DetectFaces = "auto") -> tuple[list[Face], np.ndarray]:
        """``face_crops`` of faces already found in ``photo`` (``FaceDetector.detect(photo, pad=CROP_PAD)``):
        detections do not depend on the model, so they can be kept and used again with another checkpoint."""
        return crops_of(photo, faces, self.prep.face_template or UTKFACE_TEMPLATE, self.prep.input_size,
                        self.prep.interpolation, detect_faces)

    def no_face_message(self, image: Image.Image | None = None) -> str:
        """Why a photo gave no face: the score and size rules it was held to."""
        cfg = self.face_config
        smallest = f"{self.face_detector.min_face(image.size):.0f} px" if image is not None else (
            f"{cfg.min_size} px or {cfg.min_fraction:.0%} of the photo's shorter side")
        where = f" in the {image.size[0]}x{image.size[1]} photo" if image is not None else ""
        return f"no face with score >= {cfg.min_score} and size >= {smallest} found{where}"

    # -- inference ---------------------------------------------------------------------------------

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        """One pass of the network over a normalised batch, in the predictor's precision."""
        # a frozen graph holds its own casts (see freeze_graph); an eager model gets them from autocast
        bf16 = self.precision == "bf16" and not self.frozen
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            return self.model(x).float()

    @torch.inference_mode()
    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed uint8 NHWC batch -> ages in years (float32), in chunks of ``batch_size`` or fewer.

        The chunks are as even as can be (5 images in chunks of 4: 3 + 2, not 4 + 1): small chunks
        run fewer images a second, a chunk of one fewest.
        """
        out = []
        for chunk in np.array_split(images, -(-len(images) // self.batch_size)) if len(images) else []:
            # a read-only array (a memory map, a decoded Arrow buffer) is copied: torch warns on it otherwise
            chunk = torch.from_numpy(np.require(chunk, requirements=["C", "W"]))
            x = normalize(chunk.to(self.device), self.prep)
            pred = self._network(x)
            if self.tta_flip:
                pred = (pred + self._network(torch.flip(x, dims=[3]))) / 2
            out.append(pred.cpu().numpy())
        ages = np.concatenate(out) if out else np.zeros(0, np.float32)
        # every age the predictor returns goes through here: the one place a named calibration applies
        return (self.correction.apply(ages) if self.correction else ages).astype(np.float32)

    @overload
    def predict(self, images: ImageLike) -> float: ...
    @overload
    def predict(self, images: Sequence[ImageLike]) -> np.ndarray: ...

    def predict(self, images: ImageLike | Sequence[ImageLike]) -> float | np.ndarray:
        """The age of one image (a float), or the ages of a list of images (float32 array).

        Raises ``ImageError`` naming the first unusable image; ``predict_paths`` instead reports
        each bad file and goes on.
        """
        if _is_single(images):
            return float(self.predict([images])[0])
        arrays = []
        for i, img in enumerate(images):
            try:
                arrays.append(self.preprocess(img))
            except ImageError as e:
                name = img if isinstance(img, (str, Path)) else f"image {i}"
                raise ImageError(e.reason, f"{name}: {e.detail}") from e
        return self.predict_arrays(np.stack(arrays)) if arrays else np.zeros(0, np.float32)

    def predict_faces(self, image: ImageLike, detect_faces: DetectFaces = "auto") -> list[dict[str, Any]]:
        """Every face of a photo: ``[{"box": [x1, y1, x2, y2], "face_score", "aligned", "age"}, ...]``.

        Any photo: a face crop is one face, as it is, where ``detect_faces="auto"`` (``face_crops``);
        ``"false"`` takes the image as a crop without looking for a face (box: the whole image,
        ``face_score`` None). One forward pass for all the faces; an empty list when there is none.
        """
        if detect_faces == "false":
            photo = self.photo(image)
            box = [0.0, 0.0, float(photo.width), float(photo.height)]
            return [{"box": box, "face_score": None, "aligned": False, "age": self.predict(photo)}]
        faces, crops = self.face_crops(image, detect_faces)
        ages = self.predict_arrays(crops)
        return [{"box": list(face.box), "face_score": face.score, "aligned": face.aligned, "age": float(age)}
                for face, age in zip(faces, ages, strict=True)]

    # -- the answers of the HTTP API -----------------------------------------------------------------

    @property
    def margin(self) -> float:
        """The half-width of the likely range where the checkpoint has no calibration."""
        return fallback_margin(self.meta.get("metrics", {}).get("val_mae"))

    def describe(self, age: float, min_age: float | None = None) -> dict[str, Any]:
        """One estimate as ``/v1/age`` gives it (``age``, ``likely_range``), and with ``min_age`` as
        ``/v1/verify`` does (the verdict, its challenge age and where its margin comes from)."""
        if min_age is not None:
            answer = verify_answer(age, min_age, self.calibration, self.margin)
            return {k: v for k, v in answer.items() if k != "min_age"}
        low, high = likely_range(np.array([age]), self.calibration, self.margin)
        return {"age": round(float(age), 2), "likely_range": [round(float(low[0]), 1), round(float(high[0]), 1)]}

    def answer(self, image: ImageLike, min_age: float | None = None, detect_faces: DetectFaces = "auto") -> dict[str, Any]:
        """What ``/v1/age`` (or with ``min_age``, ``/v1/verify``) answers for a photo: every face with its
        box, age, likely range (and verdict), and the largest face's age (or verdict) at the top;
        ``message`` says why no face was found, when none was."""
        photo = self.photo(image)
        faces = [{**{k: v for k, v in found.items() if k != "age"}, **self.describe(found["age"], min_age)}
                 for found in self.predict_faces(photo, detect_faces)]
        main = max(faces, key=lambda f: box_area(f["box"]), default=None)
        top = ({"min_age": min_age, "verdict": main and main["verdict"]} if min_age is not None else
               {"age": main and main["age"], "likely_range": main and main["likely_range"]})
        return {**top, "faces": faces, "message": None if faces else self.no_face_message(photo)}

    def verify(self, image: ImageLike, min_age: float, detect_faces: DetectFaces = "auto") -> dict[str, Any]:
        """Is each person of the photo at least ``min_age``? What ``/v1/verify`` answers (``answer``)."""
        return self.answer(image, min_age, detect_faces)

    def predict_paths(self, paths: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Ages (NaN where the image is unusable) and error texts ('' where fine), one per path."""
        ages = np.full(len(paths), np.nan, dtype=np.float32)
        errors = [""] * len(paths)
        arrays, ok = [], []
        for i, path in enumerate(paths):
            try:
                arrays.append(self.preprocess(str(path)))
                ok.append(i)
            except ImageError as e:
                errors[i] = f"{e.reason}: {e.detail}"
        if arrays:
            ages[ok] = self.predict_arrays(np.stack(arrays))
        return ages, errors


def _correction(calibration: dict[str, Any]) -> Correction:
    # imported on use: agecore.calibration brings the report code, which plain inference never needs
    from agecore.calibration import Correction

    return Correction.from_dict(calibration["correction"])


class BatchPredictor:
    """A Ray Data ``map_batches`` callable class: one checkpoint load per actor, rows in, rows out.

    Input column ``path`` (or ``image``, preprocessed uint8 rows of a prepared set); output adds
    ``predicted_age`` (null where unusable) and ``error``: one row per input row.

    With ``detect_faces`` ``"auto"`` or ``"true"`` (``Predictor.face_crops``) the input is photos by
    ``path`` and the output is one row per face (as a pandas DataFrame) with ``face`` (its index,
    left to right), ``box`` (x1, y1, x2, y2), ``face_score``, ``aligned`` (False for a face crop
    taken as it is), ``predicted_age`` and ``error``. A photo without a face still gets one row
    (``face`` null, error ``no_face: ...``), and so does an unusable one, so every input path
    appears in the output; the rows of a photo are always adjacent.
    """

    def __init__(self, checkpoint: str, device: str | None = None, threads: int | None = None,
                 tta_flip: bool | None = None, detect_faces: bool | str = False, precision: str | None = None,
                 calibration: str | None = None) -> None:
        self.predictor = Predictor(checkpoint, device, threads=threads, tta_flip=tta_flip, precision=precision,
                                   calibration=calibration)
        self.detect_faces = detect_mode(detect_faces)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray] | pd.DataFrame:
        if self.detect_faces != "false":
            return self._faces(batch)
        if "image" in batch:  # rows of a prepared set: already decoded by the same preprocessing
            ages, errors = self.predictor.predict_arrays(batch["image"]), [""] * len(batch["image"])
        else:
            ages, errors = self.predictor.predict_paths([str(p) for p in batch["path"]])
        out = {k: v for k, v in batch.items() if k != "image"}
        out["predicted_age"] = ages
        out["error"] = np.array(errors, dtype=object)
        return out

    def _faces(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        if "image" in batch:
            raise ValueError("detect_faces works on photos by path; rows of a prepared set are face crops already")
        rows: list[tuple[int, int | None, list[float] | None, float, bool | None, str]] = []
        crops = []
        for i, path in enumerate(batch["path"]):
            try:
                photo = self.predictor.photo(str(path))
                faces, arrays = self.predictor.face_crops(photo, self.detect_faces)
            except ImageError as e:
                rows.append((i, None, None, np.nan, None, f"{e.reason}: {e.detail}"))
                continue
            if not faces:
                rows.append((i, None, None, np.nan, None, f"{NO_FACE}: {self.predictor.no_face_message(photo)}"))
                continue
            crops.append(arrays)
            rows.extend((i, k, list(face.box), face.score, face.aligned, "") for k, face in enumerate(faces))
        source = np.array([r[0] for r in rows], dtype=np.int64)
        found = np.array([r[1] is not None for r in rows], dtype=bool)
        ages = np.full(len(rows), np.nan, dtype=np.float32)
        if crops:  # one forward pass over every face of the batch
            ages[found] = self.predictor.predict_arrays(np.concatenate(crops))
        out = pd.DataFrame({k: np.asarray(v)[source] for k, v in batch.items()})
        out["face"] = pd.array([r[1] for r in rows], dtype="Int32")
        out["box"] = pd.Series([r[2] for r in rows], dtype=object)
        out["face_score"] = np.array([r[3] for r in rows], dtype=np.float32)
        out["aligned"] = pd.array([r[4] for r in rows], dtype="boolean")
        out["predicted_age"] = ages
        out["error"] = np.array([r[5] for r in rows], dtype=object)
        return out
