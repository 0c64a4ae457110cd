"""Inpainting training masks: random boxes and strokes, the lesion/random mix, reproducibility."""

from __future__ import annotations

import pytest
import torch

from mame_lightning.data.loading.masks import MaskMix, mix_masks, random_boxes, random_strokes

SIZE = (64, 64)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lesion_masks(n: int) -> torch.Tensor:
    masks = torch.zeros(n, 1, *SIZE)
    masks[:, :, 20:28, 14:22] = 1.0
    return masks


def test_random_boxes_are_rectangles_of_the_asked_size_inside_the_image():
    boxes = random_boxes(200, SIZE, gen(), side=(0.1, 0.5))
    assert boxes.shape == (200, 1, *SIZE) and set(boxes.unique().tolist()) <= {0.0, 1.0}
    rows, cols = boxes[:, 0].amax(2).sum(1), boxes[:, 0].amax(1).sum(1)
    assert torch.equal(boxes.sum((1, 2, 3)), rows * cols)  # filled rectangles
    assert rows.min() >= 6 and rows.max() <= 32 and cols.min() >= 6 and cols.max() <= 32
    assert rows.float().std() > 3  # sizes vary


def test_strokes_are_free_form_and_of_moderate_area():
    strokes = random_strokes(64, SIZE, gen(1), width=(0.05, 0.15))
    area = strokes.mean((1, 2, 3))
    assert (area > 0).all() and area.max() < 0.5
    rows, cols = strokes[:, 0].amax(2).sum(1), strokes[:, 0].amax(1).sum(1)
    assert (strokes.sum((1, 2, 3)) < rows * cols).float().mean() > 0.8  # not rectangles


def test_the_mix_keeps_its_shares_and_covers_the_lesion():
    mix = MaskMix(lesion=0.5, box=0.25, stroke=0.25)
    lesions = lesion_masks(400)
    masks, kinds = mix_masks(lesions, mix, gen(2))
    shares = torch.bincount(kinds, minlength=3).float() / len(kinds)
    assert shares.tolist() == pytest.approx([0.5, 0.25, 0.25], abs=0.07)
    assert torch.equal(masks[kinds == 0], lesions[kinds == 0])
    assert (masks >= lesions).all()  # keep_lesion: whatever is masked on a lesion image holds the lesion
    assert (masks[kinds > 0].sum((1, 2, 3)) > lesions[kinds > 0].sum((1, 2, 3))).float().mean() > 0.9
    again, same_kinds = mix_masks(lesions, mix, gen(2))
    assert torch.equal(again, masks) and torch.equal(same_kinds, kinds)
    assert not torch.equal(mix_masks(lesions, mix, gen(3))[0], masks)


def test_an_image_without_a_lesion_gets_a_lesion_sized_box():
    mix = MaskMix(lesion=1.0, lesion_size=(0.1, 0.2))
    masks, _ = mix_masks(torch.zeros(50, 1, *SIZE), mix, gen(4))
    area = masks.mean((1, 2, 3))
    assert (area >= 0.1**2 * 0.8).all() and (area <= 0.2**2 * 1.3).all()


def test_bad_mixes_are_refused_naming_the_key():
    with pytest.raises(ValueError, match="not all zero"):
        MaskMix(lesion=0, box=0, stroke=0)
    with pytest.raises(ValueError, match="box_size"):
        MaskMix.from_config({"box_size": [0.5, 0.1]})
    with pytest.raises(ValueError, match="unknown masks key"):
        MaskMix.from_config({"circle": 0.5})
    assert MaskMix.from_config({"lesion": 1.0, "box": 1.0}).random_share == 0.5
