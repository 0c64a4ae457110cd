import numpy as np
import pytest

from mame_lightning.data.tissue import area_class, area_ratio, chest_wall_side, tissue_mask


def disc_image(height=120, width=100, center=(60, 50), radius=30, level=200, background=20, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    disc = (yy - center[0]) ** 2 + (xx - center[1]) ** 2 < radius**2
    img = np.where(disc, level, background).astype(np.float64) + rng.normal(0, 8, (height, width))
    return np.clip(img, 0, 255).astype(np.uint8), disc


def test_mask_of_a_disc_matches_its_area():
    img, disc = disc_image()
    mask = tissue_mask(img)
    assert mask.dtype == bool
    assert area_ratio(mask) == pytest.approx(disc.mean(), rel=0.03)
    assert (mask & disc).sum() / disc.sum() > 0.97


def test_largest_component_only_and_holes_filled():
    img, disc = disc_image()
    img[2:8, 85:97] = 255  # a burnt-in marker, not tissue
    img[55:65, 45:55] = 20  # a dark structure inside the breast
    mask = tissue_mask(img)
    assert not mask[2:8, 85:97].any()
    assert mask[55:65, 45:55].all()


def test_flat_images_give_an_empty_mask():
    assert not tissue_mask(np.zeros((30, 40), np.uint8)).any()
    assert not tissue_mask(np.full((30, 40), 90, np.uint8)).any()
    assert area_ratio(tissue_mask(np.zeros((30, 40), np.uint8))) == 0.0


def test_area_ratio():
    mask = np.zeros((10, 10), bool)
    mask[:4] = True
    assert area_ratio(mask) == pytest.approx(0.4)


@pytest.mark.parametrize(
    "ratio, expected",
    [(0.0, "small"), (0.39, "small"), (0.4, "medium"), (0.5, "medium"), (0.6, "medium"), (0.61, "big"), (1.0, "big")],
)
def test_area_class_boundaries(ratio, expected):
    assert area_class(ratio) == expected


def test_area_class_custom_and_invalid():
    assert area_class(0.3, thresholds=(0.5,), labels=("low", "high")) == "low"
    assert area_class(0.5, thresholds=(0.5,), labels=("low", "high")) == "high"
    with pytest.raises(ValueError):
        area_class(0.5, thresholds=(0.4, 0.6), labels=("a", "b"))
    with pytest.raises(ValueError):
        area_class(0.5, thresholds=(0.6, 0.4))


@pytest.mark.parametrize("side, column", [("left", 0), ("right", 99)])
def test_chest_wall_side(side, column):
    img, _ = disc_image(center=(60, column), radius=45)
    assert chest_wall_side(tissue_mask(img)) == side
