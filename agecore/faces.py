"""Find faces in uncropped photos and align them the way the training crops are aligned.

The model learnt from aligned face crops (UTKFace chips: eyes level, at a fixed place and scale,
forehead cut). ``FaceDetector`` finds each face and its five landmarks with facenet-pytorch's
MTCNN, whose weights ship inside the package (nothing is downloaded); ``align`` warps the face
with the similarity transform that puts its landmarks onto the training crops' own landmark
layout, as insightface's ``norm_crop`` and dlib's face chips do. That layout (the *template*) is
measured from the training images by ``measure_template`` and stored in the checkpoint's
preprocessing; ``UTKFACE_TEMPLATE`` stands in for checkpoints that carry none::

    faces = FaceDetector().detect(photo)
    crops = [align(photo, f.landmarks, UTKFACE_TEMPLATE, 224) for f in faces]  # 224 x 224 x 3 each
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pa_ds
import pyarrow.fs
import torch
from PIL import Image

from agecore import storage
from agecore.config import FaceDetection
from agecore.errors import MissingDependency, MissingInput
from agecore.images import load_image, open_image
from agecore.mtcnn import Cascade

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "face detection needs facenet-pytorch (MTCNN, weights included): "
    'pip install --no-deps "facenet-pytorch==2.6.0" '
    "(--no-deps because its metadata pins torch<2.3, while MTCNN runs on current torch; "
    "its other needs, torchvision, numpy, pillow and requests, are installed already)"
)

# The reason of the error of a photo in which no face was found, in score rows and HTTP refusals.
NO_FACE = "no_face"

# MTCNN's five landmarks, in its order; left and right as seen in the image.
LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

Point = tuple[float, float]
Template = tuple[Point, ...]

# Mean landmarks of UTKFace chips, (x, y) in the unit square of the chip: the layout for checkpoints
# whose preprocessing carries no template of its own: ``template_from_files(FOLDER, 500)`` of the
# UTKFace chips.
UTKFACE_TEMPLATE: Template = (
    (0.3011, 0.2933), (0.6923, 0.2936), (0.4961, 0.5242), (0.3184, 0.6951), (0.6717, 0.6952),
)

# Grey border (share of the image's longer side) around an image before faces are looked for where it
# may be a face crop: MTCNN misplaces the landmarks of a face that fills the whole frame.
CROP_PAD = 0.25
# A template from fewer crops than this is not trusted: the fallback is used instead.
MIN_TEMPLATE_FACES = 20
# The face of a training crop spans most of it: nothing under 45% of its side is looked for, on a small copy (speed).
TEMPLATE_DETECTION = FaceDetection(min_fraction=0.45, working_size=192)
TEMPLATE_SAMPLE = 200

_WARP_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.BICUBIC,  # PIL's affine warp offers no Lanczos
}


def require_mtcnn() -> type:
    """facenet-pytorch's ``MTCNN`` class, or a ``MissingDependency`` (an ``ImportError``) that says how to install it."""
    try:
        from facenet_pytorch import MTCNN
    except ImportError as e:
        raise MissingDependency(INSTALL_HINT) from e
    return MTCNN


