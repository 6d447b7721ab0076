"""Checkpoint -> batched age predictions. The one inference path of evaluation, bulk scoring and serving.

    >>> predictor = Predictor("runs/train/best")  # doctest: +SKIP
    >>> predictor.predict([Image.open("face.jpg")])  # doctest: +SKIP
    array([31.4], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from agecore.checkpoint import load_checkpoint, preprocessing
from agecore.images import ImageError, decode, load_image, normalize, read_bytes, resize_square, to_rgb

ImageLike = Image.Image | np.ndarray | bytes


class Predictor:
    """Loads a checkpoint once; preprocesses exactly as training did (from what the checkpoint stores).

    ``tta_flip`` averages the prediction of the image and its mirror image (the checkpoint's
    training setting by default). On CPU the network is frozen to TorchScript, which is about
    twice as fast as eager here; ``precision="bf16"`` autocasts (the default on GPUs).
    """

    def __init__(
        self,
        checkpoint: str | Path,
        device: str | None = None,
        *,
        tta_flip: bool | None = None,
        precision: str | None = None,
        batch_size: int = 16,
        threads: int | None = None,
        freeze: bool = True,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, self.meta = load_checkpoint(checkpoint, self.device)
        self.prep = preprocessing(self.meta)
        self.tta_flip = self.meta["train"].get("tta_flip", True) if tta_flip is None else tta_flip
        self.precision = precision or ("bf16" if self.device.type == "cuda" else "fp32")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        self.batch_size = batch_size
        model = model.to(memory_format=torch.channels_last)
        if freeze and self.device.type == "cpu" and self.precision == "fp32":
            size = self.prep.input_size
            example = torch.zeros(2, 3, size, size).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                model = torch.jit.freeze(torch.jit.trace(model, example))
        self.model = model
        self.checkpoint = str(checkpoint)

    @property
    def identity(self) -> dict[str, Any]:
        """What a client needs to know about the model that answered."""
        metrics = {k: v for k, v in self.meta.get("metrics", {}).items() if k != "history"}
        return {
            "checkpoint": self.checkpoint,
            "backbone": self.meta["model"]["backbone"],
            "epoch": self.meta.get("epoch"),
            "val_mae": metrics.get("val_mae"),
            "input_size": self.prep.input_size,
            "tta_flip": self.tta_flip,
            "precision": self.precision,
        }

    # -- preprocessing: the shared path in agecore.images -----------------------------------------

    def preprocess(self, image: ImageLike) -> np.ndarray:
        """Bytes, a PIL image or an HWC uint8 array -> the model's square uint8 input."""
        size, interp = self.prep.input_size, self.prep.interpolation
        if isinstance(image, bytes):
            return load_image(image, size, interp)
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ImageError("bad_array", f"need an HxWx3 uint8 array, got {image.shape} {image.dtype}")
            if image.shape[:2] == (size, size):
                return image
            image = Image.fromarray(image)
        if isinstance(image, Image.Image):
            return resize_square(to_rgb(image), size, interp)
        raise TypeError(f"cannot predict on {type(image).__name__}")

    # -- inference ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed uint8 NHWC batch -> ages in years (float32), in chunks of ``batch_size``."""
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + self.batch_size]))
            x = normalize(chunk.to(self.device), self.prep)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                pred = self.model(x).float()
                if self.tta_flip:
                    pred = (pred + self.model(torch.flip(x, dims=[3])).float()) / 2
            out.append(pred.cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    def predict(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Ages for a list of images; raises ``ImageError`` naming the first bad one."""
        arrays = []
        for i, img in enumerate(images):
            try:
                arrays.append(self.preprocess(img))
            except ImageError as e:
                raise ImageError(e.reason, f"image {i}: {e.detail}") from e
        return self.predict_arrays(np.stack(arrays)) if arrays else np.zeros(0, np.float32)

    def predict_paths(self, paths: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Ages (NaN where the image is unusable) and error texts ('' where fine), one per path."""
        ages = np.full(len(paths), np.nan, dtype=np.float32)
        errors = [""] * len(paths)
        arrays, ok = [], []
        for i, path in enumerate(paths):
            try:
                img = decode(read_bytes(str(path)))
                arrays.append(resize_square(img, self.prep.input_size, self.prep.interpolation))
                ok.append(i)
            except ImageError as e:
                errors[i] = f"{e.reason}: {e.detail}"
        if arrays:
            ages[ok] = self.predict_arrays(np.stack(arrays))
        return ages, errors


class BatchPredictor:
    """A Ray Data ``map_batches`` callable class: one checkpoint load per actor, rows in, rows out.

    Input column ``path`` (or ``image``, preprocessed uint8 rows of a prepared set); output adds ``predicted_age`` (null where unusable) and ``error``.
    """

    def __init__(self, checkpoint: str, device: str | None = None, threads: int | None = None,
                 tta_flip: bool | None = None) -> None:
        self.predictor = Predictor(checkpoint, device, threads=threads, tta_flip=tta_flip)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "image" in batch:  # rows of a prepared set: already decoded by the same preprocessing
            ages, errors = self.predictor.predict_arrays(batch["image"]), [""] * len(batch["image"])
        else:
            ages, errors = self.predictor.predict_paths([str(p) for p in batch["path"]])
        out = {k: v for k, v in batch.items() if k != "image"}
        out["predicted_age"] = ages
        out["error"] = np.array(errors, dtype=object)
        return out
