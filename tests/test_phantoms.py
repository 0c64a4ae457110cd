"""Phantom rendering: determinism, view, laterality, density, area class, lesions, speed."""

import time

import numpy as np
import pytest

from mame_lightning.data import geometry, tissue
from mame_lightning.data.dicom import to_uint8
from mame_lightning.data.synthetic.phantoms import (AREA_CLASSES, DENSITIES, PhantomSpec, _crop_ratio,
                                          fit_shape, render_phantom)

H, W = 128, 104


def render(seed=0, **kwargs):
    spec = PhantomSpec(**({"height": H, "width": W} | kwargs))
    return render_phantom(spec, np.random.default_rng(seed))


def prepared_area(image, size):
    """Area ratio the preparation step measures: resize, centre crop, Otsu mask."""
    prepared = geometry.apply_image(image, geometry.plan(*image.shape, size))
    return tissue.area_ratio(tissue.tissue_mask(to_uint8(prepared)))


def corner(image, laterality, share=0.08):
    """Top corner at the chest wall (left edge for L, right edge for R)."""
    h, w = image.shape
    rows, cols = slice(0, int(h * share)), slice(0, int(w * share))
    if laterality == "R":
        cols = slice(w - int(w * share), w)
    return image[rows, cols]


def test_same_seed_same_phantom_other_seed_differs():
    spec = dict(view="MLO", density="C", area="medium", lesions=("mass", "calcification"))
    a, b, c = render(5, **spec), render(5, **spec), render(6, **spec)
    assert a.image.dtype == np.float32 and a.image.shape == (H, W)
    assert 0.0 <= a.image.min() and a.image.max() <= 1.0
    np.testing.assert_array_equal(a.image, b.image)
    assert a.boxes == b.boxes and a.categories == b.categories
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("laterality", ["L", "R"])
@pytest.mark.parametrize("area", AREA_CLASSES)
def test_mlo_shows_pectoral_in_chest_wall_top_corner_cc_does_not(laterality, area):
    for seed in range(3):
        mlo = render(seed, view="MLO", laterality=laterality, area=area)
        cc = render(seed, view="CC", laterality=laterality, area=area)
        assert corner(mlo.image, laterality).mean() > 0.65
        assert corner(cc.image, laterality).mean() < 0.45  # background or fat, no muscle
        opposite = "L" if laterality == "R" else "R"
        assert corner(mlo.image, opposite).mean() < 0.15  # nothing away from the wall


def test_right_breast_is_the_mirror_of_the_left_one():
    spec = dict(view="MLO", density="B", area="big", lesions=("mass", "calcified_mass"))
    left, right = render(3, laterality="L", **spec), render(3, laterality="R", **spec)
    np.testing.assert_array_equal(right.image, left.image[:, ::-1])
    np.testing.assert_array_equal(right.tissue, left.tissue[:, ::-1])
    for lb, rb in zip(left.boxes, right.boxes):
        assert (rb.x0, rb.x1, rb.y0, rb.y1) == (W - lb.x1, W - lb.x0, lb.y0, lb.y1)
    assert tissue.chest_wall_side(left.tissue) == "left"
    assert tissue.chest_wall_side(right.tissue) == "right"


def bright_share(phantom, level=0.55):
    """Share of breast pixels brighter than fat: the fibroglandular texture."""
    inside = phantom.tissue & (phantom.image < 0.76)  # leave out any pectoral muscle
    return float((phantom.image[inside] > level).mean())


def test_denser_breasts_hold_more_bright_texture():
    for seed in range(4):
        shares = [bright_share(render(seed, view="CC", density=d, area="big")) for d in DENSITIES]
        assert shares == sorted(shares), shares
        assert shares[3] > shares[0] + 0.4, shares


def test_density_is_visible_after_shrinking_to_64_px():
    def mean_breast_value(density, seed):
        image = render(seed, height=256, width=208, density=density, area="medium").image
        small = geometry.apply_image(image, geometry.plan(256, 208, 64))
        return small[tissue.tissue_mask(to_uint8(small))].mean()

    for seed in range(3):
        assert mean_breast_value("D", seed) > mean_breast_value("A", seed) + 0.12


@pytest.mark.parametrize("area", AREA_CLASSES)
@pytest.mark.parametrize("size", [64, 512])
def test_area_class_survives_preparation(area, size):
    for seed, (view, density) in enumerate([("CC", "A"), ("MLO", "D"), ("CC", "D"), ("MLO", "B")]):
        for vendor, laterality in [("siemens", "L"), ("hologic", "R"), ("other", "L")]:
            phantom = render(seed, view=view, density=density, area=area, vendor=vendor,
                             laterality=laterality, lesions=("mass",) if seed % 2 else ())
            ratio = prepared_area(phantom.image, size)
            assert tissue.area_class(ratio) == area, (view, density, vendor, ratio)
            assert abs(ratio - phantom.area_ratio) < 0.04


