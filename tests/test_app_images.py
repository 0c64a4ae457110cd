"""GUI pixel helpers (upload checks, brush masks, outlines) and request-folder cleanup, without a server."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")

from mame_lightning.app.images import (  # noqa: E402
    OUTLINE_RGB, check_upload, editor_mask, mask_bbox, outline_overlay,
)
from mame_lightning.pipelines.inputs import InputError  # noqa: E402


def test_brush_layers_become_one_mask_at_the_background_size():
    background = np.zeros((64, 64, 4), dtype=np.uint8)
    small = np.zeros((32, 32, 4), dtype=np.uint8)  # a layer at half size (a scaled canvas)
    small[4:8, 10:14, 3] = 255
    other = np.zeros((64, 64, 4), dtype=np.uint8)
    other[40:44, 40:44] = (255, 0, 0, 255)
    mask = editor_mask({"background": background, "layers": [small, other]})
    expected = np.zeros((64, 64), dtype=bool)
    expected[8:16, 20:28] = True
    expected[40:44, 40:44] = True
    assert mask.dtype == np.uint8 and np.array_equal(mask > 0, expected)
    assert editor_mask({"background": background, "layers": [np.zeros((64, 64, 4), np.uint8)]}) is None
    assert editor_mask(None) is None


def test_outline_marks_the_mask_border_only_and_enlarges_small_images():
    image = np.full((64, 64), 100, dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:32, 20:40] = 255
    shown = outline_overlay(image, mask, display_side=256)
    assert shown.shape == (256, 256, 3)
    red = np.all(shown == OUTLINE_RGB, axis=-1)
    assert red[16 * 4, 30 * 4] and red[24 * 4, 20 * 4]  # top and left edges
    assert not red[24 * 4, 30 * 4] and not red[2, 2]  # inside and far outside stay gray
    assert np.all(shown[~red] == 100)


def test_mask_bbox_is_exclusive_at_the_far_side():
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[2:5, 3:7] = 1
    box = mask_bbox(mask, "Mass")
    assert (box.x0, box.y0, box.x1, box.y1, box.category) == (3, 2, 7, 5, "Mass")


def test_upload_checks_name_the_file_and_read_only_the_header(tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((300, 400), dtype=np.uint8)).save(big)
    assert check_upload(big, 120_000) == big
    with pytest.raises(InputError, match=r"big.png: 400x300 is 0.1 megapixels, above .* 0.1 megapixels"):
        check_upload(big, 100_000)
    with pytest.raises(InputError, match="no image"):
        check_upload(None, 100)
