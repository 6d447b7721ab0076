"""MTCNN's three-stage cascade (Zhang et al. 2016) over one photo, with facenet-pytorch's nets and weights.

facenet-pytorch's ``detect_face`` runs the same cascade and gives the same boxes and landmarks (a
test holds them to 0.01 px). Three changes make it about half as costly on a CPU thread
(``benchmarks/mtcnn.py``); the image pyramid and the candidate crops keep their values:

- the nets run channels-last, where PyTorch's CPU max-pooling is several times faster;
- every level of the image pyramid and every candidate crop is area-averaged (what
  ``F.interpolate(mode="area")`` computes) from one summed-area table of the photo;
- the candidates of a stage are cut in one batch instead of one ``interpolate`` each.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision.ops import batched_nms, nms

# Stage 1 scores 12 x 12 windows of each pyramid level (the smallest face it sees); stages 2 and 3
# rescore the candidates as 24 x 24 and 48 x 48 crops.
CELL = 12
REFINE_SIZE, OUTPUT_SIZE = 24, 48


def summed_area(image: np.ndarray) -> torch.Tensor:
    """The summed-area table of an ``H x W x C`` uint8 image: ``(C, H + 1, W + 1)``, zeros first; int32
    where every sum fits (images under 8.4 million pixels), which PyTorch gathers much faster than int64."""
    height, width, channels = image.shape
    dtype = np.int32 if height * width * 255 < 2**31 else np.int64
    table = np.zeros((channels, height + 1, width + 1), dtype)
    sums = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=dtype)
    np.cumsum(sums, 1, out=sums)
    np.cumsum(sums, 2, out=table[:, 1:, 1:])
    return torch.from_numpy(table)


def _bins(start: torch.Tensor, stop: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive pooling's ``n`` bins of each span ``[start, stop)``: their first and past-last pixels, (N, n) each."""
    i = torch.arange(n)
    length = (stop - start)[:, None]
    return start[:, None] + i * length // n, start[:, None] + -(-(i + 1) * length // n)


