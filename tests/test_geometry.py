import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from mame_lightning.data.geometry import apply_image, box_mask, map_box, plan, unmap_box
from mame_lightning.data.records import Box


def test_plan_shorter_side_becomes_size_and_crop_is_centred():
    geom = plan(400, 300, 60)
    assert (geom.resized_height, geom.resized_width) == (80, 60)
    assert (geom.crop_y, geom.crop_x) == (10, 0)
    wide = plan(100, 300, 50, flip=True)
    assert (wide.resized_height, wide.resized_width, wide.crop_x, wide.flip) == (50, 150, 50, True)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_apply_image_shape_and_dtype(dtype):
    img = (np.arange(120 * 90).reshape(120, 90) % 200).astype(dtype)
    out = apply_image(img, plan(120, 90, 32))
    assert out.shape == (32, 32) and out.dtype == dtype
    rgb = np.stack([img, img, img], axis=-1)
    assert apply_image(rgb, plan(120, 90, 32)).shape == (32, 32, 3)


def test_apply_image_rejects_wrong_size():
    with pytest.raises(ValueError):
        apply_image(np.zeros((10, 10), np.uint8), plan(20, 10, 8))


def test_flip_mirrors_columns():
    img = np.zeros((40, 40), np.uint8)
    img[:, :10] = 255  # bright left quarter
    plain, flipped = apply_image(img, plan(40, 40, 40)), apply_image(img, plan(40, 40, 40, flip=True))
    assert plain[:, :10].min() == 255 and plain[:, 10:].max() == 0
    assert flipped[:, -10:].min() == 255 and flipped[:, :-10].max() == 0
    np.testing.assert_array_equal(flipped, plain[:, ::-1])
    box = map_box(Box(0, 5, 10, 15), plan(40, 40, 40, flip=True))
    assert (box.x0, box.x1, box.y0, box.y1) == (30, 40, 5, 15)


def test_box_outside_crop_is_dropped_and_partial_box_is_clipped():
    geom = plan(100, 300, 50)  # keeps original columns 100..200
    assert map_box(Box(0, 10, 90, 20), geom) is None
    clipped = map_box(Box(80, 10, 120, 20, "mass"), geom)
    assert clipped.x0 == 0 and clipped.x1 == pytest.approx(10) and clipped.category == "mass"


def test_box_mask_values():
    mask = box_mask([Box(1, 2, 3, 4), Box(5.5, 5.5, 6.2, 6.2)], 8)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    assert mask[2:4, 1:3].min() == 255 and mask[5:7, 5:7].min() == 255
    assert mask.sum() == 255 * (4 + 4)
    assert box_mask([], (3, 5)).shape == (3, 5)


@st.composite
def image_box_and_geometry(draw):
    height = draw(st.integers(12, 160))
    width = draw(st.integers(12, 160))
    size = draw(st.integers(8, 96))
    x0 = draw(st.integers(0, width - 1))
    y0 = draw(st.integers(0, height - 1))
    x1 = draw(st.integers(x0 + 1, width))
    y1 = draw(st.integers(y0 + 1, height))
    flip = draw(st.booleans())
    return plan(height, width, size, flip), Box(x0, y0, x1, y1)


@settings(max_examples=150, deadline=None)
@given(image_box_and_geometry())
def test_map_box_agrees_with_pushing_a_box_image_through_apply_image(case):
    """Tolerance: bilinear interpolation turns a step edge into a ramp, so after thresholding at
    127 the masks may disagree only within a band along the mapped box's border: 1 pixel wide
    when shrinking (the real case, source images are larger than `size`), and ceil(scale)
    pixels when enlarging, where the ramps are `scale` pixels long and round the box corners."""
    geom, box = case
    original = box_mask([box], (geom.height, geom.width))
    pushed = apply_image(original, geom) > 127
    mapped = map_box(box, geom)
    expected = box_mask([mapped], geom.size) > 0 if mapped else np.zeros_like(pushed)
    band = max(1, math.ceil(geom.scale))
    border = ndimage.binary_dilation(expected, iterations=band) & ~ndimage.binary_erosion(expected, iterations=band)
    disagreement = pushed ^ expected
    assert not (disagreement & ~border).any()
    if mapped is None:
        assert not pushed.any()


@settings(max_examples=150, deadline=None)
@given(image_box_and_geometry())
def test_unmap_inverts_map_for_boxes_inside_the_crop(case):
    geom, box = case
    mapped = map_box(box, geom)
    if mapped is None:
        return
    inside = Box(*(unmap_box(mapped, geom).to_list()[:4]))
    # a box the crop did not clip comes back exactly; a clipped one comes back clipped
    back_again = map_box(inside, geom)
    for a, b in zip(back_again.to_list()[:4], mapped.to_list()[:4]):
        assert a == pytest.approx(b, abs=1e-6)
    if mapped.x0 > 0 and mapped.x1 < geom.size and mapped.y0 > 0 and mapped.y1 < geom.size:
        for a, b in zip(inside.to_list()[:4], box.to_list()[:4]):
            assert a == pytest.approx(b, abs=1e-6)


def test_unmap_of_known_box():
    geom = plan(200, 100, 50, flip=True)  # scale 0.5, crop_y 25
    original = unmap_box(Box(10, 0, 20, 10), geom)
    assert original.to_list()[:4] == pytest.approx([60, 50, 80, 70])