def test_explicit_area_ratio_is_hit():
    for target in (0.2, 0.45, 0.7):
        phantom = render(2, area=target)
        assert phantom.area_ratio == target
        assert abs(prepared_area(phantom.image, 128) - target) < 0.03


def test_cc_silhouette_grows_in_depth_not_into_its_top_corner():
    for seed in range(3):
        spec = PhantomSpec(height=H, width=W, view="CC", area=0.78)
        shape = fit_shape(spec, 0.78, np.random.default_rng(seed))
        assert shape.b <= 0.47 * H + 1e-6
        assert abs(_crop_ratio(shape, H, W) - 0.78) < 0.01


@pytest.mark.parametrize("kind, categories", [
    ("mass", ("Mass",)),
    ("calcification", ("Suspicious Calcification",)),
    ("calcified_mass", ("Mass", "Suspicious Calcification")),
])
def test_lesion_boxes_sit_on_bright_spots_inside_the_breast(kind, categories):
    for seed in range(4):
        for laterality in "LR":
            phantom = render(seed, height=256, width=208, view="MLO", laterality=laterality,
                             density="B", lesions=(kind,))
            healthy = render(seed, height=256, width=208, view="MLO", laterality=laterality,
                             density="B")
            assert phantom.categories == [categories]
            (box,) = phantom.boxes
            assert box.category == categories[0]
            assert 0 <= box.x0 < box.x1 <= 208 and 0 <= box.y0 < box.y1 <= 256
            rows, cols = slice(int(box.y0), int(box.y1)), slice(int(box.x0), int(box.x1))
            assert phantom.tissue[rows, cols].mean() > 0.95  # inside the breast
            patch, before = phantom.image[rows, cols], healthy.image[rows, cols]
            assert patch.max() > 0.75
            assert patch.max() > np.percentile(healthy.image[healthy.tissue], 90)
            assert (patch - before).max() > 0.15  # the lesion added the brightness


def test_a_lesion_changes_only_pixels_near_its_box():
    for kind in ("mass", "calcification", "calcified_mass"):
        phantom = render(4, height=256, width=208, lesions=(kind,))
        healthy = render(4, height=256, width=208)
        box, pad = phantom.boxes[0], 4
        changed = np.argwhere(phantom.image != healthy.image)
        assert changed.size
        assert box.y0 - pad <= changed[:, 0].min() and changed[:, 0].max() < box.y1 + pad
        assert box.x0 - pad <= changed[:, 1].min() and changed[:, 1].max() < box.x1 + pad


def test_implant_adds_a_bright_oval():
    plain, implant = render(0, area="big"), render(0, area="big", implant=True)
    assert (implant.image[implant.tissue] > 0.8).mean() > (plain.image[plain.tissue] > 0.8).mean() + 0.05


@pytest.mark.parametrize("bad, word", [
    ({"view": "ML"}, "view"), ({"laterality": "B"}, "laterality"), ({"density": "E"}, "density"),
    ({"area": "huge"}, "area"), ({"area": 0.99}, "area"), ({"lesions": ("cyst",)}, "cyst"),
    ({"vendor": "agfa"}, "vendor"), ({"height": 8}, "size"),
])
def test_invalid_specs_are_refused_naming_the_field(bad, word):
    with pytest.raises(ValueError, match=word):
        PhantomSpec(**bad)


def test_full_size_renders_quickly_and_keeps_its_area_class():
    spec = PhantomSpec(height=3328, width=2560, view="MLO", density="D", area="small",
                       lesions=("mass", "calcification"))
    start = time.process_time()  # CPU time: fair on a busy shared machine
    phantom = render_phantom(spec, np.random.default_rng(1))
    elapsed = time.process_time() - start
    assert phantom.image.shape == (3328, 2560)
    assert elapsed < 2.0, f"full-size phantom took {elapsed:.2f} s of CPU"
    assert tissue.area_class(prepared_area(phantom.image, 64)) == "small"


def test_view_is_recoverable_by_the_fidelity_heuristic_at_64_px():
    from mame_lightning.eval.fidelity import measure_view

    for seed, (density, area) in enumerate([("A", "small"), ("D", "big"), ("C", "medium"),
                                            ("D", "medium"), ("B", "big")]):
        for view in ("CC", "MLO"):
            image = render(seed, height=256, width=208, view=view, density=density, area=area).image
            small = geometry.apply_image(image, geometry.plan(256, 208, 64))
            assert measure_view(to_uint8(small)) == view, (seed, density, area)
