"""MTCNN's cascade: the same pixels and the same faces as facenet-pytorch's own ``detect_face``."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from agecore.mtcnn import Cascade, area_resize, summed_area
from tests.conftest import subset


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (97, 131, 3), dtype=np.uint8)


def test_summed_area_sums_every_rectangle_from_the_top_left(image):
    table = summed_area(image)
    assert table.shape == (3, 98, 132) and table.dtype == torch.int32
    assert table[:, 0].abs().sum() == 0 and table[:, :, 0].abs().sum() == 0
    assert table[1, 40, 17] == int(image[:40, :17, 1].astype(np.int64).sum())
    assert table[2, -1, -1] == int(image[..., 2].astype(np.int64).sum())


@pytest.mark.parametrize("size", [(24, 24), (48, 48), (60, 83), (7, 5)])
def test_area_resize_gives_the_pixels_of_interpolate_area(image, size):
    """Regions smaller and larger than the output, on the border and inside: adaptive average pooling."""
    table = summed_area(image)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    regions = [(0, 97, 0, 131), (10, 30, 5, 18), (50, 97, 100, 131), (3, 4, 60, 61), (0, 60, 20, 131)]
    top, bottom, left, right = (torch.tensor(v) for v in zip(*regions, strict=True))
    got = area_resize(table, top, bottom, left, right, *size)
    assert got.shape == (len(regions), 3, *size) and got.dtype == torch.float32
    for k, (y0, y1, x0, x1) in enumerate(regions):
        want = F.interpolate(x[:, :, y0:y1, x0:x1], size=size, mode="area")[0]
        assert torch.allclose(got[k], want, atol=1e-3), (k, (got[k] - want).abs().max())


@pytest.fixture(scope="module")
def photo(faces_root):
    """Two face crops of different sizes on a noisy canvas, as MTCNN's input (uint8 RGB)."""
    names = subset(faces_root, 9)["file_name"].iloc[[3, 6]]
    rng = np.random.default_rng(1)
    canvas = Image.fromarray(rng.integers(90, 170, (300, 420, 3), dtype=np.uint8))
    for name, (x, y, side) in zip(names, [(30, 60, 150), (250, 120, 90)], strict=True):
        chip = Image.open(faces_root / "final_files" / name).convert("RGB").resize((side, side))
        canvas.paste(chip, (x, y))
    return np.asarray(canvas)


@pytest.mark.usefixtures("facenet")
@pytest.mark.parametrize("min_face", [20.0, 60.0])
def test_the_cascade_finds_what_facenet_pytorch_finds(photo, min_face):
    from facenet_pytorch import MTCNN
    from facenet_pytorch.models.utils.detect_face import detect_face

    mtcnn = MTCNN()
    with torch.inference_mode():
        boxes, points = detect_face(photo, min_face, mtcnn.pnet, mtcnn.rnet, mtcnn.onet, mtcnn.thresholds,
                                    mtcnn.factor, "cpu")
    want_boxes = np.asarray(boxes[0], np.float64).reshape(-1, 5)
    want_points = np.asarray(points[0], np.float64).reshape(-1, 5, 2)
    got_boxes, got_points = Cascade(mtcnn).detect(photo, min_face)
    assert len(want_boxes) >= 2  # both pasted faces
    order = np.lexsort(want_boxes[:, :2].T[::-1]), np.lexsort(got_boxes[:, :2].T[::-1])
    np.testing.assert_allclose(got_boxes[order[1]], want_boxes[order[0]], atol=0.01)
    np.testing.assert_allclose(got_points[order[1]], want_points[order[0]], atol=0.01)


@pytest.mark.usefixtures("facenet")
def test_the_cascade_finds_nothing_on_a_plain_image_or_below_the_smallest_face():
    from facenet_pytorch import MTCNN

    cascade = Cascade(MTCNN())
    plain = np.full((200, 300, 3), 128, np.uint8)
    boxes, points = cascade.detect(plain, 20.0)
    assert boxes.shape == (0, 5) and points.shape == (0, 5, 2)
    boxes, _ = cascade.detect(plain[:10, :10], 20.0)  # smaller than the smallest face: no pyramid level
    assert boxes.shape == (0, 5)
