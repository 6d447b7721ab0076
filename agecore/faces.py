"""Find faces in uncropped photos and crop them the way the training images were cropped.

The model learnt from face crops (UTKFace chips: the face fills a ~200 px square). A group photo
or a portrait with background has to be cut into such crops first; ``FaceDetector`` does that
with facenet-pytorch's MTCNN, whose weights ship inside the package (nothing is downloaded).

    >>> detector = FaceDetector()  # doctest: +SKIP
    >>> faces = detector.detect(photo)  # doctest: +SKIP
    >>> [detector.crop(photo, f).size for f in faces]  # doctest: +SKIP
    [(218, 218), (230, 230)]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from agecore.config import FaceDetection

INSTALL_HINT = (
    "face detection needs facenet-pytorch (MTCNN, weights included): "
    'pip install --no-deps "facenet-pytorch==2.6.0" '
    "(--no-deps because its metadata pins torch<2.3, while MTCNN runs on current torch; "
    "its other needs, torchvision, numpy, pillow and requests, are installed already)"
)


def require_mtcnn() -> type:
    """facenet-pytorch's ``MTCNN`` class, or an ``ImportError`` that says how to install it."""
    try:
        from facenet_pytorch import MTCNN
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return MTCNN


@dataclass(frozen=True)
class Face:
    """One detection: ``box`` is (x1, y1, x2, y2) in pixels of the photo, ``score`` MTCNN's probability."""

    box: tuple[float, float, float, float]
    score: float


def square_box(box: tuple[float, float, float, float], margin: float) -> tuple[int, int, int, int]:
    """The square crop around a detection: centred on the box, side = longer side x (1 + margin).

    >>> square_box((50.0, 60.0, 210.0, 266.0), 0.05)
    (22, 55, 238, 271)
    """
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * (1.0 + margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    size = max(1, round(side))
    return left, top, left + size, top + size


class FaceDetector:
    """MTCNN behind a small interface: ``detect`` -> faces left to right, ``crop`` -> square crops.

    Only detections with a score of at least ``config.min_score`` and a box at least
    ``config.min_size`` pixels on its longer side are kept: smaller faces hold too little
    detail for an age estimate. ``detect`` may be called from several threads
    at once (a Serve replica does).
    """

    def __init__(self, config: FaceDetection | None = None, device: str | None = None) -> None:
        MTCNN = require_mtcnn()
        self.config = config or FaceDetection()
        # keep_all: every face, not just the largest; the last-stage threshold is ours (min_score).
        self.mtcnn = MTCNN(keep_all=True, min_face_size=self.config.min_size, thresholds=[0.6, 0.7, 0.7],
                           select_largest=False, device=device or "cpu").eval()

    def detect(self, image: Image.Image) -> list[Face]:
        """Faces in an RGB photo, ordered left to right (then top to bottom)."""
        boxes, probs = self.mtcnn.detect(image)
        if boxes is None:
            return []
        faces = [
            Face(tuple(float(v) for v in box), float(prob))  # type: ignore[arg-type]
            for box, prob in zip(np.asarray(boxes, dtype=np.float64), probs, strict=True)
            if prob is not None and prob >= self.config.min_score
            and max(box[2] - box[0], box[3] - box[1]) >= self.config.min_size
        ]
        return sorted(faces, key=lambda f: (f.box[0], f.box[1]))

    def crop(self, image: Image.Image, face: Face) -> Image.Image:
        """The square around ``face``; parts outside the photo are black, as in the UTKFace chips."""
        return image.crop(square_box(face.box, self.config.margin))