@dataclass(frozen=True)
class Face:
    """One detection in pixels of the photo: ``box`` (x1, y1, x2, y2, to 0.1 px), ``score`` MTCNN's probability,
    ``landmarks`` five (x, y) points in ``LANDMARKS`` order. ``aligned`` is False for an image that is a
    face crop already (``is_face_crop``): the model then sees it as it is, and ``box`` is the whole image."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: tuple[Point, ...]
    aligned: bool = True


def square_box(box: tuple[float, float, float, float], margin: float) -> tuple[int, int, int, int]:
    """The square around a detection: centred on the box, side = longer side x (1 + margin).

    The unaligned framing, kept for comparisons (``benchmarks/robustness.py``).

    >>> square_box((50.0, 60.0, 210.0, 266.0), 0.05)
    (22, 55, 238, 271)
    """
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * (1.0 + margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    size = max(1, round(side))
    return left, top, left + size, top + size


# How far the framing of a face may stray from the template's for its image to count as a face crop,
# measured on the centre square the model sees: |log| of the scale, and the shift of the landmarks'
# centre in units of the square's side. Chosen on UTKFace chips against FG-NET photos
# (docs/benchmarks.md, "Crop or photo").
CROP_MAX_LOG_SCALE = 0.14
CROP_MAX_SHIFT = 0.115


def crop_framing(face: Face, size: tuple[int, int], template: Sequence[Point]) -> tuple[float, float]:
    """``(|log scale|, shift)`` of the similarity that takes ``template`` onto the face's landmarks, in
    the centre square of an image of ``size`` (what ``resize_square`` gives the model); (0, 0) for a
    face framed exactly like the training crops.

    >>> t = UTKFACE_TEMPLATE; face = Face((0, 0, 100, 100), 1.0, tuple((100 * x, 100 * y + 10) for x, y in t))
    >>> [round(v, 3) for v in crop_framing(face, (100, 120), t)]
    [0.0, 0.0]
    """
    side = min(size)
    corner = np.array([(size[0] - side) / 2, (size[1] - side) / 2])
    points = (np.asarray(face.landmarks, np.float64) - corner) / side
    template = np.asarray(template, np.float64)
    m = similarity_transform(template, points)
    return abs(math.log(math.hypot(m[0, 0], m[1, 0]))), float(np.hypot(*(points.mean(0) - template.mean(0))))


def is_face_crop(face: Face, size: tuple[int, int], template: Sequence[Point]) -> bool:
    """Whether an image of ``size`` whose main face is ``face`` is framed like the training crops."""
    log_scale, shift = crop_framing(face, size, template)
    return log_scale <= CROP_MAX_LOG_SCALE and shift <= CROP_MAX_SHIFT


def box_area(box: Sequence[float]) -> float:
    """The area of an (x1, y1, x2, y2) box."""
    return (box[2] - box[0]) * (box[3] - box[1])


def largest(faces: Sequence[Face]) -> Face:
    """The face with the largest box: the one a photo's single answer is about (one person a photo).

    >>> largest([Face((0, 0, 10, 10), 0.9, ()), Face((5, 5, 40, 30), 0.8, ())]).box
    (5, 5, 40, 30)
    """
    return max(faces, key=lambda f: box_area(f.box))


def crops_of(photo: Image.Image, faces: Sequence[Face], template: Sequence[Point], size: int,
             interpolation: str = "bicubic", detect_faces: str = "auto") -> tuple[list[Face], np.ndarray]:
    """The model inputs of ``faces`` found in ``photo`` (``FaceDetector.detect(photo, pad=CROP_PAD)``),
    ``(faces, N x size x size x 3)``: the one rule of prediction and preparation.

    With ``detect_faces="auto"``, a photo whose largest face is framed like ``template`` (``is_face_crop``)
    is one face, taken as it is (``aligned`` False, its box the whole image); otherwise each face is
    warped onto ``template`` (``align``).
    """
    if detect_faces == "auto" and faces and is_face_crop(main := largest(faces), photo.size, template):
        whole = Face((0.0, 0.0, float(photo.width), float(photo.height)), main.score, main.landmarks, aligned=False)
        return [whole], load_image(photo, size, interpolation)[None].copy()
    crops = [align(photo, face.landmarks, template, size, interpolation) for face in faces]
    return list(faces), np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)


# -- alignment -----------------------------------------------------------------------------------------


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix of the rotation, uniform scale and shift that takes ``src`` points closest to
    ``dst`` in least squares (Umeyama 1991; never a reflection).

    >>> src = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> similarity_transform(src, 2 * src[:, ::-1] * [-1, 1] + [10, 20]).round(6) + 0.0
    array([[ 0., -2., 10.],
           [ 2.,  0., 20.]])
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two equal N x 2 point sets (N >= 2), got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    u, s, vt = np.linalg.svd(dst_c.T @ src_c / len(src))
    d = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])  # no mirror image
    rotation = u @ np.diag(d) @ vt
    scale = float((s * d).sum() / (src_c**2).sum(1).mean())
    shift = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, shift[:, None]])


def align(image: Image.Image, landmarks: Sequence[Point] | np.ndarray, template: Sequence[Point],
          size: int, interpolation: str = "bicubic") -> np.ndarray:
    """The face warped so that its ``landmarks`` land on ``template`` x ``size``: a square ``uint8``
    HWC array of side ``size``, black where it reaches outside the photo (as in the UTKFace chips).

    A face much larger than ``size`` is box-filtered down first (``Image.reduce``) over the region
    the crop covers: the affine warp samples without antialiasing.
    """
    target = np.asarray(template, np.float64) * size
    # PIL's warp maps each output pixel back into the photo: the transform from crop to photo
    inverse = similarity_transform(target, np.asarray(landmarks, np.float64))
    factor = int(math.hypot(inverse[0, 0], inverse[1, 0]))  # photo pixels per crop pixel
    if factor >= 2:
        corners = inverse @ np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64).T
        left, top = np.floor(corners.min(1)).astype(int)
        right, bottom = np.ceil(corners.max(1)).astype(int)
        image = image.crop((left, top, right, bottom)).reduce(factor)
        inverse = np.hstack([inverse[:, :2], (inverse[:, 2] - (left, top))[:, None]]) / factor
    warped = image.transform((size, size), Image.Transform.AFFINE, tuple(inverse.ravel()),
                             resample=_WARP_RESAMPLE[interpolation])
    return np.asarray(warped, dtype=np.uint8)


# -- detection -----------------------------------------------------------------------------------------


class WorkingCopy(NamedTuple):
    """The image MTCNN runs on (``FaceDetector.working_copy``): ``pixels`` (H x W x 3 uint8), the
    photo scaled by ``sx``, ``sy`` inside a grey ``margin`` (pixels), and the smallest face to look
    for there (``min_face``, pixels)."""

    pixels: np.ndarray
    sx: float
    sy: float
    margin: int
    min_face: float


class FaceDetector:
    """MTCNN behind a small interface: ``detect`` -> faces left to right, with their landmarks.

    For speed, MTCNN (``agecore.mtcnn``) runs on a copy of the photo, with its grey border where it
    is padded, scaled down to ``config.working_size`` on its longer side (``working_copy``), and
    looks for faces down to ``min_face`` only; boxes and landmarks come back in pixels of the photo
    itself. Detections under ``config.min_score``, or under ``config.min_size``
    pixels on their longer side (too little detail for an age estimate), are dropped. ``detect``
    may be called from several threads at once (a Serve replica does).
    """

    def __init__(self, config: FaceDetection | None = None, device: str | None = None) -> None:
        MTCNN = require_mtcnn()
        self.config = config or FaceDetection()
        self.cascade = Cascade(MTCNN(device=device or "cpu"))

    def min_face(self, size: tuple[int, int]) -> float:
        """The smallest face looked for in a photo of ``size`` (pixels of the photo): ``min_size``,
        or ``min_fraction`` of the shorter side where that is larger."""
        return max(float(self.config.min_size), self.config.min_fraction * min(size))

    def working_copy(self, image: Image.Image, pad: float = 0.0) -> WorkingCopy:
        """What MTCNN looks at in ``image``: a copy at most ``working_size`` on its longer side,
        surrounded by a grey border of ``pad`` times that side."""
        border = round(pad * max(image.size))
        scale = min(1.0, self.config.working_size / (max(image.size) + 2 * border))
        small = image
        if scale < 1.0:
            small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.BILINEAR, reducing_gap=2.0)
        sx, sy = small.width / image.width, small.height / image.height
        margin = round(border * scale)
        pixels = np.pad(np.asarray(small), ((margin, margin), (margin, margin), (0, 0)), constant_values=128)
        return WorkingCopy(pixels, sx, sy, margin, max(12.0, self.min_face(image.size) * min(sx, sy)))

    def detect(self, image: Image.Image, pad: float = 0.0) -> list[Face]:
        """Faces in an RGB photo, ordered left to right (then top to bottom).

        ``pad`` surrounds the photo with a grey border of that share of its longer side first: MTCNN
        misplaces the landmarks of a face that fills the whole frame.
        """
        work = self.working_copy(image, pad)
        boxes, points = self.cascade.detect(work.pixels, work.min_face)
        boxes[:, :4] -= work.margin
        points -= work.margin
        sx, sy = work.sx, work.sy
        faces = []
        for (x1, y1, x2, y2, score), pts in zip(boxes.astype(np.float64), points.astype(np.float64), strict=True):
            x1, y1, x2, y2 = x1 / sx, y1 / sy, x2 / sx, y2 / sy
            if score >= self.config.min_score and max(x2 - x1, y2 - y1) >= self.config.min_size:
                landmarks = tuple((float(x / sx), float(y / sy)) for x, y in pts)  # exact: the warp uses them
                # the box to a tenth of a pixel and the score to four places: all the answers can use
                box = (round(float(x1), 1), round(float(y1), 1), round(float(x2), 1), round(float(y2), 1))
                faces.append(Face(box, round(float(score), 4), landmarks))
        return sorted(faces, key=lambda f: (f.box[0], f.box[1]))


# -- the template: where the training crops have their landmarks ---------------------------------------


def _landmarks_in_crop(crop: Image.Image, detector: FaceDetector) -> np.ndarray | None:
    """The most confident face's landmarks in the unit square of ``crop``, or None without a face."""
    faces = detector.detect(crop, pad=CROP_PAD)
    if not faces:
        return None
    best = max(faces, key=lambda f: f.score)
    return np.asarray(best.landmarks) / crop.size


