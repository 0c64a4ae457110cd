"""Prompt fidelity: confusion matrices, agreement, area class and view measured on images."""

import itertools

import numpy as np
import pytest
from PIL import Image

from mame_lightning.data.geometry import apply_image, plan
from mame_lightning.data.synthetic.phantoms import PhantomSpec, render_phantom
from mame_lightning.eval.fidelity import (agreement, confusion_matrix, fidelity_report, measure_area_class,
                                          measure_image, measure_view)
from mame_lightning.eval.plots import plot_confusion_matrix


def test_confusion_matrix_counts_rows_expected_columns_measured():
    expected = ["a", "a", "b", "c", "c"]
    measured = ["a", "b", "b", "a", "c"]
    matrix = confusion_matrix(expected, measured, ["a", "b", "c"])
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 1, 0], [1, 0, 1]])
    assert matrix.sum() == 5
    assert agreement(expected, measured) == pytest.approx(3 / 5)


def test_confusion_matrix_and_agreement_refuse_bad_input():
    with pytest.raises(ValueError, match="'d' at position 1"):
        confusion_matrix(["a", "d"], ["a", "a"], ["a", "b"])
    with pytest.raises(ValueError, match="2 expected values but 1"):
        agreement(["a", "b"], ["a"])
    assert np.isnan(agreement([], []))


def _half_ellipse(ratio: float, size: int = 64, seed: int = 0) -> tuple[np.ndarray, float]:
    """Textured tissue in a half ellipse against the left edge; returns (image, exact area ratio)."""
    depth = 0.9 * size
    half_height = ratio * 2 * size * size / (np.pi * depth)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    inside = (xs / depth) ** 2 + ((ys - size / 2) / half_height) ** 2 < 1
    rng = np.random.default_rng(seed)
    img = np.where(inside, 130 + rng.normal(0, 12, inside.shape), 8 + rng.normal(0, 2, inside.shape))
    return np.clip(img, 0, 255).astype(np.uint8), float(inside.mean())


@pytest.mark.parametrize("ratio, label", [(0.25, "small"), (0.5, "medium"), (0.7, "big")])
def test_area_class_of_a_half_ellipse_of_known_area(ratio, label):
    img, exact = _half_ellipse(ratio)
    measured_class, measured_ratio = measure_area_class(img)
    assert measured_ratio == pytest.approx(exact, abs=0.02)
    assert measured_class == label
    # thresholds and labels from the config are honoured
    assert measure_area_class(img, thresholds=(0.9,), labels=("s", "l"))[0] == "s"


def test_measure_image_accepts_rgb_and_reports_all_attributes():
    img, _ = _half_ellipse(0.5)
    rgb = np.stack([img] * 3, axis=-1)
    measured = measure_image(rgb)
    assert measured["area"] == "medium" and measured["view"] in ("CC", "MLO")
    assert measure_image(img, view=False)["view"] is None


def _prepared_phantom(view: str, laterality: str, density: str, area: str, vendor: str, implant: bool,
                      rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A phantom as the preparation step leaves it: resized, centre-cropped, chest wall on the left."""
    spec = PhantomSpec(height=256, width=208, view=view, laterality=laterality, density=density,
                       area=area, vendor=vendor, implant=implant)
    pixels = (render_phantom(spec, rng).image * 255 + 0.5).astype(np.uint8)
    return apply_image(pixels, plan(*pixels.shape, size, flip=laterality == "R"))


def test_view_is_recovered_on_prepared_phantoms():
    rng = np.random.default_rng(7)
    vendors = itertools.cycle(("siemens", "hologic", "other"))
    results = []
    for view, laterality, density, area in itertools.product(("CC", "MLO"), ("L", "R"), "ABCD",
                                                             ("small", "medium", "big")):
        implant = rng.random() < 0.2
        image = _prepared_phantom(view, laterality, density, area, next(vendors), implant, rng)
        results.append((view, measure_view(image)))
    expected, measured = zip(*results)
    assert None not in measured
    assert agreement(list(expected), list(measured)) >= 0.9
    matrix = confusion_matrix(expected, measured, ["CC", "MLO"])
    assert matrix[0, 0] >= 0.85 * 24 and matrix[1, 1] >= 0.85 * 24  # both views, not one guessed


def test_view_survives_a_mirrored_image_and_a_blank_image_is_not_measured():
    rng = np.random.default_rng(3)
    mlo = _prepared_phantom("MLO", "L", "B", "medium", "siemens", False, rng)
    cc = _prepared_phantom("CC", "L", "B", "medium", "siemens", False, rng)
    assert measure_view(mlo) == "MLO" and measure_view(cc) == "CC"
    assert measure_view(mlo[:, ::-1]) == "MLO"
    assert measure_view(np.full((64, 64), 17, np.uint8)) is None


def test_fidelity_report_per_attribute_with_unmeasured_values(tmp_path):
    records = [
        {"expected": {"area": "big", "view": "CC", "density": "high"}, "measured": {"area": "big", "view": "CC"}},
        {"expected": {"area": "big", "view": "MLO", "density": "low"}, "measured": {"area": "medium", "view": None}},
        {"expected": {"area": "small", "view": "MLO", "density": None}, "measured": {"area": "small", "view": "MLO"}},
    ]
    report = fidelity_report(records, labels={"area": ["small", "medium", "big"]})
    area = report["area"]
    assert area["n"] == 3 and area["not_measured"] == 0
    assert area["agreement"] == pytest.approx(2 / 3)
    assert area["matrix"] == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]
    view = report["view"]
    assert view["n"] == 2 and view["not_measured"] == 1 and view["agreement"] == 1.0
    assert view["labels"] == ["CC", "MLO"]
    density = report["density"]
    assert density["agreement"] is None and density["note"] == "not measured" and density["not_measured"] == 2

    path = plot_confusion_matrix(np.array(area["matrix"]), area["labels"], tmp_path / "area.png", title="area")
    with Image.open(path) as image:
        assert image.format == "PNG" and np.asarray(image.convert("L")).std() > 0