def area_resize(table: torch.Tensor, top: torch.Tensor, bottom: torch.Tensor, left: torch.Tensor,
                right: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The regions ``[top, bottom) x [left, right)`` of the image whose ``summed_area`` is ``table``,
    each averaged onto ``height x width`` pixels: ``(N, C, height, width)`` float32, the values of
    ``F.interpolate(region, (height, width), mode="area")``. Every region must hold a pixel.
    """
    row_lo, row_hi = _bins(top, bottom, height)
    col_lo, col_hi = _bins(left, right, width)
    channels, n = table.shape[0], len(top)
    # the sums of the rows of each bin, then of its columns
    rows = (table.index_select(1, row_hi.reshape(-1)) - table.index_select(1, row_lo.reshape(-1)))
    rows = rows.view(channels, n, height, table.shape[2])

    def columns(index: torch.Tensor) -> torch.Tensor:
        return rows.gather(3, index[None, :, None, :].expand(channels, n, height, width))

    sums = columns(col_hi) - columns(col_lo)
    pixels = (row_hi - row_lo)[:, :, None] * (col_hi - col_lo)[:, None, :]
    return (sums / pixels).float().permute(1, 0, 2, 3)


def _scaled(table: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The whole image area-averaged to ``height x width``: (1, C, height, width)."""
    zero = torch.zeros(1, dtype=torch.int64)
    full_h, full_w = table.shape[1] - 1, table.shape[2] - 1
    return area_resize(table, zero, zero + full_h, zero, zero + full_w, height, width)


class Cascade:
    """facenet-pytorch's ``MTCNN`` nets and settings (``thresholds``, pyramid ``factor``), run on one photo.
    The module's nets are turned channels-last in place.

    ``detect`` may be called from several threads at once: the nets are only read.
    """

    def __init__(self, mtcnn: Any) -> None:
        from facenet_pytorch.models.utils import detect_face as reference

        self._ref = reference  # facenet-pytorch's box arithmetic and "Min" non-maximum suppression
        self.pnet, self.rnet, self.onet = (net.to(memory_format=torch.channels_last).eval()
                                           for net in (mtcnn.pnet, mtcnn.rnet, mtcnn.onet))
        self.device = next(self.pnet.parameters()).device
        self.thresholds = tuple(float(t) for t in mtcnn.thresholds)
        self.factor = float(mtcnn.factor)

    def _run(self, net: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A net over pixels in [0, 255], normalised as MTCNN was trained; its outputs on the CPU."""
        x = ((pixels - 127.5) * 0.0078125).to(self.device).contiguous(memory_format=torch.channels_last)
        return tuple(out.cpu() for out in net(x))

    def detect(self, image: np.ndarray, min_face: float) -> tuple[np.ndarray, np.ndarray]:
        """Faces of at least ``min_face`` pixels in an ``H x W x 3`` uint8 RGB image: boxes ``N x 5``
        (x1, y1, x2, y2, probability) and landmarks ``N x 5 x 2`` (x, y), in pixels of ``image``."""
        table = summed_area(image)
        with torch.inference_mode():
            boxes = self._propose(table, min_face)
            if len(boxes):
                boxes = self._refine(table, boxes)
            if not len(boxes):
                return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
            boxes, points = self._output(table, boxes)
        return boxes.numpy(), points.numpy()

    def _propose(self, table: torch.Tensor, min_face: float) -> torch.Tensor:
        """Stage 1, P-net over the image pyramid: candidate squares (N x 5)."""
        ref = self._ref
        h, w = table.shape[1] - 1, table.shape[2] - 1
        scale, shortest = CELL / min_face, min(h, w) * CELL / min_face
        found = []
        while shortest >= CELL:
            reg, probs = self._run(self.pnet, _scaled(table, int(h * scale + 1), int(w * scale + 1)))
            boxes, image = ref.generateBoundingBox(reg, probs[:, 1], scale, self.thresholds[0])
            found.append(boxes[batched_nms(boxes[:, :4], boxes[:, 4], image, 0.5)])
            scale, shortest = scale * self.factor, shortest * self.factor
        boxes = torch.cat(found) if found else torch.zeros((0, 9))
        boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
        width, height = (boxes[:, 2] - boxes[:, 0])[:, None], (boxes[:, 3] - boxes[:, 1])[:, None]
        corners = boxes[:, :4] + boxes[:, 5:9] * torch.cat([width, height, width, height], 1)
        return ref.rerec(torch.cat([corners, boxes[:, 4:5]], 1))

    def _crops(self, table: torch.Tensor, boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The part of each box inside the image, area-averaged to ``size``; and which boxes had one."""
        h, w = table.shape[1] - 1, table.shape[2] - 1
        y, ey, x, ex = (torch.from_numpy(v).long() for v in self._ref.pad(boxes, w, h))
        inside = (ey > y - 1) & (ex > x - 1)
        crops = area_resize(table, y[inside] - 1, ey[inside], x[inside] - 1, ex[inside], size, size)
        return crops, inside

    def _refine(self, table: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Stage 2, R-net: the candidates it keeps, with its score, regressed and squared."""
        crops, inside = self._crops(table, boxes, REFINE_SIZE)
        boxes = boxes[inside]
        reg, probs = self._run(self.rnet, crops)
        keep = probs[:, 1] > self.thresholds[1]
        boxes = torch.cat([boxes[keep, :4], probs[keep, 1:2]], 1)
        pick = nms(boxes[:, :4], boxes[:, 4], 0.7)
        return self._ref.rerec(self._ref.bbreg(boxes[pick], reg[keep][pick]))

    def _output(self, table: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 3, O-net: the faces, their boxes regressed, and their five landmarks."""
        crops, inside = self._crops(table, boxes, OUTPUT_SIZE)
        boxes = boxes[inside]
        reg, points, probs = self._run(self.onet, crops)
        keep = probs[:, 1] > self.thresholds[2]
        boxes, points, reg = torch.cat([boxes[keep, :4], probs[keep, 1:2]], 1), points[keep], reg[keep]
        size = torch.stack([boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1], 1)  # (N, 2): w, h
        points = points.view(-1, 2, 5).transpose(1, 2) * size[:, None, :] + boxes[:, None, :2] - 1
        boxes = self._ref.bbreg(boxes, reg)
        pick = self._ref.batched_nms_numpy(boxes[:, :4], boxes[:, 4], torch.zeros(len(boxes)), 0.7, "Min")
        return boxes[pick], points[pick]