def measure_template(crops: Iterable[Image.Image | np.ndarray], detector: FaceDetector | None = None) -> Template | None:
    """Mean landmark positions of the training crops, (x, y) in the unit square of a crop.

    The most confident face of each crop counts; None when fewer than ``MIN_TEMPLATE_FACES``
    crops show one (too few to trust).
    """
    detector = detector or FaceDetector(TEMPLATE_DETECTION)
    found = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # MTCNN's small passes: threads cost more than they bring
    try:
        for crop in crops:
            image = Image.fromarray(crop) if isinstance(crop, np.ndarray) else crop.convert("RGB")
            points = _landmarks_in_crop(image, detector)
            if points is not None:
                found.append(points)
    finally:
        torch.set_num_threads(threads)
    if len(found) < MIN_TEMPLATE_FACES:
        log.warning("landmarks found on %d crops only (need %d): no face template measured", len(found),
                    MIN_TEMPLATE_FACES)
        return None
    mean = np.mean(found, axis=0)
    return tuple((round(float(x), 4), round(float(y), 4)) for x, y in mean)


def template_from_files(folder: str | Path, n: int = TEMPLATE_SAMPLE) -> Template | None:
    """The template of ``n`` images spread evenly over a folder's sorted file names."""
    paths = sorted(Path(folder).iterdir())
    picks = np.unique(np.linspace(0, len(paths) - 1, n).round().astype(int)) if paths else []
    return measure_template(open_image(paths[i]) for i in picks)


def prepared_sample(split_path: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` preprocessed images (N x S x S x 3) of a prepared split and their ages
    (prepare shuffles the rows, so the first are a sample)."""
    fs, inner = storage.filesystem(split_path)
    if fs.get_file_info(inner).type == pyarrow.fs.FileType.NotFound:
        raise MissingInput(f"{split_path}: no such prepared split")
    table = pa_ds.dataset(inner, filesystem=fs, format="parquet").head(n, columns=["image", "age"])
    column = table.column("image").combine_chunks()
    storage_array = column.storage if isinstance(column, pa.ExtensionArray) else column
    flat = storage_array.flatten().to_numpy(zero_copy_only=False)
    side = math.isqrt(len(flat) // max(1, len(column)) // 3)
    return flat.reshape(-1, side, side, 3), table.column("age").to_numpy().astype(np.float64)


def template_from_prepared(prepared: str, n: int = TEMPLATE_SAMPLE) -> Template | None:
    """The template of ``n`` training images of a prepared set (seconds: MTCNN on small crops).

    None, with a warning, when facenet-pytorch is not installed or too few faces are found: the
    predictor then aligns with ``UTKFACE_TEMPLATE``.
    """
    from agecore.prepare import split_dir

    try:
        detector = FaceDetector(TEMPLATE_DETECTION)
    except ImportError:
        log.warning("no face template measured: %s", INSTALL_HINT)
        return None
    images, _ = prepared_sample(split_dir(prepared, "train"), n)
    return measure_template(images, detector)
